//! Structured snapshots through the encoder and back; see `kmesh_fuzz::snapshot_plan`.
#![no_main]

use kmesh_fuzz::snapshot_plan::{SnapshotPlan, check_plan};

libfuzzer_sys::fuzz_target!(|plan: SnapshotPlan| check_plan(&plan));
