//! Conversions between wall-clock times and `google.protobuf.Timestamp`, and
//! the RFC 3339 form the JSON shim writes.

use chrono::{DateTime, SecondsFormat, Utc};

/// A protobuf timestamp for `t`.
pub fn to_proto(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// The instant a protobuf timestamp names, or `None` when it is out of range
/// (nanos outside 0..1e9, or a date chrono cannot hold).
pub fn from_proto(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    DateTime::from_timestamp(t.seconds, nanos)
}

/// `2026-11-22T10:00:00.123456789Z`: UTC, always nine fractional digits.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// Parses RFC 3339 with optional fractional seconds and any offset.
pub fn parse_rfc3339(s: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_proto() {
        let t = parse_rfc3339("2026-11-22T10:00:00.123456789Z").unwrap();
        assert_eq!(from_proto(&to_proto(t)), Some(t));
        assert_eq!(rfc3339(t), "2026-11-22T10:00:00.123456789Z");
    }

    #[test]
    fn accepts_offsets_and_whole_seconds() {
        let t = parse_rfc3339("2026-11-22T11:00:00+01:00").unwrap();
        assert_eq!(rfc3339(t), "2026-11-22T10:00:00.000000000Z");
        assert!(parse_rfc3339("yesterday").is_err());
        assert!(parse_rfc3339("2026-11-22 10:00").is_err());
    }

    #[test]
    fn rejects_out_of_range_proto_nanos() {
        let bad = prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert_eq!(from_proto(&bad), None);
        let bad = prost_types::Timestamp {
            seconds: 0,
            nanos: 1_000_000_000,
        };
        assert_eq!(from_proto(&bad), None);
    }
}

/// Parses a duration flag: an integer with a unit, `ms`, `s` or `m`
/// (`100ms`, `2s`, `1m`). Zero is refused.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("bad duration {s:?}: want a number and a unit, e.g. 100ms, 2s, 1m"))?;
    let d = match unit {
        "ms" => std::time::Duration::from_millis(n),
        "s" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(format!("bad duration {s:?}: the unit must be ms, s or m")),
    };
    if d.is_zero() {
        return Err(format!("bad duration {s:?}: must be more than zero"));
    }
    Ok(d)
}

/// [`parse_duration`], where `0` (with or without a unit) means "not at
/// all".
pub fn parse_duration_or_zero(s: &str) -> Result<std::time::Duration, String> {
    match s {
        "0" | "0ms" | "0s" | "0m" => Ok(std::time::Duration::ZERO),
        _ => parse_duration(s),
    }
}

#[cfg(test)]
mod duration_tests {
    use super::{parse_duration, parse_duration_or_zero};
    use std::time::Duration;

    #[test]
    fn zero_where_zero_means_off() {
        for zero in ["0", "0s", "0ms"] {
            assert_eq!(parse_duration_or_zero(zero), Ok(Duration::ZERO), "{zero}");
        }
        assert_eq!(parse_duration_or_zero("15s"), Ok(Duration::from_secs(15)));
        assert!(parse_duration_or_zero("0x").is_err());
        assert!(parse_duration_or_zero("soon").is_err());
    }

    #[test]
    fn parses_units_and_refuses_nonsense() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        for bad in ["", "0ms", "10", "ms", "1h", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should fail");
        }
    }
}
