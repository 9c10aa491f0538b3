//! Why the agent did not make a snapshot live. Each reason is a variant carrying its typed cause;
//! [`RefusalKind`] is what `/debug/snapshot` and the log show beside the message. In every case the
//! live generation stays in force.
use kmesh_snapshot::DecodeError;
use kmesh_snapshot::delta::DeltaError;

use crate::maps::{MapsError, SwapError};

#[derive(thiserror::Error, Debug)]
pub enum Refusal {
    /// The bytes are not a valid snapshot (magic, versions, framing, hash, content rules).
    #[error(transparent)]
    Undecodable(DecodeError),
    /// A valid snapshot larger than this node accepts (`--max-*`).
    #[error(transparent)]
    OverCapacity(DecodeError),
    #[error("snapshot is for node {snapshot_node:?}, this agent serves node {agent_node:?}")]
    OtherNode {
        snapshot_node: String,
        agent_node: String,
    },
    /// The live generation could not be read, so the agent cannot tell whether to swap.
    #[error("reading the live generation: {0}")]
    LiveUnreadable(MapsError),
    /// The swap failed before its flip.
    #[error("applying: {0}")]
    ApplyFailed(SwapError),
    /// A delta that could not be read, or that does not give the snapshot it names from the live
    /// one. The source then asks for the whole snapshot.
    #[error("delta: {0}")]
    Delta(DeltaRefusal),
}

/// Why a delta was refused.
#[derive(thiserror::Error, Debug)]
pub enum DeltaRefusal {
    #[error(transparent)]
    Undecodable(DecodeError),
    #[error("no snapshot is live to apply it to")]
    NoBase,
    #[error(transparent)]
    DoesNotApply(DeltaError),
}

/// The kind of a [`Refusal`], as shown on `/debug/snapshot` (`"over_capacity"`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    Undecodable,
    OverCapacity,
    OtherNode,
    LiveUnreadable,
    ApplyFailed,
    Delta,
}

impl RefusalKind {
    pub const ALL: [RefusalKind; 6] = [
        RefusalKind::Undecodable,
        RefusalKind::OverCapacity,
        RefusalKind::OtherNode,
        RefusalKind::LiveUnreadable,
        RefusalKind::ApplyFailed,
        RefusalKind::Delta,
    ];

    /// As serialized (`over_capacity`, ...), for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::Undecodable => "undecodable",
            RefusalKind::OverCapacity => "over_capacity",
            RefusalKind::OtherNode => "other_node",
            RefusalKind::LiveUnreadable => "live_unreadable",
            RefusalKind::ApplyFailed => "apply_failed",
            RefusalKind::Delta => "delta",
        }
    }
}

impl Refusal {
    pub fn kind(&self) -> RefusalKind {
        match self {
            Refusal::Undecodable(_) => RefusalKind::Undecodable,
            Refusal::OverCapacity(_) => RefusalKind::OverCapacity,
            Refusal::OtherNode { .. } => RefusalKind::OtherNode,
            Refusal::LiveUnreadable(_) => RefusalKind::LiveUnreadable,
            Refusal::ApplyFailed(_) => RefusalKind::ApplyFailed,
            Refusal::Delta(_) => RefusalKind::Delta,
        }
    }
}

impl From<DecodeError> for Refusal {
    fn from(e: DecodeError) -> Refusal {
        match e {
            DecodeError::OverCapacity { .. } | DecodeError::TooLarge { .. } => {
                Refusal::OverCapacity(e)
            }
            other => Refusal::Undecodable(other),
        }
    }
}
