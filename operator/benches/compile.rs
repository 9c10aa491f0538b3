//! Compiler benchmark: compile time and snapshot size for bookinfo and for generated clusters of
//! 1,000, 10,000 and (last) 100,000 services of 10 pods each, against a baseline in the same run: the time to encode and decode the resulting snapshot (the
//! agent's share of the same data).
//!
//! `cargo bench -p kmesh-operator --bench compile` (`-- --smoke` compiles only 1,000 services).
//! Writes charts of the every-node change against the number of nodes, and of the compile, the
//! codec and the snapshot's size against the number of services, to
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
    let sizes: &[u32] = if smoke { &[1_000] } else { &[1_000, 10_000] };
    let mut scale = Vec::new();
    for &services in sizes {
        let cluster = generated(services, 10, 100);
        scale.push(measure(
            &format!("generated: {services} services x 10 pods, 100 nodes"),
            &cluster,
            3,
        ));
    }
    every_node::run(smoke);
    if !smoke {
        // The largest cluster, last (its 6.5 GB would stay in the RSS the every-node
        // table reports): best of two, the first touching fresh memory.
        println!();
        let large = generated(100_000, 10, 100);
        scale.push(measure(
            "generated: 100000 services x 10 pods, 100 nodes",
            &large,
            2,
        ));
    }
    chart(&scale);
}

/// One generated cluster's figures: services, compile ms, encode + decode ms, snapshot bytes.
type Scale = (u32, f64, f64, usize);

/// The compile, the codec and the snapshot's size against the number of services.
fn chart(scale: &[Scale]) {
    use kmesh_bench_plots::{Series, log_log_lines, plots_dir};
    let series = |name: &str, value: fn(&Scale) -> f64| Series {
        name: name.to_string(),
        points: scale.iter().map(|s| (f64::from(s.0), value(s))).collect(),
    };
    let path = plots_dir().join("compile-scale.png");
    log_log_lines(
        &path,
        "The operator: one node's compile (10 pods per service)",
        "services",
        "ms, or MB",
        &[
            series("compile (ms)", |s| s.1),
            series("encode + decode (ms)", |s| s.2),
            series("snapshot (MB)", |s| s.3 as f64 / 1e6),
        ],
    )
    .expect("chart");
    println!("chart: {}", path.display());
}

fn measure(label: &str, inputs: &Inputs, rounds: u32) -> Scale {
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
    (snapshot.services.len() as u32, best, codec, bytes.len())
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
