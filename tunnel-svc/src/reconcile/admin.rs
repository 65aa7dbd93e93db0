//! What the admin API asks of the reconciler, checked: list, close, open
//! by hand, probe.

use super::handle::{Probing, PROBE_TIMEOUT};
use super::{AdminError, Reconciler};
use crate::model::{PortKey, Proto, State, TunnelId, TunnelView};
use crate::plan::{self, PRIVILEGED};
use crate::sockets::Sockets;
use tokio::sync::oneshot;

impl Reconciler {
    /// Every tunnel, or those of one target.
    pub(super) fn list(&self, target: Option<String>) -> Vec<TunnelView> {
        self.entries
            .keys()
            .filter(|id| target.as_ref().is_none_or(|t| *t == id.target))
            .filter_map(|id| self.view(id))
            .collect()
    }

    /// Starts a dial to the container port of tunnel `id` through its
    /// backend (only an ACTIVE tunnel carries connections).
    pub(super) fn probe(&self, id: TunnelId) -> Result<Probing, AdminError> {
        let not_found = || AdminError::NotFound(id.to_string());
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
        let (ports, policy) = (t.plan_view(&id.target), self.policy());
        let rule = plan::rule_for(&ports, &policy, id.key(), listeners);
        let why = plan::excluded(&ports, &policy, id.key(), rule)?;
        Some(AdminError::Precondition(format!(
            "{id} is open in the container but not forwarded: {why}"
        )))
    }

    pub(super) fn close(&mut self, id: TunnelId) -> Result<TunnelView, AdminError> {
        let not_found = || AdminError::NotFound(id.to_string());
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

    pub(super) fn open(
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
}
