//! The reconciler owns every tunnel. Watchers tell it which ports are open
//! in each target; the admin API asks it to close or open tunnels; both
//! talk to it through a [`Handle`]. After every change it asks
//! [`plan`] which tunnels should exist and applies the
//! actions that get there, so restarts, reconnects and lost ssh masters
//! need no special paths. Backends prepare and release ports in order, on
//! one task per target, and report back.

use crate::backend::{Backend, BackendCell};
use crate::config::PortSet;
use crate::model::{
    Counters, Listener, Origin, PortKey, Proto, State, TargetView, TunnelId, TunnelView,
};
use crate::plan::{self, Want, PRIVILEGED};
use crate::sockets::Sockets;
use crate::tunnel::{self, Stats};
use porthole::fanout::{self, Fanout, Subscription};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bounds of the WatchTunnels fan-out.
const SUBSCRIBERS: fanout::Bounds = fanout::Bounds {
    items: 256,
    bytes: 1 << 20,
    subscribers: 64,
};
/// How often FAILED tunnels are tried again.
pub const RETRY: Duration = Duration::from_secs(2);

/// A change to one tunnel, as WatchTunnels streams it.
#[derive(Clone, Debug)]
pub struct TunnelEvent {
    pub tunnel: TunnelView,
    /// The tunnel is gone (its last state is in `tunnel`).
    pub removed: bool,
}

impl TunnelEvent {
    /// Roughly its encoded size, for the fan-out's byte bound.
    fn size(&self) -> usize {
        let t = &self.tunnel;
        let process = t
            .process
            .as_ref()
            .map_or(0, |p| p.cmdline.len() + p.name.len());
        let texts =
            t.note.as_ref().map_or(0, String::len) + t.failing.as_ref().map_or(0, |f| f.why.len());
        let failed = match &t.state {
            State::Failed(why) => why.len(),
            _ => 0,
        };
        128 + t.id.target.len() * 2 + t.host_addresses.len() * 48 + process + texts + failed
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no tunnel {0:?}; ListTunnels shows the ids")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
    #[error("too many watchers: {0}")]
    Full(#[from] fanout::Full),
    #[error("tunnel-svc is shutting down")]
    Stopping,
}

/// Whether a target's monitor stream is up.
#[derive(Clone, Debug)]
pub enum Link {
    /// Up, following this monitor run (empty: the same as before).
    Up { instance_id: String },
    /// Down, and why.
    Down { error: String },
}

enum Command {
    Ports {
        target: String,
        ports: BTreeMap<PortKey, Vec<Listener>>,
    },
    Link {
        target: String,
        link: Link,
    },
    Targets(oneshot::Sender<Vec<TargetView>>),
    List {
        target: Option<String>,
        reply: oneshot::Sender<Vec<TunnelView>>,
    },
    Close {
        id: String,
        reply: oneshot::Sender<Result<TunnelView, AdminError>>,
    },
    Open {
        target: String,
        port: PortKey,
        host_port: Option<u16>,
        reply: oneshot::Sender<Result<TunnelView, AdminError>>,
    },
    Watch(oneshot::Sender<Result<Subscription<TunnelEvent>, fanout::Full>>),
    /// A target that appeared while running (a Docker container).
    AddTarget(TargetSpec),
    /// A target that went away: its tunnels go, their host ports are freed.
    RemoveTarget(String),
    /// A target has a new name (a renamed container): its tunnels, host
    /// ports and connections stay, under ids with the new name; what is
    /// still sent under the old name reaches it.
    RenameTarget {
        from: String,
        to: String,
        url: String,
    },
    /// A target reaches its container another way now: its tunnels start
    /// again on the new backend; what its watcher reported stands.
    SetBackend {
        target: String,
        backend: Arc<Backend>,
        url: String,
        monitor_port: u16,
    },
    /// Reloaded configuration.
    SetPolicy(PolicyUpdate),
    /// Dial the container port of a tunnel through its backend.
    Probe {
        id: String,
        reply: oneshot::Sender<Result<Probing, AdminError>>,
    },
    /// A backend finished preparing a port.
    Prepared {
        id: TunnelId,
        generation: u64,
        result: Result<(), String>,
    },
}

/// How the watchers, the admin API and the gate talk to the reconciler.
#[derive(Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
}

impl Handle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, AdminError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| AdminError::Stopping)?;
        rx.await.map_err(|_| AdminError::Stopping)
    }

    /// Every port now open in `target`. False once the reconciler stopped.
    pub async fn ports(&self, target: &str, ports: BTreeMap<PortKey, Vec<Listener>>) -> bool {
        let target = target.to_string();
        self.commands
            .send(Command::Ports { target, ports })
            .await
            .is_ok()
    }

    /// `target`'s monitor stream came up or went down.
    pub async fn link(&self, target: &str, link: Link) {
        let target = target.to_string();
        let _ = self.commands.send(Command::Link { target, link }).await;
    }

    pub async fn targets(&self) -> Result<Vec<TargetView>, AdminError> {
        self.ask(Command::Targets).await
    }

    /// Every tunnel, or those of one target.
    pub async fn tunnels(&self, target: Option<String>) -> Result<Vec<TunnelView>, AdminError> {
        self.ask(|reply| Command::List { target, reply }).await
    }

    /// Closes a tunnel; an automatic one stays closed until its port closes.
    pub async fn close(&self, id: String) -> Result<TunnelView, AdminError> {
        self.ask(|reply| Command::Close { id, reply }).await?
    }

    /// Opens (or moves) a manual tunnel of `port` in `target` (empty: the
    /// only target), on `host_port` exactly if given.
    pub async fn open(
        &self,
        target: String,
        port: PortKey,
        host_port: Option<u16>,
    ) -> Result<TunnelView, AdminError> {
        self.ask(|reply| Command::Open {
            target,
            port,
            host_port,
            reply,
        })
        .await?
    }

    /// Whether a connection through tunnel `id` reaches its server now:
    /// the tunnel as it is, and the dial's outcome.
    pub async fn probe(&self, id: String) -> Result<(TunnelView, Result<(), String>), AdminError> {
        let Probing { tunnel, dial } = self.ask(|reply| Command::Probe { id, reply }).await??;
        let reached = match dial {
            None => Err(format!("the tunnel is {}", state_word(&tunnel.state))),
            Some(dial) => dial
                .await
                .unwrap_or_else(|_| Err("tunnel-svc is stopping".into())),
        };
        Ok((tunnel, reached))
    }

    /// Every tunnel, then every change.
    pub async fn watch(&self) -> Result<Subscription<TunnelEvent>, AdminError> {
        Ok(self.ask(Command::Watch).await??)
    }

    /// Adds a target (replacing one of the same name, tunnels and all).
    pub async fn add_target(&self, spec: TargetSpec) {
        let _ = self.commands.send(Command::AddTarget(spec)).await;
    }

    /// Gives a target a new backend (and the URL and monitor port that go
    /// with it); its tunnels are made again on it.
    pub async fn set_backend(
        &self,
        target: &str,
        backend: Arc<Backend>,
        url: String,
        monitor_port: u16,
    ) {
        let target = target.to_string();
        let set = Command::SetBackend {
            target,
            backend,
            url,
            monitor_port,
        };
        let _ = self.commands.send(set).await;
    }

    /// New rules, skip list and cap (a reloaded `--config`); tunnels follow.
    pub async fn set_policy(&self, policy: PolicyUpdate) {
        let _ = self.commands.send(Command::SetPolicy(policy)).await;
    }

    /// Renames a target; its tunnels stay (see [`Command::RenameTarget`]).
    pub async fn rename_target(&self, from: &str, to: &str, url: String) {
        let rename = Command::RenameTarget {
            from: from.into(),
            to: to.into(),
            url,
        };
        let _ = self.commands.send(rename).await;
    }

    /// Removes a target and every tunnel of it.
    pub async fn remove_target(&self, name: &str) {
        let name = name.to_string();
        let _ = self.commands.send(Command::RemoveTarget(name)).await;
    }
}

/// What a reloaded `--config` changes.
#[derive(Clone, Debug)]
pub struct PolicyUpdate {
    pub skip: PortSet,
    pub max_tunnels: usize,
    pub rules: Vec<crate::rules::Rule>,
}

/// A probe under way: the tunnel, and the dial's outcome to come (none when
/// the tunnel carries no connections).
pub struct Probing {
    tunnel: TunnelView,
    dial: Option<oneshot::Receiver<Result<(), String>>>,
}

/// How long a probe's dial may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

fn state_word(state: &State) -> String {
    match state {
        State::Pending => "pending".into(),
        State::Active => "active".into(),
        State::Failed(why) => format!("failed: {why}"),
        State::Closed => "closed".into(),
        State::Capped => "left out by --max-tunnels".into(),
        State::Published(port) => format!("published by Docker on host port {port}"),
    }
}

pub struct TargetSpec {
    pub name: String,
    pub backend: Arc<Backend>,
    /// The monitor's own port, never forwarded.
    pub monitor_port: u16,
    /// Shown by ListTargets: the monitor's URL, or a gate upstream's address.
    pub url: String,
    /// No watcher: the target's tunnels are static (the egress gate).
    pub fixed: bool,
    /// Ports the container publishes on the host itself (`docker run
    /// -p`): container port → host port. Listed, never forwarded.
    pub published: BTreeMap<PortKey, u16>,
    /// The target's own rules (a container's `porthole.*` labels), matched
    /// before `--config`'s.
    pub rules: Vec<crate::rules::Rule>,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub bind: Vec<IpAddr>,
    pub skip: PortSet,
    pub max_tunnels: usize,
    /// Busy host port: take the next free one (true) or fail.
    pub remap: bool,
    /// Container ports below 1024 may take the same host port.
    pub allow_privileged: bool,
    /// `[[rule]]`s of `--config`, first match wins.
    pub rules: Vec<crate::rules::Rule>,
    /// Idle timeout and flow bound of UDP tunnels.
    pub udp: crate::udp::Limits,
    /// How long new TCP connections wait for a path coming back.
    pub park: tunnel::Park,
    /// Where automatic tunnels' host ports are remembered across restarts
    /// (None: for this run only).
    pub host_ports: Option<std::path::PathBuf>,
    /// Look at the host's listening sockets, so automatic tunnels leave
    /// alone the ports host processes held within `hostheld::QUIET`.
    pub keep_host_ports: bool,
}

struct Target {
    /// What its tunnels dial with, swappable under them.
    backend: Arc<BackendCell>,
    /// Prepare/release requests, run in order (backends that need them).
    port_ops: Option<mpsc::UnboundedSender<PortOp>>,
    monitor_port: u16,
    published: BTreeMap<PortKey, u16>,
    rules: Vec<crate::rules::Rule>,
    ports: BTreeMap<PortKey, Vec<Listener>>,
    up: bool,
    capped: bool,
    url: String,
    instance_id: String,
    /// Why the monitor is unreachable, while it is.
    error: Option<String>,
    /// When `up` last changed.
    since: chrono::DateTime<chrono::Utc>,
    /// Its tunnels' open/removed lines: a container that opens and closes
    /// ports in a loop gets a few lines a second, and a count.
    log: porthole::telemetry::Budget,
    /// Tunnels opened and removed since it was added.
    changes: u64,
    /// Its monitor has said which ports are open (at least once).
    reported: bool,
}

/// At start, new host ports wait until every target has reported its
/// ports (targets added one by one, as Docker's are, until none was added
/// for [`SETTLE_QUIET`]), at most [`SETTLE_MAX`]: then a port several
/// containers want goes to them by name, not by which monitor answered
/// first.
const SETTLE_QUIET: Duration = Duration::from_secs(1);
const SETTLE_MAX: Duration = Duration::from_secs(5);

/// Lines a second (and at once) about one target's tunnels opening and
/// closing.
pub(crate) const LOG_PER_SEC: u32 = 5;
pub(crate) const LOG_BURST: u32 = 40;

impl Target {
    /// A target as `spec` says; its prepare/release task reports to `results`.
    fn new(spec: TargetSpec, results: &mpsc::Sender<Command>) -> Target {
        let port_ops = spec.backend.needs_prepare().then(|| {
            let (ops, rx) = mpsc::unbounded_channel();
            tokio::spawn(port_ops(spec.backend.clone(), rx, results.clone()));
            ops
        });
        Target {
            backend: Arc::new(BackendCell::new(spec.backend)),
            port_ops,
            monitor_port: spec.monitor_port,
            published: spec.published,
            rules: spec.rules,
            ports: BTreeMap::new(),
            up: spec.fixed,
            capped: false,
            url: spec.url,
            instance_id: String::new(),
            error: None,
            since: chrono::Utc::now(),
            log: porthole::telemetry::Budget::new(LOG_PER_SEC, LOG_BURST),
            changes: 0,
            reported: false,
        }
    }
}

enum PortOp {
    Prepare { id: TunnelId, generation: u64 },
    Release(u16),
}

/// Runs one target's prepare/release requests in order and reports each
/// prepare's result.
async fn port_ops(
    backend: Arc<Backend>,
    mut ops: mpsc::UnboundedReceiver<PortOp>,
    results: mpsc::Sender<Command>,
) {
    while let Some(op) = ops.recv().await {
        match op {
            PortOp::Prepare { id, generation } => {
                let result = backend.prepare(id.port).await;
                let done = Command::Prepared {
                    id,
                    generation,
                    result,
                };
                if results.send(done).await.is_err() {
                    return;
                }
            }
            PortOp::Release(port) => backend.release(port).await,
        }
    }
}

struct Entry {
    origin: Origin,
    state: State,
    note: Option<String>,
    host_port: u16,
    host_addresses: Vec<SocketAddr>,
    process: Option<porthole::pb::v1::Process>,
    listening: bool,
    opened_at: Option<chrono::DateTime<chrono::Utc>>,
    label: Option<String>,
    stats: Arc<Stats>,
    /// Set while the host listeners run.
    cancel: Option<CancellationToken>,
    /// Whether the backend was asked to prepare the port.
    prepared: bool,
    /// Tells a prepare result for this entry from one for an older one.
    generation: u64,
    /// Whether its connections were failing when it was last published.
    published_failing: bool,
    /// `tunnel{id}`: its log lines and its connections' are inside it.
    span: tracing::Span,
}

impl Entry {
    fn view(&self, id: &TunnelId, backend: crate::config::BackendKind) -> TunnelView {
        let s = &self.stats;
        let mut note = self.note.clone();
        if self.origin == Origin::Manual
            && !self.listening
            && self.state.is_open()
            && note.is_none()
        {
            note = Some(match id.proto {
                Proto::Tcp => format!(
                    "nothing listens on port {} in the container (yet); connections fail until \
                     something does",
                    id.port
                ),
                Proto::Udp => format!(
                    "no UDP server on port {} in the container (yet); datagrams are dropped \
                     until one is bound",
                    id.port
                ),
            });
        }
        TunnelView {
            id: id.clone(),
            origin: self.origin,
            state: self.state.clone(),
            backend,
            host_port: self.host_port,
            host_addresses: self.host_addresses.clone(),
            process: self.process.clone(),
            opened_at: self.opened_at,
            note,
            label: self.label.clone(),
            failing: s.failing(),
            counters: Counters {
                active: s.active.load(Relaxed),
                total: s.total.load(Relaxed),
                bytes_in: s.bytes_in.load(Relaxed),
                bytes_out: s.bytes_out.load(Relaxed),
                datagrams_in: s.datagrams_in.load(Relaxed),
                datagrams_out: s.datagrams_out.load(Relaxed),
                datagrams_dropped: s.datagrams_dropped.load(Relaxed),
            },
        }
    }

    fn existing(&self) -> plan::Existing {
        plan::Existing {
            origin: self.origin,
            state: self.state.clone(),
            host_port: self.host_port,
            process: self.process.clone(),
            listening: self.listening,
            label: self.label.clone(),
        }
    }

    /// Closes the host listeners (connections get the drain) and asks the
    /// backend to release the port.
    fn stop(&mut self, target: &Target, port: u16) {
        if let Some(cancel) = self.cancel.take() {
            cancel.cancel();
        }
        if std::mem::take(&mut self.prepared) {
            if let Some(ops) = &target.port_ops {
                let _ = ops.send(PortOp::Release(port));
            }
        }
    }
}

struct Reconciler {
    opts: Options,
    targets: BTreeMap<String, Target>,
    entries: BTreeMap<TunnelId, Entry>,
    /// Automatic tunnels an admin closed; they stay closed until the port closes.
    closed: BTreeSet<TunnelId>,
    /// Manual tunnels, each with the host port asked for.
    manual: BTreeMap<TunnelId, Option<u16>>,
    /// Static tunnels (the egress gate's): always wanted; no skip list, cap
    /// or admin close applies to them.
    statics: BTreeSet<TunnelId>,
    subscribers: Fanout<TunnelEvent>,
    generation: u64,
    /// Every connection task, so shutdown can let them drain.
    connections: TaskTracker,
    /// Where prepare results come back (for targets added later).
    commands: mpsc::Sender<Command>,
    /// Old name → new name of renamed targets, for what their watchers
    /// and backends still send under the old one.
    renamed: BTreeMap<String, String>,
    /// Host ports automatic tunnels had, kept across restarts.
    host_ports: crate::hostports::HostPorts,
    /// Host ports host processes held lately.
    host_held: crate::hostheld::HostHeld,
    /// Most tunnels listed since memory was last handed back.
    peak: usize,
    /// Ticks on which memory is still to be handed back.
    trims: u8,
    /// Start-up is over: new host ports are given as ports appear (see
    /// [`SETTLE_MAX`]).
    settled: bool,
    /// When the latest target was added after start.
    last_added: Option<std::time::Instant>,
    started: std::time::Instant,
}

/// Starts the reconciler with static tunnels `(target, port)` that exist
/// whatever the watchers report (origin EGRESS, host port = port): the
/// egress gate's forwards. Returns its handle and its task, which ends
/// after `shutdown` once every tunnel is closed.
pub fn spawn(
    specs: Vec<TargetSpec>,
    opts: Options,
    statics: Vec<(String, u16)>,
    shutdown: CancellationToken,
) -> (Handle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(256);
    let targets = specs
        .into_iter()
        .map(|s| (s.name.clone(), Target::new(s, &tx)))
        .collect();
    let host_ports = crate::hostports::HostPorts::load(opts.host_ports.clone());
    let mut r = Reconciler {
        opts,
        targets,
        entries: BTreeMap::new(),
        closed: BTreeSet::new(),
        manual: BTreeMap::new(),
        statics: statics
            .into_iter()
            .map(|(target, port)| TunnelId::new(&target, port))
            .collect(),
        subscribers: Fanout::new(SUBSCRIBERS, TunnelEvent::size),
        generation: 0,
        connections: TaskTracker::new(),
        commands: tx.clone(),
        renamed: BTreeMap::new(),
        host_ports,
        host_held: Default::default(),
        peak: 0,
        trims: 0,
        settled: false,
        last_added: None,
        started: std::time::Instant::now(),
    };
    // Before the admin API answers: what the host held at start is known.
    r.scan_host();
    (Handle { commands: tx }, tokio::spawn(r.run(rx, shutdown)))
}

impl Reconciler {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Looks whether start-up has settled, until it has.
        let mut settle = tokio::time::interval(Duration::from_millis(100));
        // Static tunnels need no watcher to appear.
        self.reconcile(false);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(cmd) = rx.recv() => self.handle(cmd),
                _ = settle.tick(), if !self.settled => {
                    if !self.settling() {
                        self.reconcile(false);
                    }
                }
                _ = retry.tick() => self.tick(),
            }
        }
        self.host_ports.flush();
        // Listeners close at once; connections in flight get
        // tunnel::DRAIN to finish, then are reset.
        for entry in self.entries.values_mut() {
            if let Some(cancel) = entry.cancel.take() {
                cancel.cancel();
            }
        }
        self.connections.close();
        // A little past the drain: every connection task ends at it.
        let grace = tunnel::DRAIN + Duration::from_millis(500);
        if tokio::time::timeout(grace, self.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after the drain; they are reset");
        }
        for t in self.targets.values_mut() {
            t.port_ops = None;
            t.backend.get().shutdown().await;
        }
        tracing::info!(tunnels = self.entries.len(), "all tunnels closed");
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Ports { target, ports } => {
                let target = self.current_name(target);
                let Some(t) = self.targets.get_mut(&target) else {
                    return;
                };
                t.ports = ports;
                t.reported = true;
                // A closed port forgets that an admin closed its tunnel.
                self.closed
                    .retain(|id| id.target != target || t.ports.contains_key(&id.key()));
                self.reconcile(false);
            }
            Command::Link { target, link } => {
                let target = self.current_name(target);
                let Some(t) = self.targets.get_mut(&target) else {
                    return;
                };
                let up = matches!(link, Link::Up { .. });
                if t.up != up {
                    tracing::info!(target = %target, up, "monitor link");
                    t.since = chrono::Utc::now();
                }
                t.up = up;
                match link {
                    Link::Up { instance_id } => {
                        if !instance_id.is_empty() {
                            t.instance_id = instance_id;
                        }
                        t.error = None;
                    }
                    Link::Down { error } => t.error = Some(error),
                }
            }
            Command::Targets(reply) => {
                let list = self
                    .targets
                    .iter()
                    .map(|(name, t)| TargetView {
                        name: name.clone(),
                        url: t.url.clone(),
                        backend: t.backend.get().kind(),
                        connected: t.up,
                        instance_id: t.instance_id.clone(),
                        error: t.error.clone(),
                        since: t.since,
                        changes: t.changes,
                        ports: t.ports.len(),
                    })
                    .collect();
                let _ = reply.send(list);
            }
            Command::List { target, reply } => {
                let list = self
                    .entries
                    .keys()
                    .filter(|id| target.as_ref().is_none_or(|t| *t == id.target))
                    .filter_map(|id| self.view(id))
                    .collect();
                let _ = reply.send(list);
            }
            Command::Close { id, reply } => {
                let _ = reply.send(self.close(&id));
            }
            Command::Open {
                target,
                port,
                host_port,
                reply,
            } => {
                let _ = reply.send(self.open(target, port, host_port));
            }
            Command::SetPolicy(update) => {
                self.opts.skip = update.skip;
                self.opts.max_tunnels = update.max_tunnels;
                self.opts.rules = update.rules;
                tracing::info!(rules = self.opts.rules.len(), "configuration reloaded");
                self.reconcile(false);
            }
            Command::Probe { id, reply } => {
                let _ = reply.send(self.probe(&id));
            }
            Command::Watch(reply) => {
                let _ = reply.send(self.subscribers.subscribe(self.all_events()));
            }
            Command::AddTarget(spec) => {
                // The name is this target's now, not an alias of another's.
                self.renamed.remove(&spec.name);
                if self.remove_target(&spec.name) {
                    tracing::warn!(target = %spec.name, "a target of this name is replaced");
                }
                tracing::info!(target = %spec.name, url = %spec.url, "target added");
                let name = spec.name.clone();
                let target = Target::new(spec, &self.commands);
                self.targets.insert(name, target);
                self.last_added = Some(std::time::Instant::now());
                self.reconcile(false);
            }
            Command::RemoveTarget(name) => {
                let name = self.current_name(name);
                if self.remove_target(&name) {
                    tracing::info!(target = %name, "target removed");
                }
                self.renamed.retain(|_, to| *to != name);
            }
            Command::RenameTarget { from, to, url } => self.rename_target(from, to, url),
            Command::SetBackend {
                target,
                backend,
                url,
                monitor_port,
            } => {
                let target = self.current_name(target);
                let Some(t) = self.targets.get_mut(&target) else {
                    return;
                };
                // Tunnels keep their host listeners; new connections dial
                // with the new backend.
                t.backend.set(backend);
                t.url = url;
                t.monitor_port = monitor_port;
                tracing::info!(target = %target, url = %t.url, "target reached another way");
                self.reconcile(false);
            }
            Command::Prepared {
                mut id,
                generation,
                result,
            } => {
                id.target = self.current_name(id.target);
                let Some(e) = self
                    .entries
                    .get_mut(&id)
                    .filter(|e| e.generation == generation && e.state == State::Pending)
                else {
                    return;
                };
                let _in = e.span.clone().entered();
                match result {
                    Ok(()) => {
                        e.state = State::Active;
                        let t = self.targets.get_mut(&id.target).expect("a target's tunnel");
                        if logs(t, &id.target) {
                            tracing::info!(host_port = e.host_port, "tunnel active");
                        }
                    }
                    Err(why) => {
                        tracing::warn!(error = %why, "tunnel failed");
                        e.stop(&self.targets[&id.target], id.port);
                        e.state = State::Failed(why);
                    }
                }
                self.publish(&id);
            }
        }
    }

    /// What target `name` is called now.
    fn current_name(&self, mut name: String) -> String {
        // Each rename adds one link; a chain ends within as many steps.
        for _ in 0..=self.renamed.len() {
            match self.renamed.get(&name) {
                Some(to) => name = to.clone(),
                None => break,
            }
        }
        name
    }

    /// Moves target `from` and everything of it to the name `to`: its
    /// tunnels keep their host listeners and connections; subscribers see
    /// the old ids go and the new ones come.
    fn rename_target(&mut self, from: String, to: String, url: String) {
        let from = self.current_name(from);
        if from == to || self.targets.contains_key(&to) {
            tracing::warn!(target = %from, to = %to, "cannot rename: the new name is taken");
            return;
        }
        let Some(mut target) = self.targets.remove(&from) else {
            return;
        };
        target.url = url;
        let kind = target.backend.get().kind();
        self.targets.insert(to.clone(), target);
        let moved = |id: &TunnelId| TunnelId {
            target: to.clone(),
            ..id.clone()
        };
        for id in self.ids_of(&from) {
            let entry = self.entries.remove(&id).expect("listed");
            self.publish_removed(entry.view(&id, kind));
            let new = moved(&id);
            self.entries.insert(new.clone(), entry);
            self.publish(&new);
        }
        self.closed = std::mem::take(&mut self.closed)
            .into_iter()
            .map(|id| if id.target == from { moved(&id) } else { id })
            .collect();
        self.manual = std::mem::take(&mut self.manual)
            .into_iter()
            .map(|(id, p)| (if id.target == from { moved(&id) } else { id }, p))
            .collect();
        self.host_ports.rename_target(&from, &to);
        for old in self.renamed.values_mut().filter(|t| **t == from) {
            *old = to.clone();
        }
        tracing::info!(target = %from, to = %to, "target renamed; its tunnels stay");
        self.renamed.insert(from, to);
        self.reconcile(false);
    }

    /// The ids of target `name`'s tunnels.
    fn ids_of(&self, name: &str) -> Vec<TunnelId> {
        let ids = self.entries.keys().filter(|id| id.target == name);
        ids.cloned().collect()
    }

    /// Stops and forgets every tunnel of target `name`, then the target.
    fn remove_target(&mut self, name: &str) -> bool {
        let Some(target) = self.targets.remove(name) else {
            return false;
        };
        for id in self.ids_of(name) {
            if let Some(mut e) = self.entries.remove(&id) {
                e.stop(&target, id.port);
                let view = e.view(&id, target.backend.get().kind());
                self.publish_removed(view);
            }
        }
        self.closed.retain(|id| id.target != name);
        self.manual.retain(|id, _| id.target != name);
        true
    }

    fn view(&self, id: &TunnelId) -> Option<TunnelView> {
        let kind = self.targets.get(&id.target)?.backend.get().kind();
        Some(self.entries.get(id)?.view(id, kind))
    }

    /// Every [`RETRY`]: failed tunnels tried again, health and watchers
    /// brought up to date, and the housekeeping (host ports written down,
    /// the host's sockets looked at, memory handed back, what the log
    /// budget held back said).
    fn tick(&mut self) {
        self.host_ports.flush();
        self.release_memory();
        self.scan_host();
        let now = std::time::Instant::now();
        for (name, t) in &mut self.targets {
            if let Some(n) = t.log.held(now) {
                say_unlogged(name, n);
            }
        }
        if self
            .entries
            .values()
            .any(|e| matches!(e.state, State::Failed(_)))
        {
            self.reconcile(true);
        }
        self.publish_health_changes();
        self.resync_subscribers();
    }

    /// Whether start-up is still settling (see [`SETTLE_MAX`]).
    fn settling(&mut self) -> bool {
        if self.settled {
            return false;
        }
        let now = std::time::Instant::now();
        let heard = !self.targets.is_empty() && self.targets.values().all(|t| t.reported);
        let quiet = self.last_added.is_none_or(|at| now >= at + SETTLE_QUIET);
        self.settled = (heard && quiet) || now >= self.started + SETTLE_MAX;
        !self.settled
    }

    /// Hands memory back to the kernel once most of the tunnels it held
    /// are gone (a container that opened thousands of ports closed them).
    /// The tasks of closed tunnels free their memory as they end, some
    /// after the tick that saw them go, so it is handed back on the next
    /// few ticks too.
    fn release_memory(&mut self) {
        self.peak = self.peak.max(self.entries.len());
        if self.peak >= 256 && self.entries.len() < self.peak / 2 {
            self.peak = self.entries.len();
            self.trims = 3;
        }
        if self.trims > 0 {
            self.trims -= 1;
            crate::sys::release_free_memory();
        }
    }

    /// Notes which host ports processes other than this tunnel-svc's
    /// tunnels listen on (see `hostheld`).
    fn scan_host(&mut self) {
        if !self.opts.keep_host_ports {
            return;
        }
        let ours: std::collections::HashSet<(Proto, u16)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.cancel.is_some())
            .map(|(id, e)| (id.proto, e.host_port))
            .collect();
        let now = std::time::Instant::now();
        self.host_held.scan(&ours, &self.opts.bind, now);
    }

    /// Applies the plan: see [`plan::desired`] and [`plan::diff`]. Failed
    /// tunnels are tried again only when `retry`.
    fn reconcile(&mut self, retry: bool) {
        let existing: BTreeMap<TunnelId, plan::Existing> = self
            .entries
            .iter()
            .map(|(id, e)| (id.clone(), e.existing()))
            .collect();
        let in_grace = self.started.elapsed() < crate::hostports::GRACE;
        let remembered = self
            .host_ports
            .in_force(|t| self.targets.contains_key(t), in_grace);
        let state = plan::State {
            manual: &self.manual,
            statics: &self.statics,
            closed: &self.closed,
            existing: &existing,
            remembered: &remembered,
        };
        let targets: Vec<plan::TargetPorts> = self
            .targets
            .iter()
            .map(|(name, t)| plan::TargetPorts {
                name,
                monitor_port: t.monitor_port,
                published: &t.published,
                ports: &t.ports,
                rules: &t.rules,
            })
            .collect();
        let policy = plan::Policy {
            skip: &self.opts.skip,
            max_tunnels: self.opts.max_tunnels,
            allow_privileged: self.opts.allow_privileged,
            remap: self.opts.remap,
            rules: &self.opts.rules,
        };
        let (desired, capped) = plan::desired(&targets, &policy, &state);
        let mut actions = plan::diff(desired, &state, retry);
        if self.settling() {
            // A new automatic host port waits for the other targets' ports.
            actions.retain(|a| match a {
                plan::Action::Start(id, want) => {
                    want.origin != Origin::Auto
                        || want.capped
                        || want.published.is_some()
                        || remembered.contains_key(id)
                }
                _ => true,
            });
        }
        for (name, t) in &mut self.targets {
            let now = capped.contains(name);
            if now && !t.capped {
                tracing::warn!(target = %name, max = self.opts.max_tunnels, "more ports open than --max-tunnels; the others are listed, not forwarded");
            }
            t.capped = now;
        }
        for action in actions {
            match action {
                plan::Action::Remove(id) => {
                    if let Some(mut e) = self.entries.remove(&id) {
                        let t = self.targets.get_mut(&id.target).expect("a target's tunnel");
                        e.stop(t, id.port);
                        t.changes += 1;
                        // One that was only listed (capped) was never news.
                        if e.state != State::Capped && logs(t, &id.target) {
                            e.span.in_scope(|| tracing::info!("tunnel removed"));
                        }
                        let kind = self.targets[&id.target].backend.get().kind();
                        self.publish_removed(e.view(&id, kind));
                    }
                }
                plan::Action::Start(id, want) => self.start(id, want, None),
                plan::Action::Restart(id, want) => {
                    let mut before = None;
                    if let Some(mut e) = self.entries.remove(&id) {
                        e.stop(&self.targets[&id.target], id.port);
                        if let State::Failed(why) = e.state {
                            before = Some(why);
                        }
                    }
                    self.start(id, want, before);
                }
                plan::Action::Update(id, want) => {
                    if let Some(e) = self.entries.get_mut(&id) {
                        e.origin = want.origin;
                        e.process = want.process;
                        e.listening = want.listening;
                        e.label = want.label;
                        self.publish(&id);
                    }
                }
            }
        }
    }

    /// Makes a tunnel: binds its host listeners and starts carrying (or
    /// lists it, when capped). `previous_error` is the error of the failed
    /// attempt being retried: when it fails the same way again, nobody is
    /// told twice.
    fn start(&mut self, id: TunnelId, want: Want, previous_error: Option<String>) {
        self.generation += 1;
        let span = tracing::info_span!("tunnel", id = %id);
        let mut entry = Entry {
            origin: want.origin,
            state: State::Pending,
            note: want.note.clone(),
            host_port: 0,
            host_addresses: Vec::new(),
            process: want.process.clone(),
            listening: want.listening,
            opened_at: None,
            label: want.label.clone(),
            stats: Arc::new(Stats::default()),
            cancel: None,
            prepared: false,
            generation: self.generation,
            published_failing: false,
            span: span.clone(),
        };
        let _in = span.enter();
        if let Some(host) = want.published {
            entry.state = State::Published(host);
            entry.host_port = host;
            entry.note = Some(format!(
                "published by Docker on host port {host} (docker run -p); not forwarded again"
            ));
        } else if want.capped {
            entry.state = State::Capped;
            entry.note = Some(format!(
                "not forwarded: more than --max-tunnels {} ports are open in {}; it gets a \
                 tunnel when one of those closes",
                self.opts.max_tunnels, id.target
            ));
        } else {
            match self.listen(&id, &want, &mut entry) {
                Ok(()) => {
                    let t = self.targets.get_mut(&id.target).expect("a target's tunnel");
                    t.changes += 1;
                    if logs(t, &id.target) {
                        tracing::info!(host = ?entry.host_addresses, "tunnel open");
                    }
                }
                Err(why) => {
                    let repeated = previous_error.as_deref() == Some(why.as_str());
                    if !repeated {
                        tracing::warn!(error = %why, "tunnel failed");
                    }
                    entry.state = State::Failed(why);
                    if repeated {
                        self.entries.insert(id, entry);
                        return;
                    }
                }
            }
        }
        drop(_in);
        self.entries.insert(id.clone(), entry);
        self.publish(&id);
    }

    /// Binds the host listeners of a tunnel, starts its accept loops and
    /// asks the backend to prepare the port; or says why it cannot.
    fn listen(&mut self, id: &TunnelId, want: &Want, entry: &mut Entry) -> Result<(), String> {
        let t = &self.targets[&id.target];
        let backend = t.backend.get();
        if let Some(why) = backend.no_udp().filter(|_| id.proto == Proto::Udp) {
            return Err(why.to_string());
        }
        if let Some(why) = backend.unreachable(&want.addresses) {
            return Err(why);
        }
        if let Some(holder) = &want.held_by {
            return Err(format!(
                "host port {} is held by {holder}{}",
                want.host_port,
                if want.exact {
                    ""
                } else {
                    " (--on-conflict=fail)"
                }
            ));
        }
        let remap = self.opts.remap && !want.exact;
        let (bind, wanted) = (&self.opts.bind, want.host_port);
        // An admin's OpenTunnel may take a port a host process just left;
        // nothing a container says may.
        let now = std::time::Instant::now();
        let automatic = matches!(want.origin, Origin::Auto);
        let held = &self.host_held;
        let kept = |port| automatic && held.recently(id.proto, port, now).is_some();
        let host_was = match held.recently(id.proto, wanted, now) {
            Some(crate::hostheld::Held::Ago(ago)) if automatic => Some(ago),
            _ => None,
        };
        if let Some(ago) = host_was.filter(|_| !remap) {
            return Err(kept_for_host(want, ago));
        }
        let (host_port, sockets) = Sockets::allocate(id.proto, bind, wanted, remap, kept)
            .map_err(|e| bind_failure(want, e))?;
        entry.opened_at = Some(chrono::Utc::now());
        entry.host_port = host_port;
        if want.origin == Origin::Auto && !want.exact {
            self.host_ports.record(id, host_port);
        }
        entry.host_addresses = sockets.local_addrs();
        if let Some(note) = want.note.as_ref().filter(|n| n.contains(" is held by ")) {
            tracing::warn!(%note, "host port held by another tunnel; moved");
        }
        if host_port != want.host_port {
            tracing::warn!(
                wanted = want.host_port,
                host_port,
                "host port busy; remapped"
            );
            let busy = match host_was {
                Some(ago) => format!(
                    "host port {} was held by a host process {}s ago and is kept for it; \
                     forwarded on {host_port} instead",
                    want.host_port,
                    ago.as_secs()
                ),
                None => format!(
                    "host port {} is busy; forwarded on {host_port} instead",
                    want.host_port
                ),
            };
            entry.note = Some(match entry.note.take() {
                Some(n) => format!("{n}; {busy}"),
                None => busy,
            });
        }
        if id.port < PRIVILEGED && host_port != id.port {
            tracing::warn!(
                host_port,
                "privileged container port forwarded on an unprivileged host port"
            );
        }
        let cancel = CancellationToken::new();
        let carry = tunnel::Carry {
            container_port: id.port,
            park: self.opts.park,
            stats: entry.stats.clone(),
            cancel: cancel.clone(),
            tracker: self.connections.clone(),
            span: entry.span.clone(),
        };
        match sockets {
            Sockets::Tcp(listeners) => tunnel::serve(listeners, t.backend.clone(), carry),
            Sockets::Udp(sockets) => {
                crate::udp::serve(sockets, t.backend.clone(), carry, self.opts.udp)
            }
        }
        entry.cancel = Some(cancel);
        match t.port_ops.as_ref().filter(|_| id.proto == Proto::Tcp) {
            Some(ops) => {
                entry.prepared = true;
                let _ = ops.send(PortOp::Prepare {
                    id: id.clone(),
                    generation: entry.generation,
                });
            }
            None => entry.state = State::Active,
        }
        Ok(())
    }

    /// Starts a dial to the container port of tunnel `id` through its
    /// backend (only an ACTIVE tunnel carries connections).
    fn probe(&self, id: &str) -> Result<Probing, AdminError> {
        let not_found = || AdminError::NotFound(porthole::text::clip(id, 128).into());
        let id: TunnelId = id.parse().map_err(|_| not_found())?;
        let Some(tunnel) = self.view(&id) else {
            return Err(self.not_forwarded(&id).unwrap_or_else(not_found));
        };
        if tunnel.state != State::Active {
            return Ok(Probing { tunnel, dial: None });
        }
        let backend = self.targets[&id.target].backend.get();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let dial = async {
                match id.proto {
                    Proto::Tcp => backend.dial(id.port).await.map(drop),
                    Proto::Udp => backend.dial_udp(id.port).await.map(drop),
                }
            };
            let dialed = tokio::time::timeout(PROBE_TIMEOUT, dial).await;
            let outcome = match dialed {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
            };
            let _ = tx.send(outcome);
        });
        Ok(Probing {
            tunnel,
            dial: Some(rx),
        })
    }

    /// Why a port open in its container has no tunnel, if it is open.
    fn not_forwarded(&self, id: &TunnelId) -> Option<AdminError> {
        let t = self.targets.get(&id.target)?;
        let listeners = t.ports.get(&id.key())?;
        let rule = crate::rules::first(&t.rules, &id.target, id.key(), listeners)
            .or_else(|| crate::rules::first(&self.opts.rules, &id.target, id.key(), listeners));
        let why = if id.key() == (Proto::Tcp, t.monitor_port) {
            "it is the monitor's own port"
        } else if self.opts.skip.contains(id.port) {
            "it is in the skip list (--skip, the defaults, or the config file)"
        } else if rule.is_some_and(|r| r.action == crate::rules::Action::Ignore) {
            "a rule ignores it"
        } else {
            return None;
        };
        Some(AdminError::Precondition(format!(
            "{id} is open in the container but not forwarded: {why}"
        )))
    }

    fn close(&mut self, id: &str) -> Result<TunnelView, AdminError> {
        let not_found = || AdminError::NotFound(porthole::text::clip(id, 128).into());
        let id: TunnelId = id.parse().map_err(|_| not_found())?;
        if self.statics.contains(&id) {
            return Err(AdminError::Precondition(format!(
                "{id} cannot be closed: egress forwards come from the gate config"
            )));
        }
        let e = self.entries.get_mut(&id).ok_or_else(not_found)?;
        if e.state != State::Closed {
            e.stop(&self.targets[&id.target], id.port);
            e.state = State::Closed;
            e.span.in_scope(|| tracing::info!("tunnel closed by admin"));
        }
        let view = self.view(&id).expect("it exists");
        // A manual tunnel of a port open in the container stays closed like
        // an automatic one: forgetting it would bring the automatic tunnel
        // straight back.
        let open_inside = self.targets[&id.target].ports.contains_key(&id.key());
        if self.manual.remove(&id).is_some() && !open_inside {
            self.entries.remove(&id);
            self.publish_removed(view.clone());
        } else {
            self.closed.insert(id.clone());
            self.publish(&id);
        }
        self.reconcile(false);
        Ok(view)
    }

    fn open(
        &mut self,
        target: String,
        port: PortKey,
        host_port: Option<u16>,
    ) -> Result<TunnelView, AdminError> {
        let names = || self.targets.keys().cloned().collect::<Vec<_>>().join(", ");
        let target = if target.is_empty() {
            match self.targets.keys().collect::<Vec<_>>().as_slice() {
                [only] => (*only).clone(),
                all => {
                    return Err(AdminError::Invalid(format!(
                        "target is required: tunnel-svc watches {} targets ({})",
                        all.len(),
                        names()
                    )))
                }
            }
        } else if self.targets.contains_key(&target) {
            target
        } else {
            return Err(AdminError::Invalid(format!(
                "no target {:?}; targets are {}",
                porthole::text::clip(&target, 128),
                names()
            )));
        };
        if self.statics.iter().any(|s| s.target == target) {
            return Err(AdminError::Precondition(format!(
                "{target:?} is an egress gate upstream: its forwards come from the gate config"
            )));
        }
        if let Some(host) = host_port.filter(|h| *h < PRIVILEGED && !self.opts.allow_privileged) {
            return Err(AdminError::Invalid(format!(
                "host_port {host} is privileged (below {PRIVILEGED}); tunnel-svc binds such \
                 ports only with --allow-privileged-ports"
            )));
        }
        let id = TunnelId::of(&target, port);
        let current = self
            .entries
            .get(&id)
            .filter(|e| e.state.is_open())
            .map(|e| e.host_port);
        // A working tunnel is replaced only by one that can listen: a host
        // port that is taken is refused and the tunnel stays as it is.
        if let (Some(now), Some(host)) = (current, host_port) {
            if now != host {
                let free = Sockets::bind(id.proto, &self.opts.bind, host).map(drop);
                if let Err(e) = free {
                    return Err(AdminError::Precondition(format!(
                        "cannot listen on host port {host}: {e}; {id} stays as it is"
                    )));
                }
            }
        }
        self.closed.remove(&id);
        self.manual.insert(id.clone(), host_port);
        let keep = current.is_some_and(|now| host_port.is_none_or(|h| h == now));
        if !keep {
            if let Some(mut e) = self.entries.remove(&id) {
                e.stop(&self.targets[&id.target], id.port);
            }
        }
        self.reconcile(false);
        Ok(self.view(&id).expect("a manual tunnel always has an entry"))
    }

    fn all_events(&self) -> Vec<Arc<TunnelEvent>> {
        all_events(&self.entries, &self.targets)
    }

    /// Subscribers that fell behind get every tunnel again once they have room.
    fn resync_subscribers(&mut self) {
        let (entries, targets) = (&self.entries, &self.targets);
        self.subscribers.resync(|| all_events(entries, targets));
    }

    /// Publishes the tunnels whose connections started failing, or got
    /// through again, since they were last published (the connections
    /// themselves never talk to the reconciler).
    fn publish_health_changes(&mut self) {
        let changed: Vec<TunnelId> = self
            .entries
            .iter()
            .filter(|(_, e)| e.stats.failing().is_some() != e.published_failing)
            .map(|(id, _)| id.clone())
            .collect();
        for id in changed {
            self.publish(&id);
        }
    }

    fn publish(&mut self, id: &TunnelId) {
        if let Some(e) = self.entries.get_mut(id) {
            e.published_failing = e.stats.failing().is_some();
        }
        if let Some(tunnel) = self.view(id) {
            self.broadcast(TunnelEvent {
                tunnel,
                removed: false,
            });
        }
    }

    fn publish_removed(&mut self, mut tunnel: TunnelView) {
        tunnel.state = State::Closed;
        self.broadcast(TunnelEvent {
            tunnel,
            removed: true,
        });
    }

    fn broadcast(&mut self, event: TunnelEvent) {
        self.subscribers.publish(&[Arc::new(event)]);
        self.resync_subscribers();
    }
}

/// Every tunnel as an event: what a new or resynced subscriber gets.
fn all_events(
    entries: &BTreeMap<TunnelId, Entry>,
    targets: &BTreeMap<String, Target>,
) -> Vec<Arc<TunnelEvent>> {
    entries
        .iter()
        .map(|(id, e)| {
            let tunnel = e.view(id, targets[&id.target].backend.get().kind());
            Arc::new(TunnelEvent {
                tunnel,
                removed: false,
            })
        })
        .collect()
}

/// Why a tunnel cannot listen on its host port, in the user's terms.
/// Whether a line about `t`'s tunnels fits its log budget; says first how
/// many did not fit before it.
fn logs(t: &mut Target, name: &str) -> bool {
    match t.log.take(std::time::Instant::now()) {
        None => false,
        Some(0) => true,
        Some(n) => {
            say_unlogged(name, n);
            true
        }
    }
}

/// Says how many lines about `name`'s tunnels the log budget held back.
fn say_unlogged(name: &str, n: u64) {
    tracing::info!(target = %name, unlogged = n, "tunnel changes not logged (ports opening and closing fast); /metrics counts them");
}

/// Why an exact host port is not taken: a host process held it lately.
fn kept_for_host(want: &Want, ago: Duration) -> String {
    let left = crate::hostheld::QUIET.saturating_sub(ago).as_secs();
    let pinned = match &want.pinned_by {
        Some(rule) => format!(" (pinned by {rule})"),
        None => String::new(),
    };
    format!(
        "host port {}{pinned} was held by a host process {}s ago; it is kept for that \
         process for {left}s more (a restarting service gets its port back)",
        want.host_port,
        ago.as_secs()
    )
}

fn bind_failure(want: &Want, e: std::io::Error) -> String {
    if e.kind() != std::io::ErrorKind::AddrInUse {
        return format!("cannot listen on host port {}: {e}", want.host_port);
    }
    match want.origin {
        Origin::Egress => format!(
            "port {} is busy: the gate must listen on the upstream's own port (a port in a git \
             URL overrides the ssh config's), so it waits for it",
            want.host_port
        ),
        Origin::Manual if want.exact => format!(
            "host port {} is busy (asked for by OpenTunnel)",
            want.host_port
        ),
        _ if want.exact => match want.pinned_by {
            Some(rule) => format!("host port {} is busy (pinned by {rule})", want.host_port),
            None => format!("host port {} is busy", want.host_port),
        },
        _ => format!("host port {} is busy (--on-conflict=fail)", want.host_port),
    }
}

#[cfg(test)]
mod tests {
    //! The reconciler driven in memory through its handle, as the watchers
    //! and the admin API drive it; host listeners are real, on loopback.
    use super::*;
    use crate::backend::direct::Direct;
    use futures_util::StreamExt;

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn is_free(port: u16) -> bool {
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
    }

    /// Whether `port` becomes free within a second: a closed tunnel's
    /// accept loops drop their listeners as they next run.
    async fn freed(port: u16) -> bool {
        for _ in 0..100 {
            if is_free(port) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    fn options() -> Options {
        Options {
            bind: vec!["127.0.0.1".parse().unwrap()],
            skip: PortSet::default(),
            max_tunnels: 10,
            remap: true,
            allow_privileged: false,
            rules: Vec::new(),
            udp: Default::default(),
            host_ports: None,
            keep_host_ports: false,
            // A failed dial fails its connection at once, unless a test
            // parks.
            park: tunnel::Park {
                wait: Duration::ZERO,
                ..Default::default()
            },
        }
    }

    fn target(name: &str) -> TargetSpec {
        TargetSpec {
            name: name.into(),
            backend: Arc::new(Backend::Direct(Direct {
                host: "127.0.0.1".into(),
            })),
            monitor_port: 7070,
            url: "http://127.0.0.1:7070".into(),
            fixed: false,
            published: BTreeMap::new(),
            rules: Vec::new(),
        }
    }

    fn start(targets: &[&str], opts: Options) -> (Handle, CancellationToken) {
        let shutdown = CancellationToken::new();
        let specs = targets.iter().map(|t| target(t)).collect();
        let (h, _) = spawn(specs, opts, Vec::new(), shutdown.clone());
        (h, shutdown)
    }

    fn open(ports: &[u16]) -> BTreeMap<PortKey, Vec<Listener>> {
        ports
            .iter()
            .map(|&port| {
                let l = Listener {
                    port,
                    address: "0.0.0.0".parse().unwrap(),
                    dual_stack: false,
                    process: None,
                };
                ((Proto::Tcp, port), vec![l])
            })
            .collect()
    }

    async fn tunnel(h: &Handle, target: &str, port: u16) -> Option<TunnelView> {
        let id = TunnelId::new(target, port);
        h.tunnels(None)
            .await
            .unwrap()
            .into_iter()
            .find(|t| t.id == id)
    }

    /// The tunnel once it is active (polled: a target added after start
    /// waits out the start-up's quiet second), or None after 5 s.
    async fn active(h: &Handle, target: &str, port: u16) -> Option<TunnelView> {
        for _ in 0..100 {
            match tunnel(h, target, port).await {
                Some(t) if t.state == State::Active => return Some(t),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        None
    }

    async fn count(h: &Handle) -> usize {
        h.tunnels(None).await.unwrap().len()
    }

    #[tokio::test]
    async fn udp_servers_get_udp_tunnels_beside_the_tcp_ones() {
        let (h, _stop) = start(&["dev"], options());
        let p = free_port();
        let udp_free = || std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok();
        assert!(udp_free());
        let mut ports = open(&[p]);
        let tcp = ports[&(Proto::Tcp, p)].clone();
        ports.insert((Proto::Udp, p), tcp);
        assert!(h.ports("dev", ports).await);
        let all = h.tunnels(None).await.unwrap();
        let shown: Vec<(String, State, u16)> = all
            .iter()
            .map(|t| (t.id.to_string(), t.state.clone(), t.host_port))
            .collect();
        assert_eq!(
            shown,
            [
                (format!("dev:tcp:{p}"), State::Active, p),
                (format!("dev:udp:{p}"), State::Active, p),
            ],
            "TCP and UDP on one port number are two tunnels on the same host port"
        );
        assert!(!udp_free(), "the host UDP port is bound");
        assert!(h.ports("dev", BTreeMap::new()).await);
        assert_eq!(count(&h).await, 0);
        let mut freed = false;
        for _ in 0..100 {
            freed = udp_free();
            if freed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(freed, "the host UDP port is freed when the port closes");
    }

    #[tokio::test]
    async fn open_ports_get_tunnels_that_go_when_the_port_closes() {
        let (h, _stop) = start(&["dev"], options());
        let p = free_port();
        assert!(h.ports("dev", open(&[p, 7070])).await);
        let t = tunnel(&h, "dev", p).await.unwrap();
        assert_eq!(
            (t.state, t.host_port, t.origin),
            (State::Active, p, Origin::Auto)
        );
        assert_eq!(t.host_addresses, [SocketAddr::from(([127, 0, 0, 1], p))]);
        assert!(!is_free(p), "the host port listens");
        assert_eq!(
            count(&h).await,
            1,
            "the monitor's own port is never forwarded"
        );
        h.ports("dev", open(&[])).await;
        assert_eq!(count(&h).await, 0);
        assert!(freed(p).await, "the host port is free again");
    }

    #[tokio::test]
    async fn a_renamed_target_keeps_its_tunnels_under_the_new_name() {
        let (h, _stop) = start(&["dev"], options());
        let (p, q) = (free_port(), free_port());
        h.ports("dev", open(&[p])).await;
        let closed = h.close(format!("dev:tcp:{p}")).await.unwrap();
        assert_eq!(closed.state, State::Closed);
        h.ports("dev", open(&[p, q])).await;
        let before = tunnel(&h, "dev", q).await.unwrap();
        h.rename_target("dev", "web", "renamed".into()).await;
        let after = tunnel(&h, "web", q).await.expect("under the new name");
        assert_eq!(
            (after.state, after.host_port, after.opened_at),
            (State::Active, q, before.opened_at),
            "the same tunnel, not a new one"
        );
        assert!(tunnel(&h, "dev", q).await.is_none());
        assert_eq!(
            tunnel(&h, "web", p).await.unwrap().state,
            State::Closed,
            "still closed"
        );
        let targets = h.targets().await.unwrap();
        assert_eq!(
            targets
                .iter()
                .map(|t| (t.name.as_str(), t.url.as_str()))
                .collect::<Vec<_>>(),
            [("web", "renamed")]
        );
        // What the watcher still sends under the old name reaches it.
        h.ports("dev", open(&[])).await;
        assert_eq!(count(&h).await, 0);
        assert!(freed(q).await);
    }

    #[tokio::test]
    async fn a_tunnel_whose_connections_fail_is_unhealthy_until_one_gets_through() {
        let shutdown = CancellationToken::new();
        let mut spec = target("dev");
        // Nothing listens there yet; the tunnel itself is on 127.0.0.1.
        spec.backend = Arc::new(Backend::Direct(Direct {
            host: "127.0.0.2".into(),
        }));
        let (h, _) = spawn(vec![spec], options(), Vec::new(), shutdown.clone());
        let p = free_port();
        h.ports("dev", open(&[p])).await;
        let t = tunnel(&h, "dev", p).await.unwrap();
        assert_eq!(t.state, State::Active, "{t:?}");
        let mut events = h.watch().await.unwrap();
        let first = events.next().await.unwrap().unwrap();
        assert_eq!(first.tunnel.failing, None);
        let failing = |h: Handle| async move { tunnel(&h, "dev", p).await.and_then(|t| t.failing) };
        for n in 1..=2u64 {
            let mut c = tokio::net::TcpStream::connect(("127.0.0.1", p))
                .await
                .unwrap();
            let mut buf = [0u8; 1];
            let _ = tokio::io::AsyncReadExt::read(&mut c, &mut buf).await;
            let mut seen = None;
            for _ in 0..200 {
                seen = failing(h.clone()).await.filter(|f| f.count == n);
                if seen.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let f = seen.unwrap_or_else(|| panic!("{n} failures in a row"));
            assert!(f.why.contains("127.0.0.2"), "{f:?}");
        }
        let first = failing(h.clone()).await.unwrap().since;
        assert!(first <= chrono::Utc::now());
        // Watchers hear of it too, within a tick.
        let heard = tokio::time::timeout(RETRY * 3, events.next())
            .await
            .expect("an update within a tick")
            .unwrap()
            .unwrap();
        assert!(
            heard.tunnel.failing.as_ref().is_some_and(|f| f.count >= 1),
            "{heard:?}"
        );
        let server = tokio::net::TcpListener::bind(("127.0.0.2", p))
            .await
            .unwrap();
        let _c = tokio::net::TcpStream::connect(("127.0.0.1", p))
            .await
            .unwrap();
        let _accepted = server.accept().await.unwrap();
        for _ in 0..200 {
            if failing(h.clone()).await.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(failing(h.clone()).await, None, "healthy again");
        assert_eq!(tunnel(&h, "dev", p).await.unwrap().state, State::Active);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_connection_waits_for_its_path_to_come_back() {
        let shutdown = CancellationToken::new();
        let mut spec = target("dev");
        spec.backend = Arc::new(Backend::Direct(Direct {
            host: "127.0.0.2".into(),
        }));
        let opts = Options {
            park: tunnel::Park {
                wait: Duration::from_secs(10),
                max: 1,
            },
            ..options()
        };
        let (h, _) = spawn(vec![spec], opts, Vec::new(), shutdown.clone());
        let p = free_port();
        h.ports("dev", open(&[p])).await;
        assert_eq!(tunnel(&h, "dev", p).await.unwrap().state, State::Active);
        // Nothing answers at the far end yet: the first connection waits,
        // the second finds the one parking place taken and fails.
        let mut parked = tokio::net::TcpStream::connect(("127.0.0.1", p))
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut parked, b"hello")
            .await
            .unwrap();
        let mut second = tokio::net::TcpStream::connect(("127.0.0.1", p))
            .await
            .unwrap();
        let mut buf = [0u8; 5];
        let refused = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut second, &mut buf),
        )
        .await
        .expect("the second fails at once");
        assert!(matches!(refused, Ok(0) | Err(_)), "{refused:?}");
        // The path comes back: the parked one gets through, bytes intact.
        let server = tokio::net::TcpListener::bind(("127.0.0.2", p))
            .await
            .unwrap();
        let (mut far, _) = tokio::time::timeout(Duration::from_secs(5), server.accept())
            .await
            .expect("the parked connection arrives")
            .unwrap();
        tokio::io::AsyncReadExt::read_exact(&mut far, &mut buf)
            .await
            .unwrap();
        assert_eq!(&buf, b"hello");
        let t = tunnel(&h, "dev", p).await.unwrap();
        assert_eq!(t.failing, None, "the latest connection got through");
        assert_eq!(t.counters.total, 2);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn skipped_ports_are_left_alone_unless_opened_by_hand() {
        let p = free_port();
        let opts = Options {
            skip: p.to_string().parse().unwrap(),
            ..options()
        };
        let (h, _stop) = start(&["dev"], opts);
        h.ports("dev", open(&[p])).await;
        assert_eq!(count(&h).await, 0);
        let t = h.open(String::new(), (Proto::Tcp, p), None).await.unwrap();
        assert_eq!((t.state, t.origin), (State::Active, Origin::Manual));
    }

    #[tokio::test]
    async fn an_admin_close_holds_until_the_port_reopens() {
        let (h, _stop) = start(&["dev"], options());
        let p = free_port();
        h.ports("dev", open(&[p])).await;
        let closed = h.close(format!("dev:tcp:{p}")).await.unwrap();
        assert_eq!(closed.state, State::Closed);
        assert!(freed(p).await);
        // The monitor reports the port again (a reconnect): still closed.
        h.ports("dev", open(&[p])).await;
        assert_eq!(tunnel(&h, "dev", p).await.unwrap().state, State::Closed);
        // It closes and reopens inside: forwarded again.
        h.ports("dev", open(&[])).await;
        assert_eq!(count(&h).await, 0);
        h.ports("dev", open(&[p])).await;
        assert_eq!(tunnel(&h, "dev", p).await.unwrap().state, State::Active);
        // Mistyped ids are refused, not echoed whole.
        let err = h.close("dev:tcp:x".repeat(100)).await.unwrap_err();
        assert!(
            matches!(err, AdminError::NotFound(ref id) if id.len() < 200),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_busy_host_port_is_remapped_and_says_so() {
        let (h, _stop) = start(&["dev"], options());
        let p = free_port();
        let _busy = std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
        h.ports("dev", open(&[p])).await;
        let t = tunnel(&h, "dev", p).await.unwrap();
        assert_eq!(t.state, State::Active);
        assert_ne!(t.host_port, p);
        let note = t.note.unwrap();
        assert!(note.contains(&format!("host port {p} is busy")), "{note}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_exact_host_port_fails_while_busy_and_is_retried() {
        let (h, _stop) = start(&["dev"], options());
        let (p, q) = (free_port(), free_port());
        let busy = std::net::TcpListener::bind(("127.0.0.1", q)).unwrap();
        h.ports("dev", open(&[p])).await;
        let t = h.open("dev".into(), (Proto::Tcp, p), Some(q)).await;
        // The pre-bind check refuses to move a working tunnel onto a busy port.
        assert!(matches!(t, Err(AdminError::Precondition(_))), "{t:?}");
        assert_eq!(tunnel(&h, "dev", p).await.unwrap().host_port, p);
        // A new manual tunnel on a busy exact port fails and is retried.
        let r = free_port();
        let t = h
            .open("dev".into(), (Proto::Tcp, r), Some(q))
            .await
            .unwrap();
        let State::Failed(why) = t.state else {
            panic!("{t:?}")
        };
        assert!(
            why.contains(&format!("host port {q} is busy (asked for by OpenTunnel)")),
            "{why}"
        );
        drop(busy);
        let mut waited = Duration::ZERO;
        while tunnel(&h, "dev", r).await.unwrap().state != State::Active {
            assert!(waited < RETRY * 3, "not retried");
            tokio::time::sleep(RETRY / 4).await;
            waited += RETRY / 4;
        }
        assert_eq!(tunnel(&h, "dev", r).await.unwrap().host_port, q);
    }

    #[tokio::test]
    async fn the_cap_lists_new_ports_and_never_evicts() {
        let opts = Options {
            max_tunnels: 1,
            ..options()
        };
        let (h, _stop) = start(&["dev"], opts);
        let (low, high) = {
            let (a, b) = (free_port(), free_port());
            (a.min(b), a.max(b))
        };
        h.ports("dev", open(&[high])).await;
        h.ports("dev", open(&[low, high])).await;
        assert_eq!(tunnel(&h, "dev", high).await.unwrap().state, State::Active);
        let capped = tunnel(&h, "dev", low).await.unwrap();
        assert_eq!(capped.state, State::Capped);
        assert!(capped.note.unwrap().contains("--max-tunnels 1"));
        assert!(is_free(low), "a capped port is not bound");
        h.ports("dev", open(&[low])).await;
        assert_eq!(tunnel(&h, "dev", low).await.unwrap().state, State::Active);
    }

    #[tokio::test]
    async fn two_targets_on_one_port_by_name_at_start_then_the_first_keeps_it() {
        let (h, _stop) = start(&["a", "b"], options());
        let p = free_port();
        // At start, b reports first, yet a (first by name) gets the port:
        // b waits until every target has reported.
        h.ports("b", open(&[p])).await;
        assert_eq!(count(&h).await, 0, "b waits for a");
        h.ports("a", open(&[p])).await;
        let a = tunnel(&h, "a", p).await.unwrap();
        let b = tunnel(&h, "b", p).await.unwrap();
        assert_eq!((a.state, a.host_port), (State::Active, p));
        assert_eq!(b.state, State::Active);
        assert_ne!(b.host_port, p);
        let note = b.note.unwrap();
        assert!(
            note.starts_with(&format!("host port {p} is held by a:tcp:{p}")),
            "{note}"
        );
        // Afterwards, a port that opens later is the first one's.
        let q = free_port();
        h.ports("b", open(&[p, q])).await;
        h.ports("a", open(&[p, q])).await;
        let b = tunnel(&h, "b", q).await.unwrap();
        let a = tunnel(&h, "a", q).await.unwrap();
        assert_eq!((b.state, b.host_port), (State::Active, q));
        assert_ne!(a.host_port, q);
        let note = a.note.unwrap();
        assert!(
            note.starts_with(&format!("host port {q} is held by b:tcp:{q}")),
            "{note}"
        );
    }

    #[tokio::test]
    async fn statics_always_exist_and_cannot_be_closed_or_reopened() {
        let shutdown = CancellationToken::new();
        let p = free_port();
        let spec = TargetSpec {
            fixed: true,
            ..target("forge")
        };
        let (h, _) = spawn(
            vec![spec],
            options(),
            vec![("forge".into(), p)],
            shutdown.clone(),
        );
        let t = tunnel(&h, "forge", p).await.unwrap();
        assert_eq!(
            (t.origin, t.state, t.host_port),
            (Origin::Egress, State::Active, p)
        );
        let err = h.close(format!("forge:tcp:{p}")).await.unwrap_err();
        assert!(matches!(err, AdminError::Precondition(_)), "{err}");
        let err = h
            .open("forge".into(), (Proto::Tcp, 9), None)
            .await
            .unwrap_err();
        assert!(matches!(err, AdminError::Precondition(_)), "{err}");
        let targets = h.targets().await.unwrap();
        assert!(targets[0].connected, "a gate upstream needs no monitor");
    }

    #[tokio::test]
    async fn watchers_see_every_tunnel_then_each_change() {
        let (h, _stop) = start(&["dev"], options());
        let p = free_port();
        h.ports("dev", open(&[p])).await;
        let mut events = h.watch().await.unwrap();
        let first = events.next().await.unwrap().unwrap();
        assert_eq!((first.tunnel.id.port, first.removed), (p, false));
        h.ports("dev", open(&[])).await;
        let gone = events.next().await.unwrap().unwrap();
        assert_eq!((gone.tunnel.id.port, gone.removed), (p, true));
        assert_eq!(gone.tunnel.state, State::Closed);
    }

    #[tokio::test]
    async fn targets_come_and_go_with_their_tunnels() {
        let (h, _stop) = start(&[], options());
        let p = free_port();
        h.add_target(target("web")).await;
        assert!(h.ports("web", open(&[p])).await);
        assert!(
            active(&h, "web", p).await.is_some(),
            "{:?}",
            tunnel(&h, "web", p).await
        );
        h.remove_target("web").await;
        assert!(h.targets().await.unwrap().is_empty());
        assert_eq!(count(&h).await, 0);
        assert!(freed(p).await, "a removed target's host ports are freed");
        // A target that comes back starts afresh.
        h.add_target(TargetSpec {
            published: [((Proto::Tcp, p), 18080)].into(),
            ..target("web")
        })
        .await;
        h.ports("web", open(&[p])).await;
        let t = tunnel(&h, "web", p).await.unwrap();
        assert_eq!((t.state, t.host_port), (State::Published(18080), 18080));
        assert!(freed(p).await, "a port Docker publishes is not bound again");
    }

    #[tokio::test]
    async fn a_probe_dials_the_container_port_through_the_backend() {
        let (h, _stop) = start(&["dev"], options());
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = server.local_addr().unwrap().port();
        // The direct backend of these tests dials 127.0.0.1:PORT, where
        // `server` listens; the tunnel's host listener moves to another port.
        h.ports("dev", open(&[p])).await;
        let (t, reached) = h.probe(format!("dev:tcp:{p}")).await.unwrap();
        assert_ne!(t.host_port, p, "remapped: the server holds the port");
        assert_eq!(reached, Ok(()));
        drop(server);
        let (_, reached) = h.probe(format!("dev:tcp:{p}")).await.unwrap();
        assert!(reached.unwrap_err().contains("cannot reach"));
        let err = h.probe("dev:tcp:1".into()).await.unwrap_err();
        assert!(matches!(err, AdminError::NotFound(_)), "{err}");
    }

    #[tokio::test]
    async fn links_show_in_targets_and_shutdown_frees_every_port() {
        let (h, stop) = start(&["dev"], options());
        h.link(
            "dev",
            Link::Up {
                instance_id: "run-1".into(),
            },
        )
        .await;
        h.link(
            "dev",
            Link::Down {
                error: "refused".into(),
            },
        )
        .await;
        let t = &h.targets().await.unwrap()[0];
        assert_eq!(
            (t.connected, t.instance_id.as_str(), t.error.as_deref()),
            (false, "run-1", Some("refused"))
        );
        let p = free_port();
        h.ports("dev", open(&[p])).await;
        assert_eq!(tunnel(&h, "dev", p).await.unwrap().state, State::Active);
        assert!(!is_free(p));
        stop.cancel();
        let stopped = async {
            while h.targets().await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(tunnel::DRAIN * 3, stopped)
            .await
            .expect("the reconciler stops");
        assert!(freed(p).await);
        assert!(matches!(h.tunnels(None).await, Err(AdminError::Stopping)));
    }
}
