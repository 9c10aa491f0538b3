//! Request matches of both APIs as the waypoint's [`RequestMatch`]. A match entry either becomes
//! one, or cannot match on the mesh at all (left out, with a note), or cannot be expressed
//! (left out, reported): never a broader match than written.
use kmesh_snapshot::waypoint::{
    HeaderMatch, PathMatch, QueryParamMatch, RequestMatch, StringMatch,
};

use super::regex_problem;
use crate::{
    gateway_api::{HttpHeaderMatch, HttpRouteMatch, PathMatchType, ValueMatchType},
    istio::{self, HttpMatchRequest},
};

/// Why a match entry is left out.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NoMatch {
    /// It can never match a request the waypoint sees (a Note): the reason.
    Never(String),
    /// It is invalid or uses what the waypoint cannot do: the field below the entry, the reason.
    Invalid(String, String),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> NoMatch {
    NoMatch::Invalid(field.into(), reason.into())
}

/// An Istio `StringMatch`: `None` when it sets nothing (`{}`, "present" for headers).
fn istio_string(m: &istio::StringMatch, field: &str) -> Result<Option<StringMatch>, NoMatch> {
    let set = [&m.exact, &m.prefix, &m.regex]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if set > 1 {
        return Err(invalid(
            field,
            "sets more than one of exact, prefix and regex",
        ));
    }
    if let Some(pattern) = &m.regex
        && let Some(problem) = regex_problem(pattern)
    {
        return Err(invalid(field, problem));
    }
    Ok(m.exact
        .clone()
        .map(StringMatch::Exact)
        .or_else(|| m.prefix.clone().map(StringMatch::Prefix))
        .or_else(|| m.regex.clone().map(StringMatch::Regex)))
}

/// Whether `m` matches `value` (the regex is known to compile, and must match it whole).
fn string_matches(m: &StringMatch, value: &str) -> bool {
    match m {
        StringMatch::Exact(e) => e == value,
        StringMatch::Prefix(p) => value.starts_with(p.as_str()),
        StringMatch::Regex(r) => {
            regex::Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(value))
        }
    }
}

/// One entry of a VirtualService route's `match`.
pub(super) fn istio_match(m: &HttpMatchRequest) -> Result<RequestMatch, NoMatch> {
    if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == "mesh") {
        return Err(NoMatch::Never(
            "its gateways do not include mesh: it applies to gateways only".to_string(),
        ));
    }
    // The waypoint receives plain HTTP only (no TLS between client and waypoint), so the scheme
    // is always `http`: a scheme condition is decided here.
    if let Some(scheme) = &m.scheme
        && let Some(scheme) = istio_string(scheme, "scheme")?
        && !string_matches(&scheme, "http")
    {
        return Err(NoMatch::Never(
            "its scheme condition does not match http, the only scheme a waypoint receives"
                .to_string(),
        ));
    }
    let path = match &m.uri {
        Some(uri) => istio_string(uri, "uri")?.map(|uri| match uri {
            StringMatch::Exact(p) => PathMatch::Exact(p),
            StringMatch::Prefix(p) => PathMatch::Prefix(p),
            StringMatch::Regex(p) => PathMatch::Regex(p),
        }),
        None => None,
    };
    let port = match m.port {
        Some(port) => Some(
            u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid("port", "not a port number (1-65535)"))?,
        ),
        None => None,
    };
    let mut headers = Vec::new();
    for (list, entries, invert) in [
        ("headers", &m.headers, false),
        ("withoutHeaders", &m.without_headers, true),
    ] {
        for (name, value) in entries {
            headers.push(HeaderMatch {
                name: name.to_ascii_lowercase(),
                value: istio_string(value, &format!("{list}.{name}"))?,
                invert,
            });
        }
    }
    let mut query_params = Vec::new();
    for (name, value) in &m.query_params {
        query_params.push(QueryParamMatch {
            name: name.clone(),
            value: istio_string(value, &format!("queryParams.{name}"))?,
        });
    }
    Ok(RequestMatch {
        path,
        ignore_path_case: m.ignore_uri_case.unwrap_or(false),
        method: optional(m.method.as_ref(), "method")?,
        authority: optional(m.authority.as_ref(), "authority")?,
        headers,
        query_params,
        port,
        source_namespace: m.source_namespace.clone(),
        source_labels: m.source_labels.clone(),
    })
}

fn optional(m: Option<&istio::StringMatch>, field: &str) -> Result<Option<StringMatch>, NoMatch> {
    match m {
        Some(m) => istio_string(m, field),
        None => Ok(None),
    }
}

/// The path condition of a Gateway API match, defaulted as the CRD does (`PathPrefix /`).
pub(super) fn gateway_path(m: &HttpRouteMatch) -> (PathMatchType, &str) {
    match &m.path {
        Some(path) => (
            path.type_.unwrap_or_default(),
            path.value.as_deref().unwrap_or("/"),
        ),
        None => (PathMatchType::PathPrefix, "/"),
    }
}

/// One match of an HTTPRoute rule.
pub(super) fn gateway_match(m: &HttpRouteMatch) -> Result<RequestMatch, NoMatch> {
    let (kind, value) = gateway_path(m);
    let path = match kind {
        PathMatchType::Exact => PathMatch::Exact(value.to_string()),
        // `/foo/` and `/foo` match the same paths (whole segments): the trailing slash goes.
        PathMatchType::PathPrefix => match value.trim_end_matches('/') {
            "" => PathMatch::SegmentPrefix("/".to_string()),
            trimmed => PathMatch::SegmentPrefix(trimmed.to_string()),
        },
        PathMatchType::RegularExpression => {
            if let Some(problem) = regex_problem(value) {
                return Err(invalid("path.value", problem));
            }
            PathMatch::Regex(value.to_string())
        }
    };
    let mut headers = Vec::new();
    for (i, header) in m.headers.iter().enumerate() {
        headers.push(HeaderMatch {
            name: header.name.to_ascii_lowercase(),
            value: Some(gateway_value(header, &format!("headers[{i}]"))?),
            invert: false,
        });
    }
    let mut query_params = Vec::new();
    for (i, param) in m.query_params.iter().enumerate() {
        query_params.push(QueryParamMatch {
            name: param.name.clone(),
            value: Some(gateway_value(param, &format!("queryParams[{i}]"))?),
        });
    }
    Ok(RequestMatch {
        path: Some(path),
        method: m.method.clone().map(StringMatch::Exact),
        headers,
        query_params,
        ..Default::default()
    })
}

fn gateway_value(m: &HttpHeaderMatch, field: &str) -> Result<StringMatch, NoMatch> {
    match m.type_.unwrap_or_default() {
        ValueMatchType::Exact => Ok(StringMatch::Exact(m.value.clone())),
        ValueMatchType::RegularExpression => match regex_problem(&m.value) {
            Some(problem) => Err(invalid(format!("{field}.value"), problem)),
            None => Ok(StringMatch::Regex(m.value.clone())),
        },
    }
}
