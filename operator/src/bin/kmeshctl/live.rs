//! The subcommands that read or change a running agent: `version --agent`, `dump`, `log-level`
//! (`explain` has its own module).
//! Each returns the bytes to print on standard output, or an error naming the agent's address; the
//! paths are the agent's admin contract (`kmesh_snapshot::admin_contract`).
use clap::ValueEnum;
use kmesh_snapshot::admin_contract::{
    AUTHZ_PATH, BPF_PATH_PREFIX, CONFIG_DUMP_PATH, LOG_LEVEL_PATH, METRICS_PATH, SNAPSHOT_PATH,
    VERSION_PATH,
};

use crate::agent_client::{AgentClient, ClientError, Listener, ListenerAddr, Method};

/// What `kmeshctl dump` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DumpTarget {
    /// The agent's status and live generation (`/debug/snapshot`, JSON).
    Snapshot,
    /// Authorization counters per workload and policy (`/debug/authz`, JSON).
    Authz,
    /// Prometheus metrics, from the agent's metrics listener (`--metrics`), as text.
    Metrics,
    /// The live snapshot decoded: every table, names beside ids (`/debug/config_dump`, JSON).
    Config,
    /// One map's active slot as the kernel holds it (`/debug/bpf/<table>`, JSON; `--table`).
    Bpf,
}

#[derive(thiserror::Error, Debug)]
pub enum LiveError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the agent at {addr} answered {path} with something that is not JSON: {message}")]
    NotJson {
        addr: ListenerAddr,
        path: String,
        message: String,
    },
    #[error("dump bpf needs --table")]
    NoTable,
    #[error("the agent at {addr} refused the log filter: {message}")]
    LogLevelRefused { addr: ListenerAddr, message: String },
}

/// `kmesh-agent 0.1.0 (layout v1-...) at 127.0.0.1:15200`: the agent's `/version` line and where.
pub fn agent_version(agent: &ListenerAddr) -> Result<Vec<u8>, LiveError> {
    let body = AgentClient::new(Listener::Admin, agent.clone()).get(VERSION_PATH)?;
    let line = String::from_utf8_lossy(&body);
    Ok(format!("{} at {agent}\n", line.trim_end()).into_bytes())
}

/// The endpoint's body as the agent wrote it: JSON (checked to parse, and printed in the agent's
/// own field order) or Prometheus text.
pub fn dump(
    target: DumpTarget,
    table: Option<&str>,
    agent: &ListenerAddr,
    metrics: &ListenerAddr,
) -> Result<Vec<u8>, LiveError> {
    let path = match target {
        DumpTarget::Snapshot => SNAPSHOT_PATH.to_string(),
        DumpTarget::Authz => AUTHZ_PATH.to_string(),
        DumpTarget::Config => CONFIG_DUMP_PATH.to_string(),
        DumpTarget::Bpf => format!("{BPF_PATH_PREFIX}{}", table.ok_or(LiveError::NoTable)?),
        DumpTarget::Metrics => {
            return Ok(AgentClient::new(Listener::Metrics, metrics.clone()).get(METRICS_PATH)?);
        }
    };
    let mut body = AgentClient::new(Listener::Admin, agent.clone()).get(&path)?;
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(&body) {
        return Err(LiveError::NotJson {
            addr: agent.clone(),
            path,
            message: e.to_string(),
        });
    }
    if !body.ends_with(b"\n") {
        body.push(b'\n');
    }
    Ok(body)
}

/// Shows the agent's log filter, or sets it to `level` and shows the new one.
pub fn log_level(agent: &ListenerAddr, level: Option<&str>) -> Result<Vec<u8>, LiveError> {
    let client = AgentClient::new(Listener::Admin, agent.clone());
    let Some(level) = level else {
        return Ok(client.get(LOG_LEVEL_PATH)?);
    };
    client
        .put(LOG_LEVEL_PATH, level.as_bytes())
        .map_err(|e| match e {
            ClientError::Status {
                code: 400,
                method: Method::Put,
                body,
                ..
            } => LiveError::LogLevelRefused {
                addr: agent.clone(),
                message: body,
            },
            e => e.into(),
        })
}
