//! `/debug/config_dump`: the live snapshot decoded (`kmesh_snapshot::view`), and
//! `/debug/config_dump.bin`: the same snapshot in the snapshot format, for `kmeshctl explain`.
//!
//! Both read the snapshot the data plane keeps in the status (`Status::live_snapshot`), set under
//! the same lock as `Status::live`, so they show the generation `/debug/snapshot` reports. The
//! names the snapshot carries (policy names) are beside their ids; service and workload names join
//! when the snapshot carries them (its names section).
use std::sync::Arc;

use kmesh_snapshot::{
    Decoded,
    view::{self, SectionNames, SnapshotView},
};

use crate::agent::Status;

/// Why there is nothing to show.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum ConfigDumpError {
    #[error(
        "no snapshot received since the agent started; generation {0} is live from the pins, and \
         its contents are shown once the source delivers it again"
    )]
    OnlyInPins(u64),
    #[error("no snapshot applied yet")]
    NoSnapshot,
    #[error("encoding the live snapshot: {0}")]
    Encode(String),
}

/// The live snapshot, if the agent has one of its own.
pub fn live(status: &Status) -> Result<Arc<Decoded>, ConfigDumpError> {
    match (&status.live_snapshot, &status.live) {
        (Some(decoded), _) => Ok(decoded.clone()),
        (None, Some(live)) => Err(ConfigDumpError::OnlyInPins(live.generation)),
        (None, None) => Err(ConfigDumpError::NoSnapshot),
    }
}

/// The view `/debug/config_dump` answers.
pub fn view(decoded: &Decoded) -> SnapshotView {
    view::snapshot(
        &decoded.snapshot,
        decoded.content_hash,
        &SectionNames(&decoded.snapshot),
    )
}

/// The bytes `/debug/config_dump.bin` answers (the encoder is deterministic: these are the bytes
/// the agent was given, with the same content hash).
pub fn binary(decoded: &Decoded) -> Result<Vec<u8>, ConfigDumpError> {
    decoded
        .snapshot
        .encode()
        .map_err(|e| ConfigDumpError::Encode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use kmesh_common::mode;
    use kmesh_snapshot::{Limits, Snapshot, builder::SnapshotBuilder};

    use super::*;
    use crate::agent::LiveSnapshot;

    #[test]
    fn the_binary_is_the_snapshot_the_agent_was_given() {
        let mut b = SnapshotBuilder::new("node-1", 5, mode::KERNEL_NATIVE);
        b.workload("10.244.1.5".parse().unwrap(), 2);
        let bytes = b.build().encode().unwrap();
        let decoded = Snapshot::decode(&bytes, &Limits::default()).unwrap();
        assert_eq!(binary(&decoded).unwrap(), bytes);
        let view = view(&decoded);
        assert_eq!(view.header.generation, 5);
        assert_eq!(
            view.header.content_hash,
            format!("{:016x}", decoded.content_hash)
        );
    }

    #[test]
    fn without_a_snapshot_it_says_why() {
        let mut status = Status::default();
        assert_eq!(live(&status).unwrap_err(), ConfigDumpError::NoSnapshot);
        status.live = Some(LiveSnapshot {
            generation: 9,
            ..LiveSnapshot::default()
        });
        let e = live(&status).unwrap_err();
        assert_eq!(e, ConfigDumpError::OnlyInPins(9));
        assert!(e.to_string().contains("generation 9 is live from the pins"));
    }
}
