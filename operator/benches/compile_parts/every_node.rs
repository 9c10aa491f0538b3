//! What the operator does for one change, on every node: `compile` for all the cluster's nodes,
//! then the publisher's two steps (encode the cluster part once and each node's own part, which
//! gives its content hash; then the node parts served to each node whose content changed, at
//! their generation). The change is one pod's address, which every node's snapshot carries
//! (endpoints are cluster-wide), so every node is served.
//!
//! The baseline, in the same run, is the same change in the same cluster compiled and published for
//! one of its nodes: the ratio says how the work grows with the number of nodes (about 1 means
//! that the cluster-wide part is done once and only each node's own part repeats). RSS is the
//! process's after the change (the peak so far is printed too; the scenarios run smallest first).
//!
//! A scenario whose snapshots would need more memory than half of what the machine has available
//! is not run; the table says so, with the estimate.
use std::{sync::Arc, time::Instant};

use kmesh_operator::{
    compile::{CompileOptions, Compiled, compile},
    inputs::Inputs,
    metrics::Metrics,
    publish::Publisher,
    server::SnapshotStore,
};

use super::generated;
use super::generated_cluster::one_pod_moved;
use super::process::{mem_available_bytes, rss_mb};

/// (services, nodes) per scenario, smallest first.
const FULL: &[(u32, u32)] = &[(1_000, 100), (1_000, 1_000), (10_000, 100), (10_000, 1_000)];
const SMOKE: &[(u32, u32)] = &[(200, 10)];

/// Pods per service, as in the one-node benchmark.
const PODS_PER_SERVICE: u32 = 10;

pub fn run(smoke: bool) {
    println!();
    println!(
        "one change (a pod's address) on every node: compile all nodes, encode the cluster part \
         once and each node's part, serve each node"
    );
    println!(
        "  {:>8} {:>6} {:>10} {:>11} {:>11} {:>9} {:>9} {:>12} {:>14} {:>7} {:>8}",
        "services",
        "nodes",
        "snapshot B",
        "compile ms",
        "publish ms",
        "serve ms",
        "total ms",
        "1 node ms",
        "ratio to 1 node",
        "RSS MB",
        "peak MB"
    );
    let rows: Vec<Row> = (if smoke { SMOKE } else { FULL })
        .iter()
        .filter_map(|&(services, nodes)| scenario(services, nodes))
        .collect();
    chart(&rows);
}

/// A scenario's result: services, nodes, the change's total ms, and one node's.
type Row = (u32, u32, f64, f64);

/// The total against the number of nodes, a line per cluster size (one node is the baseline).
fn chart(rows: &[Row]) {
    use kmesh_bench_plots::{Series, log_log_lines, plots_dir};
    let mut sizes: Vec<u32> = rows.iter().map(|r| r.0).collect();
    sizes.dedup();
    let series: Vec<Series> = sizes
        .iter()
        .map(|&services| {
            let of_size = rows.iter().filter(|r| r.0 == services);
            let one = of_size.clone().map(|r| r.3).fold(f64::NAN, f64::min);
            let mut points = vec![(1.0, one)];
            points.extend(of_size.map(|r| (f64::from(r.1), r.2)));
            Series {
                name: format!("{services} services"),
                points,
            }
        })
        .collect();
    let path = plots_dir().join("operator-change.png");
    log_log_lines(
        &path,
        "One change on every node: compile, encode, serve",
        "nodes",
        "ms",
        &series,
    )
    .expect("chart");
    println!("chart: {}", path.display());
}

fn scenario(services: u32, nodes: u32) -> Option<Row> {
    let inputs = generated(services, PODS_PER_SERVICE, nodes);
    let one = one_change(&inputs, 1);
    // The cluster's tables and part, and each node's own tables and part, live about four times
    // at once (the compile's, the publisher's latest and decided content, the bytes served);
    // twice that during the change.
    let per_node = one.node_part_bytes as u64 * u64::from(nodes);
    let estimate = (one.snapshot_bytes as u64 + per_node) * 8;
    let available = mem_available_bytes();
    if estimate > available / 2 {
        println!(
            "  {services:>8} {nodes:>6} {:>10}  not run: about {} MB of snapshots, more than half \
             of the {} MB available",
            one.snapshot_bytes,
            estimate >> 20,
            available >> 20
        );
        return None;
    }
    let all = one_change(&inputs, nodes);
    println!(
        "  {services:>8} {nodes:>6} {:>10} {:>11.1} {:>11.1} {:>9.1} {:>9.1} {:>12.1} {:>14.1} \
         {:>7} {:>8}",
        all.snapshot_bytes,
        all.compile_ms,
        all.publish_ms,
        all.serve_ms,
        all.total_ms(),
        one.total_ms(),
        all.total_ms() / one.total_ms(),
        all.rss_mb,
        all.peak_mb
    );
    Some((services, nodes, all.total_ms(), one.total_ms()))
}

/// The cost of one change.
struct Change {
    snapshot_bytes: usize,
    /// Of the first node's snapshot, its own part (the rest is shared by every node).
    node_part_bytes: usize,
    compile_ms: f64,
    publish_ms: f64,
    serve_ms: f64,
    rss_mb: u64,
    peak_mb: u64,
}

impl Change {
    fn total_ms(&self) -> f64 {
        self.compile_ms + self.publish_ms + self.serve_ms
    }
}

/// Publishes `inputs` for its first `nodes` nodes once (each served its first generation),
/// changes one pod's address, and measures the operator's work for that change.
fn one_change(inputs: &Inputs, nodes: u32) -> Change {
    let names: Vec<String> = (1..=nodes).map(|n| format!("node-{n}")).collect();
    let options = CompileOptions::default();
    let mut publisher = Publisher::new(SnapshotStore::default(), Arc::new(Metrics::default()), 1);
    let first = compile(inputs, &names, 1, &options);
    publish_all(&mut publisher, &first, nodes);
    let cluster = first.cluster.encode().expect("generated tables encode");
    let node_part_bytes = first.nodes["node-1"]
        .encode(1, cluster.summary())
        .expect("generated tables encode")
        .len();
    let snapshot_bytes = node_part_bytes + cluster.bytes().len();
    drop((first, cluster));

    let changed = one_pod_moved(inputs);

    let started = Instant::now();
    let compiled = compile(&changed, &names, 1, &options);
    let compile_ms = ms_since(started);
    let started = Instant::now();
    publisher.publish(&compiled);
    let publish_ms = ms_since(started);
    let started = Instant::now();
    let served = publisher.advance(&|_| None);
    let serve_ms = ms_since(started);
    assert_eq!(
        served.len(),
        nodes as usize,
        "the change reaches every node"
    );
    let (rss_mb, peak_mb) = rss_mb();
    Change {
        snapshot_bytes,
        node_part_bytes,
        compile_ms,
        publish_ms,
        serve_ms,
        rss_mb,
        peak_mb,
    }
}

/// Takes `compiled` as the content and serves it to every node.
fn publish_all(publisher: &mut Publisher, compiled: &Compiled, nodes: u32) {
    publisher.publish(compiled);
    let served = publisher.advance(&|_| None);
    assert_eq!(served.len(), nodes as usize, "every node is served");
}

fn ms_since(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1e3
}
