//! The waypoint–operator HTTP contract (DualEngine, issue #11): how a waypoint fetches its
//! configuration ([`crate::waypoint::WaypointConfig`]) from the operator. This is its one
//! definition; the operator's server and the waypoint both use it. Like [`crate::contract`], it
//! holds names and formats only, no HTTP library; its long poll is the snapshots' (the `wait`
//! parameter, [`crate::contract::parse_wait`], capped at [`crate::contract::MAX_WAIT`]).
//!
//! `GET /v1/waypoints/{namespace}/{name}/config?wait=30s` ([`waypoint_config_url`])
//!
//! Request headers:
//! - `If-None-Match: <etag>`: the ETag of the configuration the waypoint holds (none on its first
//!   request);
//! - `Authorization: Bearer <token>`: a token of the waypoint's service account, which is named
//!   like its Gateway, in its namespace (as Istio's waypoint Deployments are); with TokenReview it
//!   is a projected token for the operator's audience (`--token-audience`);
//! - `Accept: application/vnd.kmesh.waypoint-config+json` ([`WAYPOINT_CONFIG_MEDIA_TYPE`]).
//!
//! Answers:
//! - `200 OK`: the body is the configuration as JSON (`WaypointConfig::from_json` reads it;
//!   [`WAYPOINT_CONFIG_MEDIA_TYPE`]); `ETag` names its content ([`waypoint_config_etag`]: a hash
//!   of the JSON bytes, so every replica of the operator, compiling the same inputs, names it the
//!   same). Waypoints treat the ETag as opaque and echo it.
//! - `304 Not Modified`: the waypoint's ETag was still current after the server held the request
//!   for up to `wait` (capped at `MAX_WAIT`): a long poll. The waypoint asks again at once.
//! - `404` the operator has no configuration for this waypoint (not compiled yet, or its Gateway
//!   is gone); answered at once, not held. `401` no or unknown token; `403` a token of another
//!   waypoint, or a node agent's; `503` the server cannot check tokens right now. The waypoint
//!   retries all of these with backoff, keeping the configuration it has.
use core::time::Duration;

use crate::contract::wait_query;
use crate::waypoint::WaypointName;

/// The configuration path is
/// `WAYPOINT_PATH_PREFIX + namespace + "/" + name + WAYPOINT_CONFIG_PATH_SUFFIX`.
pub const WAYPOINT_PATH_PREFIX: &str = "/v1/waypoints/";
pub const WAYPOINT_CONFIG_PATH_SUFFIX: &str = "/config";

/// The media type of a waypoint configuration body.
pub const WAYPOINT_CONFIG_MEDIA_TYPE: &str = "application/vnd.kmesh.waypoint-config+json";

/// What starts every waypoint configuration ETag (inside its quotes), so that it is never taken
/// for a snapshot's (`"<generation>-<hash>"`, whose generation is a number).
const ETAG_PREFIX: &str = "wp-";

/// The path of the configuration of the waypoint `namespace/name`.
pub fn waypoint_config_path(namespace: &str, name: &str) -> String {
    format!("{WAYPOINT_PATH_PREFIX}{namespace}/{name}{WAYPOINT_CONFIG_PATH_SUFFIX}")
}

/// The full URL a waypoint long-polls: `{base}/v1/waypoints/{namespace}/{name}/config?wait={wait}s`.
pub fn waypoint_config_url(base: &str, waypoint: &WaypointName, wait: Duration) -> String {
    format!(
        "{}{}?{}",
        base.trim_end_matches('/'),
        waypoint_config_path(&waypoint.namespace, &waypoint.name),
        wait_query(wait)
    )
}

/// The waypoint named by a configuration path, or `None` when `path` is not one: exactly two
/// segments between prefix and suffix, each a Kubernetes object name (lowercase letters, digits,
/// `-` and `.`, starting and ending with a letter or digit, at most 253 bytes).
pub fn waypoint_of_config_path(path: &str) -> Option<WaypointName> {
    let inner = path
        .strip_prefix(WAYPOINT_PATH_PREFIX)?
        .strip_suffix(WAYPOINT_CONFIG_PATH_SUFFIX)?;
    let (namespace, name) = inner.split_once('/')?;
    (is_object_name(namespace) && is_object_name(name)).then(|| WaypointName {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

/// Whether `s` can name a Kubernetes object (a DNS subdomain): no `/`, no `%`, no `..` alone.
fn is_object_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    let allowed = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'.';
    let alphanumeric =
        |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    bytes.len() <= 253
        && bytes.iter().all(allowed)
        && alphanumeric(bytes.first())
        && alphanumeric(bytes.last())
}

/// The ETag of a waypoint configuration whose JSON has the content hash `content_hash`
/// ([`crate::content_hash`]): `"wp-<hash as 16 hex digits>"`, quoted as HTTP wants.
pub fn waypoint_config_etag(content_hash: u64) -> String {
    format!("\"{ETAG_PREFIX}{content_hash:016x}\"")
}

/// The content hash an ETag of [`waypoint_config_etag`] names; `None` for any other text (a
/// snapshot's ETag included).
pub fn parse_waypoint_config_etag(tag: &str) -> Option<u64> {
    let inner = tag.trim().strip_prefix('"')?.strip_suffix('"')?;
    let hash = inner.strip_prefix(ETAG_PREFIX)?;
    if hash.len() != 16 {
        return None;
    }
    u64::from_str_radix(hash, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract;

    fn waypoint(namespace: &str, name: &str) -> WaypointName {
        WaypointName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    #[test]
    fn paths_round_trip() {
        let path = waypoint_config_path("bookinfo", "waypoint");
        assert_eq!(path, "/v1/waypoints/bookinfo/waypoint/config");
        assert_eq!(
            waypoint_of_config_path(&path),
            Some(waypoint("bookinfo", "waypoint"))
        );
        assert_eq!(
            waypoint_of_config_path("/v1/waypoints/ns-1/wp.v2-a/config"),
            Some(waypoint("ns-1", "wp.v2-a"))
        );
    }

    #[test]
    fn paths_name_exactly_one_waypoint() {
        for path in [
            "/v1/waypoints/ns/config",
            "/v1/waypoints/ns/a/b/config",
            "/v1/waypoints//wp/config",
            "/v1/waypoints/ns//config",
            "/v1/waypoints///config",
            "/v1/waypoints/ns/wp/config/",
            "/v1/waypoints/ns/wp",
            "/v1/waypoints/ns/wp/configs",
            "/v2/waypoints/ns/wp/config",
            "/v1/nodes/n/snapshot",
            "/v1/waypoints/../wp/config",
            "/v1/waypoints/ns/%2e%2e/config",
            "/v1/waypoints/ns/a%2Fb/config",
            "/v1/waypoints/NS/wp/config",
            "/v1/waypoints/-ns/wp/config",
            "/v1/waypoints/ns/wp-/config",
            "/v1/waypoints/ns/w p/config",
        ] {
            assert_eq!(waypoint_of_config_path(path), None, "{path}");
        }
        let longest = "a".repeat(253);
        let path = waypoint_config_path("ns", &longest);
        assert!(waypoint_of_config_path(&path).is_some());
        let path = waypoint_config_path("ns", &format!("{longest}a"));
        assert_eq!(waypoint_of_config_path(&path), None, "254 bytes");
    }

    #[test]
    fn urls_carry_the_wait() {
        let url = waypoint_config_url(
            "https://op:15300/",
            &waypoint("bookinfo", "waypoint"),
            Duration::from_secs(30),
        );
        assert_eq!(
            url,
            "https://op:15300/v1/waypoints/bookinfo/waypoint/config?wait=30s"
        );
        let (path, query) = url
            .strip_prefix("https://op:15300")
            .unwrap()
            .split_once('?')
            .unwrap();
        assert_eq!(
            waypoint_of_config_path(path),
            Some(waypoint("bookinfo", "waypoint"))
        );
        assert_eq!(contract::parse_wait(query), Some(Duration::from_secs(30)));
    }

    #[test]
    fn etags_name_the_content_and_are_not_snapshot_etags() {
        let tag = waypoint_config_etag(0xabc);
        assert_eq!(tag, "\"wp-0000000000000abc\"");
        assert_eq!(parse_waypoint_config_etag(&tag), Some(0xabc));
        assert_eq!(contract::parse_etag(&tag), None, "not a snapshot's");
        assert_eq!(
            parse_waypoint_config_etag(&contract::etag(7, 0xabc)),
            None,
            "a snapshot's is not a configuration's"
        );
        assert_eq!(parse_waypoint_config_etag("wp-0000000000000abc"), None);
        assert_eq!(parse_waypoint_config_etag("\"wp-abc\""), None);
        assert_eq!(parse_waypoint_config_etag("\"wp-000000000000000g\""), None);
    }
}
