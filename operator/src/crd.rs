//! The `KmeshConfig` custom resource (`kmesh.net/v1alpha1`): the cluster-wide settings the
//! operator compiles into per-node snapshots, and the status through which it reports what it did.
//!
//! The CRD manifest is generated from these types by the `crdgen` binary (see [`crd_yaml`]) and
//! checked in at `crds/kmesh.net_kmeshconfigs.yaml`; `tests/crd.rs` fails when the two drift.
//!
//! Doc comments on the types and fields below become the descriptions in the CRD schema, so they
//! are written for the cluster operator reading `kubectl explain kmeshconfig.spec`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kmesh_common::{log_level, mode};
use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The command that regenerates the checked-in CRD; quoted in the file header and in the drift
/// test's failure message so both say the same thing.
pub const REGENERATE_COMMAND: &str =
    "cargo run -p kmesh-operator --bin crdgen > crds/kmesh.net_kmeshconfigs.yaml";

/// The only name a `KmeshConfig` may have (enforced by a CEL rule on the CRD).
pub const SINGLETON_NAME: &str = "default";

/// Cluster-wide configuration of kmesh-rs.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kmesh.net",
    version = "v1alpha1",
    kind = "KmeshConfig",
    shortname = "kmc",
    status = "KmeshConfigStatus",
    derive = "PartialEq",
    doc = "Cluster-wide configuration of kmesh-rs. A singleton: the only accepted name is `default`.",
    // One object configures the whole mesh, so a second one would be ambiguous. With a
    // `validation`, kube derives `KubeSchema` (not `JsonSchema`) for the root type and puts the
    // rule on the root schema, where CEL may read `metadata.name` although the schema does not
    // declare metadata. `Rule` is brought into scope by the derive's expansion.
    validation = Rule::new("self.metadata.name == 'default'")
        .message("KmeshConfig is a singleton named default"),
    printcolumn(
        name = "Mode",
        type_ = "string",
        description = "The dataplane mode.",
        json_path = ".spec.mode"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Status of the Ready condition.",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Snapshot",
        type_ = "integer",
        description = "Generation of the snapshots being rolled out.",
        json_path = ".status.snapshotGeneration"
    ),
    printcolumn(
        name = "Nodes Updated",
        type_ = "integer",
        description = "Nodes given the current snapshot generation.",
        json_path = ".status.rollout.nodesUpdated"
    ),
    // Custom columns replace kubectl's default ones, so Age has to be listed explicitly.
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
// Container-level `default`: every field may be omitted and takes its value from
// `KmeshConfigSpec::default()`; schemars also writes those values into the schema as `default`s,
// so the apiserver fills them in too.
#[serde(rename_all = "camelCase", default)]
#[schemars(transform = kubernetes_integer_formats)]
pub struct KmeshConfigSpec {
    /// How the node programs handle enrolled traffic. `KernelNative`: what the kernel can enforce
    /// (L4 routing and load balancing) is enforced in eBPF; L7 features are listed in
    /// status.unenforced. `DualEngine`: as KernelNative, plus redirection of L7 traffic to
    /// waypoints. `Disabled`: the programs stay attached and pass all traffic through.
    pub mode: Mode,
    /// Which pods (and namespaces) are part of the mesh.
    pub enrollment: EnrollmentSpec,
    /// How a new snapshot generation reaches the nodes.
    pub rollout: RolloutSpec,
    /// Each node agent writes one access log line per closed connection of its enrolled
    /// workloads, on its standard output. Switched on every node without a restart.
    pub access_log: bool,
    /// Log level of the operator and the node agents: error, warn, info, debug or trace. Changed
    /// live; an agent's admin endpoint overrides it on that agent until the next change here, and
    /// RUST_LOG set on a process holds until the next change here.
    pub log_level: LogLevel,
    /// Per-node capacity overrides; an unset field keeps the built-in default. Every node's
    /// snapshot must fit within them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<CapacitySpec>,
}

impl Default for KmeshConfigSpec {
    fn default() -> Self {
        KmeshConfigSpec {
            mode: Mode::KernelNative,
            enrollment: EnrollmentSpec::default(),
            rollout: RolloutSpec::default(),
            access_log: false,
            log_level: LogLevel::Info,
            capacity: None,
        }
    }
}

// The schema shows only the field's doc comment for an enum-typed field (kube folds the variants
// into a string `enum` and drops their descriptions), so each field using one of these enums
// spells out what the values mean.
/// Dataplane mode, as `kmesh_common::mode` (see [`Mode::value`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Mode {
    /// Enforce in the kernel whatever the kernel can enforce.
    #[default]
    KernelNative,
    /// Kernel-native plus waypoint redirection for L7.
    DualEngine,
    /// Pass all traffic through.
    Disabled,
}

impl Mode {
    /// The mode as the node programs know it: one of `kmesh_common::mode`. The operator passes
    /// a `Mode` around and turns it into this number only where a snapshot is built.
    pub fn value(self) -> u32 {
        match self {
            Mode::KernelNative => mode::KERNEL_NATIVE,
            Mode::DualEngine => mode::DUAL_ENGINE,
            Mode::Disabled => mode::DISABLED,
        }
    }
}

/// Which pods are enrolled in the mesh. A pod is enrolled when it, or else its namespace, carries
/// the label `label` with the value `value` (compared case-insensitively). A pod labelled with
/// the value `none` is opted out even when its namespace is enrolled.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct EnrollmentSpec {
    /// Label key that enrolls a pod or namespace.
    #[schemars(length(min = 1))]
    pub label: String,
    /// Label value that enrolls a pod or namespace, matched case-insensitively. Pods labelled
    /// `none` opt out.
    #[schemars(length(min = 1))]
    pub value: String,
}

impl Default for EnrollmentSpec {
    fn default() -> Self {
        // The label Istio ambient uses, with kmesh's value, so existing namespaces enroll as-is.
        EnrollmentSpec {
            label: "istio.io/dataplane-mode".to_owned(),
            value: "Kmesh".to_owned(),
        }
    }
}

impl EnrollmentSpec {
    /// Whether a label value enrolls (ASCII case-insensitive, as documented on `value`). The
    /// `none` opt-out is the caller's concern: it applies to pod labels only.
    pub fn matches(&self, value: &str) -> bool {
        self.value.eq_ignore_ascii_case(value)
    }
}

/// How a new snapshot generation reaches the nodes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct RolloutSpec {
    /// `AllAtOnce` publishes to every node at once; `Rolling` updates at most maxUnavailable
    /// nodes at a time and waits for them to report ready.
    pub strategy: RolloutStrategy,
    /// With the Rolling strategy, how many nodes may be updating at once: a count or a
    /// percentage of the nodes such as "25%".
    // kube marks every optional int-or-string property `nullable`, which would let the apiserver
    // store `null` (skipping the default) and then fail to deserialize here; an explicit
    // `nullable: false` keeps kube from adding it.
    #[schemars(extend("nullable" = false))]
    pub max_unavailable: IntOrString,
    /// Nodes that get a new snapshot before all others. Unset: no canary stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySpec>,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        RolloutSpec {
            strategy: RolloutStrategy::AllAtOnce,
            max_unavailable: IntOrString::Int(1),
            canary: None,
        }
    }
}

/// How a rollout proceeds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RolloutStrategy {
    /// Every node at once.
    #[default]
    AllAtOnce,
    /// maxUnavailable nodes at a time.
    Rolling,
}

/// The canary stage of a rollout.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanarySpec {
    /// Nodes whose labels match get a new snapshot first; the others follow once these are ready.
    pub node_selector: LabelSelector,
}

/// Log level.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// The default.
    #[default]
    Info,
    /// Verbose.
    Debug,
    /// Very verbose.
    Trace,
}

impl LogLevel {
    /// The level as the node config carries it: one of `kmesh_common::log_level`.
    pub fn value(self) -> u8 {
        match self {
            LogLevel::Error => log_level::ERROR,
            LogLevel::Warn => log_level::WARN,
            LogLevel::Info => log_level::INFO,
            LogLevel::Debug => log_level::DEBUG,
            LogLevel::Trace => log_level::TRACE,
        }
    }

    /// The level's name, as `tracing` and the CRD write it (`info`).
    pub fn name(self) -> &'static str {
        // Every value() is a level, so name() always answers; "info" only guards the impossible.
        log_level::name(self.value()).unwrap_or("info")
    }
}

/// Per-node table-size limits. Unset fields keep the defaults: 100000 services, 100000 routes,
/// 200000 backend sets, 1000000 endpoints, 16384 workloads, 65536 authorization workloads,
/// 1000000 authorization sources, 4000000 authorization verdicts, 100000 authorization policies,
/// 32 MiB of name strings, 1000000 workload names, 100000 service names, 256 MiB per snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CapacitySpec {
    /// Most services in one node's snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_services: Option<u32>,
    /// Most routes in one node's snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_routes: Option<u32>,
    /// Most backend sets in one node's snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_backend_sets: Option<u32>,
    /// Most endpoints in one node's snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_endpoints: Option<u32>,
    /// Most enrolled workloads on one node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_workloads: Option<u32>,
    /// Most workload addresses bound by an authorization policy on one node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_authz_workloads: Option<u32>,
    /// Most authorization source prefixes (workload addresses, policy blocks) per node snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_authz_sources: Option<u32>,
    /// Most authorization verdicts in one node's snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_authz_verdicts: Option<u32>,
    /// Most authorization policy names in one node's snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_authz_policies: Option<u32>,
    /// Most bytes of name strings (workload, namespace, service and app names for telemetry) in
    /// one node's snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_name_bytes: Option<u32>,
    /// Most named pod addresses (every pod of the cluster with an address) in one node's snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_workload_names: Option<u32>,
    /// Most named services in one node's snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_service_names: Option<u32>,
    /// Largest encoded snapshot for one node, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_snapshot_bytes: Option<u64>,
}

impl CapacitySpec {
    /// The snapshot limits these overrides describe, unset fields taken from
    /// `kmesh_snapshot::Limits::default()`.
    pub fn limits(&self) -> kmesh_snapshot::Limits {
        let d = kmesh_snapshot::Limits::default();
        kmesh_snapshot::Limits {
            max_bytes: self.max_snapshot_bytes.unwrap_or(d.max_bytes),
            max_services: self.max_services.unwrap_or(d.max_services),
            max_routes: self.max_routes.unwrap_or(d.max_routes),
            max_backend_sets: self.max_backend_sets.unwrap_or(d.max_backend_sets),
            max_endpoints: self.max_endpoints.unwrap_or(d.max_endpoints),
            max_workloads: self.max_workloads.unwrap_or(d.max_workloads),
            max_authz_workloads: self.max_authz_workloads.unwrap_or(d.max_authz_workloads),
            max_authz_sources: self.max_authz_sources.unwrap_or(d.max_authz_sources),
            max_authz_verdicts: self.max_authz_verdicts.unwrap_or(d.max_authz_verdicts),
            max_authz_policies: self.max_authz_policies.unwrap_or(d.max_authz_policies),
            max_name_bytes: self.max_name_bytes.unwrap_or(d.max_name_bytes),
            max_workload_names: self.max_workload_names.unwrap_or(d.max_workload_names),
            max_service_names: self.max_service_names.unwrap_or(d.max_service_names),
        }
    }
}

/// What the operator has done with the configuration and the mesh resources.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
#[schemars(transform = kubernetes_integer_formats)]
pub struct KmeshConfigStatus {
    /// Ready: every node runs the latest snapshot. Progressing: a rollout is under way.
    /// Degraded: something could not be compiled or delivered; the message says what.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The metadata.generation of this object the status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The generation of the snapshots being rolled out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_generation: Option<u64>,
    /// Progress of the current rollout.
    pub rollout: RolloutStatus,
    /// Every resource that could not be compiled, and why; the rest of the mesh is still enforced.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<RejectedResource>,
    /// Features that are present but not enforced in the current mode (L7 in KernelNative,
    /// waypoint-bound features in DualEngine).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unenforced: Vec<UnenforcedFeature>,
    /// Kinds the operator would read but cannot, and why: their objects are not compiled. A kind
    /// not installed is normal (a cluster without the Gateway API, say); one served only at
    /// versions the operator does not read, or forbidden by its RBAC, makes the status Degraded.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unwatched: Vec<UnwatchedKind>,
}

/// Progress of a rollout, and which node runs which snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct RolloutStatus {
    /// Nodes that should run the snapshot generation.
    pub nodes_desired: u32,
    /// Nodes that have been given the snapshot generation.
    pub nodes_updated: u32,
    /// Nodes that report the snapshot generation applied.
    pub nodes_ready: u32,
    /// One entry per node.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeSnapshotStatus>,
}

/// The snapshot one node runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSnapshotStatus {
    /// Node name.
    pub name: String,
    /// Snapshot generation the node runs.
    pub generation: u64,
    /// Whether the node reports that generation applied.
    pub ready: bool,
}

/// A resource the operator could not compile.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RejectedResource {
    /// Kind of the resource, e.g. VirtualService.
    pub kind: String,
    /// Namespace of the resource; unset for cluster-scoped resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name of the resource.
    pub name: String,
    /// Path of the offending field, e.g. `spec.http[0].match`.
    pub field: String,
    /// Why it could not be compiled.
    pub reason: String,
}

/// A feature present in a resource but not enforced in the current mode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnenforcedFeature {
    /// Kind of the resource, e.g. AuthorizationPolicy.
    pub kind: String,
    /// Namespace of the resource.
    pub namespace: String,
    /// Name of the resource.
    pub name: String,
    /// Path of the unenforced field, e.g. `spec.rules[0].to[0].operation.paths`.
    pub field: String,
    /// Why it is not enforced.
    pub reason: String,
}

/// A kind the operator cannot read from the API server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnwatchedKind {
    /// The kind, e.g. TCPRoute.
    pub kind: String,
    /// Its API group, e.g. gateway.networking.k8s.io.
    pub group: String,
    /// NotInstalled: no version is served (its CRD is not installed). NotServed: served only at
    /// versions the operator does not read (the message lists them). Forbidden: the operator's
    /// RBAC does not let it list and watch the kind (the message is the API server's).
    pub reason: UnwatchedReason,
    /// What the API server said, or which versions it serves.
    pub message: String,
}

/// Why a kind is not read (see [`UnwatchedKind::reason`]).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum UnwatchedReason {
    /// No version of the kind is served: its CRD is not installed.
    NotInstalled,
    /// Served only at versions the operator does not read.
    NotServed,
    /// The operator's RBAC does not allow listing and watching it.
    Forbidden,
}

/// The integer formats the API server knows (`int32`, `int64`); schemars writes Rust's
/// (`uint32`, `uint64`, ...), which `kubectl apply` of the CRD warns about ("unrecognized
/// format"). Each is rewritten to a known format with the bounds of the Rust type as `minimum`
/// and `maximum`, so the API server still refuses what the type cannot hold: `u32` becomes
/// `int64` in `0..=4294967295`; `u64` becomes `int64` from 0 (the API server's integers are
/// 64-bit signed, so nothing larger reaches us anyway). Bounds already tighter are kept.
pub fn kubernetes_integer_formats(schema: &mut schemars::Schema) {
    if let Some(object) = schema.as_object_mut()
        && is_integer(object.get("type"))
    {
        let format = object.get("format").and_then(|f| f.as_str());
        if let Some((known, min, max)) = format.and_then(integer_format) {
            object.insert("format".into(), known.into());
            tighten(object, "minimum", min, |new, old| new > old);
            if let Some(max) = max {
                tighten(object, "maximum", max, |new, old| new < old);
            }
        }
    }
    schemars::transform::transform_subschemas(&mut kubernetes_integer_formats, schema);
}

/// `"integer"`, or a list of types holding it (`["integer", "null"]` for an `Option`).
fn is_integer(type_: Option<&serde_json::Value>) -> bool {
    match type_ {
        Some(serde_json::Value::String(t)) => t == "integer",
        Some(serde_json::Value::Array(types)) => types.iter().any(|t| t == "integer"),
        _ => false,
    }
}

/// For a Rust integer format: the Kubernetes format and the type's bounds (no maximum beyond
/// `int64`'s).
fn integer_format(format: &str) -> Option<(&'static str, i64, Option<i64>)> {
    Some(match format {
        "int8" => ("int32", i8::MIN.into(), Some(i8::MAX.into())),
        "int16" => ("int32", i16::MIN.into(), Some(i16::MAX.into())),
        "uint8" => ("int32", 0, Some(u8::MAX.into())),
        "uint16" => ("int32", 0, Some(u16::MAX.into())),
        "uint32" => ("int64", 0, Some(u32::MAX.into())),
        "uint64" | "uint" | "uint128" => ("int64", 0, None),
        _ => return None,
    })
}

/// Sets `object[key]` to `bound` unless it already holds a tighter one (`tighter(bound, old)`
/// false).
fn tighten(
    object: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
    bound: i64,
    tighter: impl Fn(f64, f64) -> bool,
) {
    let old = object.get(key).and_then(|v| v.as_f64());
    if old.is_none_or(|old| tighter(bound as f64, old)) {
        object.insert(key.into(), bound.into());
    }
}

/// The CRD manifest as checked in at `crds/kmesh.net_kmeshconfigs.yaml`: a header naming
/// [`REGENERATE_COMMAND`], then `KmeshConfig::crd()` as YAML. Both `crdgen` and the drift test
/// call this, so they cannot disagree.
pub fn crd_yaml() -> String {
    let mut crd = serde_json::to_value(KmeshConfig::crd()).expect("a CRD serializes to JSON");
    // Key order must not depend on whether some crate in the build turns on serde_json's
    // `preserve_order` (feature unification differs between `cargo run -p` and a workspace-wide
    // `cargo test`), or the drift check would flap. Sorting makes it the same either way.
    sort_keys(&mut crd);
    let yaml = serde_yaml::to_string(&crd).expect("a JSON value serializes to YAML");
    format!("# Generated by `{REGENERATE_COMMAND}`; do not edit.\n{yaml}")
}

/// Sorts the keys of every object in `value`, recursively.
fn sort_keys(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.sort_keys();
            map.values_mut().for_each(sort_keys);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(sort_keys),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::CapacitySpec;

    /// Every capacity field lands in its own limit: distinct values, so a field mapped to the wrong
    /// limit (or left at the default) shows.
    #[test]
    fn every_capacity_field_sets_its_limit() {
        let spec: CapacitySpec = serde_yaml::from_str(
            "maxServices: 1\nmaxRoutes: 2\nmaxBackendSets: 3\nmaxEndpoints: 4\nmaxWorkloads: 5\n\
             maxAuthzWorkloads: 6\nmaxAuthzSources: 7\nmaxAuthzVerdicts: 8\n\
             maxAuthzPolicies: 9\nmaxSnapshotBytes: 10\nmaxNameBytes: 11\n\
             maxWorkloadNames: 12\nmaxServiceNames: 13\n",
        )
        .unwrap();
        let expected = kmesh_snapshot::Limits {
            max_bytes: 10,
            max_services: 1,
            max_routes: 2,
            max_backend_sets: 3,
            max_endpoints: 4,
            max_workloads: 5,
            max_authz_workloads: 6,
            max_authz_sources: 7,
            max_authz_verdicts: 8,
            max_authz_policies: 9,
            max_name_bytes: 11,
            max_workload_names: 12,
            max_service_names: 13,
        };
        assert_eq!(spec.limits(), expected);
        assert_eq!(
            CapacitySpec::default().limits(),
            kmesh_snapshot::Limits::default()
        );
    }
}
