//! Running as a systemd service (`Type=notify`): `STATUS=` lines, the
//! watchdog, and the reconciliation loop whose health the watchdog vouches
//! for.
//!
//! The watchdog is pinged from the same task that runs the reconciliation
//! passes, never from a timer of its own: a ping then proves that the loop
//! is alive. A pass may legitimately take a while (it can wait on a health
//! gate), so while a pass runs the loop keeps pinging only until the pass
//! has run for `reconcile_timeout_secs`; after that it counts the loop as
//! hung, says so in `STATUS=`, and stops pinging, and systemd restarts the
//! daemon (`WatchdogSec=`, `Restart=on-failure`). Nothing is lost by that:
//! every rollout step is persisted before it is taken and recovery resumes
//! from it. A pass that blocks its thread outright stops the pings at once,
//! since the pinging task is the blocked one.
//!
//! Without `NOTIFY_SOCKET` (not under systemd) every notification is a
//! no-op, and a hung pass is still reported in the log.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::{Instant, Interval, MissedTickBehavior};

/// How long the daemon lets operations in progress run on after SIGTERM
/// before it exits anyway. Below the unit's `TimeoutStopSec=` (90 s), so the
/// daemon ends on its own terms rather than by SIGKILL; an operation cut
/// short is finished by recovery at the next start.
pub const STOP_GRACE: Duration = Duration::from_secs(60);

/// Test-only fault injection: `DEPLOY_AGENT_TEST_STALL_LOOP=await` makes the
/// first periodic reconciliation pass wait forever (like a Docker call that
/// never answers), `=block` makes it block its thread (like a deadlock). The
/// sd-notify tests use it to prove that a hung loop stops the watchdog
/// pings; see ARCHITECTURE.md, Testing hooks.
pub const STALL_HOOK_ENV: &str = "DEPLOY_AGENT_TEST_STALL_LOOP";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stall {
    Await,
    Block,
}

fn stall_hook() -> Option<Stall> {
    match std::env::var(STALL_HOOK_ENV).ok()?.as_str() {
        "await" | "1" => Some(Stall::Await),
        "block" => Some(Stall::Block),
        other => {
            tracing::warn!("{STALL_HOOK_ENV}={other:?} is not await or block: ignored");
            None
        }
    }
}

/// Whether stderr is the journal stream systemd connected (`JOURNAL_STREAM`
/// is `DEV:INODE` of that stream). Checking the inode, as sd_journal_stream
/// documents, keeps a daemon started by hand from a shell that inherited the
/// variable (e.g. `systemd-run --shell`) from logging out of sight.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (
        dev.parse::<nix::libc::dev_t>(),
        ino.parse::<nix::libc::ino_t>(),
    ) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// Sends notifications to the service manager; errors are logged, never
/// fatal (a daemon run by hand has no service manager).
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// The watchdog as systemd set it up (`WATCHDOG_USEC`, and `WATCHDOG_PID`
/// naming this process or absent).
#[derive(Debug, Clone, Copy)]
pub struct Watchdog {
    interval: Option<Duration>,
}

impl Watchdog {
    pub fn from_env() -> Watchdog {
        Watchdog {
            interval: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()),
        }
    }

    /// How often the loop wakes up: half the watchdog interval, as systemd
    /// recommends; without a watchdog, once a second (to notice a hung pass).
    fn tick_period(&self) -> Duration {
        self.interval
            .map(|w| (w / 2).max(Duration::from_millis(50)))
            .unwrap_or(Duration::from_secs(1))
    }

    fn ticker(&self) -> Interval {
        let mut t = tokio::time::interval(self.tick_period());
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        t
    }

    fn ping(&self) {
        if self.interval.is_some() {
            notify(&[NotifyState::Watchdog]);
        }
    }
}

/// What the daemon is doing, for `STATUS=` lines and the metrics.
#[derive(Debug)]
pub struct StatusBoard {
    board: Mutex<Board>,
    next_op: AtomicU64,
}

#[derive(Debug, Default)]
struct Board {
    phase: Phase,
    /// Operations in progress, by a private id, with a label for people.
    operations: BTreeMap<u64, String>,
    /// When the pass in progress began.
    pass_started: Option<Instant>,
    /// The pass in progress ran past `reconcile_timeout_secs`.
    stuck: Option<String>,
    /// End of the last pass: UTC time and how long it took.
    last_pass: Option<(jiff::Timestamp, Duration)>,
    passes: u64,
    failed_passes: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    Starting,
    Serving,
    Stopping,
}

/// A snapshot of the reconciliation loop for the metrics.
#[derive(Debug, Clone, Copy)]
pub struct LoopSnapshot {
    pub operations_in_progress: usize,
    pub passes: u64,
    pub failed_passes: u64,
    /// Seconds the pass in progress has been running (0 when idle).
    pub pass_running_secs: f64,
    pub stuck: bool,
    /// UNIX time of the end of the last pass.
    pub last_pass_end: Option<f64>,
    pub last_pass_secs: Option<f64>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        StatusBoard::new()
    }
}

impl StatusBoard {
    pub fn new() -> StatusBoard {
        StatusBoard {
            board: Mutex::new(Board::default()),
            next_op: AtomicU64::new(0),
        }
    }

    /// A panic while holding the lock leaves only display state behind.
    fn lock(&self) -> MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `READY=1` with the first status line: the API socket is listening.
    pub fn ready(&self) {
        let status = {
            let mut b = self.lock();
            b.phase = Phase::Serving;
            b.status_line()
        };
        notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }

    /// `STOPPING=1`: no new operations; the ones in progress may finish.
    pub fn stopping(&self) {
        let status = {
            let mut b = self.lock();
            b.phase = Phase::Stopping;
            b.status_line()
        };
        notify(&[NotifyState::Stopping, NotifyState::Status(&status)]);
    }

    fn publish(&self) {
        let status = self.lock().status_line();
        notify(&[NotifyState::Status(&status)]);
    }

    /// Registers an operation (e.g. "deploy of web release 3f2a9c1") until
    /// the guard is dropped.
    pub fn operation(self: &std::sync::Arc<Self>, label: String) -> OperationGuard {
        let id = self.next_op.fetch_add(1, Ordering::Relaxed);
        self.lock().operations.insert(id, label);
        self.publish();
        OperationGuard {
            board: self.clone(),
            id,
        }
    }

    pub fn operations_in_progress(&self) -> usize {
        self.lock().operations.len()
    }

    /// Waits until no operation is in progress; `false` if `grace` passed first.
    pub async fn wait_idle(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        loop {
            if self.operations_in_progress() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn snapshot(&self) -> LoopSnapshot {
        let b = self.lock();
        LoopSnapshot {
            operations_in_progress: b.operations.len(),
            passes: b.passes,
            failed_passes: b.failed_passes,
            pass_running_secs: b
                .pass_started
                .map(|s| s.elapsed().as_secs_f64())
                .unwrap_or(0.0),
            stuck: b.stuck.is_some(),
            last_pass_end: b
                .last_pass
                .map(|(at, _)| at.as_millisecond() as f64 / 1000.0),
            last_pass_secs: b.last_pass.map(|(_, took)| took.as_secs_f64()),
        }
    }

    fn pass_started(&self) {
        self.lock().pass_started = Some(Instant::now());
        self.publish();
    }

    fn pass_stuck(&self, running: Duration, timeout: Duration) {
        let why = format!(
            "reconciliation pass running for {}s, over reconcile_timeout_secs={}: the loop counts as hung and no longer pings the watchdog",
            running.as_secs(),
            timeout.as_secs()
        );
        tracing::error!("{why}");
        self.lock().stuck = Some(why);
        self.publish();
    }

    fn pass_finished(&self, result: Result<(), String>) {
        {
            let mut b = self.lock();
            let took = b
                .pass_started
                .take()
                .map(|s| s.elapsed())
                .unwrap_or_default();
            b.stuck = None;
            b.last_pass = Some((jiff::Timestamp::now(), took));
            b.passes += 1;
            if result.is_err() {
                b.failed_passes += 1;
            }
        }
        if let Err(e) = result {
            tracing::warn!("reconciliation failed: {e}");
        }
        // At start, READY=1 carries the next status line.
        if self.lock().phase != Phase::Starting {
            self.publish();
        }
    }
}

impl Board {
    /// One line for `systemctl status`: what runs now, else when the agent
    /// last checked its projects.
    fn status_line(&self) -> String {
        let mut parts = Vec::new();
        match self.phase {
            Phase::Starting => {
                parts.push("starting: finishing interrupted operations, repairing drift".into())
            }
            Phase::Stopping => parts.push(format!(
                "stopping: {} operation(s) may finish (up to {}s)",
                self.operations.len(),
                STOP_GRACE.as_secs()
            )),
            Phase::Serving => {}
        }
        if let Some(stuck) = &self.stuck {
            parts.push(stuck.clone());
        } else if self.pass_started.is_some() && self.phase == Phase::Serving {
            parts.push("reconciling".into());
        }
        if !self.operations.is_empty() {
            let ops: Vec<&str> = self.operations.values().map(String::as_str).collect();
            parts.push(format!("in progress: {}", ops.join(", ")));
        }
        if parts.is_empty() {
            parts.push(match self.last_pass {
                Some((at, took)) => format!(
                    "idle; last reconciliation at {:.0} took {:.1}s",
                    at,
                    took.as_secs_f64()
                ),
                None => "idle; serving the local API".into(),
            });
        }
        parts.join("; ")
    }
}

/// Removes its operation from the [`StatusBoard`] when dropped (also when
/// the operation's task panics).
#[derive(Debug)]
pub struct OperationGuard {
    board: std::sync::Arc<StatusBoard>,
    id: u64,
}

impl Drop for OperationGuard {
    fn drop(&mut self) {
        self.board.lock().operations.remove(&self.id);
        self.board.publish();
    }
}

/// Settings of the loop, from agent.toml and the environment.
#[derive(Debug, Clone, Copy)]
pub struct LoopSettings {
    pub every: Duration,
    pub pass_timeout: Duration,
    pub watchdog: Watchdog,
}

impl LoopSettings {
    pub fn new(config: &crate::config::AgentConfig) -> LoopSettings {
        LoopSettings {
            every: Duration::from_secs(config.reconcile_interval_secs.max(1)),
            pass_timeout: Duration::from_secs(config.reconcile_timeout_secs.max(1)),
            watchdog: Watchdog::from_env(),
        }
    }
}

/// Runs the reconciliation pass at start, before `READY=1`. It extends
/// systemd's start timeout (`EXTEND_TIMEOUT_USEC`) while it is within its
/// time limit, so a long recovery is not mistaken for a failed start, and a
/// hung one is.
pub async fn startup_pass<Fut>(board: &StatusBoard, settings: LoopSettings, pass: Fut)
where
    Fut: Future<Output = Result<(), String>>,
{
    board.pass_started();
    let mut ticker = settings.watchdog.ticker();
    let result = supervise(board, settings, &mut ticker, true, pass).await;
    board.pass_finished(result);
}

/// The daemon's main loop: a reconciliation pass every `every`, the
/// watchdog pinged from this same task (see the module doc). Never returns;
/// the daemon aborts it at shutdown.
pub async fn reconcile_loop<F, Fut>(board: &StatusBoard, settings: LoopSettings, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut ticker = settings.watchdog.ticker();
    let mut stall = stall_hook();
    let mut next = Instant::now() + settings.every;
    loop {
        tokio::select! {
            _ = ticker.tick() => settings.watchdog.ping(),
            () = tokio::time::sleep_until(next) => {
                board.pass_started();
                let run = stalled(stall.take(), pass());
                let result = supervise(board, settings, &mut ticker, false, run).await;
                board.pass_finished(result);
                next = Instant::now() + settings.every;
            }
        }
    }
}

/// Polls `fut` to its end in this task, pinging the watchdog on every tick
/// while `fut` has run for less than the pass timeout.
async fn supervise<Fut: Future>(
    board: &StatusBoard,
    settings: LoopSettings,
    ticker: &mut Interval,
    starting: bool,
    fut: Fut,
) -> Fut::Output {
    let began = Instant::now();
    let mut stuck = false;
    tokio::pin!(fut);
    loop {
        tokio::select! {
            biased;
            out = &mut fut => {
                if stuck {
                    tracing::warn!(
                        "the reconciliation pass ended after {}s after all",
                        began.elapsed().as_secs()
                    );
                }
                return out;
            }
            _ = ticker.tick() => {
                let running = began.elapsed();
                if running < settings.pass_timeout {
                    if starting {
                        // The watchdog is armed only once READY=1 is sent;
                        // until then, the start timeout is what a hang trips.
                        // Extend it enough to reach the next tick.
                        let extend = settings.watchdog.tick_period() * 3;
                        let usec = u32::try_from(extend.as_micros()).unwrap_or(u32::MAX);
                        notify(&[NotifyState::ExtendTimeoutUsec(usec)]);
                    } else {
                        settings.watchdog.ping();
                    }
                } else if !stuck {
                    stuck = true;
                    board.pass_stuck(running, settings.pass_timeout);
                }
            }
        }
    }
}

/// Applies the test stall hook to one pass.
async fn stalled<Fut: Future<Output = Result<(), String>>>(
    stall: Option<Stall>,
    fut: Fut,
) -> Result<(), String> {
    match stall {
        None => fut.await,
        Some(Stall::Await) => {
            tracing::warn!("{STALL_HOOK_ENV}: this reconciliation pass waits forever");
            std::future::pending().await
        }
        Some(Stall::Block) => {
            tracing::warn!("{STALL_HOOK_ENV}: this reconciliation pass blocks its thread");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn status_lines_say_what_runs() {
        let board = Arc::new(StatusBoard::new());
        assert!(board.lock().status_line().starts_with("starting"));
        board.lock().phase = Phase::Serving;
        assert_eq!(board.lock().status_line(), "idle; serving the local API");
        let op = board.operation("deploy of web release 3f2a".into());
        assert_eq!(
            board.lock().status_line(),
            "in progress: deploy of web release 3f2a"
        );
        assert_eq!(board.operations_in_progress(), 1);
        drop(op);
        assert_eq!(board.operations_in_progress(), 0);
        board.pass_started();
        assert_eq!(board.lock().status_line(), "reconciling");
        board.pass_finished(Ok(()));
        assert!(
            board
                .lock()
                .status_line()
                .starts_with("idle; last reconciliation at ")
        );
        assert_eq!(board.snapshot().passes, 1);
    }

    #[tokio::test]
    async fn a_hung_pass_is_reported_once_past_its_timeout() {
        let board = StatusBoard::new();
        let settings = LoopSettings {
            every: Duration::from_secs(1),
            pass_timeout: Duration::from_millis(300),
            watchdog: Watchdog {
                interval: Some(Duration::from_millis(100)),
            },
        };
        let mut ticker = settings.watchdog.ticker();
        let pass = async {
            tokio::time::sleep(Duration::from_millis(900)).await;
            Ok::<(), String>(())
        };
        board.pass_started();
        let supervised = supervise(&board, settings, &mut ticker, false, pass);
        tokio::pin!(supervised);
        // Within its timeout: not stuck.
        tokio::select! {
            _ = &mut supervised => panic!("the pass ended early"),
            () = tokio::time::sleep(Duration::from_millis(150)) => {}
        }
        assert!(!board.snapshot().stuck);
        tokio::select! {
            _ = &mut supervised => panic!("the pass ended early"),
            () = tokio::time::sleep(Duration::from_millis(400)) => {}
        }
        assert!(board.snapshot().stuck);
        assert!(
            board
                .lock()
                .status_line()
                .contains("over reconcile_timeout_secs=0"),
            "{}",
            board.lock().status_line()
        );
        let result = supervised.await;
        board.pass_finished(result);
        let snap = board.snapshot();
        assert!(!snap.stuck);
        assert_eq!(snap.passes, 1);
    }
}
