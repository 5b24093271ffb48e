//! `env_file` contents: `KEY=value` lines.
//!
//! The format is the common dotenv subset compose users write: blank lines,
//! `#` comments, an optional `export ` prefix, and values that are bare
//! (a ` #` starts a comment), `"double quoted"` (with `\n`, `\t`, `\"`, `\\`
//! escapes) or `'single quoted'` (literal). Values are not interpolated:
//! what the file says is what the container gets, which keeps the snapshot
//! of a release (these contents, verbatim) a faithful record.

/// Parses an env file; the error is `(line number, message)`.
pub(crate) fn parse(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    let mut out = Vec::new();
    for (i, raw_line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw_line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line
            .strip_prefix("export")
            .filter(|rest| rest.starts_with([' ', '\t']))
            .map(str::trim_start)
            .unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err((
                line_no,
                format!("`{line}` has no `=`: write `{line}=value`"),
            ));
        };
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err((
                line_no,
                format!("`{key}` is not a variable name: write `NAME=value`"),
            ));
        }
        let value = parse_value(value.trim_start()).map_err(|m| (line_no, m))?;
        out.push((key.to_string(), value));
    }
    Ok(out)
}

fn parse_value(v: &str) -> Result<String, String> {
    if let Some(rest) = v.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => {
                    check_trailing(chars.as_str())?;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('r') => out.push('\r'),
                    Some(other) => {
                        if !matches!(other, '"' | '\\') {
                            out.push('\\');
                        }
                        out.push(other);
                    }
                    None => out.push('\\'),
                },
                c => out.push(c),
            }
        }
        return Err("a `\"` quote is not closed on this line: close it".to_string());
    }
    if let Some(rest) = v.strip_prefix('\'') {
        let (value, after) = rest
            .split_once('\'')
            .ok_or_else(|| "a `'` quote is not closed on this line: close it".to_string())?;
        check_trailing(after)?;
        return Ok(value.to_string());
    }
    let value = match v.find(" #").or_else(|| v.find("\t#")) {
        Some(pos) => &v[..pos],
        None => v,
    };
    Ok(value.trim_end().to_string())
}

fn check_trailing(after: &str) -> Result<(), String> {
    let after = after.trim_start();
    if after.is_empty() || after.starts_with('#') {
        Ok(())
    } else {
        Err(format!(
            "unexpected `{after}` after the closing quote: put the whole value inside the quotes"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn forms() {
        let text = "# comment\n\nA=1\nexport B=two words\nC = spaced\nD=\"quoted # not comment\" # comment\nE='it''s'\nF=bare # comment\nG=\"a\\nb\\\"c\\\\d\"\nH=\nI=x=y\n  # indented comment\nexporter=kept\n";
        let err = parse(text).unwrap_err();
        // E='it''s' has text after the closing quote.
        assert_eq!(err.0, 7);
        let text = text.replace("E='it''s'", "E='it s $X'");
        assert_eq!(
            parse(&text).unwrap(),
            pairs(&[
                ("A", "1"),
                ("B", "two words"),
                ("C", "spaced"),
                ("D", "quoted # not comment"),
                ("E", "it s $X"),
                ("F", "bare"),
                ("G", "a\nb\"c\\d"),
                ("H", ""),
                ("I", "x=y"),
                ("exporter", "kept"),
            ])
        );
    }

    #[test]
    fn errors() {
        assert_eq!(parse("A=1\nNOVALUE\n").unwrap_err().0, 2);
        assert!(parse("A=\"open\n").unwrap_err().1.contains("not closed"));
        assert!(parse("=v\n").unwrap_err().1.contains("not a variable name"));
        assert!(
            parse("A B=v\n")
                .unwrap_err()
                .1
                .contains("not a variable name")
        );
    }
}
