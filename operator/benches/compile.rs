//! Compiler benchmark: compile time and snapshot size for bookinfo and for generated clusters of
//! 10,000 services and 100,000 endpoints (10 pods each) and, in the full run, 100,000 services,
//! against a baseline in the same run: the time to encode and decode the resulting snapshot (the
//! agent's share of the same data).
//!
//! `cargo bench -p kmesh-operator --bench compile` (`-- --smoke` compiles 1,000 services instead).
//! Writes a chart of the every-node change against the number of nodes to
//! `kmesh_bench_plots::plots_dir()`.
use std::{path::Path, time::Instant};

use kmesh_operator::{
    compile::{CompileOptions, compile},
    inputs::Inputs,
};
use kmesh_snapshot::{Limits, Snapshot};

#[path = "compile_parts/every_node.rs"]
mod every_node;
#[path = "compile_parts/generated.rs"]
mod generated_cluster;
#[path = "compile_parts/process.rs"]
mod process;

use generated_cluster::generated;

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    println!(
        "kmesh-rs compiler benchmark ({})",
        if smoke { "smoke run" } else { "full run" }
    );
    println!(
        "  {:<44} {:>9} {:>10} {:>12} {:>11} {:>11} {:>13}",
        "input", "services", "endpoints", "snapshot B", "compile ms", "enc+dec ms", "names B/pod"
    );
    let bookinfo = bookinfo();
    measure(
        "bookinfo + destination-rule-all + reviews 90-10",
        &bookinfo,
        20,
    );
    let services = if smoke { 1_000 } else { 10_000 };
    let cluster = generated(services, 10, 100);
    measure(
        &format!("generated: {services} services x 10 pods, 100 nodes"),
        &cluster,
        3,
    );
    drop(cluster);
    every_node::run(smoke);
    if !smoke {
        // The largest cluster, last (its 6.5 GB would stay in the RSS the every-node
        // table reports): best of two, the first touching fresh memory.
        println!();
        let large = generated(100_000, 10, 100);
        measure("generated: 100000 services x 10 pods, 100 nodes", &large, 2);
    }
}

fn measure(label: &str, inputs: &Inputs, rounds: u32) {
    let node = vec!["node-1".to_string()];
    let options = CompileOptions::default();
    let mut best = f64::MAX;
    let mut compiled = None;
    for _ in 0..rounds {
        let started = Instant::now();
        let c = compile(inputs, &node, 1, &options);
        best = best.min(started.elapsed().as_secs_f64() * 1e3);
        compiled = Some(c);
    }
    let compiled = compiled.expect("at least one round");
    let snapshot = &compiled.snapshot("node-1").unwrap();
    let started = Instant::now();
    let bytes = snapshot.encode().expect("valid snapshot");
    Snapshot::decode(&bytes, &Limits::UNLIMITED).expect("decodes");
    let codec = started.elapsed().as_secs_f64() * 1e3;
    // The names sections per named pod address (the budget is 64 bytes).
    let names = kmesh_operator::compile::names_bytes(&snapshot.names) as f64
        / snapshot.names.workloads.len().max(1) as f64;
    println!(
        "  {:<44} {:>9} {:>10} {:>12} {:>11.1} {:>11.1} {:>13.1}",
        label,
        snapshot.services.len(),
        snapshot.endpoints.len(),
        bytes.len(),
        best,
        codec,
        names
    );
}

fn bookinfo() -> Inputs {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let networking = repo.join("../shared/reference/istio/samples/bookinfo/networking");
    let mut inputs = Inputs::default();
    for file in [
        repo.join("tests/fixtures/bookinfo/cluster.yaml"),
        networking.join("destination-rule-all.yaml"),
        networking.join("virtual-service-reviews-90-10.yaml"),
    ] {
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(inputs.add_yaml(&text, "bench", "default").is_empty());
    }
    inputs
}
