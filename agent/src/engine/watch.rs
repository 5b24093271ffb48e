//! Watching a release after the switch (the observation window) and during
//! each canary step: probes, container exits and restarts, and the proxy's
//! 5xx counts, judged by the [`ObservationGate`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Ctx, Engine, emit};
use crate::docker::ContainerInfo;
use crate::observe::{ObservationGate, Traffic};
use crate::rollout::FailureKind;
use crate::spec::{ObserveSettings, ServiceSpec};

type StepResult = Result<(), (FailureKind, String)>;

/// How often the watch samples.
const TICK: Duration = Duration::from_millis(500);

impl Engine {
    /// The observe settings in force: the compose file's, else this agent's
    /// default window with the standard gates.
    pub(crate) fn observe_settings(&self, ctx: &Ctx<'_>) -> ObserveSettings {
        self.observe_settings_for(ctx.target)
    }

    pub(crate) fn observe_settings_for(&self, spec: &crate::spec::ProjectSpec) -> ObserveSettings {
        spec.rollout
            .observe
            .clone()
            .unwrap_or_else(|| ObserveSettings {
                window: self.config.observe_window,
                unhealthy_after: 3,
                max_error_rate: 0.05,
                error_rate_for: Duration::from_secs(120),
                min_requests: 20,
            })
    }

    /// Watch `services` of the target for `length`; any gate failing fails
    /// the step (and so undoes the rollout).
    pub(crate) async fn watch(
        &self,
        ctx: &Ctx<'_>,
        services: &[&ServiceSpec],
        length: Duration,
        what: &str,
    ) -> StepResult {
        let settings = self.observe_settings(ctx);
        let release = ctx.target.release.clone();
        let services_names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        let mut replicas: Vec<(String, &ServiceSpec, ContainerInfo)> = Vec::new();
        for svc in services {
            for i in 0..svc.replicas {
                let name = self.container_name(ctx.project, &svc.name, &release, i);
                match self.docker.inspect(&name).await {
                    Ok(Some(info)) => replicas.push((name, svc, info)),
                    Ok(None) => {
                        ctx.gate_failed(format!("{}: containers running ({what})", svc.name));
                        return Err((FailureKind::HealthGate, format!("{name} is gone")));
                    }
                    Err(e) => return Err((FailureKind::Error, e.to_string())),
                }
            }
        }
        emit(
            ctx.events,
            ctx.project,
            &release,
            "observe",
            None,
            &format!(
                "{what}: watching {} for {} (probes: {} consecutive failures; errors: over {:.1}% 5xx for {} with at least {} requests; container exits)",
                services_names.join(", "),
                humantime::format_duration(length),
                settings.unhealthy_after,
                settings.max_error_rate * 100.0,
                humantime::format_duration(settings.error_rate_for.min(length)),
                settings.min_requests
            ),
        );
        let began = Instant::now();
        let baseline = self.traffic(ctx, &services_names, Duration::ZERO).await;
        let max_error_rate = settings.max_error_rate;
        let mut gate = ObservationGate::new(settings, length, baseline);
        let mut last_note = Instant::now();
        let mut probed_at: BTreeMap<String, Instant> = BTreeMap::new();
        while began.elapsed() < length {
            tokio::time::sleep(TICK.min(length.saturating_sub(began.elapsed()))).await;
            for (name, svc, first) in &replicas {
                let due = probed_at
                    .get(name)
                    .is_none_or(|t| t.elapsed() >= svc.deploy.health.interval);
                if !due {
                    continue;
                }
                probed_at.insert(name.clone(), Instant::now());
                let result = self.probe_once(name, svc, first).await;
                if let Some(why) = gate.probe(name, result) {
                    ctx.gate_failed(format!(
                        "{}: {} ({what})",
                        svc.name,
                        svc.deploy.health.probe.describe()
                    ));
                    return Err((FailureKind::HealthGate, format!("{what}: {why}")));
                }
            }
            let now = self.traffic(ctx, &services_names, began.elapsed()).await;
            if let Some(why) = gate.traffic(now) {
                ctx.gate_failed(format!(
                    "{}: 5xx rate at most {:.1}% ({what})",
                    services_names.join(", "),
                    max_error_rate * 100.0
                ));
                return Err((FailureKind::HealthGate, format!("{what}: {why}")));
            }
            if last_note.elapsed() >= Duration::from_secs(10) {
                last_note = Instant::now();
                emit(
                    ctx.events,
                    ctx.project,
                    &release,
                    "observe",
                    None,
                    &format!(
                        "{what}: {}s of {}, {} responses, {} 5xx so far",
                        began.elapsed().as_secs(),
                        humantime::format_duration(length),
                        now.responses.saturating_sub(baseline.responses),
                        now.errors.saturating_sub(baseline.errors)
                    ),
                );
            }
        }
        emit(
            ctx.events,
            ctx.project,
            &release,
            "observe",
            None,
            &format!("{what}: all gates passed"),
        );
        Ok(())
    }

    /// The target release's cumulative responses on the services' routes.
    async fn traffic(&self, ctx: &Ctx<'_>, services: &[&str], at: Duration) -> Traffic {
        let mut t = Traffic {
            at,
            ..Traffic::default()
        };
        if let Ok(status) = self.proxy.status().await {
            for r in status.routes.iter().filter(|r| {
                r.route.project == ctx.project && services.contains(&r.route.service.as_str())
            }) {
                if let Some(c) = r.releases.get(&ctx.target.release) {
                    t.responses += c.s1xx + c.s2xx + c.s3xx + c.s4xx + c.s5xx;
                    t.errors += c.s5xx;
                }
            }
        }
        t
    }
}
