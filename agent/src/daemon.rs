//! The control daemon (`deploy-agent run`): the local API on
//! `STATE_DIR/agent.sock`, and reconciliation at start and on a timer.
//!
//! Operations run in their own task, not in the request handler, so a CLI
//! that disconnects (or is killed) never cancels a rollout half way.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::{self, ConnectInfo};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::engine::{Engine, OpError};
use crate::wire::{ApiError, DeployRequest, Event, Outcome, RollbackRequest};

/// Who is on the other end of the unix socket, from the kernel (SO_PEERCRED).
#[derive(Clone, Debug)]
pub struct Peer {
    pub who: String,
}

impl connect_info::Connected<axum::serve::IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        let who = stream
            .io()
            .peer_cred()
            .map(|c| unix_user(c.uid()))
            .unwrap_or_else(|_| "unix:unknown".into());
        Peer { who }
    }
}

/// `unix:NAME` for a uid (or `unix:uid=N` when it has no name).
pub fn unix_user(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("unix:{}", u.name),
        _ => format!("unix:uid={uid}"),
    }
}

struct AppState {
    engine: Arc<Engine>,
    active: Arc<AtomicUsize>,
}

pub async fn run(engine: Engine, state_dir: &Path) -> anyhow::Result<()> {
    let engine = Arc::new(engine);
    let sock = state_dir.join("agent.sock");
    if UnixStream::connect(&sock).await.is_ok() {
        anyhow::bail!(
            "another deploy-agent daemon already answers on {}; stop it first (systemctl stop deploy-agent)",
            sock.display()
        );
    }
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {}: {e}; check --state-dir",
            sock.display()
        )
    })?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660));
    }

    // Reconcile before serving: an interrupted operation is finished first.
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    if let Err(e) = engine.reconcile_all(&tx).await {
        tracing::error!("reconciliation at start failed: {}", e.message);
    }

    let active = Arc::new(AtomicUsize::new(0));
    let state = Arc::new(AppState {
        engine: engine.clone(),
        active: active.clone(),
    });
    let app = Router::new()
        .route("/v1/ping", get(|| async { "ok" }))
        .route("/v1/deploy", post(deploy))
        .route("/v1/rollback", post(rollback))
        .route("/v1/status", get(status))
        .route("/v1/history", get(history))
        .with_state(state);

    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("serving the local API"),
    ]);
    tracing::info!(socket = %sock.display(), "deploy-agent daemon ready");

    let reconciler = {
        let engine = engine.clone();
        let every = Duration::from_secs(engine.config.reconcile_interval_secs.max(1));
        let watchdog = sd_notify::watchdog_enabled();
        tokio::spawn(async move {
            let tick = watchdog.map(|w| w / 2).unwrap_or(every).min(every);
            let mut last = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(tick).await;
                if watchdog.is_some() {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
                if last.elapsed() >= every {
                    last = tokio::time::Instant::now();
                    if let Err(e) = engine.reconcile_all(&tx).await {
                        tracing::warn!("reconciliation failed: {}", e.message);
                    }
                }
            }
        })
    };

    axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    reconciler.abort();
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // Let operations in progress reach their end (each step is persisted, so
    // a hard stop would also be recovered, but finishing is kinder).
    for _ in 0..600 {
        if active.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: no new operations accepted");
}

/// Stream the operation's events as JSON lines; the last is its result.
fn stream_operation<F, Fut>(state: &AppState, run: F) -> Response
where
    F: FnOnce(Arc<Engine>, mpsc::UnboundedSender<Event>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = crate::wire::OperationResult> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Event>();
    let engine = state.engine.clone();
    let active = state.active.clone();
    active.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        let result = run(engine, tx.clone()).await;
        let _ = tx.send(Event::Result(result));
        active.fetch_sub(1, Ordering::SeqCst);
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn deploy(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(req): Json<DeployRequest>,
) -> Response {
    stream_operation(&state, move |engine, tx| async move {
        engine.deploy(&req, &peer.who, &tx).await
    })
}

async fn rollback(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(req): Json<RollbackRequest>,
) -> Response {
    stream_operation(&state, move |engine, tx| async move {
        engine.rollback(&req, &peer.who, &tx).await
    })
}

#[derive(Deserialize)]
struct ProjectQuery {
    project: Option<String>,
}

fn api_error(e: OpError) -> Response {
    let code = match e.outcome {
        Outcome::ConfigError => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (
        code,
        Json(ApiError {
            outcome: e.outcome,
            message: e.message,
        }),
    )
        .into_response()
}

async fn status(State(state): State<Arc<AppState>>, Query(q): Query<ProjectQuery>) -> Response {
    match state.engine.status(q.project.as_deref()).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => api_error(e),
    }
}

async fn history(State(state): State<Arc<AppState>>, Query(q): Query<ProjectQuery>) -> Response {
    let Some(project) = q.project else {
        return api_error(OpError::new(
            Outcome::ConfigError,
            "history needs ?project=",
        ));
    };
    match state.engine.store.history(&project, 1000) {
        Ok(h) => Json(h).into_response(),
        Err(e) => api_error(e.into()),
    }
}
