//! The agent–operator HTTP contract: how a node agent fetches its node's snapshot. This is its one
//! definition; the operator's snapshot server, the agent's operator source and the tests' stand-in
//! server all use it. It has no HTTP library in it, only names and formats, so that the agent keeps
//! having no Kubernetes client and the operator no agent code.
//!
//! `GET /v1/nodes/{node}/snapshot?wait=30s&format=4`
//!
//! Request headers:
//! - `If-None-Match: <etag>`: the ETag of the snapshot the agent holds (none on its first request);
//! - `Authorization: Bearer <token>`: the agent's token (a projected service-account token);
//! - `Kmesh-Live-Generation: <n>` ([`LIVE_GENERATION_HEADER`]): the generation live in the agent's
//!   kernel (absent before the first). The operator learns from it which node runs which snapshot;
//!   an agent sends a new request as soon as its live generation changes, so that this is prompt.
//! - `Accept: application/vnd.kmesh.snapshot` ([`MEDIA_TYPE`]).
//!
//! Answers:
//! - `200 OK`: the body is the snapshot (`kmesh-snapshot` format, in the format [`served_format`]
//!   picks for the request's `format`; [`MEDIA_TYPE`]), or, for an agent that names the snapshot
//!   it holds in `since` ([`SINCE_PARAM`]), a delta from it (`crate::delta_format`;
//!   [`DELTA_MEDIA_TYPE`]; the agent tells them apart by their magic); `ETag` names the snapshot
//!   ([`etag`]: generation and content hash) either way. Agents treat the ETag as opaque and echo
//!   it.
//! - `304 Not Modified`: the agent's ETag was still current after the server held the request for
//!   up to `wait` (capped at [`MAX_WAIT`]): a long poll. The agent asks again at once.
//! - `410 Gone` ([`UNINSTALL_STATUS`]): the node's agents are being removed for good (their
//!   DaemonSet, or its namespace, is being deleted). The agent detaches its programs and removes
//!   every pin at once, then idles until it is stopped; an agent being stopped asks once more
//!   (`wait=0s`) and does the same on a `410`. Any other answer keeps the pins: a restart or an
//!   upgrade must not interrupt traffic.
//! - `401` no or unknown token; `403` a token bound to another node; `404` no snapshot for the node
//!   yet; `503` the server cannot check tokens right now. The agent retries all of these with backoff,
//!   keeping the snapshot it has.
//!
//! DualEngine's waypoints fetch their configuration from the same server with the same long poll:
//! `GET /v1/waypoints/{namespace}/{name}/config`, defined in [`crate::waypoint_contract`], whose
//! names are re-exported here.
use core::time::Duration;

use crate::format::{FORMAT_VERSION, Format};

pub use crate::waypoint_contract::{
    WAYPOINT_CONFIG_MEDIA_TYPE, WAYPOINT_CONFIG_PATH_SUFFIX, WAYPOINT_PATH_PREFIX,
    parse_waypoint_config_etag, waypoint_config_etag, waypoint_config_path, waypoint_config_url,
    waypoint_of_config_path,
};

/// The snapshot path is `SNAPSHOT_PATH_PREFIX + node + SNAPSHOT_PATH_SUFFIX`.
pub const SNAPSHOT_PATH_PREFIX: &str = "/v1/nodes/";
pub const SNAPSHOT_PATH_SUFFIX: &str = "/snapshot";

/// The query parameter naming how long the server may hold a request.
pub const WAIT_PARAM: &str = "wait";

/// The query parameter naming the newest snapshot format the agent reads (`format=4`). An agent
/// that sends none reads format 2 only (agents before format 3): the server answers each agent in
/// the newest format both know ([`served_format`]), so that during a rolling upgrade old agents
/// and new operators, and new agents and old operators (which ignore the parameter and send
/// format 2, which new agents read), keep working.
pub const FORMAT_PARAM: &str = "format";

/// The longest a server holds a request, whatever `wait` asks for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The request header that reports the generation live in the agent's kernel (HTTP header names
/// are case-insensitive; this is the lowercase form HTTP/2 requires).
pub const LIVE_GENERATION_HEADER: &str = "kmesh-live-generation";

/// The status that tells an agent to uninstall: `410 Gone`.
pub const UNINSTALL_STATUS: u16 = 410;

/// The media type of a snapshot body.
pub const MEDIA_TYPE: &str = "application/vnd.kmesh.snapshot";

/// The media type of a delta body (`crate::delta_format`).
pub const DELTA_MEDIA_TYPE: &str = "application/vnd.kmesh.snapshot-delta";

/// The query parameter naming the format 4 cluster hash of the snapshot the agent holds, from
/// which it takes a delta (`since=0123456789abcdef`). A server that cannot answer with a delta
/// from it (it does not know that cluster part, or the agent reads an older format) answers with
/// the whole snapshot, as does a server from before deltas, which ignores the parameter.
pub const SINCE_PARAM: &str = "since";

/// The path of `node`'s snapshot.
pub fn snapshot_path(node: &str) -> String {
    format!("{SNAPSHOT_PATH_PREFIX}{node}{SNAPSHOT_PATH_SUFFIX}")
}

/// The full URL an agent long-polls:
/// `{base}/v1/nodes/{node}/snapshot?wait={wait}s&format={FORMAT_VERSION}`.
pub fn snapshot_url(base: &str, node: &str, wait: Duration) -> String {
    format!(
        "{}{}?{}&{FORMAT_PARAM}={FORMAT_VERSION}",
        base.trim_end_matches('/'),
        snapshot_path(node),
        wait_query(wait)
    )
}

/// [`snapshot_url`] of an agent that holds a format 4 snapshot whose cluster hash is `held` and
/// takes a delta from it: `…&since={held as 16 hex digits}`.
pub fn snapshot_url_since(base: &str, node: &str, wait: Duration, held: Option<u64>) -> String {
    let url = snapshot_url(base, node, wait);
    match held {
        Some(hash) => format!("{url}&{SINCE_PARAM}={hash:016x}"),
        None => url,
    }
}

/// The cluster hash an agent's `since` names; `None` when absent or not 16 hex digits.
pub fn parse_since(query: &str) -> Option<u64> {
    let value = query
        .split('&')
        .find_map(|kv| kv.strip_prefix(SINCE_PARAM)?.strip_prefix('='))?;
    if value.len() != 16 {
        return None;
    }
    u64::from_str_radix(value, 16).ok()
}

/// The format to answer a request with query `query` in: the newest this build writes that is not
/// newer than the agent's `format`; format 2 when the agent names none (or names one older than
/// any this build writes, or not a number).
pub fn served_format(query: Option<&str>) -> Format {
    let asked = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix(FORMAT_PARAM)?.strip_prefix('='))
        .and_then(|v| v.parse::<u16>().ok());
    let Some(asked) = asked else {
        return Format::V2;
    };
    Format::ALL
        .into_iter()
        .rev()
        .find(|f| f.number() <= asked)
        .unwrap_or(Format::V2)
}

/// The node named by a snapshot path, or `None` when `path` is not one (an empty node name or one
/// with a `/` in it is not).
pub fn node_of_snapshot_path(path: &str) -> Option<&str> {
    path.strip_prefix(SNAPSHOT_PATH_PREFIX)
        .and_then(|rest| rest.strip_suffix(SNAPSHOT_PATH_SUFFIX))
        .filter(|node| !node.is_empty() && !node.contains('/'))
}

/// `wait=30s`: whole seconds.
pub fn wait_query(wait: Duration) -> String {
    format!("{WAIT_PARAM}={}s", wait.as_secs())
}

/// The `wait` of a query string (`wait=30s`, or a bare number of seconds), uncapped; `None` when
/// absent or malformed.
pub fn parse_wait(query: &str) -> Option<Duration> {
    let value = query
        .split('&')
        .find_map(|kv| kv.strip_prefix(WAIT_PARAM)?.strip_prefix('='))?;
    let seconds = value.strip_suffix('s').unwrap_or(value);
    seconds.parse::<u64>().ok().map(Duration::from_secs)
}

/// The ETag of a snapshot: `"<generation>-<content hash as 16 hex digits>"`, quoted as HTTP wants.
pub fn etag(generation: u64, content_hash: u64) -> String {
    format!("\"{generation}-{content_hash:016x}\"")
}

/// The generation and content hash an ETag of [`etag`] names; `None` for any other text.
pub fn parse_etag(tag: &str) -> Option<(u64, u64)> {
    let inner = tag.trim().strip_prefix('"')?.strip_suffix('"')?;
    let (generation, hash) = inner.split_once('-')?;
    if hash.len() != 16 {
        return None;
    }
    Some((
        generation.parse().ok()?,
        u64::from_str_radix(hash, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip_and_only_name_one_node() {
        assert_eq!(snapshot_path("node-1"), "/v1/nodes/node-1/snapshot");
        assert_eq!(
            node_of_snapshot_path(&snapshot_path("node-1")),
            Some("node-1")
        );
        assert_eq!(node_of_snapshot_path("/v1/nodes//snapshot"), None);
        assert_eq!(node_of_snapshot_path("/v1/nodes/a/b/snapshot"), None);
        assert_eq!(node_of_snapshot_path("/v1/nodes/a"), None);
        assert_eq!(node_of_snapshot_path("/metrics"), None);
    }

    #[test]
    fn urls_carry_the_wait() {
        let url = snapshot_url("https://op:15300/", "n", Duration::from_secs(30));
        assert_eq!(
            url,
            "https://op:15300/v1/nodes/n/snapshot?wait=30s&format=4"
        );
        let query = url.split_once('?').unwrap().1;
        assert_eq!(parse_wait(query), Some(Duration::from_secs(30)));
    }

    #[test]
    fn since_names_the_held_cluster_part() {
        let url = snapshot_url_since("https://op", "n", Duration::from_secs(5), Some(0xabc));
        assert_eq!(
            url,
            "https://op/v1/nodes/n/snapshot?wait=5s&format=4&since=0000000000000abc"
        );
        let query = url.split_once('?').unwrap().1;
        assert_eq!(parse_since(query), Some(0xabc));
        assert_eq!(served_format(Some(query)), Format::V4);
        assert_eq!(
            snapshot_url_since("https://op", "n", Duration::from_secs(5), None),
            snapshot_url("https://op", "n", Duration::from_secs(5))
        );
        assert_eq!(parse_since("wait=5s"), None);
        assert_eq!(parse_since("since=abc"), None, "not 16 digits");
        assert_eq!(parse_since("since=000000000000000g"), None);
        assert_eq!(parse_since("sinced=0000000000000abc"), None);
    }

    #[test]
    fn wait_parameter() {
        assert_eq!(parse_wait("wait=30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_wait("x=1&wait=5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_wait("wait=999s"), Some(Duration::from_secs(999)));
        assert_eq!(parse_wait("wait=soon"), None);
        assert_eq!(parse_wait("waiting=5"), None);
        assert_eq!(parse_wait(""), None);
    }

    #[test]
    fn the_served_format_is_the_newest_both_sides_know() {
        assert_eq!(served_format(None), Format::V2, "an agent before format 3");
        assert_eq!(served_format(Some("wait=30s")), Format::V2);
        assert_eq!(served_format(Some("wait=30s&format=3")), Format::V3);
        assert_eq!(served_format(Some("format=2&wait=1s")), Format::V2);
        assert_eq!(served_format(Some("format=4&wait=1s")), Format::V4);
        assert_eq!(served_format(Some("format=9")), Format::V4, "a newer agent");
        assert_eq!(served_format(Some("format=1")), Format::V2);
        assert_eq!(served_format(Some("format=three")), Format::V2);
        assert_eq!(served_format(Some("formats=3")), Format::V2);
        let url = snapshot_url("https://op", "n", Duration::from_secs(5));
        let query = url.split_once('?').unwrap().1;
        assert_eq!(served_format(Some(query)), Format::V4);
    }

    #[test]
    fn etags_name_generation_and_hash() {
        assert_eq!(etag(7, 0xabc), "\"7-0000000000000abc\"");
        assert_eq!(parse_etag(&etag(7, 0xabc)), Some((7, 0xabc)));
        assert_eq!(parse_etag("7-0000000000000abc"), None, "unquoted");
        assert_eq!(parse_etag("\"x-0000000000000abc\""), None);
    }
}
