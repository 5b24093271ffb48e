//! `volumes` entries of a service → [`MountSpec`].

use std::path::{Component, Path, PathBuf};

use super::raw::{RawMount, StrOrMap};
use crate::spec::MountSpec;

/// Parses one service `volumes` entry. `is_declared` says whether a named
/// volume is declared at the top level. The error is a message without the
/// key path.
pub(crate) fn parse_mount(
    entry: &StrOrMap<RawMount>,
    base_dir: &Path,
    is_declared: &dyn Fn(&str) -> bool,
) -> Result<MountSpec, String> {
    let (kind, source, target, read_only) = match entry {
        StrOrMap::Str(s) => parse_short(s)?,
        StrOrMap::Map(long) => parse_long(long)?,
    };
    if !target.starts_with('/') {
        return Err(format!(
            "target `{target}` is not an absolute container path: it must start with `/`"
        ));
    }
    match kind {
        Kind::Bind => Ok(MountSpec::Bind {
            source: resolve_bind(base_dir, &source)?,
            target,
            read_only,
        }),
        Kind::Volume => {
            if !is_declared(&source) {
                return Err(format!(
                    "volume `{source}` is not declared: add `{source}:` under the top-level `volumes`, or write a host path as `./{source}` for a bind mount"
                ));
            }
            Ok(MountSpec::Volume {
                source,
                target,
                read_only,
            })
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Volume,
    Bind,
}

/// `name:/path[:ro|rw]`, `./rel:/path`, `/abs:/path`.
fn parse_short(text: &str) -> Result<(Kind, String, String, bool), String> {
    let parts: Vec<&str> = text.split(':').collect();
    let (source, target, mode) = match parts.as_slice() {
        [target] => {
            return Err(format!(
                "`{target}` is an anonymous volume, which deploy-agent does not support (every release would get a new, empty one): name it, like `data:{target}`, and declare `data` under the top-level `volumes`"
            ));
        }
        [source, target] => (*source, *target, None),
        [source, target, mode] => (*source, *target, Some(*mode)),
        _ => {
            return Err(format!(
                "`{text}` has too many `:`: write `source:target` or `source:target:ro`"
            ));
        }
    };
    if source.is_empty() {
        return Err(format!(
            "`{text}` has an empty source: write `source:target`"
        ));
    }
    let mut read_only = false;
    if let Some(mode) = mode {
        for option in mode.split(',') {
            match option {
                "ro" => read_only = true,
                "rw" => read_only = false,
                other => {
                    return Err(format!(
                        "`{text}`: mount option `{other}` is not supported: use `ro` or `rw`"
                    ));
                }
            }
        }
    }
    check_source(source)?;
    let kind = if source.starts_with('/') || source.starts_with('.') {
        Kind::Bind
    } else {
        Kind::Volume
    };
    Ok((kind, source.to_string(), target.to_string(), read_only))
}

/// `{type: volume|bind, source, target, read_only}`.
fn parse_long(long: &RawMount) -> Result<(Kind, String, String, bool), String> {
    let kind = match long.kind.as_deref() {
        Some("volume") => Kind::Volume,
        Some("bind") => Kind::Bind,
        Some(other) => {
            return Err(format!(
                "`type: {other}` is not supported: use `type: volume` (a declared named volume) or `type: bind` (a host path)"
            ));
        }
        None => {
            return Err("a long-syntax volume needs `type: volume` or `type: bind`".to_string());
        }
    };
    let source = long.source.clone().filter(|s| !s.is_empty()).ok_or_else(|| {
        if kind == Kind::Volume {
            "a long-syntax volume needs `source`: the name of a volume declared under the top-level `volumes` (anonymous volumes are not supported)".to_string()
        } else {
            "a bind mount needs `source`: a host path, absolute or relative to the compose file".to_string()
        }
    })?;
    let target = long.target.clone().ok_or_else(|| {
        "a long-syntax volume needs `target`: the path in the container".to_string()
    })?;
    check_source(&source)?;
    Ok((
        kind,
        source,
        target,
        long.read_only.map(|f| f.0).unwrap_or(false),
    ))
}

fn check_source(source: &str) -> Result<(), String> {
    if source.starts_with('~') {
        return Err(format!(
            "`{source}`: `~` is not supported (whose home directory would it be?): use an absolute path, or one relative to the compose file like `./data`"
        ));
    }
    Ok(())
}

/// Makes a bind source absolute against the compose file's directory and
/// removes `.` and `..` lexically, so that the snapshot records exactly which
/// host path a release used. The path need not exist yet.
fn resolve_bind(base_dir: &Path, source: &str) -> Result<String, String> {
    let joined = base_dir.join(source);
    let absolute = if joined.is_absolute() {
        joined
    } else {
        std::path::absolute(&joined).map_err(|e| format!("cannot make `{source}` absolute: {e}"))?
    };
    let mut normal = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other.as_os_str()),
        }
    }
    normal.into_os_string().into_string().map_err(|_| {
        format!("the host path for `{source}` is not valid UTF-8: move the files to a UTF-8 path")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compose::raw::Flag;

    fn declared(name: &str) -> bool {
        name == "data"
    }

    fn short(s: &str) -> Result<MountSpec, String> {
        parse_mount(
            &StrOrMap::Str(s.to_string()),
            Path::new("/srv/app"),
            &declared,
        )
    }

    fn bind(source: &str, target: &str, read_only: bool) -> MountSpec {
        MountSpec::Bind {
            source: source.into(),
            target: target.into(),
            read_only,
        }
    }

    #[test]
    fn short_forms() {
        assert_eq!(
            short("data:/var/lib/data").unwrap(),
            MountSpec::Volume {
                source: "data".into(),
                target: "/var/lib/data".into(),
                read_only: false
            }
        );
        assert_eq!(
            short("data:/d:ro").unwrap(),
            MountSpec::Volume {
                source: "data".into(),
                target: "/d".into(),
                read_only: true
            }
        );
        assert_eq!(
            short("./conf:/etc/app:ro").unwrap(),
            bind("/srv/app/conf", "/etc/app", true)
        );
        assert_eq!(
            short("../shared:/s:rw").unwrap(),
            bind("/srv/shared", "/s", false)
        );
        assert_eq!(short(".:/app").unwrap(), bind("/srv/app", "/app", false));
        assert_eq!(
            short("/abs/x/../y:/y").unwrap(),
            bind("/abs/y", "/y", false)
        );
    }

    #[test]
    fn short_errors() {
        for (input, needle) in [
            ("/data", "anonymous"),
            ("~/x:/x", "`~`"),
            ("other:/x", "not declared"),
            ("data:relative", "absolute container path"),
            ("data:/x:z", "`z` is not supported"),
            ("a:b:c:d", "too many"),
            (":/x", "empty source"),
        ] {
            let err = short(input).unwrap_err();
            assert!(err.contains(needle), "{input}: {err}");
        }
    }

    #[test]
    fn long_forms() {
        let long =
            |kind: Option<&str>, source: Option<&str>, target: Option<&str>, ro: Option<bool>| {
                parse_mount(
                    &StrOrMap::Map(RawMount {
                        kind: kind.map(str::to_string),
                        source: source.map(str::to_string),
                        target: target.map(str::to_string),
                        read_only: ro.map(Flag),
                    }),
                    Path::new("/srv/app"),
                    &declared,
                )
            };
        assert_eq!(
            long(Some("bind"), Some("conf"), Some("/c"), Some(true)).unwrap(),
            bind("/srv/app/conf", "/c", true)
        );
        assert_eq!(
            long(Some("volume"), Some("data"), Some("/d"), None).unwrap(),
            MountSpec::Volume {
                source: "data".into(),
                target: "/d".into(),
                read_only: false
            }
        );
        assert!(
            long(Some("tmpfs"), None, Some("/t"), None)
                .unwrap_err()
                .contains("not supported")
        );
        assert!(
            long(None, Some("data"), Some("/d"), None)
                .unwrap_err()
                .contains("needs `type")
        );
        assert!(
            long(Some("volume"), None, Some("/d"), None)
                .unwrap_err()
                .contains("needs `source`")
        );
        assert!(
            long(Some("bind"), Some("x"), None, None)
                .unwrap_err()
                .contains("needs `target`")
        );
        assert!(
            long(Some("volume"), Some("nope"), Some("/d"), None)
                .unwrap_err()
                .contains("not declared")
        );
        assert!(
            long(Some("bind"), Some("~/x"), Some("/d"), None)
                .unwrap_err()
                .contains("`~`")
        );
    }
}
