//! The reconciler owns every tunnel. Watchers tell it which ports are open
//! in each target; the admin API asks it to close or open tunnels; both
//! talk to it through a [`Handle`]. After every change it asks
//! [`plan`] which tunnels should exist and applies the
//! actions that get there, so restarts, reconnects and lost ssh masters
//! need no special paths. Backends prepare and release ports in order, on
//! one task per target, and report back.
//!
//! Its rooms: [`handle`] (the commands and who sends them), `actor` (the
//! task that routes each command, and its tick), `targets` (targets coming,
//! going, renamed, reached another way), `tunnels` (applying the plan,
//! publishing changes), `host` (a tunnel's host listeners) and `admin`
//! (what the admin API may ask, checked).

mod actor;
mod admin;
mod handle;
mod host;
mod targets;
#[cfg(test)]
mod tests;
mod tunnels;

pub use handle::{Handle, Probing};
pub use targets::TargetSpec;

use crate::config::PortSet;
use crate::model::{State, TunnelId, TunnelView};
use crate::tunnel;
use handle::Command;
use porthole::fanout::{self, Fanout};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;
use targets::Target;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tunnels::Entry;

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
            State::Failed(why) => why.to_string().len(),
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

/// Reads a tunnel id as the admin API is given it (`TARGET:tcp:PORT`); a
/// mistyped one is not found (and not echoed whole).
pub fn parse_id(id: &str) -> Result<TunnelId, AdminError> {
    id.parse()
        .map_err(|_| AdminError::NotFound(porthole::text::clip(id, 128).into()))
}

/// Whether a target's monitor stream is up.
#[derive(Clone, Debug)]
pub enum Link {
    /// Up, following this monitor run (empty: the same as before).
    Up { instance_id: String },
    /// Down, and why.
    Down { error: String },
}

/// What a reloaded `--config` changes.
#[derive(Clone, Debug)]
pub struct PolicyUpdate {
    pub skip: PortSet,
    pub max_tunnels: usize,
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
    /// Tunnels opened in the browser once (`openBrowserOnce`).
    opened: crate::announce::Opened,
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
        opened: Default::default(),
    };
    // Every target's dev-container rules, each worked out once.
    let names: Vec<String> = r.targets.keys().cloned().collect();
    for name in &names {
        r.resolve_dev(std::slice::from_ref(name), Some(name));
    }
    // Before the admin API answers: what the host held at start is known.
    r.scan_host();
    (Handle { commands: tx }, tokio::spawn(r.run(rx, shutdown)))
}
