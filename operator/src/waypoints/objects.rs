//! The Kubernetes objects that run one waypoint, as ambient's deployment controller makes them for
//! a Gateway of class `istio-waypoint`: a ServiceAccount named like the Gateway (its token reads
//! that waypoint's configuration and nothing else), a Deployment of `kmesh-waypoint` replicas, a
//! Service that selects them at the Gateway's `HBONE` port (the node snapshots' route to the
//! waypoint is that Service's endpoints), and a copy of the operator's CA in the Gateway's
//! namespace (a ConfigMap cannot be mounted across namespaces), one per waypoint
//! ([`ca_config_map_name`]): a copy shared by the waypoints of a namespace would be owned by the
//! last one applied, and deleting that Gateway would take every other waypoint's CA with it.
//!
//! Pure: a Gateway and settings in, objects out. Every object is owned by its Gateway (an owner
//! reference with the Gateway's uid), so Kubernetes' garbage collector removes them when the
//! Gateway goes. The pods carry `gateway.istio.io/managed`, so they are never enrolled (no loop).
use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
            HTTPGetAction, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, SecurityContext,
            Service, ServiceAccount, ServiceAccountTokenProjection, ServicePort, ServiceSpec,
            TopologySpreadConstraint, Volume, VolumeMount, VolumeProjection,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};

use crate::gateway_api::{GROUP, Gateway};

/// The label that names a waypoint pod's Gateway (the Gateway API's, as Istio sets it).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The label that marks a pod as managed by a waypoint controller: such pods are never enrolled.
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
/// This operator's value of [`MANAGED_LABEL`].
pub const MANAGED_BY_KMESH: &str = "kmesh.net-waypoint-controller";
/// The admin port of a waypoint (`/healthz`, `/readyz`, `/metrics`), Istio's status port.
pub const ADMIN_PORT: u16 = 15021;
/// Where the pod finds the operator's CA and its token.
const CA_DIR: &str = "/etc/kmesh/ca";
const TOKEN_DIR: &str = "/var/run/secrets/kmesh";
const TOKEN_FILE: &str = "token";

/// The name of waypoint `name`'s copy of the operator's CA: its own, never the operator's
/// `kmesh-ca-root-cert` (which a Gateway in the operator's namespace would otherwise take over)
/// nor another waypoint's.
pub fn ca_config_map_name(name: &str) -> String {
    format!("{name}-{}", crate::certs::CA_CONFIG_MAP)
}

/// What every waypoint's objects share, from the operator's own settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointSettings {
    /// The kmesh-rs image (it holds `kmesh-waypoint`).
    pub image: String,
    /// The snapshot server, as waypoints reach it (`https://kmesh-operator.kmesh-system.svc:15300`).
    pub operator_url: String,
    /// The audience of the projected token the operator's TokenReview expects.
    pub token_audience: String,
    /// The operator's CA certificate (PEM), copied beside each waypoint; `None`: plain HTTP.
    pub ca_pem: Option<String>,
    /// Replicas per waypoint (ambient's default is 1; two keep a waypoint up through a restart,
    /// and the kernel spreads connections over both).
    pub replicas: i32,
}

/// One waypoint's objects, in the order they are applied.
#[derive(Clone, Debug, PartialEq)]
pub struct WaypointObjects {
    pub service_account: ServiceAccount,
    pub ca: Option<ConfigMap>,
    pub service: Service,
    pub deployment: Deployment,
}

/// The objects of the waypoint `gateway`, which listens on `port`; `None` when the Gateway has no
/// uid (read from a file, not from the API server: nothing can own objects then).
pub fn waypoint_objects(
    gateway: &Gateway,
    port: u16,
    settings: &WaypointSettings,
) -> Option<WaypointObjects> {
    let owner = OwnerReference {
        api_version: format!("{GROUP}/v1"),
        kind: "Gateway".into(),
        name: gateway.name().to_string(),
        uid: gateway.metadata.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: None,
    };
    let name = gateway.name();
    let namespace = gateway.namespace();
    let meta = |object_name: &str| ObjectMeta {
        name: Some(object_name.to_string()),
        namespace: Some(namespace.to_string()),
        labels: Some(labels(name)),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    };
    let ca = settings.ca_pem.as_ref().map(|pem| ConfigMap {
        metadata: meta(&ca_config_map_name(name)),
        data: Some(BTreeMap::from([("ca.crt".to_string(), pem.clone())])),
        ..Default::default()
    });
    Some(WaypointObjects {
        service_account: ServiceAccount {
            metadata: meta(name),
            ..Default::default()
        },
        ca,
        service: Service {
            metadata: meta(name),
            spec: Some(ServiceSpec {
                selector: Some(selector(name)),
                ports: Some(vec![ServicePort {
                    name: Some("mesh".into()),
                    port: i32::from(port),
                    target_port: Some(IntOrString::Int(i32::from(port))),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        deployment: Deployment {
            metadata: meta(name),
            spec: Some(DeploymentSpec {
                replicas: Some(settings.replicas),
                selector: LabelSelector {
                    match_labels: Some(selector(name)),
                    ..Default::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels(name)),
                        ..Default::default()
                    }),
                    spec: Some(pod_spec(name, namespace, port, settings)),
                },
                ..Default::default()
            }),
            ..Default::default()
        },
    })
}

/// The labels of every object of waypoint `name`; its pods' are the same.
fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (GATEWAY_NAME_LABEL.to_string(), name.to_string()),
        (MANAGED_LABEL.to_string(), MANAGED_BY_KMESH.to_string()),
        (
            "app.kubernetes.io/part-of".to_string(),
            "kmesh-rs".to_string(),
        ),
    ])
}

fn selector(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(GATEWAY_NAME_LABEL.to_string(), name.to_string())])
}

fn pod_spec(name: &str, namespace: &str, port: u16, settings: &WaypointSettings) -> PodSpec {
    let mut args = vec![
        format!("--listen=[::]:{port}"),
        format!("--admin=[::]:{ADMIN_PORT}"),
        format!("--waypoint={namespace}/{name}"),
        format!("--operator={}", settings.operator_url),
        format!("--token-file={TOKEN_DIR}/{TOKEN_FILE}"),
    ];
    let mut mounts = vec![VolumeMount {
        name: "token".into(),
        mount_path: TOKEN_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }];
    let mut volumes = vec![Volume {
        name: "token".into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(settings.token_audience.clone()),
                    expiration_seconds: Some(3600),
                    path: TOKEN_FILE.into(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }];
    if settings.ca_pem.is_some() {
        args.push(format!("--operator-ca={CA_DIR}/ca.crt"));
        mounts.push(VolumeMount {
            name: "ca".into(),
            mount_path: CA_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "ca".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: ca_config_map_name(name),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    PodSpec {
        service_account_name: Some(name.to_string()),
        // Replicas on different nodes where there are several: one node's loss leaves the other.
        topology_spread_constraints: Some(vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(selector(name)),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        containers: vec![Container {
            name: "waypoint".into(),
            image: Some(settings.image.clone()),
            command: Some(vec!["/usr/local/bin/kmesh-waypoint".into()]),
            args: Some(args),
            ports: Some(vec![
                ContainerPort {
                    name: Some("mesh".into()),
                    container_port: i32::from(port),
                    ..Default::default()
                },
                ContainerPort {
                    name: Some("admin".into()),
                    container_port: i32::from(ADMIN_PORT),
                    ..Default::default()
                },
            ]),
            readiness_probe: Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some("/readyz".into()),
                    port: IntOrString::Int(i32::from(ADMIN_PORT)),
                    ..Default::default()
                }),
                period_seconds: Some(2),
                ..Default::default()
            }),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                run_as_non_root: Some(true),
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            volume_mounts: Some(mounts),
            ..Default::default()
        }],
        volumes: Some(volumes),
        // SIGTERM starts a drain that ends within 5 s (`--drain-timeout-ms`).
        termination_grace_period_seconds: Some(15),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(uid: Option<&str>) -> Gateway {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "reviews-waypoint", "namespace": "bookinfo", "uid": uid},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
        }))
        .unwrap()
    }

    fn settings(ca: bool) -> WaypointSettings {
        WaypointSettings {
            image: "docker.io/kmesh-rs/kmesh-rs:0.1.0".into(),
            operator_url: "https://kmesh-operator.kmesh-system.svc:15300".into(),
            token_audience: "kmesh-operator".into(),
            ca_pem: ca.then(|| "-----BEGIN CERTIFICATE-----\n".into()),
            replicas: 2,
        }
    }

    #[test]
    fn every_object_is_owned_by_the_gateway_and_named_like_it() {
        let objects = waypoint_objects(&gateway(Some("u-1")), 15008, &settings(true)).unwrap();
        let metas = [
            &objects.service_account.metadata,
            &objects.ca.as_ref().unwrap().metadata,
            &objects.service.metadata,
            &objects.deployment.metadata,
        ];
        for meta in metas {
            assert_eq!(meta.namespace.as_deref(), Some("bookinfo"));
            let owner = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
                ("Gateway", "reviews-waypoint", "u-1")
            );
            assert_eq!(owner.controller, Some(true));
        }
        assert_eq!(
            objects.service_account.metadata.name.as_deref(),
            Some("reviews-waypoint")
        );
        assert_eq!(
            objects.ca.unwrap().metadata.name.as_deref(),
            Some("reviews-waypoint-kmesh-ca-root-cert")
        );
    }

    #[test]
    fn two_waypoints_of_a_namespace_own_a_ca_copy_each() {
        let other: Gateway = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ratings-waypoint", "namespace": "bookinfo", "uid": "u-2"},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
        }))
        .unwrap();
        let reviews = waypoint_objects(&gateway(Some("u-1")), 15008, &settings(true)).unwrap();
        let ratings = waypoint_objects(&other, 15008, &settings(true)).unwrap();
        let mounted = |o: &WaypointObjects| {
            let pod = o.deployment.spec.clone().unwrap().template.spec.unwrap();
            pod.volumes.unwrap()[1].config_map.clone().unwrap().name
        };
        let (a, b) = (reviews.ca.clone().unwrap(), ratings.ca.clone().unwrap());
        assert_ne!(a.metadata.name, b.metadata.name);
        assert_eq!(a.metadata.name.as_deref(), Some(mounted(&reviews).as_str()));
        assert_eq!(b.metadata.name.as_deref(), Some(mounted(&ratings).as_str()));
        assert_eq!(b.metadata.owner_references.unwrap()[0].uid, "u-2");
    }

    #[test]
    fn the_service_selects_the_pods_at_the_hbone_port_and_the_pods_are_never_enrolled() {
        let objects = waypoint_objects(&gateway(Some("u-1")), 15008, &settings(false)).unwrap();
        let spec = objects.service.spec.unwrap();
        let port = &spec.ports.unwrap()[0];
        assert_eq!(
            (port.port, port.target_port.clone()),
            (15008, Some(IntOrString::Int(15008)))
        );
        let template = objects.deployment.spec.as_ref().unwrap().template.clone();
        let pod_labels = template.metadata.unwrap().labels.unwrap();
        for (k, v) in spec.selector.unwrap() {
            assert_eq!(pod_labels.get(&k), Some(&v));
        }
        assert_eq!(pod_labels[MANAGED_LABEL], MANAGED_BY_KMESH);
        let pod = template.spec.unwrap();
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some("reviews-waypoint")
        );
        let args = pod.containers[0].args.clone().unwrap();
        assert_eq!(
            args,
            [
                "--listen=[::]:15008",
                "--admin=[::]:15021",
                "--waypoint=bookinfo/reviews-waypoint",
                "--operator=https://kmesh-operator.kmesh-system.svc:15300",
                "--token-file=/var/run/secrets/kmesh/token",
            ]
        );
        assert_eq!(objects.deployment.spec.unwrap().replicas, Some(2));
    }

    #[test]
    fn with_a_ca_the_pod_mounts_its_copy_and_names_it() {
        let objects = waypoint_objects(&gateway(Some("u-1")), 15008, &settings(true)).unwrap();
        let pod = objects.deployment.spec.unwrap().template.spec.unwrap();
        assert!(
            pod.containers[0]
                .args
                .as_ref()
                .unwrap()
                .contains(&"--operator-ca=/etc/kmesh/ca/ca.crt".to_string())
        );
        let volumes = pod.volumes.unwrap();
        assert_eq!(
            volumes[1].config_map.as_ref().unwrap().name,
            "reviews-waypoint-kmesh-ca-root-cert"
        );
        let token = volumes[0]
            .projected
            .as_ref()
            .unwrap()
            .sources
            .as_ref()
            .unwrap()[0]
            .service_account_token
            .clone()
            .unwrap();
        assert_eq!(token.audience.as_deref(), Some("kmesh-operator"));
    }

    #[test]
    fn a_gateway_without_uid_owns_nothing() {
        assert_eq!(
            waypoint_objects(&gateway(None), 15008, &settings(true)),
            None
        );
    }
}
