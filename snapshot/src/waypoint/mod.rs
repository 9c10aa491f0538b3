//! The configuration of one waypoint (DualEngine mode, issue #11): for every service bound to it,
//! the L7 routes the operator compiled from VirtualServices and HTTPRoutes, the clusters those
//! routes send to, and the workloads whose addresses name the clients. This is its one definition:
//! the operator's compiler writes it, the snapshot server serves it, the waypoint reads it.
//!
//! It is JSON ([`WaypointConfig::to_json`], [`WaypointConfig::from_json`]): the waypoint is user
//! space, so the kernel's fixed-size records buy nothing here, and JSON is readable in a debug dump.
//! Every field is explicit: the compiler fills Istio's and the Gateway API's defaults in, so the
//! waypoint never guesses. Unknown fields are refused, not ignored: a waypoint older than its
//! operator must not drop a feature it cannot see; it keeps its last good configuration instead.
//! A configuration that [`WaypointConfig::validate`] refuses is refused whole.
//!
//! How a connection finds its routes: the kernel marks the SYN with the id of the service the client
//! dialled and the port ([`Service::id`] is the service id of the node snapshots' services table);
//! the waypoint looks the pair up in [`WaypointConfig::services`], then goes through the port's
//! [`ServicePort::http`] routes, first match wins, or its [`ServicePort::tcp`] destinations for a
//! connection that is not HTTP.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

mod authz;
#[cfg(test)]
mod tests;
mod validate;

pub use authz::{
    AuthorizationPolicy, Condition, ConditionKey, Operation, PolicyAction, PolicyTarget, Rule,
    Source, cidr_contains, istio_string_match, parse_cidr,
};
pub use validate::WaypointConfigError;

/// The version of this format; a waypoint refuses any other.
pub const WAYPOINT_CONFIG_VERSION: u32 = 1;

/// The largest configuration a waypoint accepts, in bytes of JSON.
pub const MAX_WAYPOINT_CONFIG_BYTES: usize = 64 << 20;

/// What one waypoint serves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointConfig {
    /// [`WAYPOINT_CONFIG_VERSION`].
    pub version: u32,
    /// The waypoint's Gateway (class `istio-waypoint`).
    pub waypoint: WaypointName,
    /// The mesh's trust domain: a workload's principal is
    /// `{trust_domain}/ns/{namespace}/sa/{service_account}`.
    pub trust_domain: String,
    /// The services bound to this waypoint, by id (unique).
    pub services: Vec<Service>,
    /// Where routes send requests; routes name them by index.
    pub clusters: Vec<Cluster>,
    /// The mesh's workloads, by address: who a client is, from its source address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<Workload>,
    /// The AuthorizationPolicies this waypoint enforces ([`AuthorizationPolicy`]), in no
    /// particular order (their evaluation does not depend on it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<AuthorizationPolicy>,
}

/// A waypoint: its Gateway's namespace and name.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointName {
    pub namespace: String,
    pub name: String,
}

/// A service bound to the waypoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// The service id the kernel writes into the SYN (the node snapshots' `ServiceValue::service_id`).
    pub id: u32,
    /// Its host name (`reviews.default.svc.cluster.local`): Istio's `destination_service`.
    pub hostname: String,
    pub namespace: String,
    pub name: String,
    /// Its ports (unique by number).
    pub ports: Vec<ServicePort>,
}

/// One port of a bound service: how its traffic is recognised and routed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// The service port the client dialled.
    pub port: u16,
    pub protocol: Protocol,
    /// HTTP routes in order; the first that matches a request takes it. A request no route matches
    /// gets a 404 (as Envoy's `NR`). The compiler always writes a last catch-all route to the
    /// service itself when no VirtualService or HTTPRoute covers every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRoute>,
    /// Where a connection that is not HTTP goes (weighted); empty refuses it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<WeightedCluster>,
}

/// How a port's traffic is recognised, as Istio does: by the port's name or `appProtocol`, else by
/// its first bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Protocol {
    /// HTTP/1.1, or HTTP/2 with prior knowledge (h2c) when the client opens with its preface.
    Http,
    /// HTTP/2 only (h2c, `grpc`, `http2`).
    Http2,
    /// Never parsed: proxied as bytes.
    Tcp,
    /// Sniffed: HTTP when the first bytes are an HTTP/1.x request line or the HTTP/2 preface
    /// (within a timeout), TCP otherwise.
    #[default]
    Detect,
}

/// One `http` route of a VirtualService, or one rule × match list of an HTTPRoute.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    /// Where it came from (`VirtualService default/reviews spec.http[0]`), for logs and dumps.
    pub origin: String,
    /// The route applies when any of these matches; an empty list matches every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RequestMatch>,
    pub action: RouteAction,
    /// Applied to the request before it is forwarded (after the route's rewrite).
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub request_headers: HeaderOps,
    /// Applied to the response before it is returned.
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub response_headers: HeaderOps,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// The whole request's deadline, retries included; `None`: no deadline (Istio's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// `None`: no retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Copies of the request sent without waiting for them (their answers are dropped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
}

/// A request matches when every condition set here holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMatch {
    /// On the path, without the query string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Istio's `ignoreUriCase`: the path comparison ignores ASCII case.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ignore_path_case: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    /// On the `:authority` (HTTP/2) or `Host` (HTTP/1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<QueryParamMatch>,
    /// The service port the client dialled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The client workload's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    /// Labels the client workload must all have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
}

/// A string comparison. `Regex` is RE2 syntax and must match the whole value (Istio's and the
/// Gateway API's semantics).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

/// A path comparison: Istio's (exact, string prefix, regex) and the Gateway API's `PathPrefix`,
/// which matches whole segments (`/foo` matches `/foo` and `/foo/bar`, not `/foobar`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    SegmentPrefix(String),
    Regex(String),
}

/// A header condition. Names are lowercase.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    /// `None`: the header is present, whatever its value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<StringMatch>,
    /// Istio's `withoutHeaders`: the condition holds when the comparison does not.
    #[serde(default, skip_serializing_if = "is_false")]
    pub invert: bool,
}

/// A query parameter condition (names are case-sensitive).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueryParamMatch {
    pub name: String,
    /// `None`: the parameter is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<StringMatch>,
}

/// What a matched route does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RouteAction {
    /// Forward to one of these, chosen by weight (the total is positive).
    Forward(Vec<WeightedCluster>),
    Redirect(Redirect),
    DirectResponse(DirectResponse),
}

/// A cluster with a weight, and header operations of that destination alone.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedCluster {
    /// An index into [`WaypointConfig::clusters`].
    pub cluster: u32,
    pub weight: u32,
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub request_headers: HeaderOps,
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub response_headers: HeaderOps,
}

/// An HTTP redirect; unset parts keep the request's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// The host name, without port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

/// An answer the waypoint gives itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// How a path is rewritten (a request's before forwarding, or a redirect's location).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PathRewrite {
    /// The whole path becomes this.
    Full(String),
    /// The part of the path the matching `Prefix` or `SegmentPrefix` path match matched becomes
    /// this (Istio's `rewrite.uri` after a prefix match, the Gateway API's `ReplacePrefixMatch`).
    /// After a match of another kind, or no path match, the whole path is replaced.
    MatchedPrefix(String),
    /// Istio's `uriRegexRewrite`.
    Regex(RegexRewrite),
}

/// Every match of `pattern` (RE2) in the path is replaced with `substitution` (`\1`: a group).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegexRewrite {
    pub pattern: String,
    pub substitution: String,
}

/// A request rewrite before it is forwarded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
    /// The new `Host`/`:authority`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

/// Header operations, applied in this order: remove, set (replaces every value), add (appends).
/// Names are lowercase.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOps {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<Header>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<Header>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// Retries of a request that failed in one of the [`RetryPolicy::retry_on`] ways.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first try (Istio's `attempts`).
    pub attempts: u32,
    /// The deadline of each try; `None`: only the route's timeout bounds a try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    pub retry_on: Vec<RetryOn>,
    /// The statuses [`RetryOn::RetriableStatusCodes`] retries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
}

/// Envoy's `retry_on` conditions that Istio's `retryOn` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// `5xx`: any 5xx answer, a reset, or a failed connect.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503 or 504, a reset, or a failed connect: Envoy counts a reset as the 503 it turns
    /// into (`wouldRetryFromReset` retries resets for `5xx` and `gateway-error` alike).
    GatewayError,
    /// The upstream reset the connection or stream before answering.
    Reset,
    ConnectFailure,
    /// An HTTP/2 `REFUSED_STREAM`.
    RefusedStream,
    /// 409 (Envoy's `retriable-4xx`).
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    /// A status in [`RetryPolicy::retriable_status_codes`].
    RetriableStatusCodes,
    /// gRPC statuses in the `grpc-status` header: CANCELLED (1), DEADLINE_EXCEEDED (4),
    /// RESOURCE_EXHAUSTED (8), INTERNAL (13), UNAVAILABLE (14).
    Cancelled,
    DeadlineExceeded,
    ResourceExhausted,
    Internal,
    Unavailable,
}

/// Faults injected before the request is forwarded.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelayFault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortFault>,
}

/// Hold the request this long, for `percent` % of requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DelayFault {
    pub fixed_delay_ms: u64,
    /// 0 to 100.
    pub percent: f64,
}

/// Answer with this status instead of forwarding, for `percent` % of requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AbortFault {
    pub status: u16,
    /// 0 to 100.
    pub percent: f64,
}

/// A copy of the request to another cluster, for `percent` % of requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    /// An index into [`WaypointConfig::clusters`].
    pub cluster: u32,
    /// 0 to 100.
    pub percent: f64,
}

/// A set of endpoints of one service port (and subset), and how to choose among them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cluster {
    /// Istio's name for it: `outbound|9080|v2|reviews.default.svc.cluster.local`.
    pub name: String,
    /// The destination service's host name, port and subset (for metrics and logs).
    pub hostname: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// How the waypoint speaks to the endpoints: `Http2` for HTTP/2 ports, else as the client.
    pub protocol: Protocol,
    pub load_balancer: LoadBalancer,
    /// The ready endpoints; empty: requests get a 503 (Envoy's `UH`).
    pub endpoints: Vec<Endpoint>,
}

/// A ready endpoint: a pod address and its target port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub address: SocketAddr,
}

/// DestinationRule `trafficPolicy.loadBalancer`. Istio's default is least request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    Random,
    RoundRobin,
    #[default]
    LeastRequest,
    /// The same key reaches the same endpoint while the endpoints do not change.
    ConsistentHash(HashKey),
}

/// What a consistent hash is computed over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HashKey {
    /// A request header's value (lowercase name); a request without it goes to a random endpoint.
    Header(String),
    Cookie(HashCookie),
    /// The client's address.
    SourceIp,
    QueryParameter(String),
}

/// A cookie's value. A request without it gets one when `ttl_ms` is set: the waypoint sets it on
/// the response (with `path`, and `ttl_ms` as Max-Age), as Envoy does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HashCookie {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// A workload of the mesh: the addresses its connections come from, and who it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub addresses: Vec<IpAddr>,
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The workload's name as Istio's telemetry names it (`source_workload`): the pod's
    /// controller (a Deployment's name for its pods), the same rule as the node snapshots'
    /// names; empty means the pod's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workload: String,
    pub service_account: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Workload {
    /// Its name in telemetry (`source_workload`): the workload's, else the pod's.
    pub fn workload_name(&self) -> &str {
        if self.workload.is_empty() {
            &self.name
        } else {
            &self.workload
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl WaypointConfig {
    /// The configuration as JSON (deterministic: fields in declaration order, maps sorted).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec(self).expect("a WaypointConfig serializes")
    }

    /// Reads and validates a configuration: any error refuses it whole.
    pub fn from_json(bytes: &[u8]) -> Result<WaypointConfig, WaypointConfigError> {
        if bytes.len() > MAX_WAYPOINT_CONFIG_BYTES {
            return Err(WaypointConfigError::TooLarge {
                len: bytes.len(),
                max: MAX_WAYPOINT_CONFIG_BYTES,
            });
        }
        let config: WaypointConfig =
            serde_json::from_slice(bytes).map_err(|e| WaypointConfigError::Json(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The service the kernel names by `id`.
    pub fn service(&self, id: u32) -> Option<&Service> {
        self.services.iter().find(|s| s.id == id)
    }
}

impl Service {
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}
