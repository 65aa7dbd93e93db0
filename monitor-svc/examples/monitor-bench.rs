//! Benchmark for monitor-svc: scan cost, detection latency, idle CPU and
//! RSS, and RSS under clients that never read.
//!
//! ```text
//! ulimit -n 20000
//! cargo run --release -p monitor-svc --example monitor-bench
//! ```
//!
//! Loopback only. Starts one real `monitor-svc` (built first, next to this
//! example's executable: `target/release/monitor-svc`) on
//! `127.0.0.1:<free port>` with the default interval, and stops it with
//! SIGTERM at the end; the port holder of the flood is the test kit's
//! helper. Processes and measurements come from `porthole-testkit`, as the
//! end-to-end tests' do. Progress goes to stderr; stdout is a markdown
//! report that can be pasted into the README.
#![forbid(unsafe_code)]

use anyhow::{bail, ensure, Context};
use monitor_svc::detect::Detector;
use monitor_svc::scan::{Scanner, Source};
use porthole::pb::v1::{
    port_events_client::PortEventsClient, watch_events_response::Kind, EventType,
    WatchEventsRequest,
};
use porthole_testkit::measure::{ms, nproc, Stats, XorShift};
use porthole_testkit::{cpu_time, MonitorProc, PortHolder};
use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Ports opened (and closed) one by one for the latency measurement.
const LATENCY_PORTS: usize = 200;
/// Upper bound of the random pause before each opening.
const MAX_GAP_MS: u64 = 100;
/// How long one event may take before the run is declared broken.
const EVENT_DEADLINE: Duration = Duration::from_secs(5);
/// `Detector::poll()` calls timed per (listeners, source).
const POLLS: usize = 50;
/// Extra TCP listeners held by the bench for the scan-cost cases.
const LISTENER_COUNTS: [usize; 3] = [10, 1_000, 10_000];
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// Monitor CPU window per scan-cost case.
const LOAD_WINDOW: Duration = Duration::from_secs(4);
/// Ports held, and the command-line padding of their process, for the
/// non-reading flood (command lines are cut at 4 KiB by the monitor).
const FLOOD_PORTS: u16 = 60;
const FLOOD_PAD: usize = 32 << 10;
/// Non-reading WatchEvents streams and unread `/port-events` responses.
const FLOOD_STREAMS: usize = 500;
const FLOOD_GETS: usize = 500;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let fd_limit = fd_soft_limit()?;
    let mut monitor = Monitor::start().await?;
    let measured = measure(&mut monitor, fd_limit).await;
    let stopped = monitor.stop().await;
    let mut results = measured?;
    let code = stopped?;
    report(&mut results, fd_limit);
    println!();
    println!(
        "monitor-svc stopped with SIGTERM: exit code {code}; whole run {:.1} s",
        started.elapsed().as_secs_f64()
    );
    ensure!(
        code == 0,
        "monitor-svc exited with {code} after SIGTERM (log: {})",
        monitor.dir.display()
    );
    // Kept when anything failed, for the error message above.
    let _ = std::fs::remove_dir_all(&monitor.dir);
    Ok(())
}

/// Everything one run measures, for [`report`].
struct Results {
    source: String,
    pid: u32,
    port: u16,
    /// Detection latency of each opening and closing.
    opened: Vec<Duration>,
    closed: Vec<Duration>,
    resyncs: usize,
    idle: Window,
    idle_memory: Memory,
    scans: Vec<ScanCost>,
    loads: Vec<Load>,
    /// Listener counts the fd limit left out, and why.
    skipped: Vec<String>,
    floods: Vec<Flooded>,
}

/// `Detector::poll()` in the bench process with `n` extra listeners.
struct ScanCost {
    n: usize,
    seen: usize,
    source: Source,
    first: Duration,
    poll: Stats,
    raw: Stats,
}

/// The running monitor with `n` extra listeners.
struct Load {
    n: usize,
    window: Window,
    last_scan: Duration,
    memory: Memory,
}

/// RSS around one flood of clients that never read.
struct Flooded {
    who: &'static str,
    idle_kib: u64,
    peak_kib: u64,
    after_kib: u64,
    refused: usize,
}

/// Runs every measurement; prints only progress (stderr).
async fn measure(monitor: &mut Monitor, fd_limit: u64) -> anyhow::Result<Results> {
    let metrics = monitor.metrics().await?;

    // --- Detection latency -------------------------------------------------
    let mut events = watch(monitor.addr).await?;
    let mut rng = XorShift::seeded();
    let mut opened = Vec::with_capacity(LATENCY_PORTS);
    let mut closed = Vec::with_capacity(LATENCY_PORTS);
    eprintln!("latency: opening {LATENCY_PORTS} ports, 0-{MAX_GAP_MS} ms apart");
    for i in 0..LATENCY_PORTS {
        tokio::time::sleep(Duration::from_millis(rng.next_u64() % (MAX_GAP_MS + 1))).await;
        let listener = TcpListener::bind("127.0.0.1:0").context("binding a latency listener")?;
        let listened = Instant::now();
        let key = format!("tcp:127.0.0.1:{}", listener.local_addr()?.port());
        let seen = events.wait(&key, true).await?;
        opened.push(seen.saturating_duration_since(listened));
        // A random phase for the closing too (the opened event arrived just
        // after a scan).
        tokio::time::sleep(Duration::from_millis(rng.next_u64() % (MAX_GAP_MS + 1))).await;
        drop(listener);
        let closing = Instant::now();
        let seen = events.wait(&key, false).await?;
        closed.push(seen.saturating_duration_since(closing));
        if (i + 1) % 50 == 0 {
            eprintln!("latency: {} / {LATENCY_PORTS}", i + 1);
        }
    }

    // --- Idle CPU and RSS --------------------------------------------------
    eprintln!(
        "idle: measuring monitor CPU over {} s",
        IDLE_WINDOW.as_secs()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = monitor.window(IDLE_WINDOW).await?;
    let idle_memory = monitor.memory()?;

    // --- Scan cost, and the monitor under the same load --------------------
    let mut scans = Vec::new();
    let mut loads = Vec::new();
    let mut skipped = Vec::new();
    let mut listeners: Vec<TcpListener> = Vec::new();
    for n in LISTENER_COUNTS {
        let open_fds = std::fs::read_dir("/proc/self/fd")?.count() as u64;
        let need = n as u64 - listeners.len() as u64 + open_fds + 64;
        if need > fd_limit {
            let line = format!(
                "skipped {n}: raise the fd limit with `ulimit -n 20000` (soft limit {fd_limit}, need about {need})"
            );
            eprintln!("{line}");
            skipped.push(line);
            continue;
        }
        eprintln!("scan cost: {n} listeners");
        while listeners.len() < n {
            listeners.push(
                TcpListener::bind("127.0.0.1:0")
                    .with_context(|| format!("binding listener {} of {n}", listeners.len() + 1))?,
            );
        }
        for source in [Source::Netlink, Source::Procfs] {
            scans.push(scan_cost(n, source).await?);
        }
        // Let the monitor see them all (and resolve their owner) before
        // measuring it. One scan's changes land together, so the last one
        // bound stands for all.
        let last_key = format!("tcp:127.0.0.1:{}", listeners[n - 1].local_addr()?.port());
        let what = format!("the monitor to list {last_key}");
        let listed = |p: &porthole::pb::v1::Port| p.key == last_key;
        monitor
            .proc
            .wait_listed(&what, Duration::from_secs(20), listed)
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let window = monitor.window(LOAD_WINDOW).await?;
        let last_scan = monitor.metrics().await?.last_scan;
        let memory = monitor.memory()?;
        loads.push(Load {
            n,
            window,
            last_scan,
            memory,
        });
    }
    drop(listeners);

    // --- Clients that never read -------------------------------------------
    let holder_log = monitor.dir.join("holder.log");
    let hold = PortHolder::command(
        std::process::Command::new,
        "127.0.0.1",
        0,
        FLOOD_PORTS,
        FLOOD_PAD,
    );
    let mut holder = PortHolder::start(hold, holder_log);
    let mut floods = Vec::new();
    for token in [None, Some(monitor.token())] {
        let who = if token.is_some() {
            "with the token (command lines)"
        } else {
            "anonymous"
        };
        eprintln!("flood: {who}");
        floods.push(flood(monitor, who, token, &mut holder).await?);
    }
    Ok(Results {
        source: metrics.source,
        pid: monitor.pid(),
        port: monitor.addr.port(),
        opened,
        closed,
        resyncs: events.resyncs,
        idle,
        idle_memory,
        scans,
        loads,
        skipped,
        floods,
    })
}

/// Prints the markdown report of one run (stdout).
fn report(r: &mut Results, fd_limit: u64) {
    println!("## monitor-svc benchmark\n");
    println!("| machine | |");
    println!("| --- | --- |");
    println!("| cores (`nproc`) | {} |", nproc());
    println!("| kernel | {} |", read_trim("/proc/sys/kernel/osrelease"));
    println!("| fd soft limit | {fd_limit} |");
    println!(
        "| monitor interval | 100 ms (the default, given as `--interval 100ms`; log level info) |"
    );
    println!("| monitor source | {} (auto) |", r.source);
    println!("| monitor | pid {}, `127.0.0.1:{}` |", r.pid, r.port);

    println!();
    println!(
        "### Detection latency ({LATENCY_PORTS} ports, one at a time, random 0-{MAX_GAP_MS} ms before each open and each close)\n"
    );
    println!("From `listen()` (or `close()`) in the bench to the event arriving on a `WatchEvents` stream.\n");
    println!("| event | n | p50 | p90 | p99 | max | target | met |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |");
    for (name, samples) in [("opened", &mut r.opened), ("closed", &mut r.closed)] {
        let s = Stats::of(samples);
        let (target, met) = if name == "opened" {
            let met = s.p50 <= Duration::from_millis(100) && s.p99 <= Duration::from_millis(250);
            (
                "p50 ≤ 100 ms, p99 ≤ 250 ms",
                if met { "yes" } else { "**no**" },
            )
        } else {
            ("(none)", "")
        };
        println!(
            "| {name} | {} | {} | {} | {} | {} | {target} | {met} |",
            samples.len(),
            ms(s.p50),
            ms(s.p90),
            ms(s.p99),
            ms(s.max)
        );
    }
    if r.resyncs > 0 {
        println!(
            "\n(the stream was resynced {} times during the run)",
            r.resyncs
        );
    }

    let idle = &r.idle;
    println!();
    println!("### Idle monitor (no port changes, one WatchEvents stream open)\n");
    println!("| metric | value | target | met |");
    println!("| --- | ---: | --- | --- |");
    println!(
        "| CPU over {} s (utime+stime) | {:.2} % of one core | ≤ 0.5 % | {} |",
        IDLE_WINDOW.as_secs(),
        idle.cpu_percent,
        if idle.cpu_percent <= 0.5 {
            "yes"
        } else {
            "**no**"
        }
    );
    if let Some(precise) = idle.sched_percent {
        println!(
            "| CPU over {} s (schedstat, ns) | {precise:.3} % of one core | | |",
            IDLE_WINDOW.as_secs()
        );
    }
    println!(
        "| scans per second | {:.1} | 10 (100 ms) | |",
        idle.scans_per_sec
    );
    println!("| mean scan duration | {} | | |", ms(idle.mean_scan));
    println!("| ports seen | {} | | |", idle.ports);
    println!("| VmRSS | {} | | |", kib(r.idle_memory.rss_kib));
    println!(
        "| VmHWM (peak RSS so far) | {} | | |",
        kib(r.idle_memory.hwm_kib)
    );

    println!();
    println!(
        "### Scan cost (`Detector::poll()` in the bench process, {POLLS} polls after the first)\n"
    );
    println!(
        "The first poll of a fresh `Detector` also resolves every socket's owning process (walks `/proc/*/fd`); later polls reuse that.\n"
    );
    println!(
        "| extra listeners | sockets seen | source | first poll (process lookup) | poll median | poll p99 | `Scanner::scan()` alone, median |"
    );
    println!("| ---: | ---: | --- | ---: | ---: | ---: | ---: |");
    for c in &r.scans {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            c.n,
            c.seen,
            c.source,
            ms(c.first),
            ms(c.poll.p50),
            ms(c.poll.p99),
            ms(c.raw.p50)
        );
    }
    for line in &r.skipped {
        println!("\n{line}");
    }
    println!();
    println!(
        "### The running monitor with the bench's listeners (default interval, {} s CPU window)\n",
        LOAD_WINDOW.as_secs()
    );
    println!(
        "| extra listeners | ports seen | last scan (`porthole_monitor_last_scan_duration_seconds`) | mean scan | CPU (one core) | VmRSS | VmHWM |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for l in &r.loads {
        println!(
            "| {} | {} | {} | {} | {:.2} % | {} | {} |",
            l.n,
            l.window.ports,
            ms(l.last_scan),
            ms(l.window.mean_scan),
            l.window.cpu_percent,
            kib(l.memory.rss_kib),
            kib(l.memory.hwm_kib)
        );
    }

    println!();
    println!(
        "### Clients that never read ({FLOOD_STREAMS} WatchEvents streams on 5 connections with 64 KiB windows, \
         {FLOOD_GETS} `GET /port-events` never read, {FLOOD_PORTS} ports whose process has a {} KiB command line, \
         ports opening and closing meanwhile)\n",
        FLOOD_PAD >> 10
    );
    println!(
        "| clients | idle RSS | peak RSS | RSS 10 s after they left | streams refused | target |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | --- |");
    for f in &r.floods {
        let met = f.peak_kib <= 64 * 1024 && f.after_kib <= 2 * f.idle_kib;
        println!(
            "| {} | {} | {} | {} | {} | ≤ 64 MiB, back within 2× idle: {} |",
            f.who,
            kib(f.idle_kib),
            kib(f.peak_kib),
            kib(f.after_kib),
            f.refused,
            if met { "yes" } else { "**no**" }
        );
    }
}

/// Floods the monitor with clients that never read; its RSS before,
/// during and after.
async fn flood(
    monitor: &Monitor,
    who: &'static str,
    token: Option<&porthole::auth::Token>,
    holder: &mut PortHolder,
) -> anyhow::Result<Flooded> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_kib = monitor.memory()?.rss_kib;
    let flood = porthole_testkit::flood(monitor.addr, token, FLOOD_STREAMS, FLOOD_GETS)
        .await
        .map_err(anyhow::Error::msg)?;
    let refused = flood.refused;
    let mut peak_kib = 0;
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        holder.churn();
        peak_kib = peak_kib.max(monitor.memory()?.rss_kib);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(flood);
    tokio::time::sleep(Duration::from_secs(10)).await;
    Ok(Flooded {
        who,
        idle_kib,
        peak_kib,
        after_kib: monitor.memory()?.rss_kib,
        refused,
    })
}

/// One scan-cost row: a fresh detector on `source`, its first poll, then
/// [`POLLS`] more.
async fn scan_cost(n: usize, source: Source) -> anyhow::Result<ScanCost> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<ScanCost> {
        let scanner = Scanner::with_source(source).with_context(|| format!("opening {source}"))?;
        let mut detector = Detector::new(scanner);
        let t = Instant::now();
        let first = detector.poll().with_context(|| format!("{source} scan"))?;
        let first_took = t.elapsed();
        let mut samples = Vec::with_capacity(POLLS);
        let mut seen = first.len();
        for _ in 0..POLLS {
            let t = Instant::now();
            seen = detector
                .poll()
                .with_context(|| format!("{source} scan"))?
                .len();
            samples.push(t.elapsed());
        }
        let s = Stats::of(&mut samples);
        // The source alone, without keys, owners and maps.
        let mut scanner =
            Scanner::with_source(source).with_context(|| format!("opening {source}"))?;
        let mut raw = Vec::with_capacity(POLLS);
        for _ in 0..POLLS {
            let t = Instant::now();
            scanner.scan().with_context(|| format!("{source} scan"))?;
            raw.push(t.elapsed());
        }
        Ok(ScanCost {
            n,
            seen,
            source,
            first: first_took,
            poll: s,
            raw: Stats::of(&mut raw),
        })
    })
    .await?
}

// --- The monitor process -----------------------------------------------------

/// The kit's monitor on the host's loopback, and where its files are.
struct Monitor {
    proc: MonitorProc,
    addr: SocketAddr,
    dir: PathBuf,
}

struct Window {
    cpu_percent: f64,
    sched_percent: Option<f64>,
    scans_per_sec: f64,
    mean_scan: Duration,
    ports: u64,
}

struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

impl Monitor {
    /// monitor-svc at its default interval and log level (the kit's
    /// `PORTHOLE_*` are overridden by flags), with a token of its own.
    async fn start() -> anyhow::Result<Monitor> {
        let dir = std::env::temp_dir().join(format!("monitor-bench-{}", std::process::id()));
        let args = ["--interval", "100ms", "--log-level", "info"];
        let proc = MonitorProc::on_host(&dir, &args).await;
        let addr = proc.addr();
        eprintln!(
            "started monitor-svc (pid {}) on {addr}; logs in {}",
            proc.pid(),
            dir.display()
        );
        Ok(Monitor { proc, addr, dir })
    }

    async fn metrics(&self) -> anyhow::Result<Metrics> {
        Metrics::parse(&http_get(self.addr, "/metrics").await?)
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn token(&self) -> &porthole::auth::Token {
        self.proc.token()
    }

    /// CPU of the monitor over `window`, and its scan rate in the same span.
    async fn window(&self, window: Duration) -> anyhow::Result<Window> {
        let m0 = self.metrics().await?;
        let (c0, s0, t0) = (cpu_time(self.pid()), self.sched_nanos(), Instant::now());
        tokio::time::sleep(window).await;
        let (c1, s1, t1) = (cpu_time(self.pid()), self.sched_nanos(), Instant::now());
        let m1 = self.metrics().await?;
        let wall = (t1 - t0).as_secs_f64();
        let scans = m1.scans.saturating_sub(m0.scans);
        let scan_secs = (m1.scan_sum_secs - m0.scan_sum_secs).max(0.0);
        Ok(Window {
            cpu_percent: (c1 - c0).as_secs_f64() / wall * 100.0,
            sched_percent: match (s0, s1) {
                // Threads that exit in the window take their count with them.
                (Some(a), Some(b)) if b >= a => Some((b - a) as f64 / 1e9 / wall * 100.0),
                _ => None,
            },
            scans_per_sec: scans as f64 / wall,
            mean_scan: Duration::from_secs_f64(if scans > 0 {
                scan_secs / scans as f64
            } else {
                0.0
            }),
            ports: m1.ports,
        })
    }

    /// Nanoseconds on CPU summed over the monitor's live threads
    /// (/proc/PID/task/*/schedstat), if the kernel has schedstat.
    fn sched_nanos(&self) -> Option<u64> {
        let mut total = 0;
        for task in std::fs::read_dir(format!("/proc/{}/task", self.pid())).ok()? {
            let text = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
            total += text.split_whitespace().next()?.parse::<u64>().ok()?;
        }
        Some(total)
    }

    fn memory(&self) -> anyhow::Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let get = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .with_context(|| format!("no {name} in /proc/PID/status"))?;
            Ok(line.trim().trim_end_matches("kB").trim().parse()?)
        };
        Ok(Memory {
            rss_kib: get("VmRSS:")?,
            hwm_kib: get("VmHWM:")?,
        })
    }

    /// SIGTERM (by pid) and the exit code.
    async fn stop(&mut self) -> anyhow::Result<i32> {
        if let Some(status) = self.proc.proc().try_wait() {
            bail!(
                "monitor-svc had already exited with {status}; see {}",
                self.dir.display()
            );
        }
        let status = self.proc.terminate().await;
        status
            .code()
            .with_context(|| format!("monitor-svc killed by a signal: {status}"))
    }
}

/// The few values of `GET /metrics` the bench reads.
struct Metrics {
    source: String,
    scans: u64,
    scan_sum_secs: f64,
    last_scan: Duration,
    ports: u64,
}

impl Metrics {
    fn parse(text: &str) -> anyhow::Result<Metrics> {
        let mut m = Metrics {
            source: String::new(),
            scans: 0,
            scan_sum_secs: 0.0,
            last_scan: Duration::ZERO,
            ports: 0,
        };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if let Some(labels) = name.strip_prefix("porthole_monitor_scans_total") {
                m.scans = value.parse()?;
                m.source = labels
                    .trim_start_matches("{source=\"")
                    .trim_end_matches("\"}")
                    .to_string();
            } else if name == "porthole_monitor_scan_duration_seconds_sum" {
                m.scan_sum_secs = value.parse()?;
            } else if name == "porthole_monitor_last_scan_duration_seconds" {
                m.last_scan = Duration::from_secs_f64(value.parse()?);
            } else if name == "porthole_monitor_ports" {
                m.ports = value.parse()?;
            }
        }
        ensure!(
            !m.source.is_empty(),
            "no porthole_monitor_scans_total in /metrics:\n{text}"
        );
        Ok(m)
    }
}

/// A plain HTTP/1.1 GET; the body of a 200 answer.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let answer = porthole_testkit::http(addr, "GET", path, &[]).await?;
    ensure!(answer.status == 200, "GET {path}: {}", answer.status);
    Ok(answer.body)
}

// --- The WatchEvents stream --------------------------------------------------

enum Seen {
    Event { opened: bool, key: String },
    Snapshot(HashSet<String>),
}

struct Events {
    rx: mpsc::UnboundedReceiver<anyhow::Result<(Instant, Seen)>>,
    resyncs: usize,
}

/// Opens a WatchEvents stream; a task stamps each message as it arrives.
async fn watch(addr: SocketAddr) -> anyhow::Result<Events> {
    let mut client = PortEventsClient::connect(format!("http://{addr}")).await?;
    let mut stream = client
        .watch_events(WatchEventsRequest::default())
        .await?
        .into_inner();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let item = match stream.message().await {
                Ok(Some(item)) => item,
                Ok(None) => {
                    let _ = tx.send(Err(anyhow::anyhow!("WatchEvents stream ended")));
                    return;
                }
                Err(status) => {
                    let _ = tx.send(Err(anyhow::anyhow!("WatchEvents stream failed: {status}")));
                    return;
                }
            };
            let at = Instant::now();
            let seen = match item.kind {
                Some(Kind::Event(e)) => Seen::Event {
                    opened: e.r#type() == EventType::Opened,
                    key: e.port.map(|p| p.key).unwrap_or_default(),
                },
                Some(Kind::Snapshot(s)) => {
                    Seen::Snapshot(s.ports.into_iter().map(|p| p.key).collect())
                }
                None => continue,
            };
            if tx.send(Ok((at, seen))).is_err() {
                return;
            }
        }
    });
    let mut events = Events { rx, resyncs: 0 };
    // The stream starts with a snapshot.
    match events.next().await? {
        (_, Seen::Snapshot(_)) => Ok(events),
        _ => bail!("WatchEvents did not start with a snapshot"),
    }
}

impl Events {
    async fn next(&mut self) -> anyhow::Result<(Instant, Seen)> {
        match tokio::time::timeout(EVENT_DEADLINE, self.rx.recv()).await {
            Ok(Some(item)) => item,
            Ok(None) => bail!("WatchEvents reader stopped"),
            Err(_) => bail!("no message on WatchEvents for {EVENT_DEADLINE:?}"),
        }
    }

    /// When `key` was reported opened (or closed). A snapshot (after a
    /// resync) that shows the new state counts too.
    async fn wait(&mut self, key: &str, want_open: bool) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + EVENT_DEADLINE;
        loop {
            ensure!(
                Instant::now() < deadline,
                "{key} not reported {} within {EVENT_DEADLINE:?}",
                if want_open { "opened" } else { "closed" }
            );
            let (at, seen) = self
                .next()
                .await
                .with_context(|| format!("waiting for {key}"))?;
            match seen {
                Seen::Event { opened, key: k } if opened == want_open && k == key => return Ok(at),
                Seen::Event { .. } => {}
                Seen::Snapshot(keys) => {
                    self.resyncs += 1;
                    if keys.contains(key) == want_open {
                        return Ok(at);
                    }
                }
            }
        }
    }
}

// --- Small helpers -----------------------------------------------------------

fn kib(k: u64) -> String {
    format!("{:.1} MiB", k as f64 / 1024.0)
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("? ({e})"))
}

/// Soft "Max open files" from /proc/self/limits.
fn fd_soft_limit() -> anyhow::Result<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no \"Max open files\" in /proc/self/limits")?;
    let soft = line["Max open files".len()..]
        .split_whitespace()
        .next()
        .context("malformed Max open files line")?;
    Ok(if soft == "unlimited" {
        u64::MAX
    } else {
        soft.parse()?
    })
}
