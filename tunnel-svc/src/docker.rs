//! `tunnel-svc --docker`: follows the Docker engine's containers and puts a
//! monitor in each one it selects. The monitor (a static `monitor-svc`) is
//! copied in through the Engine API and started with the exec API as
//! `monitor-svc --stdio`; its gRPC API — events and the Relay that carries
//! tunnel bytes — runs over that exec stream, so nothing needs a route to
//! the container's address and no token is needed (only tunnel-svc holds
//! the stream). A container is a target named after it; it appears when
//! the container starts and goes, with its host ports, when it stops.

use crate::backend::{grpc::Grpc, Backend};
use crate::model::{PortKey, Proto};
use crate::reconcile::{Handle, Link, TargetSpec};
use crate::watch::Watcher;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::query_parameters::{EventsOptions, ListContainersOptions, UploadToContainerOptions};
use bollard::Docker;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Where the monitor is put in a container: a file at the root, which the
/// monitor removes as it starts (`--remove-self`), so nothing of porthole
/// stays in the container's filesystem.
const MONITOR_PATH: &str = "/.porthole-monitor-svc";

/// Containers followed now: when fewer, what their monitors' streams held
/// is handed back to the system (see `trim_after_connections_end`).
pub static FOLLOWED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How long a container that died keeps its tunnels (new connections
/// waiting) in case it starts again: `docker restart` is a stop and a
/// start, and its events are a stopped container's until the start. A
/// container removed (`docker rm`) frees its host ports at once.
pub const RESTART_WINDOW: Duration = Duration::from_secs(2);

/// Docker's embedded DNS server on user-defined networks: never forwarded.
const EMBEDDED_DNS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 11));

#[derive(Clone, Debug)]
pub struct Options {
    /// `docker ps --filter` pairs: only matching containers are followed.
    pub filters: Vec<(String, String)>,
    /// The static monitor-svc to put in each container.
    pub monitor_binary: PathBuf,
    /// It, read and checked once, as the archive each container gets.
    pub archive: Archive,
    pub transport: Transport,
    /// Give the grpc backend the raw relay path where the container's
    /// address is reached (`--no-raw-relay` turns it off).
    pub raw_relay: bool,
}

/// The monitor as a tar archive (see [`monitor_archive`]).
#[derive(Clone)]
pub struct Archive(Bytes);

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Archive({} bytes)", self.0.len())
    }
}

/// How tunnel bytes reach a container (`--docker-transport`). Events always
/// come over the monitor's exec stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The container's address when the host reaches it, else the exec
    /// stream.
    Auto,
    /// Always the exec stream: works wherever the Engine API does.
    Exec,
    /// The container's address (the monitor listens there too, with a
    /// token of its own handed over the exec stream); when the host cannot
    /// reach it, the target says so and the exec stream carries the bytes.
    Ip,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Transport, String> {
        match s {
            "auto" => Ok(Transport::Auto),
            "exec" => Ok(Transport::Exec),
            "ip" => Ok(Transport::Ip),
            other => Err(format!("{other:?}: use auto, exec or ip")),
        }
    }
}

/// How long the host tries the monitor on the container's address.
const REACH_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("{}: {why}; build a static one with RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu -p monitor-svc and pass it with --monitor-binary", path.display())]
    Binary { path: PathBuf, why: String },
    #[error("cannot reach the Docker engine (DOCKER_HOST or /var/run/docker.sock): {0}")]
    Engine(String),
    #[error("bad --docker-filter {0:?}: use KEY=VALUE with KEY one of label, name, id")]
    Filter(String),
}

/// Parses `--docker-filter KEY=VALUE`.
pub fn filter(s: &str) -> Result<(String, String), DockerError> {
    match s.split_once('=') {
        Some((k @ ("label" | "name" | "id"), v)) if !v.is_empty() => Ok((k.into(), v.into())),
        _ => Err(DockerError::Filter(s.into())),
    }
}

/// Why `bytes` cannot run in any x86_64 Linux container, if it cannot: not
/// an x86_64 ELF executable, or linked dynamically (it names an
/// interpreter, which a busybox or distroless image does not have).
pub fn not_static(bytes: &[u8]) -> Option<String> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Some("not a 64-bit little-endian ELF executable".into());
    }
    if u16_at(18) != Some(62) {
        return Some("not built for x86_64".into());
    }
    let phoff = bytes
        .get(32..40)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    let (Some(phoff), Some(size), Some(count)) = (phoff, u16_at(54), u16_at(56)) else {
        return Some("truncated ELF header".into());
    };
    for i in 0..usize::from(count) {
        let at = phoff + i * usize::from(size);
        let Some(kind) = bytes.get(at..at + 4) else {
            return Some("truncated program headers".into());
        };
        if u32::from_le_bytes(kind.try_into().expect("4 bytes")) == PT_INTERP {
            return Some("linked dynamically (it needs the host's libc and loader)".into());
        }
    }
    None
}

/// A tar archive holding one executable file `name` with `data`.
fn tar_one(name: &str, data: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    let field = |h: &mut [u8; 512], at: usize, len: usize, value: &[u8]| {
        h[at..at + value.len().min(len)].copy_from_slice(&value[..value.len().min(len)]);
    };
    let octal = |n: u64, width: usize| format!("{n:0w$o}\0", w = width - 1).into_bytes();
    field(&mut header, 0, 100, name.as_bytes());
    field(&mut header, 100, 8, &octal(0o755, 8));
    field(&mut header, 108, 8, &octal(0, 8));
    field(&mut header, 116, 8, &octal(0, 8));
    field(&mut header, 124, 12, &octal(data.len() as u64, 12));
    field(&mut header, 136, 12, &octal(0, 12));
    field(&mut header, 148, 8, b"        ");
    header[156] = b'0';
    field(&mut header, 257, 6, b"ustar\0");
    field(&mut header, 263, 2, b"00");
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    field(&mut header, 148, 8, format!("{sum:06o}\0 ").as_bytes());
    let mut out = Vec::with_capacity(512 + data.len() + 1536);
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.resize(out.len() + 1024, 0);
    out
}

/// Reads and checks the monitor binary; the archive to upload.
pub fn monitor_archive(path: &Path) -> Result<Archive, DockerError> {
    let binary = std::fs::read(path).map_err(|e| DockerError::Binary {
        path: path.into(),
        why: format!("cannot read it ({e})"),
    })?;
    if let Some(why) = not_static(&binary) {
        return Err(DockerError::Binary {
            path: path.into(),
            why: format!("cannot run in a container: {why}"),
        });
    }
    let name = MONITOR_PATH.trim_start_matches('/');
    Ok(Archive(Bytes::from(tar_one(name, &binary))))
}

/// The monitor for `--docker`: `--monitor-binary`, else `monitor-svc`
/// beside this executable.
pub fn default_monitor_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("monitor-svc"))
        .unwrap_or_else(|| PathBuf::from("monitor-svc"))
}

/// How a followed container is shown (`docker://NAME (ID, IMAGE) via
/// HOW`), shared by its monitor loop and a rename.
#[derive(Clone, Debug)]
struct Shown(Arc<Mutex<ShownParts>>);

#[derive(Debug)]
struct ShownParts {
    name: String,
    short_id: String,
    image: String,
    via: String,
}

impl Shown {
    fn new(name: &str, id: &str, image: &str) -> Shown {
        Shown(Arc::new(Mutex::new(ShownParts {
            name: name.into(),
            short_id: id.chars().take(12).collect(),
            image: image.into(),
            via: "exec".into(),
        })))
    }

    fn parts(&self) -> std::sync::MutexGuard<'_, ShownParts> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn url(&self) -> String {
        let p = self.parts();
        format!(
            "docker://{} ({}, {}) via {}",
            p.name, p.short_id, p.image, p.via
        )
    }

    fn name(&self) -> String {
        self.parts().name.clone()
    }

    fn via(&self) -> String {
        self.parts().via.clone()
    }

    /// The url with tunnel bytes going `via`.
    fn set_via(&self, via: &str) -> String {
        self.parts().via = via.into();
        self.url()
    }

    /// The url under the new name.
    fn rename(&self, name: &str) -> String {
        self.parts().name = name.into();
        self.url()
    }
}

/// A container as the engine lists it.
#[derive(Clone, Debug)]
struct Container {
    id: String,
    name: String,
    /// Container ports published on the host with `-p`, with the host
    /// port.
    published: BTreeMap<PortKey, u16>,
    /// `porthole.*` labels.
    labels: HashMap<String, String>,
    /// `--network`: a network's name, `host`, `none` or `container:ID`.
    network_mode: String,
    shown: Shown,
}

impl Container {
    fn from_summary(c: bollard::models::ContainerSummary) -> Option<Container> {
        let id = c.id?;
        let name = c
            .names
            .and_then(|n| n.into_iter().next())
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_else(|| id.chars().take(12).collect());
        let published = c
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| {
                use bollard::models::PortSummaryTypeEnum as Type;
                let proto = match p.typ {
                    None | Some(Type::TCP) => Proto::Tcp,
                    Some(Type::UDP) => Proto::Udp,
                    Some(_) => return None,
                };
                Some(((proto, p.private_port), p.public_port?))
            })
            .collect();
        let network_mode = c
            .host_config
            .and_then(|h| h.network_mode)
            .unwrap_or_default();
        let image = c.image.unwrap_or_default();
        Some(Container {
            network_mode,
            shown: Shown::new(&name, &id, &image),
            id,
            name,
            published,
            labels: c
                .labels
                .unwrap_or_default()
                .into_iter()
                .filter(|(k, _)| k.starts_with("porthole."))
                .collect(),
        })
    }

    /// Why the container gets no monitor of its own, if it does not: its
    /// ports are the host's already (`--network host`), or another
    /// container's (`--network container:OTHER`), forwarded as that one's.
    fn not_followed(&self) -> Option<String> {
        if self.network_mode == "host" {
            return Some(
                "it uses the host's network (--network host): its ports are on the host \
                 already; nothing to forward"
                    .into(),
            );
        }
        let other = self.network_mode.strip_prefix("container:")?;
        Some(format!(
            "it shares the network of container {} (--network container:): its ports are \
             that container's, forwarded once, as that container's",
            &other[..other.len().min(12)]
        ))
    }
}

/// Connects to the engine (`DOCKER_HOST`, else the local socket) and checks
/// that it answers.
pub async fn connect() -> Result<Docker, DockerError> {
    let docker = Docker::connect_with_defaults().map_err(|e| DockerError::Engine(e.to_string()))?;
    docker
        .ping()
        .await
        .map_err(|e| DockerError::Engine(e.to_string()))?;
    Ok(docker)
}

/// Follows the engine until `shutdown`: every running container that
/// matches the filters gets a monitor and is a target while it runs.
pub async fn follow(
    docker: Docker,
    opts: Options,
    reconciler: Handle,
    shutdown: CancellationToken,
) {
    let mut filters: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in &opts.filters {
        filters.entry(k.clone()).or_default().push(v.clone());
    }
    let follower = Follower {
        docker,
        filters,
        archive: opts.archive.0.clone(),
        reconciler,
        transport: opts.transport,
        raw_relay: opts.raw_relay,
        attached: Mutex::new(BTreeMap::new()),
        stopping: Mutex::new(BTreeMap::new()),
    };
    let follower = Arc::new(follower);
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    // The event stream ends when the engine restarts: subscribe again and
    // catch up with what changed meanwhile.
    loop {
        // Subscribe first, so no start between the listing and the stream
        // is missed (a container seen twice is attached once).
        let mut event_filters = HashMap::new();
        event_filters.insert(
            "type".to_string(),
            vec!["container".to_string(), "network".to_string()],
        );
        let events = follower.docker.events(Some(EventsOptions {
            filters: Some(event_filters),
            ..Default::default()
        }));
        follower.clone().resync(&shutdown).await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = follower.clone().follow_events(events, &shutdown, &mut backoff) => {}
        }
        tracing::warn!("the Docker event stream ended; following it again");
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
    let ids: Vec<String> = follower
        .attached
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    for id in ids {
        follower.detach(&id).await;
    }
}

struct Follower {
    docker: Docker,
    filters: HashMap<String, Vec<String>>,
    archive: Bytes,
    reconciler: Handle,
    transport: Transport,
    raw_relay: bool,
    /// Attached containers by id.
    attached: Mutex<BTreeMap<String, Attached>>,
    /// Containers that died, by id: what keeps their tunnels for the
    /// [`RESTART_WINDOW`].
    stopping: Mutex<BTreeMap<String, CancellationToken>>,
}

/// A container with a monitor loop.
struct Attached {
    /// How it is shown (its name).
    shown: Shown,
    /// Stops its monitor.
    cancel: CancellationToken,
    /// Wakes its monitor loop: its networks changed (the path to its
    /// monitor is found again), or it was unpaused or started again (a
    /// monitor that could not start is tried at once).
    wake: Arc<tokio::sync::Notify>,
}

impl Follower {
    /// Acts on the engine's container events until the stream ends.
    async fn follow_events(
        self: Arc<Self>,
        mut events: impl Stream<Item = Result<bollard::models::EventMessage, bollard::errors::Error>>
            + Unpin,
        shutdown: &CancellationToken,
        backoff: &mut crate::backoff::Backoff,
    ) {
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "Docker event stream error");
                    return;
                }
            };
            backoff.reset();
            if event.typ == Some(bollard::models::EventMessageTypeEnum::NETWORK) {
                // connect or disconnect: the container's addresses changed.
                let container = event
                    .actor
                    .and_then(|a| a.attributes?.get("container").cloned());
                if let Some(id) = container {
                    self.wake(&id);
                }
                continue;
            }
            let (Some(action), Some(id)) = (event.action, event.actor.and_then(|a| a.id)) else {
                continue;
            };
            match action.as_str() {
                "start" => {
                    // Back (`docker restart`, its restart policy): its
                    // tunnels stay, its monitor loop starts the next
                    // monitor now.
                    self.stopping(&id, None);
                    self.wake(&id);
                    self.clone().attach_matching(&id, shutdown).await
                }
                "die" if self.restarting(&id).await => {
                    tracing::info!(id = %id, "the container died and its restart policy restarts it; its tunnels wait for it");
                }
                "die" => {
                    // Stopped, or restarting (`docker restart` looks the
                    // same until it starts): its tunnels wait RESTART_WINDOW
                    // for it, then close.
                    let gone = CancellationToken::new();
                    self.stopping(&id, Some(gone.clone()));
                    let (me, id) = (self.clone(), id.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = gone.cancelled() => {}
                            _ = tokio::time::sleep(RESTART_WINDOW) => me.detach(&id).await,
                        }
                    });
                }
                "destroy" => self.detach(&id).await,
                "rename" => self.clone().renamed(&id, shutdown).await,
                // Its monitor is frozen with it: the target says so, and
                // new connections wait (see --park).
                "pause" => self.paused(&id, true).await,
                // A monitor that could not be started while the container
                // was paused is tried again now, not after its backoff.
                "unpause" => {
                    self.paused(&id, false).await;
                    self.wake(&id);
                }
                _ => {}
            }
        }
    }

    /// Attaches every running container that matches and is not attached
    /// yet; detaches those that no longer run.
    async fn resync(self: Arc<Self>, shutdown: &CancellationToken) {
        let running = match self.list(None).await {
            Ok(list) => list,
            Err(e) => {
                tracing::error!(error = %engine_error(&e), "cannot list containers");
                return;
            }
        };
        let gone: Vec<String> = {
            let attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
            attached
                .keys()
                .filter(|id| !running.iter().any(|c| &c.id == *id))
                .cloned()
                .collect()
        };
        for id in gone {
            self.detach(&id).await;
        }
        for c in running {
            self.clone().attach(c, shutdown);
        }
    }

    /// Running containers matching the filters (and `id`, if given).
    async fn list(&self, id: Option<&str>) -> Result<Vec<Container>, bollard::errors::Error> {
        let mut filters = self.filters.clone();
        filters.insert("status".into(), vec!["running".into()]);
        if let Some(id) = id {
            filters.insert("id".into(), vec![id.into()]);
        }
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await?;
        Ok(list
            .into_iter()
            .filter_map(Container::from_summary)
            .collect())
    }

    /// Attaches container `id` if it runs and matches the filters.
    async fn attach_matching(self: Arc<Self>, id: &str, shutdown: &CancellationToken) {
        match self.list(Some(id)).await {
            Ok(list) => {
                for c in list {
                    self.clone().attach(c, shutdown);
                }
            }
            Err(e) => {
                tracing::warn!(error = %engine_error(&e), id = %id, "cannot look the container up")
            }
        }
    }

    /// Puts a monitor in `c` and makes it a target, in the background.
    fn attach(self: Arc<Self>, c: Container, shutdown: &CancellationToken) {
        if let Some(why) = c.not_followed() {
            tracing::info!(container = %c.name, "not followed: {why}");
            return;
        }
        let cancel = shutdown.child_token();
        let wake = Arc::new(tokio::sync::Notify::new());
        {
            let mut attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
            if attached.contains_key(&c.id) {
                return;
            }
            let a = Attached {
                shown: c.shown.clone(),
                cancel: cancel.clone(),
                wake: wake.clone(),
            };
            attached.insert(c.id.clone(), a);
            FOLLOWED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let span = tracing::info_span!("docker", container = %c.name);
        tokio::spawn(self.run_monitor(c, cancel, wake).instrument(span));
    }

    /// Whether the engine is restarting container `id` by its restart
    /// policy (`--restart`): its tunnels then stay, their new connections
    /// waiting (see `--park`), for as long as that takes. A container
    /// stopped by hand, or restarted with `docker restart`, looks stopped
    /// here: its tunnels wait only the [`RESTART_WINDOW`].
    async fn restarting(&self, id: &str) -> bool {
        let Ok(info) = self.docker.inspect_container(id, None).await else {
            return false;
        };
        info.state.and_then(|s| s.restarting).unwrap_or(false)
    }

    /// Container `id` is stopping, its tunnels closing after the window
    /// unless `wait` is cancelled; None: it started again, they stay.
    fn stopping(&self, id: &str, wait: Option<CancellationToken>) {
        let mut stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
        let old = match wait {
            Some(w) => stopping.insert(id.to_string(), w),
            None => stopping.remove(id),
        };
        if let Some(old) = old {
            old.cancel();
        }
    }

    /// Shows container `id` paused (its link down, saying why) or not.
    async fn paused(&self, id: &str, paused: bool) {
        let name = {
            let attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
            attached.get(id).map(|a| a.shown.name())
        };
        let Some(name) = name else {
            return;
        };
        let link = if paused {
            Link::Down {
                error: "the container is paused (docker pause); new connections wait for it".into(),
            }
        } else {
            Link::Up {
                instance_id: String::new(),
            }
        };
        self.reconciler.link(&name, link).await;
    }

    /// Wakes container `id`'s monitor loop, if it is followed (see
    /// [`Attached::wake`]).
    fn wake(&self, id: &str) {
        let attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = attached.get(id) {
            a.wake.notify_one();
        }
    }

    /// Container `id` has a new name: its target takes it, and keeps its
    /// tunnels and connections; unless the filters no longer select it.
    async fn renamed(self: Arc<Self>, id: &str, shutdown: &CancellationToken) {
        let now = match self.list(Some(id)).await {
            Ok(list) => list.into_iter().next(),
            Err(e) => {
                tracing::warn!(error = %engine_error(&e), id = %id, "cannot look the container up");
                return;
            }
        };
        let shown = self
            .attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|a| a.shown.clone());
        match (now, shown) {
            (Some(c), Some(shown)) => {
                let from = shown.name();
                let url = shown.rename(&c.name);
                self.reconciler.rename_target(&from, &c.name, url).await;
                tracing::info!(container = %c.name, was = %from, "container renamed; its tunnels stay");
            }
            (Some(c), None) => self.attach(c, shutdown),
            (None, _) => self.detach(id).await,
        }
    }

    /// The container stopped or went: its target and tunnels go.
    async fn detach(&self, id: &str) {
        let gone = self
            .attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        // Whatever kept it for the restart window has done so.
        self.stopping(id, None);
        if let Some(Attached { shown, cancel, .. }) = gone {
            let name = shown.name();
            cancel.cancel();
            self.reconciler.remove_target(&name).await;
            FOLLOWED.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(container = %name, "container stopped; its tunnels are closed");
        }
    }

    /// Makes `c` a target and keeps a monitor running in it until `cancel`
    /// (the container stopped, or tunnel-svc is stopping): injected and
    /// started again, with backoff, whenever it dies or cannot start. Why
    /// it is not running shows on the target (ListTargets, `ls`, the log).
    async fn run_monitor(
        self: Arc<Self>,
        c: Container,
        cancel: CancellationToken,
        wake: Arc<tokio::sync::Notify>,
    ) {
        let current = Arc::new(Current::default());
        let channel = exec_channel(current.clone());
        let (rules, wrong) =
            crate::rules::from_labels(c.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for why in wrong {
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
            })
            .await;
        let watcher = Watcher {
            target: c.name.clone(),
            channel,
            reconciler: self.reconciler.clone(),
            ignore: vec![EMBEDDED_DNS],
        };
        tokio::spawn(watcher.run(cancel.clone()));
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut last_error = String::new();
        // Whether the monitor also listens on the container's address, and
        // how tunnel bytes go now ("exec", or "ip ADDR").
        let mut listen = self.transport != Transport::Exec;
        loop {
            current.set(Slot::Starting);
            let token = match listen.then(porthole::auth::Token::generate).transpose() {
                Ok(token) => token,
                Err(e) => {
                    tracing::error!(error = %e, "cannot make a token; the exec stream carries everything");
                    listen = false;
                    None
                }
            };
            let started = tokio::select! {
                _ = cancel.cancelled() => return,
                started = self.start_monitor(&c, token.as_ref()) => started,
            };
            let why = match started {
                Ok(Started {
                    io,
                    ended,
                    port,
                    said,
                    addresses,
                }) => {
                    last_error.clear();
                    backoff.reset();
                    // Every life has its own token and port: the path is
                    // set anew each time, nothing of an earlier life kept,
                    // and before the monitor's ports are read (its own is
                    // not forwarded).
                    let path = match (&token, port) {
                        (Some(token), Some(port)) => {
                            self.path(&addresses, token, port, &exec_backend).await
                        }
                        _ => Route::exec("exec".into(), exec_backend.clone(), 0),
                    };
                    if !path.reached && self.transport == Transport::Auto {
                        listen = false;
                    }
                    if token.is_some() || path.via != c.shown.via() {
                        self.take(&c, path).await;
                    }
                    current.set(Slot::Ready(io));
                    let mut ended = std::pin::pin!(ended);
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = &mut ended => break,
                            // A network connected or disconnected: the
                            // address found for this life may be gone, or
                            // another container's now.
                            _ = wake.notified() => {
                                let (Some(token), Some(port)) = (&token, port) else {
                                    continue;
                                };
                                let addresses = self.addresses(&c).await.unwrap_or_default();
                                let path = self.path(&addresses, token, port, &exec_backend).await;
                                tracing::info!(via = %path.via, "the container's networks changed");
                                self.take(&c, path).await;
                            }
                        }
                    }
                    exited(&said)
                }
                Err(why) => why,
            };
            if why != last_error {
                tracing::warn!(error = %why, "monitor not running in the container; trying again");
            }
            current.set(Slot::Failed(why.clone()));
            self.reconciler
                .link(&c.name, Link::Down { error: why.clone() })
                .await;
            last_error = why;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                // Unpaused, or its networks changed: try now.
                _ = wake.notified() => {}
            }
        }
    }

    /// How tunnel bytes reach a monitor listening on `port` with `token`
    /// in a container with `addresses`: its address when the host reaches
    /// it, else the exec stream (which, with `auto`, then stops asking the
    /// monitor to listen).
    async fn path(
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
                return Route::exec("exec".into(), exec.clone(), port);
            }
            Err(why) => {
                tracing::warn!(reason = %why, "--docker-transport ip: the container's address is not reachable");
                let via = format!("exec (--docker-transport ip, but {why})");
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
                    via: format!("ip {addr}"),
                    backend: Arc::new(Backend::Grpc(Grpc {
                        channel,
                        raw,
                        token,
                    })),
                    monitor_port: port,
                    reached: true,
                }
            }
            Err(e) => Route::exec(format!("exec ({e})"), exec.clone(), port),
        }
    }

    /// Container `c`'s tunnels go by `path` from now on.
    async fn take(&self, c: &Container, path: Route) {
        let url = c.shown.set_via(&path.via);
        self.reconciler
            .set_backend(&c.name, path.backend, url, path.monitor_port)
            .await;
    }

    /// The container's addresses on its networks, as the engine says now.
    async fn addresses(&self, c: &Container) -> Result<Vec<IpAddr>, String> {
        let info = self
            .docker
            .inspect_container(&c.id, None)
            .await
            .map_err(|e| engine_error(&e))?;
        Ok(addresses(&info))
    }

    /// Copies the monitor into `c` and starts it on an exec stream; the
    /// stream, what fires when it ends, and the port the monitor listens
    /// on when it was handed a token.
    async fn start_monitor(
        &self,
        c: &Container,
        token: Option<&porthole::auth::Token>,
    ) -> Result<Started, String> {
        let info = self
            .docker
            .inspect_container(&c.id, None)
            .await
            .map_err(|e| format!("cannot inspect the container: {}", engine_error(&e)))?;
        let addresses = addresses(&info);
        let user = info.config.and_then(|c| c.user).unwrap_or_default();
        let user = non_root(&user);
        // Never replaces a directory of the container's with the file.
        let upload = UploadToContainerOptions {
            path: "/".into(),
            no_overwrite_dir_non_dir: Some("true".into()),
            ..Default::default()
        };
        self.docker
            .upload_to_container(
                &c.id,
                Some(upload),
                bollard::body_stream(upload_body(&self.archive)),
            )
            .await
            .map_err(|e| {
                format!(
                    "cannot copy monitor-svc into the container: {}",
                    engine_error(&e)
                )
            })?;
        let exec = self
            .docker
            .create_exec(
                &c.id,
                CreateExecOptions {
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(command(token.is_some(), user)),
                    user: user.map(|_| "0".to_string()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                format!(
                    "cannot start monitor-svc in the container: {}",
                    engine_error(&e)
                )
            })?;
        let started = self.docker.start_exec(&exec.id, None).await.map_err(|e| {
            format!(
                "cannot start monitor-svc in the container: {}",
                engine_error(&e)
            )
        })?;
        let StartExecResults::Attached { output, mut input } = started else {
            return Err("the exec started detached".into());
        };
        if let Some(token) = token {
            // The token goes over the exec stream, never on a command line.
            use tokio::io::AsyncWriteExt;
            let line = format!("{}\n", token.secret());
            input
                .write_all(line.as_bytes())
                .await
                .map_err(|e| format!("cannot hand the monitor its token: {e}"))?;
        }
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        let io = ExecIo {
            output,
            input,
            pending: Bytes::new(),
            stderr: Vec::new(),
            said: Said::default(),
            container: c.name.clone(),
            budget: porthole::telemetry::Budget::new(
                crate::reconcile::LOG_PER_SEC,
                crate::reconcile::LOG_BURST,
            ),
            ended: Some(ended_tx),
        };
        let mut io = io;
        let port = match tokio::time::timeout(MONITOR_START, io.hello()).await {
            Err(_) => return Err("monitor-svc did not start in time".into()),
            Ok(hello) => hello?,
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
}

/// The monitor's command line: on stdio, and (with `listen`) also on a
/// free port of the container's address with the token it reads from
/// stdin; as `user` once it has removed itself.
fn command(listen: bool, user: Option<&str>) -> Vec<String> {
    let mut cmd = vec![
        MONITOR_PATH.to_string(),
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
async fn reach(addresses: &[IpAddr], port: u16) -> Result<SocketAddr, String> {
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
fn addresses(info: &bollard::models::ContainerInspectResponse) -> Vec<IpAddr> {
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
struct Route {
    via: String,
    backend: Arc<Backend>,
    monitor_port: u16,
    /// The container's address is used (not the exec stream).
    reached: bool,
}

impl Route {
    fn exec(via: String, backend: Arc<Backend>, monitor_port: u16) -> Route {
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
struct Started {
    io: ExecIo,
    ended: tokio::sync::oneshot::Receiver<()>,
    port: Option<u16>,
    said: Said,
    /// The container's addresses as the inspect before the start said.
    addresses: Vec<IpAddr>,
}

/// The container's user (`docker run --user`) when it is not root: the
/// monitor is then started as root, so that it can remove itself from the
/// root-owned `/`, and becomes that user at once.
fn non_root(user: &str) -> Option<&str> {
    let uid = user.split(':').next().unwrap_or_default();
    (!matches!(uid, "" | "0" | "root")).then_some(user)
}

/// The archive as a request body of 64 KiB slices of the one shared copy.
/// Given whole, the HTTP client copies it into the connection's write
/// buffer (a Unix socket takes no vectored writes), and the pooled
/// connection keeps that 8 MiB buffer: 20 containers started at once held
/// 170 MiB.
fn upload_body(archive: &Bytes) -> impl Stream<Item = Bytes> + Send + 'static {
    const CHUNK: usize = 64 << 10;
    let archive = archive.clone();
    let chunks = (0..archive.len())
        .step_by(CHUNK)
        .map(move |at| archive.slice(at..(at + CHUNK).min(archive.len())));
    futures_util::stream::iter(chunks)
}

/// Why a monitor stopped, in its own words when it left any.
fn exited(said: &Said) -> String {
    match said.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
        Some(why) => format!("monitor-svc stopped: {why}"),
        None => "monitor-svc stopped".into(),
    }
}

/// A monitor's log line (its `--log-format json`: an event's fields at the
/// top level) as a level and a text: the message, then the other fields as
/// `key=value`. Anything else (a last `Error: ...` line, the engine's own
/// words) is a warning as it is.
fn monitor_line(line: &str) -> (tracing::Level, String) {
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
fn engine_error(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// The monitor's exec stream as the channel's connector finds it.
#[derive(Default)]
enum Slot {
    #[default]
    Starting,
    /// A stream not yet connected.
    Ready(ExecIo),
    /// Why there is no monitor running.
    Failed(String),
}

/// The current monitor's exec stream, shared by the monitor loop and the
/// channel's connector.
#[derive(Default)]
struct Current {
    slot: Mutex<Slot>,
    /// Woken whenever `slot` leaves [`Slot::Starting`].
    changed: tokio::sync::Notify,
}

impl Current {
    fn set(&self, slot: Slot) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = slot;
        self.changed.notify_waiters();
    }

    /// The stream to connect over: waits while a monitor is starting.
    async fn take(&self) -> std::io::Result<ExecIo> {
        loop {
            let changed = self.changed.notified();
            {
                let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
                match std::mem::take(&mut *slot) {
                    Slot::Ready(io) => return Ok(io),
                    Slot::Failed(why) => {
                        let e = std::io::Error::other(why.clone());
                        *slot = Slot::Failed(why);
                        return Err(e);
                    }
                    Slot::Starting => {}
                }
            }
            if tokio::time::timeout(MONITOR_START, changed).await.is_err() {
                return Err(std::io::Error::other("the monitor did not start in time"));
            }
        }
    }
}

/// How long a monitor on an exec stream may leave a keepalive unanswered
/// (a paused container's does) before tunnel-svc gives it up.
const EXEC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection waits for a monitor that is being started.
const MONITOR_START: Duration = Duration::from_secs(30);

/// A gRPC channel to the container's monitor: each connection is the exec
/// stream of the monitor running now, so when a monitor is started again
/// the channel reconnects to it.
fn exec_channel(current: Arc<Current>) -> porthole::auth::AuthChannel {
    let connector = tower::service_fn(move |_: http::Uri| {
        let current = current.clone();
        async move { current.take().await.map(hyper_util::rt::TokioIo::new) }
    });
    let endpoint = tonic::transport::Endpoint::from_static("http://monitor.docker-exec");
    // A monitor that dies ends its exec stream, which is noticed at once;
    // the keepalive is only for a stream that hangs. Given up on sooner,
    // a short `docker pause` would end the monitor (it exits when its
    // stdin closes) and reset every connection it carries.
    let channel = crate::backend::grpc::monitor_endpoint(endpoint)
        .keep_alive_timeout(EXEC_KEEPALIVE_TIMEOUT)
        .connect_with_connector_lazy(connector);
    porthole::auth::with_token(channel, None)
}

type Output = Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// The monitor's stdin and stdout as one byte stream; its stderr goes to
/// the log, tagged with the container.
struct ExecIo {
    output: Output,
    input: Pin<Box<dyn AsyncWrite + Send>>,
    /// Stdout bytes received but not read yet.
    pending: Bytes,
    /// A stderr line not finished yet.
    stderr: Vec<u8>,
    /// The last warning or error the monitor wrote: why it stopped, when
    /// it stops.
    said: Said,
    /// Whose monitor, for its log lines.
    container: String,
    /// Its info lines (a port event each): the reconciler's budget per
    /// target, and a count.
    budget: porthole::telemetry::Budget,
    /// Fired when the stream ends.
    ended: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The last warning or error a monitor wrote, shared with its loop.
type Said = Arc<Mutex<Option<String>>>;

impl ExecIo {
    /// Passes the monitor's log lines (JSON) on at their own level, tagged
    /// with the container; remembers the last warning or error.
    fn log_stderr(&mut self, bytes: &[u8]) {
        self.stderr.extend_from_slice(bytes);
        while let Some(n) = self.stderr.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.stderr.drain(..=n).collect();
            let line = String::from_utf8_lossy(&line);
            let (level, text) = monitor_line(line.trim_end());
            let text = porthole::text::printable(&text).into_owned();
            let container = self.container.as_str();
            match level {
                tracing::Level::ERROR => tracing::error!(target: "monitor", container, "{text}"),
                tracing::Level::WARN => tracing::warn!(target: "monitor", container, "{text}"),
                tracing::Level::INFO => match self.budget.take(std::time::Instant::now()) {
                    Some(0) => tracing::info!(target: "monitor", container, "{text}"),
                    Some(unlogged) => {
                        tracing::info!(target: "monitor", container, unlogged, "{text}")
                    }
                    None => tracing::debug!(target: "monitor", container, "{text}"),
                },
                _ => tracing::debug!(target: "monitor", container, "{text}"),
            }
            if level <= tracing::Level::WARN {
                *self.said.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
            }
        }
        if self.stderr.len() > 16 << 10 {
            self.stderr.clear();
        }
    }

    /// Reads the monitor's first line on stdout: `ready`, or `listening
    /// ADDR` (its port is returned). When the stream ends first, the error
    /// is what the monitor said on its way out.
    async fn hello(&mut self) -> Result<Option<u16>, String> {
        let mut line = Vec::new();
        loop {
            if let Some(n) = self.pending.iter().position(|b| *b == b'\n') {
                line.extend_from_slice(&self.pending.split_to(n + 1)[..n]);
                break;
            }
            line.extend_from_slice(&std::mem::take(&mut self.pending));
            if line.len() > 512 {
                break;
            }
            match self.output.next().await {
                None | Some(Err(_)) => return Err(exited(&self.said)),
                Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                    self.pending = message
                }
                Some(Ok(LogOutput::StdErr { message })) => self.log_stderr(&message),
                Some(Ok(LogOutput::StdIn { .. })) => {}
            }
        }
        let line = String::from_utf8_lossy(&line);
        match line.trim() {
            "ready" => Ok(None),
            other => other
                .strip_prefix("listening ")
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .map(|a| Some(a.port()))
                .ok_or_else(|| {
                    format!(
                        "monitor-svc did not start: {}",
                        porthole::text::printable(other)
                    )
                }),
        }
    }

    fn end(&mut self) {
        if let Some(tx) = self.ended.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for ExecIo {
    fn drop(&mut self) {
        self.end();
    }
}

impl AsyncRead for ExecIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            match self.output.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    tracing::debug!("the monitor's exec stream ended");
                    self.end();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "the monitor's exec stream failed");
                    self.end();
                    return Poll::Ready(Err(std::io::Error::other(e)));
                }
                Poll::Ready(Some(Ok(out))) => match out {
                    LogOutput::StdOut { message } | LogOutput::Console { message } => {
                        self.pending = message;
                    }
                    LogOutput::StdErr { message } => self.log_stderr(&message),
                    LogOutput::StdIn { .. } => {}
                },
            }
        }
    }
}

impl AsyncWrite for ExecIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.input.as_mut().poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.input.as_mut().poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.input.as_mut().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_log_lines_keep_their_level_and_words() {
        let line = r#"{"timestamp":"2026-12-02T01:48:26Z","level":"WARN","message":"cannot run as the container's user","user":"1000","error":"setgroups: Operation not permitted"}"#;
        let (level, text) = monitor_line(line);
        assert_eq!(level, tracing::Level::WARN);
        assert_eq!(
            text,
            "cannot run as the container's user error=setgroups: Operation not permitted user=1000"
        );
        assert_eq!(
            monitor_line("Error: cannot listen on 0.0.0.0:0"),
            (
                tracing::Level::WARN,
                "Error: cannot listen on 0.0.0.0:0".into()
            )
        );
        assert_eq!(
            monitor_line(r#"{"level":"DEBUG","message":"x","n":3}"#).1,
            "x n=3"
        );
    }

    #[test]
    fn filters_take_label_name_and_id() {
        assert_eq!(
            filter("label=dev=1").unwrap(),
            ("label".into(), "dev=1".into())
        );
        assert_eq!(filter("name=web").unwrap(), ("name".into(), "web".into()));
        for bad in ["", "name", "name=", "status=running", "=x"] {
            assert!(filter(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_dynamic_executable_is_refused() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let why = not_static(&me).expect("test binaries link glibc dynamically");
        assert!(why.contains("dynamically"), "{why}");
        assert!(not_static(b"#!/bin/sh\n").unwrap().contains("ELF"));
        assert!(not_static(b"\x7fELF\x02\x01").is_some());
    }

    #[test]
    fn the_archive_is_one_executable_file() {
        let tar = tar_one(".porthole-monitor-svc", b"hello");
        assert_eq!(tar.len(), 512 + 512 + 1024);
        assert_eq!(&tar[..21], b".porthole-monitor-svc");
        assert_eq!(&tar[257..263], b"ustar\0");
        assert_eq!(&tar[124..136], b"00000000005\0");
        assert_eq!(&tar[512..517], b"hello");
        // The checksum counts the checksum field as spaces.
        let mut h = tar[..512].to_vec();
        let stored = u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        h[148..156].copy_from_slice(b"        ");
        assert_eq!(stored, h.iter().map(|b| u32::from(*b)).sum::<u32>());
    }
}
