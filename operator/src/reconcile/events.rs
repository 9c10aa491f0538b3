//! Warning Events on newly rejected objects: one per object with new rejections, at most once
//! per rejection for as long as it stays rejected, at most [`MAX_EVENTS_PER_RECONCILE`] per
//! reconcile; and one on the KmeshConfig when publishing is held (authorization unreadable), once
//! per hold (again when other kinds or reasons hold it). An Event that cannot be published is
//! retried on the next reconcile.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use tracing::{debug, info, warn};

use super::{ReconcileInput, Reconciler, status::condition};
use crate::{
    crd::{KmeshConfig, SINGLETON_NAME},
    diagnostics::{Diagnostic, ObjectRef, Severity},
    kinds::Kind,
    kube_source::{Publishing, Unread},
};

/// At most this many Events per reconcile; the others follow on the next reconciles.
pub const MAX_EVENTS_PER_RECONCILE: usize = 32;

/// An Event's note may hold at most 1 kB.
const MAX_NOTE_BYTES: usize = 1024;

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

/// One rejection, as Events are de-duplicated.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Rejection {
    object: ObjectRef,
    field: String,
    reason: String,
}

impl Reconciler {
    pub(super) async fn publish_events(&mut self, input: &ReconcileInput<'_>) -> EventReport {
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

impl Reconciler {
    /// Publishes a Warning Event `AuthorizationUnreadable` on the KmeshConfig when a hold starts
    /// (or is held by other kinds or for other reasons); forgets it when the hold ends.
    pub(super) async fn announce_hold(
        &mut self,
        publishing: &Publishing,
        config: &KmeshConfig,
        report: &mut EventReport,
    ) {
        let Some(note) = hold_news(&self.announced_hold, publishing) else {
            if !publishing.is_held() {
                self.announced_hold.clear();
            }
            return;
        };
        let object = ObjectRef::new(Kind::KmeshConfig, None, SINGLETON_NAME);
        let Some(reference) = object_reference(&object, config.metadata.uid.clone()) else {
            return;
        };
        let event = Event {
            type_: EventType::Warning,
            reason: condition::HELD_REASON.to_string(),
            note: Some(truncate(note, MAX_NOTE_BYTES)),
            action: "Publish".to_string(),
            secondary: None,
        };
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        match recorder.publish(&event, &reference).await {
            Ok(()) => {
                info!("published an AuthorizationUnreadable event");
                report.published += 1;
                self.announced_hold = publishing.condition();
            }
            Err(error) => {
                warn!(%error, "could not publish the AuthorizationUnreadable event; retrying on the next reconcile");
                report.failed += 1;
            }
        }
    }
}

/// The note of the Event a hold calls for, given the hold last announced; `None` when it is
/// open, or the same hold (kinds and reasons) was announced.
fn hold_news(announced: &[(Kind, Unread)], publishing: &Publishing) -> Option<String> {
    let message = publishing.message()?;
    (publishing.condition() != announced).then_some(message)
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
        api_version: Some(info.api_version(info.preferred_version())),
        kind: Some(object.kind.to_string()),
        name: Some(object.name.clone()),
        namespace: object.namespace.clone(),
        uid,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::Kind;

    fn vs(name: &str) -> ObjectRef {
        ObjectRef::new(Kind::VirtualService, Some("bookinfo"), name)
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
    fn a_hold_is_announced_once_per_condition() {
        use crate::kube_source::HeldKind;
        let held = |reason, detail: &str| {
            Publishing::Held(vec![HeldKind {
                kind: Kind::AuthorizationPolicy,
                reason,
                detail: detail.into(),
            }])
        };
        let forbidden = held(Unread::Forbidden, "forbidden: retry 1");
        let note = hold_news(&[], &forbidden).expect("a new hold is announced");
        assert!(note.contains("forbidden: retry 1"), "{note}");
        let announced = forbidden.condition();
        // The next retry's message differs; the hold is the same.
        assert_eq!(
            hold_news(&announced, &held(Unread::Forbidden, "forbidden: retry 2")),
            None
        );
        // Another reason is news.
        assert!(hold_news(&announced, &held(Unread::NotServed, "v9")).is_some());
        assert_eq!(hold_news(&announced, &Publishing::Open), None);
    }

    #[test]
    fn references() {
        let r = object_reference(&vs("a"), Some("u1".into())).unwrap();
        assert_eq!(r.api_version.as_deref(), Some("networking.istio.io/v1"));
        assert_eq!(r.uid.as_deref(), Some("u1"));
        assert!(object_reference(&ObjectRef::document("f.yaml", 0), None).is_none());
    }
}
