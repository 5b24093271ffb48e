//! The one timestamp format of every record, event and answer.

/// Now: UTC, RFC 3339, exactly three fractional digits (e.g.
/// `2026-11-03T09:15:02.120Z`). The fixed width makes string order equal
/// time order, which the store's queries rely on.
pub fn now() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    #[test]
    fn fixed_width_milliseconds() {
        let t = super::now();
        assert_eq!(t.len(), "2026-11-03T09:15:02.120Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[19] == b'.', "{t}");
        assert!(t.parse::<jiff::Timestamp>().is_ok());
    }
}
