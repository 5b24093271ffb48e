//! Compose files for the test images, rendered as YAML text.

use std::fmt::Write as _;

use crate::env::REGISTRY;

/// `x-deploy.health` of a service. Defaults are fast, for tests: an HTTP
/// probe of `/health` every 300 ms, healthy after 1 success, deadline 10 s.
#[derive(Debug, Clone)]
pub struct Health {
    pub http: String,
    pub port: u16,
    pub interval: String,
    pub timeout: String,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
    pub start_period: String,
    pub deadline: String,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            http: "/health".into(),
            port: 80,
            interval: "300ms".into(),
            timeout: "1s".into(),
            healthy_after: 1,
            unhealthy_after: 3,
            start_period: "0s".into(),
            deadline: "10s".into(),
        }
    }
}

/// One service.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    /// May use `${RELEASE}` and `${VAR}`.
    pub image: String,
    /// `ports: ["127.0.0.1:{host}:{target}"]`.
    pub ports: Vec<(u16, u16)>,
    /// `x-deploy.health`; `None` leaves the gate to the agent's default.
    pub health: Option<Health>,
    pub drain_timeout: Option<String>,
    /// `x-deploy.proxy` (`http` or `tcp`).
    pub proxy: Option<String>,
    pub depends_on: Vec<String>,
    pub replicas: Option<u32>,
    /// Raw YAML lines added under the service (indented by the renderer),
    /// e.g. `"stop_grace_period: 2s"`.
    pub extra: Vec<String>,
}

impl Service {
    /// A demo web service: `127.0.0.1:5000/demo:${RELEASE}` published on
    /// `127.0.0.1:{host_port}` (port 80 in the container), HTTP health gate
    /// on `/health`, drain timeout 10 s.
    pub fn web(name: &str, host_port: u16) -> Service {
        Service {
            name: name.into(),
            image: format!("{REGISTRY}/demo:${{RELEASE}}"),
            ports: vec![(host_port, 80)],
            health: Some(Health::default()),
            drain_timeout: Some("10s".into()),
            proxy: Some("http".into()),
            depends_on: vec![],
            replicas: None,
            extra: vec![],
        }
    }

    /// A service without ports or probe (e.g. `demo:noport`).
    pub fn worker(name: &str, image: &str) -> Service {
        Service {
            name: name.into(),
            image: image.into(),
            ports: vec![],
            health: None,
            drain_timeout: None,
            proxy: None,
            depends_on: vec![],
            replicas: None,
            extra: vec![],
        }
    }

    pub fn image(mut self, image: &str) -> Service {
        self.image = image.into();
        self
    }

    /// Changes the health settings (creating the default ones if absent).
    pub fn health(mut self, f: impl FnOnce(&mut Health)) -> Service {
        f(self.health.get_or_insert_with(Health::default));
        self
    }

    pub fn extra(mut self, line: &str) -> Service {
        self.extra.push(line.into());
        self
    }

    pub fn depends_on(mut self, other: &str) -> Service {
        self.depends_on.push(other.into());
        self
    }
}

/// A compose file.
#[derive(Debug, Clone, Default)]
pub struct Compose {
    pub services: Vec<Service>,
    /// Raw top-level YAML appended at the end.
    pub extra_top_level: Vec<String>,
}

impl Compose {
    pub fn new() -> Compose {
        Compose::default()
    }

    /// One demo web service `web` on `127.0.0.1:{host_port}`.
    pub fn web(host_port: u16) -> Compose {
        Compose::new().service(Service::web("web", host_port))
    }

    pub fn service(mut self, s: Service) -> Compose {
        self.services.push(s);
        self
    }

    /// Changes the service `name`; panics if there is none.
    pub fn edit(mut self, name: &str, f: impl FnOnce(Service) -> Service) -> Compose {
        let i = self
            .services
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("compose: no service {name}"));
        let s = self.services.remove(i);
        self.services.insert(i, f(s));
        self
    }

    pub fn render(&self) -> String {
        let mut y = String::from("services:\n");
        for s in &self.services {
            let _ = writeln!(y, "  {}:", s.name);
            let _ = writeln!(y, "    image: \"{}\"", s.image);
            if !s.ports.is_empty() {
                y.push_str("    ports:\n");
                for (host, target) in &s.ports {
                    let _ = writeln!(y, "      - \"127.0.0.1:{host}:{target}\"");
                }
            }
            if !s.depends_on.is_empty() {
                y.push_str("    depends_on:\n");
                for d in &s.depends_on {
                    let _ = writeln!(y, "      - {d}");
                }
            }
            if let Some(n) = s.replicas {
                let _ = writeln!(y, "    deploy:\n      replicas: {n}");
            }
            for line in &s.extra {
                let _ = writeln!(y, "    {line}");
            }
            if s.health.is_some() || s.drain_timeout.is_some() || s.proxy.is_some() {
                y.push_str("    x-deploy:\n");
                if let Some(h) = &s.health {
                    y.push_str("      health:\n");
                    let _ = writeln!(y, "        http: {}", h.http);
                    let _ = writeln!(y, "        port: {}", h.port);
                    let _ = writeln!(y, "        interval: {}", h.interval);
                    let _ = writeln!(y, "        timeout: {}", h.timeout);
                    let _ = writeln!(y, "        healthy_after: {}", h.healthy_after);
                    let _ = writeln!(y, "        unhealthy_after: {}", h.unhealthy_after);
                    let _ = writeln!(y, "        start_period: {}", h.start_period);
                    let _ = writeln!(y, "        deadline: {}", h.deadline);
                }
                if let Some(d) = &s.drain_timeout {
                    let _ = writeln!(y, "      drain_timeout: {d}");
                }
                if let Some(p) = &s.proxy {
                    let _ = writeln!(y, "      proxy: {p}");
                }
            }
        }
        for line in &self.extra_top_level {
            let _ = writeln!(y, "{line}");
        }
        y
    }
}
