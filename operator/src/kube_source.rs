//! The compiler's inputs from the API server: one reflector (watcher + in-memory store) per kind
//! the compiler reads, a "something changed" signal, and the debouncer that turns a burst of
//! changes into one compile.
//!
//! Built-in kinds (Namespaces, Nodes, Pods, Services, EndpointSlices) are read with their
//! k8s-openapi types. Istio and Gateway API kinds are read as [`DynamicObject`]s and converted to
//! the compiler's serde types through [`Inputs::add_json`], the same path `kmeshctl compile` takes
//! for YAML, so both sources dispatch and validate objects identically.
//!
//! A custom resource kind whose CRD (or that version of it) is not installed does not stop the
//! operator: its watcher's list fails with 404, the kind is marked [`KindState::NotInstalled`]
//! (logged once, listed by [`SourceHealth::not_installed`] and in [`SourceSnapshot`]), its store
//! is emptied, and the watcher keeps retrying with the default backoff (at most every 30 s) so that
//! a CRD installed later is picked up without a restart.
//!
//! Typical main loop:
//! ```no_run
//! # async fn run(client: kube::Client) {
//! use std::time::Duration;
//! use kmesh_operator::kube_source::{DebounceConfig, KubeSource};
//! let source = KubeSource::start(client);
//! // Subscribe before the first snapshot, so that no change between the two is missed.
//! let mut changes = source.changes(DebounceConfig::default());
//! source.wait_settled(Duration::from_secs(60)).await;
//! loop {
//!     let snapshot = source.snapshot();
//!     // compile(&snapshot.inputs, ...), publish, reconcile status ...
//!     if !changes.next().await {
//!         break;
//!     }
//! }
//! # }
//! ```
use std::{
    collections::BTreeMap,
    fmt,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt as _,
        reflector::{Lookup, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, sleep_until},
};
use tracing::{debug, info, warn};

use crate::{
    crd::{KmeshConfig, SINGLETON_NAME},
    diagnostics::{Diagnostic, ObjectRef},
    inputs::Inputs,
};

/// The annotation `kubectl apply` leaves on objects: a copy of the whole object, never read by
/// the compiler, dropped from the stores to save memory.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A kind the operator watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WatchedKind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
    KmeshConfig,
    VirtualService,
    DestinationRule,
    ServiceEntry,
    AuthorizationPolicy,
    PeerAuthentication,
    HttpRoute,
    TcpRoute,
    ReferenceGrant,
}

impl WatchedKind {
    /// Every watched kind.
    pub const ALL: [WatchedKind; 14] = [
        WatchedKind::Namespace,
        WatchedKind::Node,
        WatchedKind::Pod,
        WatchedKind::Service,
        WatchedKind::EndpointSlice,
        WatchedKind::KmeshConfig,
        WatchedKind::VirtualService,
        WatchedKind::DestinationRule,
        WatchedKind::ServiceEntry,
        WatchedKind::AuthorizationPolicy,
        WatchedKind::PeerAuthentication,
        WatchedKind::HttpRoute,
        WatchedKind::TcpRoute,
        WatchedKind::ReferenceGrant,
    ];

    /// The kinds read as [`DynamicObject`]s (Istio and Gateway API).
    pub const DYNAMIC: [WatchedKind; 8] = [
        WatchedKind::VirtualService,
        WatchedKind::DestinationRule,
        WatchedKind::ServiceEntry,
        WatchedKind::AuthorizationPolicy,
        WatchedKind::PeerAuthentication,
        WatchedKind::HttpRoute,
        WatchedKind::TcpRoute,
        WatchedKind::ReferenceGrant,
    ];

    /// `(group, version, kind, plural)`.
    fn gvkp(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            WatchedKind::Namespace => ("", "v1", "Namespace", "namespaces"),
            WatchedKind::Node => ("", "v1", "Node", "nodes"),
            WatchedKind::Pod => ("", "v1", "Pod", "pods"),
            WatchedKind::Service => ("", "v1", "Service", "services"),
            WatchedKind::EndpointSlice => {
                ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices")
            }
            WatchedKind::KmeshConfig => ("kmesh.net", "v1alpha1", "KmeshConfig", "kmeshconfigs"),
            WatchedKind::VirtualService => (
                "networking.istio.io",
                "v1",
                "VirtualService",
                "virtualservices",
            ),
            WatchedKind::DestinationRule => (
                "networking.istio.io",
                "v1",
                "DestinationRule",
                "destinationrules",
            ),
            WatchedKind::ServiceEntry => (
                "networking.istio.io",
                "v1",
                "ServiceEntry",
                "serviceentries",
            ),
            WatchedKind::AuthorizationPolicy => (
                "security.istio.io",
                "v1",
                "AuthorizationPolicy",
                "authorizationpolicies",
            ),
            WatchedKind::PeerAuthentication => (
                "security.istio.io",
                "v1",
                "PeerAuthentication",
                "peerauthentications",
            ),
            WatchedKind::HttpRoute => {
                ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes")
            }
            WatchedKind::TcpRoute => (
                "gateway.networking.k8s.io",
                "v1alpha2",
                "TCPRoute",
                "tcproutes",
            ),
            // v1beta1: served by every Gateway API release that has ReferenceGrant.
            WatchedKind::ReferenceGrant => (
                "gateway.networking.k8s.io",
                "v1beta1",
                "ReferenceGrant",
                "referencegrants",
            ),
        }
    }

    /// The API group; empty for the core group.
    pub fn group(self) -> &'static str {
        self.gvkp().0
    }

    /// The API version watched.
    pub fn version(self) -> &'static str {
        self.gvkp().1
    }

    /// The kind, as in an object's `kind` field.
    pub fn kind(self) -> &'static str {
        self.gvkp().2
    }

    /// The resource name in URLs.
    pub fn plural(self) -> &'static str {
        self.gvkp().3
    }

    /// `group/version`, or `version` for the core group.
    pub fn api_version(self) -> String {
        match self.group() {
            "" => self.version().to_string(),
            group => format!("{group}/{}", self.version()),
        }
    }

    /// Whether the kind comes from a CRD, and so may be absent from a cluster.
    pub fn is_custom(self) -> bool {
        !matches!(self.group(), "" | "discovery.k8s.io")
    }

    /// The [`ApiResource`] for a dynamic API over this kind.
    pub fn api_resource(self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group(), self.version(), self.kind()),
            self.plural(),
        )
    }

    /// The watched kind with this `kind` name.
    pub fn from_kind(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.kind() == kind)
    }
}

impl fmt::Display for WatchedKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind(), self.api_version())
    }
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

/// The state of every watched kind, shared between the watch tasks and the main loop.
#[derive(Clone, Debug)]
pub struct SourceHealth(Arc<Mutex<BTreeMap<WatchedKind, KindState>>>);

impl Default for SourceHealth {
    fn default() -> Self {
        SourceHealth(Arc::new(Mutex::new(
            WatchedKind::ALL
                .into_iter()
                .map(|k| (k, KindState::Starting))
                .collect(),
        )))
    }
}

impl SourceHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<WatchedKind, KindState>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state of one kind.
    pub fn get(&self, kind: WatchedKind) -> KindState {
        self.lock()
            .get(&kind)
            .cloned()
            .unwrap_or(KindState::Starting)
    }

    /// The state of every kind.
    pub fn all(&self) -> BTreeMap<WatchedKind, KindState> {
        self.lock().clone()
    }

    /// Kinds the API server does not serve, in [`WatchedKind`] order.
    pub fn not_installed(&self) -> Vec<WatchedKind> {
        self.lock()
            .iter()
            .filter(|(_, s)| **s == KindState::NotInstalled)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Whether every kind has either been listed or found not installed: the stores then hold
    /// the whole cluster, and a compile does not see a partial picture.
    pub fn settled(&self) -> bool {
        self.lock()
            .values()
            .all(|s| matches!(s, KindState::Synced | KindState::NotInstalled))
    }

    /// Sets a kind's state; returns the previous one.
    fn set(&self, kind: WatchedKind, state: KindState) -> KindState {
        self.lock()
            .insert(kind, state)
            .unwrap_or(KindState::Starting)
    }
}

/// Read handles on every store.
#[derive(Clone)]
pub struct Stores {
    pub namespaces: Store<Namespace>,
    pub nodes: Store<Node>,
    pub pods: Store<Pod>,
    pub services: Store<Service>,
    pub endpoint_slices: Store<EndpointSlice>,
    pub configs: Store<KmeshConfig>,
    /// One store per [`WatchedKind::DYNAMIC`] kind.
    pub dynamic: BTreeMap<WatchedKind, Store<DynamicObject>>,
}

/// Write handles on every store: fed by the watch tasks (or directly, in tests).
pub struct Writers {
    pub namespaces: Writer<Namespace>,
    pub nodes: Writer<Node>,
    pub pods: Writer<Pod>,
    pub services: Writer<Service>,
    pub endpoint_slices: Writer<EndpointSlice>,
    pub configs: Writer<KmeshConfig>,
    pub dynamic: BTreeMap<WatchedKind, Writer<DynamicObject>>,
}

/// What the compiler gets from one look at the stores.
#[derive(Clone, Debug, Default)]
pub struct SourceSnapshot {
    pub inputs: Inputs,
    /// Objects that could not be read (a dynamic object that does not match the compiler's
    /// schema); they are left out of `inputs` and belong in the status as rejected.
    pub diagnostics: Vec<Diagnostic>,
    /// Kinds the API server does not serve, so not watched; not an error, worth a note.
    pub not_installed: Vec<WatchedKind>,
}

impl SourceSnapshot {
    /// [`Self::not_installed`] as shown to the user, for
    /// [`ReconcileInput::not_installed`](crate::reconcile::ReconcileInput::not_installed).
    pub fn not_installed_names(&self) -> Vec<String> {
        self.not_installed.iter().map(ToString::to_string).collect()
    }
}

impl Stores {
    /// Empty stores and their writers.
    pub fn new() -> (Stores, Writers) {
        fn pair<K>(dyntype: K::DynamicType) -> (Store<K>, Writer<K>)
        where
            K: Lookup + Clone + 'static,
            K::DynamicType: Eq + Hash + Clone,
        {
            let writer = Writer::new(dyntype);
            (writer.as_reader(), writer)
        }
        let (namespaces, w_namespaces) = pair(());
        let (nodes, w_nodes) = pair(());
        let (pods, w_pods) = pair(());
        let (services, w_services) = pair(());
        let (endpoint_slices, w_endpoint_slices) = pair(());
        let (configs, w_configs) = pair(());
        let mut dynamic = BTreeMap::new();
        let mut w_dynamic = BTreeMap::new();
        for kind in WatchedKind::DYNAMIC {
            let (store, writer) = pair::<DynamicObject>(kind.api_resource());
            dynamic.insert(kind, store);
            w_dynamic.insert(kind, writer);
        }
        (
            Stores {
                namespaces,
                nodes,
                pods,
                services,
                endpoint_slices,
                configs,
                dynamic,
            },
            Writers {
                namespaces: w_namespaces,
                nodes: w_nodes,
                pods: w_pods,
                services: w_services,
                endpoint_slices: w_endpoint_slices,
                configs: w_configs,
                dynamic: w_dynamic,
            },
        )
    }

    /// Copies every store into the compiler's [`Inputs`]. Pure: reads the stores, nothing else.
    /// Dynamic objects go through [`Inputs::add_json`]; those that do not match their schema are
    /// returned as diagnostics. Only the `KmeshConfig` named `default` is used.
    pub fn inputs(&self) -> (Inputs, Vec<Diagnostic>) {
        fn all<K: Lookup + Clone + 'static>(store: &Store<K>) -> Vec<K>
        where
            K::DynamicType: Eq + Hash + Clone,
        {
            store.state().iter().map(|o| (**o).clone()).collect()
        }
        let mut inputs = Inputs {
            namespaces: all(&self.namespaces),
            nodes: all(&self.nodes),
            pods: all(&self.pods),
            services: all(&self.services),
            endpoint_slices: all(&self.endpoint_slices),
            config: self
                .configs
                .state()
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(SINGLETON_NAME))
                .map(|c| (**c).clone()),
            ..Inputs::default()
        };
        let mut diagnostics = Vec::new();
        for (kind, store) in &self.dynamic {
            let mut objects = store.state();
            // Sorted, so that diagnostics come out in the same order every time.
            objects.sort_by(|a, b| {
                (a.metadata.namespace.as_deref(), a.metadata.name.as_deref())
                    .cmp(&(b.metadata.namespace.as_deref(), b.metadata.name.as_deref()))
            });
            for object in objects {
                let value = dynamic_to_json(*kind, &object);
                if let Some(d) = inputs.add_json(value, "kube") {
                    diagnostics.push(d);
                }
            }
        }
        (inputs, diagnostics)
    }

    /// The uid of a stored object, for Events that should show up in `kubectl describe`.
    pub fn uid_of(&self, object: &ObjectRef) -> Option<String> {
        fn find<K: Resource + Clone + 'static>(
            store: &Store<K>,
            object: &ObjectRef,
        ) -> Option<String>
        where
            K::DynamicType: Eq + Hash + Clone,
        {
            store
                .find(|o| {
                    o.meta().name.as_deref() == Some(object.name.as_str())
                        && o.meta().namespace == object.namespace
                })
                .and_then(|o| o.meta().uid.clone())
        }
        match WatchedKind::from_kind(&object.kind)? {
            WatchedKind::Namespace => find(&self.namespaces, object),
            WatchedKind::Node => find(&self.nodes, object),
            WatchedKind::Pod => find(&self.pods, object),
            WatchedKind::Service => find(&self.services, object),
            WatchedKind::EndpointSlice => find(&self.endpoint_slices, object),
            WatchedKind::KmeshConfig => find(&self.configs, object),
            kind => find(self.dynamic.get(&kind)?, object),
        }
    }
}

/// A dynamic object as the JSON the compiler's reader expects, `apiVersion` and `kind` taken
/// from the store's kind (list responses may leave them out of the items).
fn dynamic_to_json(kind: WatchedKind, object: &DynamicObject) -> serde_json::Value {
    let mut value = serde_json::to_value(object).unwrap_or(serde_json::Value::Null);
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), kind.api_version().into());
        map.insert("kind".into(), kind.kind().into());
    }
    value
}

/// Drops what the compiler never reads, before an object is stored.
fn slim<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// What a watch error means for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchErrorClass {
    /// The API server does not serve the resource (404 on list or watch).
    NotServed,
    /// Anything else: retried with backoff.
    Other(String),
}

/// Classifies a watcher error. A 404 is recognised by status code as well as by reason: for an
/// API path that does not exist, the apiserver answers with a plain-text "404 page not found".
pub fn classify_watch_error(error: &watcher::Error) -> WatchErrorClass {
    let status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(&**s),
        watcher::Error::WatchError(s) => Some(&**s),
        _ => None,
    };
    match status {
        Some(s) if s.code == 404 || s.reason == "NotFound" => WatchErrorClass::NotServed,
        _ => WatchErrorClass::Other(error.to_string()),
    }
}

/// The per-kind half of a reflector: applies watcher items to the store and the health, and
/// says which of them may change the compiler's inputs. Synchronous, so it is unit-tested
/// without an API server.
struct KindWatch<K: Lookup + Clone + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    kind: WatchedKind,
    writer: Writer<K>,
    health: SourceHealth,
    /// For the KmeshConfig: the generation last seen, so that our own status writes do not
    /// trigger a compile.
    last_generation: Option<Option<i64>>,
}

impl<K> KindWatch<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    fn new(kind: WatchedKind, writer: Writer<K>, health: SourceHealth) -> Self {
        KindWatch {
            kind,
            writer,
            health,
            last_generation: None,
        }
    }

    /// Applies one watcher item; returns whether the inputs (or the health) may have changed.
    fn handle(&mut self, item: Result<watcher::Event<K>, watcher::Error>) -> bool {
        let event = match item {
            Ok(event) => event.modify(slim),
            Err(error) => return self.failed(&error),
        };
        self.writer.apply_watcher_event(&event);
        match &event {
            watcher::Event::Init | watcher::Event::InitApply(_) => false,
            watcher::Event::InitDone => {
                match self.health.set(self.kind, KindState::Synced) {
                    KindState::NotInstalled => info!(kind = %self.kind, "now served; watching it"),
                    KindState::Failing(_) => info!(kind = %self.kind, "watch recovered"),
                    KindState::Starting => debug!(kind = %self.kind, "listed"),
                    KindState::Synced => {}
                }
                self.last_generation = None;
                true
            }
            watcher::Event::Apply(object) => {
                if self.kind != WatchedKind::KmeshConfig {
                    return true;
                }
                // Only the spec feeds the compiler; a status-only update (our own status write)
                // leaves metadata.generation as it was.
                let generation = object.meta().generation;
                let changed = self.last_generation != Some(generation);
                self.last_generation = Some(generation);
                changed
            }
            watcher::Event::Delete(_) => {
                self.last_generation = None;
                true
            }
        }
    }

    fn failed(&mut self, error: &watcher::Error) -> bool {
        match classify_watch_error(error) {
            WatchErrorClass::NotServed if self.kind.is_custom() => {
                let previous = self.health.set(self.kind, KindState::NotInstalled);
                if previous == KindState::NotInstalled {
                    debug!(kind = %self.kind, "still not served");
                    return false;
                }
                warn!(
                    kind = %self.kind,
                    "not served by the API server (CRD or this version not installed); \
                     running without it and retrying in the background"
                );
                // Whatever was listed before the CRD went away is gone with it.
                self.writer.apply_watcher_event(&watcher::Event::Init);
                self.writer.apply_watcher_event(&watcher::Event::InitDone);
                true
            }
            class => {
                let message = match class {
                    WatchErrorClass::Other(m) => m,
                    WatchErrorClass::NotServed => error.to_string(),
                };
                match self
                    .health
                    .set(self.kind, KindState::Failing(message.clone()))
                {
                    KindState::Failing(_) => {
                        debug!(kind = %self.kind, error = %message, "watch still failing")
                    }
                    _ => warn!(kind = %self.kind, error = %message, "watch failed; retrying"),
                }
                // The store keeps its contents: nothing to recompile.
                false
            }
        }
    }
}

/// The cluster, as the operator sees it: stores kept current by background watch tasks.
pub struct KubeSource {
    stores: Stores,
    health: SourceHealth,
    signal: Arc<watch::Sender<u64>>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts one watch task per [`WatchedKind`]. Must be called within a Tokio runtime. The
    /// tasks run until the `KubeSource` is dropped.
    pub fn start(client: Client) -> KubeSource {
        let (stores, writers) = Stores::new();
        let health = SourceHealth::default();
        let signal = Arc::new(watch::channel(0u64).0);
        let config = watcher::Config::default();
        let watch = |kind: WatchedKind| (kind, health.clone(), signal.clone());
        let named = config
            .clone()
            .fields(&format!("metadata.name={SINGLETON_NAME}"));
        let mut tasks = vec![
            spawn_watch(
                Api::<Namespace>::all(client.clone()),
                config.clone(),
                writers.namespaces,
                watch(WatchedKind::Namespace),
            ),
            spawn_watch(
                Api::<Node>::all(client.clone()),
                config.clone(),
                writers.nodes,
                watch(WatchedKind::Node),
            ),
            spawn_watch(
                Api::<Pod>::all(client.clone()),
                config.clone(),
                writers.pods,
                watch(WatchedKind::Pod),
            ),
            spawn_watch(
                Api::<Service>::all(client.clone()),
                config.clone(),
                writers.services,
                watch(WatchedKind::Service),
            ),
            spawn_watch(
                Api::<EndpointSlice>::all(client.clone()),
                config.clone(),
                writers.endpoint_slices,
                watch(WatchedKind::EndpointSlice),
            ),
            // Only the singleton is read.
            spawn_watch(
                Api::<KmeshConfig>::all(client.clone()),
                named,
                writers.configs,
                watch(WatchedKind::KmeshConfig),
            ),
        ];
        for (kind, writer) in writers.dynamic {
            let api = Api::<DynamicObject>::all_with(client.clone(), &kind.api_resource());
            tasks.push(spawn_watch(api, config.clone(), writer, watch(kind)));
        }
        KubeSource {
            stores,
            health,
            signal,
            tasks,
        }
    }

    /// The stores, for direct reads (uids for Events, say).
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// The state of every watched kind.
    pub fn health(&self) -> &SourceHealth {
        &self.health
    }

    /// A debounced change signal. Changes made before this call are not reported: subscribe
    /// before taking the first snapshot.
    pub fn changes(&self, config: DebounceConfig) -> Changes {
        Changes::new(self.signal.subscribe(), config)
    }

    /// Waits until every kind is listed or found not installed, or `timeout` passes; returns
    /// whether it settled. Kinds still failing by then (RBAC, say) keep being retried.
    pub async fn wait_settled(&self, timeout: Duration) -> bool {
        let mut rx = self.signal.subscribe();
        let wait = async {
            while !self.health.settled() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let settled = tokio::time::timeout(timeout, wait).await.is_ok();
        if !settled {
            for (kind, state) in self.health.all() {
                if !matches!(state, KindState::Synced | KindState::NotInstalled) {
                    warn!(%kind, ?state, "not listed yet; compiling without it");
                }
            }
        }
        settled
    }

    /// The compiler's inputs as of now.
    pub fn snapshot(&self) -> SourceSnapshot {
        let (inputs, diagnostics) = self.stores.inputs();
        SourceSnapshot {
            inputs,
            diagnostics,
            not_installed: self.health.not_installed(),
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Runs one kind's watcher forever (its errors are retried with the default backoff: 0.8 s
/// doubling to 30 s), feeding the store and raising the change signal.
/// Spawns the watch task of one kind.
fn spawn_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    (kind, health, signal): (WatchedKind, SourceHealth, Arc<watch::Sender<u64>>),
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    tokio::spawn(run_watch(
        api,
        config,
        KindWatch::new(kind, writer, health),
        signal,
    ))
}

async fn run_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    mut state: KindWatch<K>,
    signal: Arc<watch::Sender<u64>>,
) where
    K: Resource + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    debug!(kind = %state.kind, "watching");
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    while let Some(item) = stream.next().await {
        if state.handle(item) {
            signal.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// How long to wait for more changes before compiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DebounceConfig {
    /// Compile this long after the last change...
    pub quiet: Duration,
    /// ...but no later than this after the first change of a burst.
    pub max_delay: Duration,
}

impl Default for DebounceConfig {
    fn default() -> Self {
        DebounceConfig {
            quiet: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
        }
    }
}

/// Turns a stream of change instants into compile instants: due `quiet` after the last change,
/// or `max_delay` after the first change of the burst, whichever comes first. Pure: the caller
/// passes the time.
#[derive(Clone, Debug)]
pub struct Debouncer {
    config: DebounceConfig,
    /// First and last change of the pending burst.
    pending: Option<(Instant, Instant)>,
}

impl Debouncer {
    pub fn new(config: DebounceConfig) -> Self {
        Debouncer {
            config,
            pending: None,
        }
    }

    /// Records a change at `now`.
    pub fn record(&mut self, now: Instant) {
        self.pending = Some(match self.pending {
            Some((first, _)) => (first, now),
            None => (now, now),
        });
    }

    /// Whether a change is waiting to be acted on.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// When the pending burst is due; `None` when nothing is pending.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending
            .map(|(first, last)| (last + self.config.quiet).min(first + self.config.max_delay))
    }

    /// Whether the pending burst is due at `now`; if so, it is consumed.
    pub fn fire(&mut self, now: Instant) -> bool {
        match self.deadline() {
            Some(deadline) if deadline <= now => {
                self.pending = None;
                true
            }
            _ => false,
        }
    }
}

/// The debounced "something changed" signal the main loop waits on.
pub struct Changes {
    rx: watch::Receiver<u64>,
    debouncer: Debouncer,
    closed: bool,
}

impl Changes {
    /// Debounces the changes of a counter that is bumped on every change.
    pub fn new(rx: watch::Receiver<u64>, config: DebounceConfig) -> Self {
        Changes {
            rx,
            debouncer: Debouncer::new(config),
            closed: false,
        }
    }

    /// Waits for a change and for its burst to end (see [`Debouncer`]). Returns `false` once the
    /// source is gone and nothing is pending.
    pub async fn next(&mut self) -> bool {
        loop {
            let deadline = self.debouncer.deadline();
            tokio::select! {
                changed = self.rx.changed(), if !self.closed => match changed {
                    Ok(()) => self.debouncer.record(Instant::now()),
                    Err(_) => self.closed = true,
                },
                () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    if self.debouncer.fire(Instant::now()) {
                        return true;
                    }
                }
                else => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::core::Status;
    use serde_json::json;

    use super::*;

    fn meta(namespace: Option<&str>, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: namespace.map(Into::into),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        }
    }

    /// A dynamic object as a list response's item: no apiVersion/kind.
    fn dynamic(namespace: &str, name: &str, spec: serde_json::Value) -> DynamicObject {
        DynamicObject {
            types: None,
            metadata: meta(Some(namespace), name),
            data: json!({ "spec": spec }),
        }
    }

    fn not_found() -> watcher::Error {
        // What the apiserver answers for the path of a CRD that is not installed.
        watcher::Error::InitialListFailed(kube::Error::Api(
            Status::failure("404 page not found", "Failed to parse error data")
                .with_code(404)
                .boxed(),
        ))
    }

    #[test]
    fn stores_become_inputs() {
        let (stores, mut writers) = Stores::new();
        writers
            .namespaces
            .apply_watcher_event(&watcher::Event::Apply(Namespace {
                metadata: meta(None, "bookinfo"),
                ..Default::default()
            }));
        writers
            .pods
            .apply_watcher_event(&watcher::Event::Apply(Pod {
                metadata: meta(Some("bookinfo"), "reviews-1"),
                ..Default::default()
            }));
        writers
            .services
            .apply_watcher_event(&watcher::Event::Apply(Service {
                metadata: meta(Some("bookinfo"), "reviews"),
                ..Default::default()
            }));
        for name in ["other", SINGLETON_NAME] {
            writers
                .configs
                .apply_watcher_event(&watcher::Event::Apply(KmeshConfig {
                    metadata: meta(None, name),
                    spec: Default::default(),
                    status: None,
                }));
        }
        let vs = WatchedKind::VirtualService;
        let w = writers.dynamic.get_mut(&vs).unwrap();
        w.apply_watcher_event(&watcher::Event::Apply(dynamic("bookinfo",
            "reviews",
            json!({"hosts": ["reviews"], "tcp": [{"route": [{"destination": {"host": "reviews"}}]}]}),
        )));
        // Does not match the schema: hosts is a list.
        w.apply_watcher_event(&watcher::Event::Apply(dynamic(
            "bookinfo",
            "broken",
            json!({"hosts": "reviews"}),
        )));
        let ap = WatchedKind::AuthorizationPolicy;
        writers
            .dynamic
            .get_mut(&ap)
            .unwrap()
            .apply_watcher_event(&watcher::Event::Apply(dynamic(
                "bookinfo",
                "deny",
                json!({}),
            )));
        let tcp = WatchedKind::TcpRoute;
        writers
            .dynamic
            .get_mut(&tcp)
            .unwrap()
            .apply_watcher_event(&watcher::Event::Apply(dynamic("bookinfo", "r", json!({}))));

        let rg = WatchedKind::ReferenceGrant;
        writers
            .dynamic
            .get_mut(&rg)
            .unwrap()
            .apply_watcher_event(&watcher::Event::Apply(dynamic("bookinfo", "g", json!({}))));

        let (inputs, diagnostics) = stores.inputs();
        assert_eq!(inputs.tcp_routes.len(), 1);
        assert_eq!(inputs.reference_grants.len(), 1);
        assert_eq!(inputs.namespaces.len(), 1);
        assert_eq!(inputs.pods.len(), 1);
        assert_eq!(inputs.services.len(), 1);
        assert_eq!(
            inputs
                .config
                .as_ref()
                .and_then(|c| c.metadata.name.as_deref()),
            Some(SINGLETON_NAME)
        );
        assert_eq!(inputs.virtual_services.len(), 1);
        assert_eq!(inputs.virtual_services[0].name(), "reviews");
        assert_eq!(inputs.virtual_services[0].namespace(), "bookinfo");
        assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
        assert_eq!(
            diagnostics[0].object,
            ObjectRef::new("VirtualService", Some("bookinfo"), "broken")
        );
        // Kinds not compiled yet are reported by the compiler, not dropped.
        let kinds: Vec<&str> = inputs
            .not_yet_supported
            .iter()
            .map(|o| o.kind.as_str())
            .collect();
        assert!(kinds.contains(&"AuthorizationPolicy"), "{kinds:?}");

        assert_eq!(
            stores.uid_of(&ObjectRef::new(
                "VirtualService",
                Some("bookinfo"),
                "reviews"
            )),
            Some("uid-reviews".into())
        );
        assert_eq!(
            stores.uid_of(&ObjectRef::new("Pod", Some("bookinfo"), "reviews-1")),
            Some("uid-reviews-1".into())
        );
        assert_eq!(
            stores.uid_of(&ObjectRef::new("Pod", Some("x"), "reviews-1")),
            None
        );
        assert_eq!(
            stores.uid_of(&ObjectRef::new("Document", None, "f#0")),
            None
        );
    }

    #[test]
    fn missing_crd_is_noted_once_and_emptied() {
        let (stores, mut writers) = Stores::new();
        let health = SourceHealth::default();
        let kind = WatchedKind::PeerAuthentication;
        let writer = writers.dynamic.remove(&kind).unwrap();
        let mut watch = KindWatch::new(kind, writer, health.clone());
        assert!(!watch.handle(Ok(watcher::Event::Init)));
        assert!(!watch.handle(Ok(watcher::Event::InitApply(dynamic("a", "p", json!({}))))));
        assert!(watch.handle(Ok(watcher::Event::InitDone)));
        assert_eq!(health.get(kind), KindState::Synced);
        assert_eq!(stores.dynamic[&kind].len(), 1);

        // The CRD goes away: the kind is noted, its objects dropped, and it signals once.
        assert!(watch.handle(Err(not_found())));
        assert_eq!(health.get(kind), KindState::NotInstalled);
        assert_eq!(health.not_installed(), vec![kind]);
        assert_eq!(stores.dynamic[&kind].len(), 0);
        assert!(!watch.handle(Err(not_found())), "retries stay quiet");

        // Installed again.
        assert!(!watch.handle(Ok(watcher::Event::Init)));
        assert!(watch.handle(Ok(watcher::Event::InitDone)));
        assert_eq!(health.get(kind), KindState::Synced);
        assert!(health.not_installed().is_empty());
    }

    #[test]
    fn other_errors_keep_the_store() {
        let (stores, writers) = Stores::new();
        let health = SourceHealth::default();
        let mut watch = KindWatch::new(WatchedKind::Pod, writers.pods, health.clone());
        watch.handle(Ok(watcher::Event::Apply(Pod {
            metadata: meta(Some("a"), "p"),
            ..Default::default()
        })));
        let forbidden = watcher::Error::InitialListFailed(kube::Error::Api(
            Status::failure("pods is forbidden", "Forbidden")
                .with_code(403)
                .boxed(),
        ));
        assert!(!watch.handle(Err(forbidden)));
        assert!(
            matches!(health.get(WatchedKind::Pod), KindState::Failing(m) if m.contains("forbidden"))
        );
        assert_eq!(stores.pods.len(), 1);
        // A 404 on a built-in kind is not "not installed".
        assert!(!watch.handle(Err(not_found())));
        assert!(matches!(
            health.get(WatchedKind::Pod),
            KindState::Failing(_)
        ));
        assert!(!health.settled());
    }

    #[test]
    fn settled_when_every_kind_is_listed_or_absent() {
        let health = SourceHealth::default();
        assert!(!health.settled());
        for kind in WatchedKind::ALL {
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
    fn config_status_writes_do_not_signal() {
        let (_stores, writers) = Stores::new();
        let mut watch = KindWatch::new(
            WatchedKind::KmeshConfig,
            writers.configs,
            SourceHealth::default(),
        );
        let config = |generation| KmeshConfig {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..meta(None, SINGLETON_NAME)
            },
            spec: Default::default(),
            status: None,
        };
        assert!(watch.handle(Ok(watcher::Event::Apply(config(1)))));
        assert!(!watch.handle(Ok(watcher::Event::Apply(config(1)))));
        assert!(watch.handle(Ok(watcher::Event::Apply(config(2)))));
        assert!(watch.handle(Ok(watcher::Event::Delete(config(2)))));
        assert!(watch.handle(Ok(watcher::Event::Apply(config(2)))));
    }

    #[test]
    fn objects_are_slimmed() {
        let (stores, writers) = Stores::new();
        let mut watch = KindWatch::new(
            WatchedKind::Service,
            writers.services,
            SourceHealth::default(),
        );
        let mut m = meta(Some("a"), "s");
        m.annotations = Some(BTreeMap::from([
            (LAST_APPLIED.to_string(), "{...}".to_string()),
            ("keep".to_string(), "me".to_string()),
        ]));
        m.managed_fields = Some(vec![Default::default()]);
        watch.handle(Ok(watcher::Event::Apply(Service {
            metadata: m,
            ..Default::default()
        })));
        let stored = &stores.services.state()[0];
        assert!(stored.metadata.managed_fields.is_none());
        let annotations = stored.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations.len(), 1);
        assert_eq!(annotations["keep"], "me");
    }

    #[test]
    fn kinds() {
        assert_eq!(
            WatchedKind::TcpRoute.api_version(),
            "gateway.networking.k8s.io/v1alpha2"
        );
        assert_eq!(WatchedKind::Pod.api_version(), "v1");
        assert_eq!(
            WatchedKind::from_kind("HTTPRoute"),
            Some(WatchedKind::HttpRoute)
        );
        assert!(!WatchedKind::EndpointSlice.is_custom());
        assert!(WatchedKind::KmeshConfig.is_custom());
        let ar = WatchedKind::AuthorizationPolicy.api_resource();
        assert_eq!(ar.api_version, "security.istio.io/v1");
        assert_eq!(ar.plural, "authorizationpolicies");
        assert_eq!(
            WatchedKind::DestinationRule.to_string(),
            "DestinationRule (networking.istio.io/v1)"
        );
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn debouncer_waits_for_quiet() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(DebounceConfig {
            quiet: ms(200),
            max_delay: ms(2000),
        });
        assert_eq!(d.deadline(), None);
        assert!(!d.fire(t0 + ms(10_000)), "nothing pending");
        d.record(t0);
        assert_eq!(d.deadline(), Some(t0 + ms(200)));
        assert!(!d.fire(t0 + ms(199)));
        d.record(t0 + ms(150));
        assert_eq!(d.deadline(), Some(t0 + ms(350)));
        assert!(!d.fire(t0 + ms(300)));
        assert!(d.fire(t0 + ms(350)));
        assert!(!d.is_pending());
        assert!(!d.fire(t0 + ms(400)), "fires once per burst");
    }

    #[test]
    fn debouncer_caps_the_delay() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(DebounceConfig {
            quiet: ms(200),
            max_delay: ms(2000),
        });
        // A change every 100 ms never leaves 200 ms of quiet...
        let mut t = t0;
        let mut fired_at = None;
        while t < t0 + ms(5000) {
            if d.fire(t) {
                fired_at = Some(t);
                break;
            }
            d.record(t);
            t += ms(100);
        }
        // ...but the burst is compiled 2 s after its first change.
        assert_eq!(fired_at, Some(t0 + ms(2000)));
        // The next burst starts afresh.
        d.record(t0 + ms(2100));
        assert_eq!(d.deadline(), Some(t0 + ms(2300)));
    }

    #[tokio::test]
    async fn changes_coalesce_a_burst() {
        let (tx, rx) = watch::channel(0u64);
        let mut changes = Changes::new(
            rx,
            DebounceConfig {
                quiet: ms(50),
                max_delay: ms(1000),
            },
        );
        let producer = tokio::spawn(async move {
            for _ in 0..5 {
                tx.send_modify(|n| *n += 1);
                tokio::time::sleep(ms(10)).await;
            }
            tokio::time::sleep(ms(300)).await;
            tx.send_modify(|n| *n += 1);
            // tx dropped here: the source is gone.
        });
        let start = Instant::now();
        assert!(changes.next().await);
        let first = start.elapsed();
        assert!(first >= ms(90) && first < ms(300), "{first:?}");
        // The burst was one signal: the next one is the lone change 300 ms later.
        assert!(changes.next().await);
        assert!(start.elapsed() >= ms(340), "{:?}", start.elapsed());
        producer.await.unwrap();
        assert!(!changes.next().await, "closed, nothing pending");
    }
}
