//! The Docker adapter: the few Engine API calls the rollout needs, through
//! bollard, with errors sorted into what the user can act on.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use bollard::exec::StartExecResults;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, ExecConfig, HealthConfig, HealthStatusEnum, HostConfig,
    Mount, MountType, NetworkConnectRequest, NetworkCreateRequest, NetworkingConfig,
    RestartPolicy as DockerRestart, RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder, StartContainerOptions,
    StopContainerOptionsBuilder,
};
use futures_util::StreamExt;

use crate::config::AgentConfig;
use crate::spec::{MountSpec, RestartPolicy, ServiceSpec};

/// Labels on everything the agent creates.
pub const LABEL_INSTANCE: &str = "io.deploy-agent.instance";
pub const LABEL_PROJECT: &str = "io.deploy-agent.project";
pub const LABEL_SERVICE: &str = "io.deploy-agent.service";
pub const LABEL_RELEASE: &str = "io.deploy-agent.release";
pub const LABEL_REPLICA: &str = "io.deploy-agent.replica";

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "cannot reach the Docker Engine ({0}); is dockerd running and is /var/run/docker.sock readable by this user?"
    )]
    Unreachable(String),
    #[error(
        "registry refused the credentials for {image}: {message}; set [registries.\"{registry}\"] in the agent config or log in with `docker login {registry}`"
    )]
    RegistryAuth {
        image: String,
        registry: String,
        message: String,
    },
    #[error("image {image} not found in its registry: {message}; check the name and tag")]
    ImageNotFound { image: String, message: String },
    #[error("cannot pull {image}: {message}")]
    Pull { image: String, message: String },
    #[error("Docker refused to {action}: {message}")]
    Api { action: String, message: String },
}

impl DockerError {
    fn api(action: impl Into<String>, e: BollardError) -> DockerError {
        DockerError::Api {
            action: action.into(),
            message: error_message(&e),
        }
    }

    pub fn is_registry(&self) -> bool {
        matches!(
            self,
            DockerError::RegistryAuth { .. } | DockerError::ImageNotFound { .. }
        )
    }
}

fn error_message(e: &BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError { message, .. } => message.clone(),
        BollardError::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// An image after pulling: pinned to its digest.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// `repo@sha256:…`: what containers are created from, so that a rollback
    /// gets exactly these bytes, from the local image store.
    pub pinned: String,
    pub image_id: String,
    /// The image was not in the local store before this pull.
    pub pulled_by_agent: bool,
}

/// A container as the rollout sees it.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    pub name: String,
    pub running: bool,
    pub status: String,
    pub exit_code: i64,
    pub restart_count: i64,
    pub started_at: String,
    pub health: Option<String>,
    /// Address on the first network the container joined.
    pub ip: Option<IpAddr>,
    pub labels: HashMap<String, String>,
}

/// Everything needed to create one replica.
pub struct ContainerPlan<'a> {
    pub name: String,
    pub image: &'a str,
    pub service: &'a ServiceSpec,
    pub labels: HashMap<String, String>,
    /// Docker network names, first one primary.
    pub networks: Vec<String>,
    /// Named volume mapping: compose name → Docker volume name.
    pub volumes: &'a BTreeMap<String, String>,
}

#[derive(Clone)]
pub struct DockerClient {
    docker: Docker,
}

impl DockerClient {
    pub async fn connect() -> Result<DockerClient, DockerError> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| DockerError::Unreachable(e.to_string()))?
            .negotiate_version()
            .await
            .map_err(|e| DockerError::Unreachable(e.to_string()))?;
        Ok(DockerClient { docker })
    }

    /// Pull `image` and pin it to its digest. Nothing running is touched.
    pub async fn pull(&self, image: &str, cfg: &AgentConfig) -> Result<PulledImage, DockerError> {
        // Every image id present before the pull: an image the agent did not
        // bring onto this host (under any name) is never the agent's to prune.
        let before: std::collections::HashSet<String> = self
            .docker
            .list_images(Some(
                bollard::query_parameters::ListImagesOptionsBuilder::default()
                    .all(true)
                    .build(),
            ))
            .await
            .map_err(|e| DockerError::api("list images", e))?
            .into_iter()
            .map(|i| i.id)
            .collect();
        let (repo, tag) = split_reference(image);
        let registry = registry_host(&repo);
        let creds = credentials(&registry, cfg);
        let opts = CreateImageOptionsBuilder::default()
            .from_image(&repo)
            .tag(&tag)
            .build();
        let mut stream = self.docker.create_image(Some(opts), None, creds);
        while let Some(item) = stream.next().await {
            if let Err(e) = item {
                return Err(classify_pull_error(image, &registry, &e));
            }
        }
        let inspected = self
            .docker
            .inspect_image(image)
            .await
            .map_err(|e| DockerError::api(format!("inspect image {image}"), e))?;
        let image_id = inspected.id.clone().unwrap_or_default();
        let repo_digests = inspected.repo_digests.unwrap_or_default();
        let pinned = repo_digests
            .iter()
            .find(|d| d.split('@').next() == Some(repo.as_str()))
            .or_else(|| repo_digests.first())
            .cloned()
            .ok_or_else(|| DockerError::Pull {
                image: image.to_string(),
                message: "the registry gave no digest for it".into(),
            })?;
        let pulled_by_agent = !before.contains(&image_id);
        Ok(PulledImage {
            pinned,
            image_id,
            pulled_by_agent,
        })
    }

    /// Whether an image (by reference or id) is in the local store.
    pub async fn has_image(&self, image: &str) -> bool {
        self.docker.inspect_image(image).await.is_ok()
    }

    pub async fn remove_image(&self, image_id: &str) -> Result<(), DockerError> {
        match self
            .docker
            .remove_image(
                image_id,
                Some(RemoveImageOptionsBuilder::default().build()),
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(DockerError::api(format!("remove image {image_id}"), e)),
        }
    }

    pub async fn ensure_network(
        &self,
        name: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), DockerError> {
        if self.docker.inspect_network(name, None).await.is_ok() {
            return Ok(());
        }
        let req = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            labels: Some(labels.clone()),
            ..Default::default()
        };
        match self.docker.create_network(req).await {
            Ok(_) => Ok(()),
            // Another operation created it in the meantime.
            Err(_) if self.docker.inspect_network(name, None).await.is_ok() => Ok(()),
            Err(e) => Err(DockerError::api(format!("create network {name}"), e)),
        }
    }

    pub async fn ensure_volume(
        &self,
        name: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), DockerError> {
        if self.docker.inspect_volume(name).await.is_ok() {
            return Ok(());
        }
        let req = VolumeCreateRequest {
            name: Some(name.to_string()),
            labels: Some(labels.clone()),
            ..Default::default()
        };
        self.docker
            .create_volume(req)
            .await
            .map(|_| ())
            .map_err(|e| DockerError::api(format!("create volume {name}"), e))
    }

    /// Create and start one replica. Containers never publish ports: the
    /// proxy reaches them on their network address.
    pub async fn create_and_start(&self, plan: &ContainerPlan<'_>) -> Result<(), DockerError> {
        let s = plan.service;
        let env: Vec<String> = s
            .environment
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mounts: Vec<Mount> = s
            .mounts
            .iter()
            .map(|m| match m {
                MountSpec::Volume {
                    source,
                    target,
                    read_only,
                } => Mount {
                    typ: Some(MountType::VOLUME),
                    source: Some(plan.volumes.get(source).cloned().unwrap_or(source.clone())),
                    target: Some(target.clone()),
                    read_only: Some(*read_only),
                    ..Default::default()
                },
                MountSpec::Bind {
                    source,
                    target,
                    read_only,
                } => Mount {
                    typ: Some(MountType::BIND),
                    source: Some(source.clone()),
                    target: Some(target.clone()),
                    read_only: Some(*read_only),
                    ..Default::default()
                },
            })
            .collect();
        let healthcheck = s.healthcheck.as_ref().map(|h| HealthConfig {
            test: Some(h.test.clone()),
            interval: h.interval.map(nanos),
            timeout: h.timeout.map(nanos),
            retries: h.retries.map(i64::from),
            start_period: h.start_period.map(nanos),
            ..Default::default()
        });
        let restart = match s.restart {
            RestartPolicy::No => RestartPolicyNameEnum::NO,
            RestartPolicy::Always => RestartPolicyNameEnum::ALWAYS,
            RestartPolicy::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
            RestartPolicy::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
        };
        let aliases = Some(vec![s.name.clone()]);
        let primary = plan.networks.first().cloned();
        let body = ContainerCreateBody {
            image: Some(plan.image.to_string()),
            cmd: s.command.clone(),
            entrypoint: s.entrypoint.clone(),
            env: Some(env),
            labels: Some(plan.labels.clone()),
            user: s.user.clone(),
            working_dir: s.working_dir.clone(),
            healthcheck,
            exposed_ports: Some(
                s.ports
                    .iter()
                    .map(|p| format!("{}/tcp", p.target))
                    .collect(),
            ),
            stop_timeout: Some(i64::try_from(s.stop_grace_period.as_secs()).unwrap_or(i64::MAX)),
            host_config: Some(HostConfig {
                mounts: Some(mounts),
                restart_policy: Some(DockerRestart {
                    name: Some(restart),
                    maximum_retry_count: None,
                }),
                network_mode: primary.clone(),
                ..Default::default()
            }),
            networking_config: primary.as_ref().map(|net| NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    net.clone(),
                    EndpointSettings {
                        aliases: aliases.clone(),
                        ..Default::default()
                    },
                )])),
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::default()
            .name(&plan.name)
            .build();
        self.docker
            .create_container(Some(opts), body)
            .await
            .map_err(|e| DockerError::api(format!("create container {}", plan.name), e))?;
        for net in plan.networks.iter().skip(1) {
            let req = NetworkConnectRequest {
                container: plan.name.clone(),
                endpoint_config: Some(EndpointSettings {
                    aliases: aliases.clone(),
                    ..Default::default()
                }),
            };
            self.docker
                .connect_network(net, req)
                .await
                .map_err(|e| DockerError::api(format!("connect {} to {net}", plan.name), e))?;
        }
        self.start(&plan.name).await
    }

    pub async fn start(&self, name: &str) -> Result<(), DockerError> {
        self.docker
            .start_container(name, None::<StartContainerOptions>)
            .await
            .map_err(|e| DockerError::api(format!("start container {name}"), e))
    }

    pub async fn stop(&self, name: &str, grace: Duration) -> Result<(), DockerError> {
        let t = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        match self
            .docker
            .stop_container(
                name,
                Some(StopContainerOptionsBuilder::default().t(t).build()),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // 304: already stopped.
            Err(BollardError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(DockerError::api(format!("stop container {name}"), e)),
        }
    }

    pub async fn remove(&self, name: &str) -> Result<(), DockerError> {
        let opts = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.docker.remove_container(name, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(DockerError::api(format!("remove container {name}"), e)),
        }
    }

    /// `Ok(None)` when no such container exists.
    pub async fn inspect(&self, name: &str) -> Result<Option<ContainerInfo>, DockerError> {
        let c = match self.docker.inspect_container(name, None).await {
            Ok(c) => c,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(DockerError::api(format!("inspect container {name}"), e)),
        };
        let state = c.state.unwrap_or_default();
        let labels = c.config.and_then(|cfg| cfg.labels).unwrap_or_default();
        let ip = c
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|nets| {
                // Prefer the network the agent made primary (the project's first).
                let mut v: Vec<_> = nets.into_iter().collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v.into_iter()
                    .filter_map(|(_, ep)| ep.ip_address)
                    .find(|ip| !ip.is_empty())
            })
            .and_then(|ip| ip.parse().ok());
        Ok(Some(ContainerInfo {
            name: name.to_string(),
            running: state.running.unwrap_or(false),
            status: state
                .status
                .map(|s| format!("{s:?}").to_lowercase())
                .unwrap_or_default(),
            exit_code: state.exit_code.unwrap_or(0),
            restart_count: c.restart_count.unwrap_or(0),
            started_at: state.started_at.unwrap_or_default(),
            health: state.health.and_then(|h| h.status).map(|s| match s {
                HealthStatusEnum::HEALTHY => "healthy".to_string(),
                HealthStatusEnum::UNHEALTHY => "unhealthy".to_string(),
                HealthStatusEnum::STARTING => "starting".to_string(),
                other => format!("{other:?}").to_lowercase(),
            }),
            ip,
            labels,
        }))
    }

    /// Names of containers carrying all these labels.
    pub async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<String>, DockerError> {
        let filters: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let f = HashMap::from([("label", filters.iter().map(String::as_str).collect())]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&f)
            .build();
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| DockerError::api("list containers", e))?;
        Ok(list
            .into_iter()
            .filter_map(|c| c.names.and_then(|n| n.into_iter().next()))
            .map(|n| n.trim_start_matches('/').to_string())
            .collect())
    }

    /// Everything the container wrote to stdout and stderr.
    pub async fn logs(&self, name: &str) -> Result<String, DockerError> {
        let opts = bollard::query_parameters::LogsOptions {
            stdout: true,
            stderr: true,
            tail: "all".into(),
            ..Default::default()
        };
        let mut out = String::new();
        let mut stream = self.docker.logs(name, Some(opts));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| DockerError::api(format!("read logs of {name}"), e))?;
            out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
        }
        Ok(out)
    }

    pub async fn kill(&self, name: &str) -> Result<(), DockerError> {
        match self.docker.kill_container(name, None).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()), // not running any more
            Err(e) => Err(DockerError::api(format!("kill container {name}"), e)),
        }
    }

    /// Run `cmd` in the container; its exit code.
    pub async fn exec(&self, name: &str, cmd: &[String]) -> Result<i64, DockerError> {
        let created = self
            .docker
            .create_exec(
                name,
                ExecConfig {
                    cmd: Some(cmd.to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| DockerError::api(format!("exec in {name}"), e))?;
        if let StartExecResults::Attached { mut output, .. } = self
            .docker
            .start_exec(&created.id, None)
            .await
            .map_err(|e| DockerError::api(format!("exec in {name}"), e))?
        {
            while output.next().await.is_some() {}
        }
        let inspect = self
            .docker
            .inspect_exec(&created.id)
            .await
            .map_err(|e| DockerError::api(format!("exec in {name}"), e))?;
        Ok(inspect.exit_code.unwrap_or(-1))
    }
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// `127.0.0.1:5000/demo:v1` → (`127.0.0.1:5000/demo`, `v1`); no tag → `latest`.
/// A digest reference keeps the digest as its "tag" (`from_image` accepts it).
pub fn split_reference(image: &str) -> (String, String) {
    if let Some((repo, digest)) = image.split_once('@') {
        return (repo.to_string(), digest.to_string());
    }
    let last_slash = image.rfind('/').map(|i| i + 1).unwrap_or(0);
    match image[last_slash..].rfind(':') {
        Some(i) => (
            image[..last_slash + i].to_string(),
            image[last_slash + i + 1..].to_string(),
        ),
        None => (image.to_string(), "latest".to_string()),
    }
}

/// The registry a repository lives in, as Docker decides it.
pub fn registry_host(repo: &str) -> String {
    match repo.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_string()
        }
        _ => "docker.io".to_string(),
    }
}

/// Credentials for `registry`: the agent config first, then the Docker CLI's
/// `config.json` (`$DOCKER_CONFIG` or `~/.docker`).
fn credentials(registry: &str, cfg: &AgentConfig) -> Option<DockerCredentials> {
    if let Some(auth) = cfg.registries.get(registry) {
        return Some(DockerCredentials {
            username: Some(auth.username.clone()),
            password: Some(auth.password.clone()),
            serveraddress: Some(registry.to_string()),
            ..Default::default()
        });
    }
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".docker")))?;
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let auths = json.get("auths")?.as_object()?;
    let entry = auths.iter().find(|(k, _)| {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        k.split('/').next() == Some(registry)
    })?;
    let encoded = entry.1.get("auth")?.as_str()?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some(DockerCredentials {
        username: Some(user.to_string()),
        password: Some(pass.to_string()),
        serveraddress: Some(registry.to_string()),
        ..Default::default()
    })
}

fn classify_pull_error(image: &str, registry: &str, e: &BollardError) -> DockerError {
    let message = error_message(e);
    let lower = message.to_lowercase();
    if lower.contains("unauthorized")
        || lower.contains("authentication required")
        || lower.contains("no basic auth credentials")
        || lower.contains("denied")
    {
        DockerError::RegistryAuth {
            image: image.to_string(),
            registry: registry.to_string(),
            message,
        }
    } else if lower.contains("manifest unknown")
        || lower.contains("not found")
        || lower.contains("does not exist")
        || lower.contains("name unknown")
    {
        DockerError::ImageNotFound {
            image: image.to_string(),
            message,
        }
    } else {
        DockerError::Pull {
            image: image.to_string(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_repo_and_tag() {
        assert_eq!(
            split_reference("127.0.0.1:5000/demo:v1"),
            ("127.0.0.1:5000/demo".into(), "v1".into())
        );
        assert_eq!(
            split_reference("127.0.0.1:5000/demo"),
            ("127.0.0.1:5000/demo".into(), "latest".into())
        );
        assert_eq!(
            split_reference("demo@sha256:abc"),
            ("demo".into(), "sha256:abc".into())
        );
    }

    #[test]
    fn registry_hosts_follow_docker_rules() {
        assert_eq!(registry_host("127.0.0.1:5000/demo"), "127.0.0.1:5000");
        assert_eq!(registry_host("localhost/demo"), "localhost");
        assert_eq!(registry_host("library/nginx"), "docker.io");
        assert_eq!(registry_host("nginx"), "docker.io");
        assert_eq!(registry_host("ghcr.io/a/b"), "ghcr.io");
    }

    #[test]
    fn pull_errors_are_sorted() {
        let e = |m: &str| BollardError::DockerStreamError {
            error: m.to_string(),
        };
        assert!(matches!(
            classify_pull_error("i", "r", &e("Head \"…\": no basic auth credentials")),
            DockerError::RegistryAuth { .. }
        ));
        assert!(matches!(
            classify_pull_error("i", "r", &e("manifest for i not found: manifest unknown")),
            DockerError::ImageNotFound { .. }
        ));
        assert!(matches!(
            classify_pull_error("i", "r", &e("connection refused")),
            DockerError::Pull { .. }
        ));
    }
}
