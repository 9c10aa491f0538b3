//! What a test sees of the mesh on a cluster: each agent's data plane, read from its
//! `/debug/snapshot` ([`AgentState`]: the live generation, content hash and mode, the table
//! counts, and when each generation went live, on the same CLOCK_MONOTONIC as
//! [`crate::probe::monotonic_ns`]), waiting until every agent satisfies a condition, and the
//! KmeshConfig `default` (its status, read with the admin client). Also each agent's settings in
//! force (its log filter from `/debug/log-level`, the live snapshot's header from
//! `/debug/config_dump`), a series of its metrics, and when each agent first satisfied a
//! condition on any of these ([`wait_each_agent`]).
use std::{
    io,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
};
use serde_json::Value;

use super::Cluster;

/// The agents' namespace and admin port, as `config/agent` deploys them.
const AGENT_NAMESPACE: &str = "kmesh-system";
const AGENT_PREFIX: &str = "kmesh-agent-";
const ADMIN_PORT: u16 = 15200;
const METRICS_PORT: u16 = 15020;

/// One agent pod: its name and node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentPod {
    pub pod: String,
    pub node: String,
}

/// When a generation went live in one agent's kernel: between the two CLOCK_MONOTONIC times (ns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flip {
    pub generation: u64,
    pub between_ns: [u64; 2],
}

/// One agent's data plane, from its `/debug/snapshot`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentState {
    /// The live generation and its content hash (hex); `None` before the first snapshot.
    pub live: Option<(u64, String)>,
    /// The live mode (`kmesh_common::mode`).
    pub mode: Option<u32>,
    /// Endpoints in the live tables, when the agent knows them.
    pub endpoints: Option<u64>,
    /// Snapshots applied since the agent started.
    pub applied: u64,
    /// The recent flips, oldest first.
    pub flips: Vec<Flip>,
}

impl AgentState {
    /// The live generation, 0 before the first snapshot.
    pub fn generation(&self) -> u64 {
        self.live.as_ref().map_or(0, |(g, _)| *g)
    }

    /// The flip that made `generation` live, if it is among the recent ones.
    pub fn flip_of(&self, generation: u64) -> Option<Flip> {
        self.flips
            .iter()
            .rev()
            .find(|f| f.generation == generation)
            .copied()
    }

    fn parse(v: &Value) -> AgentState {
        let live = &v["live"];
        let flips = v["recent_flips"].as_array().into_iter().flatten();
        let flips = flips.filter_map(|f| {
            Some(Flip {
                generation: f["generation"].as_u64()?,
                between_ns: [f["between_ns"][0].as_u64()?, f["between_ns"][1].as_u64()?],
            })
        });
        AgentState {
            live: live["generation"].as_u64().map(|g| {
                let hash = live["content_hash"].as_str().unwrap_or_default();
                (g, hash.to_string())
            }),
            mode: live["mode"].as_u64().map(|m| m as u32),
            endpoints: live["counts"]["endpoints"].as_u64(),
            applied: v["applied"].as_u64().unwrap_or(0),
            flips: flips.collect(),
        }
    }
}

/// The agent pods, one per node, sorted by node.
pub fn agents(cluster: &Cluster) -> io::Result<Vec<AgentPod>> {
    let api: Api<Pod> = Api::namespaced(cluster.client(), AGENT_NAMESPACE);
    let list = cluster
        .block_on(api.list(&ListParams::default()))
        .map_err(|e| io::Error::other(format!("list pods in {AGENT_NAMESPACE}: {e}")))?;
    let mut agents: Vec<AgentPod> = list
        .items
        .into_iter()
        .filter_map(|p| {
            let pod = p.metadata.name?;
            let node = p.spec?.node_name?;
            pod.starts_with(AGENT_PREFIX)
                .then_some(AgentPod { pod, node })
        })
        .collect();
    agents.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(agents)
}

/// One agent's data plane now.
pub fn agent_state(cluster: &Cluster, agent: &AgentPod) -> io::Result<AgentState> {
    agent_status(cluster, &agent.pod).map(|v| AgentState::parse(&v))
}

/// Agent pod `kmesh-system/<pod>`'s whole `/debug/snapshot`.
pub fn agent_status(cluster: &Cluster, pod: &str) -> io::Result<Value> {
    let (code, body) = cluster.pod_get(AGENT_NAMESPACE, pod, ADMIN_PORT, "/debug/snapshot")?;
    if code != 200 {
        return Err(io::Error::other(format!(
            "{pod}: /debug/snapshot answered {code}: {body}"
        )));
    }
    serde_json::from_str(&body)
        .map_err(|e| io::Error::other(format!("{pod}: /debug/snapshot is not JSON ({e}): {body}")))
}

/// The generation live in agent pod `pod`'s kernel: `None` before its first snapshot, or while
/// its status cannot be read.
pub fn live_generation(cluster: &Cluster, pod: &str) -> Option<u64> {
    agent_status(cluster, pod).ok()?["live"]["generation"].as_u64()
}

/// Every agent's data plane now, in the order of `agents`.
pub fn agent_states(cluster: &Cluster, agents: &[AgentPod]) -> io::Result<Vec<AgentState>> {
    agents.iter().map(|a| agent_state(cluster, a)).collect()
}

/// Polls every agent (every 10 ms) until `done(index, state)` holds for each, or `timeout`
/// passes (an error naming the agents still waiting and their last state).
pub fn wait_agents(
    cluster: &Cluster,
    agents: &[AgentPod],
    timeout: Duration,
    done: impl Fn(usize, &AgentState) -> bool,
) -> io::Result<Vec<AgentState>> {
    let started = Instant::now();
    let mut last: Vec<Option<AgentState>> = vec![None; agents.len()];
    loop {
        for (i, agent) in agents.iter().enumerate() {
            if last[i].as_ref().is_some_and(|s| done(i, s)) {
                continue;
            }
            if let Ok(state) = agent_state(cluster, agent) {
                last[i] = Some(state);
            }
        }
        if last
            .iter()
            .enumerate()
            .all(|(i, s)| s.as_ref().is_some_and(|s| done(i, s)))
        {
            return Ok(last.into_iter().flatten().collect());
        }
        if started.elapsed() > timeout {
            let waiting: Vec<String> = agents
                .iter()
                .zip(&last)
                .enumerate()
                .filter(|(i, (_, s))| !s.as_ref().is_some_and(|s| done(*i, s)))
                .map(|(_, (a, s))| format!("{} on {}: {s:?}", a.pod, a.node))
                .collect();
            return Err(io::Error::other(format!(
                "after {timeout:?}, still waiting for {}",
                waiting.join("; ")
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Agent pod `kmesh-system/<pod>`'s answer to `GET path` on `port`: the body of a 200, else an
/// error naming the pod, the path and the answer.
fn agent_get(cluster: &Cluster, pod: &str, port: u16, path: &str) -> io::Result<String> {
    let (code, body) = cluster.pod_get(AGENT_NAMESPACE, pod, port, path)?;
    if code != 200 {
        return Err(io::Error::other(format!(
            "{pod}: {path} answered {code}: {body}"
        )));
    }
    Ok(body)
}

/// The log filter in force in `agent` (`GET /debug/log-level`, e.g. `info`).
pub fn log_level(cluster: &Cluster, agent: &AgentPod) -> io::Result<String> {
    agent_get(cluster, &agent.pod, ADMIN_PORT, "/debug/log-level").map(|b| b.trim().to_string())
}

/// The header of the snapshot live in `agent` (`GET /debug/config_dump`): generation, mode,
/// `log_level`, `access_log`.
pub fn config_header(cluster: &Cluster, agent: &AgentPod) -> io::Result<Value> {
    let body = agent_get(cluster, &agent.pod, ADMIN_PORT, "/debug/config_dump")?;
    let dump: Value = serde_json::from_str(&body).map_err(|e| {
        io::Error::other(format!(
            "{}: /debug/config_dump is not JSON ({e})",
            agent.pod
        ))
    })?;
    match &dump["header"] {
        Value::Object(_) => Ok(dump["header"].clone()),
        _ => Err(io::Error::other(format!(
            "{}: /debug/config_dump has no header: {body}",
            agent.pod
        ))),
    }
}

/// The value of `series` (written exactly as in the exposition, labels included, e.g.
/// `kmesh_events_total{outcome="closed"}`) in `agent`'s metrics; `None` when it is not there.
pub fn metric(cluster: &Cluster, agent: &AgentPod, series: &str) -> io::Result<Option<f64>> {
    let text = agent_get(cluster, &agent.pod, METRICS_PORT, "/metrics")?;
    Ok(series_value(&text, series))
}

/// The value of `series` in a Prometheus text exposition.
fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Polls `read` on every agent (every 10 ms) until `done(value)` holds for each, or `timeout`
/// passes (an error naming the agents still waiting and their last value or error). Returns, in
/// the order of `agents`, the value that satisfied `done` and when it was first read.
pub fn wait_each_agent<T: std::fmt::Debug>(
    cluster: &Cluster,
    agents: &[AgentPod],
    timeout: Duration,
    read: impl Fn(&Cluster, &AgentPod) -> io::Result<T>,
    done: impl Fn(&T) -> bool,
) -> io::Result<Vec<(T, Instant)>> {
    let started = Instant::now();
    let mut reached: Vec<Option<(T, Instant)>> = agents.iter().map(|_| None).collect();
    let mut last: Vec<String> = vec!["not read".into(); agents.len()];
    loop {
        for (i, agent) in agents.iter().enumerate() {
            if reached[i].is_some() {
                continue;
            }
            match read(cluster, agent) {
                Ok(value) if done(&value) => reached[i] = Some((value, Instant::now())),
                Ok(value) => last[i] = format!("{value:?}"),
                Err(e) => last[i] = format!("error: {e}"),
            }
        }
        if reached.iter().all(Option::is_some) {
            return Ok(reached.into_iter().flatten().collect());
        }
        if started.elapsed() > timeout {
            let waiting: Vec<String> = agents
                .iter()
                .zip(&reached)
                .zip(&last)
                .filter(|((_, r), _)| r.is_none())
                .map(|((a, _), last)| format!("{} on {}: {last}", a.pod, a.node))
                .collect();
            return Err(io::Error::other(format!(
                "after {timeout:?}, still waiting for {}",
                waiting.join("; ")
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The KmeshConfig `default` as JSON (`None` when it does not exist).
pub fn kmeshconfig(cluster: &Cluster) -> io::Result<Option<Value>> {
    let gvk = GroupVersionKind::gvk("kmesh.net", "v1alpha1", "KmeshConfig");
    let resource = ApiResource::from_gvk(&gvk);
    let api: Api<DynamicObject> = Api::all_with(cluster.client(), &resource);
    let object = cluster
        .block_on(api.get_opt("default"))
        .map_err(|e| io::Error::other(format!("get kmeshconfig default: {e}")))?;
    object
        .map(|o| serde_json::to_value(o).map_err(io::Error::other))
        .transpose()
}

/// Polls the KmeshConfig `default` (every 50 ms) until `done(object)` holds, or `timeout`
/// passes (an error with its last status).
pub fn wait_kmeshconfig(
    cluster: &Cluster,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> io::Result<Value> {
    let started = Instant::now();
    loop {
        let object = kmeshconfig(cluster)?;
        if let Some(object) = object.as_ref().filter(|o| done(o)) {
            return Ok(object.clone());
        }
        if started.elapsed() > timeout {
            let status = object.map(|o| o["status"].clone());
            return Err(io::Error::other(format!(
                "after {timeout:?}, KmeshConfig default is not as expected; status: {}",
                serde_json::to_string_pretty(&status).unwrap_or_default()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The condition `type_` of a KmeshConfig's status: (status, reason, message).
pub fn condition(object: &Value, type_: &str) -> Option<(String, String, String)> {
    let conditions = object["status"]["conditions"].as_array()?;
    let found = conditions.iter().find(|c| c["type"] == type_)?;
    let text = |key: &str| found[key].as_str().unwrap_or_default().to_string();
    Some((text("status"), text("reason"), text("message")))
}

/// `status.unwatched` as (kind, reason) pairs.
pub fn unwatched(object: &Value) -> Vec<(String, String)> {
    let entries = object["status"]["unwatched"]
        .as_array()
        .into_iter()
        .flatten();
    let text = |e: &Value, key: &str| e[key].as_str().unwrap_or_default().to_string();
    entries
        .map(|e| (text(e, "kind"), text(e, "reason")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_snapshots_parse() {
        let body = r#"{"live":{"generation":7,"content_hash":"ab","slot":1,"mode":2,
            "counts":{"services":4,"routes":4,"backend_sets":4,"endpoints":6,"workloads":3}},
            "applied":3,"recent_flips":[{"generation":6,"between_ns":[10,20]},
            {"generation":7,"between_ns":[30,40]}]}"#;
        let state = AgentState::parse(&serde_json::from_str(body).unwrap());
        assert_eq!(state.live, Some((7, "ab".to_string())));
        assert_eq!(state.generation(), 7);
        assert_eq!(state.mode, Some(2));
        assert_eq!(state.endpoints, Some(6));
        assert_eq!(state.applied, 3);
        assert_eq!(
            state.flip_of(7),
            Some(Flip {
                generation: 7,
                between_ns: [30, 40]
            })
        );
        assert_eq!(state.flip_of(5), None);
        let empty = r#"{"live":null,"applied":0,"recent_flips":[]}"#;
        let empty = AgentState::parse(&serde_json::from_str(empty).unwrap());
        assert_eq!(empty.generation(), 0);
    }

    #[test]
    fn a_series_is_found_exactly() {
        let text = "# TYPE kmesh_events_total counter\n\
                    kmesh_events_total{outcome=\"closed\"} 12\n\
                    kmesh_events_total{outcome=\"closed_early\"} 3\n\
                    kmesh_live_generation 7\n";
        let closed = "kmesh_events_total{outcome=\"closed\"}";
        assert_eq!(series_value(text, closed), Some(12.0));
        assert_eq!(series_value(text, "kmesh_live_generation"), Some(7.0));
        assert_eq!(
            series_value(text, "kmesh_live"),
            None,
            "a prefix is not the series"
        );
        assert_eq!(series_value(text, "kmesh_events_total"), None);
    }

    #[test]
    fn status_fields() {
        let object = serde_json::json!({"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "AllNodesReady", "message": "m"}],
            "unwatched": [{"kind": "TCPRoute", "group": "g", "reason": "NotInstalled", "message": "x"}],
        }});
        assert_eq!(
            condition(&object, "Ready"),
            Some(("True".into(), "AllNodesReady".into(), "m".into()))
        );
        assert_eq!(condition(&object, "Degraded"), None);
        assert_eq!(
            unwatched(&object),
            vec![("TCPRoute".to_string(), "NotInstalled".to_string())]
        );
    }
}
