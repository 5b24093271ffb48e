//! `deploy-load --port PORT [--rate N] [--max-seconds N] [--expect v1,v2,…]`
//!
//! Runs the e2e tests' load loop against `http://127.0.0.1:PORT/` until
//! SIGTERM or SIGINT (or `--max-seconds`, default 600), then prints a summary
//! and one JSON line. With `--expect`, exits 1 unless no request failed and
//! the served release went through exactly that sequence. Used by
//! scripts/demo.sh.

use std::process::ExitCode;
use std::time::Duration;

use deploy_testkit::{LoadConfig, LoadLoop, Mode};

fn usage() -> ExitCode {
    eprintln!("usage: deploy-load --port PORT [--rate N] [--max-seconds N] [--expect v1,v2,...]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut port = None;
    let mut rate = 300.0;
    let mut max = 600u64;
    let mut expect: Option<Vec<String>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let Some(v) = args.next() else {
            return usage();
        };
        match a.as_str() {
            "--port" => port = v.parse::<u16>().ok(),
            "--rate" => match v.parse() {
                Ok(r) => rate = r,
                Err(_) => return usage(),
            },
            "--max-seconds" => match v.parse() {
                Ok(m) => max = m,
                Err(_) => return usage(),
            },
            "--expect" => expect = Some(v.split(',').map(str::to_string).collect()),
            _ => return usage(),
        }
    }
    let Some(port) = port else {
        return usage();
    };
    let mut config = LoadConfig::new(port);
    config.rate = rate;
    config.max_duration = Duration::from_secs(max);
    let load = LoadLoop::with_config(config);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = tokio::time::sleep(Duration::from_secs(max)) => {}
        }
    });
    let report = load.stop();
    println!("{}", report.summary());
    let sequence = match &expect {
        Some(e) => {
            let e: Vec<&str> = e.iter().map(String::as_str).collect();
            Some(report.check_sequence(&e))
        }
        None => None,
    };
    println!(
        "{}",
        serde_json::json!({
            "requests": report.total(),
            "failed": report.failures().len(),
            "rate": (report.rate() * 10.0).round() / 10.0,
            "keep_alive": report.count(Mode::KeepAlive),
            "new_connection": report.count(Mode::NewConnection),
            "served": report.bodies_in_order(),
            "sequence_ok": sequence.as_ref().map(|s| s.is_ok()),
        })
    );
    if let Some(Err(e)) = &sequence {
        eprintln!("deploy-load: {e}");
    }
    let ok = report.failures().is_empty() && sequence.map(|s| s.is_ok()).unwrap_or(true);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
