//! Applying the plan: tunnels started, restarted, updated and removed, the
//! backends' answers, and every change published to the watchers.

use super::targets::{logs, PortOp, Target};
use super::{Reconciler, TunnelEvent};
use crate::model::{join_notes, Counters, Failure, Note, Origin, State, TunnelId, TunnelView};
use crate::plan::{self, Want};
use crate::tunnel::Stats;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub(super) struct Entry {
    pub(super) origin: Origin,
    pub(super) state: State,
    /// Why its host port is what it is, or why it is listed only.
    pub(super) notes: Vec<Note>,
    pub(super) host_port: u16,
    pub(super) host_addresses: Vec<SocketAddr>,
    pub(super) process: Option<porthole::pb::v1::Process>,
    pub(super) listening: bool,
    pub(super) opened_at: Option<chrono::DateTime<chrono::Utc>>,
    pub(super) label: Option<String>,
    pub(super) settings: crate::model::Settings,
    /// When its port started listening, if the monitor said.
    pub(super) listening_since: Option<chrono::DateTime<chrono::Utc>>,
    /// From then to becoming active, once it did.
    pub(super) usable_after: Option<std::time::Duration>,
    pub(super) stats: Arc<Stats>,
    /// Set while the host listeners run.
    pub(super) cancel: Option<CancellationToken>,
    /// Whether the backend was asked to prepare the port.
    pub(super) prepared: bool,
    /// Tells a prepare result for this entry from one for an older one.
    pub(super) generation: u64,
    /// Whether its connections were failing when it was last published.
    pub(super) published_failing: bool,
    /// Whether its becoming active was said (see [`crate::announce`]).
    pub(super) announced: bool,
    /// `tunnel{id}`: its log lines and its connections' are inside it.
    pub(super) span: tracing::Span,
}

impl Entry {
    pub(super) fn view(&self, id: &TunnelId, backend: crate::config::BackendKind) -> TunnelView {
        let s = &self.stats;
        let mut note = join_notes(&self.notes);
        if self.origin != Origin::Egress
            && !self.listening
            && self.state.is_open()
            && note.is_none()
        {
            let idle = Note::NotListening {
                proto: id.proto,
                port: id.port,
            };
            note = Some(idle.to_string());
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
            settings: self.settings,
            usable_after: self.usable_after,
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

    /// It carries connections now: how long after its port started
    /// listening, when that is known (and the clocks agree it is after).
    pub(super) fn active(&mut self) {
        self.state = State::Active;
        self.usable_after = self
            .listening_since
            .and_then(|since| (chrono::Utc::now() - since).to_std().ok());
    }

    pub(super) fn existing(&self) -> plan::Existing {
        plan::Existing {
            origin: self.origin,
            state: self.state.clone(),
            host_port: self.host_port,
            process: self.process.clone(),
            listening: self.listening,
            label: self.label.clone(),
            settings: self.settings,
        }
    }

    /// Closes the host listeners (connections get the drain) and asks the
    /// backend to release the port.
    pub(super) fn stop(&mut self, target: &Target, port: u16) {
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

impl Reconciler {
    /// Applies the plan: see [`plan::desired`] and [`plan::diff`]. Failed
    /// tunnels are tried again only when `retry`.
    pub(super) fn reconcile(&mut self, retry: bool) {
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
            .map(|(name, t)| t.plan_view(name))
            .collect();
        let policy = self.policy();
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
            self.apply(action);
        }
    }

    /// Takes one step of the plan.
    fn apply(&mut self, action: plan::Action) {
        match action {
            plan::Action::Remove(id) => self.remove(&id),
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
                    e.settings = want.settings;
                    self.publish(&id);
                }
            }
        }
    }

    /// Stops and forgets tunnel `id`.
    fn remove(&mut self, id: &TunnelId) {
        let Some(mut e) = self.entries.remove(id) else {
            return;
        };
        let t = self.targets.get_mut(&id.target).expect("a target's tunnel");
        e.stop(t, id.port);
        t.changes += 1;
        // One that was only listed (capped) was never news.
        if e.state != State::Capped && logs(t, &id.target) {
            e.span.in_scope(|| tracing::info!("tunnel removed"));
        }
        let kind = t.backend.get().kind();
        self.publish_removed(e.view(id, kind));
    }

    /// Makes a tunnel: binds its host listeners and starts carrying (or
    /// lists it, when capped). `previous_error` is the error of the failed
    /// attempt being retried: when it fails the same way again, nobody is
    /// told twice.
    fn start(&mut self, id: TunnelId, want: Want, previous_error: Option<Failure>) {
        self.generation += 1;
        let span = tracing::info_span!("tunnel", id = %id);
        let mut entry = Entry {
            origin: want.origin,
            state: State::Pending,
            notes: want.note.iter().cloned().collect(),
            host_port: 0,
            host_addresses: Vec::new(),
            process: want.process.clone(),
            listening: want.listening,
            opened_at: None,
            label: want.label.clone(),
            settings: want.settings,
            listening_since: want.listening_since,
            usable_after: None,
            stats: Arc::new(Stats::default()),
            cancel: None,
            prepared: false,
            generation: self.generation,
            published_failing: false,
            announced: false,
            span: span.clone(),
        };
        let _in = span.enter();
        if let Some(host) = want.published {
            entry.state = State::Published(host);
            entry.host_port = host;
            entry.notes = vec![Note::Published { host_port: host }];
        } else if want.capped {
            entry.state = State::Capped;
            entry.notes = vec![Note::Capped {
                max: self.opts.max_tunnels,
                target: id.target.clone(),
            }];
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
                    let repeated = previous_error.as_ref() == Some(&why);
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

    /// The flags that shape tunnels, as the plan takes them.
    pub(super) fn policy(&self) -> plan::Policy<'_> {
        plan::Policy {
            skip: &self.opts.skip,
            max_tunnels: self.opts.max_tunnels,
            allow_privileged: self.opts.allow_privileged,
            remap: self.opts.remap,
            rules: &self.opts.rules,
        }
    }

    /// A backend finished preparing tunnel `id`'s port.
    pub(super) fn prepared(
        &mut self,
        mut id: TunnelId,
        generation: u64,
        result: Result<(), Failure>,
    ) {
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
                e.active();
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

    pub(super) fn view(&self, id: &TunnelId) -> Option<TunnelView> {
        let kind = self.targets.get(&id.target)?.backend.get().kind();
        Some(self.entries.get(id)?.view(id, kind))
    }

    pub(super) fn all_events(&self) -> Vec<Arc<TunnelEvent>> {
        all_events(&self.entries, &self.targets)
    }

    /// Subscribers that fell behind get every tunnel again once they have room.
    pub(super) fn resync_subscribers(&mut self) {
        let (entries, targets) = (&self.entries, &self.targets);
        self.subscribers.resync(|| all_events(entries, targets));
    }

    /// Publishes the tunnels whose connections started failing, or got
    /// through again, since they were last published (the connections
    /// themselves never talk to the reconciler).
    pub(super) fn publish_health_changes(&mut self) {
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

    pub(super) fn publish(&mut self, id: &TunnelId) {
        let view = self.view(id);
        if let (Some(e), Some(view)) = (self.entries.get_mut(id), &view) {
            e.published_failing = e.stats.failing().is_some();
            // What its settings (a rule's, a dev container's) ask for when
            // it opens; a tunnel no rule shaped has its "tunnel active".
            let shaped = e.origin == Origin::Auto && e.settings.from.is_some();
            if shaped && e.state == State::Active && !e.announced {
                e.announced = true;
                let _in = e.span.enter();
                crate::announce::active(view, &mut self.opened);
            }
        }
        if let Some(tunnel) = view {
            self.broadcast(TunnelEvent {
                tunnel,
                removed: false,
            });
        }
    }

    pub(super) fn publish_removed(&mut self, mut tunnel: TunnelView) {
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
