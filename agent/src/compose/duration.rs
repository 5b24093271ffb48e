//! Durations as compose writes them.
//!
//! Compose takes Go's `time.ParseDuration` syntax (`1m30s`, `500ms`, `1.5s`,
//! `2h`), so a file that works with `docker compose` must work here too. We
//! parse it ourselves rather than with humantime, which accepts a different
//! and much wider language (`1 year`, `2 days`): a value compose would refuse
//! must not quietly mean something here.
//!
//! On top of Go's syntax, a bare non-negative number means seconds, whether
//! YAML typed it as a number (`interval: 5`) or interpolation produced a
//! string (`interval: "${PROBE_INTERVAL}"` with `--var PROBE_INTERVAL=5`).

use std::time::Duration;

const NANOS_PER_UNIT: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("\u{b5}s", 1_000),  // micro sign, as Go accepts
    ("\u{3bc}s", 1_000), // Greek mu, as Go accepts
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// What a duration looks like, for error messages.
pub(crate) const DURATION_FORMS: &str = "write it like `10s`, `500ms`, `1m30s` or `2h` (units: ns, us, ms, s, m, h), or as a number of seconds";

/// Parses a Go-style duration string, or a bare number of seconds.
///
/// The error is a short reason; callers add the key path and [`DURATION_FORMS`].
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".to_string());
    }
    if s.starts_with('-') {
        return Err(format!("`{text}` is negative"));
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return seconds_from_decimal(s).ok_or_else(|| format!("`{text}` is not a number"));
    }

    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(num_len);
        if number.is_empty() || number == "." {
            return Err(format!("`{text}`: expected a number before `{after}`"));
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        if unit.is_empty() {
            return Err(format!("`{text}`: `{number}` has no unit"));
        }
        let Some(&(_, per_unit)) = NANOS_PER_UNIT.iter().find(|(name, _)| *name == unit) else {
            return Err(format!("`{text}`: unknown unit `{unit}`"));
        };
        let nanos = scaled(number, per_unit).ok_or_else(|| format!("`{text}` is not a number"))?;
        total = total
            .checked_add(nanos)
            .ok_or_else(|| format!("`{text}` is too long"))?;
        rest = next;
    }
    nanos_to_duration(total).ok_or_else(|| format!("`{text}` is too long"))
}

/// A duration given as a YAML float: seconds, possibly fractional.
pub(crate) fn duration_from_float_seconds(seconds: f64) -> Result<Duration, String> {
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!(
            "`{seconds}` is not a non-negative number of seconds"
        ));
    }
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{seconds}` seconds is too long"))
}

fn seconds_from_decimal(s: &str) -> Option<Duration> {
    nanos_to_duration(scaled(s, 1_000_000_000)?)
}

/// `number` (digits with at most one `.`) times `per_unit` nanoseconds,
/// computed in integers so that `0.1s` is exactly 100ms.
fn scaled(number: &str, per_unit: u128) -> Option<u128> {
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if frac_part.contains('.') || (int_part.is_empty() && frac_part.is_empty()) {
        return None;
    }
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().ok()?
    };
    let mut nanos = int.checked_mul(per_unit)?;
    // Digits beyond 18 cannot change a nanosecond count of a sane duration.
    let frac_digits = &frac_part[..frac_part.len().min(18)];
    if !frac_digits.is_empty() {
        let frac: u128 = frac_digits.parse().ok()?;
        let scale = 10u128.pow(u32::try_from(frac_digits.len()).ok()?);
        nanos = nanos.checked_add(frac.checked_mul(per_unit)? / scale)?;
    }
    Some(nanos)
}

fn nanos_to_duration(nanos: u128) -> Option<Duration> {
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    let sub = u32::try_from(nanos % 1_000_000_000).ok()?;
    Some(Duration::new(secs, sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn go_forms() {
        assert_eq!(parse_duration("10s").unwrap(), ms(10_000));
        assert_eq!(parse_duration("500ms").unwrap(), ms(500));
        assert_eq!(parse_duration("1m30s").unwrap(), ms(90_000));
        assert_eq!(parse_duration("1h").unwrap(), ms(3_600_000));
        assert_eq!(parse_duration("1.5s").unwrap(), ms(1_500));
        assert_eq!(parse_duration(".5s").unwrap(), ms(500));
        assert_eq!(parse_duration("0.1s").unwrap(), ms(100));
        assert_eq!(parse_duration("2us").unwrap(), Duration::from_micros(2));
        assert_eq!(parse_duration("3ns").unwrap(), Duration::from_nanos(3));
        assert_eq!(parse_duration("1h2m3s4ms").unwrap(), ms(3_723_004));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn bare_numbers_are_seconds() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("5").unwrap(), ms(5_000));
        assert_eq!(parse_duration("2.5").unwrap(), ms(2_500));
        assert_eq!(duration_from_float_seconds(0.25).unwrap(), ms(250));
    }

    #[test]
    fn rejects() {
        for bad in [
            "",
            "-1s",
            "1x",
            "s",
            "1 s",
            "1.2.3s",
            "1d",
            "10 seconds",
            ".",
            "1m30",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(duration_from_float_seconds(-1.0).is_err());
        assert!(duration_from_float_seconds(f64::NAN).is_err());
        assert!(parse_duration("99999999999999999999999h").is_err());
    }
}
