//! A real OpenSSH server inside a container, with keys made for the run:
//! what the ssh backend, the egress gate and the benchmark's `ssh -L`
//! baseline talk to.

use crate::{skip_or_fail, which, Netns, Proc, DEADLINE};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tokio::io::AsyncReadExt;

pub const SSHD: &str = "/usr/sbin/sshd";

/// Whether OpenSSH (client, keygen, server) is installed; if not, says the
/// test was skipped (or fails it under CI).
pub fn have_openssh(test: &str) -> bool {
    let missing: Vec<&str> = ["ssh", "ssh-keygen"]
        .into_iter()
        .filter(|t| which(t).is_none())
        .chain((!Path::new(SSHD).is_file()).then_some(SSHD))
        .collect();
    if missing.is_empty() {
        return true;
    }
    skip_or_fail(
        test,
        &format!("needs OpenSSH (openssh-server); missing {missing:?}"),
    );
    false
}

/// `sshd -D -e` in a namespace, accepting one client key made for it (as
/// root). Dropping it stops it.
pub struct Sshd {
    _proc: Proc,
    dir: PathBuf,
    addr: SocketAddr,
    /// `ssh-ed25519 AAAA...`
    host_key: String,
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "porthole-test", "-f"])
        .arg(path)
        .output()
        .expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The first line a TCP server sends (an SSH banner), if it answers.
pub async fn banner(addr: SocketAddr) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    text.lines().next().map(str::to_string)
}

impl Sshd {
    /// Listens on `listen:port` in `ns` (`0.0.0.0`, or the namespace's own
    /// address); returns once it sends its banner.
    pub async fn start(ns: &Netns, listen: IpAddr, port: u16) -> Sshd {
        Sshd::start_with(ns, listen, port, false).await
    }

    /// [`Sshd::start`]; with `sockets`, clients may also reach the
    /// machine's UNIX sockets (`AllowStreamLocalForwarding`), as the user
    /// of a remote container engine does.
    pub async fn start_with(ns: &Netns, listen: IpAddr, port: u16, sockets: bool) -> Sshd {
        // sshd refuses to start without its privilege separation directory
        // (the Debian package makes it at boot; a container may not have it).
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let dir = ns.log_dir().join(format!("sshd-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the sshd directory");
        keygen(&dir.join("host_key"));
        keygen(&dir.join("client_key"));
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))
            .expect("write authorized_keys");
        // Forwarding to a UNIX socket on the client side needs only TCP
        // forwarding on the server: stream-local forwarding stays off
        // unless asked for.
        let stream_local = if sockets { "yes" } else { "no" };
        let config = format!(
            "ListenAddress {listen}\n\
             Port {port}\n\
             HostKey {dir}/host_key\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             PidFile none\n\
             StrictModes no\n\
             UsePAM no\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             AllowTcpForwarding yes\n\
             AllowStreamLocalForwarding {stream_local}\n\
             MaxStartups 100\n\
             LogLevel VERBOSE\n",
            dir = dir.display(),
        );
        let config_path = dir.join("sshd_config");
        std::fs::write(&config_path, config).expect("write sshd_config");
        let mut cmd = ns.command(SSHD);
        cmd.args(["-D", "-e", "-f"]).arg(&config_path);
        let mut proc = ns.spawn_command("sshd", cmd);
        let ip = if listen.is_unspecified() {
            IpAddr::V4(ns.addr())
        } else {
            listen
        };
        let addr = SocketAddr::new(ip, port);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = proc.try_wait() {
                panic!("sshd exited during start-up ({status}):\n{}", proc.log());
            }
            if banner(addr)
                .await
                .is_some_and(|b| b.starts_with("SSH-2.0-"))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not answer on {addr} within {DEADLINE:?}:\n{}",
                proc.log()
            );
            tokio::time::sleep(crate::POLL).await;
        }
        let pubkey = std::fs::read_to_string(dir.join("host_key.pub")).expect("host_key.pub");
        let host_key = pubkey
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        Sshd {
            _proc: proc,
            dir,
            addr,
            host_key,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its directory: keys, config (and whatever a test puts there).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The client's private key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_key")
    }

    /// The server's public host key, `ssh-ed25519 AAAA...`.
    pub fn host_key(&self) -> &str {
        &self.host_key
    }

    /// What a user's `~/.ssh/config` entry would say, as `-o` values.
    pub fn options(&self) -> Vec<String> {
        vec![
            "User=root".into(),
            format!("IdentityFile={}", self.client_key().display()),
            "IdentitiesOnly=yes".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "StrictHostKeyChecking=no".into(),
            "BatchMode=yes".into(),
            "LogLevel=ERROR".into(),
        ]
    }

    /// [`Sshd::options`] as `ssh` arguments, plus the port.
    pub fn ssh_args(&self) -> Vec<String> {
        let mut args = vec!["-p".to_string(), self.addr.port().to_string()];
        args.extend(
            self.options()
                .into_iter()
                .flat_map(|o| ["-o".to_string(), o]),
        );
        args
    }

    /// `root@ADDRESS`.
    pub fn destination(&self) -> String {
        format!("root@{}", self.addr.ip())
    }
}

/// `(pid, argv)` of every ssh process whose parent is `parent`.
pub fn ssh_children(parent: u32) -> Vec<(u32, Vec<String>)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if comm == "ssh" && ppid == Some(parent) {
            found.push((pid, argv(pid)));
        }
    }
    found
}

/// A process's command line.
pub fn argv(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The pid of the ssh ControlMaster (`ssh -M ...`) whose parent is
/// `parent` (a tunnel-svc), other than `other_than`.
pub fn ssh_master(parent: u32, other_than: Option<u32>) -> Option<u32> {
    ssh_children(parent)
        .into_iter()
        .find(|(pid, args)| Some(*pid) != other_than && args.iter().any(|a| a == "-M"))
        .map(|(pid, _)| pid)
}
