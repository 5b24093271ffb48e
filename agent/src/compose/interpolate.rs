//! `${VAR}` interpolation, as compose does it, over the parsed YAML tree.
//!
//! Variables come only from the release id (`RELEASE`) and the request's
//! `--var NAME=value` pairs, never from the agent's process environment nor
//! from a `.env` file: the same request must produce the same project on
//! every host, whoever started the agent and however. For the same reason an
//! unset variable without a default is an error here, where compose would
//! warn and substitute an empty string: a deploy that silently runs
//! `image: registry/app:` is worse than one that refuses to start.

use std::collections::BTreeMap;

use serde_norway::Value;

use super::path::KeyPath;

/// How deeply `${...}` may nest inside defaults, alternatives and messages
/// (`${A:-${B:-x}}` is two levels). Compose files use two or three; the
/// limit is there so that a hostile file cannot make the recursion below
/// exhaust the stack.
pub(crate) const MAX_NESTING: usize = 32;

/// How many bytes variable values may add to the file, all substitutions
/// together. `$A` is two bytes of compose text but as long as the value of
/// `A`: without a budget, a few megabytes of `$A$A$A...` and a long `--var`
/// would need terabytes.
pub(crate) const MAX_SUBSTITUTED_BYTES: usize = 16 << 20;

/// How much of the file's own text an error message quotes.
const EXCERPT_CHARS: usize = 80;

/// Why a string could not be interpolated; the caller adds file and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InterpolationError {
    /// `${VAR}` or `$VAR` with VAR unset and no default.
    Unset { var: String },
    /// `${VAR:?message}` or `${VAR?message}` with VAR unset (or empty for `:?`).
    Required { var: String, message: String },
    /// Not a valid interpolation expression.
    Syntax { message: String },
    /// `${...}` nested `depth` levels deep, more than [`MAX_NESTING`].
    TooDeep { depth: usize },
    /// Variable values would add more than [`MAX_SUBSTITUTED_BYTES`].
    TooLarge,
}

/// Resolves variables and remembers which ones the file used.
pub(crate) struct Interpolator<'a> {
    release: &'a str,
    vars: &'a BTreeMap<String, String>,
    /// Every variable that was looked up and set, with its value.
    pub(crate) used: BTreeMap<String, String>,
    /// Bytes added by variable values so far, against
    /// [`MAX_SUBSTITUTED_BYTES`].
    substituted: usize,
}

impl<'a> Interpolator<'a> {
    pub(crate) fn new(release: &'a str, vars: &'a BTreeMap<String, String>) -> Self {
        Interpolator {
            release,
            vars,
            used: BTreeMap::new(),
            substituted: 0,
        }
    }

    fn lookup(&mut self, name: &str) -> Option<String> {
        let value = if name == "RELEASE" {
            Some(self.release.to_string())
        } else {
            self.vars.get(name).cloned()
        };
        if let Some(v) = &value {
            self.used.insert(name.to_string(), v.clone());
        }
        value
    }

    /// Interpolates every string scalar under `value` in place. Mapping keys
    /// are left alone, as in compose. Stops at the first error, returning
    /// the path of the offending scalar.
    pub(crate) fn interpolate_tree(
        &mut self,
        value: &mut Value,
        path: &mut KeyPath,
    ) -> Result<(), (KeyPath, InterpolationError)> {
        match value {
            Value::String(s) => {
                if s.contains('$') {
                    *s = self.interpolate(s).map_err(|e| (path.clone(), e))?;
                }
            }
            Value::Sequence(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    path.push_index(i);
                    let r = self.interpolate_tree(item, path);
                    path.pop();
                    r?;
                }
            }
            Value::Mapping(map) => {
                for (k, v) in map.iter_mut() {
                    path.push_key(&key_text(k));
                    let r = self.interpolate_tree(v, path);
                    path.pop();
                    r?;
                }
            }
            Value::Tagged(tagged) => {
                self.interpolate_tree(&mut tagged.value, path)?;
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
        Ok(())
    }

    /// Interpolates one string.
    pub(crate) fn interpolate(&mut self, s: &str) -> Result<String, InterpolationError> {
        self.interpolate_at(s, 0)
    }

    /// Counts a variable's value against [`MAX_SUBSTITUTED_BYTES`].
    fn substitute(&mut self, value: String) -> Result<String, InterpolationError> {
        self.substituted = self.substituted.saturating_add(value.len());
        if self.substituted > MAX_SUBSTITUTED_BYTES {
            return Err(InterpolationError::TooLarge);
        }
        Ok(value)
    }

    /// Interpolates `s`, found inside `nesting` levels of `${...}`.
    ///
    /// Before recursing into an expression, its whole nesting depth is
    /// measured (without recursion) and refused past [`MAX_NESTING`]: the
    /// recursion through [`Self::braced`] is then at most that deep, whatever
    /// the input, including defaults that end up not being evaluated.
    fn interpolate_at(&mut self, s: &str, nesting: usize) -> Result<String, InterpolationError> {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            match after.chars().next() {
                Some('$') => {
                    out.push('$');
                    rest = &after[1..];
                }
                Some('{') => {
                    let body_and_more = &after[1..];
                    let (end, depth) = matching_brace(body_and_more).ok_or_else(|| {
                        InterpolationError::Syntax {
                            message: format!(
                                "`${{{}` has no closing `}}`: close it, or write `$$` for a literal `$`",
                                excerpt(body_and_more)
                            ),
                        }
                    })?;
                    let depth = nesting.saturating_add(depth);
                    if depth > MAX_NESTING {
                        return Err(InterpolationError::TooDeep { depth });
                    }
                    out.push_str(&self.braced(&body_and_more[..end], nesting + 1)?);
                    rest = &body_and_more[end + 1..];
                }
                Some(c) if c == '_' || c.is_ascii_alphabetic() => {
                    let len = name_len(after);
                    let name = &after[..len];
                    match self.lookup(name) {
                        Some(v) => out.push_str(&self.substitute(v)?),
                        None => {
                            return Err(InterpolationError::Unset {
                                var: name.to_string(),
                            });
                        }
                    }
                    rest = &after[len..];
                }
                _ => {
                    return Err(InterpolationError::Syntax {
                        message: format!(
                            "`$` in `{}` is not followed by a variable name or `{{`: write `$$` for a literal `$`",
                            excerpt(s)
                        ),
                    });
                }
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    /// The inside of `${...}`, itself inside `nesting` levels (counting this
    /// one).
    fn braced(&mut self, body: &str, nesting: usize) -> Result<String, InterpolationError> {
        let len = name_len(body);
        let valid_start = body
            .chars()
            .next()
            .is_some_and(|c| c == '_' || c.is_ascii_alphabetic());
        if len == 0 || !valid_start {
            return Err(InterpolationError::Syntax {
                message: format!(
                    "`${{{}}}` does not start with a variable name (letters, digits and `_`, not starting with a digit)",
                    excerpt(body)
                ),
            });
        }
        let name = &body[..len];
        let op = &body[len..];
        let value = self.lookup(name);
        let set_nonempty = value.as_deref().is_some_and(|v| !v.is_empty());
        if op.is_empty() {
            return match value {
                Some(v) => self.substitute(v),
                None => Err(InterpolationError::Unset {
                    var: name.to_string(),
                }),
            };
        }
        // Two-character operators first so that `:-` is not read as `:`.
        if let Some(default) = op.strip_prefix(":-") {
            return match value {
                Some(v) if set_nonempty => self.substitute(v),
                _ => self.interpolate_at(default, nesting),
            };
        }
        if let Some(default) = op.strip_prefix('-') {
            return match value {
                Some(v) => self.substitute(v),
                None => self.interpolate_at(default, nesting),
            };
        }
        if let Some(message) = op.strip_prefix(":?") {
            return match value {
                Some(v) if set_nonempty => self.substitute(v),
                _ => Err(self.required(name, message, nesting)),
            };
        }
        if let Some(message) = op.strip_prefix('?') {
            return match value {
                Some(v) => self.substitute(v),
                None => Err(self.required(name, message, nesting)),
            };
        }
        if let Some(alternative) = op.strip_prefix(":+") {
            return if set_nonempty {
                self.interpolate_at(alternative, nesting)
            } else {
                Ok(String::new())
            };
        }
        if let Some(alternative) = op.strip_prefix('+') {
            return if value.is_some() {
                self.interpolate_at(alternative, nesting)
            } else {
                Ok(String::new())
            };
        }
        let body = excerpt(body);
        Err(InterpolationError::Syntax {
            message: format!(
                "`${{{body}}}` is not a supported form: use `${{{name}}}`, `${{{name}:-default}}`, `${{{name}-default}}`, `${{{name}:?message}}` or `${{{name}?message}}`"
            ),
        })
    }

    fn required(&mut self, name: &str, message: &str, nesting: usize) -> InterpolationError {
        // The message may itself reference variables; if it cannot be
        // interpolated, show it as written rather than hide the real error.
        let message = match self.interpolate_at(message, nesting) {
            Ok(m) => excerpt(&m),
            Err(_) => excerpt(message),
        };
        InterpolationError::Required {
            var: name.to_string(),
            message,
        }
    }
}

/// Length of the variable name at the start of `s` (`[A-Za-z0-9_]*`).
fn name_len(s: &str) -> usize {
    s.find(|c: char| !(c == '_' || c.is_ascii_alphanumeric()))
        .unwrap_or(s.len())
}

/// Index of the `}` closing a `${` whose body starts `s`, allowing nested
/// `${...}` in defaults and `$$` escapes; and how deeply `${` nests in that
/// expression (1 for `${A}`, 2 for `${A:-${B}}`). A loop, not recursion: it
/// measures any depth safely.
fn matching_brace(s: &str) -> Option<(usize, usize)> {
    let bytes = s.as_bytes();
    let mut depth = 1usize;
    let mut max_depth = 1usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'$') => i += 2,
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                max_depth = max_depth.max(depth);
                i += 2;
            }
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some((i, max_depth));
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    None
}

/// `s` for an error message, cut to [`EXCERPT_CHARS`] characters: the file's
/// own text, but possibly megabytes of it.
fn excerpt(s: &str) -> String {
    match s.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

/// A mapping key as shown in key paths.
pub(crate) fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null => "~".to_string(),
        Value::Sequence(_) | Value::Mapping(_) | Value::Tagged(_) => "?".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &str, vars: &[(&str, &str)]) -> Result<String, InterpolationError> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Interpolator::new("r1", &vars).interpolate(s)
    }

    #[test]
    fn plain_forms() {
        assert_eq!(run("app:${RELEASE}", &[]).unwrap(), "app:r1");
        assert_eq!(run("app:$RELEASE", &[]).unwrap(), "app:r1");
        assert_eq!(run("$A-$B", &[("A", "x"), ("B", "y")]).unwrap(), "x-y");
        assert_eq!(run("${A}${B}", &[("A", "x"), ("B", "y")]).unwrap(), "xy");
        assert_eq!(run("no vars", &[]).unwrap(), "no vars");
        assert_eq!(run("é$A€", &[("A", "ü")]).unwrap(), "éü€");
    }

    #[test]
    fn dollar_escape() {
        assert_eq!(run("cost $$5", &[]).unwrap(), "cost $5");
        assert_eq!(run("$${A}", &[]).unwrap(), "${A}");
        assert_eq!(run("$$$A", &[("A", "x")]).unwrap(), "$x");
    }

    #[test]
    fn defaults() {
        assert_eq!(run("${A:-d}", &[]).unwrap(), "d");
        assert_eq!(run("${A:-d}", &[("A", "")]).unwrap(), "d");
        assert_eq!(run("${A:-d}", &[("A", "v")]).unwrap(), "v");
        assert_eq!(run("${A-d}", &[]).unwrap(), "d");
        assert_eq!(run("${A-d}", &[("A", "")]).unwrap(), "");
        assert_eq!(run("${A-d}", &[("A", "v")]).unwrap(), "v");
        assert_eq!(run("${A:-}", &[]).unwrap(), "");
        assert_eq!(run("${A:-a-b:c}", &[]).unwrap(), "a-b:c");
        assert_eq!(run("${A:-${B}}", &[("B", "b")]).unwrap(), "b");
        assert_eq!(run("${A:-x${B:-y}z}", &[]).unwrap(), "xyz");
        // An unused default is not evaluated.
        assert_eq!(run("${A:-${UNSET}}", &[("A", "a")]).unwrap(), "a");
    }

    #[test]
    fn alternatives() {
        assert_eq!(run("${A:+on}", &[("A", "v")]).unwrap(), "on");
        assert_eq!(run("${A:+on}", &[("A", "")]).unwrap(), "");
        assert_eq!(run("${A+on}", &[("A", "")]).unwrap(), "on");
        assert_eq!(run("${A+on}", &[]).unwrap(), "");
    }

    #[test]
    fn required() {
        assert_eq!(
            run("${A:?give A}", &[]),
            Err(InterpolationError::Required {
                var: "A".into(),
                message: "give A".into()
            })
        );
        assert!(matches!(
            run("${A:?give A}", &[("A", "")]),
            Err(InterpolationError::Required { .. })
        ));
        assert_eq!(run("${A?give A}", &[("A", "")]).unwrap(), "");
        assert!(matches!(
            run("${A?give A}", &[]),
            Err(InterpolationError::Required { .. })
        ));
        assert_eq!(run("${A:?m}", &[("A", "v")]).unwrap(), "v");
    }

    #[test]
    fn unset() {
        assert_eq!(
            run("${NOPE}", &[]),
            Err(InterpolationError::Unset { var: "NOPE".into() })
        );
        assert_eq!(
            run("x$NOPE/y", &[]),
            Err(InterpolationError::Unset { var: "NOPE".into() })
        );
    }

    #[test]
    fn syntax_errors() {
        for bad in [
            "${A", "$", "a $ b", "$1", "${}", "${1A}", "${A:x}", "${A B}",
        ] {
            assert!(
                matches!(
                    run(bad, &[("A", "v")]),
                    Err(InterpolationError::Syntax { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn records_used_variables() {
        let vars: BTreeMap<String, String> = [("A".to_string(), "a".to_string())].into();
        let mut i = Interpolator::new("r9", &vars);
        assert_eq!(i.interpolate("$A ${RELEASE} ${B:-b}").unwrap(), "a r9 b");
        assert_eq!(
            i.used,
            BTreeMap::from([
                ("A".to_string(), "a".to_string()),
                ("RELEASE".to_string(), "r9".to_string())
            ])
        );
    }
}
