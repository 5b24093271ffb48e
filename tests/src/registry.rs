//! A throw-away registry on a free port, with its own storage, for tests
//! that must stop their registry (the shared ones stay up).

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::env::{REGISTRY, registry_binary, require_test_registry};
use crate::harness::{docker, free_port};
use crate::http::http_get;

pub struct PrivateRegistry {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    repos: Vec<String>,
}

impl PrivateRegistry {
    /// Starts a registry on `127.0.0.1:{free port}` and pushes the given
    /// test images to it, e.g. `["demo:v1", "demo:v2"]` (taken from
    /// 127.0.0.1:5000). The pushed tags are then removed from the local
    /// engine, so that whoever wants them must pull them.
    pub fn start_with(images: &[&str]) -> PrivateRegistry {
        require_test_registry();
        let bin = registry_binary();
        let dir = tempfile::Builder::new()
            .prefix("deploy-e2e-registry-")
            .tempdir()
            .expect("registry temp dir");
        let port = free_port();
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage).expect("registry storage");
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: private-{port}\n",
                storage.display()
            ),
        )
        .expect("registry config");
        let log = fs::File::create(dir.path().join("registry.log")).expect("registry log");
        let child = Command::new(&bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {} serve: {e}", bin.display()));
        let mut reg = PrivateRegistry {
            port,
            child: Some(child),
            dir,
            repos: vec![],
        };
        let start = Instant::now();
        loop {
            match http_get(port, "/v2/", Duration::from_secs(2)) {
                Ok(r) if r.status == 200 => break,
                other => {
                    if let Some(status) =
                        reg.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
                    {
                        panic!(
                            "the private registry exited ({status}): {}",
                            fs::read_to_string(reg.dir.path().join("registry.log"))
                                .unwrap_or_default()
                        );
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(20),
                        "the private registry on 127.0.0.1:{port} did not come up: {other:?}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        for image in images {
            let src = format!("{REGISTRY}/{image}");
            let dst = format!("127.0.0.1:{port}/{image}");
            docker(&["tag", &src, &dst]);
            docker(&["push", "--quiet", &dst]);
            docker(&["rmi", &dst]);
            let repo = dst
                .rsplit_once(':')
                .map(|(r, _)| r.to_string())
                .unwrap_or(dst);
            if !reg.repos.contains(&repo) {
                reg.repos.push(repo);
            }
        }
        reg
    }

    /// `127.0.0.1:{port}`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:{port}/{name}`, e.g. `image("demo:v1")`.
    pub fn image(&self, name: &str) -> String {
        format!("{}/{name}", self.addr())
    }

    /// Stops the registry and checks that it no longer answers.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let start = Instant::now();
        while http_get(self.port, "/v2/", Duration::from_millis(500)).is_ok() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the private registry on {} still answers after it was stopped",
                self.addr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for PrivateRegistry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Untag whatever the engine holds from this registry (pulled by the
        // agent); the image data is shared with 127.0.0.1:5000's and stays.
        for repo in &self.repos {
            let out = Command::new("docker")
                .args([
                    "image",
                    "ls",
                    "--digests",
                    "--format",
                    "{{.Repository}} {{.Tag}} {{.Digest}}",
                    repo,
                ])
                .stderr(Stdio::null())
                .output();
            let Ok(out) = out else { continue };
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() != 3 {
                    continue;
                }
                let mut refs = Vec::new();
                if f[1] != "<none>" {
                    refs.push(format!("{}:{}", f[0], f[1]));
                }
                if f[2] != "<none>" {
                    refs.push(format!("{}@{}", f[0], f[2]));
                }
                for r in refs {
                    let _ = Command::new("docker")
                        .args(["rmi", &r])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
    }
}
