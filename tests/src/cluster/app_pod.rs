//! Application pods (every image that is not the project's): the kubelet does not run their
//! images. Each declared TCP `containerPort` gets the harness's real server ([`crate::TcpServer`]),
//! listening in the pod's network namespace and answering every connection with the pod's name,
//! so a client can tell which pod it reached. Containers are reported running at once, and ready
//! at once unless they have a readiness probe, which the kubelet then runs from the node.
//! Processes a test runs "in" such a pod ([`super::Cluster::spawn_probe`], like `kubectl exec`)
//! join the pod's network namespace and the pod's cgroup below its node's.
use std::{io, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;

use super::{
    kubelet::{PodContext, report_status},
    readiness::{Readiness, readiness_probe},
    status::{ContainerState, ContainerStatus, now},
};
use crate::{TcpServer, progress};

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

/// Every container running; ready as `readiness` says (ready at once without a probe).
pub fn statuses(pod: &Pod, readiness: &[Readiness]) -> Vec<ContainerStatus> {
    let started_at = now();
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .enumerate()
        .map(|(i, c)| ContainerStatus {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            ready: readiness.get(i).is_none_or(|r| r.ready),
            restart_count: 0,
            state: ContainerState::Running {
                started_at: started_at.clone(),
            },
            last_state: None,
        })
        .collect()
}

/// The containers' readiness probes (`httpGet`, `tcpSocket`). A probe the test kubelet cannot run
/// is reported and left out: that container is ready at once.
pub fn readiness(ctx: &PodContext) -> Vec<Readiness> {
    ctx.spec_containers()
        .iter()
        .map(|c| {
            let probe = c.readiness_probe.as_ref().and_then(|p| {
                readiness_probe(c, p)
                    .inspect_err(|e| {
                        progress!(
                            "kubelet: pod {}: container {}: {}",
                            ctx.label(),
                            c.name,
                            e.0
                        )
                    })
                    .ok()
            });
            Readiness::new(probe)
        })
        .collect()
}

/// Runs the readiness probes from the node and reports every change of readiness, until the pod
/// is stopped. Returns at once when no container has a probe.
pub async fn probe_until_stopped(
    ctx: &PodContext,
    mut readiness: Vec<Readiness>,
    cancel: &mut watch::Receiver<bool>,
) {
    if readiness.iter().all(|r| r.probe.is_none()) {
        return;
    }
    loop {
        let mut changed = false;
        for r in readiness.iter_mut() {
            let Some(p) = r.due() else { continue };
            let netns = ctx.shared.network.node_netns_path();
            let ip = ctx.ip;
            let what = p.describe(ip);
            let ok = tokio::task::spawn_blocking(move || p.run(&netns, ip))
                .await
                .unwrap_or(false);
            if r.record(ok) {
                changed = true;
                let state = if r.ready { "ready" } else { "not ready" };
                progress!(
                    "kubelet: pod {}: {state} (readiness probe {what})",
                    ctx.label()
                );
            }
        }
        if changed {
            report_status(ctx, &statuses(&ctx.pod, &readiness)).await;
        }
        tokio::select! {
            _ = cancel.changed() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}
