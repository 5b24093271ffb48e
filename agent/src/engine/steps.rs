//! Taking one rollout step against Docker and the proxy.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use futures_util::future::join_all;

use super::{Ctx, Engine, emit};
use crate::docker::{
    ContainerPlan, LABEL_INSTANCE, LABEL_PROJECT, LABEL_RELEASE, LABEL_REPLICA, LABEL_SERVICE,
};
use crate::proxy::protocol::{Backend, Route};
use crate::rollout::{FailureKind, Observation, Rollout, Step};
use crate::spec::{ProjectSpec, ServiceSpec};
use crate::store::{AuditEntry, ReleaseState};

type StepResult = Result<(), (FailureKind, String)>;

fn error(e: impl std::fmt::Display) -> (FailureKind, String) {
    (FailureKind::Error, e.to_string())
}

impl Engine {
    pub(crate) async fn take(&self, step: &Step, ctx: &Ctx<'_>, rollout: &Rollout) -> Observation {
        let release = &ctx.target.release;
        let say = |msg: &str| {
            emit(
                ctx.events,
                ctx.project,
                release,
                step.name(),
                step.service(),
                msg,
            )
        };
        let result: StepResult = match step {
            Step::StartNew { service, replicas } => {
                let svc = service_of(ctx.target, service);
                say(&format!(
                    "starting {} replica(s) {:?} of {release}",
                    service, replicas
                ));
                self.start_replicas(ctx.project, ctx.target, svc, replicas)
                    .await
            }
            Step::AwaitHealthy { service, replicas } => {
                let svc = service_of(ctx.target, service);
                say(&format!(
                    "health gate: {}",
                    svc.map(|s| s.deploy.health.probe.describe())
                        .unwrap_or_default()
                ));
                self.gate_replicas(ctx.project, ctx.target, svc, replicas, ctx)
                    .await
            }
            Step::Route { service, new, old } => {
                let previous = ctx
                    .old
                    .filter(|o| service_of(o, service).is_some())
                    .map(|o| o.release.as_str());
                say(&switch_message(service, release, new, previous, old));
                // The previous release stays warm until the commit: list it
                // as standby once the target takes all traffic.
                self.route(ctx, service, new, old, None, old.is_empty())
                    .await
            }
            Step::Drain { service, old } => {
                let svc = ctx.old.and_then(|o| service_of(o, service));
                self.drain(ctx.project, ctx.old, svc, old, ctx).await
            }
            Step::Commit => self
                .commit(ctx)
                .map(|()| say(&format!("{release} is now the serving release"))),
            Step::Hook { hook } => self.hook_step(ctx, *hook).await,
            Step::Smoke { service, phase } => self.smoke_step(ctx, service, *phase).await,
            Step::Canary { service, percent } => {
                say(&format!(
                    "canary: {percent}% of {service}'s requests to {release}"
                ));
                let n = service_of(ctx.target, service)
                    .map(|s| s.replicas)
                    .unwrap_or(0);
                let old_n = ctx
                    .old
                    .and_then(|o| service_of(o, service))
                    .map(|s| s.replicas)
                    .unwrap_or(0);
                self.route(
                    ctx,
                    service,
                    &(0..n).collect::<Vec<_>>(),
                    &(0..old_n).collect::<Vec<_>>(),
                    Some(*percent),
                    false,
                )
                .await
            }
            Step::CanaryHold { service, percent } => match service_of(ctx.target, service) {
                Some(svc) => {
                    self.watch(
                        ctx,
                        &[svc],
                        ctx.target.rollout.canary_hold,
                        &format!("canary {percent}%"),
                    )
                    .await
                }
                None => Ok(()),
            },
            Step::Observe => {
                let window = rollout
                    .plan()
                    .observe_window_ms
                    .map(std::time::Duration::from_millis)
                    .unwrap_or_else(|| self.observe_settings(ctx).window);
                let services: Vec<&ServiceSpec> = ctx.target.services.iter().collect();
                self.watch(ctx, &services, window, "observation window")
                    .await
            }
            Step::MigrateDown => self.migrate_down_step(ctx).await,
            Step::StopOld { service } => {
                match (ctx.old, ctx.old.and_then(|o| service_of(o, service))) {
                    (Some(old), Some(svc)) => {
                        let all: Vec<u32> = (0..svc.replicas).collect();
                        say(&format!(
                            "stopping {} of {} (kept for rollback)",
                            service, old.release
                        ));
                        // Take the standby entries out before they stop.
                        let n = service_of(ctx.target, service)
                            .map(|s| s.replicas)
                            .unwrap_or(0);
                        let unlisted = if n > 0 {
                            self.route(ctx, service, &(0..n).collect::<Vec<_>>(), &[], None, false)
                                .await
                        } else {
                            Ok(())
                        };
                        match unlisted {
                            Ok(()) => self.stop_replicas(ctx.project, old, svc, &all).await,
                            Err(e) => Err(e),
                        }
                    }
                    _ => Ok(()),
                }
            }
            Step::Prune => self.prune(ctx.project, ctx.who).await.map_err(error),
            Step::StartOld { service } => {
                match (ctx.old, ctx.old.and_then(|o| service_of(o, service))) {
                    (Some(old), Some(svc)) => {
                        let all: Vec<u32> = (0..svc.replicas).collect();
                        self.start_replicas(ctx.project, old, Some(svc), &all).await
                    }
                    _ => Ok(()),
                }
            }
            Step::AwaitHealthyOld { service } => {
                match (ctx.old, ctx.old.and_then(|o| service_of(o, service))) {
                    (Some(old), Some(svc)) => {
                        let all: Vec<u32> = (0..svc.replicas).collect();
                        self.gate_replicas(ctx.project, old, Some(svc), &all, ctx)
                            .await
                    }
                    _ => Ok(()),
                }
            }
            Step::RouteOld { service } => {
                let old_n = ctx
                    .old
                    .and_then(|o| service_of(o, service))
                    .map(|s| s.replicas)
                    .unwrap_or(0);
                let moved = rollout.traffic_moved(service);
                say(&switch_back_message(service, release, moved, ctx.previous));
                let routed = self
                    .route(
                        ctx,
                        service,
                        &[],
                        &(0..old_n).collect::<Vec<_>>(),
                        None,
                        false,
                    )
                    .await;
                if moved
                    && routed.is_ok()
                    && let Ok(mut r) = ctx.report.lock()
                    && let Some(at) = r.decided_at
                {
                    r.switch_back_ms =
                        Some(u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX));
                }
                routed
            }
            Step::DrainNew { service } => {
                let svc = service_of(ctx.target, service);
                let all: Vec<u32> = (0..svc.map(|s| s.replicas).unwrap_or(0)).collect();
                self.drain(ctx.project, Some(ctx.target), svc, &all, ctx)
                    .await
            }
            Step::RetireNew { service, remove } => {
                let Some(svc) = service_of(ctx.target, service) else {
                    return Observation::Succeeded;
                };
                let all: Vec<u32> = (0..svc.replicas).collect();
                if *remove {
                    say(&format!("removing {service} containers of {release}"));
                    self.remove_replicas(ctx.project, ctx.target, svc, &all)
                        .await
                } else {
                    self.stop_replicas(ctx.project, ctx.target, svc, &all).await
                }
            }
        };
        match result {
            Ok(()) => Observation::Succeeded,
            Err((kind, reason)) => Observation::Failed { kind, reason },
        }
    }

    /// Create (or start, if they exist) replicas of `spec`'s service.
    pub(crate) async fn start_replicas(
        &self,
        project: &str,
        spec: &ProjectSpec,
        svc: Option<&ServiceSpec>,
        replicas: &[u32],
    ) -> StepResult {
        let Some(svc) = svc else { return Ok(()) };
        let (networks, volumes) = self.resources(project, spec, svc).await?;
        for &i in replicas {
            let name = self.container_name(project, &svc.name, &spec.release, i);
            match self.docker.inspect(&name).await.map_err(error)? {
                Some(c) if c.running => {}
                Some(_) => self.docker.start(&name).await.map_err(error)?,
                None => {
                    let mut labels = svc
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect::<HashMap<_, _>>();
                    labels.extend(self.labels(project, Some((&svc.name, &spec.release, i))));
                    let plan = ContainerPlan {
                        name: name.clone(),
                        image: &svc.image,
                        service: svc,
                        labels,
                        networks: networks.clone(),
                        volumes: &volumes,
                    };
                    self.docker.create_and_start(&plan).await.map_err(error)?;
                }
            }
        }
        Ok(())
    }

    /// Create the networks and volumes `svc` uses; their Docker names.
    pub(crate) async fn resources(
        &self,
        project: &str,
        spec: &ProjectSpec,
        svc: &ServiceSpec,
    ) -> Result<(Vec<String>, BTreeMap<String, String>), (FailureKind, String)> {
        let labels = self.labels(project, None);
        let mut networks = Vec::new();
        for net in &svc.networks {
            let external = spec.networks.iter().any(|n| &n.name == net && n.external);
            let name = if external {
                net.clone()
            } else {
                format!("{}-{project}-{net}", self.config.instance)
            };
            if !external {
                self.docker
                    .ensure_network(&name, &labels)
                    .await
                    .map_err(error)?;
            }
            networks.push(name);
        }
        let mut volumes = BTreeMap::new();
        for v in &spec.volumes {
            let name = if v.external {
                v.name.clone()
            } else {
                format!("{}-{project}-{}", self.config.instance, v.name)
            };
            if !v.external {
                self.docker
                    .ensure_volume(&name, &labels)
                    .await
                    .map_err(error)?;
            }
            volumes.insert(v.name.clone(), name);
        }
        Ok((networks, volumes))
    }

    pub(crate) fn labels(
        &self,
        project: &str,
        replica: Option<(&str, &str, u32)>,
    ) -> HashMap<String, String> {
        let mut l = HashMap::from([
            (LABEL_INSTANCE.to_string(), self.config.instance.clone()),
            (LABEL_PROJECT.to_string(), project.to_string()),
        ]);
        if let Some((service, release, i)) = replica {
            l.insert(LABEL_SERVICE.into(), service.into());
            l.insert(LABEL_RELEASE.into(), release.into());
            l.insert(LABEL_REPLICA.into(), i.to_string());
        }
        l
    }

    async fn gate_replicas(
        &self,
        project: &str,
        spec: &ProjectSpec,
        svc: Option<&ServiceSpec>,
        replicas: &[u32],
        ctx: &Ctx<'_>,
    ) -> StepResult {
        let Some(svc) = svc else { return Ok(()) };
        let gates = replicas.iter().map(|&i| {
            let name = self.container_name(project, &svc.name, &spec.release, i);
            async move { (name.clone(), self.gate(&name, svc).await) }
        });
        let mut failures = Vec::new();
        for (name, outcome) in join_all(gates).await {
            match outcome {
                Ok(took) => emit(
                    ctx.events,
                    project,
                    &ctx.target.release,
                    "healthy",
                    Some(&svc.name),
                    &format!("{name} healthy after {:.1}s", took.as_secs_f64()),
                ),
                Err(why) => failures.push(format!("{name}: {why}")),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            ctx.gate_failed(format!(
                "{}: {}",
                svc.name,
                svc.deploy.health.probe.describe()
            ));
            Err((
                FailureKind::HealthGate,
                format!(
                    "health gate ({}) failed: {}",
                    svc.deploy.health.probe.describe(),
                    failures.join("; ")
                ),
            ))
        }
    }

    /// Point every published port of `service` at the given replicas of the
    /// target (`new`) and of the serving release (`old`), atomically per port.
    /// When one release leaves the route entirely, the ports only it
    /// published stop being published; both empty: stop publishing.
    ///
    /// `percent`: a canary split, the target's replicas getting that share.
    async fn route(
        &self,
        ctx: &Ctx<'_>,
        service: &str,
        new: &[u32],
        old: &[u32],
        percent: Option<u8>,
        standby: bool,
    ) -> StepResult {
        // Weights that give the target `percent` of requests overall.
        let (w_new, w_old) = match percent {
            Some(p) => (
                u32::from(p) * (old.len() as u32).max(1),
                u32::from(100 - p.min(100)) * (new.len() as u32).max(1),
            ),
            None => (1, 1),
        };
        let tsvc = service_of(ctx.target, service);
        let osvc = ctx.old.and_then(|o| service_of(o, service));
        // Listeners are those of the release that serves after this step.
        let serving_svc = if !new.is_empty() {
            tsvc
        } else if !old.is_empty() {
            osvc
        } else {
            None
        };
        let mut binds = Vec::new();
        if let Some(svc) = serving_svc {
            for port in &svc.ports {
                let bind = SocketAddr::new(port.host_ip, port.host_port);
                let mut backends = Vec::new();
                if let Some(tp) = tsvc.and_then(|t| target_port(t, bind)) {
                    for &i in new {
                        let mut b = self
                            .backend(ctx.project, &ctx.target.release, service, i, tp)
                            .await?;
                        b.weight = w_new;
                        backends.push(b);
                    }
                }
                if let (Some(op), Some(old_spec)) =
                    (osvc.and_then(|o| target_port(o, bind)), ctx.old)
                {
                    for &i in old {
                        let mut b = self
                            .backend(ctx.project, &old_spec.release, service, i, op)
                            .await?;
                        b.weight = w_old;
                        backends.push(b);
                    }
                }
                if standby
                    && let (Some(op), Some(old_spec), Some(o)) =
                        (osvc.and_then(|o| target_port(o, bind)), ctx.old, osvc)
                {
                    for i in 0..o.replicas {
                        // Only replicas that still run can stand by.
                        if let Ok(mut b) = self
                            .backend(ctx.project, &old_spec.release, service, i, op)
                            .await
                        {
                            b.weight = 0;
                            backends.push(b);
                        }
                    }
                }
                let route = Route {
                    bind,
                    project: ctx.project.to_string(),
                    service: service.to_string(),
                    mode: svc.deploy.proxy,
                    backends,
                };
                self.proxy.set_route(route).await.map_err(error)?;
                binds.push(bind);
            }
        }
        if new.is_empty() || old.is_empty() {
            for svc in [tsvc, osvc].into_iter().flatten() {
                for p in &svc.ports {
                    let b = SocketAddr::new(p.host_ip, p.host_port);
                    if !binds.contains(&b) {
                        binds.push(b);
                        self.proxy.remove_route(b).await.map_err(error)?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn backend(
        &self,
        project: &str,
        release: &str,
        service: &str,
        replica: u32,
        port: u16,
    ) -> Result<Backend, (FailureKind, String)> {
        let name = self.container_name(project, service, release, replica);
        let info = self
            .docker
            .inspect(&name)
            .await
            .map_err(error)?
            .ok_or_else(|| error(format!("container {name} is gone")))?;
        let ip = info.ip.filter(|_| info.running).ok_or_else(|| {
            error(format!(
                "container {name} is not running (status {})",
                info.status
            ))
        })?;
        Ok(Backend {
            addr: SocketAddr::new(ip, port),
            release: release.to_string(),
            container: name,
            weight: 1,
        })
    }

    /// Wait for requests in flight on these replicas to finish, up to the
    /// service's drain timeout. Reaching the timeout is reported, not fatal.
    async fn drain(
        &self,
        project: &str,
        spec: Option<&ProjectSpec>,
        svc: Option<&ServiceSpec>,
        replicas: &[u32],
        ctx: &Ctx<'_>,
    ) -> StepResult {
        let (Some(spec), Some(svc)) = (spec, svc) else {
            return Ok(());
        };
        let names: Vec<String> = replicas
            .iter()
            .map(|&i| self.container_name(project, &svc.name, &spec.release, i))
            .collect();
        if !svc.ports.is_empty() {
            emit(
                ctx.events,
                project,
                &ctx.target.release,
                "drain",
                Some(&svc.name),
                &format!(
                    "draining {} (up to {})",
                    names.join(", "),
                    humantime::format_duration(svc.deploy.drain_timeout)
                ),
            );
        }
        for p in &svc.ports {
            let bind = SocketAddr::new(p.host_ip, p.host_port);
            let drained = self
                .proxy
                .wait_drained(bind, &names, svc.deploy.drain_timeout)
                .await
                .map_err(error)?;
            if !drained {
                emit(
                    ctx.events,
                    project,
                    &ctx.target.release,
                    "drain",
                    Some(&svc.name),
                    &format!(
                        "drain timeout ({}) reached on {bind}; requests still in flight on {} will be cut",
                        humantime::format_duration(svc.deploy.drain_timeout),
                        names.join(", ")
                    ),
                );
            }
        }
        Ok(())
    }

    fn commit(&self, ctx: &Ctx<'_>) -> StepResult {
        let release = &ctx.target.release;
        self.store
            .set_release_state(ctx.project, release, ReleaseState::Good)
            .map_err(error)?;
        self.store
            .set_serving(ctx.project, Some(release), ctx.previous)
            .map_err(error)?;
        Ok(())
    }

    pub(crate) async fn stop_replicas(
        &self,
        project: &str,
        spec: &ProjectSpec,
        svc: &ServiceSpec,
        replicas: &[u32],
    ) -> StepResult {
        for &i in replicas {
            let name = self.container_name(project, &svc.name, &spec.release, i);
            self.docker
                .stop(&name, svc.stop_grace_period)
                .await
                .map_err(error)?;
        }
        Ok(())
    }

    async fn remove_replicas(
        &self,
        project: &str,
        spec: &ProjectSpec,
        svc: &ServiceSpec,
        replicas: &[u32],
    ) -> StepResult {
        for &i in replicas {
            let name = self.container_name(project, &svc.name, &spec.release, i);
            self.docker.remove(&name).await.map_err(error)?;
        }
        Ok(())
    }

    /// Retention: keep the newest `retain` releases plus the current and
    /// previous; remove the others' containers and the images the agent
    /// pulled that no kept release uses.
    pub(crate) async fn prune(&self, project: &str, who: &str) -> Result<(), String> {
        let releases = self.store.releases(project).map_err(|e| e.to_string())?;
        let serving = self
            .store
            .serving(project)
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        let live: Vec<_> = releases
            .iter()
            .filter(|r| r.state != ReleaseState::Pruned)
            .collect();
        let keep = |r: &str| {
            live.iter().take(self.config.retain).any(|k| k.release == r)
                || serving.current.as_deref() == Some(r)
                || serving.previous.as_deref() == Some(r)
        };
        let kept_images: Vec<&String> = live
            .iter()
            .filter(|r| keep(&r.release))
            .flat_map(|r| r.image_ids.iter())
            .collect();
        for r in live.iter().filter(|r| !keep(&r.release)) {
            let names = self
                .docker
                .list(&[
                    (LABEL_INSTANCE, &self.config.instance),
                    (LABEL_PROJECT, project),
                    (LABEL_RELEASE, &r.release),
                ])
                .await
                .map_err(|e| e.to_string())?;
            for n in &names {
                self.docker.remove(n).await.map_err(|e| e.to_string())?;
            }
            let mut removed_images = Vec::new();
            for id in &r.image_ids {
                if kept_images.contains(&id) {
                    continue;
                }
                let ours = self
                    .store
                    .image(id)
                    .map_err(|e| e.to_string())?
                    .is_some_and(|i| i.pulled_by_agent);
                if ours {
                    match self.docker.remove_image(id).await {
                        Ok(()) => {
                            removed_images.push(id.clone());
                            self.store.forget_image(id).map_err(|e| e.to_string())?;
                        }
                        Err(e) => tracing::warn!(image = id.as_str(), "cannot prune image: {e}"),
                    }
                }
            }
            self.store
                .set_release_state(project, &r.release, ReleaseState::Pruned)
                .map_err(|e| e.to_string())?;
            self.store
                .append_audit(&AuditEntry {
                    who: who.to_string(),
                    action: "release.pruned".into(),
                    project: Some(project.to_string()),
                    release: Some(r.release.clone()),
                    outcome: Some("succeeded".into()),
                    duration_ms: None,
                    reason: Some(format!(
                        "retention keeps the last {} releases",
                        self.config.retain
                    )),
                    detail: serde_json::json!({ "containers": names, "images": removed_images }),
                })
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// What a route step does, in words: which replicas take `service`'s
/// requests after it (`new` of the target `release`, `old` of `previous`),
/// and what happens to the previous release's replicas it leaves out.
fn switch_message(
    service: &str,
    release: &str,
    new: &[u32],
    previous: Option<&str>,
    old: &[u32],
) -> String {
    match (new.is_empty(), old.is_empty(), previous) {
        (true, true, _) => {
            format!("{service} is not in {release}: its ports stop being published")
        }
        (false, false, Some(p)) => format!(
            "switching {service}'s traffic: {release} replicas {new:?} and {p} replicas {old:?} share it"
        ),
        (false, true, Some(p)) => format!(
            "switching all of {service}'s traffic to {release} replicas {new:?}; \
             {p}'s replicas stay warm (retries only) until the commit"
        ),
        (false, _, None) => {
            format!("routing {service}'s traffic to {release} replicas {new:?}")
        }
        (true, false, p) => format!(
            "routing {service}'s traffic to {} replicas {old:?}",
            p.unwrap_or("the previous release")
        ),
    }
}

/// What an undo's route step does: switch `service` back to `previous`, or,
/// when the target never took any of its requests, say so: there is
/// nothing to switch back.
fn switch_back_message(
    service: &str,
    release: &str,
    traffic_moved: bool,
    previous: Option<&str>,
) -> String {
    match (traffic_moved, previous) {
        (true, Some(p)) => format!("switching {service}'s traffic back to {p}"),
        (true, None) => format!(
            "taking {service}'s ports out of the proxy: no previous release to switch back to"
        ),
        (false, Some(p)) => format!(
            "{release} never received {service}'s traffic: {p} served every request throughout"
        ),
        (false, None) => {
            format!("{release} never received {service}'s traffic; no previous release serves it")
        }
    }
}

pub(crate) fn service_of<'a>(spec: &'a ProjectSpec, name: &str) -> Option<&'a ServiceSpec> {
    spec.services.iter().find(|s| s.name == name)
}

/// The container port a service forwards `bind` to, if it publishes it.
fn target_port(svc: &ServiceSpec, bind: SocketAddr) -> Option<u16> {
    svc.ports
        .iter()
        .find(|p| SocketAddr::new(p.host_ip, p.host_port) == bind)
        .map(|p| p.target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_names_who_serves_and_never_an_empty_list() {
        // The last batch: the target takes everything, the previous release
        // stands by.
        let m = switch_message("web", "v3", &[0, 1], Some("v2"), &[]);
        assert_eq!(
            m,
            "switching all of web's traffic to v3 replicas [0, 1]; v2's replicas stay warm (retries only) until the commit"
        );
        // A batch in the middle: both serve.
        let m = switch_message("web", "v3", &[0], Some("v2"), &[1]);
        assert_eq!(
            m,
            "switching web's traffic: v3 replicas [0] and v2 replicas [1] share it"
        );
        // A first deploy, or a service new in this release.
        assert_eq!(
            switch_message("web", "v1", &[0], None, &[]),
            "routing web's traffic to v1 replicas [0]"
        );
        assert_eq!(
            switch_message("web", "v3", &[], Some("v2"), &[]),
            "web is not in v3: its ports stop being published"
        );
        for m in [
            switch_message("web", "v3", &[0, 1], Some("v2"), &[]),
            switch_message("web", "v1", &[0], None, &[]),
            switch_message("web", "v3", &[], Some("v2"), &[]),
        ] {
            assert!(!m.contains("[]"), "{m}");
        }
    }

    #[test]
    fn switching_back_is_only_said_when_traffic_had_moved() {
        assert_eq!(
            switch_back_message("web", "v3", true, Some("v2")),
            "switching web's traffic back to v2"
        );
        let m = switch_back_message("web", "v3", false, Some("v2"));
        assert_eq!(
            m,
            "v3 never received web's traffic: v2 served every request throughout"
        );
        assert!(!m.contains("switching"), "{m}");
        assert!(!switch_back_message("web", "v1", false, None).contains("switching"));
    }
}
