//! The top-level `x-deploy`'s project-wide keys → [`RolloutSettings`]: the
//! observation window after the switch (`observe`), the canary steps
//! (`canary`, `canary_hold`) and the hooks (`hooks`).
//!
//! These keys describe the rollout of the whole project, so they are only
//! accepted at the top level; under a service they are an error that says
//! where they go.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_norway::Value;

use super::path::KeyPath;
use super::raw::{
    Dur, Int, OneOrMany, RawHook, RawHooks, RawObserve, RawSmoke, RawSmokeCheck, RawXDeploy,
};
use super::service::words;
use super::{ComposeError, Cx, serde_error_at};
use crate::spec::{Hook, HookRun, Hooks, ObserveSettings, RolloutSettings, Smoke, SmokeCheck};

const DEFAULT_WINDOW: Duration = Duration::from_secs(5 * 60);
const DEFAULT_UNHEALTHY_AFTER: u32 = 3;
const DEFAULT_MAX_ERROR_RATE: f64 = 0.05;
const DEFAULT_ERROR_RATE_FOR: Duration = Duration::from_secs(2 * 60);
const DEFAULT_MIN_REQUESTS: u64 = 20;
const DEFAULT_CANARY_HOLD: Duration = Duration::from_secs(30);
const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(10 * 60);
const DEFAULT_MIGRATE_WARN_AFTER: Duration = Duration::from_secs(5 * 60);
const DEFAULT_SMOKE_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const SMOKE_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];
const DEFAULT_SMOKE_STATUS: u16 = 200;

/// What the hooks need to know about a service of the file.
pub(crate) struct ServiceRef<'a> {
    pub name: &'a str,
    /// Whether it publishes ports (smoke checks go through the proxy).
    pub has_ports: bool,
}

/// The rollout settings from the top-level `x-deploy` (`raw`, at `path`).
/// `services` are the file's services, in file order.
pub(crate) fn settings(
    cx: &Cx<'_>,
    raw: Option<&RawXDeploy>,
    path: &KeyPath,
    services: &[ServiceRef<'_>],
) -> Result<RolloutSettings, ComposeError> {
    let Some(raw) = raw else {
        return Ok(RolloutSettings {
            canary_hold: DEFAULT_CANARY_HOLD,
            ..RolloutSettings::default()
        });
    };
    let observe = match &raw.observe {
        Some(value) => {
            let p = path.key("observe");
            Some(observe(cx, &typed::<RawObserve>(cx, value, &p)?, &p)?)
        }
        None => None,
    };
    let canary = match &raw.canary {
        Some(value) => {
            let p = path.key("canary");
            canary(cx, &typed::<Vec<Int>>(cx, value, &p)?, &p)?
        }
        None => Vec::new(),
    };
    let canary_hold_path = path.key("canary_hold");
    let canary_hold = positive(
        cx,
        raw.canary_hold
            .as_ref()
            .map(|v| typed::<Dur>(cx, v, &canary_hold_path))
            .transpose()?,
        &canary_hold_path,
        DEFAULT_CANARY_HOLD,
        "`canary_hold`",
    )?;
    let hooks = match &raw.hooks {
        Some(value) => {
            let p = path.key("hooks");
            hooks(cx, &typed::<RawHooks>(cx, value, &p)?, &p, services)?
        }
        None => Hooks::default(),
    };
    Ok(RolloutSettings {
        observe,
        canary,
        canary_hold,
        hooks,
    })
}

/// The strict type of a value the raw file kept as YAML (see
/// [`RawXDeploy`]), with errors naming the key path from the file's top.
fn typed<T: DeserializeOwned>(
    cx: &Cx<'_>,
    value: &Value,
    path: &KeyPath,
) -> Result<T, ComposeError> {
    serde_path_to_error::deserialize(value.clone()).map_err(|e| serde_error_at(cx.file, path, &e))
}

/// A service's own `x-deploy` must not have the project-wide keys.
pub(crate) fn reject_in_service(
    cx: &Cx<'_>,
    raw: &RawXDeploy,
    path: &KeyPath,
) -> Result<(), ComposeError> {
    let present = [
        ("observe", raw.observe.is_some()),
        ("canary", raw.canary.is_some()),
        ("canary_hold", raw.canary_hold.is_some()),
        ("hooks", raw.hooks.is_some()),
    ];
    match present.iter().find(|(_, is_set)| *is_set) {
        Some((key, _)) => Err(cx.invalid(
            &path.key(key),
            format!(
                "`{key}` applies to the whole project, so it belongs to the top-level `x-deploy`, not to a service's: move it there"
            ),
        )),
        None => Ok(()),
    }
}

fn observe(cx: &Cx<'_>, raw: &RawObserve, path: &KeyPath) -> Result<ObserveSettings, ComposeError> {
    let unhealthy_after = match raw.unhealthy_after {
        None => DEFAULT_UNHEALTHY_AFTER,
        Some(n) => u32::try_from(n.0)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                cx.invalid(
                    &path.key("unhealthy_after"),
                    format!(
                        "`{}`: unhealthy_after is a count of consecutive failed probes: give a whole number from 1 to {}",
                        n.0,
                        u32::MAX
                    ),
                )
            })?,
    };
    let max_error_rate = match &raw.max_error_rate {
        None => DEFAULT_MAX_ERROR_RATE,
        Some(rate) if rate.value > 0.0 && rate.value <= 1.0 => rate.value,
        Some(rate) => {
            return Err(cx.invalid(
                &path.key("max_error_rate"),
                format!(
                    "`{}` is out of range: the share of 5xx responses must be more than 0 and at most 100%: write it like `5%` or `0.05`",
                    rate.text
                ),
            ));
        }
    };
    let min_requests = match raw.min_requests {
        None => DEFAULT_MIN_REQUESTS,
        Some(Int(0)) => {
            return Err(cx.invalid(
                &path.key("min_requests"),
                "`0`: min_requests must be at least 1, so that a service without traffic is not judged on no data",
            ));
        }
        Some(Int(n)) => n,
    };
    Ok(ObserveSettings {
        window: raw.window.map_or(DEFAULT_WINDOW, |d| d.0),
        unhealthy_after,
        max_error_rate,
        error_rate_for: positive(
            cx,
            raw.error_rate_for,
            &path.key("error_rate_for"),
            DEFAULT_ERROR_RATE_FOR,
            "`error_rate_for`",
        )?,
        min_requests,
    })
}

/// Strictly increasing percentages from 1 to 100, ending with 100 (added if
/// missing). A lone 100 is no canary at all: an empty list.
fn canary(cx: &Cx<'_>, steps: &[Int], path: &KeyPath) -> Result<Vec<u8>, ComposeError> {
    let mut out: Vec<u8> = Vec::with_capacity(steps.len() + 1);
    for (i, step) in steps.iter().enumerate() {
        let p = path.index(i);
        let percent = u8::try_from(step.0)
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| {
                cx.invalid(
                    &p,
                    format!(
                        "`{}` is not a share of requests: give percentages from 1 to 100, like `canary: [5, 25, 100]`",
                        step.0
                    ),
                )
            })?;
        if let Some(previous) = out.last()
            && percent <= *previous
        {
            return Err(cx.invalid(
                &p,
                format!(
                    "`{percent}` comes after `{previous}`: each step must send more requests to the new release than the one before, like `canary: [5, 25, 100]`"
                ),
            ));
        }
        out.push(percent);
    }
    if out.last().is_some_and(|last| *last != 100) {
        out.push(100);
    }
    if out == [100] {
        out.clear();
    }
    Ok(out)
}

/// Which hook is being read, and what differs between hooks.
#[derive(Clone, Copy)]
struct HookKind {
    default_timeout: Duration,
    default_warn_after: Option<Duration>,
    /// Only `migrate` has a `down` command.
    takes_down: bool,
}

const PLAIN_HOOK: HookKind = HookKind {
    default_timeout: DEFAULT_HOOK_TIMEOUT,
    default_warn_after: None,
    takes_down: false,
};

const MIGRATE_HOOK: HookKind = HookKind {
    default_timeout: DEFAULT_HOOK_TIMEOUT,
    default_warn_after: Some(DEFAULT_MIGRATE_WARN_AFTER),
    takes_down: true,
};

const SMOKE_COMMAND: HookKind = HookKind {
    default_timeout: DEFAULT_SMOKE_COMMAND_TIMEOUT,
    default_warn_after: None,
    takes_down: false,
};

fn hooks(
    cx: &Cx<'_>,
    raw: &RawHooks,
    path: &KeyPath,
    services: &[ServiceRef<'_>],
) -> Result<Hooks, ComposeError> {
    let plain = |raw: &Option<RawHook>, key: &str| {
        raw.as_ref()
            .map(|h| hook(cx, h, &path.key(key), PLAIN_HOOK, services))
            .transpose()
    };
    Ok(Hooks {
        pre_deploy: plain(&raw.pre_deploy, "pre_deploy")?,
        backup: plain(&raw.backup, "backup")?,
        migrate: raw
            .migrate
            .as_ref()
            .map(|h| hook(cx, h, &path.key("migrate"), MIGRATE_HOOK, services))
            .transpose()?,
        smoke: raw
            .smoke
            .as_ref()
            .map(|s| smoke(cx, s, &path.key("smoke"), services))
            .transpose()?,
        post_deploy: plain(&raw.post_deploy, "post_deploy")?,
        pre_rollback: plain(&raw.pre_rollback, "pre_rollback")?,
        post_rollback: plain(&raw.post_rollback, "post_rollback")?,
    })
}

fn hook(
    cx: &Cx<'_>,
    raw: &RawHook,
    path: &KeyPath,
    kind: HookKind,
    services: &[ServiceRef<'_>],
) -> Result<Hook, ComposeError> {
    const BOTH_FORMS: &str = "give `service` and `command` (a one-off container from that service's image, with its environment and networks) or `host` (a command run on the host)";
    let run = match (&raw.service, &raw.command, &raw.host) {
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            return Err(cx.invalid(
                path,
                format!(
                    "a hook runs either in a container or on the host, not both: {BOTH_FORMS}; remove `host`, or remove `service` and `command`"
                ),
            ));
        }
        (None, None, Some(host)) => HookRun::Host {
            command: command_words(cx, &path.key("host"), host)?,
        },
        (Some(service), Some(command), None) => {
            check_service(cx, &path.key("service"), service, services)?;
            HookRun::Container {
                service: service.clone(),
                command: command_words(cx, &path.key("command"), command)?,
            }
        }
        (Some(service), None, None) => {
            return Err(cx.invalid(
                path,
                format!(
                    "`command` is missing: give the command to run in a one-off container of service `{service}`, like `command: [\"./manage\", \"migrate\"]`"
                ),
            ));
        }
        (None, Some(_), None) => {
            return Err(cx.invalid(
                path,
                format!(
                    "`service` is missing: name the service whose image, environment and networks the command runs with ({}), or write `host:` instead of `command:` to run it on the host",
                    service_list(services)
                ),
            ));
        }
        (None, None, None) => {
            return Err(cx.invalid(path, format!("the hook runs nothing: {BOTH_FORMS}")));
        }
    };

    let down = match &raw.down {
        None => None,
        Some(_) if !kind.takes_down => {
            return Err(cx.invalid(
                &path.key("down"),
                "`down` is only for the `migrate` hook (it undoes the migration on rollback when asked with `--migrate-down`): remove it here",
            ));
        }
        Some(down) => Some(command_words(cx, &path.key("down"), down)?),
    };

    let timeout = positive(
        cx,
        raw.timeout,
        &path.key("timeout"),
        kind.default_timeout,
        "the hook's `timeout`",
    )?;
    let warn_after = match raw.warn_after {
        Some(Dur(w)) if w.is_zero() => {
            return Err(cx.invalid(
                &path.key("warn_after"),
                "`warn_after` must be more than zero: give a duration like `1m`, or remove it",
            ));
        }
        Some(Dur(w)) if w >= timeout => {
            return Err(cx.invalid(
                &path.key("warn_after"),
                format!(
                    "`warn_after` ({}) must be shorter than the hook's `timeout` ({}): the warning is for a hook that is slow but not yet killed; shorten it, or raise `timeout`",
                    humantime::format_duration(w),
                    humantime::format_duration(timeout)
                ),
            ));
        }
        Some(Dur(w)) => Some(w),
        // A default that does not fit a short timeout is dropped rather than
        // refused: the user did not write it.
        None => kind.default_warn_after.filter(|w| *w < timeout),
    };

    Ok(Hook {
        run,
        timeout,
        warn_after,
        down,
    })
}

fn smoke(
    cx: &Cx<'_>,
    raw: &RawSmoke,
    path: &KeyPath,
    services: &[ServiceRef<'_>],
) -> Result<Smoke, ComposeError> {
    let service = match &raw.service {
        Some(name) => {
            let service_path = path.key("service");
            let found = check_service(cx, &service_path, name, services)?;
            if !found.has_ports {
                return Err(cx.invalid(
                    &service_path,
                    format!(
                        "service `{name}` publishes no ports, and smoke checks reach the new release through the proxy: name a service with `ports`{}",
                        with_ports_hint(services)
                    ),
                ));
            }
            name.clone()
        }
        None => services
            .iter()
            .find(|s| s.has_ports)
            .map(|s| s.name.to_string())
            .ok_or_else(|| {
                cx.invalid(
                    path,
                    "smoke checks reach the new release through the proxy, and no service publishes ports: add `ports` to the service to check and name it with `service:`",
                )
            })?,
    };

    let checks_path = path.key("checks");
    let checks = raw
        .checks
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| smoke_check(cx, c, &checks_path.index(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let command = raw
        .command
        .as_ref()
        .map(|h| hook(cx, h, &path.key("command"), SMOKE_COMMAND, services))
        .transpose()?;
    if checks.is_empty() && command.is_none() {
        return Err(cx.invalid(
            path,
            "smoke has nothing to run: give `checks` (like `checks: [{path: /health}]`) or a `command`, or remove `smoke`",
        ));
    }
    Ok(Smoke {
        service,
        checks,
        command,
    })
}

fn smoke_check(
    cx: &Cx<'_>,
    raw: &RawSmokeCheck,
    path: &KeyPath,
) -> Result<SmokeCheck, ComposeError> {
    let check_path = match &raw.path {
        None => {
            return Err(cx.invalid(
                path,
                "`path` is missing: give the path to request, like `path: /health`",
            ));
        }
        Some(p) if !p.starts_with('/') => {
            return Err(cx.invalid(
                &path.key("path"),
                format!("`{p}` is not an HTTP path: write one starting with `/`, like `/health`"),
            ));
        }
        Some(p) => p.clone(),
    };
    let method = match &raw.method {
        None => "GET".to_string(),
        Some(m) => {
            let upper = m.trim().to_ascii_uppercase();
            if !SMOKE_METHODS.contains(&upper.as_str()) {
                return Err(cx.invalid(
                    &path.key("method"),
                    format!(
                        "`{m}` is not a supported method: use one of {}",
                        SMOKE_METHODS.join(", ")
                    ),
                ));
            }
            upper
        }
    };
    let status = match raw.status {
        None => DEFAULT_SMOKE_STATUS,
        Some(n) => u16::try_from(n.0)
            .ok()
            .filter(|s| (100..=599).contains(s))
            .ok_or_else(|| {
                cx.invalid(
                    &path.key("status"),
                    format!(
                        "`{}` is not an HTTP status: give the expected status, from 100 to 599, like `200`",
                        n.0
                    ),
                )
            })?,
    };
    let max_latency = match raw.max_latency {
        None => None,
        Some(Dur(d)) if d.is_zero() => {
            return Err(cx.invalid(
                &path.key("max_latency"),
                "`max_latency` must be more than zero: give a duration like `500ms`, or remove it",
            ));
        }
        Some(Dur(d)) => Some(d),
    };
    Ok(SmokeCheck {
        method,
        path: check_path,
        status,
        body_contains: raw.body_contains.as_ref().map(|s| s.0.clone()),
        max_latency,
    })
}

/// A command as a list of words (a string is split like a shell would),
/// which must not be empty.
fn command_words(
    cx: &Cx<'_>,
    path: &KeyPath,
    value: &OneOrMany,
) -> Result<Vec<String>, ComposeError> {
    let command = words(cx, path, value.clone())?;
    if command.is_empty() || command.iter().all(|w| w.trim().is_empty()) {
        return Err(cx.invalid(
            path,
            "the command is empty: give it as a list, like `[\"./manage\", \"migrate\"]`, or as a string",
        ));
    }
    Ok(command)
}

fn check_service<'s, 'a>(
    cx: &Cx<'_>,
    path: &KeyPath,
    name: &str,
    services: &'s [ServiceRef<'a>],
) -> Result<&'s ServiceRef<'a>, ComposeError> {
    services.iter().find(|s| s.name == name).ok_or_else(|| {
        cx.invalid(
            path,
            format!(
                "service `{name}` does not exist: name one of the file's services ({})",
                service_list(services)
            ),
        )
    })
}

fn service_list(services: &[ServiceRef<'_>]) -> String {
    services
        .iter()
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn with_ports_hint(services: &[ServiceRef<'_>]) -> String {
    let with_ports: Vec<&str> = services
        .iter()
        .filter(|s| s.has_ports)
        .map(|s| s.name)
        .collect();
    if with_ports.is_empty() {
        ", or add `ports` to it".to_string()
    } else {
        format!(" ({})", with_ports.join(", "))
    }
}

/// A duration that must be more than zero, or its default.
fn positive(
    cx: &Cx<'_>,
    value: Option<Dur>,
    path: &KeyPath,
    default: Duration,
    what: &str,
) -> Result<Duration, ComposeError> {
    match value {
        None => Ok(default),
        Some(Dur(d)) if d.is_zero() => Err(cx.invalid(
            path,
            format!(
                "{what} must be more than zero: give a duration like `{}`",
                humantime::format_duration(default)
            ),
        )),
        Some(Dur(d)) => Ok(d),
    }
}
