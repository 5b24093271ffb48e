//! Reconciliation: finishing operations that a crash interrupted, and
//! repairing drift (a container removed or stopped by hand, a proxy that
//! lost its routes), so the host ends with the serving release healthy.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Instant;

use super::{Ctx, Engine, Events, OpError, emit, now};
use crate::lock::{HostLock, LockOwner};
use crate::proxy::protocol::Route;
use crate::rollout::Rollout;
use crate::spec::ProjectSpec;
use crate::store::{AuditEntry, ReleaseState};
use crate::wire::{
    OperationKind, Outcome, ProjectStatus, ProxyState, ReplicaStatus, ServiceStatus, StatusReport,
};

/// Who the agent acts as when it repairs on its own.
pub use deploy_protocol::caller::RECONCILER;

impl Engine {
    /// Finish every unfinished operation of `project`. The caller holds its
    /// `HostLock`, so an unfinished operation is one whose process died.
    pub(crate) async fn recover_project(&self, project: &str, ev: &Events) -> Result<(), OpError> {
        for op in self.store.open_operations(Some(project))? {
            let started = Instant::now();
            tracing::warn!(
                project,
                release = op.release.as_str(),
                "recovering an interrupted {}",
                op.kind.as_str()
            );
            let target = self.snapshot(project, &op.release)?;
            let old = match &op.previous {
                Some(p) => Some(self.snapshot(project, p)?),
                None => None,
            };
            let Some(state) = op.state_json.as_deref() else {
                // Interrupted before its first step: nothing changed on the host.
                if op.kind == OperationKind::Deploy {
                    self.store
                        .set_release_state(project, &op.release, ReleaseState::Failed)?;
                }
                let msg = format!(
                    "{} of {} was interrupted before any change; nothing to undo",
                    op.kind.as_str(),
                    op.release
                );
                self.store
                    .finish_operation(op.id, Outcome::Interrupted, &msg)?;
                self.store.append_audit(&AuditEntry {
                    who: RECONCILER.into(),
                    action: format!("{}.interrupted", op.kind.as_str()),
                    project: Some(project.to_string()),
                    release: Some(op.release.clone()),
                    outcome: Some(Outcome::Interrupted.as_str().into()),
                    duration_ms: None,
                    reason: None,
                    detail: serde_json::json!({ "operation_id": op.id, "message": msg }),
                })?;
                continue;
            };
            let mut rollout: Rollout = serde_json::from_str(state).map_err(|e| {
                OpError::new(
                    Outcome::EnvironmentError,
                    format!(
                        "the persisted state of operation {} is unreadable: {e}",
                        op.id
                    ),
                )
            })?;
            let commit_recorded = self
                .store
                .serving(project)?
                .and_then(|s| s.current)
                .is_some_and(|c| c == op.release);
            rollout.recover(commit_recorded);
            emit(
                ev,
                project,
                &op.release,
                "recover",
                None,
                &format!(
                    "finishing the {} of {} interrupted at step {}",
                    op.kind.as_str(),
                    op.release,
                    op.step.as_deref().unwrap_or("?")
                ),
            );
            let ctx = Ctx {
                kind: op.kind,
                project,
                target: &target,
                old: old.as_ref(),
                previous: op.previous.as_deref(),
                who: RECONCILER,
                reason: op.reason.as_deref(),
                events: ev,
                report: Default::default(),
            };
            if rollout.failure().is_some()
                && let Ok(mut r) = ctx.report.lock()
            {
                r.decided_at = Some(Instant::now());
            }
            let ending = self.run(op.id, rollout, &ctx).await;
            self.finish(op.id, &ctx, ending, true, started)?;
        }
        Ok(())
    }

    /// One pass over every project: interrupted operations, then drift.
    /// Projects locked by a running operation are skipped this time.
    pub async fn reconcile_all(&self, ev: &Events) -> Result<(), OpError> {
        for project in self.store.projects()? {
            let owner = LockOwner {
                pid: std::process::id(),
                user: RECONCILER.into(),
                operation: "reconciliation".into(),
                since: now(),
            };
            let Some(_lock) = HostLock::try_acquire(&self.state_dir, &project, &owner)
                .map_err(|e| OpError::new(Outcome::EnvironmentError, e.to_string()))?
            else {
                continue;
            };
            self.recover_project(&project, ev).await?;
            if let Err(e) = self.repair_drift(&project, ev).await {
                tracing::warn!(
                    project = project.as_str(),
                    "drift repair failed: {}",
                    e.message
                );
            }
        }
        Ok(())
    }

    /// Bring the serving release's containers and routes back to what they
    /// should be.
    async fn repair_drift(&self, project: &str, ev: &Events) -> Result<(), OpError> {
        let Some(current) = self.store.serving(project)?.and_then(|s| s.current) else {
            return Ok(());
        };
        let spec = self.snapshot(project, &current)?;
        let started = Instant::now();
        let mut repaired = Vec::new();
        for svc in &spec.services {
            let mut broken = Vec::new();
            for i in 0..svc.replicas {
                let name = self.container_name(project, &svc.name, &current, i);
                match self.docker.inspect(&name).await? {
                    Some(c) if c.running => {}
                    Some(c) => broken.push((i, format!("{name} was {}", c.status))),
                    None => broken.push((i, format!("{name} was missing"))),
                }
            }
            if broken.is_empty() {
                continue;
            }
            let replicas: Vec<u32> = broken.iter().map(|(i, _)| *i).collect();
            emit(
                ev,
                project,
                &current,
                "repair",
                Some(&svc.name),
                &format!(
                    "repairing: {}",
                    broken
                        .iter()
                        .map(|(_, w)| w.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            if let Err((_, why)) = self
                .start_replicas(project, &spec, Some(svc), &replicas)
                .await
            {
                repaired.push(format!("{}: restart failed: {why}", svc.name));
                continue;
            }
            for &i in &replicas {
                let name = self.container_name(project, &svc.name, &current, i);
                if let Err(why) = self.gate(&name, svc).await {
                    repaired.push(format!("{name}: restarted but unhealthy: {why}"));
                }
            }
            repaired.extend(broken.into_iter().map(|(_, w)| w));
        }
        let rerouted = self.repair_routes(project, &spec).await?;
        repaired.extend(rerouted);
        if !repaired.is_empty() {
            self.store.append_audit(&AuditEntry {
                who: RECONCILER.into(),
                action: "reconcile.repaired".into(),
                project: Some(project.to_string()),
                release: Some(current.clone()),
                outcome: Some("succeeded".into()),
                duration_ms: Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)),
                reason: Some("drift".into()),
                detail: serde_json::json!({ "repaired": repaired }),
            })?;
        }
        Ok(())
    }

    /// Make the proxy's routes for `spec`'s ports point at its running
    /// containers (their addresses change when Docker restarts them).
    async fn repair_routes(
        &self,
        project: &str,
        spec: &ProjectSpec,
    ) -> Result<Vec<String>, OpError> {
        if !spec.services.iter().any(|s| !s.ports.is_empty()) {
            return Ok(vec![]);
        }
        let status = self
            .proxy
            .status()
            .await
            .map_err(|e| OpError::new(Outcome::EnvironmentError, e.to_string()))?;
        let mut fixed = Vec::new();
        for svc in &spec.services {
            for port in &svc.ports {
                let bind = SocketAddr::new(port.host_ip, port.host_port);
                let mut backends = Vec::new();
                for i in 0..svc.replicas {
                    let name = self.container_name(project, &svc.name, &spec.release, i);
                    if let Some(c) = self.docker.inspect(&name).await?
                        && let (true, Some(ip)) = (c.running, c.ip)
                    {
                        backends.push(crate::proxy::protocol::Backend {
                            addr: SocketAddr::new(ip, port.target),
                            release: spec.release.clone(),
                            container: name,
                            weight: 1,
                        });
                    }
                }
                let current = status.routes.iter().find(|r| r.route.bind == bind);
                let same = current.is_some_and(|r| {
                    let a: BTreeSet<_> = r
                        .route
                        .backends
                        .iter()
                        .map(|b| (&b.container, b.addr))
                        .collect();
                    let b: BTreeSet<_> = backends.iter().map(|b| (&b.container, b.addr)).collect();
                    a == b && r.route.mode == svc.deploy.proxy
                });
                if !same {
                    self.proxy
                        .set_route(Route {
                            bind,
                            project: project.to_string(),
                            service: svc.name.clone(),
                            mode: svc.deploy.proxy,
                            backends,
                        })
                        .await
                        .map_err(|e| OpError::new(Outcome::EnvironmentError, e.to_string()))?;
                    fixed.push(format!("route {bind} repointed to the running containers"));
                }
            }
        }
        Ok(fixed)
    }

    /// `deploy-agent status`.
    pub async fn status(&self, only: Option<&str>) -> Result<StatusReport, OpError> {
        let proxy = self.proxy_state().await;
        let mut projects = Vec::new();
        for project in self.store.projects()? {
            if only.is_some_and(|p| p != project) {
                continue;
            }
            let mut status = self.project_status(&project).await?;
            served_drift(&mut status, &proxy);
            projects.push(status);
        }
        if let Some(p) = only
            && projects.is_empty()
        {
            return Err(OpError::new(
                Outcome::ConfigError,
                format!("project {p} has never been deployed on this host"),
            ));
        }
        Ok(StatusReport {
            host: crate::config::hostname(),
            projects,
            proxy: Some(proxy),
        })
    }

    /// What the proxy says about itself, within a bound: a hung proxy is
    /// reported, never waited for.
    async fn proxy_state(&self) -> ProxyState {
        let answer =
            tokio::time::timeout(std::time::Duration::from_secs(2), self.proxy.status()).await;
        match answer {
            Ok(Ok(st)) => ProxyState {
                running: true,
                pid: Some(st.pid),
                error: None,
                listeners: st
                    .routes
                    .iter()
                    .map(|r| {
                        let weighted: Vec<&str> = r
                            .route
                            .backends
                            .iter()
                            .filter(|b| b.weight > 0)
                            .map(|b| b.release.as_str())
                            .collect();
                        let mut releases = weighted.clone();
                        releases.dedup();
                        format!(
                            "{} {}/{} -> {} ({} backend(s))",
                            r.route.bind,
                            r.route.project,
                            r.route.service,
                            if releases.is_empty() {
                                "nothing".to_string()
                            } else {
                                releases.join(", ")
                            },
                            weighted.len()
                        )
                    })
                    .collect(),
            },
            Ok(Err(e)) => ProxyState {
                running: false,
                pid: None,
                error: Some(format!(
                    "{e}; nothing is served until it runs again (systemctl status deploy-proxy)"
                )),
                listeners: Vec::new(),
            },
            Err(_) => ProxyState {
                running: false,
                pid: None,
                error: Some(
                    "the proxy did not answer within 2s on proxy.sock: its data path may be hung (systemctl status deploy-proxy)"
                        .into(),
                ),
                listeners: Vec::new(),
            },
        }
    }

    async fn project_status(&self, project: &str) -> Result<ProjectStatus, OpError> {
        let serving = self.store.serving(project)?.unwrap_or_default();
        let operation = self
            .store
            .open_operations(Some(project))?
            .first()
            .map(|op| {
                format!(
                    "{} of {} at step {}{}",
                    op.kind.as_str(),
                    op.release,
                    op.step.as_deref().unwrap_or("start"),
                    HostLock::holder(&self.state_dir, project)
                        .map(|h| format!(" by {h}"))
                        .unwrap_or_default()
                )
            });
        let mut services = Vec::new();
        let mut drift = Vec::new();
        let mut digests = Default::default();
        if let Some(current) = &serving.current {
            let spec = self.snapshot(project, current)?;
            digests = self
                .store
                .release(project, current)?
                .map(|r| r.digests)
                .unwrap_or_default();
            for svc in &spec.services {
                let mut replicas = Vec::new();
                for i in 0..svc.replicas {
                    let name = self.container_name(project, &svc.name, current, i);
                    let state = match self.docker.inspect(&name).await {
                        Ok(Some(c)) => {
                            if !c.running {
                                drift.push(format!("{name} is {}", c.status));
                            }
                            match c.health {
                                Some(h) => format!("{} ({h})", c.status),
                                None => c.status,
                            }
                        }
                        Ok(None) => {
                            drift.push(format!("{name} is missing"));
                            "missing".into()
                        }
                        Err(e) => format!("unknown: {e}"),
                    };
                    replicas.push(ReplicaStatus {
                        replica: i,
                        container: name,
                        state,
                    });
                }
                let published = svc
                    .ports
                    .iter()
                    .map(|p| {
                        format!(
                            "{} -> {} ({:?})",
                            SocketAddr::new(p.host_ip, p.host_port),
                            p.target,
                            svc.deploy.proxy
                        )
                        .to_lowercase()
                    })
                    .collect();
                services.push(ServiceStatus {
                    service: svc.name.clone(),
                    replicas,
                    published,
                });
            }
        }
        Ok(ProjectStatus {
            project: project.to_string(),
            current: serving.current,
            previous: serving.previous,
            since: serving.since,
            digests,
            operation,
            services,
            drift,
        })
    }
}

/// Drift the proxy shows: a published address of the serving release that
/// no listener serves (or a proxy that does not answer at all).
fn served_drift(status: &mut ProjectStatus, proxy: &ProxyState) {
    if status.current.is_none() {
        return;
    }
    if !proxy.running {
        status.drift.push(format!(
            "the proxy is not running: {}",
            proxy.error.as_deref().unwrap_or("it does not answer")
        ));
        return;
    }
    for svc in &status.services {
        for published in &svc.published {
            let bind = published.split(' ').next().unwrap_or_default();
            let served = proxy
                .listeners
                .iter()
                .any(|l| l.starts_with(&format!("{bind} ")) && !l.contains("-> nothing"));
            if !served {
                status.drift.push(format!(
                    "{bind} ({}) is published but the proxy serves nothing there",
                    svc.service
                ));
            }
        }
    }
}
