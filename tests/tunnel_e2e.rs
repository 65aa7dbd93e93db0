//! tunnel-svc end to end: monitor-svc inside a network namespace (the
//! "container"), the real tunnel-svc binary on the host, real servers inside
//! opened and closed by real processes, and every check made the way a user
//! would make it: connecting to localhost:PORT on the host, the admin API,
//! `tunnel-svc ls/close` and grpcurl.
//!
//! Each test makes its own namespace(s). Tunnels listen on the host's
//! loopback, so each test leases its own block of container ports (see
//! [`ports`]), and tests run in parallel, even with another run of this
//! file on the same host.

use porthole_testkit as common;

use common::{
    binary, comm, grpcurl, host_has_ipv6, host_port_is_free, poll_until, require_root,
    skip_or_fail, unused_local_port, wait_for, which, within, write_token, MonitorProc, Netns,
    Server, TunnelProc, DEADLINE,
};
use porthole::pb::v1::{
    relay_client::RelayClient, relay_frame::Kind as FrameKind, Backend as PbBackend,
    CloseTunnelRequest, DialRequest, ListTunnelsRequest, OpenTunnelRequest, Origin, Protocol,
    RelayFrame, Tunnel, TunnelState, TunnelUpdate, WatchTunnelsRequest,
};
use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Output;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tonic::{Code, Streaming};

/// One `#[tokio::test]` per backend (and flags) of a scenario
/// `f(backend, ...)`: `per_backend! { f: name => (args), ... }`.
macro_rules! per_backend {
    ($f:ident: $($(#[$doc:meta])* $name:ident => ($($arg:expr),+)),+ $(,)?) => {
        $(
            $(#[$doc])*
            #[tokio::test(flavor = "multi_thread")]
            async fn $name() {
                $f($($arg),+).await;
            }
        )+
    };
}

// ---------------------------------------------------------------------------
// Ports

/// Consecutive ports one test may use inside its containers (and so on the
/// host, where tunnels take the same numbers).
const BLOCK: u16 = 50;
/// Blocks lie in 20000..30000: below the kernel's ephemeral range, so no
/// outgoing connection ever takes one of their ports.
const FIRST_PORT: u16 = 20000;
const BLOCKS: u16 = 200;
/// A block is leased by listening on its first port at this address: any
/// test (of this run, or of another run on the same host) that wants it
/// finds it taken and moves on to the next. Tunnels bind 127.0.0.1 and ::1
/// only, so the lease never gets in their way.
const LEASE_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 77, 1);

/// The port block of one test, leased until dropped.
struct Ports {
    base: u16,
    _lease: std::net::TcpListener,
}

/// Leases a block of [`BLOCK`] ports free on the host's loopback for test
/// number `test`: preferably `21000 + 100 * test` (the upper half for the
/// direct backend), or the next block nobody holds.
fn ports(test: u16, backend: Backend) -> Ports {
    let preferred = 20
        + 2 * test
        + match backend {
            Backend::Grpc => 0,
            Backend::Direct => 1,
        };
    for i in 0..BLOCKS {
        let base = FIRST_PORT + ((preferred + i) % BLOCKS) * BLOCK;
        let Ok(lease) = std::net::TcpListener::bind((LEASE_ADDR, base)) else {
            continue;
        };
        if (base..base + BLOCK).all(host_port_is_free) {
            return Ports {
                base,
                _lease: lease,
            };
        }
    }
    panic!(
        "no free block of {BLOCK} ports in {FIRST_PORT}..{}",
        FIRST_PORT + BLOCKS * BLOCK
    );
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port)
}

fn id(port: u16) -> String {
    format!("default:tcp:{port}")
}

fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed>")
        .to_string()
}

// ---------------------------------------------------------------------------
// Backends

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Grpc,
    Direct,
}

impl Backend {
    fn flag(self) -> &'static str {
        match self {
            Backend::Grpc => "grpc",
            Backend::Direct => "direct",
        }
    }

    fn kind(self) -> i32 {
        match self {
            Backend::Grpc => PbBackend::Grpc as i32,
            Backend::Direct => PbBackend::Direct as i32,
        }
    }
}

// ---------------------------------------------------------------------------
// Clients on the host

/// Sends `request`, half-closes, and reads the answer to its end.
async fn exchange(addr: SocketAddr, request: &[u8]) -> io::Result<Vec<u8>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut r, mut w) = stream.into_split();
    let send = async {
        w.write_all(request).await?;
        w.shutdown().await?;
        Ok::<_, io::Error>(w)
    };
    let mut got = Vec::with_capacity(request.len() + 64);
    let (sent, read) = tokio::join!(send, r.read_to_end(&mut got));
    sent?;
    read?;
    Ok(got)
}

/// `ping` through `addr`; the server's answer (`pong LABEL`), or the error.
async fn try_ping(addr: SocketAddr) -> io::Result<String> {
    let got = tokio::time::timeout(DEADLINE, exchange(addr, b"ping\n"))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "ping timed out"))??;
    let text = String::from_utf8_lossy(&got).trim_end().to_string();
    if text.starts_with("pong ") {
        Ok(text)
    } else {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("no pong, got {text:?}"),
        ))
    }
}

/// `ping` that must succeed; returns the label of the server that answered.
async fn ping(addr: SocketAddr) -> String {
    let pong = try_ping(addr)
        .await
        .unwrap_or_else(|e| panic!("ping through {addr}: {e}"));
    pong["pong ".len()..].to_string()
}

/// Deterministic bytes that never repeat in a short period (xorshift64).
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Where two byte strings first differ, for a readable failure.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Sends `echo` and `data` through `addr` while reading the echo, then
/// half-closes; the server answers `END <count>` after that. Returns the
/// bytes sent and received.
async fn echo_through(addr: SocketAddr, data: &[u8]) -> (u64, u64) {
    let mut request = b"echo\n".to_vec();
    request.extend_from_slice(data);
    let got = within(
        &format!("echo of {} bytes through {addr}", data.len()),
        exchange(addr, &request),
    )
    .await
    .unwrap_or_else(|e| panic!("echo through {addr}: {e}"));
    let trailer = format!("END {}\n", data.len());
    assert_eq!(
        got.len(),
        data.len() + trailer.len(),
        "echo through {addr}: answer length (sent {} bytes)",
        data.len()
    );
    let (body, tail) = got.split_at(data.len());
    assert!(
        body == data,
        "echo through {addr}: the bytes came back corrupted, first difference at {:?}",
        first_difference(body, data)
    );
    assert_eq!(
        String::from_utf8_lossy(tail),
        trailer,
        "the server answers after the client's half-close"
    );
    (request.len() as u64, got.len() as u64)
}

/// Asks the server for `n` random bytes through `addr` and checks them
/// against the CRC it announces first. Returns the bytes sent and received.
async fn source_through(addr: SocketAddr, n: usize) -> (u64, u64) {
    let request = format!("source {n}\n");
    let got = within(
        &format!("{n} bytes from the server through {addr}"),
        exchange(addr, request.as_bytes()),
    )
    .await
    .unwrap_or_else(|e| panic!("source through {addr}: {e}"));
    let eol = got
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or_else(|| panic!("no header line in {} bytes from {addr}", got.len()));
    let header = String::from_utf8_lossy(&got[..eol]).to_string();
    let data = &got[eol + 1..];
    let (len, crc) = header
        .split_once(' ')
        .and_then(|(l, c)| Some((l.parse::<usize>().ok()?, c.parse::<u32>().ok()?)))
        .unwrap_or_else(|| panic!("bad header {header:?}"));
    assert_eq!(
        (len, data.len()),
        (n, n),
        "bytes from the server via {addr}"
    );
    assert_eq!(
        common::crc32(data),
        crc,
        "the bytes from the server via {addr} are corrupted"
    );
    (request.len() as u64, got.len() as u64)
}

/// Waits until the host port is free on 127.0.0.1 and ::1 (the listeners
/// of a removed tunnel close a moment after ListTunnels drops it).
fn wait_port_free(port: u16) {
    wait_for(&format!("host port {port} free"), DEADLINE, || {
        host_port_is_free(port)
    });
}

fn state(t: &Tunnel) -> TunnelState {
    TunnelState::try_from(t.state).unwrap_or(TunnelState::Unspecified)
}

fn is_active(t: &Tunnel) -> bool {
    state(t) == TunnelState::Active
}

/// `(id, state, host_port)` of each tunnel, to compare listings.
fn summary(tunnels: &[Tunnel]) -> Vec<(String, TunnelState, u32)> {
    tunnels
        .iter()
        .map(|t| (t.id.clone(), state(t), t.host_port))
        .collect()
}

fn ids(tunnels: &[Tunnel]) -> BTreeSet<String> {
    tunnels.iter().map(|t| t.id.clone()).collect()
}

async fn next_update(stream: &mut Streaming<TunnelUpdate>) -> TunnelUpdate {
    match within("the next WatchTunnels update", stream.message()).await {
        Ok(Some(u)) => u,
        other => panic!("expected a TunnelUpdate, got {other:?}"),
    }
}

async fn watch(tunnel: &TunnelProc) -> Streaming<TunnelUpdate> {
    let req = tunnel.request(WatchTunnelsRequest {});
    within("WatchTunnels", tunnel.client().watch_tunnels(req))
        .await
        .expect("WatchTunnels")
        .into_inner()
}

/// Runs `tunnel-svc ARGS` (a CLI command) to its end.
async fn run_cli(args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(binary("tunnel-svc"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PORTHOLE_") {
            cmd.env_remove(key);
        }
    }
    // No admin token of this machine's user is found, or made.
    cmd.args(args)
        .env("NO_COLOR", "1")
        .env("XDG_STATE_HOME", "/nonexistent/porthole-tests")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    within(&format!("tunnel-svc {args:?}"), cmd.output())
        .await
        .expect("run tunnel-svc")
}

/// `tunnel-svc ARGS...` against `tunnel`, as its user runs it.
async fn cli(tunnel: &TunnelProc, args: &[&str]) -> Output {
    within(&format!("tunnel-svc {args:?}"), tunnel.cli(args).output())
        .await
        .expect("run tunnel-svc")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------
// Set-up

/// A namespace with monitor-svc inside and tunnel-svc on the host following
/// it. Fields drop in order: tunnel-svc first, the namespace last.
struct World {
    tunnel: TunnelProc,
    monitor: MonitorProc,
    ns: Netns,
}

impl World {
    /// tunnel-svc with `--backend BACKEND` and `extra` flags.
    async fn start(backend: Backend, extra: &[&str]) -> World {
        let ns = Netns::new();
        let monitor = MonitorProc::start(&ns, &[]).await;
        let tunnel = start_tunnel(&ns, &monitor, backend, extra).await;
        World {
            tunnel,
            monitor,
            ns,
        }
    }
}

async fn start_tunnel(
    ns: &Netns,
    monitor: &MonitorProc,
    backend: Backend,
    extra: &[&str],
) -> TunnelProc {
    let mut args = vec!["--backend", backend.flag()];
    args.extend_from_slice(extra);
    TunnelProc::follow(ns, monitor, &args).await
}

// ---------------------------------------------------------------------------
// 1. A port opened inside is reachable at the same port on the host

async fn reachable_then_gone(backend: Backend) {
    if !require_root() {
        return;
    }
    let block = ports(0, backend);
    let port = block.base;
    let w = World::start(backend, &[]).await;
    let server = Server::any(&w.ns, port).await;
    let t = w.tunnel.wait_active(&id(port)).await;
    assert_eq!(t.target, "default");
    assert_eq!(t.protocol, Protocol::Tcp as i32);
    assert_eq!((t.container_port, t.host_port), (port.into(), port.into()));
    assert_eq!(t.origin, Origin::Auto as i32, "{t:?}");
    assert_eq!(t.backend, backend.kind(), "{t:?}");
    assert!(t.error.is_empty(), "no error on a clean tunnel: {t:?}");
    assert!(t.opened_at.is_some(), "{t:?}");
    let process = t.process.clone().expect("the server's process is known");
    assert_eq!(process.pid, server.pid(), "{t:?}");
    assert_eq!(process.name, comm(server.pid()), "{t:?}");
    let addrs: BTreeSet<&str> = t.host_addresses.iter().map(String::as_str).collect();
    assert!(addrs.contains(v4(port).to_string().as_str()), "{t:?}");

    assert_eq!(ping(v4(port)).await, "srv", "through 127.0.0.1:{port}");
    if host_has_ipv6() {
        assert!(addrs.contains(v6(port).to_string().as_str()), "{t:?}");
        assert_eq!(ping(v6(port)).await, "srv", "through [::1]:{port}");
    } else {
        eprintln!("{}: the host has no ::1; IPv6 not checked", test_name());
    }
    let connections = if host_has_ipv6() { 2 } else { 1 };
    let t = w
        .tunnel
        .wait_tunnel(&id(port), "every connection counted and done", |t| {
            t.total_connections == connections && t.active_connections == 0
        })
        .await;
    assert!(t.bytes_in > 0 && t.bytes_out > 0, "{t:?}");
    let metrics = w.tunnel.metrics().await;
    for line in [
        format!(
            "porthole_tunnel_connections_total{{id=\"{}\"}} {connections}",
            id(port)
        ),
        "# TYPE porthole_tunnels gauge".to_string(),
        "porthole_tunnels{target=\"default\",state=\"TUNNEL_STATE_ACTIVE\"} 1".to_string(),
    ] {
        assert!(
            metrics.body.lines().any(|l| l == line),
            "{line:?} in\n{}",
            metrics.body
        );
    }

    server.close();
    w.tunnel.wait_gone(&id(port)).await;
    wait_port_free(port);
    assert!(
        try_ping(v4(port)).await.is_err(),
        "nothing answers on {port} any more"
    );
}

per_backend! {
    reachable_then_gone:
        reachable_on_same_port_then_gone_grpc => (Backend::Grpc),
        reachable_on_same_port_then_gone_direct => (Backend::Direct),
}

// ---------------------------------------------------------------------------
// 2. Data integrity: megabytes both ways, half-close, byte counters

async fn data_integrity(backend: Backend, extra: &[&str]) {
    if !require_root() {
        return;
    }
    const N: usize = 16 << 20;
    let block = ports(1 + 40 * extra.len() as u16, backend);
    let port = block.base;
    let w = World::start(backend, extra).await;
    let _server = Server::start(&w.ns, "0.0.0.0", port, "srv").await;
    w.tunnel.wait_active(&id(port)).await;

    let data = pattern(N);
    let started = Instant::now();
    let (in1, out1) = echo_through(v4(port), &data).await;
    let echo_time = started.elapsed();
    let via = if host_has_ipv6() { v6(port) } else { v4(port) };
    let (in2, out2) = source_through(via, N).await;
    eprintln!(
        "{}: 2 x 16 MiB echoed in {:.2}s, total {:.2}s",
        test_name(),
        echo_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let (want_in, want_out) = (in1 + in2, out1 + out2);
    w.tunnel
        .wait_tunnel(
            &id(port),
            &format!("bytes_in {want_in}, bytes_out {want_out}, 2 connections done"),
            |t| {
                t.bytes_in == want_in
                    && t.bytes_out == want_out
                    && t.total_connections == 2
                    && t.active_connections == 0
            },
        )
        .await;
}

per_backend! {
    data_integrity:
        sixteen_mib_both_ways_intact_grpc => (Backend::Grpc, &[]),
        /// The same in Relay.Dial streams only (what the Docker exec stream and
        /// monitors without the raw path use).
        sixteen_mib_both_ways_intact_grpc_relay_streams => (Backend::Grpc, &["--no-raw-relay"]),
        sixteen_mib_both_ways_intact_direct => (Backend::Direct, &[]),
}

// ---------------------------------------------------------------------------
// 3. Busy host port: the next free one, or FAILED with --on-conflict fail

async fn busy_host_port(backend: Backend) {
    if !require_root() {
        return;
    }
    let block = ports(2, backend);
    let port = block.base;
    let held = std::net::TcpListener::bind(v4(port)).expect("hold the host port");
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let _server = Server::any(&ns, port).await;

    // Default: the next free port, said loudly.
    let mut tunnel = start_tunnel(&ns, &monitor, backend, &[]).await;
    let t = tunnel.wait_active(&id(port)).await;
    let host = u16::try_from(t.host_port).expect("a port");
    assert_ne!(host, port, "the busy port is not used: {t:?}");
    assert!(host > port, "{t:?}");
    for needle in [format!("{port} is busy"), format!("on {host}")] {
        assert!(t.note.contains(&needle), "{needle:?} in {:?}", t.note);
    }
    assert!(t.error.is_empty(), "a remap is a note, not an error: {t:?}");
    assert_eq!(ping(v4(host)).await, "srv");
    assert!(tunnel.terminate().await.success(), "{}", tunnel.log());
    assert!(host_port_is_free(host), "tunnel-svc left {host} bound");

    // The remembered host port is this tunnel's from now on.
    let again = start_tunnel(&ns, &monitor, backend, &[]).await;
    assert_eq!(
        again.wait_active(&id(port)).await.host_port,
        u32::from(host)
    );
    drop(again);
    wait_port_free(host);
    // --on-conflict fail (and nothing remembered): FAILED with the
    // reason, nothing bound. (--no-keep-host-ports: the port is taken as
    // soon as this test's holder lets it go, not 5 minutes later.)
    let fresh = ns.log_dir().join("fresh-state");
    let fresh = fresh.display().to_string();
    let args = [
        "--on-conflict",
        "fail",
        "--state-dir",
        fresh.as_str(),
        "--no-keep-host-ports",
    ];
    let tunnel = start_tunnel(&ns, &monitor, backend, &args).await;
    let t = tunnel
        .wait_tunnel(&id(port), "FAILED", |t| state(t) == TunnelState::Failed)
        .await;
    for needle in [format!("host port {port} is busy"), "fail".to_string()] {
        assert!(t.error.contains(&needle), "{needle:?} in {:?}", t.error);
    }
    assert_eq!(t.host_port, 0, "a failed tunnel holds no host port: {t:?}");
    assert!(host_port_is_free(port + 1), "nothing was bound elsewhere");
    // Once the port is free, the tunnel is retried and comes up on it.
    drop(held);
    let t = tunnel.wait_active(&id(port)).await;
    assert_eq!(t.host_port, u32::from(port), "{t:?}");
    assert!(t.error.is_empty(), "the old error is gone: {t:?}");
    assert_eq!(ping(v4(port)).await, "srv");
}

per_backend! {
    busy_host_port:
        busy_host_port_grpc => (Backend::Grpc),
        busy_host_port_direct => (Backend::Direct),
}

// ---------------------------------------------------------------------------
// 4. Skip list, --max-tunnels, the monitor's own port

#[tokio::test(flavor = "multi_thread")]
async fn skip_list_and_max_tunnels() {
    if !require_root() {
        return;
    }
    let block = ports(3, Backend::Grpc);
    let base = block.base;
    let skip = format!("{}-{}", base, base + 2);
    let w = World::start(Backend::Grpc, &["--skip", &skip, "--max-tunnels", "2"]).await;
    let mut servers = Vec::new();
    for p in base..=base + 2 {
        servers.push(Server::any(&w.ns, p).await);
    }
    // --skip adds to the default skip list: SMTP's 25 stays skipped.
    servers.push(Server::any(&w.ns, 25).await);
    // The highest of three first: a tunnel that exists keeps its slot, the
    // next port takes the other, and the third is listed, not forwarded.
    let (a, b, c) = (base + 10, base + 11, base + 12);
    servers.push(Server::any(&w.ns, c).await);
    let before = w.tunnel.wait_active(&id(c)).await;
    servers.push(Server::any(&w.ns, a).await);
    w.tunnel.wait_active(&id(a)).await;
    servers.push(Server::any(&w.ns, b).await);
    let capped = w
        .tunnel
        .wait_tunnel(&id(b), "the third port listed as capped", |t| {
            state(t) == TunnelState::Pending && t.note.contains("--max-tunnels 2")
        })
        .await;
    assert_eq!(capped.host_port, 0, "{capped:?}");
    assert!(host_port_is_free(b), "the capped port is not bound");
    let listed = ids(&w.tunnel.tunnels().await);
    assert_eq!(
        listed,
        [id(a), id(b), id(c)].into_iter().collect(),
        "never 7070, 25 or {skip}"
    );
    let kept = w.tunnel.wait_active(&id(c)).await;
    assert_eq!(
        kept.opened_at, before.opened_at,
        "the existing tunnel was not evicted"
    );
    for p in base..=base + 2 {
        assert!(host_port_is_free(p), "skipped port {p} bound on the host");
    }
    assert_eq!(ping(v4(a)).await, "srv");
    assert_eq!(ping(v4(c)).await, "srv");

    // One of the two closes: the capped one gets its tunnel.
    let c_server = servers.remove(servers.len() - 3);
    c_server.close();
    w.tunnel.wait_gone(&id(c)).await;
    w.tunnel.wait_active(&id(b)).await;
    assert_eq!(ping(v4(b)).await, "srv");
}

// ---------------------------------------------------------------------------
// 5. An admin close stays closed; reopening; manual tunnels; the CLI

#[tokio::test(flavor = "multi_thread")]
async fn admin_close_stays_closed_until_reopened() {
    if !require_root() {
        return;
    }
    let block = ports(4, Backend::Grpc);
    let base = block.base;
    let (p, q, r) = (base, base + 1, base + 2);
    let w = World::start(Backend::Grpc, &[]).await;
    let tunnel = &w.tunnel;
    let server = Server::any(&w.ns, p).await;
    tunnel.wait_active(&id(p)).await;

    let closed = within(
        "CloseTunnel",
        tunnel
            .client()
            .close_tunnel(tunnel.request(CloseTunnelRequest { id: id(p) })),
    )
    .await
    .expect("CloseTunnel")
    .into_inner()
    .tunnel
    .expect("the closed tunnel");
    assert_eq!(state(&closed), TunnelState::Closed, "{closed:?}");
    let t = tunnel.tunnel(&id(p)).await.expect("still listed");
    assert_eq!(state(&t), TunnelState::Closed, "{t:?}");
    wait_port_free(p);

    // While the port stays open inside, other ports come and go (each a
    // monitor event and a reconcile): the closed tunnel stays closed.
    let mut updates = watch(tunnel).await;
    let first = next_update(&mut updates).await;
    assert_eq!(
        (first.tunnel.as_ref().map(state), first.removed),
        (Some(TunnelState::Closed), false),
        "the listing shows the closed tunnel: {first:?}"
    );
    for round in 0..3 {
        let other = Server::any(&w.ns, q).await;
        loop {
            let u = next_update(&mut updates).await;
            let t = u.tunnel.expect("a tunnel");
            assert_ne!(t.id, id(p), "round {round}: the closed tunnel changed");
            if t.id == id(q) && is_active(&t) && !u.removed {
                break;
            }
        }
        assert!(host_port_is_free(p), "round {round}: {p} is bound again");
        other.close();
        loop {
            let u = next_update(&mut updates).await;
            let t = u.tunnel.expect("a tunnel");
            assert_ne!(t.id, id(p), "round {round}: the closed tunnel changed");
            if t.id == id(q) && u.removed {
                break;
            }
        }
        let t = tunnel.tunnel(&id(p)).await.expect("still listed");
        assert_eq!(state(&t), TunnelState::Closed, "round {round}: {t:?}");
    }
    assert!(host_port_is_free(p));

    // The port closes and reopens inside: the tunnel is back.
    server.close();
    tunnel.wait_gone(&id(p)).await;
    let _server = Server::any(&w.ns, p).await;
    let t = tunnel.wait_active(&id(p)).await;
    assert_eq!(
        (t.host_port, t.origin),
        (u32::from(p), Origin::Auto as i32),
        "{t:?}"
    );
    assert_eq!(ping(v4(p)).await, "srv");

    // The CLI: `ls` shows it, `close` closes it.
    let out = cli(tunnel, &["ls"]).await;
    assert!(out.status.success(), "ls: {}", text(&out.stderr));
    let table = text(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with(&id(p)))
        .unwrap_or_else(|| panic!("{} in:\n{table}", id(p)));
    assert!(row.contains("active"), "{row}");
    assert!(row.contains(&format!("localhost:{p}")), "{row}");
    // The targets first, then a blank line, then the tunnels.
    let mut lines = table.lines();
    assert!(lines.next().unwrap_or("").starts_with("TARGET"), "{table}");
    assert!(lines.any(|l| l.starts_with("ID ")), "{table}");
    // `ls | head`: a reader that is gone before ls writes ends it quietly.
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let mut ls = tunnel.cli(&["ls"]);
    ls.stdout(writer)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let out = within("ls into a closed pipe", ls.output()).await.unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "ls into a closed pipe: {} {}",
        out.status,
        text(&out.stderr)
    );
    let out = cli(tunnel, &["close", &id(p)]).await;
    assert!(out.status.success(), "close: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&id(p)), "{}", text(&out.stdout));
    let t = tunnel.tunnel(&id(p)).await.expect("listed");
    assert_eq!(state(&t), TunnelState::Closed, "{t:?}");
    wait_port_free(p);
    let out = cli(tunnel, &["ls"]).await;
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.starts_with(&id(p)) && l.contains("closed")),
        "{}",
        text(&out.stdout)
    );

    // OpenTunnel reopens it (as a manual tunnel).
    let opened = within(
        "OpenTunnel",
        tunnel
            .client()
            .open_tunnel(tunnel.request(OpenTunnelRequest {
                container_port: p.into(),
                ..Default::default()
            })),
    )
    .await
    .expect("OpenTunnel")
    .into_inner()
    .tunnel
    .expect("the opened tunnel");
    assert_eq!(opened.id, id(p));
    assert_eq!(state(&opened), TunnelState::Active, "{opened:?}");
    assert_eq!(opened.origin, Origin::Manual as i32, "{opened:?}");
    assert_eq!(opened.host_port, u32::from(p), "{opened:?}");
    assert_eq!(ping(v4(p)).await, "srv");

    // Closing it again, while the port is open inside, keeps it closed.
    within(
        "CloseTunnel",
        tunnel
            .client()
            .close_tunnel(tunnel.request(CloseTunnelRequest { id: id(p) })),
    )
    .await
    .expect("CloseTunnel of the reopened tunnel");
    let other = Server::any(&w.ns, q).await;
    tunnel.wait_active(&id(q)).await;
    other.close();
    tunnel.wait_gone(&id(q)).await;
    let t = tunnel.tunnel(&id(p)).await.expect("still listed");
    assert_eq!(state(&t), TunnelState::Closed, "{t:?}");
    wait_port_free(p);

    // OpenTunnel with an explicit host port.
    let _third = Server::start(&w.ns, "0.0.0.0", r, "third").await;
    tunnel.wait_active(&id(r)).await;
    let host = r + 20;
    let opened = within(
        "OpenTunnel with host_port",
        tunnel
            .client()
            .open_tunnel(tunnel.request(OpenTunnelRequest {
                target: "default".into(),
                container_port: r.into(),
                host_port: host.into(),
                protocol: Protocol::Tcp as i32,
            })),
    )
    .await
    .expect("OpenTunnel with host_port")
    .into_inner()
    .tunnel
    .expect("the opened tunnel");
    assert_eq!(
        (
            opened.id.as_str(),
            opened.host_port,
            opened.origin,
            state(&opened)
        ),
        (
            id(r).as_str(),
            u32::from(host),
            Origin::Manual as i32,
            TunnelState::Active
        ),
        "{opened:?}"
    );
    assert_eq!(ping(v4(host)).await, "third");
    wait_port_free(r);
    let listed = tunnel.tunnel(&id(r)).await.expect("listed");
    assert_eq!(listed.host_port, u32::from(host), "{listed:?}");
}

// ---------------------------------------------------------------------------
// 6. A server on loopback only inside the container

async fn loopback_only(backend: Backend) {
    if !require_root() {
        return;
    }
    let block = ports(5, backend);
    let port = block.base;
    let w = World::start(backend, &[]).await;
    let _server = Server::start(&w.ns, "127.0.0.1", port, "lo").await;
    match backend {
        Backend::Grpc => {
            w.tunnel.wait_active(&id(port)).await;
            assert_eq!(ping(v4(port)).await, "lo");
        }
        Backend::Direct => {
            let t = w
                .tunnel
                .wait_tunnel(&id(port), "FAILED", |t| state(t) == TunnelState::Failed)
                .await;
            assert!(t.error.contains("loopback"), "{t:?}");
            assert!(host_port_is_free(port), "a failed tunnel binds nothing");
        }
    }
}

per_backend! {
    loopback_only:
        loopback_only_server_grpc_reaches_it => (Backend::Grpc),
        loopback_only_server_direct_fails_and_says_why => (Backend::Direct),
}

// ---------------------------------------------------------------------------
// 7. Two targets with the same port

#[tokio::test(flavor = "multi_thread")]
async fn two_targets_same_port_both_forwarded() {
    if !require_root() {
        return;
    }
    let block = ports(6, Backend::Grpc);
    let port = block.base;
    let (ns_a, ns_b) = (Netns::new(), Netns::new());
    let (mon_a, mon_b) = (
        MonitorProc::start(&ns_a, &[]).await,
        MonitorProc::start(&ns_b, &[]).await,
    );
    let (ta, tb) = (format!("a={}", mon_a.url()), format!("b={}", mon_b.url()));
    let [flag, tok_a] = mon_a.token_flag(Some("a"));
    let [_, tok_b] = mon_b.token_flag(Some("b"));
    let tunnel = TunnelProc::start(
        &ns_a,
        &[
            "--target", &ta, "--target", &tb, &flag, &tok_a, &flag, &tok_b,
        ],
    )
    .await;
    let _sa = Server::start(&ns_a, "::", port, "in-a").await;
    let _sb = Server::start(&ns_b, "::", port, "in-b").await;
    let (ida, idb) = (format!("a:tcp:{port}"), format!("b:tcp:{port}"));
    let a = tunnel.wait_active(&ida).await;
    let b = tunnel.wait_active(&idb).await;
    assert_eq!((a.target.as_str(), b.target.as_str()), ("a", "b"));
    let hosts: BTreeSet<u32> = [a.host_port, b.host_port].into_iter().collect();
    assert_eq!(hosts.len(), 2, "different host ports: {a:?} {b:?}");
    assert!(hosts.contains(&u32::from(port)), "{a:?} {b:?}");
    let remapped = if a.host_port == u32::from(port) {
        &b
    } else {
        &a
    };
    assert!(
        remapped
            .note
            .contains(&format!("host port {port} is held by ")),
        "{remapped:?}"
    );
    assert_eq!(ping(v4(a.host_port as u16)).await, "in-a");
    assert_eq!(ping(v4(b.host_port as u16)).await, "in-b");

    let only_b = within(
        "ListTunnels target b",
        tunnel
            .client()
            .list_tunnels(tunnel.request(ListTunnelsRequest {
                target: "b".into(),
                ..Default::default()
            })),
    )
    .await
    .expect("ListTunnels")
    .into_inner()
    .tunnels;
    assert_eq!(ids(&only_b), [idb].into_iter().collect(), "{only_b:?}");
    drop(tunnel);
}

// ---------------------------------------------------------------------------
// 8. WatchTunnels

#[tokio::test(flavor = "multi_thread")]
async fn watch_tunnels_lists_then_streams_changes() {
    if !require_root() {
        return;
    }
    let block = ports(7, Backend::Grpc);
    let base = block.base;
    let (p, q) = (base, base + 1);
    let w = World::start(Backend::Grpc, &[]).await;
    let _first = Server::any(&w.ns, p).await;
    w.tunnel.wait_active(&id(p)).await;

    let mut updates = watch(&w.tunnel).await;
    let u = next_update(&mut updates).await;
    let t = u.tunnel.clone().expect("a tunnel");
    assert_eq!(
        (t.id.as_str(), state(&t), u.removed),
        (id(p).as_str(), TunnelState::Active, false),
        "{u:?}"
    );

    let second = Server::any(&w.ns, q).await;
    let u = next_update(&mut updates).await;
    let t = u.tunnel.clone().expect("a tunnel");
    assert_eq!(
        (t.id.as_str(), state(&t), u.removed),
        (id(q).as_str(), TunnelState::Active, false),
        "{u:?}"
    );
    assert_eq!(t.host_port, u32::from(q));

    second.close();
    let u = next_update(&mut updates).await;
    let t = u.tunnel.clone().expect("a tunnel");
    assert_eq!((t.id.as_str(), u.removed), (id(q).as_str(), true), "{u:?}");

    within(
        "CloseTunnel",
        w.tunnel
            .client()
            .close_tunnel(w.tunnel.request(CloseTunnelRequest { id: id(p) })),
    )
    .await
    .expect("CloseTunnel");
    let u = next_update(&mut updates).await;
    let t = u.tunnel.clone().expect("a tunnel");
    assert_eq!(
        (t.id.as_str(), state(&t), u.removed),
        (id(p).as_str(), TunnelState::Closed, false),
        "{u:?}"
    );
}

// ---------------------------------------------------------------------------
// 9. The monitor dies and comes back

/// Target `default` as ListTargets shows it now.
async fn default_target(tunnel: &TunnelProc) -> Option<porthole::pb::v1::Target> {
    let targets = tunnel.targets().await;
    targets.into_iter().find(|t| t.name == "default")
}

async fn monitor_restart(backend: Backend) {
    if !require_root() {
        return;
    }
    let block = ports(8, backend);
    let base = block.base;
    let (keep, lose, new) = (base, base + 1, base + 2);
    let mut w = World::start(backend, &[]).await;
    let _kept = Server::any(&w.ns, keep).await;
    let lost = Server::any(&w.ns, lose).await;
    let before = w.tunnel.wait_active(&id(keep)).await;
    w.tunnel.wait_active(&id(lose)).await;

    let target = |connected: bool| {
        let tunnel = &w.tunnel;
        poll_until(
            "ListTargets to show the link",
            DEADLINE,
            move || async move {
                default_target(tunnel)
                    .await
                    .filter(|t| t.connected == connected)
            },
        )
    };
    let up = target(true).await;
    assert!(!up.instance_id.is_empty() && up.error.is_empty(), "{up:?}");
    assert_eq!(up.url, w.monitor.url(), "{up:?}");

    w.monitor.proc().kill();
    // tunnel-svc says the monitor is gone (its tunnels stay, below).
    let down = target(false).await;
    assert!(!down.error.is_empty(), "why it is unreachable: {down:?}");
    let out = cli(&w.tunnel, &["ls"]).await;
    let table = text(&out.stdout);
    assert!(table.contains("unreachable"), "{table}");
    // Tunnels stay up while the monitor is down.
    // The host listener is still bound: it accepts (and, with the grpc
    // backend, resets at once what it cannot carry), it does not refuse.
    match within("connect during the outage", TcpStream::connect(v4(keep))).await {
        Ok(conn) => drop(conn),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e:?}"),
    }
    match backend {
        Backend::Direct => assert_eq!(ping(v4(keep)).await, "srv", "direct needs no monitor"),
        // The connection cannot be carried; the tunnel says why.
        Backend::Grpc => {
            w.tunnel
                .wait_tunnel(&id(keep), "the failed connection reported", |t| {
                    is_active(t) && t.error.contains("connection failed")
                })
                .await;
        }
    }
    let listed = w.tunnel.tunnels().await;
    for p in [keep, lose] {
        let t = listed.iter().find(|t| t.id == id(p));
        assert!(
            t.is_some_and(is_active),
            "{p} during the outage: {listed:?}"
        );
    }
    // Changes during the outage.
    lost.close();
    let _new = Server::any(&w.ns, new).await;

    // A restarted monitor keeps its token file.
    let token_file = w.monitor.token_file().display().to_string();
    let monitor = MonitorProc::start(&w.ns, &["--token-file", &token_file]).await;
    w.tunnel.wait_active(&id(new)).await;
    let again = poll_until("the new monitor run in ListTargets", DEADLINE, || async {
        default_target(&w.tunnel)
            .await
            .filter(|t| t.connected && t.instance_id != up.instance_id)
    })
    .await;
    assert!(again.error.is_empty(), "{again:?}");
    w.tunnel.wait_gone(&id(lose)).await;
    let listed = w.tunnel.tunnels().await;
    assert_eq!(
        ids(&listed),
        [id(keep), id(new)].into_iter().collect(),
        "{listed:#?}"
    );
    let kept: Vec<&Tunnel> = listed
        .iter()
        .filter(|t| t.container_port == u32::from(keep))
        .collect();
    assert_eq!(kept.len(), 1, "exactly one tunnel for {keep}: {listed:#?}");
    assert_eq!(kept[0].host_port, u32::from(keep), "{:?}", kept[0]);
    assert_eq!(
        kept[0].opened_at, before.opened_at,
        "the tunnel of {keep} was never torn down: {:?}",
        kept[0]
    );
    assert!(is_active(kept[0]), "{:?}", kept[0]);
    wait_port_free(lose);
    // A duplicate of `keep` would have been remapped to the next port.
    assert!(host_port_is_free(keep + 1), "no duplicate listener");
    assert_eq!(ping(v4(keep)).await, "srv", "after the restart");
    w.tunnel
        .wait_tunnel(&id(keep), "no error once a connection gets through", |t| {
            t.error.is_empty()
        })
        .await;
    assert_eq!(ping(v4(new)).await, "srv");
    drop(monitor);
}

per_backend! {
    monitor_restart:
        monitor_killed_and_restarted_grpc => (Backend::Grpc),
        monitor_killed_and_restarted_direct => (Backend::Direct),
}

// ---------------------------------------------------------------------------
// 10. SIGTERM

async fn sigterm(backend: Backend) {
    if !require_root() {
        return;
    }
    let block = ports(9, backend);
    let base = block.base;
    let (p, q) = (base, base + 1);
    let mut w = World::start(backend, &[]).await;
    let _a = Server::any(&w.ns, p).await;
    let _b = Server::any(&w.ns, q).await;
    w.tunnel.wait_active(&id(p)).await;
    w.tunnel.wait_active(&id(q)).await;

    // A connection in flight and a WatchTunnels stream open.
    let mut held = within("connect", TcpStream::connect(v4(p)))
        .await
        .expect("connect");
    held.write_all(b"hold\n").await.expect("write");
    let mut line = String::new();
    let mut reader = BufReader::new(&mut held);
    within("holding", reader.read_line(&mut line))
        .await
        .expect("read");
    assert_eq!(line, "holding\n");
    let mut updates = watch(&w.tunnel).await;
    next_update(&mut updates).await;

    let admin = w.tunnel.admin();
    let status = w.tunnel.terminate_within(Duration::from_secs(5)).await;
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        w.tunnel.log()
    );
    for port in [p, q, admin.port()] {
        assert!(host_port_is_free(port), "{port} still bound after exit");
    }
    let mut rest = Vec::new();
    let ended = within("the held connection ends", held.read_to_end(&mut rest)).await;
    assert!(
        !matches!(ended, Ok(n) if n > 0),
        "nothing more through a closed tunnel: {rest:?}"
    );
    // The watch stream ends (cleanly or not) instead of hanging.
    while let Ok(Some(_)) = within("the watch stream ends", updates.message()).await {}
}

per_backend! {
    sigterm:
        sigterm_exits_0_and_frees_every_port_grpc => (Backend::Grpc),
        sigterm_exits_0_and_frees_every_port_direct => (Backend::Direct),
}

// ---------------------------------------------------------------------------
// 11. Bad input

#[tokio::test(flavor = "multi_thread")]
async fn bad_admin_requests_change_nothing() {
    if !require_root() {
        return;
    }
    let block = ports(10, Backend::Grpc);
    let port = block.base;
    let w = World::start(Backend::Grpc, &[]).await;
    let tunnel = &w.tunnel;
    let _server = Server::any(&w.ns, port).await;
    tunnel.wait_active(&id(port)).await;
    let before = summary(&tunnel.tunnels().await);

    let close = |id: &str| {
        let req = tunnel.request(CloseTunnelRequest { id: id.into() });
        async move {
            within("CloseTunnel", tunnel.client().close_tunnel(req))
                .await
                .expect_err("CloseTunnel must fail")
        }
    };
    for (bad, code, needle) in [
        ("default:tcp:1", Code::NotFound, "default:tcp:1"),
        ("nope:tcp:8080", Code::NotFound, "nope:tcp:8080"),
        ("", Code::InvalidArgument, "id"),
    ] {
        let status = close(bad).await;
        assert_eq!(status.code(), code, "CloseTunnel {bad:?}: {status:?}");
        assert!(
            status.message().contains(needle),
            "CloseTunnel {bad:?}: {status:?}"
        );
    }

    let open = |req: OpenTunnelRequest| {
        let req = tunnel.request(req);
        async move {
            within("OpenTunnel", tunnel.client().open_tunnel(req))
                .await
                .expect_err("OpenTunnel must fail")
        }
    };
    let cases = [
        (
            OpenTunnelRequest {
                container_port: 0,
                ..Default::default()
            },
            "0",
        ),
        (
            OpenTunnelRequest {
                container_port: 70000,
                ..Default::default()
            },
            "70000",
        ),
        (
            OpenTunnelRequest {
                target: "nope".into(),
                container_port: u32::from(port),
                ..Default::default()
            },
            "nope",
        ),
        (
            OpenTunnelRequest {
                container_port: u32::from(port) + 1,
                host_port: 70000,
                ..Default::default()
            },
            "70000",
        ),
        (
            OpenTunnelRequest {
                container_port: u32::from(port) + 1,
                protocol: 7,
                ..Default::default()
            },
            "neither TCP nor UDP",
        ),
    ];
    for (req, needle) in cases {
        let shown = format!("{req:?}");
        let status = open(req).await;
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "OpenTunnel {shown}: {status:?}"
        );
        assert!(
            status.message().contains(needle),
            "OpenTunnel {shown}: {needle:?} in {status:?}"
        );
    }
    assert_eq!(
        summary(&tunnel.tunnels().await),
        before,
        "bad requests changed nothing"
    );
    assert!(host_port_is_free(port + 1));

    // The monitor's Relay refuses a port nothing listens on.
    let closed_port = port + 5;
    let frames = tokio_stream::iter(vec![RelayFrame {
        kind: Some(FrameKind::Dial(DialRequest {
            protocol: Protocol::Tcp as i32,
            port: closed_port.into(),
        })),
    }]);
    let mut req = tonic::Request::new(frames);
    w.monitor.token().authorize(&mut req);
    let mut relay = RelayClient::new(w.monitor.channel().await);
    let status = within("Relay.Dial", relay.dial(req))
        .await
        .expect_err("Dial of a closed port must fail");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    for needle in [closed_port.to_string(), "no TCP listener".to_string()] {
        assert!(
            status.message().contains(&needle),
            "{needle:?} in {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_flags_exit_2_and_nothing_listens() {
    let cases: [(&[&str], &[&str]); 7] = [
        (&["--monitor", "ftp://x"], &["ftp://x", "scheme"]),
        (&["--monitor", "not-a-url"], &["not-a-url", "http://"]),
        (&["--target", "noequals"], &["noequals", "NAME=URL"]),
        (
            &["--monitor", "http://a", "--target", "default=http://b"],
            &["default", "twice"],
        ),
        (&[], &["--monitor", "--target"]),
        (
            &["--monitor", "http://a", "--backend", "telnet"],
            &["telnet"],
        ),
        (&["--monitor", "http://a", "--skip", "10-5"], &["10-5"]),
    ];
    for (args, needles) in cases {
        let admin = format!("127.0.0.1:{}", unused_local_port());
        let mut all = args.to_vec();
        all.extend(["--admin", &admin]);
        let out = run_cli(&all).await;
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "tunnel-svc {all:?}: {}\n{stderr}",
            out.status
        );
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "tunnel-svc {all:?}: {needle:?} in stderr:\n{stderr}"
            );
        }
        assert!(
            std::net::TcpListener::bind(admin.as_str()).is_ok(),
            "tunnel-svc {all:?} left {admin} bound"
        );
    }
}

// ---------------------------------------------------------------------------
// 12. Bearer token

async fn token(backend: Backend) {
    if !require_root() {
        return;
    }
    let block = ports(11, backend);
    let port = block.base;
    let ns = Netns::new();
    let token_file = ns.log_dir().join("token");
    write_token(&token_file, "tunnel-e2e-secret");
    let token_path = token_file.to_str().expect("utf-8 path");
    let monitor = MonitorProc::start(&ns, &["--token-file", token_path]).await;
    let tunnel = start_tunnel(&ns, &monitor, backend, &["--token-file", token_path]).await;
    let _server = Server::any(&ns, port).await;
    tunnel.wait_active(&id(port)).await;
    assert_eq!(ping(v4(port)).await, "srv");

    let mut client = tunnel.client();
    let status = within(
        "ListTunnels without a token",
        client.list_tunnels(ListTunnelsRequest::default()),
    )
    .await
    .expect_err("no token is refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let mut req = tonic::Request::new(ListTunnelsRequest::default());
    porthole::auth::Token::new("wrong")
        .expect("token")
        .authorize(&mut req);
    let status = within("ListTunnels with a wrong token", client.list_tunnels(req))
        .await
        .expect_err("a wrong token is refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    let admin = tunnel.admin().to_string();
    let out = run_cli(&["ls", "--admin", &admin]).await;
    assert!(!out.status.success(), "ls without the token must fail");
    let out = run_cli(&["ls", "--admin", &admin, "--token-file", token_path]).await;
    assert!(out.status.success(), "ls: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&id(port)),
        "{}",
        text(&out.stdout)
    );
}

per_backend! {
    token:
        token_on_both_services_grpc => (Backend::Grpc),
        token_on_both_services_direct => (Backend::Direct),
}

// ---------------------------------------------------------------------------
// 13. grpcurl with no .proto files

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_tunnels_without_proto_files() {
    if !require_root() {
        return;
    }
    let Some(bin) = which("grpcurl") else {
        skip_or_fail(&test_name(), "grpcurl is not on PATH");
        return;
    };
    let block = ports(12, Backend::Grpc);
    let port = block.base;
    let w = World::start(Backend::Grpc, &[]).await;
    let _server = Server::any(&w.ns, port).await;
    w.tunnel.wait_active(&id(port)).await;
    let addr = w.tunnel.admin().to_string();

    let services = grpcurl(&bin, &["--plaintext", &addr, "list"]).await;
    for name in ["porthole.v1.TunnelAdmin", "grpc.health.v1.Health"] {
        assert!(
            services.lines().any(|l| l.trim() == name),
            "{name} in:\n{services}"
        );
    }
    // Without the token: refused, and nothing about tunnels said.
    let refused = tokio::process::Command::new(&bin)
        .args(["--plaintext", &addr, "porthole.v1.TunnelAdmin/ListTunnels"])
        .output();
    let refused = within("grpcurl without the token", refused).await.unwrap();
    let said = format!("{}{}", text(&refused.stdout), text(&refused.stderr));
    assert!(
        !refused.status.success() && said.contains("Unauthenticated"),
        "{said}"
    );
    let bearer = w.tunnel.bearer_header();
    let out = grpcurl(
        &bin,
        &[
            "--plaintext",
            "-H",
            &bearer,
            &addr,
            "porthole.v1.TunnelAdmin/ListTunnels",
        ],
    )
    .await;
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let tunnels = json["tunnels"]
        .as_array()
        .unwrap_or_else(|| panic!("no tunnels in {out}"));
    let t = tunnels
        .iter()
        .find(|t| t["id"] == id(port).as_str())
        .unwrap_or_else(|| panic!("{} in {out}", id(port)));
    assert_eq!(t["state"], "TUNNEL_STATE_ACTIVE", "{out}");
    assert_eq!(t["hostPort"], u64::from(port), "{out}");

    let out = grpcurl(
        &bin,
        &[
            "--plaintext",
            "-d",
            "{}",
            &addr,
            "grpc.health.v1.Health/Check",
        ],
    )
    .await;
    assert!(out.contains("SERVING"), "{out}");
}

// ---------------------------------------------------------------------------
// tunnel-svc wait

/// `tunnel-svc wait ARGS... --admin ADMIN` started now; its output when it
/// ends.
fn wait_cmd(tunnel: &TunnelProc, args: &[&str]) -> tokio::process::Child {
    let mut all = vec!["wait"];
    all.extend_from_slice(args);
    tunnel
        .cli(&all)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run tunnel-svc wait")
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_returns_once_the_server_answers_through_the_tunnel() {
    if !require_root() {
        return;
    }
    let block = ports(30, Backend::Grpc);
    let port = block.base;
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let tunnel = TunnelProc::follow(&ns, &monitor, &[]).await;
    // Started before anything listens: it waits.
    let waiting = wait_cmd(&tunnel, &[&port.to_string(), "--timeout", "20s"]);
    let server = Server::start(&ns, "127.0.0.1", port, "waited").await;
    let listening = Instant::now();
    let out = within("tunnel-svc wait", waiting.wait_with_output())
        .await
        .expect("tunnel-svc wait ran");
    let took = listening.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), format!("localhost:{port}"));
    eprintln!(
        "wait returned {} ms after the server listened",
        took.as_millis()
    );
    // What it printed works at once.
    assert_eq!(ping(v4(port)).await, "waited");
    // A tunnel already usable: at once.
    let again = wait_cmd(&tunnel, &[&format!("default:{port}")]);
    let out = within("tunnel-svc wait", again.wait_with_output())
        .await
        .unwrap();
    assert!(out.status.success());
    drop(server);
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_fails_with_the_reason() {
    if !require_root() {
        return;
    }
    let block = ports(31, Backend::Direct);
    let port = block.base;
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let skipped = port + 5;
    let skip = skipped.to_string();
    let tunnel = TunnelProc::follow(&ns, &monitor, &["--backend", "direct", "--skip", &skip]).await;
    // Nothing listens: a timeout that says so.
    let started = Instant::now();
    let out = within(
        "tunnel-svc wait",
        wait_cmd(&tunnel, &[&port.to_string(), "--timeout", "300ms"]).wait_with_output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a timeout's own status: {stderr}"
    );
    assert!(
        stderr.contains("timed out after 300ms")
            && stderr.contains(&format!("no tunnel for container port {port}")),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The direct backend cannot reach a loopback-only server: FAILED, said.
    let _server = Server::start(&ns, "127.0.0.1", port, "unreachable").await;
    let out = within(
        "tunnel-svc wait",
        wait_cmd(&tunnel, &[&port.to_string()]).wait_with_output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("failed") && stderr.contains("loopback only"),
        "{stderr}"
    );
    // Open but skipped: said at once, no waiting.
    let _skipped_server = Server::start(&ns, "0.0.0.0", skipped, "skipped").await;
    let out = within(
        "tunnel-svc wait",
        wait_cmd(
            &tunnel,
            &[&format!("default:{skipped}"), "--timeout", "20s"],
        )
        .wait_with_output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not forwarded: it is in the skip list"),
        "{stderr}"
    );
    // Bad input is a usage error.
    let out = within(
        "tunnel-svc wait",
        wait_cmd(&tunnel, &["web:"]).wait_with_output(),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

// ---------------------------------------------------------------------------
// --config rules and labels, reloaded on SIGHUP

/// `tunnel-svc ls`'s output, and its row of `default:tcp:PORT`.
async fn ls_row(tunnel: &TunnelProc, port: u16) -> (String, String) {
    let out = within("tunnel-svc ls", tunnel.cli(&["ls"]).output())
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("default:tcp:{port} ")))
        .unwrap_or_else(|| panic!("{table}"))
        .to_string();
    (table, row)
}

fn rules_file(web: u16, ignored: u16, pinned: u16, pin_host: u16, web_label: &str) -> String {
    format!(
        "[[rule]]\nports = \"{web}\"\nlabel = \"{web_label}\"\n\
         [[rule]]\nports = \"{ignored}-{ignored}\"\naction = \"ignore\"\n\
         [[rule]]\nprocess = \"postgres\"\naction = \"ignore\"\n\
         [[rule]]\nports = \"{pinned}\"\nhost_port = {pin_host}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn config_rules_label_ignore_and_pin_and_sighup_reloads_them() {
    if !require_root() {
        return;
    }
    let block = ports(32, Backend::Grpc);
    let base = block.base;
    let (web, ignored, pg, pinned, pin_host) = (base, base + 1, base + 2, base + 3, base + 10);
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let _servers = [
        Server::start(&ns, "127.0.0.1", web, "web").await,
        Server::start(&ns, "127.0.0.1", ignored, "ignored").await,
        // Its command line says postgres: the process rule ignores it.
        Server::start(&ns, "127.0.0.1", pg, "postgres").await,
        Server::start(&ns, "127.0.0.1", pinned, "pinned").await,
    ];
    // The pinned host port is taken: a FAILED tunnel, never remapped.
    let _busy = std::net::TcpListener::bind(("127.0.0.1", pin_host)).unwrap();
    let config = ns.log_dir().join("tunnel-svc.toml");
    std::fs::write(&config, rules_file(web, ignored, pinned, pin_host, "web")).unwrap();
    let config_arg = config.display().to_string();
    let mut tunnel = TunnelProc::follow(&ns, &monitor, &["--config", &config_arg]).await;
    let w = tunnel.wait_active(&format!("default:tcp:{web}")).await;
    assert_eq!(w.label, "web");
    let pinned_id = format!("default:tcp:{pinned}");
    let p = tunnel
        .wait_tunnel(&pinned_id, "the pinned tunnel failed", |t| {
            t.state == TunnelState::Failed as i32
        })
        .await;
    assert!(
        p.error.contains(&format!(
            "host port {pin_host} is busy (pinned by rule 4 of --config)"
        )),
        "{p:?}"
    );
    let ids: Vec<String> = tunnel.tunnels().await.into_iter().map(|t| t.id).collect();
    for gone in [ignored, pg] {
        assert!(
            !ids.contains(&format!("default:tcp:{gone}")),
            "{gone} is ignored: {ids:?}"
        );
    }
    assert!(host_port_is_free(ignored) && host_port_is_free(pg));
    // `ls` shows the label.
    let (table, row) = ls_row(&tunnel, web).await;
    assert!(table.contains("LABEL") && row.contains(" web "), "{table}");

    // SIGHUP with a good file: the label changes in place.
    std::fs::write(&config, rules_file(web, ignored, pinned, pin_host, "site")).unwrap();
    tunnel.proc().signal("HUP");
    let relabelled = tunnel
        .wait_tunnel(&format!("default:tcp:{web}"), "the new label", |t| {
            t.label == "site"
        })
        .await;
    assert_eq!(
        relabelled.host_port,
        u32::from(web),
        "the tunnel stays where it was"
    );
    // A bad file is refused with the reason; the rules stay.
    std::fs::write(&config, "[[rule]]\nportz = \"1\"\n").unwrap();
    tunnel.proc().signal("HUP");
    wait_for("the refusal in the log", DEADLINE, || {
        tunnel.log().contains("configuration refused")
    });
    assert!(tunnel.log().contains("unknown field"), "{}", tunnel.log());
    assert_eq!(
        tunnel
            .tunnel(&format!("default:tcp:{web}"))
            .await
            .unwrap()
            .label,
        "site"
    );
}

// ---------------------------------------------------------------------------
// UDP

/// A UDP client on the host, connected to `to`.
/// `--devcontainer FILE` for a `--monitor` target: the file's
/// portsAttributes label a port and ignore another, its forwardPorts
/// brings one the skip list holds; `ls` shows where each came from.
#[tokio::test(flavor = "multi_thread")]
async fn a_devcontainer_json_shapes_a_monitor_targets_tunnels() {
    if !require_root() {
        return;
    }
    let block = ports(8, Backend::Grpc);
    let (web, ignored, skipped) = (block.base, block.base + 1, block.base + 2);
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let _servers = [
        Server::start(&ns, "127.0.0.1", web, "web").await,
        Server::start(&ns, "127.0.0.1", ignored, "ignored").await,
        Server::start(&ns, "127.0.0.1", skipped, "skipped").await,
    ];
    let file = ns.log_dir().join("devcontainer.json");
    std::fs::write(
        &file,
        format!(
            "// as a template writes it\n{{\n  \"forwardPorts\": [{skipped}],\n  \
             \"portsAttributes\": {{\n    \"{web}\": {{ \"label\": \"Web\", \"protocol\": \"http\" }}, \
             /* not this one */ \"{ignored}\": {{ \"onAutoForward\": \"ignore\" }},\n  }},\n}}\n"
        ),
    )
    .unwrap();
    let file_arg = file.display().to_string();
    let skip = skipped.to_string();
    let tunnel = TunnelProc::follow(
        &ns,
        &monitor,
        &["--devcontainer", &file_arg, "--skip", &skip],
    )
    .await;
    let w = tunnel.wait_active(&format!("default:tcp:{web}")).await;
    assert_eq!(
        (w.label.as_str(), w.settings_from.as_str()),
        ("Web", "devcontainer")
    );
    assert_eq!(w.url, format!("http://localhost:{web}"));
    tunnel.wait_active(&format!("default:tcp:{skipped}")).await;
    assert_eq!(
        ping(SocketAddr::from(([127, 0, 0, 1], skipped))).await,
        "skipped"
    );
    let ids: Vec<String> = tunnel.tunnels().await.into_iter().map(|t| t.id).collect();
    assert!(!ids.contains(&format!("default:tcp:{ignored}")), "{ids:?}");
    let (table, row) = ls_row(&tunnel, web).await;
    assert!(
        table.contains("FROM")
            && row.contains(" devcontainer ")
            && row.contains("http://localhost:"),
        "{table}"
    );
    // A file that does not parse is refused at start, with its name.
    std::fs::write(&file, "{ \"forwardPorts\": [\"x\"] }").unwrap();
    let out = run_cli(&[
        "--monitor",
        "http://127.0.0.1:1",
        "--devcontainer",
        &file_arg,
    ])
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("devcontainer.json"),
        "{out:?}"
    );
}

async fn udp_client(to: SocketAddr) -> tokio::net::UdpSocket {
    let local: SocketAddr = if to.is_ipv4() {
        (Ipv4Addr::LOCALHOST, 0).into()
    } else {
        (Ipv6Addr::LOCALHOST, 0).into()
    };
    let c = tokio::net::UdpSocket::bind(local).await.unwrap();
    c.connect(to).await.unwrap();
    c
}

/// Sends `datagram` and returns the reply (5 s at most).
async fn udp_ask(c: &tokio::net::UdpSocket, datagram: &[u8]) -> Vec<u8> {
    c.send(datagram).await.expect("send");
    let mut buf = vec![0u8; 65_536];
    let n = within("a UDP reply", c.recv(&mut buf))
        .await
        .expect("receive");
    buf.truncate(n);
    buf
}

fn host_udp_port_is_free(port: u16) -> bool {
    std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
        && (!host_has_ipv6() || std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, port)).is_ok())
}

/// A UDP echo server inside gets a UDP tunnel on the same host port: 1,000
/// datagrams of 1 to 65,507 bytes come back whole, two clients each get
/// their own replies, flows are counted and expire when idle, `wait
/// --protocol udp` finds it, a client-only socket inside gets no tunnel,
/// and closing the port frees the host's UDP port.
async fn udp_tunnel(backend: Backend) {
    if !require_root() {
        return;
    }
    const DATAGRAMS: usize = 1000;
    const MAX: usize = 65_507;
    let block = ports(40, backend);
    let port = block.base + 1;
    let w = World::start(backend, &["--udp-idle-timeout", "1s"]).await;
    let udp_id = format!("default:udp:{port}");
    let waiting = wait_cmd(&w.tunnel, &[&port.to_string(), "--protocol", "udp"]);
    let echo = Server::udp_echo(&w.ns, "0.0.0.0", port).await;
    let t = w.tunnel.wait_active(&udp_id).await;
    assert_eq!(t.protocol, Protocol::Udp as i32, "{t:?}");
    assert_eq!((t.container_port, t.host_port), (port.into(), port.into()));
    assert_eq!(t.process.as_ref().map(|p| p.pid), Some(echo.pid()), "{t:?}");
    assert!(w.tunnel.tunnel(&id(port)).await.is_none(), "no TCP tunnel");
    let out = within("tunnel-svc wait --protocol udp", waiting.wait_with_output())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("localhost:{port}"));

    // 1,000 datagrams, every size from 1 to 65,507 bytes in steps, each
    // with its own contents: back whole, in their own datagram.
    let a = udp_client(v4(port)).await;
    let mut bytes = 0u64;
    let started = Instant::now();
    for i in 0..DATAGRAMS {
        let size = 1 + i * (MAX - 1) / (DATAGRAMS - 1);
        let mut d = pattern(size);
        d[0] = i as u8;
        let back = udp_ask(&a, &d).await;
        assert!(
            back == d,
            "datagram {i} ({size} bytes) came back as {} bytes",
            back.len()
        );
        bytes += size as u64;
    }
    eprintln!(
        "{}: {DATAGRAMS} datagrams ({bytes} bytes) echoed in {:.2}s",
        test_name(),
        started.elapsed().as_secs_f64()
    );
    // A second client (on ::1 when the host has it): each gets its own.
    let b = udp_client(if host_has_ipv6() { v6(port) } else { v4(port) }).await;
    for round in 0..20u8 {
        a.send(&[b'a', round]).await.unwrap();
        b.send(&[b'b', round]).await.unwrap();
        let mut buf = [0u8; 16];
        let n = within("a's reply", a.recv(&mut buf)).await.unwrap();
        assert_eq!(&buf[..n], &[b'a', round]);
        let n = within("b's reply", b.recv(&mut buf)).await.unwrap();
        assert_eq!(&buf[..n], &[b'b', round]);
    }
    let (n, total) = (DATAGRAMS as u64 + 40, bytes + 80);
    let t = w
        .tunnel
        .wait_tunnel(&udp_id, "every datagram counted", |t| {
            t.datagrams_in == n && t.datagrams_out == n
        })
        .await;
    assert_eq!((t.bytes_in, t.bytes_out), (total, total), "{t:?}");
    assert_eq!(t.total_connections, 2, "one flow per client: {t:?}");
    assert_eq!(t.datagrams_dropped, 0, "{t:?}");
    let metrics = w.tunnel.metrics().await;
    let line = format!("porthole_tunnel_datagrams_in_total{{id=\"{udp_id}\"}} {n}");
    assert!(
        metrics.body.lines().any(|l| l == line),
        "{line:?} in\n{}",
        metrics.body
    );
    // Idle flows end (--udp-idle-timeout 1s); the tunnel stays.
    w.tunnel
        .wait_tunnel(&udp_id, "both flows expired", |t| {
            t.active_connections == 0 && state(t) == TunnelState::Active
        })
        .await;
    assert_eq!(udp_ask(&a, b"again").await, b"again", "a new flow");

    // A client-only socket on an ephemeral port inside (a resolver's): the
    // monitor lists it, tunnel-svc leaves it alone. A server opened after
    // it gets its tunnel, so the client socket's event was seen before.
    let client_only = common::Listener::udp(&w.ns, "0.0.0.0", 45_000);
    let later = Server::udp_echo(&w.ns, "0.0.0.0", port + 1).await;
    w.tunnel
        .wait_active(&format!("default:udp:{}", port + 1))
        .await;
    let all = ids(&w.tunnel.tunnels().await);
    assert!(!all.contains("default:udp:45000"), "{all:?}");
    let mut monitor = w.monitor.client().await;
    let listed = monitor
        .list_ports(porthole::pb::v1::ListPortsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .ports;
    let p = listed.iter().find(|p| p.port == 45_000).expect("listed");
    assert!(!p.server, "{p:?}");
    drop((client_only, later));

    // The port closes: the tunnel goes and the host's UDP port is free.
    echo.close();
    w.tunnel.wait_gone(&udp_id).await;
    wait_for("the host UDP port freed", DEADLINE, || {
        host_udp_port_is_free(port)
    });
}

per_backend! {
    udp_tunnel:
        udp_datagrams_round_trip_whole_per_client_grpc => (Backend::Grpc),
        udp_datagrams_round_trip_whole_per_client_direct => (Backend::Direct),
}

/// As many clients as the flow bound (256 by default, each its own flow),
/// all sending at once, interleaved: every flow opens (the grpc backend's
/// Relay streams fit on the monitor's connection beside the event stream),
/// and each client gets back only its own datagrams.
async fn udp_flows_to_the_bound_and_replies_never_cross(backend: Backend) {
    if !require_root() {
        return;
    }
    const CLIENTS: usize = 256;
    const EACH: u8 = 8;
    let block = ports(4, backend);
    let port = block.base + 1;
    let w = World::start(backend, &[]).await;
    let udp_id = format!("default:udp:{port}");
    let _echo = Server::udp_echo(&w.ns, "0.0.0.0", port).await;
    w.tunnel.wait_active(&udp_id).await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(udp_client(v4(port)).await);
    }
    // Each datagram says whose it is and which: [client hi, lo, seq].
    let tag = |i: usize, seq: u8| [(i >> 8) as u8, i as u8, seq];
    let mut missing: Vec<BTreeSet<u8>> = vec![(0..EACH).collect(); CLIENTS];
    for round in 0..5 {
        for seq in 0..EACH {
            for (i, c) in clients.iter().enumerate() {
                if missing[i].contains(&seq) {
                    c.send(&tag(i, seq)).await.unwrap();
                }
            }
        }
        for (i, c) in clients.iter().enumerate() {
            let mut buf = [0u8; 16];
            while !missing[i].is_empty() {
                let wait = Duration::from_millis(if round == 0 { 2000 } else { 500 });
                let Ok(got) = tokio::time::timeout(wait, c.recv(&mut buf)).await else {
                    break;
                };
                let n = got.unwrap();
                assert_eq!(n, 3, "a datagram stays whole");
                assert_eq!(&buf[..2], &tag(i, 0)[..2], "client {i} got another's reply");
                missing[i].remove(&buf[2]);
            }
        }
        if missing.iter().all(BTreeSet::is_empty) {
            break;
        }
    }
    let lost: usize = missing.iter().map(BTreeSet::len).sum();
    assert_eq!(lost, 0, "datagrams never answered in 5 rounds");
    let t = w
        .tunnel
        .wait_tunnel(&udp_id, "every flow counted", |t| {
            t.total_connections == CLIENTS as u64
        })
        .await;
    assert_eq!(t.active_connections, CLIENTS as u64, "{t:?}");
}

per_backend! {
    udp_flows_to_the_bound_and_replies_never_cross:
        udp_256_flows_and_replies_never_cross_grpc => (Backend::Grpc),
        udp_256_flows_and_replies_never_cross_direct => (Backend::Direct),
}

/// Bursts of large datagrams, as a client with a window of them in flight
/// sends: none is lost on the way (the monitor's flow socket, like
/// tunnel-svc's, has room for a burst; the kernel's default holds only a
/// dozen reassembled 8 KiB datagrams), and each comes back whole.
async fn udp_bursts_of_large_datagrams_arrive(backend: Backend) {
    if !require_root() {
        return;
    }
    const BURST: usize = 48;
    const SIZE: usize = 8192;
    let block = ports(42, backend);
    let port = block.base + 1;
    let w = World::start(backend, &[]).await;
    let udp_id = format!("default:udp:{port}");
    let _echo = Server::udp_echo(&w.ns, "0.0.0.0", port).await;
    w.tunnel.wait_active(&udp_id).await;
    // The client's own buffer holds a whole burst of replies.
    let c = porthole::net::bind_udp((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
    c.connect(v4(port)).await.unwrap();
    assert_eq!(udp_ask(&c, b"warm").await, b"warm");
    let mut buf = vec![0u8; 65_536];
    for burst in 0..10u8 {
        for i in 0..BURST {
            c.send(&[burst.wrapping_add(i as u8); SIZE]).await.unwrap();
        }
        let mut got = 0;
        while got < BURST {
            let reply = tokio::time::timeout(Duration::from_secs(2), c.recv(&mut buf)).await;
            let Ok(n) = reply else {
                panic!("burst {burst}: {got} of {BURST} replies, then none for 2 s");
            };
            assert_eq!(n.unwrap(), SIZE, "a datagram stays whole");
            got += 1;
        }
    }
    let t = w.tunnel.tunnel(&udp_id).await.expect("the tunnel");
    assert_eq!(t.datagrams_dropped, 0, "{t:?}");
}

per_backend! {
    udp_bursts_of_large_datagrams_arrive:
        udp_bursts_of_large_datagrams_arrive_grpc => (Backend::Grpc),
        udp_bursts_of_large_datagrams_arrive_direct => (Backend::Direct),
}

// ---------------------------------------------------------------------------
// Flow control

/// Writes 64 KiB blocks to `conn` until one waits longer than `stall`, or
/// `cap` bytes went; the bytes written.
async fn write_until_stalled(conn: &mut TcpStream, cap: usize, stall: Duration) -> usize {
    let block = vec![0xa5u8; 1 << 16];
    let mut written = 0;
    while written < cap {
        match tokio::time::timeout(stall, conn.write_all(&block)).await {
            Ok(Ok(())) => written += block.len(),
            Ok(Err(e)) => panic!("write failed after {written} bytes: {e}"),
            Err(_) => break,
        }
    }
    written
}

/// A server that stops reading and a client that stops reading: neither
/// tunnel-svc nor the monitor buffers without bound — the sender is held
/// back after a few MiB, and neither process grows.
async fn slow_readers(backend: Backend, extra: &[&str]) {
    if !require_root() {
        return;
    }
    const CAP: usize = 256 << 20;
    const BOUND: usize = 64 << 20;
    let block = ports(50 + extra.len() as u16, backend);
    let port = block.base;
    let w = World::start(backend, extra).await;
    let _server = Server::start(&w.ns, "0.0.0.0", port, "srv").await;
    w.tunnel.wait_active(&id(port)).await;
    let (tunnel_before, monitor_before) =
        (common::rss(w.tunnel.pid()), common::rss(w.monitor.pid()));

    // Upload to a server that never reads.
    let mut up = TcpStream::connect(v4(port)).await.unwrap();
    up.write_all(b"stall\n").await.unwrap();
    let mut line = [0u8; 8];
    within("stalled", up.read_exact(&mut line)).await.unwrap();
    assert_eq!(&line, b"stalled\n");
    let written = write_until_stalled(&mut up, CAP, Duration::from_millis(500)).await;
    assert!(
        written < BOUND,
        "the client wrote {written} bytes into a stalled server"
    );

    // Download by a client that never reads.
    let mut down = TcpStream::connect(v4(port)).await.unwrap();
    down.write_all(b"flood\n").await.unwrap();
    // Held back once the bytes delivered stop growing between two looks.
    let deadline = Instant::now() + DEADLINE;
    let mut last = 0;
    let held = loop {
        let now = w.tunnel.tunnel(&id(port)).await.map_or(0, |t| t.bytes_out);
        if now > 0 && now == last {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the flood was never held back: {now} bytes"
        );
        last = now;
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        (held as usize) < BOUND,
        "{held} bytes reached a client that reads nothing"
    );
    let grown = |before: u64, now: u64| now.saturating_sub(before) >> 20;
    let (tunnel_grew, monitor_grew) = (
        grown(tunnel_before, common::rss(w.tunnel.pid())),
        grown(monitor_before, common::rss(w.monitor.pid())),
    );
    eprintln!(
        "{}: {written} bytes into a stalled server, {held} to a client that does not read; \
         tunnel-svc grew {tunnel_grew} MiB, the monitor {monitor_grew} MiB",
        test_name()
    );
    assert!(
        tunnel_grew < 32 && monitor_grew < 32,
        "tunnel-svc +{tunnel_grew} MiB, monitor +{monitor_grew} MiB"
    );
    drop((up, down));
}

per_backend! {
    slow_readers:
        slow_readers_hold_the_sender_back_grpc => (Backend::Grpc, &[]),
        slow_readers_hold_the_sender_back_grpc_relay_streams => (Backend::Grpc, &["--no-raw-relay"]),
        slow_readers_hold_the_sender_back_direct => (Backend::Direct, &[]),
}

// ---------------------------------------------------------------------------
// Many connections

/// The value of the metric line `name` (no labels) in `/metrics` at `addr`.
async fn metric(addr: SocketAddr, name: &str) -> Option<u64> {
    let body = common::http_get(addr, "/metrics").await.body;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A burst of connections far beyond the monitor's per-peer connection
/// share (5 of 20 here), which raw relay connections count against until
/// their token is checked, so some are refused at its limit: every one
/// completes intact (the refused ones ride Relay streams), then
/// connections and relays go back to where they were.
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_concurrent_connections_complete_grpc() {
    if !require_root() {
        return;
    }
    const N: usize = 1000;
    let block = ports(60, Backend::Grpc);
    let port = block.base;
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &["--max-connections", "20"]).await;
    let tunnel = start_tunnel(&ns, &monitor, Backend::Grpc, &[]).await;
    let w = World {
        tunnel,
        monitor,
        ns,
    };
    let _server = Server::start(&w.ns, "0.0.0.0", port, "srv").await;
    w.tunnel.wait_active(&id(port)).await;
    let before = metric(w.monitor.addr(), "porthole_monitor_connections").await;
    let data = std::sync::Arc::new(pattern(256 << 10));
    let all: Vec<_> = (0..N)
        .map(|_| {
            let data = data.clone();
            tokio::spawn(async move { echo_through(v4(port), &data).await })
        })
        .collect();
    let mut broken = 0;
    for task in all {
        broken += usize::from(task.await.is_err());
    }
    assert_eq!(
        broken,
        0,
        "connections broke; tunnel-svc:\n{}\nmonitor:\n{}",
        w.tunnel.log(),
        w.monitor.log()
    );
    w.tunnel
        .wait_tunnel(&id(port), "every connection done", |t| {
            t.total_connections == N as u64 && t.active_connections == 0
        })
        .await;
    poll_until("the monitor back to its connections", DEADLINE, || async {
        let active = metric(w.monitor.addr(), "porthole_monitor_relays_active").await;
        let now = metric(w.monitor.addr(), "porthole_monitor_connections").await;
        (active == Some(0) && now == before).then_some(())
    })
    .await;
    let failed = metric(w.monitor.addr(), "porthole_monitor_relays_failed_total").await;
    assert_eq!(failed, Some(0));
}

/// Connections that went idle after carrying bytes hold no pipes: each
/// costs the direct backend its two sockets, and the pipes are back in a
/// small pool (at most 64, 128 descriptors) for the next burst. Then the
/// idle connections still carry bytes.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_hold_no_pipes_direct() {
    if !require_root() {
        return;
    }
    const N: usize = 200;
    const POOL_FDS: usize = 128;
    let block = ports(61, Backend::Direct);
    let port = block.base;
    let w = World::start(Backend::Direct, &[]).await;
    let mut echo = common::EchoPorts::start(&w.ns);
    echo.open(port, "0.0.0.0").expect("echo port");
    w.tunnel.wait_active(&id(port)).await;
    let before = common::load::fds(w.tunnel.pid());
    let (mut held, failed) = common::load::idle(v4(port), N).await;
    assert_eq!(failed, 0, "{} of {N} connections opened", held.len());
    // Two sockets per connection, the pool, and nothing else.
    let idle_fds = poll_until("the pipes to go back", DEADLINE, || async {
        let now = common::load::fds(w.tunnel.pid());
        (now <= before + 2 * N + POOL_FDS).then_some(now)
    })
    .await;
    eprintln!(
        "tunnel-svc: {before} fds before, {idle_fds} with {N} idle connections ({:.1} each)",
        (idle_fds - before) as f64 / N as f64
    );
    for conn in held.iter_mut().take(10) {
        conn.write_all(b"y").await.unwrap();
        let mut b = [0u8; 1];
        within("an echo on an idle connection", conn.read_exact(&mut b))
            .await
            .unwrap();
        assert_eq!(&b, b"y");
    }
    drop(held);
    poll_until("the connections to close", DEADLINE, || async {
        (common::load::fds(w.tunnel.pid()) <= before + POOL_FDS).then_some(())
    })
    .await;
}
