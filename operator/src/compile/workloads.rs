//! Enrolment: which pods are in the mesh (Kmesh's rules, semantics §1), and each node's
//! workloads table. Also the pod facts the catalog shares: health as istiod's ambient controller
//! sees it, addresses, identity.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::Pod;
use kmesh_common::{Ip16, WorkloadRecord, ip16};

use super::{Compiler, LookupMap, catalog, name_of, namespace_of};
use crate::waypoints::objects::{MANAGED_BY_KMESH, MANAGED_LABEL};

/// Healthy pods by (namespace, label key, label value), each list in input order. Only looked up,
/// never iterated, so a hash map (one hash instead of a dozen string comparisons per pod label).
pub(super) type PodsByLabel<'a> = LookupMap<(&'a str, &'a str, &'a str), Vec<&'a Pod>>;

/// Indexes the healthy `pods` by each of their labels, once per compile.
pub(super) fn pods_by_label(pods: &[Pod]) -> PodsByLabel<'_> {
    let mut index = PodsByLabel::default();
    for pod in pods.iter().filter(|p| healthy(p)) {
        for (k, v) in pod.metadata.labels.iter().flatten() {
            index
                .entry((namespace_of(&pod.metadata), k.as_str(), v.as_str()))
                .or_default()
                .push(pod);
        }
    }
    index
}

impl<'a> Compiler<'a> {
    /// The pods in the mesh (enrolled, placed on a node), in input order.
    pub(super) fn mesh_pods(&self) -> Vec<&'a Pod> {
        let inputs: &'a crate::inputs::Inputs = self.inputs;
        let (label, value) = inputs
            .config
            .as_ref()
            .map(|c| {
                (
                    c.spec.enrollment.label.clone(),
                    c.spec.enrollment.value.clone(),
                )
            })
            .unwrap_or_else(|| ("istio.io/dataplane-mode".to_string(), "Kmesh".to_string()));
        let namespace_enrolled: BTreeSet<&str> = inputs
            .namespaces
            .iter()
            .filter(|ns| {
                ns.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(&label))
                    .is_some_and(|v| v.eq_ignore_ascii_case(&value))
            })
            .map(|ns| name_of(&ns.metadata))
            .collect();
        inputs
            .pods
            .iter()
            .filter(|pod| node_of(pod).is_some())
            .filter(|pod| enrolled(pod, &label, &value, &namespace_enrolled))
            .collect()
    }

    /// Enrolled workloads, by node: each address once, for the pod that owns it on that node
    /// ([`address_owners`]).
    pub(super) fn workloads(
        &self,
        identities: &BTreeMap<String, u32>,
    ) -> BTreeMap<String, Vec<WorkloadRecord>> {
        let mut pods_by_node: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
        for pod in self.mesh_pods() {
            if let Some(node) = node_of(pod) {
                pods_by_node.entry(node).or_default().push(pod);
            }
        }
        pods_by_node
            .into_iter()
            .map(|(node, pods)| {
                let records = address_owners(pods)
                    .into_iter()
                    .map(|(ip, pod)| WorkloadRecord {
                        ip,
                        identity: identities.get(&pod_identity(pod)).copied().unwrap_or(0),
                        pad: 0,
                    })
                    .collect();
                (node.to_string(), records)
            })
            .collect()
    }
}

/// The pod that owns each address of `pods`, by address. Several pods can claim one address: a
/// finished pod's address may already belong to a new pod, and input can be wrong. The owner is
/// a pod that has not finished before one that has, then the smallest namespace and name: a rule
/// of the pods alone, never of the order they were read in. Every table keyed by a pod address
/// (workloads, authorization, identities, names) picks its pod with this one rule.
pub fn address_owners<'p>(pods: impl IntoIterator<Item = &'p Pod>) -> BTreeMap<Ip16, &'p Pod> {
    let mut owners: BTreeMap<Ip16, &'p Pod> = BTreeMap::new();
    for pod in pods {
        for ip in pod_ips(pod) {
            owners
                .entry(ip16(ip))
                .and_modify(|owner| {
                    if owner_rank(pod) < owner_rank(owner) {
                        *owner = pod;
                    }
                })
                .or_insert(pod);
        }
    }
    owners
}

/// How [`address_owners`] ranks the pods claiming one address: smallest first.
fn owner_rank(pod: &Pod) -> (bool, &str, &str) {
    (
        finished(pod),
        namespace_of(&pod.metadata),
        pod.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// The node a pod is placed on.
pub(super) fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

/// Whether the pod has finished (its address may already belong to another pod).
pub(super) fn finished(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// Healthy as istiod's ambient controller sees it: Ready, not being deleted, not finished.
fn healthy(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) || pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A pod's addresses: `status.podIPs`, else `status.podIP`; entries that do not parse are left out.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    ips
}

pub(super) fn pod_identity(pod: &Pod) -> String {
    catalog::identity(namespace_of(&pod.metadata), pod_service_account(pod))
}

/// The service account a pod runs as, when set.
pub(super) fn pod_service_account(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
}

/// Whether a pod is in the mesh (Kmesh's rules): its own label, else its namespace's; the pod value
/// `none` opts out; host-network pods, pods with a sidecar and waypoints (Istio's, and this
/// operator's: `waypoints/objects.rs`) are never enrolled: a waypoint's own connections must not be
/// steered back to a waypoint.
fn enrolled(pod: &Pod, label: &str, value: &str, namespace_enrolled: &BTreeSet<&str>) -> bool {
    let labels = pod.metadata.labels.as_ref();
    let annotations = pod.metadata.annotations.as_ref();
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true)
        || annotations.is_some_and(|a| a.contains_key("sidecar.istio.io/status"))
        || labels
            .and_then(|l| l.get(MANAGED_LABEL))
            .is_some_and(|v| v == "istio.io-mesh-controller" || v == MANAGED_BY_KMESH)
    {
        return false;
    }
    match labels.and_then(|l| l.get(label)) {
        Some(v) if v.eq_ignore_ascii_case("none") => false,
        Some(v) if v.eq_ignore_ascii_case(value) => true,
        Some(_) => false,
        None => namespace_enrolled.contains(namespace_of(&pod.metadata)),
    }
}

#[cfg(test)]
mod enrolment_tests {
    use std::collections::BTreeSet;

    use super::enrolled;

    fn pod(labels: serde_json::Value) -> k8s_openapi::api::core::v1::Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "bookinfo", "labels": labels}
        }))
        .unwrap()
    }

    /// Waypoint pods, Istio's and this operator's, are never enrolled: their connections to
    /// endpoints must not be steered back to a waypoint.
    #[test]
    fn waypoint_pods_are_never_enrolled() {
        let namespaces = BTreeSet::from(["bookinfo"]);
        let enrol = |labels| {
            enrolled(
                &pod(labels),
                "istio.io/dataplane-mode",
                "Kmesh",
                &namespaces,
            )
        };
        assert!(enrol(serde_json::json!({"app": "reviews"})));
        for managed in ["istio.io-mesh-controller", "kmesh.net-waypoint-controller"] {
            assert!(
                !enrol(serde_json::json!({"gateway.istio.io/managed": managed})),
                "{managed}"
            );
        }
    }
}
