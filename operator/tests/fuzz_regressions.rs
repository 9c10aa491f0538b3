//! Inputs found by fuzzing the operator's input path (`scripts/fuzz.sh`, target `operator_compile`),
//! replayed through the fuzz target's own oracle (`fuzz/src/compile_check.rs`, included below), so a
//! reproducer is checked by exactly what found it. The reproducers are files in
//! `fuzz/regressions/operator_compile`; each test is named after what it catches. Findings not fixed
//! yet are `#[ignore]`d with the finding's number in `fuzz/README.md`; run them with
//! `cargo test -p kmesh-operator --test fuzz_regressions -- --include-ignored`.
use std::path::Path;

#[path = "../../fuzz/src/compile_check.rs"]
#[allow(dead_code)]
mod compile_check;

use compile_check::{Known, check_text};

fn reproducer(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions/operator_compile")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The reproducers of the findings that are not fixed yet.
const KNOWN: [&str; 6] = [
    "same-named-services.yaml",
    "same-named-virtual-services.yaml",
    "unnamed-services.yaml",
    "two-kmesh-configs.yaml",
    "service-without-port.yaml",
    "named-target-port-of-container-port-0.yaml",
];

#[test]
#[ignore = "finding 1 in fuzz/README.md: not fixed yet (compile.rs)"]
fn same_named_services_compile_the_same_in_either_order() {
    check_text(&reproducer("same-named-services.yaml"), Known::Strict);
}

#[test]
#[ignore = "finding 1 in fuzz/README.md: not fixed yet (compile.rs)"]
fn same_named_virtual_services_compile_the_same_in_either_order() {
    check_text(
        &reproducer("same-named-virtual-services.yaml"),
        Known::Strict,
    );
}

#[test]
#[ignore = "finding 1 in fuzz/README.md: not fixed yet (compile.rs)"]
fn unnamed_services_compile_the_same_in_either_order() {
    check_text(&reproducer("unnamed-services.yaml"), Known::Strict);
}

#[test]
#[ignore = "finding 2 in fuzz/README.md: not fixed yet (inputs.rs or compile.rs)"]
fn two_kmesh_configs_compile_the_same_in_either_order() {
    check_text(&reproducer("two-kmesh-configs.yaml"), Known::Strict);
}

#[test]
#[ignore = "finding 3 in fuzz/README.md: not fixed yet (compile.rs)"]
fn a_service_port_of_0_is_rejected_not_compiled() {
    check_text(&reproducer("service-without-port.yaml"), Known::Strict);
}

#[test]
#[ignore = "finding 3 in fuzz/README.md: not fixed yet (compile.rs)"]
fn a_named_target_port_of_container_port_0_is_rejected_not_compiled() {
    check_text(
        &reproducer("named-target-port-of-container-port-0.yaml"),
        Known::Strict,
    );
}

/// The fuzz target steps around the known findings (`Known::Skipped`), so that it keeps finding
/// new ones: on their reproducers it must not fire.
#[test]
fn the_fuzz_target_skips_the_known_findings() {
    for name in KNOWN {
        check_text(&reproducer(name), Known::Skipped);
    }
}

/// The oracle passes on real input: the bookinfo cluster with Istio's canary, in both modes.
#[test]
fn bookinfo_with_a_canary_passes_the_fuzz_oracle() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut text =
        std::fs::read_to_string(repo.join("tests/fixtures/bookinfo/cluster.yaml")).unwrap();
    for sample in [
        "destination-rule-all.yaml",
        "virtual-service-reviews-90-10.yaml",
    ] {
        let path = repo
            .join("../shared/reference/istio/samples/bookinfo/networking")
            .join(sample);
        text.push_str("\n---\n");
        text.push_str(
            &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        );
    }
    check_text(text.as_bytes(), Known::Strict);
    check_text(text.as_bytes(), Known::Skipped);
}
