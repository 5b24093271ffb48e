//! The control daemon (`deploy-agent run`): runs the process. It binds
//! `STATE_DIR/agent.sock` (and the HTTPS API and metrics listener when
//! configured) before `READY=1`, reconciles before serving and then on a
//! timer, serves the API router ([`crate::api`]) until told to stop, and
//! stops gracefully.
//!
//! Operations run in their own task, not in the request handler
//! ([`crate::api::Api::dispatch`]), so a CLI that disconnects (or is
//! killed) never cancels a rollout half way.

use std::path::Path;
use std::sync::Arc;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::api::{self, Api, Peer};
use crate::engine::Engine;
use crate::metrics::{self, Metrics};
use crate::service::{self, STOP_GRACE, StatusBoard};
use crate::wire::Event;

/// Runs the daemon until `shutdown` resolves (SIGTERM, Ctrl-C).
pub async fn run(
    engine: Engine,
    state_dir: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let engine = Arc::new(engine);
    let sock = state_dir.join("agent.sock");
    let listener = bind_socket(&sock).await?;

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
    let tls_api = api::tls::TlsApi::bind(&engine.config, engine.store.clone()).await?;

    // Reconcile before serving: an interrupted operation is finished first.
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    service::startup_pass(&board, settings, async {
        engine.reconcile_all(&tx).await.map_err(|e| e.message)
    })
    .await;

    let api = Arc::new(Api {
        engine: engine.clone(),
        board: Some(board.clone()),
        metrics: Some(metrics.clone()),
    });
    let app = api::router(api.clone());
    let tls_task = tls_api.map(|tls| tls.serve(app.clone()));
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

    // On the unix socket only, a request from `serve-stdio` may name its
    // SSH caller (the HTTPS API never looks at it).
    let app = app.layer(axum::middleware::from_fn_with_state(api, api::via::ssh_via));
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
        () = shutdown => None,
    };
    tracing::info!("shutting down: no new operations accepted");
    reconciler.abort();
    if let Some(t) = &tls_task {
        t.abort(); // no new HTTPS connections
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

/// Binds agent.sock (mode 0660), refusing when another daemon answers.
async fn bind_socket(sock: &Path) -> anyhow::Result<UnixListener> {
    if UnixStream::connect(sock).await.is_ok() {
        anyhow::bail!(
            "another deploy-agent daemon already answers on {}; stop it first (systemctl stop deploy-agent)",
            sock.display()
        );
    }
    let _ = std::fs::remove_file(sock);
    let listener = UnixListener::bind(sock).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {}: {e}; check --state-dir",
            sock.display()
        )
    })?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o660));
    }
    Ok(listener)
}
