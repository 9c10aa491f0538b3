//! What a VirtualService `http` route does besides matching and choosing destinations: redirect,
//! direct response, rewrite, header operations, retries, fault injection. Each returns the
//! waypoint's form, or `None` with the reason reported at its field.
use kmesh_snapshot::waypoint::{
    AbortFault, DelayFault, DirectResponse, Fault, Header, HeaderOps, PathRewrite, Redirect,
    RegexRewrite, RetryOn, RetryPolicy, Rewrite,
};

use super::{super::Compiler, regex_problem};
use crate::{
    diagnostics::ObjectRef,
    durations::millis_ceil,
    istio::{
        HeaderOperations, HttpDirectResponse, HttpFaultInjection, HttpRedirect, HttpRetry,
        HttpRewrite, Percent,
    },
};

/// Where a route is written: its object and its field (`spec.http[2]`).
pub(super) struct RouteAt<'r> {
    pub(super) object: &'r ObjectRef,
    pub(super) field: String,
}

impl RouteAt<'_> {
    pub(super) fn at(&self, below: &str) -> String {
        format!("{}.{below}", self.field)
    }
}

/// Istio's retry policy when a route sets none: 2 retries on connect-failure, refused-stream,
/// unavailable, cancelled and retriable-status-codes, the retriable status being 503. Source:
/// istio/istio `pilot/pkg/networking/core/route/retry/retry.go` (`defaultPolicy`; 503 unless
/// `EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY` is set, which it is not by default).
pub(super) fn default_retry_policy() -> RetryPolicy {
    RetryPolicy {
        attempts: 2,
        per_try_timeout_ms: None,
        retry_on: DEFAULT_RETRY_ON.to_vec(),
        retriable_status_codes: vec![503],
    }
}

const DEFAULT_RETRY_ON: [RetryOn; 5] = [
    RetryOn::ConnectFailure,
    RetryOn::RefusedStream,
    RetryOn::Unavailable,
    RetryOn::Cancelled,
    RetryOn::RetriableStatusCodes,
];

/// Envoy's name of a `retry_on` condition the waypoint knows.
fn retry_condition(name: &str) -> Option<RetryOn> {
    Some(match name {
        "5xx" => RetryOn::FiveXx,
        "gateway-error" => RetryOn::GatewayError,
        "reset" => RetryOn::Reset,
        "connect-failure" => RetryOn::ConnectFailure,
        "refused-stream" => RetryOn::RefusedStream,
        "retriable-4xx" => RetryOn::Retriable4xx,
        "retriable-status-codes" => RetryOn::RetriableStatusCodes,
        "cancelled" => RetryOn::Cancelled,
        "deadline-exceeded" => RetryOn::DeadlineExceeded,
        "resource-exhausted" => RetryOn::ResourceExhausted,
        "internal" => RetryOn::Internal,
        "unavailable" => RetryOn::Unavailable,
        _ => return None,
    })
}

/// A percentage as the waypoint reads it, or why not.
fn percent(value: f64) -> Result<f64, String> {
    if (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not a percentage from 0 to 100"))
    }
}

impl Compiler<'_> {
    /// `retries`, as Istio's `ConvertPolicy`: absent, Istio's default; `attempts` 0, none; else
    /// the default with the given attempts, per-try timeout and `retryOn` (where numbers are
    /// retriable statuses, and `retriable-status-codes` is added when there are some).
    pub(super) fn retry_policy(
        &mut self,
        at: &RouteAt<'_>,
        retries: Option<&HttpRetry>,
    ) -> Option<RetryPolicy> {
        let Some(retries) = retries else {
            return Some(default_retry_policy());
        };
        let attempts = u32::try_from(retries.attempts).ok().filter(|a| *a > 0)?;
        let mut policy = default_retry_policy();
        policy.attempts = attempts;
        policy.per_try_timeout_ms = retries.per_try_timeout.map(|t| millis_ceil(t.0));
        for (field, set) in [
            (
                "retryRemoteLocalities",
                retries.retry_remote_localities == Some(true),
            ),
            (
                "retryIgnorePreviousHosts",
                retries.retry_ignore_previous_hosts.is_some(),
            ),
            ("backoff", retries.backoff.is_some()),
        ] {
            if set {
                let field = at.at(&format!("retries.{field}"));
                self.unenforced(at.object, &field, "not supported by the waypoint; left out");
            }
        }
        if let Some(conditions) = retries.retry_on.as_deref().filter(|r| !r.trim().is_empty()) {
            (policy.retry_on, policy.retriable_status_codes) =
                self.retry_conditions(at, conditions);
            if !policy.retriable_status_codes.is_empty()
                && !policy.retry_on.contains(&RetryOn::RetriableStatusCodes)
            {
                policy.retry_on.push(RetryOn::RetriableStatusCodes);
            }
        }
        Some(policy)
    }

    /// `retryOn`: the conditions and the statuses; unknown names are reported and left out.
    fn retry_conditions(&mut self, at: &RouteAt<'_>, conditions: &str) -> (Vec<RetryOn>, Vec<u16>) {
        let mut retry_on = Vec::new();
        let mut statuses = Vec::new();
        for part in conditions
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            if let Ok(status) = part.parse::<u16>()
                && (200..=599).contains(&status)
            {
                statuses.push(status);
            } else if let Some(condition) = retry_condition(part) {
                retry_on.push(condition);
            } else {
                let reason =
                    format!("{part:?} is not a retry condition the waypoint supports; left out");
                self.unenforced(at.object, &at.at("retries.retryOn"), reason);
            }
        }
        (retry_on, statuses)
    }

    /// `fault`: a delay with a fixed delay, an abort with an HTTP status. A percentage left out
    /// is 0 (Istio: "if left unspecified, no request will be" delayed or aborted).
    pub(super) fn fault(&mut self, at: &RouteAt<'_>, fault: &HttpFaultInjection) -> Option<Fault> {
        let mut out = Fault::default();
        if let Some(delay) = &fault.delay {
            let share = match (delay.percentage, delay.percent) {
                (Some(Percent { value }), _) => value,
                (None, Some(percent)) => f64::from(percent),
                (None, None) => 0.0,
            };
            match (delay.fixed_delay, percent(share)) {
                (Some(fixed), Ok(share)) => {
                    out.delay = Some(DelayFault {
                        fixed_delay_ms: millis_ceil(fixed.0),
                        percent: share,
                    })
                }
                (None, _) => self.unenforced(
                    at.object,
                    &at.at("fault.delay"),
                    "only a fixedDelay is supported by the waypoint (exponentialDelay is not); the delay is left out",
                ),
                (_, Err(reason)) => self.reject(at.object, &at.at("fault.delay.percentage"), reason),
            }
        }
        if let Some(abort) = &fault.abort {
            let share = percent(abort.percentage.map_or(0.0, |p| p.value));
            let status = abort.http_status.and_then(|s| u16::try_from(s).ok());
            match (status, share) {
                (Some(status), Ok(share)) if (200..=599).contains(&status) => {
                    out.abort = Some(AbortFault { status, percent: share })
                }
                (_, Err(reason)) => self.reject(at.object, &at.at("fault.abort.percentage"), reason),
                (Some(status), _) => self.reject(
                    at.object,
                    &at.at("fault.abort.httpStatus"),
                    format!("{status} is not an HTTP status from 200 to 599; the abort is left out"),
                ),
                (None, _) => self.unenforced(
                    at.object,
                    &at.at("fault.abort"),
                    "only httpStatus aborts are supported by the waypoint (grpcStatus and http2Error are not); the abort is left out",
                ),
            }
        }
        (out.delay.is_some() || out.abort.is_some()).then_some(out)
    }

    /// `redirect`: Istio's default status is 301; `derivePort: FROM_REQUEST_PORT` is the
    /// waypoint's unset port.
    pub(super) fn redirect(
        &mut self,
        at: &RouteAt<'_>,
        redirect: &HttpRedirect,
    ) -> Option<Redirect> {
        let port = match (redirect.port, redirect.derive_port.as_deref()) {
            (Some(port), _) => {
                Some(u16::try_from(port).ok().filter(|p| *p != 0).or_else(|| {
                    self.reject(
                        at.object,
                        &at.at("redirect.port"),
                        "not a port number (1-65535)",
                    );
                    None
                })?)
            }
            (None, None | Some("FROM_REQUEST_PORT")) => None,
            (None, Some(other)) => {
                let reason = format!(
                    "derivePort {other} is not supported by the waypoint; the route is left out"
                );
                self.unenforced(at.object, &at.at("redirect.derivePort"), reason);
                return None;
            }
        };
        let status = redirect.redirect_code.unwrap_or(301);
        Some(Redirect {
            scheme: redirect.scheme.clone(),
            authority: redirect.authority.clone(),
            port,
            path: redirect.uri.clone().map(PathRewrite::Full),
            status: u16::try_from(status).unwrap_or(0),
        })
    }

    /// `directResponse`: a `bytes` body (base64) is not supported.
    pub(super) fn direct_response(
        &mut self,
        at: &RouteAt<'_>,
        response: &HttpDirectResponse,
    ) -> Option<DirectResponse> {
        let body = response.body.as_ref();
        if body.is_some_and(|b| b.bytes.is_some()) {
            let reason =
                "a bytes body is not supported by the waypoint (string is); the route is left out";
            self.unenforced(at.object, &at.at("directResponse.body.bytes"), reason);
            return None;
        }
        Some(DirectResponse {
            status: u16::try_from(response.status).unwrap_or(0),
            body: body.and_then(|b| b.string.clone()),
        })
    }

    /// `rewrite`: `uri` replaces what a prefix match matched (else the whole path), as Istio does;
    /// `uriRegexRewrite` replaces every match of its pattern.
    pub(super) fn rewrite(&mut self, at: &RouteAt<'_>, rewrite: &HttpRewrite) -> Option<Rewrite> {
        let path = match (&rewrite.uri, &rewrite.uri_regex_rewrite) {
            (Some(_), Some(_)) => {
                let reason = "uri and uriRegexRewrite cannot both be set; the route is left out";
                self.reject(at.object, &at.at("rewrite"), reason);
                return None;
            }
            (Some(uri), None) => Some(PathRewrite::MatchedPrefix(uri.clone())),
            (None, Some(regex)) => {
                if let Some(problem) = regex_problem(&regex.pattern) {
                    self.reject(at.object, &at.at("rewrite.uriRegexRewrite.match"), problem);
                    return None;
                }
                Some(PathRewrite::Regex(RegexRewrite {
                    pattern: regex.pattern.clone(),
                    substitution: regex.rewrite.clone(),
                }))
            }
            (None, None) => None,
        };
        Some(Rewrite {
            path,
            authority: rewrite.authority.clone(),
        })
    }
}

/// Istio's header operations (maps, so in name order) as the waypoint's; names lowercase.
pub(super) fn header_ops(ops: Option<&HeaderOperations>) -> HeaderOps {
    let Some(ops) = ops else {
        return HeaderOps::default();
    };
    let headers = |map: &std::collections::BTreeMap<String, String>| {
        map.iter()
            .map(|(name, value)| Header {
                name: name.to_ascii_lowercase(),
                value: value.clone(),
            })
            .collect()
    };
    HeaderOps {
        remove: ops.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
        set: headers(&ops.set),
        add: headers(&ops.add),
    }
}
