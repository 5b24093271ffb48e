//! `x-deploy` → [`DeploySettings`]: the health gate and rollout settings.
//!
//! The top-level `x-deploy` gives defaults for every service; a service's own
//! `x-deploy` overrides them field by field. The probe kind (`http`, `tcp`,
//! `exec` or `docker`) counts as one field: a service that says `tcp: 5432`
//! replaces a default `http: /health` rather than being combined with it.
//!
//! Which probe gates a service, in order: its `x-deploy.health` probe (own or
//! default), else its compose `healthcheck` (Docker runs it), else "running":
//! the container stays up through the start period and then accepts TCP on
//! its first port. The fallback keeps a file without any of our keys
//! deployable, with the safest gate we can infer.

use std::time::Duration;

use super::path::KeyPath;
use super::raw::{Dur, Int, OneOrMany, RawHealth, RawXDeploy};
use super::{ComposeError, Cx};
use crate::spec::{DeploySettings, DockerHealthcheck, HealthSettings, PortSpec, Probe, ProxyMode};

/// One `x-deploy` mapping and where it is.
#[derive(Clone, Copy)]
pub(crate) struct Level<'a> {
    pub raw: &'a RawXDeploy,
    /// Path of the `x-deploy` key itself.
    pub path: &'a KeyPath,
    /// The top-level defaults, rather than the service's own.
    pub is_default: bool,
}

/// What the settings depend on in the service itself.
pub(crate) struct Service<'a> {
    pub name: &'a str,
    pub ports: &'a [PortSpec],
    pub healthcheck: Option<&'a DockerHealthcheck>,
    pub replicas: u32,
}

/// A value and where it was written.
struct Found<'a, T> {
    value: T,
    level: Level<'a>,
    path: KeyPath,
}

enum Kind<'a> {
    Http(&'a str),
    Tcp(Int),
    Exec(&'a OneOrMany),
    Docker,
}

const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_HEALTHY_AFTER: u32 = 1;
const DEFAULT_UNHEALTHY_AFTER: u32 = 3;
const DEFAULT_RUNNING_START_PERIOD: Duration = Duration::from_secs(2);
const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn settings(
    cx: &Cx<'_>,
    defaults: Option<Level<'_>>,
    own: Option<Level<'_>>,
    service: &Service<'_>,
) -> Result<DeploySettings, ComposeError> {
    // Own level first: the first level that has a field wins.
    let levels: Vec<Level<'_>> = own.into_iter().chain(defaults).collect();
    let err = |found_level: Level<'_>, path: &KeyPath, message: String| {
        let message = if found_level.is_default {
            format!(
                "{message} (this top-level default applies to service `{}`)",
                service.name
            )
        } else {
            message
        };
        cx.invalid(path, message)
    };

    let mut kind: Option<Found<'_, Kind<'_>>> = None;
    for level in &levels {
        if let Some(found) = level_kind(cx, *level)? {
            kind.get_or_insert(found);
        }
    }
    let port = health_field(&levels, "port", |h| h.port);

    let probe = match &kind {
        Some(Found {
            value: Kind::Http(path_text),
            level,
            path,
        }) => {
            if !path_text.starts_with('/') {
                return Err(err(
                    *level,
                    path,
                    format!(
                        "`{path_text}` is not an HTTP path: write one starting with `/`, like `/healthz`"
                    ),
                ));
            }
            let port = match &port {
                Some(p) => port_number(p.value).ok_or_else(|| {
                    err(p.level, &p.path, format!("`{}` is not a port number: use 1 to 65535", p.value.0))
                })?,
                None => service.ports.first().map(|p| p.target).ok_or_else(|| {
                    err(
                        *level,
                        path,
                        format!(
                            "the http probe needs a container port, and service `{}` publishes none: add `port: <container port>` under `x-deploy.health`",
                            service.name
                        ),
                    )
                })?,
            };
            Probe::Http {
                path: path_text.to_string(),
                port,
            }
        }
        Some(Found {
            value: Kind::Tcp(n),
            level,
            path,
        }) => Probe::Tcp {
            port: port_number(*n).ok_or_else(|| {
                err(
                    *level,
                    path,
                    format!("`{}` is not a port number: use 1 to 65535", n.0),
                )
            })?,
        },
        Some(Found {
            value: Kind::Exec(command),
            level,
            path,
        }) => {
            let command = match command {
                OneOrMany::One(s) => shell_words::split(s).map_err(|e| {
                    err(*level, path, format!("cannot split `{s}` into words ({e}): fix the quoting or write it as a list"))
                })?,
                OneOrMany::Many(items) => items.clone(),
            };
            if command.is_empty() {
                return Err(err(
                    *level,
                    path,
                    "the exec probe needs a command: give it, like `exec: [\"pg_isready\", \"-q\"]`".to_string(),
                ));
            }
            Probe::Exec { command }
        }
        Some(Found {
            value: Kind::Docker,
            level,
            path,
        }) => {
            if service.healthcheck.is_none() {
                return Err(err(
                    *level,
                    path,
                    format!(
                        "`docker: true` gates on the compose `healthcheck`, and service `{}` has none (or it is disabled): add a `healthcheck`, or use `http`, `tcp` or `exec`",
                        service.name
                    ),
                ));
            }
            Probe::Docker
        }
        None if service.healthcheck.is_some() => Probe::Docker,
        None => Probe::Running {
            port: service.ports.first().map(|p| p.target),
        },
    };

    if let Some(p) = &port
        && !matches!(probe, Probe::Http { .. })
    {
        return Err(err(
            p.level,
            &p.path,
            format!(
                "`port` is the port of the http probe, and this service's gate is {}: remove `port`, or add `http: /path`",
                probe.describe()
            ),
        ));
    }

    let positive = |f: Option<Found<'_, Dur>>, default: Duration, what: &str| match f {
        Some(f) if f.value.0.is_zero() => Err(err(
            f.level,
            &f.path,
            format!("the {what} must be more than zero: give a duration like `2s`"),
        )),
        Some(f) => Ok(f.value.0),
        None => Ok(default),
    };
    let at_least_one = |f: Option<Found<'_, Int>>, default: u32, what: &str| match f {
        Some(f) => u32::try_from(f.value.0)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                err(
                    f.level,
                    &f.path,
                    format!(
                        "`{}`: {what} must be a whole number from 1 to {}",
                        f.value.0,
                        u32::MAX
                    ),
                )
            }),
        None => Ok(default),
    };

    let default_start = if matches!(probe, Probe::Running { .. }) {
        DEFAULT_RUNNING_START_PERIOD
    } else {
        Duration::ZERO
    };
    let health = HealthSettings {
        interval: positive(
            health_field(&levels, "interval", |h| h.interval),
            DEFAULT_INTERVAL,
            "probe interval",
        )?,
        timeout: positive(
            health_field(&levels, "timeout", |h| h.timeout),
            DEFAULT_TIMEOUT,
            "probe timeout",
        )?,
        healthy_after: at_least_one(
            health_field(&levels, "healthy_after", |h| h.healthy_after),
            DEFAULT_HEALTHY_AFTER,
            "healthy_after",
        )?,
        unhealthy_after: at_least_one(
            health_field(&levels, "unhealthy_after", |h| h.unhealthy_after),
            DEFAULT_UNHEALTHY_AFTER,
            "unhealthy_after",
        )?,
        start_period: health_field(&levels, "start_period", |h| h.start_period)
            .map(|f| f.value.0)
            .unwrap_or(default_start),
        deadline: positive(
            health_field(&levels, "deadline", |h| h.deadline),
            DEFAULT_DEADLINE,
            "deadline",
        )?,
        probe,
    };

    let drain_timeout = field(&levels, "drain_timeout", |x| x.drain_timeout)
        .map(|f| f.value.0)
        .unwrap_or(DEFAULT_DRAIN_TIMEOUT);
    let proxy = field(&levels, "proxy", |x| x.proxy)
        .map(|f| f.value)
        .unwrap_or(ProxyMode::Http);
    let parallel = match field(&levels, "parallel", |x| x.parallel) {
        None => 1,
        Some(f) => {
            let n = u32::try_from(f.value.0).unwrap_or(u32::MAX);
            if n == 0 {
                return Err(err(
                    f.level,
                    &f.path,
                    "`parallel` must be at least 1: it is how many replicas are replaced at a time"
                        .to_string(),
                ));
            }
            if n > service.replicas {
                // A project-wide default is a ceiling; a service's own value
                // is a statement about that service and must fit it.
                if f.level.is_default {
                    service.replicas
                } else {
                    return Err(err(
                        f.level,
                        &f.path,
                        format!(
                            "`parallel: {n}` is more than the service's {} replica(s): use 1 to {}",
                            service.replicas, service.replicas
                        ),
                    ));
                }
            } else {
                n
            }
        }
    };

    Ok(DeploySettings {
        health,
        drain_timeout,
        proxy,
        parallel,
    })
}

/// The probe kind a level gives, checking that it gives at most one.
fn level_kind<'a>(
    cx: &Cx<'_>,
    level: Level<'a>,
) -> Result<Option<Found<'a, Kind<'a>>>, ComposeError> {
    let Some(health) = &level.raw.health else {
        return Ok(None);
    };
    let health_path = level.path.key("health");
    let mut kinds: Vec<Found<'a, Kind<'a>>> = Vec::new();
    let mut add = |key: &str, value: Kind<'a>| {
        kinds.push(Found {
            value,
            level,
            path: health_path.key(key),
        });
    };
    if let Some(p) = &health.http {
        add("http", Kind::Http(p));
    }
    if let Some(n) = health.tcp {
        add("tcp", Kind::Tcp(n));
    }
    if let Some(c) = &health.exec {
        add("exec", Kind::Exec(c));
    }
    match health.docker {
        Some(f) if f.0 => add("docker", Kind::Docker),
        Some(_) => {
            return Err(cx.invalid(
                &health_path.key("docker"),
                "`docker: false` does not choose a probe: remove it, or choose `http`, `tcp` or `exec`",
            ));
        }
        None => {}
    }
    if kinds.len() > 1 {
        let names: Vec<String> = kinds
            .iter()
            .filter_map(|k| k.path.keys().last().map(|s| format!("`{s}`")))
            .collect();
        return Err(cx.invalid(
            &health_path,
            format!(
                "give exactly one probe among `http`, `tcp`, `exec` and `docker`, not {}",
                names.join(" and ")
            ),
        ));
    }
    Ok(kinds.pop())
}

/// The first level's value of an `x-deploy` field.
fn field<'a, T>(
    levels: &[Level<'a>],
    key: &str,
    get: impl Fn(&'a RawXDeploy) -> Option<T>,
) -> Option<Found<'a, T>> {
    levels.iter().find_map(|level| {
        get(level.raw).map(|value| Found {
            value,
            level: *level,
            path: level.path.key(key),
        })
    })
}

/// The first level's value of an `x-deploy.health` field.
fn health_field<'a, T>(
    levels: &[Level<'a>],
    key: &str,
    get: impl Fn(&'a RawHealth) -> Option<T>,
) -> Option<Found<'a, T>> {
    levels.iter().find_map(|level| {
        let health = level.raw.health.as_ref()?;
        get(health).map(|value| Found {
            value,
            level: *level,
            path: level.path.key("health").key(key),
        })
    })
}

fn port_number(n: Int) -> Option<u16> {
    u16::try_from(n.0).ok().filter(|p| *p != 0)
}
