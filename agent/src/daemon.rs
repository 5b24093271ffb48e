//! The control daemon (`deploy-agent run`): the local API on
//! `STATE_DIR/agent.sock`, and reconciliation at start and on a timer.
//!
//! Operations run in their own task, not in the request handler, so a CLI
//! that disconnects (or is killed) never cancels a rollout half way.

use std::path::Path;
use std::sync::Arc;

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
use crate::metrics::{self, Metrics};
use crate::service::{self, STOP_GRACE, StatusBoard};
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
    /// Operations in progress and the reconciliation loop, for `STATUS=`,
    /// the metrics and a graceful stop.
    board: Arc<StatusBoard>,
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

    let board = Arc::new(StatusBoard::new());
    let settings = service::LoopSettings::new(&engine.config);
    let metrics = Arc::new(Metrics::new(engine.clone(), board.clone()));
    // Bound before READY, so that a taken or bad address fails the start.
    let metrics_listener = match engine.config.metrics_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for metrics on {addr} (metrics_listen in agent.toml): {e}"
            )
        })?),
        None => None,
    };
    // issue 4: the HTTPS API (mutual TLS), bound before READY like metrics.
    let tls_api = crate::api::tls::TlsApi::bind(&engine.config, engine.store.clone()).await?;

    // Reconcile before serving: an interrupted operation is finished first.
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    service::startup_pass(&board, settings, async {
        engine.reconcile_all(&tx).await.map_err(|e| e.message)
    })
    .await;

    let state = Arc::new(AppState {
        engine: engine.clone(),
        board: board.clone(),
    });
    let app = Router::new()
        .route("/v1/ping", get(|| async { "ok" }))
        .route("/v1/deploy", post(deploy))
        .route("/v1/rollback", post(rollback))
        .route("/v1/status", get(status))
        .route("/v1/history", get(history))
        .with_state(state)
        .merge(crate::api::routes(engine.clone())) // issue 4: pull, audit, release, lock
        .merge(metrics::router(metrics.clone()));
    // issue 4: the same router over HTTPS, authorized per certificate.
    let tls_task = tls_api.map(|api| api.serve(app.clone()));
    if let Some(listener) = metrics_listener {
        let addr = listener.local_addr().ok();
        let router = metrics::router(metrics);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!("the metrics listener on {addr:?} failed: {e}");
            }
        });
    }

    board.ready();
    tracing::info!(socket = %sock.display(), "deploy-agent daemon ready");

    // The main loop; it also pings the systemd watchdog (see `service`).
    let reconciler = {
        let engine = engine.clone();
        let board = board.clone();
        tokio::spawn(async move {
            service::reconcile_loop(&board, settings, || {
                let engine = engine.clone();
                let tx = tx.clone();
                async move { engine.reconcile_all(&tx).await.map_err(|e| e.message) }
            })
            .await;
        })
    };

    // issue 5: on the unix socket only, a request from `deploy-agent
    // serve-stdio` names its SSH caller (the HTTPS API never looks at it).
    let app = app.layer(axum::middleware::from_fn_with_state(
        engine.clone(),
        ssh_via,
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    let ended = tokio::select! {
        r = &mut server => Some(r),
        () = shutdown_signal() => None,
    };
    reconciler.abort();
    if let Some(t) = &tls_task {
        t.abort(); // issue 4: no new HTTPS connections
    }
    if let Some(r) = ended {
        let _ = std::fs::remove_file(&sock);
        r??;
        anyhow::bail!("the local API server stopped by itself");
    }
    // SIGTERM: accept nothing new; let operations in progress reach their
    // end, for at most STOP_GRACE. One still running then is cut at its
    // current step, which was persisted before it was taken: the next start
    // recovers it (the same as after kill -9, only rarer).
    board.stopping();
    let _ = stop_tx.send(());
    let idle = tokio::time::timeout(STOP_GRACE, async {
        let _ = (&mut server).await;
        board.wait_idle(STOP_GRACE).await
    })
    .await
    .unwrap_or(false);
    if idle {
        tracing::info!("stopped: no operation in progress");
    } else {
        tracing::warn!(
            "stopping with {} operation(s) still running after {}s; the next start finishes them from their last persisted step",
            board.operations_in_progress(),
            STOP_GRACE.as_secs()
        );
    }
    server.abort();
    let _ = std::fs::remove_file(&sock);
    // Webhook notifications still queued (an operation that just ended).
    engine.notifier.flush_before_exit().await;
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
fn stream_operation<F, Fut>(state: &AppState, label: String, run: F) -> Response
where
    F: FnOnce(Arc<Engine>, mpsc::UnboundedSender<Event>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = crate::wire::OperationResult> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Event>();
    let engine = state.engine.clone();
    let guard = state.board.operation(label);
    tokio::spawn(async move {
        let result = run(engine, tx.clone()).await;
        let _ = tx.send(Event::Result(result));
        drop(guard);
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
    let label = format!("deploy of {} release {}", req.project, req.release);
    stream_operation(&state, label, move |engine, tx| async move {
        engine.deploy(&req, &peer.who, &tx).await
    })
}

async fn rollback(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(req): Json<RollbackRequest>,
) -> Response {
    let label = format!(
        "rollback of {} to {}",
        req.project,
        req.to.as_deref().unwrap_or("the previous release")
    );
    stream_operation(&state, label, move |engine, tx| async move {
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
    (code, Json(ApiError::new(e.outcome, e.message))).into_response()
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

// --- SSH callers (issue 5) --------------------------------------------------

/// On agent.sock: a request carrying `x-deploy-agent-via` (set by
/// `deploy-agent serve-stdio`, run by `deploy-controller` over SSH) is
/// recorded as that SSH caller: the Unix user comes from the kernel
/// (SO_PEERCRED, as for every local request), the SSH details (key
/// fingerprint, client address, controller) from the header. It leaves an
/// `ssh.request` audit record before it is carried out.
async fn ssh_via(
    State(engine): State<Arc<Engine>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(value) = req.headers().get(crate::stdio::VIA_HEADER) else {
        return next.run(req).await;
    };
    let caller = match crate::stdio::decode_via(value.as_bytes()) {
        Ok(c) => c,
        Err(m) => return api_error(OpError::new(Outcome::ConfigError, m)),
    };
    let unix = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| c.0.who.clone())
        .unwrap_or_else(|| "unix:unknown".into());
    let user = unix.strip_prefix("unix:").unwrap_or(&unix).to_string();
    let who = caller.who(&user);
    if let Err(e) = crate::stdio::audit_ssh_request(&engine.store, &who, &caller, "daemon") {
        return api_error(e);
    }
    tracing::info!(who = %who, op = %caller.op, "request over SSH (deploy-agent serve-stdio)");
    req.extensions_mut().insert(ConnectInfo(Peer { who }));
    next.run(req).await
}

// --- end issue 5 --------------------------------------------------------------
