//! The connect()+close() measurement: each variant's client to its own server with
//! `kmesh-probe --connect-only`, plus the outsider's refused connects to the 1,000-policy server;
//! rounds alternate the cases (in a shuffled order, see `round_order`); medians, spreads and TCP stalls are printed.
use crate::{
    Plan, Variant, median,
    node::{self, Node, PROBE_PORT},
    round_order, spread,
    tcp_stats::{self, Observed},
};

/// A connect measurement: a variant, allowed (its client) or denied (the outsider).
#[derive(Clone, Copy)]
struct ConnectCase {
    variant: Variant,
    denied: bool,
}

const CASES: [ConnectCase; 5] = [
    ConnectCase {
        variant: Variant::NoPrograms,
        denied: false,
    },
    ConnectCase {
        variant: Variant::Unbound,
        denied: false,
    },
    ConnectCase {
        variant: Variant::Policies10,
        denied: false,
    },
    ConnectCase {
        variant: Variant::Policies1000,
        denied: false,
    },
    ConnectCase {
        variant: Variant::Policies1000,
        denied: true,
    },
];

impl ConnectCase {
    fn label(self) -> String {
        if self.denied {
            format!("{}: denied (ECONNREFUSED)", self.variant.label())
        } else {
            self.variant.label().to_string()
        }
    }
}

pub fn run(plan: &Plan, node: &mut Node) {
    let mut results: Vec<Vec<Observed<f64>>> = vec![vec![]; CASES.len()];
    // Warm up caches, neighbours and the program.
    for case in CASES {
        measure(node, case, plan.connections / 10);
    }
    for round in 0..plan.rounds {
        for i in round_order(round, CASES.len()) {
            results[i].push(measure(node, CASES[i], plan.connections));
        }
    }
    report(plan, &results);
}

fn measure(node: &mut Node, case: ConnectCase, n: u32) -> Observed<f64> {
    node.prepare(case.variant);
    let pair = node.pair(case.variant);
    let target = pair.target(PROBE_PORT);
    let client = if case.denied {
        &node.outsider
    } else {
        &pair.client
    };
    tcp_stats::observe(client, &pair.server, || {
        if case.denied {
            node::refusals(client, &node.probes, &target, n)
        } else {
            node::connects(client, &node.probes, &target, n)
        }
    })
}

fn report(plan: &Plan, results: &[Vec<Observed<f64>>]) {
    let us: Vec<Vec<f64>> = results
        .iter()
        .map(|r| r.iter().map(|o| o.value).collect())
        .collect();
    let medians: Vec<f64> = us.iter().map(|r| median(r.clone())).collect();
    let baseline = medians[0];
    println!();
    println!(
        "connect()+close() to the server pod's IP:port, median of {} rounds of {} connections:",
        plan.rounds, plan.connections
    );
    for (i, case) in CASES.iter().enumerate() {
        let (lo, hi) = spread(&us[i]);
        let ratio = if i == 0 {
            "           ".to_string()
        } else {
            format!("ratio {:.3}", medians[i] / baseline)
        };
        println!(
            "  {:<52} {:>8.2} us   {ratio}   (rounds {lo:.2}..{hi:.2})",
            case.label(),
            medians[i]
        );
    }
    println!(
        "  denied vs allowed connect, 1,000 policies: ratio {:.3}",
        medians[4] / medians[3]
    );
    print_stalls(results);
}

/// The TCP stalls of each case over its rounds, if any case had one.
fn print_stalls(results: &[Vec<Observed<f64>>]) {
    let totals: Vec<_> = results.iter().map(|r| tcp_stats::total(r)).collect();
    if totals.iter().all(|(c, s)| !c.stalled() && !s.stalled()) {
        println!("  no SYN retransmit, timeout or listen drop in any round");
        return;
    }
    for (case, (client, server)) in CASES.iter().zip(&totals) {
        println!("  {}: client {client}; server {server}", case.label());
    }
}
