//! The `KmeshConfig` status a compile calls for, computed purely from facts: the conditions
//! Ready/Progressing/Degraded, rollout progress per node, the rejected and unenforced lists, the
//! kinds the operator cannot read, and whether publishing is held (authorization unreadable:
//! Degraded `AuthorizationUnreadable`, not Ready).
//!
//! [`compute_status`] is a sequence of steps: the findings (rejections and unenforced features,
//! sorted, each once), the rollout in numbers, then one function per condition and per list.
//! Conditions whose status did not change keep their `lastTransitionTime`, so the same facts
//! give the same status and the write is skipped.
use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::{
    crd::{
        KmeshConfigStatus, NodeSnapshotStatus, RejectedResource, RolloutStatus, UnenforcedFeature,
        UnwatchedKind, UnwatchedReason,
    },
    diagnostics::{Diagnostic, ObjectRef, Severity},
    kube_source::Publishing,
};

/// At most this many entries in each of `status.rejected` and `status.unenforced`: the object
/// must stay well under the apiserver's size limit. When more exist, the Degraded condition's
/// message says how many and that the list is cut, so nothing is dropped silently.
pub const MAX_LISTED: usize = 256;

/// Condition types.
pub mod condition {
    /// Every node runs its current snapshot.
    pub const READY: &str = "Ready";
    /// A rollout is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// Something could not be compiled, or nothing is published (see [`HELD_REASON`]).
    pub const DEGRADED: &str = "Degraded";
    /// The reason of Degraded while publishing is held: an authorization kind cannot be read.
    pub const HELD_REASON: &str = "AuthorizationUnreadable";
    /// The reason of Ready (False) while publishing is held.
    pub const HELD_READY_REASON: &str = "PublishingHeld";
}

/// One node's rollout state, as the snapshot server knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRollout {
    pub name: String,
    /// The newest snapshot generation the node has been given (served to its agent); 0 for none.
    pub generation: u64,
    /// The node's agent reports the snapshot currently meant for it applied. A node whose
    /// snapshot did not change in the latest compile, and that runs it, is ready.
    pub ready: bool,
}

/// The rollout facts the status reports. A node counts as updated when it is ready or has been
/// given `snapshot_generation` (or newer), and as ready when `ready`; Ready is True when every
/// node is ready, Progressing while one is not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RolloutFacts {
    /// The generation of the snapshots being rolled out (the newest one published); 0 before
    /// the first publication.
    pub snapshot_generation: u64,
    /// Every node that should run a snapshot.
    pub nodes: Vec<NodeRollout>,
}

/// Everything [`compute_status`] looks at.
#[derive(Clone, Copy, Debug)]
pub struct StatusFacts<'a> {
    /// `metadata.generation` of the KmeshConfig that was compiled.
    pub observed_generation: Option<i64>,
    /// The status as last read, for the conditions' `lastTransitionTime`.
    pub previous: Option<&'a KmeshConfigStatus>,
    /// The compile's diagnostics (and the source's).
    pub diagnostics: &'a [Diagnostic],
    pub rollout: &'a RolloutFacts,
    /// Kinds the operator cannot read, and why (the kube source's
    /// [`SourceHealth::unwatched`](crate::kube_source::SourceHealth::unwatched)): listed in
    /// `status.unwatched`. One not installed is a note on Ready; one served only at versions the
    /// operator does not read, or forbidden, makes the status Degraded.
    pub unwatched: &'a [UnwatchedKind],
    /// Whether new snapshots are published ([`crate::kube_source::gate`]): while held, Degraded
    /// says why (reason [`condition::HELD_REASON`]) and Ready is False.
    pub publishing: &'a Publishing,
    /// The time stamped on conditions that change.
    pub now: &'a Time,
}

/// The status the facts call for. Pure. Conditions whose status did not change keep their
/// `lastTransitionTime`.
pub fn compute_status(facts: &StatusFacts<'_>) -> KmeshConfigStatus {
    let findings = Findings::of(facts.diagnostics);
    let rollout = Rollout::of(facts.rollout);
    KmeshConfigStatus {
        conditions: vec![
            ready_condition(facts, &rollout),
            progressing_condition(facts, &rollout),
            degraded_condition(facts, &findings),
        ],
        observed_generation: facts.observed_generation,
        snapshot_generation: (rollout.generation != 0).then_some(rollout.generation),
        rollout: rollout_status(&rollout),
        rejected: rejected_resources(&findings),
        unenforced: unenforced_features(&findings),
        unwatched: facts.unwatched.to_vec(),
    }
}

/// The rejections and unenforced features to report, sorted, each once.
struct Findings<'a> {
    rejected: Vec<&'a Diagnostic>,
    unenforced: Vec<&'a Diagnostic>,
}

impl<'a> Findings<'a> {
    fn of(diagnostics: &'a [Diagnostic]) -> Self {
        let of_severity = |severity| {
            let mut found: Vec<&Diagnostic> = diagnostics
                .iter()
                .filter(|d| d.severity == severity)
                .collect();
            found.sort();
            found.dedup();
            found
        };
        Findings {
            rejected: of_severity(Severity::Rejected),
            unenforced: of_severity(Severity::Unenforced),
        }
    }
}

/// The rollout in numbers: nodes sorted by name (each once), how many are updated and ready,
/// and which are not ready yet.
struct Rollout<'a> {
    generation: u64,
    nodes: Vec<&'a NodeRollout>,
    desired: usize,
    updated: usize,
    ready: usize,
    waiting: Vec<&'a str>,
}

impl<'a> Rollout<'a> {
    fn of(facts: &'a RolloutFacts) -> Self {
        let mut nodes: Vec<&NodeRollout> = facts.nodes.iter().collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes.dedup_by(|a, b| a.name == b.name);
        let generation = facts.snapshot_generation;
        let updated = nodes
            .iter()
            .filter(|n| n.ready || n.generation >= generation)
            .count();
        let waiting: Vec<&str> = nodes
            .iter()
            .filter(|n| !n.ready)
            .map(|n| n.name.as_str())
            .collect();
        Rollout {
            generation,
            desired: nodes.len(),
            updated,
            ready: nodes.len() - waiting.len(),
            waiting,
            nodes,
        }
    }
}

/// Ready: every node runs its current snapshot. Kinds the API server does not serve are noted
/// in its message.
fn ready_condition(facts: &StatusFacts<'_>, rollout: &Rollout<'_>) -> Condition {
    let Rollout {
        generation,
        desired,
        ready,
        ..
    } = *rollout;
    let waiting = &rollout.waiting;
    let mut message = if desired == 0 {
        "No node to roll out to.".to_string()
    } else if waiting.is_empty() {
        format!("All {desired} node(s) run their current snapshot (generation {generation}).")
    } else {
        format!(
            "{ready} of {desired} node(s) run their current snapshot (generation {generation}); \
             waiting for {}.",
            first_few(waiting, 5)
        )
    };
    let not_installed = kinds_named(facts.unwatched, |r| r == UnwatchedReason::NotInstalled);
    if !not_installed.is_empty() {
        message.push_str(&format!(
            " Not installed, so not watched: {}.",
            not_installed.join(", ")
        ));
    }
    if facts.publishing.is_held() {
        let message = format!(
            "No new snapshot is published while objects authorization is compiled from cannot \
             be read (see Degraded). {message}"
        );
        return make_condition(
            facts,
            condition::READY,
            false,
            condition::HELD_READY_REASON,
            message,
        );
    }
    let reason = match (desired, waiting.len()) {
        (0, _) => "NoNodes",
        (_, 0) => "AllNodesReady",
        _ => "RolloutInProgress",
    };
    make_condition(facts, condition::READY, waiting.is_empty(), reason, message)
}

/// Progressing: a node does not run its current snapshot yet.
fn progressing_condition(facts: &StatusFacts<'_>, rollout: &Rollout<'_>) -> Condition {
    let Rollout {
        generation,
        desired,
        updated,
        ready,
        ..
    } = *rollout;
    let (progressing, reason, message) = if !rollout.waiting.is_empty() {
        let message = format!(
            "Generation {generation}: {updated} of {desired} node(s) updated, {ready} ready."
        );
        (true, "RollingOut", message)
    } else {
        let reason = if desired == 0 {
            "NoNodes"
        } else {
            "RolloutComplete"
        };
        let message = format!("Generation {generation}: {ready} of {desired} node(s) ready.");
        (false, reason, message)
    };
    make_condition(facts, condition::PROGRESSING, progressing, reason, message)
}

/// Degraded: publishing is held (first, it is the gravest: nothing new reaches the nodes),
/// something was rejected, or a kind cannot be read (served only at versions the operator does
/// not read, or forbidden). Its message also says when a list in the status is cut.
fn degraded_condition(facts: &StatusFacts<'_>, findings: &Findings<'_>) -> Condition {
    let rejected = &findings.rejected;
    let unreadable = kinds_named(facts.unwatched, |r| r != UnwatchedReason::NotInstalled);
    let held = facts.publishing.message();
    let mut parts: Vec<String> = held.iter().cloned().collect();
    if !rejected.is_empty() {
        parts.push(rejections_message(rejected));
    }
    if !unreadable.is_empty() {
        parts.push(format!(
            "{} kind(s) cannot be read, so their objects are not compiled (status.unwatched): \
             {}.",
            unreadable.len(),
            first_few(
                &unreadable.iter().map(String::as_str).collect::<Vec<_>>(),
                3
            )
        ));
    }
    for (list, count) in [
        ("rejected", rejected.len()),
        ("unenforced", findings.unenforced.len()),
    ] {
        if count > MAX_LISTED {
            parts.push(format!(
                "status.{list} lists the first {MAX_LISTED} of {count}; the operator log and \
                 `kmeshctl compile` show all."
            ));
        }
    }
    let message = if parts.is_empty() {
        "Every resource compiled.".to_string()
    } else {
        parts.join(" ")
    };
    let (degraded, reason) = match (held, rejected.is_empty(), unreadable.is_empty()) {
        (Some(_), _, _) => (true, condition::HELD_REASON),
        (None, false, _) => (true, "ResourcesRejected"),
        (None, true, false) => (true, "KindsNotReadable"),
        (None, true, true) => (false, "NoRejections"),
    };
    make_condition(facts, condition::DEGRADED, degraded, reason, message)
}

/// "2 rejection(s) in 2 resource(s), left out of the snapshots (status.rejected): ...".
fn rejections_message(rejected: &[&Diagnostic]) -> String {
    let objects: BTreeSet<&ObjectRef> = rejected.iter().map(|d| &d.object).collect();
    let shown: Vec<String> = rejected.iter().map(|d| d.to_string()).collect();
    let shown: Vec<&str> = shown.iter().map(String::as_str).collect();
    format!(
        "{} rejection(s) in {} resource(s), left out of the snapshots (status.rejected): {}.",
        rejected.len(),
        objects.len(),
        first_few(&shown, 3)
    )
}

/// The unwatched kinds whose reason `select` picks, as "TCPRoute.gateway.networking.k8s.io
/// (Forbidden)".
fn kinds_named(
    unwatched: &[UnwatchedKind],
    select: impl Fn(UnwatchedReason) -> bool,
) -> Vec<String> {
    let selected = unwatched.iter().filter(|u| select(u.reason));
    let named = selected.map(|u| match u.group.as_str() {
        "" => format!("{} ({:?})", u.kind, u.reason),
        group => format!("{}.{group} ({:?})", u.kind, u.reason),
    });
    named.collect()
}

fn rollout_status(rollout: &Rollout<'_>) -> RolloutStatus {
    RolloutStatus {
        nodes_desired: count_u32(rollout.desired),
        nodes_updated: count_u32(rollout.updated),
        nodes_ready: count_u32(rollout.ready),
        nodes: rollout
            .nodes
            .iter()
            .map(|n| NodeSnapshotStatus {
                name: n.name.clone(),
                generation: n.generation,
                ready: n.ready,
            })
            .collect(),
    }
}

/// `status.rejected`: the first [`MAX_LISTED`] rejections.
fn rejected_resources(findings: &Findings<'_>) -> Vec<RejectedResource> {
    let listed = findings.rejected.iter().take(MAX_LISTED);
    listed
        .map(|d| RejectedResource {
            kind: d.object.kind.to_string(),
            namespace: d.object.namespace.clone(),
            name: d.object.name.clone(),
            field: d.field.clone(),
            reason: d.reason.clone(),
        })
        .collect()
}

/// `status.unenforced`: the first [`MAX_LISTED`] unenforced features.
fn unenforced_features(findings: &Findings<'_>) -> Vec<UnenforcedFeature> {
    let listed = findings.unenforced.iter().take(MAX_LISTED);
    listed
        .map(|d| UnenforcedFeature {
            kind: d.object.kind.to_string(),
            namespace: d.object.namespace.clone().unwrap_or_default(),
            name: d.object.name.clone(),
            field: d.field.clone(),
            reason: d.reason.clone(),
        })
        .collect()
}

fn make_condition(
    facts: &StatusFacts<'_>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = facts
        .previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| facts.now.clone());
    Condition {
        last_transition_time,
        message,
        observed_generation: facts.observed_generation,
        reason: reason.to_string(),
        status: status.to_string(),
        type_: type_.to_string(),
    }
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// "a, b, c and 4 more".
fn first_few(items: &[&str], n: usize) -> String {
    let mut text = items.iter().take(n).copied().collect::<Vec<_>>().join("; ");
    if items.len() > n {
        text.push_str(&format!(" and {} more", items.len() - n));
    }
    text
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::kinds::Kind;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap())
    }

    fn node(name: &str, generation: u64, ready: bool) -> NodeRollout {
        NodeRollout {
            name: name.into(),
            generation,
            ready,
        }
    }

    fn vs(name: &str) -> ObjectRef {
        ObjectRef::new(Kind::VirtualService, Some("bookinfo"), name)
    }

    fn facts<'a>(
        diagnostics: &'a [Diagnostic],
        rollout: &'a RolloutFacts,
        previous: Option<&'a KmeshConfigStatus>,
        now: &'a Time,
    ) -> StatusFacts<'a> {
        StatusFacts {
            observed_generation: Some(7),
            previous,
            diagnostics,
            rollout,
            unwatched: &[],
            publishing: &Publishing::Open,
            now,
        }
    }

    fn cond<'a>(status: &'a KmeshConfigStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn all_ready_and_clean() {
        let rollout = RolloutFacts {
            snapshot_generation: 42,
            nodes: vec![node("b", 42, true), node("a", 41, true)],
        };
        let now = at(1000);
        let status = compute_status(&facts(&[], &rollout, None, &now));
        assert_eq!(status.observed_generation, Some(7));
        assert_eq!(status.snapshot_generation, Some(42));
        assert_eq!(status.rollout.nodes_desired, 2);
        assert_eq!(status.rollout.nodes_updated, 2);
        assert_eq!(status.rollout.nodes_ready, 2);
        assert_eq!(status.rollout.nodes[0].name, "a", "sorted by name");
        let ready = cond(&status, condition::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "AllNodesReady")
        );
        assert_eq!(ready.observed_generation, Some(7));
        assert_eq!(ready.last_transition_time, now);
        let progressing = cond(&status, condition::PROGRESSING);
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("False", "RolloutComplete")
        );
        let degraded = cond(&status, condition::DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("False", "NoRejections")
        );
        assert!(status.rejected.is_empty() && status.unenforced.is_empty());
    }

    #[test]
    fn rollout_in_progress() {
        let rollout = RolloutFacts {
            snapshot_generation: 43,
            nodes: vec![
                node("a", 43, true),  // updated and applied
                node("b", 43, false), // given, not applied yet
                node("c", 42, false), // not reached yet
            ],
        };
        let status = compute_status(&facts(&[], &rollout, None, &at(0)));
        assert_eq!(status.rollout.nodes_desired, 3);
        assert_eq!(status.rollout.nodes_updated, 2);
        assert_eq!(status.rollout.nodes_ready, 1);
        let ready = cond(&status, condition::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "RolloutInProgress")
        );
        assert!(
            ready.message.contains("waiting for b; c"),
            "{}",
            ready.message
        );
        let progressing = cond(&status, condition::PROGRESSING);
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("True", "RollingOut")
        );
        assert!(
            progressing
                .message
                .contains("2 of 3 node(s) updated, 1 ready")
        );
    }

    #[test]
    fn no_nodes() {
        let rollout = RolloutFacts::default();
        let status = compute_status(&facts(&[], &rollout, None, &at(0)));
        assert_eq!(status.snapshot_generation, None);
        assert_eq!(cond(&status, condition::READY).reason, "NoNodes");
        assert_eq!(cond(&status, condition::READY).status, "True");
        assert_eq!(cond(&status, condition::PROGRESSING).status, "False");
    }

    #[test]
    fn rejected_and_unenforced_lists() {
        let diagnostics = vec![
            Diagnostic::rejected(vs("b"), "spec.tcp[0]", "no such host"),
            Diagnostic::rejected(vs("a"), "spec.http[0].match", "L7 match"),
            Diagnostic::rejected(vs("a"), "spec.http[0].match", "L7 match"),
            Diagnostic::unenforced(
                ObjectRef::new(Kind::AuthorizationPolicy, Some("bookinfo"), "deny"),
                "",
                "not compiled yet",
            ),
            Diagnostic::unenforced(ObjectRef::new(Kind::Node, None, "n1"), "", "x"),
            Diagnostic::note(vs("c"), "", "just so you know"),
        ];
        let rollout = RolloutFacts::default();
        let status = compute_status(&facts(&diagnostics, &rollout, None, &at(0)));
        assert_eq!(
            status.rejected,
            vec![
                RejectedResource {
                    kind: "VirtualService".into(),
                    namespace: Some("bookinfo".into()),
                    name: "a".into(),
                    field: "spec.http[0].match".into(),
                    reason: "L7 match".into(),
                },
                RejectedResource {
                    kind: "VirtualService".into(),
                    namespace: Some("bookinfo".into()),
                    name: "b".into(),
                    field: "spec.tcp[0]".into(),
                    reason: "no such host".into(),
                },
            ]
        );
        assert_eq!(status.unenforced.len(), 2);
        assert_eq!(status.unenforced[0].kind, "AuthorizationPolicy");
        assert_eq!(status.unenforced[1].namespace, "", "cluster-scoped");
        let degraded = cond(&status, condition::DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "ResourcesRejected")
        );
        assert!(
            degraded
                .message
                .starts_with("2 rejection(s) in 2 resource(s)"),
            "{}",
            degraded.message
        );
        assert!(
            degraded.message.contains("VirtualService bookinfo/a"),
            "{}",
            degraded.message
        );
    }

    #[test]
    fn long_lists_are_cut_and_say_so() {
        let diagnostics: Vec<Diagnostic> = (0..MAX_LISTED + 10)
            .map(|i| Diagnostic::rejected(vs(&format!("vs{i:04}")), "", "bad"))
            .collect();
        let rollout = RolloutFacts::default();
        let status = compute_status(&facts(&diagnostics, &rollout, None, &at(0)));
        assert_eq!(status.rejected.len(), MAX_LISTED);
        let message = &cond(&status, condition::DEGRADED).message;
        assert!(
            message.contains(&format!(
                "lists the first {MAX_LISTED} of {}",
                MAX_LISTED + 10
            )),
            "{message}"
        );
        assert!(
            message.contains(&format!("and {} more", MAX_LISTED + 7)),
            "{message}"
        );
    }

    #[test]
    fn transition_times_move_only_on_change() {
        let rollout = RolloutFacts {
            snapshot_generation: 5,
            nodes: vec![node("a", 5, true)],
        };
        let first = compute_status(&facts(&[], &rollout, None, &at(100)));
        // Same facts later: the status is identical (so the write is skipped).
        let again = compute_status(&facts(&[], &rollout, Some(&first), &at(200)));
        assert_eq!(again, first);
        // A rejection: Degraded flips and moves; Ready and Progressing keep their times.
        let diagnostics = vec![Diagnostic::rejected(vs("a"), "", "bad")];
        let degraded = compute_status(&facts(&diagnostics, &rollout, Some(&again), &at(300)));
        assert_eq!(
            cond(&degraded, condition::DEGRADED).last_transition_time,
            at(300)
        );
        assert_eq!(
            cond(&degraded, condition::READY).last_transition_time,
            at(100)
        );
        assert_eq!(
            cond(&degraded, condition::PROGRESSING).last_transition_time,
            at(100)
        );
    }

    fn unwatched(kind: &str, reason: UnwatchedReason) -> UnwatchedKind {
        UnwatchedKind {
            kind: kind.into(),
            group: "gateway.networking.k8s.io".into(),
            reason,
            message: "why".into(),
        }
    }

    #[test]
    fn missing_kinds_are_a_note_not_a_degradation() {
        let rollout = RolloutFacts::default();
        let unwatched = vec![unwatched("TCPRoute", UnwatchedReason::NotInstalled)];
        let status = compute_status(&StatusFacts {
            unwatched: &unwatched,
            ..facts(&[], &rollout, None, &at(0))
        });
        let ready = cond(&status, condition::READY);
        assert_eq!(ready.status, "True");
        assert!(
            ready
                .message
                .contains("not watched: TCPRoute.gateway.networking.k8s.io (NotInstalled)"),
            "{}",
            ready.message
        );
        assert_eq!(cond(&status, condition::DEGRADED).status, "False");
        assert_eq!(status.unwatched, unwatched);
    }

    #[test]
    fn unreadable_kinds_degrade() {
        let rollout = RolloutFacts::default();
        let unwatched = vec![
            unwatched("HTTPRoute", UnwatchedReason::NotServed),
            unwatched("TCPRoute", UnwatchedReason::Forbidden),
        ];
        let status = compute_status(&StatusFacts {
            unwatched: &unwatched,
            ..facts(&[], &rollout, None, &at(0))
        });
        let degraded = cond(&status, condition::DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "KindsNotReadable")
        );
        assert!(
            degraded.message.starts_with(
                "2 kind(s) cannot be read, so their objects are not compiled (status.unwatched): \
                 HTTPRoute.gateway.networking.k8s.io (NotServed); \
                 TCPRoute.gateway.networking.k8s.io (Forbidden)."
            ),
            "{}",
            degraded.message
        );
        assert_eq!(cond(&status, condition::READY).status, "True");
        assert_eq!(status.unwatched.len(), 2);
        // With a rejection too, the rejection names the reason and both are said.
        let diagnostics = vec![Diagnostic::rejected(vs("a"), "", "bad")];
        let status = compute_status(&StatusFacts {
            unwatched: &unwatched,
            ..facts(&diagnostics, &rollout, None, &at(0))
        });
        let degraded = cond(&status, condition::DEGRADED);
        assert_eq!(degraded.reason, "ResourcesRejected");
        assert!(
            degraded.message.contains("1 rejection(s)"),
            "{}",
            degraded.message
        );
        assert!(
            degraded.message.contains("2 kind(s) cannot be read"),
            "{}",
            degraded.message
        );
    }

    #[test]
    fn a_hold_degrades_and_is_not_ready_until_it_clears() {
        use crate::kube_source::{HeldKind, Unread};
        let rollout = RolloutFacts {
            snapshot_generation: 5,
            nodes: vec![node("a", 5, true)],
        };
        let forbidden = "authorizationpolicies.security.istio.io is forbidden";
        let held = Publishing::Held(vec![HeldKind {
            kind: Kind::AuthorizationPolicy,
            reason: Unread::Forbidden,
            detail: forbidden.into(),
        }]);
        let diagnostics = vec![Diagnostic::rejected(vs("a"), "", "bad")];
        let unwatched = vec![UnwatchedKind {
            kind: "AuthorizationPolicy".into(),
            group: "security.istio.io".into(),
            reason: UnwatchedReason::Forbidden,
            message: forbidden.into(),
        }];
        let status = compute_status(&StatusFacts {
            publishing: &held,
            unwatched: &unwatched,
            ..facts(&diagnostics, &rollout, None, &at(100))
        });
        let degraded = cond(&status, condition::DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "AuthorizationUnreadable")
        );
        assert!(
            degraded.message.starts_with(&held.message().unwrap()),
            "the hold first: {}",
            degraded.message
        );
        assert!(degraded.message.contains(forbidden), "{}", degraded.message);
        assert!(
            degraded.message.contains("no snapshot is published until"),
            "{}",
            degraded.message
        );
        assert!(
            degraded.message.contains("1 rejection(s)"),
            "the rest is still said: {}",
            degraded.message
        );
        let ready = cond(&status, condition::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "PublishingHeld")
        );
        assert!(
            ready
                .message
                .contains("All 1 node(s) run their current snapshot (generation 5)"),
            "the nodes keep theirs: {}",
            ready.message
        );
        assert_eq!(status.rollout.nodes[0].generation, 5);
        // Readable again: the condition clears.
        let open = compute_status(&StatusFacts {
            publishing: &Publishing::Open,
            ..facts(&[], &rollout, Some(&status), &at(200))
        });
        let degraded = cond(&open, condition::DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("False", "NoRejections")
        );
        assert_eq!(degraded.last_transition_time, at(200));
        assert_eq!(cond(&open, condition::READY).reason, "AllNodesReady");
    }
}
