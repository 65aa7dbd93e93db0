//! `tunnel-svc demo`: the whole product in one command. Makes a throwaway
//! network namespace (a "container"), runs monitor-svc and a small HTTP
//! server inside, forwards it to the host, fetches a page through the
//! tunnel, and removes everything again on exit or Ctrl-C.

use crate::config;
use anyhow::{bail, Context};
use porthole::pb::v1::{tunnel_admin_client::TunnelAdminClient, ListTunnelsRequest, TunnelState};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

pub struct DemoArgs {
    /// Port the sample server listens on inside the namespace.
    pub port: u16,
    /// Admin API address.
    pub admin: SocketAddr,
    /// Exit after the first successful request instead of waiting for Ctrl-C.
    pub once: bool,
}

/// Starts `program args...` inside `ns`, its stderr on ours; killed if
/// dropped.
fn exec(ns: &porthole::netns::Namespace, program: &Path, args: &[&str]) -> anyhow::Result<Child> {
    let mut cmd = Command::from(ns.command(program));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd.spawn()
        .with_context(|| format!("cannot start {} in {}", program.display(), ns.name()))
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// monitor-svc next to this binary, else on PATH.
fn monitor_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let beside = exe.with_file_name("monitor-svc");
    if beside.is_file() {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("monitor-svc"))
        .find(|p| p.is_file())
        .context(
            "monitor-svc not found next to tunnel-svc or on PATH; build both with `cargo build`",
        )
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn stop(mut child: Child) {
    use rustix::process::{kill_process, Pid, Signal};
    if let Some(pid) = child.id().and_then(|p| Pid::from_raw(p as i32)) {
        let _ = kill_process(pid, Signal::TERM);
        if tokio::time::timeout(Duration::from_secs(3), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

pub async fn run(args: DemoArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo creates a network namespace and needs root: run it with sudo");
    }
    let monitor_bin = monitor_binary()?;
    let admin = TcpListener::bind(args.admin).await.with_context(|| {
        format!(
            "cannot listen on --admin {} (another tunnel-svc running?)",
            args.admin
        )
    })?;
    // The monitor's token: made here, handed to both sides, gone afterwards.
    let secrets =
        TempDir(std::env::temp_dir().join(format!("porthole-demo-{}", std::process::id())));
    let token_file = secrets.0.join("monitor.token");
    let (token, _) = porthole::auth::Token::load_or_create(&token_file)?;
    // The admin API is root's alone, as tunnel-svc's always is.
    let admin_token_file = crate::service::default_admin_token()
        .context("no state directory for the admin token: set HOME or XDG_STATE_HOME")?;
    let (admin_token, _) = porthole::auth::Token::load_or_create(&admin_token_file)?;
    let pid = std::process::id();
    let ns = porthole::netns::Namespace::create(&format!("porthole-demo-{pid}"), pid)
        .context("creating the demo's network namespace")?;
    let inner_ip = ns.addr();
    println!("container   network namespace {} at {inner_ip}", ns.name());
    let monitor = exec(
        &ns,
        &monitor_bin,
        &[
            "--listen",
            "0.0.0.0:7070",
            "--log-level",
            "warn",
            "--token-file",
            token_file
                .to_str()
                .context("temporary directory path is not UTF-8")?,
        ],
    )?;
    let me = std::env::current_exe()?;
    let port = args.port.to_string();
    let started = Instant::now();
    let server = exec(&ns, &me, &["demo-server", "--port", &port])?;
    println!("inside      HTTP server on 127.0.0.1:{port} (loopback only), monitor-svc on :7070");

    let monitor_addr: SocketAddr = format!("{inner_ip}:7070").parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(monitor_addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("monitor-svc did not come up in the namespace within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let opts = options(monitor_addr, token_file.clone(), token, admin_token.clone())?;
    let admin_addr = admin.local_addr()?;
    let service = tokio::spawn(crate::service::run(admin, opts, shutdown.clone()));

    let result = tokio::select! {
        r = show(admin_addr, admin_token, args.port, started) => r,
        _ = shutdown.cancelled() => Ok(()),
    };
    if result.is_ok() && !args.once {
        println!("\nTry it:     curl http://localhost:{port}/");
        println!("            sudo tunnel-svc ls --admin {admin_addr}");
        println!(
            "            grpcurl -plaintext -H \"authorization: Bearer $(sudo cat {})\" \\\n                {admin_addr} porthole.v1.TunnelAdmin/ListTunnels",
            admin_token_file.display()
        );
        println!("Ctrl-C stops the demo and removes the namespace.");
        shutdown.cancelled().await;
    }
    shutdown.cancel();
    let served = service.await;
    stop(server).await;
    stop(monitor).await;
    drop(ns);
    println!("cleaned up  namespace, processes and tunnels are gone");
    result?;
    served??;
    Ok(())
}

/// tunnel-svc following the demo's monitor at `monitor_addr`, with the
/// defaults a user gets.
fn options(
    monitor_addr: SocketAddr,
    token_file: PathBuf,
    token: porthole::auth::Token,
    admin_token: porthole::auth::Token,
) -> anyhow::Result<crate::service::Options> {
    let url: config::MonitorUrl = format!("http://{monitor_addr}").parse()?;
    Ok(crate::service::Options {
        targets: vec![config::Target {
            name: "demo".into(),
            ssh_host: url.host.clone(),
            url,
            backend: config::BackendKind::Grpc,
            token_file: Some(token_file),
            devcontainer: None,
        }],
        reconcile: crate::reconcile::Options {
            bind: config::default_bind(),
            skip: config::DEFAULT_SKIP.parse()?,
            max_tunnels: 10,
            remap: true,
            allow_privileged: false,
            rules: Vec::new(),
            udp: Default::default(),
            park: Default::default(),
            host_ports: None,
            keep_host_ports: false,
        },
        admin_token: Some(admin_token),
        monitor_tokens: [("demo".to_string(), token)].into(),
        devcontainers: Default::default(),
        ssh_options: Vec::new(),
        raw_relay: true,
        docker: None,
        reload: None,
    })
}

/// Waits for the tunnel, then fetches a page through it.
async fn show(
    admin: SocketAddr,
    token: porthole::auth::Token,
    port: u16,
    started: Instant,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{admin}"))?.connect_lazy();
    let mut client = TunnelAdminClient::new(porthole::auth::with_token(channel, Some(token)));
    let host_port = loop {
        if Instant::now() > deadline {
            bail!("no tunnel for port {port} after 15 s");
        }
        if let Ok(resp) = client.list_tunnels(ListTunnelsRequest::default()).await {
            let found = resp.into_inner().tunnels.into_iter().find(|t| {
                t.container_port == u32::from(port) && t.state == TunnelState::Active as i32
            });
            if let Some(t) = found {
                break t.host_port as u16;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "tunnel      localhost:{host_port} -> container:{port}, {} ms after the server started",
        started.elapsed().as_millis()
    );
    let body = loop {
        match http_get(host_port).await {
            Ok(body) => break body,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    println!(
        "request     GET http://localhost:{host_port}/ -> {}",
        body.trim()
    );
    Ok(())
}

async fn http_get(port: u16) -> anyhow::Result<String> {
    let mut conn = TcpStream::connect(("localhost", port)).await?;
    conn.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut resp)).await??;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "unexpected response: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_string())
}

/// The sample server run inside the namespace: answers every request with
/// a greeting, on loopback only.
pub async fn serve_sample(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("cannot listen on port {port}"))?;
    let shutdown = porthole::shutdown::on_signal()?;
    loop {
        let (mut conn, _) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            a = listener.accept() => a?,
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let body = format!(
                "hello from inside the container (pid {})\n",
                std::process::id()
            );
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        });
    }
}
