//! A snapshot as people read it: one row per record of every table, addresses as text, kinds as
//! names, route weights as percentages, and names beside ids where they are known. The one
//! rendering of snapshot records for the agent's `/debug/config_dump` and `/debug/bpf/<table>`
//! (which shows the kernel's maps in the same rows, so the two compare field by field) and for
//! `kmeshctl explain`. Its kinds ([`Action`], [`Reason`], [`PolicyKind`], ...) are the agent's too
//! (`/debug/authz` and the metrics label its counters with them).
//!
//! Pure: records in, rows out. The rows derive `serde::Serialize`; the callers choose the format.
//! Names the snapshot does not carry (services, routes, backend sets, identities, pods) come
//! through [`Names`]: the operator's compiler knows them offline; the agent passes [`NoNames`]
//! until the snapshot's names section fills them (every such field is an `Option`, `null` when
//! unknown, so that the shape does not change when they arrive).
use std::net::{IpAddr, SocketAddr};

use kmesh_common::{
    AuthzPolicyRecord, AuthzSourceRecord, AuthzVerdictRecord, AuthzWorkloadRecord,
    BackendSetRecord, EndpointRecord, GenerationValue, Ip16, RouteRecord, ServiceKey,
    ServiceRecord, WorkloadRecord, access_log,
    authz::{ANY_CLASS, ANY_PORT, authz_action, authz_policy_kind, authz_reason},
    lb_policy, log_level, mode, service_flags,
};
use serde::Serialize;

use crate::Snapshot;

/// An address of a record as an `IpAddr` (IPv4-mapped addresses as IPv4).
pub fn ip_addr(ip: &Ip16) -> IpAddr {
    IpAddr::from(*ip).to_canonical()
}

/// Names the snapshot's records refer to by id or address. Every method defaults to unknown.
pub trait Names {
    /// The service (its host, e.g. `reviews.default.svc.cluster.local`) at `key`.
    fn service(&self, _service_id: u32, _key: &ServiceKey) -> Option<String> {
        None
    }
    fn route(&self, _route_id: u32) -> Option<String> {
        None
    }
    fn backend_set(&self, _set_id: u32) -> Option<String> {
        None
    }
    /// The identity (service account) of an id.
    fn identity(&self, _identity: u32) -> Option<String> {
        None
    }
    /// The pod holding `ip`, as `namespace/name`.
    fn pod(&self, _ip: &Ip16) -> Option<String> {
        None
    }
}

/// No names beyond the snapshot's own (its policy names).
pub struct NoNames;
impl Names for NoNames {}

/// The names a snapshot carries in its names section: each service's host and, for a pod
/// address, `namespace/workload` (the section names workloads, not pods: a Deployment's pods all
/// show its name).
pub struct SectionNames<'a>(pub &'a Snapshot);

impl Names for SectionNames<'_> {
    fn service(&self, service_id: u32, _key: &ServiceKey) -> Option<String> {
        let names = self.0.names();
        names.service_by_id(service_id).map(|s| s.host.to_string())
    }
    fn pod(&self, ip: &Ip16) -> Option<String> {
        let names = self.0.names();
        let w = names.workload(ip)?;
        Some(format!("{}/{}", w.namespace, w.workload))
    }
}

/// The node's mode (`kmesh_common::mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Mode {
    Disabled,
    KernelNative,
    DualEngine,
    /// A value the format does not define (a valid snapshot never has one).
    Unknown(u32),
}

impl Mode {
    pub fn from_raw(raw: u32) -> Mode {
        match raw {
            mode::DISABLED => Mode::Disabled,
            mode::KERNEL_NATIVE => Mode::KernelNative,
            mode::DUAL_ENGINE => Mode::DualEngine,
            other => Mode::Unknown(other),
        }
    }
}

/// How a backend set chooses an endpoint (`kmesh_common::lb_policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    Random,
    SourceIpHash,
    Unknown(u32),
}

impl LbPolicy {
    pub fn from_raw(raw: u32) -> LbPolicy {
        match raw {
            lb_policy::RANDOM => LbPolicy::Random,
            lb_policy::SOURCE_IP_HASH => LbPolicy::SourceIpHash,
            other => LbPolicy::Unknown(other),
        }
    }
}

/// What a verdict does (`kmesh_common::authz::authz_action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Deny,
    Unknown(u8),
}

impl Action {
    pub fn from_raw(raw: u8) -> Action {
        match raw {
            authz_action::ALLOW => Action::Allow,
            authz_action::DENY => Action::Deny,
            other => Action::Unknown(other),
        }
    }
}

/// Why a verdict is what it is (`kmesh_common::authz::authz_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    NoAllowPolicy,
    AllowMatched,
    DenyMatched,
    NoAllowMatched,
    StrictMtls,
    Uncompilable,
    /// The kernel found no verdict for a connection (an inconsistent table) and denied it; never
    /// in a valid snapshot, counted by the authorization program as reason 0.
    NoVerdict,
    Unknown(u8),
}

impl Reason {
    pub fn from_raw(raw: u8) -> Reason {
        match raw {
            0 => Reason::NoVerdict,
            authz_reason::NO_ALLOW_POLICY => Reason::NoAllowPolicy,
            authz_reason::ALLOW_MATCHED => Reason::AllowMatched,
            authz_reason::DENY_MATCHED => Reason::DenyMatched,
            authz_reason::NO_ALLOW_MATCHED => Reason::NoAllowMatched,
            authz_reason::STRICT_MTLS => Reason::StrictMtls,
            authz_reason::UNCOMPILABLE => Reason::Uncompilable,
            other => Reason::Unknown(other),
        }
    }
}

/// The kind of a named policy (`kmesh_common::authz::authz_policy_kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    AuthorizationPolicy,
    PeerAuthentication,
    Unknown(u8),
}

impl PolicyKind {
    pub fn from_raw(raw: u8) -> PolicyKind {
        match raw {
            authz_policy_kind::AUTHORIZATION_POLICY => PolicyKind::AuthorizationPolicy,
            authz_policy_kind::PEER_AUTHENTICATION => PolicyKind::PeerAuthentication,
            other => PolicyKind::Unknown(other),
        }
    }
}

/// A verdict key's source class or port: a value, or the wildcard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum OrAny<T> {
    Value(T),
    Any(AnyMarker),
}

/// Serializes as `"any"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnyMarker {
    Any,
}

/// The whole snapshot: what `/debug/config_dump` answers.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotView {
    pub header: HeaderRow,
    pub services: Vec<ServiceRow>,
    pub routes: Vec<RouteRow>,
    pub backend_sets: Vec<BackendSetRow>,
    pub endpoints: Vec<EndpointRow>,
    pub workloads: Vec<WorkloadRow>,
    pub authz: AuthzView,
}

/// The authorization tables.
#[derive(Clone, Debug, Serialize)]
pub struct AuthzView {
    pub workloads: Vec<AuthzWorkloadRow>,
    pub sources: Vec<AuthzSourceRow>,
    pub verdicts: Vec<AuthzVerdictRow>,
    pub policies: Vec<AuthzPolicyRow>,
}

/// Which snapshot, for which node, with which settings.
#[derive(Clone, Debug, Serialize)]
pub struct HeaderRow {
    /// Absent in the kernel's generation map (it holds no node name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    pub generation: u64,
    /// Hex, as the agent logs it.
    pub content_hash: String,
    pub mode: Mode,
    /// The agents' settings (`KmeshConfig.spec`): the log level's name (`None` for a value that
    /// is no level), and whether the access log is on.
    pub log_level: Option<&'static str>,
    pub access_log: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceRow {
    /// `VIP:port`.
    pub address: SocketAddr,
    pub protocol: u8,
    pub service_id: u32,
    pub service: Option<String>,
    pub route_id: u32,
    pub route: Option<String>,
    /// Connections go to the service's waypoint (`kmesh_common::service_flags::WAYPOINT`); left
    /// out of the JSON when false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub waypoint: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct RouteRow {
    pub route_id: u32,
    pub route: Option<String>,
    pub total_weight: u32,
    pub destinations: Vec<RouteDestination>,
}

/// One destination of a route: the share of connections that go to a backend set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RouteDestination {
    pub backend_set_id: u32,
    pub backend_set: Option<String>,
    pub weight: u32,
    /// `100 * weight / total_weight`.
    pub percent: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendSetRow {
    pub set_id: u32,
    pub backend_set: Option<String>,
    pub lb_policy: LbPolicy,
    /// Zero: connections routed here are refused (no ready endpoint).
    pub endpoint_count: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct EndpointRow {
    pub set_id: u32,
    pub index: u32,
    pub address: SocketAddr,
    pub identity_id: u32,
    pub identity: Option<String>,
    pub pod: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct WorkloadRow {
    pub ip: IpAddr,
    pub identity_id: u32,
    pub identity: Option<String>,
    pub pod: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuthzWorkloadRow {
    pub ip: IpAddr,
    pub policy_set: u32,
    pub pod: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuthzSourceRow {
    /// CIDR notation (`10.0.0.0/8`, `10.244.1.5/32`).
    pub prefix: String,
    pub source_class: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuthzVerdictRow {
    pub policy_set: u32,
    pub source_class: OrAny<u32>,
    pub port: OrAny<u16>,
    pub action: Action,
    pub reason: Reason,
    /// 0 when no single policy decided.
    pub policy_id: u32,
    pub policy: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuthzPolicyRow {
    pub policy_id: u32,
    pub kind: PolicyKind,
    /// `namespace/name`.
    pub name: String,
}

/// `snapshot` with `content_hash`, every table in its order.
pub fn snapshot(snapshot: &Snapshot, content_hash: u64, names: &dyn Names) -> SnapshotView {
    let s = snapshot;
    SnapshotView {
        header: HeaderRow {
            node_name: Some(s.node_name.clone()),
            generation: s.generation,
            content_hash: format!("{content_hash:016x}"),
            mode: Mode::from_raw(s.config.mode),
            log_level: log_level::name(s.config.log_level),
            access_log: s.config.access_log == access_log::ON,
        },
        services: s.services.iter().map(|r| service(r, names)).collect(),
        routes: s.routes.iter().map(|r| route(r, names)).collect(),
        backend_sets: s
            .backend_sets
            .iter()
            .map(|r| backend_set(r, names))
            .collect(),
        endpoints: s.endpoints.iter().map(|r| endpoint(r, names)).collect(),
        workloads: s.workloads.iter().map(|r| workload(r, names)).collect(),
        authz: AuthzView {
            workloads: s
                .authz
                .workloads
                .iter()
                .map(|r| authz_workload(r, names))
                .collect(),
            sources: s.authz.sources.iter().map(authz_source).collect(),
            verdicts: s
                .authz
                .verdicts
                .iter()
                .map(|r| authz_verdict(r, &s.authz.policies))
                .collect(),
            policies: s.authz.policies.iter().map(authz_policy).collect(),
        },
    }
}

/// The kernel's generation entry (no node name: the kernel does not hold it).
pub fn generation(value: &GenerationValue) -> HeaderRow {
    HeaderRow {
        node_name: None,
        generation: value.meta.generation,
        content_hash: format!("{:016x}", value.meta.content_hash),
        mode: Mode::from_raw(value.config.mode),
        log_level: log_level::name(value.config.log_level),
        access_log: value.config.access_log == access_log::ON,
    }
}

pub fn service(r: &ServiceRecord, names: &dyn Names) -> ServiceRow {
    ServiceRow {
        address: SocketAddr::new(ip_addr(&r.key.ip), r.key.port),
        protocol: r.key.protocol,
        service_id: r.value.service_id,
        service: names.service(r.value.service_id, &r.key),
        route_id: r.value.route_id,
        route: names.route(r.value.route_id),
        waypoint: r.value.flags & service_flags::WAYPOINT != 0,
    }
}

pub fn route(r: &RouteRecord, names: &dyn Names) -> RouteRow {
    RouteRow {
        route_id: r.route_id,
        route: names.route(r.route_id),
        total_weight: r.value.total_weight,
        destinations: route_destinations(r, names),
    }
}

/// A route's destinations with their shares (bounded by the arrays, whatever the record says).
pub fn route_destinations(r: &RouteRecord, names: &dyn Names) -> Vec<RouteDestination> {
    r.value
        .weights()
        .map(|(weight, set_id)| RouteDestination {
            backend_set_id: set_id,
            backend_set: names.backend_set(set_id),
            weight,
            percent: percent(weight, r.value.total_weight),
        })
        .collect()
}

/// `100 * part / total`, 0 for an empty total.
pub fn percent(part: u32, total: u32) -> f64 {
    if total == 0 {
        0.0
    } else {
        100.0 * f64::from(part) / f64::from(total)
    }
}

pub fn backend_set(r: &BackendSetRecord, names: &dyn Names) -> BackendSetRow {
    BackendSetRow {
        set_id: r.set_id,
        backend_set: names.backend_set(r.set_id),
        lb_policy: LbPolicy::from_raw(r.value.lb_policy),
        endpoint_count: r.value.endpoint_count,
    }
}

pub fn endpoint(r: &EndpointRecord, names: &dyn Names) -> EndpointRow {
    EndpointRow {
        set_id: r.key.set_id,
        index: r.key.index,
        address: SocketAddr::new(ip_addr(&r.value.ip), r.value.port),
        identity_id: r.value.identity,
        identity: names.identity(r.value.identity),
        pod: names.pod(&r.value.ip),
    }
}

pub fn workload(r: &WorkloadRecord, names: &dyn Names) -> WorkloadRow {
    WorkloadRow {
        ip: ip_addr(&r.ip),
        identity_id: r.identity,
        identity: names.identity(r.identity),
        pod: names.pod(&r.ip),
    }
}

pub fn authz_workload(r: &AuthzWorkloadRecord, names: &dyn Names) -> AuthzWorkloadRow {
    AuthzWorkloadRow {
        ip: ip_addr(&r.ip),
        policy_set: r.value.policy_set,
        pod: names.pod(&r.ip),
    }
}

pub fn authz_source(r: &AuthzSourceRecord) -> AuthzSourceRow {
    let ip = ip_addr(&r.key.ip);
    let bits = if ip.is_ipv4() {
        r.key.prefix_len.saturating_sub(96)
    } else {
        r.key.prefix_len
    };
    AuthzSourceRow {
        prefix: format!("{ip}/{bits}"),
        source_class: r.value.source_class,
    }
}

/// A verdict, its policy named from `policies` (the snapshot's policy table).
pub fn authz_verdict(r: &AuthzVerdictRecord, policies: &[AuthzPolicyRecord]) -> AuthzVerdictRow {
    AuthzVerdictRow {
        policy_set: r.key.policy_set,
        source_class: if r.key.source_class == ANY_CLASS {
            OrAny::Any(AnyMarker::Any)
        } else {
            OrAny::Value(r.key.source_class)
        },
        port: if r.key.port == ANY_PORT {
            OrAny::Any(AnyMarker::Any)
        } else {
            OrAny::Value(r.key.port)
        },
        action: Action::from_raw(r.value.action),
        reason: Reason::from_raw(r.value.reason),
        policy_id: r.value.policy,
        policy: policy_name(policies, r.value.policy),
    }
}

pub fn authz_policy(r: &AuthzPolicyRecord) -> AuthzPolicyRow {
    AuthzPolicyRow {
        policy_id: r.policy,
        kind: PolicyKind::from_raw(r.kind),
        name: record_name(r),
    }
}

/// The `namespace/name` of policy `id` in `policies` (sorted by id), if there.
pub fn policy_name(policies: &[AuthzPolicyRecord], id: u32) -> Option<String> {
    let at = policies.binary_search_by_key(&id, |p| p.policy).ok()?;
    policies.get(at).map(record_name)
}

fn record_name(r: &AuthzPolicyRecord) -> String {
    let len = usize::from(r.name_len).min(r.name.len());
    String::from_utf8_lossy(r.name.get(..len).unwrap_or_default()).into_owned()
}

#[cfg(test)]
mod tests {
    use kmesh_common::authz::{ANY_CLASS, ANY_PORT, authz_action, authz_policy_kind, authz_reason};
    use kmesh_common::{lb_policy, mode};

    use super::*;
    use crate::builder::{Endpoint, SnapshotBuilder};

    struct Named;
    impl Names for Named {
        fn service(&self, id: u32, _key: &ServiceKey) -> Option<String> {
            Some(format!("svc-{id}"))
        }
        fn backend_set(&self, id: u32) -> Option<String> {
            Some(format!("set-{id}"))
        }
        fn pod(&self, ip: &Ip16) -> Option<String> {
            (ip_addr(ip) == "10.244.1.11".parse::<IpAddr>().unwrap())
                .then(|| "default/reviews-v1-abc".to_string())
        }
    }

    fn sample() -> Snapshot {
        let mut b = SnapshotBuilder::new("node-1", 7, mode::KERNEL_NATIVE);
        let v1 = b.backend_set(
            lb_policy::SOURCE_IP_HASH,
            &[Endpoint::new("10.244.1.11".parse().unwrap(), 9080, 3)],
        );
        let v2 = b.backend_set(lb_policy::RANDOM, &[]);
        b.service("10.96.0.10".parse().unwrap(), 80, &[(75, v1), (25, v2)]);
        b.workload("10.244.1.20".parse().unwrap(), 3);
        b.authz_policy(
            9,
            authz_policy_kind::AUTHORIZATION_POLICY,
            "default/allow-internal",
        );
        b.authz_workload("10.244.1.20".parse().unwrap(), 1);
        b.authz_source("10.0.0.0".parse().unwrap(), 8, 1);
        b.authz_verdict(
            1,
            ANY_CLASS,
            ANY_PORT,
            authz_action::DENY,
            authz_reason::NO_ALLOW_MATCHED,
            0,
        );
        b.authz_verdict(
            1,
            1,
            9080,
            authz_action::ALLOW,
            authz_reason::ALLOW_MATCHED,
            9,
        );
        b.build()
    }

    #[test]
    fn every_table_is_rendered_with_names_beside_ids() {
        let view = snapshot(&sample(), 0xabc, &Named);
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["header"]["node_name"], "node-1");
        assert_eq!(json["header"]["content_hash"], "0000000000000abc");
        assert_eq!(json["header"]["mode"], "KernelNative");
        assert_eq!(json["header"]["log_level"], "info");
        assert_eq!(json["header"]["access_log"], false);
        assert_eq!(json["services"][0]["address"], "10.96.0.10:80");
        assert_eq!(json["services"][0]["service"], "svc-1");
        let destinations = &json["routes"][0]["destinations"];
        assert_eq!(destinations[0]["percent"], 75.0);
        assert_eq!(destinations[0]["backend_set"], "set-1");
        assert_eq!(destinations[1]["percent"], 25.0);
        assert_eq!(json["backend_sets"][0]["lb_policy"], "source_ip_hash");
        assert_eq!(json["backend_sets"][1]["endpoint_count"], 0);
        assert_eq!(json["endpoints"][0]["address"], "10.244.1.11:9080");
        assert_eq!(json["endpoints"][0]["pod"], "default/reviews-v1-abc");
        assert_eq!(json["workloads"][0]["pod"], serde_json::Value::Null);
        assert_eq!(json["authz"]["sources"][0]["prefix"], "10.0.0.0/8");
        let verdicts = &json["authz"]["verdicts"];
        assert_eq!(verdicts[0]["port"], 9080);
        assert_eq!(verdicts[0]["action"], "allow");
        assert_eq!(verdicts[0]["policy"], "default/allow-internal");
        assert_eq!(verdicts[1]["source_class"], "any");
        assert_eq!(verdicts[1]["reason"], "no_allow_matched");
        assert_eq!(verdicts[1]["policy"], serde_json::Value::Null);
        assert_eq!(json["authz"]["policies"][0]["kind"], "authorization_policy");
    }

    #[test]
    fn without_names_the_fields_are_null_not_missing() {
        let json = serde_json::to_value(snapshot(&sample(), 1, &NoNames)).unwrap();
        assert!(json["services"][0].get("service").unwrap().is_null());
        assert!(
            json["routes"][0]["destinations"][0]
                .get("backend_set")
                .unwrap()
                .is_null()
        );
    }

    #[test]
    fn percent_of_an_empty_total_is_zero() {
        assert_eq!(percent(1, 0), 0.0);
        assert_eq!(percent(1, 3), 100.0 / 3.0);
    }
}
