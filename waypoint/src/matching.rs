//! Which route takes a request. Given a port's compiled routes, a request head and its client,
//! [`first_match`] goes through the routes in order and returns the first whose matches hold
//! (first match wins; `None` is Envoy's `NR`, a 404). It reads the request and never changes it.
//!
//! Choices made as Envoy makes them for Istio, since that is what a route means to its author:
//! - The path is compared without its query string, as the request carries it (no decoding, no
//!   normalisation: that is the proxy's, before matching).
//! - `ignore_path_case` applies to exact, prefix and segment-prefix paths, not to a regex (Istio:
//!   "the case will be ignored only in the case of exact and prefix URI matches").
//! - The authority is compared whole, `:port` included (Istio's `authority` is a match on the
//!   `:authority` header, which keeps the port): `Prefix("reviews")` matches `reviews:9080`,
//!   `Exact("reviews")` does not.
//! - A header sent several times is compared as its values joined with `,` (Envoy's
//!   `getAllOfHeaderAsString`). An absent header fails every comparison, presence included, so an
//!   inverted condition on an absent header holds (`withoutHeaders: {end-user: {exact: jason}}`
//!   takes a request without `end-user`). A value that is not UTF-8 fails every comparison but
//!   presence (and so holds when inverted).
//! - Query parameter names and values are percent-decoded (`%XX` only; `+` stays `+`, as Envoy's
//!   decoding leaves it) before comparison; a parameter without `=` has the empty value; a
//!   parameter given twice is compared by its first value (Envoy's `getFirstValue`).
//! - Source conditions need a known client: a client that is no workload matches none of them.
use std::borrow::Cow;

use http::{HeaderMap, Method, request::Parts};

use crate::{
    identity::Client,
    table::{
        Conditions, HeaderCondition, PathCondition, PortTable, QueryCondition, Route, TextCondition,
    },
};

/// What the matcher reads of a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestHead<'r> {
    pub method: &'r Method,
    /// The path, without the query string.
    pub path: &'r str,
    /// The query string, without its `?`.
    pub query: Option<&'r str>,
    /// `:authority` (HTTP/2, or an absolute-form HTTP/1.1 target), else the `Host` header.
    pub authority: Option<&'r str>,
    /// `http` or `https`, as the request says; `None`: not said (the waypoint listens in plain
    /// text, so the proxy treats it as `http`).
    pub scheme: Option<&'r str>,
    pub headers: &'r HeaderMap,
}

impl<'r> RequestHead<'r> {
    /// The head of a request as hyper hands it over.
    pub fn from_parts(parts: &'r Parts) -> RequestHead<'r> {
        let authority = match parts.uri.authority() {
            Some(authority) => Some(authority.as_str()),
            None => parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok()),
        };
        RequestHead {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            authority,
            scheme: parts.uri.scheme_str(),
            headers: &parts.headers,
        }
    }
}

/// The route that takes a request.
#[derive(Clone, Copy, Debug)]
pub struct RouteMatch<'t> {
    /// Its index in the port's routes.
    pub index: usize,
    pub route: &'t Route,
    /// What a `Prefix` or `SegmentPrefix` path condition matched, for
    /// `PathRewrite::MatchedPrefix`; `None` after a match of another kind or none.
    pub matched_prefix: Option<MatchedPrefix>,
}

/// The part of the request's path a prefix condition matched: `path[..len]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatchedPrefix {
    pub len: usize,
    pub kind: PrefixKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixKind {
    /// Istio's string prefix: a rewrite replaces exactly these bytes.
    String,
    /// The Gateway API's whole-segment prefix (`len` excludes a trailing `/` of the prefix): a
    /// rewrite follows `ReplacePrefixMatch`'s rules.
    Segment,
}

/// The first route of `port` whose matches `request` from `client` satisfies.
pub fn first_match<'t>(
    port: &'t PortTable,
    request: &RequestHead<'_>,
    client: &Client<'_>,
) -> Option<RouteMatch<'t>> {
    port.routes.iter().enumerate().find_map(|(index, route)| {
        let matched_prefix = route_matches(route, port.port, request, client)?;
        Some(RouteMatch {
            index,
            route,
            matched_prefix,
        })
    })
}

/// `None`: the route does not take the request. `Some(prefix)`: it does, through a match whose
/// path condition matched `prefix` (if a prefix one).
fn route_matches(
    route: &Route,
    port: u16,
    request: &RequestHead<'_>,
    client: &Client<'_>,
) -> Option<Option<MatchedPrefix>> {
    if route.matches.is_empty() {
        return Some(None);
    }
    route
        .matches
        .iter()
        .find_map(|conditions| conditions_hold(conditions, port, request, client))
}

fn conditions_hold(
    c: &Conditions,
    port: u16,
    request: &RequestHead<'_>,
    client: &Client<'_>,
) -> Option<Option<MatchedPrefix>> {
    let matched_prefix = match &c.path {
        None => None,
        Some(path) => path_matches(path, c.ignore_path_case, request.path)?,
    };
    let holds = c.port.is_none_or(|p| p == port)
        && c.method
            .as_ref()
            .is_none_or(|m| m.matches(request.method.as_str()))
        && c.authority
            .as_ref()
            .is_none_or(|a| request.authority.is_some_and(|v| a.matches(v)))
        && c.headers.iter().all(|h| header_holds(h, request))
        && c.query_params.iter().all(|q| query_holds(q, request.query))
        && source_holds(c, client);
    holds.then_some(matched_prefix)
}

/// `None`: no match. `Some(prefix)`: a match, and what a prefix condition matched.
fn path_matches(
    condition: &PathCondition,
    ignore_case: bool,
    path: &str,
) -> Option<Option<MatchedPrefix>> {
    let eq = |a: &[u8], b: &[u8]| {
        if ignore_case {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    };
    let starts_with = |prefix: &str| {
        path.as_bytes()
            .get(..prefix.len())
            .is_some_and(|head| eq(head, prefix.as_bytes()))
    };
    match condition {
        PathCondition::Exact(exact) => eq(path.as_bytes(), exact.as_bytes()).then_some(None),
        PathCondition::Prefix(prefix) => starts_with(prefix).then_some(Some(MatchedPrefix {
            len: prefix.len(),
            kind: PrefixKind::String,
        })),
        PathCondition::SegmentPrefix(prefix) => {
            // `prefix` has no trailing `/`: the path must go on with a `/` or end there.
            let whole_segments = starts_with(prefix)
                && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'));
            whole_segments.then_some(Some(MatchedPrefix {
                len: prefix.len(),
                kind: PrefixKind::Segment,
            }))
        }
        PathCondition::Regex(regex) => regex.is_match(path).then_some(None),
    }
}

impl TextCondition {
    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            TextCondition::Exact(exact) => value == exact,
            TextCondition::Prefix(prefix) => value.starts_with(prefix.as_str()),
            TextCondition::Regex(regex) => regex.is_match(value),
        }
    }
}

fn header_holds(condition: &HeaderCondition, request: &RequestHead<'_>) -> bool {
    let compared = match header_value(request, &condition.name) {
        None => false,
        Some(value) => match &condition.value {
            None => true,
            Some(text) => value.is_some_and(|v| text.matches(&v)),
        },
    };
    compared != condition.invert
}

/// `None`: absent. `Some(None)`: present, not UTF-8. `Some(Some(v))`: the value, several joined
/// with `,`. A pseudo-header is the part of the request it names.
fn header_value<'r>(request: &RequestHead<'r>, name: &str) -> Option<Option<Cow<'r, str>>> {
    let pseudo = match name {
        ":authority" => Some(request.authority.map(Cow::Borrowed)),
        ":method" => Some(Some(Cow::Borrowed(request.method.as_str()))),
        ":path" => Some(Some(match request.query {
            Some(query) => Cow::Owned(format!("{}?{query}", request.path)),
            None => Cow::Borrowed(request.path),
        })),
        ":scheme" => Some(Some(Cow::Borrowed(request.scheme.unwrap_or("http")))),
        _ => None,
    };
    if let Some(value) = pseudo {
        return value.map(Some);
    }
    let mut values = request.headers.get_all(name).iter();
    let first = values.next()?;
    let mut joined = match first.to_str() {
        Ok(v) => Cow::Borrowed(v),
        Err(_) => return Some(None),
    };
    for value in values {
        let Ok(value) = value.to_str() else {
            return Some(None);
        };
        let joined = joined.to_mut();
        joined.push(',');
        joined.push_str(value);
    }
    Some(Some(joined))
}

fn query_holds(condition: &QueryCondition, query: Option<&str>) -> bool {
    let Some(value) = query_param(query, &condition.name) else {
        return false;
    };
    condition.value.as_ref().is_none_or(|v| v.matches(&value))
}

/// The first value of the parameter `name` in `query`, both percent-decoded.
pub(crate) fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<Cow<'q, str>> {
    query?
        .split('&')
        .filter(|pair| !pair.is_empty())
        .find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key) == name).then(|| percent_decode(value))
        })
}

/// `%XX` decoded (a `%` not followed by two hex digits stays as it is); bytes that are not UTF-8
/// become U+FFFD.
pub(crate) fn percent_decode(text: &str) -> Cow<'_, str> {
    if !text.contains('%') {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
        match (byte, hex(i + 1), hex(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                // Two hex digits: at most 255.
                decoded.push((high * 16 + low) as u8);
                i += 3;
            }
            _ => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&decoded).into_owned())
}

fn source_holds(c: &Conditions, client: &Client<'_>) -> bool {
    if c.source_namespace.is_none() && c.source_labels.is_empty() {
        return true;
    }
    let Some(workload) = client.workload else {
        return false;
    };
    c.source_namespace
        .as_ref()
        .is_none_or(|ns| *ns == workload.namespace)
        && c.source_labels
            .iter()
            .all(|(key, value)| workload.labels.get(key) == Some(value))
}

#[cfg(test)]
mod tests;
