//! Times generate / encode / decode of synthetic snapshots:
//! `cargo run --release -p kmesh-snapshot --example bench [services...]`
//! (default 1,000, 10,000 and 100,000 services with 10 endpoints each), then of authorization
//! tables alone, up to the node's default capacity (65,536 workload addresses, 1,000,000 sources,
//! 4,000,000 verdicts, 100,000 policies).

use std::time::Instant;

use kmesh_snapshot::builder::{generate, generate_authz};
use kmesh_snapshot::{Limits, Snapshot, peek_header};

fn main() {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a number of services"))
        .collect();
    let sizes = if args.is_empty() {
        vec![1_000, 10_000, 100_000]
    } else {
        args
    };
    for services in sizes {
        let start = Instant::now();
        let snapshot = generate("bench-node", 1, services, 10);
        let generated = start.elapsed();
        let label = format!(
            "{services:>7} services, {:>8} endpoints",
            snapshot.endpoints.len()
        );
        time_codec(&label, &snapshot, generated);
    }
    let authz_sizes = [
        (1_024, 10_000, 40_000, 1_000),
        (65_536, 1_000_000, 4_000_000, 100_000),
    ];
    for (workloads, sources, verdicts, policies) in authz_sizes {
        let start = Instant::now();
        let snapshot = generate_authz("bench-node", 1, workloads, sources, verdicts, policies);
        let generated = start.elapsed();
        let a = &snapshot.authz;
        let label = format!(
            "authz {:>6} workloads, {:>7} sources, {:>7} verdicts, {:>6} policies",
            a.workloads.len(),
            a.sources.len(),
            a.verdicts.len(),
            a.policies.len()
        );
        time_codec(&label, &snapshot, generated);
    }
}

/// Encodes, decodes and peeks at `snapshot`, checks the round trip, and prints the times.
fn time_codec(label: &str, snapshot: &Snapshot, generated: std::time::Duration) {
    let start = Instant::now();
    let bytes = snapshot.encode().expect("generated snapshots are valid");
    let encoded = start.elapsed();

    let start = Instant::now();
    let decoded = Snapshot::decode(&bytes, &Limits::default()).expect("valid");
    let decode_time = start.elapsed();

    let start = Instant::now();
    let header = peek_header(&bytes).expect("valid");
    let peeked = start.elapsed();

    assert!(decoded.snapshot == *snapshot);
    assert_eq!(header.content_hash, decoded.content_hash);
    println!(
        "{label}, {:>10} bytes: generate {generated:>10.2?}, encode {encoded:>10.2?}, decode {decode_time:>10.2?}, peek_header {peeked:>8.2?}",
        bytes.len(),
    );
}
