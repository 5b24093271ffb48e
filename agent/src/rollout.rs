//! The `Rollout`: a pure state machine that decides the next step of a
//! deploy or rollback on one host from the outcome of the previous one.
//!
//! It does no I/O. The engine asks [`Rollout::next`] for a step, persists the
//! whole `Rollout` (it is serde-serializable) *before* taking the step, takes
//! it, and reports the outcome with [`Rollout::observe`]. After a crash the
//! engine loads the persisted `Rollout` and calls [`Rollout::recover`]: the
//! machine then either finishes (the release was committed) or undoes what it
//! did (it was not), so the host always ends with one healthy release serving.
//!
//! Why start-first with the old release kept warm until the commit: every
//! failure before the commit is undone by re-routing to containers that are
//! still running, which is a proxy switch, not a restart.

use serde::{Deserialize, Serialize};

/// What the engine must do for one service of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePlan {
    pub service: String,
    /// Replicas of the target release (0: the service is gone in the target).
    pub new_replicas: u32,
    /// Replicas of the release serving now (0: the service is new).
    pub old_replicas: u32,
    /// Replicas replaced at a time.
    pub parallel: u32,
    /// The service publishes ports through the proxy.
    pub routed: bool,
}

/// The whole operation: services in `depends_on` order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Plan {
    pub services: Vec<ServicePlan>,
    /// On failure, remove the target release's containers (a new release) or
    /// only stop them (a rollback to a retained release keeps its containers).
    pub remove_failed: bool,
    /// Hooks run before anything starts (e.g. pre_deploy, backup, migrate).
    #[serde(default)]
    pub hooks_before: Vec<HookName>,
    /// Hooks run after the commit (post_deploy, post_rollback); their
    /// failure is a warning: the release already serves.
    #[serde(default)]
    pub hooks_after: Vec<HookName>,
    /// Hooks that frame an undo (pre_rollback, post_rollback).
    #[serde(default)]
    pub undo_hooks: bool,
    /// The routed service smoke-checked before and after its switch.
    #[serde(default)]
    pub smoke: Option<String>,
    /// Canary percentages (< 100) for every routed service, each held and judged.
    #[serde(default)]
    pub canary: Vec<u8>,
    /// Watch the new release after the switch, before the commit.
    #[serde(default)]
    pub observe: bool,
    /// Run the leaving release's `migrate.down` before the commit.
    #[serde(default)]
    pub migrate_down: bool,
    /// The request's observation window (the controller's per-environment
    /// setting), over the compose file's and the agent's.
    #[serde(default)]
    pub observe_window_ms: Option<u64>,
}

/// The hooks a rollout can run; the engine finds each in the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookName {
    PreDeploy,
    Backup,
    Migrate,
    PostDeploy,
    PreRollback,
    PostRollback,
}

impl HookName {
    pub fn as_str(self) -> &'static str {
        match self {
            HookName::PreDeploy => "pre_deploy",
            HookName::Backup => "backup",
            HookName::Migrate => "migrate",
            HookName::PostDeploy => "post_deploy",
            HookName::PreRollback => "pre_rollback",
            HookName::PostRollback => "post_rollback",
        }
    }
}

/// Smoke checks run twice: before any traffic moves, and after the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmokePhase {
    BeforeSwitch,
    AfterSwitch,
}

/// One step. Each is idempotent: after a crash the persisted step is taken again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// Create (or start, if they exist) these replicas of the target release.
    StartNew { service: String, replicas: Vec<u32> },
    /// Probe these replicas until the health gate passes or fails.
    AwaitHealthy { service: String, replicas: Vec<u32> },
    /// Point the service's published ports at these target (`new`) and
    /// current (`old`) replicas, atomically. Both empty: stop publishing.
    Route {
        service: String,
        new: Vec<u32>,
        old: Vec<u32>,
    },
    /// Wait until requests in flight on these current replicas have finished.
    Drain { service: String, old: Vec<u32> },
    /// Run a hook; its exit code decides.
    Hook { hook: HookName },
    /// Smoke-check the target's replicas of `service`.
    Smoke { service: String, phase: SmokePhase },
    /// Send `percent` of the service's requests to the target's replicas.
    Canary { service: String, percent: u8 },
    /// Hold a canary step and judge it by the observation gates.
    CanaryHold { service: String, percent: u8 },
    /// The observation window: all traffic on the target, previous release
    /// warm; any gate failing undoes the rollout.
    Observe,
    /// Undo the leaving release's migration (`migrate.down`).
    MigrateDown,
    /// The point of no return: the target release becomes the serving one.
    Commit,
    /// Stop the previous release's containers (kept for rollback).
    StopOld { service: String },
    /// Apply retention: prune releases beyond the last N.
    Prune,
    /// Undo: make sure the previous release's containers run.
    StartOld { service: String },
    /// Undo: the previous release's containers pass their health gate.
    AwaitHealthyOld { service: String },
    /// Undo: route the service's ports to the previous release only.
    RouteOld { service: String },
    /// Undo: wait for requests in flight on the target's containers.
    DrainNew { service: String },
    /// Undo: stop (and, for a new release, remove) the target's containers.
    RetireNew { service: String, remove: bool },
}

impl Step {
    /// The name persisted and shown in progress events and audit records.
    pub fn name(&self) -> &'static str {
        match self {
            Step::StartNew { .. } => "start_new",
            Step::AwaitHealthy { .. } => "await_healthy",
            Step::Route { .. } => "route",
            Step::Drain { .. } => "drain",
            Step::Hook { .. } => "hook",
            Step::Smoke { .. } => "smoke",
            Step::Canary { .. } => "canary",
            Step::CanaryHold { .. } => "canary_hold",
            Step::Observe => "observe",
            Step::MigrateDown => "migrate_down",
            Step::Commit => "commit",
            Step::StopOld { .. } => "stop_old",
            Step::Prune => "prune",
            Step::StartOld { .. } => "start_old",
            Step::AwaitHealthyOld { .. } => "await_healthy_old",
            Step::RouteOld { .. } => "route_old",
            Step::DrainNew { .. } => "drain_new",
            Step::RetireNew { .. } => "retire_new",
        }
    }

    pub fn service(&self) -> Option<&str> {
        match self {
            Step::StartNew { service, .. }
            | Step::AwaitHealthy { service, .. }
            | Step::Route { service, .. }
            | Step::Drain { service, .. }
            | Step::Smoke { service, .. }
            | Step::Canary { service, .. }
            | Step::CanaryHold { service, .. }
            | Step::StopOld { service }
            | Step::StartOld { service }
            | Step::AwaitHealthyOld { service }
            | Step::RouteOld { service }
            | Step::DrainNew { service }
            | Step::RetireNew { service, .. } => Some(service),
            Step::Commit | Step::Prune | Step::Hook { .. } | Step::Observe | Step::MigrateDown => {
                None
            }
        }
    }
}

/// Why a rollout is being undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// A replica of the target release failed its health gate.
    HealthGate,
    /// The process taking the steps died; found by reconciliation.
    Interrupted,
    /// Docker or the proxy refused a step.
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub reason: String,
    /// The step that failed (or was in progress when interrupted).
    pub step: String,
}

/// The outcome of the step the engine just took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    Succeeded,
    Failed { kind: FailureKind, reason: String },
}

/// What the engine does now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Take(Step),
    Done(Ending),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The target release serves. `warnings`: post-commit steps that failed.
    Succeeded { warnings: Vec<String> },
    /// The target release was undone; the previous one serves. `warnings`:
    /// undo steps that failed (the host may need attention).
    RolledBack {
        failure: Failure,
        warnings: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    plan: Plan,
    forward: Vec<Step>,
    /// Index into `forward` of the step to take next.
    cursor: usize,
    /// Index of `Step::Commit` in `forward`.
    commit_at: usize,
    failure: Option<Failure>,
    undo: Vec<Step>,
    undo_cursor: usize,
    warnings: Vec<String>,
}

impl Rollout {
    pub fn new(plan: Plan) -> Rollout {
        let mut forward: Vec<Step> = plan
            .hooks_before
            .iter()
            .map(|&hook| Step::Hook { hook })
            .collect();
        for s in &plan.services {
            let smoke = plan.smoke.as_deref() == Some(s.service.as_str());
            forward.extend(service_steps(s, &plan.canary, smoke));
        }
        if plan.observe {
            forward.push(Step::Observe);
        }
        if plan.migrate_down {
            forward.push(Step::MigrateDown);
        }
        let commit_at = forward.len();
        forward.push(Step::Commit);
        forward.extend(plan.hooks_after.iter().map(|&hook| Step::Hook { hook }));
        for s in &plan.services {
            if s.old_replicas > 0 {
                forward.push(Step::StopOld {
                    service: s.service.clone(),
                });
            }
        }
        forward.push(Step::Prune);
        Rollout {
            plan,
            forward,
            cursor: 0,
            commit_at,
            failure: None,
            undo: Vec::new(),
            undo_cursor: 0,
            warnings: Vec::new(),
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn committed(&self) -> bool {
        self.failure.is_none() && self.cursor > self.commit_at
    }

    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// Whether `service`'s requests may have gone to the target: one of its
    /// route or canary steps was taken, or was being taken when the rollout
    /// failed or was interrupted (a step is persisted before it is taken).
    /// `false`: the previous release took every request throughout, so an
    /// undo has no traffic to switch back.
    pub fn traffic_moved(&self, service: &str) -> bool {
        self.forward[..=self.cursor.min(self.commit_at)]
            .iter()
            .any(|step| {
                matches!(step, Step::Route { .. } | Step::Canary { .. })
                    && step.service() == Some(service)
            })
    }

    /// Whether any service's requests may have gone to the target.
    pub fn any_traffic_moved(&self) -> bool {
        self.plan
            .services
            .iter()
            .any(|s| self.traffic_moved(&s.service))
    }

    /// The step to take now, or how the rollout ended.
    pub fn next(&self) -> Decision {
        match &self.failure {
            None => match self.forward.get(self.cursor) {
                Some(step) => Decision::Take(step.clone()),
                None => Decision::Done(Ending::Succeeded {
                    warnings: self.warnings.clone(),
                }),
            },
            Some(failure) => match self.undo.get(self.undo_cursor) {
                Some(step) => Decision::Take(step.clone()),
                None => Decision::Done(Ending::RolledBack {
                    failure: failure.clone(),
                    warnings: self.warnings.clone(),
                }),
            },
        }
    }

    /// Record the outcome of the step `next()` returned.
    pub fn observe(&mut self, obs: Observation) {
        if self.failure.is_some() {
            // Undo is best effort: a failed undo step is reported, and the
            // remaining ones are still taken.
            if let (Observation::Failed { reason, .. }, Some(step)) =
                (&obs, self.undo.get(self.undo_cursor))
            {
                self.warnings
                    .push(format!("{} failed: {reason}", describe(step)));
            }
            if self.undo_cursor < self.undo.len() {
                self.undo_cursor += 1;
            }
            return;
        }
        let Some(step) = self.forward.get(self.cursor).cloned() else {
            return;
        };
        match obs {
            Observation::Succeeded => self.cursor += 1,
            Observation::Failed { reason, .. } if self.cursor > self.commit_at => {
                // Past the point of no return: the target serves; report and go on.
                self.warnings
                    .push(format!("{} failed: {reason}", describe(&step)));
                self.cursor += 1;
            }
            Observation::Failed { kind, reason } => self.fail(kind, reason, step.name()),
        }
    }

    /// Called after the process taking the steps died. `commit_recorded`:
    /// the store already names the target release as serving (the commit step
    /// was taken but its outcome was not persisted).
    pub fn recover(&mut self, commit_recorded: bool) {
        if self.failure.is_some() || self.cursor > self.commit_at {
            return; // undoing, or committed: take the persisted step again
        }
        if self.cursor == self.commit_at && commit_recorded {
            self.cursor += 1;
            return;
        }
        // Watching is safe to resume: traffic is on the target and the
        // previous release is still warm, so the window simply starts again.
        if matches!(self.forward.get(self.cursor), Some(Step::Observe)) {
            return;
        }
        let step = self
            .forward
            .get(self.cursor)
            .map(Step::name)
            .unwrap_or("commit");
        self.fail(
            FailureKind::Interrupted,
            format!("the agent stopped during step {step}"),
            step,
        );
    }

    fn fail(&mut self, kind: FailureKind, reason: String, step: &str) {
        // Undo every service that has been touched, last touched first.
        let touched = self.touched_services();
        let mut undo = Vec::new();
        if self.plan.undo_hooks {
            undo.push(Step::Hook {
                hook: HookName::PreRollback,
            });
        }
        for s in touched.iter().rev() {
            let service = s.service.clone();
            if s.old_replicas > 0 {
                undo.push(Step::StartOld {
                    service: service.clone(),
                });
                undo.push(Step::AwaitHealthyOld {
                    service: service.clone(),
                });
            }
            if s.routed {
                undo.push(Step::RouteOld {
                    service: service.clone(),
                });
                if s.new_replicas > 0 {
                    undo.push(Step::DrainNew {
                        service: service.clone(),
                    });
                }
            }
            if s.new_replicas > 0 {
                undo.push(Step::RetireNew {
                    service,
                    remove: self.plan.remove_failed,
                });
            }
        }
        if self.plan.undo_hooks {
            undo.push(Step::Hook {
                hook: HookName::PostRollback,
            });
        }
        self.failure = Some(Failure {
            kind,
            reason,
            step: step.to_string(),
        });
        self.undo = undo;
        self.undo_cursor = 0;
    }

    /// Services whose first forward step is at or before the cursor.
    fn touched_services(&self) -> Vec<&ServicePlan> {
        let touched: Vec<&str> = self.forward[..=self.cursor.min(self.commit_at)]
            .iter()
            .filter_map(Step::service)
            .collect();
        self.plan
            .services
            .iter()
            .filter(|s| touched.contains(&s.service.as_str()))
            .collect()
    }
}

fn describe(step: &Step) -> String {
    match step.service() {
        Some(s) => format!("{} of {s}", step.name()),
        None => step.name().to_string(),
    }
}

/// Forward steps for one service: batches of `parallel` replicas, each
/// started, gated, routed in, and the replicas they replace drained. With a
/// canary, all replicas start at once and traffic moves by percentages.
fn service_steps(s: &ServicePlan, canary: &[u8], smoke: bool) -> Vec<Step> {
    let mut steps = Vec::new();
    let service = || s.service.clone();
    if s.new_replicas == 0 {
        if s.routed && s.old_replicas > 0 {
            steps.push(Step::Route {
                service: service(),
                new: vec![],
                old: vec![],
            });
            steps.push(Step::Drain {
                service: service(),
                old: (0..s.old_replicas).collect(),
            });
        }
        return steps;
    }
    let smoke = smoke && s.routed;
    let canary: Vec<u8> = if s.routed && s.old_replicas > 0 {
        canary.iter().copied().filter(|p| *p < 100).collect()
    } else {
        vec![]
    };
    let parallel = if canary.is_empty() {
        s.parallel.max(1)
    } else {
        s.new_replicas
    };
    let mut done = 0;
    while done < s.new_replicas {
        let hi = (done + parallel).min(s.new_replicas);
        let batch: Vec<u32> = (done..hi).collect();
        steps.push(Step::StartNew {
            service: service(),
            replicas: batch.clone(),
        });
        steps.push(Step::AwaitHealthy {
            service: service(),
            replicas: batch,
        });
        if s.routed {
            if done == 0 && smoke {
                steps.push(Step::Smoke {
                    service: service(),
                    phase: SmokePhase::BeforeSwitch,
                });
            }
            for &percent in &canary {
                steps.push(Step::Canary {
                    service: service(),
                    percent,
                });
                steps.push(Step::CanaryHold {
                    service: service(),
                    percent,
                });
            }
            let last = hi == s.new_replicas;
            let old: Vec<u32> = if last {
                vec![]
            } else {
                (hi..s.old_replicas).collect()
            };
            // Old replicas that leave the route with this batch.
            let drained: Vec<u32> = if last {
                (done..s.old_replicas).collect()
            } else {
                (done..hi.min(s.old_replicas)).collect()
            };
            steps.push(Step::Route {
                service: service(),
                new: (0..hi).collect(),
                old,
            });
            if !drained.is_empty() {
                steps.push(Step::Drain {
                    service: service(),
                    old: drained,
                });
            }
            if last && smoke {
                steps.push(Step::Smoke {
                    service: service(),
                    phase: SmokePhase::AfterSwitch,
                });
            }
        }
        done = hi;
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, new: u32, old: u32, parallel: u32, routed: bool) -> ServicePlan {
        ServicePlan {
            service: name.into(),
            new_replicas: new,
            old_replicas: old,
            parallel,
            routed,
        }
    }

    fn plan(services: Vec<ServicePlan>) -> Plan {
        Plan {
            services,
            remove_failed: true,
            ..Plan::default()
        }
    }

    /// Run to the end, every step succeeding; return the steps taken.
    fn run_ok(r: &mut Rollout) -> (Vec<Step>, Ending) {
        let mut taken = Vec::new();
        loop {
            match r.next() {
                Decision::Take(step) => {
                    taken.push(step);
                    r.observe(Observation::Succeeded);
                }
                Decision::Done(end) => return (taken, end),
            }
        }
    }

    fn names(steps: &[Step]) -> Vec<&'static str> {
        steps.iter().map(Step::name).collect()
    }

    #[test]
    fn single_replica_update_is_start_gate_route_drain_commit_stop_prune() {
        let mut r = Rollout::new(plan(vec![svc("web", 1, 1, 1, true)]));
        let (taken, end) = run_ok(&mut r);
        assert_eq!(
            names(&taken),
            [
                "start_new",
                "await_healthy",
                "route",
                "drain",
                "commit",
                "stop_old",
                "prune"
            ]
        );
        assert_eq!(
            taken[2],
            Step::Route {
                service: "web".into(),
                new: vec![0],
                old: vec![]
            }
        );
        assert_eq!(
            taken[3],
            Step::Drain {
                service: "web".into(),
                old: vec![0]
            }
        );
        assert_eq!(end, Ending::Succeeded { warnings: vec![] });
        assert!(r.committed());
    }

    #[test]
    fn first_deploy_has_no_drain_and_no_stop_old() {
        let mut r = Rollout::new(plan(vec![svc("web", 1, 0, 1, true)]));
        let (taken, _) = run_ok(&mut r);
        assert_eq!(
            names(&taken),
            ["start_new", "await_healthy", "route", "commit", "prune"]
        );
    }

    #[test]
    fn replicas_are_replaced_one_at_a_time_keeping_unreplaced_old_ones_routed() {
        let mut r = Rollout::new(plan(vec![svc("web", 3, 3, 1, true)]));
        let (taken, _) = run_ok(&mut r);
        let routes: Vec<_> = taken
            .iter()
            .filter(|s| matches!(s, Step::Route { .. }))
            .cloned()
            .collect();
        let r = |new: Vec<u32>, old: Vec<u32>| Step::Route {
            service: "web".into(),
            new,
            old,
        };
        assert_eq!(
            routes,
            vec![
                r(vec![0], vec![1, 2]),
                r(vec![0, 1], vec![2]),
                r(vec![0, 1, 2], vec![])
            ]
        );
        let drains: Vec<_> = taken
            .iter()
            .filter_map(|s| match s {
                Step::Drain { old, .. } => Some(old.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(drains, vec![vec![0], vec![1], vec![2]]);
    }

    #[test]
    fn parallel_batches_and_scale_down_drain_the_surplus_old_replicas() {
        let mut r = Rollout::new(plan(vec![svc("web", 2, 4, 2, true)]));
        let (taken, _) = run_ok(&mut r);
        assert_eq!(
            taken[0],
            Step::StartNew {
                service: "web".into(),
                replicas: vec![0, 1]
            }
        );
        assert_eq!(
            taken[3],
            Step::Drain {
                service: "web".into(),
                old: vec![0, 1, 2, 3]
            }
        );
    }

    #[test]
    fn scale_up_routes_new_replicas_beside_all_old_ones() {
        let mut r = Rollout::new(plan(vec![svc("web", 3, 1, 1, true)]));
        let (taken, _) = run_ok(&mut r);
        let first_route = taken.iter().find(|s| matches!(s, Step::Route { .. }));
        assert_eq!(
            first_route,
            Some(&Step::Route {
                service: "web".into(),
                new: vec![0],
                old: vec![]
            })
        );
        // old replica 0 leaves with the first batch
        assert!(taken.contains(&Step::Drain {
            service: "web".into(),
            old: vec![0]
        }));
    }

    #[test]
    fn unrouted_services_have_no_route_or_drain() {
        let mut r = Rollout::new(plan(vec![svc("worker", 2, 2, 1, false)]));
        let (taken, _) = run_ok(&mut r);
        assert!(
            !taken
                .iter()
                .any(|s| matches!(s, Step::Route { .. } | Step::Drain { .. }))
        );
        assert!(taken.contains(&Step::StopOld {
            service: "worker".into()
        }));
    }

    #[test]
    fn removed_service_is_unrouted_and_drained_then_stopped() {
        let mut r = Rollout::new(plan(vec![
            svc("web", 1, 1, 1, true),
            svc("old", 0, 1, 1, true),
        ]));
        let (taken, _) = run_ok(&mut r);
        assert!(taken.contains(&Step::Route {
            service: "old".into(),
            new: vec![],
            old: vec![]
        }));
        assert!(taken.contains(&Step::StopOld {
            service: "old".into()
        }));
    }

    #[test]
    fn services_follow_plan_order() {
        let mut r = Rollout::new(plan(vec![
            svc("db", 1, 1, 1, false),
            svc("web", 1, 1, 1, true),
        ]));
        let (taken, _) = run_ok(&mut r);
        let first_web = taken.iter().position(|s| s.service() == Some("web"));
        let before_commit: Vec<&Step> = taken.iter().take_while(|s| **s != Step::Commit).collect();
        let last_db_before_commit = before_commit
            .iter()
            .rposition(|s| s.service() == Some("db"));
        assert!(last_db_before_commit < first_web);
    }

    /// Fail at forward step `k` (every earlier one succeeds); return the undo steps.
    fn fail_at(p: Plan, k: usize) -> (Vec<Step>, Ending) {
        let mut r = Rollout::new(p);
        for _ in 0..k {
            r.observe(Observation::Succeeded);
        }
        r.observe(Observation::Failed {
            kind: FailureKind::HealthGate,
            reason: "boom".into(),
        });
        run_ok(&mut r)
    }

    #[test]
    fn every_failure_before_commit_routes_back_to_old_and_retires_new() {
        let p = plan(vec![svc("web", 2, 2, 1, true)]);
        let forward = Rollout::new(p.clone()).forward.clone();
        let commit = forward.iter().position(|s| *s == Step::Commit).unwrap_or(0);
        for (k, step) in forward.iter().enumerate().take(commit + 1) {
            let (undo, end) = fail_at(p.clone(), k);
            assert_eq!(
                names(&undo),
                [
                    "start_old",
                    "await_healthy_old",
                    "route_old",
                    "drain_new",
                    "retire_new"
                ],
                "failing at step {k} ({})",
                step.name()
            );
            assert_eq!(
                undo.last(),
                Some(&Step::RetireNew {
                    service: "web".into(),
                    remove: true
                })
            );
            match end {
                Ending::RolledBack { failure, warnings } => {
                    assert_eq!(failure.kind, FailureKind::HealthGate);
                    assert_eq!(failure.step, step.name());
                    assert!(warnings.is_empty());
                }
                other => panic!("expected rollback, got {other:?}"),
            }
        }
    }

    #[test]
    fn traffic_has_moved_only_once_a_route_or_canary_step_was_taken() {
        // web: start, gate, smoke (before), canary 10, hold, route, drain, smoke (after).
        let p = Plan {
            services: vec![svc("web", 1, 1, 1, true), svc("worker", 1, 1, 1, false)],
            smoke: Some("web".into()),
            canary: vec![10],
            ..plan(vec![])
        };
        let forward = Rollout::new(p.clone()).forward.clone();
        let first_move = forward
            .iter()
            .position(|s| s.name() == "canary")
            .expect("a canary step");
        for (k, step) in forward.iter().enumerate() {
            let mut r = Rollout::new(p.clone());
            for _ in 0..k {
                r.observe(Observation::Succeeded);
            }
            if r.committed() {
                break;
            }
            r.observe(Observation::Failed {
                kind: FailureKind::HealthGate,
                reason: "boom".into(),
            });
            assert_eq!(
                r.traffic_moved("web"),
                k >= first_move,
                "failing at step {k} ({})",
                step.name()
            );
            assert_eq!(r.any_traffic_moved(), k >= first_move);
            assert!(!r.traffic_moved("worker"), "worker is not routed");
            // An interruption at the same step tells the same.
            let mut crashed = Rollout::new(p.clone());
            for _ in 0..k {
                crashed.observe(Observation::Succeeded);
            }
            crashed.recover(false);
            assert_eq!(
                crashed.traffic_moved("web"),
                k >= first_move,
                "crash at {k}"
            );
        }
    }

    #[test]
    fn failure_undoes_only_touched_services_in_reverse_order() {
        let p = plan(vec![
            svc("db", 1, 1, 1, false),
            svc("api", 1, 1, 1, true),
            svc("web", 1, 1, 1, true),
        ]);
        // db: start, gate (2 steps); api: start, gate, route, drain; fail at api's gate.
        let (undo, _) = fail_at(p, 3);
        let services: Vec<_> = undo.iter().filter_map(Step::service).collect();
        assert!(!services.contains(&"web"));
        let first_db = services.iter().position(|s| *s == "db");
        let last_api = services.iter().rposition(|s| *s == "api");
        assert!(last_api < first_db, "api undone before db: {services:?}");
    }

    #[test]
    fn first_deploy_failure_has_nothing_old_to_restore() {
        let (undo, _) = fail_at(plan(vec![svc("web", 1, 0, 1, true)]), 1);
        assert_eq!(names(&undo), ["route_old", "drain_new", "retire_new"]);
    }

    #[test]
    fn failed_rollback_keeps_target_containers() {
        let p = Plan {
            services: vec![svc("web", 1, 1, 1, true)],
            remove_failed: false,
            ..Plan::default()
        };
        let (undo, _) = fail_at(p, 1);
        assert_eq!(
            undo.last(),
            Some(&Step::RetireNew {
                service: "web".into(),
                remove: false
            })
        );
    }

    #[test]
    fn failures_after_commit_are_warnings_and_the_rollout_goes_on() {
        let mut r = Rollout::new(plan(vec![svc("web", 1, 1, 1, true)]));
        while r.next()
            != Decision::Take(Step::StopOld {
                service: "web".into(),
            })
        {
            r.observe(Observation::Succeeded);
        }
        r.observe(Observation::Failed {
            kind: FailureKind::Error,
            reason: "docker said no".into(),
        });
        let (rest, end) = run_ok(&mut r);
        assert_eq!(names(&rest), ["prune"]);
        match end {
            Ending::Succeeded { warnings } => {
                assert_eq!(warnings, vec!["stop_old of web failed: docker said no"])
            }
            other => panic!("expected success, got {other:?}"),
        }
    }

    #[test]
    fn failed_undo_steps_are_reported_and_the_rest_still_taken() {
        let mut r = Rollout::new(plan(vec![svc("web", 1, 1, 1, true)]));
        r.observe(Observation::Failed {
            kind: FailureKind::Error,
            reason: "create failed".into(),
        });
        assert_eq!(
            r.next(),
            Decision::Take(Step::StartOld {
                service: "web".into()
            })
        );
        r.observe(Observation::Failed {
            kind: FailureKind::Error,
            reason: "no".into(),
        });
        let (rest, end) = run_ok(&mut r);
        assert_eq!(
            names(&rest),
            ["await_healthy_old", "route_old", "drain_new", "retire_new"]
        );
        match end {
            Ending::RolledBack { failure, warnings } => {
                assert_eq!(failure.kind, FailureKind::Error);
                assert_eq!(warnings, vec!["start_old of web failed: no"]);
            }
            other => panic!("expected rollback, got {other:?}"),
        }
    }

    #[test]
    fn recover_before_commit_undoes_from_the_interrupted_step() {
        let p = plan(vec![svc("web", 1, 1, 1, true)]);
        let forward = Rollout::new(p.clone()).forward.clone();
        let commit = forward.iter().position(|s| *s == Step::Commit).unwrap_or(0);
        for (k, step) in forward.iter().enumerate().take(commit + 1) {
            let mut r = Rollout::new(p.clone());
            for _ in 0..k {
                r.observe(Observation::Succeeded);
            }
            // Persist, crash, load.
            let json = serde_json::to_string(&r).unwrap();
            let mut loaded: Rollout = serde_json::from_str(&json).unwrap();
            loaded.recover(false);
            let (undo, end) = run_ok(&mut loaded);
            assert_eq!(undo.first().map(Step::name), Some("start_old"), "at {k}");
            match end {
                Ending::RolledBack { failure, .. } => {
                    assert_eq!(failure.kind, FailureKind::Interrupted);
                    assert_eq!(failure.step, step.name());
                }
                other => panic!("expected rollback at {k}, got {other:?}"),
            }
        }
    }

    #[test]
    fn recover_at_commit_that_was_recorded_finishes_forward() {
        let mut r = Rollout::new(plan(vec![svc("web", 1, 1, 1, true)]));
        while r.next() != Decision::Take(Step::Commit) {
            r.observe(Observation::Succeeded);
        }
        r.recover(true);
        let (rest, end) = run_ok(&mut r);
        assert_eq!(names(&rest), ["stop_old", "prune"]);
        assert_eq!(end, Ending::Succeeded { warnings: vec![] });
    }

    #[test]
    fn recover_after_commit_retakes_the_persisted_step() {
        let mut r = Rollout::new(plan(vec![svc("web", 1, 1, 1, true)]));
        while r.next()
            != Decision::Take(Step::StopOld {
                service: "web".into(),
            })
        {
            r.observe(Observation::Succeeded);
        }
        r.recover(false);
        let (rest, _) = run_ok(&mut r);
        assert_eq!(names(&rest), ["stop_old", "prune"]);
    }

    #[test]
    fn recover_during_undo_retakes_the_undo_step() {
        let mut r = Rollout::new(plan(vec![svc("web", 1, 1, 1, true)]));
        r.observe(Observation::Succeeded);
        r.observe(Observation::Failed {
            kind: FailureKind::HealthGate,
            reason: "unhealthy".into(),
        });
        r.observe(Observation::Succeeded); // start_old
        let json = serde_json::to_string(&r).unwrap();
        let mut loaded: Rollout = serde_json::from_str(&json).unwrap();
        loaded.recover(false);
        let (rest, end) = run_ok(&mut loaded);
        assert_eq!(
            names(&rest),
            ["await_healthy_old", "route_old", "drain_new", "retire_new"]
        );
        match end {
            Ending::RolledBack { failure, .. } => assert_eq!(failure.kind, FailureKind::HealthGate),
            other => panic!("expected rollback, got {other:?}"),
        }
    }

    #[test]
    fn observing_after_done_changes_nothing() {
        let mut r = Rollout::new(plan(vec![svc("web", 1, 0, 1, true)]));
        let (_, end) = run_ok(&mut r);
        r.observe(Observation::Failed {
            kind: FailureKind::Error,
            reason: "late".into(),
        });
        assert_eq!(r.next(), Decision::Done(end));
    }

    fn full_plan() -> Plan {
        Plan {
            services: vec![svc("web", 1, 1, 1, true)],
            remove_failed: true,
            hooks_before: vec![HookName::PreDeploy, HookName::Backup, HookName::Migrate],
            hooks_after: vec![HookName::PostDeploy],
            undo_hooks: true,
            smoke: Some("web".into()),
            canary: vec![10, 50],
            observe: true,
            migrate_down: false,
            observe_window_ms: None,
        }
    }

    #[test]
    fn hooks_smoke_canary_and_observe_are_ordered() {
        let mut r = Rollout::new(full_plan());
        let (taken, end) = run_ok(&mut r);
        assert_eq!(
            names(&taken),
            [
                "hook",
                "hook",
                "hook",
                "start_new",
                "await_healthy",
                "smoke",
                "canary",
                "canary_hold",
                "canary",
                "canary_hold",
                "route",
                "drain",
                "smoke",
                "observe",
                "commit",
                "hook",
                "stop_old",
                "prune"
            ]
        );
        assert_eq!(
            taken[0],
            Step::Hook {
                hook: HookName::PreDeploy
            }
        );
        assert_eq!(
            taken[2],
            Step::Hook {
                hook: HookName::Migrate
            }
        );
        assert_eq!(
            taken[5],
            Step::Smoke {
                service: "web".into(),
                phase: SmokePhase::BeforeSwitch
            }
        );
        assert_eq!(
            taken[8],
            Step::Canary {
                service: "web".into(),
                percent: 50
            }
        );
        assert_eq!(
            taken[15],
            Step::Hook {
                hook: HookName::PostDeploy
            }
        );
        assert_eq!(end, Ending::Succeeded { warnings: vec![] });
    }

    #[test]
    fn canary_starts_every_replica_at_once() {
        let mut p = full_plan();
        p.services = vec![svc("web", 3, 3, 1, true)];
        let (taken, _) = run_ok(&mut Rollout::new(p));
        assert!(taken.contains(&Step::StartNew {
            service: "web".into(),
            replicas: vec![0, 1, 2]
        }));
        assert_eq!(taken.iter().filter(|s| s.name() == "route").count(), 1);
    }

    #[test]
    fn no_canary_without_a_previous_release_or_route() {
        let mut p = full_plan();
        p.services = vec![svc("web", 1, 0, 1, true), svc("worker", 1, 1, 1, false)];
        let (taken, _) = run_ok(&mut Rollout::new(p));
        assert!(!taken.iter().any(|s| matches!(s, Step::Canary { .. })));
    }

    #[test]
    fn a_failing_gate_at_any_step_before_commit_is_undone_with_rollback_hooks() {
        let p = full_plan();
        let forward = Rollout::new(p.clone()).forward.clone();
        let commit = forward.iter().position(|s| *s == Step::Commit).unwrap_or(0);
        for (k, step) in forward.iter().enumerate().take(commit + 1) {
            let (undo, end) = fail_at(p.clone(), k);
            assert_eq!(
                undo.first(),
                Some(&Step::Hook {
                    hook: HookName::PreRollback
                }),
                "at {k}"
            );
            assert_eq!(
                undo.last(),
                Some(&Step::Hook {
                    hook: HookName::PostRollback
                }),
                "at {k}"
            );
            // Before the first start_new nothing of web was touched.
            let touched = k >= 3;
            assert_eq!(
                undo.iter().any(|s| s.name() == "route_old"),
                touched,
                "at {k} ({})",
                step.name()
            );
            assert!(matches!(end, Ending::RolledBack { .. }));
        }
    }

    #[test]
    fn post_commit_hook_failure_is_a_warning() {
        let mut r = Rollout::new(full_plan());
        while r.next()
            != Decision::Take(Step::Hook {
                hook: HookName::PostDeploy,
            })
        {
            r.observe(Observation::Succeeded);
        }
        r.observe(Observation::Failed {
            kind: FailureKind::Error,
            reason: "exit 1".into(),
        });
        let (_, end) = run_ok(&mut r);
        assert!(matches!(end, Ending::Succeeded { warnings } if warnings.len() == 1));
    }

    #[test]
    fn an_interrupted_observation_is_resumed_not_undone() {
        let mut r = Rollout::new(full_plan());
        while r.next() != Decision::Take(Step::Observe) {
            r.observe(Observation::Succeeded);
        }
        r.recover(false);
        assert_eq!(r.next(), Decision::Take(Step::Observe));
        assert!(r.failure().is_none());
    }

    #[test]
    fn an_interrupted_canary_hold_is_undone() {
        let mut r = Rollout::new(full_plan());
        while !matches!(r.next(), Decision::Take(Step::CanaryHold { .. })) {
            r.observe(Observation::Succeeded);
        }
        r.recover(false);
        assert_eq!(r.failure().map(|f| f.kind), Some(FailureKind::Interrupted));
    }

    #[test]
    fn migrate_down_comes_before_the_commit() {
        let p = Plan {
            services: vec![svc("web", 1, 1, 1, true)],
            migrate_down: true,
            ..Plan::default()
        };
        let (taken, _) = run_ok(&mut Rollout::new(p));
        let md = taken.iter().position(|s| *s == Step::MigrateDown);
        let commit = taken.iter().position(|s| *s == Step::Commit);
        assert!(md.is_some() && md < commit);
    }
}
