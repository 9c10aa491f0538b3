//! What the operator tells the cluster about a compile: the `KmeshConfig` status (conditions,
//! rejected and unenforced resources, rollout progress) and a Warning Event on each newly
//! rejected object.
//!
//! [`compute_status`] is pure: facts in, status out. [`Reconciler`] does the I/O: a server-side
//! apply of the status subresource (skipped when nothing changed) and Events, at most once per
//! rejection for as long as it stays rejected. An Event that cannot be published does not fail
//! the reconcile: it is logged and retried on the next one.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::core::v1::ObjectReference,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource as _,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tracing::{debug, info, warn};

use crate::{
    crd::{
        KmeshConfig, KmeshConfigStatus, NodeSnapshotStatus, RejectedResource, RolloutStatus,
        SINGLETON_NAME, UnenforcedFeature,
    },
    diagnostics::{Diagnostic, ObjectRef, Severity},
};

/// The field manager of the status writes (and the Events' reporting controller).
pub const FIELD_MANAGER: &str = "kmesh-operator";

/// At most this many entries in each of `status.rejected` and `status.unenforced`: the object
/// must stay well under the apiserver's size limit. When more exist, the Degraded condition's
/// message says how many and that the list is cut, so nothing is dropped silently.
pub const MAX_LISTED: usize = 256;

/// At most this many Events per reconcile; the others follow on the next reconciles.
pub const MAX_EVENTS_PER_RECONCILE: usize = 32;

/// An Event's note may hold at most 1 kB.
const MAX_NOTE_BYTES: usize = 1024;

/// Condition types.
pub mod condition {
    /// Every node runs its current snapshot.
    pub const READY: &str = "Ready";
    /// A rollout is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// Something could not be compiled.
    pub const DEGRADED: &str = "Degraded";
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
    /// Kinds the API server does not serve, as shown to the user ("TCPRoute
    /// (gateway.networking.k8s.io/v1alpha2)"); a note on Ready, not a degradation.
    pub not_installed: &'a [String],
    /// The time stamped on conditions that change.
    pub now: &'a Time,
}

/// The status the facts call for. Pure. Conditions whose status did not change keep their
/// `lastTransitionTime`.
pub fn compute_status(facts: &StatusFacts<'_>) -> KmeshConfigStatus {
    let mut rejected: Vec<&Diagnostic> = facts
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Rejected)
        .collect();
    rejected.sort();
    rejected.dedup();
    let mut unenforced: Vec<&Diagnostic> = facts
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Unenforced)
        .collect();
    unenforced.sort();
    unenforced.dedup();

    let mut nodes: Vec<&NodeRollout> = facts.rollout.nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    nodes.dedup_by(|a, b| a.name == b.name);
    let generation = facts.rollout.snapshot_generation;
    let desired = nodes.len();
    let updated = nodes
        .iter()
        .filter(|n| n.ready || n.generation >= generation)
        .count();
    let waiting: Vec<&str> = nodes
        .iter()
        .filter(|n| !n.ready)
        .map(|n| n.name.as_str())
        .collect();
    let ready = desired - waiting.len();

    let condition = |type_: &str, status: bool, reason: &str, message: String| {
        make_condition(facts, type_, status, reason, message)
    };

    let mut ready_message = if desired == 0 {
        "No node to roll out to.".to_string()
    } else if waiting.is_empty() {
        format!("All {desired} node(s) run their current snapshot (generation {generation}).")
    } else {
        format!(
            "{ready} of {desired} node(s) run their current snapshot (generation {generation}); \
             waiting for {}.",
            first_few(&waiting, 5)
        )
    };
    if !facts.not_installed.is_empty() {
        ready_message.push_str(&format!(
            " Not served by the API server, so not watched: {}.",
            facts.not_installed.join(", ")
        ));
    }
    let ready_reason = match (desired, waiting.len()) {
        (0, _) => "NoNodes",
        (_, 0) => "AllNodesReady",
        _ => "RolloutInProgress",
    };
    let ready_condition = condition(
        condition::READY,
        waiting.is_empty(),
        ready_reason,
        ready_message,
    );

    let progressing_condition = if waiting.is_empty() {
        let reason = if desired == 0 {
            "NoNodes"
        } else {
            "RolloutComplete"
        };
        condition(
            condition::PROGRESSING,
            false,
            reason,
            format!("Generation {generation}: {ready} of {desired} node(s) ready."),
        )
    } else {
        condition(
            condition::PROGRESSING,
            true,
            "RollingOut",
            format!(
                "Generation {generation}: {updated} of {desired} node(s) updated, {ready} ready."
            ),
        )
    };

    let mut degraded_message = if rejected.is_empty() {
        "Every resource compiled.".to_string()
    } else {
        let objects: BTreeSet<&ObjectRef> = rejected.iter().map(|d| &d.object).collect();
        let shown: Vec<String> = rejected.iter().map(|d| d.to_string()).collect();
        let shown: Vec<&str> = shown.iter().map(String::as_str).collect();
        format!(
            "{} rejection(s) in {} resource(s), left out of the snapshots (status.rejected): {}.",
            rejected.len(),
            objects.len(),
            first_few(&shown, 3)
        )
    };
    for (list, count) in [
        ("rejected", rejected.len()),
        ("unenforced", unenforced.len()),
    ] {
        if count > MAX_LISTED {
            degraded_message.push_str(&format!(
                " status.{list} lists the first {MAX_LISTED} of {count}; the operator log and \
                 `kmeshctl compile` show all."
            ));
        }
    }
    let degraded_condition = if rejected.is_empty() {
        condition(condition::DEGRADED, false, "NoRejections", degraded_message)
    } else {
        condition(
            condition::DEGRADED,
            true,
            "ResourcesRejected",
            degraded_message,
        )
    };

    KmeshConfigStatus {
        conditions: vec![ready_condition, progressing_condition, degraded_condition],
        observed_generation: facts.observed_generation,
        snapshot_generation: (generation != 0).then_some(generation),
        rollout: RolloutStatus {
            nodes_desired: count_u32(desired),
            nodes_updated: count_u32(updated),
            nodes_ready: count_u32(ready),
            nodes: nodes
                .iter()
                .map(|n| NodeSnapshotStatus {
                    name: n.name.clone(),
                    generation: n.generation,
                    ready: n.ready,
                })
                .collect(),
        },
        rejected: rejected
            .iter()
            .take(MAX_LISTED)
            .map(|d| RejectedResource {
                kind: d.object.kind.to_string(),
                namespace: d.object.namespace.clone(),
                name: d.object.name.clone(),
                field: d.field.clone(),
                reason: d.reason.clone(),
            })
            .collect(),
        unenforced: unenforced
            .iter()
            .take(MAX_LISTED)
            .map(|d| UnenforcedFeature {
                kind: d.object.kind.to_string(),
                namespace: d.object.namespace.clone().unwrap_or_default(),
                name: d.object.name.clone(),
                field: d.field.clone(),
                reason: d.reason.clone(),
            })
            .collect(),
    }
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

/// Why a reconcile did not write the status.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// There is no KmeshConfig `default` (the operator then runs with the defaults).
    #[error(
        "KmeshConfig \"{SINGLETON_NAME}\" does not exist, so its status was not written; \
         the operator runs with the default settings until it is created"
    )]
    ConfigNotFound,
    /// The status write conflicted with another writer (HTTP 409).
    #[error(
        "status write of KmeshConfig \"{SINGLETON_NAME}\" conflicted (HTTP 409 {reason}): {message}"
    )]
    StatusConflict { reason: String, message: String },
    /// The API server refused the status write (RBAC, validation, a server error).
    #[error(
        "status write of KmeshConfig \"{SINGLETON_NAME}\" failed (HTTP {code} {reason}): {message}"
    )]
    StatusRefused {
        code: u16,
        reason: String,
        message: String,
    },
    /// The API server could not be reached, or its answer could not be read.
    #[error("status write of KmeshConfig \"{SINGLETON_NAME}\" failed: {0}")]
    StatusTransport(#[source] kube::Error),
}

impl ReconcileError {
    /// Whether trying again soon may help (conflicts, server errors, transport errors). A
    /// missing KmeshConfig or a refusal such as 403/422 needs a change in the cluster first.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReconcileError::ConfigNotFound => false,
            ReconcileError::StatusConflict { .. } | ReconcileError::StatusTransport(_) => true,
            ReconcileError::StatusRefused { code, .. } => *code >= 500 || *code == 429,
        }
    }

    fn from_status_write(error: kube::Error) -> Self {
        match error {
            kube::Error::Api(s) if s.code == 404 || s.reason == "NotFound" => {
                ReconcileError::ConfigNotFound
            }
            kube::Error::Api(s) if s.code == 409 || s.reason == "Conflict" => {
                ReconcileError::StatusConflict {
                    reason: s.reason,
                    message: s.message,
                }
            }
            kube::Error::Api(s) => ReconcileError::StatusRefused {
                code: s.code,
                reason: s.reason,
                message: s.message,
            },
            other => ReconcileError::StatusTransport(other),
        }
    }
}

/// What one reconcile did with Events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventReport {
    /// Events published (one per object with new rejections).
    pub published: usize,
    /// Events the API refused or could not take; retried on the next reconcile.
    pub failed: usize,
    /// Events left for the next reconcile (over [`MAX_EVENTS_PER_RECONCILE`], or after a failure).
    pub deferred: usize,
}

/// What a successful reconcile did.
#[derive(Clone, Debug, PartialEq)]
pub struct ReconcileOutcome {
    pub status: KmeshConfigStatus,
    /// `false` when the stored status already was `status`.
    pub status_written: bool,
    pub events: EventReport,
}

/// Everything one reconcile reads.
#[derive(Clone, Copy)]
pub struct ReconcileInput<'a> {
    /// The KmeshConfig that was compiled (from the store); `None` when there is none.
    pub config: Option<&'a KmeshConfig>,
    pub diagnostics: &'a [Diagnostic],
    pub rollout: &'a RolloutFacts,
    /// See [`StatusFacts::not_installed`].
    pub not_installed: &'a [String],
    /// The uid of an object, so that its Events show in `kubectl describe` (e.g.
    /// `&|o| stores.uid_of(o)`).
    pub uid_of: &'a (dyn Fn(&ObjectRef) -> Option<String> + Sync),
}

/// One rejection, as Events are de-duplicated.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rejection {
    object: ObjectRef,
    field: String,
    reason: String,
}

/// Writes status and Events; remembers which rejections it has already announced.
pub struct Reconciler {
    client: Client,
    reporter: Reporter,
    /// Rejections an Event was published for, that are still current.
    announced: BTreeSet<Rejection>,
    /// Whether the missing KmeshConfig has been logged (once per absence, not per compile).
    config_missing_logged: bool,
}

impl Reconciler {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Reconciler {
            client,
            reporter,
            announced: BTreeSet::new(),
            config_missing_logged: false,
        }
    }

    /// Publishes Events for new rejections, then writes the status if it changed. Event
    /// failures are logged and counted, never returned; a status write failure is returned
    /// (and logged here, so the caller need not log it again). A missing KmeshConfig is
    /// logged once, until it appears.
    pub async fn reconcile(
        &mut self,
        input: &ReconcileInput<'_>,
    ) -> Result<ReconcileOutcome, ReconcileError> {
        let events = self.publish_events(input).await;
        let Some(config) = input.config else {
            let error = ReconcileError::ConfigNotFound;
            if !std::mem::replace(&mut self.config_missing_logged, true) {
                warn!(%error);
            } else {
                debug!(%error);
            }
            return Err(error);
        };
        self.config_missing_logged = false;
        // Whole seconds, as the apiserver stores them: a status read back compares equal.
        let now = Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_default());
        let status = compute_status(&StatusFacts {
            observed_generation: config.metadata.generation,
            previous: config.status.as_ref(),
            diagnostics: input.diagnostics,
            rollout: input.rollout,
            not_installed: input.not_installed,
            now: &now,
        });
        if config.status.as_ref() == Some(&status) {
            debug!("status unchanged");
            return Ok(ReconcileOutcome {
                status,
                status_written: false,
                events,
            });
        }
        if let Err(error) = write_status(&self.client, &status).await {
            if matches!(error, ReconcileError::ConfigNotFound) {
                // Deleted since the store saw it: the store will catch up.
                self.config_missing_logged = true;
            }
            warn!(%error, retryable = error.is_retryable(), "KmeshConfig status not written");
            return Err(error);
        }
        Ok(ReconcileOutcome {
            status,
            status_written: true,
            events,
        })
    }

    async fn publish_events(&mut self, input: &ReconcileInput<'_>) -> EventReport {
        let mut by_object: BTreeMap<&ObjectRef, Vec<&Diagnostic>> = BTreeMap::new();
        for d in input.diagnostics {
            if d.severity == Severity::Rejected {
                by_object.entry(&d.object).or_default().push(d);
            }
        }
        let current: BTreeSet<Rejection> =
            by_object.values().flatten().map(|d| rejection(d)).collect();
        // A rejection that went away and comes back is announced again.
        self.announced.retain(|r| current.contains(r));

        let mut report = EventReport::default();
        // No cache shared between reconciles: each Event here is a new one (a shared Recorder
        // would fold a second Event on the same object into the first one's series, note and
        // all).
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        let mut api_failed = false;
        for (object, diagnostics) in by_object {
            let mut new: Vec<&Diagnostic> = diagnostics
                .into_iter()
                .filter(|d| !self.announced.contains(&rejection(d)))
                .collect();
            new.dedup();
            if new.is_empty() {
                continue;
            }
            if api_failed || report.published + report.failed >= MAX_EVENTS_PER_RECONCILE {
                report.deferred += 1;
                continue;
            }
            let Some(reference) = object_reference(object, (input.uid_of)(object)) else {
                // Not an API object (a YAML document, say): nothing to attach an Event to.
                debug!(%object, "no Event for an object of an unknown kind");
                self.announced.extend(new.iter().map(|d| rejection(d)));
                continue;
            };
            let event = Event {
                type_: EventType::Warning,
                reason: "Rejected".to_string(),
                note: Some(note(&new)),
                action: "Compile".to_string(),
                secondary: None,
            };
            match recorder.publish(&event, &reference).await {
                Ok(()) => {
                    info!(%object, "published a Rejected event");
                    report.published += 1;
                    self.announced.extend(new.iter().map(|d| rejection(d)));
                }
                Err(error) => {
                    warn!(%object, %error, "could not publish a Rejected event; retrying on the next compile");
                    report.failed += 1;
                    // The events API is likely down or forbidden: do not try the others now.
                    api_failed = true;
                }
            }
        }
        report
    }
}

fn rejection(d: &Diagnostic) -> Rejection {
    Rejection {
        object: d.object.clone(),
        field: d.field.clone(),
        reason: d.reason.clone(),
    }
}

/// The Event's note: each rejection as `field: reason`, cut to the 1 kB the API allows.
fn note(diagnostics: &[&Diagnostic]) -> String {
    let text = diagnostics
        .iter()
        .map(|d| {
            if d.field.is_empty() {
                d.reason.clone()
            } else {
                format!("{}: {}", d.field, d.reason)
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    truncate(text, MAX_NOTE_BYTES)
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut.
fn truncate(mut text: String, max: usize) -> String {
    const MARK: &str = " …";
    if text.len() <= max {
        return text;
    }
    let mut end = max - MARK.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MARK);
    text
}

/// The reference an Event about `object` regards; `None` for objects that are not API objects
/// (a kind missing from the [`kinds`](crate::kinds) table, a YAML document).
pub fn object_reference(object: &ObjectRef, uid: Option<String>) -> Option<ObjectReference> {
    let info = object.kind.info()?;
    Some(ObjectReference {
        api_version: Some(info.api_version(info.watch_version())),
        kind: Some(object.kind.to_string()),
        name: Some(object.name.clone()),
        namespace: object.namespace.clone(),
        uid,
        ..Default::default()
    })
}

/// Server-side applies `status` to the status subresource of KmeshConfig `default`, as
/// [`FIELD_MANAGER`], forcing ownership.
pub async fn write_status(
    client: &Client,
    status: &KmeshConfigStatus,
) -> Result<(), ReconcileError> {
    let api = Api::<KmeshConfig>::all(client.clone());
    let patch = serde_json::json!({
        "apiVersion": KmeshConfig::api_version(&()),
        "kind": KmeshConfig::kind(&()),
        "metadata": { "name": SINGLETON_NAME },
        "status": status,
    });
    api.patch_status(
        SINGLETON_NAME,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(drop)
    .map_err(ReconcileError::from_status_write)
}

#[cfg(test)]
mod tests {
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
            not_installed: &[],
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

    #[test]
    fn missing_kinds_are_a_note_not_a_degradation() {
        let rollout = RolloutFacts::default();
        let not_installed = vec!["TCPRoute (gateway.networking.k8s.io/v1alpha2)".to_string()];
        let status = compute_status(&StatusFacts {
            not_installed: &not_installed,
            ..facts(&[], &rollout, None, &at(0))
        });
        let ready = cond(&status, condition::READY);
        assert_eq!(ready.status, "True");
        assert!(
            ready.message.contains("not watched: TCPRoute"),
            "{}",
            ready.message
        );
        assert_eq!(cond(&status, condition::DEGRADED).status, "False");
    }

    #[test]
    fn notes_fit_an_event() {
        let long = "é".repeat(2000);
        let d = Diagnostic::rejected(vs("a"), "spec", long);
        let n = note(&[&d]);
        assert!(n.len() <= MAX_NOTE_BYTES);
        assert!(n.starts_with("spec: é") && n.ends_with('…'));
    }

    #[test]
    fn references() {
        let r = object_reference(&vs("a"), Some("u1".into())).unwrap();
        assert_eq!(r.api_version.as_deref(), Some("networking.istio.io/v1"));
        assert_eq!(r.uid.as_deref(), Some("u1"));
        assert!(object_reference(&ObjectRef::document("f.yaml", 0), None).is_none());
    }
}
