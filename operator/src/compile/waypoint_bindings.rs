//! Waypoints and the services bound to them (DualEngine, issue #11), as ambient decides it:
//! - a waypoint is a Gateway of class `istio-waypoint` with a listener of protocol `HBONE` (the
//!   port its replicas listen on; kmesh-rs's waypoint speaks plain TCP there, the original
//!   destination in the SYN, not HBONE: see docs/dual-engine.md);
//! - a Service uses the waypoint its label `istio.io/use-waypoint` names, else the one its
//!   namespace's label names; the value `none` on the Service opts it out of its namespace's.
//!   `istio.io/use-waypoint-namespace` beside it names the waypoint's namespace (default: the
//!   labelled object's);
//! - a waypoint serves services unless its label `istio.io/waypoint-for` says `workload` or
//!   `none` (`service`, the default, and `all` serve them; the workload half of `all` is not
//!   supported and is reported);
//! - a Service whose label names no such waypoint is not bound: it stays on the kernel path and
//!   the label is reported, as istiod reports it in the Service's `WaypointBound` condition.
//!
//! Bindings are decided in every mode; only DualEngine steers to waypoints. Labels on Pods
//! (workload waypoints) and ServiceEntries are reported as not supported yet.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kmesh_snapshot::waypoint::WaypointName;

use super::Compiler;
use crate::{
    crd::Mode,
    diagnostics::ObjectRef,
    gateway_api::{Gateway, WAYPOINT_CLASS},
    kinds::Kind,
    waypoints::objects::MANAGED_LABEL,
};

/// The label that binds a Service (or every Service of a namespace) to a waypoint.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// Beside [`USE_WAYPOINT`]: the waypoint's namespace.
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// On a waypoint's Gateway: what traffic it serves.
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// The label value that opts out of an inherited waypoint.
const NONE: &str = "none";
/// The listener protocol of ambient's waypoints.
const HBONE: &str = "HBONE";

/// A waypoint that exists and serves services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waypoint {
    /// The port its replicas listen on (its `HBONE` listener's).
    pub port: u16,
}

/// The compile's waypoints and which Services use them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaypointBindings {
    pub waypoints: BTreeMap<WaypointName, Waypoint>,
    /// Bound Services by (namespace, name); every waypoint named here is in `waypoints`.
    pub services: BTreeMap<(String, String), WaypointName>,
}

/// A waypoint Gateway's `HBONE` listener: its index and its port (`Err`: not a valid port).
fn hbone_listener(gateway: &Gateway) -> Option<(usize, Result<u16, std::num::TryFromIntError>)> {
    let (i, listener) = gateway
        .spec
        .listeners
        .iter()
        .enumerate()
        .find(|(_, l)| l.protocol == HBONE)?;
    Some((i, u16::try_from(listener.port)))
}

/// The port a waypoint's replicas listen on: its `HBONE` listener's, when valid.
pub fn waypoint_port(gateway: &Gateway) -> Option<u16> {
    hbone_listener(gateway)?.1.ok().filter(|p| *p != 0)
}

/// Whether a waypoint controller (this operator's, or istiod's) made the object for a waypoint.
fn managed_by_a_waypoint_controller(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .is_some_and(|l| l.contains_key(MANAGED_LABEL))
}

/// What a label set says about the waypoint to use.
enum Choice {
    /// No label: inherit (for a Service, its namespace's choice).
    Inherit,
    /// `none`: no waypoint, whatever is inherited.
    OptOut,
    Use(WaypointName),
}

fn choice(meta: &ObjectMeta, own_namespace: &str) -> Choice {
    let labels = meta.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    match label(USE_WAYPOINT) {
        None | Some("") => Choice::Inherit,
        Some(NONE) => Choice::OptOut,
        Some(name) => Choice::Use(WaypointName {
            namespace: label(USE_WAYPOINT_NAMESPACE)
                .filter(|ns| !ns.is_empty())
                .unwrap_or(own_namespace)
                .to_string(),
            name: name.to_string(),
        }),
    }
}

impl Compiler<'_> {
    /// The waypoints and the Services bound to them, with every label or Gateway that cannot be
    /// honoured reported.
    pub(super) fn waypoint_bindings(&mut self) -> WaypointBindings {
        let waypoints = self.waypoints();
        let mut by_namespace: BTreeMap<&str, (Choice, ObjectRef)> = BTreeMap::new();
        for ns in &self.inputs.namespaces {
            let name = ns.metadata.name.as_deref().unwrap_or("");
            let object = ObjectRef::new(Kind::Namespace, None, name);
            by_namespace.insert(name, (choice(&ns.metadata, name), object));
        }
        let mut services = BTreeMap::new();
        for service in &self.inputs.services {
            let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
            let name = service.metadata.name.as_deref().unwrap_or("");
            let own = ObjectRef::new(Kind::Service, Some(namespace), name);
            let this = WaypointName {
                namespace: namespace.to_string(),
                name: name.to_string(),
            };
            if waypoints.contains_key(&this) || managed_by_a_waypoint_controller(&service.metadata)
            {
                // A waypoint's own Service (its replicas): never steered to a waypoint, which
                // would loop. Known by its label too: after its Gateway is deleted it stays until
                // the garbage collector removes it, and is no Service a label is meant for.
                continue;
            }
            let (wanted, labelled) = match choice(&service.metadata, namespace) {
                Choice::OptOut => continue,
                Choice::Use(w) => (w, own),
                Choice::Inherit => match by_namespace.get(namespace) {
                    Some((Choice::Use(w), ns)) => (w.clone(), ns.clone()),
                    _ => continue,
                },
            };
            if waypoints.contains_key(&wanted) {
                services.insert((namespace.to_string(), name.to_string()), wanted);
            } else {
                let reason = format!(
                    "waypoint {}/{} is not a Gateway of class {WAYPOINT_CLASS} serving services: Service {namespace}/{name} stays on the kernel path",
                    wanted.namespace, wanted.name
                );
                self.reject(
                    &labelled,
                    &format!("metadata.labels[{USE_WAYPOINT}]"),
                    reason,
                );
            }
        }
        self.report_workload_waypoints();
        self.report_bindings_outside_dual_engine(&services);
        WaypointBindings {
            waypoints,
            services,
        }
    }

    /// Only DualEngine steers to waypoints: in the other modes, say so for each bound Service.
    fn report_bindings_outside_dual_engine(
        &mut self,
        services: &BTreeMap<(String, String), WaypointName>,
    ) {
        if self.mode == Mode::DualEngine {
            return;
        }
        for ((namespace, name), waypoint) in services {
            let object = ObjectRef::new(Kind::Service, Some(namespace), name);
            let reason = format!(
                "uses waypoint {}/{}, which only mode DualEngine steers to: its traffic stays on the kernel path",
                waypoint.namespace, waypoint.name
            );
            self.note(&object, &format!("metadata.labels[{USE_WAYPOINT}]"), reason);
        }
    }

    /// The Gateways of class `istio-waypoint` that serve services, by name.
    fn waypoints(&mut self) -> BTreeMap<WaypointName, Waypoint> {
        let mut waypoints = BTreeMap::new();
        for gateway in &self.inputs.gateways {
            if gateway.spec.gateway_class_name != WAYPOINT_CLASS {
                continue;
            }
            let object = ObjectRef::new(Kind::Gateway, Some(gateway.namespace()), gateway.name());
            let serves = gateway
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(WAYPOINT_FOR))
                .map_or("service", String::as_str);
            match serves {
                "service" => {}
                "all" => self.unenforced(
                    &object,
                    &format!("metadata.labels[{WAYPOINT_FOR}]"),
                    "waypoints for workloads are not supported yet: this waypoint serves the services bound to it only",
                ),
                "workload" | "none" => {
                    self.note(
                        &object,
                        &format!("metadata.labels[{WAYPOINT_FOR}]"),
                        format!("{serves}: the waypoint serves no service"),
                    );
                    continue;
                }
                other => {
                    self.reject(
                        &object,
                        &format!("metadata.labels[{WAYPOINT_FOR}]"),
                        format!("{other:?} is not service, workload, all or none"),
                    );
                    continue;
                }
            }
            match hbone_listener(gateway) {
                Some((_, Ok(port))) if port != 0 => {
                    let name = WaypointName {
                        namespace: gateway.namespace().to_string(),
                        name: gateway.name().to_string(),
                    };
                    waypoints.insert(name, Waypoint { port });
                }
                Some((i, _)) => self.reject(
                    &object,
                    &format!("spec.listeners[{i}].port"),
                    "not a port from 1 to 65535",
                ),
                None => self.reject(
                    &object,
                    "spec.listeners",
                    format!("a waypoint needs a listener of protocol {HBONE} (its replicas' port)"),
                ),
            }
        }
        waypoints
    }

    /// Waypoint labels on Pods and ServiceEntries: not supported yet, said.
    fn report_workload_waypoints(&mut self) {
        let labelled = |meta: &ObjectMeta| {
            meta.labels
                .as_ref()
                .and_then(|l| l.get(USE_WAYPOINT))
                .is_some_and(|v| v != NONE && !v.is_empty())
        };
        let mut reports = Vec::new();
        for pod in &self.inputs.pods {
            if labelled(&pod.metadata) {
                let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
                let name = pod.metadata.name.as_deref().unwrap_or("");
                reports.push((
                    ObjectRef::new(Kind::Pod, Some(ns), name),
                    "workload waypoints",
                ));
            }
        }
        for entry in &self.inputs.service_entries {
            if labelled(&entry.metadata) {
                let object =
                    ObjectRef::new(Kind::ServiceEntry, Some(entry.namespace()), entry.name());
                reports.push((object, "waypoints for ServiceEntries"));
            }
        }
        for (object, what) in reports {
            self.unenforced(
                &object,
                &format!("metadata.labels[{USE_WAYPOINT}]"),
                format!("{what} are not supported yet: its traffic stays on the kernel path"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{compile::CompileOptions, inputs::Inputs};

    fn bindings(yaml: &str) -> (WaypointBindings, Vec<String>) {
        let mut inputs = Inputs::default();
        let read = inputs.add_yaml(yaml, "test.yaml", "default");
        assert!(read.is_empty(), "{read:?}");
        let options = CompileOptions::default();
        let mut c = Compiler::new(&inputs, &options);
        let b = c.waypoint_bindings();
        (b, c.diagnostics.iter().map(ToString::to_string).collect())
    }

    const DUAL_ENGINE: &str = r#"
apiVersion: kmesh.net/v1alpha1
kind: KmeshConfig
metadata: {name: default}
spec: {mode: DualEngine}
"#;

    const WAYPOINTS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bookinfo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: shared, namespace: infra}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15009, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: bookinfo}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP}]
"#;

    fn service(ns: &str, name: &str, labels: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{clusterIP: 10.96.0.9, ports: [{{port: 9080}}]}}\n"
        )
    }

    impl WaypointBindings {
        fn of_service(&self, namespace: &str, name: &str) -> Option<&WaypointName> {
            self.services
                .get(&(namespace.to_string(), name.to_string()))
        }
    }

    fn name(ns: &str, name: &str) -> WaypointName {
        WaypointName {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn services_use_their_own_label_else_their_namespace_s() {
        let yaml = format!(
            "{DUAL_ENGINE}---{WAYPOINTS}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: bookinfo, labels: {{istio.io/use-waypoint: waypoint}}}}\n{}{}{}{}{}",
            service("bookinfo", "reviews", ""),
            service("bookinfo", "ratings", "istio.io/use-waypoint: none"),
            service(
                "bookinfo",
                "details",
                "istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra"
            ),
            service("other", "unlabelled", ""),
            service(
                "other",
                "own",
                "istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: bookinfo"
            ),
        );
        let (b, diagnostics) = bindings(&yaml);
        assert_eq!(diagnostics, Vec::<String>::new());
        assert_eq!(
            b.waypoints.keys().cloned().collect::<Vec<_>>(),
            [name("bookinfo", "waypoint"), name("infra", "shared")]
        );
        assert_eq!(
            b.waypoints[&name("infra", "shared")],
            Waypoint { port: 15009 }
        );
        assert_eq!(
            b.of_service("bookinfo", "reviews"),
            Some(&name("bookinfo", "waypoint"))
        );
        assert_eq!(b.of_service("bookinfo", "ratings"), None);
        assert_eq!(
            b.of_service("bookinfo", "details"),
            Some(&name("infra", "shared"))
        );
        assert_eq!(b.of_service("other", "unlabelled"), None);
        assert_eq!(
            b.of_service("other", "own"),
            Some(&name("bookinfo", "waypoint"))
        );
        assert_eq!(b.services.len(), 3);
    }

    #[test]
    fn a_deleted_waypoint_s_own_service_is_never_bound_nor_reported() {
        // Gateway `gone` was deleted; its Service waits for the garbage collector in a namespace
        // whose label names it.
        let yaml = format!(
            "{DUAL_ENGINE}---{WAYPOINTS}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/use-waypoint: gone}}}}\n{}{}",
            service(
                "shop",
                "gone",
                "gateway.istio.io/managed: kmesh.net-waypoint-controller, gateway.networking.k8s.io/gateway-name: gone"
            ),
            service("shop", "reviews", ""),
        );
        let (b, diagnostics) = bindings(&yaml);
        assert!(b.services.is_empty(), "{b:?}");
        assert_eq!(
            diagnostics,
            [
                "rejected: Namespace shop metadata.labels[istio.io/use-waypoint]: waypoint shop/gone is not a Gateway of class istio-waypoint serving services: Service shop/reviews stays on the kernel path"
            ]
        );
    }

    #[test]
    fn outside_dual_engine_bound_services_are_told_they_stay_on_the_kernel_path() {
        let yaml = format!(
            "{WAYPOINTS}{}",
            service("bookinfo", "reviews", "istio.io/use-waypoint: waypoint")
        );
        let (b, diagnostics) = bindings(&yaml);
        assert_eq!(b.services.len(), 1);
        assert_eq!(
            diagnostics,
            [
                "note: Service bookinfo/reviews metadata.labels[istio.io/use-waypoint]: uses waypoint bookinfo/waypoint, which only mode DualEngine steers to: its traffic stays on the kernel path"
            ]
        );
    }

    #[test]
    fn a_label_naming_no_waypoint_leaves_the_service_unbound_and_is_reported() {
        let yaml = format!(
            "{WAYPOINTS}{}{}",
            service("bookinfo", "reviews", "istio.io/use-waypoint: missing"),
            service("bookinfo", "details", "istio.io/use-waypoint: ingress"),
        );
        let (b, diagnostics) = bindings(&yaml);
        assert!(b.services.is_empty());
        assert_eq!(diagnostics.len(), 2, "{diagnostics:#?}");
        assert_eq!(
            diagnostics[0],
            "rejected: Service bookinfo/reviews metadata.labels[istio.io/use-waypoint]: waypoint bookinfo/missing is not a Gateway of class istio-waypoint serving services: Service bookinfo/reviews stays on the kernel path"
        );
        assert!(diagnostics[1].contains("waypoint bookinfo/ingress is not a Gateway"));
    }

    #[test]
    fn gateways_that_serve_no_service_or_have_no_hbone_listener_are_not_waypoints() {
        let yaml = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: workloads-only, namespace: ns, labels: {istio.io/waypoint-for: workload}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: invalid, namespace: ns}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 1234, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: everything, namespace: ns, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;
        let (b, diagnostics) = bindings(yaml);
        assert_eq!(
            b.waypoints.keys().cloned().collect::<Vec<_>>(),
            [name("ns", "everything")]
        );
        assert_eq!(diagnostics.len(), 3, "{diagnostics:#?}");
        let all = diagnostics.join("\n");
        for expected in [
            "waypoints for workloads are not supported yet",
            "a waypoint needs a listener of protocol HBONE",
            "workload: the waypoint serves no service",
        ] {
            assert!(all.contains(expected), "{expected} not in {all}");
        }
    }
}

/// Steering (`routes.rs`): what the node snapshots say about bound services, by mode.
#[cfg(test)]
mod steering_tests {
    use kmesh_common::service_flags;

    use crate::compile::testing::{
        BOUND_TO_WAYPOINT, NODE, REVIEWS, compile_yaml, diagnostics, mode_config,
    };

    const WAYPOINT_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: default}
spec:
  clusterIP: 10.96.0.50
  ports: [{port: 15008, name: mesh}]
  selector: {gateway.networking.k8s.io/gateway-name: waypoint}
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-1
  namespace: default
  labels: {gateway.networking.k8s.io/gateway-name: waypoint, gateway.istio.io/managed: istio.io-mesh-controller}
spec:
  nodeName: node-1
  containers: [{name: waypoint, ports: [{containerPort: 15008}]}]
status:
  podIP: 10.244.0.50
  conditions: [{type: Ready, status: "True"}]
"#;

    /// reviews' VIP in the node's snapshot: its flags and the endpoints its route reaches.
    fn reviews_steering(yaml: &str) -> (u32, Vec<String>) {
        let compiled = compile_yaml(yaml);
        let snapshot = compiled.snapshot(NODE).unwrap();
        let vip = kmesh_common::ipv4_mapped([10, 96, 0, 13]);
        let service = snapshot
            .services
            .iter()
            .find(|s| s.key.ip == vip && s.key.port == 9080)
            .expect("reviews is in the snapshot");
        let route = snapshot
            .routes
            .iter()
            .find(|r| r.route_id == service.value.route_id)
            .unwrap();
        let set = route.value.backend_set[0];
        let endpoints = snapshot
            .endpoints
            .iter()
            .filter(|e| e.key.set_id == set)
            .map(|e| {
                let ip = std::net::IpAddr::from(e.value.ip).to_canonical();
                format!("{ip}:{}", e.value.port)
            })
            .collect();
        (service.value.flags, endpoints)
    }

    #[test]
    fn dual_engine_sends_bound_services_to_their_waypoint_s_replicas_marked() {
        let yaml = format!(
            "{}---{REVIEWS}---{BOUND_TO_WAYPOINT}---{WAYPOINT_SERVICE}",
            mode_config("DualEngine")
        );
        assert_eq!(
            reviews_steering(&yaml),
            (
                service_flags::WAYPOINT,
                vec!["10.244.0.50:15008".to_string()]
            )
        );
        // The waypoint's own Service, in the labelled namespace, is not steered to itself.
        let compiled = compile_yaml(&yaml);
        let snapshot = compiled.snapshot(NODE).unwrap();
        let waypoint_vip = kmesh_common::ipv4_mapped([10, 96, 0, 50]);
        let own = snapshot
            .services
            .iter()
            .find(|s| s.key.ip == waypoint_vip)
            .unwrap();
        assert_eq!(own.value.flags, 0);
    }

    #[test]
    fn kernel_native_keeps_bound_services_on_the_kernel_path() {
        let yaml = format!(
            "{}---{REVIEWS}---{BOUND_TO_WAYPOINT}---{WAYPOINT_SERVICE}",
            mode_config("KernelNative")
        );
        assert_eq!(
            reviews_steering(&yaml),
            (0, vec!["10.244.0.21:9080".to_string()])
        );
    }

    #[test]
    fn a_waypoint_without_its_service_refuses_rather_than_bypasses() {
        let yaml = format!(
            "{}---{REVIEWS}---{BOUND_TO_WAYPOINT}",
            mode_config("DualEngine")
        );
        assert_eq!(reviews_steering(&yaml), (service_flags::WAYPOINT, vec![]));
        let diagnostics = diagnostics(&compile_yaml(&yaml));
        assert!(
            diagnostics.iter().any(|d| d.contains(
                "uses waypoint default/waypoint, which has no Service waypoint.default.svc.cluster.local with port 15008: connections to reviews.default.svc.cluster.local:9080 are refused until it has"
            )),
            "{diagnostics:#?}"
        );
    }
}
