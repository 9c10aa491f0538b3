//! `/debug/bpf/<table>`: what the active slot of a per-generation map holds in the kernel, decoded
//! into the rows of `kmesh_snapshot::view` (the rows of `/debug/config_dump`, so that the kernel's
//! contents and the snapshot compare field by field).
//!
//! The admin server reads beside the data plane's writes: a flip between reading `KM_ACTIVE` and
//! reading the table would mix two generations, so a read is kept only when the active slot and
//! its generation are the same before and after it, and retried otherwise.
use kmesh_common::AuthzPolicyRecord;
use kmesh_snapshot::{
    admin_contract::BPF_TABLES,
    view::{self, NoNames},
};
use serde::Serialize;

use crate::slots::{MapsError, SlotMaps, SlotTable, TableRecords};

/// How many times a read is tried while generations flip under it.
const ATTEMPTS: usize = 3;

/// The table `name` (one of `BPF_TABLES`) stands for.
pub fn table(name: &str) -> Option<SlotTable> {
    SlotTable::ALL.into_iter().find(|t| label(*t) == name)
}

/// The name of `table` in `/debug/bpf/<table>` (its snapshot section's name).
pub fn label(table: SlotTable) -> &'static str {
    match table {
        SlotTable::Generation => BPF_TABLES[0],
        SlotTable::Services => BPF_TABLES[1],
        SlotTable::Routes => BPF_TABLES[2],
        SlotTable::BackendSets => BPF_TABLES[3],
        SlotTable::Endpoints => BPF_TABLES[4],
        SlotTable::AuthzWorkloads => BPF_TABLES[5],
        SlotTable::AuthzSources => BPF_TABLES[6],
        SlotTable::AuthzVerdicts => BPF_TABLES[7],
    }
}

/// What `/debug/bpf/<table>` answers.
#[derive(Debug, Serialize)]
pub struct TableDump {
    pub table: &'static str,
    /// The active slot read.
    pub slot: u32,
    /// The generation installed in that slot; `None` when nothing is (a fresh installation).
    pub generation: Option<u64>,
    /// The rows, as in `/debug/config_dump`; empty when the slot is empty.
    pub records: serde_json::Value,
}

#[derive(thiserror::Error, Debug)]
pub enum BpfDumpError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("the live generation changed under each of {ATTEMPTS} reads of {table}; try again")]
    Unsettled { table: &'static str },
    #[error("rendering {table}: {message}")]
    Render {
        table: &'static str,
        message: String,
    },
}

/// The records of `table` in the active slot. `policies` names the verdicts' policies (the
/// kernel holds no names; the live snapshot's policy table does).
pub fn dump<M: SlotMaps>(
    maps: &M,
    table: SlotTable,
    policies: &[AuthzPolicyRecord],
) -> Result<TableDump, BpfDumpError> {
    for _ in 0..ATTEMPTS {
        let slot = maps.active_slot()?;
        let before = maps.generation_in(slot)?;
        let records = maps.read(table, slot)?;
        let after = maps.generation_in(slot)?;
        if maps.active_slot()? != slot || before != after {
            continue;
        }
        return Ok(TableDump {
            table: label(table),
            slot: slot.index(),
            generation: before.map(|g| g.meta.generation),
            records: rows(records, policies).map_err(|e| BpfDumpError::Render {
                table: label(table),
                message: e.to_string(),
            })?,
        });
    }
    Err(BpfDumpError::Unsettled {
        table: label(table),
    })
}

/// The records as JSON rows of `kmesh_snapshot::view`.
fn rows(
    records: Option<TableRecords>,
    policies: &[AuthzPolicyRecord],
) -> Result<serde_json::Value, serde_json::Error> {
    let Some(records) = records else {
        return Ok(serde_json::Value::Array(Vec::new()));
    };
    let names = &NoNames;
    match records {
        TableRecords::Generation(r) => {
            serde_json::to_value(r.iter().map(view::generation).collect::<Vec<_>>())
        }
        TableRecords::Services(r) => serde_json::to_value(
            r.iter()
                .map(|r| view::service(r, names))
                .collect::<Vec<_>>(),
        ),
        TableRecords::Routes(r) => {
            serde_json::to_value(r.iter().map(|r| view::route(r, names)).collect::<Vec<_>>())
        }
        TableRecords::BackendSets(r) => serde_json::to_value(
            r.iter()
                .map(|r| view::backend_set(r, names))
                .collect::<Vec<_>>(),
        ),
        TableRecords::Endpoints(r) => serde_json::to_value(
            r.iter()
                .map(|r| view::endpoint(r, names))
                .collect::<Vec<_>>(),
        ),
        TableRecords::AuthzWorkloads(r) => serde_json::to_value(
            r.iter()
                .map(|r| view::authz_workload(r, names))
                .collect::<Vec<_>>(),
        ),
        TableRecords::AuthzSources(r) => {
            serde_json::to_value(r.iter().map(view::authz_source).collect::<Vec<_>>())
        }
        TableRecords::AuthzVerdicts(r) => serde_json::to_value(
            r.iter()
                .map(|r| view::authz_verdict(r, policies))
                .collect::<Vec<_>>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use kmesh_common::{
        authz::{ANY_CLASS, ANY_PORT, authz_action, authz_policy_kind, authz_reason},
        lb_policy, mode,
    };
    use kmesh_snapshot::builder::{Endpoint, SnapshotBuilder};

    use super::*;
    use crate::{
        fake_slots::{FakeSlots, FaultySlots},
        maps::GenerationMaps,
        slots::Slot,
    };

    fn snapshot(generation: u64, port: u16) -> kmesh_snapshot::Snapshot {
        let mut b = SnapshotBuilder::new("node-1", generation, mode::KERNEL_NATIVE);
        let set = b.backend_set(
            lb_policy::RANDOM,
            &[Endpoint::new("10.244.1.11".parse().unwrap(), port, 3)],
        );
        b.service("10.96.0.10".parse().unwrap(), 80, &[(1, set)]);
        b.authz_policy(
            4,
            authz_policy_kind::AUTHORIZATION_POLICY,
            "default/deny-all",
        );
        b.authz_workload("10.244.1.11".parse().unwrap(), 1);
        b.authz_verdict(
            1,
            ANY_CLASS,
            ANY_PORT,
            authz_action::DENY,
            authz_reason::DENY_MATCHED,
            4,
        );
        b.build()
    }

    #[test]
    fn every_table_has_a_name_and_names_are_unique() {
        for table in SlotTable::ALL {
            assert_eq!(super::table(label(table)), Some(table));
        }
        assert_eq!(super::table("workloads"), None, "not a per-generation map");
    }

    #[test]
    fn the_active_slots_records_are_shown_as_config_dump_rows() {
        let mut maps = GenerationMaps::new(FakeSlots::empty()).unwrap();
        let first = snapshot(1, 8080);
        maps.apply(&first, 11, None).unwrap();
        let second = snapshot(2, 9090);
        maps.apply(&second, 22, Some(&first)).unwrap();
        let slots = maps.slots();
        let dump = super::dump(slots, SlotTable::Endpoints, &[]).unwrap();
        assert_eq!(
            (dump.slot, dump.generation),
            (slots.active().index(), Some(2))
        );
        assert_eq!(
            dump.records[0]["address"], "10.244.1.11:9090",
            "{:#}",
            dump.records
        );
        let verdicts =
            super::dump(slots, SlotTable::AuthzVerdicts, &second.authz.policies).unwrap();
        assert_eq!(verdicts.records[0]["policy"], "default/deny-all");
        assert_eq!(verdicts.records[0]["action"], "deny");
        let generation = super::dump(slots, SlotTable::Generation, &[]).unwrap();
        assert_eq!(generation.records[0]["content_hash"], "0000000000000016");
        // The same rows as the snapshot's view.
        let view = kmesh_snapshot::view::snapshot(&second, 22, &NoNames);
        let services = super::dump(slots, SlotTable::Services, &[]).unwrap();
        assert_eq!(
            services.records,
            serde_json::to_value(&view.services).unwrap()
        );
    }

    #[test]
    fn an_empty_installation_shows_no_records() {
        let dump = super::dump(&FakeSlots::empty(), SlotTable::Routes, &[]).unwrap();
        assert_eq!((dump.slot, dump.generation), (Slot::Zero.index(), None));
        assert_eq!(dump.records, serde_json::json!([]));
    }

    /// Flips to the other slot on every read (a generation going live during each read).
    struct FlippingSlots(FakeSlots);

    impl SlotMaps for FlippingSlots {
        type Filled = <FakeSlots as SlotMaps>::Filled;
        fn active_slot(&self) -> Result<Slot, MapsError> {
            self.0.active_slot()
        }
        fn generation_in(
            &self,
            slot: Slot,
        ) -> Result<Option<kmesh_common::GenerationValue>, MapsError> {
            self.0.generation_in(slot)
        }
        fn fill(
            &self,
            header: kmesh_common::GenerationValue,
            snapshot: &kmesh_snapshot::Snapshot,
            changes: &crate::slots::Changes,
        ) -> Result<Self::Filled, MapsError> {
            self.0.fill(header, snapshot, changes)
        }
        fn install(
            &self,
            table: SlotTable,
            slot: Slot,
            filled: &Self::Filled,
        ) -> Result<(), MapsError> {
            self.0.install(table, slot, filled)
        }
        fn flip(&self, slot: Slot) -> Result<(), MapsError> {
            self.0.flip(slot)
        }
        fn grace_period_barrier(&self) -> Result<(), MapsError> {
            self.0.grace_period_barrier()
        }
        fn read(&self, table: SlotTable, slot: Slot) -> Result<Option<TableRecords>, MapsError> {
            let records = self.0.read(table, slot);
            self.0.flip(self.0.active().other())?;
            records
        }
    }

    #[test]
    fn a_read_that_generations_flip_under_is_not_shown() {
        let flipping = FlippingSlots(FakeSlots::with_live(Slot::One, 3, 3));
        let e = super::dump(&flipping, SlotTable::Routes, &[]).unwrap_err();
        assert!(
            matches!(e, BpfDumpError::Unsettled { table: "routes" }),
            "{e}"
        );
    }

    #[test]
    fn a_failed_read_is_an_error_not_an_empty_table() {
        let faulty = FaultySlots::new(FakeSlots::with_live(Slot::One, 3, 3));
        faulty.fail_at(3);
        let e = super::dump(&faulty, SlotTable::Services, &[]).unwrap_err();
        assert!(e.to_string().contains("KM_SERVICES: read failed"), "{e}");
    }
}
