//! The waypoint's clusters: one per (host, service port, subset), named as Istio names them
//! (`outbound|9080|v2|reviews.default.svc.cluster.local`). Decided here:
//! - endpoints: the catalog's ready endpoints of the service, at the port's target port (resolved
//!   per endpoint), narrowed to the subset's labels; IPv4 then IPv6;
//! - protocol: `Http2` for ports declared HTTP/2 only (`http2`, `grpc`, `h2c`), else `Http`;
//! - load balancer: the DestinationRule's, merged as Istio merges it (`MergeTrafficPolicy`): the
//!   top-level policy, replaced for the port by a matching `portLevelSettings` entry (which does
//!   not inherit); then the subset's policy where it sets a load balancer, itself replaced for the
//!   port by the subset's matching `portLevelSettings`. Istio's default is least request;
//! - a destination that names nothing known (no such host or port, no such subset) gets a cluster
//!   with no endpoints: its requests get a 503, as Envoy answers for a cluster it cannot find.
use std::{collections::BTreeMap, net::SocketAddr};

use kmesh_snapshot::waypoint::{Cluster, Endpoint, HashCookie, HashKey, LoadBalancer, Protocol};

use super::super::{
    Compiler,
    backend_sets::{self, endpoints},
    catalog::{Catalog, CatalogService},
};
use crate::{
    diagnostics::ObjectRef,
    durations::millis_ceil,
    istio::{self, DestinationRule, TrafficPolicy},
};

/// What a cluster stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(in crate::compile) struct ClusterKey {
    pub(in crate::compile) fqdn: String,
    pub(in crate::compile) port: u16,
    pub(in crate::compile) subset: Option<String>,
}

impl ClusterKey {
    pub(in crate::compile) fn of(
        service: &CatalogService<'_>,
        port: u16,
        subset: Option<&str>,
    ) -> Self {
        ClusterKey {
            fqdn: service.fqdn.clone(),
            port,
            subset: subset.map(str::to_string),
        }
    }

    /// Istio's name: `outbound|port|subset|host`.
    fn name(&self) -> String {
        let subset = self.subset.as_deref().unwrap_or("");
        format!("outbound|{}|{subset}|{}", self.port, self.fqdn)
    }
}

/// The clusters of one waypoint, each made once and named by its index.
#[derive(Debug, Default)]
pub(in crate::compile) struct ClusterSet {
    clusters: Vec<Cluster>,
    by_key: BTreeMap<ClusterKey, u32>,
}

impl ClusterSet {
    pub(in crate::compile) fn len(&self) -> usize {
        self.clusters.len()
    }

    pub(in crate::compile) fn into_clusters(self) -> Vec<Cluster> {
        self.clusters
    }

    /// The index of the cluster for `key`, made (and its DestinationRule read) the first time.
    pub(in crate::compile) fn index(
        &mut self,
        compiler: &mut Compiler<'_>,
        catalog: &Catalog<'_>,
        key: ClusterKey,
    ) -> u32 {
        if let Some(index) = self.by_key.get(&key) {
            return *index;
        }
        let cluster = compiler.cluster(catalog, &key);
        // More than 2^32 clusters cannot be held in memory anyway.
        let index = u32::try_from(self.clusters.len()).unwrap_or(u32::MAX);
        self.clusters.push(cluster);
        self.by_key.insert(key, index);
        index
    }
}

impl Compiler<'_> {
    /// The cluster `key` stands for.
    fn cluster(&mut self, catalog: &Catalog<'_>, key: &ClusterKey) -> Cluster {
        let mut cluster = Cluster {
            name: key.name(),
            hostname: key.fqdn.clone(),
            port: key.port,
            subset: key.subset.clone(),
            protocol: Protocol::Http,
            load_balancer: LoadBalancer::LeastRequest,
            endpoints: Vec::new(),
        };
        let Some(service) = catalog.get(&key.fqdn) else {
            return cluster;
        };
        let Some(port) = service.port(key.port) else {
            return cluster;
        };
        if port.http2 {
            cluster.protocol = Protocol::Http2;
        }
        let dr = self.destination_rule(&service.fqdn, &service.namespace);
        let subset = match (&key.subset, dr) {
            (None, _) => None,
            (Some(name), Some(dr)) => match backend_sets::subset(dr, name) {
                Some(subset) => Some(subset),
                None => return cluster, // reported where the route names it
            },
            (Some(_), None) => return cluster,
        };
        if let Some(dr) = dr {
            cluster.load_balancer = self.merged_load_balancer(dr, subset, key.port);
        }
        let no_labels = BTreeMap::new();
        let labels = subset.map_or(&no_labels, |s| &s.labels);
        cluster.endpoints = [false, true]
            .into_iter()
            .flat_map(|v6| endpoints(service, port, labels, v6))
            .map(|e| Endpoint {
                address: SocketAddr::new(e.ip, e.port),
            })
            .collect();
        cluster
    }

    /// The load balancer Istio applies to `port` of `subset` (see the module doc).
    fn merged_load_balancer(
        &mut self,
        dr: &DestinationRule,
        subset: Option<&istio::Subset>,
        port: u16,
    ) -> LoadBalancer {
        let object = backend_sets::object_of(dr);
        let mut chosen = None;
        if let Some(policy) = &dr.spec.traffic_policy {
            chosen =
                chosen_load_balancer(chosen, policy, "spec.trafficPolicy".to_string(), true, port);
        }
        if let Some(subset) = subset
            && let Some(policy) = &subset.traffic_policy
        {
            let k = dr
                .spec
                .subsets
                .iter()
                .position(|x| x.name == subset.name)
                .unwrap_or(0);
            let at = format!("spec.subsets[{k}].trafficPolicy");
            chosen = chosen_load_balancer(chosen, policy, at, false, port);
        }
        match chosen {
            Some((field, lb)) => self.waypoint_load_balancer(&object, &field, lb),
            None => LoadBalancer::LeastRequest,
        }
    }

    /// A DestinationRule `loadBalancer` as the waypoint's; what it cannot do is reported and the
    /// default (least request) used instead.
    fn waypoint_load_balancer(
        &mut self,
        object: &ObjectRef,
        field: &str,
        lb: &istio::LoadBalancer,
    ) -> LoadBalancer {
        if let Some(hash) = &lb.consistent_hash {
            return match hash_key(hash) {
                Ok(key) => LoadBalancer::ConsistentHash(key),
                Err(reason) => {
                    let field = format!("{field}.consistentHash");
                    self.reject(
                        object,
                        &field,
                        format!("{reason}; the waypoint uses least request"),
                    );
                    LoadBalancer::LeastRequest
                }
            };
        }
        match lb.simple.as_deref().unwrap_or("UNSPECIFIED") {
            "UNSPECIFIED" | "LEAST_REQUEST" | "LEAST_CONN" => LoadBalancer::LeastRequest,
            "ROUND_ROBIN" => LoadBalancer::RoundRobin,
            "RANDOM" => LoadBalancer::Random,
            other => {
                self.unenforced(
                    object,
                    &format!("{field}.simple"),
                    format!("{other} is not supported by the waypoint; it uses least request"),
                );
                LoadBalancer::LeastRequest
            }
        }
    }
}

/// The load balancer (and its field) after applying `policy` at `at` for `port`: its own load
/// balancer where it sets one (or, for a top-level policy, which `replaces_all`, none), then a
/// matching `portLevelSettings` entry, which replaces it without inheriting.
fn chosen_load_balancer<'d>(
    chosen: Option<(String, &'d istio::LoadBalancer)>,
    policy: &'d TrafficPolicy,
    at: String,
    replaces_all: bool,
    port: u16,
) -> Option<(String, &'d istio::LoadBalancer)> {
    let mut chosen = match &policy.load_balancer {
        Some(lb) => Some((format!("{at}.loadBalancer"), lb)),
        None if replaces_all => None,
        None => chosen,
    };
    let level = policy
        .port_level_settings
        .iter()
        .enumerate()
        .find(|(_, p)| p.port.as_ref().and_then(|s| s.number) == Some(u32::from(port)));
    if let Some((j, level)) = level {
        chosen = level
            .load_balancer
            .as_ref()
            .map(|lb| (format!("{at}.portLevelSettings[{j}].loadBalancer"), lb));
    }
    chosen
}

/// What a `consistentHash` hashes, or why the waypoint cannot use it.
fn hash_key(hash: &istio::ConsistentHash) -> Result<HashKey, String> {
    if let Some(name) = &hash.http_header_name {
        let name = name.to_ascii_lowercase();
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || !name.bytes().all(token) {
            return Err(format!("{name:?} is not an HTTP header name"));
        }
        return Ok(HashKey::Header(name));
    }
    if let Some(cookie) = &hash.http_cookie {
        if cookie.name.is_empty() {
            return Err("the cookie has no name".to_string());
        }
        return Ok(HashKey::Cookie(HashCookie {
            name: cookie.name.clone(),
            path: cookie.path.clone(),
            ttl_ms: cookie.ttl.map(|ttl| millis_ceil(ttl.0)),
        }));
    }
    if hash.use_source_ip == Some(true) {
        return Ok(HashKey::SourceIp);
    }
    match &hash.http_query_parameter_name {
        Some(name) if !name.is_empty() => Ok(HashKey::QueryParameter(name.clone())),
        _ => Err(
            "no hash key (httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName)"
                .to_string(),
        ),
    }
}
