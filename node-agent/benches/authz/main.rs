//! Authorization benchmark, on the real kernel (root). Prints, in one run, with ratios against a
//! baseline measured in the same run:
//!
//! 1. connect()+close() cost from a client pod straight to a server pod's IP:port: the baseline
//!    is a server pod whose namespace has no sk_lookup link; each measured variant has its own
//!    server pod whose namespace has the real `kmesh_authz` program attached (as the agent
//!    attaches it), with the destination unbound (no workload entry), bound by 10 and by 1,000
//!    ALLOW policies (compile-shaped tables, see `tables.rs`; the client is allowed by the last
//!    policy). Also a denied connect (ECONNREFUSED, the end of the lookup chain) against the
//!    allowed one.
//! 2. HTTP requests with `wrk` from the client pods: requests/s and latency p50/p99, one
//!    connection per request (`Connection: close`: sk_lookup runs once per request) for the same
//!    variants, and keep-alive (sk_lookup runs only when wrk opens its connections) with 1,000
//!    policies.
//!
//! `cargo bench -p kmesh-agent --bench authz` for the full run (needs `cargo build --release -p
//! kmesh-tests --bins` first, for `kmesh-probe`, and `wrk`), `-- --smoke` for the short run CI
//! does. Every variant has a client pod and a server pod of its own (`node.rs`): with one client
//! and one server for all the sk_lookup variants, that pair made three times the baseline's
//! connections, its client's TIME_WAITs to that server crossed half the ephemeral ports, and
//! every connect() then scanned the ports for a free one (2 ms here): requests/s of every
//! sk_lookup variant collapsed to a tenth, the baseline's did not. The clients also reuse their
//! TIME_WAIT ports (`tcp_tw_reuse = 1`), so no client comes near that line. Variants alternate within every round (in a shuffled order), the snapshot of a
//! variant is applied right before it runs, and the medians of the rounds are reported, beside
//! every round's figure and the TCP stalls (SYN retransmits, timeouts, listen drops) each variant
//! met. A wrk round with errors is printed and left out of the medians. Before measuring, the
//! benchmark checks that the tables do what it claims (the program is on every measured server
//! and not on the baseline's, the outsider is refused, the client is not), so it cannot report
//! the cost of a program that is not there.
mod connect_cost;
mod http_server;
mod node;
mod request_cost;
mod tables;
mod tcp_stats;
mod wrk;

use node::Node;

struct Plan {
    rounds: usize,
    connections: u32,
    wrk_seconds: u32,
    wrk_connections: usize,
}

/// What a measurement runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    /// The server pod whose namespace has no sk_lookup link.
    NoPrograms,
    /// sk_lookup attached; the destination has no workload entry.
    Unbound,
    /// sk_lookup attached; the destination is bound by 10 policies.
    Policies10,
    /// sk_lookup attached; the destination is bound by 1,000 policies.
    Policies1000,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::NoPrograms,
        Variant::Unbound,
        Variant::Policies10,
        Variant::Policies1000,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// Whether the variant's server namespace has the sk_lookup program.
    fn has_program(self) -> bool {
        self != Variant::NoPrograms
    }

    fn label(self) -> &'static str {
        match self {
            Variant::NoPrograms => "baseline: no programs",
            Variant::Unbound => "sk_lookup, destination unbound (0 policies)",
            Variant::Policies10 => "sk_lookup, 10 policies",
            Variant::Policies1000 => "sk_lookup, 1,000 policies",
        }
    }

    fn tables_label(self) -> &'static str {
        match self {
            Variant::NoPrograms => "none (no program)",
            Variant::Unbound => "destination unbound (0 policies)",
            Variant::Policies10 => "10 policies",
            Variant::Policies1000 => "1,000 policies",
        }
    }

    /// The suffix of its pods' names (`cli<suffix>`, `srv<suffix>`).
    fn pod_name(self) -> &'static str {
        match self {
            Variant::NoPrograms => "base",
            Variant::Unbound => "unbound",
            Variant::Policies10 => "p10",
            Variant::Policies1000 => "p1000",
        }
    }
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let plan = if smoke {
        Plan {
            rounds: 3,
            connections: 1_000,
            wrk_seconds: 1,
            wrk_connections: 4,
        }
    } else {
        // Many short rounds: this machine's noise comes in bursts of seconds, which the median
        // of many alternating rounds absorbs better than a few long ones.
        Plan {
            rounds: 15,
            connections: 5_000,
            wrk_seconds: 2,
            wrk_connections: 4,
        }
    };
    wrk::require_wrk();
    println!(
        "kmesh-rs authorization benchmark ({}): {} rounds per variant, {} connections per probe \
         run, wrk {} s x {} connections",
        if smoke { "smoke run" } else { "full run" },
        plan.rounds,
        plan.connections,
        plan.wrk_seconds,
        plan.wrk_connections
    );
    let mut node = Node::new();
    node.print_table_sizes();
    node.check_verdicts();
    println!();
    println!(
        "the tables do what they claim: sk_lookup judges every measured server and not the \
         baseline's, the outsider is refused, the clients are allowed"
    );
    connect_cost::run(&plan, &mut node);
    request_cost::run(&plan, &mut node);
}

/// The order of `cases` cases in round `round`: a permutation drawn from a fixed seed, the same in
/// every run. Why not a rotation: rotating keeps every case right after the same case in every
/// round but one, and what ran just before (a swap of bigger tables, a burst of refused
/// connects) can weigh on a measurement; shuffled, every case follows each other case in turn.
fn round_order(round: usize, cases: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..cases).collect();
    // xorshift64*, seeded by the round: deterministic, no dependency.
    let mut state =
        0x9E37_79B9_7F4A_7C15_u64 ^ (round as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut next = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    for i in (1..cases).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// The smallest and largest of the rounds: how noisy the machine was.
fn spread(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
