//! The snapshot's names (`kmesh_common::names`): the strings telemetry labels connections with,
//! the same for every node. Decided here, after Istio (`pkg/kube` `GetDeployMetaFromPod`, the
//! canonical service labels):
//! - every pod with an address is named, in the mesh or not (either end of a connection may be
//!   any pod); host-network pods are not: their address is their node's, shared by many;
//! - an address held by two pods (a finished pod's address reused) takes the names of the running
//!   one; of two running ones, the smallest names (deterministic);
//! - workload: the label `service.istio.io/workload-name`, else for a pod with a generated name the
//!   controller owner's name: a ReplicaSet's without the `-<pod-template-hash>` suffix (the
//!   Deployment; likewise Argo Rollouts' `rollouts-pod-template-hash`), a Job's without a
//!   `-<8 to 10 digits>` suffix (the CronJob), any other controller's as it is; else the pod's name;
//! - app: `service.istio.io/canonical-name`, else `app.kubernetes.io/name`, else `app`, else the
//!   workload; version: `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`,
//!   else `version`, else `latest`;
//! - service account: the pod's, `default` when unset;
//! - a service (one `service_id`): its host (FQDN), and the name and namespace of its object (the
//!   Service, or the ServiceEntry).
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kmesh_common::{
    Ip16,
    names::{NO_NAME, ServiceNameRecord, WorkloadNameRecord},
};
use kmesh_snapshot::{NameTables, name_table::StringSet};

use super::{Compiler, name_of, namespace_of, workloads::address_owners};

/// The names of one pod, borrowed from it (copies would be five strings per pod, made only to be
/// interned).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct PodNames<'p> {
    pub workload: &'p str,
    pub namespace: &'p str,
    pub service_account: &'p str,
    pub app: &'p str,
    pub version: &'p str,
}

impl<'p> PodNames<'p> {
    fn strings(&self) -> [&'p str; 5] {
        [
            self.workload,
            self.namespace,
            self.service_account,
            self.app,
            self.version,
        ]
    }
}

/// The names of one service, as strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServiceNames {
    pub host: String,
    pub name: String,
    pub namespace: String,
}

impl<'a> Compiler<'a> {
    /// The names sections: every named pod address, and `services` (by service id).
    pub(super) fn name_tables(&self, services: &BTreeMap<u32, ServiceNames>) -> NameTables {
        // The strings are gathered first and written in an order of the set's own (see
        // `StringSet`), so that a pod moving to another address keeps every offset.
        let mut strings = StringSet::default();
        let pods: Vec<(Ip16, [u32; 5])> = self
            .pod_names()
            .map(|(ip, names)| (ip, names.strings().map(|s| strings.id(s))))
            .collect();
        // A service must be named by a host; one whose host the table cannot hold (254 or 255
        // bytes: valid for Istio, longer than the format's names) gets no record and reads as
        // unknown, rather than making the node's snapshot invalid (fuzz finding 7).
        let services: Vec<(u32, [u32; 3])> = services
            .iter()
            .filter_map(|(&service_id, names)| {
                let host = strings.id(&names.host);
                (host != NO_NAME).then(|| {
                    let (name, namespace) = (strings.id(&names.name), strings.id(&names.namespace));
                    (service_id, [host, name, namespace])
                })
            })
            .collect();
        let strings = strings.finish();
        let workloads = pods
            .into_iter()
            .map(
                |(ip, [workload, namespace, service_account, app, version])| WorkloadNameRecord {
                    ip,
                    workload: strings.offset(workload),
                    namespace: strings.offset(namespace),
                    service_account: strings.offset(service_account),
                    app: strings.offset(app),
                    version: strings.offset(version),
                },
            )
            .collect();
        let services = services
            .into_iter()
            .filter_map(|(service_id, [host, name, namespace])| {
                let host = strings.offset(host);
                (host != NO_NAME).then(|| ServiceNameRecord {
                    service_id,
                    host,
                    name: strings.offset(name),
                    namespace: strings.offset(namespace),
                })
            })
            .collect();
        NameTables {
            strings: strings.bytes,
            workloads,
            services,
        }
    }

    /// The names of every pod address (see the module doc), sorted by address: its owner's
    /// ([`address_owners`]).
    fn pod_names(&self) -> impl Iterator<Item = (Ip16, PodNames<'a>)> + use<'a> {
        let inputs: &'a crate::inputs::Inputs = self.inputs;
        let pods = inputs
            .pods
            .iter()
            .filter(|pod| pod.spec.as_ref().and_then(|s| s.host_network) != Some(true));
        address_owners(pods)
            .into_iter()
            .map(|(ip, pod)| (ip, pod_names(pod)))
    }
}

/// A pod's names, by Istio's rules (see the module doc).
pub(super) fn pod_names(pod: &Pod) -> PodNames<'_> {
    let labels = pod.metadata.labels.as_ref();
    let label = |key: &str| {
        labels
            .and_then(|l| l.get(key))
            .filter(|v| !v.is_empty())
            .map(String::as_str)
    };
    let workload = label("service.istio.io/workload-name").unwrap_or_else(|| owner_name(pod));
    let app = label("service.istio.io/canonical-name")
        .or_else(|| label("app.kubernetes.io/name"))
        .or_else(|| label("app"))
        .unwrap_or(workload);
    let version = label("service.istio.io/canonical-revision")
        .or_else(|| label("app.kubernetes.io/version"))
        .or_else(|| label("version"))
        .unwrap_or("latest");
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    PodNames {
        workload,
        namespace: namespace_of(&pod.metadata),
        service_account,
        app,
        version,
    }
}

/// Istio's workload name of a pod without the override label: its controller's name, as the
/// module doc says, for a pod with a generated name; else its own name.
fn owner_name(pod: &Pod) -> &str {
    let meta = &pod.metadata;
    let generated = meta.generate_name.as_deref().is_some_and(|g| !g.is_empty());
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true));
    let (true, Some(owner)) = (generated, controller) else {
        return name_of(meta);
    };
    let label = |key: &str| meta.labels.as_ref().and_then(|l| l.get(key));
    let strip_hash = |key: &str| {
        let hash = label(key).filter(|h| !h.is_empty())?;
        owner.name.strip_suffix(hash.as_str())?.strip_suffix('-')
    };
    let name = match owner.kind.as_str() {
        "ReplicaSet" => strip_hash("pod-template-hash")
            .or_else(|| strip_hash("rollouts-pod-template-hash"))
            .unwrap_or(&owner.name),
        "Job" => cron_job_name(&owner.name).unwrap_or(&owner.name),
        _ => &owner.name,
    };
    if name.is_empty() { name_of(meta) } else { name }
}

/// The CronJob of a Job named `<cronjob>-<8 to 10 digits>`.
fn cron_job_name(job: &str) -> Option<&str> {
    let (cron_job, stamp) = job.rsplit_once('-')?;
    let is_stamp = (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit());
    (is_stamp && !cron_job.is_empty()).then_some(cron_job)
}

/// Bytes the names sections of `names` take in a snapshot: the string table and the records.
pub fn names_bytes(names: &NameTables) -> usize {
    names.strings.len()
        + names.workloads.len() * size_of::<WorkloadNameRecord>()
        + names.services.len() * size_of::<ServiceNameRecord>()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{
        Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    use kmesh_common::ip16;

    use super::super::testing::{NODE, REVIEWS, compile_yaml};
    use super::super::{CompileOptions, compile};
    use super::{names_bytes, pod_names};
    use crate::inputs::Inputs;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn workload_app_and_version_follow_istio() {
        let names = |yaml: &str| {
            let n = pod(yaml);
            let n = pod_names(&n);
            (
                n.workload.to_string(),
                n.app.to_string(),
                n.version.to_string(),
                n.service_account.to_string(),
            )
        };
        let s = |v: &str| v.to_string();
        // A Deployment's pod: the ReplicaSet without its pod-template-hash; app and version labels.
        assert_eq!(
            names(
                "{metadata: {name: reviews-v1-7f9d8-abcde, namespace: bookinfo, generateName: reviews-v1-7f9d8-,
                  labels: {app: reviews, version: v1, pod-template-hash: 7f9d8},
                  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1-7f9d8, uid: u, controller: true}]},
                 spec: {serviceAccountName: bookinfo-reviews, containers: []}}"
            ),
            (s("reviews-v1"), s("reviews"), s("v1"), s("bookinfo-reviews"))
        );
        // app.kubernetes.io/* before app/version; the canonical labels before both.
        assert_eq!(
            names(
                "metadata: {name: p, labels: {app: a, app.kubernetes.io/name: k, version: v, app.kubernetes.io/version: kv}}"
            ),
            (s("p"), s("k"), s("kv"), s("default"))
        );
        assert_eq!(
            names(
                "metadata: {name: p, labels: {app: a, service.istio.io/canonical-name: c, version: v, service.istio.io/canonical-revision: cr}}"
            ),
            (s("p"), s("c"), s("cr"), s("default"))
        );
        // A CronJob's Job: the timestamp suffix goes; a StatefulSet's pod: the owner's name.
        assert_eq!(
            names(
                "metadata: {name: backup-28000000-x1, generateName: backup-28000000-,
                  ownerReferences: [{apiVersion: batch/v1, kind: Job, name: backup-28000000, uid: u, controller: true}]}"
            ),
            (s("backup"), s("backup"), s("latest"), s("default"))
        );
        assert_eq!(
            names(
                "metadata: {name: db-0, generateName: db-,
                  ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: db, uid: u, controller: true}]}"
            ),
            (s("db"), s("db"), s("latest"), s("default"))
        );
        // A bare pod, and a pod whose name was not generated: its own name. The override label wins.
        assert_eq!(names("metadata: {name: bare}").0, "bare");
        assert_eq!(
            names(
                "metadata: {name: fixed, ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: rs-1, uid: u, controller: true}]}"
            )
            .0,
            "fixed"
        );
        assert_eq!(
            names("metadata: {name: p, labels: {service.istio.io/workload-name: w}}").0,
            "w"
        );
        // A ReplicaSet whose name does not end in the hash keeps its name.
        assert_eq!(
            names(
                "metadata: {name: x-1, generateName: x-, labels: {pod-template-hash: zz},
                  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: x, uid: u, controller: true}]}"
            )
            .0,
            "x"
        );
    }

    #[test]
    fn every_pod_address_and_service_is_named_in_every_snapshot() {
        let yaml = format!(
            "{REVIEWS}---
apiVersion: v1
kind: Pod
metadata: {{name: outside, namespace: other, labels: {{app: client}}}}
spec: {{nodeName: node-9, containers: []}}
status: {{podIP: 10.244.9.9}}
---
apiVersion: v1
kind: Pod
metadata: {{name: host, namespace: kube-system}}
spec: {{nodeName: node-1, hostNetwork: true, containers: []}}
status: {{podIP: 192.168.0.1}}
"
        );
        let compiled = compile_yaml(&yaml);
        let s = &compiled.snapshot(NODE).unwrap();
        let names = s.names();
        let ip = |a: &str| ip16(a.parse().unwrap());
        let reviews = names.workload(&ip("10.244.0.21")).unwrap();
        assert_eq!(
            (
                reviews.workload,
                reviews.namespace,
                reviews.app,
                reviews.version
            ),
            ("reviews-v1", "default", "reviews", "v1")
        );
        // Not in the mesh, on another node: named all the same.
        assert_eq!(names.workload(&ip("10.244.9.9")).unwrap().app, "client");
        assert_eq!(names.workload(&ip("192.168.0.1")), None, "host network");
        let key = s.services[0].key;
        let service = names.service(&key).unwrap();
        assert_eq!(
            (service.host, service.name, service.namespace),
            ("reviews.default.svc.cluster.local", "reviews", "default")
        );
    }

    #[test]
    fn a_reused_address_is_named_after_the_running_pod() {
        let pod = |name: &str, phase: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec: {{nodeName: node-1, containers: []}}\nstatus: {{podIP: 10.244.0.5, phase: {phase}}}\n"
            )
        };
        for order in [["a-done", "z-running"], ["z-running", "a-done"]] {
            let phases = |n: &str| {
                if n == "a-done" {
                    "Succeeded"
                } else {
                    "Running"
                }
            };
            let yaml = format!(
                "{}---\n{}",
                pod(order[0], phases(order[0])),
                pod(order[1], phases(order[1]))
            );
            let compiled = compile_yaml(&yaml);
            let snapshot = compiled.snapshot(NODE).unwrap();
            let names = snapshot.names();
            let w = names
                .workload(&ip16("10.244.0.5".parse().unwrap()))
                .unwrap();
            assert_eq!(w.workload, "z-running");
        }
    }

    /// A cluster as Deployments make it: `deployments` Services in 100 namespaces, each selecting
    /// `replicas` pods of a ReplicaSet (generated names, pod-template-hash, own service account,
    /// app and version labels).
    pub(crate) fn deployments(deployments: u32, replicas: u32) -> Inputs {
        let mut inputs = Inputs::default();
        let mut pod_index = 0u32;
        for d in 0..deployments {
            let ns = format!("team-{}", d % 100);
            let app = format!("service-{d}");
            let hash = format!("{:x}", 0x5d4f_9000 + d);
            let labels = BTreeMap::from([
                ("app".to_string(), app.clone()),
                ("version".to_string(), format!("v{}", d % 3 + 1)),
                ("pod-template-hash".to_string(), hash.clone()),
            ]);
            inputs.services.push(Service {
                metadata: ObjectMeta {
                    name: Some(app.clone()),
                    namespace: Some(ns.clone()),
                    ..Default::default()
                },
                spec: Some(ServiceSpec {
                    cluster_ip: Some(format!("10.96.{}.{}", d >> 8, d & 255)),
                    ports: Some(vec![ServicePort {
                        port: 80,
                        ..Default::default()
                    }]),
                    selector: Some(BTreeMap::from([("app".to_string(), app.clone())])),
                    ..Default::default()
                }),
                ..Default::default()
            });
            for r in 0..replicas {
                let ip = format!(
                    "10.{}.{}.{}",
                    128 + (pod_index >> 16),
                    (pod_index >> 8) & 255,
                    pod_index & 255
                );
                inputs.pods.push(Pod {
                    metadata: ObjectMeta {
                        name: Some(format!("{app}-{hash}-{r:05x}")),
                        generate_name: Some(format!("{app}-{hash}-")),
                        namespace: Some(ns.clone()),
                        labels: Some(labels.clone()),
                        owner_references: Some(vec![OwnerReference {
                            api_version: "apps/v1".into(),
                            kind: "ReplicaSet".into(),
                            name: format!("{app}-{hash}"),
                            uid: format!("uid-{d}"),
                            controller: Some(true),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    },
                    spec: Some(PodSpec {
                        node_name: Some(format!("node-{}", pod_index % 100 + 1)),
                        service_account_name: Some(app.clone()),
                        ..Default::default()
                    }),
                    status: Some(PodStatus {
                        pod_ip: Some(ip.clone()),
                        pod_ips: Some(vec![PodIP { ip }]),
                        phase: Some("Running".into()),
                        ..Default::default()
                    }),
                });
                pod_index += 1;
            }
        }
        inputs
    }

    #[test]
    fn names_cost_at_most_64_bytes_per_pod_on_a_10k_pod_cluster() {
        let inputs = deployments(1_000, 10);
        let compiled = compile(&inputs, &[NODE.to_string()], 1, &CompileOptions::default());
        let names = &compiled.snapshot(NODE).unwrap().names;
        assert_eq!(names.workloads.len(), 10_000, "every pod is named");
        assert_eq!(names.services.len(), 1_000);
        let per_pod = names_bytes(names) as f64 / 10_000.0;
        println!(
            "names of 10,000 pods and 1,000 services: {} bytes ({} of strings), {per_pod:.1} per pod",
            names_bytes(names),
            names.strings.len()
        );
        assert!(per_pod <= 64.0, "{per_pod:.1} bytes per pod");
        // The strings are shared: each Deployment's names once, not each pod's.
        assert!(
            names.strings.len() < 100_000,
            "{} bytes of strings",
            names.strings.len()
        );
    }

    #[test]
    fn pods_moving_to_new_addresses_change_their_name_records_alone() {
        // The first Deployment's pods (the first addresses) move to the last addresses of all:
        // were the strings interned in the order of the addresses, its names would move to the
        // end of the table and shift the offsets of every name after them (every record, in a
        // delta).
        let inputs = deployments(20, 3);
        let mut moved = inputs.clone();
        for (i, pod) in moved.pods[..3].iter_mut().enumerate() {
            let status = pod.status.as_mut().unwrap();
            let ip = format!("10.255.255.{}", 250 + i);
            status.pod_ip = Some(ip.clone());
            status.pod_ips = Some(vec![PodIP { ip }]);
        }
        let nodes = [NODE.to_string()];
        let before = compile(&inputs, &nodes, 1, &CompileOptions::default());
        let after = compile(&moved, &nodes, 1, &CompileOptions::default());
        let (before, after) = (&before.cluster.names, &after.cluster.names);
        assert_eq!(
            before.strings, after.strings,
            "the string table is unchanged"
        );
        assert_eq!(before.services, after.services);
        let gone: Vec<_> = before
            .workloads
            .iter()
            .filter(|r| !after.workloads.contains(r))
            .collect();
        let new: Vec<_> = after
            .workloads
            .iter()
            .filter(|r| !before.workloads.contains(r))
            .collect();
        assert_eq!((gone.len(), new.len()), (3, 3), "{gone:?} -> {new:?}");
        assert!(
            gone.iter()
                .chain(&new)
                .all(|r| r.workload == gone[0].workload),
            "the same names at the new addresses"
        );
    }
}
