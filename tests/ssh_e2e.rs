//! tunnel-svc's ssh backend end to end: a real OpenSSH `sshd` inside a
//! network namespace (its own host key, a client key made by the test),
//! monitor-svc beside it, and the real tunnel-svc binary on the host with
//! `--backend ssh`. Every check is one a user would make: connect to
//! `localhost:PORT`, look at ListTunnels, look for leftover ssh processes.
//!
//! Each test makes its own namespace, sshd and tunnel-svc, so they run in
//! parallel.

use porthole_testkit as common;

use common::{
    argv, have_openssh, poll_until, require_root, send_signal, ssh_children, ssh_master, within,
    MonitorProc, Netns, Proc, Sshd, TunnelProc, DEADLINE,
};
use porthole::pb::v1::{Backend, Tunnel, TunnelState};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The ssh alias tunnel-svc is given; `-o HostName=` says where it is.
const ALIAS: &str = "ph-test";
/// Bytes sent each way in the big transfers.
const BIG: usize = 8 << 20;

// ---------------------------------------------------------------------------
// The server inside, and the tunnel's client side

/// A server on 127.0.0.1:`port` ONLY, inside the namespace, that answers
/// every byte with its complement (255 - b) and half-closes when the
/// client does: a test sees that its bytes reached the server and that
/// the server's came back.
async fn start_server(ns: &Netns, port: u16) -> Proc {
    start_helper(ns, "flip", port).await
}

/// The helper's server `mode` on 127.0.0.1:`port` inside the namespace,
/// once it said ready.
async fn start_helper(ns: &Netns, mode: &str, port: u16) -> Proc {
    let mut cmd = ns.command(common::binary(common::HELPER));
    cmd.args([mode, "127.0.0.1", &port.to_string()])
        .stdin(Stdio::null());
    let mut proc = ns.spawn_command("server", cmd);
    proc.wait_for_log("ready").await;
    proc
}

fn flipped(data: &[u8]) -> Vec<u8> {
    data.iter().map(|b| 255 - b).collect()
}

/// Deterministic bytes that do not repeat in any short period.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` (then half-closes) while reading the answer to its end.
async fn exchange(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let stream = TcpStream::connect(addr).await?;
    let (mut r, mut w) = stream.into_split();
    let send = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut got = Vec::with_capacity(data.len());
    let (sent, read) = tokio::join!(send, r.read_to_end(&mut got));
    sent?;
    read?;
    Ok(got)
}

/// [`exchange`] that must come back complete and intact.
async fn transfer(addr: SocketAddr, data: &[u8]) {
    let got = within(
        &format!("{} bytes through {addr}", data.len()),
        exchange(addr, data),
    )
    .await
    .unwrap_or_else(|e| panic!("transfer through {addr}: {e}"));
    assert_eq!(got.len(), data.len(), "answer length through {addr}");
    assert!(
        got == flipped(data),
        "the answer through {addr} is corrupted"
    );
}

/// Whether the host has `::1` (tunnel-svc leaves it out if not).
fn host_has_ipv6() -> bool {
    std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

/// A port free on the host's 127.0.0.1 (and ::1), for the server inside
/// to listen on, so the tunnel gets the same port on the host.
fn free_port() -> u16 {
    for _ in 0..100 {
        let v4 = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = v4.local_addr().expect("local_addr").port();
        if !host_has_ipv6() || std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
}

/// Whether `port` can be bound on the host's loopback addresses.
fn host_port_free(port: u16) -> bool {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
        && (!host_has_ipv6() || std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, port)).is_ok())
}

// ---------------------------------------------------------------------------
// tunnel-svc

/// tunnel-svc on the host, following the namespace's monitor with
/// `--backend ssh` (the shared [`TunnelProc`] with this test's ssh options).
struct TunnelSvc(TunnelProc);

impl TunnelSvc {
    async fn start(ns: &Netns, sshd: &Sshd, monitor: &MonitorProc) -> TunnelSvc {
        // What a user's ~/.ssh/config entry for ALIAS would say.
        let mut options = vec![format!("HostName={}", ns.addr())];
        options.extend(sshd.options());
        let mut args = vec!["--backend", "ssh", "--ssh-host", ALIAS];
        for opt in &options {
            args.extend(["--ssh-option", opt]);
        }
        TunnelSvc(TunnelProc::follow(ns, monitor, &args).await)
    }

    fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// Where it keeps its ssh sockets (TunnelProc unsets XDG_RUNTIME_DIR and TMPDIR).
    fn runtime_dir(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/porthole-{}", self.pid()))
    }

    /// SIGTERM; it must exit 0.
    async fn stop(&mut self) {
        let status = self.0.terminate().await;
        assert!(
            status.success(),
            "tunnel-svc exit status {status}:\n{}",
            self.0.log()
        );
    }

    async fn tunnels(&self) -> Vec<Tunnel> {
        self.0.tunnels().await
    }

    /// Polls ListTunnels until tunnel `id` satisfies `pred`.
    async fn wait_tunnel(&self, what: &str, id: &str, pred: impl Fn(&Tunnel) -> bool) -> Tunnel {
        self.0.wait_tunnel(id, what, pred).await
    }

    /// Waits until the tunnel of `port` is ACTIVE.
    async fn wait_active(&self, port: u16) -> Tunnel {
        self.0.wait_active(&format!("default:tcp:{port}")).await
    }
}

/// A connection through the tunnel that has carried one byte each way and
/// stays open.
async fn echoing_connection(addr: SocketAddr) -> TcpStream {
    let mut open = within("connect through the tunnel", TcpStream::connect(addr))
        .await
        .expect("connect through the tunnel");
    open.write_all(b"x").await.expect("write");
    let mut one = [0u8; 1];
    within("echo", open.read_exact(&mut one))
        .await
        .expect("read");
    assert_eq!(one, [255 - b'x']);
    open
}

/// The pid of tunnel-svc's ControlMaster (`ssh -M ...`), once it runs.
async fn master_pid(tunnel: &TunnelSvc, other_than: Option<u32>) -> u32 {
    poll_until("tunnel-svc's ssh master", DEADLINE, || async {
        ssh_master(tunnel.pid(), other_than)
    })
    .await
}

/// Every process whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<(u32, Vec<String>)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .map(|pid| (pid, argv(pid)))
        .filter(|(_, args)| args.iter().any(|a| a.contains(needle)))
        .collect()
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

// ---------------------------------------------------------------------------
// Set-up shared by the tests

/// Fields drop in order: tunnel-svc first, the namespace (which kills
/// everything inside) last.
struct World {
    tunnel: TunnelSvc,
    server: Proc,
    _monitor: MonitorProc,
    _sshd: Sshd,
    port: u16,
    _ns: Netns,
}

impl World {
    /// Namespace, sshd, monitor-svc, a loopback-only server, and
    /// tunnel-svc; returns once the server's tunnel is ACTIVE.
    async fn start() -> World {
        let ns = Netns::new();
        let sshd = Sshd::start(&ns, ns.addr().into(), 22).await;
        let monitor = MonitorProc::start(&ns, &[]).await;
        let port = free_port();
        let server = start_server(&ns, port).await;
        let tunnel = TunnelSvc::start(&ns, &sshd, &monitor).await;
        tunnel.wait_active(port).await;
        World {
            tunnel,
            server,
            _monitor: monitor,
            _sshd: sshd,
            port,
            _ns: ns,
        }
    }

    fn v4(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.port)
    }

    fn v6(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), self.port)
    }

    fn id(&self) -> String {
        format!("default:tcp:{}", self.port)
    }
}

impl Drop for World {
    /// A failed test kills tunnel-svc, which leaves its socket directory.
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(self.tunnel.runtime_dir());
    }
}

fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed>")
        .to_string()
}

// ---------------------------------------------------------------------------
// Tests

/// A server listening on 127.0.0.1 only inside the container is reachable
/// at localhost:SAME_PORT on the host, over IPv4 and IPv6, megabytes intact
/// both ways, and ListTunnels shows it ACTIVE over ssh with the bytes.
#[tokio::test(flavor = "multi_thread")]
async fn loopback_only_server_reachable_on_same_host_port() {
    if !require_root() || !have_openssh(&test_name()) {
        return;
    }
    let started = Instant::now();
    let mut w = World::start().await;
    let t = w.tunnel.wait_active(w.port).await;
    assert_eq!(t.backend, Backend::Ssh as i32, "{t:?}");
    assert_eq!(
        t.host_port,
        u32::from(w.port),
        "same port on the host: {t:?}"
    );
    assert!(
        t.host_addresses.contains(&w.v4().to_string()),
        "{:?}",
        t.host_addresses
    );
    let data = pattern(BIG);
    transfer(w.v4(), &data).await;
    let mut transfers = 1u64;
    if host_has_ipv6() {
        assert!(
            t.host_addresses.contains(&w.v6().to_string()),
            "{:?}",
            t.host_addresses
        );
        transfer(w.v6(), &data).await;
        transfers += 1;
    } else {
        eprintln!("host has no ::1; IPv6 localhost not checked");
    }
    let want = transfers * BIG as u64;
    let t = w
        .tunnel
        .wait_tunnel("bytes counted", &w.id(), |t| {
            t.bytes_in == want && t.bytes_out == want
        })
        .await;
    assert_eq!(t.state, TunnelState::Active as i32);
    assert_eq!(t.total_connections, transfers, "{t:?}");
    // The tunnel rides the ControlMaster: one ssh process, no per-tunnel ssh -L.
    let masters = ssh_children(w.tunnel.pid());
    assert_eq!(masters.len(), 1, "ssh children of tunnel-svc: {masters:?}");
    // On a CPU with AES instructions, with no ssh configuration choosing
    // ciphers, the master asks for AES-GCM first.
    let cpu_aes = fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|w| w == "aes"))
    });
    let user_config = std::env::var_os("HOME")
        .is_some_and(|h| Path::new(&h).join(".ssh/config").exists())
        || fs::read_to_string("/etc/ssh/ssh_config")
            .is_ok_and(|c| c.lines().any(|l| l.trim_start().starts_with("Ciphers")));
    if cpu_aes && !user_config {
        let argv = &masters[0].1;
        assert!(
            argv.iter()
                .any(|a| a.starts_with("Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,")),
            "{argv:?}"
        );
    }

    // A UDP server: OpenSSH forwards TCP only, so its tunnel is FAILED and
    // says why, and holds no host port.
    let dns = porthole_testkit::Server::udp_echo(&w._ns, "0.0.0.0", 5399).await;
    let udp = w
        .tunnel
        .wait_tunnel("the UDP tunnel failed", "default:udp:5399", |t| {
            t.state == TunnelState::Failed as i32
        })
        .await;
    assert!(udp.error.contains("cannot carry UDP"), "{udp:?}");
    assert_eq!(udp.host_port, 0, "{udp:?}");
    drop(dns);

    // The server stops: the tunnel goes, and with it the forward's socket
    // and the host port.
    let socket = w
        .tunnel
        .runtime_dir()
        .join(format!("default/fwd-{}.sock", w.port));
    assert!(
        socket.exists(),
        "{} exists while forwarded",
        socket.display()
    );
    w.server.kill();
    poll_until("the tunnel to go with its server", DEADLINE, || async {
        let tunnels = w.tunnel.tunnels().await;
        (!tunnels.iter().any(|t| t.id == w.id())).then_some(())
    })
    .await;
    poll_until("the forward to be cancelled", DEADLINE, || async {
        (!socket.exists() && host_port_free(w.port)).then_some(())
    })
    .await;
    w.tunnel.stop().await;
    eprintln!(
        "{} took {:.1}s",
        test_name(),
        started.elapsed().as_secs_f64()
    );
}

/// Killing the ssh master: tunnel-svc reaps it, starts another and puts
/// the forward back, so new connections work again.
#[tokio::test(flavor = "multi_thread")]
async fn dead_master_is_restarted_and_forward_restored() {
    if !require_root() || !have_openssh(&test_name()) {
        return;
    }
    let started = Instant::now();
    let mut w = World::start().await;
    transfer(w.v4(), b"before").await;
    let old = master_pid(&w.tunnel, None).await;
    // A connection open when the master dies is reset, never ended cleanly.
    let mut open = echoing_connection(w.v4()).await;
    assert!(send_signal(old, "KILL"), "kill -KILL {old}");
    let killed = Instant::now();
    let mut rest = Vec::new();
    let ended = within("the open connection to end", open.read_to_end(&mut rest)).await;
    let err = ended.expect_err("the master died: the connection must be reset, not closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err:?}");
    poll_until("the killed master to be reaped", DEADLINE, || async {
        gone(old).then_some(())
    })
    .await;
    let new = master_pid(&w.tunnel, Some(old)).await;
    assert_ne!(new, old);
    poll_until(
        "a connection through the restored tunnel",
        DEADLINE,
        || async {
            let attempt = tokio::time::timeout(Duration::from_secs(3), exchange(w.v4(), b"again"));
            match attempt.await {
                Ok(Ok(got)) => (got == flipped(b"again")).then_some(()),
                _ => None,
            }
        },
    )
    .await;
    let restored = killed.elapsed();
    transfer(w.v4(), &pattern(1 << 20)).await;
    let t = w.tunnel.wait_active(w.port).await;
    assert_eq!(t.backend, Backend::Ssh as i32);
    let masters = ssh_children(w.tunnel.pid());
    assert_eq!(masters.len(), 1, "one master, no leftovers: {masters:?}");
    w.tunnel.stop().await;
    eprintln!(
        "{} took {:.1}s (forward back {:.0} ms after the kill)",
        test_name(),
        started.elapsed().as_secs_f64(),
        restored.as_secs_f64() * 1000.0
    );
}

/// SIGTERM: tunnel-svc exits 0, its ssh master is gone (stopped and
/// reaped, not orphaned), its sockets are removed and the host port is
/// free again, even with a connection open through the tunnel.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_leaves_no_ssh_process_and_a_restart_cleans_up() {
    if !require_root() || !have_openssh(&test_name()) {
        return;
    }
    let mut w = World::start().await;
    transfer(w.v4(), b"hello").await;
    let master = master_pid(&w.tunnel, None).await;
    let runtime = w.tunnel.runtime_dir();
    let mut open = echoing_connection(w.v4()).await;

    w.tunnel.0.proc().kill();
    poll_until(
        "the ssh master to die with tunnel-svc",
        DEADLINE,
        || async { gone(master).then_some(()) },
    )
    .await;
    let mut rest = Vec::new();
    let ended = within("the open connection to end", open.read_to_end(&mut rest)).await;
    let err = ended.expect_err("tunnel-svc died: the connection is reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err:?}");
    // Its socket directory stays behind until a tunnel-svc starts (with
    // tests in parallel, any of them may be the one that removes it).

    // The next tunnel-svc cleans up after it and works.
    let next = TunnelSvc::start(&w._ns, &w._sshd, &w._monitor).await;
    next.wait_active(w.port).await;
    poll_until(
        "the stale ssh directory to be removed",
        DEADLINE,
        || async { (!runtime.exists()).then_some(()) },
    )
    .await;
    transfer(w.v4(), b"again").await;
    let _ = fs::remove_dir_all(next.runtime_dir());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_leaves_no_ssh_process_behind() {
    if !require_root() || !have_openssh(&test_name()) {
        return;
    }
    let started = Instant::now();
    let mut w = World::start().await;
    transfer(w.v4(), b"hello").await;
    let pid = w.tunnel.pid();
    let master = master_pid(&w.tunnel, None).await;
    let runtime = w.tunnel.runtime_dir();
    assert!(
        runtime.is_dir(),
        "{} exists while running",
        runtime.display()
    );
    // A connection left open through the tunnel must not hold shutdown up.
    let mut open = echoing_connection(w.v4()).await;

    w.tunnel.stop().await;
    assert!(gone(master), "ssh master {master} outlived tunnel-svc");
    let leftovers = ssh_children(pid);
    assert!(leftovers.is_empty(), "ssh children left: {leftovers:?}");
    let marker = format!("porthole-{pid}/");
    let leftovers = processes_mentioning(&marker);
    assert!(
        leftovers.is_empty(),
        "processes still using tunnel-svc's sockets: {leftovers:?}"
    );
    assert!(!runtime.exists(), "{} removed", runtime.display());
    assert!(host_port_free(w.port), "host port {} is free again", w.port);
    let mut rest = Vec::new();
    let closed = within("the open connection to end", open.read_to_end(&mut rest)).await;
    assert!(
        closed.is_err() || rest.is_empty(),
        "the connection ended with tunnel-svc"
    );
    eprintln!(
        "{} took {:.1}s",
        test_name(),
        started.elapsed().as_secs_f64()
    );
}

/// A server that half-closes first (greets, then only listens): the client
/// sees the greeting end with EOF while its own half stays open, and the
/// server still gets every byte the client sends after that.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_half_closes_first_still_hears_the_client() {
    if !require_root() || !have_openssh(&test_name()) {
        return;
    }
    let mut w = World::start().await;
    let port = free_port();
    let mut server = start_helper(&w._ns, "greet-then-count", port).await;
    w.tunnel.wait_active(port).await;
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let conn = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect through the tunnel");
    let (mut r, mut w_half) = conn.into_split();
    let mut greeting = Vec::new();
    within("the greeting and its EOF", r.read_to_end(&mut greeting))
        .await
        .expect("read the greeting");
    assert_eq!(greeting, b"hello, and that is all");
    let data = pattern(1 << 20);
    within("sending after the server's EOF", w_half.write_all(&data))
        .await
        .expect("the client's half is still open");
    w_half.shutdown().await.expect("half-close");
    within(
        "the server to count the bytes",
        server.wait_for_log("heard 1048576"),
    )
    .await;
    let id = format!("default:tcp:{port}");
    w.tunnel
        .wait_tunnel("bytes counted", &id, |t| {
            t.bytes_in == 1 << 20 && t.bytes_out == greeting.len() as u64
        })
        .await;
    w.tunnel.stop().await;
}
