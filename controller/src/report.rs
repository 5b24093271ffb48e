//! Output for people and machines: a live line per host on a terminal
//! (indicatif), plain timestamped lines otherwise (CI logs), or `--json`
//! lines; plus a Markdown summary appended to `$GITHUB_STEP_SUMMARY`.
//!
//! `--json` prints one object per line on stdout, each with a `type`:
//! `phase` (what the controller does), `host` (an agent's event for one
//! host: `{"type":"host","host":…,"event":{…}}`, the agent's own JSON
//! lines), `warning`, `error`, and last `summary`.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

// Lines carry milliseconds: fleet steps of one wave land within a few.
use deploy_protocol::timestamp::now;
use deploy_protocol::{Event, Outcome};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tty,
    Plain,
    Json,
}

pub struct Reporter {
    mode: Mode,
    multi: Option<MultiProgress>,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Reporter {
    /// `--json`, else a live view when stderr is a terminal, else lines.
    pub fn new(json: bool) -> Reporter {
        let mode = if json {
            Mode::Json
        } else if std::io::stderr().is_terminal() && std::env::var_os("CI").is_none() {
            Mode::Tty
        } else {
            Mode::Plain
        };
        Reporter::with_mode(mode)
    }

    pub fn with_mode(mode: Mode) -> Reporter {
        let multi = (mode == Mode::Tty)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Reporter {
            mode,
            multi,
            bars: Mutex::new(HashMap::new()),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn json_line(&self, v: &serde_json::Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }

    fn line(&self, text: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{} {text}", now());
                let _ = out.flush();
            }
        }
    }

    /// Live rows for these hosts (terminal only).
    pub fn hosts(&self, names: &[String]) {
        let Some(m) = &self.multi else { return };
        let style = ProgressStyle::with_template("{spinner} {prefix:.bold} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let width = names.iter().map(|n| n.len()).max().unwrap_or(4);
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        for n in names {
            let b = m.add(ProgressBar::new_spinner());
            b.set_style(style.clone());
            b.set_prefix(format!("{n:<width$}"));
            b.set_message("waiting");
            b.enable_steady_tick(Duration::from_millis(120));
            bars.insert(n.clone(), b);
        }
    }

    /// What the controller is doing.
    pub fn phase(&self, msg: &str) {
        match self.mode {
            Mode::Json => {
                self.json_line(&serde_json::json!({"type": "phase", "ts": now(), "message": msg}))
            }
            _ => self.line(&format!("==> {msg}")),
        }
    }

    /// A line about one host from the controller itself.
    pub fn host(&self, host: &str, msg: &str) {
        match self.mode {
            Mode::Json => self.json_line(
                &serde_json::json!({"type": "host", "host": host, "ts": now(), "message": msg}),
            ),
            Mode::Tty => {
                let bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
                match bars.get(host) {
                    Some(b) => b.set_message(msg.to_string()),
                    None => self.line(&format!("[{host}] {msg}")),
                }
            }
            Mode::Plain => self.line(&format!("[{host}] {msg}")),
        }
    }

    /// The end of one host's part: the row stops spinning (terminal) and
    /// the line is kept.
    pub fn host_done(&self, host: &str, ok: bool, msg: &str) {
        let mark = if ok { "ok" } else { "FAILED" };
        match self.mode {
            Mode::Json => self.json_line(&serde_json::json!({
                "type": "host", "host": host, "ts": now(), "ok": ok, "message": msg
            })),
            Mode::Tty => {
                let bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
                match bars.get(host) {
                    Some(b) => {
                        b.set_message(format!("{mark}: {msg}"));
                        b.tick();
                    }
                    None => self.line(&format!("[{host}] {mark}: {msg}")),
                }
            }
            Mode::Plain => self.line(&format!("[{host}] {mark}: {msg}")),
        }
    }

    /// An event an agent streamed for `host`.
    pub fn agent_event(&self, host: &str, ev: &Event) {
        match self.mode {
            Mode::Json => {
                let event = serde_json::to_value(ev).unwrap_or(serde_json::Value::Null);
                self.json_line(&serde_json::json!({"type": "host", "host": host, "event": event}));
            }
            _ => match ev {
                Event::Progress(p) => {
                    let svc = p
                        .service
                        .as_deref()
                        .map(|s| format!("[{s}] "))
                        .unwrap_or_default();
                    self.host(host, &format!("{}: {svc}{}", p.step, p.message));
                }
                Event::Result(r) => {
                    let ok = r.outcome == Outcome::Succeeded;
                    let msg = format!(
                        "{} {}: {} in {:.1}s — {}",
                        r.operation.as_str(),
                        r.release,
                        r.outcome.as_str(),
                        r.duration_ms as f64 / 1000.0,
                        r.message
                    );
                    self.host_done(host, ok, &msg);
                }
            },
        }
    }

    pub fn warn(&self, msg: &str) {
        match self.mode {
            Mode::Json => {
                self.json_line(&serde_json::json!({"type": "warning", "ts": now(), "message": msg}))
            }
            _ => {
                if let Some(m) = &self.multi {
                    let _ = m.println(format!("warning: {msg}"));
                } else {
                    eprintln!("{} warning: {msg}", now());
                }
            }
        }
    }

    /// An error: stderr for people, a JSON line for machines.
    pub fn error(&self, msg: &str) {
        match self.mode {
            Mode::Json => {
                self.json_line(&serde_json::json!({"type": "error", "ts": now(), "message": msg}))
            }
            _ => {
                self.finish();
                eprintln!("error: {msg}");
            }
        }
    }

    /// The final summary (JSON mode: one `summary` line).
    pub fn summary<T: Serialize>(&self, value: &T, text: &str) {
        self.finish();
        match self.mode {
            Mode::Json => {
                let mut v = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
                if let Some(o) = v.as_object_mut() {
                    o.insert("type".into(), "summary".into());
                }
                self.json_line(&v);
            }
            _ => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{text}");
            }
        }
    }

    /// Stops the live rows (they stay on screen).
    pub fn finish(&self) {
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        for (_, b) in bars.drain() {
            b.finish();
        }
    }
}

/// Appends `markdown` to the file `$GITHUB_STEP_SUMMARY` names, if set.
pub fn step_summary(markdown: &str) -> Result<(), String> {
    let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY") else {
        return Ok(());
    };
    if path.is_empty() {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| {
            format!(
                "cannot append to $GITHUB_STEP_SUMMARY ({}): {e}",
                path.to_string_lossy()
            )
        })?;
    f.write_all(markdown.as_bytes()).map_err(|e| {
        format!(
            "cannot append to $GITHUB_STEP_SUMMARY ({}): {e}",
            path.to_string_lossy()
        )
    })
}

/// Escapes a table cell.
pub fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}
