//! tunnel-svc's own vocabulary: what a tunnel is called, which state it is
//! in and why, and what a target reported listening. The reconciler works
//! only with these; protobuf messages are made and read at the API edges
//! (admin.rs, watch.rs).

mod why;

pub use why::{join as join_notes, Excluded, Failure, Holder, Note, RuleFrom};

use porthole::pb::v1::Process;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::str::FromStr;

pub use porthole::net::Proto;

/// Container ports below this get an unprivileged host port unless
/// `--allow-privileged-ports`; host ports below it need that flag.
pub const PRIVILEGED: u16 = 1024;

/// A value tunnel-svc's vocabulary cannot be read from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadValue {
    #[error("bad backend {0:?}: use grpc, ssh or direct")]
    Backend(String),
    #[error("bad port list {0:?}: want ports and ranges like 22,80,6000-6100")]
    Ports(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Grpc,
    Ssh,
    Direct,
}

impl FromStr for BackendKind {
    type Err = BadValue;
    fn from_str(s: &str) -> Result<Self, BadValue> {
        <BackendKind as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| BadValue::Backend(s.into()))
    }
}

/// A set of ports written as `22,80,6000-6100` (empty: no ports).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet(Vec<RangeInclusive<u16>>);

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(&port))
    }

    /// The ports of both sets.
    pub fn union(mut self, other: &PortSet) -> PortSet {
        self.0.extend(other.0.iter().cloned());
        self
    }
}

impl FromStr for PortSet {
    type Err = BadValue;
    fn from_str(s: &str) -> Result<Self, BadValue> {
        let bad = || BadValue::Ports(s.into());
        let mut ranges = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
            let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
            if lo == 0 || lo > hi {
                return Err(bad());
            }
            ranges.push(lo..=hi);
        }
        Ok(PortSet(ranges))
    }
}

/// A port of a container: its transport and number.
pub type PortKey = (Proto, u16);

/// A tunnel's identity: a target and a TCP or UDP port in it. Shown and
/// parsed as `TARGET:tcp:PORT` or `TARGET:udp:PORT`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TunnelId {
    pub target: String,
    pub proto: Proto,
    pub port: u16,
}

impl TunnelId {
    /// A TCP port's tunnel.
    pub fn new(target: &str, port: u16) -> TunnelId {
        TunnelId::of(target, (Proto::Tcp, port))
    }

    pub fn of(target: &str, (proto, port): PortKey) -> TunnelId {
        TunnelId {
            target: target.to_string(),
            proto,
            port,
        }
    }

    pub fn key(&self) -> PortKey {
        (self.proto, self.port)
    }
}

impl fmt::Display for TunnelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.target, self.proto, self.port)
    }
}

impl FromStr for TunnelId {
    type Err = ();
    /// `TARGET:tcp:PORT` or `TARGET:udp:PORT` with PORT in 1..65535; the
    /// target may itself hold colons (a gate upstream named by address).
    fn from_str(s: &str) -> Result<TunnelId, ()> {
        let (rest, port) = s.rsplit_once(':').ok_or(())?;
        let (target, proto) = rest.rsplit_once(':').ok_or(())?;
        let proto: Proto = proto.parse().map_err(|_| ())?;
        let port: u16 = port.parse().map_err(|_| ())?;
        if target.is_empty() || port == 0 || port.to_string().len() != s.len() - rest.len() - 1 {
            return Err(());
        }
        Ok(TunnelId::of(target, (proto, port)))
    }
}

/// What tunnel-svc does when a port's automatic tunnel becomes active
/// (dev containers' `onAutoForward`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnForward {
    /// A log line (and the WatchTunnels event every change makes); a
    /// desktop notification where tunnel-svc's environment has a session
    /// bus.
    #[default]
    Notify,
    /// Opens its URL in the browser, each time the tunnel opens.
    OpenBrowser,
    /// Opens its URL in the browser, the first time only in this run.
    OpenBrowserOnce,
    /// Nothing but the WatchTunnels event.
    Silent,
}

/// The scheme of a port's URL (dev containers' `protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        })
    }
}

/// What the rule that decided an automatic tunnel says beyond forwarding
/// it (its label aside): where it was written, the scheme of the port's
/// URL, what to do when the tunnel opens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// `None`: no rule matched.
    pub from: Option<RuleFrom>,
    pub scheme: Option<Scheme>,
    pub on_forward: OnForward,
}

/// Why a tunnel exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A port the target's monitor reported open.
    Auto,
    /// Opened through the admin API.
    Manual,
    /// One of the egress gate's configured forwards.
    Egress,
}

/// Where a tunnel is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Listening on the host; the backend is still preparing the port.
    Pending,
    /// Listening on the host and carrying connections.
    Active,
    /// Not forwarded, for this reason; tried again while it is wanted.
    Failed(Failure),
    /// Closed by an admin; it stays closed until the port closes inside.
    Closed,
    /// Listed only: more ports are open than `--max-tunnels` allows.
    Capped,
    /// Listed only: the container publishes the port on the host itself
    /// (`docker run -p`), on this host port.
    Published(u16),
}

impl State {
    /// Holds host listeners (or is about to).
    pub fn is_open(&self) -> bool {
        matches!(self, State::Pending | State::Active)
    }
}

/// One listening socket a monitor reported, already checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Listener {
    pub port: u16,
    pub address: IpAddr,
    /// An IPv6 wildcard that accepts IPv4 too.
    pub dual_stack: bool,
    pub process: Option<Process>,
    /// When the monitor saw it start listening (its clock), if it opened
    /// while watched (ports open when the monitor started have no time).
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

impl Listener {
    /// A listener on `0.0.0.0` of a process with command line `cmdline`
    /// (for tests of what matches command lines).
    #[cfg(test)]
    pub fn of_command(cmdline: &[&str]) -> Listener {
        Listener {
            since: None,
            port: 0,
            address: std::net::Ipv4Addr::UNSPECIFIED.into(),
            dual_stack: false,
            process: Some(Process {
                pid: 1,
                name: cmdline.first().copied().unwrap_or("x").into(),
                cmdline: cmdline.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
        }
    }

    /// The addresses the listener accepts connections on: its own, plus
    /// IPv4's wildcard for a dual-stack `::` socket.
    pub fn reachable_on(&self) -> Vec<IpAddr> {
        if self.dual_stack {
            vec![self.address, IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)]
        } else {
            vec![self.address]
        }
    }
}

/// Live counters of one tunnel, as read at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections (UDP: flows) open now.
    pub active: u64,
    pub total: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// UDP: datagrams host → container.
    pub datagrams_in: u64,
    /// UDP: datagrams container → host.
    pub datagrams_out: u64,
    /// UDP: datagrams from the host dropped (no flow could take them).
    pub datagrams_dropped: u64,
}

/// A tunnel as the admin API shows it.
#[derive(Clone, Debug)]
pub struct TunnelView {
    pub id: TunnelId,
    pub origin: Origin,
    pub state: State,
    pub backend: BackendKind,
    /// 0 while it has no host listeners.
    pub host_port: u16,
    pub host_addresses: Vec<SocketAddr>,
    pub process: Option<Process>,
    pub opened_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Something a user should know that is not a failure (a remap, a cap).
    pub note: Option<String>,
    /// From the rule that matched the port.
    pub label: Option<String>,
    pub settings: Settings,
    /// From the port starting to listen in the container to the tunnel
    /// being usable, when both are known.
    pub usable_after: Option<std::time::Duration>,
    /// Its connections fail, until one gets through again.
    pub failing: Option<Failing>,
    pub counters: Counters,
}

impl TunnelView {
    /// `SCHEME://HOST:PORT` of the tunnel's host side, with `localhost` for
    /// the loopback addresses; none while it has no host listeners.
    pub fn url(&self, scheme: Scheme) -> Option<String> {
        if self.host_port == 0 {
            return None;
        }
        let host = match self.host_addresses.iter().find(|a| !a.ip().is_loopback()) {
            None => "localhost".to_string(),
            Some(a) if a.is_ipv6() => format!("[{}]", a.ip()),
            Some(a) => a.ip().to_string(),
        };
        Some(format!("{scheme}://{host}:{}", self.host_port))
    }
}

/// A tunnel whose connections fail: how many in a row, since when, and
/// why the latest did. The first one that gets through clears it.
#[derive(Clone, Debug, PartialEq)]
pub struct Failing {
    pub why: String,
    pub count: u64,
    pub since: chrono::DateTime<chrono::Utc>,
}

/// A target as ListTargets shows it.
#[derive(Clone, Debug)]
pub struct TargetView {
    pub name: String,
    pub url: String,
    pub backend: BackendKind,
    pub connected: bool,
    pub instance_id: String,
    pub error: Option<String>,
    pub since: chrono::DateTime<chrono::Utc>,
    /// Its tunnels opened and removed so far.
    pub changes: u64,
    /// Ports open in the container now, forwarded or not.
    pub ports: usize,
}

#[cfg(test)]
mod tests {
    use super::TunnelId;

    #[test]
    fn ids_print_and_parse_back() {
        let id = TunnelId::new("dev", 8080);
        assert_eq!(id.to_string(), "dev:tcp:8080");
        assert_eq!("dev:tcp:8080".parse(), Ok(id));
        let dns = TunnelId::of("dev", (super::Proto::Udp, 53));
        assert_eq!(dns.to_string(), "dev:udp:53");
        assert_eq!("dev:udp:53".parse(), Ok(dns));
        let odd: TunnelId = "git.example:22:tcp:22".parse().unwrap();
        assert_eq!((odd.target.as_str(), odd.port), ("git.example:22", 22));
        for bad in [
            "",
            "dev",
            "dev:8080",
            "dev:sctp:53",
            "dev:TCP:53",
            ":tcp:80",
            "dev:tcp:0",
            "dev:tcp:65536",
            "dev:tcp:+80",
            "dev:tcp:080",
            "dev:tcp:",
        ] {
            assert!(bad.parse::<TunnelId>().is_err(), "{bad:?}");
        }
    }
}
