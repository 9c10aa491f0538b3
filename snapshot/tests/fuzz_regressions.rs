//! Inputs found by fuzzing the snapshot decoder (`scripts/fuzz.sh`, target `snapshot_decode`),
//! replayed through the fuzz target's own oracle (`fuzz/src/decode_check.rs`, included below), so a
//! reproducer is checked by exactly what found it. Each test is named after what it catches.
//!
//! No fuzzing run has found a decoder bug yet (fuzz/README.md); until one does, this replays the
//! committed corpus, which also keeps the shared oracle compiling with the codec it checks.
use std::path::Path;

#[path = "../../fuzz/src/decode_check.rs"]
#[allow(dead_code)]
mod decode_check;

#[test]
fn committed_decoder_corpus_passes_the_fuzz_oracle() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/snapshot_decode");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut accepted = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        decode_check::check_bytes(&bytes);
        let limits = kmesh_snapshot::Limits::UNLIMITED;
        accepted += usize::from(kmesh_snapshot::Snapshot::decode(&bytes, &limits).is_ok());
    }
    // The corpus starts from valid snapshots: the oracle's accepting side must be exercised.
    assert!(accepted > 0, "no snapshot in {} decodes", dir.display());
}
