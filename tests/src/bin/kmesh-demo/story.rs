//! The demo's story, the same in both modes: the canary rollout of bookinfo's `reviews` service
//! with Istio's own VirtualService samples, then the mesh switched off with the KmeshConfig's
//! mode; after each step, 1,000 connections from a client pod to the `reviews` VIP and where they
//! landed. This module owns the steps and how a step and its outcome are printed; `local` and
//! `cluster` own how a step is applied.
//!
//! The printed distribution is read by `tests/tests/demo.rs`: a step starts with a line
//! `step N/4: TITLE`, each version's line is `  reviews vK  <count> connections ...`, and
//! connections that reached no pod are counted on one line `  not delivered  <count> ...`.
use std::{fmt::Display, path::PathBuf};

use kmesh_tests::{ProbeReport, cluster::repository};

/// Connections made after each step.
pub const CONNECTIONS: u32 = 1000;

/// Istio's bookinfo networking samples, used as they are.
pub const ISTIO_NETWORKING: &str = "../shared/reference/istio/samples/bookinfo/networking";

/// The reviews versions, as their pods' `version` label says.
pub const VERSIONS: [&str; 3] = ["v1", "v2", "v3"];

/// What one step changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Applies one of Istio's bookinfo VirtualService samples (a file in [`ISTIO_NETWORKING`]).
    VirtualService(&'static str),
    /// Sets the KmeshConfig's `spec.mode` to `Disabled`.
    ModeDisabled,
}

/// One step of the story.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub title: &'static str,
    pub change: Change,
}

/// The story.
pub const STEPS: [Step; 4] = [
    Step {
        title: "all traffic to reviews v1",
        change: Change::VirtualService("virtual-service-all-v1.yaml"),
    },
    Step {
        title: "canary: 90% to v1, 10% to v2",
        change: Change::VirtualService("virtual-service-reviews-90-10.yaml"),
    },
    Step {
        title: "50% to v2, 50% to v3",
        change: Change::VirtualService("virtual-service-reviews-v2-v3.yaml"),
    },
    Step {
        title: "mode Disabled: the programs stay attached and let every connection pass untouched",
        change: Change::ModeDisabled,
    },
];

/// The merge patch of [`Change::ModeDisabled`], as `kubectl patch --type merge` takes it.
pub const MODE_DISABLED_PATCH: &str = r#"{"spec":{"mode":"Disabled"}}"#;

/// An error as one line of context and its cause.
pub fn context<E: Display>(what: impl Display) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// `file` of Istio's bookinfo networking samples, relative to the repository root (where kubectl
/// runs in the cluster demo); an error naming it when it is missing.
pub fn istio_sample(file: &str) -> Result<String, String> {
    let relative = format!("{ISTIO_NETWORKING}/{file}");
    if repository().join(&relative).is_file() {
        Ok(relative)
    } else {
        Err(format!(
            "Istio's sample {} is missing: the demo uses ../shared/reference/istio next to the \
             checkout",
            repository().join(&relative).display()
        ))
    }
}

/// The absolute path of a file named relative to the repository root.
pub fn in_repository(relative: &str) -> PathBuf {
    repository().join(relative)
}

/// Prints `step N/4: TITLE`.
pub fn print_step(index: usize, step: &Step) {
    println!("step {}/{}: {}", index + 1, STEPS.len(), step.title);
}

/// Prints the document of `yaml` (a multi-document file) that names `name`, indented, and how
/// many others the file holds.
pub fn print_document(yaml: &str, name: &str) {
    let (shown, others) = document_named(yaml, name);
    for line in shown.as_deref().unwrap_or_default().lines() {
        println!("    | {line}");
    }
    if others > 0 {
        println!("    | (and {others} more VirtualServices, for the other bookinfo services)");
    }
}

/// The document of `yaml` whose metadata names `name` (else the first), without comment lines,
/// and how many other documents there are.
fn document_named(yaml: &str, name: &str) -> (Option<String>, usize) {
    let documents: Vec<String> = yaml
        .split("\n---")
        .map(|d| {
            let lines = d
                .lines()
                .filter(|l| !l.starts_with('#') && l.trim() != "---");
            lines
                .collect::<Vec<_>>()
                .join("\n")
                .trim_matches('\n')
                .to_string()
        })
        .filter(|d| !d.trim().is_empty())
        .collect();
    let named = format!("name: {name}");
    let index = documents
        .iter()
        .position(|d| d.lines().any(|l| l.trim() == named))
        .unwrap_or(0);
    let others = documents.len().saturating_sub(1);
    (documents.into_iter().nth(index), others)
}

/// The reviews version (`v1`) of a reply: a pod name `reviews-v1` (local) or
/// `reviews-v1-<replicaset hash>-<suffix>` (cluster).
fn version_of(reply: &str) -> Option<&str> {
    let mut parts = reply.split('-');
    (parts.next() == Some("reviews"))
        .then(|| parts.next())
        .flatten()
        .filter(|v| VERSIONS.contains(v))
}

/// Prints where the connections of `report` landed: a line per reviews version with a bar, other
/// replies by name, and the connections that reached no pod with their errors.
pub fn print_distribution(report: &ProbeReport) {
    let attempts = report.attempts.max(1) as f64;
    for version in VERSIONS {
        let n: u64 = report
            .by_reply
            .iter()
            .filter(|(reply, _)| version_of(reply) == Some(version))
            .map(|(_, n)| n)
            .sum();
        let share = n as f64 / attempts;
        let bar = "#".repeat((share * 50.0).round() as usize);
        println!(
            "  reviews {version}  {n:>5} connections  {:>5.1}%  {bar}",
            100.0 * share
        );
    }
    for (reply, n) in &report.by_reply {
        if version_of(reply).is_none() {
            println!("  other pod {reply}: {n} connections");
        }
    }
    if report.failed > 0 {
        let errors: Vec<String> = report
            .errors
            .iter()
            .map(|(e, n)| format!("{e} {n}"))
            .collect();
        println!(
            "  not delivered  {:>5} connections  ({})",
            report.failed,
            errors.join(", ")
        );
    }
}

/// What a step's outcome means, printed under its distribution when it needs saying.
pub fn print_meaning(step: &Step, report: &ProbeReport) {
    if step.change == Change::ModeDisabled && report.errors.contains_key("ENETUNREACH") {
        println!(
            "  (nothing rewrote the VIP: the client pod has no route to it, so connect() fails \
             with ENETUNREACH, as it would with no mesh)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_of_local_and_cluster_pod_names() {
        assert_eq!(version_of("reviews-v1"), Some("v1"));
        assert_eq!(version_of("reviews-v3-7d9c8f5b4-x2x9q"), Some("v3"));
        assert_eq!(version_of("reviews-v4"), None);
        assert_eq!(version_of("ratings-v1"), None);
        assert_eq!(version_of("reviews"), None);
    }

    #[test]
    fn the_named_document_of_a_multi_document_file() {
        let yaml = "# a comment\napiVersion: v1\nkind: A\nmetadata:\n  name: productpage\n---\n\
                    kind: A\nmetadata:\n  name: reviews\n---\nkind: A\nmetadata:\n  name: x\n";
        let (doc, others) = document_named(yaml, "reviews");
        assert_eq!(doc.as_deref(), Some("kind: A\nmetadata:\n  name: reviews"));
        assert_eq!(others, 2);
        let (doc, others) = document_named("# c\nkind: B\n", "reviews");
        assert_eq!(doc.as_deref(), Some("kind: B"));
        assert_eq!(others, 0);
        assert_eq!(document_named("", "reviews"), (None, 0));
        assert_eq!(document_named("---\n---\n", "reviews"), (None, 0));
    }
}
