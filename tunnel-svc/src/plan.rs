//! What should exist, as a pure function of what the watchers, the admin
//! and the configuration say: the reconciler applies it. No I/O here, so
//! every rule is unit-tested without root.

use crate::config::PortSet;
use porthole::pb::v1::{Origin, Port, Process};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Container ports below this get an unprivileged host port unless
/// `--allow-privileged-ports`.
pub const PRIVILEGED: u16 = 1024;
/// What a privileged container port is forwarded on instead: PORT + this.
pub const PRIVILEGED_OFFSET: u16 = 10000;

/// `TARGET:tcp:PORT`.
pub fn tunnel_id(target: &str, port: u16) -> String {
    format!("{target}:tcp:{port}")
}

/// The host port for container `port` when none was asked for: the same
/// number, or [`PRIVILEGED_OFFSET`] + `port` for a privileged port the
/// options do not allow.
pub fn host_port_for(port: u16, allow_privileged: bool) -> u16 {
    if port < PRIVILEGED && !allow_privileged {
        port + PRIVILEGED_OFFSET
    } else {
        port
    }
}

/// A tunnel that should exist.
pub struct Want {
    pub target: String,
    pub port: u16,
    pub origin: Origin,
    pub host_port: u16,
    pub process: Option<Process>,
    /// Where the container's listeners accept connections.
    pub addresses: Vec<IpAddr>,
    /// Never remap: the host port was asked for explicitly.
    pub exact: bool,
    /// Something listens on the port in the container right now.
    pub listening: bool,
    /// Left out by `--max-tunnels`: listed, not forwarded.
    pub capped: bool,
}

impl Want {
    pub fn new(
        target: &str,
        port: u16,
        host_port: u16,
        origin: Origin,
        listeners: &[Port],
    ) -> Want {
        Want {
            target: target.to_string(),
            port,
            origin,
            host_port,
            process: listeners.iter().find_map(|l| l.process.clone()),
            addresses: listeners.iter().flat_map(reachable_on).collect(),
            exact: false,
            listening: !listeners.is_empty(),
            capped: false,
        }
    }
}

/// The addresses a listener accepts connections on: its own, plus IPv4's
/// wildcard for a dual-stack `::` socket (key `tcp:*:PORT`).
fn reachable_on(l: &Port) -> Vec<IpAddr> {
    let Ok(ip) = l.address.parse::<IpAddr>() else {
        return Vec::new();
    };
    // Monitors older than the `dual_stack` field say it only in the key.
    if l.dual_stack || l.key.contains(":*:") {
        vec![ip, IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)]
    } else {
        vec![ip]
    }
}

/// One target's open ports, as its watcher last reported them.
pub struct TargetPorts<'a> {
    pub name: &'a str,
    /// The monitor's own port, never forwarded.
    pub monitor_port: u16,
    /// Open TCP ports by number, with every listener on that port.
    pub ports: &'a BTreeMap<u16, Vec<Port>>,
}

/// The flags that shape automatic tunnels.
pub struct Policy<'a> {
    pub skip: &'a PortSet,
    pub max_tunnels: usize,
    pub allow_privileged: bool,
}

/// What the admin and the configuration decided, and what exists.
pub struct State<'a> {
    /// Manual tunnels: id → (target, container port, host port asked for).
    pub manual: &'a BTreeMap<String, (String, u16, Option<u16>)>,
    /// Static tunnels (the egress gate's): id → (target, port).
    pub statics: &'a BTreeMap<String, (String, u16)>,
    /// Automatic tunnels an admin closed.
    pub closed: &'a BTreeSet<String>,
    /// Whether an automatic tunnel with this id exists and holds a slot.
    pub holds: &'a dyn Fn(&str) -> bool,
}

/// Every tunnel that should exist, by id, and the targets with more open
/// ports than `--max-tunnels`. Rules:
/// - automatic: every open port of a target but its monitor's port, skipped
///   ports, and ports whose tunnel an admin closed (until they reopen);
///   host port = container port, or 10000 + port below 1024 unless allowed;
/// - at most `max_tunnels` per target: tunnels that exist keep their slot,
///   new ports take the free ones lowest first, the rest are `capped`;
/// - a manual tunnel replaces the automatic one of its port; a host port
///   asked for is `exact` (never remapped);
/// - static tunnels always exist, on their own port, whatever the rest says.
pub fn desired(
    targets: &[TargetPorts],
    policy: &Policy,
    state: &State,
) -> (BTreeMap<String, Want>, BTreeSet<String>) {
    let mut want = BTreeMap::new();
    let mut capped_targets = BTreeSet::new();
    for t in targets {
        let eligible: Vec<(u16, &Vec<Port>)> = t
            .ports
            .iter()
            .map(|(&port, listeners)| (port, listeners))
            .filter(|(port, _)| {
                let id = tunnel_id(t.name, *port);
                !(state.manual.contains_key(&id)
                    || state.statics.contains_key(&id)
                    || *port == t.monitor_port
                    || policy.skip.contains(*port)
                    || state.closed.contains(&id))
            })
            .collect();
        let holds = |port: u16| (state.holds)(&tunnel_id(t.name, port));
        let held = eligible.iter().filter(|(p, _)| holds(*p)).count();
        let mut free = policy.max_tunnels.saturating_sub(held);
        for (port, listeners) in eligible {
            let keep = holds(port) || free > 0;
            if keep && !holds(port) {
                free -= 1;
            }
            if !keep {
                capped_targets.insert(t.name.to_string());
            }
            let host_port = host_port_for(port, policy.allow_privileged);
            want.insert(
                tunnel_id(t.name, port),
                Want {
                    capped: !keep,
                    ..Want::new(t.name, port, host_port, Origin::Auto, listeners)
                },
            );
        }
    }
    for (id, (target, port, asked)) in state.manual {
        let listeners = targets
            .iter()
            .find(|t| t.name == target)
            .and_then(|t| t.ports.get(port))
            .map_or(&[][..], |v| v);
        want.insert(
            id.clone(),
            Want {
                // A host port asked for is that port or a failure.
                exact: asked.is_some(),
                ..Want::new(
                    target,
                    *port,
                    asked.unwrap_or(host_port_for(*port, policy.allow_privileged)),
                    Origin::Manual,
                    listeners,
                )
            },
        );
    }
    for (id, (target, port)) in state.statics {
        want.insert(
            id.clone(),
            Want::new(target, *port, *port, Origin::Egress, &[]),
        );
    }
    (want, capped_targets)
}

/// What the reconciler knows of a tunnel that exists, for [`diff`].
#[derive(Clone, Debug, Default)]
pub struct Existing {
    /// A placeholder for a port over the cap.
    pub capped: bool,
    pub process: Option<Process>,
    pub listening: bool,
    /// Closed by an admin and still wanted closed: kept, not removed.
    pub kept_closed: bool,
}

/// One step that turns what exists into what is wanted.
pub enum Action {
    /// Stop and forget the tunnel.
    Remove(String),
    /// Make the tunnel (listen on the host, prepare the backend).
    Start(String, Want),
    /// Stop it and make it again: it moved between capped and forwarded.
    Restart(String, Want),
    /// Keep it; its process or listening state changed.
    Update(String, Want),
}

/// The actions, removals first, that turn `existing` into `desired`. A
/// tunnel that exists is never restarted for anything but crossing the cap.
pub fn diff(desired: BTreeMap<String, Want>, existing: &BTreeMap<String, Existing>) -> Vec<Action> {
    let mut actions: Vec<Action> = existing
        .iter()
        .filter(|(id, e)| !desired.contains_key(*id) && !e.kept_closed)
        .map(|(id, _)| Action::Remove(id.clone()))
        .collect();
    for (id, want) in desired {
        match existing.get(&id) {
            None => actions.push(Action::Start(id, want)),
            Some(e) if e.capped != want.capped => actions.push(Action::Restart(id, want)),
            Some(e) if e.process != want.process || e.listening != want.listening => {
                actions.push(Action::Update(id, want))
            }
            Some(_) => {}
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use porthole::pb::v1::Protocol;

    fn listener(port: u16) -> Port {
        Port {
            protocol: Protocol::Tcp as i32,
            address: "0.0.0.0".into(),
            port: port.into(),
            key: format!("tcp:0.0.0.0:{port}"),
            process: Some(Process {
                pid: 7,
                name: "srv".into(),
                ..Default::default()
            }),
            dual_stack: false,
        }
    }

    fn open(ports: &[u16]) -> BTreeMap<u16, Vec<Port>> {
        ports.iter().map(|&p| (p, vec![listener(p)])).collect()
    }

    struct World {
        ports: BTreeMap<u16, Vec<Port>>,
        skip: PortSet,
        max: usize,
        allow_privileged: bool,
        manual: BTreeMap<String, (String, u16, Option<u16>)>,
        statics: BTreeMap<String, (String, u16)>,
        closed: BTreeSet<String>,
        existing: BTreeSet<String>,
    }

    impl World {
        fn new(ports: &[u16]) -> World {
            World {
                ports: open(ports),
                skip: PortSet::default(),
                max: 10,
                allow_privileged: false,
                manual: BTreeMap::new(),
                statics: BTreeMap::new(),
                closed: BTreeSet::new(),
                existing: BTreeSet::new(),
            }
        }

        fn plan(&self) -> (BTreeMap<String, Want>, BTreeSet<String>) {
            let targets = [TargetPorts {
                name: "dev",
                monitor_port: 7070,
                ports: &self.ports,
            }];
            let policy = Policy {
                skip: &self.skip,
                max_tunnels: self.max,
                allow_privileged: self.allow_privileged,
            };
            let holds = |id: &str| self.existing.contains(id);
            let state = State {
                manual: &self.manual,
                statics: &self.statics,
                closed: &self.closed,
                holds: &holds,
            };
            desired(&targets, &policy, &state)
        }

        /// (id, host port, capped) of every wanted tunnel.
        fn summary(&self) -> Vec<(String, u16, bool)> {
            self.plan()
                .0
                .into_iter()
                .map(|(id, w)| (id, w.host_port, w.capped))
                .collect()
        }
    }

    fn row(port: u16, host: u16, capped: bool) -> (String, u16, bool) {
        (tunnel_id("dev", port), host, capped)
    }

    #[test]
    fn every_open_port_but_the_monitor_skipped_and_closed_ones() {
        let mut w = World::new(&[7070, 8000, 8080, 9000]);
        w.skip = "8080".parse().unwrap();
        w.closed.insert(tunnel_id("dev", 9000));
        assert_eq!(w.summary(), [row(8000, 8000, false)]);
    }

    #[test]
    fn privileged_ports_get_an_unprivileged_host_port_unless_allowed() {
        let mut w = World::new(&[80, 1023, 1024]);
        assert_eq!(
            w.summary(),
            [
                row(1023, 11023, false),
                row(1024, 1024, false),
                row(80, 10080, false)
            ]
        );
        w.allow_privileged = true;
        assert_eq!(
            w.summary(),
            [
                row(1023, 1023, false),
                row(1024, 1024, false),
                row(80, 80, false)
            ]
        );
    }

    #[test]
    fn the_cap_keeps_existing_tunnels_and_lists_the_rest() {
        let mut w = World::new(&[8001, 8002, 8003]);
        w.max = 2;
        assert_eq!(
            w.summary(),
            [
                row(8001, 8001, false),
                row(8002, 8002, false),
                row(8003, 8003, true)
            ]
        );
        assert!(w.plan().1.contains("dev"), "the target is reported capped");
        // 8003 existed before 8001 opened: it keeps its slot.
        w.existing = [tunnel_id("dev", 8003), tunnel_id("dev", 8002)].into();
        assert_eq!(
            w.summary(),
            [
                row(8001, 8001, true),
                row(8002, 8002, false),
                row(8003, 8003, false)
            ]
        );
        // A slot frees: the capped port takes it.
        w.ports.remove(&8002);
        w.existing.remove(&tunnel_id("dev", 8002));
        assert_eq!(
            w.summary(),
            [row(8001, 8001, false), row(8003, 8003, false)]
        );
        assert!(w.plan().1.is_empty());
    }

    #[test]
    fn manual_tunnels_replace_automatic_ones_and_keep_their_host_port() {
        let mut w = World::new(&[8000, 80]);
        w.skip = "80".parse().unwrap();
        w.manual
            .insert(tunnel_id("dev", 8000), ("dev".into(), 8000, Some(18000)));
        w.manual
            .insert(tunnel_id("dev", 80), ("dev".into(), 80, None));
        w.manual
            .insert(tunnel_id("dev", 9999), ("dev".into(), 9999, None));
        let (want, _) = w.plan();
        let m = &want[&tunnel_id("dev", 8000)];
        assert_eq!(
            (m.origin, m.host_port, m.exact, m.listening),
            (Origin::Manual, 18000, true, true)
        );
        let skipped = &want[&tunnel_id("dev", 80)];
        assert_eq!(
            (skipped.host_port, skipped.exact),
            (10080, false),
            "a skipped port can be opened by hand"
        );
        let closed = &want[&tunnel_id("dev", 9999)];
        assert!(
            !closed.listening,
            "a manual tunnel of a port nothing listens on"
        );
        assert_eq!(want.len(), 3);
    }

    #[test]
    fn statics_exist_whatever_the_rest_says() {
        let mut w = World::new(&[22]);
        w.skip = "22".parse().unwrap();
        w.statics
            .insert(tunnel_id("forge", 22), ("forge".into(), 22));
        w.max = 0;
        let (want, _) = w.plan();
        let g = &want[&tunnel_id("forge", 22)];
        assert_eq!(
            (g.origin, g.host_port, g.capped),
            (Origin::Egress, 22, false)
        );
        assert_eq!(want.len(), 1);
    }

    fn kinds(actions: &[Action]) -> Vec<(&'static str, &str)> {
        actions
            .iter()
            .map(|a| match a {
                Action::Remove(id) => ("remove", id.as_str()),
                Action::Start(id, _) => ("start", id.as_str()),
                Action::Restart(id, _) => ("restart", id.as_str()),
                Action::Update(id, _) => ("update", id.as_str()),
            })
            .collect()
    }

    #[test]
    fn diff_starts_removes_and_leaves_alone() {
        let mut w = World::new(&[8000, 8001]);
        let seen = |listening: bool| Existing {
            process: Some(listener(0).process.unwrap()),
            listening,
            ..Default::default()
        };
        let existing: BTreeMap<String, Existing> = [
            (tunnel_id("dev", 8000), seen(true)),
            (tunnel_id("dev", 9000), seen(true)),
            (
                tunnel_id("dev", 9001),
                Existing {
                    kept_closed: true,
                    ..seen(true)
                },
            ),
        ]
        .into();
        let actions = diff(w.plan().0, &existing);
        assert_eq!(
            kinds(&actions),
            [("remove", "dev:tcp:9000"), ("start", "dev:tcp:8001")],
            "the unchanged 8000 and the admin-closed 9001 are left alone"
        );
        // Over the cap and back: restarted, never for anything else.
        w.max = 1;
        let capped: BTreeMap<String, Existing> = [(tunnel_id("dev", 8000), seen(true))].into();
        w.existing = [tunnel_id("dev", 8000)].into();
        let actions = diff(w.plan().0, &capped);
        assert_eq!(kinds(&actions), [("start", "dev:tcp:8001")]);
        let was_capped: BTreeMap<String, Existing> = [(
            tunnel_id("dev", 8001),
            Existing {
                capped: true,
                ..seen(true)
            },
        )]
        .into();
        w.ports.remove(&8000);
        w.existing.clear();
        let actions = diff(w.plan().0, &was_capped);
        assert_eq!(kinds(&actions), [("restart", "dev:tcp:8001")]);
        // Only the process changed: updated in place.
        let moved: BTreeMap<String, Existing> = [(tunnel_id("dev", 8001), seen(false))].into();
        let actions = diff(w.plan().0, &moved);
        assert_eq!(kinds(&actions), [("update", "dev:tcp:8001")]);
    }

    #[test]
    fn dual_stack_listeners_are_reachable_on_both_wildcards() {
        let mut l = listener(8000);
        l.address = "::".into();
        l.key = "tcp:*:8000".into();
        let w = Want::new("dev", 8000, 8000, Origin::Auto, &[l]);
        assert_eq!(w.addresses.len(), 2);
        assert!(w
            .addresses
            .iter()
            .any(|a| a.is_ipv4() && a.is_unspecified()));
    }
}
