//! A generated cluster for the operator's benchmarks (`compile` and `fanout`).
use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Container, ContainerPort, Pod, PodCondition, PodIP, PodSpec, PodStatus, Service,
        ServicePort, ServiceSpec,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kmesh_operator::inputs::Inputs;

/// `services` Services in 100 namespaces, each selecting `pods_per_service` ready pods spread over
/// `nodes` nodes.
pub fn generated(services: u32, pods_per_service: u32, nodes: u32) -> Inputs {
    let mut inputs = Inputs::default();
    let mut pod_index: u32 = 0;
    for s in 0..services {
        let ns = format!("ns-{}", s % 100);
        let name = format!("svc-{s}");
        let selector = BTreeMap::from([("app".to_string(), name.clone())]);
        inputs.services.push(Service {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(format!(
                    "10.{}.{}.{}",
                    96 + (s >> 16),
                    (s >> 8) & 255,
                    s & 255
                )),
                ports: Some(vec![ServicePort {
                    port: 80,
                    target_port: Some(
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080),
                    ),
                    ..Default::default()
                }]),
                selector: Some(selector.clone()),
                ..Default::default()
            }),
            ..Default::default()
        });
        for _ in 0..pods_per_service {
            let ip = format!(
                "10.{}.{}.{}",
                128 + (pod_index >> 16),
                (pod_index >> 8) & 255,
                pod_index & 255
            );
            inputs.pods.push(Pod {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-{pod_index}")),
                    namespace: Some(ns.clone()),
                    labels: Some(selector.clone()),
                    ..Default::default()
                },
                spec: Some(PodSpec {
                    node_name: Some(format!("node-{}", pod_index % nodes + 1)),
                    containers: vec![Container {
                        name: "app".into(),
                        ports: Some(vec![ContainerPort {
                            container_port: 8080,
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                status: Some(PodStatus {
                    pod_ip: Some(ip.clone()),
                    pod_ips: Some(vec![PodIP { ip }]),
                    conditions: Some(vec![PodCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            });
            pod_index += 1;
        }
    }
    inputs
}

/// `inputs` with the first pod's address changed: the change the benchmarks measure (every node's
/// snapshot carries the pod's endpoint and name).
pub fn one_pod_moved(inputs: &Inputs) -> Inputs {
    let mut changed = inputs.clone();
    if let Some(status) = changed.pods.first_mut().and_then(|p| p.status.as_mut()) {
        let moved = "10.255.255.254".to_string();
        status.pod_ip = Some(moved.clone());
        status.pod_ips = Some(vec![PodIP { ip: moved }]);
    }
    changed
}
