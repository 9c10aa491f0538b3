//! The parts of Istio's networking API the compiler reads, as serde types.
//!
//! Istio publishes no Rust types, so these follow the proto definitions (`networking/v1`) for the
//! fields the compiler honours, the L7 ones included (the waypoint's routes are compiled from
//! them). Fields no part of the mesh supports (`corsPolicy`, `delegate`, …) are kept as raw JSON
//! values: the compiler needs to know that they are present, to report them, not what they hold.
//! Unknown fields are ignored, as the API server's structural schema would prune them anyway,
//! except in a [`StringMatch`], where an ignored misspelt key would turn a condition into one that
//! matches everything. Durations are read strictly ([`ProtoDuration`]).
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::durations::ProtoDuration;

/// An Istio object: metadata plus a typed spec.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct IstioObject<S> {
    pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    pub spec: S,
}

impl<S> IstioObject<S> {
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("")
    }
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }
}

pub type VirtualService = IstioObject<VirtualServiceSpec>;
pub type DestinationRule = IstioObject<DestinationRuleSpec>;
pub type ServiceEntry = IstioObject<ServiceEntrySpec>;

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    #[serde(default)]
    pub tls: Vec<Value>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

/// `http[]`: the fields listed in [`HttpRoute::l7_fields`] need the HTTP bytes.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: Option<Vec<HttpMatchRequest>>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub delegate: Option<Value>,
    pub rewrite: Option<HttpRewrite>,
    pub timeout: Option<ProtoDuration>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFaultInjection>,
    pub mirror: Option<Destination>,
    pub mirrors: Option<Vec<HttpMirrorPolicy>>,
    pub mirror_percentage: Option<Percent>,
    pub cors_policy: Option<Value>,
    pub headers: Option<Headers>,
}

impl HttpRoute {
    /// The L7 features this route sets, by field name.
    pub fn l7_fields(&self) -> Vec<&'static str> {
        let present = [
            ("redirect", self.redirect.is_some()),
            ("directResponse", self.direct_response.is_some()),
            ("delegate", self.delegate.is_some()),
            ("rewrite", self.rewrite.is_some()),
            ("timeout", self.timeout.is_some()),
            ("retries", self.retries.is_some()),
            ("fault", self.fault.is_some()),
            ("mirror", self.mirror.is_some()),
            ("mirrors", self.mirrors.is_some()),
            ("mirrorPercentage", self.mirror_percentage.is_some()),
            ("corsPolicy", self.cors_policy.is_some()),
            ("headers", self.headers.is_some()),
        ];
        present
            .iter()
            .filter(|(_, p)| *p)
            .map(|(f, _)| *f)
            .collect()
    }

    /// True when the route matches every request (no `match`, or an empty one).
    pub fn is_catch_all(&self) -> bool {
        match &self.matches {
            None => true,
            Some(m) => m.is_empty() || m.iter().all(HttpMatchRequest::is_empty),
        }
    }
}

/// `http[].match[]`: the conditions of one entry are ANDed, the entries ORed.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    /// Names the match (for logs); not a condition.
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    /// By header name (lowercase); an empty match means "present".
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    pub port: Option<u32>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub ignore_uri_case: Option<bool>,
    #[serde(default)]
    pub gateways: Vec<String>,
    pub stat_prefix: Option<String>,
}

impl HttpMatchRequest {
    /// Whether the entry sets no condition (`{}`): it matches every request.
    pub fn is_empty(&self) -> bool {
        let HttpMatchRequest {
            name: _,
            stat_prefix: _,
            uri,
            scheme,
            method,
            authority,
            headers,
            without_headers,
            query_params,
            port,
            source_labels,
            source_namespace,
            ignore_uri_case,
            gateways,
        } = self;
        uri.is_none()
            && scheme.is_none()
            && method.is_none()
            && authority.is_none()
            && headers.is_empty()
            && without_headers.is_empty()
            && query_params.is_empty()
            && port.is_none()
            && source_labels.is_empty()
            && source_namespace.is_none()
            && ignore_uri_case.is_none()
            && gateways.is_empty()
    }
}

/// Istio's `StringMatch`: one of `exact`, `prefix`, `regex` (RE2, whole value); none of them
/// (`{}`) means "present" where presence is meaningful (headers, query parameters).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

/// `http[].redirect`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u32>,
    /// `FROM_PROTOCOL_DEFAULT` or `FROM_REQUEST_PORT`.
    pub derive_port: Option<String>,
    pub scheme: Option<String>,
    /// Defaults to 301.
    pub redirect_code: Option<u32>,
}

/// `http[].rewrite`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct RegexRewrite {
    #[serde(rename = "match", default)]
    pub pattern: String,
    #[serde(default)]
    pub rewrite: String,
}

/// `http[].directResponse`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct HttpDirectResponse {
    pub status: u32,
    pub body: Option<HttpBody>,
}

/// One of `string` and `bytes` (base64).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct HttpBody {
    pub string: Option<String>,
    pub bytes: Option<String>,
}

/// `http[].retries`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    #[serde(default)]
    pub attempts: i32,
    pub per_try_timeout: Option<ProtoDuration>,
    /// Envoy's `retry_on` names and HTTP statuses, comma-separated.
    pub retry_on: Option<String>,
    pub retry_remote_localities: Option<bool>,
    pub retry_ignore_previous_hosts: Option<bool>,
    pub backoff: Option<ProtoDuration>,
}

/// `http[].fault`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct HttpFaultInjection {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    pub fixed_delay: Option<ProtoDuration>,
    pub exponential_delay: Option<Value>,
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage.
    pub percent: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    pub http_status: Option<i32>,
    pub grpc_status: Option<String>,
    pub http2_error: Option<String>,
    pub percentage: Option<Percent>,
}

/// Istio's `Percent`: 0 to 100, fractions allowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize)]
pub struct Percent {
    #[serde(default)]
    pub value: f64,
}

/// `http[].mirrors[]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct HttpMirrorPolicy {
    pub destination: Destination,
    pub percentage: Option<Percent>,
}

/// `headers` of a route or of a destination.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct HeaderOperations {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    #[serde(rename = "match", default)]
    pub matches: Vec<L4Match>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct L4Match {
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    pub port: Option<u32>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteDestination {
    pub destination: Destination,
    /// Relative weight; omitted means 0 (a single destination still gets everything).
    pub weight: Option<i64>,
    pub headers: Option<Headers>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PortSelector {
    pub number: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub export_to: Vec<String>,
    pub workload_selector: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<Value>,
    pub outlier_detection: Option<Value>,
    pub tls: Option<Value>,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

/// `trafficPolicy.portLevelSettings[]`: replaces (does not inherit) the policy for its port.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<Value>,
    pub outlier_detection: Option<Value>,
    pub tls: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    pub simple: Option<String>,
    pub consistent_hash: Option<ConsistentHash>,
    pub locality_lb_setting: Option<Value>,
    pub warmup: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    pub use_source_ip: Option<bool>,
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    pub http_query_parameter_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct HttpCookie {
    #[serde(default)]
    pub name: String,
    pub path: Option<String>,
    pub ttl: Option<ProtoDuration>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServiceEntryPort>,
    pub location: Option<String>,
    pub resolution: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntry>,
    pub workload_selector: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryPort {
    pub number: u32,
    pub protocol: Option<String>,
    pub name: Option<String>,
    pub target_port: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntry {
    pub address: Option<String>,
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    pub weight: Option<u32>,
}

// Security (`security.istio.io/v1`, `v1beta1`: the same shape).

/// An Istio security policy (AuthorizationPolicy or PeerAuthentication) as read: metadata and
/// the spec as JSON. The spec is typed by the compiler, not by the reader, because a policy whose
/// spec does not match its schema must still be seen: it binds workloads that then fail closed.
/// Dropping it at reading would fail open.
#[derive(Clone, Debug, PartialEq)]
pub struct SecurityObject {
    pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    /// `spec`, or `Null` when absent.
    pub spec: Value,
    /// Why the object cannot be read as a policy, if it cannot (its metadata does not match its
    /// schema; or, from files, it is defined twice with different contents): only its namespace
    /// and name are then known, and the workloads of its namespace fail closed.
    pub unreadable: Option<String>,
}

impl SecurityObject {
    /// A policy known only by namespace and name, which cannot be read for `reason`.
    pub fn unreadable(namespace: &str, name: &str, reason: String) -> SecurityObject {
        SecurityObject {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(namespace.to_string()),
                ..Default::default()
            },
            spec: Value::Null,
            unreadable: Some(reason),
        }
    }

    /// Reads a raw object; never fails (see the type's documentation).
    pub fn read(value: Value) -> SecurityObject {
        #[derive(Deserialize)]
        struct Meta {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        }
        let spec = value.get("spec").cloned().unwrap_or(Value::Null);
        match serde_json::from_value::<Meta>(value.clone()) {
            Ok(m) => SecurityObject {
                metadata: m.metadata,
                spec,
                unreadable: None,
            },
            Err(e) => {
                let text = |key: &str| {
                    value
                        .get("metadata")
                        .and_then(|m| m.get(key))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                };
                SecurityObject {
                    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                        name: text("name"),
                        namespace: text("namespace"),
                        ..Default::default()
                    },
                    spec,
                    unreadable: Some(format!("does not match its schema: {e}")),
                }
            }
        }
    }

    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("")
    }
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }
    /// Whether `istio.io/dry-run: "true"` marks it as not to be enforced.
    pub fn dry_run(&self) -> bool {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("istio.io/dry-run"))
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }
}

pub type AuthorizationPolicy = SecurityObject;
pub type PeerAuthentication = SecurityObject;

/// `selector` of a security policy.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// The part of a security policy's spec that says which workloads it binds; read on its own so
/// that a policy whose rules are invalid still binds (and fails closed).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyBinding {
    pub selector: Option<WorkloadSelector>,
    pub target_ref: Option<Value>,
    pub target_refs: Option<Vec<Value>>,
}

/// `AuthorizationPolicy.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub selector: Option<WorkloadSelector>,
    pub target_ref: Option<Value>,
    pub target_refs: Option<Vec<Value>>,
    /// ALLOW (the default), DENY, AUDIT or CUSTOM.
    pub action: Option<String>,
    pub provider: Option<Value>,
    /// Absent: the policy matches nothing; `[{}]`: everything.
    pub rules: Option<Vec<AuthorizationRule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationRule {
    /// Absent: any source; present, it must not be empty.
    pub from: Option<Vec<RuleFrom>>,
    /// Absent: any operation; present, it must not be empty.
    pub to: Option<Vec<RuleTo>>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct RuleFrom {
    pub source: Option<Source>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct RuleTo {
    pub operation: Option<Operation>,
}

/// `rules[].from[].source`. Every field a list of strings; absent is empty.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
    /// Extended channel; not part of ztunnel's L4 attributes.
    pub trust_domains: Vec<String>,
    pub not_trust_domains: Vec<String>,
}

/// `rules[].to[].operation`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Operation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<String>,
    pub not_ports: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

/// `rules[].when[]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Condition {
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

/// `PeerAuthentication.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<MutualTls>,
    /// By workload (target) port number, as a string key.
    pub port_level_mtls: Option<BTreeMap<String, MutualTls>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct MutualTls {
    /// UNSET (the default), DISABLE, PERMISSIVE or STRICT.
    pub mode: Option<String>,
}
