//! What should exist, as a pure function of what the watchers, the admin
//! and the configuration say, and the steps from what exists to that. The
//! reconciler applies the steps. No I/O here, so every rule is unit-tested
//! without root.

use crate::devcontainer::DevRules;
use crate::model::{
    Excluded, Holder, Listener, Note, Origin, PortKey, PortSet, Proto, RuleFrom, Settings,
    State as TunnelState, TunnelId,
};
use crate::rules::Rule;
use porthole::pb::v1::Process;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

pub use crate::model::PRIVILEGED;
/// What a privileged container port is forwarded on instead: PORT + this.
pub const PRIVILEGED_OFFSET: u16 = 10000;

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
#[derive(Clone, Debug, PartialEq)]
pub struct Want {
    pub origin: Origin,
    pub host_port: u16,
    /// Never remap: the host port was asked for explicitly (or is the
    /// gate's), so a busy port is a failure.
    pub exact: bool,
    /// The rule that pinned the host port, if one did.
    pub pinned_by: Option<crate::rules::RuleFrom>,
    pub process: Option<Process>,
    /// Where the container's listeners accept connections.
    pub addresses: Vec<IpAddr>,
    /// Something listens on the port in the container right now.
    pub listening: bool,
    /// Left out by `--max-tunnels`: listed, not forwarded.
    pub capped: bool,
    /// Already on the host: the container publishes it there (`-p`), on
    /// this port. Listed, not forwarded.
    pub published: Option<u16>,
    /// Why the host port differs from the container port, if it does.
    pub note: Option<Note>,
    /// Another tunnel holds the host port and this one may not move.
    pub held_by: Option<TunnelId>,
    /// From the rule that matched the port.
    pub label: Option<String>,
    pub settings: Settings,
    /// When the port started listening (the monitor's clock), if known.
    pub listening_since: Option<chrono::DateTime<chrono::Utc>>,
}

impl Want {
    fn new(origin: Origin, host_port: u16, listeners: &[Listener]) -> Want {
        Want {
            origin,
            host_port,
            exact: false,
            pinned_by: None,
            process: listeners.iter().find_map(|l| l.process.clone()),
            addresses: listeners.iter().flat_map(Listener::reachable_on).collect(),
            listening: !listeners.is_empty(),
            capped: false,
            published: None,
            note: None,
            held_by: None,
            label: None,
            settings: Settings::default(),
            listening_since: listeners.iter().filter_map(|l| l.since).min(),
        }
    }
}

/// One target's open ports, as its watcher last reported them.
pub struct TargetPorts<'a> {
    pub name: &'a str,
    /// The monitor's own TCP port, never forwarded.
    pub monitor_port: u16,
    /// Ports the container publishes on the host itself: container port →
    /// host port. Listed, never forwarded.
    pub published: &'a BTreeMap<PortKey, u16>,
    /// Open TCP ports and UDP servers, with every listener on each.
    pub ports: &'a BTreeMap<PortKey, Vec<Listener>>,
    /// This target's own rules (a container's labels), before the global ones.
    pub rules: &'a [Rule],
    /// Its dev-container settings, after the global rules.
    pub dev: &'a DevRules,
}

/// The flags that shape tunnels.
pub struct Policy<'a> {
    pub skip: &'a PortSet,
    pub max_tunnels: usize,
    pub allow_privileged: bool,
    /// A host port held by another tunnel: take the next one (true) or fail.
    pub remap: bool,
    /// `[[rule]]`s: the first that matches an automatic tunnel's port
    /// decides whether it is made, its label and its host port.
    pub rules: &'a [Rule],
}

/// A tunnel that exists, as the plan needs to know it.
#[derive(Clone, Debug, PartialEq)]
pub struct Existing {
    pub origin: Origin,
    pub state: TunnelState,
    /// The host port it listens on (while it is open).
    pub host_port: u16,
    pub process: Option<Process>,
    pub listening: bool,
    pub label: Option<String>,
    pub settings: Settings,
}

impl Existing {
    /// An automatic tunnel that counts against `--max-tunnels`.
    fn holds_slot(&self) -> bool {
        self.origin == Origin::Auto
            && !matches!(
                self.state,
                TunnelState::Capped | TunnelState::Closed | TunnelState::Published(_)
            )
    }
}

/// What the admin and the configuration decided, and what exists.
pub struct State<'a> {
    /// Manual tunnels, each with the host port asked for.
    pub manual: &'a BTreeMap<TunnelId, Option<u16>>,
    /// Static tunnels (the egress gate's): always wanted, on their own port.
    pub statics: &'a BTreeSet<TunnelId>,
    /// Automatic tunnels an admin closed.
    pub closed: &'a BTreeSet<TunnelId>,
    /// Host ports tunnels had before (this run or an earlier one) and
    /// keep: each is its tunnel's preference and no other new tunnel's.
    pub remembered: &'a BTreeMap<TunnelId, u16>,
    pub existing: &'a BTreeMap<TunnelId, Existing>,
}

/// Every tunnel that should exist, and the targets with more open ports
/// than `--max-tunnels`. Rules:
/// - automatic: every open port of a target but its monitor's port, skipped
///   ports, and ports whose tunnel an admin closed (until they reopen);
///   host port = container port, or 10000 + port below 1024 unless allowed;
/// - at most `max_tunnels` per target: tunnels that exist keep their slot,
///   new ports take the free ones lowest first, the rest are `capped`;
/// - a manual tunnel replaces the automatic one of its port; a host port
///   asked for is `exact` (never remapped);
/// - static tunnels always exist, on their own port, whatever the rest says;
/// - one host port, one tunnel: a tunnel that listens on a port keeps it;
///   a new tunnel whose port another holds or takes first (statics, then
///   manual, then automatic ones in target-name and port order) moves to
///   the next port nobody holds, with a note, or fails if it is exact or
///   remapping is off.
pub fn desired(
    targets: &[TargetPorts],
    policy: &Policy,
    state: &State,
) -> (BTreeMap<TunnelId, Want>, BTreeSet<String>) {
    let mut want = given(targets, policy, state);
    let mut capped_targets = BTreeSet::new();
    let mut targets: Vec<&TargetPorts> = targets.iter().collect();
    targets.sort_by_key(|t| t.name);
    for t in targets {
        if automatic(t, policy, state, &mut want) {
            capped_targets.insert(t.name.to_string());
        }
    }
    assign_host_ports(&mut want, policy, state);
    (want, capped_targets)
}

/// The tunnels nobody's ports decide: the statics, then the manual ones.
fn given(targets: &[TargetPorts], policy: &Policy, state: &State) -> BTreeMap<TunnelId, Want> {
    let mut want = BTreeMap::new();
    let listeners_of = |id: &TunnelId| {
        targets
            .iter()
            .find(|t| t.name == id.target)
            .and_then(|t| t.ports.get(&id.key()))
            .map_or(&[][..], |v| v.as_slice())
    };
    for id in state.statics {
        let w = Want {
            exact: true,
            ..Want::new(Origin::Egress, id.port, &[])
        };
        want.insert(id.clone(), w);
    }
    for (id, asked) in state.manual {
        let w = Want {
            exact: asked.is_some(),
            ..Want::new(
                Origin::Manual,
                asked.unwrap_or(host_port_for(id.port, policy.allow_privileged)),
                listeners_of(id),
            )
        };
        want.entry(id.clone()).or_insert(w);
    }
    want
}

/// Adds target `t`'s automatic tunnels (and its published ports, listed)
/// to `want`; true when the cap left some of them out.
fn automatic(
    t: &TargetPorts,
    policy: &Policy,
    state: &State,
    want: &mut BTreeMap<TunnelId, Want>,
) -> bool {
    // Dev containers' forwardPorts are forwarded listening or not.
    static NONE: Vec<Listener> = Vec::new();
    let idle = t
        .dev
        .forward
        .iter()
        .map(|p| (Proto::Tcp, *p))
        .filter(|key| !t.ports.contains_key(key))
        .map(|key| (key, &NONE));
    let eligible: Vec<(TunnelId, &Vec<Listener>, Option<&Rule>)> = t
        .ports
        .iter()
        .map(|(&key, listeners)| (key, listeners))
        .chain(idle)
        .map(|(key, listeners)| {
            let rule = rule_for(t, policy, key, listeners);
            (TunnelId::of(t.name, key), listeners, rule)
        })
        .filter(|(id, listeners, rule)| {
            !(want.contains_key(id)
                || published(t, id.key(), listeners).is_some()
                || state.closed.contains(id)
                || excluded(t, policy, id.key(), *rule).is_some())
        })
        .collect();
    for (&key, listeners) in t.ports {
        let (Some(host), id) = (published(t, key, listeners), TunnelId::of(t.name, key)) else {
            continue;
        };
        want.entry(id).or_insert_with(|| Want {
            published: Some(host),
            ..Want::new(Origin::Auto, host, listeners)
        });
    }
    let holds = |id: &TunnelId| state.existing.get(id).is_some_and(Existing::holds_slot);
    let held = eligible.iter().filter(|(id, _, _)| holds(id)).count();
    let mut free = policy.max_tunnels.saturating_sub(held);
    let mut capped = false;
    for (id, listeners, rule) in eligible {
        let keep = holds(&id) || free > 0;
        if keep && !holds(&id) {
            free -= 1;
        }
        capped |= !keep;
        let unreached = t
            .published
            .get(&id.key())
            .map(|&published| Note::Unreached { published });
        let exact = rule.and_then(|r| r.exact_host_port(id.port));
        let privileged = policy.allow_privileged || rule.is_some_and(|r| r.privileged);
        let host_port = exact
            .or_else(|| state.remembered.get(&id).copied())
            .unwrap_or(host_port_for(id.port, privileged));
        let w = Want {
            capped: !keep,
            exact: exact.is_some(),
            pinned_by: exact.and(rule.map(|r| r.from)),
            label: rule.and_then(|r| r.label.clone()),
            note: unreached,
            settings: rule.map(Rule::settings).unwrap_or_default(),
            ..Want::new(Origin::Auto, host_port, listeners)
        };
        want.insert(id, w);
    }
    capped
}

/// The rule that decides about `key` in `t`: the target's own rules
/// first, then the policy's, then the target's dev-container settings;
/// the first that matches.
pub fn rule_for<'a>(
    t: &TargetPorts<'a>,
    policy: &Policy<'a>,
    key: PortKey,
    listeners: &[Listener],
) -> Option<&'a Rule> {
    crate::rules::first(t.rules, t.name, key, listeners)
        .or_else(|| crate::rules::first(policy.rules, t.name, key, listeners))
        .or_else(|| crate::rules::first(&t.dev.rules, t.name, key, listeners))
}

/// Why an open port `key` of `t` gets no automatic tunnel, if it gets
/// none whatever the admin did (`rule`: see [`rule_for`]).
pub fn excluded(
    t: &TargetPorts,
    policy: &Policy,
    key: PortKey,
    rule: Option<&Rule>,
) -> Option<Excluded> {
    let ignores = rule.is_some_and(|r| r.action == crate::rules::Action::Ignore);
    let porthole_rule = rule.is_some_and(|r| r.from != RuleFrom::DevContainer);
    if key == (Proto::Tcp, t.monitor_port) {
        Some(Excluded::MonitorPort)
    } else if ignores && porthole_rule {
        Some(Excluded::Ignored)
    } else if key.0 == Proto::Tcp && t.dev.forward.contains(&key.1) {
        // forwardPorts: always, whatever the skip list and onAutoForward.
        None
    } else if policy.skip.contains(key.1) {
        Some(Excluded::Skipped)
    } else if ignores {
        Some(Excluded::Ignored)
    } else {
        None
    }
}

/// The host port Docker publishes `key` on, if its forward reaches the
/// server: not when every listener is on the container's loopback (Docker
/// forwards to the container's address), where porthole forwards it.
fn published(t: &TargetPorts, key: PortKey, listeners: &[Listener]) -> Option<u16> {
    let host = *t.published.get(&key)?;
    let reached = listeners.is_empty() || listeners.iter().any(|l| !l.address.is_loopback());
    reached.then_some(host)
}

/// Gives every wanted tunnel a host port no other one holds (see the last
/// rule of [`desired`]), and notes why a host port differs from the
/// container port.
fn assign_host_ports(want: &mut BTreeMap<TunnelId, Want>, policy: &Policy, state: &State) {
    // Ports held by open tunnels that stay: they keep them. TCP and UDP
    // host ports are apart.
    let mut taken: BTreeMap<PortKey, TunnelId> = state
        .existing
        .iter()
        .filter(|(id, e)| e.state.is_open() && want.get(*id).is_some_and(|w| !w.capped))
        .map(|(id, e)| ((id.proto, e.host_port), id.clone()))
        .collect();
    // Kept for the tunnels that had them, which may come back.
    let kept: BTreeMap<PortKey, &TunnelId> = state
        .remembered
        .iter()
        .map(|(id, port)| ((id.proto, *port), id))
        .collect();
    let order = |w: &Want| match w.origin {
        Origin::Egress => 0,
        Origin::Manual => 1,
        Origin::Auto => 2,
    };
    let mut new: Vec<(&TunnelId, &mut Want)> = want
        .iter_mut()
        .filter(|(id, w)| {
            !w.capped
                && w.published.is_none()
                && !state.existing.get(*id).is_some_and(|e| e.state.is_open())
        })
        .collect();
    new.sort_by_key(|(id, w)| (order(w), id.target.clone(), id.proto, id.port));
    for (id, w) in new {
        if w.port_note_needed(id.port) {
            w.note = Some(Note::Privileged {
                port: id.port,
                host_port: w.host_port,
            });
        }
        let kept_for = |port: u16| kept.get(&(id.proto, port)).filter(|k| **k != id).copied();
        let holder = taken
            .get(&(id.proto, w.host_port))
            .filter(|h| *h != id)
            .cloned();
        let keeper = kept_for(w.host_port).filter(|_| !w.exact);
        if holder.is_none() && keeper.is_none() {
            taken.insert((id.proto, w.host_port), id.clone());
            continue;
        }
        if let Some(holder) = holder.clone().filter(|_| w.exact || !policy.remap) {
            w.held_by = Some(holder);
            continue;
        }
        let next = (u32::from(w.host_port) + 1..=65535)
            .map(|p| p as u16)
            .find(|p| !taken.contains_key(&(id.proto, *p)) && kept_for(*p).is_none());
        if let Some(next) = next {
            let by = match (holder, keeper) {
                (Some(holder), _) => Holder::Tunnel(holder),
                (None, Some(keeper)) => Holder::KeptFor(keeper.clone()),
                (None, None) => unreachable!("one of them stopped it"),
            };
            w.note = Some(Note::Moved {
                wanted: w.host_port,
                by,
                to: next,
            });
            w.host_port = next;
            taken.insert((id.proto, next), id.clone());
        }
    }
}

impl Want {
    fn port_note_needed(&self, port: u16) -> bool {
        port < PRIVILEGED && self.host_port != port && !self.exact
    }
}

/// One step that turns what exists into what is wanted.
#[derive(Debug)]
pub enum Action {
    /// Stop and forget the tunnel.
    Remove(TunnelId),
    /// Make the tunnel (listen on the host, prepare the backend).
    Start(TunnelId, Want),
    /// Stop it and make it again: it crossed the cap, an admin reopened it,
    /// or it failed and `retry` is set.
    Restart(TunnelId, Want),
    /// Keep it; its origin, process or listening state changed.
    Update(TunnelId, Want),
}

/// The actions, removals first, that turn what exists into `desired`. A
/// tunnel an admin closed stays (closed) while its port is open; one that
/// works is never restarted for anything but crossing the cap; failed ones
/// are tried again only when `retry`.
pub fn diff(desired: BTreeMap<TunnelId, Want>, state: &State, retry: bool) -> Vec<Action> {
    let kept_closed =
        |id: &TunnelId, e: &Existing| e.state == TunnelState::Closed && state.closed.contains(id);
    let mut actions: Vec<Action> = state
        .existing
        .iter()
        .filter(|(id, e)| !desired.contains_key(*id) && !kept_closed(id, e))
        .map(|(id, _)| Action::Remove(id.clone()))
        .collect();
    for (id, want) in desired {
        let Some(e) = state.existing.get(&id) else {
            actions.push(Action::Start(id, want));
            continue;
        };
        let restart = match (&e.state, want.published) {
            (TunnelState::Published(now), Some(host)) => *now != host,
            (TunnelState::Published(_), None) | (_, Some(_)) => true,
            (TunnelState::Capped, None) => !want.capped,
            (TunnelState::Closed, None) => true,
            (TunnelState::Failed(_), None) => retry || want.capped,
            (TunnelState::Pending | TunnelState::Active, None) => want.capped,
        };
        if restart && want.capped {
            // Stopped before any other tunnel starts: never more listeners
            // than the cap, even for a moment.
            let first_start = actions
                .iter()
                .position(|a| !matches!(a, Action::Remove(_)))
                .unwrap_or(actions.len());
            actions.insert(first_start, Action::Restart(id, want));
        } else if restart {
            actions.push(Action::Restart(id, want));
        } else if e.origin != want.origin
            || e.process != want.process
            || e.listening != want.listening
            || e.label != want.label
            || e.settings != want.settings
        {
            actions.push(Action::Update(id, want));
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(port: u16) -> Listener {
        Listener {
            since: None,
            port,
            address: "0.0.0.0".parse().unwrap(),
            dual_stack: false,
            process: Some(Process {
                pid: 7,
                name: "srv".into(),
                ..Default::default()
            }),
        }
    }

    fn open(ports: &[u16]) -> BTreeMap<PortKey, Vec<Listener>> {
        ports
            .iter()
            .map(|&p| ((Proto::Tcp, p), vec![listener(p)]))
            .collect()
    }

    fn id(target: &str, port: u16) -> TunnelId {
        TunnelId::new(target, port)
    }

    /// What the reconciler would know: targets' ports, flags, admin
    /// decisions and the tunnels that exist.
    struct World {
        targets: BTreeMap<&'static str, BTreeMap<PortKey, Vec<Listener>>>,
        skip: PortSet,
        max: usize,
        allow_privileged: bool,
        remap: bool,
        manual: BTreeMap<TunnelId, Option<u16>>,
        statics: BTreeSet<TunnelId>,
        closed: BTreeSet<TunnelId>,
        existing: BTreeMap<TunnelId, Existing>,
        /// Published ports of every target (docker -p).
        published: BTreeMap<PortKey, u16>,
        rules: Vec<Rule>,
        remembered: BTreeMap<TunnelId, u16>,
        /// Every target's dev-container rules.
        dev: DevRules,
    }

    impl World {
        fn new(ports: &[u16]) -> World {
            World {
                targets: [("dev", open(ports))].into(),
                skip: PortSet::default(),
                max: 10,
                allow_privileged: false,
                remap: true,
                manual: BTreeMap::new(),
                statics: BTreeSet::new(),
                closed: BTreeSet::new(),
                existing: BTreeMap::new(),
                published: BTreeMap::new(),
                rules: Vec::new(),
                remembered: BTreeMap::new(),
                dev: DevRules::default(),
            }
        }

        fn ports(&mut self) -> &mut BTreeMap<PortKey, Vec<Listener>> {
            self.targets.get_mut("dev").unwrap()
        }

        fn state(&self) -> State<'_> {
            State {
                manual: &self.manual,
                statics: &self.statics,
                closed: &self.closed,
                existing: &self.existing,
                remembered: &self.remembered,
            }
        }

        fn plan(&self) -> (BTreeMap<TunnelId, Want>, BTreeSet<String>) {
            let targets: Vec<TargetPorts> = self
                .targets
                .iter()
                .map(|(name, ports)| TargetPorts {
                    name,
                    monitor_port: 7070,
                    published: &self.published,
                    ports,
                    rules: &[],
                    dev: &self.dev,
                })
                .collect();
            let policy = Policy {
                skip: &self.skip,
                max_tunnels: self.max,
                allow_privileged: self.allow_privileged,
                remap: self.remap,
                rules: &self.rules,
            };
            desired(&targets, &policy, &self.state())
        }

        fn actions(&self, retry: bool) -> Vec<(&'static str, String)> {
            diff(self.plan().0, &self.state(), retry)
                .iter()
                .map(|a| match a {
                    Action::Remove(id) => ("remove", id.to_string()),
                    Action::Start(id, _) => ("start", id.to_string()),
                    Action::Restart(id, _) => ("restart", id.to_string()),
                    Action::Update(id, _) => ("update", id.to_string()),
                })
                .collect()
        }

        /// (id, host port, capped) of every wanted tunnel.
        fn summary(&self) -> Vec<(String, u16, bool)> {
            self.plan()
                .0
                .into_iter()
                .map(|(id, w)| (id.to_string(), w.host_port, w.capped))
                .collect()
        }

        /// Applies the plan as the reconciler would if every bind worked.
        fn apply(&mut self) {
            let (want, _) = self.plan();
            self.existing.retain(|id, e| {
                want.contains_key(id) || e.state == TunnelState::Closed && self.closed.contains(id)
            });
            for (id, w) in want {
                let state = match (w.capped, w.published) {
                    (_, Some(host)) => TunnelState::Published(host),
                    (true, None) => TunnelState::Capped,
                    (false, None) => TunnelState::Active,
                };
                let keep = self
                    .existing
                    .get(&id)
                    .is_some_and(|e| e.state.is_open() && !w.capped);
                let e = self.existing.entry(id).or_insert(Existing {
                    origin: w.origin,
                    state: state.clone(),
                    host_port: w.host_port,
                    process: None,
                    listening: false,
                    label: None,
                    settings: Settings::default(),
                });
                if !keep {
                    e.state = state;
                    e.host_port = w.host_port;
                }
                e.origin = w.origin;
                e.process = w.process;
                e.listening = w.listening;
                e.label = w.label;
                e.settings = w.settings;
            }
        }
    }

    fn row(port: u16, host: u16, capped: bool) -> (String, u16, bool) {
        (id("dev", port).to_string(), host, capped)
    }

    #[test]
    fn every_open_port_but_the_monitor_skipped_and_closed_ones() {
        let mut w = World::new(&[7070, 8000, 8080, 9000]);
        w.skip = "8080".parse().unwrap();
        w.closed.insert(id("dev", 9000));
        assert_eq!(w.summary(), [row(8000, 8000, false)]);
    }

    #[test]
    fn privileged_ports_get_an_unprivileged_host_port_unless_allowed() {
        let mut w = World::new(&[80, 1023, 1024]);
        assert_eq!(
            w.summary(),
            [
                row(80, 10080, false),
                row(1023, 11023, false),
                row(1024, 1024, false)
            ]
        );
        let note = w.plan().0[&id("dev", 80)].note.clone().unwrap().to_string();
        assert!(note.contains("privileged"), "{note}");
        w.allow_privileged = true;
        assert_eq!(
            w.summary(),
            [
                row(80, 80, false),
                row(1023, 1023, false),
                row(1024, 1024, false)
            ]
        );
    }

    #[test]
    fn the_cap_keeps_existing_tunnels_and_lists_the_rest() {
        let mut w = World::new(&[8002, 8003]);
        w.max = 2;
        w.apply();
        // 8001 opens after 8002 and 8003 got their tunnels: it waits.
        w.ports().insert((Proto::Tcp, 8001), vec![listener(8001)]);
        assert_eq!(
            w.summary(),
            [
                row(8001, 8001, true),
                row(8002, 8002, false),
                row(8003, 8003, false)
            ]
        );
        assert!(w.plan().1.contains("dev"), "the target is reported capped");
        assert_eq!(w.actions(false), [("start", "dev:tcp:8001".into())]);
        w.apply();
        assert_eq!(w.existing[&id("dev", 8001)].state, TunnelState::Capped);
        // A slot frees: the capped port takes it.
        w.ports().remove(&(Proto::Tcp, 8002));
        assert_eq!(
            w.actions(false),
            [
                ("remove", "dev:tcp:8002".into()),
                ("restart", "dev:tcp:8001".into())
            ]
        );
        w.apply();
        assert!(w.plan().1.is_empty());
        assert_eq!(
            w.summary(),
            [row(8001, 8001, false), row(8003, 8003, false)]
        );
    }

    #[test]
    fn the_cap_fills_free_slots_lowest_port_first() {
        let mut w = World::new(&[8003, 8001, 8002]);
        w.max = 2;
        assert_eq!(
            w.summary(),
            [
                row(8001, 8001, false),
                row(8002, 8002, false),
                row(8003, 8003, true)
            ]
        );
    }

    #[test]
    fn an_admin_close_holds_until_the_port_closes() {
        let mut w = World::new(&[8000]);
        w.apply();
        // Closed by an admin: the tunnel stays, closed, and nothing restarts it.
        w.closed.insert(id("dev", 8000));
        w.existing.get_mut(&id("dev", 8000)).unwrap().state = TunnelState::Closed;
        assert!(w.actions(true).is_empty());
        // The port closes inside (the reconciler then forgets the close).
        w.ports().remove(&(Proto::Tcp, 8000));
        w.closed.clear();
        assert_eq!(w.actions(false), [("remove", "dev:tcp:8000".into())]);
        w.apply();
        // It reopens: a tunnel again.
        w.ports().insert((Proto::Tcp, 8000), vec![listener(8000)]);
        assert_eq!(w.actions(false), [("start", "dev:tcp:8000".into())]);
    }

    #[test]
    fn manual_tunnels_replace_automatic_ones_and_keep_their_host_port() {
        let mut w = World::new(&[8000, 80]);
        w.skip = "80".parse().unwrap();
        w.manual.insert(id("dev", 8000), Some(18000));
        w.manual.insert(id("dev", 80), None);
        w.manual.insert(id("dev", 9999), None);
        let (want, _) = w.plan();
        let m = &want[&id("dev", 8000)];
        assert_eq!(
            (m.origin, m.host_port, m.exact, m.listening),
            (Origin::Manual, 18000, true, true)
        );
        let skipped = &want[&id("dev", 80)];
        assert_eq!(
            (skipped.host_port, skipped.exact),
            (10080, false),
            "a skipped port can be opened by hand"
        );
        assert!(
            !want[&id("dev", 9999)].listening,
            "a manual tunnel of a port nothing listens on"
        );
        assert_eq!(want.len(), 3);
    }

    #[test]
    fn opening_an_automatic_tunnel_by_hand_keeps_it() {
        let mut w = World::new(&[8000]);
        w.apply();
        w.manual.insert(id("dev", 8000), None);
        assert_eq!(w.actions(false), [("update", "dev:tcp:8000".into())]);
        // An admin-closed one is reopened.
        w.existing.get_mut(&id("dev", 8000)).unwrap().state = TunnelState::Closed;
        assert_eq!(w.actions(false), [("restart", "dev:tcp:8000".into())]);
    }

    #[test]
    fn statics_exist_whatever_the_rest_says() {
        let mut w = World::new(&[22]);
        w.skip = "22".parse().unwrap();
        w.statics.insert(id("forge", 22));
        w.manual.insert(id("forge", 22), Some(2222));
        w.max = 0;
        let (want, _) = w.plan();
        let g = &want[&id("forge", 22)];
        assert_eq!(
            (g.origin, g.host_port, g.capped, g.exact),
            (Origin::Egress, 22, false, true)
        );
        assert_eq!(want.len(), 1);
    }

    #[test]
    fn two_targets_on_one_port_the_holder_keeps_it_the_other_moves() {
        let mut w = World::new(&[8000]);
        w.targets.insert("api", open(&[8000, 8001]));
        // Both new: the first by target name keeps the number.
        assert_eq!(
            w.summary(),
            [
                ("api:tcp:8000".into(), 8000, false),
                ("api:tcp:8001".into(), 8001, false),
                ("dev:tcp:8000".into(), 8002, false),
            ]
        );
        let note = w.plan().0[&id("dev", 8000)]
            .note
            .clone()
            .unwrap()
            .to_string();
        assert_eq!(
            note,
            "host port 8000 is held by api:tcp:8000; forwarded on 8002 instead"
        );
        // dev had 8000 before api's server started: dev keeps it.
        w.targets.get_mut("api").unwrap().clear();
        w.apply();
        w.targets.insert("api", open(&[8000]));
        let (want, _) = w.plan();
        assert_eq!(want[&id("dev", 8000)].host_port, 8000);
        assert_eq!(want[&id("api", 8000)].host_port, 8001);
        // Without remapping, the later one fails and names the holder.
        w.remap = false;
        let (want, _) = w.plan();
        assert_eq!(want[&id("api", 8000)].host_port, 8000);
        assert_eq!(want[&id("api", 8000)].held_by, Some(id("dev", 8000)));
    }

    #[test]
    fn remembered_host_ports_come_back_whatever_reports_first() {
        // Before: api had 8000, dev 8001 (api's monitor reported first).
        let mut w = World::new(&[8000]);
        w.remembered.insert(id("api", 8000), 8000);
        w.remembered.insert(id("dev", 8000), 8001);
        // Now dev reports first: it takes its own port back, not 8000.
        let (want, _) = w.plan();
        assert_eq!(want[&id("dev", 8000)].host_port, 8001);
        w.apply();
        w.targets.insert("api", open(&[8000]));
        let (want, _) = w.plan();
        assert_eq!(want[&id("api", 8000)].host_port, 8000);
        w.apply();
        // A newcomer moves past ports held or kept for others, and says
        // for whom.
        w.targets.insert("new", open(&[8000]));
        let (want, _) = w.plan();
        let n = &want[&id("new", 8000)];
        assert_eq!(n.host_port, 8002);
        let note = n.note.as_ref().map(Note::to_string).unwrap_or_default();
        assert!(note.contains("held by api:tcp:8000"), "{note}");
        // Only held, not kept: a port kept for a tunnel not here is named so.
        let mut w = World::new(&[8000]);
        w.remembered.insert(id("gone", 8000), 8000);
        let (want, _) = w.plan();
        let d = &want[&id("dev", 8000)];
        assert_eq!(d.host_port, 8001);
        let note = d.note.as_ref().map(Note::to_string).unwrap_or_default();
        assert!(
            note.contains("kept for gone:tcp:8000, which had it before"),
            "{note}"
        );
    }

    #[test]
    fn published_ports_are_listed_not_forwarded_nor_counted() {
        let mut w = World::new(&[8000, 8080]);
        w.published.insert((Proto::Tcp, 8080), 18080);
        w.max = 1;
        let (want, capped) = w.plan();
        let p = &want[&id("dev", 8080)];
        assert_eq!((p.published, p.capped), (Some(18080), false));
        assert!(
            !want[&id("dev", 8000)].capped,
            "a published port takes no slot"
        );
        assert!(capped.is_empty());
        w.apply();
        assert_eq!(
            w.existing[&id("dev", 8080)].state,
            TunnelState::Published(18080)
        );
        assert!(w.actions(true).is_empty(), "nothing changes while it stays");
        // No longer published (the container was recreated without -p).
        w.published.clear();
        assert_eq!(w.actions(false), [("restart", "dev:tcp:8080".into())]);
    }

    #[test]
    fn a_published_port_docker_cannot_reach_is_forwarded_with_a_note() {
        let mut w = World::new(&[8080]);
        w.published.insert((Proto::Tcp, 8080), 18080);
        let loopback = "127.0.0.1".parse().unwrap();
        w.targets
            .get_mut("dev")
            .unwrap()
            .get_mut(&(Proto::Tcp, 8080))
            .unwrap()[0]
            .address = loopback;
        let (want, _) = w.plan();
        let p = &want[&id("dev", 8080)];
        assert_eq!((p.published, p.host_port), (None, 8080));
        let note = p.note.as_ref().map(Note::to_string).unwrap_or_default();
        assert!(
            note.contains("18080") && note.contains("loopback only"),
            "{note}"
        );
    }

    #[test]
    fn rules_ignore_label_and_pin_host_ports() {
        let file = crate::config::ConfigFile::parse(
            r#"
            [[rule]]
            ports = "8000"
            label = "web"
            host_port = 18000
            [[rule]]
            ports = "8001-8009"
            action = "ignore"
            "#,
        )
        .unwrap();
        let mut w = World::new(&[8000, 8005, 9000]);
        w.rules = file.rules;
        let (want, _) = w.plan();
        let web = &want[&id("dev", 8000)];
        assert_eq!(
            (web.label.as_deref(), web.host_port, web.exact),
            (Some("web"), 18000, true)
        );
        assert_eq!(web.pinned_by, Some(crate::rules::RuleFrom::Config(1)));
        assert!(!want.contains_key(&id("dev", 8005)), "ignored");
        assert_eq!(want[&id("dev", 9000)].label, None);
        w.apply();
        // A reloaded rule relabels in place.
        w.rules = crate::config::ConfigFile::parse("[[rule]]\nports = \"8000\"\nlabel = \"site\"")
            .unwrap()
            .rules;
        assert!(w
            .actions(false)
            .contains(&("update", "dev:tcp:8000".into())));
    }

    #[test]
    fn dev_container_settings_come_after_porthole_rules() {
        let file = crate::config::ConfigFile::parse(
            "[[rule]]\nports = \"3000\"\nlabel = \"from-config\"\n[[rule]]\nports = \"5000\"\naction = \"ignore\"",
        )
        .unwrap();
        let dev = crate::devcontainer::Settings::from_file(
            r#"{
              "forwardPorts": [22, 4000, 5000],
              "portsAttributes": {
                "3000": {"label": "from-devcontainer"},
                "80": {"elevateIfNeeded": true, "protocol": "http"},
                "8080": {"requireLocalPort": true}
              },
              "otherPortsAttributes": {"onAutoForward": "ignore"}
            }"#,
        )
        .unwrap();
        let mut w = World::new(&[22, 80, 3000, 5000, 8080, 9000]);
        w.skip = "22".parse().unwrap();
        w.rules = file.rules;
        w.dev = dev.rules(None).0;
        let (want, _) = w.plan();
        let label = |p: u16| want[&id("dev", p)].label.clone();
        assert_eq!(
            label(3000).as_deref(),
            Some("from-config"),
            "porthole's rule wins"
        );
        assert!(
            !want.contains_key(&id("dev", 5000)),
            "porthole's ignore beats forwardPorts"
        );
        assert!(
            want.contains_key(&id("dev", 22)),
            "forwardPorts beats the skip list"
        );
        let idle = &want[&id("dev", 4000)];
        assert!(
            !idle.listening,
            "forwardPorts: forwarded before anything listens"
        );
        let web = &want[&id("dev", 80)];
        assert_eq!((web.host_port, web.exact), (80, false), "elevateIfNeeded");
        assert_eq!(web.settings.scheme, Some(crate::model::Scheme::Http));
        assert_eq!(web.settings.from, Some(RuleFrom::DevContainer));
        let exact = &want[&id("dev", 8080)];
        assert_eq!(
            (exact.host_port, exact.exact),
            (8080, true),
            "requireLocalPort"
        );
        assert!(
            !want.contains_key(&id("dev", 9000)),
            "otherPortsAttributes: ignore"
        );
    }

    #[test]
    fn failed_tunnels_are_retried_only_when_asked() {
        let mut w = World::new(&[8000, 8001]);
        w.apply();
        w.existing.get_mut(&id("dev", 8000)).unwrap().state =
            TunnelState::Failed(crate::model::Failure::Busy {
                host_port: 8000,
                origin: Origin::Auto,
                exact: false,
                pinned_by: None,
            });
        assert!(w.actions(false).is_empty());
        assert_eq!(w.actions(true), [("restart", "dev:tcp:8000".into())]);
    }

    #[test]
    fn diff_leaves_working_tunnels_alone_and_updates_in_place() {
        let mut w = World::new(&[8000]);
        w.apply();
        assert!(w.actions(true).is_empty(), "nothing changed");
        // Only the process changed: updated in place, never restarted.
        w.ports().get_mut(&(Proto::Tcp, 8000)).unwrap()[0].process = Some(Process {
            pid: 8,
            name: "srv2".into(),
            ..Default::default()
        });
        assert_eq!(w.actions(false), [("update", "dev:tcp:8000".into())]);
    }

    #[test]
    fn dual_stack_listeners_are_reachable_on_both_wildcards() {
        let mut l = listener(8000);
        l.address = "::".parse().unwrap();
        l.dual_stack = true;
        let w = Want::new(Origin::Auto, 8000, &[l]);
        assert_eq!(w.addresses.len(), 2);
        assert!(w
            .addresses
            .iter()
            .any(|a| a.is_ipv4() && a.is_unspecified()));
    }
}
