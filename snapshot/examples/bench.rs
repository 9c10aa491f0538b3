//! Times generate / encode / decode of synthetic snapshots:
//! `cargo run --release -p kmesh-snapshot --example bench [services...]`
//! (default 1,000, 10,000 and 100,000 services with 10 endpoints each), then of authorization
//! tables alone, up to the node's default capacity (65,536 workload addresses, 1,000,000 sources,
//! 4,000,000 verdicts, 100,000 policies), with the size of their names sections per workload
//! address (also for 10,000 workloads, the 10k-pod cluster the 64-byte budget is set for).
//!
//! For each cluster size it also times a one-endpoint change taken as a delta
//! (`kmesh_snapshot::delta_format`): the delta's bytes against the snapshot's, and the receiver's
//! decode and apply (which checks the content hash and every rule of the result) against decoding
//! the whole snapshot, best of a few runs each.

use std::time::Instant;

use kmesh_snapshot::builder::{generate, generate_authz};
use kmesh_snapshot::delta_format::{Delta, delta_between};
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
        time_delta(&snapshot);
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
        print_names(&snapshot);
    }
    print_names(&generate_authz("bench-node", 1, 10_000, 0, 10_000, 100));
}

/// The names sections' bytes (string table and records) per named workload address.
fn print_names(snapshot: &Snapshot) {
    use kmesh_common::names::{ServiceNameRecord, WorkloadNameRecord};
    let n = &snapshot.names;
    let bytes = n.strings.len()
        + n.workloads.len() * size_of::<WorkloadNameRecord>()
        + n.services.len() * size_of::<ServiceNameRecord>();
    println!(
        "  names of {:>6} workloads: {:>9} bytes ({} of strings), {:.1} bytes per workload (budget 64)",
        n.workloads.len(),
        bytes,
        n.strings.len(),
        bytes as f64 / n.workloads.len().max(1) as f64
    );
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

/// The best of `runs` timings of `f`.
fn best<T>(runs: u32, mut f: impl FnMut() -> T) -> (std::time::Duration, T) {
    let mut best = None;
    let mut out = None;
    for _ in 0..runs {
        let start = Instant::now();
        let value = f();
        let took = start.elapsed();
        if best.is_none_or(|b| took < b) {
            best = Some(took);
        }
        out = Some(value);
    }
    (best.unwrap_or_default(), out.expect("at least one run"))
}

/// One endpoint of `snapshot` moves: the delta's size and the receiver's work, against the whole
/// snapshot's.
fn time_delta(snapshot: &Snapshot) {
    let mut next = snapshot.clone();
    next.generation += 1;
    let middle = next.endpoints.len() / 2;
    next.endpoints[middle].value.ip[15] ^= 1;
    let full = next.encode().expect("valid");
    let delta = delta_between(snapshot, &next).expect("valid");
    let held =
        Snapshot::decode(&snapshot.encode().expect("valid"), &Limits::default()).expect("valid");
    let (whole, decoded) = best(5, || {
        Snapshot::decode(&full, &Limits::default()).expect("valid")
    });
    let (read, _) = best(5, || {
        Delta::decode(&delta, &Limits::default()).expect("valid")
    });
    let (applied, result) = best(5, || {
        Delta::decode(&delta, &Limits::default())
            .expect("valid")
            .apply(&held, &Limits::default())
            .expect("applies")
    });
    assert!(result == decoded, "the delta's result is the snapshot");
    println!(
        "  one endpoint moved: delta {:>6} bytes ({:.4} % of {}), delta decode {read:>8.2?}, decode + apply {applied:>9.2?}, whole snapshot decode {whole:>9.2?}",
        delta.len(),
        delta.len() as f64 * 100.0 / full.len() as f64,
        full.len(),
    );
}
