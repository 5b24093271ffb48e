//! The proxy process: the listeners (data path) and the control socket
//! (control path).
//!
//! The control side keeps its bookkeeping in a [`Registry`] behind a tokio
//! mutex that only control requests take. The data path never sees that
//! mutex: it reads each listener's `ArcSwap<RouteTable>` and atomic counters,
//! which the registry prepares before swapping them in.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::Mutex;
use tokio::task::{JoinHandle, JoinSet};

use super::listener::{self, RunningListener};
use super::persist;
use super::protocol::{ControlRequest, ControlResponse, ProxyStatus, Route, RouteStatus};
use super::routes::{BackendTarget, ReleaseCounters, RouteTable, backend_client};
use super::{ProxyError, SHUTDOWN_GRACE, SOCKET_FILE};

/// Largest control request line accepted (a route with thousands of
/// backends still fits).
const MAX_CONTROL_LINE: u64 = 1024 * 1024;

/// How long a container that left its route keeps its (zero) in-flight
/// gauge. Long enough that a request which picked the container just before
/// the switch still finds its gauge listed; short enough to bound memory.
const GAUGE_RETENTION: Duration = Duration::from_secs(600);

/// Runs the proxy until `shutdown` completes.
///
/// Startup: create `state_dir`, refuse to start if another proxy answers on
/// the control socket, listen on every persisted route (a route whose address
/// cannot be bound is logged and skipped), then serve the control socket and
/// tell systemd we are ready.
///
/// Shutdown: stop accepting everywhere, let in-flight requests finish for at
/// most 30 seconds, then return.
pub async fn run(state_dir: &Path, shutdown: impl Future<Output = ()>) -> Result<(), ProxyError> {
    std::fs::create_dir_all(state_dir).map_err(|err| {
        ProxyError::io(
            format!("cannot create the state directory {}", state_dir.display()),
            err,
        )
    })?;
    let socket_path = state_dir.join(SOCKET_FILE);
    remove_stale_socket(&socket_path).await?;

    let mut registry = Registry::new(state_dir.to_path_buf());
    for route in persist::load(state_dir)? {
        let bind = route.bind;
        match listener::bind(bind) {
            Ok(tcp) => registry.insert(route, tcp),
            Err(err) => tracing::error!(
                "cannot listen on {bind}: {err}; the route for {}/{} is not served until the daemon sets it again",
                route.project,
                route.service
            ),
        }
    }
    let routes = registry.routes.len();
    let registry = Arc::new(Mutex::new(registry));

    let control = bind_control_socket(&socket_path)?;
    tracing::info!(socket = %socket_path.display(), routes, "proxy ready");
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }

    tokio::select! {
        () = shutdown => tracing::info!("shutting down"),
        () = serve_control(control, Arc::clone(&registry)) => {}
    }
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }
    // Clients now get "not running" rather than a socket nobody reads.
    if let Err(err) = std::fs::remove_file(&socket_path) {
        tracing::debug!("cannot remove {}: {err}", socket_path.display());
    }
    registry.lock().await.shutdown(SHUTDOWN_GRACE).await;
    Ok(())
}

/// Removes a socket file left by a proxy that died, but refuses to steal the
/// socket of one that is alive.
async fn remove_stale_socket(path: &Path) -> Result<(), ProxyError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    if UnixStream::connect(path).await.is_ok() {
        return Err(ProxyError::AlreadyRunning {
            socket: path.to_path_buf(),
        });
    }
    std::fs::remove_file(path).map_err(|err| {
        ProxyError::io(
            format!("cannot remove the stale control socket {}", path.display()),
            err,
        )
    })
}

/// Binds the control socket, readable and writable by owner and group only
/// (whoever may switch routes controls all traffic).
fn bind_control_socket(path: &Path) -> Result<UnixListener, ProxyError> {
    let listener = UnixListener::bind(path).map_err(|err| {
        ProxyError::io(
            format!("cannot listen on the control socket {}", path.display()),
            err,
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(|err| {
        ProxyError::io(format!("cannot set permissions on {}", path.display()), err)
    })?;
    Ok(listener)
}

/// Accepts control connections forever; each one is served by its own task,
/// owned here so they all end when this future is dropped.
async fn serve_control(listener: UnixListener, registry: Arc<Mutex<Registry>>) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = sessions.join_next() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    sessions.spawn(serve_control_connection(stream, Arc::clone(&registry)));
                }
                Err(err) => {
                    tracing::error!("cannot accept a control connection: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Answers one JSON line per request line until the client hangs up.
async fn serve_control_connection(stream: UnixStream, registry: Arc<Mutex<Registry>>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = String::new();
        let read = (&mut reader)
            .take(MAX_CONTROL_LINE)
            .read_line(&mut line)
            .await;
        let response = match read {
            Ok(0) => return,
            Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_CONTROL_LINE => {
                ControlResponse::Error {
                    message: format!("control request longer than {MAX_CONTROL_LINE} bytes"),
                }
            }
            Ok(_) => match serde_json::from_str::<ControlRequest>(&line) {
                Ok(request) => handle(request, &registry).await,
                Err(err) => ControlResponse::Error {
                    message: format!("invalid control request: {err}"),
                },
            },
            Err(err) => {
                tracing::debug!("control connection read error: {err}");
                return;
            }
        };
        let mut out = match serde_json::to_vec(&response) {
            Ok(out) => out,
            Err(err) => {
                tracing::error!("cannot encode a control response: {err}");
                return;
            }
        };
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
            return;
        }
    }
}

async fn handle(request: ControlRequest, registry: &Mutex<Registry>) -> ControlResponse {
    let mut registry = registry.lock().await;
    match request {
        ControlRequest::Ping => ControlResponse::Ok,
        ControlRequest::Status => ControlResponse::Status {
            status: registry.status(),
        },
        ControlRequest::SetRoute { route } => match registry.set_route(route).await {
            Ok(()) => ControlResponse::Ok,
            Err(message) => ControlResponse::Error { message },
        },
        ControlRequest::RemoveRoute { bind } => match registry.remove_route(bind).await {
            Ok(()) => ControlResponse::Ok,
            Err(message) => ControlResponse::Error { message },
        },
    }
}

/// The control side's view of all routes.
struct Registry {
    state_dir: PathBuf,
    routes: BTreeMap<SocketAddr, RouteEntry>,
    /// Listeners of removed routes whose connections are still finishing.
    draining: Vec<JoinHandle<()>>,
}

impl Registry {
    fn new(state_dir: PathBuf) -> Self {
        Registry {
            state_dir,
            routes: BTreeMap::new(),
            draining: Vec::new(),
        }
    }

    /// Starts serving `route` on the already bound `tcp`.
    fn insert(&mut self, route: Route, tcp: TcpListener) {
        let bind = route.bind;
        let mut entry = RouteEntry::new(&route);
        entry.start(tcp);
        self.routes.insert(bind, entry);
    }

    /// The routes as they will be after setting `change` (or removing the
    /// route at `remove`), in the order they are persisted.
    fn routes_after(&self, change: Option<&Route>, remove: Option<SocketAddr>) -> Vec<Route> {
        let mut routes: BTreeMap<SocketAddr, Route> = self
            .routes
            .iter()
            .map(|(bind, entry)| (*bind, entry.route.clone()))
            .collect();
        if let Some(route) = change {
            routes.insert(route.bind, route.clone());
        }
        if let Some(bind) = remove {
            routes.remove(&bind);
        }
        routes.into_values().collect()
    }

    /// Creates or replaces a route. On error nothing changed, and the message
    /// says why.
    async fn set_route(&mut self, route: Route) -> Result<(), String> {
        if route.bind.port() == 0 {
            return Err(format!(
                "route {}/{}: bind address {} has port 0; a published port must be fixed",
                route.project, route.service, route.bind
            ));
        }
        let persisted = self.routes_after(Some(&route), None);
        let bind = route.bind;

        if let Some(entry) = self.routes.get_mut(&bind) {
            if entry.route == route {
                // Already in place and persisted; the daemon re-sends routes
                // when it reconciles.
                return Ok(());
            }
            let prepared = entry.prepare(&route);
            persist::save(&self.state_dir, persisted)
                .await
                .map_err(|err| err.to_string())?;
            entry.commit(prepared, route);
            tracing::info!(%bind, "route updated");
            return Ok(());
        }

        // A new address: listen first, so an address we cannot have is
        // reported before anything is written.
        let tcp = listener::bind(bind).map_err(|err| format!("cannot listen on {bind}: {err}"))?;
        let mut entry = RouteEntry::new(&route);
        persist::save(&self.state_dir, persisted)
            .await
            .map_err(|err| err.to_string())?;
        entry.start(tcp);
        self.routes.insert(bind, entry);
        tracing::info!(%bind, "route created");
        Ok(())
    }

    /// Stops listening on `bind`; its in-flight requests finish in the
    /// background. Removing an unknown address is not an error.
    async fn remove_route(&mut self, bind: SocketAddr) -> Result<(), String> {
        if !self.routes.contains_key(&bind) {
            return Ok(());
        }
        let persisted = self.routes_after(None, Some(bind));
        persist::save(&self.state_dir, persisted)
            .await
            .map_err(|err| err.to_string())?;
        if let Some(entry) = self.routes.remove(&bind)
            && let Some(listener) = entry.listener
        {
            self.draining.push(listener.stop().await);
        }
        self.draining.retain(|task| !task.is_finished());
        tracing::info!(%bind, "route removed");
        Ok(())
    }

    fn status(&mut self) -> ProxyStatus {
        self.draining.retain(|task| !task.is_finished());
        ProxyStatus {
            pid: std::process::id(),
            routes: self.routes.values().map(RouteEntry::status).collect(),
        }
    }

    /// Stops every listener and waits up to `grace` for open connections;
    /// those still open after that are aborted.
    async fn shutdown(&mut self, grace: Duration) {
        let mut tasks = std::mem::take(&mut self.draining);
        for (_, entry) in std::mem::take(&mut self.routes) {
            if let Some(listener) = entry.listener {
                tasks.push(listener.stop().await);
            }
        }
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        let all_done = futures_util::future::join_all(tasks);
        if tokio::time::timeout(grace, all_done).await.is_err() {
            tracing::warn!("connections still open after {grace:?}; closing them");
            for abort in aborts {
                abort.abort();
            }
        }
    }
}

/// Key of a backend target: a container at an address in a release. A
/// container that comes back with another address gets a fresh connection
/// pool.
type TargetKey = (String, SocketAddr, String);

/// An in-flight gauge of one container, kept after the container leaves the
/// route so its draining requests stay visible.
struct Gauge {
    count: Arc<AtomicU64>,
    /// When the container left the route; `None` while it is in it.
    removed_at: Option<Instant>,
}

/// One route: what the data path reads, and the counters behind it.
struct RouteEntry {
    route: Route,
    table: Arc<ArcSwap<RouteTable>>,
    listener: Option<RunningListener>,
    targets: HashMap<TargetKey, Arc<BackendTarget>>,
    gauges: BTreeMap<String, Gauge>,
    releases: BTreeMap<String, Arc<ReleaseCounters>>,
    unrouted: Arc<ReleaseCounters>,
}

/// A route table built but not yet swapped in, with the targets it uses.
struct Prepared {
    table: RouteTable,
    targets: HashMap<TargetKey, Arc<BackendTarget>>,
}

impl RouteEntry {
    /// An entry serving `route`, not listening yet.
    fn new(route: &Route) -> Self {
        let unrouted = Arc::new(ReleaseCounters::default());
        let mut entry = RouteEntry {
            route: route.clone(),
            table: Arc::new(ArcSwap::from_pointee(RouteTable::new(
                route.mode,
                [],
                Arc::clone(&unrouted),
            ))),
            listener: None,
            targets: HashMap::new(),
            gauges: BTreeMap::new(),
            releases: BTreeMap::new(),
            unrouted,
        };
        let prepared = entry.prepare(route);
        entry.commit(prepared, route.clone());
        entry
    }

    fn start(&mut self, tcp: TcpListener) {
        self.listener = Some(RunningListener::spawn(
            tcp,
            self.route.bind,
            Arc::clone(&self.table),
        ));
    }

    /// Builds the table for `route`, reusing the targets (pools, counters) of
    /// backends that stay. Counters it creates are invisible in the status
    /// until committed, so dropping the result undoes it.
    fn prepare(&mut self, route: &Route) -> Prepared {
        let mut targets = HashMap::new();
        let mut weighted = Vec::with_capacity(route.backends.len());
        for backend in &route.backends {
            let key = (
                backend.container.clone(),
                backend.addr,
                backend.release.clone(),
            );
            let target = match targets.get(&key).or_else(|| self.targets.get(&key)) {
                Some(target) => Arc::clone(target),
                None => Arc::new(BackendTarget {
                    addr: backend.addr,
                    container: backend.container.clone(),
                    release: backend.release.clone(),
                    in_flight: self.gauge(&backend.container),
                    counts: Arc::clone(self.releases.entry(backend.release.clone()).or_default()),
                    client: backend_client(),
                }),
            };
            targets.insert(key, Arc::clone(&target));
            weighted.push((target, backend.weight));
        }
        Prepared {
            table: RouteTable::new(route.mode, weighted, Arc::clone(&self.unrouted)),
            targets,
        }
    }

    /// The in-flight gauge of `container`, created if needed.
    fn gauge(&mut self, container: &str) -> Arc<AtomicU64> {
        let gauge = self
            .gauges
            .entry(container.to_string())
            .or_insert_with(|| Gauge {
                count: Arc::default(),
                removed_at: Some(Instant::now()),
            });
        Arc::clone(&gauge.count)
    }

    /// Swaps the prepared table in: from now on every new request or
    /// connection uses it.
    fn commit(&mut self, prepared: Prepared, route: Route) {
        self.table.store(Arc::new(prepared.table));
        // Targets that left are dropped here; their pools close once the
        // last in-flight request using them is done.
        self.targets = prepared.targets;
        let now = Instant::now();
        for (container, gauge) in &mut self.gauges {
            let in_route = route.backends.iter().any(|b| &b.container == container);
            gauge.removed_at = if in_route {
                None
            } else {
                Some(gauge.removed_at.unwrap_or(now))
            };
        }
        self.gauges.retain(|_, gauge| {
            gauge
                .removed_at
                .is_none_or(|at| at.elapsed() < GAUGE_RETENTION)
                || gauge.count.load(Ordering::SeqCst) > 0
        });
        self.route = route;
    }

    fn status(&self) -> RouteStatus {
        let in_flight = self
            .gauges
            .iter()
            .filter_map(|(container, gauge)| {
                let count = gauge.count.load(Ordering::SeqCst);
                (gauge.removed_at.is_none() || count > 0).then(|| (container.clone(), count))
            })
            .collect();
        let mut releases: BTreeMap<String, _> = self
            .releases
            .iter()
            .filter_map(|(release, counters)| {
                let counts = counters.snapshot();
                let in_route = self.route.backends.iter().any(|b| &b.release == release);
                (in_route || counts != Default::default()).then(|| (release.clone(), counts))
            })
            .collect();
        let unrouted = self.unrouted.snapshot();
        if unrouted != Default::default() {
            let entry = releases.entry(String::new()).or_default();
            entry.s1xx += unrouted.s1xx;
            entry.s2xx += unrouted.s2xx;
            entry.s3xx += unrouted.s3xx;
            entry.s4xx += unrouted.s4xx;
            entry.s5xx += unrouted.s5xx;
            entry.failed += unrouted.failed;
        }
        RouteStatus {
            route: self.route.clone(),
            in_flight,
            releases,
        }
    }
}
