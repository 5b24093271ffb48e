//! The proxy process: the listeners (data path) and the control socket
//! (control path).
//!
//! The control side keeps its bookkeeping in a [`Registry`] behind a tokio
//! mutex that only control requests take. The data path never sees that
//! mutex: it reads each listener's `ArcSwap<RouteTable>` and atomic counters,
//! which the registry prepares before swapping them in.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{Mutex, Notify, mpsc};
use tokio::task::{JoinHandle, JoinSet};

use super::handover::{self, HandedRoute, Message};
use super::listener::{self, RunningListener, Stop};
use super::persist;
use super::protocol::{
    ClassCounts, ControlRequest, ControlResponse, ProxyStatus, Route, RouteStatus,
};
use super::routes::{BackendTarget, ReleaseCounters, RouteTable, backend_client};
use super::{HANDOVER_PATIENCE, ProxyError, SHUTDOWN_GRACE, SOCKET_FILE};

/// Largest control request line accepted (a route with thousands of
/// backends still fits).
const MAX_CONTROL_LINE: u64 = 1024 * 1024;

/// How long a container that left its route keeps its (zero) in-flight
/// gauge. Long enough that a request which picked the container just before
/// the switch still finds its gauge listed; short enough to bound memory.
const GAUGE_RETENTION: Duration = Duration::from_secs(600);

/// How a proxy process starts, and how it starts its own successor.
#[derive(Debug, Default)]
pub struct Options {
    /// Take the listening sockets over from the proxy running on this state
    /// directory (`deploy-agent proxy --take-over`), instead of binding them.
    pub take_over: bool,
    /// The command that starts a successor when an upgrade is asked for
    /// (SIGHUP); `None`: upgrades are refused with a log line.
    pub successor: Option<Successor>,
}

/// A command line for a successor proxy (it must pass `--take-over`).
#[derive(Debug, Clone)]
pub struct Successor {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// Runs the proxy until `shutdown` completes (no successor, no upgrades).
pub async fn run(state_dir: &Path, shutdown: impl Future<Output = ()>) -> Result<(), ProxyError> {
    let (_never, upgrades) = mpsc::channel(1);
    run_with(state_dir, Options::default(), upgrades, shutdown).await
}

/// Runs the proxy until `shutdown` completes, or until a successor has
/// taken its listeners over and its open connections are done.
///
/// Startup: create `state_dir`; either take the listeners over from the
/// running proxy ([`Options::take_over`], see `handover`), or refuse to
/// start if another proxy answers on the control socket and bind every
/// persisted route (a route whose address cannot be bound is logged and
/// skipped); then serve the control socket and tell systemd we are ready.
///
/// Each message on `upgrades` starts [`Options::successor`]; the running
/// proxy keeps serving whatever becomes of it.
///
/// Shutdown: stop accepting everywhere, let in-flight requests finish for at
/// most 30 seconds, then return.
pub async fn run_with(
    state_dir: &Path,
    options: Options,
    mut upgrades: mpsc::Receiver<()>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    std::fs::create_dir_all(state_dir).map_err(|err| {
        ProxyError::io(
            format!("cannot create the state directory {}", state_dir.display()),
            err,
        )
    })?;
    let socket_path = state_dir.join(SOCKET_FILE);
    let (control, listeners) = if options.take_over {
        take_over(state_dir).await?
    } else {
        remove_stale_socket(&socket_path).await?;
        let mut listeners = Vec::new();
        for route in persist::load(state_dir)? {
            let bind = route.bind;
            match listener::bind(bind) {
                Ok(tcp) => listeners.push((route, tcp, BTreeMap::new())),
                Err(err) => tracing::error!(
                    "cannot listen on {bind}: {err}; the route for {}/{} is not served until the daemon sets it again",
                    route.project,
                    route.service
                ),
            }
        }
        (bind_control_socket(&socket_path)?, listeners)
    };

    let mut registry = Registry::new(state_dir.to_path_buf());
    for (route, tcp, counts) in listeners {
        registry.insert(route, tcp, counts);
    }
    let routes = registry.routes.len();
    let registry = Arc::new(Mutex::new(registry));
    tracing::info!(socket = %socket_path.display(), routes, pid = std::process::id(), "proxy ready");
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let mut states = vec![sd_notify::NotifyState::Ready];
        if options.take_over {
            // We are the service's main process now; the old one exits
            // once its connections are done.
            states.insert(0, sd_notify::NotifyState::MainPid(std::process::id()));
        }
        let _ = sd_notify::notify(&states);
    }

    let handed_over = Arc::new(Notify::new());
    let serving = serve_control(control, Arc::clone(&registry), Arc::clone(&handed_over));
    tokio::pin!(serving);
    tokio::pin!(shutdown);
    let handed = loop {
        tokio::select! {
            () = &mut shutdown => {
                tracing::info!("shutting down");
                break false;
            }
            () = &mut serving => break false,
            () = handed_over.notified() => break true,
            Some(()) = upgrades.recv() => match &options.successor {
                Some(successor) => start_successor(successor),
                None => tracing::warn!("upgrade asked for, but this proxy cannot start a successor"),
            },
        }
    };
    if handed {
        // proxy.sock is the successor's now: leave it, and say nothing to
        // systemd (this is no longer the main process).
        tracing::info!("handed over; finishing open connections");
        registry
            .lock()
            .await
            .shutdown(Stop::HandedOver(HANDOVER_PATIENCE), SHUTDOWN_GRACE)
            .await;
        return Ok(());
    }
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }
    // Clients now get "not running" rather than a socket nobody reads.
    if let Err(err) = std::fs::remove_file(&socket_path) {
        tracing::debug!("cannot remove {}: {err}", socket_path.display());
    }
    registry
        .lock()
        .await
        .shutdown(Stop::Now, SHUTDOWN_GRACE)
        .await;
    Ok(())
}

/// A listener to start: its route, its socket, its counters so far.
type Pending = (Route, TcpListener, BTreeMap<String, ClassCounts>);

/// The successor's startup: the sockets of the running proxy, then
/// `proxy.sock`. Nothing accepts before the running proxy said `Done`.
async fn take_over(state_dir: &Path) -> Result<(UnixListener, Vec<Pending>), ProxyError> {
    let dir = state_dir.to_path_buf();
    let mut taken = tokio::task::spawn_blocking(move || handover::take(&dir))
        .await
        .map_err(|err| ProxyError::HandoverFailed {
            detail: format!("the handover task failed: {err}"),
        })??;
    // The running proxy holds its registry lock: the persisted routes are
    // exactly those whose sockets we got.
    let mut handed: BTreeMap<SocketAddr, (HandedRoute, OwnedFd)> =
        std::mem::take(&mut taken.listeners)
            .into_iter()
            .map(|(route, fd)| (route.bind, (route, fd)))
            .collect();
    let mut listeners = Vec::new();
    for route in persist::load(state_dir)? {
        let bind = route.bind;
        let (tcp, counts) = match handed.remove(&bind) {
            Some((handed, fd)) => {
                let std = std::net::TcpListener::from(fd);
                let tcp = std
                    .set_nonblocking(true)
                    .and_then(|()| TcpListener::from_std(std))
                    .map_err(|err| {
                        ProxyError::io(format!("cannot use the socket of {bind}"), err)
                    })?;
                (tcp, handed.releases)
            }
            None => match listener::bind(bind) {
                Ok(tcp) => (tcp, BTreeMap::new()),
                Err(err) => {
                    tracing::error!(
                        "cannot listen on {bind}: {err}; not served until the daemon sets it again"
                    );
                    continue;
                }
            },
        };
        listeners.push((route, tcp, counts));
    }
    for bind in handed.keys() {
        tracing::warn!(%bind, "a handed socket has no persisted route; closing it");
    }
    let name = handover::successor_socket_name(std::process::id());
    let control = bind_control_socket(&state_dir.join(&name))?;
    let ready = tokio::task::spawn_blocking({
        let name = name.clone();
        move || taken.ready(name)
    })
    .await
    .map_err(|err| ProxyError::HandoverFailed {
        detail: format!("the handover task failed: {err}"),
    })?;
    if let Err(err) = ready {
        handover::remove_successor_socket(state_dir, &name);
        return Err(err);
    }
    Ok((control, listeners))
}

/// Starts a successor proxy; this one keeps serving until it takes over,
/// and goes on serving if it never does.
fn start_successor(successor: &Successor) {
    let mut command = tokio::process::Command::new(&successor.program);
    command.args(&successor.args).stdin(Stdio::null());
    match command.spawn() {
        Ok(mut child) => {
            let pid = child.id().unwrap_or_default();
            tracing::info!(pid, program = %successor.program.display(), "upgrade: started a successor proxy");
            tokio::spawn(async move {
                match child.wait().await {
                    Ok(status) if status.success() => {}
                    Ok(status) => tracing::error!(
                        pid,
                        "the successor proxy exited ({status}); if it had not taken over, this one keeps serving"
                    ),
                    Err(err) => tracing::error!(pid, "cannot wait for the successor proxy: {err}"),
                }
            });
        }
        Err(err) => tracing::error!(
            "upgrade: cannot start {}: {err}; this proxy keeps serving",
            successor.program.display()
        ),
    }
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
/// owned here so they all end when this future is dropped. `handed_over` is
/// notified once a successor has taken over.
async fn serve_control(
    listener: UnixListener,
    registry: Arc<Mutex<Registry>>,
    handed_over: Arc<Notify>,
) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = sessions.join_next() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    sessions.spawn(serve_control_connection(
                        stream,
                        Arc::clone(&registry),
                        Arc::clone(&handed_over),
                    ));
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
async fn serve_control_connection(
    stream: UnixStream,
    registry: Arc<Mutex<Registry>>,
    handed_over: Arc<Notify>,
) {
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
                Ok(ControlRequest::HandOver { pid }) => {
                    if !reader.buffer().is_empty() {
                        tracing::error!("handover: process {pid} sent more than its request");
                        return;
                    }
                    let stream = match reader.into_inner().reunite(write) {
                        Ok(stream) => stream,
                        Err(err) => {
                            tracing::error!("handover: {err}");
                            return;
                        }
                    };
                    if hand_over(stream, &registry, pid).await {
                        handed_over.notify_one();
                    }
                    return;
                }
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

/// The running proxy's side of a handover (see `handover`): true once
/// `proxy.sock` is the successor's. On false nothing changed here.
async fn hand_over(mut stream: UnixStream, registry: &Mutex<Registry>, successor: u32) -> bool {
    let mut registry = registry.lock().await;
    if let Some(pid) = registry.handed_over {
        let refused = Message::Refused {
            message: format!("this proxy already handed over to process {pid}"),
        };
        let _ = handover::send(&stream, &refused).await;
        return false;
    }
    tracing::info!(successor, "handover: a successor asks for the listeners");
    let (routes, sockets) = registry.handover_set();
    if sockets.len() > handover::MAX_LISTENERS {
        let refused = Message::Refused {
            message: format!(
                "{} listening sockets; at most {} can be handed over",
                sockets.len(),
                handover::MAX_LISTENERS
            ),
        };
        let _ = handover::send(&stream, &refused).await;
        tracing::error!(successor, "handover refused: too many listeners");
        return false;
    }
    let listeners = Message::Listeners { routes };
    if let Err(err) = handover::send_with_sockets(&stream, &listeners, &sockets).await {
        tracing::error!(
            successor,
            "handover: cannot send the listeners: {err}; this proxy keeps serving"
        );
        return false;
    }
    let name = match handover::await_ready(&mut stream, successor).await {
        Ok(name) => name,
        Err(err) => {
            tracing::error!("handover failed: {err}; this proxy keeps serving");
            return false;
        }
    };
    let from = registry.state_dir.join(&name);
    let to = registry.state_dir.join(SOCKET_FILE);
    if let Err(err) = std::fs::rename(&from, &to) {
        tracing::error!(
            "handover failed: cannot rename {} to {}: {err}; this proxy keeps serving",
            from.display(),
            to.display()
        );
        let refused = Message::Refused {
            message: format!("cannot rename the control socket: {err}"),
        };
        let _ = handover::send(&stream, &refused).await;
        handover::remove_successor_socket(&registry.state_dir, &name);
        return false;
    }
    // From here on the successor answers on proxy.sock; requests that
    // still reach this proxy are told to connect again.
    registry.handed_over = Some(successor);
    if let Err(err) = handover::send(&stream, &Message::Done).await {
        // It will time out or see EOF, and exit; proxy.sock then leads
        // nowhere until systemd restarts the service.
        tracing::error!(
            successor,
            "handover: cannot confirm to the successor: {err}"
        );
    }
    tracing::info!(
        successor,
        "handover: the successor owns proxy.sock and the listeners"
    );
    true
}

async fn handle(request: ControlRequest, registry: &Mutex<Registry>) -> ControlResponse {
    let mut registry = registry.lock().await;
    if let Some(pid) = registry.handed_over {
        return ControlResponse::HandedOver { pid };
    }
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
        ControlRequest::HandOver { .. } => ControlResponse::Error {
            message: "hand_over is answered on its own connection only".to_string(),
        },
    }
}

/// The control side's view of all routes.
struct Registry {
    state_dir: PathBuf,
    routes: BTreeMap<SocketAddr, RouteEntry>,
    /// Listeners of removed routes whose connections are still finishing.
    draining: Vec<JoinHandle<()>>,
    /// Set once a successor owns the listeners and `proxy.sock`.
    handed_over: Option<u32>,
}

impl Registry {
    fn new(state_dir: PathBuf) -> Self {
        Registry {
            state_dir,
            routes: BTreeMap::new(),
            draining: Vec::new(),
            handed_over: None,
        }
    }

    /// Starts serving `route` on the already bound `tcp`, its counters
    /// starting from `counts`.
    fn insert(&mut self, route: Route, tcp: TcpListener, counts: BTreeMap<String, ClassCounts>) {
        let bind = route.bind;
        let mut entry = RouteEntry::with_counts(&route, counts);
        match entry.start(tcp) {
            Ok(()) => {
                self.routes.insert(bind, entry);
            }
            Err(err) => tracing::error!(
                "cannot serve {bind}: {err}; the route for {}/{} is not served until the daemon sets it again",
                route.project,
                route.service
            ),
        }
    }

    /// Every listening socket with its route's counters, for a successor.
    fn handover_set(&self) -> (Vec<HandedRoute>, Vec<RawFd>) {
        let mut routes = Vec::new();
        let mut sockets = Vec::new();
        for (bind, entry) in &self.routes {
            if let Some(listener) = &entry.listener {
                routes.push(HandedRoute {
                    bind: *bind,
                    releases: entry.counts(),
                });
                sockets.push(listener.socket().as_raw_fd());
            }
        }
        (routes, sockets)
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
        let mut entry = RouteEntry::with_counts(&route, BTreeMap::new());
        persist::save(&self.state_dir, persisted)
            .await
            .map_err(|err| err.to_string())?;
        entry
            .start(tcp)
            .map_err(|err| format!("cannot serve {bind}: {err}"))?;
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
            self.draining.push(listener.stop(Stop::Now).await);
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

    /// Stops every listener (`how`) and waits up to `grace` for open
    /// connections, beyond the patience of [`Stop::HandedOver`]; those
    /// still open after that are aborted.
    async fn shutdown(&mut self, how: Stop, grace: Duration) {
        let mut tasks = std::mem::take(&mut self.draining);
        for (_, entry) in std::mem::take(&mut self.routes) {
            if let Some(listener) = entry.listener {
                tasks.push(listener.stop(how).await);
            }
        }
        let grace = match how {
            Stop::Now => grace,
            Stop::HandedOver(patience) => patience + grace,
        };
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
    /// An entry serving `route`, not listening yet, its counters starting
    /// from `counts` (those a predecessor handed over; `""`: unrouted).
    fn with_counts(route: &Route, mut counts: BTreeMap<String, ClassCounts>) -> Self {
        let unrouted = Arc::new(ReleaseCounters::from_counts(
            counts.remove("").unwrap_or_default(),
        ));
        let releases = counts
            .into_iter()
            .map(|(release, counts)| (release, Arc::new(ReleaseCounters::from_counts(counts))))
            .collect();
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
            releases,
            unrouted,
        };
        let prepared = entry.prepare(route);
        entry.commit(prepared, route.clone());
        entry
    }

    fn start(&mut self, tcp: TcpListener) -> std::io::Result<()> {
        self.listener = Some(RunningListener::spawn(
            tcp,
            self.route.bind,
            Arc::clone(&self.table),
        )?);
        Ok(())
    }

    /// Every release's counters (`""`: unrouted), as handed to a successor.
    fn counts(&self) -> BTreeMap<String, ClassCounts> {
        let mut counts: BTreeMap<String, ClassCounts> = self
            .releases
            .iter()
            .map(|(release, counters)| (release.clone(), counters.snapshot()))
            .collect();
        counts.insert(String::new(), self.unrouted.snapshot());
        counts
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
