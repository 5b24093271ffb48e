//! The one timestamp format of every record, event and answer.

/// Now: UTC, RFC 3339, exactly three fractional digits (e.g.
/// `2026-11-03T09:15:02.120Z`). The fixed width makes string order equal
/// time order, which the store's queries rely on.
pub fn now() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

/// A recorded timestamp as people read it: UTC at millisecond precision,
/// whatever precision it was recorded with (records and events from before
/// the fixed width carry from none to nine fractional digits). Text that is
/// not a timestamp is returned unchanged.
pub fn for_people(ts: &str) -> String {
    match ts.parse::<jiff::Timestamp>() {
        Ok(t) => format!("{t:.3}"),
        Err(_) => ts.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn for_people_has_milliseconds_whatever_was_recorded() {
        use super::for_people;
        assert_eq!(
            for_people("2026-11-03T09:15:02.120345678Z"),
            "2026-11-03T09:15:02.120Z"
        );
        assert_eq!(
            for_people("2026-11-03T09:15:02Z"),
            "2026-11-03T09:15:02.000Z"
        );
        assert_eq!(
            for_people("2026-11-03T09:15:02.1Z"),
            "2026-11-03T09:15:02.100Z"
        );
        assert_eq!(
            for_people("2026-11-03T10:15:02.5+01:00"),
            "2026-11-03T09:15:02.500Z"
        );
        assert_eq!(for_people("-"), "-");
    }

    #[test]
    fn fixed_width_milliseconds() {
        let t = super::now();
        assert_eq!(t.len(), "2026-11-03T09:15:02.120Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[19] == b'.', "{t}");
        assert!(t.parse::<jiff::Timestamp>().is_ok());
    }
}
