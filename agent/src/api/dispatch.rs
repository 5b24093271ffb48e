//! One operation, whichever door it came through: the daemon's router
//! (agent.sock, HTTPS), `serve-stdio` and the CLI without a daemon all call
//! [`Api::dispatch`] with an [`Op`] of the operation table, the caller and
//! the request's JSON. Nothing here knows about HTTP.

use std::sync::Arc;

use deploy_protocol::ops::Input;
use deploy_protocol::{Caller, Op, Query};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::engine::{Engine, OpError};
use crate::metrics::Metrics;
use crate::service::StatusBoard;
use crate::wire::{Event, OperationResult, Outcome};

/// What an operation answers.
pub enum Answer {
    /// One JSON document.
    Json(serde_json::Value),
    /// Plain text (`ping`, `metrics`).
    Text(String),
    /// A deploy or rollback: its events, the last one its result. The
    /// operation runs in its own task: a caller that goes away never
    /// cancels a rollout half way.
    Events(mpsc::UnboundedReceiver<Event>),
}

/// The engine and what serves it, as every door sees it.
pub struct Api {
    pub engine: Arc<Engine>,
    /// The daemon's operations in progress (for `STATUS=`, metrics and a
    /// graceful stop); none in a one-shot process.
    pub board: Option<Arc<StatusBoard>>,
    /// The daemon's metrics; none in a one-shot process.
    pub metrics: Option<Arc<Metrics>>,
}

/// The request of `op`, typed; a clear error when it does not fit.
pub fn typed<T: DeserializeOwned>(op: Op, input: serde_json::Value) -> Result<T, OpError> {
    let input = match (op.spec().input, input) {
        (Input::Query, serde_json::Value::Null) => serde_json::json!({}),
        (_, v) => v,
    };
    serde_json::from_value(input).map_err(|e| {
        OpError::new(
            Outcome::ConfigError,
            format!("the request of {} is not valid: {e}", op.name()),
        )
    })
}

fn json<T: serde::Serialize>(v: &T) -> Result<Answer, OpError> {
    serde_json::to_value(v).map(Answer::Json).map_err(|e| {
        OpError::new(
            Outcome::EnvironmentError,
            format!("cannot encode the answer: {e}"),
        )
    })
}

fn query(op: Op, input: serde_json::Value) -> Result<Query, OpError> {
    let q: Query = typed(op, input)?;
    q.check(op)
        .map_err(|m| OpError::new(Outcome::ConfigError, m))?;
    Ok(q)
}

impl Api {
    /// An engine in this process only (the CLI or `serve-stdio` when no
    /// daemon answers).
    pub fn in_process(engine: Engine) -> Api {
        Api {
            engine: Arc::new(engine),
            board: None,
            metrics: None,
        }
    }

    /// Does `op` for `caller`.
    pub async fn dispatch(
        &self,
        op: Op,
        caller: &Caller,
        input: serde_json::Value,
    ) -> Result<Answer, OpError> {
        let engine = &self.engine;
        match op {
            Op::Ping => Ok(Answer::Text("ok".into())),
            Op::Deploy => {
                let req: crate::wire::DeployRequest = typed(op, input)?;
                let label = format!("deploy of {} release {}", req.project, req.release);
                let caller = caller.clone();
                Ok(self.operation(label, move |engine, tx| async move {
                    engine.deploy(&req, &caller, &tx).await
                }))
            }
            Op::Rollback => {
                let req: crate::wire::RollbackRequest = typed(op, input)?;
                let label = format!(
                    "rollback of {} to {}",
                    req.project,
                    req.to.as_deref().unwrap_or("the previous release")
                );
                let caller = caller.clone();
                Ok(self.operation(label, move |engine, tx| async move {
                    engine.rollback(&req, &caller, &tx).await
                }))
            }
            Op::Status => {
                let q = query(op, input)?;
                json(&engine.status(q.project.as_deref()).await?)
            }
            Op::History => {
                let q = query(op, input)?;
                let project = q.project.as_deref().unwrap_or_default();
                json(&engine.store.history(project, q.limit_for(op))?)
            }
            Op::Audit => {
                let q = query(op, input)?;
                json(&engine.store.audit(q.project.as_deref(), q.limit_for(op))?)
            }
            Op::Release => json(&engine.release_info(&query(op, input)?)?),
            Op::Pull => {
                let req: crate::wire::PullRequest = typed(op, input)?;
                match crate::engine::pull::pre_pull(engine, &req).await {
                    Ok(r) => {
                        tracing::info!(who = %caller, project = %req.project, release = %req.release, "pre-pulled {} image(s)", r.digests.len());
                        json(&r)
                    }
                    Err(e) => {
                        tracing::warn!(who = %caller, project = %req.project, release = %req.release, "pre-pull failed: {}", e.message);
                        Err(e)
                    }
                }
            }
            Op::TakeLease => json(&engine.take_lease(caller, &typed(op, input)?)?),
            Op::LeaseStatus => json(&engine.current_lease()?),
            Op::RenewLease => json(&engine.renew_lease(caller, &typed(op, input)?)?),
            Op::GiveUpLease => json(&engine.give_up_lease(caller, &typed(op, input)?)?),
            Op::Approve => json(&engine.record_approval(caller, &typed(op, input)?)?),
            Op::Metrics => match &self.metrics {
                Some(m) => Ok(Answer::Text(m.render().await)),
                None => Err(OpError::not_found(
                    "metrics are served by the daemon (deploy-agent run), and none runs here",
                )),
            },
        }
    }

    /// Starts a deploy or rollback in its own task.
    fn operation<F, Fut>(&self, label: String, run: F) -> Answer
    where
        F: FnOnce(Arc<Engine>, mpsc::UnboundedSender<Event>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = OperationResult> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel::<Event>();
        let engine = self.engine.clone();
        let guard = self.board.as_ref().map(|b| b.operation(label));
        tokio::spawn(async move {
            let result = run(engine, tx.clone()).await;
            let _ = tx.send(Event::Result(result));
            drop(guard);
        });
        Answer::Events(rx)
    }
}
