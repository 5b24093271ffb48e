//! Compose file loading: YAML text → validated, interpolated [`ProjectSpec`].
//!
//! Users bring the compose files they already have, so the syntax is
//! compose's. What we accept is a strict subset: every key we do not act on
//! is an error naming it, because silently ignoring, say, `privileged` or
//! `mem_limit` would deploy something other than what the user reviewed.
//!
//! The pipeline, in order:
//! 1. check the project and release names and the `--var` variables;
//! 2. check the text's size, and what its YAML aliases expand to, without
//!    expanding them (see [`budget`]); parse the YAML into a tree and expand
//!    merge keys (`<<: *common`);
//! 3. reject YAML tags and non-string keys, and drop `x-...` extension keys
//!    (except our `x-deploy`) where compose allows extensions;
//! 4. interpolate `${VAR}` in every string scalar (see [`interpolate`]);
//! 5. deserialize into strict serde types ([`raw`]), so that an unknown key
//!    is reported with its full path;
//! 6. convert and check meaning: ports, mounts, references between services,
//!    networks and volumes, health gates, and the `depends_on` order.
//!
//! Loading reads nothing but the compose text and the `env_file`s it names.
//! In particular it never reads the agent's process environment nor a
//! `.env` file: the only variables are `RELEASE` and the request's `--var`s,
//! so that the same request gives the same project on every host.

mod budget;
mod deploy;
mod duration;
mod envfile;
mod interpolate;
mod mounts;
mod order;
mod path;
mod ports;
mod raw;
mod rollout;
mod service;
mod tree;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::Path;

use serde_norway::Value;

use self::interpolate::{InterpolationError, Interpolator};
use self::path::KeyPath;
use self::raw::RawFile;
use crate::spec::{ProjectSpec, SourceSnapshot};

/// What [`load`] needs. Borrowed, so that callers keep ownership of the text
/// they will also store in the release snapshot.
#[derive(Debug, Clone, Copy)]
pub struct LoadInput<'a> {
    /// The compose file's path, for messages and the snapshot.
    pub compose_path: &'a str,
    pub compose_text: &'a str,
    /// Directory of the compose file: `env_file` paths and relative bind
    /// mount sources resolve against it. Give an absolute path: a relative
    /// one would be resolved against the caller's working directory.
    pub base_dir: &'a Path,
    pub project: &'a str,
    pub release: &'a str,
    /// `--var NAME=value` pairs: with `RELEASE`, the only variables
    /// interpolation sees.
    pub vars: &'a BTreeMap<String, String>,
}

/// Why a compose file was refused. Every message names the file and the key
/// path it is about, and says what to change.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error(
        "{file}: project name `{name}` is invalid: use 1 to 63 characters among lowercase letters, digits, `_` and `-`, starting with a letter or digit"
    )]
    InvalidProject { file: String, name: String },

    #[error(
        "{file}: release `{release}` is invalid: use 1 to 64 characters among letters, digits, `_`, `.` and `-`, starting with a letter or digit (a commit id or a version tag fits)"
    )]
    InvalidRelease { file: String, release: String },

    /// A `--var` that cannot be used.
    #[error("{file}: `--var {name}`: {reason}")]
    InvalidVar {
        file: String,
        name: String,
        reason: String,
    },

    /// The text is longer than [`budget::MAX_TEXT_BYTES`].
    #[error(
        "{file}: the compose file is {size} bytes, over the limit of {} MiB: compose files are a few kilobytes; check that this is the compose file",
        .limit >> 20
    )]
    TooLarge {
        file: String,
        size: usize,
        limit: usize,
    },

    /// YAML aliases would expand the file past a limit; `what` says which.
    /// Refused before expanding anything.
    #[error(
        "{file}: the compose file expands to {what} through YAML aliases (anchors `&x` used as `*x`): it was refused without expanding them; write the repeated parts out, or alias them fewer times"
    )]
    AliasExpansion { file: String, what: String },

    /// Mappings and sequences nested deeper than [`budget::MAX_DEPTH`].
    #[error(
        "{file}: line {line}: mappings and sequences are nested more than {limit} levels deep: compose files need about eight; flatten the structure"
    )]
    TooDeep {
        file: String,
        line: u64,
        limit: usize,
    },

    /// An alias inside the node its own anchor names.
    #[error(
        "{file}: line {line}: the alias `*{anchor}` is inside the node that `&{anchor}` names, so it would repeat forever: alias a node that is already complete"
    )]
    RecursiveAlias {
        file: String,
        line: u64,
        anchor: String,
    },

    /// The text is not YAML (the message has the line and column).
    #[error("{file}: invalid YAML: {source}: fix the file at that position")]
    Yaml {
        file: String,
        #[source]
        source: serde_norway::Error,
    },

    /// A key deploy-agent does not support.
    #[error(
        "{file}: unsupported key `{path}`: {}deploy-agent does not support it{} (supported keys under {context}: {supported})",
        did_you_mean(path, supported),
        hint_suffix(.hint)
    )]
    UnsupportedKey {
        file: String,
        path: String,
        /// Where the key is, e.g. `a service`.
        context: &'static str,
        /// The keys accepted there, comma-separated.
        supported: String,
        /// Why it is not supported, or what to do instead, when known.
        hint: Option<&'static str>,
    },

    #[error(
        "{file}: `{path}` uses variable `{var}`, which is not set: pass it with `--var {var}=value`, or give a default in the file: `${{{var}:-value}}` (the agent never reads its own environment)"
    )]
    UnsetVariable {
        file: String,
        path: String,
        var: String,
    },

    /// `${VAR:?message}` or `${VAR?message}` with VAR unset.
    #[error(
        "{file}: `{path}` requires variable `{var}`: {message}: pass it with `--var {var}=value`"
    )]
    RequiredVariable {
        file: String,
        path: String,
        var: String,
        message: String,
    },

    /// An `env_file` that is missing, unreadable or malformed.
    #[error("{file}: `{path}`: env_file `{env_file}` {message}")]
    EnvFile {
        file: String,
        path: String,
        env_file: String,
        message: String,
    },

    /// Services that depend on each other in a circle; `cycle` starts and
    /// ends with the same service, and `path` is its `depends_on`.
    #[error(
        "{file}: `{path}`: `depends_on` forms a cycle: {}: remove one of these dependencies",
        .cycle.join(" → ")
    )]
    DependencyCycle {
        file: String,
        path: String,
        cycle: Vec<String>,
    },

    /// Any other invalid value; `message` says what is wrong and what to do.
    #[error("{file}: `{path}`: {message}")]
    Invalid {
        file: String,
        path: String,
        message: String,
    },
}

/// `did you mean `k`? ` when the key at the end of `path` is a typo of
/// one of `supported` (comma-separated).
fn did_you_mean(path: &str, supported: &str) -> String {
    let key = path.rsplit('.').next().unwrap_or(path);
    deploy_protocol::suggest::nearest(key, supported.split(", "))
        .map(|k| format!("did you mean `{k}`? "))
        .unwrap_or_default()
}

fn hint_suffix(hint: &Option<&str>) -> String {
    hint.as_ref().map(|h| format!(": {h}")).unwrap_or_default()
}

/// Loads a compose file into a [`ProjectSpec`]: parses, interpolates,
/// validates, and orders services by `depends_on`.
///
/// Interpolation sees only `RELEASE` (= `input.release`) and `input.vars`,
/// never the agent's process environment: a request must give the same
/// result on every host, whoever started the agent and however.
pub fn load(input: &LoadInput<'_>) -> Result<ProjectSpec, ComposeError> {
    let file = input.compose_path;
    check_names(input)?;
    check_budget(input)?;

    let mut tree: Value =
        serde_norway::from_str(input.compose_text).map_err(|source| ComposeError::Yaml {
            file: file.to_string(),
            source,
        })?;
    tree.apply_merge().map_err(|source| ComposeError::Yaml {
        file: file.to_string(),
        source,
    })?;
    match &tree {
        Value::Mapping(_) => {}
        Value::Null => {
            return Err(invalid(
                file,
                &KeyPath::root(),
                "the file is empty: it needs a `services` mapping with at least one service",
            ));
        }
        _ => {
            return Err(invalid(
                file,
                &KeyPath::root(),
                "the file must be a mapping with a `services` key, as in a compose file",
            ));
        }
    }

    tree::prepare(&mut tree, &mut KeyPath::root()).map_err(|e| match e {
        tree::TreeError::Tag { path, tag } => invalid(
            file,
            &path,
            format!("the YAML tag `{tag}` is not supported: remove it and write the value in full"),
        ),
        tree::TreeError::NonStringKey { path, key } => invalid(
            file,
            &path,
            format!("key `{key}` is not a string: quote it (`\"{key}\": ...`)"),
        ),
    })?;

    let mut interpolator = Interpolator::new(input.release, input.vars);
    interpolator
        .interpolate_tree(&mut tree, &mut KeyPath::root())
        .map_err(|(path, e)| interpolation_error(file, &path, e))?;

    let raw: RawFile = serde_path_to_error::deserialize(tree).map_err(|e| serde_error(file, &e))?;

    let mut cx = Cx {
        file,
        base_dir: input.base_dir,
        env_files: BTreeMap::new(),
    };
    let project = service::convert_project(&mut cx, raw)?;

    Ok(ProjectSpec {
        project: input.project.to_string(),
        release: input.release.to_string(),
        services: project.services,
        networks: project.networks,
        volumes: project.volumes,
        source: SourceSnapshot {
            compose_path: file.to_string(),
            compose_text: input.compose_text.to_string(),
            interpolated: interpolator.used,
            env_files: cx.env_files,
        },
        rollout: project.rollout,
    })
}

/// What conversion needs besides the raw file, and what it collects.
pub(crate) struct Cx<'a> {
    file: &'a str,
    base_dir: &'a Path,
    /// `env_file` contents, keyed by the path as written.
    env_files: BTreeMap<String, String>,
}

impl Cx<'_> {
    fn invalid(&self, path: &KeyPath, message: impl Into<String>) -> ComposeError {
        invalid(self.file, path, message)
    }
}

fn invalid(file: &str, path: &KeyPath, message: impl Into<String>) -> ComposeError {
    ComposeError::Invalid {
        file: file.to_string(),
        path: path.to_string(),
        message: message.into(),
    }
}

/// Refuses text that is too long, or whose aliases expand too far or nest
/// too deep, before it is parsed into a tree (see [`budget`]).
fn check_budget(input: &LoadInput<'_>) -> Result<(), ComposeError> {
    let file = input.compose_path.to_string();
    let size = input.compose_text.len();
    if size > budget::MAX_TEXT_BYTES {
        return Err(ComposeError::TooLarge {
            file,
            size,
            limit: budget::MAX_TEXT_BYTES,
        });
    }
    budget::check(input.compose_text).map_err(|refusal| match refusal {
        budget::Refusal::Nodes => ComposeError::AliasExpansion {
            file,
            what: format!("more than {} nodes", budget::MAX_NODES),
        },
        budget::Refusal::ScalarBytes => ComposeError::AliasExpansion {
            file,
            what: format!("more than {} MiB of text", budget::MAX_SCALAR_BYTES >> 20),
        },
        budget::Refusal::Depth { line } => ComposeError::TooDeep {
            file,
            line,
            limit: budget::MAX_DEPTH,
        },
        budget::Refusal::RecursiveAlias { line, anchor } => {
            ComposeError::RecursiveAlias { file, line, anchor }
        }
        budget::Refusal::Parser => ComposeError::Invalid {
            file,
            path: KeyPath::root().to_string(),
            message: "the YAML parser could not start (out of memory?): try again".to_string(),
        },
    })
}

fn check_names(input: &LoadInput<'_>) -> Result<(), ComposeError> {
    let file = input.compose_path;
    if !name_matches(
        input.project,
        63,
        |c| c.is_ascii_lowercase() || c.is_ascii_digit(),
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-',
    ) {
        return Err(ComposeError::InvalidProject {
            file: file.to_string(),
            name: input.project.to_string(),
        });
    }
    if !name_matches(
        input.release,
        64,
        |c| c.is_ascii_alphanumeric(),
        |c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-',
    ) {
        return Err(ComposeError::InvalidRelease {
            file: file.to_string(),
            release: input.release.to_string(),
        });
    }
    for name in input.vars.keys() {
        let reason = if name == "RELEASE" {
            Some(
                "`RELEASE` is always the release being deployed and cannot be overridden: drop this `--var`, or give the release id itself"
                    .to_string(),
            )
        } else if !is_var_name(name) {
            Some(format!(
                "`{name}` is not a variable name: use letters, digits and `_`, not starting with a digit"
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(ComposeError::InvalidVar {
                file: file.to_string(),
                name: name.clone(),
                reason,
            });
        }
    }
    Ok(())
}

fn is_var_name(s: &str) -> bool {
    name_matches(
        s,
        usize::MAX,
        |c| c == '_' || c.is_ascii_alphabetic(),
        |c| c == '_' || c.is_ascii_alphanumeric(),
    )
}

/// Whether `s` is 1..=`max_len` characters, the first passing `first` and
/// the others `rest`.
fn name_matches(s: &str, max_len: usize, first: fn(char) -> bool, rest: fn(char) -> bool) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if first(c) => {}
        _ => return false,
    }
    s.chars().count() <= max_len && chars.all(rest)
}

/// Names of services, networks and volumes: they become parts of Docker
/// object names and DNS names, so keep to what both accept.
fn is_object_name(s: &str) -> bool {
    name_matches(
        s,
        63,
        |c| c.is_ascii_alphanumeric(),
        |c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-',
    )
}

const OBJECT_NAME_RULE: &str = "use 1 to 63 characters among letters, digits, `_`, `.` and `-`, starting with a letter or digit";

fn interpolation_error(file: &str, path: &KeyPath, e: InterpolationError) -> ComposeError {
    match e {
        InterpolationError::Unset { var } => ComposeError::UnsetVariable {
            file: file.to_string(),
            path: path.to_string(),
            var,
        },
        InterpolationError::Required { var, message } => ComposeError::RequiredVariable {
            file: file.to_string(),
            path: path.to_string(),
            message: if message.trim().is_empty() {
                "it must be set and not empty".to_string()
            } else {
                message
            },
            var,
        },
        InterpolationError::Syntax { message } => invalid(file, path, message),
        InterpolationError::TooDeep { depth } => invalid(
            file,
            path,
            format!(
                "`${{...}}` is nested {depth} levels deep, over the limit of {} levels: compose files need two or three; write the nested defaults out in full",
                interpolate::MAX_NESTING
            ),
        ),
        InterpolationError::TooLarge => invalid(
            file,
            path,
            format!(
                "variable values make the file more than {} MiB longer (all `${{VAR}}` substitutions together): this is far more than a compose file needs; check the `--var` values and how often they are used",
                interpolate::MAX_SUBSTITUTED_BYTES >> 20
            ),
        ),
    }
}

/// Turns a deserialization error into our error, recognizing unknown keys.
fn serde_error(file: &str, e: &serde_path_to_error::Error<serde_norway::Error>) -> ComposeError {
    serde_error_at(file, &KeyPath::root(), e)
}

/// [`serde_error`] for a value deserialized on its own, found at `prefix`.
fn serde_error_at(
    file: &str,
    prefix: &KeyPath,
    e: &serde_path_to_error::Error<serde_norway::Error>,
) -> ComposeError {
    let mut path = prefix.clone();
    path.0.extend(KeyPath::from_serde(e.path()).0);
    let message = e.inner().to_string();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let key = rest.split('`').next().unwrap_or_default();
        let keys = path.keys();
        let parent = &keys[..keys.len().saturating_sub(1)];
        // A service's `x-deploy` reads the project-wide keys only to refuse
        // them: do not offer them there.
        let exclude: &[&str] = match parent {
            ["services", _, "x-deploy"] => raw::TOP_LEVEL_ONLY_KEYS,
            _ => &[],
        };
        let supported = supported_keys(rest, exclude);
        return ComposeError::UnsupportedKey {
            file: file.to_string(),
            path: path.to_string(),
            context: key_context(parent),
            supported,
            hint: key_hint(parent, key),
        };
    }
    let message = if let Some(rest) = message.strip_prefix("missing field `") {
        let key = rest.split('`').next().unwrap_or_default();
        format!("`{key}` is missing: add it")
    } else if message.starts_with("invalid type") || message.starts_with("unknown variant") {
        format!("{message}: change the value")
    } else {
        message
    };
    invalid(file, &path, message)
}

/// The accepted keys from serde's "expected one of `a`, `b`" text.
fn supported_keys(after_unknown: &str, exclude: &[&str]) -> String {
    let Some((_, expected)) = after_unknown.split_once("expected") else {
        return "none".to_string();
    };
    let keys: Vec<&str> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|k| !exclude.contains(k))
        .collect();
    if keys.is_empty() {
        "none".to_string()
    } else {
        keys.join(", ")
    }
}

/// Where an unknown key was found, for the message.
fn key_context(parent: &[&str]) -> &'static str {
    match parent {
        [] => "the top level",
        ["services", _] => "a service",
        ["services", _, "deploy"] => "`deploy`",
        ["services", _, "healthcheck"] => "`healthcheck`",
        ["x-deploy"] | ["services", _, "x-deploy"] => "`x-deploy`",
        ["x-deploy", "health"] | ["services", _, "x-deploy", "health"] => "`x-deploy.health`",
        ["x-deploy", "observe"] => "`x-deploy.observe`",
        ["x-deploy", "hooks"] => "`x-deploy.hooks`",
        ["x-deploy", "hooks", "smoke"] => "`x-deploy.hooks.smoke`",
        ["x-deploy", "hooks", "smoke", "checks", _] => "a smoke check",
        ["x-deploy", "hooks", _] | ["x-deploy", "hooks", "smoke", "command"] => "a hook",
        ["services", _, "ports", _] => "a long-syntax port",
        ["services", _, "volumes", _] => "a long-syntax volume",
        ["services", _, "networks", _] => "a service's network entry",
        ["services", _, "depends_on", _] => "a `depends_on` entry",
        ["networks", _] => "a network",
        ["volumes", _] => "a volume",
        _ => "this mapping",
    }
}

/// Why some well-known keys are not supported, or what to use instead.
fn key_hint(parent: &[&str], key: &str) -> Option<&'static str> {
    match (parent, key) {
        (["services", _], "container_name") => Some(
            "replicas and releases need generated names; other services reach this one by its service name",
        ),
        (["services", _], "build") => {
            Some("build and push the image in CI; the agent only pulls images")
        }
        (["services", _], "expose") => {
            Some("containers on the same network reach each other's ports without it")
        }
        (["services", _], "links") => {
            Some("services on the same network reach each other by service name")
        }
        (["services", _], "network_mode") => {
            Some("services join the project networks listed under `networks`")
        }
        (["services", _], "scale") => Some("use `deploy.replicas`"),
        (["services", _, "deploy"], "update_config" | "rollback_config") => {
            Some("rollouts are configured under the service's `x-deploy`")
        }
        (["services", _, "networks", _], _) => Some(
            "write the network as a list item (`- front`) or with an empty mapping (`front: {}`)",
        ),
        (["x-deploy", "hooks"], k) if k.contains('-') => {
            Some("hook names are written with `_`, like `pre_deploy`")
        }
        (["x-deploy", "hooks", "smoke"], "timeout") => {
            Some("give each check a `max_latency`, and the smoke `command` its own `timeout`")
        }
        (["x-deploy", "hooks", _], "environment" | "env_file" | "networks" | "image") => {
            Some("a container hook runs with the image, environment and networks of its `service`")
        }
        ([], "include" | "configs" | "secrets") => {
            Some("put everything the project needs in this one file; mount files with `volumes`")
        }
        _ => None,
    }
}
