//! What the kube source watches ([`Watched`]: a kind at an API version, from [`watch_plan`]) and
//! where each watch stands ([`SourceHealth`]), shared between the watch tasks and the main loop.
//!
//! The version is chosen here, once, for the stores and the watches alike: today each kind's
//! first listed version; API discovery can replace [`watch_plan`] without touching the rest.
//! Whether a state lets the first compile go ahead is said in one place, [`KindState::is_settled`].
use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex, MutexGuard},
};

use kube::api::{ApiResource, GroupVersionKind};

use crate::kinds::{Kind, KindInfo};

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

/// As shown to the user: `TCPRoute (gateway.networking.k8s.io/v1alpha2)`.
impl fmt::Display for Watched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind, self.api_version())
    }
}

/// Every kind the source watches ([`Kind::watched`]), each at its table version.
pub fn watch_plan() -> Vec<Watched> {
    Kind::watched()
        .filter_map(|kind| Watched::new(kind, kind.info()?.watch_version()))
        .collect()
}

/// Where the watch of one kind stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KindState {
    /// The first list has not completed yet.
    Starting,
    /// Listed, and being watched.
    Synced,
    /// The API server does not serve the kind: its CRD, or this version of it, is not installed.
    /// The operator runs without it (its store is empty) and retries in the background.
    NotInstalled,
    /// Listing or watching fails for another reason (RBAC, network, apiserver); retried with
    /// backoff. The store keeps what it last listed. Holds the last error.
    Failing(String),
}

impl KindState {
    /// Whether the first compile may go ahead with this kind as it is: listed, or known absent.
    pub fn is_settled(&self) -> bool {
        matches!(self, KindState::Synced | KindState::NotInstalled)
    }
}

/// One watched kind's entry.
#[derive(Clone, Debug)]
struct KindHealth {
    watched: Watched,
    state: KindState,
}

/// The state of every watched kind, shared between the watch tasks and the main loop.
#[derive(Clone, Debug)]
pub struct SourceHealth(Arc<Mutex<BTreeMap<Kind, KindHealth>>>);

impl Default for SourceHealth {
    fn default() -> Self {
        SourceHealth::new(&watch_plan())
    }
}

impl SourceHealth {
    /// Every kind of `plan`, starting.
    pub fn new(plan: &[Watched]) -> Self {
        let kinds = plan.iter().map(|watched| {
            let health = KindHealth {
                watched: watched.clone(),
                state: KindState::Starting,
            };
            (watched.kind.clone(), health)
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

    /// The state of every kind, by kind.
    pub fn all(&self) -> Vec<(Watched, KindState)> {
        let kinds = self.lock();
        let entries = kinds.values();
        entries
            .map(|h| (h.watched.clone(), h.state.clone()))
            .collect()
    }

    /// Kinds the API server does not serve, in [`Kind`] order.
    pub fn not_installed(&self) -> Vec<Watched> {
        self.lock()
            .values()
            .filter(|h| h.state == KindState::NotInstalled)
            .map(|h| h.watched.clone())
            .collect()
    }

    /// Whether every kind has either been listed or found not installed: the stores then hold
    /// the whole cluster, and a compile does not see a partial picture.
    pub fn settled(&self) -> bool {
        self.lock().values().all(|h| h.state.is_settled())
    }

    /// Sets a kind's state; returns the previous one. A kind outside the plan is ignored.
    pub(super) fn set(&self, kind: &Kind, state: KindState) -> KindState {
        match self.lock().get_mut(kind) {
            Some(health) => std::mem::replace(&mut health.state, state),
            None => KindState::Starting,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_when_every_kind_is_listed_or_absent() {
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
        assert_eq!(health.not_installed().len(), 9);
    }

    #[test]
    fn a_failing_or_starting_kind_keeps_the_source_unsettled() {
        let health = SourceHealth::default();
        for kind in Kind::watched() {
            health.set(kind, KindState::Synced);
        }
        assert!(health.settled());
        health.set(&Kind::Pod, KindState::Failing("pods is forbidden".into()));
        assert!(!health.settled());
        health.set(&Kind::Pod, KindState::Starting);
        assert!(!health.settled());
    }

    #[test]
    fn watched_kinds() {
        let plan = watch_plan();
        assert_eq!(plan.len(), 14);
        let tcp = plan.iter().find(|w| w.kind == Kind::TcpRoute).unwrap();
        assert_eq!(tcp.api_version(), "gateway.networking.k8s.io/v1alpha2");
        let pod = plan.iter().find(|w| w.kind == Kind::Pod).unwrap();
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
