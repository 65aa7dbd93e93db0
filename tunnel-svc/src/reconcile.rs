//! The reconciler owns every tunnel. Watchers tell it which ports are open
//! in each target; the admin API asks it to close or open tunnels. After
//! every change it compares the tunnels that should exist with those that
//! do and fixes the difference, so restarts, reconnects and lost ssh
//! masters need no special paths.

use crate::backend::Backend;
use crate::config::PortSet;
use crate::plan::{self, host_port_for, Want, PRIVILEGED};
pub use crate::plan::{tunnel_id, PRIVILEGED_OFFSET};
use crate::tunnel::{self, Stats};
use porthole::fanout::{self, Fanout, Subscription};
use porthole::pb::v1::{Origin, Port, Protocol, Tunnel, TunnelState, TunnelUpdate};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

/// Bounds of the WatchTunnels fan-out.
const SUBSCRIBERS: fanout::Bounds = fanout::Bounds {
    items: 256,
    bytes: 1 << 20,
    subscribers: 64,
};
/// How often FAILED tunnels are tried again.
const RETRY: Duration = Duration::from_secs(2);

pub type Watch = Result<Subscription<TunnelUpdate>, fanout::Full>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdminError {
    #[error("no tunnel {0:?}; ListTunnels shows the ids")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Status {
        match e {
            AdminError::NotFound(_) => Status::not_found(e.to_string()),
            AdminError::Invalid(_) => Status::invalid_argument(e.to_string()),
            AdminError::Precondition(_) => Status::failed_precondition(e.to_string()),
        }
    }
}

pub enum Command {
    /// Every port now open in a target (from its watcher).
    Ports {
        target: String,
        ports: Vec<Port>,
    },
    /// A watcher's stream came up (from which monitor run) or went down
    /// (and why).
    Link {
        target: String,
        up: bool,
        instance_id: String,
        error: Option<String>,
    },
    Targets {
        reply: oneshot::Sender<Vec<TargetView>>,
    },
    List {
        target: Option<String>,
        reply: oneshot::Sender<Vec<Tunnel>>,
    },
    Close {
        id: String,
        reply: oneshot::Sender<Result<Tunnel, AdminError>>,
    },
    Open {
        target: String,
        container_port: u32,
        host_port: u32,
        reply: oneshot::Sender<Result<Tunnel, AdminError>>,
    },
    Watch {
        reply: oneshot::Sender<Watch>,
    },
    /// A backend finished making a port reachable.
    Opened {
        id: String,
        generation: u64,
        result: Result<(), String>,
    },
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
}

/// A target as ListTargets shows it.
#[derive(Clone, Debug)]
pub struct TargetView {
    pub name: String,
    pub url: String,
    pub backend: porthole::pb::v1::Backend,
    pub connected: bool,
    pub instance_id: String,
    pub error: Option<String>,
    pub since: chrono::DateTime<chrono::Utc>,
}

impl TargetView {
    pub fn to_proto(&self) -> porthole::pb::v1::Target {
        porthole::pb::v1::Target {
            name: self.name.clone(),
            url: self.url.clone(),
            backend: self.backend as i32,
            connected: self.connected,
            instance_id: self.instance_id.clone(),
            error: self.error.clone().unwrap_or_default(),
            since: Some(porthole::time::to_proto(self.since)),
        }
    }
}

struct Target {
    backend: Arc<Backend>,
    monitor_port: u16,
    /// Open TCP ports by number, with every listener on that port.
    ports: BTreeMap<u16, Vec<Port>>,
    up: bool,
    capped: bool,
    url: String,
    instance_id: String,
    /// Why the monitor is unreachable, while it is.
    error: Option<String>,
    /// When `up` last changed.
    since: chrono::DateTime<chrono::Utc>,
}

struct Entry {
    info: Tunnel,
    stats: Arc<Stats>,
    cancel: Option<CancellationToken>,
    generation: u64,
    backend: Arc<Backend>,
    listening: bool,
    /// A placeholder for a port left out by `--max-tunnels`.
    capped: bool,
}

impl Entry {
    fn view(&self) -> Tunnel {
        let mut t = self.info.clone();
        t.active_connections = self.stats.active.load(Relaxed);
        t.total_connections = self.stats.total.load(Relaxed);
        t.bytes_in = self.stats.bytes_in.load(Relaxed);
        t.bytes_out = self.stats.bytes_out.load(Relaxed);
        if t.error.is_empty() {
            t.error = self.stats.last_error().unwrap_or_default();
        }
        let manual = t.origin == Origin::Manual as i32;
        if manual && !self.listening && self.state() == TunnelState::Active && t.note.is_empty() {
            t.note = format!(
                "nothing listens on port {} in the container (yet); connections fail until something does",
                t.container_port
            );
        }
        t
    }

    fn state(&self) -> TunnelState {
        TunnelState::try_from(self.info.state).unwrap_or(TunnelState::Unspecified)
    }

    /// Closes the host listeners and connections, and the backend's forward.
    fn stop(&mut self) {
        if let Some(cancel) = self.cancel.take() {
            cancel.cancel();
            let (backend, port) = (self.backend.clone(), self.info.container_port as u16);
            tokio::spawn(async move { backend.close(port).await });
        }
    }
}

pub struct Reconciler {
    opts: Options,
    targets: BTreeMap<String, Target>,
    entries: BTreeMap<String, Entry>,
    /// Auto tunnels an admin closed; they stay closed until the port closes.
    closed: BTreeSet<String>,
    /// Manual tunnels: id → (target, container port, wanted host port).
    /// Manual tunnels: id → (target, container port, host port asked for).
    manual: BTreeMap<String, (String, u16, Option<u16>)>,
    /// Static tunnels (the egress gate's): id → (target, port). Always
    /// wanted; no skip list, cap or admin close applies to them.
    statics: BTreeMap<String, (String, u16)>,
    subscribers: Fanout<TunnelUpdate>,
    commands: mpsc::Sender<Command>,
    generation: u64,
    /// Every connection task, so shutdown can let them drain.
    connections: TaskTracker,
}

/// Starts the reconciler; returns where to send it commands.
pub fn spawn(
    specs: Vec<TargetSpec>,
    opts: Options,
    shutdown: CancellationToken,
) -> (mpsc::Sender<Command>, JoinHandle<()>) {
    spawn_with_statics(specs, opts, Vec::new(), shutdown)
}

/// [`spawn`], plus static tunnels `(target, port)` that exist from the
/// start whatever the watchers report (origin EGRESS, host port = port):
/// the egress gate's forwards.
pub fn spawn_with_statics(
    specs: Vec<TargetSpec>,
    opts: Options,
    statics: Vec<(String, u16)>,
    shutdown: CancellationToken,
) -> (mpsc::Sender<Command>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(256);
    let targets = specs
        .into_iter()
        .map(|s| {
            let t = Target {
                backend: s.backend,
                monitor_port: s.monitor_port,
                ports: BTreeMap::new(),
                up: s.fixed,
                capped: false,
                url: s.url,
                instance_id: String::new(),
                error: None,
                since: chrono::Utc::now(),
            };
            (s.name, t)
        })
        .collect();
    let r = Reconciler {
        opts,
        targets,
        entries: BTreeMap::new(),
        closed: BTreeSet::new(),
        manual: BTreeMap::new(),
        statics: statics
            .into_iter()
            .map(|(target, port)| (tunnel_id(&target, port), (target, port)))
            .collect(),
        subscribers: Fanout::new(SUBSCRIBERS, prost::Message::encoded_len),
        commands: tx.clone(),
        generation: 0,
        connections: TaskTracker::new(),
    };
    (tx, tokio::spawn(r.run(rx, shutdown)))
}

impl Reconciler {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Static tunnels need no watcher to appear.
        self.reconcile();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(cmd) = rx.recv() => self.handle(cmd),
                _ = retry.tick() => {
                    self.retry_failed();
                    self.resync_subscribers();
                }
            }
        }
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
        for t in self.targets.values() {
            t.backend.shutdown().await;
        }
        tracing::info!(tunnels = self.entries.len(), "all tunnels closed");
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Ports { target, ports } => {
                let Some(t) = self.targets.get_mut(&target) else {
                    return;
                };
                let mut by_port: BTreeMap<u16, Vec<Port>> = BTreeMap::new();
                for p in ports
                    .into_iter()
                    .filter(|p| p.protocol == Protocol::Tcp as i32)
                {
                    // The watcher passes on only valid ports; this stays
                    // safe whoever sends the command.
                    if let Some(n) = u16::try_from(p.port).ok().filter(|n| *n != 0) {
                        by_port.entry(n).or_default().push(p);
                    }
                }
                t.ports = by_port;
                // A closed port forgets that an admin closed its tunnel.
                let gone: Vec<String> = self
                    .closed
                    .iter()
                    .filter(|id| {
                        id.split_once(':').is_some_and(|(tn, _)| tn == target)
                            && !t.ports.keys().any(|p| tunnel_id(&target, *p) == **id)
                    })
                    .cloned()
                    .collect();
                for id in gone {
                    self.closed.remove(&id);
                }
                self.reconcile();
            }
            Command::Link {
                target,
                up,
                instance_id,
                error,
            } => {
                if let Some(t) = self.targets.get_mut(&target) {
                    if t.up != up {
                        tracing::info!(target = %target, up, "monitor link");
                        t.since = chrono::Utc::now();
                    }
                    t.up = up;
                    if !instance_id.is_empty() {
                        t.instance_id = instance_id;
                    }
                    t.error = if up { None } else { error };
                }
            }
            Command::Targets { reply } => {
                let list = self
                    .targets
                    .iter()
                    .map(|(name, t)| TargetView {
                        name: name.clone(),
                        url: t.url.clone(),
                        backend: t.backend.kind(),
                        connected: t.up,
                        instance_id: t.instance_id.clone(),
                        error: t.error.clone(),
                        since: t.since,
                    })
                    .collect();
                let _ = reply.send(list);
            }
            Command::List { target, reply } => {
                let list = self
                    .entries
                    .values()
                    .filter(|e| target.as_ref().is_none_or(|t| *t == e.info.target))
                    .map(Entry::view)
                    .collect();
                let _ = reply.send(list);
            }
            Command::Close { id, reply } => {
                let _ = reply.send(self.close(&id));
            }
            Command::Open {
                target,
                container_port,
                host_port,
                reply,
            } => {
                let _ = reply.send(self.open(target, container_port, host_port));
            }
            Command::Watch { reply } => {
                let _ = reply.send(self.subscribers.subscribe(all_updates(&self.entries)));
            }
            Command::Opened {
                id,
                generation,
                result,
            } => {
                let Some(e) = self
                    .entries
                    .get_mut(&id)
                    .filter(|e| e.generation == generation)
                else {
                    return;
                };
                match result {
                    Ok(()) => {
                        e.info.state = TunnelState::Active as i32;
                        tracing::info!(id = %id, host_port = e.info.host_port, "tunnel active");
                    }
                    Err(why) => {
                        e.stop();
                        e.info.state = TunnelState::Failed as i32;
                        e.info.error = why;
                        tracing::warn!(id = %id, error = %e.info.error, "tunnel failed");
                    }
                }
                self.publish(&id);
            }
        }
    }

    /// Everything that should exist right now (see [`plan::desired`]).
    fn desired(&mut self) -> BTreeMap<String, Want> {
        let targets: Vec<plan::TargetPorts> = self
            .targets
            .iter()
            .map(|(name, t)| plan::TargetPorts {
                name,
                monitor_port: t.monitor_port,
                ports: &t.ports,
            })
            .collect();
        let entries = &self.entries;
        let holds = |id: &str| {
            entries.get(id).is_some_and(|e| {
                e.info.origin == Origin::Auto as i32
                    && !e.capped
                    && e.state() != TunnelState::Closed
            })
        };
        let policy = plan::Policy {
            skip: &self.opts.skip,
            max_tunnels: self.opts.max_tunnels,
            allow_privileged: self.opts.allow_privileged,
        };
        let state = plan::State {
            manual: &self.manual,
            statics: &self.statics,
            closed: &self.closed,
            holds: &holds,
        };
        let (want, capped) = plan::desired(&targets, &policy, &state);
        for (name, t) in &mut self.targets {
            let now = capped.contains(name);
            if now && !t.capped {
                tracing::warn!(target = %name, max = self.opts.max_tunnels, "more ports open than --max-tunnels; the others are listed, not forwarded");
            }
            t.capped = now;
        }
        want
    }

    fn reconcile(&mut self) {
        let desired = self.desired();
        let existing: BTreeMap<String, plan::Existing> = self
            .entries
            .iter()
            .map(|(id, e)| {
                let now = plan::Existing {
                    capped: e.capped,
                    process: e.info.process.clone(),
                    listening: e.listening,
                    kept_closed: e.state() == TunnelState::Closed && self.closed.contains(id),
                };
                (id.clone(), now)
            })
            .collect();
        for action in plan::diff(desired, &existing) {
            match action {
                plan::Action::Remove(id) => {
                    if let Some(mut e) = self.entries.remove(&id) {
                        e.stop();
                        tracing::info!(id = %id, "tunnel removed");
                        self.publish_removed(e.view());
                    }
                }
                plan::Action::Start(id, want) => self.start(id, want),
                plan::Action::Restart(id, want) => {
                    if let Some(mut e) = self.entries.remove(&id) {
                        e.stop();
                    }
                    self.start(id, want);
                }
                plan::Action::Update(id, want) => {
                    if let Some(e) = self.entries.get_mut(&id) {
                        e.info.process = want.process;
                        e.listening = want.listening;
                        self.publish(&id);
                    }
                }
            }
        }
    }

    fn retry_failed(&mut self) {
        let failed: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.state() == TunnelState::Failed)
            .map(|(id, _)| id.clone())
            .collect();
        if failed.is_empty() {
            return;
        }
        let mut desired = self.desired();
        for id in failed {
            if let Some(want) = desired.remove(&id) {
                let before = self.entries.remove(&id).map(|e| e.info.error);
                self.start_quietly(id, want, before);
            }
        }
    }

    fn start(&mut self, id: String, want: Want) {
        self.start_quietly(id, want, None);
    }

    /// Starts a tunnel. `previous_error` is the error of a failed attempt
    /// being retried: when it fails the same way again, nobody is told twice.
    fn start_quietly(&mut self, id: String, want: Want, previous_error: Option<String>) {
        let t = &self.targets[&want.target];
        let backend = t.backend.clone();
        self.generation += 1;
        let mut entry = Entry {
            info: Tunnel {
                id: id.clone(),
                target: want.target.clone(),
                protocol: Protocol::Tcp as i32,
                container_port: u32::from(want.port),
                host_port: 0,
                host_addresses: Vec::new(),
                state: TunnelState::Pending as i32,
                backend: backend.kind() as i32,
                origin: want.origin as i32,
                error: String::new(),
                process: want.process.clone(),
                ..Default::default()
            },
            stats: Arc::new(Stats::default()),
            cancel: None,
            generation: self.generation,
            backend: backend.clone(),
            listening: want.listening,
            capped: want.capped,
        };
        if want.capped {
            entry.info.note = format!(
                "not forwarded: more than --max-tunnels {} ports are open in {}; it gets a \
                 tunnel when one of those closes",
                self.opts.max_tunnels, want.target
            );
            self.entries.insert(id.clone(), entry);
            self.publish(&id);
            return;
        }
        let failure = if let Some(why) = backend.unreachable(&want.addresses) {
            Some(why)
        } else {
            match tunnel::allocate(
                &self.opts.bind,
                want.host_port,
                self.opts.remap && !want.exact,
            ) {
                Ok((host_port, listeners)) => {
                    entry.info.opened_at = Some(porthole::time::to_proto(chrono::Utc::now()));
                    entry.info.host_port = u32::from(host_port);
                    entry.info.host_addresses = listeners
                        .iter()
                        .filter_map(|l| l.local_addr().ok())
                        .map(|a| a.to_string())
                        .collect();
                    if host_port != want.host_port {
                        entry.info.note = format!(
                            "host port {} is busy; forwarded on {host_port} instead",
                            want.host_port
                        );
                        tracing::warn!(id = %id, wanted = want.host_port, host_port, "host port busy; remapped");
                    }
                    if want.port < PRIVILEGED && want.host_port != want.port && !want.exact {
                        let note = format!(
                            "container port {} is privileged; forwarded on host port {host_port} \
                             (--allow-privileged-ports to use {})",
                            want.port, want.port
                        );
                        tracing::warn!(id = %id, host_port, "privileged container port forwarded on an unprivileged host port");
                        entry.info.note = if entry.info.note.is_empty() {
                            note
                        } else {
                            format!("{note}; {}", entry.info.note)
                        };
                    }
                    let cancel = CancellationToken::new();
                    tunnel::serve(
                        listeners,
                        backend.clone(),
                        tunnel::Carry {
                            id: id.clone().into(),
                            container_port: want.port,
                            stats: entry.stats.clone(),
                            cancel: cancel.clone(),
                            tracker: self.connections.clone(),
                        },
                    );
                    entry.cancel = Some(cancel);
                    if matches!(*backend, Backend::Ssh(_)) {
                        let (tx, id, generation, port) = (
                            self.commands.clone(),
                            id.clone(),
                            entry.generation,
                            want.port,
                        );
                        let backend = backend.clone();
                        tokio::spawn(async move {
                            let result = backend.open(port).await;
                            let _ = tx
                                .send(Command::Opened {
                                    id,
                                    generation,
                                    result,
                                })
                                .await;
                        });
                    } else {
                        entry.info.state = TunnelState::Active as i32;
                    }
                    tracing::info!(
                        id = %id,
                        host = ?entry.info.host_addresses,
                        backend = ?backend.kind(),
                        "tunnel open"
                    );
                    None
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    Some(if want.origin == Origin::Egress {
                        format!(
                            "port {} is busy: the gate must listen on the upstream's own port \
                             (a port in a git URL overrides the ssh config's), so it waits for it",
                            want.host_port
                        )
                    } else if want.exact {
                        format!(
                            "host port {} is busy (asked for by OpenTunnel)",
                            want.host_port
                        )
                    } else {
                        format!("host port {} is busy (--on-conflict=fail)", want.host_port)
                    })
                }
                Err(e) => Some(format!(
                    "cannot listen on host port {}: {e}",
                    want.host_port
                )),
            }
        };
        if let Some(why) = failure {
            entry.info.state = TunnelState::Failed as i32;
            let repeated = previous_error.as_deref() == Some(why.as_str());
            entry.info.error = why;
            if !repeated {
                tracing::warn!(id = %id, error = %entry.info.error, "tunnel failed");
            }
            self.entries.insert(id.clone(), entry);
            if !repeated {
                self.publish(&id);
            }
            return;
        }
        self.entries.insert(id.clone(), entry);
        self.publish(&id);
    }

    fn close(&mut self, id: &str) -> Result<Tunnel, AdminError> {
        if self.statics.contains_key(id) {
            return Err(AdminError::Precondition(format!(
                "{id} cannot be closed: egress forwards come from the gate config"
            )));
        }
        let e = self
            .entries
            .get_mut(id)
            .ok_or_else(|| AdminError::NotFound(porthole::text::clip(id, 128).into()))?;
        if e.state() == TunnelState::Closed {
            return Ok(e.view());
        }
        e.stop();
        e.info.state = TunnelState::Closed as i32;
        let view = e.view();
        tracing::info!(id = %id, "tunnel closed by admin");
        // A manual tunnel of a port open in the container stays closed like
        // an automatic one: forgetting it would bring the automatic tunnel
        // straight back.
        let open_inside = self
            .targets
            .get(&view.target)
            .is_some_and(|t| t.ports.contains_key(&(view.container_port as u16)));
        if self.manual.remove(id).is_some() && !open_inside {
            self.entries.remove(id);
            self.publish_removed(view.clone());
        } else {
            self.closed.insert(id.to_string());
            self.publish(id);
        }
        self.reconcile();
        Ok(view)
    }

    fn open(
        &mut self,
        target: String,
        container_port: u32,
        host_port: u32,
    ) -> Result<Tunnel, AdminError> {
        let target = if target.is_empty() {
            match self.targets.keys().collect::<Vec<_>>().as_slice() {
                [only] => (*only).clone(),
                names => {
                    return Err(AdminError::Invalid(format!(
                        "target is required: tunnel-svc watches {} targets ({})",
                        names.len(),
                        names
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            }
        } else {
            target
        };
        if !self.targets.contains_key(&target) {
            let names: Vec<&str> = self.targets.keys().map(String::as_str).collect();
            return Err(AdminError::Invalid(format!(
                "no target {:?}; targets are {}",
                porthole::text::clip(&target, 128),
                names.join(", ")
            )));
        }
        if self.statics.values().any(|(t, _)| *t == target) {
            return Err(AdminError::Precondition(format!(
                "{target:?} is an egress gate upstream: its forwards come from the gate config"
            )));
        }
        let port = u16::try_from(container_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                AdminError::Invalid(format!(
                    "container_port {container_port} is not in 1..65535"
                ))
            })?;
        let host = match host_port {
            0 => host_port_for(port, self.opts.allow_privileged),
            h => u16::try_from(h)
                .map_err(|_| AdminError::Invalid(format!("host_port {h} is not in 1..65535")))?,
        };
        if host_port != 0 && host < PRIVILEGED && !self.opts.allow_privileged {
            return Err(AdminError::Invalid(format!(
                "host_port {host} is privileged (below {PRIVILEGED}); tunnel-svc binds such \
                 ports only with --allow-privileged-ports"
            )));
        }
        let id = tunnel_id(&target, port);
        // A working tunnel is replaced only by one that can listen: a host
        // port that is taken is refused and the tunnel stays as it is.
        let working = self.entries.get(&id).is_some_and(|e| {
            !e.capped && matches!(e.state(), TunnelState::Active | TunnelState::Pending)
        });
        if working && host_port != 0 {
            let moving = self.entries.get(&id).map(|e| e.info.host_port) != Some(u32::from(host));
            if moving {
                if let Err(e) = tunnel::bind_all(&self.opts.bind, host) {
                    return Err(AdminError::Precondition(format!(
                        "cannot listen on host port {host}: {e}; {id} stays as it is"
                    )));
                }
            }
        }
        self.closed.remove(&id);
        self.manual
            .insert(id.clone(), (target, port, (host_port != 0).then_some(host)));
        let keep = self.entries.get(&id).is_some_and(|e| {
            !e.capped
                && matches!(e.state(), TunnelState::Active | TunnelState::Pending)
                && (host_port == 0 || e.info.host_port == u32::from(host))
        });
        if keep {
            let e = self.entries.get_mut(&id).expect("checked");
            e.info.origin = Origin::Manual as i32;
            self.publish(&id);
        } else if let Some(mut e) = self.entries.remove(&id) {
            e.stop();
        }
        self.reconcile();
        Ok(self
            .entries
            .get(&id)
            .map(Entry::view)
            .expect("a manual tunnel always has an entry"))
    }

    /// Subscribers that fell behind get every tunnel again once they have room.
    fn resync_subscribers(&mut self) {
        let entries = &self.entries;
        self.subscribers.resync(|| all_updates(entries));
    }

    fn publish(&mut self, id: &str) {
        if let Some(t) = self.entries.get(id).map(Entry::view) {
            self.broadcast(TunnelUpdate {
                tunnel: Some(t),
                removed: false,
            });
        }
    }

    fn publish_removed(&mut self, mut tunnel: Tunnel) {
        tunnel.state = TunnelState::Closed as i32;
        self.broadcast(TunnelUpdate {
            tunnel: Some(tunnel),
            removed: true,
        });
    }

    fn broadcast(&mut self, update: TunnelUpdate) {
        self.subscribers.publish(&[Arc::new(update)]);
        self.resync_subscribers();
    }
}

/// Every tunnel as an update: what a new or resynced subscriber gets.
fn all_updates(entries: &BTreeMap<String, Entry>) -> Vec<Arc<TunnelUpdate>> {
    entries
        .values()
        .map(|e| {
            Arc::new(TunnelUpdate {
                tunnel: Some(e.view()),
                removed: false,
            })
        })
        .collect()
}
