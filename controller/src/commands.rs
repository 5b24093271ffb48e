//! `status`, `history` and `audit`: ask every host of an environment at
//! once and merge the answers.

use std::collections::BTreeMap;

use deploy_protocol::{ApprovalRequest, HistoryEntry, Outcome, ProjectStatus, ServedBy};
use deploy_protocol::{AuditRecord, timestamp};
use futures_util::future::join_all;
use serde::Serialize;

use crate::client::{self, AgentClient, CallError, Notice, RouteReport, TransportOptions};
use crate::deploy::short_digest;
use crate::exit;
use crate::inventory::{Environment, Inventory};

fn setup(
    inv: &Inventory,
    env: &str,
    transport: &TransportOptions,
) -> Result<(Environment, Vec<AgentClient>), i32> {
    let env = inv.environment(env).map_err(|e| {
        eprintln!("error: {e}");
        exit::CONFIG
    })?;
    // a host reached over SSH is said so on stderr.
    let notice: Notice = std::sync::Arc::new(|m: &str| eprintln!("warning: {m}"));
    let clients = client::clients(env, env.tls.as_ref(), transport, notice).map_err(|e| {
        eprintln!("error: {e}");
        exit::CONFIG
    })?;
    Ok((env.clone(), clients))
}

/// One row of `status`: a host × the environment's project.
#[derive(Debug, Clone, Serialize)]
pub struct StatusRow {
    pub host: String,
    pub agent: String,
    pub project: String,
    pub release: Option<String>,
    pub previous: Option<String>,
    pub since: Option<String>,
    /// Service name to pinned image.
    pub digests: BTreeMap<String, String>,
    /// `healthy`, `degraded`, `operation in progress`, `not deployed`,
    /// `unreachable`, `refused` (the agent denied this identity).
    pub health: String,
    /// Why it is not what the environment should be (empty: nothing).
    pub drift: Vec<String>,
    pub operation: Option<String>,
    /// The outcome of the newest deploy or rollback on this host.
    pub last_outcome: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How the host was reached: over its agent's HTTPS API, or
    /// over SSH because the agent could not be reached (and then whether
    /// its daemon runs: `served_by` `daemon` or `in_process`).
    pub via: RouteReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusOutput {
    pub environment: String,
    pub project: String,
    /// The release most hosts serve.
    pub release: Option<String>,
    pub hosts: Vec<StatusRow>,
    /// The exit code: the first host error's, else 0.
    #[serde(skip)]
    pub exit_code: i32,
}

fn health_of(p: &ProjectStatus) -> String {
    if p.current.is_none() {
        return "not deployed".into();
    }
    if p.operation.is_some() {
        return "operation in progress".into();
    }
    let all_running = p.services.iter().all(|s| {
        s.replicas
            .iter()
            .all(|r| r.state.starts_with("running") && !r.state.contains("unhealthy"))
    });
    if p.drift.is_empty() && all_running {
        "healthy".into()
    } else {
        "degraded".into()
    }
}

/// The status of every host; the environment's release is the one most
/// hosts serve (ties: the first host's).
pub async fn status_rows(env: &Environment, clients: &[AgentClient]) -> StatusOutput {
    let answers = join_all(clients.iter().map(|c| async {
        let s = c.status(&env.project).await;
        let h = c.history(&env.project).await;
        (s, h)
    }))
    .await;
    let mut rows = Vec::new();
    let mut exit_code = exit::SUCCESS;
    for (c, (s, h)) in clients.iter().zip(answers) {
        let last_outcome = h.ok().and_then(|h| {
            h.into_iter().next().map(|e| {
                format!(
                    "{} {} {}",
                    e.operation.as_str(),
                    e.release,
                    e.outcome.map(Outcome::as_str).unwrap_or("in progress")
                )
            })
        });
        let mut row = StatusRow {
            host: c.host.clone(),
            agent: c.addr.clone(),
            project: env.project.clone(),
            release: None,
            previous: None,
            since: None,
            digests: BTreeMap::new(),
            health: "not deployed".into(),
            drift: vec![],
            operation: None,
            last_outcome,
            error: None,
            via: c.route_report(),
        };
        match s {
            Ok(report) => {
                if let Some(p) = report.projects.iter().find(|p| p.project == env.project) {
                    row.health = health_of(p);
                    row.release = p.current.clone();
                    row.previous = p.previous.clone();
                    row.since = p.since.clone();
                    row.digests = p.digests.clone();
                    row.drift = p.drift.clone();
                    row.operation = p.operation.clone();
                }
            }
            Err(CallError::Api { error, .. }) if error.outcome == Outcome::ConfigError => {}
            Err(e) => {
                row.health = match e {
                    CallError::Api { .. } | CallError::CertificateRefused { .. } => {
                        "refused".into()
                    }
                    _ => "unreachable".into(),
                };
                if exit_code == exit::SUCCESS {
                    exit_code = e.outcome().exit_code();
                }
                row.error = Some(e.to_string());
            }
        }
        rows.push(row);
    }
    let mut counts: Vec<(String, usize)> = Vec::new();
    for r in &rows {
        if let Some(rel) = &r.release {
            match counts.iter_mut().find(|(x, _)| x == rel) {
                Some((_, n)) => *n += 1,
                None => counts.push((rel.clone(), 1)),
            }
        }
    }
    let release = counts
        .iter()
        .fold(None::<&(String, usize)>, |best, c| match best {
            Some(b) if b.1 >= c.1 => Some(b),
            _ => Some(c),
        })
        .map(|(r, _)| r.clone());
    for r in &mut rows {
        if r.error.is_some() {
            continue;
        }
        if let Some(env_release) = &release
            && r.release.as_ref() != Some(env_release)
        {
            r.drift.insert(
                0,
                format!(
                    "serves {} while the environment runs {env_release}",
                    r.release.as_deref().unwrap_or("nothing")
                ),
            );
        }
    }
    StatusOutput {
        environment: env.name.clone(),
        project: env.project.clone(),
        release,
        hosts: rows,
        exit_code,
    }
}

pub async fn status(inv: &Inventory, env: &str, json: bool, transport: &TransportOptions) -> i32 {
    let (env, clients) = match setup(inv, env, transport) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let s = status_rows(&env, &clients).await;
    if json {
        println!("{}", serde_json::to_string(&s).unwrap_or_default());
    } else {
        print_status(&s);
    }
    s.exit_code
}

fn print_status(s: &StatusOutput) {
    let (table, errors) = status_text(s);
    print!("{table}");
    for e in errors {
        eprintln!("error: {e}");
    }
}

/// `status` for people: the table (stdout), and below it the errors of the
/// hosts that could not tell (stderr), so that the table stays a table.
fn status_text(s: &StatusOutput) -> (String, Vec<String>) {
    let errors: Vec<String> = s.hosts.iter().filter_map(|h| h.error.clone()).collect();
    let answered = s.hosts.len() - errors.len();
    let mut heading = match (&s.release, answered) {
        (Some(r), _) => format!("release {r}"),
        (None, 0) if !s.hosts.is_empty() => "release unknown: no host answered".to_string(),
        (None, _) => "nothing deployed".to_string(),
    };
    if !errors.is_empty() && answered > 0 {
        heading.push_str(&format!(
            " ({answered} of {} host(s) answered)",
            s.hosts.len()
        ));
    }
    let mut out = format!("{} ({}): {heading}\n", s.environment, s.project);
    let headers = [
        "HOST", "RELEASE", "DIGESTS", "HEALTH", "SINCE", "DRIFT", "LAST",
    ];
    let rows: Vec<[String; 7]> = s
        .hosts
        .iter()
        .map(|h| {
            [
                h.host.clone(),
                h.release.clone().unwrap_or_else(|| "-".into()),
                if h.digests.is_empty() {
                    "-".into()
                } else {
                    h.digests
                        .iter()
                        .map(|(svc, d)| {
                            let short = short_digest(d);
                            let hex = short.rsplit_once("sha256:").map(|x| x.1).unwrap_or(&short);
                            format!("{svc}={hex}")
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                },
                match (h.via.transport, h.via.served_by, &h.error) {
                    ("ssh", Some(ServedBy::InProcess), None) => {
                        format!("{} (over SSH: agent down)", h.health)
                    }
                    ("ssh", Some(_), None) => format!(
                        "{} (over SSH: agent's HTTPS API unreachable, daemon up)",
                        h.health
                    ),
                    (_, _, Some(_)) => format!("{} (see below)", h.health),
                    _ => h.health.clone(),
                },
                h.since
                    .as_deref()
                    .map(timestamp::for_people)
                    .unwrap_or_else(|| "-".into()),
                if h.drift.is_empty() {
                    "-".into()
                } else {
                    h.drift.join("; ")
                },
                h.last_outcome.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = headers.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate().take(6) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i < 6 {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            } else {
                s.push_str(c);
            }
        }
        s.trim_end().to_string()
    };
    out.push_str(&line(&headers.map(String::from)));
    out.push('\n');
    for r in &rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    (out, errors)
}

#[derive(Serialize)]
struct HostHistory<'a> {
    host: &'a str,
    #[serde(flatten)]
    entry: &'a HistoryEntry,
}

pub async fn history(
    inv: &Inventory,
    env: &str,
    limit: usize,
    json: bool,
    transport: &TransportOptions,
) -> i32 {
    let (env, clients) = match setup(inv, env, transport) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let answers = join_all(clients.iter().map(|c| c.history(&env.project))).await;
    let (mut all, code) = merge(&clients, answers);
    all.sort_by(|a, b| b.1.started_at.cmp(&a.1.started_at).then(a.0.cmp(b.0)));
    all.truncate(limit);
    for (host, e) in &all {
        if json {
            let line = serde_json::to_string(&HostHistory { host, entry: e }).unwrap_or_default();
            println!("{line}");
        } else {
            println!(
                "{}  {:<14} {:<9} {:<14} {:<18} from {:<12} by {}{}",
                timestamp::for_people(&e.started_at),
                host,
                e.operation.as_str(),
                e.release,
                e.outcome.map(Outcome::as_str).unwrap_or("in progress"),
                e.previous.as_deref().unwrap_or("-"),
                e.who,
                e.duration_ms
                    .map(|d| format!(" ({:.1}s)", d as f64 / 1000.0))
                    .unwrap_or_default()
            );
        }
    }
    if all.is_empty() && !json && code == exit::SUCCESS {
        println!("no operations recorded for {} in {}", env.project, env.name);
    }
    code
}

/// `deploy-controller approve`: records this certificate's approval of
/// `release` on every host of the environment (the `approvals` gate counts
/// them). `cert`/`key` replace the environment's client certificate: an
/// approver uses their own. HTTPS only.
pub async fn approve(
    inv: &Inventory,
    env: &str,
    release: &str,
    reason: Option<String>,
    own: Option<(std::path::PathBuf, std::path::PathBuf)>,
    json: bool,
) -> i32 {
    let env = match inv.environment(env) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::CONFIG;
        }
    };
    let Some(tls) = &env.tls else {
        eprintln!(
            "error: approvals are given with a client certificate over the agents' HTTPS API, and environment {} \
             has none: add `[environments.{}.tls]` (or a top-level `[tls]`) with the agents' CA",
            env.name, env.name
        );
        return exit::CONFIG;
    };
    let files = match own {
        Some((cert, key)) => crate::inventory::TlsFiles {
            ca: tls.ca.clone(),
            cert,
            key,
        },
        None => crate::inventory::TlsFiles {
            ca: tls.ca.clone(),
            cert: tls.cert.clone(),
            key: tls.key.clone(),
        },
    };
    let http = match client::http_client_with(&files, env.connect_timeout) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::CONFIG;
        }
    };
    let check = client::TlsCheck::new(&files).ok().map(std::sync::Arc::new);
    let clients: Vec<AgentClient> = env
        .hosts
        .iter()
        .map(|h| AgentClient::new(h, http.clone()).with_tls_check(check.clone()))
        .collect();
    let req = ApprovalRequest {
        project: env.project.clone(),
        release: release.to_string(),
        reason,
    };
    let answers = join_all(clients.iter().map(|c| c.approve(&req))).await;
    let mut code = exit::SUCCESS;
    for (c, a) in clients.iter().zip(answers) {
        match a {
            Ok(r) => {
                if json {
                    let line = serde_json::json!({
                        "host": c.host, "approved": true, "who": r.who,
                        "project": r.project, "release": r.release, "seq": r.seq, "ts": r.ts,
                    });
                    println!("{line}");
                } else {
                    println!(
                        "{}: {} approved {} of {} (audit record {} at {})",
                        c.host,
                        r.who,
                        r.release,
                        r.project,
                        r.seq,
                        timestamp::for_people(&r.ts)
                    );
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                if json {
                    let line = serde_json::json!({"host": c.host, "approved": false, "error": e.to_string()});
                    println!("{line}");
                }
                if code == exit::SUCCESS {
                    code = e.outcome().exit_code();
                }
            }
        }
    }
    code
}

/// `deploy-controller dora`: the DORA figures of the last `since`, from
/// every host's history (see [`crate::dora`]). A host that cannot answer
/// is reported and sets the exit code; the figures are of the others.
pub async fn dora(
    inv: &Inventory,
    env: &str,
    since: std::time::Duration,
    json: bool,
    transport: &TransportOptions,
) -> i32 {
    let (env, clients) = match setup(inv, env, transport) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let until = jiff::Timestamp::now();
    let from = match jiff::SignedDuration::try_from(since)
        .ok()
        .and_then(|d| until.checked_sub(d).ok())
    {
        Some(t) => t,
        None => {
            eprintln!("error: --since {since:?} reaches before the year -9999");
            return exit::CONFIG;
        }
    };
    let answers = join_all(clients.iter().map(|c| c.history(&env.project))).await;
    let (all, code) = merge(&clients, answers);
    let f = crate::dora::figures(&all, from, until);
    if json {
        println!("{}", serde_json::to_string(&f).unwrap_or_default());
    } else {
        print!(
            "{}",
            crate::dora::text(&env.name, &env.project, clients.len(), &f)
        );
    }
    code
}

/// Every host's records, each tagged with its host; a host that could not
/// answer is reported on stderr and sets the exit code, the others are kept.
fn merge<T>(
    clients: &[AgentClient],
    answers: Vec<Result<Vec<T>, CallError>>,
) -> (Vec<(&str, T)>, i32) {
    let mut all = Vec::new();
    let mut code = exit::SUCCESS;
    for (c, a) in clients.iter().zip(answers) {
        match a {
            Ok(records) => all.extend(records.into_iter().map(|r| (c.host.as_str(), r))),
            Err(e) => {
                eprintln!("error: {e}");
                code = e.outcome().exit_code();
            }
        }
    }
    (all, code)
}

#[derive(Serialize)]
struct HostAudit<'a> {
    host: &'a str,
    #[serde(flatten)]
    record: &'a AuditRecord,
}

pub async fn audit(
    inv: &Inventory,
    env: &str,
    all_projects: bool,
    limit: usize,
    json: bool,
    transport: &TransportOptions,
) -> i32 {
    let (env, clients) = match setup(inv, env, transport) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let project = (!all_projects).then_some(env.project.as_str());
    let answers = join_all(clients.iter().map(|c| c.audit(project, limit))).await;
    let (mut all, code) = merge(&clients, answers);
    all.sort_by(|a, b| a.1.ts.cmp(&b.1.ts).then(a.0.cmp(b.0)));
    for (host, r) in &all {
        if json {
            let line = serde_json::to_string(&HostAudit { host, record: r }).unwrap_or_default();
            println!("{line}");
        } else {
            println!(
                "{}  {:<14} #{:<5} {:<22} {:<24} {} {} {}",
                timestamp::for_people(&r.ts),
                host,
                r.seq,
                r.who,
                r.action,
                r.project.as_deref().unwrap_or("-"),
                r.release.as_deref().unwrap_or("-"),
                r.outcome.as_deref().unwrap_or("")
            );
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(host: &str, release: Option<&str>, error: Option<&str>) -> StatusRow {
        StatusRow {
            host: host.into(),
            agent: format!("{host}:7443"),
            project: "web".into(),
            release: release.map(str::to_string),
            previous: None,
            since: release.map(|_| "2026-11-03T09:15:02.120345678Z".to_string()),
            digests: BTreeMap::new(),
            health: match (release, error) {
                (_, Some(_)) => "unreachable".into(),
                (Some(_), None) => "healthy".into(),
                (None, None) => "not deployed".into(),
            },
            drift: vec![],
            operation: None,
            last_outcome: None,
            error: error.map(str::to_string),
            via: RouteReport {
                transport: "agent",
                reason: None,
                served_by: None,
            },
        }
    }

    fn output(release: Option<&str>, hosts: Vec<StatusRow>) -> StatusOutput {
        StatusOutput {
            environment: "production".into(),
            project: "web".into(),
            release: release.map(str::to_string),
            hosts,
            exit_code: 0,
        }
    }

    const LONG: &str = "host b: cannot reach its agent at https://b:7443: error sending request for url \
        (https://b:7443/v1/status): client error (Connect): tcp connect error: Connection refused \
        (os error 111); check that `deploy-agent run` listens there (agent.toml `api_listen`)";

    #[test]
    fn errors_go_below_the_table_and_the_table_stays_a_table() {
        let s = output(
            Some("v2"),
            vec![row("a", Some("v2"), None), row("b", None, Some(LONG))],
        );
        let (table, errors) = status_text(&s);
        assert_eq!(errors, vec![LONG.to_string()]);
        assert!(!table.contains("cannot reach"), "{table}");
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "production (web): release v2 (1 of 2 host(s) answered)"
        );
        assert!(lines[2].starts_with("a "), "{table}");
        assert!(
            lines[3].starts_with("b ") && lines[3].contains("unreachable (see below)"),
            "{table}"
        );
        for l in &lines[1..] {
            assert!(l.chars().count() < 120, "a table row, not an error: {l:?}");
        }
        // Recorded times are shown at millisecond precision.
        assert!(lines[2].contains("2026-11-03T09:15:02.120Z"), "{table}");
    }

    #[test]
    fn nothing_deployed_is_only_said_when_a_host_said_it() {
        let (table, errors) = status_text(&output(None, vec![row("a", None, Some(LONG))]));
        assert!(
            table.starts_with("production (web): release unknown: no host answered\n"),
            "{table}"
        );
        assert_eq!(errors.len(), 1);
        let (table, errors) = status_text(&output(None, vec![row("a", None, None)]));
        assert!(
            table.starts_with("production (web): nothing deployed\n"),
            "{table}"
        );
        assert!(errors.is_empty());
    }
}
