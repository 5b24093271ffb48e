//! End-to-end tests of the proxy over real sockets on 127.0.0.1: a proxy
//! started with [`run`], driven through [`ProxyClient`], in front of tiny
//! in-process hyper backends that answer their own name.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::protocol::{Backend, Route};
use super::{Options, ProxyClient, ProxyError, ROUTES_FILE, SOCKET_FILE, run, run_with};
use crate::spec::ProxyMode;

/// Upper bound for anything a test waits for; generous for a loaded CI box.
const PATIENCE: Duration = Duration::from_secs(20);

// ---- fixtures -------------------------------------------------------------

/// A proxy process (as a task) on a state directory.
struct TestProxy {
    client: ProxyClient,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ProxyError>>,
}

impl TestProxy {
    async fn start(state_dir: &Path) -> TestProxy {
        let (stop, stopped) = oneshot::channel::<()>();
        let dir = state_dir.to_path_buf();
        let task = tokio::spawn(async move {
            run(&dir, async {
                let _ = stopped.await;
            })
            .await
        });
        let client = ProxyClient::new(state_dir.join(SOCKET_FILE));
        let deadline = Instant::now() + PATIENCE;
        while client.ping().await.is_err() {
            assert!(Instant::now() < deadline, "the proxy did not come up");
            assert!(!task.is_finished(), "the proxy exited during startup");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        TestProxy { client, stop, task }
    }

    async fn shutdown(self) {
        let _ = self.stop.send(());
        let result = tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the proxy did not shut down")
            .expect("the proxy task panicked");
        result.expect("the proxy failed");
    }
}

enum Behavior {
    /// Answers 200 with its name.
    Name,
    /// Sleeps, raises the flag, then answers 200 with its name.
    Slow(Duration, Arc<AtomicBool>),
    /// Answers this status with its name.
    Status(StatusCode),
}

/// An HTTP/1.1 backend on an ephemeral port.
async fn spawn_backend(name: &'static str, behavior: Behavior) -> SocketAddr {
    spawn_stoppable_backend(name, behavior).await.0
}

/// Like [`spawn_backend`]; aborting the returned task kills the backend and
/// all its connections at once, like a container being removed.
async fn spawn_stoppable_backend(
    name: &'static str,
    behavior: Behavior,
) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let behavior = Arc::new(behavior);
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let behavior = Arc::clone(&behavior);
            connections.spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let behavior = Arc::clone(&behavior);
                    async move {
                        // Read the whole request, as an app would.
                        let _ = req.into_body().collect().await;
                        let status = match &*behavior {
                            Behavior::Name => StatusCode::OK,
                            Behavior::Slow(delay, done) => {
                                tokio::time::sleep(*delay).await;
                                done.store(true, Ordering::SeqCst);
                                StatusCode::OK
                            }
                            Behavior::Status(status) => *status,
                        };
                        let mut response = Response::new(Full::new(Bytes::from(name)));
                        *response.status_mut() = status;
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            while connections.try_join_next().is_some() {}
        }
    });
    (addr, task)
}

/// A TCP echo backend on an ephemeral port.
async fn spawn_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// An address nothing listens on (bound, then released).
fn free_addr() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap()
}

fn backend(addr: SocketAddr, release: &str, container: &str) -> Backend {
    Backend {
        addr,
        release: release.into(),
        container: container.into(),
        weight: 1,
    }
}

fn route(bind: SocketAddr, mode: ProxyMode, backends: Vec<Backend>) -> Route {
    Route {
        bind,
        project: "shop".into(),
        service: "web".into(),
        mode,
        backends,
    }
}

type TestClient = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get(client: &TestClient, addr: SocketAddr) -> (StatusCode, String) {
    let uri = format!("http://{addr}/");
    let response = tokio::time::timeout(PATIENCE, client.get(uri.parse().unwrap()))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn in_flight(client: &ProxyClient, bind: SocketAddr, container: &str) -> u64 {
    let status = client.status().await.unwrap();
    status
        .routes
        .iter()
        .find(|r| r.route.bind == bind)
        .and_then(|r| r.in_flight.get(container).copied())
        .unwrap_or(0)
}

fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    (tmp, dir)
}

// ---- tests ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_under_load_serves_only_2xx_and_switches_exactly() {
    let (_tmp, dir) = state_dir();
    let proxy = TestProxy::start(&dir).await;
    let a = spawn_backend("a", Behavior::Name).await;
    let b = spawn_backend("b", Behavior::Name).await;
    let bind = free_addr();
    proxy
        .client
        .set_route(route(
            bind,
            ProxyMode::Http,
            vec![backend(a, "r1", "web-a")],
        ))
        .await
        .unwrap();

    let running = Arc::new(AtomicBool::new(true));
    let mut loops = Vec::new();
    for _ in 0..4 {
        let running = Arc::clone(&running);
        loops.push(tokio::spawn(async move {
            let client = http_client();
            let mut seen = Vec::new();
            while running.load(Ordering::SeqCst) {
                let started = Instant::now();
                let (status, body) = get(&client, bind).await;
                seen.push((started, Instant::now(), status, body));
            }
            seen
        }));
    }

    tokio::time::sleep(Duration::from_millis(300)).await;
    let switch_sent = Instant::now();
    proxy
        .client
        .set_route(route(
            bind,
            ProxyMode::Http,
            vec![backend(b, "r2", "web-b")],
        ))
        .await
        .unwrap();
    let switch_done = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.store(false, Ordering::SeqCst);

    let (mut before, mut after) = (0, 0);
    for task in loops {
        for (started, ended, status, body) in task.await.unwrap() {
            assert_eq!(status, StatusCode::OK, "body: {body}");
            if ended < switch_sent {
                assert_eq!(
                    body, "a",
                    "a request done before the switch was served by b"
                );
                before += 1;
            }
            if started > switch_done {
                assert_eq!(body, "b", "a request sent after the switch was served by a");
                after += 1;
            }
        }
    }
    assert!(before > 0 && after > 0, "before: {before}, after: {after}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_survives_the_switch_and_drain_waits_for_it() {
    let (_tmp, dir) = state_dir();
    let proxy = TestProxy::start(&dir).await;
    let done = Arc::new(AtomicBool::new(false));
    let slow = spawn_backend(
        "slow",
        Behavior::Slow(Duration::from_secs(2), Arc::clone(&done)),
    )
    .await;
    let fast = spawn_backend("fast", Behavior::Name).await;
    let bind = free_addr();
    proxy
        .client
        .set_route(route(
            bind,
            ProxyMode::Http,
            vec![backend(slow, "r1", "web-slow")],
        ))
        .await
        .unwrap();

    let slow_request = tokio::spawn(async move { get(&http_client(), bind).await });
    let deadline = Instant::now() + PATIENCE;
    while in_flight(&proxy.client, bind, "web-slow").await != 1 {
        assert!(
            Instant::now() < deadline,
            "the slow request never got in flight"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    proxy
        .client
        .set_route(route(
            bind,
            ProxyMode::Http,
            vec![backend(fast, "r2", "web-fast")],
        ))
        .await
        .unwrap();
    assert_eq!(get(&http_client(), bind).await.1, "fast");

    let containers = ["web-slow".to_string()];
    let not_yet = proxy
        .client
        .wait_drained(bind, &containers, Duration::from_millis(100))
        .await
        .unwrap();
    assert!(!not_yet, "drained while the slow request was running");

    let drained = proxy
        .client
        .wait_drained(bind, &containers, PATIENCE)
        .await
        .unwrap();
    assert!(drained);
    assert!(
        done.load(Ordering::SeqCst),
        "drained before the slow backend answered"
    );
    assert_eq!(
        slow_request.await.unwrap(),
        (StatusCode::OK, "slow".to_string())
    );

    // Drained containers that left the route disappear from the status.
    let status = proxy.client.status().await.unwrap();
    let route_status = &status.routes[0];
    assert!(!route_status.in_flight.contains_key("web-slow"));
    assert_eq!(route_status.in_flight.get("web-fast"), Some(&0));
    assert_eq!(route_status.releases["r1"].s2xx, 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_survive_a_proxy_restart() {
    let (_tmp, dir) = state_dir();
    let a = spawn_backend("a", Behavior::Name).await;
    let bind = free_addr();
    let the_route = route(bind, ProxyMode::Http, vec![backend(a, "r1", "web-a")]);

    let proxy = TestProxy::start(&dir).await;
    proxy.client.set_route(the_route.clone()).await.unwrap();
    assert_eq!(
        get(&http_client(), bind).await,
        (StatusCode::OK, "a".into())
    );
    proxy.shutdown().await;
    assert!(dir.join(ROUTES_FILE).exists());
    assert!(!dir.join(SOCKET_FILE).exists(), "socket left behind");

    let proxy = TestProxy::start(&dir).await;
    assert_eq!(
        get(&http_client(), bind).await,
        (StatusCode::OK, "a".into())
    );
    let status = proxy.client.status().await.unwrap();
    assert_eq!(status.pid, std::process::id());
    assert_eq!(status.routes.len(), 1);
    assert_eq!(status.routes[0].route, the_route);

    // Removing is persisted too.
    proxy.client.remove_route(bind).await.unwrap();
    assert!(TcpStream::connect(bind).await.is_err(), "still listening");
    proxy.shutdown().await;
    let proxy = TestProxy::start(&dir).await;
    assert!(proxy.client.status().await.unwrap().routes.is_empty());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_counted_per_release_and_class() {
    let (_tmp, dir) = state_dir();
    let proxy = TestProxy::start(&dir).await;
    let ok = spawn_backend("ok", Behavior::Name).await;
    let broken = spawn_backend(
        "broken",
        Behavior::Status(StatusCode::INTERNAL_SERVER_ERROR),
    )
    .await;
    let bind = free_addr();
    proxy
        .client
        .set_route(route(
            bind,
            ProxyMode::Http,
            vec![backend(ok, "r1", "web-1"), backend(broken, "r2", "web-2")],
        ))
        .await
        .unwrap();

    let client = http_client();
    for _ in 0..10 {
        get(&client, bind).await;
    }
    let status = proxy.client.status().await.unwrap();
    let releases = &status.routes[0].releases;
    assert_eq!(releases["r1"].s2xx, 5, "{releases:?}");
    assert_eq!(releases["r2"].s5xx, 5, "{releases:?}");
    // A backend's own 500 is an answer, not a forwarding failure.
    assert_eq!(releases["r2"].failed, 0);
    assert!(!releases.contains_key(""));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_answers_503_and_counts_it() {
    let (_tmp, dir) = state_dir();
    let proxy = TestProxy::start(&dir).await;
    let bind = free_addr();
    proxy
        .client
        .set_route(route(bind, ProxyMode::Http, vec![]))
        .await
        .unwrap();
    let client = http_client();
    assert_eq!(
        get(&client, bind).await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy backend\n".into()
        )
    );

    // All weights zero is the same as no backend.
    let a = spawn_backend("a", Behavior::Name).await;
    let mut zero = backend(a, "r1", "web-a");
    zero.weight = 0;
    proxy
        .client
        .set_route(route(bind, ProxyMode::Http, vec![zero]))
        .await
        .unwrap();
    assert_eq!(get(&client, bind).await.0, StatusCode::SERVICE_UNAVAILABLE);

    let status = proxy.client.status().await.unwrap();
    let unrouted = status.routes[0].releases[""];
    assert_eq!((unrouted.s5xx, unrouted.failed), (2, 2));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_refusing_connections_is_retried_on_another() {
    let (_tmp, dir) = state_dir();
    let proxy = TestProxy::start(&dir).await;
    let good = spawn_backend("good", Behavior::Name).await;
    let dead = free_addr();
    let bind = free_addr();
    proxy
        .client
        .set_route(route(
            bind,
            ProxyMode::Http,
            vec![
                backend(dead, "r1", "web-dead"),
                backend(good, "r1", "web-good"),
            ],
        ))
        .await
        .unwrap();

    let client = http_client();
    for _ in 0..20 {
        assert_eq!(get(&client, bind).await, (StatusCode::OK, "good".into()));
    }
    let status = proxy.client.status().await.unwrap();
    assert_eq!(status.routes[0].releases["r1"].s2xx, 20);
    assert_eq!(status.routes[0].releases["r1"].failed, 0);

    // With only dead backends the request fails with 502, counted as failed.
    proxy
        .client
        .set_route(route(
            bind,
            ProxyMode::Http,
            vec![backend(dead, "r2", "web-dead")],
        ))
        .await
        .unwrap();
    assert_eq!(get(&client, bind).await.0, StatusCode::BAD_GATEWAY);
    let status = proxy.client.status().await.unwrap();
    let r2 = status.routes[0].releases["r2"];
    assert_eq!((r2.s5xx, r2.failed), (1, 1));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mode_forwards_bytes_and_counts_open_connections() {
    let (_tmp, dir) = state_dir();
    let proxy = TestProxy::start(&dir).await;
    let echo = spawn_echo().await;
    let dead = free_addr();
    let bind = free_addr();
    proxy
        .client
        .set_route(route(
            bind,
            ProxyMode::Tcp,
            vec![
                backend(dead, "r1", "db-dead"),
                backend(echo, "r1", "db-echo"),
            ],
        ))
        .await
        .unwrap();

    for _ in 0..3 {
        let mut stream = TcpStream::connect(bind).await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        let mut echoed = [0u8; 5];
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&echoed, b"hello");
        assert_eq!(in_flight(&proxy.client, bind, "db-echo").await, 1);
        drop(stream);
        let drained = proxy
            .client
            .wait_drained(bind, &["db-echo".to_string()], PATIENCE)
            .await
            .unwrap();
        assert!(drained);
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_failure_is_reported_and_changes_nothing() {
    let (_tmp, dir) = state_dir();
    let proxy = TestProxy::start(&dir).await;
    let a = spawn_backend("a", Behavior::Name).await;
    let good_bind = free_addr();
    proxy
        .client
        .set_route(route(
            good_bind,
            ProxyMode::Http,
            vec![backend(a, "r1", "web-a")],
        ))
        .await
        .unwrap();

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let err = proxy
        .client
        .set_route(route(
            taken_addr,
            ProxyMode::Http,
            vec![backend(a, "r1", "web-a")],
        ))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ProxyError::Rejected { .. }), "{err:?}");
    assert!(
        message.contains(&format!("cannot listen on {taken_addr}: ")),
        "{message}"
    );
    assert!(message.contains("in use"), "{message}");

    let status = proxy.client.status().await.unwrap();
    assert_eq!(status.routes.len(), 1);
    assert_eq!(status.routes[0].route.bind, good_bind);
    assert_eq!(get(&http_client(), good_bind).await.1, "a");
    let persisted = std::fs::read_to_string(dir.join(ROUTES_FILE)).unwrap();
    assert!(!persisted.contains(&taken_addr.to_string()));
    proxy.shutdown().await;
}

#[tokio::test]
async fn client_reports_a_proxy_that_is_not_running() {
    let (_tmp, dir) = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join(SOCKET_FILE);

    let err = ProxyClient::new(&socket).ping().await.unwrap_err();
    assert!(matches!(err, ProxyError::NotRunning { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.starts_with(&format!(
        "the proxy is not running (no answer on {})",
        socket.display()
    )));
    assert!(message.contains(&format!("deploy-agent proxy --state-dir {}", dir.display())));
    assert!(message.contains("systemctl start deploy-proxy"));

    // A socket file left by a dead proxy: refused, also "not running".
    drop(tokio::net::UnixListener::bind(&socket).unwrap());
    let err = ProxyClient::new(&socket).status().await.unwrap_err();
    assert!(matches!(err, ProxyError::NotRunning { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_is_replaced_but_a_live_proxy_is_not() {
    let (_tmp, dir) = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    drop(tokio::net::UnixListener::bind(dir.join(SOCKET_FILE)).unwrap());

    let proxy = TestProxy::start(&dir).await;
    let second = run(&dir, std::future::pending()).await;
    assert!(
        matches!(second, Err(ProxyError::AlreadyRunning { .. })),
        "{second:?}"
    );
    proxy.client.ping().await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_change_keeps_the_listener() {
    let (_tmp, dir) = state_dir();
    let proxy = TestProxy::start(&dir).await;
    let echo = spawn_echo().await;
    let web = spawn_backend("web", Behavior::Name).await;
    let bind = free_addr();
    proxy
        .client
        .set_route(route(
            bind,
            ProxyMode::Http,
            vec![backend(web, "r1", "web-1")],
        ))
        .await
        .unwrap();
    assert_eq!(get(&http_client(), bind).await.1, "web");

    proxy
        .client
        .set_route(route(
            bind,
            ProxyMode::Tcp,
            vec![backend(echo, "r2", "echo-1")],
        ))
        .await
        .unwrap();
    let mut stream = TcpStream::connect(bind).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"ping");
    // An open TCP connection would hold the shutdown for its whole grace.
    drop(stream);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_under_load_fails_no_request() {
    let (_tmp, dir) = state_dir();
    let proxy = TestProxy::start(&dir).await;
    let (a, stop_a) = spawn_stoppable_backend("a", Behavior::Name).await;
    let (b, stop_b) = spawn_stoppable_backend("b", Behavior::Name).await;
    let c = spawn_backend("c", Behavior::Name).await;
    let bind = free_addr();
    let set = |backends: Vec<Backend>| {
        proxy
            .client
            .set_route(route(bind, ProxyMode::Http, backends))
    };
    set(vec![backend(a, "r1", "web-a")]).await.unwrap();

    // GETs and POSTs over keep-alive connections, as fast as they go.
    let running = Arc::new(AtomicBool::new(true));
    let mut loops = Vec::new();
    for worker in 0..4 {
        let running = Arc::clone(&running);
        loops.push(tokio::spawn(async move {
            let client = http_client();
            let mut answers = Vec::new();
            let mut n = 0u32;
            while running.load(Ordering::SeqCst) {
                n += 1;
                let request = Request::builder()
                    .method(if (n + worker).is_multiple_of(2) {
                        "POST"
                    } else {
                        "GET"
                    })
                    .uri(format!("http://{bind}/order"))
                    .body(Full::new(Bytes::from(format!("order {n}"))))
                    .unwrap();
                let response = tokio::time::timeout(PATIENCE, client.request(request))
                    .await
                    .expect("request timed out")
                    .expect("request failed");
                let status = response.status();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                answers.push((status, body));
            }
            answers
        }));
    }
    let pause = || tokio::time::sleep(Duration::from_millis(150));

    // Replace a by b, then b by c, like the engine does: add the new one,
    // take the old one out, wait for it to drain, remove its container.
    let containers = |name: &str| vec![name.to_string()];
    pause().await;
    set(vec![backend(a, "r1", "web-a"), backend(b, "r2", "web-b")])
        .await
        .unwrap();
    pause().await;
    set(vec![backend(b, "r2", "web-b")]).await.unwrap();
    assert!(
        proxy
            .client
            .wait_drained(bind, &containers("web-a"), PATIENCE)
            .await
            .unwrap()
    );
    stop_a.abort();
    pause().await;
    set(vec![backend(b, "r2", "web-b"), backend(c, "r3", "web-c")])
        .await
        .unwrap();
    pause().await;
    set(vec![backend(c, "r3", "web-c")]).await.unwrap();
    assert!(
        proxy
            .client
            .wait_drained(bind, &containers("web-b"), PATIENCE)
            .await
            .unwrap()
    );
    stop_b.abort();
    pause().await;
    running.store(false, Ordering::SeqCst);

    let mut total = 0;
    for task in loops {
        for (status, body) in task.await.unwrap() {
            assert_eq!(status, StatusCode::OK, "body: {body:?}");
            total += 1;
        }
    }
    assert!(total > 0);
    let status = proxy.client.status().await.unwrap();
    let failed: u64 = status.routes[0].releases.values().map(|c| c.failed).sum();
    assert_eq!(failed, 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_body_is_refused_with_413() {
    let (_tmp, dir) = state_dir();
    let proxy = TestProxy::start(&dir).await;
    let a = spawn_backend("a", Behavior::Name).await;
    let bind = free_addr();
    proxy
        .client
        .set_route(route(
            bind,
            ProxyMode::Http,
            vec![backend(a, "r1", "web-a")],
        ))
        .await
        .unwrap();
    // Raw HTTP: the proxy answers before the body is sent, and an HTTP
    // client library would report the unsent body as a broken pipe.
    let mut stream = TcpStream::connect(bind).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: shop\r\nContent-Length: {}\r\n\r\n",
        super::http::MAX_REQUEST_BODY + 1
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 12];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, b"HTTP/1.1 413");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_served_by_http1_backends() {
    let (_tmp, dir) = state_dir();
    let proxy = TestProxy::start(&dir).await;
    let a = spawn_backend("a", Behavior::Name).await;
    let bind = free_addr();
    proxy
        .client
        .set_route(route(
            bind,
            ProxyMode::Http,
            vec![backend(a, "r1", "web-a")],
        ))
        .await
        .unwrap();
    let h2c: TestClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    for _ in 0..3 {
        assert_eq!(get(&h2c, bind).await, (StatusCode::OK, "a".into()));
    }
    drop(h2c);
    proxy.shutdown().await;
}

// ---- handover to a successor proxy ------------------------------------------

/// A successor proxy (as a task) taking over from the one on `state_dir`.
fn spawn_successor(state_dir: &Path) -> (oneshot::Sender<()>, JoinHandle<Result<(), ProxyError>>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let dir = state_dir.to_path_buf();
    let task = tokio::spawn(async move {
        let (_no_upgrades, upgrades) = tokio::sync::mpsc::channel(1);
        let options = Options {
            take_over: true,
            successor: None,
        };
        run_with(&dir, options, upgrades, async {
            let _ = stopped.await;
        })
        .await
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_under_load_fails_no_request_and_keeps_the_counters() {
    let (_tmp, dir) = state_dir();
    let old = TestProxy::start(&dir).await;
    let a = spawn_backend("a", Behavior::Name).await;
    let b = spawn_backend("b", Behavior::Name).await;
    let bind = free_addr();
    old.client
        .set_route(route(
            bind,
            ProxyMode::Http,
            vec![backend(a, "r1", "web-a")],
        ))
        .await
        .unwrap();

    // Keep-alive clients and one new connection per request, side by side.
    let running = Arc::new(AtomicBool::new(true));
    let mut loops = Vec::new();
    for i in 0..6 {
        let running = Arc::clone(&running);
        loops.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let pooled = http_client();
            while running.load(Ordering::SeqCst) {
                let started = Instant::now();
                let (status, body) = if i % 2 == 0 {
                    get(&pooled, bind).await
                } else {
                    get(&http_client(), bind).await
                };
                seen.push((started, Instant::now(), status, body));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = old.client.status().await.unwrap().routes[0].releases["r1"].s2xx;
    assert!(before > 0, "no load before the handover");

    let (stop_new, new_task) = spawn_successor(&dir);
    // The old proxy returns once it handed over and its clients left it.
    let TestProxy {
        client,
        stop: stop_old,
        task: old_task,
    } = old;
    let old_result = tokio::time::timeout(PATIENCE, old_task)
        .await
        .expect("the old proxy did not finish after the handover")
        .expect("the old proxy task panicked");
    old_result.expect("the old proxy failed");
    drop(stop_old);
    assert!(!new_task.is_finished(), "the successor exited");

    // The control socket leads to the successor, with the counters carried.
    let status = client.status().await.unwrap();
    assert!(status.routes[0].releases["r1"].s2xx >= before);
    let switch_sent = Instant::now();
    client
        .set_route(route(
            bind,
            ProxyMode::Http,
            vec![backend(b, "r2", "web-b")],
        ))
        .await
        .unwrap();
    let switch_done = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.store(false, Ordering::SeqCst);

    // The proxy picks a request's backend somewhere between the start of the
    // request and its answer: a request answered before the switch was asked
    // for saw "a", one started after it was acknowledged sees "b", and one
    // in flight meanwhile may see either.
    let (mut total, mut after) = (0, 0);
    for task in loops {
        for (started, done, status, body) in task.await.unwrap() {
            assert_eq!(status, StatusCode::OK, "body: {body}");
            total += 1;
            if started > switch_done {
                assert_eq!(body, "b", "the successor did not switch");
                after += 1;
            } else if done < switch_sent {
                assert_eq!(body, "a", "switched before it was asked to");
            }
        }
    }
    assert!(after > 0, "no request after the switch ({total} in all)");
    let _ = stop_new.send(());
    tokio::time::timeout(PATIENCE, new_task)
        .await
        .expect("the successor did not shut down")
        .expect("the successor panicked")
        .expect("the successor failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_gives_up_leaves_the_running_proxy_as_it_was() {
    let (_tmp, dir) = state_dir();
    let proxy = TestProxy::start(&dir).await;
    let a = spawn_backend("a", Behavior::Name).await;
    let bind = free_addr();
    proxy
        .client
        .set_route(route(
            bind,
            ProxyMode::Http,
            vec![backend(a, "r1", "web-a")],
        ))
        .await
        .unwrap();

    // It receives the listeners, then hangs up without being ready.
    let taken = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || super::handover::take(&dir).map(|t| t.listeners.len())
    })
    .await
    .unwrap()
    .expect("take the listeners");
    assert_eq!(taken, 1);

    assert_eq!(
        get(&http_client(), bind).await,
        (StatusCode::OK, "a".to_string())
    );
    // The registry lock was released: route changes work again.
    proxy
        .client
        .set_route(route(
            bind,
            ProxyMode::Http,
            vec![backend(a, "r2", "web-a2")],
        ))
        .await
        .unwrap();
    assert_eq!(
        proxy.client.status().await.unwrap().routes[0]
            .route
            .backends[0]
            .release,
        "r2"
    );
    assert!(!proxy.task.is_finished(), "the running proxy stopped");
    proxy.shutdown().await;
}

#[tokio::test]
async fn take_over_with_no_proxy_running_says_so() {
    let (_tmp, dir) = state_dir();
    let (_stop, task) = spawn_successor(&dir);
    let err = tokio::time::timeout(PATIENCE, task)
        .await
        .expect("take-over did not give up")
        .expect("the task panicked")
        .expect_err("took over from nothing");
    assert!(
        matches!(err, ProxyError::NothingToTakeOver { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("nothing to take over")
            && err.to_string().contains("without --take-over"),
        "{err}"
    );
}
