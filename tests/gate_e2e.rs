//! The SSH egress gate end to end, with real parts only: a real OpenSSH
//! `sshd` upstream in one namespace, the real `tunnel-svc gate` binary in a
//! second, and the client (python sockets, `ssh`, `git`) in a third.
//!
//! The gate namespace sits between the other two on two veth links of its
//! own (`to-u`, `to-c`), routed by /32 host routes between the addresses
//! the harness gave each namespace, so the client reaches the upstream only
//! through the gate and no address outside the test's own is used. The test
//! process itself reaches each namespace over the harness's veth to the
//! host (the gate's admin API, sshd readiness).

use porthole_testkit as common;

use common::{binary, poll_until, require_root, within, Listener, Netns, Proc, Sshd, DEADLINE};
use porthole::pb::v1::{
    tunnel_admin_client::TunnelAdminClient, Backend, CloseTunnelRequest, ListTunnelsRequest,
    OpenTunnelRequest, Origin, Tunnel, TunnelState,
};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

/// The upstream sshd's port, as in `ssh://git@forge:30009/repo.git`.
const SSH_PORT: u16 = 30009;
/// Where the gate's admin API listens (on the gate namespace's address).
const ADMIN_PORT: u16 = 7071;

// ---------------------------------------------------------------------------
// Topology: upstream ns ← gate ns → client ns

/// `ip ARGS...`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Joins namespaces `a` and `b` with a veth pair (`a_dev` in `a`, `b_dev` in
/// `b`) and a /32 route each way between their harness addresses.
fn link(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) {
    let (a_ip, b_ip) = (a.addr().to_string(), b.addr().to_string());
    ip(&[
        "-n",
        a.name(),
        "link",
        "add",
        a_dev,
        "type",
        "veth",
        "peer",
        "name",
        b_dev,
        "netns",
        b.name(),
    ]);
    for (ns, dev, to, src) in [(a, a_dev, &b_ip, &a_ip), (b, b_dev, &a_ip, &b_ip)] {
        ip(&["-n", ns.name(), "link", "set", dev, "up"]);
        let dst = format!("{to}/32");
        ip(&[
            "-n",
            ns.name(),
            "route",
            "add",
            &dst,
            "dev",
            dev,
            "src",
            src,
        ]);
    }
}

struct Topology {
    upstream: Netns,
    gate: Netns,
    client: Netns,
}

impl Topology {
    fn new() -> Topology {
        let t = Topology {
            upstream: Netns::new(),
            gate: Netns::new(),
            client: Netns::new(),
        };
        link(&t.gate, "to-u", &t.upstream, "to-g");
        link(&t.gate, "to-c", &t.client, "to-g");
        t
    }
}

// ---------------------------------------------------------------------------
// The upstream: a real sshd with its own keys

/// Runs `cmd`; panics with its output unless it succeeds.
fn run_ok(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---------------------------------------------------------------------------
// The client side

/// What a client in `ns` gets from `addr:port`: `LINE ...`, `EOF` or
/// `ERR ...`, and how long after connecting.
async fn client_read(ns: &Netns, addr: Ipv4Addr, port: u16) -> (String, Duration) {
    let mut cmd = ns.command(common::binary(common::HELPER));
    cmd.args(["read-line", &addr.to_string(), &port.to_string()]);
    let out = within("client read", tokio::process::Command::from(cmd).output())
        .await
        .expect("run porthole-helper read-line");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = stdout.lines();
    let what = lines.next().unwrap_or_default().to_string();
    let secs: f64 = lines
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "client read gave {stdout:?} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (what, Duration::from_secs_f64(secs))
}

/// Runs a prepared command in a namespace with a deadline.
async fn output(what: &str, cmd: Command) -> Output {
    within(what, tokio::process::Command::from(cmd).output())
        .await
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

// ---------------------------------------------------------------------------
// The gate

struct Gate {
    proc: Proc,
    admin: SocketAddr,
    token: porthole::auth::Token,
}

/// Writes a gate config of `(alias, hostname, port)` entries.
fn write_config(dir: &Path, name: &str, entries: &[(&str, String, u16)]) -> PathBuf {
    let mut text = String::new();
    for (alias, hostname, port) in entries {
        text.push_str(&format!(
            "[[upstream]]\nhost = \"{alias}\"\nhostname = \"{hostname}\"\nport = {port}\n\n"
        ));
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

impl Gate {
    /// `tunnel-svc gate --config CONFIG` in `ns`, admin API on the
    /// namespace's address; returns once every forward has left PENDING.
    async fn start(ns: &Netns, config: &Path, upstreams: usize) -> Gate {
        let admin = SocketAddr::new(ns.addr().into(), ADMIN_PORT);
        let token_file = ns.log_dir().join("gate-admin.token");
        let (token, _) = porthole::auth::Token::load_or_create(&token_file).expect("a token");
        let mut cmd = ns.command(binary("tunnel-svc"));
        cmd.arg("gate")
            .arg("--config")
            .arg(config)
            .args(["--admin", &admin.to_string()])
            .arg("--admin-token-file")
            .arg(&token_file)
            .env_remove("PORTHOLE_TOKEN_FILE")
            .env_remove("PORTHOLE_ADMIN")
            .env("NO_COLOR", "1")
            .env("PORTHOLE_LOG", "info");
        let mut proc = ns.spawn_command("tunnel-svc-gate", cmd);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = proc.try_wait() {
                panic!("the gate exited ({status}):\n{}", proc.log());
            }
            if let Ok(tunnels) = list(admin, &token).await {
                if tunnels.len() == upstreams
                    && tunnels
                        .iter()
                        .all(|t| t.state != TunnelState::Pending as i32)
                {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the gate's forwards were not set up within {DEADLINE:?}:\n{}",
                proc.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Gate { proc, admin, token }
    }

    async fn tunnels(&self) -> Vec<Tunnel> {
        list(self.admin, &self.token).await.expect("ListTunnels")
    }

    async fn tunnel(&self, id: &str) -> Tunnel {
        self.tunnels()
            .await
            .into_iter()
            .find(|t| t.id == id)
            .unwrap_or_else(|| panic!("no tunnel {id} in ListTunnels"))
    }
}

async fn admin_client(
    admin: SocketAddr,
    token: &porthole::auth::Token,
) -> Result<TunnelAdminClient<porthole::auth::AuthChannel>, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{admin}"))
        .expect("valid url")
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(TunnelAdminClient::new(porthole::auth::with_token(
        channel,
        Some(token.clone()),
    )))
}

async fn list(
    admin: SocketAddr,
    token: &porthole::auth::Token,
) -> Result<Vec<Tunnel>, tonic::Status> {
    let mut c = admin_client(admin, token).await?;
    Ok(c.list_tunnels(ListTunnelsRequest::default())
        .await?
        .into_inner()
        .tunnels)
}

// ---------------------------------------------------------------------------
// Tests

/// A plain TCP read from the client namespace, through the gate's address
/// on the upstream's port, gets the upstream sshd's banner; ListTunnels
/// shows the forward with origin EGRESS and its counters.
#[tokio::test]
async fn banner_reaches_the_upstream_through_the_gate() {
    if !require_root() {
        return;
    }
    let t = Topology::new();
    let _sshd = Sshd::start(&t.upstream, Ipv4Addr::UNSPECIFIED.into(), SSH_PORT).await;
    let config = write_config(
        t.gate.log_dir(),
        "gate.toml",
        &[("forge", t.upstream.addr().to_string(), SSH_PORT)],
    );
    let gate = Gate::start(&t.gate, &config, 1).await;

    // The client has no route to the upstream but through the gate.
    let (direct, _) = client_read(&t.client, t.upstream.addr(), SSH_PORT).await;
    assert!(
        direct.starts_with("ERR"),
        "client reached upstream directly: {direct}"
    );

    let (line, _) = client_read(&t.client, t.gate.addr(), SSH_PORT).await;
    assert!(line.starts_with("LINE SSH-2.0-OpenSSH"), "{line}");

    let tunnel = gate.tunnel(&format!("forge:tcp:{SSH_PORT}")).await;
    assert_eq!(tunnel.target, "forge");
    assert_eq!(tunnel.state, TunnelState::Active as i32, "{tunnel:?}");
    assert_eq!(tunnel.origin, Origin::Egress as i32);
    assert_eq!(tunnel.backend, Backend::Direct as i32);
    assert_eq!((tunnel.container_port, tunnel.host_port), (30009, 30009));
    assert_eq!(tunnel.host_addresses, vec![format!("0.0.0.0:{SSH_PORT}")]);
    assert!(tunnel.error.is_empty(), "{}", tunnel.error);
    assert!(tunnel.total_connections >= 1, "{tunnel:?}");
    assert!(tunnel.bytes_out >= 20, "the banner was counted: {tunnel:?}");
}

/// The reason the gate listens on the upstream's own port: the client's ssh
/// config says `Port 2222`, the URL says 30009, and the URL wins. A real
/// ssh login and a real `git clone` go through the gate; the ssh config
/// is `tunnel-svc gate --print-ssh-config` output, host key check strict.
#[tokio::test]
async fn ssh_login_and_git_clone_with_the_url_port() {
    if !require_root() {
        return;
    }
    let t = Topology::new();
    let sshd = Sshd::start(&t.upstream, Ipv4Addr::UNSPECIFIED.into(), SSH_PORT).await;
    let config = write_config(
        t.gate.log_dir(),
        "gate.toml",
        &[("forge", t.upstream.addr().to_string(), SSH_PORT)],
    );
    let gate = Gate::start(&t.gate, &config, 1).await;

    // The sandbox's ssh config, as the gate prints it.
    let mut print = Command::new(binary("tunnel-svc"));
    print
        .arg("gate")
        .arg("--config")
        .arg(&config)
        .args(["--print-ssh-config", &t.gate.addr().to_string()]);
    let printed = String::from_utf8(run_ok("--print-ssh-config", &mut print).stdout).unwrap();
    let g = t.gate.addr();
    let key_alias = format!("[{}]:{SSH_PORT}", t.upstream.addr());
    assert!(
        printed.contains(&format!(
            "Host forge\n    HostName {g}\n    Port {SSH_PORT}\n    HostKeyAlias {key_alias}\n"
        )),
        "{printed}"
    );
    // known_hosts holds the upstream's key under the upstream's own name.
    let dir = t.client.log_dir();
    std::fs::write(
        dir.join("known_hosts"),
        format!("{key_alias} {}\n", sshd.host_key()),
    )
    .unwrap();
    let common = format!(
        "\nHost *\n    User root\n    IdentityFile {key}\n    IdentitiesOnly yes\n    \
         UserKnownHostsFile {dir}/known_hosts\n    GlobalKnownHostsFile /dev/null\n    \
         StrictHostKeyChecking yes\n    UpdateHostKeys no\n    BatchMode yes\n    \
         ConnectTimeout 10\n    LogLevel ERROR\n",
        key = sshd.client_key().display(),
        dir = dir.display()
    );
    let as_printed = dir.join("ssh_config");
    std::fs::write(&as_printed, format!("{printed}{common}")).unwrap();
    // The mirror: the config's port is wrong, only the URL's is right.
    let other_port = dir.join("ssh_config_2222");
    let wrong = printed.replace(&format!("Port {SSH_PORT}\n"), "Port 2222\n");
    assert_ne!(wrong, printed);
    std::fs::write(&other_port, format!("{wrong}{common}")).unwrap();

    let ssh = |config: &Path, dest: &str| {
        let mut cmd = t.client.command("ssh");
        cmd.arg("-F").arg(config).args([dest, "echo", "ok"]);
        cmd
    };
    let out = output("ssh forge", ssh(&as_printed, "forge")).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == "ok\n",
        "ssh forge echo ok: {out:?}"
    );
    let url = format!("ssh://root@forge:{SSH_PORT}");
    let out = output("ssh URL", ssh(&other_port, &url)).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == "ok\n",
        "ssh {url} echo ok with Port 2222 in the config: {out:?}"
    );
    // Without the URL's port, the config's 2222 is used, and nothing is there.
    let out = output("ssh forge (port 2222)", ssh(&other_port, "forge")).await;
    assert_eq!(out.status.code(), Some(255), "{out:?}");

    // git, the way a sandbox uses the gate: the port is in the URL.
    let repo_dir = sshd.dir().join("git");
    let src = repo_dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), "through the gate\n").unwrap();
    let git = |args: &[&str], cwd: &Path| {
        let mut cmd = Command::new("git");
        cmd.current_dir(cwd).args([
            "-c",
            "user.name=porthole",
            "-c",
            "user.email=porthole@example.invalid",
            "-c",
            "init.defaultBranch=main",
        ]);
        cmd.args(args);
        cmd
    };
    run_ok("git init", &mut git(&["init", "-q"], &src));
    run_ok("git add", &mut git(&["add", "hello.txt"], &src));
    run_ok(
        "git commit",
        &mut git(&["commit", "-q", "-m", "hello"], &src),
    );
    run_ok(
        "git clone --bare",
        &mut git(&["clone", "-q", "--bare", "src", "repo.git"], &repo_dir),
    );
    let clone = dir.join("clone");
    let repo_url = format!("{url}{}", repo_dir.join("repo.git").display());
    let mut cmd = t.client.command("git");
    cmd.args(["clone", "-q", &repo_url]).arg(&clone).env(
        "GIT_SSH_COMMAND",
        format!("ssh -F {}", other_port.display()),
    );
    let out = output("git clone", cmd).await;
    assert!(out.status.success(), "git clone {repo_url}: {out:?}");
    assert_eq!(
        std::fs::read_to_string(clone.join("hello.txt")).unwrap(),
        "through the gate\n"
    );

    let tunnel = gate.tunnel(&format!("forge:tcp:{SSH_PORT}")).await;
    assert!(tunnel.total_connections >= 3, "{tunnel:?}");
    assert!(
        tunnel.bytes_in > 1000 && tunnel.bytes_out > 1000,
        "{tunnel:?}"
    );
    assert!(tunnel.error.is_empty(), "{}", tunnel.error);
}

/// Config mistakes are refused at load time with exit status 2 and a
/// message that says what is wrong; nothing ever listens.
#[tokio::test]
async fn config_mistakes_exit_2_and_nothing_listens() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let dir = ns.log_dir();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "shared-port.toml",
            "[[upstream]]\nhost = \"forge\"\nhostname = \"198.18.0.6\"\nport = 30009\n\
             [[upstream]]\nhost = \"mirror\"\nhostname = \"198.18.0.10\"\nport = 30009\n",
            &["\"forge\"", "\"mirror\"", "30009"],
        ),
        (
            "shared-port.json",
            r#"{"upstream": [{"host": "a", "hostname": "x", "port": 30009},
                             {"host": "b", "hostname": "y", "port": 30009}]}"#,
            &["\"a\"", "\"b\"", "both use port 30009"],
        ),
        (
            "port-zero.toml",
            "[[upstream]]\nhost = \"forge\"\nhostname = \"x\"\nport = 0\n",
            &["\"forge\"", "port 0 is not in 1..65535"],
        ),
        (
            "port-big.toml",
            "[[upstream]]\nhost = \"forge\"\nhostname = \"x\"\nport = 70000\n",
            &["port 70000 is not in 1..65535"],
        ),
        (
            "no-hostname.toml",
            "[[upstream]]\nhost = \"forge\"\nport = 30009\n",
            &["\"forge\"", "hostname", "missing or empty"],
        ),
        (
            "empty-hostname.json",
            r#"{"upstream": [{"host": "forge", "hostname": "", "port": 30009}]}"#,
            &["hostname", "missing or empty"],
        ),
        (
            "duplicate-alias.toml",
            "[[upstream]]\nhost = \"forge\"\nhostname = \"x\"\nport = 30009\n\
             [[upstream]]\nhost = \"forge\"\nhostname = \"y\"\nport = 30010\n",
            &["\"forge\" is declared twice"],
        ),
        (
            "unknown-field.toml",
            "[[upstream]]\nhost = \"forge\"\nhostname = \"x\"\nport = 30009\nuser = \"git\"\n",
            &["unknown field `user`"],
        ),
        (
            "unknown-field.json",
            r#"{"upstream": [{"host": "forge", "hostname": "x", "port": 30009}], "listen": "x"}"#,
            &["unknown field `listen`"],
        ),
        ("empty.toml", "", &["no upstreams"]),
        ("empty.json", r#"{"upstream": []}"#, &["no upstreams"]),
        (
            "gate.yaml",
            "upstream: []\n",
            &["gate.yaml", ".toml or .json"],
        ),
    ];
    let bin = binary("tunnel-svc");
    let admin = SocketAddr::new(ns.addr().into(), ADMIN_PORT);
    for (name, text, wants) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let mut cmd = ns.command(&bin);
        cmd.arg("gate")
            .arg("--config")
            .arg(&path)
            .args(["--admin", &admin.to_string()])
            .env_remove("PORTHOLE_ADMIN");
        let out = output(name, cmd).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {out:?}");
        assert!(out.stdout.is_empty(), "{name}: {out:?}");
        assert!(
            stderr.contains(name),
            "{name}: the message names the file: {stderr}"
        );
        for want in *wants {
            assert!(stderr.contains(want), "{name}: want {want:?} in {stderr}");
        }
        assert!(!stderr.contains("listening"), "{name}: {stderr}");
        // --print-ssh-config checks the same and prints nothing.
        let mut cmd = ns.command(&bin);
        cmd.arg("gate")
            .arg("--config")
            .arg(&path)
            .args(["--print-ssh-config", "198.18.0.1"]);
        let out = output(name, cmd).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name} --print-ssh-config: {out:?}"
        );
        assert!(out.stdout.is_empty(), "{name}: {out:?}");
    }
    // Nothing in the namespace listens: not the forwards, not the admin API.
    for port in [30009, 30010, ADMIN_PORT] {
        let addr = SocketAddr::new(ns.addr().into(), port);
        let err = tokio::net::TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{addr}");
    }
    assert!(ns.pids().is_empty(), "a refused gate left {:?}", ns.pids());
}

/// Several upstreams, some of them down: the live one keeps serving, a
/// connection to a dead one is closed promptly, ListTunnels says why, and
/// the error clears once the upstream answers. A busy gate port is a
/// FAILED forward that says so and recovers when the port is free. Egress
/// forwards cannot be closed or added through the admin API.
#[tokio::test]
async fn a_dead_upstream_fails_alone_and_says_why() {
    if !require_root() {
        return;
    }
    let t = Topology::new();
    let _sshd = Sshd::start(&t.upstream, Ipv4Addr::UNSPECIFIED.into(), SSH_PORT).await;
    let u = t.upstream.addr().to_string();
    // An address on the gate→upstream link whose packets vanish: a fixed
    // neighbour entry sends them to a MAC nobody has, so the upstream side
    // drops them and only the gate's connect timeout ends the wait. (It is
    // the host's own end of the upstream's harness veth, an address no
    // other test uses.)
    let silent = t.upstream.host_addr();
    let silent_dst = format!("{silent}/32");
    let silent_ip = silent.to_string();
    ip(&[
        "-n",
        t.gate.name(),
        "route",
        "add",
        &silent_dst,
        "dev",
        "to-u",
    ]);
    ip(&[
        "-n",
        t.gate.name(),
        "neigh",
        "replace",
        &silent_ip,
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "to-u",
        "nud",
        "permanent",
    ]);
    // Something else already holds the gate port of "busy".
    let squatter = Listener::tcp4(&t.gate, "0.0.0.0", 30012);
    let config = write_config(
        t.gate.log_dir(),
        "gate.toml",
        &[
            ("forge", u.clone(), SSH_PORT),
            ("dead", u.clone(), 30010),
            ("silent", silent.to_string(), 30011),
            ("busy", u.clone(), 30012),
        ],
    );
    let gate = Gate::start(&t.gate, &config, 4).await;
    let g = t.gate.addr();

    let busy = gate.tunnel("busy:tcp:30012").await;
    assert_eq!(busy.state, TunnelState::Failed as i32, "{busy:?}");
    assert!(busy.error.contains("port 30012 is busy"), "{}", busy.error);

    // Refused upstream: the client's connection is reset at once (never a
    // clean EOF, which would look like an upstream that said nothing).
    let (got, took) = client_read(&t.client, g, 30010).await;
    assert!(got.contains("reset"), "dead upstream: {got}");
    assert!(took < Duration::from_secs(2), "dead upstream took {took:?}");
    // Unanswered upstream: reset within the connect timeout.
    let (got, took) = client_read(&t.client, g, 30011).await;
    assert!(got.contains("reset"), "silent upstream: {got}");
    assert!(
        took < Duration::from_secs(7),
        "silent upstream took {took:?}"
    );
    // The live one still serves.
    let (line, _) = client_read(&t.client, g, SSH_PORT).await;
    assert!(line.starts_with("LINE SSH-2.0-OpenSSH"), "{line}");

    let tunnels = gate.tunnels().await;
    let by_id = |id: &str| tunnels.iter().find(|t| t.id == id).unwrap().clone();
    for tun in &tunnels {
        assert_eq!(tun.origin, Origin::Egress as i32, "{tun:?}");
    }
    let forge = by_id("forge:tcp:30009");
    assert!(forge.error.is_empty(), "{}", forge.error);
    assert_eq!(forge.state, TunnelState::Active as i32);
    let dead = by_id("dead:tcp:30010");
    assert_eq!(dead.state, TunnelState::Active as i32, "{dead:?}");
    assert!(
        dead.error.contains(&format!("cannot reach {u}:30010")) && dead.error.contains("refused"),
        "{}",
        dead.error
    );
    assert_eq!((dead.total_connections, dead.active_connections), (1, 0));
    let silent_t = by_id("silent:tcp:30011");
    assert!(
        silent_t
            .error
            .contains(&format!("cannot reach {silent}:30011")),
        "{}",
        silent_t.error
    );
    // Any client can make connections fail: the log says so once per
    // interval, with a count, not once per connection.
    for _ in 0..30 {
        let (got, _) = client_read(&t.client, g, 30010).await;
        assert!(got.contains("reset"), "dead upstream: {got}");
    }
    let log = gate.proc.log();
    let dead_lines = log
        .lines()
        .filter(|l| l.contains("connection failed") && l.contains("dead:tcp:30010"))
        .count();
    assert!(
        (1..=2).contains(&dead_lines),
        "31 failed connections gave {dead_lines} log lines:\n{log}"
    );
    assert!(
        log.contains("silent:tcp:30011"),
        "failures are logged with the tunnel:\n{log}"
    );

    // Admin API: egress forwards come from the config only.
    let mut admin = admin_client(gate.admin, &gate.token).await.unwrap();
    let err = admin
        .close_tunnel(CloseTunnelRequest {
            id: "forge:tcp:30009".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("gate config"), "{}", err.message());
    let err = admin
        .open_tunnel(OpenTunnelRequest {
            target: "forge".into(),
            container_port: 443,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // The dead upstream comes up: the next connection clears the error.
    let _revived = Sshd::start(&t.upstream, Ipv4Addr::UNSPECIFIED.into(), 30010).await;
    let (got, _) = client_read(&t.client, g, 30010).await;
    assert!(got.starts_with("LINE SSH-2.0-OpenSSH"), "{got}");
    let dead = gate.tunnel("dead:tcp:30010").await;
    assert!(dead.error.is_empty(), "{}", dead.error);

    // The busy port frees up: the gate takes it on its next retry.
    squatter.close();
    let g2 = &gate;
    poll_until("busy forward recovers", DEADLINE, || async move {
        let t = g2.tunnel("busy:tcp:30012").await;
        (t.state == TunnelState::Active as i32 && t.error.is_empty()).then_some(())
    })
    .await;

    // Nothing listens anywhere else: each forward on its own port only.
    let addrs: Vec<String> = gate
        .tunnels()
        .await
        .iter()
        .flat_map(|t| t.host_addresses.clone())
        .collect();
    assert_eq!(
        addrs,
        [
            "0.0.0.0:30012",
            "0.0.0.0:30010",
            "0.0.0.0:30009",
            "0.0.0.0:30011"
        ]
    );
    let started = Instant::now();
    let mut gate = gate;
    let status = gate.proc.terminate().await;
    assert!(status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------
// Measurement

/// One `iperf3 -c` run from `ns`: the receiver's Gbit/s.
async fn iperf(ns: &Netns, addr: Ipv4Addr, port: u16, reverse: bool) -> f64 {
    let mut cmd = ns.command("iperf3");
    cmd.args([
        "-c",
        &addr.to_string(),
        "-p",
        &port.to_string(),
        "-t",
        "5",
        "-J",
    ]);
    if reverse {
        cmd.arg("-R");
    }
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::from(cmd).output(),
    )
    .await
    .expect("iperf3 took over 30 s")
    .expect("run iperf3");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3 output is not JSON ({e}): {out:?}"));
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no end.sum_received in {json}"))
        / 1e9
}

/// The gate against socat on the same path (client ns → gate ns →
/// upstream ns), single iperf3 stream, 5 s each way, two rounds, plus the
/// path without a relay (gate ns → upstream ns). Build in release for
/// numbers worth reading:
/// `cargo test --release --test gate_e2e -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "measurement; run with --release --ignored --nocapture"]
async fn throughput_gate_vs_socat() {
    if !require_root() {
        return;
    }
    for tool in ["iperf3", "socat"] {
        assert!(
            common::which(tool).is_some(),
            "{tool} is needed: apt-get install -y {tool}"
        );
    }
    const IPERF: u16 = 30020;
    const SOCAT: u16 = 30021;
    const SOCAT_BIG: u16 = 30022;
    let t = Topology::new();
    let _server = t.upstream.spawn("iperf3", ["-s", "-p", &IPERF.to_string()]);
    let u = t.upstream.addr();
    poll_until("iperf3 -s listens", DEADLINE, || async {
        tokio::net::TcpStream::connect((u, IPERF)).await.ok()
    })
    .await;
    let config = write_config(
        t.gate.log_dir(),
        "gate.toml",
        &[("bench", u.to_string(), IPERF)],
    );
    let _gate = Gate::start(&t.gate, &config, 1).await;
    let _socat = t.gate.spawn(
        "socat",
        [
            format!("TCP-LISTEN:{SOCAT},fork,reuseaddr"),
            format!("TCP:{u}:{IPERF}"),
        ],
    );
    // The same with 128 KiB buffers instead of socat's 8 KiB default.
    let _socat_big = t.gate.spawn(
        "socat",
        [
            "-b".to_string(),
            "131072".to_string(),
            format!("TCP-LISTEN:{SOCAT_BIG},fork,reuseaddr"),
            format!("TCP:{u}:{IPERF}"),
        ],
    );
    let g = t.gate.addr();
    for port in [SOCAT, SOCAT_BIG] {
        poll_until("socat listens", DEADLINE, || async {
            tokio::net::TcpStream::connect((g, port)).await.ok()
        })
        .await;
    }

    let mut rows = Vec::new();
    for reverse in [false, true] {
        let dir = if reverse {
            "upstream → client (-R)"
        } else {
            "client → upstream"
        };
        let direct = iperf(&t.gate, u, IPERF, reverse).await;
        rows.push(format!(
            "| no relay (gate ns → upstream) | {dir} | {direct:.2} |"
        ));
        for round in 1..=2 {
            let gate = iperf(&t.client, g, IPERF, reverse).await;
            let socat = iperf(&t.client, g, SOCAT, reverse).await;
            let socat_big = iperf(&t.client, g, SOCAT_BIG, reverse).await;
            rows.push(format!(
                "| tunnel-svc gate, round {round} | {dir} | {gate:.2} |"
            ));
            rows.push(format!("| socat, round {round} | {dir} | {socat:.2} |"));
            rows.push(format!(
                "| socat -b 131072, round {round} | {dir} | {socat_big:.2} |"
            ));
        }
    }
    eprintln!(
        "\n| path | direction | Gbit/s |\n| --- | --- | --- |\n{}\n",
        rows.join("\n")
    );
}
