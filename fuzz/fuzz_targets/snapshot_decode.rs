//! Arbitrary bytes through `kmesh_snapshot::Snapshot::decode`; see `kmesh_fuzz::decode_check`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kmesh_fuzz::decode_check::check_bytes(data));
