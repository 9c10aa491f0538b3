//! The parts of Istio's networking API the compiler reads, as serde types.
//!
//! Istio publishes no Rust types, so these follow the proto definitions (`networking/v1`) for the
//! fields the compiler honours. Fields that only a proxy can enforce are kept as raw JSON values:
//! the compiler needs to know that they are present, to report them, not what they hold. Unknown
//! fields are ignored, as the API server's structural schema would prune them anyway.
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

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
    pub matches: Option<Vec<Value>>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    pub redirect: Option<Value>,
    pub direct_response: Option<Value>,
    pub delegate: Option<Value>,
    pub rewrite: Option<Value>,
    pub timeout: Option<Value>,
    pub retries: Option<Value>,
    pub fault: Option<Value>,
    pub mirror: Option<Value>,
    pub mirrors: Option<Value>,
    pub mirror_percentage: Option<Value>,
    pub cors_policy: Option<Value>,
    pub headers: Option<Value>,
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
            Some(m) => {
                m.is_empty()
                    || m.iter()
                        .all(|v| v.as_object().is_some_and(|o| o.is_empty()))
            }
        }
    }
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
    pub headers: Option<Value>,
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
    pub port_level_settings: Vec<Value>,
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
    pub http_cookie: Option<Value>,
    pub http_query_parameter_name: Option<String>,
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
