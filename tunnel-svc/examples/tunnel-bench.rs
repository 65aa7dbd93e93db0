//! Benchmark for tunnel-svc: how soon a port that starts listening in a
//! "container" is usable on the host, per backend, and single-stream
//! throughput through each backend beside the relays it replaces (socat,
//! `ssh -L`).
//!
//! ```text
//! cargo build --release -p tunnel-svc --example tunnel-bench
//! sudo ./target/release/examples/tunnel-bench
//! sudo ./target/release/examples/tunnel-bench --throughput-only direct   # one row, quickly
//! ```
//!
//! `--throughput-only` leaves out the latency, connection and forward
//! set-up parts; naming backends (`grpc`, `ssh`, `direct`) measures only
//! those (the baselines always run: the ratios need them).
//!
//! Needs root (the container is a network namespace) and `ip`; the
//! throughput and forward set-up parts also use `iperf3`, `socat` and
//! OpenSSH (`ssh`, `ssh-keygen`, `/usr/sbin/sshd`) and say so when one is
//! missing. The namespace, the real `monitor-svc` (inside), `tunnel-svc`
//! (on the host), sshd and the echo ports come from `porthole-testkit`, the
//! end-to-end tests' kit; the binaries are built into this example's
//! target directory first when cargo is at hand.
//!
//! Traffic goes only to loopback and to the namespace the bench creates (one
//! /30 of 198.18.0.0/15). Every process it starts is stopped by its pid, and
//! the namespace deleted, on exit, on error and on Ctrl-C. Every part is
//! bounded in count and time (the whole run took 5–8 minutes on a 2-core
//! machine; `--throughput-only` about 3). Progress goes to stderr; stdout is a
//! markdown report, printed once everything is measured.
#![forbid(unsafe_code)]

use anyhow::{anyhow, bail, ensure, Context};
use porthole::pb::v1::{
    watch_events_response::Kind as Watched, EventType, Protocol, TunnelState, WatchEventsRequest,
};
use porthole_testkit::measure::{ms, nproc, Stats, XorShift};
use porthole_testkit::{
    children, comm, cpu_time_with_children, which, EchoPorts, MonitorProc, Netns, Proc, Sshd,
    TunnelProc, DEADLINE, SSHD,
};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, ExitCode, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Ports opened (and closed) one at a time per backend for the latency
/// measurement, after one warm-up port.
const LATENCY_PORTS: usize = 100;
/// Upper bound of the random pause before each opening.
const MAX_GAP_MS: u64 = 100;
/// How often the host tries a port that should become usable.
const POLL: Duration = Duration::from_millis(1);
/// How long one port may take to become usable before it counts as failed.
const PORT_DEADLINE: Duration = Duration::from_secs(5);
/// Wall-clock budget of one backend's latency run; past it the run stops
/// early and the report says so.
const LATENCY_BUDGET: Duration = Duration::from_secs(40);
/// Length of each iperf3 run.
const IPERF_SECS: u64 = 3;
/// iperf3 runs per path and direction; the best counts.
const IPERF_RUNS: usize = 2;
/// Sequential connect–echo–close cycles per path, and their time budget.
const SHORT_CONNECTIONS: usize = 10_000;
const SHORT_BUDGET: Duration = Duration::from_secs(20);
/// Concurrent connections, each moving this much each way.
const CONCURRENT: usize = 1_000;
const CONCURRENT_BYTES: usize = 1 << 20;
/// Kept-alive connections, and request/response round trips on each.
const KEPT_ALIVE: usize = 100;
const EXCHANGES: usize = 100;
/// Idle connections held open to measure what one costs.
const IDLE: usize = 1_000;
/// socat's `-b` for the second socat row (its default is 8 KiB).
const SOCAT_BLOCK: usize = 128 * 1024;
/// Trials per forward set-up method.
const FORWARD_TRIALS: usize = 10;
/// The cipher of the second `ssh -L` row: what tunnel-svc's ssh master
/// puts first when the CPU has AES instructions and nobody chose ciphers.
const SAME_CIPHER: &str = "aes128-gcm@openssh.com";
/// Ports that stay out of tunnel-svc's automatic tunnels: the namespace's sshd.
const SKIP: &str = "22";

/// What the command line asked for.
struct Scope {
    throughput_only: bool,
    /// Backend names to measure; empty: all.
    backends: Vec<String>,
}

impl Scope {
    fn from_args() -> Result<Scope, String> {
        let mut scope = Scope {
            throughput_only: false,
            backends: Vec::new(),
        };
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--throughput-only" => scope.throughput_only = true,
                "grpc" | "ssh" | "direct" => scope.backends.push(arg),
                other => {
                    return Err(format!(
                        "unknown argument {other:?}; usage: tunnel-bench [--throughput-only] [grpc|ssh|direct]..."
                    ))
                }
            }
        }
        Ok(scope)
    }

    fn wants(&self, kind: Kind) -> bool {
        self.backends.is_empty() || self.backends.iter().any(|b| b == kind.name())
    }
}

/// What a part left out by `--throughput-only` reports.
fn skipped<T>() -> Result<T, String> {
    Err("skipped (--throughput-only)".to_string())
}

static SCOPE: std::sync::OnceLock<Scope> = std::sync::OnceLock::new();

fn scope() -> &'static Scope {
    SCOPE.get().expect("set in main")
}

fn main() -> ExitCode {
    match Scope::from_args() {
        Ok(s) => {
            let _ = SCOPE.set(s);
        }
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    }
    // Thousands of connections at once.
    porthole::net::raise_fd_limit();
    if !rustix::process::geteuid().is_root() {
        eprintln!(
            "bench: needs root (it creates a network namespace as the container); run it as\n  \
             sudo {}",
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "target/release/examples/tunnel-bench".into())
        );
        return ExitCode::from(1);
    }
    // One worker besides the main thread: while a guard's Drop blocks the
    // main thread, the worker still drives the gRPC connections, so
    // monitor-svc can drain them and exit on SIGTERM.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // Dropping `run` on a signal drops its guards: processes are stopped
    // and the namespace deleted before the bench exits.
    let result = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            r = run() => r,
            _ = int.recv() => Err(anyhow!("interrupted (SIGINT); cleaned up")),
            _ = term.recv() => Err(anyhow!("terminated (SIGTERM); cleaned up")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let machine = Machine::read();
    let mut results = measure(&machine.tools).await?;
    report(&machine, &mut results);
    println!();
    println!(
        "whole run {:.1} s; load average at the end {}",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    results.monitor_exit
}

/// The backends, in the order they are measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Grpc,
    /// grpc with `--no-raw-relay`: every connection in a Relay stream.
    GrpcStreams,
    Ssh,
    Direct,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Grpc | Kind::GrpcStreams => "grpc",
            Kind::Ssh => "ssh",
            Kind::Direct => "direct",
        }
    }

    /// The row name: the flags that make it.
    fn label(self) -> &'static str {
        match self {
            Kind::Grpc => "`--backend grpc`",
            Kind::GrpcStreams => "`--backend grpc --no-raw-relay` (Relay streams only)",
            Kind::Ssh => "`--backend ssh`",
            Kind::Direct => "`--backend direct`",
        }
    }

    /// The throughput goal: a ratio to another row of the same run.
    fn goal(self) -> &'static str {
        match self {
            Kind::Grpc => "≥ 1.0× socat -b",
            Kind::GrpcStreams => "(the grpc path before the raw relay)",
            Kind::Ssh => "≥ 1.0× ssh -L",
            Kind::Direct => "≥ 0.75× no relay",
        }
    }

    /// Where the latency listeners bind inside: direct reaches only servers
    /// bound beyond loopback, the other two reach loopback-only ones.
    fn bind(self) -> &'static str {
        match self {
            Kind::Direct => "0.0.0.0",
            _ => "127.0.0.1",
        }
    }
}

/// Everything one run measures, for [`report`].
struct Results {
    container: String,
    latency: Vec<(Kind, Result<Latency, String>, String)>,
    throughput: Vec<(String, Result<Both, String>, &'static str)>,
    workloads: Vec<(String, Result<Work, String>)>,
    forward: [Result<Vec<Duration>, String>; 2],
    monitor_exit: anyhow::Result<()>,
}

/// Runs every measurement; prints only progress (stderr).
async fn measure(tools: &Tools) -> anyhow::Result<Results> {
    let plan = PortPlan::find()?;
    let ns = Netns::new();
    eprintln!(
        "namespace {} at {} (host end {}); logs in {}",
        ns.name(),
        ns.addr(),
        ns.host_addr(),
        ns.log_dir().display()
    );
    let monitor = Monitor::start(&ns).await?;
    let helper = EchoPorts::start(&ns);
    let sshd = if tools.openssh.is_empty() {
        Ok(Sshd::start(&ns, ns.addr().into(), 22).await)
    } else {
        Err(format!("OpenSSH missing: {}", tools.openssh.join(", ")))
    };
    let container = format!(
        "network namespace `{}`, {} inside, {} on the host end",
        ns.name(),
        ns.addr(),
        ns.host_addr()
    );
    let mut lab = Lab {
        helper,
        sshd,
        monitor,
        ns,
        rng: XorShift::seeded(),
    };

    // --- Baselines, before any tunnel-svc runs ------------------------------
    let mut throughput: Vec<(String, Result<Both, String>, &str)> = Vec::new();
    let [p_direct, p_socat, p_socat_big, p_ssh, p_ssh_gcm, p_grpc_t, p_streams_t, p_ssh_t, p_direct_t] =
        plan.iperf;
    let [w_direct, w_socat, w_ssh_l, w_grpc, w_streams, w_ssh, w_direct_t] = plan.work;
    let mut workloads: Vec<(String, Result<Work, String>)> = Vec::new();
    if !scope().throughput_only {
        eprintln!("connections: direct, no relay");
        let direct_addr = SocketAddr::new(lab.ns.addr().into(), w_direct);
        workloads.push((
            "direct, no relay".into(),
            lab.workloads(w_direct, direct_addr, &[], None)
                .await
                .map_err(|e| format!("{e:#}")),
        ));
        eprintln!("connections: socat -b {SOCAT_BLOCK}");
        workloads.push((
            format!("socat `-b {SOCAT_BLOCK}`"),
            lab.socat_workloads(w_socat)
                .await
                .map_err(|e| format!("{e:#}")),
        ));
        eprintln!("connections: ssh -L");
        workloads.push((
            format!("`ssh -L -o Ciphers={SAME_CIPHER}`"),
            match &lab.sshd {
                Err(e) => Err(e.clone()),
                Ok(_) => lab
                    .ssh_l_workloads(w_ssh_l)
                    .await
                    .map_err(|e| format!("{e:#}")),
            },
        ));
    }
    let have_iperf = tools.iperf3_version.starts_with("iperf");
    let no_iperf = || Err("iperf3 missing (apt-get install -y iperf3)".to_string());
    eprintln!("throughput: loopback, no namespace");
    throughput.push((
        "host loopback, no namespace (calibration)".into(),
        if have_iperf {
            lab.baseline_loopback().await.map_err(|e| format!("{e:#}"))
        } else {
            no_iperf()
        },
        "27–33 Gbit/s (\"the physical limit here\")",
    ));
    eprintln!("throughput: direct, no relay");
    throughput.push((
        "direct, no relay (host → container address)".into(),
        if have_iperf {
            lab.baseline_direct(p_direct)
                .await
                .map_err(|e| format!("{e:#}"))
        } else {
            no_iperf()
        },
        "27–33 Gbit/s",
    ));
    eprintln!("throughput: socat relay");
    throughput.push((
        "socat relay on the host (`TCP-LISTEN,fork` → container address; default 8 KiB buffer)"
            .into(),
        match (have_iperf, tools.socat_version.contains("version")) {
            (false, _) => no_iperf(),
            (_, false) => Err("socat missing (apt-get install -y socat)".into()),
            _ => lab
                .baseline_socat(p_socat, None)
                .await
                .map_err(|e| format!("{e:#}")),
        },
        "7.8–8.3 Gbit/s",
    ));
    eprintln!("throughput: socat -b {SOCAT_BLOCK}");
    throughput.push((
        format!("socat `-b {SOCAT_BLOCK}` (larger relay buffer)"),
        match (have_iperf, tools.socat_version.contains("version")) {
            (false, _) => no_iperf(),
            (_, false) => Err("socat missing (apt-get install -y socat)".into()),
            _ => lab
                .baseline_socat(p_socat_big, Some(SOCAT_BLOCK))
                .await
                .map_err(|e| format!("{e:#}")),
        },
        "",
    ));
    eprintln!("throughput: ssh -L");
    throughput.push((
        "`ssh -L` (a plain OpenSSH forward)".into(),
        match (&lab.sshd, have_iperf) {
            (Err(e), _) => Err(e.clone()),
            (_, false) => no_iperf(),
            _ => lab
                .baseline_ssh(p_ssh, None)
                .await
                .map_err(|e| format!("{e:#}")),
        },
        "5.8–6.2 Gbit/s",
    ));
    eprintln!("throughput: ssh -L -o Ciphers={SAME_CIPHER}");
    throughput.push((
        format!("`ssh -L -o Ciphers={SAME_CIPHER}` (the cipher tunnel-svc's master prefers on a CPU with AES)"),
        match (&lab.sshd, have_iperf) {
            (Err(e), _) => Err(e.clone()),
            (_, false) => no_iperf(),
            _ => lab
                .baseline_ssh(p_ssh_gcm, Some(SAME_CIPHER))
                .await
                .map_err(|e| format!("{e:#}")),
        },
        "",
    ));
    eprintln!("forward set-up: ControlMaster -O forward vs new ssh -L");
    let forward = match &lab.sshd {
        _ if scope().throughput_only => [skipped(), skipped()],
        Err(e) => [Err(e.clone()), Err(e.clone())],
        Ok(_) => lab.forward_setup(plan.forward).await,
    };

    // --- tunnel-svc, one instance per backend -------------------------------
    let mut latency = Vec::new();
    for (kind, ports, iperf_port, work_port) in [
        (Kind::Grpc, &plan.latency[0][..], p_grpc_t, w_grpc),
        (Kind::GrpcStreams, &[][..], p_streams_t, w_streams),
        (Kind::Ssh, &plan.latency[1][..], p_ssh_t, w_ssh),
        (Kind::Direct, &plan.latency[2][..], p_direct_t, w_direct_t),
    ] {
        if !scope().wants(kind) {
            continue;
        }
        let (lat, thr, work, note) = if kind == Kind::Ssh && lab.sshd.is_err() {
            let e = lab.sshd.as_ref().err().cloned().unwrap_or_default();
            (Err(e.clone()), Err(e.clone()), Err(e), String::new())
        } else {
            lab.backend(kind, ports, have_iperf.then_some(iperf_port), work_port)
                .await
        };
        if let Err(e) = &lat {
            eprintln!("{} backend: latency not measured: {e}", kind.label());
        }
        if !ports.is_empty() && !scope().throughput_only {
            latency.push((kind, lat, note));
        }
        throughput.push((format!("tunnel-svc {}", kind.label()), thr, kind.goal()));
        if !scope().throughput_only {
            workloads.push((format!("tunnel-svc {}", kind.label()), work));
        }
    }

    let status = lab.monitor.proc.terminate().await;
    let monitor_exit = if status.success() {
        Ok(())
    } else {
        Err(anyhow!("monitor-svc exited with {status} after SIGTERM"))
    };
    Ok(Results {
        container,
        latency,
        throughput,
        workloads,
        forward,
        monitor_exit,
    })
}

/// What the report's first table shows about this machine and its tools.
struct Machine {
    tools: Tools,
    cpu: String,
    kernel: String,
    load: String,
}

impl Machine {
    fn read() -> Machine {
        Machine {
            tools: Tools::find(),
            cpu: cpu_model(),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            load: loadavg(),
        }
    }
}

/// Prints the markdown report of one run (stdout).
fn report(machine: &Machine, r: &mut Results) {
    let tools = &machine.tools;
    println!("## tunnel-svc benchmark\n");
    println!("| machine | |");
    println!("| --- | --- |");
    println!("| cores (`nproc`) | {} |", nproc());
    println!("| CPU | {} |", machine.cpu);
    println!("| kernel | {} |", machine.kernel);
    println!("| load average at the start | {} |", machine.load);
    println!("| `ssh -V` | {} |", tools.ssh_version);
    println!("| `iperf3 --version` | {} |", tools.iperf3_version);
    println!("| `socat -V` | {} |", tools.socat_version);
    println!("| container | {} |", r.container);
    println!();
    println!(
        "### Listen → usable on the host ({LATENCY_PORTS} ports per backend, one at a time, random 0–{MAX_GAP_MS} ms apart)\n"
    );
    println!(
        "From `listen()` inside the namespace (the helper's clock right after it returned) to the first \
         1-byte echo through `127.0.0.1:PORT` on the host, tried every {} ms. monitor-svc at its default \
         interval (100 ms); tunnel-svc with `--skip {SKIP} --max-tunnels 1000`. One warm-up port first \
         (it also pays for the first HTTP/2 connection or ssh master), not in the percentiles. \
         \"After the event\": from the monitor's `opened` event reaching the host (on the bench's own \
         WatchEvents stream) to usable, i.e. tunnel-svc's share; the rest is detection (the scan interval). \
         \"Probes dropped\": probe connections tunnel-svc accepted but could not carry (its \
         `connection failed` log lines), i.e. a client that came too early got a reset instead of a wait.\n",
        POLL.as_millis()
    );
    println!("| backend | server bound to | n | warm-up | p50 | p90 | p99 | max | after the event: p50 / p99 / max | probes dropped | failed | tunnel-svc exit |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    let mut failures = Vec::new();
    for (kind, result, note) in &mut r.latency {
        match result {
            Ok(l) => {
                let s = Stats::of(&mut l.samples);
                let e = Stats::of(&mut l.after_event);
                println!(
                    "| {} | `{}` | {}{} | {} | {} | {} | {} | {} | {} / {} / {} (n {}) | {} | {} | {note} |",
                    kind.name(),
                    kind.bind(),
                    l.samples.len(),
                    if l.stopped_early { " (budget hit)" } else { "" },
                    ms(l.warmup),
                    ms(s.p50),
                    ms(s.p90),
                    ms(s.p99),
                    ms(s.max),
                    ms(e.p50),
                    ms(e.p99),
                    ms(e.max),
                    l.after_event.len(),
                    l.dropped,
                    l.failures.len()
                );
                for f in l.failures.iter().take(3) {
                    failures.push(format!("{}: {f}", kind.name()));
                }
            }
            Err(e) => println!(
                "| {} | `{}` | not measured: {} | | | | | | | | | {note} |",
                kind.name(),
                kind.bind(),
                one_line(e)
            ),
        }
    }
    println!(
        "| original design (`ss` every 5 s, host polls every 10 s) | | | | | | | up to 15 s | | | | |"
    );
    for f in &failures {
        println!("\n- failed: {}", one_line(f));
    }

    println!();
    println!(
        "### Single-stream throughput (iperf3, one TCP stream, best of {IPERF_RUNS} × {IPERF_SECS} s per direction, receiver's bits/s)\n"
    );
    println!(
        "Relay CPU: utime+stime (and reaped children) over the run, in % of one core, of the processes \
         that carry the bytes — socat; `ssh` + the namespace's `sshd` processes; tunnel-svc (+ monitor-svc \
         for grpc, + its ssh master and `sshd` for ssh), with tunnel-svc's own share in brackets; per \
         Gbit/s it is what a Gbit/s costs. iperf3 \
         itself uses the rest of the {} cores. → is host → container (the iperf3 client on the host \
         sends), ← is `iperf3 -R` (the server inside sends). \"× goal path\" compares a tunnel-svc row \
         with the row its goal names, in this run.\n",
        nproc()
    );
    println!("| path | → Gbit/s | ← Gbit/s | × goal path → / ← | goal | relay CPU → / ← | CPU % per Gbit/s → / ← |");
    println!("| --- | ---: | ---: | ---: | --- | ---: | ---: |");
    let gbits_of = |prefix: &str| {
        r.throughput
            .iter()
            .find(|(p, _, _)| p.starts_with(prefix))
            .and_then(|(_, r, _)| r.as_ref().ok().map(|[up, down]| [up.gbits, down.gbits]))
    };
    let cpu = |m: &Measured, path: &str| match (m.cpu, m.first) {
        (Some(c), Some(own)) if path.starts_with("tunnel-svc") => {
            format!("{c:.0} % (tunnel-svc {own:.0} %)")
        }
        (Some(c), _) => format!("{c:.0} %"),
        (None, _) => "—".into(),
    };
    let per_gbit = |m: &Measured| m.cpu.map_or("—".into(), |c| format!("{:.0}", c / m.gbits));
    for (path, result, goal) in &r.throughput {
        let against = if goal.contains("socat -b") {
            gbits_of("socat `-b")
        } else if goal.contains("ssh -L") {
            gbits_of("`ssh -L` (")
        } else if goal.contains("no relay") {
            gbits_of("direct, no relay")
        } else {
            None
        };
        // The ssh rows also against ssh -L with the master's cipher: what
        // the extra hop in front of ssh costs.
        let same_cipher = goal
            .contains("ssh -L")
            .then(|| gbits_of("`ssh -L -o Ciphers"))
            .flatten();
        let ratio = |[gu, gd]: [f64; 2], up: &Measured, down: &Measured| {
            format!("{:.2}× / {:.2}×", up.gbits / gu, down.gbits / gd)
        };
        match result {
            Ok([up, down]) => println!(
                "| {path} | {:.2} | {:.2} | {}{} | {goal} | {} / {} | {} / {} |",
                up.gbits,
                down.gbits,
                against.map_or("".into(), |g| ratio(g, up, down)),
                same_cipher.map_or("".into(), |g| format!(
                    " (same cipher: {})",
                    ratio(g, up, down)
                )),
                cpu(up, path),
                cpu(down, path),
                per_gbit(up),
                per_gbit(down),
            ),
            Err(e) => println!(
                "| {path} | not measured: {} | | | {goal} | | |",
                one_line(e)
            ),
        }
    }

    println!();
    println!("### Connections\n");
    println!(
        "Against an echo server inside, per path: {SHORT_CONNECTIONS} connect–1-byte echo–close cycles one \
         after another ({}s budget; connections/s and connect-to-first-byte); {CONCURRENT} concurrent \
         connections each sending {} MiB and reading it back (payload each way per second; not through \
         socat, which forks a process per connection); {KEPT_ALIVE} kept-alive connections × {EXCHANGES} \
         64-byte request/response round trips; \
         {IDLE} idle connections held open, and what one costs the relay processes (tunnel-svc, + the \
         monitor for grpc, + the ssh master for ssh; the `ssh` process for `ssh -L`), whose fds and RSS are shown before the workloads \
         and once they are all done.\n",
        SHORT_BUDGET.as_secs(),
        CONCURRENT_BYTES >> 20
    );
    println!("| path | short: conn/s | first byte p50 / p99 | failed | {CONCURRENT} × {} MiB: Gbit/s (s) | failed | kept-alive: round trips/s | relay fds, RSS: before → after all | per idle connection: fds, RSS |", CONCURRENT_BYTES >> 20);
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |");
    for (path, work) in &mut r.workloads {
        let w = match work {
            Ok(w) => w,
            Err(e) => {
                println!("| {path} | not measured: {} | | | | | | | |", one_line(e));
                continue;
            }
        };
        let pick = |q: f64| {
            let v = &w.short.first_byte;
            v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
                .map_or("—".into(), |d| ms(*d))
        };
        let (conc, conc_failed) = w.concurrent.as_ref().map_or(("—".into(), "—".into()), |c| {
            (
                format!("{:.2} ({:.1} s)", c.gbits, c.took.as_secs_f64()),
                match &c.first_error {
                    None => "0".into(),
                    Some(why) => format!("{} ({})", c.failed, one_line(why)),
                },
            )
        });
        let around = w.start_end.map_or("—".into(), |((f0, r0), (f1, r1))| {
            format!(
                "{f0} → {f1} fds, {:.1} → {:.1} MiB",
                r0 as f64 / 1048576.0,
                r1 as f64 / 1048576.0
            )
        });
        let idle = w.idle.map_or("—".into(), |(fds, rss, held, failed)| {
            format!(
                "{fds:.1}, {:.1} KiB{}",
                rss / 1024.0,
                if failed > 0 {
                    format!(" (**only {held} could be opened**)")
                } else {
                    String::new()
                }
            )
        });
        println!(
            "| {path} | {:.0} | {} / {} | {} | {conc} | {conc_failed} | {:.0}{} | {around} | {idle} |",
            w.short.per_second,
            pick(0.5),
            pick(0.99),
            w.short.failed,
            w.kept.exchanges as f64 / w.kept.took.as_secs_f64(),
            if w.kept.failed > 0 {
                format!(" ({} connections failed)", w.kept.failed)
            } else {
                String::new()
            },
        );
    }

    println!();
    println!(
        "### Forward set-up ({FORWARD_TRIALS} trials each, against the namespace's sshd; usable = a 1-byte echo through the new port)\n"
    );
    println!("| method | n | p50 | p90 | max | DESIGN.md |");
    println!("| --- | ---: | ---: | ---: | ---: | --- |");
    let [master, fresh] = &mut r.forward;
    for (name, result, target) in [
        (
            "ControlMaster `ssh -O forward -L` (master already up)",
            master,
            "~4–6 ms",
        ),
        (
            "new `ssh -N -L` process (connect, key exchange, auth, forward)",
            fresh,
            "~130 ms",
        ),
    ] {
        match result {
            Ok(samples) => {
                let s = Stats::of(samples);
                println!(
                    "| {name} | {} | {} | {} | {} | {target} |",
                    samples.len(),
                    ms(s.p50),
                    ms(s.p90),
                    ms(s.max)
                );
            }
            Err(e) => println!(
                "| {name} | not measured: {} | | | | {target} |",
                one_line(e)
            ),
        }
    }
}

// --- The lab: namespace, monitor, helper, sshd --------------------------------

/// Everything the measurements share. Fields drop in order: processes
/// first, the namespace (which kills whatever is left inside) last.
struct Lab {
    helper: EchoPorts,
    sshd: Result<Sshd, String>,
    monitor: Monitor,
    ns: Netns,
    rng: XorShift,
}

struct Latency {
    samples: Vec<Duration>,
    /// From the monitor's `opened` event reaching the host (the bench's
    /// own WatchEvents stream) to the port being usable: tunnel-svc's share.
    after_event: Vec<Duration>,
    warmup: Duration,
    failures: Vec<String>,
    stopped_early: bool,
    /// Host connections tunnel-svc accepted but could not carry (its
    /// "connection failed" log lines) during the run: probes that got in
    /// before the tunnel could reach the port.
    dropped: usize,
}

/// The workloads themselves (see [`Lab::workloads`]).
async fn run_workloads(
    port: u16,
    addr: SocketAddr,
    pids: &[u32],
    tunnel: Option<&TunnelSvc>,
) -> Work {
    use porthole_testkit::load;
    let footprint = || {
        let fds: usize = pids.iter().map(|p| load::fds(*p)).sum();
        let rss: u64 = pids.iter().map(|p| porthole_testkit::rss(*p)).sum();
        (fds, rss)
    };
    // Until the tunnel carries `n` connections (none: at once).
    let settled = |n: u64| async move {
        if let Some(t) = tunnel {
            let id = TunnelSvc::id(port);
            let deadline = Instant::now() + DEADLINE;
            while Instant::now() < deadline {
                if t.0
                    .tunnel(&id)
                    .await
                    .is_some_and(|t| t.active_connections == n)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let start = footprint();
    let short = load::short_connections(addr, SHORT_CONNECTIONS, SHORT_BUDGET).await;
    settled(0).await;
    let concurrent = if pids.is_empty() && tunnel.is_none() && addr.ip().is_loopback() {
        None
    } else {
        Some(load::concurrent(addr, CONCURRENT, CONCURRENT_BYTES, Duration::from_secs(60)).await)
    };
    settled(0).await;
    let kept = load::kept_alive(addr, KEPT_ALIVE, EXCHANGES).await;
    settled(0).await;
    let after = footprint();
    let (held, idle_failed) = if pids.is_empty() {
        // Nothing to weigh (and socat would fork a process each).
        (Vec::new(), 0)
    } else {
        load::idle(addr, IDLE).await
    };
    settled(held.len() as u64).await;
    let holding = footprint();
    let n = held.len().max(1);
    drop(held);
    settled(0).await;
    // Freed memory is handed back within a couple of seconds (both
    // services trim after connections end): take RSS once it stops
    // falling.
    let mut end = footprint();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = footprint();
        let falling = now.1 < end.1;
        end = now;
        if !falling {
            break;
        }
    }
    Work {
        short,
        concurrent,
        kept,
        start_end: (!pids.is_empty()).then_some((start, end)),
        idle: (!pids.is_empty()).then(|| {
            let (fds, rss) = (
                holding.0.saturating_sub(after.0) as f64 / n as f64,
                holding.1.saturating_sub(after.1) as f64 / n as f64,
            );
            (fds, rss, n, idle_failed)
        }),
    }
}

/// What the connection workloads measured on one path.
struct Work {
    short: porthole_testkit::load::Short,
    /// Not run through socat (it forks a process per connection).
    concurrent: Option<porthole_testkit::load::Concurrent>,
    kept: porthole_testkit::load::KeptAlive,
    /// Relay processes' (fds, RSS bytes) before the workloads and once
    /// they are all done.
    start_end: Option<((usize, u64), (usize, u64))>,
    /// Per idle connection: fds and RSS bytes in the relay processes; the
    /// connections held, and whether one more could not be opened.
    idle: Option<(f64, f64, usize, usize)>,
}

/// The processes that carry a tunnel's bytes on this machine.
fn relay_pids(lab: &Lab, tunnel: &TunnelSvc, kind: Kind) -> Vec<u32> {
    let mut pids = vec![tunnel.pid()];
    match kind {
        Kind::Grpc | Kind::GrpcStreams => pids.push(lab.monitor.proc.pid()),
        Kind::Ssh => pids.extend(children_named(tunnel.pid(), "ssh")),
        Kind::Direct => {}
    }
    pids
}

/// Host → container, then container → host (`iperf3 -R`).
type Both = [Measured; 2];

struct Measured {
    gbits: f64,
    cpu: Option<f64>,
    /// The first relay process's share of `cpu` (tunnel-svc in its rows).
    first: Option<f64>,
}

impl Lab {
    /// One tunnel-svc with `--backend kind`: the latency run, then
    /// throughput through it. Returns both and how tunnel-svc exited.
    async fn backend(
        &mut self,
        kind: Kind,
        ports: &[u16],
        iperf_port: Option<u16>,
        work_port: u16,
    ) -> (
        Result<Latency, String>,
        Result<Both, String>,
        Result<Work, String>,
        String,
    ) {
        eprintln!("{}: starting tunnel-svc", kind.label());
        let mut tunnel = match TunnelSvc::start(self, kind).await {
            Ok(t) => t,
            Err(e) => {
                let e = format!("{e:#}");
                return (Err(e.clone()), Err(e.clone()), Err(e), String::new());
            }
        };
        let lat = if ports.is_empty() {
            Err("latency not measured for this row".to_string())
        } else if scope().throughput_only {
            skipped()
        } else {
            eprintln!(
                "{}: latency over {LATENCY_PORTS} ports, 0-{MAX_GAP_MS} ms apart",
                kind.label()
            );
            self.latency(&mut tunnel, ports, kind.bind())
                .await
                .map(|l| Latency {
                    dropped: tunnel.failed_connections(),
                    ..l
                })
                .map_err(|e| format!("{e:#}"))
        };
        let thr = match iperf_port {
            None => Err("iperf3 missing (apt-get install -y iperf3)".into()),
            Some(port) => {
                eprintln!("{}: throughput", kind.name());
                self.through_tunnel(&mut tunnel, kind, port)
                    .await
                    .map_err(|e| format!("{e:#}"))
            }
        };
        let work = if scope().throughput_only {
            skipped()
        } else {
            eprintln!("{}: connection workloads", kind.label());
            let pids = relay_pids(self, &tunnel, kind);
            self.workloads(work_port, loopback(work_port), &pids, Some(&tunnel))
                .await
                .map_err(|e| format!("{e:#}"))
        };
        let note = tunnel.stop().await;
        (lat, thr, work, note)
    }

    /// The connection workloads against an echo server on `port` inside,
    /// reached at `addr`; `pids` relay (their fds and memory are watched),
    /// and `tunnel` carries them, if one does.
    async fn workloads(
        &mut self,
        port: u16,
        addr: SocketAddr,
        pids: &[u32],
        tunnel: Option<&TunnelSvc>,
    ) -> anyhow::Result<Work> {
        self.helper
            .open(port, "0.0.0.0")
            .map_err(anyhow::Error::msg)?;
        if let Some(t) = tunnel {
            t.0.wait_active(&TunnelSvc::id(port)).await;
        }
        let work = run_workloads(port, addr, pids, tunnel).await;
        self.helper.close(port).map_err(anyhow::Error::msg)?;
        Ok(work)
    }

    /// The workloads through `socat -b` on the host.
    async fn socat_workloads(&mut self, port: u16) -> anyhow::Result<Work> {
        let host_port = free_port()?;
        let mut cmd = Command::new("socat");
        cmd.args(["-b", &SOCAT_BLOCK.to_string()])
            .arg(format!(
                "TCP-LISTEN:{host_port},bind=127.0.0.1,reuseaddr,fork,backlog=1024"
            ))
            .arg(format!("TCP:{}:{port}", self.ns.addr()));
        let mut socat = self.ns.spawn_command("socat-work", cmd);
        wait_host_listening(&mut socat, host_port).await?;
        let work = self.workloads(port, loopback(host_port), &[], None).await;
        socat.terminate().await;
        work
    }

    async fn latency(
        &mut self,
        tunnel: &mut TunnelSvc,
        ports: &[u16],
        bind: &str,
    ) -> anyhow::Result<Latency> {
        let (&warm, rest) = ports.split_first().context("no ports")?;
        let listened = self.helper.open(warm, bind).map_err(anyhow::Error::msg)?;
        let warmup = match usable(loopback(warm), DEADLINE).await {
            Ok(at) => since(listened, at),
            Err(e) => bail!(
                "the warm-up port {warm}: {e}; tunnel: {}",
                tunnel.describe(warm).await
            ),
        };
        self.helper.close(warm).map_err(anyhow::Error::msg)?;
        let mut l = Latency {
            samples: Vec::with_capacity(rest.len()),
            after_event: Vec::with_capacity(rest.len()),
            warmup,
            failures: Vec::new(),
            stopped_early: false,
            dropped: 0,
        };
        let t0 = Instant::now();
        for (i, &port) in rest.iter().enumerate() {
            if t0.elapsed() > LATENCY_BUDGET {
                l.stopped_early = true;
                eprintln!("latency: budget of {LATENCY_BUDGET:?} used up after {i} ports");
                break;
            }
            let gap = self.rng.next_u64() % (MAX_GAP_MS + 1);
            tokio::time::sleep(Duration::from_millis(gap)).await;
            let listened = self.helper.open(port, bind).map_err(anyhow::Error::msg)?;
            match usable(loopback(port), PORT_DEADLINE).await {
                Ok(at) => {
                    l.samples.push(since(listened, at));
                    if let Some(event) = self.monitor.opened_at(port) {
                        l.after_event.push(since(event, at));
                    }
                }
                Err(e) => l.failures.push(format!(
                    "port {port}: {e}; tunnel: {}",
                    tunnel.describe(port).await
                )),
            }
            self.helper.close(port).map_err(anyhow::Error::msg)?;
            if (i + 1) % 25 == 0 {
                eprintln!("latency: {} / {}", i + 1, rest.len());
            }
        }
        Ok(l)
    }

    /// An iperf3 server on `port` inside, once the monitor sees it; stopped
    /// (by pid) when the returned guard drops.
    async fn iperf_server(&mut self, port: u16) -> anyhow::Result<Proc> {
        let mut cmd = self.ns.command("iperf3");
        cmd.args(["-s", "-p", &port.to_string()]);
        let mut proc = self.ns.spawn_command("iperf3-server", cmd);
        if let Some(status) = proc.try_wait() {
            bail!("iperf3 -s exited ({status}): {}", proc.log());
        }
        self.monitor.wait_listening(port).await;
        Ok(proc)
    }

    /// iperf3 server and client both on the host's 127.0.0.1.
    async fn baseline_loopback(&mut self) -> anyhow::Result<Both> {
        let port = free_port()?;
        let mut cmd = Command::new("iperf3");
        cmd.args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()]);
        let mut server = self.ns.spawn_command("iperf3-server-host", cmd);
        wait_host_listening(&mut server, port).await?;
        self.iperf(loopback(port), &[]).await
    }

    async fn baseline_direct(&mut self, port: u16) -> anyhow::Result<Both> {
        let _server = self.iperf_server(port).await?;
        self.iperf(SocketAddr::new(self.ns.addr().into(), port), &[])
            .await
    }

    /// socat with its default 8 KiB buffer, or `-b block`.
    async fn baseline_socat(&mut self, port: u16, block: Option<usize>) -> anyhow::Result<Both> {
        let _server = self.iperf_server(port).await?;
        let host_port = free_port()?;
        let mut cmd = Command::new("socat");
        if let Some(b) = block {
            cmd.args(["-b", &b.to_string()]);
        }
        cmd.arg(format!(
            "TCP-LISTEN:{host_port},bind=127.0.0.1,reuseaddr,fork"
        ))
        .arg(format!("TCP:{}:{port}", self.ns.addr()));
        let mut socat = self.ns.spawn_command("socat", cmd);
        wait_host_listening(&mut socat, host_port).await?;
        let m = self.iperf(loopback(host_port), &[socat.pid()]).await;
        socat.terminate().await;
        m
    }

    /// A plain `ssh -L` from a free host port to `port` inside (with
    /// `ciphers`, `-o Ciphers=` that), once it listens.
    async fn ssh_l(&mut self, port: u16, ciphers: Option<&str>) -> anyhow::Result<(Proc, u16)> {
        let sshd = self.sshd.as_ref().map_err(|e| anyhow!("{e}"))?;
        let host_port = free_port()?;
        let mut cmd = Command::new("ssh");
        cmd.args([
            "-N",
            "-L",
            &format!("127.0.0.1:{host_port}:127.0.0.1:{port}"),
        ])
        .args(["-o", "ExitOnForwardFailure=yes"]);
        if let Some(c) = ciphers {
            cmd.args(["-o", &format!("Ciphers={c}")]);
        }
        cmd.args(sshd.ssh_args()).arg(sshd.destination());
        let mut ssh = self.ns.spawn_command("ssh-L", cmd);
        wait_host_listening(&mut ssh, host_port).await?;
        Ok((ssh, host_port))
    }

    /// The connection workloads through `ssh -L` with the master's cipher.
    async fn ssh_l_workloads(&mut self, port: u16) -> anyhow::Result<Work> {
        let (mut ssh, host_port) = self.ssh_l(port, Some(SAME_CIPHER)).await?;
        let work = self
            .workloads(port, loopback(host_port), &[ssh.pid()], None)
            .await;
        ssh.terminate().await;
        work
    }

    async fn baseline_ssh(&mut self, port: u16, ciphers: Option<&str>) -> anyhow::Result<Both> {
        let _server = self.iperf_server(port).await?;
        let (mut ssh, host_port) = self.ssh_l(port, ciphers).await?;
        let mut pids = vec![ssh.pid()];
        pids.extend(pids_named(&self.ns, "sshd"));
        let m = self.iperf(loopback(host_port), &pids).await;
        ssh.terminate().await;
        m
    }

    /// Time until a new forward is usable: `-O forward` on a running
    /// ControlMaster, and a whole new `ssh -L` process.
    async fn forward_setup(&mut self, target: u16) -> [Result<Vec<Duration>, String>; 2] {
        if let Err(e) = self.helper.open(target, "127.0.0.1") {
            let e = format!("echo server: {e}");
            return [Err(e.clone()), Err(e)];
        }
        let master = self
            .control_master_trials(target)
            .await
            .map_err(|e| format!("{e:#}"));
        let fresh = self
            .new_ssh_trials(target)
            .await
            .map_err(|e| format!("{e:#}"));
        if let Err(e) = self.helper.close(target) {
            eprintln!("warning: closing the echo server: {e}");
        }
        [master, fresh]
    }

    async fn control_master_trials(&mut self, target: u16) -> anyhow::Result<Vec<Duration>> {
        let sshd = self.sshd.as_ref().map_err(|e| anyhow!("{e}"))?;
        let ctl = self.ns.log_dir().join("cm.sock");
        let ctl_arg = ctl.display().to_string();
        let mut cmd = Command::new("ssh");
        cmd.args(["-M", "-N", "-S", &ctl_arg])
            .args(["-o", "ControlPersist=no", "-o", "ExitOnForwardFailure=yes"])
            .args(sshd.ssh_args())
            .arg(sshd.destination());
        let mut master = self.ns.spawn_command("ssh-master", cmd);
        let control = |op: &str, forward: Option<String>| {
            let mut cmd = Command::new("ssh");
            cmd.args(["-S", &ctl_arg, "-O", op]);
            if let Some(f) = forward {
                cmd.args(["-L", &f]);
            }
            cmd.args(sshd.ssh_args()).arg(sshd.destination());
            cmd
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = master.try_wait() {
                bail!("the ControlMaster exited ({status}): {}", master.log());
            }
            if run_quiet(control("check", None)).await.is_ok() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the ControlMaster did not come up in {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut samples = Vec::with_capacity(FORWARD_TRIALS);
        for _ in 0..FORWARD_TRIALS {
            let host_port = free_port()?;
            let spec = format!("127.0.0.1:{host_port}:127.0.0.1:{target}");
            let t0 = Instant::now();
            run_quiet(control("forward", Some(spec.clone())))
                .await
                .context("ssh -O forward")?;
            usable(loopback(host_port), PORT_DEADLINE)
                .await
                .map_err(|e| anyhow!("forward {spec}: {e}"))?;
            samples.push(t0.elapsed());
            run_quiet(control("cancel", Some(spec)))
                .await
                .context("ssh -O cancel")?;
        }
        let _ = run_quiet(control("exit", None)).await;
        master.terminate().await;
        Ok(samples)
    }

    async fn new_ssh_trials(&mut self, target: u16) -> anyhow::Result<Vec<Duration>> {
        let sshd = self.sshd.as_ref().map_err(|e| anyhow!("{e}"))?;
        let mut samples = Vec::with_capacity(FORWARD_TRIALS);
        for i in 0..FORWARD_TRIALS {
            let host_port = free_port()?;
            let mut cmd = Command::new("ssh");
            cmd.args([
                "-N",
                "-L",
                &format!("127.0.0.1:{host_port}:127.0.0.1:{target}"),
            ])
            .args(["-o", "ExitOnForwardFailure=yes"])
            .args(sshd.ssh_args())
            .arg(sshd.destination());
            let t0 = Instant::now();
            let mut ssh = self.ns.spawn_command(&format!("ssh-L-trial-{i}"), cmd);
            let ok = usable(loopback(host_port), PORT_DEADLINE).await;
            let took = t0.elapsed();
            if let Err(e) = ok {
                bail!("ssh -L trial {i}: {e}: {}", ssh.log());
            }
            samples.push(took);
            ssh.terminate().await;
        }
        Ok(samples)
    }

    async fn through_tunnel(
        &mut self,
        tunnel: &mut TunnelSvc,
        kind: Kind,
        port: u16,
    ) -> anyhow::Result<Both> {
        let _server = self.iperf_server(port).await?;
        let host_port = tunnel.wait_active(port).await;
        let mut pids = relay_pids(self, tunnel, kind);
        if kind == Kind::Ssh {
            // The far end of the encryption too, as for `ssh -L`.
            pids.extend(pids_named(&self.ns, "sshd"));
        }
        self.iperf(loopback(host_port), &pids).await
    }

    /// iperf3 against `target` both ways; `pids` are the relay processes
    /// whose CPU is measured.
    /// Each direction [`IPERF_RUNS`] times; the best run of each.
    async fn iperf(&self, target: SocketAddr, pids: &[u32]) -> anyhow::Result<Both> {
        let mut best: [Option<Measured>; 2] = [None, None];
        for _ in 0..IPERF_RUNS {
            for (i, reverse) in [false, true].into_iter().enumerate() {
                let m = iperf_client(target, reverse, pids).await.with_context(|| {
                    if reverse {
                        "reverse (-R)"
                    } else {
                        "forward"
                    }
                })?;
                if best[i].as_ref().is_none_or(|b| m.gbits > b.gbits) {
                    best[i] = Some(m);
                }
            }
        }
        let [Some(up), Some(down)] = best else {
            bail!("no iperf3 run");
        };
        Ok([up, down])
    }
}

/// One iperf3 client run against `target` (with `reverse`, `-R`: the
/// server sends); the receiver's rate from its JSON, and the CPU of `pids`
/// meanwhile.
async fn iperf_client(target: SocketAddr, reverse: bool, pids: &[u32]) -> anyhow::Result<Measured> {
    let mut cmd = Command::new("iperf3");
    cmd.args([
        "-c",
        &target.ip().to_string(),
        "-p",
        &target.port().to_string(),
    ])
    .args(["-t", &IPERF_SECS.to_string(), "-J"])
    .args(reverse.then_some("-R"));
    let before = cpu_of(pids);
    let first_before = cpu_of(&pids[..pids.len().min(1)]);
    let t0 = Instant::now();
    let out = run_for(cmd, Duration::from_secs(IPERF_SECS + 15)).await?;
    let wall = t0.elapsed();
    // socat's forked children are counted once socat has reaped them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = cpu_of(pids);
    let first_after = cpu_of(&pids[..pids.len().min(1)]);
    let percent = |d: Duration| d.as_secs_f64() / wall.as_secs_f64() * 100.0;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 -c {target} ({}): no JSON: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    if let Some(e) = json["error"].as_str() {
        bail!("iperf3 -c {target}: {e}");
    }
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's JSON")?;
    Ok(Measured {
        gbits: bps / 1e9,
        cpu: (!pids.is_empty()).then(|| percent(after.saturating_sub(before))),
        first: (!pids.is_empty()).then(|| percent(first_after.saturating_sub(first_before))),
    })
}

/// When `addr` first answers a 1-byte echo, trying every [`POLL`].
async fn usable(addr: SocketAddr, within: Duration) -> Result<SystemTime, String> {
    let deadline = Instant::now() + within;
    loop {
        let last = match echo(addr).await {
            Ok(()) => return Ok(SystemTime::now()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "{addr} not usable within {within:?} (last: {last})"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn echo(addr: SocketAddr) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    let mut s = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr))
        .await
        .map_err(|_| Error::new(ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    s.write_all(b"x").await?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await {
        Ok(Ok(1)) if b[0] == b'x' => Ok(()),
        Ok(Ok(_)) => Err(Error::new(
            ErrorKind::UnexpectedEof,
            "closed without the echo",
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::new(ErrorKind::TimedOut, "no echo within 2 s")),
    }
}

fn since(earlier: SystemTime, later: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or(Duration::ZERO)
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

// --- monitor-svc and tunnel-svc -------------------------------------------------

/// The kit's monitor, at its default interval, and when each port's
/// `opened` event reached the bench on its own WatchEvents stream.
struct Monitor {
    proc: MonitorProc,
    opened: Arc<Mutex<HashMap<u16, SystemTime>>>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Monitor {
    async fn start(ns: &Netns) -> anyhow::Result<Monitor> {
        let args = ["--interval", "100ms", "--log-level", "warn"];
        let proc = MonitorProc::start(ns, &args).await;
        let mut stream = proc
            .client()
            .await
            .watch_events(WatchEventsRequest::default())
            .await?
            .into_inner();
        let opened = Arc::new(Mutex::new(HashMap::new()));
        let seen = opened.clone();
        let watcher = tokio::spawn(async move {
            while let Ok(Some(item)) = stream.message().await {
                let at = SystemTime::now();
                if let Some(Watched::Event(e)) = item.kind {
                    if let (EventType::Opened, Some(p)) = (e.r#type(), e.port) {
                        let port = p.port as u16;
                        seen.lock().expect("not poisoned").insert(port, at);
                    }
                }
            }
        });
        eprintln!("monitor-svc (pid {}) on {}", proc.pid(), proc.addr());
        Ok(Monitor {
            proc,
            opened,
            watcher,
        })
    }

    /// When the `opened` event of `port` reached the bench, if it did.
    fn opened_at(&self, port: u16) -> Option<SystemTime> {
        self.opened.lock().expect("not poisoned").remove(&port)
    }

    /// Waits until the monitor lists a TCP listener on `port`.
    async fn wait_listening(&mut self, port: u16) {
        let what = format!("monitor-svc to list port {port}");
        let tcp = |p: &porthole::pb::v1::Port| {
            p.port == u32::from(port) && p.protocol == Protocol::Tcp as i32
        };
        self.proc.wait_listed(&what, DEADLINE, tcp).await
    }
}

/// The kit's tunnel-svc following the monitor with one backend, and what
/// the bench reads from it.
struct TunnelSvc(TunnelProc);

impl TunnelSvc {
    async fn start(lab: &Lab, kind: Kind) -> anyhow::Result<TunnelSvc> {
        let mut args: Vec<String> = ["--backend", kind.name(), "--max-tunnels", "1000"]
            .into_iter()
            .chain(["--skip", SKIP, "--log-level", "info"])
            .map(String::from)
            .collect();
        if kind == Kind::GrpcStreams {
            args.push("--no-raw-relay".into());
        }
        if kind == Kind::Ssh {
            let sshd = lab.sshd.as_ref().map_err(|e| anyhow!("{e}"))?;
            args.extend(["--ssh-host".into(), lab.ns.addr().to_string()]);
            for opt in sshd.options() {
                args.extend(["--ssh-option".into(), opt]);
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let tunnel = TunnelProc::follow(&lab.ns, &lab.monitor.proc, &args).await;
        eprintln!(
            "tunnel-svc --backend {} (pid {}), admin {}",
            kind.name(),
            tunnel.pid(),
            tunnel.admin()
        );
        Ok(TunnelSvc(tunnel))
    }

    fn id(port: u16) -> String {
        format!("default:tcp:{port}")
    }

    /// How many "connection failed" lines tunnel-svc has logged so far.
    fn failed_connections(&self) -> usize {
        self.0.log().matches("\"connection failed\"").count()
    }

    /// The tunnel of `port` as ListTunnels shows it, for error messages.
    async fn describe(&mut self, port: u16) -> String {
        match self.0.tunnel(&Self::id(port)).await {
            Some(t) => format!(
                "{} {:?}{}",
                t.id,
                TunnelState::try_from(t.state).unwrap_or_default(),
                if t.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", t.error)
                }
            ),
            None => "none in ListTunnels".into(),
        }
    }

    /// Waits until the tunnel of `port` is ACTIVE; returns its host port.
    async fn wait_active(&mut self, port: u16) -> u16 {
        self.0.wait_active(&Self::id(port)).await.host_port as u16
    }

    fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// SIGTERM; the exit status, and whether any ssh process it started
    /// outlived it (those are killed by pid).
    async fn stop(mut self) -> String {
        let ssh = children_named(self.pid(), "ssh");
        let status = self.0.terminate().await;
        let left: Vec<u32> = ssh.into_iter().filter(|pid| comm(*pid) == "ssh").collect();
        for pid in &left {
            porthole_testkit::send_signal(*pid, "KILL");
        }
        let mut note = match status.code() {
            Some(0) => "SIGTERM → exit 0".to_string(),
            _ => format!("**SIGTERM → {status}**"),
        };
        if !left.is_empty() {
            note.push_str(&format!(", **ssh left behind: {left:?} (killed)**"));
        }
        note
    }
}

fn children_named(parent: u32, name: &str) -> Vec<u32> {
    children(parent)
        .into_iter()
        .filter(|pid| comm(*pid) == name)
        .collect()
}

/// Pids of the namespace's processes called `name`.
fn pids_named(ns: &Netns, name: &str) -> Vec<u32> {
    ns.pids()
        .into_iter()
        .filter(|pid| comm(*pid) == name)
        .collect()
}

/// CPU (with reaped children) of `pids` so far.
fn cpu_of(pids: &[u32]) -> Duration {
    pids.iter().map(|pid| cpu_time_with_children(*pid)).sum()
}

/// Runs a short command to its end (bounded); its output.
async fn run_for(cmd: Command, within: Duration) -> anyhow::Result<Output> {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let what = format!("{:?}", cmd.as_std().get_program());
    tokio::time::timeout(within, cmd.output())
        .await
        .with_context(|| format!("{what} did not finish within {within:?}"))?
        .with_context(|| format!("running {what}"))
}

/// [`run_for`] that must succeed.
async fn run_quiet(cmd: Command) -> anyhow::Result<()> {
    let out = run_for(cmd, Duration::from_secs(5)).await?;
    ensure!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Waits until something listens on 127.0.0.1:`port` on the host (read
/// from /proc/net/tcp, without connecting: a stray connection to an
/// iperf3 server can leave it busy).
async fn wait_host_listening(proc: &mut Proc, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    let local = format!("0100007F:{port:04X}");
    loop {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let listening = table.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == local && f[3] == "0A"
        });
        if listening {
            return Ok(());
        }
        if let Some(status) = proc.try_wait() {
            bail!("{} exited ({status}): {}", proc.label(), proc.log());
        }
        ensure!(
            Instant::now() < deadline,
            "{} did not listen on 127.0.0.1:{port} within {DEADLINE:?}",
            proc.label()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// --- Set-up helpers -------------------------------------------------------------

struct Tools {
    iperf3_version: String,
    socat_version: String,
    ssh_version: String,
    /// Missing OpenSSH pieces; empty when all are there.
    openssh: Vec<String>,
}

impl Tools {
    fn find() -> Tools {
        let first_line = |prog: &str, args: &[&str], pick: &dyn Fn(&str) -> bool| {
            match std::process::Command::new(prog)
                .args(args)
                .stdin(Stdio::null())
                .output()
            {
                Ok(o) => {
                    let text = format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                    text.lines()
                        .find(|l| pick(l))
                        .unwrap_or("?")
                        .trim()
                        .to_string()
                }
                Err(e) => format!("missing ({e})"),
            }
        };
        let mut openssh = Vec::new();
        for tool in ["ssh", "ssh-keygen"] {
            if which(tool).is_none() {
                openssh.push(tool.to_string());
            }
        }
        if !Path::new(SSHD).is_file() {
            openssh.push(SSHD.to_string());
        }
        Tools {
            iperf3_version: first_line("iperf3", &["--version"], &|_| true),
            socat_version: first_line("socat", &["-V"], &|l| l.contains("socat version")),
            ssh_version: first_line("ssh", &["-V"], &|_| true),
            openssh,
        }
    }
}

/// The container ports the bench uses, all free on the host's loopback
/// (a busy host port would make tunnel-svc pick another one).
struct PortPlan {
    /// One warm-up port and [`LATENCY_PORTS`] more, per backend.
    latency: [Vec<u16>; 3],
    /// iperf3 servers: direct, socat, socat -b, ssh -L, ssh -L with the
    /// master's cipher, then grpc, grpc streams, ssh, direct tunnels.
    iperf: [u16; 9],
    /// Echo servers for the connection workloads: no relay, socat -b,
    /// ssh -L, then grpc, grpc streams, ssh, direct tunnels.
    work: [u16; 7],
    /// The echo server behind the forward set-up trials.
    forward: u16,
}

impl PortPlan {
    fn find() -> anyhow::Result<PortPlan> {
        let v6 = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok();
        let free = |port: u16| {
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
                && (!v6 || std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, port)).is_ok())
        };
        // Below the usual ephemeral range (32768-60999).
        for base in [30000u16, 29000, 28000, 27000, 26000, 25000, 24000] {
            let block = |i: u16| -> Vec<u16> {
                (0..=LATENCY_PORTS as u16)
                    .map(|k| base + i * 200 + k)
                    .collect()
            };
            let plan = PortPlan {
                latency: [block(0), block(1), block(2)],
                iperf: std::array::from_fn(|i| base + 600 + i as u16),
                forward: base + 610,
                work: std::array::from_fn(|i| base + 620 + i as u16),
            };
            let mut all = plan
                .latency
                .iter()
                .flatten()
                .chain(&plan.iperf)
                .chain(&plan.work);
            if free(plan.forward) && all.all(|p| free(*p)) {
                return Ok(plan);
            }
        }
        bail!("no block of 700 free ports found on the host between 24000 and 31000")
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(porthole_testkit::unused_local_port())
}

// --- Small helpers -----------------------------------------------------------

/// A message fit for a table cell.
fn one_line(s: &str) -> String {
    let s = s.replace(['\n', '|'], " ");
    if s.chars().count() > 300 {
        format!("{}…", s.chars().take(300).collect::<String>())
    } else {
        s
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("? ({e})"))
}

fn loadavg() -> String {
    read_trim("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}
