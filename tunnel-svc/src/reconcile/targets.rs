//! Targets coming and going: added (a container started), removed,
//! renamed, reached another way; their monitor links and reported ports.

use super::handle::Command;
use super::{Link, Reconciler, LOG_BURST, LOG_PER_SEC};
use crate::backend::{Backend, BackendCell};
use crate::model::{Failure, Listener, PortKey, TargetView, TunnelId};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;

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
    /// Its dev-container settings, matched after `--config`'s rules.
    pub dev: Option<Arc<crate::devcontainer::Settings>>,
    /// Its compose project and service (a container's compose labels):
    /// its siblings' `"SERVICE:PORT"` settings are about its ports.
    pub compose: Option<crate::devcontainer::Compose>,
}

pub(super) struct Target {
    /// What its tunnels dial with, swappable under them.
    pub(super) backend: Arc<BackendCell>,
    /// Prepare/release requests, run in order (backends that need them).
    pub(super) port_ops: Option<mpsc::UnboundedSender<PortOp>>,
    pub(super) monitor_port: u16,
    pub(super) published: BTreeMap<PortKey, u16>,
    pub(super) rules: Vec<crate::rules::Rule>,
    pub(super) dev_settings: Option<Arc<crate::devcontainer::Settings>>,
    pub(super) compose: Option<crate::devcontainer::Compose>,
    /// The rules `dev_settings` and its siblings' make (see
    /// [`Reconciler::resolve_dev`]).
    pub(super) dev: crate::devcontainer::DevRules,
    pub(super) ports: BTreeMap<PortKey, Vec<Listener>>,
    pub(super) up: bool,
    pub(super) capped: bool,
    pub(super) url: String,
    pub(super) instance_id: String,
    /// Why the monitor is unreachable, while it is.
    pub(super) error: Option<String>,
    /// When `up` last changed.
    pub(super) since: chrono::DateTime<chrono::Utc>,
    /// Its tunnels' open/removed lines: a container that opens and closes
    /// ports in a loop gets a few lines a second, and a count.
    pub(super) log: porthole::telemetry::Budget,
    /// Tunnels opened and removed since it was added.
    pub(super) changes: u64,
    /// Its monitor has said which ports are open (at least once).
    pub(super) reported: bool,
}

impl Target {
    /// A target as `spec` says; its prepare/release task reports to `results`.
    pub(super) fn new(spec: TargetSpec, results: &mpsc::Sender<Command>) -> Target {
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
            dev_settings: spec.dev,
            compose: spec.compose,
            dev: Default::default(),
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

    /// Its ports as the plan takes them.
    pub(super) fn plan_view<'a>(&'a self, name: &'a str) -> crate::plan::TargetPorts<'a> {
        crate::plan::TargetPorts {
            name,
            monitor_port: self.monitor_port,
            published: &self.published,
            ports: &self.ports,
            rules: &self.rules,
            dev: &self.dev,
        }
    }
}

pub(super) enum PortOp {
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
                let result = backend
                    .prepare(id.port)
                    .await
                    .map_err(|e| Failure::Backend(e.to_string()));
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

impl Reconciler {
    /// Every port now open in `target`, as its watcher reports them.
    pub(super) fn set_ports(&mut self, target: String, ports: BTreeMap<PortKey, Vec<Listener>>) {
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

    /// `target`'s monitor stream came up or went down.
    pub(super) fn set_link(&mut self, target: String, link: Link) {
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

    pub(super) fn target_views(&self) -> Vec<TargetView> {
        self.targets
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
            .collect()
    }

    /// Adds a target, replacing one of the same name.
    pub(super) fn add_target(&mut self, spec: TargetSpec) {
        // The name is this target's now, not an alias of another's.
        self.renamed.remove(&spec.name);
        if self.remove_target(&spec.name) {
            tracing::warn!(target = %spec.name, "a target of this name is replaced");
        }
        tracing::info!(target = %spec.name, url = %spec.url, "target added");
        let name = spec.name.clone();
        let target = Target::new(spec, &self.commands);
        self.targets.insert(name.clone(), target);
        let group = self.dev_group(&name);
        self.resolve_dev(&group, Some(&name));
        self.last_added = Some(std::time::Instant::now());
        self.reconcile(false);
    }

    /// Target `name` and the other targets of its compose project: those
    /// whose dev-container rules its settings shape (a sibling's
    /// `"SERVICE:PORT"` settings are about the service's ports).
    fn dev_group(&self, name: &str) -> Vec<String> {
        let project = |t: &Target| t.compose.as_ref().map(|c| c.project.clone());
        let own = self.targets.get(name).and_then(project);
        self.targets
            .iter()
            .filter(|(n, t)| *n == name || (own.is_some() && project(t) == own))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Works out the dev-container rules of each of `members`: its own
    /// settings, then what its compose siblings' say about its service's
    /// ports. What does not parse in `new`'s settings (a target just
    /// added) is logged.
    pub(super) fn resolve_dev(&mut self, members: &[String], new: Option<&str>) {
        for member in members {
            let Some(t) = self.targets.get(member) else {
                continue;
            };
            let project = t.compose.as_ref().map(|c| &c.project);
            let siblings = self
                .targets
                .iter()
                .filter(|(n, s)| {
                    *n != member
                        && project.is_some()
                        && s.compose.as_ref().map(|c| &c.project) == project
                })
                .filter_map(|(_, s)| s.dev_settings.as_deref());
            let (dev, wrong) = crate::devcontainer::resolve(
                t.dev_settings.as_deref(),
                t.compose.as_ref(),
                siblings,
            );
            if new == Some(member.as_str()) {
                for why in wrong {
                    tracing::warn!(target = %member, error = %why, "dev container setting ignored");
                }
            }
            self.targets.get_mut(member).expect("listed").dev = dev;
        }
    }

    /// Removes target `name` (as it was called when the command was sent).
    pub(super) fn remove_target_named(&mut self, name: String) {
        let name = self.current_name(name);
        let group = self.dev_group(&name);
        if self.remove_target(&name) {
            tracing::info!(target = %name, "target removed");
        }
        // Its compose siblings lose what its settings said about them.
        let siblings: Vec<String> = group.into_iter().filter(|n| *n != name).collect();
        if !siblings.is_empty() {
            self.resolve_dev(&siblings, None);
            self.reconcile(false);
        }
        self.renamed.retain(|_, to| *to != name);
    }

    /// `target` is reached with `backend` now.
    pub(super) fn set_backend(
        &mut self,
        target: String,
        backend: Arc<Backend>,
        url: String,
        monitor_port: u16,
    ) {
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

    /// What target `name` is called now.
    pub(super) fn current_name(&self, mut name: String) -> String {
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
    pub(super) fn rename_target(&mut self, from: String, to: String, url: String) {
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
}

/// Whether a line about `t`'s tunnels fits its log budget; says first how
/// many did not fit before it.
pub(super) fn logs(t: &mut Target, name: &str) -> bool {
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
pub(super) fn say_unlogged(name: &str, n: u64) {
    tracing::info!(target = %name, unlogged = n, "tunnel changes not logged (ports opening and closing fast); /metrics counts them");
}
