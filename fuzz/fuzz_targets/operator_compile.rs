//! YAML and JSON documents through the operator's inputs and compiler; see
//! `kmesh_fuzz::compile_check`.
#![no_main]

use kmesh_fuzz::compile_check::check_text;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check_text(data));
