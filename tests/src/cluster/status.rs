//! The pod status a kubelet reports, as a strategic-merge patch of the status subresource
//! (conditions merge by type, container statuses by name, pod IPs by ip). kube-controller-manager
//! reads it: a Ready pod with an IP becomes a ready endpoint of its Services' EndpointSlices, and
//! Deployments and DaemonSets count it available.
use std::net::Ipv4Addr;

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

/// What one container is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerState {
    Waiting { reason: String, message: String },
    Running { started_at: String },
    Terminated { exit_code: i32, reason: String },
}

/// One container's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerStatus {
    pub name: String,
    pub image: String,
    pub ready: bool,
    pub restart_count: u32,
    pub state: ContainerState,
    /// The state before the last restart.
    pub last_state: Option<ContainerState>,
}

/// An RFC 3339 timestamp of now, to the second (what the API stores).
pub fn now() -> String {
    let t = Timestamp::now();
    Timestamp::from_second(t.as_second())
        .unwrap_or(t)
        .to_string()
}

fn state_json(s: &ContainerState) -> Value {
    match s {
        ContainerState::Waiting { reason, message } => {
            json!({"waiting": {"reason": reason, "message": message}})
        }
        ContainerState::Running { started_at } => json!({"running": {"startedAt": started_at}}),
        ContainerState::Terminated { exit_code, reason } => {
            json!({"terminated": {"exitCode": exit_code, "reason": reason, "finishedAt": now()}})
        }
    }
}

/// The status patch of a pod whose sandbox (network namespace) exists at `pod_ip` on a node
/// at `host_ip`, with these containers.
pub fn pod_status(
    pod_ip: Ipv4Addr,
    host_ip: Ipv4Addr,
    start_time: &str,
    containers: &[ContainerStatus],
) -> Value {
    let all_ready = !containers.is_empty() && containers.iter().all(|c| c.ready);
    let running = containers
        .iter()
        .any(|c| matches!(c.state, ContainerState::Running { .. }));
    let at = now();
    let condition = |type_: &str, ok: bool| json!({"type": type_, "status": if ok { "True" } else { "False" }, "lastTransitionTime": at});
    let statuses: Vec<Value> = containers
        .iter()
        .map(|c| {
            let mut v = json!({
                "name": c.name,
                "image": c.image,
                "imageID": "",
                "ready": c.ready,
                "started": matches!(c.state, ContainerState::Running { .. }),
                "restartCount": c.restart_count,
                "state": state_json(&c.state),
            });
            if let Some(last) = &c.last_state {
                v["lastState"] = state_json(last);
            }
            v
        })
        .collect();
    json!({
        "status": {
            "phase": if running { "Running" } else { "Pending" },
            "podIP": pod_ip.to_string(),
            "podIPs": [{"ip": pod_ip.to_string()}],
            "hostIP": host_ip.to_string(),
            "hostIPs": [{"ip": host_ip.to_string()}],
            "startTime": start_time,
            "conditions": [
                condition("PodReadyToStartContainers", true),
                condition("Initialized", true),
                condition("ContainersReady", all_ready),
                condition("Ready", all_ready),
            ],
            "containerStatuses": statuses,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_container_is() {
        let c = |ready| ContainerStatus {
            name: "c".into(),
            image: "i".into(),
            ready,
            restart_count: 0,
            state: ContainerState::Running { started_at: now() },
            last_state: None,
        };
        let ip = Ipv4Addr::new(10, 244, 161, 2);
        let host = Ipv4Addr::new(192, 0, 2, 1);
        let ready = |v: &Value| {
            v["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Ready")
                .unwrap()["status"]
                .clone()
        };
        let v = pod_status(ip, host, "t", &[c(true)]);
        assert_eq!(ready(&v), "True");
        assert_eq!(v["status"]["phase"], "Running");
        assert_eq!(v["status"]["podIPs"][0]["ip"], "10.244.161.2");
        assert_eq!(
            ready(&pod_status(ip, host, "t", &[c(true), c(false)])),
            "False"
        );
        assert_eq!(ready(&pod_status(ip, host, "t", &[])), "False");
        assert!(now().ends_with('Z') && !now().contains('.'), "{}", now());
    }
}
