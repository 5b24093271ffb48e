//! Hooks (one-off containers or host commands) and smoke checks.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::steps::service_of;
use super::{Ctx, Engine, emit};
use crate::docker::ContainerPlan;
use crate::proxy::protocol::{Backend, Route};
use crate::rollout::{FailureKind, HookName, SmokePhase};
use crate::spec::{Hook, HookRun, ProjectSpec, RestartPolicy, SmokeCheck};
use crate::store::AuditEntry;
use crate::wire::HookReport;

type StepResult = Result<(), (FailureKind, String)>;

/// Lines of hook output kept in the result (the audit record keeps all).
const TAIL_LINES: usize = 20;

impl Engine {
    /// A hook step: the hook comes from the target release's own snapshot.
    pub(crate) async fn hook_step(&self, ctx: &Ctx<'_>, name: HookName) -> StepResult {
        let hooks = &ctx.target.rollout.hooks;
        let hook = match name {
            HookName::PreDeploy => hooks.pre_deploy.as_ref(),
            HookName::Backup => hooks.backup.as_ref(),
            HookName::Migrate => hooks.migrate.as_ref(),
            HookName::PostDeploy => hooks.post_deploy.as_ref(),
            HookName::PreRollback => hooks.pre_rollback.as_ref(),
            HookName::PostRollback => hooks.post_rollback.as_ref(),
        };
        match hook {
            Some(h) => {
                self.run_hook(ctx, name.as_str(), h, &h.run, ctx.target)
                    .await
            }
            None => Ok(()),
        }
    }

    /// `migrate.down` of the release being left, from its own image.
    pub(crate) async fn migrate_down_step(&self, ctx: &Ctx<'_>) -> StepResult {
        let Some(old) = ctx.old else { return Ok(()) };
        let Some(migrate) = old.rollout.hooks.migrate.as_ref() else {
            return Ok(());
        };
        let Some(down) = migrate.down.clone() else {
            return Ok(());
        };
        let run = match &migrate.run {
            HookRun::Container { service, .. } => HookRun::Container {
                service: service.clone(),
                command: down,
            },
            HookRun::Host { .. } => HookRun::Host { command: down },
        };
        self.run_hook(ctx, "migrate_down", migrate, &run, old).await
    }

    async fn run_hook(
        &self,
        ctx: &Ctx<'_>,
        name: &str,
        hook: &Hook,
        run: &HookRun,
        spec: &ProjectSpec,
    ) -> StepResult {
        let release = &ctx.target.release;
        emit(
            ctx.events,
            ctx.project,
            release,
            "hook",
            None,
            &format!("running hook {name}"),
        );
        let started = Instant::now();
        let outcome = match run {
            HookRun::Container { service, command } => {
                self.hook_container(ctx, name, hook, spec, service, command)
                    .await
            }
            HookRun::Host { command } => self.hook_host(ctx, name, hook, command).await,
        };
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let (exit_code, output, failure) = match outcome {
            Ok((code, output)) if code == 0 => (Some(code), output, None),
            Ok((code, output)) => (
                Some(code),
                output,
                Some(format!("hook {name} exited with code {code}")),
            ),
            Err(HookError { output, message }) => {
                (None, output, Some(format!("hook {name} {message}")))
            }
        };
        let tail: Vec<String> = output
            .lines()
            .rev()
            .take(TAIL_LINES)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .map(str::to_string)
            .collect();
        let report = HookReport {
            hook: name.to_string(),
            succeeded: failure.is_none(),
            exit_code,
            duration_ms,
            output_tail: tail.clone(),
        };
        if let Ok(mut r) = ctx.report.lock() {
            r.hooks.push(report);
        }
        let audit = self.store.append_audit(&AuditEntry {
            who: ctx.who.to_string(),
            action: format!("hook.{name}"),
            project: Some(ctx.project.to_string()),
            release: Some(release.clone()),
            outcome: Some(if failure.is_none() { "succeeded" } else { "failed" }.into()),
            duration_ms: Some(duration_ms),
            reason: None,
            detail: serde_json::json!({ "exit_code": exit_code, "output": output, "error": failure }),
        });
        if let Err(e) = audit {
            return Err((
                FailureKind::Error,
                format!("cannot record hook {name}: {e}"),
            ));
        }
        let last = tail.last().cloned().unwrap_or_default();
        match failure {
            None => {
                emit(
                    ctx.events,
                    ctx.project,
                    release,
                    "hook",
                    None,
                    &format!(
                        "hook {name} succeeded in {:.1}s",
                        duration_ms as f64 / 1000.0
                    ),
                );
                Ok(())
            }
            Some(why) => {
                ctx.gate_failed(format!("hook {name}"));
                Err((
                    FailureKind::HealthGate,
                    if last.is_empty() {
                        why
                    } else {
                        format!("{why}; last output: {last}")
                    },
                ))
            }
        }
    }

    async fn hook_container(
        &self,
        ctx: &Ctx<'_>,
        name: &str,
        hook: &Hook,
        spec: &ProjectSpec,
        service: &str,
        command: &[String],
    ) -> Result<(i64, String), HookError> {
        let fail = |message: String| HookError {
            output: String::new(),
            message,
        };
        let svc = service_of(spec, service).ok_or_else(|| {
            fail(format!(
                "names service {service}, which release {} does not have",
                spec.release
            ))
        })?;
        let mut one_off = svc.clone();
        one_off.command = Some(command.to_vec());
        one_off.healthcheck = None;
        one_off.restart = RestartPolicy::No;
        one_off.ports.clear();
        let (networks, volumes) = self
            .resources(ctx.project, spec, svc)
            .await
            .map_err(|(_, m)| fail(m))?;
        let container = format!(
            "{}-{}-hook-{name}-{}",
            self.config.instance, ctx.project, spec.release
        );
        // A leftover from an interrupted attempt.
        let _ = self.docker.remove(&container).await;
        let mut labels = self.labels(ctx.project, None);
        labels.insert("io.deploy-agent.hook".into(), name.to_string());
        let plan = ContainerPlan {
            name: container.clone(),
            image: &svc.image,
            service: &one_off,
            labels,
            networks,
            volumes: &volumes,
        };
        self.docker
            .create_and_start(&plan)
            .await
            .map_err(|e| fail(format!("could not start: {e}")))?;
        let started = Instant::now();
        let mut warned = false;
        let result = loop {
            match self.docker.inspect(&container).await {
                Ok(Some(c)) if !c.running && !c.started_at.is_empty() => break Ok(c.exit_code),
                Ok(Some(_)) => {}
                Ok(None) => break Err("its container disappeared".to_string()),
                Err(e) => break Err(e.to_string()),
            }
            let elapsed = started.elapsed();
            if elapsed >= hook.timeout {
                let _ = self.docker.kill(&container).await;
                break Err(format!(
                    "did not finish within its {} timeout and was killed",
                    humantime::format_duration(hook.timeout)
                ));
            }
            if !warned && hook.warn_after.is_some_and(|w| elapsed >= w) {
                warned = true;
                emit(
                    ctx.events,
                    ctx.project,
                    &ctx.target.release,
                    "hook",
                    None,
                    &format!(
                        "warning: hook {name} has been running for {} (warn_after)",
                        humantime::format_duration(Duration::from_secs(elapsed.as_secs()))
                    ),
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let output = self.docker.logs(&container).await.unwrap_or_default();
        let _ = self.docker.remove(&container).await;
        result
            .map(|code| (code, output.clone()))
            .map_err(|message| HookError { output, message })
    }

    async fn hook_host(
        &self,
        ctx: &Ctx<'_>,
        name: &str,
        hook: &Hook,
        command: &[String],
    ) -> Result<(i64, String), HookError> {
        let fail = |message: String| HookError {
            output: String::new(),
            message,
        };
        if !self.config.allow_host_hooks {
            return Err(fail(
                "is a host command, and this agent does not allow them (allow_host_hooks = true in agent.toml)".into(),
            ));
        }
        let Some((program, args)) = command.split_first() else {
            return Err(fail("has an empty command".into()));
        };
        let child = tokio::process::Command::new(program)
            .args(args)
            .env("DEPLOY_PROJECT", ctx.project)
            .env("DEPLOY_RELEASE", &ctx.target.release)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let warning = hook.warn_after.map(|w| {
            let (events, project, release, name) = (
                ctx.events.clone(),
                ctx.project.to_string(),
                ctx.target.release.clone(),
                name.to_string(),
            );
            tokio::spawn(async move {
                tokio::time::sleep(w).await;
                emit(
                    &events,
                    &project,
                    &release,
                    "hook",
                    None,
                    &format!(
                        "warning: hook {name} has been running for {}",
                        humantime::format_duration(w)
                    ),
                );
            })
        });
        let out = tokio::time::timeout(hook.timeout, child).await;
        if let Some(w) = warning {
            w.abort();
        }
        match out {
            Ok(Ok(o)) => {
                let mut text = String::from_utf8_lossy(&o.stdout).to_string();
                text.push_str(&String::from_utf8_lossy(&o.stderr));
                Ok((i64::from(o.status.code().unwrap_or(-1)), text))
            }
            Ok(Err(e)) => Err(fail(format!("could not run {program}: {e}"))),
            Err(_) => Err(fail(format!(
                "did not finish within its {} timeout and was killed",
                humantime::format_duration(hook.timeout)
            ))),
        }
    }

    /// Smoke checks: before the switch through a private proxy route to the
    /// target's running replicas; after it through the public address.
    pub(crate) async fn smoke_step(
        &self,
        ctx: &Ctx<'_>,
        service: &str,
        phase: SmokePhase,
    ) -> StepResult {
        let Some(smoke) = ctx.target.rollout.hooks.smoke.as_ref() else {
            return Ok(());
        };
        let Some(svc) = service_of(ctx.target, service) else {
            return Ok(());
        };
        let Some(port) = svc.ports.first() else {
            return Ok(());
        };
        let label = match phase {
            SmokePhase::BeforeSwitch => "smoke (before switch)",
            SmokePhase::AfterSwitch => "smoke (after switch)",
        };
        let mut private: Option<SocketAddr> = None;
        let addr = match phase {
            SmokePhase::AfterSwitch => {
                let ip = if port.host_ip.is_unspecified() {
                    Ipv4Addr::LOCALHOST.into()
                } else {
                    port.host_ip
                };
                SocketAddr::new(ip, port.host_port)
            }
            SmokePhase::BeforeSwitch => {
                let mut backends = Vec::new();
                for i in 0..svc.replicas {
                    let name = self.container_name(ctx.project, service, &ctx.target.release, i);
                    if let Ok(Some(c)) = self.docker.inspect(&name).await
                        && let (true, Some(ip)) = (c.running, c.ip)
                    {
                        backends.push(Backend {
                            addr: SocketAddr::new(ip, port.target),
                            release: ctx.target.release.clone(),
                            container: name,
                            weight: 1,
                        });
                    }
                }
                let bind = free_local_port().map_err(|e| {
                    (
                        FailureKind::Error,
                        format!("no free port for the smoke route: {e}"),
                    )
                })?;
                self.proxy
                    .set_route(Route {
                        bind,
                        project: ctx.project.to_string(),
                        service: format!("{service} (smoke)"),
                        mode: svc.deploy.proxy,
                        backends,
                    })
                    .await
                    .map_err(|e| (FailureKind::Error, e.to_string()))?;
                private = Some(bind);
                bind
            }
        };
        let started = Instant::now();
        let mut lines = Vec::new();
        let mut failure = None;
        for check in &smoke.checks {
            match run_check(addr, check).await {
                Ok(line) => lines.push(line),
                Err(why) => {
                    lines.push(why.clone());
                    failure = Some(why);
                    ctx.gate_failed(format!(
                        "{label}: {service} {} {}",
                        check.method, check.path
                    ));
                    break;
                }
            }
        }
        if let Some(bind) = private {
            let _ = self.proxy.remove_route(bind).await;
        }
        if let Ok(mut r) = ctx.report.lock() {
            r.hooks.push(HookReport {
                hook: label.to_string(),
                succeeded: failure.is_none(),
                exit_code: None,
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                output_tail: lines.clone(),
            });
        }
        emit(
            ctx.events,
            ctx.project,
            &ctx.target.release,
            "smoke",
            Some(service),
            &format!("{label}: {}", lines.join("; ")),
        );
        if let Some(why) = failure {
            return Err((FailureKind::HealthGate, format!("{label} failed: {why}")));
        }
        if let Some(cmd) = &smoke.command {
            self.run_hook(ctx, label, cmd, &cmd.run, ctx.target).await?;
        }
        Ok(())
    }
}

struct HookError {
    output: String,
    message: String,
}

fn free_local_port() -> std::io::Result<SocketAddr> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    l.local_addr()
}

/// One HTTP check; `Ok(description)` or `Err(why)`.
async fn run_check(addr: SocketAddr, check: &SmokeCheck) -> Result<String, String> {
    let what = format!("{} {}", check.method, check.path);
    let started = Instant::now();
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{what}: cannot connect to {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let method = http::Method::from_bytes(check.method.as_bytes())
            .map_err(|e| format!("{what}: bad method: {e}"))?;
        let req = http::Request::builder()
            .method(method)
            .uri(check.path.as_str())
            .header(http::header::HOST, addr.to_string())
            .header(http::header::USER_AGENT, "deploy-agent-smoke")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("{what}: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{what}: reading the body: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, String::from_utf8_lossy(&body).to_string()))
    };
    let limit = check
        .max_latency
        .unwrap_or(Duration::from_secs(30))
        .max(Duration::from_secs(1))
        * 3;
    let (status, body) = tokio::time::timeout(limit, attempt).await.map_err(|_| {
        format!(
            "{what}: no answer within {}",
            humantime::format_duration(limit)
        )
    })??;
    let took = started.elapsed();
    if status != check.status {
        return Err(format!(
            "{what} answered {status}, expected {}",
            check.status
        ));
    }
    if let Some(needle) = &check.body_contains
        && !body.contains(needle.as_str())
    {
        return Err(format!("{what}: body does not contain {needle:?}"));
    }
    if let Some(max) = check.max_latency
        && took > max
    {
        return Err(format!(
            "{what} took {}ms, more than {}ms",
            took.as_millis(),
            max.as_millis()
        ));
    }
    Ok(format!("{what} → {status} in {}ms", took.as_millis()))
}
