//! The publishing gate: whether what the operator compiles now may be published, given where the
//! watch of each kind stands. A pure decision ([`publishing`]) over the source's
//! [`readings`](super::SourceHealth::readings) and the KmeshConfig's mode.
//!
//! Why: authorization cannot be compiled without the kinds it is compiled from (the
//! [`kinds`](crate::kinds) table marks them [`IfUnread::HoldPublishing`]: AuthorizationPolicy and
//! PeerAuthentication, whose objects refuse traffic, and the Pods and Namespaces they bind). An operator that (re)starts while it cannot read them would compile no policy and
//! publish snapshots that open every node's workloads: an ALLOW-bound workload would accept
//! anyone, DENY policies and STRICT would vanish. So while such a kind has never been listed since
//! the operator started and is not known to be absent, nothing new is published: every node keeps
//! the snapshot its agent runs (a node that has none gets none, and its agent waits). Once listed,
//! a kind's store keeps its objects through later watch errors, so only "never listed" holds.
//!
//! Promise: [`Publishing::Held`] names each kind that holds and why, in [`Kind`] order; its
//! [`message`](Publishing::message) is the one text the status, the Event and the log say.
use std::fmt;

use tracing::{error, info};

use crate::{
    crd::Mode,
    kinds::{IfUnread, Kind},
    metrics::Metrics,
};

use super::health::{KindReading, KindState};

/// Whether the operator may publish what it compiles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Publishing {
    Open,
    /// Nothing new is published: these kinds cannot be read (at least one).
    Held(Vec<HeldKind>),
}

/// A kind that holds publishing back, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldKind {
    pub kind: Kind,
    pub reason: Unread,
    /// The API server's message (forbidden), the last error (failing), the versions served (not
    /// served); empty when not listed yet. May change from retry to retry.
    pub detail: String,
}

/// Why a kind that holds publishing back cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unread {
    /// Not listed yet since the operator started: discovery or the first list has not completed.
    NotListedYet,
    /// Never listed: the API server refuses it (HTTP 403, the operator's RBAC).
    Forbidden,
    /// Never listed: listing fails for another reason (retried).
    Failing,
    /// Its CRD serves it only at versions the compiler does not read.
    NotServed,
}

/// The gate's decision. Under mode `Disabled` nothing is enforced, so nothing can be opened by
/// missing policies: always open (a user must be able to disable the mesh). Otherwise held by
/// every kind marked [`IfUnread::HoldPublishing`] that [`unread`] says cannot be read.
pub fn publishing(readings: &[KindReading], mode: Mode) -> Publishing {
    if mode == Mode::Disabled {
        return Publishing::Open;
    }
    let guarded = readings.iter().filter(|r| {
        r.kind
            .info()
            .is_some_and(|i| i.if_unread == IfUnread::HoldPublishing)
    });
    let mut held: Vec<HeldKind> = guarded
        .filter_map(|r| {
            let (reason, detail) = unread(&r.state, r.listed_since_start)?;
            Some(HeldKind {
                kind: r.kind.clone(),
                reason,
                detail,
            })
        })
        .collect();
    held.sort_by(|a, b| a.kind.cmp(&b.kind));
    if held.is_empty() {
        Publishing::Open
    } else {
        Publishing::Held(held)
    }
}

/// Why a kind in `state` has no objects the compiler can trust to be complete, with the detail;
/// `None` when its store holds what the cluster holds (or what it last listed of it).
fn unread(state: &KindState, listed_since_start: bool) -> Option<(Unread, String)> {
    match state {
        KindState::Synced => None,
        // No CRD: no object of the kind can exist (deleting a CRD deletes its objects).
        KindState::NotInstalled => None,
        // Its store is emptied (see `watch`), listed before or not, while objects may exist at
        // the versions served: compiling without them would drop them. Held until the operator
        // reads a served version (an upgrade of the operator), or the mode is `Disabled`.
        KindState::NotServed { served } => Some((Unread::NotServed, served.join(", "))),
        // The store keeps what was last listed: compiled from that, as before the error.
        KindState::Starting | KindState::Forbidden(_) | KindState::Failing(_)
            if listed_since_start =>
        {
            None
        }
        KindState::Starting => Some((Unread::NotListedYet, String::new())),
        KindState::Forbidden(message) => Some((Unread::Forbidden, message.clone())),
        KindState::Failing(error) => Some((Unread::Failing, error.clone())),
    }
}

impl Publishing {
    pub fn is_held(&self) -> bool {
        matches!(self, Publishing::Held(_))
    }

    /// The kinds that hold publishing back (none when open).
    pub fn held(&self) -> &[HeldKind] {
        match self {
            Publishing::Open => &[],
            Publishing::Held(held) => held,
        }
    }

    /// What the status, the Event and the log say while held; `None` when open.
    pub fn message(&self) -> Option<String> {
        let held = self.held();
        if held.is_empty() {
            return None;
        }
        let kinds: Vec<String> = held.iter().map(ToString::to_string).collect();
        Some(format!(
            "Objects authorization is compiled from cannot be read, so no snapshot is published \
             until they can (every node keeps the snapshot it runs; compiling without them would \
             let through what policies deny): {}.",
            kinds.join("; ")
        ))
    }

    /// The held kinds and reasons, for telling one hold from another (details aside, they may
    /// change from retry to retry): a new hold, or one by other kinds or for other reasons, is
    /// announced again.
    pub fn condition(&self) -> Vec<(Kind, Unread)> {
        let held = self.held().iter();
        held.map(|h| (h.kind.clone(), h.reason)).collect()
    }
}

/// Tells the operator's log and metrics where the gate stands: one line per change of hold
/// (error when a hold starts or changes kinds or reasons, info when it ends, nothing on a
/// retry), and the gauge `kmesh_operator_publishing_held`.
#[derive(Debug, Default)]
pub struct GateReport {
    last: Vec<(Kind, Unread)>,
}

impl GateReport {
    pub fn observe(&mut self, publishing: &Publishing, metrics: &Metrics) {
        metrics.publishing_held(publishing.is_held());
        let condition = publishing.condition();
        if condition == self.last {
            return;
        }
        match publishing.message() {
            Some(message) => error!("{message}"),
            None => info!(
                "the objects authorization is compiled from are read; publishing snapshots again"
            ),
        }
        self.last = condition;
    }
}

/// `AuthorizationPolicy.security.istio.io: forbidden by the operator's RBAC (…the API server's
/// message…)`.
impl fmt::Display for HeldKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let detail = &self.detail;
        match self.kind.group() {
            "" => write!(f, "{}: ", self.kind)?,
            group => write!(f, "{}.{group}: ", self.kind)?,
        }
        match self.reason {
            Unread::NotListedYet => write!(f, "not listed yet since the operator started"),
            Unread::Forbidden => write!(f, "forbidden by the operator's RBAC ({detail})"),
            Unread::Failing => write!(f, "not listed yet: listing fails ({detail})"),
            Unread::NotServed => write!(
                f,
                "served only at {detail}, which the operator does not read (policies may exist \
                 there)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_source::health::watched_kinds;

    /// Every watched kind synced, but `kind` in `state`.
    fn readings(kind: &Kind, state: KindState, listed_since_start: bool) -> Vec<KindReading> {
        let kinds = watched_kinds().into_iter();
        let readings = kinds.map(|k| {
            if &k == kind {
                KindReading {
                    kind: k,
                    state: state.clone(),
                    listed_since_start,
                }
            } else {
                KindReading {
                    kind: k,
                    state: KindState::Synced,
                    listed_since_start: true,
                }
            }
        });
        readings.collect()
    }

    fn every_state() -> Vec<KindState> {
        vec![
            KindState::Starting,
            KindState::Synced,
            KindState::NotInstalled,
            KindState::NotServed {
                served: vec!["v1alpha1".into()],
            },
            KindState::Forbidden("authorizationpolicies is forbidden".into()),
            KindState::Failing("connection refused".into()),
        ]
    }

    /// The decision for each state × listed since start, under an enforcing mode: what holds.
    #[test]
    fn each_state_of_an_authorization_kind() {
        for kind in [Kind::AuthorizationPolicy, Kind::PeerAuthentication] {
            for state in every_state() {
                for listed in [false, true] {
                    let decided =
                        publishing(&readings(&kind, state.clone(), listed), Mode::KernelNative);
                    let expected = match (&state, listed) {
                        (KindState::Synced | KindState::NotInstalled, _) => None,
                        (KindState::NotServed { .. }, _) => Some((Unread::NotServed, "v1alpha1")),
                        (_, true) => None,
                        (KindState::Starting, false) => Some((Unread::NotListedYet, "")),
                        (KindState::Forbidden(_), false) => {
                            Some((Unread::Forbidden, "authorizationpolicies is forbidden"))
                        }
                        (KindState::Failing(_), false) => {
                            Some((Unread::Failing, "connection refused"))
                        }
                    };
                    let expected = match expected {
                        None => Publishing::Open,
                        Some((reason, detail)) => Publishing::Held(vec![HeldKind {
                            kind: kind.clone(),
                            reason,
                            detail: detail.to_string(),
                        }]),
                    };
                    assert_eq!(decided, expected, "{kind} {state:?} listed={listed}");
                    // DualEngine enforces authorization as KernelNative does.
                    let dual =
                        publishing(&readings(&kind, state.clone(), listed), Mode::DualEngine);
                    assert_eq!(
                        dual, expected,
                        "{kind} {state:?} listed={listed} DualEngine"
                    );
                }
            }
        }
    }

    #[test]
    fn disabled_mode_is_never_held() {
        for state in every_state() {
            for listed in [false, true] {
                let r = readings(&Kind::AuthorizationPolicy, state.clone(), listed);
                assert_eq!(publishing(&r, Mode::Disabled), Publishing::Open);
            }
        }
    }

    #[test]
    fn routing_kinds_never_hold() {
        for kind in [
            Kind::Service,
            Kind::VirtualService,
            Kind::TcpRoute,
            Kind::KmeshConfig,
        ] {
            for state in every_state() {
                let r = readings(&kind, state.clone(), false);
                assert_eq!(
                    publishing(&r, Mode::KernelNative),
                    Publishing::Open,
                    "{kind} {state:?}"
                );
            }
        }
    }

    #[test]
    fn the_kinds_authorization_is_compiled_from_are_the_ones_that_hold() {
        let holding: Vec<&Kind> = Kind::KNOWN
            .iter()
            .filter(|k| k.info().unwrap().if_unread == IfUnread::HoldPublishing)
            .collect();
        assert_eq!(
            holding,
            [
                &Kind::Namespace,
                &Kind::Pod,
                &Kind::AuthorizationPolicy,
                &Kind::PeerAuthentication
            ]
        );
    }

    /// Pods (and Namespaces) say which workloads policies bind and which are enrolled: never
    /// listed, they hold publishing like the policies, named without a group.
    #[test]
    fn forbidden_pods_hold_publishing() {
        let r = readings(
            &Kind::Pod,
            KindState::Forbidden("pods is forbidden".into()),
            false,
        );
        let decided = publishing(&r, Mode::KernelNative);
        assert_eq!(decided.condition(), [(Kind::Pod, Unread::Forbidden)]);
        let message = decided.message().unwrap();
        assert!(
            message.ends_with(": Pod: forbidden by the operator's RBAC (pods is forbidden)."),
            "{message}"
        );
        let listed = readings(&Kind::Pod, KindState::Forbidden("later".into()), true);
        assert_eq!(publishing(&listed, Mode::KernelNative), Publishing::Open);
    }

    #[test]
    fn a_hold_names_each_kind_and_why() {
        let mut r = readings(
            &Kind::PeerAuthentication,
            KindState::NotServed {
                served: vec!["v1alpha1".into(), "v2".into()],
            },
            true,
        );
        let forbidden =
            "authorizationpolicies.security.istio.io is forbidden: User \"x\" cannot list";
        for reading in &mut r {
            if reading.kind == Kind::AuthorizationPolicy {
                reading.state = KindState::Forbidden(forbidden.into());
                reading.listed_since_start = false;
            }
        }
        let decided = publishing(&r, Mode::KernelNative);
        assert!(decided.is_held());
        assert_eq!(
            decided.condition(),
            [
                (Kind::AuthorizationPolicy, Unread::Forbidden),
                (Kind::PeerAuthentication, Unread::NotServed)
            ]
        );
        let message = decided.message().unwrap();
        assert_eq!(
            message,
            format!(
                "Objects authorization is compiled from cannot be read, so no snapshot is \
                 published until they can (every node keeps the snapshot it runs; compiling \
                 without them would let through what policies deny): AuthorizationPolicy.security.istio.io: forbidden by the \
                 operator's RBAC ({forbidden}); PeerAuthentication.security.istio.io: served only \
                 at v1alpha1, v2, which the operator does not read (policies may exist there)."
            )
        );
        assert_eq!(Publishing::Open.message(), None);
        assert!(Publishing::Open.condition().is_empty());
    }

    #[test]
    fn the_report_keeps_the_gauge() {
        let metrics = Metrics::default();
        let mut report = GateReport::default();
        let held = publishing(
            &readings(&Kind::AuthorizationPolicy, KindState::Starting, false),
            Mode::KernelNative,
        );
        report.observe(&held, &metrics);
        assert!(
            metrics
                .render()
                .contains("kmesh_operator_publishing_held 1\n")
        );
        assert_eq!(report.last, held.condition());
        report.observe(&Publishing::Open, &metrics);
        assert!(
            metrics
                .render()
                .contains("kmesh_operator_publishing_held 0\n")
        );
        assert!(report.last.is_empty());
    }

    #[test]
    fn a_fresh_source_holds_until_every_holding_kind_is_listed() {
        let health = crate::kube_source::SourceHealth::default();
        let held = publishing(&health.readings(), Mode::KernelNative);
        assert_eq!(
            held.condition(),
            [
                (Kind::AuthorizationPolicy, Unread::NotListedYet),
                (Kind::Namespace, Unread::NotListedYet),
                (Kind::PeerAuthentication, Unread::NotListedYet),
                (Kind::Pod, Unread::NotListedYet)
            ]
        );
        health.set(&Kind::Namespace, KindState::Synced);
        health.set(&Kind::Pod, KindState::Synced);
        assert_eq!(
            publishing(&health.readings(), Mode::KernelNative).condition(),
            [
                (Kind::AuthorizationPolicy, Unread::NotListedYet),
                (Kind::PeerAuthentication, Unread::NotListedYet)
            ]
        );
        health.set(&Kind::AuthorizationPolicy, KindState::Synced);
        health.set(&Kind::PeerAuthentication, KindState::NotInstalled);
        assert_eq!(
            publishing(&health.readings(), Mode::KernelNative),
            Publishing::Open
        );
        // Forbidden after a list: the store keeps the policies; still open.
        health.set(
            &Kind::AuthorizationPolicy,
            KindState::Forbidden("no".into()),
        );
        assert_eq!(
            publishing(&health.readings(), Mode::KernelNative),
            Publishing::Open
        );
    }
}
