//! The agent's admin HTTP contract: the paths of its admin listener (`--admin-addr`, localhost by
//! default) and of its metrics listener (`--metrics-addr`) that `kmeshctl` reads. This is their one
//! definition; the agent's admin server and `kmeshctl` both use it. Like [`crate::contract`], it
//! holds names and formats only, no HTTP library.
//!
//! Admin listener:
//! - `GET /version` ([`VERSION_PATH`]): one line of text, `kmesh-agent <version> (layout <layout>)`.
//! - `GET /debug/snapshot` ([`SNAPSHOT_PATH`]): the agent's status and live generation, as JSON.
//! - `GET /debug/authz` ([`AUTHZ_PATH`]): the authorization counters per workload and policy, JSON.
//! - `GET /debug/config_dump` ([`CONFIG_DUMP_PATH`]): the live snapshot decoded, as JSON
//!   ([`crate::view::SnapshotView`]: every table, names beside ids); `503` before the agent has a
//!   snapshot of its own since it started.
//! - `GET /debug/config_dump.bin` ([`CONFIG_DUMP_BINARY_PATH`]): the same snapshot in the snapshot
//!   format (what `kmeshctl explain` decodes and verifies); same generation as `/debug/snapshot`'s
//!   `live` at the time of the request.
//! - `GET /debug/bpf/<table>` ([`BPF_PATH_PREFIX`] + one of [`BPF_TABLES`]): the records the
//!   active slot of that table's map holds in the kernel, as JSON (`{table, slot, generation,
//!   records}`, rows as in `config_dump`); `404` with the list of tables for another name.
//! - `GET /debug/log-level` ([`LOG_LEVEL_PATH`]): the current log filter, one line of text.
//! - `PUT` or `POST /debug/log-level`: the body (at most [`MAX_LOG_LEVEL_BODY`] bytes) is a level
//!   (`debug`) or an EnvFilter directive list (`kmesh_agent=debug,info`); `200` with the new filter,
//!   or `400` with the parser's message and the filter unchanged. The change holds until the
//!   snapshot's log level changes (the next change of `KmeshConfig.spec.logLevel`) or the agent
//!   restarts.
//!
//! Metrics listener: `GET /metrics` ([`METRICS_PATH`]): Prometheus text (it answers every path).

pub const VERSION_PATH: &str = "/version";
pub const SNAPSHOT_PATH: &str = "/debug/snapshot";
pub const AUTHZ_PATH: &str = "/debug/authz";
pub const LOG_LEVEL_PATH: &str = "/debug/log-level";
pub const METRICS_PATH: &str = "/metrics";
pub const CONFIG_DUMP_PATH: &str = "/debug/config_dump";
pub const CONFIG_DUMP_BINARY_PATH: &str = "/debug/config_dump.bin";
pub const BPF_PATH_PREFIX: &str = "/debug/bpf/";

/// The tables `/debug/bpf/<table>` shows: the per-generation maps, by their snapshot names.
pub const BPF_TABLES: [&str; 8] = [
    "generation",
    "services",
    "routes",
    "backend_sets",
    "endpoints",
    "authz_workloads",
    "authz_sources",
    "authz_verdicts",
];

/// The largest body `PUT /debug/log-level` reads; a longer one is refused (`413`).
pub const MAX_LOG_LEVEL_BODY: usize = 4096;
