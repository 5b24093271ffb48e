//! Raw compose types → spec types, with the checks that need more than one
//! key at a time: references between services, networks and volumes, port
//! conflicts, and the `depends_on` order.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::deploy::{self, Level};
use super::path::KeyPath;
use super::raw::{
    ListOrMap, OneOrMany, RawFile, RawHealthcheck, RawNetwork, RawService, RawVolume, RawXDeploy,
    Scalar,
};
use super::rollout::{self, ServiceRef};
use super::{ComposeError, Cx, OBJECT_NAME_RULE, envfile, is_object_name, mounts, order, ports};
use crate::spec::{
    DockerHealthcheck, MountSpec, NetworkSpec, PortSpec, RestartPolicy, RolloutSettings,
    ServiceSpec, VolumeSpec,
};

const DEFAULT_STOP_GRACE_PERIOD: Duration = Duration::from_secs(10);
const MAX_REPLICAS: u64 = 100;

/// The converted parts of a project.
pub(crate) struct Project {
    /// In `depends_on` order.
    pub services: Vec<ServiceSpec>,
    pub networks: Vec<NetworkSpec>,
    pub volumes: Vec<VolumeSpec>,
    /// From the top-level `x-deploy`.
    pub rollout: RolloutSettings,
}

/// Converts the whole file: services in `depends_on` order, then networks
/// and volumes.
pub(crate) fn convert_project(cx: &mut Cx<'_>, raw: RawFile) -> Result<Project, ComposeError> {
    let root = KeyPath::root();
    let networks = declared_networks(cx, raw.networks.map(|m| m.0).unwrap_or_default())?;
    let volumes = declared_volumes(cx, raw.volumes.map(|m| m.0).unwrap_or_default())?;

    let services_path = root.key("services");
    let raw_services = raw.services.map(|m| m.0).unwrap_or_default();
    if raw_services.is_empty() {
        return Err(cx.invalid(
            &services_path,
            "there are no services: define at least one under `services`, with its `image`",
        ));
    }

    let defaults_path = root.key("x-deploy");
    let defaults = raw.x_deploy.as_ref().map(|raw| Level {
        raw,
        path: &defaults_path,
        is_default: true,
    });

    let mut services = Vec::with_capacity(raw_services.len());
    for (name, raw_service) in raw_services {
        let path = services_path.key(&name);
        if !is_object_name(&name) {
            return Err(cx.invalid(
                &path,
                format!("`{name}` is not a valid service name: {OBJECT_NAME_RULE}"),
            ));
        }
        services.push(convert_service(
            cx,
            &name,
            &path,
            raw_service,
            defaults,
            &networks,
            &volumes,
        )?);
    }

    check_port_conflicts(cx, &services)?;
    // File order: the smoke checks' default service is the first one written
    // that publishes ports.
    let service_refs: Vec<ServiceRef<'_>> = services
        .iter()
        .map(|s| ServiceRef {
            name: &s.spec.name,
            has_ports: !s.spec.ports.is_empty(),
        })
        .collect();
    let rollout = rollout::settings(cx, raw.x_deploy.as_ref(), &defaults_path, &service_refs)?;
    let services = sort_services(cx, services)?;

    let mut network_specs: Vec<NetworkSpec> = Vec::new();
    let default_used = services
        .iter()
        .any(|s| s.spec.networks.iter().any(|n| n == "default"));
    let default_declared = networks.iter().any(|(name, _)| name == "default");
    if default_used && !default_declared {
        network_specs.push(NetworkSpec {
            name: "default".to_string(),
            external: false,
        });
    }
    network_specs.extend(networks.into_iter().map(|(_, spec)| spec));

    Ok(Project {
        services: services.into_iter().map(|s| s.spec).collect(),
        networks: network_specs,
        volumes,
        rollout,
    })
}

/// A converted service with what the project-wide checks need.
struct Converted {
    spec: ServiceSpec,
    /// Each port with the path of its entry.
    port_paths: Vec<KeyPath>,
    depends_on_path: KeyPath,
}

/// Top-level `networks`: compose name → spec. An external network with a
/// `name` is known to Docker by that name, and services' references to it
/// are rewritten to it, so that the spec needs only one name per network.
fn declared_networks(
    cx: &Cx<'_>,
    raw: Vec<(String, Option<RawNetwork>)>,
) -> Result<Vec<(String, NetworkSpec)>, ComposeError> {
    let mut out: Vec<(String, NetworkSpec)> = Vec::new();
    let section = KeyPath::root().key("networks");
    for (name, def) in raw {
        let path = section.key(&name);
        if !is_object_name(&name) {
            return Err(cx.invalid(
                &path,
                format!("`{name}` is not a valid network name: {OBJECT_NAME_RULE}"),
            ));
        }
        let external = def.as_ref().and_then(|d| d.external).is_some_and(|f| f.0);
        let docker_name = match def.and_then(|d| d.name) {
            Some(n) if external => {
                if !is_object_name(&n) {
                    return Err(cx.invalid(
                        &path.key("name"),
                        format!("`{n}` is not a valid network name: {OBJECT_NAME_RULE}"),
                    ));
                }
                n
            }
            Some(_) => {
                return Err(cx.invalid(
                    &path.key("name"),
                    "`name` is only supported with `external: true`: the agent names project networks itself; remove `name`, or add `external: true` to use an existing network",
                ));
            }
            None => name.clone(),
        };
        if let Some((other, _)) = out.iter().find(|(_, s)| s.name == docker_name) {
            return Err(cx.invalid(
                &path,
                format!(
                    "network `{docker_name}` is declared twice (also as `networks.{other}`): declare it once"
                ),
            ));
        }
        out.push((
            name,
            NetworkSpec {
                name: docker_name,
                external,
            },
        ));
    }
    Ok(out)
}

fn declared_volumes(
    cx: &Cx<'_>,
    raw: Vec<(String, Option<RawVolume>)>,
) -> Result<Vec<VolumeSpec>, ComposeError> {
    let section = KeyPath::root().key("volumes");
    raw.into_iter()
        .map(|(name, def)| {
            if !is_object_name(&name) {
                return Err(cx.invalid(
                    &section.key(&name),
                    format!("`{name}` is not a valid volume name: {OBJECT_NAME_RULE}"),
                ));
            }
            Ok(VolumeSpec {
                external: def.and_then(|d| d.external).is_some_and(|f| f.0),
                name,
            })
        })
        .collect()
}

fn convert_service(
    cx: &mut Cx<'_>,
    name: &str,
    path: &KeyPath,
    raw: RawService,
    defaults: Option<Level<'_>>,
    networks: &[(String, NetworkSpec)],
    volumes: &[VolumeSpec],
) -> Result<Converted, ComposeError> {
    let image = match raw.image {
        Some(image) if !image.trim().is_empty() => image,
        Some(_) => {
            return Err(cx.invalid(
                &path.key("image"),
                "the image is empty: give the image to run, like `registry.example.com/web:${RELEASE}`",
            ));
        }
        None => {
            return Err(cx.invalid(
                path,
                "`image` is missing: give the image to run, like `image: registry.example.com/web:${RELEASE}` (deploy-agent pulls images; it does not build them)",
            ));
        }
    };

    let command = raw
        .command
        .map(|c| words(cx, &path.key("command"), c))
        .transpose()?;
    let entrypoint = raw
        .entrypoint
        .map(|c| words(cx, &path.key("entrypoint"), c))
        .transpose()?;

    // env_file first, then environment over it, as compose does.
    let mut environment = BTreeMap::new();
    if let Some(files) = raw.env_file {
        let list = match files {
            OneOrMany::One(f) => vec![(path.key("env_file"), f)],
            OneOrMany::Many(fs) => fs
                .into_iter()
                .enumerate()
                .map(|(i, f)| (path.key("env_file").index(i), f))
                .collect(),
        };
        for (p, env_file) in list {
            environment.extend(read_env_file(cx, &p, &env_file)?);
        }
    }
    if let Some(env) = raw.environment {
        environment.extend(key_values(cx, &path.key("environment"), env, true)?);
    }

    let mut port_specs = Vec::new();
    let mut port_paths = Vec::new();
    for (i, entry) in raw.ports.unwrap_or_default().iter().enumerate() {
        let p = path.key("ports").index(i);
        port_specs.push(ports::parse_port(entry).map_err(|m| cx.invalid(&p, m))?);
        port_paths.push(p);
    }

    let mut mount_specs: Vec<MountSpec> = Vec::new();
    let is_declared = |v: &str| volumes.iter().any(|d| d.name == v);
    for (i, entry) in raw.volumes.unwrap_or_default().iter().enumerate() {
        let p = path.key("volumes").index(i);
        let mount =
            mounts::parse_mount(entry, cx.base_dir, &is_declared).map_err(|m| cx.invalid(&p, m))?;
        let target = mount_target(&mount);
        if mount_specs.iter().any(|m| mount_target(m) == target) {
            return Err(cx.invalid(
                &p,
                format!(
                    "`{target}` is mounted twice in this service: mount each container path once"
                ),
            ));
        }
        mount_specs.push(mount);
    }

    let service_networks = service_networks(cx, &path.key("networks"), raw.networks, networks)?;

    let labels = match raw.labels {
        Some(l) => key_values(cx, &path.key("labels"), l, false)?,
        None => BTreeMap::new(),
    };
    // The agent finds its containers by these labels; a user label there
    // would make it adopt or lose containers.
    if let Some(reserved) = labels.keys().find(|k| k.starts_with("io.deploy-agent.")) {
        return Err(cx.invalid(
            &path.key("labels"),
            format!("label `{reserved}` is in the io.deploy-agent. namespace, which the agent reserves for itself; rename it"),
        ));
    }

    let healthcheck = raw
        .healthcheck
        .map(|h| healthcheck(cx, &path.key("healthcheck"), h))
        .transpose()?
        .flatten();

    let depends_on_path = path.key("depends_on");
    let depends_on = match raw.depends_on {
        None => Vec::new(),
        Some(ListOrMap::List(names)) => names,
        Some(ListOrMap::Map(entries)) => entries.into_iter().map(|(n, _)| n).collect(),
    };
    let mut unique_deps: Vec<String> = Vec::new();
    for d in depends_on {
        if !unique_deps.contains(&d) {
            unique_deps.push(d);
        }
    }

    let restart = match raw.restart {
        None => RestartPolicy::No,
        Some(r) => restart_policy(cx, &path.key("restart"), &r)?,
    };

    let user = match raw.user {
        Some(Scalar(u)) if u.trim().is_empty() => {
            return Err(cx.invalid(
                &path.key("user"),
                "the user is empty: give a user name or uid, or remove `user`",
            ));
        }
        other => other.map(|s| s.0),
    };
    if let Some(dir) = &raw.working_dir
        && !dir.starts_with('/')
    {
        return Err(cx.invalid(
            &path.key("working_dir"),
            format!("`{dir}` is not an absolute path: the working directory must start with `/`"),
        ));
    }

    let replicas = match raw.deploy.and_then(|d| d.replicas) {
        None => 1,
        Some(n) => u32::try_from(n.0)
            .ok()
            .filter(|r| (1..=MAX_REPLICAS).contains(&u64::from(*r)))
            .ok_or_else(|| {
                cx.invalid(
                    &path.key("deploy").key("replicas"),
                    format!("`{}` replicas: give 1 to {MAX_REPLICAS}", n.0),
                )
            })?,
    };

    let stop_grace_period = raw
        .stop_grace_period
        .map(|d| d.0)
        .unwrap_or(DEFAULT_STOP_GRACE_PERIOD);

    let own_path = path.key("x-deploy");
    if let Some(own) = &raw.x_deploy {
        rollout::reject_in_service(cx, own, &own_path)?;
    }
    let own = raw.x_deploy.as_ref().map(|raw: &RawXDeploy| Level {
        raw,
        path: &own_path,
        is_default: false,
    });
    let deploy = deploy::settings(
        cx,
        defaults,
        own,
        &deploy::Service {
            name,
            ports: &port_specs,
            healthcheck: healthcheck.as_ref(),
            replicas,
        },
    )?;

    Ok(Converted {
        spec: ServiceSpec {
            name: name.to_string(),
            image,
            command,
            entrypoint,
            environment,
            ports: port_specs,
            mounts: mount_specs,
            networks: service_networks,
            labels,
            healthcheck,
            depends_on: unique_deps,
            restart,
            user,
            working_dir: raw.working_dir,
            replicas,
            stop_grace_period,
            deploy,
        },
        port_paths,
        depends_on_path,
    })
}

fn mount_target(m: &MountSpec) -> &str {
    match m {
        MountSpec::Volume { target, .. } | MountSpec::Bind { target, .. } => target,
    }
}

/// `command` / `entrypoint`: a string is split like a shell would (without
/// running one), a list is taken as is.
pub(crate) fn words(
    cx: &Cx<'_>,
    path: &KeyPath,
    value: OneOrMany,
) -> Result<Vec<String>, ComposeError> {
    match value {
        OneOrMany::Many(items) => Ok(items),
        OneOrMany::One(s) => shell_words::split(&s).map_err(|e| {
            cx.invalid(
                path,
                format!(
                    "cannot split `{s}` into words ({e}): fix the quoting, or write it as a list"
                ),
            )
        }),
    }
}

/// `environment` and `labels`: a list of `K=V` or a mapping. An environment
/// variable needs a value (compose would take it from the shell running
/// compose; the agent has no such shell, and does not read its own
/// environment); a label may be empty.
fn key_values(
    cx: &Cx<'_>,
    path: &KeyPath,
    value: ListOrMap<Option<Scalar>>,
    is_env: bool,
) -> Result<BTreeMap<String, String>, ComposeError> {
    let mut out = BTreeMap::new();
    let what = if is_env { "variable" } else { "label" };
    let entries: Vec<(KeyPath, String, Option<String>)> = match value {
        ListOrMap::List(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let (k, v) = match item.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (item, None),
                };
                (path.index(i), k, v)
            })
            .collect(),
        ListOrMap::Map(entries) => entries
            .into_iter()
            .map(|(k, v)| (path.key(&k), k, v.map(|s| s.0)))
            .collect(),
    };
    for (p, key, value) in entries {
        if key.trim().is_empty() || key.contains(char::is_whitespace) {
            return Err(cx.invalid(
                &p,
                format!("`{key}` is not a valid {what} name: use a name without spaces, like `NAME=value`"),
            ));
        }
        let value = match value {
            Some(v) => v,
            None if is_env => {
                return Err(cx.invalid(
                    &p,
                    format!(
                        "`{key}` has no value: give it one (`{key}=value`, or `{key}: value` in a mapping, or `{key}=${{{key}}}` with `--var {key}=value`); the agent does not pass its own environment through"
                    ),
                ));
            }
            None => String::new(),
        };
        if out.insert(key.clone(), value).is_some() {
            return Err(cx.invalid(&p, format!("{what} `{key}` is set twice: keep one")));
        }
    }
    Ok(out)
}

/// Reads and parses one `env_file`, keeping its text for the release
/// snapshot.
///
/// The path resolves against the compose file's directory and may leave it
/// (`../shared.env`, `/etc/app/prod.env`), as in compose. Confining it would
/// protect nothing: whoever may deploy can already bind-mount any host path
/// into a container. What matters is that a file that is not an env file
/// gives nothing away: the file must be a regular file of at most
/// [`envfile::MAX_BYTES`], and no error quotes its contents (see
/// [`envfile::read`] and [`envfile::parse`]).
fn read_env_file(
    cx: &mut Cx<'_>,
    path: &KeyPath,
    env_file: &str,
) -> Result<Vec<(String, String)>, ComposeError> {
    let env_err = |message: String| ComposeError::EnvFile {
        file: cx.file.to_string(),
        path: path.to_string(),
        env_file: env_file.to_string(),
        message,
    };
    if env_file.trim().is_empty() {
        return Err(env_err(
            "is an empty path: give the file's path, relative to the compose file".to_string(),
        ));
    }
    let full = cx.base_dir.join(env_file);
    let text = envfile::read(&full).map_err(env_err)?;
    let pairs = envfile::parse(&text)
        .map_err(|(line, message)| env_err(format!("line {line}: {message}")))?;
    cx.env_files.insert(env_file.to_string(), text);
    Ok(pairs)
}

/// Service `networks`: names that must be declared at the top level, except
/// `default`. Absent means `["default"]`, as in compose.
fn service_networks(
    cx: &Cx<'_>,
    path: &KeyPath,
    value: Option<ListOrMap<Option<super::raw::RawServiceNetwork>>>,
    declared: &[(String, NetworkSpec)],
) -> Result<Vec<String>, ComposeError> {
    let entries: Vec<(KeyPath, String)> = match value {
        None => return Ok(vec![effective_network("default", declared)]),
        Some(ListOrMap::List(names)) => names
            .into_iter()
            .enumerate()
            .map(|(i, n)| (path.index(i), n))
            .collect(),
        Some(ListOrMap::Map(entries)) => entries
            .into_iter()
            .map(|(n, _)| (path.key(&n), n))
            .collect(),
    };
    if entries.is_empty() {
        return Err(cx.invalid(
            path,
            "the list is empty: give at least one network, or remove `networks` to use the project's default network",
        ));
    }
    let mut out = Vec::new();
    for (p, name) in entries {
        if name != "default" && !declared.iter().any(|(n, _)| *n == name) {
            return Err(cx.invalid(
                &p,
                format!(
                    "network `{name}` is not declared: add `{name}:` under the top-level `networks`"
                ),
            ));
        }
        let effective = effective_network(&name, declared);
        if !out.contains(&effective) {
            out.push(effective);
        }
    }
    Ok(out)
}

fn effective_network(name: &str, declared: &[(String, NetworkSpec)]) -> String {
    declared
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, spec)| spec.name.clone())
        .unwrap_or_else(|| name.to_string())
}

/// The compose `healthcheck`, as Docker wants it; `None` when disabled.
fn healthcheck(
    cx: &Cx<'_>,
    path: &KeyPath,
    raw: RawHealthcheck,
) -> Result<Option<DockerHealthcheck>, ComposeError> {
    if raw.disable.is_some_and(|f| f.0) {
        return Ok(None);
    }
    let test_path = path.key("test");
    let test = match raw.test {
        None => {
            return Err(cx.invalid(
                path,
                "`test` is missing: give the check command, like `test: curl -fsS http://localhost/health`, or `disable: true`",
            ));
        }
        Some(OneOrMany::One(s)) => {
            if s.trim().is_empty() {
                return Err(cx.invalid(
                    &test_path,
                    "the test is empty: give the command to run, or `disable: true`",
                ));
            }
            vec!["CMD-SHELL".to_string(), s]
        }
        Some(OneOrMany::Many(items)) => {
            let usage = "start the list with `CMD` (then the program and its arguments), `CMD-SHELL` (then one shell command) or `NONE`";
            match items.first().map(String::as_str) {
                Some("NONE") => return Ok(None),
                Some("CMD") if items.len() >= 2 => items,
                Some("CMD-SHELL") if items.len() == 2 => items,
                Some("CMD") => {
                    return Err(cx.invalid(
                        &test_path,
                        format!("`CMD` needs a program after it: {usage}"),
                    ));
                }
                Some("CMD-SHELL") => {
                    return Err(cx.invalid(
                        &test_path,
                        format!("`CMD-SHELL` takes exactly one shell command after it: {usage}"),
                    ));
                }
                Some(other) => {
                    return Err(cx.invalid(
                        &test_path,
                        format!("`{other}` cannot start a test: {usage}"),
                    ));
                }
                None => {
                    return Err(cx.invalid(&test_path, format!("the test is empty: {usage}")));
                }
            }
        }
    };
    let nonzero = |d: Option<super::raw::Dur>, key: &str| {
        match d {
        Some(d) if d.0 < Duration::from_millis(1) => Err(cx.invalid(
            &path.key(key),
            format!("the {key} must be at least 1ms: give a duration like `10s`, or remove it for Docker's default"),
        )),
        other => Ok(other.map(|d| d.0)),
    }
    };
    let retries = raw
        .retries
        .map(|n| {
            u32::try_from(n.0).map_err(|_| {
                cx.invalid(
                    &path.key("retries"),
                    format!("`{}` is too many retries: give a small number, like 3", n.0),
                )
            })
        })
        .transpose()?;
    Ok(Some(DockerHealthcheck {
        test,
        interval: nonzero(raw.interval, "interval")?,
        timeout: nonzero(raw.timeout, "timeout")?,
        retries,
        start_period: raw.start_period.map(|d| d.0),
    }))
}

fn restart_policy(cx: &Cx<'_>, path: &KeyPath, value: &str) -> Result<RestartPolicy, ComposeError> {
    match value.trim() {
        "no" => Ok(RestartPolicy::No),
        "always" => Ok(RestartPolicy::Always),
        "on-failure" => Ok(RestartPolicy::OnFailure),
        "unless-stopped" => Ok(RestartPolicy::UnlessStopped),
        v if v.starts_with("on-failure:") => Err(cx.invalid(
            path,
            format!("`{v}`: a maximum retry count is not supported: write `on-failure`"),
        )),
        v => Err(cx.invalid(
            path,
            format!("`{v}` is not a restart policy: use `\"no\"`, `always`, `on-failure` or `unless-stopped`"),
        )),
    }
}

/// Two entries that need the same host socket cannot both be published by
/// the proxy, whichever services they belong to.
fn check_port_conflicts(cx: &Cx<'_>, services: &[Converted]) -> Result<(), ComposeError> {
    let all: Vec<(&PortSpec, &KeyPath)> = services
        .iter()
        .flat_map(|s| s.spec.ports.iter().zip(&s.port_paths))
        .collect();
    for (i, (port, path)) in all.iter().enumerate() {
        if let Some((_, first)) = all[..i]
            .iter()
            .find(|(other, _)| ports::conflicts(other, port))
        {
            return Err(cx.invalid(
                path,
                format!(
                    "host port {} on {} is already published by `{first}`: publish each host port once (the proxy listens on it for one service)",
                    port.host_port, port.host_ip
                ),
            ));
        }
    }
    Ok(())
}

/// Services in `depends_on` order, checking that dependencies exist.
fn sort_services(cx: &Cx<'_>, services: Vec<Converted>) -> Result<Vec<Converted>, ComposeError> {
    let names: Vec<String> = services.iter().map(|s| s.spec.name.clone()).collect();
    let known: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    let mut deps = Vec::with_capacity(services.len());
    for s in &services {
        let mut indexes = Vec::new();
        for d in &s.spec.depends_on {
            if !known.contains(d.as_str()) {
                return Err(cx.invalid(
                    &s.depends_on_path,
                    format!(
                        "service `{d}` does not exist: fix the name (services: {})",
                        names.join(", ")
                    ),
                ));
            }
            indexes.extend(names.iter().position(|n| n == d));
        }
        deps.push(indexes);
    }
    let order = order::order(&deps).map_err(|cycle| ComposeError::DependencyCycle {
        file: cx.file.to_string(),
        path: cycle
            .first()
            .map(|&i| services[i].depends_on_path.to_string())
            .unwrap_or_default(),
        cycle: cycle.iter().map(|&i| names[i].clone()).collect(),
    })?;
    let mut slots: Vec<Option<Converted>> = services.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}
