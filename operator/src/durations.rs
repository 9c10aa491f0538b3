//! Durations as the two routing APIs write them, read strictly: a value that is not one is a
//! schema error naming the value and the expected form (the object is left out and reported, as
//! the API server would refuse it).
//! - Istio (`google.protobuf.Duration` in its JSON form): seconds with an optional fraction of at
//!   most nine digits and the unit `s`: `"10s"`, `"0.5s"`. Negative values are refused.
//! - Gateway API (GEP-2257): one to four numbers of at most five digits, each with a unit `h`,
//!   `m`, `s` or `ms`: `"10s"`, `"500ms"`, `"1h30m"`.
use std::time::Duration;

use serde::Deserialize;

/// A `google.protobuf.Duration` of an Istio object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ProtoDuration(pub Duration);

/// A duration of a Gateway API object (GEP-2257).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct GatewayDuration(pub Duration);

/// Whole milliseconds, rounded up so that a positive duration never becomes 0 (which the waypoint
/// contract reads as "none" in some places); saturates at `u64::MAX`.
pub fn millis_ceil(duration: Duration) -> u64 {
    let millis = duration.as_nanos().div_ceil(1_000_000);
    u64::try_from(millis).unwrap_or(u64::MAX)
}

/// The largest protobuf Duration: 10,000 years in seconds.
const MAX_PROTO_SECONDS: u64 = 315_576_000_000;

impl TryFrom<String> for ProtoDuration {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        parse_proto(&text).map(ProtoDuration).ok_or_else(|| {
            if text.trim_start().starts_with('-') {
                format!("duration {text:?} is negative")
            } else {
                format!(
                    "{text:?} is not a duration: Istio durations are seconds with an optional fraction and the unit s, e.g. \"10s\" or \"0.5s\""
                )
            }
        })
    }
}

fn parse_proto(text: &str) -> Option<Duration> {
    let number = text.strip_suffix('s')?;
    let (whole, fraction) = match number.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (number, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || fraction.is_some_and(|f| !all_digits(f) || f.len() > 9) {
        return None;
    }
    let seconds: u64 = whole.parse().ok().filter(|s| *s <= MAX_PROTO_SECONDS)?;
    let nanos = match fraction {
        // "5" is 500,000,000 ns: pad to nine digits.
        Some(f) => format!("{f:0<9}").parse::<u32>().ok()?,
        None => 0,
    };
    Some(Duration::new(seconds, nanos))
}

impl TryFrom<String> for GatewayDuration {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        parse_gateway(&text).map(GatewayDuration).ok_or_else(|| {
            format!(
                "{text:?} is not a Gateway API duration: one to four numbers of at most 5 digits, each with the unit h, m, s or ms, e.g. \"10s\", \"500ms\" or \"1h30m\""
            )
        })
    }
}

fn parse_gateway(text: &str) -> Option<Duration> {
    let mut rest = text;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return None;
        }
        let (number, after) = rest.split_at(digits);
        let number: u64 = number.parse().ok()?;
        let (unit, after) = if let Some(after) = after.strip_prefix("ms") {
            (Duration::from_millis(1), after)
        } else if let Some(after) = after.strip_prefix('h') {
            (Duration::from_secs(3600), after)
        } else if let Some(after) = after.strip_prefix('m') {
            (Duration::from_secs(60), after)
        } else if let Some(after) = after.strip_prefix('s') {
            (Duration::from_secs(1), after)
        } else {
            return None;
        };
        total += unit * u32::try_from(number).ok()?;
        rest = after;
        parts += 1;
    }
    (1..=4).contains(&parts).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto(text: &str) -> Result<Duration, String> {
        ProtoDuration::try_from(text.to_string()).map(|d| d.0)
    }

    fn gateway(text: &str) -> Result<Duration, String> {
        GatewayDuration::try_from(text.to_string()).map(|d| d.0)
    }

    #[test]
    fn istio_durations_are_seconds_with_fractions() {
        assert_eq!(proto("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(proto("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(proto("1.000000001s"), Ok(Duration::new(1, 1)));
        assert_eq!(
            proto("-1s"),
            Err("duration \"-1s\" is negative".to_string())
        );
        for garbage in [
            "10 seconds",
            "100ms",
            "1h",
            "s",
            ".5s",
            "1.s",
            "1.0000000001s",
            "",
            "10",
        ] {
            let error = proto(garbage).expect_err(garbage);
            assert!(error.contains("is not a duration"), "{garbage}: {error}");
        }
    }

    #[test]
    fn gateway_durations_follow_gep_2257() {
        assert_eq!(gateway("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(gateway("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(gateway("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(gateway("0s"), Ok(Duration::ZERO));
        for garbage in [
            "",
            "10",
            "1.5s",
            "123456s",
            "1h1h1h1h1h",
            "-1s",
            "10 s",
            "1d",
        ] {
            assert!(gateway(garbage).is_err(), "{garbage}");
        }
    }

    #[test]
    fn milliseconds_round_up() {
        assert_eq!(millis_ceil(Duration::from_nanos(1)), 1);
        assert_eq!(millis_ceil(Duration::from_millis(1500)), 1500);
        assert_eq!(millis_ceil(Duration::ZERO), 0);
    }
}
