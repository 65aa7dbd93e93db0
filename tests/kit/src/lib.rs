//! porthole's test kit: what the end-to-end tests in `tests/` and both
//! benchmarks use to make containers and run the services in them.
//!
//! A "container" is a network namespace ([`Netns`]) with a veth pair to the
//! host: host side `198.18.X.1/30`, inside `198.18.X.2/30`, one /30 per
//! namespace so tests (in one process and across processes) run in parallel.
//! Real processes run inside it with `ip netns exec`: the services under test
//! ([`MonitorProc`], or [`Netns::spawn`] for anything else) and plain
//! listening sockets ([`Listener`]). Everything is torn down on drop, and the
//! logs of the processes a failed test started are printed.
//!
//! Synchronisation is by polling a condition with a deadline
//! ([`wait_until`], [`poll_until`]); nothing sleeps to "let things settle".

pub mod docker;
pub mod load;
pub mod measure;
mod sshd;
pub mod webdriver;

pub use measure::{crc32, XorShift};
use porthole::pb::v1::port_events_client::PortEventsClient;
pub use sshd::{argv, banner, have_openssh, ssh_children, ssh_master, Sshd, SSHD};
use std::collections::HashMap;
use std::fs::{self, File};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// How long anything in a test may take before it counts as hung.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// How often [`wait_until`] and friends look again.
pub const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------
// Root check

/// Whether this test can run: network namespaces need root. Without root it
/// prints that the test was skipped and returns `false`; with `CI` set it
/// panics instead, so CI never passes by skipping.
pub fn require_root() -> bool {
    if euid() == Some(0) {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string();
    skip_or_fail(&test, "needs root (network namespaces)");
    false
}

/// Prints `SKIPPED test: why`, or panics when env `CI` is set.
pub fn skip_or_fail(test: &str, why: &str) {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{test}: {why}; CI is set, so this is a failure, not a skip");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// The effective uid.
fn euid() -> Option<u32> {
    Some(rustix::process::geteuid().as_raw())
}

// ---------------------------------------------------------------------------
// Binaries under test

/// Path of a workspace binary (`monitor-svc`, `tunnel-svc`: each is the
/// binary of the package of the same name) in the same target directory and
/// profile as this test, built first (once per binary and test process) so
/// it is never stale.
///
/// Each binary is built on its own (`cargo build -p NAME --bin NAME`) so a
/// test of one service does not fail because the other does not compile.
/// `cargo test` releases its build lock before it runs tests, so this works
/// under `cargo test --workspace` too; `CARGO_TARGET_DIR` is inherited.
pub fn binary(name: &str) -> PathBuf {
    let dir = profile_dir();
    ensure_built(name, &dir);
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} does not exist after building it",
        path.display()
    );
    path
}

/// `target/<profile>/`: a test is `target/<profile>/deps/NAME-HASH`, a
/// benchmark `target/<profile>/examples/NAME`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("the executable has a directory");
    if dir
        .file_name()
        .is_some_and(|n| n == "deps" || n == "examples")
    {
        dir.parent().expect("it has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The cargo profile this executable was built with (`debug`, `release`).
pub fn profile_name() -> String {
    profile_dir()
        .file_name()
        .map_or("debug".into(), |n| n.to_string_lossy().into_owned())
}

/// The cargo target directory this executable was built in.
pub fn target_dir() -> PathBuf {
    let profile = profile_dir();
    profile.parent().unwrap_or(&profile).to_path_buf()
}

fn ensure_built(name: &str, profile_dir: &Path) {
    static BUILT: OnceLock<Mutex<HashMap<String, Result<(), String>>>> = OnceLock::new();
    // Held while building: one cargo at a time, and every test that needs
    // the binary waits for the one build.
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let result = built
        .entry(name.to_string())
        .or_insert_with(|| build(name, profile_dir));
    if let Err(e) = result {
        panic!("{e}");
    }
}

fn build(name: &str, profile_dir: &Path) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The helper lives in this kit; every other binary in its namesake package.
    let package = if name == HELPER {
        env!("CARGO_PKG_NAME")
    } else {
        name
    };
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "-p", package, "--bin", name]);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    let started = Instant::now();
    let out = match cmd.output() {
        Ok(out) => out,
        // No cargo here (a benchmark run under sudo): a built binary does.
        Err(e) if profile_dir.join(name).is_file() => {
            eprintln!("cannot run {cargo:?} ({e}); using the {name} already built");
            return Ok(());
        }
        Err(e) => return Err(format!("cannot run {cargo:?}: {e}")),
    };
    if !out.status.success() {
        return Err(format!(
            "`cargo build -p {package} --bin {name}` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    eprintln!("built {name} in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

// ---------------------------------------------------------------------------
// Network namespaces

/// Namespaces made by this process, for unique names.
static NEXT_NETNS: AtomicU32 = AtomicU32::new(0);

/// A network namespace standing in for a container, with a veth pair to the
/// host ([`porthole::netns::Namespace`]), and a directory for the logs of
/// the processes run in it. Dropping it kills every process inside and
/// deletes it.
pub struct Netns {
    ns: porthole::netns::Namespace,
    logs: PathBuf,
    next_log: AtomicU32,
}

impl Netns {
    /// Creates the namespace: `lo` up (127.0.0.1 and ::1), `eth0` inside
    /// with `198.18.X.2/30`, its host end with `198.18.X.1/30`.
    #[allow(clippy::new_without_default)] // Each call makes a namespace.
    pub fn new() -> Netns {
        let n = NEXT_NETNS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("ph-{pid}-{n}");
        let hint = pid.wrapping_mul(64).wrapping_add(n.wrapping_mul(7));
        let ns = porthole::netns::Namespace::create(&name, hint)
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        let logs = target_dir().join("tmp").join("porthole-e2e").join(&name);
        let _ = fs::remove_dir_all(&logs);
        fs::create_dir_all(&logs).expect("create the log directory");
        Netns {
            ns,
            logs,
            next_log: AtomicU32::new(0),
        }
    }

    pub fn name(&self) -> &str {
        self.ns.name()
    }

    /// Turns IPv6 off inside, as Docker leaves it on networks without
    /// IPv6: no `::1`, no IPv6 address, though IPv6 sockets still open and
    /// bind `::`.
    pub fn disable_ipv6(&self) {
        let mut cmd = self.command("sysctl");
        cmd.arg("-qw");
        for conf in ["all", "default", "lo", "eth0"] {
            cmd.arg(format!("net.ipv6.conf.{conf}.disable_ipv6=1"));
        }
        let out = cmd.output().expect("run sysctl");
        assert!(
            out.status.success(),
            "sysctl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The host end of the veth pair, `198.18.X.1`.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.ns.host_addr()
    }

    /// The namespace's own address, `198.18.X.2`, reachable from the host.
    pub fn addr(&self) -> Ipv4Addr {
        self.ns.addr()
    }

    /// The host end's interface, `ph<X>h`.
    pub fn host_link(&self) -> &str {
        self.ns.host_link()
    }

    /// Cuts the container's link on its side (nothing crosses, nothing is
    /// refused; the host keeps its route, see [`porthole::netns`]) or joins
    /// it again.
    pub fn set_link(&self, up: bool) {
        self.ns.set_link(up).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Where this namespace's process logs go.
    pub fn log_dir(&self) -> &Path {
        &self.logs
    }

    /// `ip netns exec NAME program`, to be completed by the caller.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.ns.command(program)
    }

    /// Starts `program args...` inside the namespace with stdout and stderr
    /// going to a log file (printed if the test fails). `ip netns exec`
    /// execs, so [`Proc::pid`] is the program's own pid.
    pub fn spawn<I, S>(&self, program: impl AsRef<std::ffi::OsStr>, args: I) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let label = Path::new(program.as_ref())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "proc".into());
        let mut cmd = self.command(program);
        cmd.args(args).stdin(Stdio::null());
        self.spawn_command(&label, cmd)
    }

    /// Starts a prepared command (from [`Netns::command`], or any host
    /// command whose log belongs with this namespace's) with stdout and
    /// stderr going to a log file.
    pub fn spawn_command(&self, label: &str, cmd: Command) -> Proc {
        Proc::start(label, cmd, self.new_log(label), false)
    }

    /// A fresh log file in [`Netns::log_dir`] for a process called `label`.
    pub fn new_log(&self, label: &str) -> PathBuf {
        let n = self.next_log.fetch_add(1, Ordering::Relaxed);
        self.logs.join(format!("{n:02}-{label}.log"))
    }

    /// Pids of every process inside the namespace.
    pub fn pids(&self) -> Vec<u32> {
        self.ns.pids()
    }

    /// Like [`Netns::spawn_command`], but stdin and stdout are piped to the
    /// caller; stderr goes to the log.
    pub fn spawn_piped(&self, label: &str, cmd: Command) -> Proc {
        Proc::start(label, cmd, self.new_log(label), true)
    }
}

impl Drop for Netns {
    /// The namespace (and everything in it) goes; its logs stay when the
    /// test is failing.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs of {} kept in {}", self.name(), self.logs.display());
        } else {
            let _ = fs::remove_dir_all(&self.logs);
        }
    }
}

/// Runs `ip ARGS...`; the error carries the command and its stderr.
/// Sends signal `sig` (`TERM`, `INT`, `KILL`, `STOP`, `CONT`) to `pid`;
/// whether it was delivered.
pub fn send_signal(pid: u32, sig: &str) -> bool {
    use rustix::process::{kill_process, Pid, Signal};
    let signal = match sig {
        "TERM" => Signal::TERM,
        "INT" => Signal::INT,
        "KILL" => Signal::KILL,
        "STOP" => Signal::STOP,
        "CONT" => Signal::CONT,
        "HUP" => Signal::HUP,
        other => panic!("unknown signal {other}"),
    };
    Pid::from_raw(pid as i32).is_some_and(|p| kill_process(p, signal).is_ok())
}

/// Resident memory of process `pid` in bytes (`VmRSS`).
pub fn rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU time (user + system) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    stat_ticks(pid, &[11, 12])
}

/// [`cpu_time`] plus that of its children it has reaped (socat's forks).
pub fn cpu_time_with_children(pid: u32) -> Duration {
    stat_ticks(pid, &[11, 12, 13, 14])
}

/// The sum of clock-tick fields of `/proc/PID/stat` (0-based after the
/// command name), as a duration.
fn stat_ticks(pid: u32, which: &[usize]) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = which
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    let hz = rustix::param::clock_ticks_per_second();
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

// ---------------------------------------------------------------------------
// Processes

/// A process started inside a namespace. Dropping it kills it (by its pid)
/// and waits for it; if the test is failing, its log is printed.
pub struct Proc {
    label: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stderr (and, unless `piped`, stdout) going to
    /// `log`; with `piped`, stdin and stdout are pipes to the caller
    /// ([`Proc::stdin`], [`Proc::stdout`]).
    pub fn start(label: &str, mut cmd: Command, log: PathBuf, piped: bool) -> Proc {
        let file =
            File::create(&log).unwrap_or_else(|e| panic!("create the log {}: {e}", log.display()));
        if piped {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        } else {
            cmd.stdout(file.try_clone().expect("clone the log file"));
        }
        cmd.stderr(file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label} ({cmd:?}): {e}"));
        Proc {
            label: label.to_string(),
            child,
            log,
        }
    }

    /// The pipe to its stdin (once; only when started piped).
    pub fn stdin(&mut self) -> std::process::ChildStdin {
        self.child
            .stdin
            .take()
            .expect("started piped, stdin not taken yet")
    }

    /// The pipe from its stdout (once; only when started piped).
    pub fn stdout(&mut self) -> std::process::ChildStdout {
        self.child
            .stdout
            .take()
            .expect("started piped, stdout not taken yet")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, sig: &str) {
        assert!(
            send_signal(self.pid(), sig),
            "kill -{sig} {} failed",
            self.pid()
        );
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits (polling, without blocking the runtime) until it exits; panics
    /// after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} (pid {}) did not exit within {timeout:?}",
                    self.label,
                    self.pid()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until its log contains `needle`; panics if it exits first or
    /// [`DEADLINE`] passes.
    pub async fn wait_for_log(&mut self, needle: &str) {
        let deadline = Instant::now() + DEADLINE;
        while !self.log().contains(needle) {
            if let Some(status) = self.try_wait() {
                panic!("{} exited ({status}):\n{}", self.label, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log {needle:?} within {DEADLINE:?}:\n{}",
                self.label,
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGTERM, then the exit status (panics if it takes over [`DEADLINE`]).
    pub async fn terminate(&mut self) -> ExitStatus {
        if let Some(status) = self.try_wait() {
            return status;
        }
        self.signal("TERM");
        self.wait_exit(DEADLINE).await
    }

    /// SIGKILL and reap: once this returns, every socket it held is closed.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything it wrote to its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn label(&self) -> &str {
        &self.label
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- log of {} (pid {}) -----\n{}----- end of log -----",
                self.label,
                self.pid(),
                self.log()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Listening sockets

/// The kit's helper program (`src/bin/porthole-helper.rs`): what runs in a
/// container as a listener, a server, or a set of echo ports.
pub const HELPER: &str = "porthole-helper";

pub use porthole::net::Proto;

/// A real process ([`HELPER`]) inside a namespace holding one listening socket:
/// a TCP socket in LISTEN or a bound UDP socket. Dropping it (or
/// [`Listener::close`]) kills it and waits, so the port is closed then.
pub struct Listener {
    proc: Proc,
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
}

impl Listener {
    /// Binds `proto` on `addr:port`. For IPv6 addresses `v6only` sets
    /// IPV6_V6ONLY (`None` leaves the system default). Returns once bound.
    pub fn start(
        ns: &Netns,
        proto: Proto,
        addr: &str,
        port: u16,
        v6only: Option<bool>,
    ) -> Listener {
        let ip: IpAddr = addr.parse().expect("listener address is an IP");
        let v6only = match v6only {
            None => "-",
            Some(true) => "1",
            Some(false) => "0",
        };
        let mut cmd = ns.command(binary(HELPER));
        cmd.args(["listen", proto.as_str(), addr, &port.to_string(), v6only]);
        let label = format!("listen-{}-{port}", proto.as_str());
        let mut proc = ns.spawn_piped(&label, cmd);
        let stdout = proc.stdout();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the listener never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        match rx.recv_timeout(DEADLINE) {
            Ok(line) if line.trim() == "ready" => {}
            got => {
                let status = proc.try_wait();
                panic!(
                    "listener {} {addr} port {port} in {} did not get ready ({got:?}, exit {status:?}):\n{}",
                    proto.as_str(),
                    ns.name(),
                    proc.log()
                );
            }
        }
        Listener {
            proc,
            proto,
            addr: ip,
            port,
        }
    }

    /// TCP on an IPv4 address (`0.0.0.0`, `127.0.0.1`, the namespace's own).
    pub fn tcp4(ns: &Netns, addr: &str, port: u16) -> Listener {
        Listener::start(ns, Proto::Tcp, addr, port, None)
    }

    /// TCP on an IPv6 address with IPV6_V6ONLY set.
    pub fn tcp6_only(ns: &Netns, addr: &str, port: u16) -> Listener {
        Listener::start(ns, Proto::Tcp, addr, port, Some(true))
    }

    /// TCP on `::` with IPV6_V6ONLY off: takes IPv4 too.
    pub fn tcp_dual(ns: &Netns, port: u16) -> Listener {
        Listener::start(ns, Proto::Tcp, "::", port, Some(false))
    }

    /// UDP bound to `addr` (IPv6 addresses get IPV6_V6ONLY set).
    pub fn udp(ns: &Netns, addr: &str, port: u16) -> Listener {
        let v6only = addr.contains(':').then_some(true);
        Listener::start(ns, Proto::Udp, addr, port, v6only)
    }

    /// The pid of the process holding the socket.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Closes the socket: kills the process and waits until it is gone.
    pub fn close(mut self) {
        self.proc.kill();
    }
}

/// `/proc/PID/comm` of a process (the name the monitor reports).
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// A server inside the container

/// [`HELPER`]'s `serve` inside a namespace: the first line of a connection
/// is a command (`ping`, `echo`, `source N`, `hold`; see the helper).
/// Dropping it (or [`Server::close`]) kills it, which closes its port.
pub struct Server {
    proc: Proc,
}

impl Server {
    /// Listens on `addr:port` (`::` is dual-stack) and answers `ping` with
    /// `pong LABEL`; returns once it listens.
    pub async fn start(ns: &Netns, addr: &str, port: u16, label: &str) -> Server {
        let mut cmd = ns.command(binary(HELPER));
        cmd.args(["serve", addr, &port.to_string(), label])
            .stdin(std::process::Stdio::null());
        let mut proc = ns.spawn_command(&format!("server-{port}"), cmd);
        proc.wait_for_log("ready").await;
        Server { proc }
    }

    /// A dual-stack server on every address of the namespace.
    pub async fn any(ns: &Netns, port: u16) -> Server {
        Server::start(ns, "::", port, "srv").await
    }

    /// A UDP server on `addr:port` that sends every datagram back to its
    /// sender; returns once it is bound.
    pub async fn udp_echo(ns: &Netns, addr: &str, port: u16) -> Server {
        let mut cmd = ns.command(binary(HELPER));
        cmd.args(["udp-echo", addr, &port.to_string()])
            .stdin(std::process::Stdio::null());
        let mut proc = ns.spawn_command(&format!("udp-echo-{port}"), cmd);
        proc.wait_for_log("ready").await;
        Server { proc }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Closes the port: kills the server and waits until it is gone.
    pub fn close(mut self) {
        self.proc.kill();
    }
}

// ---------------------------------------------------------------------------
// Clients that never read

/// What [`flood`] holds open: streams and responses nobody reads.
pub struct Flood {
    pub streams: Vec<tonic::Streaming<porthole::pb::v1::WatchEventsResponse>>,
    pub unread: Vec<tokio::net::TcpStream>,
    /// WatchEvents calls refused with RESOURCE_EXHAUSTED.
    pub refused: usize,
}

/// Opens `streams` WatchEvents streams (with `token`, so command lines are
/// included) on five connections whose windows the client never opens
/// again, and sends `gets` `GET /port-events` whose responses are never
/// read. Connections the monitor resets at once (over its limit) are
/// dropped, which is the point; any other refusal is an error.
pub async fn flood(
    addr: SocketAddr,
    token: Option<&porthole::auth::Token>,
    streams: usize,
    gets: usize,
) -> Result<Flood, String> {
    use porthole::pb::v1::WatchEventsRequest;
    let mut f = Flood {
        streams: Vec::new(),
        unread: Vec::new(),
        refused: 0,
    };
    for _ in 0..5 {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect()
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let mut c = PortEventsClient::new(porthole::auth::with_token(channel, token.cloned()));
        for _ in 0..streams / 5 {
            match within("WatchEvents", c.watch_events(WatchEventsRequest::default())).await {
                Ok(s) => f.streams.push(s.into_inner()),
                Err(s) if s.code() == tonic::Code::ResourceExhausted => f.refused += 1,
                Err(s) => return Err(format!("WatchEvents: {s}")),
            }
        }
    }
    let auth = token.map_or(String::new(), |t| {
        let value = t.header_value();
        format!("Authorization: {}\r\n", value.to_str().unwrap_or_default())
    });
    let request = format!("GET /port-events HTTP/1.1\r\nHost: flood\r\n{auth}\r\n");
    for _ in 0..gets {
        if let Ok(mut c) = tokio::net::TcpStream::connect(addr).await {
            let _ = c.write_all(request.as_bytes()).await;
            f.unread.push(c);
        }
    }
    Ok(f)
}

/// The largest RSS of `pid` seen while sampling every 50 ms for `span` (a
/// measuring window, not a synchronisation).
pub async fn peak_rss(pid: u32, span: Duration) -> u64 {
    let end = Instant::now() + span;
    let mut peak = 0;
    while Instant::now() < end {
        peak = peak.max(rss(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peak
}

/// [`HELPER`]'s `hold`: `count` listening ports at once (from `base`; 0:
/// any free ones) under a command line padded by `pad` bytes; each
/// [`PortHolder::churn`] closes the port the one before opened and opens
/// another.
pub struct PortHolder {
    proc: Proc,
    stdin: std::process::ChildStdin,
}

impl PortHolder {
    /// Starts it with `cmd` from [`PortHolder::command`] (in a namespace or
    /// on the host) and waits until every port listens.
    pub fn start(cmd: Command, log: PathBuf) -> PortHolder {
        let mut proc = Proc::start("hold", cmd, log, true);
        let stdin = proc.stdin();
        let mut ready = String::new();
        let _ = BufReader::new(proc.stdout()).read_line(&mut ready);
        assert_eq!(ready.trim(), "ready", "the port holder:\n{}", proc.log());
        PortHolder { proc, stdin }
    }

    /// `porthole-helper hold ADDR BASE COUNT --secret=xxx...` as run by
    /// `run` (`Command::new` on the host, or [`Netns::command`]).
    pub fn command(
        run: impl FnOnce(PathBuf) -> Command,
        addr: &str,
        base: u16,
        count: u16,
        pad: usize,
    ) -> Command {
        let mut cmd = run(binary(HELPER));
        let padding = format!("--secret={}", "x".repeat(pad));
        cmd.args([
            "hold",
            addr,
            &base.to_string(),
            &count.to_string(),
            &padding,
        ]);
        cmd
    }

    /// Closes the last churned port and opens another.
    pub fn churn(&mut self) {
        use std::io::Write;
        self.stdin
            .write_all(b"\n")
            .unwrap_or_else(|e| panic!("the port holder is gone ({e}):\n{}", self.proc.log()));
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// [`HELPER`]'s `ports` in a namespace: echo listeners opened and closed
/// on request, in one process (starting a process per port would be
/// measured too). Calls block until the helper answers.
pub struct EchoPorts {
    proc: Proc,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl EchoPorts {
    pub fn start(ns: &Netns) -> EchoPorts {
        let mut cmd = ns.command(binary(HELPER));
        cmd.arg("ports");
        let mut proc = ns.spawn_piped("ports", cmd);
        let (stdin, stdout) = (proc.stdin(), BufReader::new(proc.stdout()));
        let mut ports = EchoPorts {
            proc,
            stdin,
            stdout,
        };
        let first = ports.read_line();
        assert_eq!(first.as_deref(), Ok("ready"), "the ports helper");
        ports
    }

    fn read_line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => Err(format!("the ports helper exited:\n{}", self.proc.log())),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e) => Err(format!("reading from the ports helper: {e}")),
        }
    }

    fn call(&mut self, line: &str) -> Result<String, String> {
        use std::io::Write;
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("the ports helper is gone ({e}):\n{}", self.proc.log()))?;
        let answer = self.read_line()?;
        match answer.strip_prefix("ok") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => Err(format!("ports helper: {line}: {answer}")),
        }
    }

    /// Listens on `addr:port`; returns when `listen()` returned.
    pub fn open(&mut self, port: u16, addr: &str) -> Result<std::time::SystemTime, String> {
        let nanos: u64 = self
            .call(&format!("open {port} {addr}"))?
            .parse()
            .map_err(|_| "ports helper: a bad time".to_string())?;
        Ok(std::time::UNIX_EPOCH + Duration::from_nanos(nanos))
    }

    /// Closes the listener of `port` and its connections.
    pub fn close(&mut self, port: u16) -> Result<(), String> {
        self.call(&format!("close {port}")).map(drop)
    }
}

/// Pids of the live children of `parent`.
pub fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            ppid == Some(parent)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// monitor-svc

/// monitor-svc running inside a namespace, answering on
/// `http://198.18.X.2:PORT`.
/// Where and how [`MonitorProc::launch`] runs monitor-svc.
struct Launch<'a> {
    /// `--listen`, unless the caller's arguments say.
    listen: String,
    /// The address to reach it on when it listens on a wildcard.
    host: IpAddr,
    token_file: PathBuf,
    log: PathBuf,
    /// A command for the binary: in a namespace, or on the host.
    command: &'a dyn Fn(PathBuf) -> Command,
}

pub struct MonitorProc {
    proc: Proc,
    addr: SocketAddr,
    token: porthole::auth::Token,
    token_file: PathBuf,
}

/// A `PortEvents` client that sends the monitor's token (or none).
pub type MonitorClient = PortEventsClient<porthole::auth::AuthChannel>;

/// Writes `secret` to a new token file only its owner can read (a token
/// file others can read is refused).
pub fn write_token(path: &Path, secret: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    writeln!(f, "{secret}").expect("write the token");
}

/// Token files made by this process, for unique names.
static NEXT_TOKEN: AtomicU32 = AtomicU32::new(0);

impl MonitorProc {
    /// Starts monitor-svc in `ns` with `args`, plus `--listen 0.0.0.0:7070`,
    /// `--interval 50ms` and a `--token-file` of its own (a fresh token in
    /// the namespace's log directory) unless `args` sets them, and waits
    /// until it answers HTTP.
    pub async fn start(ns: &Netns, args: &[&str]) -> MonitorProc {
        let n = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        let launch = Launch {
            listen: "0.0.0.0:7070".into(),
            host: IpAddr::V4(ns.addr()),
            token_file: ns.log_dir().join(format!("monitor-{n}.token")),
            log: ns.new_log("monitor-svc"),
            command: &|bin| ns.command(bin),
        };
        MonitorProc::launch(launch, args).await
    }

    /// Starts monitor-svc on the host (no root needed) on `127.0.0.1` and
    /// a free port, otherwise as [`MonitorProc::start`]; its token and log
    /// go to `dir`.
    pub async fn on_host(dir: &Path, args: &[&str]) -> MonitorProc {
        fs::create_dir_all(dir).expect("create the monitor's directory");
        let launch = Launch {
            listen: format!("127.0.0.1:{}", unused_local_port()),
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            token_file: dir.join("monitor.token"),
            log: dir.join("monitor-svc.log"),
            command: &|bin| Command::new(bin),
        };
        MonitorProc::launch(launch, args).await
    }

    async fn launch(launch: Launch<'_>, args: &[&str]) -> MonitorProc {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let has = |flag: &str| {
            args.iter()
                .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
        };
        if !has("--listen") {
            all.extend(["--listen".into(), launch.listen.clone()]);
        }
        if !has("--interval") {
            all.extend(["--interval".into(), "50ms".into()]);
        }
        let token_file = match all.iter().position(|a| a == "--token-file") {
            Some(i) => PathBuf::from(&all[i + 1]),
            None => {
                let path = launch.token_file.clone();
                let _ = fs::remove_file(&path);
                porthole::auth::Token::load_or_create(&path).expect("a random token file");
                all.extend(["--token-file".into(), path.display().to_string()]);
                path
            }
        };
        let listen: SocketAddr = all
            .iter()
            .enumerate()
            .find_map(|(i, a)| match a.strip_prefix("--listen") {
                Some("") => all.get(i + 1).map(String::as_str),
                Some(rest) => rest.strip_prefix('='),
                None => None,
            })
            .and_then(|a| a.parse().ok())
            .expect("--listen is a socket address");
        let ip = if listen.ip().is_unspecified() {
            launch.host
        } else {
            listen.ip()
        };
        let addr = SocketAddr::new(ip, listen.port());
        let mut cmd = (launch.command)(binary("monitor-svc"));
        // Only the flags given here configure it, not the caller's env.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PORTHOLE_") {
                cmd.env_remove(key);
            }
        }
        cmd.args(&all)
            .stdin(Stdio::null())
            .env("NO_COLOR", "1")
            .env("PORTHOLE_LOG", "info,monitor_svc=debug");
        let mut proc = Proc::start("monitor-svc", cmd, launch.log, false);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = proc.try_wait() {
                panic!(
                    "monitor-svc {all:?} exited during start-up ({status}):\n{}",
                    proc.log()
                );
            }
            if http(addr, "GET", "/healthz", &[]).await.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "monitor-svc at {addr} did not answer within {DEADLINE:?}:\n{}",
                proc.log()
            );
            tokio::time::sleep(POLL).await;
        }
        let token = porthole::auth::Token::from_file(&token_file)
            .unwrap_or_else(|e| panic!("the monitor's token: {e}"));
        MonitorProc {
            proc,
            addr,
            token,
            token_file,
        }
    }

    /// The monitor's bearer token.
    pub fn token(&self) -> &porthole::auth::Token {
        &self.token
    }

    /// The file holding it.
    pub fn token_file(&self) -> &Path {
        &self.token_file
    }

    /// The tunnel-svc flag that hands it the token for `target` (every
    /// target when `None`).
    pub fn token_flag(&self, target: Option<&str>) -> [String; 2] {
        let path = self.token_file.display();
        let value = match target {
            Some(t) => format!("{t}={path}"),
            None => path.to_string(),
        };
        ["--monitor-token-file".into(), value]
    }

    /// Where it answers, e.g. `198.18.X.2:7070`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://198.18.X.2:7070`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// A connected gRPC channel (its own HTTP/2 connection). Wrap calls in
    /// [`within`] so a hang fails the test.
    pub async fn channel(&self) -> Channel {
        let endpoint = Channel::from_shared(self.url())
            .expect("valid url")
            .connect_timeout(DEADLINE);
        within("gRPC connect", endpoint.connect())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.url()))
    }

    /// A `PortEvents` client on a new connection that sends the token.
    pub async fn client(&self) -> MonitorClient {
        PortEventsClient::new(porthole::auth::with_token(
            self.channel().await,
            Some(self.token.clone()),
        ))
    }

    /// Waits until ListPorts shows a port `pred` accepts; panics after
    /// `timeout`.
    pub async fn wait_listed(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&porthole::pb::v1::Port) -> bool,
    ) {
        let client = self.client().await;
        poll_until(what, timeout, || {
            let (mut client, pred) = (client.clone(), &pred);
            async move {
                let ports = client
                    .list_ports(porthole::pb::v1::ListPortsRequest {})
                    .await
                    .ok()?
                    .into_inner()
                    .ports;
                ports.iter().any(pred).then_some(())
            }
        })
        .await
    }

    /// A `PortEvents` client without the token: what a neighbour gets.
    pub async fn anonymous_client(&self) -> MonitorClient {
        PortEventsClient::new(porthole::auth::with_token(self.channel().await, None))
    }

    /// SIGTERM to the monitor itself; returns its exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.proc.terminate().await
    }
}

// ---------------------------------------------------------------------------
// Waiting

/// Runs `fut`, panicking with `what` if it takes longer than [`DEADLINE`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {DEADLINE:?}: {what}"),
    }
}

/// Polls `cond` until it holds; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Async [`wait_for`].
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_until(what, timeout, || {
        let fut = cond();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `f` until it returns `Some`, and returns that; panics with `what`
/// after `timeout`.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(Some(v)) = tokio::time::timeout(remaining, f()).await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------
// Plain HTTP/1.1

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request (`Connection: close`), read to the end.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    http_request(addr, method, path, headers, b"").await
}

/// [`http`] with a body; a `Host` among `headers` replaces the address.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.push_str(&format!("Host: {addr}\r\n"));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if method != "GET" && method != "HEAD" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;
        stream.write_all(body).await?;
        // To the end, or to Content-Length: some servers (chromedriver)
        // keep the connection open whatever the request said.
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 << 10];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if complete(&raw) {
                break;
            }
        }
        parse_response(&raw)
    };
    tokio::time::timeout(DEADLINE, io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP request timed out"))?
}

/// [`http`] GET that must succeed at the transport level.
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http(addr, "GET", path, &[])
        .await
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// Whether `raw` holds a whole response with a `Content-Length`.
fn complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .is_some_and(|len| raw.len() >= split + 4 + len)
}

fn parse_response(raw: &[u8]) -> std::io::Result<HttpResponse> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("empty response"))?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8(body).map_err(|_| bad("body is not UTF-8"))?,
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

// ---------------------------------------------------------------------------
// Tools on PATH

/// Finds an executable on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

// ---------------------------------------------------------------------------
// tunnel-svc on the host

use porthole::pb::v1::tunnel_admin_client::TunnelAdminClient;
use porthole::pb::v1::{ListTunnelsRequest, Tunnel, TunnelState};

/// The real tunnel-svc binary (or `tunnel-svc gate ...`) running on the
/// host, where its tunnels listen, with its log kept among a namespace's
/// logs. Dropping it kills it (SIGKILL); [`TunnelProc::terminate`] stops it
/// the way a user does and returns the exit status.
pub struct TunnelProc {
    proc: Proc,
    admin: SocketAddr,
    token: Option<porthole::auth::Token>,
    channel: Channel,
    /// Its state directory: the admin token and host ports.
    state_dir: PathBuf,
}

impl TunnelProc {
    /// Starts `tunnel-svc ARGS...` plus, unless ARGS set them, `--admin
    /// 127.0.0.1:PORT` (a port nothing listens on), `--log-format json` and
    /// `--log-level info,tunnel_svc=debug`. Returns once the admin API
    /// answers `/healthz`. Every call made through [`TunnelProc::request`]
    /// carries the admin token: `--admin-token-file`/`--token-file F` in
    /// ARGS, else the one tunnel-svc made in its state directory.
    /// The caller's `PORTHOLE_*` variables are not passed on.
    pub async fn start(ns: &Netns, args: &[&str]) -> TunnelProc {
        TunnelProc::start_as(ns, None, args).await
    }

    /// [`TunnelProc::start`] as `user` (its state directory is the user's
    /// own), or as this process's user.
    pub async fn start_as(
        ns: &Netns,
        user: Option<&docker::Rootless>,
        args: &[&str],
    ) -> TunnelProc {
        TunnelProc::start_with_env(ns, user, args, &[]).await
    }

    /// [`TunnelProc::start_as`] with these environment variables set too.
    pub async fn start_with_env(
        ns: &Netns,
        user: Option<&docker::Rootless>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> TunnelProc {
        let flag = |name: &str| -> Option<String> {
            args.iter().enumerate().find_map(|(i, a)| {
                if *a == name {
                    args.get(i + 1).map(|v| v.to_string())
                } else {
                    a.strip_prefix(name)
                        .and_then(|rest| rest.strip_prefix('='))
                        .map(str::to_string)
                }
            })
        };
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let admin: SocketAddr = match flag("--admin") {
            Some(a) => a.parse().expect("--admin is a socket address"),
            None => {
                let a = SocketAddr::from((Ipv4Addr::LOCALHOST, unused_local_port()));
                all.extend(["--admin".into(), a.to_string()]);
                a
            }
        };
        if flag("--log-format").is_none() {
            all.extend(["--log-format".into(), "json".into()]);
        }
        if flag("--log-level").is_none() {
            all.extend(["--log-level".into(), "info,tunnel_svc=debug".into()]);
        }
        let token_file = flag("--admin-token-file").or_else(|| flag("--token-file"));
        let state_home = match user {
            Some(u) => u.home.join(".local/state"),
            None => ns.log_dir().to_path_buf(),
        };
        let mut cmd = match user {
            Some(u) => u.command(u.bin.join("tunnel-svc")),
            None => Command::new(binary("tunnel-svc")),
        };
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PORTHOLE_") {
                cmd.env_remove(key);
            }
        }
        // ssh backend sockets then always go to /tmp/porthole-PID.
        // Host ports remembered in the namespace's own directory: a test
        // sees only its own tunnel-svc's, across its restarts.
        cmd.args(&all)
            .stdin(Stdio::null())
            .env("NO_COLOR", "1")
            .env("XDG_STATE_HOME", &state_home)
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("TMPDIR")
            .envs(env.iter().copied());
        let mut proc = ns.spawn_command("tunnel-svc", cmd);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if http(admin, "GET", "/healthz", &[]).await.is_ok() {
                break;
            }
            if let Some(status) = proc.try_wait() {
                panic!(
                    "tunnel-svc {all:?} exited during start-up ({status}):\n{}",
                    proc.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tunnel-svc {all:?} did not answer on {admin} within {DEADLINE:?}:\n{}",
                proc.log()
            );
            tokio::time::sleep(POLL).await;
        }
        let state_dir = flag("--state-dir")
            .map(PathBuf::from)
            .unwrap_or_else(|| state_home.join("porthole"));
        let token_file = token_file
            .map(PathBuf::from)
            .unwrap_or_else(|| state_dir.join("admin.token"));
        let token = match user {
            // Another user's file: Token::from_file refuses it (rightly, for
            // a service); this test reads it as root.
            Some(_) => std::fs::read_to_string(&token_file)
                .map_err(|e| e.to_string())
                .and_then(|t| porthole::auth::Token::new(t.trim()).map_err(|e| e.to_string())),
            None => porthole::auth::Token::from_file(&token_file).map_err(|e| e.to_string()),
        }
        .unwrap_or_else(|e| panic!("tunnel-svc's admin token: {e}"));
        let channel = Channel::from_shared(format!("http://{admin}"))
            .expect("valid url")
            .connect_timeout(DEADLINE)
            .connect_lazy();
        TunnelProc {
            proc,
            admin,
            token: Some(token),
            channel,
            state_dir,
        }
    }

    /// `tunnel-svc --monitor URL --monitor-token-file TOKEN EXTRA...`:
    /// tunnel-svc following `monitor` (target `default`) with its token.
    pub async fn follow(ns: &Netns, monitor: &MonitorProc, extra: &[&str]) -> TunnelProc {
        let url = monitor.url();
        let token = monitor.token_flag(None);
        let mut args = vec!["--monitor", url.as_str()];
        args.extend(token.iter().map(String::as_str));
        args.extend_from_slice(extra);
        TunnelProc::start(ns, &args).await
    }

    /// Where the admin API answers.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The header that carries the admin token, as grpcurl's `-H` takes it.
    pub fn bearer_header(&self) -> String {
        let token = self.token.as_ref().expect("tunnel-svc has an admin token");
        format!("authorization: Bearer {}", token.secret())
    }

    /// `GET /metrics` of the admin API, with the token.
    pub async fn metrics(&self) -> HttpResponse {
        let token = self.token.as_ref().expect("tunnel-svc has an admin token");
        let bearer = format!("Bearer {}", token.secret());
        http(self.admin, "GET", "/metrics", &[("Authorization", &bearer)])
            .await
            .unwrap_or_else(|e| panic!("GET http://{}/metrics: {e}", self.admin))
    }

    /// `tunnel-svc ARGS... --admin ADMIN` as this tunnel-svc's user runs
    /// it: the same state directory, so it finds the admin token where
    /// tunnel-svc made it; no `PORTHOLE_*` from the test's environment.
    /// Its state directory (the admin token the CLI reads).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn cli(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(binary("tunnel-svc"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PORTHOLE_") {
                cmd.env_remove(key);
            }
        }
        cmd.args(args)
            .args(["--admin", &self.admin.to_string()])
            .env("NO_COLOR", "1")
            .env("PORTHOLE_STATE_DIR", &self.state_dir)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// A `TunnelAdmin` client on the shared connection. Calls need
    /// [`TunnelProc::request`] for the token, and [`within`] against hangs.
    pub fn client(&self) -> TunnelAdminClient<Channel> {
        TunnelAdminClient::new(self.channel.clone())
    }

    /// `msg` as a request carrying the token, if the service has one.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(token) = &self.token {
            token.authorize(&mut req);
        }
        req
    }

    /// ListTunnels (with the token), every page, or its error.
    pub async fn try_tunnels(&self) -> Result<Vec<Tunnel>, tonic::Status> {
        let mut client = self.client();
        let mut tunnels = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = self.request(ListTunnelsRequest {
                page_token,
                ..Default::default()
            });
            let page = within("ListTunnels", client.list_tunnels(req))
                .await?
                .into_inner();
            tunnels.extend(page.tunnels);
            if page.next_page_token.is_empty() {
                return Ok(tunnels);
            }
            page_token = page.next_page_token;
        }
    }

    /// ListTunnels, which must succeed.
    pub async fn tunnels(&self) -> Vec<Tunnel> {
        self.try_tunnels()
            .await
            .unwrap_or_else(|s| panic!("ListTunnels at {}: {s}", self.admin))
    }

    /// ListTargets, which must succeed.
    pub async fn targets(&self) -> Vec<porthole::pb::v1::Target> {
        let req = self.request(porthole::pb::v1::ListTargetsRequest {});
        self.client()
            .list_targets(req)
            .await
            .unwrap_or_else(|s| panic!("ListTargets at {}: {s}", self.admin))
            .into_inner()
            .targets
    }

    /// Waits until ListTargets shows a target `pred` accepts; panics after
    /// [`DEADLINE`].
    pub async fn wait_target(
        &self,
        what: &str,
        pred: impl Fn(&porthole::pb::v1::Target) -> bool,
    ) -> porthole::pb::v1::Target {
        poll_until(what, DEADLINE, || async {
            self.targets().await.into_iter().find(|t| pred(t))
        })
        .await
    }

    /// The tunnel `id`, if listed.
    pub async fn tunnel(&self, id: &str) -> Option<Tunnel> {
        self.tunnels().await.into_iter().find(|t| t.id == id)
    }

    /// Polls ListTunnels until tunnel `id` satisfies `pred`; returns it.
    /// The panic after [`DEADLINE`] shows the last listing.
    pub async fn wait_tunnel(
        &self,
        id: &str,
        what: &str,
        pred: impl Fn(&Tunnel) -> bool,
    ) -> Tunnel {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let tunnels = self.tunnels().await;
            if let Some(t) = tunnels.iter().find(|t| t.id == id && pred(t)) {
                return t.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {DEADLINE:?} waiting for {id}: {what}; last ListTunnels: {tunnels:#?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until tunnel `id` is ACTIVE.
    pub async fn wait_active(&self, id: &str) -> Tunnel {
        self.wait_tunnel(id, "ACTIVE", |t| t.state == TunnelState::Active as i32)
            .await
    }

    /// Waits until tunnel `id` is no longer listed.
    pub async fn wait_gone(&self, id: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let tunnels = self.tunnels().await;
            if !tunnels.iter().any(|t| t.id == id) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {DEADLINE:?} waiting for {id} to go; last ListTunnels: {tunnels:#?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGTERM; returns the exit status (panics if it takes over `timeout`).
    pub async fn terminate_within(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.proc.try_wait() {
            return status;
        }
        self.proc.signal("TERM");
        self.proc.wait_exit(timeout).await
    }

    /// SIGTERM; returns the exit status (panics if it takes over [`DEADLINE`]).
    pub async fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(DEADLINE).await
    }
}

/// Whether the host has `::1` (tunnel-svc leaves it out if not).
pub fn host_has_ipv6() -> bool {
    std::net::TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0)).is_ok()
}

/// Whether nothing listens on `port` of the host's 127.0.0.1 (and ::1, if
/// the host has it): both can be bound right now.
pub fn host_port_is_free(port: u16) -> bool {
    let v4 = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port));
    v4.is_ok()
        && (!host_has_ipv6()
            || std::net::TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, port)).is_ok())
}

/// A port of 127.0.0.1 nothing listens on right now (bound on port 0, read
/// and released), for an address that must be known before a process starts.
pub fn unused_local_port() -> u16 {
    // Never the same port twice in one process: a port handed out for a
    // container's server is not bound until its tunnel opens, and the
    // kernel may offer it again meanwhile (say, for tunnel-svc's --admin).
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Runs grpcurl with `args`; returns stdout, panicking with its output on
/// failure.
pub async fn grpcurl(bin: &Path, args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args).kill_on_drop(true);
    let out = within(&format!("grpcurl {args:?}"), cmd.output())
        .await
        .expect("run grpcurl");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}
