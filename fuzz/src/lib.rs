//! The oracles of the kmesh-rs fuzz targets (`fuzz_targets/`), one module per target. The
//! `decode_check` and `compile_check` modules are also compiled into the regression tests of the
//! snapshot codec and the operator, so a reproducer is checked by exactly what found it.
pub mod authz_plan;
pub mod compile_check;
pub mod decode_check;
pub mod snapshot_plan;
