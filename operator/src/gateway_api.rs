//! The parts of the Gateway API (`gateway.networking.k8s.io`) the compiler reads, as serde types:
//! `HTTPRoute` (v1, v1beta1), `TCPRoute` (v1alpha2, v1) and `ReferenceGrant` (v1beta1, v1).
//!
//! The fields the compiler honours are typed, the L7 ones included (matches, filters, timeouts and
//! the experimental `retry`: the waypoint's routes are compiled from them). What no part of the
//! mesh supports (an `ExtensionRef` filter's target, `sessionPersistence`, filter types this
//! version does not know) is kept as raw JSON or by name, to be reported. Durations are read
//! strictly ([`GatewayDuration`]). Defaults are the CRD's
//! (`gateway-api` v1.6 standard channel), because objects read from YAML files have not been
//! through the API server's defaulting: a `parentRef` without `group`/`kind` is a
//! `gateway.networking.k8s.io` `Gateway`, a `backendRef` without them is a core `Service`, an
//! omitted weight is 1, an omitted `rules` is one rule matching every request, an omitted `matches`
//! is `PathPrefix /`.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::Value;

use crate::durations::GatewayDuration;

/// The API group of the Gateway API.
pub const GROUP: &str = "gateway.networking.k8s.io";

/// A Gateway API object: metadata plus a typed spec (an object without spec reads as the default).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Object<S> {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: S,
}

impl<S> Object<S> {
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("")
    }
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }
}

pub type HttpRoute = Object<HttpRouteSpec>;
pub type TcpRoute = Object<TcpRouteSpec>;
pub type ReferenceGrant = Object<ReferenceGrantSpec>;

/// `spec.parentRefs[]`: what a route attaches to.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: String,
    /// For a Service parent: the name of a Service port.
    pub section_name: Option<String>,
    /// For a Service parent: a Service port (`port`, not `targetPort`).
    pub port: Option<i32>,
}

impl ParentReference {
    /// The group, defaulted as the CRD does (`gateway.networking.k8s.io`).
    pub fn group(&self) -> &str {
        self.group.as_deref().unwrap_or(GROUP)
    }
    /// The kind, defaulted as the CRD does (`Gateway`).
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or("Gateway")
    }
    /// A core Service parent (GAMMA): the route is a mesh route for that Service.
    pub fn is_service(&self) -> bool {
        self.group().is_empty() && self.kind() == "Service"
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default = "default_http_rules")]
    pub rules: Vec<HttpRouteRule>,
}

impl Default for HttpRouteSpec {
    fn default() -> Self {
        HttpRouteSpec {
            parent_refs: Vec::new(),
            hostnames: Vec::new(),
            rules: default_http_rules(),
        }
    }
}

/// The CRD's default for an omitted `rules`: one rule matching every request, with no backends.
fn default_http_rules() -> Vec<HttpRouteRule> {
    vec![HttpRouteRule::default()]
}

/// `spec.rules[]` of an HTTPRoute.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    pub name: Option<String>,
    /// Omitted (or empty) means one match, `PathPrefix /`: every request.
    pub matches: Option<Vec<HttpRouteMatch>>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Experimental channel.
    pub retry: Option<HttpRouteRetry>,
    /// Experimental channel.
    pub session_persistence: Option<Value>,
}

impl HttpRouteRule {
    /// Whether one of the rule's matches matches every request (what connect() can honour).
    pub fn has_catch_all(&self) -> bool {
        match &self.matches {
            None => true,
            Some(m) => m.is_empty() || m.iter().any(HttpRouteMatch::is_catch_all),
        }
    }

    /// Whether one of the rule's matches looks at request content.
    pub fn has_request_match(&self) -> bool {
        self.matches
            .iter()
            .flatten()
            .any(|m| !HttpRouteMatch::is_catch_all(m))
    }

    /// The L7 settings of the rule other than its matches and filters, by field name.
    pub fn l7_fields(&self) -> Vec<&'static str> {
        [
            ("timeouts", self.timeouts.is_some()),
            ("retry", self.retry.is_some()),
            ("sessionPersistence", self.session_persistence.is_some()),
        ]
        .iter()
        .filter(|(_, present)| *present)
        .map(|(field, _)| *field)
        .collect()
    }
}

/// `spec.rules[].matches[]`: the fields within one match are ANDed, matches are ORed.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    pub path: Option<HttpPathMatch>,
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
    #[serde(default)]
    pub query_params: Vec<HttpHeaderMatch>,
    pub method: Option<String>,
}

impl HttpRouteMatch {
    /// `PathPrefix /` (the default path) and nothing else: matches every request.
    pub fn is_catch_all(&self) -> bool {
        let path_all = self.path.as_ref().is_none_or(|p| {
            p.type_.unwrap_or_default() == PathMatchType::PathPrefix
                && p.value.as_deref().unwrap_or("/") == "/"
        });
        path_all && self.headers.is_empty() && self.query_params.is_empty() && self.method.is_none()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct HttpPathMatch {
    /// Defaults to `PathPrefix`.
    #[serde(rename = "type")]
    pub type_: Option<PathMatchType>,
    /// Defaults to `/`.
    pub value: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

/// A header or query parameter match: `type` (`Exact`, the default, or `RegularExpression`),
/// `name`, `value`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct HttpHeaderMatch {
    #[serde(rename = "type")]
    pub type_: Option<ValueMatchType>,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

/// A filter of a rule or of a backendRef: its `type` and the field of that type.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub type_: FilterType,
    pub request_header_modifier: Option<HeaderModifier>,
    pub response_header_modifier: Option<HeaderModifier>,
    pub request_redirect: Option<RequestRedirect>,
    pub url_rewrite: Option<UrlRewrite>,
    pub request_mirror: Option<RequestMirror>,
    pub extension_ref: Option<Value>,
}

/// The `type` of a filter; a type this version does not know is kept by name, to be reported.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestRedirect,
    UrlRewrite,
    RequestMirror,
    ExtensionRef,
    Other(String),
}

impl From<String> for FilterType {
    fn from(name: String) -> Self {
        match name.as_str() {
            "RequestHeaderModifier" => FilterType::RequestHeaderModifier,
            "ResponseHeaderModifier" => FilterType::ResponseHeaderModifier,
            "RequestRedirect" => FilterType::RequestRedirect,
            "URLRewrite" => FilterType::UrlRewrite,
            "RequestMirror" => FilterType::RequestMirror,
            "ExtensionRef" => FilterType::ExtensionRef,
            _ => FilterType::Other(name),
        }
    }
}

impl FilterType {
    /// The type as written in the object.
    pub fn name(&self) -> &str {
        match self {
            FilterType::RequestHeaderModifier => "RequestHeaderModifier",
            FilterType::ResponseHeaderModifier => "ResponseHeaderModifier",
            FilterType::RequestRedirect => "RequestRedirect",
            FilterType::UrlRewrite => "URLRewrite",
            FilterType::RequestMirror => "RequestMirror",
            FilterType::ExtensionRef => "ExtensionRef",
            FilterType::Other(name) => name,
        }
    }
}

/// `RequestHeaderModifier` / `ResponseHeaderModifier`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<HttpHeader>,
    #[serde(default)]
    pub add: Vec<HttpHeader>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<HttpPathModifier>,
    pub port: Option<i32>,
    /// Defaults to 302.
    pub status_code: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<HttpPathModifier>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPathModifier {
    #[serde(rename = "type")]
    pub type_: PathModifierType,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

/// `RequestMirror`: a backend and the share of requests copied to it (`percent`, or `fraction`;
/// neither: all).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: BackendRef,
    pub percent: Option<i32>,
    pub fraction: Option<Fraction>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Fraction {
    pub numerator: i32,
    /// Defaults to 100.
    pub denominator: Option<i32>,
}

/// `rules[].timeouts`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    pub request: Option<GatewayDuration>,
    pub backend_request: Option<GatewayDuration>,
}

/// `rules[].retry` (experimental channel).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct HttpRouteRetry {
    #[serde(default)]
    pub codes: Vec<i32>,
    pub attempts: Option<i32>,
    pub backoff: Option<GatewayDuration>,
}

/// `backendRefs[]` of an HTTPRoute or TCPRoute rule.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
    /// The backend's Service port; required for a Service backend.
    pub port: Option<i32>,
    /// Relative weight, 0 to 1,000,000; omitted means 1.
    pub weight: Option<i32>,
    /// HTTPRoute only: filters applied when the request goes to this backend.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
}

impl BackendRef {
    /// The group, defaulted as the CRD does (core: `""`).
    pub fn group(&self) -> &str {
        self.group.as_deref().unwrap_or("")
    }
    /// The kind, defaulted as the CRD does (`Service`).
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or("Service")
    }
    /// The weight, defaulted as the CRD does (1).
    pub fn weight(&self) -> i32 {
        self.weight.unwrap_or(1)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default)]
    pub rules: Vec<TcpRouteRule>,
}

/// `spec.rules[]` of a TCPRoute: nothing to match on, only backends.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRouteRule {
    pub name: Option<String>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ReferenceGrantSpec {
    #[serde(default)]
    pub from: Vec<ReferenceGrantFrom>,
    #[serde(default)]
    pub to: Vec<ReferenceGrantTo>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ReferenceGrantFrom {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ReferenceGrantTo {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    /// Omitted: every object of the kind in the grant's namespace.
    pub name: Option<String>,
}

impl ReferenceGrant {
    /// Whether this grant lets a `from_kind` route in `from_namespace` refer to the core Service
    /// `service` in the grant's own namespace.
    pub fn permits_service(&self, from_kind: &str, from_namespace: &str, service: &str) -> bool {
        self.spec
            .from
            .iter()
            .any(|f| f.group == GROUP && f.kind == from_kind && f.namespace == from_namespace)
            && self.spec.to.iter().any(|t| {
                t.group.is_empty()
                    && t.kind == "Service"
                    && t.name.as_deref().is_none_or(|n| n == service)
            })
    }
}

pub type Gateway = Object<GatewaySpec>;

/// The GatewayClass of ambient's waypoints: a Gateway of this class is a waypoint.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";

/// `spec` of a Gateway: only waypoints (class [`WAYPOINT_CLASS`]) concern the mesh.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
}

/// `spec.listeners[]` of a Gateway.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub port: i32,
    #[serde(default)]
    pub protocol: String,
}
