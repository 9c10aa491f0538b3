//! Times generate / encode / decode of synthetic snapshots:
//! `cargo run --release -p kmesh-snapshot --example bench [services...]`
//! (default 1,000, 10,000 and 100,000 services with 10 endpoints each).

use std::time::Instant;

use kmesh_snapshot::builder::generate;
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

        let start = Instant::now();
        let bytes = snapshot.encode().expect("generated snapshots are valid");
        let encoded = start.elapsed();

        let start = Instant::now();
        let decoded = Snapshot::decode(&bytes, &Limits::default()).expect("valid");
        let decode_time = start.elapsed();

        let start = Instant::now();
        let header = peek_header(&bytes).expect("valid");
        let peeked = start.elapsed();

        assert!(decoded.snapshot == snapshot);
        assert_eq!(header.content_hash, decoded.content_hash);
        println!(
            "{services:>7} services, {:>8} endpoints, {:>10} bytes: generate {generated:>10.2?}, encode {encoded:>10.2?}, decode {decode_time:>10.2?}, peek_header {peeked:>8.2?}",
            snapshot.endpoints.len(),
            bytes.len(),
        );
    }
}
