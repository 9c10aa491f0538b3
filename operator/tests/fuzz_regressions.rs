//! Inputs found by fuzzing the operator's input path (`scripts/fuzz.sh`, target `operator_compile`),
//! replayed through the fuzz target's own oracle (`fuzz/src/compile_check.rs`, included below), so a
//! reproducer is checked by exactly what found it. The reproducers are files in
//! `fuzz/regressions/operator_compile`; each test is named after what it catches. A finding not
//! fixed yet would be `#[ignore]`d with its number in `fuzz/README.md` (none is now).
use std::path::Path;

#[path = "../../fuzz/src/compile_check.rs"]
#[allow(dead_code)]
mod compile_check;

use compile_check::check_text;

fn reproducer(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions/operator_compile")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// Findings 1 and 2 of fuzz/README.md: objects (and KmeshConfigs `default`) defined twice, and
// objects without a name, compiled differently by document order.

#[test]
fn same_named_services_compile_the_same_in_either_order() {
    check_text(&reproducer("same-named-services.yaml"));
}

#[test]
fn same_named_virtual_services_compile_the_same_in_either_order() {
    check_text(&reproducer("same-named-virtual-services.yaml"));
}

#[test]
fn unnamed_services_compile_the_same_in_either_order() {
    check_text(&reproducer("unnamed-services.yaml"));
}

#[test]
fn two_kmesh_configs_compile_the_same_in_either_order() {
    check_text(&reproducer("two-kmesh-configs.yaml"));
}

// Finding 3: a port of 0 reached the snapshot, which the encoder then refused for every node.

#[test]
fn a_service_port_of_0_is_rejected_not_compiled() {
    check_text(&reproducer("service-without-port.yaml"));
}

#[test]
fn a_named_target_port_of_container_port_0_is_rejected_not_compiled() {
    check_text(&reproducer("named-target-port-of-container-port-0.yaml"));
}

// Finding 4: a policy name that no cluster can hold reached the snapshot, which refused it.

#[test]
fn a_name_the_api_server_refuses_is_rejected_not_compiled() {
    check_text(&reproducer("policy-name-not-a-dns-subdomain.yaml"));
}

// Finding 5: a pod bound by a policy but without a readable address gave its node authorization
// sources and no workload, which the snapshot refuses.

#[test]
fn a_bound_pod_without_an_address_adds_no_authorization_tables() {
    check_text(&reproducer("bound-pod-without-an-address.yaml"));
}

// Finding 6: two pods claiming one address; the authorization tables took the pod read first,
// so the document order changed the snapshot.

#[test]
fn pods_sharing_an_address_compile_the_same_in_either_order() {
    check_text(&reproducer("pods-sharing-an-address.yaml"));
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
    check_text(text.as_bytes());
}

// Finding 7: a ServiceEntry host the names section cannot hold reached it with no host, and the
// encoder refused every node's snapshot.

#[test]
fn a_service_entry_host_that_is_not_a_domain_is_rejected_not_compiled() {
    check_text(&reproducer("service-entry-host-not-a-domain.yaml"));
}

#[test]
fn a_service_entry_host_longer_than_a_name_compiles_unnamed() {
    check_text(&reproducer("service-entry-host-of-254-bytes.yaml"));
}

// Finding 8: a bound pod whose address another pod of its node owns gave the node sources and no
// workload, which the snapshot's validation refuses.

#[test]
fn a_bound_pod_owning_no_address_adds_no_authorization_tables() {
    check_text(&reproducer("bound-pod-owning-no-address.yaml"));
}
