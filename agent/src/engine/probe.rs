//! Probing one container for its [`HealthGate`]: the I/O half of the gate.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Engine;
use crate::health::{HealthGate, ProbeResult, Verdict};
use crate::spec::{Probe, ServiceSpec};

impl Engine {
    /// Probe `container` until its service's gate passes (how long it took)
    /// or fails (why).
    pub(crate) async fn gate(
        &self,
        container: &str,
        svc: &ServiceSpec,
    ) -> Result<Duration, String> {
        let settings = svc.deploy.health.clone();
        let interval = settings.interval;
        let mut gate = HealthGate::new(settings);
        let began = Instant::now();
        let first = self
            .docker
            .inspect(container)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("container {container} does not exist"))?;
        loop {
            let result = self.probe_once(container, svc, &first).await;
            match gate.observe(began.elapsed(), result) {
                Verdict::Healthy => return Ok(began.elapsed()),
                Verdict::Unhealthy(why) => return Err(why),
                Verdict::Pending => tokio::time::sleep(interval).await,
            }
        }
    }

    /// One probe, counted in the metrics (`deploy_agent_probes_total`).
    pub(crate) async fn probe_once(
        &self,
        container: &str,
        svc: &ServiceSpec,
        first: &crate::docker::ContainerInfo,
    ) -> ProbeResult {
        let result = self.probe_uncounted(container, svc, first).await;
        crate::health::PROBES.record(&svc.deploy.health.probe, &result);
        result
    }

    async fn probe_uncounted(
        &self,
        container: &str,
        svc: &ServiceSpec,
        first: &crate::docker::ContainerInfo,
    ) -> ProbeResult {
        let info = match self.docker.inspect(container).await {
            Ok(Some(info)) => info,
            Ok(None) => return ProbeResult::ContainerDown("the container was removed".into()),
            Err(e) => return ProbeResult::Failure(e.to_string()),
        };
        if !info.running {
            return ProbeResult::ContainerDown(format!(
                "the container exited with code {}",
                info.exit_code
            ));
        }
        if info.restart_count != first.restart_count || info.started_at != first.started_at {
            return ProbeResult::ContainerDown("the container was restarted by Docker".into());
        }
        let timeout = svc.deploy.health.timeout;
        let Some(ip) = info.ip else {
            return ProbeResult::Failure("the container has no network address yet".into());
        };
        match &svc.deploy.health.probe {
            Probe::Http { path, port } => http_probe(ip, *port, path, timeout).await,
            Probe::Tcp { port } => tcp_probe(ip, *port, timeout).await,
            Probe::Running { port: Some(port) } => tcp_probe(ip, *port, timeout).await,
            Probe::Running { port: None } => ProbeResult::Success,
            Probe::Docker => match info.health.as_deref() {
                Some("healthy") => ProbeResult::Success,
                Some("unhealthy") => {
                    ProbeResult::Unhealthy("docker health status is unhealthy".into())
                }
                Some(other) => ProbeResult::Failure(format!("docker health status is {other}")),
                None => ProbeResult::Failure("the container has no Docker healthcheck".into()),
            },
            Probe::Exec { command } => {
                match tokio::time::timeout(timeout, self.docker.exec(container, command)).await {
                    Ok(Ok(0)) => ProbeResult::Success,
                    Ok(Ok(code)) => ProbeResult::Unhealthy(format!("exec exited with code {code}")),
                    Ok(Err(e)) => ProbeResult::Failure(e.to_string()),
                    Err(_) => ProbeResult::Failure(format!(
                        "exec did not finish within {}",
                        humantime::format_duration(timeout)
                    )),
                }
            }
        }
    }
}

async fn tcp_probe(ip: IpAddr, port: u16, timeout: Duration) -> ProbeResult {
    let addr = SocketAddr::new(ip, port);
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => ProbeResult::Success,
        Ok(Err(e)) => ProbeResult::Failure(format!("tcp connect to {addr}: {e}")),
        Err(_) => ProbeResult::Failure(format!("tcp connect to {addr} timed out")),
    }
}

/// GET `path`; 2xx and 3xx pass.
async fn http_probe(ip: IpAddr, port: u16, path: &str, timeout: Duration) -> ProbeResult {
    let addr = SocketAddr::new(ip, port);
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("http to {addr}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::USER_AGENT, "deploy-agent-health")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("bad probe path {path}: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET {path} on {addr}: {e}"))?;
        Ok::<u16, String>(resp.status().as_u16())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(status)) if (200..400).contains(&status) => ProbeResult::Success,
        Ok(Ok(status)) => ProbeResult::Unhealthy(format!("GET {path} answered {status}")),
        Ok(Err(e)) => ProbeResult::Failure(e),
        Err(_) => ProbeResult::Failure(format!(
            "GET {path} on {addr} took longer than {}",
            humantime::format_duration(timeout)
        )),
    }
}
