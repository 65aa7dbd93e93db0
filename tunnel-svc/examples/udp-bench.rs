//! Benchmark for UDP tunnels: datagrams per second and Gbit/s through
//! `tunnel-svc --backend grpc` and `--backend direct` (each also with two
//! worker threads, as it ran before it had one), beside the direct UDP path
//! (host → the container's address, no relay), the kernel forwarding the
//! same hop (an iptables DNAT rule, when iptables is there; removed after)
//! and socat relaying it (when socat is installed), for a few datagram
//! sizes.
//!
//! ```text
//! cargo build --release -p tunnel-svc -p monitor-svc -p porthole-testkit --bins --examples
//! sudo ./target/release/examples/udp-bench
//! ```
//!
//! One client on the host keeps up to [`WINDOW`] datagrams in flight to a
//! UDP echo server inside a network namespace (the container) for
//! [`SECONDS`] per measurement; a reply frees a slot, a slot whose reply
//! does not come within [`LOST_AFTER`] counts as lost. Every path is set
//! up first, then measured in turn, [`ROUNDS`] rounds, so this machine's
//! drift falls on all alike; a row shows the median round, and its ratio
//! to the direct path is the median of each round's ratio. Rates count replies (each datagram
//! crossed both ways); Gbit/s is payload of the replies, one direction.
//! Traffic goes only to loopback and to the namespace the bench creates;
//! every process is stopped by its pid and the namespace deleted on exit.
//! Progress goes to stderr; stdout is a markdown table.
#![forbid(unsafe_code)]

use porthole_testkit::measure::nproc;
use porthole_testkit::{unused_local_port, which, MonitorProc, Netns, Proc, Server, TunnelProc};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// Datagrams in flight at once from the client.
const WINDOW: usize = 32;
/// Length of one measurement.
const SECONDS: u64 = 1;
/// Rounds over every path.
const ROUNDS: usize = 7;
/// Bound on datagrams per measurement, whatever the speed.
const MAX_DATAGRAMS: u64 = 5_000_000;
/// A reply later than this counts its datagram as lost.
const LOST_AFTER: Duration = Duration::from_millis(50);
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
    // Room for a whole window of replies (a reassembled 8 KiB datagram
    // takes ~16 KiB of buffer): losses are the path's, not this client's.
    rustix::net::sockopt::set_socket_recv_buffer_size_force(&client, 4 << 20)?;
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
    // The window opens by one per reply (as TCP's slow start does), so that
    // no path starts with a burst larger than a socket buffer holds.
    let mut window = 1;
    while Instant::now() < end && sent < MAX_DATAGRAMS {
        while in_flight < window {
            client.send(&datagram).await?;
            in_flight += 1;
            sent += 1;
        }
        match tokio::time::timeout(LOST_AFTER, client.recv(&mut buf)).await {
            Ok(got) => {
                bytes += got? as u64;
                replies += 1;
                // A reply already counted lost may still come.
                in_flight = in_flight.saturating_sub(1);
                window = (window + 1).min(WINDOW);
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
            Ok(_) => in_flight = in_flight.saturating_sub(1),
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
async fn socat(ns: &Netns) -> Option<(Proc, SocketAddr)> {
    if which("socat").is_none() {
        eprintln!("no socat: its row is left out");
        return None;
    }
    let port = unused_local_port();
    let mut cmd = std::process::Command::new("socat");
    cmd.args(["-b", "65536"])
        .arg(format!("UDP4-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
        .arg(format!("UDP4:{}:{PORT}", ns.addr()));
    let socat = ns.spawn_command("socat-udp", cmd);
    let to = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    match ready(to).await {
        Ok(()) => Some((socat, to)),
        Err(e) => {
            eprintln!("socat did not answer ({e:#}): its row is left out");
            None
        }
    }
}

/// The kernel forwarding the same hop, no process in the path: a DNAT rule
/// in the host's `nat OUTPUT` chain from a port of the namespace link's host
/// address to the echo server. Removed when dropped.
struct Dnat {
    rule: Vec<String>,
}

impl Dnat {
    fn add(ns: &Netns) -> Option<(Dnat, SocketAddr)> {
        which("iptables")?;
        let port = unused_local_port();
        let rule: Vec<String> = [
            "OUTPUT",
            "-t",
            "nat",
            "-p",
            "udp",
            "-d",
            &ns.host_addr().to_string(),
            "--dport",
            &port.to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{}:{PORT}", ns.addr()),
            "-m",
            "comment",
            "--comment",
            "porthole udp-bench",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        let added = std::process::Command::new("iptables")
            .arg("-I")
            .args(&rule)
            .status()
            .is_ok_and(|s| s.success());
        if !added {
            eprintln!("iptables refused the DNAT rule: its row is left out");
            return None;
        }
        Some((Dnat { rule }, SocketAddr::new(ns.host_addr().into(), port)))
    }
}

impl Drop for Dnat {
    fn drop(&mut self) {
        let _ = std::process::Command::new("iptables")
            .arg("-D")
            .args(&self.rule)
            .status();
    }
}

/// The median of `values` (not empty).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
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
    // Every path is set up first and measured in turn, round after round,
    // so that the machine's drift falls on all of them alike.
    let mut paths: Vec<(String, SocketAddr)> = vec![(
        "direct UDP path, no relay (host → container address)".into(),
        SocketAddr::new(ns.addr().into(), PORT),
    )];
    let dnat = Dnat::add(&ns);
    if let Some((_, to)) = &dnat {
        paths.push((
            "kernel forwarding (iptables DNAT), no process in the path".into(),
            *to,
        ));
    }
    let socat = socat(&ns).await;
    if let Some((_, to)) = &socat {
        paths.push(("socat UDP relay (`-b 65536`, fork)".into(), *to));
    }
    // Each backend as it runs, and with two worker threads (as it ran
    // before it had one) beside it.
    let mut tunnels = Vec::new();
    for (backend, lever) in [
        ("grpc", ""),
        ("grpc", "TOKIO_WORKER_THREADS=2"),
        ("direct", ""),
        ("direct", "TOKIO_WORKER_THREADS=2"),
    ] {
        let url = monitor.url();
        let token = monitor.token_flag(None);
        let mut args = vec![
            "--monitor",
            url.as_str(),
            "--backend",
            backend,
            "--log-level",
            "warn",
        ];
        args.extend(token.iter().map(String::as_str));
        let env: Vec<(&str, &str)> = lever.split_once('=').into_iter().collect();
        let tunnel = TunnelProc::start_with_env(&ns, None, &args, &env).await;
        let host = tunnel
            .wait_active(&format!("default:udp:{PORT}"))
            .await
            .host_port;
        let to = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), host as u16);
        ready(to).await?;
        let lever = if lever.is_empty() {
            String::new()
        } else {
            format!(" `{lever}`")
        };
        paths.push((format!("tunnel-svc `--backend {backend}`{lever}"), to));
        tunnels.push(tunnel);
    }
    // rates[size][path] = one Rate per round.
    let mut rates: Vec<Vec<Vec<Rate>>> = Vec::new();
    for size in SIZES {
        let mut by_path: Vec<Vec<Rate>> = paths.iter().map(|_| Vec::new()).collect();
        for round in 1..=ROUNDS {
            for (i, (path, to)) in paths.iter().enumerate() {
                eprintln!("{size} B, round {round}/{ROUNDS}: {path}");
                by_path[i].push(measure(*to, size).await?);
            }
        }
        rates.push(by_path);
    }
    for mut tunnel in tunnels {
        let status = tunnel.terminate().await;
        anyhow::ensure!(status.success(), "tunnel-svc exited with {status}");
    }
    if let Some((mut socat, _)) = socat {
        socat.terminate().await;
    }
    drop(dnat);
    println!("## UDP tunnel benchmark\n");
    println!(
        "{} cores; one client, {WINDOW} datagrams in flight, echo server in a network \
         namespace; every path measured for {SECONDS} s in turn, {ROUNDS} rounds. \
         Datagrams/s is the median round; × direct path is the median of each round's \
         ratio to the direct path's rate in the same round (lowest–highest)\n",
        nproc()
    );
    println!("| path | payload | datagrams/s (round trips) | Gbit/s (payload, one way) | lost | × direct path |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (size, by_path) in SIZES.iter().zip(&rates) {
        for ((path, _), rounds) in paths.iter().zip(by_path) {
            let ratios: Vec<f64> = rounds
                .iter()
                .zip(&by_path[0])
                .map(|(r, base)| r.per_second() / base.per_second())
                .collect();
            let (low, high) = ratios
                .iter()
                .fold((f64::MAX, 0f64), |(l, h), r| (l.min(*r), h.max(*r)));
            let lost: u64 = rounds.iter().map(|r| r.lost).sum();
            let all: u64 = rounds.iter().map(|r| r.replies + r.lost).sum();
            println!(
                "| {path} | {size} B | {:.0} | {:.2} | {lost} of {all} | {:.2}× ({low:.2}–{high:.2}) |",
                median(rounds.iter().map(Rate::per_second).collect()),
                median(rounds.iter().map(Rate::gbits).collect()),
                median(ratios.clone()),
            );
        }
    }
    Ok(())
}
