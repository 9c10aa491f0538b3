//! The in-memory stores of the kube source, one per watched kind, and how each becomes the
//! compiler's [`Inputs`].
//!
//! [`StoredObject`] says, per Rust type, how objects are kept and read (as ztunnel's xDS client
//! has a `Handler<T>` per resource type): a k8s-openapi type for a built-in kind, the CRD type for
//! the `KmeshConfig`, [`DynamicObject`] for every Istio and Gateway API kind. Each kind's store
//! is then held type-erased ([`KindReader`], [`KindWriter`]) in maps keyed by [`Kind`], so the
//! stores, the writers, the watch start and the uid lookup are written once for all kinds.
//! `kind_store` is the one place that picks the Rust type of a kind; a kind it does not name is
//! kept as a `DynamicObject`, so a new CRD kind needs no edit here. A store belongs to a kind, not
//! to a version: when discovery moves a kind's watch to another version, the new list replaces
//! the store's contents, and each dynamic object carries the `apiVersion` it was read at.
//!
//! Dynamic objects go through [`Inputs::add_json`], the path `kmeshctl compile` takes for YAML,
//! so both sources dispatch and validate objects identically.
use std::{
    any::{Any, TypeId},
    collections::BTreeMap,
    fmt,
    hash::Hash,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Client, Resource,
    api::{DynamicObject, TypeMeta},
    runtime::{
        reflector::{Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::watch, task::JoinHandle};

use super::{
    discovery::Served,
    health::{SourceHealth, Watched},
    rediscover::Rediscover,
    watch::{KindWatch, spawn_watch},
};
use crate::{
    crd::{KmeshConfig, SINGLETON_NAME},
    diagnostics::{Diagnostic, ObjectRef},
    inputs::Inputs,
    kinds::Kind,
};

/// The annotation `kubectl apply` leaves on objects: a copy of the whole object, never read by
/// the compiler, dropped from the stores to save memory.
pub(super) const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// How the objects of one Rust type are watched, kept and read into the compiler's inputs.
pub trait StoredObject:
    Resource<DynamicType: Eq + Hash + Clone + Send + Sync>
    + Clone
    + DeserializeOwned
    + fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// The store's and the API's dynamic type: `()` for a typed object, the API resource (kind
    /// at the watched version) for a dynamic one.
    fn dynamic_type(watched: &Watched) -> Self::DynamicType;

    /// What to list and watch: every object, unless the kind reads fewer.
    fn watcher_config() -> watcher::Config {
        watcher::Config::default()
    }

    /// Readies an object read at `watched` for the store: drops what the compiler never reads.
    fn prepare(&mut self, _watched: &Watched) {
        slim(self);
    }

    /// Adds the stored objects of `watched` to `inputs`; those that cannot be read are returned
    /// as diagnostics and left out.
    fn add_to(
        watched: &Watched,
        objects: Vec<Arc<Self>>,
        inputs: &mut Inputs,
        diagnostics: &mut Vec<Diagnostic>,
    );
}

/// The store and writer of one watched kind, by the Rust type its objects are kept as; `None` for
/// a kind missing from the table.
pub(super) fn kind_store(kind: &Kind) -> Option<(Arc<dyn KindReader>, Box<dyn KindWriter>)> {
    // The store's own dynamic type (for a dynamic object, the kind at its preferred version) only
    // keys the store; the version watched is discovery's, and each object carries its own.
    let watched = Watched::preferred(kind)?;
    Some(match watched.kind {
        Kind::Namespace => typed_pair::<Namespace>(watched),
        Kind::Node => typed_pair::<Node>(watched),
        Kind::Pod => typed_pair::<Pod>(watched),
        Kind::Service => typed_pair::<Service>(watched),
        Kind::EndpointSlice => typed_pair::<EndpointSlice>(watched),
        Kind::KmeshConfig => typed_pair::<KmeshConfig>(watched),
        _ => typed_pair::<DynamicObject>(watched),
    })
}

fn typed_pair<K: StoredObject>(watched: Watched) -> (Arc<dyn KindReader>, Box<dyn KindWriter>) {
    let writer = Writer::<K>::new(K::dynamic_type(&watched));
    let store = writer.as_reader();
    let reader = KindStore {
        watched: watched.clone(),
        store,
    };
    let kind = watched.kind;
    (Arc::new(reader), Box::new(KindWriterOf { kind, writer }))
}

fn owned<K: Clone>(objects: Vec<Arc<K>>) -> impl Iterator<Item = K> {
    objects.into_iter().map(|o| (*o).clone())
}

impl StoredObject for Namespace {
    fn dynamic_type(_: &Watched) {}
    fn add_to(_: &Watched, objects: Vec<Arc<Self>>, inputs: &mut Inputs, _: &mut Vec<Diagnostic>) {
        inputs.namespaces.extend(owned(objects));
    }
}

impl StoredObject for Node {
    fn dynamic_type(_: &Watched) {}
    fn add_to(_: &Watched, objects: Vec<Arc<Self>>, inputs: &mut Inputs, _: &mut Vec<Diagnostic>) {
        inputs.nodes.extend(owned(objects));
    }
}

impl StoredObject for Pod {
    fn dynamic_type(_: &Watched) {}
    fn add_to(_: &Watched, objects: Vec<Arc<Self>>, inputs: &mut Inputs, _: &mut Vec<Diagnostic>) {
        inputs.pods.extend(owned(objects));
    }
}

impl StoredObject for Service {
    fn dynamic_type(_: &Watched) {}
    fn add_to(_: &Watched, objects: Vec<Arc<Self>>, inputs: &mut Inputs, _: &mut Vec<Diagnostic>) {
        inputs.services.extend(owned(objects));
    }
}

impl StoredObject for EndpointSlice {
    fn dynamic_type(_: &Watched) {}
    fn add_to(_: &Watched, objects: Vec<Arc<Self>>, inputs: &mut Inputs, _: &mut Vec<Diagnostic>) {
        inputs.endpoint_slices.extend(owned(objects));
    }
}

/// Only the singleton is read.
impl StoredObject for KmeshConfig {
    fn dynamic_type(_: &Watched) {}
    fn watcher_config() -> watcher::Config {
        watcher::Config::default().fields(&format!("metadata.name={SINGLETON_NAME}"))
    }
    fn add_to(_: &Watched, objects: Vec<Arc<Self>>, inputs: &mut Inputs, _: &mut Vec<Diagnostic>) {
        let singleton = owned(objects).find(|c| c.metadata.name.as_deref() == Some(SINGLETON_NAME));
        inputs.config = singleton;
    }
}

/// Istio and Gateway API kinds: read through [`Inputs::add_json`], as YAML is.
impl StoredObject for DynamicObject {
    fn dynamic_type(watched: &Watched) -> kube::api::ApiResource {
        watched.api_resource()
    }
    /// Also records the version it was read at: list responses leave `apiVersion` and `kind`
    /// out of their items.
    fn prepare(&mut self, watched: &Watched) {
        slim(self);
        self.types = Some(TypeMeta {
            api_version: watched.api_version(),
            kind: watched.kind.name().to_string(),
        });
    }
    fn add_to(
        watched: &Watched,
        mut objects: Vec<Arc<Self>>,
        inputs: &mut Inputs,
        diagnostics: &mut Vec<Diagnostic>,
    ) {
        // Sorted, so that diagnostics come out in the same order every time.
        objects.sort_by(|a, b| {
            (a.metadata.namespace.as_deref(), a.metadata.name.as_deref())
                .cmp(&(b.metadata.namespace.as_deref(), b.metadata.name.as_deref()))
        });
        for object in objects {
            let value = dynamic_to_json(watched, &object);
            diagnostics.extend(inputs.add_json(value, "kube"));
        }
    }
}

/// A dynamic object as the JSON the compiler's reader expects: `apiVersion` the one it was read
/// at ([`StoredObject::prepare`]), else the kind's preferred one; `kind` the store's.
fn dynamic_to_json(watched: &Watched, object: &DynamicObject) -> serde_json::Value {
    let mut value = serde_json::to_value(object).unwrap_or(serde_json::Value::Null);
    let types = object.types.as_ref();
    let api_version = types.map_or_else(|| watched.api_version(), |t| t.api_version.clone());
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), api_version.into());
        map.insert("kind".into(), watched.kind.name().into());
    }
    value
}

/// Drops what the compiler never reads, before an object is stored.
pub(super) fn slim<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// The read side of one kind's store, whatever the Rust type of its objects.
pub trait KindReader: Send + Sync {
    /// Adds the kind's objects to `inputs` (see [`StoredObject::add_to`]).
    fn add_to(&self, inputs: &mut Inputs, diagnostics: &mut Vec<Diagnostic>);
    /// The uid of the stored object `object` names, if it is stored.
    fn uid_of(&self, object: &ObjectRef) -> Option<String>;
    /// How many objects are stored.
    fn count(&self) -> usize;
    /// For tests, which reach the typed store.
    fn as_any(&self) -> &dyn Any;
}

/// What a kind's watch task is started with, besides its writer.
pub struct WatchContext {
    pub(super) client: Client,
    pub(super) health: SourceHealth,
    pub(super) signal: Arc<watch::Sender<u64>>,
    pub(super) rediscover: Rediscover,
}

/// The write side of one kind's store, until its watch task takes it.
pub trait KindWriter: Send {
    /// Starts the kind's watch task against the API server, following `served`.
    fn spawn(
        self: Box<Self>,
        context: &WatchContext,
        served: watch::Receiver<Served>,
    ) -> JoinHandle<()>;
    /// The Rust type its objects are kept as.
    fn object_type(&self) -> TypeId;
    /// For tests, which feed the typed writer directly: a `Writer<K>`.
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

struct KindStore<K: StoredObject> {
    watched: Watched,
    store: Store<K>,
}

impl<K: StoredObject> KindReader for KindStore<K> {
    fn add_to(&self, inputs: &mut Inputs, diagnostics: &mut Vec<Diagnostic>) {
        K::add_to(&self.watched, self.store.state(), inputs, diagnostics);
    }

    fn uid_of(&self, object: &ObjectRef) -> Option<String> {
        let named = |o: &K| {
            o.meta().name.as_deref() == Some(object.name.as_str())
                && o.meta().namespace == object.namespace
        };
        self.store.find(named).and_then(|o| o.meta().uid.clone())
    }

    fn count(&self) -> usize {
        self.store.len()
    }

    fn as_any(&self) -> &dyn Any {
        &self.store
    }
}

struct KindWriterOf<K: StoredObject> {
    kind: Kind,
    writer: Writer<K>,
}

impl<K: StoredObject> KindWriter for KindWriterOf<K> {
    fn spawn(
        self: Box<Self>,
        context: &WatchContext,
        served: watch::Receiver<Served>,
    ) -> JoinHandle<()> {
        let state = KindWatch::new(self.kind, self.writer, context.health.clone());
        let client = context.client.clone();
        let signal = context.signal.clone();
        spawn_watch(client, state, served, signal, context.rediscover.clone())
    }

    fn object_type(&self) -> TypeId {
        TypeId::of::<K>()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        Box::new(self.writer)
    }
}

/// Read handles on every store, by kind.
#[derive(Clone)]
pub struct Stores(BTreeMap<Kind, Arc<dyn KindReader>>);

/// Write handles on every store, by kind: taken by the watch tasks (or fed directly, in tests).
pub struct Writers(BTreeMap<Kind, Box<dyn KindWriter>>);

impl Stores {
    /// Empty stores for every kind of `kinds` (see [`watched_kinds`](super::watched_kinds)) that
    /// the table describes, and their writers.
    pub fn new(kinds: &[Kind]) -> (Stores, Writers) {
        let mut stores = BTreeMap::new();
        let mut writers = BTreeMap::new();
        for kind in kinds {
            let Some((reader, writer)) = kind_store(kind) else {
                continue;
            };
            stores.insert(kind.clone(), reader);
            writers.insert(kind.clone(), writer);
        }
        (Stores(stores), Writers(writers))
    }

    /// Copies every store into the compiler's [`Inputs`]. Pure: reads the stores, nothing else.
    /// Objects that do not match the compiler's schema are returned as diagnostics. Only the
    /// `KmeshConfig` named `default` is used.
    pub fn inputs(&self) -> (Inputs, Vec<Diagnostic>) {
        let mut inputs = Inputs::default();
        let mut diagnostics = Vec::new();
        for reader in self.0.values() {
            reader.add_to(&mut inputs, &mut diagnostics);
        }
        (inputs, diagnostics)
    }

    /// The uid of a stored object, for Events that should show up in `kubectl describe`.
    pub fn uid_of(&self, object: &ObjectRef) -> Option<String> {
        self.0.get(&object.kind)?.uid_of(object)
    }

    /// How many objects of `kind` are stored; 0 for a kind not watched.
    pub fn count(&self, kind: &Kind) -> usize {
        self.0.get(kind).map_or(0, |r| r.count())
    }

    /// The typed store of `kind`, if its objects are kept as `K`.
    pub fn typed<K: StoredObject>(&self, kind: &Kind) -> Option<&Store<K>> {
        self.0.get(kind)?.as_any().downcast_ref()
    }
}

impl Writers {
    /// Takes the typed writer of `kind`, if its objects are kept as `K`; it is then no longer
    /// among these writers.
    pub fn take<K: StoredObject>(&mut self, kind: &Kind) -> Option<Writer<K>> {
        if self.0.get(kind)?.object_type() != TypeId::of::<K>() {
            return None;
        }
        let writer = self.0.remove(kind)?;
        writer.into_any().downcast().ok().map(|w| *w)
    }

    /// Starts a watch task for every writer whose kind has a channel in `served`.
    pub(super) fn spawn_all(
        self,
        context: &WatchContext,
        mut served: BTreeMap<Kind, watch::Receiver<Served>>,
    ) -> Vec<JoinHandle<()>> {
        let writers = self.0.into_iter();
        let spawned = writers.filter_map(|(kind, writer)| {
            let served = served.remove(&kind)?;
            Some(writer.spawn(context, served))
        });
        spawned.collect()
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher::Event;
    use serde_json::json;

    use super::{super::fixtures::*, *};
    use crate::kube_source::watched_kinds;

    fn apply<K: StoredObject>(writers: &mut Writers, kind: Kind, objects: Vec<K>) {
        let mut writer = writers.take::<K>(&kind).expect("a writer of this type");
        for object in objects {
            writer.apply_watcher_event(&Event::Apply(object));
        }
    }

    fn config(name: &str) -> KmeshConfig {
        KmeshConfig {
            metadata: meta(None, name),
            spec: Default::default(),
            status: None,
        }
    }

    /// Stores holding a few objects of typed and dynamic kinds, one of which does not match its
    /// schema.
    fn filled() -> Stores {
        let (stores, mut writers) = Stores::new(&watched_kinds());
        let namespace = Namespace {
            metadata: meta(None, "bookinfo"),
            ..Default::default()
        };
        apply(&mut writers, Kind::Namespace, vec![namespace]);
        let pod = Pod {
            metadata: meta(Some("bookinfo"), "reviews-1"),
            ..Default::default()
        };
        apply(&mut writers, Kind::Pod, vec![pod]);
        let service = Service {
            metadata: meta(Some("bookinfo"), "reviews"),
            ..Default::default()
        };
        apply(&mut writers, Kind::Service, vec![service]);
        let configs = vec![config("other"), config(SINGLETON_NAME)];
        apply(&mut writers, Kind::KmeshConfig, configs);
        let route = json!({"hosts": ["reviews"], "tcp": [{"route": [{"destination": {"host": "reviews"}}]}]});
        let virtual_services = vec![
            dynamic("bookinfo", "reviews", route),
            // Does not match the schema: hosts is a list.
            dynamic("bookinfo", "broken", json!({"hosts": "reviews"})),
        ];
        apply(&mut writers, Kind::VirtualService, virtual_services);
        let deny = dynamic("bookinfo", "deny", json!({}));
        apply(&mut writers, Kind::AuthorizationPolicy, vec![deny]);
        let tcp = dynamic("bookinfo", "r", json!({}));
        apply(&mut writers, Kind::TcpRoute, vec![tcp]);
        let grant = dynamic("bookinfo", "g", json!({}));
        apply(&mut writers, Kind::ReferenceGrant, vec![grant]);
        stores
    }

    #[test]
    fn stores_become_inputs() {
        let (inputs, diagnostics) = filled().inputs();
        assert_eq!(inputs.tcp_routes.len(), 1);
        assert_eq!(inputs.reference_grants.len(), 1);
        assert_eq!(inputs.namespaces.len(), 1);
        assert_eq!(inputs.pods.len(), 1);
        assert_eq!(inputs.services.len(), 1);
        let config = inputs.config.as_ref();
        let config_name = config.and_then(|c| c.metadata.name.as_deref());
        assert_eq!(config_name, Some(SINGLETON_NAME));
        assert_eq!(inputs.virtual_services.len(), 1);
        assert_eq!(inputs.virtual_services[0].name(), "reviews");
        assert_eq!(inputs.virtual_services[0].namespace(), "bookinfo");
        assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
        assert_eq!(
            diagnostics[0].object,
            ObjectRef::new(Kind::VirtualService, Some("bookinfo"), "broken")
        );
        // Security policies are read whatever their spec: an invalid one must still fail closed.
        assert_eq!(inputs.authorization_policies.len(), 1);
    }

    #[test]
    fn only_the_singleton_config_is_read() {
        let (stores, mut writers) = Stores::new(&watched_kinds());
        apply(&mut writers, Kind::KmeshConfig, vec![config("other")]);
        assert_eq!(stores.count(&Kind::KmeshConfig), 1);
        assert!(stores.inputs().0.config.is_none());
    }

    #[test]
    fn uids_are_found_by_kind_namespace_and_name() {
        let stores = filled();
        let uid = |kind, namespace, name| stores.uid_of(&ObjectRef::new(kind, namespace, name));
        assert_eq!(
            uid(Kind::VirtualService, Some("bookinfo"), "reviews"),
            Some("uid-reviews".into())
        );
        assert_eq!(
            uid(Kind::Pod, Some("bookinfo"), "reviews-1"),
            Some("uid-reviews-1".into())
        );
        assert_eq!(uid(Kind::Pod, Some("x"), "reviews-1"), None);
        assert_eq!(uid(Kind::Service, Some("bookinfo"), "reviews-1"), None);
        assert_eq!(uid(Kind::Document, None, "f#0"), None);
    }

    #[test]
    fn every_watched_kind_has_a_store_of_its_type() {
        let kinds = watched_kinds();
        let (stores, mut writers) = Stores::new(&kinds);
        assert!(stores.typed::<Pod>(&Kind::Pod).is_some());
        assert!(stores.typed::<DynamicObject>(&Kind::Pod).is_none());
        assert!(writers.take::<Pod>(&Kind::Service).is_none(), "wrong type");
        assert!(
            writers.take::<Service>(&Kind::Service).is_some(),
            "still there"
        );
        for kind in &kinds {
            assert_eq!(stores.count(kind), 0, "{kind}");
        }
        let dynamic = kinds.iter().filter(|kind| {
            let store = stores.typed::<DynamicObject>(kind);
            store.is_some()
        });
        assert_eq!(dynamic.count(), 9, "every Istio and Gateway API kind");
    }

    /// A typed store's Rust type fixes the version it is read at, so discovery must have no other
    /// to choose: its kind lists exactly one version.
    #[test]
    fn typed_kinds_have_one_version() {
        let kinds = watched_kinds();
        let (stores, _) = Stores::new(&kinds);
        for kind in &kinds {
            if stores.typed::<DynamicObject>(kind).is_none() {
                let versions = kind.info().unwrap().versions;
                assert_eq!(versions.len(), 1, "{kind} is typed: {versions:?}");
            }
        }
    }
}
