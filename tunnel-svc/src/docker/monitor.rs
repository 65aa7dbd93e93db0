//! One container's monitor through its lives: copied in and started over
//! the exec API, the path its tunnel bytes take, started again when it
//! stops.

use super::engine::{Container, Follower};
use super::exec::{exec_channel, Current, ExecIo, Said, Slot, MONITOR_START};
use super::Transport;
use crate::backend::{grpc::Grpc, Backend};
use crate::reconcile::{Link, TargetSpec};
use crate::watch::Watcher;
use bollard::exec::{CreateExecOptions, StartExecResults};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Docker's embedded DNS server on user-defined networks: never forwarded.
const EMBEDDED_DNS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 11));

/// How long the host tries the monitor on the container's address.
const REACH_WAIT: Duration = Duration::from_secs(3);

/// Where one container's monitor is in its lives.
enum Life {
    /// A monitor is to be started.
    Starting,
    /// One runs and serves over its exec stream (and, handed `token`, on
    /// the container's address).
    Running {
        started: Box<Started>,
        token: Option<porthole::auth::Token>,
    },
    /// None runs, for this reason; another starts after a pause.
    Down(String),
}

/// What one container's monitor loop keeps from life to life.
struct Lives {
    c: Container,
    /// The exec stream of the life now, for the channel to take.
    current: Arc<Current>,
    /// Tunnel bytes over the exec stream.
    exec_backend: Arc<Backend>,
    /// Its networks changed, or it was unpaused: look again now.
    wake: Arc<tokio::sync::Notify>,
    backoff: crate::backoff::Backoff,
    /// The reason said last, so a monitor failing alike is said once.
    last_error: String,
    /// The next monitor is asked to listen on the container's address too.
    listen: bool,
    /// Why the engine refused the monitor's archive, once it did: the next
    /// monitors are streamed in over exec at once (see `inject`).
    refused: Option<String>,
}

/// How a container's tunnel bytes go, as `ls` shows it after `via`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Via {
    /// Over the monitor's exec stream.
    Exec,
    /// Over the exec stream, though the container's address was wanted.
    ExecBecause(String),
    /// To the monitor on the container's address.
    Ip(SocketAddr),
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Exec => f.write_str("exec"),
            Via::ExecBecause(why) => write!(f, "exec ({why})"),
            Via::Ip(addr) => write!(f, "ip {addr}"),
        }
    }
}

/// Why a monitor did not start in a container.
#[derive(Debug, thiserror::Error)]
pub(super) enum StartError {
    #[error("cannot inspect the container: {0}")]
    Inspect(String),
    #[error("cannot copy monitor-svc into the container: {0}")]
    Upload(String),
    #[error("cannot start monitor-svc in the container: {0}")]
    Exec(String),
    #[error("the exec started detached")]
    Detached,
    #[error("cannot hand the monitor its token: {0}")]
    Token(std::io::Error),
    #[error("monitor-svc did not start in time")]
    Timeout,
    /// It stopped before saying it serves, in its own words.
    #[error("{0}")]
    Said(String),
}

impl Follower {
    /// Makes `c` a target and keeps a monitor running in it until `cancel`
    /// (the container stopped, or tunnel-svc is stopping): injected and
    /// started again, with backoff, whenever it dies or cannot start (see
    /// [`Life`]). Why it is not running shows on the target (ListTargets,
    /// `ls`, the log).
    pub(super) async fn run_monitor(
        self: Arc<Self>,
        c: Container,
        cancel: CancellationToken,
        wake: Arc<tokio::sync::Notify>,
    ) {
        let mut lives = self.add_target(c, cancel.clone(), wake).await;
        let mut life = Life::Starting;
        loop {
            let next = async {
                match life {
                    Life::Starting => self.start_life(&mut lives).await,
                    Life::Running { started, token } => {
                        self.serve_life(&mut lives, *started, token).await
                    }
                    Life::Down(why) => self.rest(&mut lives, why).await,
                }
            };
            life = match cancel.run_until_cancelled(next).await {
                Some(next) => next,
                None => return,
            };
        }
    }

    /// Makes `c` a target, reached over its monitor's exec stream, with a
    /// watcher that follows every life of the monitor.
    async fn add_target(
        &self,
        c: Container,
        cancel: CancellationToken,
        wake: Arc<tokio::sync::Notify>,
    ) -> Lives {
        let current = Arc::new(Current::default());
        let channel = exec_channel(current.clone());
        let (rules, wrong) =
            crate::rules::from_labels(c.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        // Read when the container is attached, not at every listing: a
        // devcontainer.json on this machine is a file to read.
        let (dev, dev_wrong) = crate::devcontainer::from_labels(&c.labels, !self.engine.remote);
        for why in wrong.iter().chain(&dev_wrong) {
            tracing::warn!(error = %why, "container label ignored");
        }
        let exec_backend = Arc::new(Backend::Grpc(Grpc {
            channel: channel.clone(),
            raw: None,
            token: crate::backend::grpc::TokenFrom::Handed,
        }));
        self.reconciler
            .add_target(TargetSpec {
                name: c.name.clone(),
                backend: exec_backend.clone(),
                // The monitor's own port, once a monitor says which.
                monitor_port: 0,
                url: c.shown.url(),
                fixed: false,
                published: c.published.clone(),
                rules,
                dev: dev.map(Arc::new),
                compose: crate::devcontainer::compose_of(&c.labels),
            })
            .await;
        let watcher = Watcher {
            target: c.name.clone(),
            channel,
            reconciler: self.reconciler.clone(),
            ignore: vec![EMBEDDED_DNS],
        };
        tokio::spawn(watcher.run(cancel));
        Lives {
            c,
            current,
            exec_backend,
            wake,
            backoff: crate::backoff::Backoff::new(
                Duration::from_millis(200),
                Duration::from_secs(10),
            ),
            last_error: String::new(),
            listen: self.transport != Transport::Exec,
            refused: None,
        }
    }

    /// Starts a monitor: Running, or Down with the reason.
    async fn start_life(&self, lives: &mut Lives) -> Life {
        lives.current.set(Slot::Starting);
        let token = match lives
            .listen
            .then(porthole::auth::Token::generate)
            .transpose()
        {
            Ok(token) => token,
            Err(e) => {
                tracing::error!(error = %e, "cannot make a token; the exec stream carries everything");
                lives.listen = false;
                None
            }
        };
        match self
            .start_monitor(&lives.c, token.as_ref(), &mut lives.refused)
            .await
        {
            Ok(started) => Life::Running {
                started: Box::new(started),
                token,
            },
            Err(why) => Life::Down(why.to_string()),
        }
    }

    /// Serves one life of the monitor until its exec stream ends: Down.
    async fn serve_life(
        &self,
        lives: &mut Lives,
        started: Started,
        token: Option<porthole::auth::Token>,
    ) -> Life {
        let Started {
            io,
            ended,
            port,
            said,
            addresses,
        } = started;
        let c = &lives.c;
        lives.last_error.clear();
        lives.backoff.reset();
        // Every life has its own token and port: the path is set anew each
        // time, nothing of an earlier life kept, and before the monitor's
        // ports are read (its own is not forwarded).
        let path = match (&token, port) {
            (Some(token), Some(port)) => {
                self.path(&addresses, token, port, &lives.exec_backend)
                    .await
            }
            _ => Route::exec(Via::Exec, lives.exec_backend.clone(), 0),
        };
        if !path.reached && self.transport == Transport::Auto {
            lives.listen = false;
        }
        if token.is_some() || path.via != c.shown.via() {
            self.take(c, path).await;
        }
        lives.current.set(Slot::Ready(io));
        let mut ended = std::pin::pin!(ended);
        loop {
            tokio::select! {
                _ = &mut ended => return Life::Down(exited(&said)),
                // A network connected or disconnected: the address found
                // for this life may be gone, or another container's now.
                _ = lives.wake.notified() => {
                    let (Some(token), Some(port)) = (&token, port) else {
                        continue;
                    };
                    let addresses = self.addresses(c).await.unwrap_or_default();
                    let path = self.path(&addresses, token, port, &lives.exec_backend).await;
                    tracing::info!(via = %path.via, "the container's networks changed");
                    self.take(c, path).await;
                }
            }
        }
    }

    /// No monitor runs: says why (once for the same reason), then waits
    /// before the next is started.
    async fn rest(&self, lives: &mut Lives, why: String) -> Life {
        if why != lives.last_error {
            tracing::warn!(error = %why, "monitor not running in the container; trying again");
        }
        lives.current.set(Slot::Failed(why.clone()));
        self.reconciler
            .link(&lives.c.name, Link::Down { error: why.clone() })
            .await;
        lives.last_error = why;
        tokio::select! {
            _ = tokio::time::sleep(lives.backoff.next_delay()) => {}
            // Unpaused, or its networks changed: try now.
            _ = lives.wake.notified() => {}
        }
        Life::Starting
    }

    /// How tunnel bytes reach a monitor listening on `port` with `token`
    /// in a container with `addresses`: its address when the host reaches
    /// it, else the exec stream (which, with `auto`, then stops asking the
    /// monitor to listen).
    pub(super) async fn path(
        &self,
        addresses: &[IpAddr],
        token: &porthole::auth::Token,
        port: u16,
        exec: &Arc<Backend>,
    ) -> Route {
        let addr = match reach(addresses, port).await {
            Ok(addr) => addr,
            Err(why) if self.transport == Transport::Auto => {
                tracing::info!(reason = %why, "the host cannot reach the container's address; tunnel bytes go over the exec stream");
                return Route::exec(Via::Exec, exec.clone(), port);
            }
            Err(why) => {
                tracing::warn!(reason = %why, "--docker-transport ip: the container's address is not reachable");
                let via = Via::ExecBecause(format!("--docker-transport ip, but {why}"));
                return Route::exec(via, exec.clone(), port);
            }
        };
        let url = crate::config::MonitorUrl {
            host: addr.ip().to_string(),
            port,
        };
        match crate::backend::grpc::monitor_channel(&url, Some(token.clone())) {
            Ok(channel) => {
                let raw = self.raw_relay.then(|| {
                    crate::backend::grpc::Raw::new(url.host.clone(), port, Some(token.clone()))
                });
                let token = crate::backend::grpc::TokenFrom::Handed;
                Route {
                    via: Via::Ip(addr),
                    backend: Arc::new(Backend::Grpc(Grpc {
                        channel,
                        raw,
                        token,
                    })),
                    monitor_port: port,
                    reached: true,
                }
            }
            Err(e) => Route::exec(Via::ExecBecause(e.to_string()), exec.clone(), port),
        }
    }

    /// Container `c`'s tunnels go by `path` from now on.
    pub(super) async fn take(&self, c: &Container, path: Route) {
        let url = c.shown.set_via(&path.via);
        self.reconciler
            .set_backend(&c.name, path.backend, url, path.monitor_port)
            .await;
    }

    /// The container's addresses on its networks, as the engine says now.
    pub(super) async fn addresses(&self, c: &Container) -> Result<Vec<IpAddr>, String> {
        let info = self
            .docker
            .inspect_container(&c.id, None)
            .await
            .map_err(|e| engine_error(&e))?;
        Ok(addresses(&info))
    }

    /// Copies the monitor into `c` (`refused`: see [`Follower::copy_in`])
    /// and starts it on an exec stream; the stream, what fires when it
    /// ends, and the port the monitor listens on when it was handed a token.
    pub(super) async fn start_monitor(
        &self,
        c: &Container,
        token: Option<&porthole::auth::Token>,
        refused: &mut Option<String>,
    ) -> Result<Started, StartError> {
        let info = self
            .docker
            .inspect_container(&c.id, None)
            .await
            .map_err(|e| StartError::Inspect(engine_error(&e)))?;
        let addresses = addresses(&info);
        // No address of its own (`--network none`): nothing to listen on,
        // and nothing the host could reach; the exec stream it is.
        let token = token.filter(|_| !addresses.is_empty());
        let user = info.config.and_then(|c| c.user).unwrap_or_default();
        let path = self.copy_in(c, refused).await.map_err(StartError::Upload)?;
        let (mut io, ended) = self.exec_monitor(c, &path, token, non_root(&user)).await?;
        let port = match tokio::time::timeout(MONITOR_START, io.hello()).await {
            Err(_) => return Err(StartError::Timeout),
            Ok(hello) => hello.map_err(StartError::Said)?,
        };
        let said = io.said.clone();
        Ok(Started {
            io,
            ended,
            port,
            said,
            addresses,
        })
    }

    /// Runs the monitor (its file at `path`) in `c` on an exec stream
    /// (started as root when the container's `user` is another), hands it
    /// `token` there.
    async fn exec_monitor(
        &self,
        c: &Container,
        path: &str,
        token: Option<&porthole::auth::Token>,
        user: Option<&str>,
    ) -> Result<(ExecIo, tokio::sync::oneshot::Receiver<()>), StartError> {
        let exec = self
            .docker
            .create_exec(
                &c.id,
                CreateExecOptions {
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(command(path, token.is_some(), user)),
                    user: user.map(|_| "0".to_string()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| StartError::Exec(engine_error(&e)))?;
        let started = self
            .docker
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| StartError::Exec(engine_error(&e)))?;
        let StartExecResults::Attached { output, mut input } = started else {
            return Err(StartError::Detached);
        };
        if let Some(token) = token {
            // The token goes over the exec stream, never on a command line.
            use tokio::io::AsyncWriteExt;
            let line = format!("{}\n", token.secret());
            input
                .write_all(line.as_bytes())
                .await
                .map_err(StartError::Token)?;
        }
        Ok(ExecIo::new(output, input, c.name.clone()))
    }
}

/// The monitor's command line (its file at `path`): on stdio, and (with
/// `listen`) also on a free port of the container's address with the
/// token it reads from stdin; as `user` once it has removed itself.
pub(super) fn command(path: &str, listen: bool, user: Option<&str>) -> Vec<String> {
    let mut cmd = vec![
        path.to_string(),
        "--stdio".into(),
        "--replace".into(),
        "--remove-self".into(),
        "--log-format".into(),
        "json".into(),
    ];
    if listen {
        // Only tunnel-svc uses that listener: nothing for anyone else.
        cmd.extend(["--stdio-listen".into(), "0.0.0.0:0".into()]);
        cmd.extend(["--anonymous".into(), "none".into()]);
    }
    if let Some(user) = user {
        cmd.extend(["--user".into(), user.into()]);
    }
    cmd
}

/// The monitor on one of `addresses`, `port`, if the host reaches it (within
/// [`REACH_WAIT`]: the monitor binds once it has its token).
pub(super) async fn reach(addresses: &[IpAddr], port: u16) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = addresses
        .iter()
        .map(|ip| SocketAddr::new(*ip, port))
        .collect();
    if addrs.is_empty() {
        return Err("the container has no address of its own".into());
    }
    let deadline = tokio::time::Instant::now() + REACH_WAIT;
    loop {
        for addr in &addrs {
            let probe = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(addr),
            );
            if let Ok(Ok(_)) = probe.await {
                return Ok(*addr);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let shown: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            return Err(format!("no answer on {}", shown.join(", ")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A container's addresses on its networks, from an inspect.
pub(super) fn addresses(info: &bollard::models::ContainerInspectResponse) -> Vec<IpAddr> {
    info.network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .into_iter()
        .flat_map(|n| n.values())
        .filter_map(|n| n.ip_address.as_deref()?.parse::<IpAddr>().ok())
        .collect()
}

/// How a container's tunnel bytes go: shown as `via`, carried by
/// `backend`, with the monitor's own port (never forwarded).
pub(super) struct Route {
    pub(super) via: Via,
    pub(super) backend: Arc<Backend>,
    pub(super) monitor_port: u16,
    /// The container's address is used (not the exec stream).
    pub(super) reached: bool,
}

impl Route {
    pub(super) fn exec(via: Via, backend: Arc<Backend>, monitor_port: u16) -> Route {
        Route {
            via,
            backend,
            monitor_port,
            reached: false,
        }
    }
}

/// A monitor that started: its exec stream, what fires when the stream
/// ends, the port it listens on (when it was handed a token), and the last
/// warning it wrote.
pub(super) struct Started {
    pub(super) io: ExecIo,
    pub(super) ended: tokio::sync::oneshot::Receiver<()>,
    pub(super) port: Option<u16>,
    pub(super) said: Said,
    /// The container's addresses as the inspect before the start said.
    pub(super) addresses: Vec<IpAddr>,
}

/// The container's user (`docker run --user`) when it is not root: the
/// monitor is then started as root, so that it can remove itself from the
/// root-owned `/`, and becomes that user at once.
pub(super) fn non_root(user: &str) -> Option<&str> {
    let uid = user.split(':').next().unwrap_or_default();
    (!matches!(uid, "" | "0" | "root")).then_some(user)
}

/// Why a monitor stopped, in its own words when it left any.
pub(super) fn exited(said: &Said) -> String {
    match said.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
        Some(why) => format!("monitor-svc stopped: {why}"),
        None => "monitor-svc stopped".into(),
    }
}

/// A monitor's log line (its `--log-format json`: an event's fields at the
/// top level) as a level and a text: the message, then the other fields as
/// `key=value` in the order written. Anything else (a last `Error: ...`
/// line, the engine's own words) is a warning as it is.
pub(super) fn monitor_line(line: &str) -> (tracing::Level, String) {
    const NOT_FIELDS: [&str; 6] = ["timestamp", "level", "message", "target", "span", "spans"];
    let Ok(serde_json::Value::Object(v)) = serde_json::from_str::<serde_json::Value>(line) else {
        return (tracing::Level::WARN, line.to_string());
    };
    let level = v
        .get("level")
        .and_then(|l| l.as_str()?.parse().ok())
        .unwrap_or(tracing::Level::INFO);
    let mut text = v
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_string();
    for (k, val) in v.iter().filter(|(k, _)| !NOT_FIELDS.contains(&k.as_str())) {
        let val = val.as_str().map_or_else(|| val.to_string(), str::to_string);
        text.push_str(&format!(" {k}={val}"));
    }
    (level, text)
}

/// What the engine said, without bollard's wrapping.
pub(super) fn engine_error(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}
