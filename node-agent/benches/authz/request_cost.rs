//! The wrk measurement: HTTP requests from each variant's client pod to its own server, one
//! connection per request and keep-alive; rounds alternate the cases (in a shuffled order, see `round_order`). Prints
//! the medians of the rounds without wrk errors, every round's requests/s, the rounds with
//! errors (left out of the medians), and the TCP stalls and TIME_WAIT each case met.
use crate::{
    Plan, Variant, median,
    node::{HTTP_PORT, Node},
    round_order,
    tcp_stats::{self, Observed},
    wrk::{self, Connections, WrkResult, WrkRun},
};

/// A wrk measurement: a variant and whether each request has its own connection.
const CASES: [(Variant, Connections); 6] = [
    (Variant::NoPrograms, Connections::PerRequest),
    (Variant::Unbound, Connections::PerRequest),
    (Variant::Policies10, Connections::PerRequest),
    (Variant::Policies1000, Connections::PerRequest),
    (Variant::NoPrograms, Connections::KeepAlive),
    (Variant::Policies1000, Connections::KeepAlive),
];

/// The case each case is compared with: the baseline of its connection mode.
fn baseline_of(mode: Connections) -> usize {
    match mode {
        Connections::PerRequest => 0,
        Connections::KeepAlive => 4,
    }
}

fn label((variant, mode): (Variant, Connections)) -> String {
    let mode = match mode {
        Connections::PerRequest => "conn/request",
        Connections::KeepAlive => "keep-alive",
    };
    format!("{mode}: {}", variant.label())
}

pub fn run(plan: &Plan, node: &mut Node) {
    let mut results: Vec<Vec<Observed<WrkRun>>> = vec![vec![]; CASES.len()];
    for round in 0..plan.rounds {
        for i in round_order(round, CASES.len()) {
            let run = measure(plan, node, CASES[i]);
            if run.value.errors.any() {
                println!(
                    "  round {}, {}: wrk errors ({}), {:.0} req/s: left out of the medians",
                    round + 1,
                    label(CASES[i]),
                    run.value.errors,
                    run.value.result.requests_per_s
                );
            }
            results[i].push(run);
        }
    }
    report(plan, &results);
}

fn measure(
    plan: &Plan,
    node: &mut Node,
    (variant, mode): (Variant, Connections),
) -> Observed<WrkRun> {
    node.prepare(variant);
    let pair = node.pair(variant);
    let url = format!("http://{}/", pair.target(HTTP_PORT));
    tcp_stats::observe(&pair.client, &pair.server, || {
        wrk::run(
            pair.client.netns_name(),
            &url,
            mode,
            plan.wrk_seconds,
            plan.wrk_connections,
        )
    })
}

/// Each figure's median over the rounds without errors.
fn median_result(runs: &[Observed<WrkRun>]) -> Option<WrkResult> {
    let ok: Vec<WrkResult> = runs
        .iter()
        .filter(|r| !r.value.errors.any())
        .map(|r| r.value.result)
        .collect();
    if ok.is_empty() {
        return None;
    }
    Some(WrkResult {
        requests_per_s: median(ok.iter().map(|r| r.requests_per_s).collect()),
        p50_us: median(ok.iter().map(|r| r.p50_us).collect()),
        p90_us: median(ok.iter().map(|r| r.p90_us).collect()),
        p99_us: median(ok.iter().map(|r| r.p99_us).collect()),
    })
}

fn report(plan: &Plan, results: &[Vec<Observed<WrkRun>>]) {
    let medians: Vec<WrkResult> = results
        .iter()
        .zip(CASES)
        .map(|(r, case)| {
            median_result(r).unwrap_or_else(|| {
                panic!(
                    "{}: every wrk round had errors (printed above)",
                    label(case)
                )
            })
        })
        .collect();
    println!();
    println!(
        "HTTP requests with wrk from the client pods, median of {} rounds of {} s without wrk \
         errors (ratios against the baseline of the same connection mode):",
        plan.rounds, plan.wrk_seconds
    );
    println!(
        "  {:<58} {:>8} {:>6} {:>8} {:>6} {:>8} {:>6} {:>7}",
        "", "req/s", "ratio", "p50 us", "ratio", "p99 us", "ratio", "rounds"
    );
    for (i, (case, r)) in CASES.iter().zip(&medians).enumerate() {
        let base = medians[baseline_of(case.1)];
        let used = results[i].iter().filter(|r| !r.value.errors.any()).count();
        println!(
            "  {:<58} {:>8.0} {:>6.3} {:>8.1} {:>6.3} {:>8.1} {:>6.3} {:>7}",
            label(*case),
            r.requests_per_s,
            r.requests_per_s / base.requests_per_s,
            r.p50_us,
            r.p50_us / base.p50_us,
            r.p99_us,
            r.p99_us / base.p99_us,
            format!("{used}/{}", results[i].len())
        );
    }
    print_rounds(results);
    print_stalls(results);
}

/// Every round's requests/s (thousands), in round order: a collapse or a drift shows here.
fn print_rounds(results: &[Vec<Observed<WrkRun>>]) {
    println!("  every round's thousands of req/s (* = wrk errors):");
    for (case, runs) in CASES.iter().zip(results) {
        let rounds: Vec<String> = runs
            .iter()
            .map(|r| {
                let mark = if r.value.errors.any() { "*" } else { "" };
                format!("{:.1}{mark}", r.value.result.requests_per_s / 1e3)
            })
            .collect();
        println!("  {:<58} {}", label(*case), rounds.join(" "));
    }
}

/// The TCP stalls each case met over its rounds, and the TIME_WAIT sockets after its last round.
fn print_stalls(results: &[Vec<Observed<WrkRun>>]) {
    println!("  TCP over the rounds (stalls summed; TIME_WAIT after the last round):");
    for (case, runs) in CASES.iter().zip(results) {
        let (client, server) = tcp_stats::total(runs);
        println!("  {:<58} client {client}", label(*case));
        println!("  {:<58} server {server}", "");
    }
}
