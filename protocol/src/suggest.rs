//! "Did you mean …?" for a mistyped key: one rule for every file we read
//! (compose files, agent.toml, the inventory).

/// The candidate a typo of `key` most likely meant: within two edits
/// (transpositions count as one), and closer than any other.
pub fn nearest<'a>(key: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .filter(|k| !k.is_empty())
        .map(|k| (strsim::damerau_levenshtein(key, k), k))
        .filter(|(d, k)| *d <= 2 && *d < k.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// The keys serde lists in "unknown field `x`, expected one of `a`, `b`".
pub fn expected_keys(message: &str) -> Vec<&str> {
    match message.split_once("expected") {
        Some((_, expected)) => expected.split('`').skip(1).step_by(2).collect(),
        None => Vec::new(),
    }
}

/// `"; did you mean `k`?"` for an unknown-field message, or nothing.
pub fn hint(message: &str) -> String {
    let Some(field) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(field, _)| field)
    else {
        return String::new();
    };
    nearest(field, expected_keys(message))
        .map(|k| format!("; did you mean `{k}`?"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_their_key_and_nothing_else_is_guessed() {
        assert_eq!(
            nearest("portz", ["image", "ports", "volumes"]),
            Some("ports")
        );
        assert_eq!(nearest("imgae", ["image", "ports"]), Some("image"));
        assert_eq!(nearest("privileged", ["image", "ports"]), None);
        assert_eq!(nearest("a", ["b"]), None);
        let m = "unknown field `retian`, expected one of `instance`, `retain`";
        assert_eq!(hint(m), "; did you mean `retain`?");
        assert_eq!(hint("invalid type: string"), "");
    }
}
