//! The compiler: Kubernetes and Istio objects in, one snapshot per node out. Pure: no I/O, no
//! clock, no randomness; the same inputs give byte-identical snapshots.
//!
//! Semantics follow `../shared/docs/istio-semantics.md`; each file opens with the part it decides.
//! One file per concern, each an `impl Compiler` block of its own (after istio/ztunnel's
//! `src/state/{workload,service,policy}.rs`):
//! - `duplicates.rs`: objects defined more than once (by files), resolved independently of order
//!   before anything else;
//! - `catalog.rs`: the mesh services (Services with a cluster IP, STATIC ServiceEntries) and their
//!   endpoints;
//! - `routes.rs`: one route per service port and address family (Gateway API mesh routes, else a
//!   mesh VirtualService, else the service itself) and the one place weighted destinations become
//!   a route;
//! - `virtual_service.rs`: VirtualService routes;
//! - `mesh_routes.rs`, `mesh_rules.rs`, `backend_refs.rs`: Gateway API mesh routes (GAMMA
//!   `HTTPRoute`, `TCPRoute`): attached to service ports, the rule the kernel follows, its
//!   backendRefs;
//! - `backend_sets.rs`: DestinationRule subsets and load balancer, the endpoints of each backend set;
//! - `workloads.rs`: enrolment, the workloads of each node;
//! - `tables.rs`: stable IDs, the cluster-wide tables and each node's snapshot;
//! - `name_tables.rs`: the names section (workload, app, version of every pod address; each
//!   service's host and name), Istio's telemetry labels;
//! - authorization (issue #8): `authz_convert.rs` (AuthorizationPolicy specs into their L4 form,
//!   what is dropped and why), `authz_rules.rs` (that form and when it matches, ztunnel's model),
//!   `peer_authentication.rs` (effective mTLS per workload and port), `authz_sources.rs`
//!   (identities, address blocks, source classes and the sources table), `authz_grid.rs` (a
//!   workload's verdict grid and its exact compression) and `authorization.rs` (binding,
//!   evaluation and each node's four tables).
//!
//! Unenforced L7 features are worded after the mode (one helper, `Compiler::l7_unenforced`,
//! reported through `Compiler::needs_l7`):
//! "not enforced in KernelNative", in DualEngine "enforced only by a waypoint" (for a service
//! bound to none: the routes of bound services are the waypoint's, `waypoint_bindings.rs`), and in
//! Disabled mode that the mesh is disabled.
//!
//! Nothing here panics on input: no `unwrap`, `expect` or indexing. What one object gets wrong is
//! a diagnostic on that object; the rest of the cluster still compiles, for every node.
mod authorization;
mod authz_convert;
mod authz_grid;
mod authz_rules;
mod authz_sources;
mod backend_refs;
mod backend_sets;
mod catalog;
mod duplicates;
// Called per waypoint-bound service by the waypoint bindings (issue #11, the next slice).
mod l7;
mod mesh_routes;
mod mesh_rules;
mod name_tables;
mod peer_authentication;
mod routes;
mod tables;
#[cfg(test)]
mod testing;
mod virtual_service;
mod waypoint_bindings;
mod waypoint_configs;
mod waypoint_policies;
mod workloads;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kmesh_snapshot::{
    ClusterTables, NodeTables, Snapshot,
    waypoint::{WaypointConfig, WaypointName},
};

use crate::{
    crd::Mode,
    diagnostics::{Diagnostic, ObjectRef},
    inputs::Inputs,
    kinds::Kind,
};

pub use authorization::{EffectiveAction, EffectivePolicy, WorkloadAuthz};
use backend_sets::DestinationRules;
pub use name_tables::names_bytes;
pub use waypoint_bindings::waypoint_port;
use workloads::PodsByLabel;
pub use workloads::{address_owners, pod_ips};

/// A hash map that is only looked up, never iterated: its order, random, cannot reach the output.
/// foldhash rather than std's SipHash: several times faster on the short strings of names and
/// labels, which a large cluster looks up hundreds of thousands of times per compile.
type LookupMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The set form of [`LookupMap`], under the same condition.
type LookupSet<T> = HashSet<T, foldhash::fast::RandomState>;

/// Settings that are not objects.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// Istio's root namespace: mesh-wide DestinationRules live here.
    pub root_namespace: String,
    /// The cluster's DNS domain, for expanding short host names.
    pub cluster_domain: String,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            root_namespace: "istio-system".to_string(),
            cluster_domain: "cluster.local".to_string(),
        }
    }
}

impl CompileOptions {
    /// Expands a short host name as Istio does: a name without dots lives in `namespace`.
    fn fqdn(&self, host: &str, namespace: &str) -> String {
        if host.contains('.') || host == "*" || host.parse::<IpAddr>().is_ok() {
            host.to_string()
        } else {
            self.service_fqdn(host, namespace)
        }
    }

    /// The host name of Kubernetes Service `namespace/name`.
    fn service_fqdn(&self, name: &str, namespace: &str) -> String {
        format!("{name}.{namespace}.svc.{}", self.cluster_domain)
    }
}

/// The compiler's result.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    /// The tables every node's snapshot shares, held once however many nodes there are.
    pub cluster: Arc<ClusterTables>,
    /// Each requested node's own tables (a node over capacity has none: it is reported and keeps
    /// its snapshot). A node's snapshot is these and [`cluster`](Self::cluster): see
    /// [`snapshot`](Self::snapshot).
    pub nodes: BTreeMap<String, NodeTables>,
    /// The generation the snapshots are stamped with.
    pub generation: u64,
    /// Sorted, de-duplicated.
    pub diagnostics: Vec<Diagnostic>,
    /// Human names of the IDs in the snapshots, for summaries and logs.
    pub names: Names,
    /// By node: each workload's effective authorization (only workloads with an entry in the
    /// node's authorization tables), for `kmeshctl`.
    pub authz: BTreeMap<String, Vec<WorkloadAuthz>>,
    /// Each waypoint's configuration (`waypoint_configs.rs`), by the waypoint's Gateway.
    pub waypoints: BTreeMap<WaypointName, WaypointConfig>,
}

impl Compiled {
    /// `node`'s whole snapshot: its own tables with a copy of the cluster's.
    pub fn snapshot(&self, node: &str) -> Option<Snapshot> {
        let own = self.nodes.get(node)?;
        Some(Snapshot::from_parts(
            own.clone(),
            (*self.cluster).clone(),
            self.generation,
        ))
    }

    /// Every node's whole snapshot. Each holds a copy of the cluster's tables: for tools and
    /// tests, not for a thousand nodes (the operator encodes the parts, see `publish`).
    pub fn snapshots(&self) -> BTreeMap<String, Snapshot> {
        self.nodes
            .keys()
            .filter_map(|node| Some((node.clone(), self.snapshot(node)?)))
            .collect()
    }
}

/// What the IDs in a snapshot stand for.
#[derive(Clone, Debug, Default)]
pub struct Names {
    pub services: BTreeMap<u32, String>,
    pub routes: BTreeMap<u32, String>,
    pub backend_sets: BTreeMap<u32, String>,
    pub identities: BTreeMap<u32, String>,
    /// AuthorizationPolicies and PeerAuthentications, as `Kind namespace/name`.
    pub policies: BTreeMap<u32, String>,
}

/// Compiles `inputs` into a snapshot for each of `nodes`, all stamped `generation`.
pub fn compile(
    inputs: &Inputs,
    nodes: &[String],
    generation: u64,
    options: &CompileOptions,
) -> Compiled {
    let (inputs, duplicates) = duplicates::distinct(inputs);
    let mut c = Compiler::new(&inputs, options);
    c.diagnostics.extend(duplicates);
    c.report_mode();
    let catalog = c.catalog();
    let waypoints = c.waypoint_bindings();
    c.report_client_namespace_destination_rules(&catalog);
    let routed = c.routes(&catalog, &waypoints);
    let sets = c.backend_sets(&routed);
    let identities = c.identity_ids(&catalog);
    let tables = c.tables(&routed, &sets, &identities);
    let service_ids: BTreeMap<&str, u32> = tables
        .names
        .services
        .iter()
        .map(|(id, host)| (host.as_str(), *id))
        .collect();
    let waypoint_configs = c.waypoint_configs(&catalog, &waypoints, &service_ids);
    let workloads = c.workloads(&identities);
    let authz_inputs = c.authz_inputs();
    let mut authz_tables = BTreeMap::new();
    let mut authz = BTreeMap::new();
    for node in nodes {
        let node_authz = c.node_authz(&authz_inputs, node);
        authz_tables.insert(node.clone(), node_authz.tables);
        if !node_authz.workloads.is_empty() {
            authz.insert(node.clone(), node_authz.workloads);
        }
    }
    let mut names = tables.names.clone();
    for (object, id) in authz_inputs.ids() {
        names.policies.insert(*id, object.to_string());
    }
    let name_tables = c.name_tables(&tables.service_names);
    let (cluster, node_tables) =
        c.snapshot_parts(tables, workloads, authz_tables, name_tables, nodes);
    c.report_kinds_not_compiled();
    let mut diagnostics = c.diagnostics;
    diagnostics.sort();
    diagnostics.dedup();
    Compiled {
        cluster: Arc::new(cluster),
        nodes: node_tables,
        generation,
        diagnostics,
        names,
        authz,
        waypoints: waypoint_configs,
    }
}

/// One compile's state: the inputs, the indexes built from them once, and what is reported.
struct Compiler<'a> {
    inputs: &'a Inputs,
    options: &'a CompileOptions,
    /// Healthy pods by (namespace, label key, label value): selector matching looks up the first
    /// selector label instead of scanning every pod for every service (which is quadratic).
    pods_by_label: PodsByLabel<'a>,
    /// The valid DestinationRules by namespace and host, indexed once per compile.
    destination_rules: DestinationRules<'a>,
    /// The node mode, for the wording of unenforced features.
    mode: Mode,
    diagnostics: Vec<Diagnostic>,
}

impl<'a> Compiler<'a> {
    fn new(inputs: &'a Inputs, options: &'a CompileOptions) -> Self {
        let mut c = Compiler {
            inputs,
            options,
            pods_by_label: workloads::pods_by_label(&inputs.pods),
            destination_rules: DestinationRules::default(),
            mode: inputs
                .config
                .as_ref()
                .map(|cfg| cfg.spec.mode)
                .unwrap_or_default(),
            diagnostics: Vec::new(),
        };
        c.destination_rules = c.index_destination_rules();
        c
    }

    /// `field` of `object` (or all of it) is left out of the snapshot.
    fn reject(&mut self, object: &ObjectRef, field: &str, reason: impl Into<String>) {
        self.diagnostics
            .push(Diagnostic::rejected(object.clone(), field, reason));
    }

    /// `field` of `object` compiles, but is not enforced.
    fn unenforced(&mut self, object: &ObjectRef, field: &str, reason: impl Into<String>) {
        self.diagnostics
            .push(Diagnostic::unenforced(object.clone(), field, reason));
    }

    /// Worth knowing about `field` of `object`; nothing is lost.
    fn note(&mut self, object: &ObjectRef, field: &str, reason: impl Into<String>) {
        self.diagnostics
            .push(Diagnostic::note(object.clone(), field, reason));
    }

    /// The one wording for a feature that needs L7 (an HTTP or TLS proxy), by mode. `feature`
    /// says what needs L7; `in_kernel`, what connections get instead (left out when the mesh is
    /// disabled, since then nothing is steered at all).
    fn l7_unenforced(&self, feature: &str, in_kernel: Option<&str>) -> String {
        match (self.mode, in_kernel) {
            (Mode::KernelNative, None) => format!("{feature}; not enforced in KernelNative"),
            (Mode::KernelNative, Some(k)) => {
                format!("{feature}; not enforced in KernelNative; {k}")
            }
            (Mode::DualEngine, None) => format!(
                "{feature}; enforced only by a waypoint, and the service is bound to none (label istio.io/use-waypoint)"
            ),
            (Mode::DualEngine, Some(k)) => format!(
                "{feature}; enforced only by a waypoint, and the service is bound to none (label istio.io/use-waypoint); {k}"
            ),
            (Mode::Disabled, _) => {
                format!("{feature}; the mesh is disabled (mode Disabled): nothing is enforced")
            }
        }
    }

    /// Reports `field` of `object` as needing L7, worded after the mode.
    fn needs_l7(
        &mut self,
        object: &ObjectRef,
        field: &str,
        feature: &str,
        in_kernel: Option<&str>,
    ) {
        let reason = self.l7_unenforced(feature, in_kernel);
        self.unenforced(object, field, reason);
    }

    /// The KmeshConfig, as diagnostics name it.
    fn config_object(&self) -> ObjectRef {
        let name = self
            .inputs
            .config
            .as_ref()
            .and_then(|cfg| cfg.metadata.name.as_deref())
            .unwrap_or("default");
        ObjectRef::new(Kind::KmeshConfig, None, name)
    }

    /// In Disabled mode everything still compiles, but nothing is applied: say so.
    fn report_mode(&mut self) {
        if self.mode == Mode::Disabled {
            let object = self.config_object();
            self.note(
                &object,
                "spec.mode",
                "the mesh is disabled: the node programs pass all traffic through; routes are compiled but not applied",
            );
        }
    }

    /// Objects of kinds the compiler reads but does not compile yet are reported, not dropped.
    fn report_kinds_not_compiled(&mut self) {
        let inputs: &'a Inputs = self.inputs;
        for object in &inputs.not_yet_supported {
            let reason = match object.kind {
                Kind::GrpcRoute => "GRPCRoute is not compiled yet (HTTPRoute and TCPRoute are)",
                Kind::TlsRoute => {
                    "TLSRoute is not compiled: it matches on SNI, which needs the first payload bytes"
                }
                _ => "this kind is not compiled yet",
            };
            self.unenforced(object, "", reason);
        }
    }
}

fn name_of(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// Oldest first, then by namespace and name: how Istio breaks ties between routes.
fn age_order(meta: &ObjectMeta) -> impl Ord + use<> {
    (
        meta.creation_timestamp.as_ref().map(|t| t.0),
        namespace_of(meta).to_string(),
        name_of(meta).to_string(),
    )
}
