//! Rounds of `wrk` over several paths to the same server, in one run, and their table: shared by
//! the data plane benchmark (direct, mesh VIP, haproxy pair) and the waypoint benchmark (direct,
//! waypoint, nginx).
//!
//! The first path is the baseline. Rounds alternate the paths in a rotating order, so that no path
//! always runs first or last; each round's figures are divided by the same round's baseline, and
//! every ratio is printed as the min, median and max over the rounds. A wrk run that counted a
//! failure is printed and left out: a figure never hides failed requests.
use super::wrk::{Connections, WrkResult, WrkRun};

/// One path wrk measures: its row in the table, its name in charts, and how to run wrk through it
/// for one round.
pub struct WrkPath<'a> {
    pub label: &'static str,
    pub short: &'static str,
    pub run: Box<dyn Fn(Connections) -> WrkRun + 'a>,
}

/// One mode's results: for each round, each path's figures (`None`: wrk counted failures).
pub struct ModeRounds {
    pub mode: Connections,
    pub rounds: Vec<Vec<Option<WrkResult>>>,
}

impl ModeRounds {
    /// Path `index`'s figure `of` in every round where it ran without failures.
    pub fn own(&self, index: usize, of: fn(&WrkResult) -> f64) -> Vec<f64> {
        self.rounds
            .iter()
            .filter_map(|r| r[index].as_ref().map(of))
            .collect()
    }

    /// Path `index`'s figure `of` over the same round's baseline, in every round where both ran.
    pub fn ratios(&self, index: usize, of: fn(&WrkResult) -> f64) -> Vec<f64> {
        self.differences(index, of, |this, base| this / base)
    }

    /// `combine(path's figure, baseline's figure)` in every round where both ran.
    pub fn differences(
        &self,
        index: usize,
        of: fn(&WrkResult) -> f64,
        combine: fn(f64, f64) -> f64,
    ) -> Vec<f64> {
        self.rounds
            .iter()
            .filter_map(|r| Some(combine(of(r[index].as_ref()?), of(r[0].as_ref()?))))
            .collect()
    }
}

pub fn label(mode: Connections) -> &'static str {
    match mode {
        Connections::KeepAlive => "keep-alive",
        Connections::PerRequest => "a new connection per request",
    }
}

/// `rounds` rounds of every path in `mode`.
pub fn measure(paths: &[WrkPath<'_>], mode: Connections, rounds: usize) -> ModeRounds {
    let mut all = Vec::new();
    for round in 0..rounds {
        let mut results = vec![None; paths.len()];
        for k in 0..paths.len() {
            let index = (round + k) % paths.len();
            let path = &paths[index];
            let run = (path.run)(mode);
            if run.errors.any() {
                println!(
                    "  round {round}, {}: left out, wrk counted failures: {}",
                    path.label, run.errors
                );
            } else {
                results[index] = Some(run.result);
            }
        }
        all.push(results);
    }
    ModeRounds { mode, rounds: all }
}

pub fn requests_per_s(r: &WrkResult) -> f64 {
    r.requests_per_s
}
pub fn p50(r: &WrkResult) -> f64 {
    r.p50_us
}
pub fn p90(r: &WrkResult) -> f64 {
    r.p90_us
}
pub fn p99(r: &WrkResult) -> f64 {
    r.p99_us
}

/// Prints one mode's table (medians of each path's own figures, and the ratios' spread); returns
/// each path's median p50, p90 and p99, for the charts.
pub fn print_table(paths: &[WrkPath<'_>], results: &ModeRounds) -> Vec<(&'static str, [f64; 3])> {
    println!("  {}:", label(results.mode));
    println!(
        "    {:<36} {:>9} {:>9} {:>9} {:>9}   {:>20} {:>20} {:>20} {:>20}",
        "path",
        "req/s",
        "p50 us",
        "p90 us",
        "p99 us",
        "req/s ratio",
        "p50 ratio",
        "p90 ratio",
        "p99 ratio"
    );
    let figures = [requests_per_s, p50, p90, p99];
    let mut medians = Vec::new();
    for (index, path) in paths.iter().enumerate() {
        let own = figures.map(|of| median(results.own(index, of)));
        let spread = figures.map(|of| spread(&results.ratios(index, of)));
        println!(
            "    {:<36} {:>9.0} {:>9.1} {:>9.1} {:>9.1}   {:>20} {:>20} {:>20} {:>20}",
            path.label, own[0], own[1], own[2], own[3], spread[0], spread[1], spread[2], spread[3]
        );
        medians.push((path.short, [own[1], own[2], own[3]]));
    }
    medians
}

/// `min / median / max`, two decimals; `-` when empty.
pub fn spread(v: &[f64]) -> String {
    match (min(v), max(v)) {
        (Some(lo), Some(hi)) => format!("{lo:.2} / {:.2} / {hi:.2}", median(v.to_vec())),
        _ => "-".to_string(),
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min(v: &[f64]) -> Option<f64> {
    v.iter().copied().min_by(f64::total_cmp)
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().max_by(f64::total_cmp)
}
