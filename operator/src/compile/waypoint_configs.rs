//! Each waypoint's configuration (`kmesh_snapshot::waypoint::WaypointConfig`): the services bound
//! to it (`waypoint_bindings.rs`), under the ids the node snapshots' services table gives them
//! (the id the kernel writes into the SYN), each port with its HTTP routes (`l7/`) and its TCP
//! destination, the clusters those name, and the workloads that may be its clients. Decided here:
//! - a waypoint's configuration is the same in every mode, although only DualEngine steers to
//!   waypoints: the waypoint is kept warm, so that a switch to DualEngine needs only the nodes'
//!   new steering, and a connect steered there by a node that switched first finds its routes
//!   (a waypoint that listed nothing would refuse it). Its L7 diagnostics are DualEngine's only:
//!   in the other modes the kernel path's wording of the same fields stands, said once;
//! - a port's protocol is its declared one: HTTP (`Http`: HTTP/1.1 or h2c), opaque (`Tcp`), or
//!   undeclared (`Detect`: the waypoint sniffs, as Istio does);
//! - connections that are not HTTP go to the service itself (VirtualService `tcp` routes on a
//!   waypoint-bound service are not compiled for the waypoint yet: reported);
//! - the workloads are every pod with an address (each address with its one owner), so that the
//!   waypoint can name any client.
//! - the AuthorizationPolicies whose `targetRefs` name the waypoint or a service bound to it are
//!   its own (`waypoint_policies.rs`), in DualEngine only.
use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::core::v1::Pod;

use kmesh_snapshot::waypoint::{
    Protocol, Service, ServicePort, WAYPOINT_CONFIG_VERSION, WaypointConfig, WaypointName,
    WeightedCluster, Workload,
};

use super::{
    Compiler,
    catalog::{Catalog, CatalogService, PortProtocol},
    l7::{ClusterKey, ClusterSet, L7Sources},
    name_tables::pod_names,
    waypoint_bindings::WaypointBindings,
    workloads::{address_owners, pod_service_account},
};
use crate::{crd::Mode, kinds::Kind};

impl<'a> Compiler<'a> {
    /// The configuration of every waypoint; `service_ids` are the services table's ids by host.
    pub(super) fn waypoint_configs(
        &mut self,
        catalog: &Catalog<'_>,
        bindings: &WaypointBindings,
        service_ids: &BTreeMap<&str, u32>,
    ) -> BTreeMap<WaypointName, WaypointConfig> {
        let reported = self.diagnostics.len();
        let sources = (!bindings.services.is_empty()).then(|| self.l7_sources(catalog));
        let workloads = self.waypoint_workloads();
        let mut policies = self.waypoint_policies(catalog, bindings, service_ids);
        let mut configs = BTreeMap::new();
        for name in bindings.waypoints.keys() {
            let mut clusters = ClusterSet::default();
            let mut services = Vec::new();
            if let Some(sources) = &sources {
                for service in catalog.values() {
                    let key = (service.namespace.clone(), service.object.name.clone());
                    if service.object.kind != Kind::Service
                        || bindings.services.get(&key) != Some(name)
                    {
                        continue;
                    }
                    let Some(&id) = service_ids.get(service.fqdn.as_str()) else {
                        continue; // a service with no VIP is not in the services table
                    };
                    services.push(self.bound_service(id, service, sources, catalog, &mut clusters));
                }
            }
            let config = WaypointConfig {
                version: WAYPOINT_CONFIG_VERSION,
                waypoint: name.clone(),
                trust_domain: self.options.cluster_domain.clone(),
                services,
                clusters: clusters.into_clusters(),
                workloads: workloads.clone(),
                policies: policies.remove(name).unwrap_or_default(),
            };
            configs.insert(name.clone(), config);
        }
        if self.mode != Mode::DualEngine {
            self.diagnostics.truncate(reported);
        }
        configs
    }

    /// One bound service: every port with its HTTP routes and its TCP destination.
    fn bound_service(
        &mut self,
        id: u32,
        service: &CatalogService<'_>,
        sources: &L7Sources<'a>,
        catalog: &Catalog<'_>,
        clusters: &mut ClusterSet,
    ) -> Service {
        let mut ports = Vec::new();
        for port in &service.ports {
            let protocol = match port.protocol {
                PortProtocol::Http => Protocol::Http,
                PortProtocol::Opaque => Protocol::Tcp,
                PortProtocol::Unknown => Protocol::Detect,
            };
            let http = match protocol {
                Protocol::Tcp => Vec::new(),
                _ => self.waypoint_routes(sources, service, port, catalog, clusters),
            };
            let own = clusters.index(self, catalog, ClusterKey::of(service, port.port, None));
            ports.push(ServicePort {
                port: port.port,
                protocol,
                http,
                tcp: vec![WeightedCluster {
                    cluster: own,
                    weight: 1,
                    ..Default::default()
                }],
            });
        }
        Service {
            id,
            hostname: service.fqdn.clone(),
            namespace: service.namespace.clone(),
            name: service.object.name.clone(),
            ports,
        }
    }

    /// Every pod with an address, as the waypoint names its clients: each address once, with the
    /// pod [`address_owners`] gives it (the one rule every table keyed by pod address follows).
    fn waypoint_workloads(&self) -> Vec<Workload> {
        let mut by_pod: BTreeMap<(&str, &str), (&Pod, Vec<IpAddr>)> = BTreeMap::new();
        for (ip, pod) in address_owners(&self.inputs.pods) {
            let key = (
                pod.metadata.namespace.as_deref().unwrap_or("default"),
                pod.metadata.name.as_deref().unwrap_or(""),
            );
            let entry = by_pod.entry(key).or_insert_with(|| (pod, Vec::new()));
            entry.1.push(IpAddr::from(ip).to_canonical());
        }
        by_pod
            .into_iter()
            .map(|((namespace, name), (pod, addresses))| Workload {
                addresses,
                namespace: namespace.to_string(),
                name: name.to_string(),
                workload: pod_names(pod).workload.to_string(),
                service_account: pod_service_account(pod).unwrap_or("default").to_string(),
                labels: pod.metadata.labels.clone().unwrap_or_default(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use kmesh_snapshot::waypoint::{
        HeaderMatch, Protocol, RequestMatch, RouteAction, StringMatch, WaypointConfig, WaypointName,
    };

    use crate::compile::testing::{NODE, REVIEWS, bound_to_waypoint, compile_yaml, diagnostics};

    /// reviews' jason route.
    const JASON: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}}]
"#;

    fn waypoint() -> WaypointName {
        WaypointName {
            namespace: "default".into(),
            name: "waypoint".into(),
        }
    }

    #[test]
    fn a_bound_service_is_served_under_its_snapshot_id_with_its_routes() {
        let yaml = format!("{}---{JASON}---{REVIEWS}", bound_to_waypoint("DualEngine"));
        let compiled = compile_yaml(&yaml);
        let config = &compiled.waypoints[&waypoint()];
        // What a waypoint would read is what it accepts.
        assert_eq!(
            WaypointConfig::from_json(&config.to_json()).as_ref(),
            Ok(config)
        );
        let snapshot = compiled.snapshot(NODE).unwrap();
        let vip = kmesh_common::ipv4_mapped([10, 96, 0, 13]);
        let id = snapshot
            .services
            .iter()
            .find(|s| s.key.ip == vip)
            .unwrap()
            .value
            .service_id;
        assert_eq!(config.services.len(), 1);
        let service = config.service(id).expect("served under the snapshot's id");
        assert_eq!(service.hostname, "reviews.default.svc.cluster.local");
        let port = service.port(9080).unwrap();
        assert_eq!(port.protocol, Protocol::Http);
        assert_eq!(port.http.len(), 2);
        assert_eq!(
            port.http[0].matches,
            [RequestMatch {
                headers: vec![HeaderMatch {
                    name: "end-user".into(),
                    value: Some(StringMatch::Exact("jason".into())),
                    invert: false,
                }],
                ..Default::default()
            }]
        );
        let RouteAction::Forward(to) = &port.http[1].action else {
            panic!("{:?}", port.http[1].action)
        };
        let cluster = &config.clusters[to[0].cluster as usize];
        assert_eq!(
            cluster.name,
            "outbound|9080||reviews.default.svc.cluster.local"
        );
        assert_eq!(
            cluster.endpoints[0].address,
            "10.244.0.21:9080".parse().unwrap()
        );
        assert_eq!(port.tcp[0].cluster, to[0].cluster);
        assert!(config.workloads.iter().any(|w| w.name == "reviews-v1"));
    }

    /// A Deployment's pod is named by its workload (the Deployment), as Istio's telemetry names
    /// it; a pod with no controller by its own name.
    #[test]
    fn workloads_carry_their_workload_name() {
        let pods = r#"
apiVersion: v1
kind: Pod
metadata:
  name: ratings-v1-7f9d8-abcde
  generateName: ratings-v1-7f9d8-
  namespace: default
  labels: {app: ratings, pod-template-hash: 7f9d8}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: ratings-v1-7f9d8, uid: u, controller: true}]
spec: {nodeName: node-1}
status: {podIP: 10.244.0.31, conditions: [{type: Ready, status: "True"}]}
"#;
        let yaml = format!(
            "{}---{JASON}---{REVIEWS}---{pods}",
            bound_to_waypoint("DualEngine")
        );
        let compiled = compile_yaml(&yaml);
        let workloads = &compiled.waypoints[&waypoint()].workloads;
        let by_pod = |name: &str| workloads.iter().find(|w| w.name == name).unwrap();
        let ratings = by_pod("ratings-v1-7f9d8-abcde");
        assert_eq!(
            (ratings.workload.as_str(), ratings.workload_name()),
            ("ratings-v1", "ratings-v1")
        );
        assert_eq!(by_pod("reviews-v1").workload_name(), "reviews-v1");
    }

    /// The waypoint is kept warm: outside DualEngine its configuration is DualEngine's, so a
    /// switch of mode needs only the nodes' steering; its L7 diagnostics are not repeated.
    #[test]
    fn outside_dual_engine_a_waypoint_keeps_the_dual_engine_configuration() {
        // A field the waypoint reports (CORS), to see whose wording a mode gets.
        let jason_with_cors = JASON.replace(
            "  - route: [{destination: {host: reviews}}]",
            "  - route: [{destination: {host: reviews}}]\n    corsPolicy: {allowOrigins: [{exact: x}]}",
        );
        let compile_in = |mode: &str| {
            let yaml = format!(
                "{}---{jason_with_cors}---{REVIEWS}",
                bound_to_waypoint(mode)
            );
            compile_yaml(&yaml)
        };
        let dual_engine = compile_in("DualEngine");
        assert!(!dual_engine.waypoints[&waypoint()].services.is_empty());
        let reports = diagnostics(&dual_engine);
        assert!(
            reports
                .iter()
                .any(|d| d.contains("CORS is not supported by the waypoint")),
            "{reports:#?}"
        );
        for mode in ["KernelNative", "Disabled"] {
            let compiled = compile_in(mode);
            assert_eq!(
                compiled.waypoints[&waypoint()],
                dual_engine.waypoints[&waypoint()],
                "{mode}"
            );
            let reports = diagnostics(&compiled);
            assert!(
                !reports.iter().any(|d| d.contains("by the waypoint")),
                "{mode}: {reports:#?}"
            );
        }
    }
}
