//! Self-tests of the test infrastructure against the real engine and the
//! test registries: the images behave as the e2e tests assume, the load loop
//! reaches its rate without failures, a private registry starts and stops.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use deploy_testkit::{
    InitProcess, LoadLoop, Mode, PrivateRegistry, demo_image, docker, free_port, http_get,
    require_auth_registry, require_test_registry, wait_sigterm_trap, wait_until,
};

/// A container of a test image, published on 127.0.0.1:{port} by Docker
/// itself (the agent never does this; here there is no agent).
struct Plain {
    id: String,
    port: u16,
}

impl Plain {
    fn run(tag: &str) -> Plain {
        Plain::run_command(tag, &[])
    }

    /// demo:{tag} with `command` instead of the image's /bin/start (none: the image's).
    fn run_command(tag: &str, command: &[&str]) -> Plain {
        require_test_registry();
        let port = free_port();
        let publish = format!("127.0.0.1:{port}:80");
        let image = demo_image(tag);
        let mut args = vec![
            "run",
            "-d",
            "--label",
            "io.deploy-testkit.infra=1",
            "-p",
            &publish,
            &image,
        ];
        args.extend_from_slice(command);
        let id = docker(&args).trim().to_string();
        Plain { id, port }
    }

    /// `docker stop -t {grace}`: how long it took and the exit code.
    fn stop(&self, grace: u32) -> (Duration, String) {
        let t = std::time::Instant::now();
        docker(&["stop", "-t", &grace.to_string(), &self.id]);
        let took = t.elapsed();
        let code = docker(&["inspect", "-f", "{{.State.ExitCode}}", &self.id]);
        (took, code.trim().to_string())
    }

    fn wait_http(&self) {
        wait_until("the container to answer", Duration::from_secs(20), || {
            http_get(self.port, "/health", Duration::from_secs(2)).map(|_| ())
        });
    }
}

impl Drop for Plain {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.id]).output();
    }
}

#[test]
fn healthy_images_serve_their_release_health_and_a_slow_page() {
    for tag in ["v1", "v2"] {
        let c = Plain::run(tag);
        c.wait_http();
        let root = http_get(c.port, "/", Duration::from_secs(5)).expect("GET /");
        assert_eq!((root.status, root.body.as_str()), (200, tag));
        let health = http_get(c.port, "/health", Duration::from_secs(5)).expect("GET /health");
        assert_eq!((health.status, health.body.as_str()), (200, "ok"));
        let t = std::time::Instant::now();
        let slow = http_get(c.port, "/cgi-bin/slow", Duration::from_secs(10)).expect("slow");
        assert_eq!((slow.status, slow.body.as_str()), (200, tag));
        assert!(
            t.elapsed() >= Duration::from_millis(1900),
            "/cgi-bin/slow took only {:?}",
            t.elapsed()
        );
    }
}

#[test]
fn broken_image_answers_500_everywhere() {
    let c = Plain::run("v3");
    c.wait_http();
    for path in ["/", "/health"] {
        let r = http_get(c.port, path, Duration::from_secs(5)).expect("GET");
        assert_eq!(r.status, 500, "GET {path} on demo:v3: {r:?}");
    }
}

#[test]
fn crash_image_serves_then_exits_1() {
    let c = Plain::run("crash");
    c.wait_http();
    let r = http_get(c.port, "/", Duration::from_secs(5)).expect("GET /");
    assert_eq!((r.status, r.body.as_str()), (200, "crash"));
    let state = wait_until("demo:crash to exit", Duration::from_secs(15), || {
        let s = docker(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.ExitCode}}",
            &c.id,
        ]);
        if s.starts_with("exited") {
            Ok(s.trim().to_string())
        } else {
            Err(s)
        }
    });
    assert_eq!(state, "exited 1");
}

/// Every image exits at once, with status 0, on a SIGTERM that comes as
/// early as it can be honoured: right after the entrypoint's first command
/// (its trap); no waiting for HTTP.
#[test]
fn images_stop_at_once_on_sigterm() {
    for tag in ["v1", "v2", "v3", "crash", "noport", "sick", "flaky"] {
        let c = Plain::run(tag);
        wait_sigterm_trap(&c.id, Duration::from_secs(20));
        let (took, code) = c.stop(10);
        assert!(
            took < Duration::from_secs(3),
            "docker stop of demo:{tag} took {took:?} (the image must exit on SIGTERM)"
        );
        assert_eq!(code, "0", "demo:{tag} exit code after SIGTERM");
    }
}

/// Why a test must wait for `wait_sigterm_trap` before it stops a container
/// it has just started (`docker stop of demo:noport took 10.21s` once, under
/// load): a container's PID 1 without a SIGTERM handler yet does not just
/// defer the signal, it loses it, and `docker stop` then waits the whole
/// grace period and kills (137). Here PID 1 is `sh -c` running `sleep` in the
/// foreground, which stays in that state for as long as the test needs.
#[test]
fn a_sigterm_before_the_entrypoint_traps_it_is_lost() {
    let c = Plain::run_command("noport", &["sh", "-c", "sleep 3600; exec /bin/start"]);
    let init = wait_until("PID 1 to be the shell", Duration::from_secs(20), || {
        let init = InitProcess::of(&c.id)?;
        if init.name == "sh" {
            Ok(init)
        } else {
            Err(format!("{init:?}"))
        }
    });
    assert!(
        !init.catches(Signal::SIGTERM),
        "PID 1 already traps SIGTERM: {init:?}"
    );
    let (took, code) = c.stop(1);
    assert!(
        took >= Duration::from_secs(1),
        "a container whose PID 1 has no SIGTERM handler stopped in {took:?}"
    );
    assert_eq!(code, "137", "killed at the end of the grace period");
}

/// Both kinds of client, every answer recorded. How many requests per second
/// it reaches depends on the machine: scripts/bench.sh reports that.
#[test]
fn load_loop_sends_both_kinds_of_request_with_zero_failures() {
    let c = Plain::run("v1");
    c.wait_http();
    let load = LoadLoop::start(c.port);
    load.wait_for_responses(600, Duration::from_secs(60));
    let report = load.stop();
    eprintln!("{}", report.summary());
    report.assert_clean(&["v1"]);
    // Both kinds of worker keep the same schedule.
    assert!(report.count(Mode::KeepAlive) > 100, "{}", report.summary());
    assert!(
        report.count(Mode::NewConnection) > 100,
        "{}",
        report.summary()
    );
    // Each keep-alive answer names its connection (here a new one each
    // time: busybox httpd closes every connection, which the agent's proxy
    // does not pass on to its clients).
    assert!(
        report
            .records
            .iter()
            .filter(|r| r.mode == Mode::KeepAlive)
            .all(|r| r.connection.is_some()),
        "{}",
        report.summary()
    );
}

#[test]
fn load_loop_reports_failures_when_the_server_goes_away() {
    let c = Plain::run("v1");
    c.wait_http();
    let load = LoadLoop::start(c.port);
    load.wait_for_responses(100, Duration::from_secs(10));
    docker(&["rm", "-f", &c.id]);
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    assert!(
        !report.failures().is_empty(),
        "requests after the server was removed must fail: {}",
        report.summary()
    );
    assert_eq!(report.bodies_in_order(), vec!["v1"]);
}

#[test]
fn private_registry_serves_pushed_images_until_stopped() {
    let mut reg = PrivateRegistry::start_with(&["demo:v1", "demo:v2"]);
    let tags = http_get(reg.port, "/v2/demo/tags/list", Duration::from_secs(5)).expect("tags");
    assert_eq!(tags.status, 200);
    assert!(
        tags.body.contains("\"v1\"") && tags.body.contains("\"v2\""),
        "{}",
        tags.body
    );
    // The pushed tags are not left in the engine: pulling is the only way.
    let local = docker(&["image", "ls", "-q", &reg.image("demo:v1")]);
    assert!(local.trim().is_empty(), "local tag left behind: {local}");
    docker(&["pull", "--quiet", &reg.image("demo:v1")]);
    reg.stop();
    assert!(http_get(reg.port, "/v2/", Duration::from_secs(1)).is_err());
    let pull = Command::new("docker")
        .args(["pull", &reg.image("demo:v2")])
        .output()
        .expect("docker pull");
    assert!(
        !pull.status.success(),
        "pull from a stopped registry succeeded"
    );
}

#[test]
fn auth_registry_refuses_anonymous_pulls_and_accepts_the_test_user() {
    require_auth_registry();
    let anon = http_get(5001, "/v2/", Duration::from_secs(5)).expect("GET /v2/");
    assert_eq!(anon.status, 401);
    let dir = tempfile::tempdir().expect("tempdir");
    let pull = Command::new("docker")
        .env("DOCKER_CONFIG", dir.path())
        .args(["pull", "127.0.0.1:5001/private:v1"])
        .output()
        .expect("docker pull");
    assert!(
        !pull.status.success(),
        "anonymous pull from :5001 succeeded"
    );
    let stderr = String::from_utf8_lossy(&pull.stderr).to_lowercase();
    assert!(
        stderr.contains("auth") || stderr.contains("denied"),
        "anonymous pull failed for another reason: {stderr}"
    );
    let login = Command::new("sh")
        .env("DOCKER_CONFIG", dir.path())
        .args([
            "-c",
            "printf s3cret | docker login -u deployer --password-stdin 127.0.0.1:5001 \
             && docker pull --quiet 127.0.0.1:5001/demo:v1",
        ])
        .output()
        .expect("docker login");
    assert!(
        login.status.success(),
        "login and pull as deployer failed: {}",
        String::from_utf8_lossy(&login.stderr)
    );
}
