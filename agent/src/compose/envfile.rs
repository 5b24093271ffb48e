//! `env_file` contents: `KEY=value` lines.
//!
//! The format is the common dotenv subset compose users write: blank lines,
//! `#` comments, an optional `export ` prefix, and values that are bare
//! (a ` #` starts a comment), `"double quoted"` (with `\n`, `\t`, `\"`, `\\`
//! escapes) or `'single quoted'` (literal). Values are not interpolated:
//! what the file says is what the container gets, which keeps the snapshot
//! of a release (these contents, verbatim) a faithful record.
//!
//! Error messages give the line number and what is wrong, never the line
//! itself: an env file holds secrets, and the message reaches the caller and
//! the audit log.

use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::OFlag;

/// The longest env file accepted. An env file holds a few dozen variables;
/// a megabyte leaves room for certificates pasted into values.
pub(crate) const MAX_BYTES: u64 = 1 << 20;

/// Reads the env file at `path`: a regular file (not a directory, FIFO or
/// device) of at most [`MAX_BYTES`] of UTF-8. The error is the rest of a
/// sentence about the file (`env_file \`x\` ...`): it names `path` and never
/// quotes the contents.
///
/// The type and size are checked before opening, so that a FIFO is never
/// opened nor a device read, and again on the opened file, in case the path
/// changed in between; the open is non-blocking (a FIFO swapped in then
/// cannot block the load), and the read stops one byte past the limit.
pub(crate) fn read(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "does not exist (looked for {shown}): create it, or remove it from `env_file`"
            ));
        }
        Err(e) => return Err(cannot_read(path, &e)),
    };
    check_metadata(path, &meta)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path)
        .map_err(|e| cannot_read(path, &e))?;
    let meta = file.metadata().map_err(|e| cannot_read(path, &e))?;
    check_metadata(path, &meta)?;
    let bytes = read_at_most(file, meta.len()).map_err(|e| cannot_read(path, &e))?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(too_large(path));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        format!("({shown}) is not UTF-8 text (line {line}): save it as UTF-8")
    })
}

/// Up to [`MAX_BYTES`] + 1 bytes of `file`, whose size was `len`.
fn read_at_most(file: File, len: u64) -> std::io::Result<Vec<u8>> {
    let capacity = usize::try_from(len.min(MAX_BYTES + 1)).unwrap_or(0);
    let mut bytes = Vec::with_capacity(capacity);
    file.take(MAX_BYTES + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn check_metadata(path: &Path, meta: &Metadata) -> Result<(), String> {
    let kind = meta.file_type();
    let what = if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_socket() {
        Some("a socket")
    } else if kind.is_char_device() || kind.is_block_device() {
        Some("a device")
    } else {
        Some("not a regular file")
    };
    if let Some(what) = what {
        return Err(format!(
            "({}) is {what}: name a regular file of `NAME=value` lines",
            path.display()
        ));
    }
    if meta.len() > MAX_BYTES {
        return Err(too_large(path));
    }
    Ok(())
}

fn too_large(path: &Path) -> String {
    format!(
        "({}) is larger than {} MiB, the limit for an env file: an env file holds a few variables; check that this is the right file",
        path.display(),
        MAX_BYTES >> 20
    )
}

fn cannot_read(path: &Path, e: &std::io::Error) -> String {
    format!(
        "cannot be read ({}): {e}: check its permissions",
        path.display()
    )
}

/// Parses an env file; the error is `(line number, message)`, and the
/// message quotes nothing from the file.
pub(crate) fn parse(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    let mut out = Vec::new();
    for (i, raw_line) in text.lines().enumerate() {
        let line_no = i + 1;
        if raw_line.contains('\0') {
            return Err((
                line_no,
                "has a NUL byte, which no environment variable can hold: is this an env file?"
                    .to_string(),
            ));
        }
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
                "has no `=`: write each variable as `NAME=value` (is this an env file?)"
                    .to_string(),
            ));
        };
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err((
                line_no,
                "does not start with a variable name (it is empty or has spaces): write `NAME=value`"
                    .to_string(),
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
        return Err("has a `\"` quote that is not closed on this line: close it".to_string());
    }
    if let Some(rest) = v.strip_prefix('\'') {
        let (value, after) = rest.split_once('\'').ok_or_else(|| {
            "has a `'` quote that is not closed on this line: close it".to_string()
        })?;
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
        Err("has more after the closing quote: put the whole value inside the quotes".to_string())
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
        assert!(parse("=v\n").unwrap_err().1.contains("variable name"));
        assert!(parse("A B=v\n").unwrap_err().1.contains("variable name"));
        assert_eq!(
            parse("A=1\nB=x\0y\n").unwrap_err(),
            (
                2,
                "has a NUL byte, which no environment variable can hold: is this an env file?"
                    .to_string()
            )
        );
    }

    /// The messages quote nothing from the file: it may hold secrets, and
    /// a file that is not an env file at all (`/etc/shadow`) may have been
    /// named by mistake or on purpose.
    #[test]
    fn errors_quote_nothing_from_the_file() {
        for text in [
            "root:SECRET:20228:0:99999:7:::\n",
            "SECRET\n",
            "SE CRET=1\n",
            " SECRET =\"SECRET\n",
            "A='SECRET\n",
            "A=\"x\" SECRET\n",
            "A='x' SECRET\n",
            "A=SECRET\0\n",
        ] {
            let (line, message) = parse(text).unwrap_err();
            assert_eq!(line, 1, "{text:?}");
            assert!(!message.contains("SECRET"), "{text:?}: {message}");
            assert!(!message.contains("CRET"), "{text:?}: {message}");
        }
    }
}
