//! ssh backend: one OpenSSH ControlMaster per target, run and restarted by
//! a supervisor task; every tunnel is one forward added to that master.
//!
//! The forwards go from a UNIX socket per tunnel (`RUNTIME_DIR/fwd-PORT.sock`)
//! to `localhost:PORT` in the container, not from a host TCP port:
//! tunnel-svc owns the host listeners for every backend (127.0.0.1 and ::1,
//! conflict remapping, connection and byte counts), and ssh only carries
//! the bytes. [`Ssh::dial`] connects to that socket for an accepted host
//! connection.
//!
//! The master lives in its own 0700 runtime directory next to its control
//! socket (`ctl`). It is ready when `ssh -O check` answers; a dead master
//! is restarted with capped, jittered backoff and gets every wanted forward
//! back before it counts as up again. Every ssh command runs with
//! `BatchMode=yes` and a time bound, so a prompt or a hung peer cannot
//! stall a tunnel, and shutdown reaps the master: no ssh process outlives
//! tunnel-svc.

mod args;
mod sweep;
mod tail;

use sweep::exiting;
pub use sweep::sweep_stale;
use tail::Tail;

use super::{DialError, Upstream};
use crate::backoff::Backoff;
use args::*;
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long the master may take to log in before it counts as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a starting master is checked.
const POLL: Duration = Duration::from_millis(20);
/// Bound on every `ssh -O ...` control command.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Ssh::open`] waits for a master that is not up.
const OPEN_WAIT: Duration = Duration::from_secs(15);
/// How long a connection waits for its forward (being added, or being
/// re-added by a restarting master).
const DIAL_WAIT: Duration = Duration::from_secs(10);
/// How often a connection waiting for its forward looks again.
const FORWARD_POLL: Duration = Duration::from_millis(5);
/// How long the master may take to exit after `-O exit`.
const EXIT_WAIT: Duration = Duration::from_secs(3);
/// Restart delays of a dead master.
const RESTART_MIN: Duration = Duration::from_millis(200);
const RESTART_MAX: Duration = Duration::from_secs(10);
/// A master up this long resets the restart backoff.
const STABLE: Duration = Duration::from_secs(10);
/// Lines of the master's stderr kept to explain its death.
const TAIL_LINES: usize = 5;
/// `sun_path` holds 107 bytes and a NUL; ssh binds the control socket
/// under a temporary name 17 bytes longer than the ControlPath.
const MAX_CTL_PATH: usize = 107 - 17;

/// Why the ssh backend could not do something, in words for a tunnel's
/// error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SshError {
    #[error("cannot run ssh: {0}")]
    Run(String),
    #[error("ssh {what} timed out after {}s", CONTROL_TIMEOUT.as_secs())]
    Timeout { what: String },
    #[error("ssh {what} failed ({status})")]
    Failed { what: String, status: String },
    /// What ssh said on stderr when a control command failed.
    #[error("{0}")]
    Said(String),
    #[error("runtime directory {dir}: {error}")]
    Dir { dir: String, error: String },
    #[error("runtime directory {dir} is open to other users (mode {mode:o}); it must be 0700")]
    DirOpen { dir: String, mode: u32 },
    #[error("runtime directory {dir} is too long for ssh's control socket (at most {max} bytes)")]
    DirTooLong { dir: String, max: usize },
    #[error("the ssh backend for {0} is shut down")]
    Stopped(String),
    #[error("ssh master for {host} is not connected: {why}")]
    NotConnected { host: String, why: String },
    #[error("ssh master for {host} is not connected after {secs}s")]
    NotConnectedAfter { host: String, secs: u64 },
    #[error("the forward of port {0} was closed while opening")]
    ClosedWhileOpening(u16),
}

/// Settings of one target's ssh connection.
#[derive(Clone, Debug)]
pub struct SshConfig {
    pub target: String,
    /// Destination as the user's ssh config knows it (an alias or host).
    pub host: String,
    /// Extra `-o` options.
    pub options: Vec<String>,
    /// Private directory for the control socket and forward sockets.
    pub runtime_dir: PathBuf,
    /// UNIX sockets of the remote machine forwarded to local paths for
    /// the master's whole life (every master started again has them): a
    /// remote container engine's API.
    pub socket_forwards: Vec<(PathBuf, String)>,
}

/// The master as the rest of the backend sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Master {
    /// Not connected (yet, or again), and why the last attempt failed.
    Connecting { last_error: Option<String> },
    /// Connected with every wanted forward added. Each master that comes
    /// up gets the next generation.
    Up { generation: u64, pid: u32 },
    /// Shut down for good.
    Stopped,
}

/// State shared by the supervisor and the tunnels' calls.
struct Shared {
    config: SshConfig,
    ctl: PathBuf,
    /// Container ports to forward. The reconciler opens and closes a port
    /// in order, so a set says it all. The lock is also held while ssh
    /// adds or removes a forward, so a restart's re-adding and open/close
    /// never interleave.
    wanted: Mutex<BTreeSet<u16>>,
    master: watch::Sender<Master>,
    open_wait: Duration,
    /// The `Ciphers=` value every master of this target gets, found once
    /// (see [`cipher_preference`]).
    ciphers: tokio::sync::OnceCell<Option<String>>,
    /// `ssh{target, host}`: every log line of this backend is inside it.
    span: tracing::Span,
}

/// One target's ControlMaster and its forwards.
pub struct Ssh {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    supervisor: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Ssh {
    /// Starts the supervisor task, which connects the master in the
    /// background. Must be called inside a tokio runtime.
    pub fn start(config: SshConfig) -> Ssh {
        Ssh::start_with(config, OPEN_WAIT)
    }

    fn start_with(config: SshConfig, open_wait: Duration) -> Ssh {
        let span = tracing::info_span!("ssh", target = %config.target, host = %config.host);
        let shared = Arc::new(Shared {
            ctl: config.runtime_dir.join("ctl"),
            config,
            wanted: Mutex::new(BTreeSet::new()),
            master: watch::Sender::new(Master::Connecting { last_error: None }),
            open_wait,
            ciphers: tokio::sync::OnceCell::new(),
            span: span.clone(),
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(shared.clone().supervise(cancel.clone()).instrument(span));
        Ssh {
            shared,
            cancel,
            supervisor: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Waits (at most `timeout`) until a master is up, with its socket
    /// forwards; or says why there is none.
    pub async fn ready(&self, timeout: Duration) -> Result<(), SshError> {
        self.shared.wait_up(timeout, None).await.map(drop)
    }

    /// Adds the forward for container `port`, waiting (bounded) for the
    /// master if it is not up. Idempotent.
    pub async fn open(&self, port: u16) -> Result<(), SshError> {
        let s = &self.shared;
        s.open(port).instrument(s.span.clone()).await
    }

    /// Removes the forward of `port`.
    pub async fn close(&self, port: u16) {
        let s = &self.shared;
        s.close(port).instrument(s.span.clone()).await
    }

    /// Connects to the forward of `port` for one host connection.
    pub async fn dial(&self, port: u16) -> Result<Upstream, DialError> {
        let s = self.shared.clone();
        let path = forward_path(&s.config.runtime_dir, port);
        let deadline = tokio::time::Instant::now() + DIAL_WAIT;
        let stream = loop {
            let err = match UnixStream::connect(&path).await {
                Ok(u) => break u,
                Err(e) => e,
            };
            // Not there (yet): the tunnel's host listener opens before its
            // forward is added, and a restarting master re-adds every wanted
            // forward before it counts as up. Wait for either, boundedly (a
            // tunnel that closes meanwhile resets its connections anyway).
            if tokio::time::Instant::now() >= deadline {
                return Err(DialError::NoForward {
                    port,
                    error: err.to_string(),
                });
            }
            let up = match *s.master.borrow() {
                Master::Up { generation, .. } => Some(generation),
                _ => None,
            };
            match up {
                Some(_) => tokio::time::sleep(FORWARD_POLL).await,
                None => {
                    s.wait_up(DIAL_WAIT, up).await?;
                }
            }
        };
        // ssh closes a forward's socket the same way when the server closed
        // cleanly and when the master died: an end counts as clean only if
        // the master is alive.
        let ended_cleanly = Box::new(move || match *s.master.borrow() {
            Master::Up { pid, .. } if !exiting(pid) => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the ssh master went away",
            )),
        });
        Ok(Upstream::Forward {
            stream,
            ended_cleanly,
        })
    }

    /// Stops the master (`-O exit`, then SIGKILL if need be), waits for it
    /// and removes the sockets. No ssh process is left when this returns.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        let task = self.supervisor.lock().expect("not poisoned").take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                let _in = self.shared.span.enter();
                tracing::error!(error = %e, "ssh supervisor failed");
            }
        }
    }
}

impl Drop for Ssh {
    /// Without [`Ssh::shutdown`] the supervisor still stops the master, in
    /// the background.
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// How one master's life ended.
enum Life {
    Cancelled,
    Died {
        error: String,
        up_for: Option<Duration>,
    },
}

impl Shared {
    /// See [`Ssh::open`].
    async fn open(&self, port: u16) -> Result<(), SshError> {
        self.wanted.lock().await.insert(port);
        let mut newer_than = None;
        let mut last_error = SshError::ClosedWhileOpening(port);
        for _ in 0..3 {
            let generation = self.wait_up(self.open_wait, newer_than).await?;
            let wanted = self.wanted.lock().await;
            if !wanted.contains(&port) {
                return Err(SshError::ClosedWhileOpening(port));
            }
            match self.forward(port).await {
                Ok(()) => {
                    tracing::info!(port, "ssh forward added");
                    return Ok(());
                }
                Err(e) => last_error = e,
            }
            drop(wanted);
            if self.control(&["-O", "check"]).await.is_ok() {
                break; // The master is fine; the forward itself failed.
            }
            // The master went away meanwhile; the next one re-adds the port.
            newer_than = Some(generation);
        }
        Err(last_error)
    }

    /// See [`Ssh::close`].
    async fn close(&self, port: u16) {
        let mut wanted = self.wanted.lock().await;
        if !wanted.remove(&port) {
            return;
        }
        let up = matches!(*self.master.borrow(), Master::Up { .. });
        if up {
            let spec = forward_spec(&self.config.runtime_dir, port);
            let cancel = [os("-O"), os("cancel"), os("-L"), spec];
            match self.control_os(&cancel).await {
                Ok(()) => tracing::info!(port, "ssh forward removed"),
                Err(e) => tracing::warn!(port, error = %e, "cannot remove ssh forward"),
            }
        }
        let _ = std::fs::remove_file(forward_path(&self.config.runtime_dir, port));
    }

    /// Keeps a master running until `cancel`, restarting it with backoff.
    async fn supervise(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Backoff::new(RESTART_MIN, RESTART_MAX);
        let mut generation = 0;
        loop {
            let (error, up_for) = match self.run_master(&cancel, &mut generation).await {
                Life::Cancelled => break,
                Life::Died { error, up_for } => (error, up_for),
            };
            if up_for.is_some_and(|d| d >= STABLE) {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::warn!(error = %error, retry_in = ?delay, "ssh master is down");
            self.master.send_replace(Master::Connecting {
                last_error: Some(error),
            });
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.master.send_replace(Master::Stopped);
        self.remove_sockets();
        let _ = std::fs::remove_dir(&self.config.runtime_dir);
        tracing::info!("ssh master stopped");
    }

    /// Starts one master, waits until it answers on the control socket,
    /// re-adds every wanted forward, then waits for it to die or `cancel`.
    async fn run_master(&self, cancel: &CancellationToken, generation: &mut u64) -> Life {
        let died = |error: String| Life::Died {
            error,
            up_for: None,
        };
        if let Err(e) = self.prepare_dir() {
            return died(e.to_string());
        }
        let (mut child, mut tail) = match self.spawn_master().await {
            Ok(spawned) => spawned,
            Err(e) => return died(e.to_string()),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.stop(&mut child).await;
                    return Life::Cancelled;
                }
                status = child.wait() => return died(tail.explain(status).await),
                _ = tokio::time::sleep(POLL) => {}
            }
            if self.ctl.exists() && self.control(&["-O", "check"]).await.is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill().await;
                let why = tail.explain(child.wait().await).await;
                return died(format!(
                    "not connected after {}s: {why}",
                    READY_TIMEOUT.as_secs()
                ));
            }
        }
        let up_since = Instant::now();
        self.up(&child, generation).await;
        tokio::select! {
            _ = cancel.cancelled() => {
                self.stop(&mut child).await;
                Life::Cancelled
            }
            status = child.wait() => Life::Died {
                error: tail.explain(status).await,
                up_for: Some(up_since.elapsed()),
            },
        }
    }

    /// Starts an ssh master process, its stderr captured.
    async fn spawn_master(&self) -> Result<(Child, Tail), SshError> {
        let mut cmd = Command::new("ssh");
        let ciphers = self
            .ciphers
            .get_or_init(|| cipher_preference(&self.config))
            .await;
        cmd.args(master_args(&self.config, &self.ctl, ciphers.as_deref()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: a Ctrl-C meant for tunnel-svc must not
            // kill the master before shutdown stops it in order.
            .process_group(0);
        // ...but tunnel-svc dying any other way (SIGKILL) takes it along.
        crate::sys::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| SshError::Run(e.to_string()))?;
        let tail = Tail::capture(&mut child);
        tracing::info!(
            pid = child.id(),
            ciphers = ciphers.as_deref().unwrap_or("as ssh's configuration says"),
            "ssh master starting"
        );
        Ok((child, tail))
    }

    /// The master `child` answers: every wanted forward is added back,
    /// then it counts as up (a new generation).
    async fn up(&self, child: &Child, generation: &mut u64) {
        // Its own forwards (a remote engine's socket) before it counts as up:
        // the master runs with ClearAllForwardings, so they are added here.
        for (local, remote) in &self.config.socket_forwards {
            let mut spec = escape_percent(local);
            spec.push(":");
            spec.push(remote);
            if let Err(e) = self
                .control_os(&[os("-O"), os("forward"), os("-L"), spec])
                .await
            {
                tracing::warn!(socket = %remote, error = %e, "cannot forward the remote socket");
            }
        }
        let wanted = self.wanted.lock().await;
        for &port in wanted.iter() {
            if let Err(e) = self.forward(port).await {
                tracing::warn!(port, error = %e, "cannot re-add ssh forward");
            }
        }
        *generation += 1;
        self.master.send_replace(Master::Up {
            generation: *generation,
            pid: child.id().unwrap_or_default(),
        });
        tracing::info!(pid = child.id(), forwards = wanted.len(), "ssh master up");
    }

    /// Asks the master to exit, kills it if it does not, and reaps it.
    async fn stop(&self, child: &mut Child) {
        self.master.send_replace(Master::Stopped);
        if matches!(child.try_wait(), Ok(None)) {
            let asked = self.control(&["-O", "exit"]).await.is_ok();
            if !asked || tokio::time::timeout(EXIT_WAIT, child.wait()).await.is_err() {
                tracing::debug!("killing the ssh master");
                // SIGKILL, then waits: no zombie is left.
                let _ = child.kill().await;
            }
        }
    }

    /// Creates the runtime directory (0700) and clears sockets of an earlier
    /// master: a stale control socket would make ssh run without one.
    fn prepare_dir(&self) -> Result<(), SshError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = &self.config.runtime_dir;
        let shown = dir.display().to_string();
        let err = |e: std::io::Error| SshError::Dir {
            dir: shown.clone(),
            error: e.to_string(),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
        let mode = std::fs::metadata(dir).map_err(err)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(SshError::DirOpen {
                dir: shown,
                mode: mode & 0o777,
            });
        }
        if self.ctl.as_os_str().len() > MAX_CTL_PATH {
            return Err(SshError::DirTooLong {
                dir: shown,
                max: MAX_CTL_PATH - "/ctl".len(),
            });
        }
        self.remove_sockets();
        Ok(())
    }

    fn remove_sockets(&self) {
        let _ = std::fs::remove_file(&self.ctl);
        let Ok(entries) = std::fs::read_dir(&self.config.runtime_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("fwd-") && name.ends_with(".sock") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Waits until a master is up (one newer than `newer_than`, if given);
    /// returns its generation, or why there is none.
    async fn wait_up(&self, timeout: Duration, newer_than: Option<u64>) -> Result<u64, SshError> {
        let mut rx = self.master.subscribe();
        let wanted = |m: &Master| match m {
            Master::Up { generation, .. } => newer_than.is_none_or(|g| *generation > g),
            Master::Stopped => true,
            Master::Connecting { .. } => false,
        };
        let stopped = || SshError::Stopped(self.config.host.clone());
        let found = tokio::time::timeout(timeout, rx.wait_for(wanted))
            .await
            .map(|r| r.map(|state| state.clone()));
        let state = match found {
            Ok(Ok(state)) => state,
            Ok(Err(_)) => return Err(stopped()),
            Err(_) => self.master.borrow().clone(),
        };
        match state {
            Master::Up { generation, .. } if newer_than.is_none_or(|g| generation > g) => {
                Ok(generation)
            }
            Master::Stopped => Err(stopped()),
            Master::Connecting {
                last_error: Some(why),
            } => Err(SshError::NotConnected {
                host: self.config.host.clone(),
                why,
            }),
            _ => Err(SshError::NotConnectedAfter {
                host: self.config.host.clone(),
                secs: timeout.as_secs(),
            }),
        }
    }

    /// `ssh -O forward -L RUNTIME_DIR/fwd-PORT.sock:localhost:PORT`.
    async fn forward(&self, port: u16) -> Result<(), SshError> {
        let spec = forward_spec(&self.config.runtime_dir, port);
        self.control_os(&[os("-O"), os("forward"), os("-L"), spec])
            .await
    }

    async fn control(&self, op: &[&str]) -> Result<(), SshError> {
        let op: Vec<OsString> = op.iter().map(OsString::from).collect();
        self.control_os(&op).await
    }

    /// Runs one control command against the master, bounded in time;
    /// the error is ssh's stderr.
    async fn control_os(&self, op: &[OsString]) -> Result<(), SshError> {
        let mut cmd = Command::new("ssh");
        cmd.args(control_args(&self.config, &self.ctl, op))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let what = op
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let out = match tokio::time::timeout(CONTROL_TIMEOUT, cmd.output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(SshError::Run(e.to_string())),
            Err(_) => return Err(SshError::Timeout { what }),
        };
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        Err(if stderr.is_empty() {
            SshError::Failed {
                what,
                status: out.status.to_string(),
            }
        } else {
            SshError::Said(stderr)
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(super) fn config(dir: &std::path::Path) -> SshConfig {
        SshConfig {
            target: "dev".into(),
            host: "box".into(),
            options: vec!["User=me".into()],
            runtime_dir: dir.to_path_buf(),
            socket_forwards: Vec::new(),
        }
    }

    /// With no ssh configuration of the user's, the master is asked for
    /// AES-GCM first on a CPU with AES; a `Ciphers` option the user gave
    /// is left alone.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ph-ssh-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// No sshd needed: a master that cannot connect makes `open` fail with
    /// ssh's own words, and shutdown leaves nothing behind.
    #[tokio::test]
    async fn unreachable_host_fails_open_with_ssh_error() {
        if which_ssh().is_none() {
            eprintln!("SKIPPED: no ssh on PATH");
            return;
        }
        let base = temp_dir("unreachable");
        let dir = base.join("dev");
        let mut c = config(&dir);
        // Port 1 on loopback: refused at once.
        c.host = "127.0.0.1".into();
        c.options = vec![
            "Port=1".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "ConnectTimeout=2".into(),
        ];
        let ssh = Ssh::start_with(c, Duration::from_secs(2));
        let err = ssh.open(8080).await.unwrap_err().to_string();
        assert!(
            err.contains("not connected") && err.contains("refused"),
            "{err}"
        );
        ssh.close(8080).await;
        ssh.shutdown().await;
        assert!(!dir.exists(), "runtime dir removed");
        let err = ssh.open(8080).await.unwrap_err().to_string();
        assert!(err.contains("shut down"), "{err}");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[tokio::test]
    async fn refuses_a_runtime_dir_others_can_enter() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("open");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let ssh = Ssh::start_with(config(&dir), Duration::from_millis(500));
        let err = ssh.open(8080).await.unwrap_err();
        assert!(err.to_string().contains("must be 0700"), "{err}");
        ssh.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    pub(super) fn which_ssh() -> Option<PathBuf> {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("ssh"))
                .find(|p| p.is_file())
        })
    }
}
