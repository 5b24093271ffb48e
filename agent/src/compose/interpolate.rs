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

/// Why a string could not be interpolated; the caller adds file and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InterpolationError {
    /// `${VAR}` or `$VAR` with VAR unset and no default.
    Unset { var: String },
    /// `${VAR:?message}` or `${VAR?message}` with VAR unset (or empty for `:?`).
    Required { var: String, message: String },
    /// Not a valid interpolation expression.
    Syntax { message: String },
}

/// Resolves variables and remembers which ones the file used.
pub(crate) struct Interpolator<'a> {
    release: &'a str,
    vars: &'a BTreeMap<String, String>,
    /// Every variable that was looked up and set, with its value.
    pub(crate) used: BTreeMap<String, String>,
}

impl<'a> Interpolator<'a> {
    pub(crate) fn new(release: &'a str, vars: &'a BTreeMap<String, String>) -> Self {
        Interpolator {
            release,
            vars,
            used: BTreeMap::new(),
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
                    let end = matching_brace(body_and_more).ok_or_else(|| {
                        InterpolationError::Syntax {
                            message: format!(
                                "`${{{body_and_more}` has no closing `}}`: close it, or write `$$` for a literal `$`"
                            ),
                        }
                    })?;
                    out.push_str(&self.braced(&body_and_more[..end])?);
                    rest = &body_and_more[end + 1..];
                }
                Some(c) if c == '_' || c.is_ascii_alphabetic() => {
                    let len = name_len(after);
                    let name = &after[..len];
                    match self.lookup(name) {
                        Some(v) => out.push_str(&v),
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
                            "`$` in `{s}` is not followed by a variable name or `{{`: write `$$` for a literal `$`"
                        ),
                    });
                }
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    /// The inside of `${...}`.
    fn braced(&mut self, body: &str) -> Result<String, InterpolationError> {
        let len = name_len(body);
        let valid_start = body
            .chars()
            .next()
            .is_some_and(|c| c == '_' || c.is_ascii_alphabetic());
        if len == 0 || !valid_start {
            return Err(InterpolationError::Syntax {
                message: format!(
                    "`${{{body}}}` does not start with a variable name (letters, digits and `_`, not starting with a digit)"
                ),
            });
        }
        let name = &body[..len];
        let op = &body[len..];
        let value = self.lookup(name);
        let set_nonempty = value.as_deref().is_some_and(|v| !v.is_empty());
        if op.is_empty() {
            return value.ok_or_else(|| InterpolationError::Unset {
                var: name.to_string(),
            });
        }
        // Two-character operators first so that `:-` is not read as `:`.
        if let Some(default) = op.strip_prefix(":-") {
            return match value {
                Some(v) if set_nonempty => Ok(v),
                _ => self.interpolate(default),
            };
        }
        if let Some(default) = op.strip_prefix('-') {
            return match value {
                Some(v) => Ok(v),
                None => self.interpolate(default),
            };
        }
        if let Some(message) = op.strip_prefix(":?") {
            return match value {
                Some(v) if set_nonempty => Ok(v),
                _ => Err(self.required(name, message)),
            };
        }
        if let Some(message) = op.strip_prefix('?') {
            return match value {
                Some(v) => Ok(v),
                None => Err(self.required(name, message)),
            };
        }
        if let Some(alternative) = op.strip_prefix(":+") {
            return if set_nonempty {
                self.interpolate(alternative)
            } else {
                Ok(String::new())
            };
        }
        if let Some(alternative) = op.strip_prefix('+') {
            return if value.is_some() {
                self.interpolate(alternative)
            } else {
                Ok(String::new())
            };
        }
        Err(InterpolationError::Syntax {
            message: format!(
                "`${{{body}}}` is not a supported form: use `${{{name}}}`, `${{{name}:-default}}`, `${{{name}-default}}`, `${{{name}:?message}}` or `${{{name}?message}}`"
            ),
        })
    }

    fn required(&mut self, name: &str, message: &str) -> InterpolationError {
        // The message may itself reference variables; if it cannot be
        // interpolated, show it as written rather than hide the real error.
        let message = self
            .interpolate(message)
            .unwrap_or_else(|_| message.to_string());
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
/// `${...}` in defaults and `$$` escapes.
fn matching_brace(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut depth = 1usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'$') => i += 2,
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 2;
            }
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    None
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
