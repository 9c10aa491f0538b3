//! What a route does to a request and its response on the way: header operations, path and
//! authority rewrites, the `Location` of a redirect, and the draws of fault injection and mirrors.
//! It owns those edits compiled (header names and values parsed, rewrite regexes compiled, RE2
//! substitutions translated) and promises edits that cannot fail at request time except where a
//! rewritten path is not a valid URI path, which is an error the proxy answers, never a panic.
//!
//! Orders, as the contract states them: header operations remove, then set (replacing every
//! value), then add (appending); the route's operations, then the chosen destination's (so a
//! destination's `set` wins over its route's).
use std::time::Duration;

use http::{
    HeaderMap, HeaderName, HeaderValue, StatusCode,
    uri::{Authority, PathAndQuery},
};
use kmesh_snapshot::waypoint::{Fault, HeaderOps, Mirror, PathRewrite, Redirect};
use regex::Regex;

use crate::{
    matching::{MatchedPrefix, PrefixKind, RequestHead},
    table::{Route, TableError, compile_unanchored},
};

/// A compiled [`HeaderOps`].
#[derive(Debug, Default)]
pub struct HeaderEdits {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

fn unusable(field: impl Into<String>, problem: impl Into<String>) -> TableError {
    TableError::Unusable {
        field: field.into(),
        problem: problem.into(),
    }
}

impl HeaderEdits {
    pub(crate) fn compile(field: &str, ops: &HeaderOps) -> Result<HeaderEdits, TableError> {
        let name = |field: String, name: &str| {
            if name.starts_with(':') {
                return Err(unusable(
                    field,
                    format!("{name:?}: a pseudo-header is not changed by header operations"),
                ));
            }
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| unusable(field, format!("{name:?}: {e}")))
        };
        let pairs = |list: &str, headers: &[kmesh_snapshot::waypoint::Header]| {
            headers
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let header_name = name(format!("{field}.{list}[{i}].name"), &h.name)?;
                    let value = HeaderValue::from_str(&h.value).map_err(|e| {
                        unusable(format!("{field}.{list}[{i}].value"), e.to_string())
                    })?;
                    Ok((header_name, value))
                })
                .collect::<Result<Vec<_>, TableError>>()
        };
        let remove = ops
            .remove
            .iter()
            .enumerate()
            .map(|(i, n)| name(format!("{field}.remove[{i}]"), n))
            .collect::<Result<_, _>>()?;
        Ok(HeaderEdits {
            remove,
            set: pairs("set", &ops.set)?,
            add: pairs("add", &ops.add)?,
        })
    }

    /// Remove, then set, then add.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// The request's headers as forwarded to `destination` (an index into the route's
/// destinations; out of range: the route's operations only).
pub fn edit_request_headers(route: &Route, destination: Option<usize>, headers: &mut HeaderMap) {
    route.edits.request_headers.apply(headers);
    if let Some(edits) = destination.and_then(|d| route.edits.destinations.get(d)) {
        edits.0.apply(headers);
    }
}

/// The response's headers as returned to the client.
pub fn edit_response_headers(route: &Route, destination: Option<usize>, headers: &mut HeaderMap) {
    route.edits.response_headers.apply(headers);
    if let Some(edits) = destination.and_then(|d| route.edits.destinations.get(d)) {
        edits.1.apply(headers);
    }
}

/// Everything of a route compiled for its edits.
#[derive(Debug, Default)]
pub(crate) struct RouteEdits {
    pub(crate) request_headers: HeaderEdits,
    pub(crate) response_headers: HeaderEdits,
    /// (request, response) edits of each forward destination, in order.
    pub(crate) destinations: Vec<(HeaderEdits, HeaderEdits)>,
    pub(crate) path_rewrite: Option<PathRewriter>,
    pub(crate) authority_rewrite: Option<HeaderValue>,
    pub(crate) redirect_path: Option<PathRewriter>,
}

/// A compiled [`PathRewrite`].
#[derive(Debug)]
pub(crate) enum PathRewriter {
    Full(String),
    MatchedPrefix(String),
    /// The pattern unanchored (every match is replaced); the substitution in the regex crate's
    /// syntax.
    Regex {
        regex: Regex,
        replacement: String,
    },
}

impl PathRewriter {
    pub(crate) fn compile(field: &str, rewrite: &PathRewrite) -> Result<PathRewriter, TableError> {
        Ok(match rewrite {
            PathRewrite::Full(path) => PathRewriter::Full(path.clone()),
            PathRewrite::MatchedPrefix(prefix) => PathRewriter::MatchedPrefix(prefix.clone()),
            PathRewrite::Regex(r) => PathRewriter::Regex {
                regex: compile_unanchored(&format!("{field}.pattern"), &r.pattern)?,
                replacement: re2_substitution(&r.substitution)
                    .map_err(|problem| unusable(format!("{field}.substitution"), problem))?,
            },
        })
    }
}

/// RE2's substitution syntax (`\1` a group, `\\` a backslash, `$` itself) in the regex crate's
/// (`${1}`, `$$`).
pub(crate) fn re2_substitution(re2: &str) -> Result<String, String> {
    let mut out = String::with_capacity(re2.len() + 8);
    let mut chars = re2.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(d @ '0'..='9') => {
                    out.push_str("${");
                    out.push(d);
                    out.push('}');
                }
                Some('\\') => out.push('\\'),
                other => {
                    return Err(format!(
                        "{re2:?}: a backslash must be followed by a digit or a backslash, not {other:?}"
                    ));
                }
            },
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Why a rewrite cannot be made for a request (the proxy answers it with an error status).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    #[error("the rewritten path {0:?} is not a valid URI path")]
    InvalidPath(String),
    #[error("the request has no authority to redirect to")]
    NoAuthority,
}

/// The request's path and query as forwarded (the route's rewrite), or `None`: unchanged.
pub fn rewrite_request_path(
    route: &Route,
    request: &RequestHead<'_>,
    matched: Option<MatchedPrefix>,
) -> Option<Result<PathAndQuery, RewriteError>> {
    let rewriter = route.edits.path_rewrite.as_ref()?;
    Some(rewrite_path(rewriter, request.path, request.query, matched))
}

/// The new `Host`/`:authority`, if the route rewrites it.
pub fn rewrite_authority(route: &Route) -> Option<&HeaderValue> {
    route.edits.authority_rewrite.as_ref()
}

/// `path` rewritten, with `query` kept.
pub(crate) fn rewrite_path(
    rewriter: &PathRewriter,
    path: &str,
    query: Option<&str>,
    matched: Option<MatchedPrefix>,
) -> Result<PathAndQuery, RewriteError> {
    let mut new_path = match rewriter {
        PathRewriter::Full(full) => full.clone(),
        PathRewriter::MatchedPrefix(replacement) => match matched {
            Some(prefix) => replace_prefix(path, prefix, replacement),
            None => replacement.clone(),
        },
        PathRewriter::Regex { regex, replacement } => {
            regex.replace_all(path, replacement.as_str()).into_owned()
        }
    };
    if new_path.is_empty() {
        new_path.push('/');
    }
    if let Some(query) = query {
        new_path.push('?');
        new_path.push_str(query);
    }
    PathAndQuery::try_from(new_path.as_str()).map_err(|_| RewriteError::InvalidPath(new_path))
}

/// `path` with its matched prefix replaced. A string prefix (Istio, Envoy's `prefix_rewrite`)
/// is replaced byte for byte: `/reviews` → `/` makes `/reviews/1` `//1`. A segment prefix follows
/// the Gateway API's `ReplacePrefixMatch` table: the replacement's trailing `/` is dropped and
/// the rest keeps its own, so `/foo` → `/` makes `/foo` `/` and `/foo/bar` `/bar`.
fn replace_prefix(path: &str, prefix: MatchedPrefix, replacement: &str) -> String {
    let rest = path.get(prefix.len..).unwrap_or("");
    match prefix.kind {
        PrefixKind::String => format!("{replacement}{rest}"),
        PrefixKind::Segment => format!("{}{rest}", replacement.trim_end_matches('/')),
    }
}

/// A redirect's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectAnswer {
    pub status: StatusCode,
    pub location: HeaderValue,
}

/// The redirect of `route` for `request`. Unset parts keep the request's: its scheme (`http`
/// when it says none), its host, its port, its path (rewritten by `redirect.path`) and always
/// its query. Setting the scheme drops the request's port (the new scheme's default is meant, as
/// the Gateway API says); a port that is its scheme's default (http 80, https 443) is left out.
pub fn redirect(
    route: &Route,
    redirect: &Redirect,
    request: &RequestHead<'_>,
    matched: Option<MatchedPrefix>,
) -> Result<RedirectAnswer, RewriteError> {
    let request_authority = request.authority.and_then(|a| a.parse::<Authority>().ok());
    let host = match (&redirect.authority, &request_authority) {
        (Some(host), _) => host.as_str(),
        (None, Some(authority)) => authority.host(),
        (None, None) => return Err(RewriteError::NoAuthority),
    };
    let scheme = redirect
        .scheme
        .as_deref()
        .or(request.scheme)
        .unwrap_or("http");
    let port = match (redirect.port, &redirect.scheme) {
        (Some(port), _) => Some(port),
        (None, Some(_)) => None,
        (None, None) => request_authority.as_ref().and_then(Authority::port_u16),
    };
    let port = port.filter(|&p| !matches!((scheme, p), ("http", 80) | ("https", 443)));
    let path_and_query = match &route.edits.redirect_path {
        Some(rewriter) => rewrite_path(rewriter, request.path, request.query, matched)?,
        None => rewrite_path(
            &PathRewriter::Full(request.path.to_owned()),
            request.path,
            request.query,
            None,
        )?,
    };
    let location = match port {
        Some(port) => format!("{scheme}://{host}:{port}{path_and_query}"),
        None => format!("{scheme}://{host}{path_and_query}"),
    };
    Ok(RedirectAnswer {
        // Validation allows only 301, 302, 303, 307 and 308.
        status: StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::MOVED_PERMANENTLY),
        location: HeaderValue::try_from(location.as_str())
            .map_err(|_| RewriteError::InvalidPath(location))?,
    })
}

/// What fault injection does to one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultDecision {
    /// Hold the request this long first.
    pub delay: Option<Duration>,
    /// Answer with this status instead of forwarding.
    pub abort: Option<StatusCode>,
}

/// Parts per million, Envoy's `FractionalPercent` resolution (0.0001 %).
const PER_MILLION: u64 = 1_000_000;

/// Whether an event of `percent` % happens, from one uniform draw.
pub(crate) fn happens(percent: f64, draw: u32) -> bool {
    // Validation keeps `percent` within 0..=100, so this is 0..=1_000_000 (and `as` saturates).
    let threshold = (percent * 10_000.0).round() as u64;
    ((u64::from(draw) * PER_MILLION) >> 32) < threshold
}

/// The delay and the abort of `fault` for one request, each drawn on its own (as Envoy).
pub fn decide_fault(fault: &Fault, draw: &mut impl FnMut() -> u32) -> FaultDecision {
    let delay = fault
        .delay
        .as_ref()
        .filter(|d| happens(d.percent, draw()))
        .map(|d| Duration::from_millis(d.fixed_delay_ms));
    let abort = fault
        .abort
        .as_ref()
        .filter(|a| happens(a.percent, draw()))
        // Validation keeps the status within 200..=599.
        .and_then(|a| StatusCode::from_u16(a.status).ok());
    FaultDecision { delay, abort }
}

/// The clusters this request is mirrored to, each mirror drawn on its own.
pub fn decide_mirrors(mirrors: &[Mirror], draw: &mut impl FnMut() -> u32) -> Vec<u32> {
    mirrors
        .iter()
        .filter(|m| happens(m.percent, draw()))
        .map(|m| m.cluster)
        .collect()
}

#[cfg(test)]
mod tests;
