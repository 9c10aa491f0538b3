//! Whether a failed try is tried again, and the deadlines of a request and of each try. It owns
//! the meaning of every [`RetryOn`] condition (as the contract's doc comments define them) and
//! promises a decision for every outcome, never a panic: `Retry` only when a condition of the
//! policy names the outcome and a retry is left.
//!
//! Two readings the contract leaves to the engine, taken as Envoy does:
//! - [`Outcome::Timeout`] is a try's own deadline passing; it counts as a 504 (what Envoy answers
//!   for it), so `5xx` and `gateway-error` retry it. The whole request's deadline passing ends
//!   the request: the proxy does not ask.
//! - `5xx` retries an HTTP/2 `REFUSED_STREAM` too: it is a reset of the stream.
use std::time::Duration;

use kmesh_snapshot::waypoint::{HttpRoute, RetryOn, RetryPolicy};

/// How one try ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer: its status, and the `grpc-status` of its headers if it has one (a gRPC
    /// trailers-only answer).
    Status {
        status: u16,
        grpc_status: Option<u32>,
    },
    ConnectFailure,
    /// The connection or the stream was reset before an answer.
    Reset,
    /// HTTP/2 `REFUSED_STREAM`.
    RefusedStream,
    /// The try's own deadline passed.
    Timeout,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    Retry,
    /// The outcome is not one the policy retries: it is the answer.
    Final,
    /// It would be retried, but every retry is spent (Envoy's `URX`).
    Exhausted,
}

/// The decision after a try ended in `outcome`, `retries_done` retries into the request.
pub fn decide_retry(
    policy: Option<&RetryPolicy>,
    retries_done: u32,
    outcome: Outcome,
) -> RetryDecision {
    let Some(policy) = policy else {
        return RetryDecision::Final;
    };
    if !policy
        .retry_on
        .iter()
        .any(|on| retries(*on, policy, outcome))
    {
        RetryDecision::Final
    } else if retries_done >= policy.attempts {
        RetryDecision::Exhausted
    } else {
        RetryDecision::Retry
    }
}

/// Whether the condition `on` names `outcome`.
fn retries(on: RetryOn, policy: &RetryPolicy, outcome: Outcome) -> bool {
    let status = match outcome {
        Outcome::Status { status, .. } => Some(status),
        Outcome::Timeout => Some(504),
        _ => None,
    };
    let grpc =
        |code: u32| matches!(outcome, Outcome::Status { grpc_status: Some(c), .. } if c == code);
    match on {
        RetryOn::FiveXx => {
            status.is_some_and(|s| (500..=599).contains(&s))
                || matches!(
                    outcome,
                    Outcome::Reset | Outcome::ConnectFailure | Outcome::RefusedStream
                )
        }
        RetryOn::GatewayError => {
            status.is_some_and(|s| matches!(s, 502..=504))
                || matches!(
                    outcome,
                    Outcome::Reset | Outcome::ConnectFailure | Outcome::RefusedStream
                )
        }
        RetryOn::Reset => matches!(outcome, Outcome::Reset | Outcome::RefusedStream),
        RetryOn::ConnectFailure => outcome == Outcome::ConnectFailure,
        RetryOn::RefusedStream => outcome == Outcome::RefusedStream,
        RetryOn::Retriable4xx => matches!(outcome, Outcome::Status { status: 409, .. }),
        RetryOn::RetriableStatusCodes => matches!(
            outcome,
            Outcome::Status { status, .. } if policy.retriable_status_codes.contains(&status)
        ),
        RetryOn::Cancelled => grpc(1),
        RetryOn::DeadlineExceeded => grpc(4),
        RetryOn::ResourceExhausted => grpc(8),
        RetryOn::Internal => grpc(13),
        RetryOn::Unavailable => grpc(14),
    }
}

/// A request's deadlines. The proxy bounds each try by the earlier of its own deadline and what
/// is left of the request's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deadlines {
    /// The whole request, retries included; `None`: none.
    pub request: Option<Duration>,
    /// Each try; `None`: only the request's.
    pub per_try: Option<Duration>,
}

/// The route's deadlines; 0 ms means none, as Envoy reads a zero timeout.
pub fn deadlines(route: &HttpRoute) -> Deadlines {
    let positive = |ms: Option<u64>| ms.filter(|&ms| ms > 0).map(Duration::from_millis);
    Deadlines {
        request: positive(route.timeout_ms),
        per_try: positive(route.retries.as_ref().and_then(|r| r.per_try_timeout_ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::tests::route;

    fn policy(retry_on: &[RetryOn]) -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            per_try_timeout_ms: None,
            retry_on: retry_on.to_vec(),
            retriable_status_codes: vec![409],
        }
    }

    fn status(status: u16) -> Outcome {
        Outcome::Status {
            status,
            grpc_status: None,
        }
    }

    fn grpc(code: u32) -> Outcome {
        Outcome::Status {
            status: 200,
            grpc_status: Some(code),
        }
    }

    /// Which of `outcomes` `on` retries (with a retry left).
    fn retried(on: RetryOn, outcomes: &[Outcome]) -> Vec<Outcome> {
        let policy = policy(&[on]);
        outcomes
            .iter()
            .copied()
            .filter(|o| decide_retry(Some(&policy), 0, *o) == RetryDecision::Retry)
            .collect()
    }

    fn all() -> Vec<Outcome> {
        let mut all: Vec<Outcome> = [200, 404, 409, 429, 500, 501, 502, 503, 504, 599]
            .into_iter()
            .map(status)
            .collect();
        all.extend([1, 4, 8, 13, 14, 2].map(grpc));
        all.extend([
            Outcome::ConnectFailure,
            Outcome::Reset,
            Outcome::RefusedStream,
            Outcome::Timeout,
        ]);
        all
    }

    #[test]
    fn every_retry_on_condition_retries_what_it_names_and_nothing_else() {
        use Outcome::*;
        let s = status;
        let cases: [(RetryOn, Vec<Outcome>); 12] = [
            (
                RetryOn::FiveXx,
                vec![
                    s(500),
                    s(501),
                    s(502),
                    s(503),
                    s(504),
                    s(599),
                    ConnectFailure,
                    Reset,
                    RefusedStream,
                    Timeout,
                ],
            ),
            (
                RetryOn::GatewayError,
                vec![
                    s(502),
                    s(503),
                    s(504),
                    ConnectFailure,
                    Reset,
                    RefusedStream,
                    Timeout,
                ],
            ),
            (RetryOn::Reset, vec![Reset, RefusedStream]),
            (RetryOn::ConnectFailure, vec![ConnectFailure]),
            (RetryOn::RefusedStream, vec![RefusedStream]),
            (RetryOn::Retriable4xx, vec![s(409)]),
            (RetryOn::RetriableStatusCodes, vec![s(409)]),
            (RetryOn::Cancelled, vec![grpc(1)]),
            (RetryOn::DeadlineExceeded, vec![grpc(4)]),
            (RetryOn::ResourceExhausted, vec![grpc(8)]),
            (RetryOn::Internal, vec![grpc(13)]),
            (RetryOn::Unavailable, vec![grpc(14)]),
        ];
        for (on, expected) in cases {
            assert_eq!(retried(on, &all()), expected, "{on:?}");
        }
    }

    #[test]
    fn retriable_status_codes_are_the_policys_list() {
        let mut policy = policy(&[RetryOn::RetriableStatusCodes]);
        policy.retriable_status_codes = vec![429, 503];
        let decide = |o| decide_retry(Some(&policy), 0, o);
        assert_eq!(decide(status(429)), RetryDecision::Retry);
        assert_eq!(decide(status(503)), RetryDecision::Retry);
        assert_eq!(decide(status(409)), RetryDecision::Final);
        assert_eq!(decide(Outcome::Reset), RetryDecision::Final);
    }

    #[test]
    fn attempts_are_retries_after_the_first_try() {
        let policy = policy(&[RetryOn::FiveXx]);
        assert_eq!(
            decide_retry(Some(&policy), 0, status(503)),
            RetryDecision::Retry
        );
        assert_eq!(
            decide_retry(Some(&policy), 1, status(503)),
            RetryDecision::Retry
        );
        assert_eq!(
            decide_retry(Some(&policy), 2, status(503)),
            RetryDecision::Exhausted
        );
        assert_eq!(
            decide_retry(Some(&policy), u32::MAX, status(503)),
            RetryDecision::Exhausted
        );
        assert_eq!(
            decide_retry(Some(&policy), 2, status(404)),
            RetryDecision::Final
        );
        let none = RetryPolicy {
            attempts: 0,
            ..policy
        };
        assert_eq!(
            decide_retry(Some(&none), 0, status(503)),
            RetryDecision::Exhausted
        );
        assert_eq!(decide_retry(None, 0, status(503)), RetryDecision::Final);
    }

    #[test]
    fn deadlines_zero_is_none() {
        let mut spec = route(vec![], 0);
        assert_eq!(deadlines(&spec), Deadlines::default());
        spec.timeout_ms = Some(1_500);
        spec.retries = Some(RetryPolicy {
            per_try_timeout_ms: Some(500),
            ..policy(&[RetryOn::FiveXx])
        });
        assert_eq!(
            deadlines(&spec),
            Deadlines {
                request: Some(Duration::from_millis(1_500)),
                per_try: Some(Duration::from_millis(500)),
            }
        );
        spec.timeout_ms = Some(0);
        assert_eq!(deadlines(&spec).request, None);
    }
}
