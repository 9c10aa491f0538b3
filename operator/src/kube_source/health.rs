//! What the kube source watches and where each watch stands ([`SourceHealth`]), shared between
//! the watch tasks, discovery and the main loop.
//!
//! Every kind the [`kinds`](crate::kinds) table marks watched is in it ([`watched_kinds`]); the
//! version each is watched at is discovery's choice (see [`discovery`](super::discovery)) and is
//! recorded here with the kind's [`KindState`] and whether it has been listed at least once since
//! the operator started (its store then holds what was listed, through later watch errors).
//! Whether a state lets the first compile go ahead is said in one place,
//! [`KindState::is_settled`]; what the status shows of the kinds that cannot be read, in one place
//! too, [`SourceHealth::unwatched`]; whether what is compiled may be published, in
//! [`gate`](super::gate), over [`SourceHealth::readings`].
use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex, MutexGuard},
};

use kube::api::{ApiResource, GroupVersionKind};

use crate::{
    crd::{UnwatchedKind, UnwatchedReason},
    kinds::{Kind, KindInfo},
};

/// A kind as the source watches it: at which API version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watched {
    pub kind: Kind,
    pub version: String,
    info: &'static KindInfo,
}

impl Watched {
    /// `kind` at `version`; `None` for a kind missing from the table (nothing says how to ask the
    /// API server for it).
    pub fn new(kind: &Kind, version: &str) -> Option<Watched> {
        Some(Watched {
            kind: kind.clone(),
            version: version.to_string(),
            info: kind.info()?,
        })
    }

    /// `kind` at its preferred version (see [`KindInfo::preferred_version`]).
    pub fn preferred(kind: &Kind) -> Option<Watched> {
        Watched::new(kind, kind.info()?.preferred_version())
    }

    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        self.info.api_version(&self.version)
    }

    /// The [`ApiResource`] for a dynamic API over this kind at this version.
    pub fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.info.group, &self.version, self.info.name),
            self.info.plural,
        )
    }
}

/// As shown to the user: `TCPRoute (gateway.networking.k8s.io/v1)`.
impl fmt::Display for Watched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind, self.api_version())
    }
}

/// Every kind the source watches ([`Kind::watched`]), in table order.
pub fn watched_kinds() -> Vec<Kind> {
    Kind::watched().cloned().collect()
}

/// Where the watch of one kind stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KindState {
    /// Discovery has not placed it yet, or its first list has not completed.
    Starting,
    /// Listed, and being watched.
    Synced,
    /// The API server serves no version of it: its CRD is not installed. The operator runs
    /// without it (its store is empty); a CRD installed later is picked up by discovery.
    NotInstalled,
    /// Its CRD is installed, but serves it only at these versions, none of which the compiler
    /// reads; its store is empty.
    NotServed { served: Vec<String> },
    /// The API server refuses to list or watch it (HTTP 403: the operator's RBAC). Retried with
    /// backoff; the store keeps what it last listed. Holds the API server's message.
    Forbidden(String),
    /// Listing or watching fails for another reason (network, apiserver); retried with backoff.
    /// The store keeps what it last listed. Holds the last error.
    Failing(String),
}

impl KindState {
    /// Whether the first compile may go ahead with this kind as it is: listed, or known to be
    /// unreadable (absent, at versions the compiler does not read, or forbidden) — those are
    /// reported, and waiting would not change them. A kind still starting or failing for a
    /// transient reason holds the first compile back (see `KubeSource::wait_settled`).
    pub fn is_settled(&self) -> bool {
        !matches!(self, KindState::Starting | KindState::Failing(_))
    }

    /// Whether `other` is the same condition as far as logging goes: the same state, the
    /// messages of a forbidden or failing watch aside (they may differ from retry to retry). A
    /// state is logged when it changes in this sense, not on every retry.
    pub fn same_condition(&self, other: &KindState) -> bool {
        match (self, other) {
            (KindState::Forbidden(_), KindState::Forbidden(_))
            | (KindState::Failing(_), KindState::Failing(_)) => true,
            _ => self == other,
        }
    }

    /// Why the kind's objects are not read, as the status says it; `None` while it is (or may
    /// soon be) read.
    fn unwatched(&self) -> Option<(UnwatchedReason, String)> {
        match self {
            KindState::NotInstalled => Some((
                UnwatchedReason::NotInstalled,
                "no version is served: its CRD is not installed".to_string(),
            )),
            KindState::NotServed { served } => Some((
                UnwatchedReason::NotServed,
                format!(
                    "served only at {}, which the operator does not read",
                    served.join(", ")
                ),
            )),
            KindState::Forbidden(message) => Some((UnwatchedReason::Forbidden, message.clone())),
            KindState::Starting | KindState::Synced | KindState::Failing(_) => None,
        }
    }
}

/// One watched kind's entry.
#[derive(Clone, Debug)]
struct KindHealth {
    /// The version being watched (or listed); `None` before discovery placed the kind, and while
    /// no version the compiler reads is served.
    version: Option<String>,
    state: KindState,
    /// Whether a list of it has completed since the operator started (it has been
    /// [`KindState::Synced`] once).
    listed_since_start: bool,
}

/// One watched kind as the publishing [`gate`](super::gate) reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KindReading {
    pub kind: Kind,
    pub state: KindState,
    /// Whether a list of it has completed since the operator started. A kube-runtime store keeps
    /// what it listed through later watch errors (a 403, a failing API server), so such a kind's
    /// objects are still compiled; a kind never listed has none in the store.
    pub listed_since_start: bool,
}

/// The state of every watched kind, shared between the watch tasks, discovery and the main loop.
#[derive(Clone, Debug)]
pub struct SourceHealth(Arc<Mutex<BTreeMap<Kind, KindHealth>>>);

impl Default for SourceHealth {
    fn default() -> Self {
        SourceHealth::new(&watched_kinds())
    }
}

impl SourceHealth {
    /// Every kind of `kinds`, starting, at no version yet.
    pub fn new(kinds: &[Kind]) -> Self {
        let kinds = kinds.iter().map(|kind| {
            let health = KindHealth {
                version: None,
                state: KindState::Starting,
                listed_since_start: false,
            };
            (kind.clone(), health)
        });
        SourceHealth(Arc::new(Mutex::new(kinds.collect())))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Kind, KindHealth>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state of one kind.
    pub fn get(&self, kind: &Kind) -> KindState {
        self.lock()
            .get(kind)
            .map_or(KindState::Starting, |h| h.state.clone())
    }

    /// The kind at the version it is watched at; `None` while it is at none.
    pub fn watched(&self, kind: &Kind) -> Option<Watched> {
        let version = self.lock().get(kind)?.version.clone()?;
        Watched::new(kind, &version)
    }

    /// Every kind with its state and whether it was listed since start, by kind: what the
    /// publishing [`gate`](super::gate) decides on.
    pub fn readings(&self) -> Vec<KindReading> {
        let kinds = self.lock();
        let entries = kinds.iter();
        let readings = entries.map(|(kind, h)| KindReading {
            kind: kind.clone(),
            state: h.state.clone(),
            listed_since_start: h.listed_since_start,
        });
        readings.collect()
    }

    /// Every kind with its version and state, by kind.
    pub fn all(&self) -> Vec<(Kind, Option<String>, KindState)> {
        let kinds = self.lock();
        let entries = kinds.iter();
        entries
            .map(|(kind, h)| (kind.clone(), h.version.clone(), h.state.clone()))
            .collect()
    }

    /// Kinds whose objects are not read, and why, in [`Kind`] order: what the KmeshConfig status
    /// lists in `unwatched`.
    pub fn unwatched(&self) -> Vec<UnwatchedKind> {
        let kinds = self.lock();
        let entries = kinds.iter();
        let unwatched = entries.filter_map(|(kind, health)| {
            let (reason, message) = health.state.unwatched()?;
            Some(UnwatchedKind {
                kind: kind.name().to_string(),
                group: kind.group().to_string(),
                reason,
                message,
            })
        });
        unwatched.collect()
    }

    /// Whether every kind is settled ([`KindState::is_settled`]): the stores then hold everything
    /// the operator can read, and a compile does not see a partial picture.
    pub fn settled(&self) -> bool {
        self.lock().values().all(|h| h.state.is_settled())
    }

    /// Sets a kind's state (a kind [`KindState::Synced`] is listed since start from then on);
    /// returns the previous one. A kind outside the source is ignored.
    pub(super) fn set(&self, kind: &Kind, state: KindState) -> KindState {
        match self.lock().get_mut(kind) {
            Some(health) => {
                health.listed_since_start |= state == KindState::Synced;
                std::mem::replace(&mut health.state, state)
            }
            None => KindState::Starting,
        }
    }

    /// Records the version a kind is watched at (`None`: at none).
    pub(super) fn set_version(&self, kind: &Kind, version: Option<&str>) {
        if let Some(health) = self.lock().get_mut(kind) {
            health.version = version.map(str::to_string);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_when_every_kind_is_listed_or_unreadable() {
        let health = SourceHealth::default();
        assert!(!health.settled());
        for kind in Kind::watched() {
            let state = if kind.is_custom() {
                KindState::NotInstalled
            } else {
                KindState::Synced
            };
            health.set(kind, state);
        }
        assert!(health.settled());
        assert_eq!(health.unwatched().len(), 10);
        // Forbidden and served-at-other-versions kinds do not hold the compile back either.
        health.set(&Kind::Pod, KindState::Forbidden("pods is forbidden".into()));
        let served = vec!["v3".to_string()];
        health.set(&Kind::TcpRoute, KindState::NotServed { served });
        assert!(health.settled());
    }

    #[test]
    fn a_failing_or_starting_kind_keeps_the_source_unsettled() {
        let health = SourceHealth::default();
        for kind in Kind::watched() {
            health.set(kind, KindState::Synced);
        }
        assert!(health.settled());
        health.set(&Kind::Pod, KindState::Failing("connection refused".into()));
        assert!(!health.settled());
        health.set(&Kind::Pod, KindState::Starting);
        assert!(!health.settled());
    }

    #[test]
    fn unwatched_kinds_say_why() {
        let health = SourceHealth::default();
        for kind in Kind::watched() {
            health.set(kind, KindState::Synced);
        }
        assert!(health.unwatched().is_empty());
        let forbidden = "authorizationpolicies.security.istio.io is forbidden: User cannot list";
        health.set(
            &Kind::AuthorizationPolicy,
            KindState::Forbidden(forbidden.into()),
        );
        let served = vec!["v2".to_string(), "v3alpha1".to_string()];
        health.set(&Kind::TcpRoute, KindState::NotServed { served });
        health.set(&Kind::HttpRoute, KindState::NotInstalled);
        health.set(&Kind::Pod, KindState::Failing("timeout".into()));
        let unwatched = health.unwatched();
        let shown: Vec<(&str, &str, UnwatchedReason)> = unwatched
            .iter()
            .map(|u| (u.kind.as_str(), u.group.as_str(), u.reason))
            .collect();
        assert_eq!(
            shown,
            [
                (
                    "AuthorizationPolicy",
                    "security.istio.io",
                    UnwatchedReason::Forbidden
                ),
                (
                    "HTTPRoute",
                    "gateway.networking.k8s.io",
                    UnwatchedReason::NotInstalled
                ),
                (
                    "TCPRoute",
                    "gateway.networking.k8s.io",
                    UnwatchedReason::NotServed
                ),
            ]
        );
        assert_eq!(unwatched[0].message, forbidden);
        assert_eq!(
            unwatched[2].message,
            "served only at v2, v3alpha1, which the operator does not read"
        );
    }

    #[test]
    fn conditions_ignore_retry_messages() {
        let a = KindState::Forbidden("a".into());
        assert!(a.same_condition(&KindState::Forbidden("b".into())));
        assert!(!a.same_condition(&KindState::Failing("a".into())));
        let v1 = KindState::NotServed {
            served: vec!["v1".into()],
        };
        let v2 = KindState::NotServed {
            served: vec!["v2".into()],
        };
        assert!(!v1.same_condition(&v2));
        assert!(KindState::Synced.same_condition(&KindState::Synced));
    }

    #[test]
    fn a_kind_is_listed_since_start_once_synced_and_stays_so() {
        let health = SourceHealth::default();
        let listed = |health: &SourceHealth| {
            let readings = health.readings();
            let reading = readings
                .iter()
                .find(|r| r.kind == Kind::AuthorizationPolicy);
            reading.unwrap().listed_since_start
        };
        assert_eq!(health.readings().len(), watched_kinds().len());
        assert!(!listed(&health));
        let forbidden = KindState::Forbidden("forbidden".into());
        health.set(&Kind::AuthorizationPolicy, forbidden.clone());
        assert!(!listed(&health), "a 403 is not a list");
        health.set(&Kind::AuthorizationPolicy, KindState::Synced);
        assert!(listed(&health));
        // Later errors do not undo it: the store keeps what was listed.
        health.set(&Kind::AuthorizationPolicy, forbidden);
        assert!(listed(&health));
        let reading = health.readings();
        let reading = reading.iter().find(|r| r.kind == Kind::AuthorizationPolicy);
        assert!(matches!(reading.unwrap().state, KindState::Forbidden(_)));
    }

    #[test]
    fn versions_are_recorded() {
        let health = SourceHealth::default();
        assert_eq!(health.watched(&Kind::TcpRoute), None);
        health.set_version(&Kind::TcpRoute, Some("v1"));
        let tcp = health.watched(&Kind::TcpRoute).unwrap();
        assert_eq!(tcp.api_version(), "gateway.networking.k8s.io/v1");
        assert_eq!(tcp.to_string(), "TCPRoute (gateway.networking.k8s.io/v1)");
        health.set_version(&Kind::TcpRoute, None);
        assert_eq!(health.watched(&Kind::TcpRoute), None);
    }

    #[test]
    fn watched_kinds_and_resources() {
        assert_eq!(watched_kinds().len(), 15);
        let pod = Watched::preferred(&Kind::Pod).unwrap();
        assert_eq!(pod.api_version(), "v1");
        let ap = Watched::new(&Kind::AuthorizationPolicy, "v1").unwrap();
        let ar = ap.api_resource();
        assert_eq!(ar.api_version, "security.istio.io/v1");
        assert_eq!(ar.plural, "authorizationpolicies");
        let dr = Watched::new(&Kind::DestinationRule, "v1").unwrap();
        assert_eq!(dr.to_string(), "DestinationRule (networking.istio.io/v1)");
        assert!(Watched::new(&Kind::Document, "v1").is_none());
    }
}
