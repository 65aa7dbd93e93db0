//! Benchmark: requests through a tunnel while what carries them restarts.
//! One client makes 50 short HTTP requests a second through the tunnel
//! (each allowed 30 s, a new one every 20 ms whatever the others do) while,
//! in turn, the monitor is killed, the container is `docker restart`ed,
//! paused for 5 s, and its network reconnected onto a new address (Docker
//! transports `auto` and `exec`); and, for a namespace container followed
//! with `--backend grpc`, `direct` and `ssh`, its monitor is killed and
//! started again. Prints, per path and event: events, requests, failed
//! requests (with the first failure's words) and the slowest request.
//!
//! ```text
//! cargo build --release -p tunnel-svc --example restart-bench
//! sudo ./target/release/examples/restart-bench [EVENTS] [ONLY]
//! ```
//!
//! EVENTS per kind, default 10. ONLY runs one path and event, e.g.
//! `exec:pause` (paths `auto`, `exec`, `grpc`, `direct`, `ssh`; events
//! `kill`, `restart`, `pause`, `reconnect`).
//!
//! The container's server is the kit's (listen backlog 1,024);
//! `RESTART_BENCH_SERVER=busybox` uses busybox `httpd` (backlog 9)
//! instead, whose backlog a pause's burst of waiting requests overflows.
//!
//! Needs root, a Docker engine, Debian's `busybox-static`, `python3` and
//! OpenSSH (`sshd`). Everything it makes is removed at the end.
#![forbid(unsafe_code)]

use porthole_testkit::docker::{docker, have_docker, Container, Network, World};
use porthole_testkit::measure::{ms, nproc};
use porthole_testkit::{unused_local_port, MonitorProc, Netns, Sshd, TunnelProc};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request every this long.
const EVERY: Duration = Duration::from_millis(20);
/// How long one request may take (longer than `--park`).
const LIMIT: Duration = Duration::from_secs(30);
/// How long the path may take to come back after an event.
const BACK: Duration = Duration::from_secs(60);

/// One request's start, time taken and failure, if any.
type Outcome = (Instant, Duration, Option<String>);

/// A row of the report.
struct Row {
    path: String,
    event: &'static str,
    events: usize,
    sent: usize,
    failed: usize,
    slowest: Duration,
    first_failure: Option<String>,
}

/// One `GET /` on `127.0.0.1:port`; the failure, if it failed.
async fn request(port: u16) -> Option<String> {
    porthole_testkit::docker::request(port, LIMIT).await.err()
}

/// The client: a request every [`EVERY`] until dropped, each on its own.
struct Client {
    /// When each request started.
    started: Arc<Mutex<Vec<Instant>>>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    fn start(port: u16) -> Client {
        let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
        let started: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let (out, starts) = (outcomes.clone(), started.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            loop {
                tick.tick().await;
                let out = out.clone();
                let started = Instant::now();
                starts.lock().unwrap().push(started);
                tokio::spawn(async move {
                    let failed = request(port).await;
                    out.lock()
                        .unwrap()
                        .push((started, started.elapsed(), failed));
                });
            }
        });
        Client {
            started,
            outcomes,
            task,
        }
    }

    /// The row of the requests started between `from` and `to`, once each
    /// has ended.
    async fn row(
        &self,
        path: &str,
        event: &'static str,
        events: usize,
        from: Instant,
        to: Instant,
    ) -> Row {
        // Every request started before `to` ends, within LIMIT.
        let between = |s: &Instant| *s >= from && *s < to;
        let deadline = to + LIMIT + Duration::from_secs(1);
        loop {
            let asked = self
                .started
                .lock()
                .unwrap()
                .iter()
                .filter(|s| between(s))
                .count();
            let ended = self
                .outcomes
                .lock()
                .unwrap()
                .iter()
                .filter(|(s, _, _)| between(s))
                .count();
            if ended >= asked || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let all = self.outcomes.lock().unwrap();
        let mine: Vec<&Outcome> = all
            .iter()
            .filter(|(s, _, _)| *s >= from && *s < to)
            .collect();
        Row {
            path: path.to_string(),
            event,
            events,
            sent: mine.len(),
            failed: mine.iter().filter(|(_, _, f)| f.is_some()).count(),
            slowest: mine.iter().map(|(_, d, _)| *d).max().unwrap_or_default(),
            first_failure: mine.iter().find_map(|(_, _, f)| f.clone()),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until a request gets through again.
async fn back(port: u16) {
    let deadline = Instant::now() + BACK;
    while request(port).await.is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The monitor's pid inside container `c`.
fn monitor_pid(c: &Container) -> Option<String> {
    let line = c.monitor_ps()?;
    line.split_whitespace().next().map(str::to_string)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("EVENTS is a number"))
        .unwrap_or(10);
    let only = std::env::args().nth(2);
    let (only_path, only_event) = match only.as_deref().map(|o| o.split_once(':')) {
        Some(Some((p, e))) => (Some(p.to_string()), Some(e.to_string())),
        Some(None) => (only.clone(), None),
        None => (None, None),
    };
    let wanted = |path: &str| only_path.as_deref().is_none_or(|p| p == path);
    if !have_docker("restart-bench") {
        std::process::exit(1);
    }
    let mut rows = Vec::new();
    for transport in ["auto", "exec"].into_iter().filter(|t| wanted(t)) {
        rows.extend(docker_paths(transport, events, only_event.as_deref()).await);
    }
    for backend in ["grpc", "direct", "ssh"].into_iter().filter(|b| wanted(b)) {
        rows.push(namespace_path(backend, events).await);
    }
    println!("## Requests across restarts\n");
    println!(
        "{} cores; a request every {} ms, each allowed {} s; `--park` at its default.\n",
        nproc(),
        EVERY.as_millis(),
        LIMIT.as_secs()
    );
    println!("| path | event | events | requests | failed | slowest | first failure |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | --- |");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.path,
            r.event,
            r.events,
            r.sent,
            r.failed,
            ms(r.slowest),
            r.first_failure.as_deref().unwrap_or("-")
        );
    }
}

/// The Docker events, through `tunnel-svc --docker --docker-transport T`.
async fn docker_paths(transport: &str, events: usize, only: Option<&str>) -> Vec<Row> {
    let w = World::new();
    let port = unused_local_port();
    // The kit's server (listen backlog 1,024); with RESTART_BENCH_SERVER=
    // busybox, busybox httpd (backlog 9: the burst of requests that waited
    // out a pause overflows it).
    let c = match std::env::var("RESTART_BENCH_SERVER").as_deref() {
        Ok("busybox") => w.http("0.0.0.0", port, "bench"),
        _ => w.helper_http("0.0.0.0", port, "bench"),
    };
    // RESTART_BENCH_LOG=debug: tunnel-svc's log, printed at the end.
    let level = std::env::var("RESTART_BENCH_LOG").ok();
    let tunnel = w
        .tunnel_svc(&[
            "--docker-transport",
            transport,
            "--log-level",
            level.as_deref().unwrap_or("warn"),
        ])
        .await;
    let net = &w.net;
    back(port).await;
    let path = format!("docker, `{transport}`");
    let client = Client::start(port);
    let prefix = net.subnet.trim_end_matches("0/24").to_string();
    let mut rows = Vec::new();
    let kinds = [
        (
            Event::MonitorKilled,
            "kill",
            "monitor killed (`kill -9` inside)",
        ),
        (Event::Restart, "restart", "`docker restart -t 1`"),
        (Event::Pause, "pause", "`docker pause`, 5 s, `unpause`"),
        (
            Event::Reconnect,
            "reconnect",
            "network reconnected, new address",
        ),
    ];
    let kinds = kinds
        .into_iter()
        .filter(|(_, short, _)| only.is_none_or(|o| o == *short));
    for (kind, _, event) in kinds {
        eprintln!("{path}: {event} × {events}");
        let from = Instant::now();
        for i in 0..events {
            strike(kind, &c, net, &format!("{prefix}{}", 100 + i % 50)).await;
            back(port).await;
            // The path is back; a moment of steady traffic between events.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        rows.push(client.row(&path, event, events, from, Instant::now()).await);
    }
    drop(client);
    if level.is_some() {
        eprintln!("{}", tunnel.log());
    }
    rows
}

#[derive(Clone, Copy)]
enum Event {
    MonitorKilled,
    Restart,
    Pause,
    Reconnect,
}

/// Makes `event` happen to `c` (a reconnect puts it on `new_ip`).
async fn strike(event: Event, c: &Container, net: &Network, new_ip: &str) {
    match event {
        Event::MonitorKilled => {
            if let Some(pid) = monitor_pid(c) {
                c.exec(&["kill", "-9", &pid]);
            }
        }
        Event::Restart => c.docker("restart"),
        Event::Pause => {
            c.docker("pause");
            tokio::time::sleep(Duration::from_secs(5)).await;
            c.docker("unpause");
        }
        Event::Reconnect => {
            let _ = docker(&["network", "disconnect", &net.name, &c.name]);
            let _ = docker(&["network", "connect", "--ip", new_ip, &net.name, &c.name]);
        }
    }
}

/// A namespace container with a Python HTTP server, followed with
/// `--backend B`; its monitor killed and started again.
async fn namespace_path(backend: &str, events: usize) -> Row {
    let ns = Netns::new();
    let port = unused_local_port();
    let mut server = ns.command("python3");
    server
        .args(["-m", "http.server", &port.to_string(), "--bind", "0.0.0.0"])
        .current_dir(ns.log_dir());
    let _server = ns.spawn_command("http.server", server);
    let sshd = (backend == "ssh").then_some(());
    let sshd = match sshd {
        Some(()) => Some(
            Sshd::start(
                &ns,
                std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                22,
            )
            .await,
        ),
        None => None,
    };
    let mut monitor = MonitorProc::start(&ns, &[]).await;
    let token_file = monitor.token_file().display().to_string();
    let mut args = vec![
        "--backend".to_string(),
        backend.to_string(),
        "--log-level".into(),
        "warn".into(),
    ];
    if let Some(sshd) = &sshd {
        args.extend(["--ssh-host".into(), "bench".into()]);
        for o in std::iter::once(format!("HostName={}", ns.addr())).chain(sshd.options()) {
            args.extend(["--ssh-option".into(), o]);
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _tunnel = TunnelProc::follow(&ns, &monitor, &args).await;
    back(port).await;
    let path = format!("namespace, `--backend {backend}`");
    eprintln!("{path}: monitor killed and started again × {events}");
    let client = Client::start(port);
    let from = Instant::now();
    for _ in 0..events {
        monitor.proc().kill();
        monitor = MonitorProc::start(&ns, &["--token-file", &token_file]).await;
        back(port).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    client
        .row(
            &path,
            "monitor killed, started again",
            events,
            from,
            Instant::now(),
        )
        .await
}
