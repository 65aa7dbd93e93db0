//! Benchmark for tunnel-svc: how soon a port that starts listening in a
//! "container" is usable on the host, per backend, and single-stream
//! throughput through each backend beside the relays it replaces (socat,
//! `ssh -L`).
//!
//! ```text
//! cargo build --release -p monitor-svc -p tunnel-svc --bins
//! cargo build --release -p tunnel-svc --example tunnel-bench
//! sudo ./target/release/examples/tunnel-bench
//! ```
//!
//! Needs root (the container is a network namespace), `ip` and `python3`;
//! the throughput and forward set-up parts also use `iperf3`, `socat` and
//! OpenSSH (`ssh`, `ssh-keygen`, `/usr/sbin/sshd`) and say so when one is
//! missing. Runs the real `monitor-svc` (inside) and `tunnel-svc` (on the
//! host) from this example's target directory (`target/release/`).
//!
//! Traffic goes only to loopback and to the namespace the bench creates (one
//! /30 of 198.18.0.0/15, locked the way the end-to-end tests lock theirs).
//! Every process it starts is stopped by its pid, and the namespace deleted,
//! on exit, on error and on Ctrl-C. The whole run is bounded (about two
//! minutes). Progress goes to stderr; stdout is a markdown report.
#![forbid(unsafe_code)]

#[path = "../../monitor-svc/examples/support/mod.rs"]
mod support;

use anyhow::{anyhow, bail, ensure, Context};
use porthole::pb::v1::{
    port_events_client::PortEventsClient, tunnel_admin_client::TunnelAdminClient,
    watch_events_response::Kind as Watched, EventType, ListPortsRequest, ListTunnelsRequest,
    Protocol, TunnelState, WatchEventsRequest,
};
use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::{clock_ticks, ms, nproc, Stats, XorShift};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{ChildStdin, ChildStdout, Command};
use tonic::transport::Channel;

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
const IPERF_SECS: u64 = 5;
/// socat's `-b` for the second socat row (its default is 8 KiB).
const SOCAT_BLOCK: usize = 128 * 1024;
/// Trials per forward set-up method.
const FORWARD_TRIALS: usize = 10;
/// Bound on anything else: a service starting, a tunnel appearing.
const DEADLINE: Duration = Duration::from_secs(15);
const MONITOR_PORT: u16 = 7070;
const SSHD: &str = "/usr/sbin/sshd";
/// Ports that stay out of tunnel-svc's automatic tunnels: the namespace's sshd.
const SKIP: &str = "22";

fn main() -> ExitCode {
    if euid() != Some(0) {
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
    let bins = Binaries::locate()?;
    let work = WorkDir::create()?;
    let result = bench(&bins, &work.path).await;
    if result.is_err() {
        work.keep();
    }
    result?;
    println!();
    println!(
        "whole run {:.1} s; load average at the end {}",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    Ok(())
}

/// The backends, in the order they are measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Grpc,
    Ssh,
    Direct,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Grpc => "grpc",
            Kind::Ssh => "ssh",
            Kind::Direct => "direct",
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

async fn bench(bins: &Binaries, work: &Path) -> anyhow::Result<()> {
    let tools = Tools::find();
    println!("## tunnel-svc benchmark\n");
    println!("| machine | |");
    println!("| --- | --- |");
    println!("| cores (`nproc`) | {} |", nproc());
    println!("| CPU | {} |", cpu_model());
    println!("| kernel | {} |", read_trim("/proc/sys/kernel/osrelease"));
    println!("| load average at the start | {} |", loadavg());
    println!("| `ssh -V` | {} |", tools.ssh_version);
    println!("| `iperf3 --version` | {} |", tools.iperf3_version);
    println!("| `socat -V` | {} |", tools.socat_version);
    println!("| monitor-svc | {} |", version_of(&bins.monitor));
    println!("| tunnel-svc | {} |", version_of(&bins.tunnel));

    let plan = PortPlan::find()?;
    let ns = Netns::create()?;
    println!(
        "| container | network namespace `{}`, {} inside, {} on the host end |",
        ns.name, ns.inside, ns.host
    );
    eprintln!(
        "namespace {} at {} (host end {}); logs in {}",
        ns.name,
        ns.inside,
        ns.host,
        work.display()
    );
    let monitor = Monitor::start(&ns, &bins.monitor, work).await?;
    let helper = Helper::start(&ns, &tools.python, work).await?;
    let sshd = if tools.openssh.is_empty() {
        match Sshd::start(&ns, work).await {
            Ok(s) => Ok(s),
            Err(e) => Err(format!("sshd did not start: {e:#}")),
        }
    } else {
        Err(format!("OpenSSH missing: {}", tools.openssh.join(", ")))
    };
    let mut lab = Lab {
        helper,
        sshd,
        monitor,
        ns,
        work: work.to_path_buf(),
        clk_tck: clock_ticks(),
        rng: XorShift::from_time(),
    };

    // --- Baselines, before any tunnel-svc runs ------------------------------
    let mut throughput: Vec<(String, Result<Both, String>, &str)> = Vec::new();
    let [p_direct, p_socat, p_socat_big, p_ssh, p_grpc_t, p_ssh_t, p_direct_t] = plan.iperf;
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
            _ => lab.baseline_ssh(p_ssh).await.map_err(|e| format!("{e:#}")),
        },
        "5.8–6.2 Gbit/s",
    ));
    eprintln!("forward set-up: ControlMaster -O forward vs new ssh -L");
    let forward = match &lab.sshd {
        Err(e) => [Err(e.clone()), Err(e.clone())],
        Ok(_) => lab.forward_setup(plan.forward).await,
    };

    // --- tunnel-svc, one instance per backend -------------------------------
    let mut latency = Vec::new();
    for (kind, ports, iperf_port) in [
        (Kind::Grpc, &plan.latency[0], p_grpc_t),
        (Kind::Ssh, &plan.latency[1], p_ssh_t),
        (Kind::Direct, &plan.latency[2], p_direct_t),
    ] {
        let (lat, thr, note) = if kind == Kind::Ssh && lab.sshd.is_err() {
            let e = lab.sshd.as_ref().err().cloned().unwrap_or_default();
            (Err(e.clone()), Err(e), String::new())
        } else {
            lab.backend(kind, bins, ports, have_iperf.then_some(iperf_port))
                .await
        };
        if let Err(e) = &lat {
            eprintln!("{} backend: not measured: {e}", kind.name());
        }
        latency.push((kind, lat, note));
        throughput.push((
            format!("tunnel-svc `--backend {}`", kind.name()),
            thr,
            "(beat socat and `ssh -L`)",
        ));
    }

    let monitor_exit = lab.monitor.proc.stop(Duration::from_secs(10)).await;

    // --- Report -----------------------------------------------------------
    println!();
    println!(
        "### Listen → usable on the host ({LATENCY_PORTS} ports per backend, one at a time, random 0–{MAX_GAP_MS} ms apart)\n"
    );
    println!(
        "From `listen()` inside the namespace (the helper's `time.time_ns()` right after it) to the first \
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
    for (kind, result, note) in &mut latency {
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
        "### Single-stream throughput (iperf3 `-t {IPERF_SECS}`, one TCP stream, receiver's bits/s)\n"
    );
    println!(
        "Relay CPU: utime+stime (and reaped children) over the run, in % of one core, of the processes \
         that carry the bytes — socat; `ssh` + the namespace's `sshd` processes; tunnel-svc (+ monitor-svc \
         for grpc, + its ssh master and `sshd` for ssh). iperf3 itself uses the rest of the {} cores. \
         → is host → container (the iperf3 client on the host sends), ← is `iperf3 -R` (the server \
         inside sends).\n",
        nproc()
    );
    println!("| path | → Gbit/s | ← Gbit/s | × socat → / ← (this run) | relay CPU → / ← | DESIGN.md \"numbers to beat\" |");
    println!("| --- | ---: | ---: | ---: | ---: | --- |");
    let socat = throughput
        .iter()
        .find(|(p, _, _)| p.starts_with("socat"))
        .and_then(|(_, r, _)| r.as_ref().ok().map(|[up, down]| [up.gbits, down.gbits]));
    let cpu = |m: &Measured| m.cpu.map_or("—".into(), |c| format!("{c:.0} %"));
    for (path, result, target) in &throughput {
        match result {
            Ok([up, down]) => println!(
                "| {path} | {:.2} | {:.2} | {} | {} / {} | {target} |",
                up.gbits,
                down.gbits,
                socat.map_or("".into(), |[su, sd]| format!(
                    "{:.2} / {:.2}",
                    up.gbits / su,
                    down.gbits / sd
                )),
                cpu(up),
                cpu(down),
            ),
            Err(e) => println!(
                "| {path} | not measured: {} | | | | {target} |",
                one_line(e)
            ),
        }
    }

    println!();
    println!(
        "### Forward set-up ({FORWARD_TRIALS} trials each, against the namespace's sshd; usable = a 1-byte echo through the new port)\n"
    );
    println!("| method | n | p50 | p90 | max | DESIGN.md |");
    println!("| --- | ---: | ---: | ---: | ---: | --- |");
    let [master, fresh] = forward;
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
            Ok(mut samples) => {
                let s = Stats::of(&mut samples);
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
                one_line(&e)
            ),
        }
    }

    let code = monitor_exit?;
    ensure!(
        code.success(),
        "monitor-svc exited with {code} after SIGTERM (log: {})",
        work.join("monitor-svc.log").display()
    );
    Ok(())
}

// --- The lab: namespace, monitor, helper, sshd --------------------------------

/// Everything the measurements share. Fields drop in order: processes
/// first, the namespace (which kills whatever is left inside) last.
struct Lab {
    helper: Helper,
    sshd: Result<Sshd, String>,
    monitor: Monitor,
    ns: Netns,
    work: PathBuf,
    clk_tck: u64,
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

/// Host → container, then container → host (`iperf3 -R`).
type Both = [Measured; 2];

struct Measured {
    gbits: f64,
    cpu: Option<f64>,
}

impl Lab {
    /// One tunnel-svc with `--backend kind`: the latency run, then
    /// throughput through it. Returns both and how tunnel-svc exited.
    async fn backend(
        &mut self,
        kind: Kind,
        bins: &Binaries,
        ports: &[u16],
        iperf_port: Option<u16>,
    ) -> (Result<Latency, String>, Result<Both, String>, String) {
        eprintln!("{}: starting tunnel-svc", kind.name());
        let mut tunnel = match TunnelSvc::start(self, bins, kind).await {
            Ok(t) => t,
            Err(e) => {
                let e = format!("{e:#}");
                return (Err(e.clone()), Err(e), String::new());
            }
        };
        eprintln!(
            "{}: latency over {LATENCY_PORTS} ports, 0-{MAX_GAP_MS} ms apart",
            kind.name()
        );
        let lat = self
            .latency(&mut tunnel, ports, kind.bind())
            .await
            .map(|l| Latency {
                dropped: tunnel.failed_connections(),
                ..l
            })
            .map_err(|e| format!("{e:#}"));
        let thr = match iperf_port {
            None => Err("iperf3 missing (apt-get install -y iperf3)".into()),
            Some(port) => {
                eprintln!("{}: throughput", kind.name());
                self.through_tunnel(&mut tunnel, kind, port)
                    .await
                    .map_err(|e| format!("{e:#}"))
            }
        };
        let note = match tunnel.stop().await {
            Ok(note) => note,
            Err(e) => format!("**{}**", one_line(&format!("{e:#}"))),
        };
        (lat, thr, note)
    }

    async fn latency(
        &mut self,
        tunnel: &mut TunnelSvc,
        ports: &[u16],
        bind: &str,
    ) -> anyhow::Result<Latency> {
        let (&warm, rest) = ports.split_first().context("no ports")?;
        let listened = self.helper.open(warm, bind).await?;
        let warmup = match usable(loopback(warm), DEADLINE).await {
            Ok(at) => since(listened, at),
            Err(e) => bail!(
                "the warm-up port {warm}: {e}; tunnel: {}",
                tunnel.describe(warm).await
            ),
        };
        self.helper.close(warm).await?;
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
            let gap = self.rng.next() % (MAX_GAP_MS + 1);
            tokio::time::sleep(Duration::from_millis(gap)).await;
            let listened = self.helper.open(port, bind).await?;
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
            self.helper.close(port).await?;
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
        let mut proc = Proc::start(
            &format!("iperf3 -s -p {port}"),
            cmd,
            self.work.join(format!("iperf3-server-{port}.log")),
            false,
        )?;
        if let Err(e) = self.monitor.wait_listening(port).await {
            if let Some(status) = proc.exited() {
                bail!("iperf3 -s exited ({status}): {}", proc.log_tail());
            }
            return Err(e);
        }
        Ok(proc)
    }

    /// iperf3 server and client both on the host's 127.0.0.1.
    async fn baseline_loopback(&mut self) -> anyhow::Result<Both> {
        let port = free_port()?;
        let mut cmd = Command::new("iperf3");
        cmd.args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()]);
        let mut server = Proc::start(
            "iperf3 -s (host)",
            cmd,
            self.work.join("iperf3-server-host.log"),
            false,
        )?;
        wait_host_listening(&mut server, port).await?;
        self.iperf(loopback(port), &[]).await
    }

    async fn baseline_direct(&mut self, port: u16) -> anyhow::Result<Both> {
        let _server = self.iperf_server(port).await?;
        self.iperf(SocketAddr::new(self.ns.inside.into(), port), &[])
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
        .arg(format!("TCP:{}:{port}", self.ns.inside));
        let mut socat = Proc::start("socat", cmd, self.work.join("socat.log"), false)?;
        wait_host_listening(&mut socat, host_port).await?;
        let m = self.iperf(loopback(host_port), &[socat.pid]).await;
        socat.stop(Duration::from_secs(3)).await?;
        m
    }

    async fn baseline_ssh(&mut self, port: u16) -> anyhow::Result<Both> {
        let _server = self.iperf_server(port).await?;
        let sshd = self.sshd.as_ref().map_err(|e| anyhow!("{e}"))?;
        let host_port = free_port()?;
        let mut cmd = Command::new("ssh");
        cmd.args([
            "-N",
            "-L",
            &format!("127.0.0.1:{host_port}:127.0.0.1:{port}"),
        ])
        .args(["-o", "ExitOnForwardFailure=yes"])
        .args(sshd.ssh_args())
        .arg(sshd.destination());
        let mut ssh = Proc::start("ssh -L", cmd, self.work.join("ssh-L.log"), false)?;
        wait_host_listening(&mut ssh, host_port).await?;
        let mut pids = vec![ssh.pid];
        pids.extend(self.ns.pids_named("sshd"));
        let m = self.iperf(loopback(host_port), &pids).await;
        ssh.stop(Duration::from_secs(3)).await?;
        m
    }

    /// Time until a new forward is usable: `-O forward` on a running
    /// ControlMaster, and a whole new `ssh -L` process.
    async fn forward_setup(&mut self, target: u16) -> [Result<Vec<Duration>, String>; 2] {
        if let Err(e) = self.helper.open(target, "127.0.0.1").await {
            let e = format!("echo server: {e:#}");
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
        if let Err(e) = self.helper.close(target).await {
            eprintln!("warning: closing the echo server: {e:#}");
        }
        [master, fresh]
    }

    async fn control_master_trials(&mut self, target: u16) -> anyhow::Result<Vec<Duration>> {
        let sshd = self.sshd.as_ref().map_err(|e| anyhow!("{e}"))?;
        let ctl = self.work.join("cm.sock");
        let ctl_arg = ctl.display().to_string();
        let ctl_log = self.work.join("ssh-O.log");
        let mut cmd = Command::new("ssh");
        cmd.args(["-M", "-N", "-S", &ctl_arg])
            .args(["-o", "ControlPersist=no", "-o", "ExitOnForwardFailure=yes"])
            .args(sshd.ssh_args())
            .arg(sshd.destination());
        let mut master = Proc::start(
            "ssh ControlMaster",
            cmd,
            self.work.join("ssh-master.log"),
            false,
        )?;
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
            if let Some(status) = master.exited() {
                bail!("the ControlMaster exited ({status}): {}", master.log_tail());
            }
            if run_quiet(control("check", None), &ctl_log).await.is_ok() {
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
            run_quiet(control("forward", Some(spec.clone())), &ctl_log)
                .await
                .context("ssh -O forward")?;
            usable(loopback(host_port), PORT_DEADLINE)
                .await
                .map_err(|e| anyhow!("forward {spec}: {e}"))?;
            samples.push(t0.elapsed());
            run_quiet(control("cancel", Some(spec)), &ctl_log)
                .await
                .context("ssh -O cancel")?;
        }
        let _ = run_quiet(control("exit", None), &ctl_log).await;
        master.stop(Duration::from_secs(3)).await?;
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
            let mut ssh = Proc::start(
                "ssh -L",
                cmd,
                self.work.join(format!("ssh-L-trial-{i}.log")),
                false,
            )?;
            let ok = usable(loopback(host_port), PORT_DEADLINE).await;
            let took = t0.elapsed();
            if let Err(e) = ok {
                bail!("ssh -L trial {i}: {e}: {}", ssh.log_tail());
            }
            samples.push(took);
            ssh.stop(Duration::from_secs(3)).await?;
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
        let host_port = tunnel.wait_active(port).await?;
        let mut pids = vec![tunnel.proc.pid];
        match kind {
            Kind::Grpc => pids.push(self.monitor.proc.pid),
            Kind::Ssh => {
                pids.extend(children_named(tunnel.proc.pid, "ssh"));
                pids.extend(self.ns.pids_named("sshd"));
            }
            Kind::Direct => {}
        }
        self.iperf(loopback(host_port), &pids).await
    }

    /// iperf3 against `target` both ways; `pids` are the relay processes
    /// whose CPU is measured.
    async fn iperf(&self, target: SocketAddr, pids: &[u32]) -> anyhow::Result<Both> {
        let log = self.work.join("iperf3-client.log");
        let up = iperf_client(target, false, pids, self.clk_tck, &log).await?;
        let down = iperf_client(target, true, pids, self.clk_tck, &log)
            .await
            .context("reverse (-R)")?;
        Ok([up, down])
    }
}

/// One iperf3 client run against `target` (with `reverse`, `-R`: the
/// server sends); the receiver's rate from its JSON, and the CPU of `pids`
/// meanwhile.
async fn iperf_client(
    target: SocketAddr,
    reverse: bool,
    pids: &[u32],
    clk_tck: u64,
    log: &Path,
) -> anyhow::Result<Measured> {
    let mut cmd = Command::new("iperf3");
    cmd.args([
        "-c",
        &target.ip().to_string(),
        "-p",
        &target.port().to_string(),
    ])
    .args(["-t", &IPERF_SECS.to_string(), "-J"])
    .args(reverse.then_some("-R"));
    let before = cpu_ticks(pids);
    let t0 = Instant::now();
    let (status, stdout, stderr) = Proc::run(
        &format!("iperf3 -c {target}"),
        cmd,
        log.to_path_buf(),
        Duration::from_secs(IPERF_SECS + 15),
    )
    .await?;
    let wall = t0.elapsed();
    // socat's forked children are counted once socat has reaped them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = cpu_ticks(pids);
    let json: serde_json::Value = serde_json::from_slice(&stdout)
        .with_context(|| format!("iperf3 -c {target} ({status}): no JSON: {}", stderr.trim()))?;
    if let Some(e) = json["error"].as_str() {
        bail!("iperf3 -c {target}: {e}");
    }
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's JSON")?;
    Ok(Measured {
        gbits: bps / 1e9,
        cpu: (!pids.is_empty()).then(|| {
            after.saturating_sub(before) as f64 / clk_tck as f64 / wall.as_secs_f64() * 100.0
        }),
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

// --- monitor-svc ----------------------------------------------------------------

/// The monitor's token file, in the bench's work directory.
const TOKEN_FILE: &str = "monitor.token";

struct Monitor {
    proc: Proc,
    client: PortEventsClient<Channel>,
    /// When each port's latest `opened` event arrived on the bench's own
    /// WatchEvents stream.
    opened: Arc<Mutex<HashMap<u16, SystemTime>>>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Monitor {
    async fn start(ns: &Netns, bin: &Path, work: &Path) -> anyhow::Result<Monitor> {
        // The monitor's token, shared with tunnel-svc (see TunnelSvc::start).
        let token_file = work.join(TOKEN_FILE);
        let _ = std::fs::remove_file(&token_file);
        porthole::auth::Token::load_or_create(&token_file)?;
        let mut cmd = ns.command(bin);
        cmd.args(["--listen", &format!("0.0.0.0:{MONITOR_PORT}")])
            .arg("--token-file")
            .arg(&token_file)
            .args(["--log-level", "warn"]);
        clear_porthole_env(&mut cmd);
        let mut proc = Proc::start("monitor-svc", cmd, work.join("monitor-svc.log"), false)?;
        let addr = SocketAddr::new(ns.inside.into(), MONITOR_PORT);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = proc.exited() {
                bail!(
                    "monitor-svc exited at start-up ({status}): {}",
                    proc.log_tail()
                );
            }
            if http_ok(addr, "/healthz").await {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "monitor-svc not answering on {addr} after {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut client = PortEventsClient::connect(format!("http://{addr}")).await?;
        let mut stream = client
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
        eprintln!("monitor-svc (pid {}) on {addr}", proc.pid);
        Ok(Monitor {
            proc,
            client,
            opened,
            watcher,
        })
    }

    /// When the `opened` event of `port` reached the bench, if it did.
    fn opened_at(&self, port: u16) -> Option<SystemTime> {
        self.opened.lock().expect("not poisoned").remove(&port)
    }

    /// Waits until the monitor lists a TCP listener on `port`.
    async fn wait_listening(&mut self, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let ports = self
                .client
                .list_ports(ListPortsRequest {})
                .await?
                .into_inner()
                .ports;
            if ports
                .iter()
                .any(|p| p.port == u32::from(port) && p.protocol == Protocol::Tcp as i32)
            {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "monitor-svc did not list port {port} within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Whether `GET path` answers 200.
async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    let get = async {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        std::io::Result::Ok(answer.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), get).await,
        Ok(Ok(true))
    )
}

// --- tunnel-svc -------------------------------------------------------------------

struct TunnelSvc {
    proc: Proc,
    client: TunnelAdminClient<Channel>,
}

impl TunnelSvc {
    async fn start(lab: &Lab, bins: &Binaries, kind: Kind) -> anyhow::Result<TunnelSvc> {
        let mut cmd = Command::new(&bins.tunnel);
        cmd.args([
            "--monitor",
            &format!("http://{}:{MONITOR_PORT}", lab.ns.inside),
        ])
        .args(["--backend", kind.name()])
        .arg("--monitor-token-file")
        .arg(lab.work.join(TOKEN_FILE))
        .args(["--admin", "127.0.0.1:0"])
        .args(["--max-tunnels", "1000", "--skip", SKIP])
        .args(["--log-format", "json", "--log-level", "info"]);
        if kind == Kind::Ssh {
            let sshd = lab.sshd.as_ref().map_err(|e| anyhow!("{e}"))?;
            cmd.args(["--ssh-host", &lab.ns.inside.to_string()]);
            for opt in sshd.options() {
                cmd.args(["--ssh-option", &opt]);
            }
        }
        clear_porthole_env(&mut cmd);
        let log = lab.work.join(format!("tunnel-svc-{}.log", kind.name()));
        let mut proc = Proc::start("tunnel-svc", cmd, log.clone(), false)?;
        let deadline = Instant::now() + DEADLINE;
        let admin = loop {
            if let Some(addr) = admin_addr(&std::fs::read_to_string(&log).unwrap_or_default()) {
                break addr;
            }
            if let Some(status) = proc.exited() {
                bail!(
                    "tunnel-svc exited at start-up ({status}): {}",
                    proc.log_tail()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "tunnel-svc did not log its admin address within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let client = TunnelAdminClient::connect(format!("http://{admin}")).await?;
        eprintln!(
            "tunnel-svc --backend {} (pid {}), admin {admin}",
            kind.name(),
            proc.pid
        );
        Ok(TunnelSvc { proc, client })
    }

    async fn tunnel(&mut self, port: u16) -> anyhow::Result<Option<porthole::pb::v1::Tunnel>> {
        let tunnels = tokio::time::timeout(
            Duration::from_secs(5),
            self.client.list_tunnels(ListTunnelsRequest::default()),
        )
        .await
        .context("ListTunnels timed out")??
        .into_inner()
        .tunnels;
        Ok(tunnels
            .into_iter()
            .find(|t| t.container_port == u32::from(port)))
    }

    /// How many "connection failed" lines tunnel-svc has logged so far.
    fn failed_connections(&self) -> usize {
        std::fs::read_to_string(&self.proc.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == "connection failed")
            .count()
    }

    /// The tunnel of `port` as ListTunnels shows it, for error messages.
    async fn describe(&mut self, port: u16) -> String {
        match self.tunnel(port).await {
            Ok(Some(t)) => format!(
                "{} {:?}{}",
                t.id,
                TunnelState::try_from(t.state).unwrap_or_default(),
                if t.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", t.error)
                }
            ),
            Ok(None) => "none in ListTunnels".into(),
            Err(e) => format!("ListTunnels failed: {e:#}"),
        }
    }

    /// Waits until the tunnel of `port` is ACTIVE; returns its host port.
    async fn wait_active(&mut self, port: u16) -> anyhow::Result<u16> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(t) = self.tunnel(port).await? {
                if t.state == TunnelState::Active as i32 {
                    return Ok(t.host_port as u16);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the tunnel of port {port} is not ACTIVE after {DEADLINE:?}: {}",
                    self.describe(port).await
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM; the exit status, and whether any ssh process it started
    /// outlived it (those are killed by pid).
    async fn stop(mut self) -> anyhow::Result<String> {
        let ssh = children_named(self.proc.pid, "ssh");
        let status = self.proc.stop(Duration::from_secs(10)).await?;
        let left: Vec<u32> = ssh
            .into_iter()
            .filter(|pid| comm(*pid).as_deref() == Some("ssh"))
            .collect();
        for pid in &left {
            signal(*pid, "KILL");
        }
        let mut note = match status.code() {
            Some(0) => "SIGTERM → exit 0".to_string(),
            _ => format!("**SIGTERM → {status}**"),
        };
        if !left.is_empty() {
            note.push_str(&format!(", **ssh left behind: {left:?} (killed)**"));
        }
        Ok(note)
    }
}

/// The admin address from tunnel-svc's JSON log.
fn admin_addr(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "tunnel-svc admin API listening")
        .and_then(|v| v["addr"].as_str()?.parse().ok())
}

fn clear_porthole_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PORTHOLE_") {
            cmd.env_remove(key);
        }
    }
}

// --- The listener helper inside the namespace -----------------------------------

/// One python process inside the namespace. `open PORT ADDR` binds and
/// listens, then answers `ok <time_ns() right after listen()>`; `close PORT`
/// closes the listener and its connections. Every connection echoes.
const HELPER_PY: &str = r#"
import os, selectors, socket, sys, time
sel = selectors.DefaultSelector()
listeners, conns, buf = {}, {}, b""
sel.register(0, selectors.EVENT_READ, None)
def reply(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
def drop(c, port):
    # Also called for events of a batch whose socket a "close" already took.
    try:
        sel.unregister(c)
    except (KeyError, ValueError):
        pass
    c.close()
    conns.get(port, set()).discard(c)
reply("ready")
while True:
    for key, _ in sel.select():
        tag = key.data
        if tag is None:
            data = os.read(0, 4096)
            if not data:
                sys.exit(0)
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                cmd = line.decode().split()
                try:
                    if cmd[0] == "open":
                        port = int(cmd[1])
                        s = socket.socket()
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        s.bind((cmd[2], port))
                        s.listen(128)
                        t = time.time_ns()
                        s.setblocking(False)
                        listeners[port] = s
                        sel.register(s, selectors.EVENT_READ, ("listen", port))
                        reply("ok %d" % t)
                    elif cmd[0] == "close":
                        port = int(cmd[1])
                        s = listeners.pop(port)
                        sel.unregister(s)
                        s.close()
                        for c in list(conns.pop(port, set())):
                            sel.unregister(c)
                            c.close()
                        reply("ok")
                    else:
                        reply("err unknown command")
                except Exception as e:
                    reply("err %s" % e)
        elif key.fileobj.fileno() < 0:
            continue
        elif tag[0] == "listen":
            try:
                c, _ = key.fileobj.accept()
            except OSError:
                continue
            c.setblocking(False)
            conns.setdefault(tag[1], set()).add(c)
            sel.register(c, selectors.EVENT_READ, ("conn", tag[1]))
        else:
            c = key.fileobj
            try:
                d = c.recv(65536)
                if d:
                    c.sendall(d)
            except OSError:
                d = b""
            if not d:
                drop(c, tag[1])
"#;

struct Helper {
    proc: Proc,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Helper {
    async fn start(ns: &Netns, python: &Path, work: &Path) -> anyhow::Result<Helper> {
        let mut cmd = ns.command(python);
        cmd.args(["-u", "-c", HELPER_PY]);
        let mut proc = Proc::start("listener helper", cmd, work.join("helper.log"), true)?;
        let stdin = proc.child.stdin.take().context("helper stdin")?;
        let stdout = proc.child.stdout.take().context("helper stdout")?;
        let mut helper = Helper {
            proc,
            stdin,
            lines: BufReader::new(stdout).lines(),
        };
        let first = helper.read_line().await?;
        ensure!(
            first == "ready",
            "the helper said {first:?} instead of ready"
        );
        Ok(helper)
    }

    async fn read_line(&mut self) -> anyhow::Result<String> {
        match tokio::time::timeout(Duration::from_secs(5), self.lines.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!("the listener helper exited: {}", self.proc.log_tail()),
            Ok(Err(e)) => Err(e).context("reading from the listener helper"),
            Err(_) => bail!("the listener helper did not answer within 5 s"),
        }
    }

    async fn call(&mut self, line: &str) -> anyhow::Result<String> {
        let sent = async {
            self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
            self.stdin.flush().await
        };
        if let Err(e) = sent.await {
            bail!(
                "the listener helper is gone ({e}): {}",
                self.proc.log_tail()
            );
        }
        let answer = self.read_line().await?;
        match answer.strip_prefix("ok") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => bail!("helper: {line}: {answer}"),
        }
    }

    /// Listens on `addr:port`; returns when `listen()` returned.
    async fn open(&mut self, port: u16, addr: &str) -> anyhow::Result<SystemTime> {
        let ns: u64 = self
            .call(&format!("open {port} {addr}"))
            .await?
            .parse()
            .context("helper: bad time")?;
        Ok(UNIX_EPOCH + Duration::from_nanos(ns))
    }

    async fn close(&mut self, port: u16) -> anyhow::Result<()> {
        self.call(&format!("close {port}")).await.map(|_| ())
    }
}

// --- sshd inside the namespace ------------------------------------------------

/// `sshd -D -e` on the namespace's address, port 22, with a host key and a
/// client key made for this run.
struct Sshd {
    _proc: Proc,
    client_key: PathBuf,
    addr: Ipv4Addr,
}

impl Sshd {
    async fn start(ns: &Netns, work: &Path) -> anyhow::Result<Sshd> {
        // sshd refuses to start without its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        let dir = work.join("sshd");
        std::fs::create_dir_all(&dir)?;
        for key in ["host_key", "client_key"] {
            let mut cmd = Command::new("ssh-keygen");
            cmd.args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "porthole-bench",
                "-f",
            ])
            .arg(dir.join(key));
            let (status, _, stderr) = Proc::run(
                "ssh-keygen",
                cmd,
                work.join("ssh-keygen.log"),
                Duration::from_secs(10),
            )
            .await?;
            ensure!(status.success(), "ssh-keygen {key}: {}", stderr.trim());
        }
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
        let config = format!(
            "ListenAddress {addr}\n\
             Port 22\n\
             HostKey {dir}/host_key\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             PidFile none\n\
             StrictModes no\n\
             UsePAM no\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             AllowTcpForwarding yes\n\
             MaxStartups 100\n\
             LogLevel ERROR\n",
            addr = ns.inside,
            dir = dir.display(),
        );
        let config_path = dir.join("sshd_config");
        std::fs::write(&config_path, config)?;
        let mut cmd = ns.command(SSHD);
        cmd.args(["-D", "-e", "-f"]).arg(&config_path);
        let mut proc = Proc::start("sshd", cmd, work.join("sshd.log"), false)?;
        let addr = SocketAddr::new(ns.inside.into(), 22);
        let deadline = Instant::now() + DEADLINE;
        while TcpStream::connect(addr).await.is_err() {
            if let Some(status) = proc.exited() {
                bail!("sshd exited at start-up ({status}): {}", proc.log_tail());
            }
            ensure!(
                Instant::now() < deadline,
                "sshd did not listen on {addr} within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("sshd (pid {}) on {addr}", proc.pid);
        Ok(Sshd {
            _proc: proc,
            client_key: dir.join("client_key"),
            addr: ns.inside,
        })
    }

    /// Client options, as a user's `~/.ssh/config` entry would give them.
    fn options(&self) -> Vec<String> {
        vec![
            "User=root".into(),
            format!("IdentityFile={}", self.client_key.display()),
            "IdentitiesOnly=yes".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "StrictHostKeyChecking=no".into(),
            "BatchMode=yes".into(),
            "LogLevel=ERROR".into(),
        ]
    }

    fn ssh_args(&self) -> Vec<String> {
        self.options()
            .into_iter()
            .flat_map(|o| ["-o".to_string(), o])
            .collect()
    }

    fn destination(&self) -> String {
        format!("root@{}", self.addr)
    }
}

// --- Network namespace --------------------------------------------------------

/// /30 subnets in 198.18.0.0/15, numbered as the end-to-end tests number
/// them: the host interface `ph<X>h` is the lock on subnet X.
const SUBNETS: u32 = 1 << 15;

struct Netns {
    name: String,
    veth: String,
    host: Ipv4Addr,
    inside: Ipv4Addr,
}

impl Netns {
    fn create() -> anyhow::Result<Netns> {
        let pid = std::process::id();
        let name = format!("ph-bench-{pid}");
        // Only a dead process with our pid can have left this one behind.
        if Path::new("/run/netns").join(&name).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
        ip(&["netns", "add", &name]).map_err(|e| anyhow!(e))?;
        // From here on, Drop deletes it.
        let mut ns = Netns {
            name,
            veth: String::new(),
            host: Ipv4Addr::UNSPECIFIED,
            inside: Ipv4Addr::UNSPECIFIED,
        };
        let taken = host_ipv4_addrs();
        let start = pid.wrapping_mul(2_654_435_761) % SUBNETS;
        let mut last_err = String::from("every candidate subnet is in use on the host");
        for i in 0..4096 {
            let x = (start + i) % SUBNETS;
            let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 4 * x;
            // Also stay clear of subnets the host already uses (the demo's
            // namespace, for one).
            if taken.iter().any(|a| u32::from(*a) & !3 == base) {
                continue;
            }
            let veth = format!("ph{x}h");
            match ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ]) {
                Ok(()) => {
                    ns.veth = veth;
                    ns.host = Ipv4Addr::from(base + 1);
                    ns.inside = Ipv4Addr::from(base + 2);
                    break;
                }
                Err(e) if e.contains("File exists") => last_err = e,
                Err(e) => bail!("creating the veth pair of {}: {e}", ns.name),
            }
        }
        ensure!(
            !ns.veth.is_empty(),
            "no free /30 in 198.18.0.0/15: {last_err}"
        );
        let host_cidr = format!("{}/30", ns.host);
        let inside_cidr = format!("{}/30", ns.inside);
        let steps: [&[&str]; 5] = [
            &["addr", "add", &host_cidr, "dev", &ns.veth],
            &["link", "set", &ns.veth, "up"],
            &["-n", &ns.name, "link", "set", "lo", "up"],
            &["-n", &ns.name, "addr", "add", &inside_cidr, "dev", "eth0"],
            &["-n", &ns.name, "link", "set", "eth0", "up"],
        ];
        for step in steps {
            ip(step).map_err(|e| anyhow!("setting up {}: {e}", ns.name))?;
        }
        Ok(ns)
    }

    /// `ip netns exec NAME program`; `ip` execs, so the child's pid is the
    /// program's.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    fn pids(&self) -> Vec<u32> {
        std::process::Command::new("ip")
            .args(["netns", "pids", &self.name])
            .stderr(Stdio::null())
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn pids_named(&self, name: &str) -> Vec<u32> {
        self.pids()
            .into_iter()
            .filter(|pid| comm(*pid).as_deref() == Some(name))
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Only processes this bench started live in it: kill what is left,
        // by pid, and wait until it is gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                signal(pid, "KILL");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.veth.is_empty() {
            let _ = ip(&["link", "del", &self.veth]);
        }
        match ip(&["netns", "del", &self.name]) {
            Ok(()) => eprintln!("namespace {} deleted", self.name),
            Err(e) => eprintln!("warning: {e}"),
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// IPv4 addresses on the host's interfaces.
fn host_ipv4_addrs() -> Vec<Ipv4Addr> {
    let out = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

// --- Processes ------------------------------------------------------------------

/// A process this bench started. Dropping it stops it by pid (SIGTERM,
/// then SIGKILL, it and the children it had) and reaps it.
struct Proc {
    label: String,
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stderr (and stdout unless `piped`) going to `log`;
    /// with `piped`, stdin and stdout are pipes to the bench.
    fn start(label: &str, mut cmd: Command, log: PathBuf, piped: bool) -> anyhow::Result<Proc> {
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        if piped {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        } else {
            cmd.stdin(Stdio::null()).stdout(file.try_clone()?);
        }
        cmd.stderr(file);
        Proc::spawn(label, cmd, log)
    }

    /// Runs a short command to its end, within `limit` (else it is stopped
    /// like any other); its exit status, stdout, and stderr (via `log`).
    async fn run(
        label: &str,
        mut cmd: Command,
        log: PathBuf,
        limit: Duration,
    ) -> anyhow::Result<(ExitStatus, Vec<u8>, String)> {
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(file);
        let mut proc = Proc::spawn(label, cmd, log)?;
        let mut pipe = proc.child.stdout.take().context("no stdout pipe")?;
        let mut stdout = Vec::new();
        let finished = tokio::time::timeout(limit, async {
            pipe.read_to_end(&mut stdout).await?;
            proc.child.wait().await
        })
        .await;
        let status = match finished {
            Ok(status) => status.with_context(|| format!("running {label}"))?,
            Err(_) => bail!("{label} did not finish within {limit:?}"),
        };
        let stderr = std::fs::read_to_string(&proc.log).unwrap_or_default();
        Ok((status, stdout, stderr))
    }

    fn spawn(label: &str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Proc> {
        let child = cmd.spawn().with_context(|| format!("starting {label}"))?;
        let pid = child
            .id()
            .with_context(|| format!("{label} exited at once"))?;
        Ok(Proc {
            label: label.to_string(),
            child,
            pid,
            log,
        })
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of its log, on one line.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join(" / ");
        format!("{} (log {})", tail.trim(), self.log.display())
    }

    /// SIGTERM and its exit status; SIGKILL (and an error) if it is still
    /// running after `grace`.
    async fn stop(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        signal(self.pid, "TERM");
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                signal(self.pid, "KILL");
                let _ = tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await;
                bail!(
                    "{} (pid {}) still running {grace:?} after SIGTERM; killed",
                    self.label,
                    self.pid
                )
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let children: Vec<(u32, String)> = children_of(self.pid)
            .into_iter()
            .filter_map(|pid| Some((pid, comm(pid)?)))
            .collect();
        signal(self.pid, "TERM");
        let wait = |child: &mut tokio::process::Child, for_: Duration| {
            let deadline = Instant::now() + for_;
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            false
        };
        if !wait(&mut self.child, Duration::from_secs(3)) {
            eprintln!("{} (pid {}) ignored SIGTERM; SIGKILL", self.label, self.pid);
            signal(self.pid, "KILL");
            wait(&mut self.child, Duration::from_secs(2));
        }
        // What it started (tunnel-svc's ssh master) goes with it.
        for (pid, name) in children {
            if comm(pid).as_deref() == Some(name.as_str()) {
                signal(pid, "KILL");
            }
        }
    }
}

/// Sends signal `sig` (`TERM`, `KILL`) to `pid`.
fn signal(pid: u32, sig: &str) {
    use rustix::process::{kill_process, Pid, Signal};
    let signal = if sig == "KILL" {
        Signal::KILL
    } else {
        Signal::TERM
    };
    if let Some(pid) = Pid::from_raw(pid as i32) {
        let _ = kill_process(pid, signal);
    }
}

/// `(comm, ppid, utime+stime+cutime+cstime)` from /proc/PID/stat.
fn stat(pid: u32) -> Option<(String, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // Fields after "(comm)" start at 3 (state): ppid is 4, utime 14 ... cstime 17.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let ticks = field(14)? + field(15)? + field(16)? + field(17)?;
    Some((text[open + 1..close].to_string(), field(4)? as u32, ticks))
}

fn comm(pid: u32) -> Option<String> {
    stat(pid).map(|(c, _, _)| c)
}

fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| stat(*pid).is_some_and(|(_, ppid, _)| ppid == parent))
        .collect()
}

fn children_named(parent: u32, name: &str) -> Vec<u32> {
    children_of(parent)
        .into_iter()
        .filter(|pid| comm(*pid).as_deref() == Some(name))
        .collect()
}

fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| stat(*p))
        .map(|(_, _, t)| t)
        .sum()
}

/// Runs a short command (an `ssh -O`), bounded; its stderr on failure.
async fn run_quiet(cmd: Command, log: &Path) -> anyhow::Result<()> {
    let (status, _, stderr) =
        Proc::run("ssh -O", cmd, log.to_path_buf(), Duration::from_secs(5)).await?;
    ensure!(status.success(), "{status}: {}", stderr.trim());
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
        if let Some(status) = proc.exited() {
            bail!("{} exited ({status}): {}", proc.label, proc.log_tail());
        }
        ensure!(
            Instant::now() < deadline,
            "{} did not listen on 127.0.0.1:{port} within {DEADLINE:?}",
            proc.label
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// --- Set-up helpers -------------------------------------------------------------

struct Binaries {
    monitor: PathBuf,
    tunnel: PathBuf,
}

impl Binaries {
    /// target/release/examples/tunnel-bench -> target/release/{monitor-svc,tunnel-svc}
    fn locate() -> anyhow::Result<Binaries> {
        let exe = std::env::current_exe()?;
        let dir = exe
            .parent()
            .and_then(|examples| examples.parent())
            .context("locating target/<profile>/ from the bench executable")?;
        let find = |name: &str| -> anyhow::Result<PathBuf> {
            let bin = dir.join(name);
            ensure!(
                bin.is_file(),
                "{} not found: build it first with `cargo build --release -p monitor-svc -p tunnel-svc`",
                bin.display()
            );
            Ok(bin)
        };
        Ok(Binaries {
            monitor: find("monitor-svc")?,
            tunnel: find("tunnel-svc")?,
        })
    }
}

struct Tools {
    python: PathBuf,
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
            // The system python: a pyenv shim costs a lot at start-up.
            python: [Path::new("/usr/bin/python3")]
                .into_iter()
                .find(|p| p.is_file())
                .map_or_else(|| PathBuf::from("python3"), Path::to_path_buf),
            iperf3_version: first_line("iperf3", &["--version"], &|_| true),
            socat_version: first_line("socat", &["-V"], &|l| l.contains("socat version")),
            ssh_version: first_line("ssh", &["-V"], &|_| true),
            openssh,
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

fn version_of(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| format!("{} (`{}`)", s.trim(), bin.display()))
        .unwrap_or_else(|| bin.display().to_string())
}

/// The container ports the bench uses, all free on the host's loopback
/// (a busy host port would make tunnel-svc pick another one).
struct PortPlan {
    /// One warm-up port and [`LATENCY_PORTS`] more, per backend.
    latency: [Vec<u16>; 3],
    /// iperf3 servers: direct, socat, socat -b, ssh -L, then grpc, ssh,
    /// direct tunnels.
    iperf: [u16; 7],
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
            };
            let mut all = plan.latency.iter().flatten().chain(&plan.iperf);
            if free(plan.forward) && all.all(|p| free(*p)) {
                return Ok(plan);
            }
        }
        bail!("no block of 700 free ports found on the host between 24000 and 31000")
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// The bench's own directory for logs, keys and sockets: removed at the
/// end, kept (and named) when the run failed.
struct WorkDir {
    path: PathBuf,
    keep: std::cell::Cell<bool>,
}

impl WorkDir {
    fn create() -> anyhow::Result<WorkDir> {
        use std::os::unix::fs::DirBuilderExt;
        let path =
            std::env::temp_dir().join(format!("porthole-tunnel-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(WorkDir {
            path,
            keep: std::cell::Cell::new(false),
        })
    }

    fn keep(&self) {
        self.keep.set(true);
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep.get() {
            eprintln!("logs kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
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

fn euid() -> Option<u32> {
    Some(rustix::process::geteuid().as_raw())
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
