//! Conformance: the servers users run, as they run them, reached through
//! porthole by their own clients. Each server runs in two containers (IPv6
//! on, and off as Docker leaves it), each container is followed by four
//! tunnel-svcs, one per way bytes travel (grpc raw relay, grpc Relay
//! streams, direct, ssh), each on a loopback address of its own, and every
//! cell is checked the way a user would: `tunnel-svc wait PORT`, then the
//! server's own client (curl, redis-cli, psql, dig, ssh) on the host port.
//! A cell that cannot work says why (`wait` fails with the reason); the
//! test knows which and checks the words. Each test prints its rows of the
//! matrix the README's "Works with" table is made from.
//!
//! Needs root (namespaces) and Debian's nginx-light, redis-server,
//! redis-tools, postgresql, dnsmasq-base, bind9-dnsutils, nodejs,
//! openssh-server; `.ci/run` installs them.

use porthole_testkit as common;

use common::{
    have_openssh, require_root, skip_or_fail, which, MonitorProc, Netns, Proc, Sshd, TunnelProc,
};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long a cell's `wait` and client may take.
const CELL: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Way {
    /// grpc backend, bytes on raw relay connections (the default).
    Raw,
    /// grpc backend, bytes in Relay.Dial streams (`--no-raw-relay`).
    Streams,
    Direct,
    Ssh,
}

const WAYS: [Way; 4] = [Way::Raw, Way::Streams, Way::Direct, Way::Ssh];

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Raw => "grpc (raw)",
            Way::Streams => "grpc (streams)",
            Way::Direct => "direct",
            Way::Ssh => "ssh",
        }
    }
}

/// One thing a user checks: a port (as the container sees it), the client
/// that talks to it, and what the client must print.
struct Check {
    what: &'static str,
    udp: bool,
    port: u16,
    /// The client, given the host address the tunnel listens on.
    client: fn(&Setup, SocketAddr) -> Command,
    want: &'static str,
    /// Which ways cannot carry it, and the words `wait` must say why in.
    refused: fn(Way) -> Option<&'static str>,
}

fn works(_: Way) -> Option<&'static str> {
    None
}

/// A server bound to loopback only: the direct backend cannot reach it.
fn loopback_only(way: Way) -> Option<&'static str> {
    (way == Way::Direct).then_some("loopback only")
}

fn tcp_only(way: Way) -> Option<&'static str> {
    (way == Way::Ssh).then_some("cannot carry UDP")
}

/// What one container of the matrix holds besides the server.
struct Setup {
    ns: Netns,
    sshd: Sshd,
    dir: PathBuf,
}

fn curl(_: &Setup, at: SocketAddr) -> Command {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "20", &format!("http://{at}/")]);
    c
}

fn redis_cli(_: &Setup, at: SocketAddr) -> Command {
    let mut c = Command::new("redis-cli");
    c.args([
        "-h",
        &at.ip().to_string(),
        "-p",
        &at.port().to_string(),
        "PING",
    ]);
    c
}

fn psql(_: &Setup, at: SocketAddr) -> Command {
    let mut c = Command::new("psql");
    c.args(["-h", &at.ip().to_string(), "-p", &at.port().to_string()])
        .args([
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-tAc",
            "select 'porthole ' || 1",
        ])
        .env("PGCONNECT_TIMEOUT", "20");
    c
}

fn dig(at: SocketAddr, tcp: bool) -> Command {
    let mut c = Command::new("dig");
    c.args([&format!("@{}", at.ip()), "-p", &at.port().to_string()])
        .args(["porthole.test", "+short", "+time=5", "+tries=3"]);
    if tcp {
        c.arg("+tcp");
    }
    c
}

fn ssh(setup: &Setup, at: SocketAddr) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-p", &at.port().to_string()]);
    for o in setup.sshd.options() {
        c.args(["-o", &o]);
    }
    c.args(["-o", "ConnectTimeout=20"])
        .arg(format!("root@{}", at.ip()))
        .arg("echo porthole ssh");
    c
}

/// `/usr/lib/postgresql/VERSION/bin/NAME`, the newest installed.
fn pg_bin(name: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("no PostgreSQL {name} (apt install postgresql)"))
}

/// A server as users run it: how to start it in a container, and what to
/// check through the tunnel.
struct Server {
    name: &'static str,
    /// Programs it needs on the host (servers and clients).
    needs: &'static [&'static str],
    start: fn(&Setup) -> Vec<Proc>,
    checks: &'static [Check],
}

fn www(dir: &Path) -> PathBuf {
    let www = dir.join("www");
    fs::create_dir_all(&www).unwrap();
    fs::write(www.join("index.html"), "porthole web\n").unwrap();
    www
}

fn start_nginx(s: &Setup) -> Vec<Proc> {
    let www = www(&s.dir);
    let conf = s.dir.join("nginx.conf");
    // Debian's default site: `listen 80` and `listen [::]:80`.
    fs::write(
        &conf,
        format!(
            "daemon off;\npid {dir}/nginx.pid;\nerror_log stderr;\nevents {{}}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n\
             server {{\n    listen 80 default_server;\n    listen [::]:80 default_server;\n\
             root {www};\n  }}\n}}\n",
            dir = s.dir.display(),
            www = www.display()
        ),
    )
    .unwrap();
    let conf = conf.display().to_string();
    vec![s.ns.spawn("nginx", ["-e", "stderr", "-c", &conf])]
}

fn start_redis(s: &Setup) -> Vec<Proc> {
    let dir = s.dir.display().to_string();
    // Debian's redis.conf: `bind 127.0.0.1 -::1` (the `-`: no ::1, no matter).
    vec![s.ns.spawn(
        "redis-server",
        [
            "--port",
            "6379",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--save",
            "",
            "--dir",
            &dir,
        ],
    )]
}

fn start_postgres(s: &Setup) -> Vec<Proc> {
    let data = s.dir.join("pgdata");
    fs::create_dir_all(&data).unwrap();
    let chown = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&s.dir)
        .status()
        .unwrap();
    assert!(chown.success());
    let initdb = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg_bin("initdb"))
        .args(["--auth=trust", "-U", "postgres", "-D"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        initdb.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&initdb.stderr)
    );
    // As Debian runs it: user postgres, listen_addresses = 'localhost'.
    let mut cmd = s.ns.command("runuser");
    cmd.args(["-u", "postgres", "--"])
        .arg(pg_bin("postgres"))
        .arg("-D")
        .arg(&data)
        .args(["-c", "listen_addresses=localhost", "-p", "5432", "-k"])
        .arg(&data);
    vec![s.ns.spawn_command("postgres", cmd)]
}

fn start_python(s: &Setup) -> Vec<Proc> {
    let www = www(&s.dir).display().to_string();
    ["0.0.0.0", "::"]
        .iter()
        .zip(["8000", "8001"])
        .map(|(bind, port)| {
            s.ns.spawn(
                "python3",
                [
                    "-m",
                    "http.server",
                    port,
                    "--bind",
                    bind,
                    "--directory",
                    &www,
                ],
            )
        })
        .collect()
}

fn start_node(s: &Setup) -> Vec<Proc> {
    // No host: Node listens on `::` (dual-stack) where IPv6 works, else
    // on 0.0.0.0.
    let js = "require('http').createServer((q, s) => s.end('porthole node\\n')).listen(3000)";
    vec![s.ns.spawn("node", ["-e", js])]
}

fn start_dnsmasq(s: &Setup) -> Vec<Proc> {
    vec![s.ns.spawn(
        "dnsmasq",
        [
            "-k",
            "-C",
            "/dev/null",
            "--port=53",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--pid-file=",
            "--log-facility=-",
            // A name's answer, data only: nothing is sent there.
            "--address=/porthole.test/198.18.255.53",
        ],
    )]
}

fn start_nothing(_: &Setup) -> Vec<Proc> {
    Vec::new() // The container's sshd (for the ssh backend) is the server.
}

/// Runs a client with a deadline; what it printed, or why it failed.
async fn run(cmd: impl Into<tokio::process::Command>) -> Result<String, String> {
    let mut cmd = cmd.into();
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    let shown = format!("{:?}", cmd.as_std());
    match tokio::time::timeout(CELL, cmd.output()).await {
        Err(_) => Err(format!("{shown}: no answer within {CELL:?}")),
        Ok(Err(e)) => Err(format!("{shown}: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(Ok(out)) => Err(format!(
            "{shown}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// One cell: `tunnel-svc wait`, then the client on what it printed.
async fn cell(setup: &Setup, tunnel: &TunnelProc, way: Way, check: &Check) -> Result<(), String> {
    let mut wait = tunnel.cli(&["wait", &check.port.to_string(), "--timeout", "25s"]);
    if check.udp {
        wait.args(["--protocol", "udp"]);
    }
    let waited = run(wait).await;
    if let Some(why) = (check.refused)(way) {
        return match waited {
            Err(e) if e.contains(why) => Ok(()),
            Err(e) => Err(format!("wait must fail saying {why:?}: {e}")),
            Ok(at) => Err(format!(
                "wait must fail saying {why:?}, but it printed {at}"
            )),
        };
    }
    let at: SocketAddr = waited?
        .trim()
        .parse()
        .map_err(|e| format!("wait printed no address: {e}"))?;
    let said = run((check.client)(setup, at)).await?;
    if said.contains(check.want) {
        Ok(())
    } else {
        Err(format!("the client said {said:?}, not {:?}", check.want))
    }
}

/// The tunnel-svc for one way, on loopback address `bind` (so the four
/// can all use the same host ports).
async fn follow(setup: &Setup, monitor: &MonitorProc, way: Way, bind: Ipv4Addr) -> TunnelProc {
    let bind = bind.to_string();
    let mut args: Vec<String> = ["--no-default-skip", "--bind", &bind]
        .map(String::from)
        .to_vec();
    match way {
        Way::Raw => {}
        Way::Streams => args.push("--no-raw-relay".into()),
        Way::Direct => args.extend(["--backend".into(), "direct".into()]),
        Way::Ssh => {
            args.extend(["--backend", "ssh", "--ssh-host", "porthole-field"].map(String::from));
            let host = format!("HostName={}", setup.ns.addr());
            for o in std::iter::once(host).chain(setup.sshd.options()) {
                args.extend(["--ssh-option".into(), o]);
            }
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TunnelProc::follow(&setup.ns, monitor, &args).await
}

/// One container (IPv6 on or off) of `server`, all ways at once; the
/// matrix's rows, or the cells that failed.
async fn container(server: &Server, index: u8, ipv6: bool) -> Result<Vec<String>, Vec<String>> {
    let ns = Netns::new();
    if !ipv6 {
        ns.disable_ipv6();
    }
    let dir = ns.log_dir().join(server.name);
    fs::create_dir_all(&dir).unwrap();
    let sshd = Sshd::start(&ns, IpAddr::V4(Ipv4Addr::UNSPECIFIED), 22).await;
    let setup = Setup { ns, sshd, dir };
    let _servers = (server.start)(&setup);
    let monitor = MonitorProc::start(&setup.ns, &[]).await;
    // 127.P.S.W: this process, server and IPv6 setting, way.
    let base = 20 + (std::process::id() % 200) as u8;
    let tunnels = futures_util::future::join_all(WAYS.iter().enumerate().map(|(w, &way)| {
        let bind = Ipv4Addr::new(127, base, index * 2 + ipv6 as u8, w as u8 + 1);
        follow(&setup, &monitor, way, bind)
    }))
    .await;
    let cells = WAYS.iter().zip(&tunnels).flat_map(|(&way, tunnel)| {
        let setup = &setup;
        server
            .checks
            .iter()
            .map(move |check| async move { (way, check, cell(setup, tunnel, way, check).await) })
    });
    let results = futures_util::future::join_all(cells).await;
    let v6 = if ipv6 { "on" } else { "off" };
    let (mut rows, mut failed) = (Vec::new(), Vec::new());
    for (way, check, result) in results {
        let shown = match (&result, (check.refused)(way)) {
            (Ok(()), None) => "works".to_string(),
            (Ok(()), Some(why)) => format!("no: {why}"),
            (Err(e), _) => {
                failed.push(format!(
                    "{} {} IPv6 {v6} via {}: {e}",
                    server.name,
                    check.what,
                    way.name()
                ));
                "FAILED".into()
            }
        };
        rows.push(format!(
            "| {} | {} | IPv6 {v6} | {} | {shown} |",
            server.name,
            check.what,
            way.name()
        ));
    }
    if failed.is_empty() {
        Ok(rows)
    } else {
        for t in &tunnels {
            eprintln!("--- tunnel-svc:\n{}", t.log());
        }
        eprintln!("--- monitor-svc:\n{}", monitor.log());
        Err(failed)
    }
}

async fn matrix(server: &Server, index: u8) {
    if !require_root() || !have_openssh(server.name) {
        return;
    }
    let missing: Vec<&&str> = server.needs.iter().filter(|p| which(p).is_none()).collect();
    if !missing.is_empty() {
        let why = format!("needs {missing:?} (see .ci/run for the packages)");
        return skip_or_fail(server.name, &why);
    }
    let (on, off) = tokio::join!(
        container(server, index, true),
        container(server, index, false)
    );
    let mut failed = Vec::new();
    for result in [on, off] {
        match result {
            Ok(rows) => rows.iter().for_each(|r| println!("{r}")),
            Err(cells) => failed.extend(cells),
        }
    }
    assert!(failed.is_empty(), "cells failed:\n{}", failed.join("\n"));
}

const HTTP_OK: &str = "porthole web";

static SERVERS: &[Server] = &[
    Server {
        name: "nginx",
        needs: &["nginx", "curl"],
        start: start_nginx,
        checks: &[Check {
            what: "`listen 80` + `listen [::]:80`, host 10080",
            udp: false,
            port: 80,
            client: curl,
            want: HTTP_OK,
            refused: works,
        }],
    },
    Server {
        name: "redis-server",
        needs: &["redis-server", "redis-cli"],
        start: start_redis,
        checks: &[Check {
            what: "`bind 127.0.0.1 -::1`, redis-cli PING",
            udp: false,
            port: 6379,
            client: redis_cli,
            want: "PONG",
            refused: loopback_only,
        }],
    },
    Server {
        name: "postgresql",
        needs: &["runuser", "psql"],
        start: start_postgres,
        checks: &[Check {
            what: "user postgres, `localhost`, psql",
            udp: false,
            port: 5432,
            client: psql,
            want: "porthole 1",
            refused: loopback_only,
        }],
    },
    Server {
        name: "python3 -m http.server",
        needs: &["python3", "curl"],
        start: start_python,
        checks: &[
            Check {
                what: "`--bind 0.0.0.0`",
                udp: false,
                port: 8000,
                client: curl,
                want: HTTP_OK,
                refused: works,
            },
            Check {
                what: "`--bind ::` (dual-stack)",
                udp: false,
                port: 8001,
                client: curl,
                want: HTTP_OK,
                refused: works,
            },
        ],
    },
    Server {
        name: "node",
        needs: &["node", "curl"],
        start: start_node,
        checks: &[Check {
            what: "`listen(3000)`, no host",
            udp: false,
            port: 3000,
            client: curl,
            want: "porthole node",
            refused: works,
        }],
    },
    Server {
        name: "dnsmasq",
        needs: &["dnsmasq", "dig"],
        start: start_dnsmasq,
        checks: &[
            Check {
                what: "UDP 53, host 10053, dig",
                udp: true,
                port: 53,
                client: |_, at| dig(at, false),
                want: "198.18.255.53",
                refused: tcp_only,
            },
            Check {
                what: "TCP 53, host 10053, dig +tcp",
                udp: false,
                port: 53,
                client: |_, at| dig(at, true),
                want: "198.18.255.53",
                refused: works,
            },
        ],
    },
    Server {
        name: "sshd",
        needs: &["ssh"],
        start: start_nothing,
        checks: &[Check {
            what: "port 22, host 10022, ssh login",
            udp: false,
            port: 22,
            client: ssh,
            want: "porthole ssh",
            refused: works,
        }],
    },
];

macro_rules! matrix {
    ($($name:ident: $index:literal;)*) => {$(
        #[tokio::test(flavor = "multi_thread")]
        async fn $name() {
            matrix(&SERVERS[$index], $index).await;
        }
    )*};
}

matrix! {
    nginx: 0;
    redis: 1;
    postgresql: 2;
    python_http_server: 3;
    node: 4;
    dnsmasq: 5;
    sshd: 6;
}
