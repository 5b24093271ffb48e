//! `tcpserve PORT PROGRAM [ARG]...`: the test images' TCP server. Listens on
//! 0.0.0.0:PORT and runs PROGRAM for each connection, the connection as its
//! stdin and stdout (inetd style: `tcpserve 80 httpd -i -h /www`).
//!
//! Why not `httpd -p 80` or `nc -ll`: busybox httpd listens with a backlog of
//! 9 and nc with 1. Each request the proxy forwards is a new connection (httpd
//! closes every one), so when the host's CPUs are busy and the server is not
//! scheduled for a few tens of milliseconds, its accept queue overflows; the
//! kernel then drops the SYN and the client's retransmission comes one second
//! later (two drops in a row: a connect timeout). A real app server listens
//! with a backlog of hundreds; this one asks for 4096 (the kernel caps it at
//! net.core.somaxconn).
//!
//! Built by tests/images/build.sh with the workspace's own rustc, statically
//! linked, std only.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BACKLOG: i32 = 4096;

unsafe extern "C" {
    fn listen(fd: i32, backlog: i32) -> i32;
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(port), Some(program)) = (
        args.first().and_then(|p| p.parse::<u16>().ok()),
        args.get(1),
    ) else {
        eprintln!("usage: tcpserve PORT PROGRAM [ARG]...");
        return ExitCode::from(2);
    };
    let listener = match TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tcpserve: cannot listen on port {port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // std listens with a backlog of its own choosing; listen() again sets ours.
    if unsafe { listen(listener.as_raw_fd(), BACKLOG) } != 0 {
        eprintln!(
            "tcpserve: listen(backlog {BACKLOG}): {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::FAILURE;
    }
    // Finished children are reaped within 50 ms.
    let (children, to_reap) = mpsc::channel::<Child>();
    std::thread::spawn(move || {
        let mut running: Vec<Child> = Vec::new();
        loop {
            match to_reap.recv_timeout(Duration::from_millis(50)) {
                Ok(child) => running.push(child),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            running.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
        }
    });
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. out of file descriptors: do not spin.
                eprintln!("tcpserve: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let output = match stream.try_clone() {
            Ok(s) => OwnedFd::from(s),
            Err(e) => {
                eprintln!("tcpserve: {e}");
                continue;
            }
        };
        // Our copies of the connection close when the command is dropped,
        // so the connection ends when the program exits.
        match Command::new(program)
            .args(&args[2..])
            .stdin(Stdio::from(OwnedFd::from(stream)))
            .stdout(Stdio::from(output))
            .spawn()
        {
            Ok(child) => {
                let _ = children.send(child);
            }
            Err(e) => eprintln!("tcpserve: cannot run {program}: {e}"),
        }
    }
}
