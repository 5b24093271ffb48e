//! Pulling a release's images: the controller's pre-pull (the `pull` operation)
//! and the engine's deploy share [`pull_service`], so that what was
//! pre-pulled is exactly what is deployed.

use std::collections::BTreeMap;
use std::time::Instant;

use super::{Engine, OpError};
use crate::config::AgentConfig;
use crate::docker::{DockerClient, PulledImage, split_reference};
use crate::wire::{Outcome, PullRequest, PullResult};

/// Pulls the image of service `service`: `image` as the compose file names
/// it, or, when the request pinned one, exactly `pinned` (`repo@sha256:…`,
/// promotion: no tag is resolved). A pinned reference must name the same
/// repository as the compose file, and the registry must give back that
/// very digest.
pub async fn pull_service(
    docker: &DockerClient,
    config: &AgentConfig,
    service: &str,
    image: &str,
    pinned: Option<&String>,
) -> Result<PulledImage, OpError> {
    let Some(wanted) = pinned else {
        return Ok(docker.pull(image, config).await?);
    };
    let (repo, _) = split_reference(image);
    let Some((wanted_repo, digest)) = wanted.split_once('@') else {
        return Err(OpError::new(
            Outcome::ConfigError,
            format!(
                "the pinned image of service {service}, {wanted:?}, is not a digest reference (repo@sha256:…)"
            ),
        ));
    };
    if wanted_repo != repo || !digest.starts_with("sha256:") {
        return Err(OpError::new(
            Outcome::ConfigError,
            format!(
                "the pinned image of service {service}, {wanted}, is not from the repository the compose file names ({repo}); \
                 promote only between environments that deploy the same images"
            ),
        ));
    }
    let pulled = docker.pull(wanted, config).await?;
    if pulled.pinned != *wanted {
        return Err(OpError::new(
            Outcome::RegistryError,
            format!(
                "pulling {wanted} for service {service} gave {} instead; the registry does not serve that digest",
                pulled.pinned
            ),
        ));
    }
    Ok(pulled)
}

/// `POST /v1/pull`: load the compose file as a deploy would, pull and pin
/// every image, record them as the agent's; nothing running is touched.
pub async fn pre_pull(engine: &Engine, req: &PullRequest) -> Result<PullResult, OpError> {
    let started = Instant::now();
    let spec = crate::engine::load_spec(
        &req.compose_path,
        &req.compose_text,
        &req.project,
        &req.release,
        &req.vars,
    )?;
    if let Some(unknown) = req
        .pinned
        .keys()
        .find(|s| !spec.services.iter().any(|x| &x.name == *s))
    {
        return Err(OpError::new(
            Outcome::ConfigError,
            format!(
                "a pinned image names service {unknown}, which the compose file of project {} does not have",
                req.project
            ),
        ));
    }
    let mut by_image: BTreeMap<String, String> = BTreeMap::new();
    let mut digests = BTreeMap::new();
    for svc in &spec.services {
        let key = match req.pinned.get(&svc.name) {
            Some(p) => p.clone(),
            None => svc.image.clone(),
        };
        if let Some(done) = by_image.get(&key) {
            digests.insert(svc.name.clone(), done.clone());
            continue;
        }
        let pulled = pull_service(
            &engine.docker,
            &engine.config,
            &svc.name,
            &svc.image,
            req.pinned.get(&svc.name),
        )
        .await?;
        engine
            .store
            .record_image(&pulled.image_id, &pulled.pinned, pulled.pulled_by_agent)?;
        by_image.insert(key, pulled.pinned.clone());
        digests.insert(svc.name.clone(), pulled.pinned);
    }
    let serving = engine.store.serving(&req.project)?.and_then(|s| s.current);
    Ok(PullResult {
        host: crate::config::hostname(),
        project: req.project.clone(),
        release: req.release.clone(),
        digests,
        serving,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}
