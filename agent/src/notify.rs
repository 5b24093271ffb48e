//! Webhook notifications (`[notify]` in agent.toml): a thin adapter that
//! POSTs Slack-compatible JSON when a deploy or a rollback starts and ends,
//! including the automatic rollback the daemon does at the end of an
//! observation window nobody waits for (`deploy --no-wait`).
//!
//! A notification never blocks or fails an operation: the engine hands it to
//! [`Notifier::send`], which only queues it (after the ending is durable in
//! the store and the audit log). One background task delivers the queue in
//! order, each attempt bounded by `timeout`, retried with backoff; what
//! could not be delivered is logged (`warn`) and counted in
//! `deploy_agent_notifications_total{outcome="failed"}`.
//!
//! The body is `{"text": "…", "deploy_agent": {…}}`: Slack shows `text`
//! and ignores the rest; other receivers read the structured fields.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::{NotifyConfig, NotifyEvent};
use crate::wire::{OperationKind, Outcome};

/// How many notifications may wait for delivery; beyond that a new one is
/// dropped (and counted as failed) rather than held in memory forever.
const QUEUE: usize = 256;

/// Pauses before the second and the third attempt.
const BACKOFF: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(2)];

/// What happened, as the engine knows it.
#[derive(Debug, Clone, Serialize)]
pub struct Notification {
    pub event: NotifyEvent,
    pub operation: OperationKind,
    pub project: String,
    /// The release the operation puts in service.
    pub release: String,
    /// The release serving before the operation.
    pub previous: Option<String>,
    /// The release serving now (absent for `started`).
    pub serving: Option<String>,
    /// How the operation ended (absent for `started`).
    pub outcome: Option<Outcome>,
    /// True only when the agent undid a deploy by itself (a gate of the
    /// observation window or a canary hold failed).
    pub automatic: bool,
    /// The step that failed and why (`failed`, `rolled_back` after a failure).
    pub failure: Option<FailureNote>,
    /// The operation result's message (absent for `started`).
    pub message: Option<String>,
    /// Who asked (`unix:…`, `mtls:…`, `ssh:…`, or the reconciler).
    pub who: String,
    /// The reason given with the request (`--reason`).
    pub reason: Option<String>,
    pub duration_ms: Option<u64>,
}

/// The rollout's `Failure`, as sent.
#[derive(Debug, Clone, Serialize)]
pub struct FailureNote {
    pub step: String,
    pub reason: String,
}

/// Where the host is, added to every notification.
#[derive(Debug, Clone, Serialize)]
struct Origin {
    host: String,
    environment: Option<String>,
}

/// Sends notifications, or does nothing when `[notify]` is absent.
#[derive(Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    events: Vec<NotifyEvent>,
    /// `timeout` of one attempt: also how long a process about to exit
    /// waits for what it queued ([`Notifier::flush_before_exit`]).
    timeout: Duration,
    origin: Origin,
    queue: mpsc::Sender<serde_json::Value>,
    /// Queued and not yet delivered or given up.
    pending: AtomicUsize,
    settled: tokio::sync::Notify,
}

struct Delivery {
    client: reqwest::Client,
    url: reqwest::Url,
    /// The URL without its path (a Slack webhook's path is its secret).
    target: String,
}

impl Notifier {
    /// A notifier for `config`; starts its delivery task on the current Tokio
    /// runtime. Without a config, or when no HTTP client can be built, it
    /// sends nothing (the latter is logged).
    pub fn new(config: Option<&NotifyConfig>, environment: Option<&str>) -> Notifier {
        let Some(config) = config else {
            return Notifier::default();
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("webhook notifications are off: no async runtime to send them from");
            return Notifier::default();
        };
        let client = match reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .user_agent(concat!("deploy-agent/", env!("CARGO_PKG_VERSION")))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("webhook notifications are off: cannot build the HTTP client: {e}");
                return Notifier::default();
            }
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let inner = Arc::new(Inner {
            events: config.events.clone(),
            timeout: config.timeout,
            origin: Origin {
                host: crate::config::hostname(),
                environment: environment.map(str::to_string),
            },
            queue: tx,
            pending: AtomicUsize::new(0),
            settled: tokio::sync::Notify::new(),
        });
        let delivery = Delivery {
            client,
            url: config.webhook.0.clone(),
            target: config.webhook.redacted(),
        };
        runtime.spawn(deliver_all(Arc::downgrade(&inner), delivery, rx));
        Notifier { inner: Some(inner) }
    }

    /// Queue `n` for delivery, if its event is wanted. Never waits.
    pub fn send(&self, n: Notification) {
        let Some(inner) = &self.inner else { return };
        if !inner.events.contains(&n.event) {
            return;
        }
        let body = payload(&n, &inner.origin, &deploy_protocol::timestamp::now());
        inner.pending.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = inner.queue.try_send(body) {
            inner.settle();
            NOTIFICATIONS.record(false);
            tracing::warn!(
                event = n.event.as_str(),
                project = n.project.as_str(),
                release = n.release.as_str(),
                "webhook notification dropped: {}",
                match e {
                    mpsc::error::TrySendError::Full(_) =>
                        "too many are waiting for an unreachable webhook",
                    mpsc::error::TrySendError::Closed(_) => "the delivery task has stopped",
                }
            );
        }
    }

    /// [`Notifier::flush`] for at most one attempt's `timeout`: a command
    /// that did an operation in its own process calls it after printing the
    /// result, so its exit waits a little for the webhook, never its outcome.
    pub async fn flush_before_exit(&self) -> bool {
        let max = self.inner.as_ref().map(|i| i.timeout).unwrap_or_default();
        self.flush(max).await
    }

    /// Wait, at most `max`, until everything queued was delivered or given
    /// up. For a process about to exit (the CLI after an in-process
    /// operation, the daemon on SIGTERM); true when nothing is left.
    pub async fn flush(&self, max: Duration) -> bool {
        let Some(inner) = &self.inner else {
            return true;
        };
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let settled = inner.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if inner.pending.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return inner.pending.load(Ordering::SeqCst) == 0;
            }
        }
    }
}

impl Inner {
    fn settle(&self) {
        self.pending.fetch_sub(1, Ordering::SeqCst);
        self.settled.notify_waiters();
    }
}

/// The delivery task: one notification at a time, in order. It ends when
/// the notifier is gone.
async fn deliver_all(
    inner: std::sync::Weak<Inner>,
    delivery: Delivery,
    mut rx: mpsc::Receiver<serde_json::Value>,
) {
    while let Some(body) = rx.recv().await {
        let sent = delivery.post(&body).await;
        NOTIFICATIONS.record(sent);
        match inner.upgrade() {
            Some(inner) => inner.settle(),
            None => return,
        }
    }
}

impl Delivery {
    /// POST with retries; true once the receiver answered 2xx.
    async fn post(&self, body: &serde_json::Value) -> bool {
        let event = body["deploy_agent"]["event"].as_str().unwrap_or("?");
        let mut last = String::new();
        for attempt in 0..=BACKOFF.len() {
            if attempt > 0 {
                tokio::time::sleep(BACKOFF[attempt - 1]).await;
            }
            match self.client.post(self.url.clone()).json(body).send().await {
                Ok(r) if r.status().is_success() => {
                    tracing::debug!(event, target = self.target.as_str(), "webhook notified");
                    return true;
                }
                Ok(r) => {
                    let status = r.status();
                    last = format!("the webhook answered {status}");
                    // The receiver refused this request (bad URL, revoked
                    // token): asking again will not change its mind.
                    let retry = status.is_server_error()
                        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                        || status == reqwest::StatusCode::REQUEST_TIMEOUT;
                    if !retry {
                        break;
                    }
                }
                Err(e) => {
                    // reqwest's error names the URL: keep its secret path out.
                    last = error_chain(&e.without_url());
                }
            }
            tracing::debug!(event, attempt, "webhook notification not delivered: {last}");
        }
        tracing::warn!(
            event,
            target = self.target.as_str(),
            project = body["deploy_agent"]["project"].as_str().unwrap_or("?"),
            release = body["deploy_agent"]["release"].as_str().unwrap_or("?"),
            "webhook notification failed: {last}"
        );
        false
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// The JSON body: Slack's `text`, and the same facts as fields.
fn payload(n: &Notification, origin: &Origin, ts: &str) -> serde_json::Value {
    let mut fields = serde_json::to_value(n).unwrap_or_default();
    if let Some(map) = fields.as_object_mut() {
        map.insert("host".into(), origin.host.clone().into());
        map.insert("environment".into(), origin.environment.clone().into());
        map.insert("ts".into(), ts.into());
    }
    serde_json::json!({ "text": text(n, origin), "deploy_agent": fields })
}

/// One line for a chat channel.
fn text(n: &Notification, origin: &Origin) -> String {
    let host = match &origin.environment {
        Some(env) => format!("{} ({env})", origin.host),
        None => origin.host.clone(),
    };
    let project = &n.project;
    let release = &n.release;
    let failure = n
        .failure
        .as_ref()
        .map(|f| format!(": {} failed: {}", f.step, f.reason))
        .unwrap_or_default();
    let serving = match &n.serving {
        Some(s) => format!("; {s} is serving"),
        None => "; nothing is serving".into(),
    };
    let took = n
        .duration_ms
        .map(|ms| format!(" in {:.1}s", ms as f64 / 1000.0))
        .unwrap_or_default();
    let line = match (n.event, n.operation) {
        (NotifyEvent::Started, OperationKind::Rollback) => format!(
            "Rollback of {project} to {release} started on {host} by {}{}",
            n.who,
            n.previous
                .as_deref()
                .map(|p| format!(" (serving now: {p})"))
                .unwrap_or_default()
        ),
        (NotifyEvent::Started, _) => format!(
            "Deploy of {project} {release} started on {host} by {} (serving now: {})",
            n.who,
            n.previous.as_deref().unwrap_or("nothing")
        ),
        (NotifyEvent::Succeeded, _) => {
            format!("Deploy of {project} {release} succeeded on {host}{took}")
        }
        (NotifyEvent::RolledBack, _) if n.automatic => {
            format!("{project} {release} was rolled back automatically on {host}{failure}{serving}")
        }
        (NotifyEvent::RolledBack, _) => {
            format!(
                "{project} was rolled back to {release} on {host} by {}{took}",
                n.who
            )
        }
        (NotifyEvent::Failed, op) => format!(
            "{} of {project} {release} failed on {host}{failure}{serving}",
            match op {
                OperationKind::Rollback => "Rollback",
                OperationKind::Deploy => "Deploy",
                OperationKind::Reconcile => "Reconciliation",
            }
        ),
    };
    let mut line = slack_escape(&line);
    if let Some(r) = &n.reason {
        line.push_str(&format!(" — reason: {}", slack_escape(r)));
    }
    line
}

/// Slack reads `&`, `<` and `>` as markup in `text`.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Webhook notifications of this process by whether the
/// receiver took them (`sent`) or every attempt failed (`failed`).
pub static NOTIFICATIONS: NotificationCounters = NotificationCounters::new();

pub struct NotificationCounters {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
}

impl Default for NotificationCounters {
    fn default() -> Self {
        NotificationCounters::new()
    }
}

impl NotificationCounters {
    pub const fn new() -> NotificationCounters {
        NotificationCounters {
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Counts one notification, delivered or given up.
    pub fn record(&self, sent: bool) {
        let c = if sent { &self.sent } else { &self.failed };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(event: NotifyEvent) -> Notification {
        Notification {
            event,
            operation: OperationKind::Deploy,
            project: "web".into(),
            release: "v2".into(),
            previous: Some("v1".into()),
            serving: Some("v1".into()),
            outcome: Some(Outcome::HealthGateFailed),
            automatic: true,
            failure: Some(FailureNote {
                step: "observe".into(),
                reason: "observation window: 3 consecutive probe failures <404>".into(),
            }),
            message: Some("deploy v2 failed".into()),
            who: "unix:ci".into(),
            reason: Some("ticket-1".into()),
            duration_ms: Some(12_345),
        }
    }

    fn origin() -> Origin {
        Origin {
            host: "h1".into(),
            environment: Some("production".into()),
        }
    }

    #[test]
    fn the_body_has_slack_text_and_every_field() {
        let body = payload(
            &note(NotifyEvent::RolledBack),
            &origin(),
            "2025-01-01T00:00:00Z",
        );
        let f = &body["deploy_agent"];
        assert_eq!(f["event"], "rolled_back");
        assert_eq!(f["operation"], "deploy");
        assert_eq!(f["project"], "web");
        assert_eq!(f["release"], "v2");
        assert_eq!(f["previous"], "v1");
        assert_eq!(f["serving"], "v1");
        assert_eq!(f["outcome"], "health_gate_failed");
        assert_eq!(f["automatic"], true);
        assert_eq!(f["failure"]["step"], "observe");
        assert_eq!(f["reason"], "ticket-1");
        assert_eq!(f["host"], "h1");
        assert_eq!(f["environment"], "production");
        assert_eq!(f["duration_ms"], 12_345);
        assert_eq!(f["ts"], "2025-01-01T00:00:00Z");
        let text = body["text"].as_str().unwrap();
        assert!(
            text.starts_with(
                "web v2 was rolled back automatically on h1 (production): observe failed: "
            ),
            "{text}"
        );
        assert!(text.contains("&lt;404&gt;"), "{text}");
        assert!(text.contains("v1 is serving — reason: ticket-1"), "{text}");
    }

    #[test]
    fn each_event_reads_as_one_line() {
        let mut n = note(NotifyEvent::Started);
        n.failure = None;
        n.outcome = None;
        n.reason = None;
        assert_eq!(
            text(&n, &origin()),
            "Deploy of web v2 started on h1 (production) by unix:ci (serving now: v1)"
        );
        n.event = NotifyEvent::Succeeded;
        n.serving = Some("v2".into());
        assert_eq!(
            text(&n, &origin()),
            "Deploy of web v2 succeeded on h1 (production) in 12.3s"
        );
        n.event = NotifyEvent::RolledBack;
        n.operation = OperationKind::Rollback;
        n.automatic = false;
        n.release = "v1".into();
        assert_eq!(
            text(
                &n,
                &Origin {
                    host: "h1".into(),
                    environment: None
                }
            ),
            "web was rolled back to v1 on h1 by unix:ci in 12.3s"
        );
        let mut f = note(NotifyEvent::Failed);
        f.automatic = false;
        f.reason = None;
        f.failure = Some(FailureNote {
            step: "await_healthy".into(),
            reason: "web-0 unhealthy".into(),
        });
        assert_eq!(
            text(&f, &origin()),
            "Deploy of web v2 failed on h1 (production): await_healthy failed: web-0 unhealthy; v1 is serving"
        );
    }

    #[tokio::test]
    async fn an_absent_config_sends_nothing_and_flushes_at_once() {
        let n = Notifier::new(None, None);
        n.send(note(NotifyEvent::Started));
        assert!(n.flush(Duration::from_millis(1)).await);
    }
}
