//! Benchmark for UDP tunnels: datagrams per second and Gbit/s through
//! `tunnel-svc --backend grpc` and `--backend direct`, beside the direct
//! UDP path (host → the container's address, no relay) and socat relaying
//! the same hop (when socat is installed), for a few datagram sizes.
//!
//! ```text
//! cargo build --release -p tunnel-svc -p monitor-svc -p porthole-testkit --bins --examples
//! sudo ./target/release/examples/udp-bench
//! ```
//!
//! One client on the host keeps [`WINDOW`] datagrams in flight to a UDP
//! echo server inside a network namespace (the container) for [`SECONDS`]
//! per row; a reply frees a slot, a slot whose reply does not come within
//! [`LOST_AFTER`] counts as lost. Rates count replies (each datagram
//! crossed both ways); Gbit/s is payload of the replies, one direction.
//! Traffic goes only to loopback and to the namespace the bench creates;
//! every process is stopped by its pid and the namespace deleted on exit.
//! Progress goes to stderr; stdout is a markdown table.
#![forbid(unsafe_code)]

use porthole_testkit::measure::nproc;
use porthole_testkit::{unused_local_port, which, MonitorProc, Netns, Server, TunnelProc};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// Datagrams in flight at once from the client.
const WINDOW: usize = 32;
/// Length of one row's run.
const SECONDS: u64 = 3;
/// Bound on datagrams per row, whatever the speed.
const MAX_DATAGRAMS: u64 = 5_000_000;
/// A reply later than this counts its datagram as lost.
const LOST_AFTER: Duration = Duration::from_millis(200);
/// Payload sizes measured: a small request, a typical MTU-sized one, a
/// jumbo one.
const SIZES: [usize; 3] = [64, 1400, 8192];
/// The echo server's port inside (below the ephemeral range: a server).
const PORT: u16 = 5390;

fn main() -> ExitCode {
    if !rustix::process::geteuid().is_root() {
        eprintln!("udp-bench: needs root (the container is a network namespace)");
        return ExitCode::from(1);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udp-bench failed: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// One row's outcome.
struct Rate {
    replies: u64,
    lost: u64,
    bytes: u64,
    took: Duration,
}

impl Rate {
    fn per_second(&self) -> f64 {
        self.replies as f64 / self.took.as_secs_f64()
    }

    fn gbits(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.took.as_secs_f64() / 1e9
    }
}

/// Keeps [`WINDOW`] datagrams of `size` bytes in flight to `to` for
/// [`SECONDS`].
async fn measure(to: SocketAddr, size: usize) -> anyhow::Result<Rate> {
    let client = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    client.connect(to).await?;
    let datagram = vec![0x5a; size];
    let mut buf = vec![0u8; 65_536];
    // Warm up: the first datagram starts the flow (a relay stream for grpc).
    client.send(&datagram).await?;
    tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
        .await
        .map_err(|_| anyhow::anyhow!("no reply from {to} within 5 s"))??;
    let started = Instant::now();
    let end = started + Duration::from_secs(SECONDS);
    let (mut in_flight, mut sent, mut replies, mut lost, mut bytes) = (0usize, 0u64, 0, 0, 0);
    while Instant::now() < end && sent < MAX_DATAGRAMS {
        while in_flight < WINDOW {
            client.send(&datagram).await?;
            in_flight += 1;
            sent += 1;
        }
        match tokio::time::timeout(LOST_AFTER, client.recv(&mut buf)).await {
            Ok(got) => {
                bytes += got? as u64;
                replies += 1;
                in_flight -= 1;
            }
            Err(_) => {
                lost += in_flight as u64;
                in_flight = 0;
            }
        }
    }
    let took = started.elapsed();
    // Replies still on their way count as received if they come soon.
    while in_flight > 0 {
        match tokio::time::timeout(LOST_AFTER, client.recv(&mut buf)).await {
            Ok(_) => in_flight -= 1,
            Err(_) => break,
        }
    }
    lost += in_flight as u64;
    Ok(Rate {
        replies,
        lost,
        bytes,
        took,
    })
}

/// Sends a probe to `to` until one comes back (a relay that binds its
/// socket after it starts), for up to 5 s.
async fn ready(to: SocketAddr) -> anyhow::Result<()> {
    let client = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    client.connect(to).await?;
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        client.send(b"ready?").await?;
        let reply = tokio::time::timeout(Duration::from_millis(100), client.recv(&mut buf));
        if let Ok(Ok(_)) = reply.await {
            return Ok(());
        }
    }
    anyhow::bail!("no reply from {to} within 5 s")
}

/// A single-hop relay written in C for the same path, one datagram at a
/// time: socat, a child per client, `-b 65536`.
async fn socat_row(ns: &Netns, rows: &mut Vec<(String, usize, anyhow::Result<Rate>)>) {
    if which("socat").is_none() {
        eprintln!("no socat: its row is left out");
        return;
    }
    let port = unused_local_port();
    let mut cmd = std::process::Command::new("socat");
    cmd.args(["-b", "65536"])
        .arg(format!("UDP4-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
        .arg(format!("UDP4:{}:{PORT}", ns.addr()));
    let mut socat = ns.spawn_command("socat-udp", cmd);
    let to = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    let up = ready(to).await;
    for size in SIZES {
        eprintln!("socat, {size} B");
        let rate = match &up {
            Ok(()) => measure(to, size).await,
            Err(e) => Err(anyhow::anyhow!("{e:#}")),
        };
        rows.push(("socat UDP relay (`-b 65536`, fork)".into(), size, rate));
    }
    socat.terminate().await;
}

async fn run() -> anyhow::Result<()> {
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &["--log-level", "warn"]).await;
    let _echo = Server::udp_echo(&ns, "0.0.0.0", PORT).await;
    eprintln!(
        "namespace {} at {}; echo on udp {PORT}",
        ns.name(),
        ns.addr()
    );
    let mut rows: Vec<(String, usize, anyhow::Result<Rate>)> = Vec::new();
    let container = SocketAddr::new(ns.addr().into(), PORT);
    for size in SIZES {
        eprintln!("direct UDP path, {size} B");
        rows.push((
            "direct UDP path, no relay (host → container address)".into(),
            size,
            measure(container, size).await,
        ));
    }
    socat_row(&ns, &mut rows).await;
    for backend in ["grpc", "direct"] {
        let args = ["--backend", backend, "--log-level", "warn"];
        let mut tunnel = TunnelProc::follow(&ns, &monitor, &args).await;
        let host = tunnel
            .wait_active(&format!("default:udp:{PORT}"))
            .await
            .host_port;
        let to = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), host as u16);
        for size in SIZES {
            eprintln!("tunnel-svc --backend {backend}, {size} B");
            rows.push((
                format!("tunnel-svc `--backend {backend}` (localhost:{host})"),
                size,
                measure(to, size).await,
            ));
        }
        let status = tunnel.terminate().await;
        anyhow::ensure!(status.success(), "tunnel-svc exited with {status}");
    }
    println!("## UDP tunnel benchmark\n");
    println!(
        "{} cores; one client, {WINDOW} datagrams in flight, {SECONDS} s per row, echo server \
         in a network namespace\n",
        nproc()
    );
    println!("| path | payload | datagrams/s (round trips) | Gbit/s (payload, one way) | lost | × direct path |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (path, size, rate) in &rows {
        match rate {
            Ok(r) => {
                let base = rows
                    .iter()
                    .find(|(p, s, _)| p.starts_with("direct UDP") && s == size)
                    .and_then(|(_, _, r)| r.as_ref().ok())
                    .map(|b| r.per_second() / b.per_second());
                println!(
                    "| {path} | {size} B | {:.0} | {:.2} | {} of {} | {} |",
                    r.per_second(),
                    r.gbits(),
                    r.lost,
                    r.replies + r.lost,
                    base.map_or("-".into(), |b| format!("{b:.2}×"))
                );
            }
            Err(e) => println!("| {path} | {size} B | not measured: {e:#} | | | |"),
        }
    }
    Ok(())
}
