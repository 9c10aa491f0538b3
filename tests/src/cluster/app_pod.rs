//! Application pods (every image that is not the project's): the kubelet does not run their
//! images. Each declared TCP `containerPort` gets the harness's real server ([`crate::TcpServer`]),
//! listening in the pod's network namespace and answering every connection with the pod's name,
//! so a client can tell which pod it reached. Containers are reported running and ready at once.
//! Processes a test runs "in" such a pod ([`super::Cluster::spawn_probe`], like `kubectl exec`)
//! join the pod's network namespace and the pod's cgroup below its node's.
use std::io;

use k8s_openapi::api::core::v1::Pod;

use super::status::{ContainerState, ContainerStatus, now};
use crate::TcpServer;

/// Starts a server on every TCP containerPort of the pod (each port once).
pub fn start_servers(net_pod: &crate::Pod, pod: &Pod) -> io::Result<Vec<TcpServer>> {
    let mut ports: Vec<u16> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .map(|p| p.container_port as u16)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports.into_iter().map(|p| net_pod.serve_tcp(p)).collect()
}

/// Every container running and ready.
pub fn statuses(pod: &Pod) -> Vec<ContainerStatus> {
    let started_at = now();
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| ContainerStatus {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            ready: true,
            restart_count: 0,
            state: ContainerState::Running {
                started_at: started_at.clone(),
            },
            last_state: None,
        })
        .collect()
}
