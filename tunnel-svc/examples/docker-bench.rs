//! Benchmark for `tunnel-svc --docker` against the real Docker engine:
//! how soon a container's server answers on the host's localhost after
//! `docker run`, how soon a port opened in a running container does, and
//! what the exec-stream transport carries beside the container's own
//! address (no relay) and beside the engine's exec stream alone, in one
//! stream and in four at once.
//!
//! Then the same `run` latency and one download on every engine there
//! is: Docker, Podman rootful, Podman rootless (as a user without root)
//! and a remote Podman reached over `ssh://` (a namespace with its own
//! sshd), each in one run beside the others.
//!
//! ```text
//! cargo build --release -p tunnel-svc --example docker-bench
//! sudo ./target/release/examples/docker-bench
//! ```
//!
//! Needs root, a Docker engine and Debian's `busybox-static`. Images,
//! networks and containers come from `porthole-testkit` (an image holding
//! only busybox, a network in 198.19.0.0/16) and are removed at the end;
//! tunnel-svc and the static monitor are built first when cargo is at hand.
//! Progress goes to stderr; stdout is a markdown report, printed once
//! everything is measured.
#![forbid(unsafe_code)]

use porthole_testkit::docker::{
    docker, have_docker, have_podman, static_monitor, Cli, Container, Image, Network, World,
};
use porthole_testkit::measure::{ms, nproc, Stats};
use porthole_testkit::{unused_local_port, Netns, TunnelProc};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Containers started one after another for the `docker run` latency.
const RUNS: usize = 20;
/// Ports opened one after another in one running container.
const OPENS: usize = 20;
/// Bytes moved per throughput run.
const BYTES: u64 = 512 << 20;
/// How long a port may take to become usable before it counts as failed.
const DEADLINE: Duration = Duration::from_secs(10);
/// Containers started one after another on each engine.
const ENGINE_RUNS: usize = 10;

/// One engine's row: `run` → usable on localhost, and one download.
struct EngineRow {
    engine: &'static str,
    /// How tunnel bytes went (the target's `via`).
    via: String,
    run: Vec<Duration>,
    run_failed: usize,
    download: Result<f64, String>,
}

struct Results {
    run: Vec<Duration>,
    run_failed: usize,
    /// `docker stop` returned → the host port is free again.
    stop: Vec<Duration>,
    stop_failed: usize,
    open: Vec<Duration>,
    open_failed: usize,
    /// (path, Gbit/s from the container to the host client).
    throughput: Vec<(&'static str, Result<f64, String>)>,
    /// tunnel-svc's RSS: idle, with [`RUNS`] containers at once, after
    /// they are gone.
    rss: [u64; 3],
    engines: Vec<EngineRow>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !have_docker("docker-bench") {
        std::process::exit(1);
    }
    // A signal drops the measurement, and with it every container,
    // network and image it made.
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            eprintln!("docker-bench: cannot handle signals");
            std::process::exit(1);
        }
    };
    tokio::select! {
        r = measure() => report(&r),
        _ = term.recv() => eprintln!("terminated; cleaned up"),
        _ = int.recv() => eprintln!("interrupted; cleaned up"),
    }
}

/// The first line of `GET /` on the host's 127.0.0.1:`port`, if it answers.
async fn answers(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await?;
        std::io::Result::Ok(head.starts_with(b"HTTP/1."))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), io).await,
        Ok(Ok(true))
    )
}

/// Time from `since` until `port` answers, polling every millisecond.
async fn usable(port: u16, since: Instant) -> Option<Duration> {
    while since.elapsed() < DEADLINE {
        if answers(port).await {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

/// Reads `GET /big` from `addr` to the end; Gbit/s.
async fn download(addr: SocketAddr) -> Result<f64, String> {
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.write_all(b"GET /big HTTP/1.0\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    if total < BYTES {
        return Err(format!("only {total} bytes arrived"));
    }
    Ok(total as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e9)
}

/// Reads [`BYTES`] of `/tmp/w/big` out of `container` through `streams`
/// `docker exec` processes at once, each its share; Gbit/s together.
fn exec_read(container: &str, streams: u64) -> Result<f64, String> {
    use std::io::Read;
    let share = BYTES / streams;
    let started = Instant::now();
    let readers: Vec<_> = (0..streams)
        .map(|i| {
            let args = [
                "exec".to_string(),
                container.to_string(),
                "/bin/busybox".into(),
                "sh".into(),
                "-c".into(),
                format!(
                    "/bin/busybox tail -c +{} /tmp/w/big | /bin/busybox head -c {share}",
                    i * share + 1
                ),
            ];
            std::thread::spawn(move || -> Result<u64, String> {
                let mut child = std::process::Command::new("docker")
                    .args(&args)
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .map_err(|e| format!("docker exec: {e}"))?;
                let mut out = child.stdout.take().expect("piped");
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                loop {
                    match out.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(e) => return Err(e.to_string()),
                    }
                }
                let _ = child.wait();
                Ok(total)
            })
        })
        .collect();
    let mut total = 0;
    for reader in readers {
        total += reader
            .join()
            .map_err(|_| "a reader panicked".to_string())??;
    }
    if total < share * streams {
        return Err(format!("only {total} bytes arrived"));
    }
    Ok(total as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e9)
}

async fn measure() -> Results {
    let (image, net) = (Image::busybox(), Network::new());
    let label = format!("porthole.bench={}", porthole_testkit::docker::unique("b"));
    let extra = ["--label", label.as_str()];
    let ns = Netns::new();
    let tunnel = tunnel_svc(&ns, &label, "auto").await;
    let mut r = Results {
        run: Vec::new(),
        run_failed: 0,
        stop: Vec::new(),
        stop_failed: 0,
        open: Vec::new(),
        open_failed: 0,
        throughput: Vec::new(),
        rss: [porthole_testkit::rss(tunnel.pid()), 0, 0],
        engines: Vec::new(),
    };

    eprintln!("docker run → localhost, {RUNS} containers");
    for i in 0..RUNS {
        let port = unused_local_port();
        let started = Instant::now();
        let c = Container::http(&image, &net, &extra, "127.0.0.1", port, "bench");
        match usable(port, started).await {
            Some(took) => r.run.push(took),
            None => r.run_failed += 1,
        }
        c.docker("stop");
        let stopped = Instant::now();
        while !porthole_testkit::host_port_is_free(port) && stopped.elapsed() < DEADLINE {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if porthole_testkit::host_port_is_free(port) {
            r.stop.push(stopped.elapsed());
        } else {
            r.stop_failed += 1;
        }
        drop(c);
        if (i + 1) % 5 == 0 {
            eprintln!("  {} / {RUNS}", i + 1);
        }
    }

    eprintln!("port opened in a running container → localhost, {OPENS} ports");
    let idle = Container::run(&image, &net, &extra, &["/bin/busybox", "sleep", "3600"]);
    for _ in 0..OPENS {
        let port = unused_local_port();
        let cmd = format!("/bin/busybox httpd -p 127.0.0.1:{port} -h /tmp");
        let started = Instant::now();
        if let Err(e) = docker(&["exec", "-d", &idle.name, "/bin/sh", "-c", &cmd]) {
            eprintln!("  {e}");
            r.open_failed += 1;
            continue;
        }
        match usable(port, started).await {
            Some(took) => r.open.push(took),
            None => r.open_failed += 1,
        }
    }
    drop(idle);

    eprintln!("memory: {RUNS} containers at once, then none");
    let ports: Vec<u16> = (0..RUNS).map(|_| unused_local_port()).collect();
    let many: Vec<Container> = ports
        .iter()
        .map(|&port| Container::http(&image, &net, &extra, "0.0.0.0", port, "mem"))
        .collect();
    for &port in &ports {
        if usable(port, Instant::now()).await.is_none() {
            eprintln!("  port {port} never answered");
        }
    }
    r.rss[1] = porthole_testkit::rss(tunnel.pid());
    drop(many);
    let deadline = Instant::now() + DEADLINE;
    while !tunnel.targets().await.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // tunnel-svc hands memory back on its next 2 s look: the lowest RSS
    // within 5 s of the last container going.
    let gone = Instant::now();
    r.rss[2] = porthole_testkit::rss(tunnel.pid());
    while gone.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        r.rss[2] = r.rss[2].min(porthole_testkit::rss(tunnel.pid()));
    }

    eprintln!("throughput: {} MiB from the container", BYTES >> 20);
    let port = unused_local_port();
    let script = format!(
        "mkdir -p /tmp/w && /bin/busybox dd if=/dev/zero of=/tmp/w/big bs=1M count={} 2>/dev/null \
         && exec /bin/busybox httpd -f -p 0.0.0.0:{port} -h /tmp/w",
        BYTES >> 20
    );
    drop(tunnel);
    let big = Container::run(&image, &net, &extra, &["/bin/sh", "-c", &script]);
    let ip = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &big.name,
    ])
    .ok()
    .and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
    if let Some(ip) = ip {
        let direct = SocketAddr::new(ip, port);
        let deadline = Instant::now() + DEADLINE;
        while tokio::net::TcpStream::connect(direct).await.is_err() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        r.throughput
            .push(("container address, no relay", download(direct).await));
    }
    for (transport, path) in [
        (
            "exec",
            "tunnel-svc --docker-transport exec (the exec stream)",
        ),
        (
            "ip",
            "tunnel-svc --docker-transport ip (the monitor on the container's address)",
        ),
    ] {
        let tunnel = tunnel_svc(&ns, &label, transport).await;
        // Connections dial the way the target says once it says it.
        let wanted = format!(" via {transport}");
        tunnel
            .wait_target("the transport measured", |t| t.url.contains(&wanted))
            .await;
        let result = match usable(port, Instant::now()).await {
            Some(_) => download(SocketAddr::from(([127, 0, 0, 1], port))).await,
            None => Err("the tunnel never answered".into()),
        };
        r.throughput.push((path, result));
        drop(tunnel);
        // The next tunnel-svc takes the same host port.
        let deadline = Instant::now() + DEADLINE;
        while !porthole_testkit::host_port_is_free(port) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The engine's exec stream by itself: the file read by `docker exec`,
    // in one stream and split over several at once (what a pool of exec
    // streams per container would carry together).
    for streams in [1u64, 4] {
        let path = if streams == 1 {
            "`docker exec … head -c` (the engine's exec stream, no tunnel-svc)"
        } else {
            "`docker exec … head -c`, 4 streams at once, a quarter each (together)"
        };
        r.throughput.push((path, exec_read(&big.name, streams)));
    }
    drop(big);
    r.engines = engines().await;
    r
}

/// The engine rows: Docker, then each Podman there is.
async fn engines() -> Vec<EngineRow> {
    let mut rows = vec![engine_row("Docker", World::new()).await];
    if have_podman("docker-bench: Podman rows") {
        rows.push(engine_row("Podman, rootful", World::on(Cli::Podman)).await);
        rows.push(engine_row("Podman, rootless", World::on(Cli::RootlessPodman)).await);
        rows.push(engine_row("Podman over ssh://", World::remote().await).await);
    }
    rows
}

/// [`ENGINE_RUNS`] containers started one after another on `w`'s engine
/// (a busybox httpd on the container's 127.0.0.1), each until it answers
/// on the host's localhost; then one download of [`BYTES`].
async fn engine_row(engine: &'static str, w: World) -> EngineRow {
    eprintln!("{engine}: run → localhost, {ENGINE_RUNS} containers, then a download");
    let tunnel = w
        .tunnel_svc(&["--log-level", "warn", "--max-tunnels", "1000"])
        .await;
    let mut row = EngineRow {
        engine,
        via: String::new(),
        run: Vec::new(),
        run_failed: 0,
        download: Err("not measured".into()),
    };
    for _ in 0..ENGINE_RUNS {
        let port = unused_local_port();
        let started = Instant::now();
        let c = w.http("127.0.0.1", port, "bench");
        match usable(port, started).await {
            Some(took) => row.run.push(took),
            None => row.run_failed += 1,
        }
        drop(c);
    }
    let port = unused_local_port();
    let script = format!(
        "mkdir -p /tmp/w && /bin/busybox dd if=/dev/zero of=/tmp/w/big bs=1M count={} 2>/dev/null \
         && exec /bin/busybox httpd -f -p 127.0.0.1:{port} -h /tmp/w",
        BYTES >> 20
    );
    let big = w.run(&[], &["/bin/sh", "-c", &script]);
    row.download = match usable(port, Instant::now()).await {
        Some(_) => download(SocketAddr::from(([127, 0, 0, 1], port))).await,
        None => Err("the tunnel never answered".into()),
    };
    row.via = tunnel
        .targets()
        .await
        .into_iter()
        .find(|t| t.name == big.name)
        .and_then(|t| {
            let via = t.url.split(" via ").nth(1)?;
            // `ip ADDRESS:PORT on ENGINE` or `exec …`: the kind.
            Some(via.split_whitespace().next().unwrap_or(via).to_string())
        })
        .unwrap_or_default();
    drop(big);
    row
}

/// tunnel-svc --docker following the bench's containers, with `transport`.
async fn tunnel_svc(ns: &Netns, label: &str, transport: &str) -> TunnelProc {
    let monitor = static_monitor().display().to_string();
    let filter = format!("label={label}");
    let args = [
        "--docker",
        "--monitor-binary",
        &monitor,
        "--docker-filter",
        &filter,
        "--docker-transport",
        transport,
        "--log-level",
        "warn",
        // Every port the bench opens stays open.
        "--max-tunnels",
        "1000",
    ];
    TunnelProc::start(ns, &args).await
}

fn report(r: &Results) {
    println!("## tunnel-svc --docker benchmark\n");
    println!("| machine | |\n| --- | --- |");
    println!("| cores (`nproc`) | {} |", nproc());
    if let Ok(v) = docker(&["version", "--format", "{{.Server.Version}}"]) {
        println!("| Docker engine | {v} |");
    }
    println!();
    println!("| what | n | p50 | p90 | p99 | max | failed | target |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for (what, samples, failed, target) in [
        (
            "`docker run` (busybox httpd on 127.0.0.1) → answers on the host's localhost (`--docker-transport auto`)",
            &r.run,
            r.run_failed,
            "p50 ≤ 1 s, p99 ≤ 2 s",
        ),
        (
            "`docker stop` returns → the host port is free",
            &r.stop,
            r.stop_failed,
            "the 2 s restart window (a `docker restart` loses nothing)",
        ),
        (
            "`docker exec -d` httpd on a new port in a running container → answers on localhost",
            &r.open,
            r.open_failed,
            "p50 ≤ 150 ms",
        ),
    ] {
        let mut s = samples.clone();
        let st = Stats::of(&mut s);
        println!(
            "| {what} | {} | {} | {} | {} | {} | {failed} | {target} |",
            samples.len(),
            ms(st.p50),
            ms(st.p90),
            ms(st.p99),
            ms(st.max)
        );
    }
    println!();
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    println!("| tunnel-svc RSS | idle | {RUNS} containers | within 5 s of their removal |");
    println!("| --- | ---: | ---: | ---: |");
    let [idle, busy, after] = r.rss;
    println!(
        "| `--docker` | {} | {} | {} |",
        mib(idle),
        mib(busy),
        mib(after)
    );
    println!();
    println!(
        "Throughput, {} MiB from the container to the host: an HTTP download by a client on \
         the host, or read by `docker exec`:\n",
        BYTES >> 20
    );
    println!("| path | Gbit/s |\n| --- | ---: |");
    for (path, result) in &r.throughput {
        match result {
            Ok(g) => println!("| {path} | {g:.2} |"),
            Err(e) => println!("| {path} | not measured: {e} |"),
        }
    }
    println!();
    println!(
        "Engines, one run: `run` (busybox httpd on the container's 127.0.0.1) → answers on the \
         host's localhost, {ENGINE_RUNS} containers, and one download of {} MiB:\n",
        BYTES >> 20
    );
    println!("| engine | tunnel bytes via | n | p50 | p99 | failed | download Gbit/s |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for e in &r.engines {
        let mut s = e.run.clone();
        let st = Stats::of(&mut s);
        let download = match &e.download {
            Ok(g) => format!("{g:.2}"),
            Err(why) => format!("not measured: {why}"),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {download} |",
            e.engine,
            e.via,
            e.run.len(),
            ms(st.p50),
            ms(st.p99),
            e.run_failed
        );
    }
}
