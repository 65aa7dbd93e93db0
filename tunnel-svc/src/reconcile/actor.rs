//! The reconciler's task: it routes each command to the room that handles
//! it, and on every tick tries failed tunnels again and does the
//! housekeeping.

use super::handle::Command;
use super::targets::say_unlogged;
use super::{Reconciler, RETRY, SETTLE_MAX, SETTLE_QUIET};
use crate::model::State;
use crate::tunnel;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

impl Reconciler {
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) {
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
            Command::Ports { target, ports } => self.set_ports(target, ports),
            Command::Link { target, link } => self.set_link(target, link),
            Command::Targets(reply) => {
                let _ = reply.send(self.target_views());
            }
            Command::List { target, reply } => {
                let _ = reply.send(self.list(target));
            }
            Command::Close { id, reply } => {
                let _ = reply.send(self.close(id));
            }
            Command::Open {
                target,
                port,
                host_port,
                reply,
            } => {
                let _ = reply.send(self.open(target, port, host_port));
            }
            Command::Probe { id, reply } => {
                let _ = reply.send(self.probe(id));
            }
            Command::Watch(reply) => {
                let _ = reply.send(self.subscribers.subscribe(self.all_events()));
            }
            Command::SetPolicy(update) => {
                self.opts.skip = update.skip;
                self.opts.max_tunnels = update.max_tunnels;
                self.opts.rules = update.rules;
                tracing::info!(rules = self.opts.rules.len(), "configuration reloaded");
                self.reconcile(false);
            }
            Command::AddTarget(spec) => self.add_target(spec),
            Command::RemoveTarget(name) => self.remove_target_named(name),
            Command::RenameTarget { from, to, url } => self.rename_target(from, to, url),
            Command::SetBackend {
                target,
                backend,
                url,
                monitor_port,
            } => self.set_backend(target, backend, url, monitor_port),
            Command::Prepared {
                id,
                generation,
                result,
            } => self.prepared(id, generation, result),
        }
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
    pub(super) fn settling(&mut self) -> bool {
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
            porthole::memory::release_free_memory();
        }
    }
}
