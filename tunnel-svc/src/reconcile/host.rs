//! A tunnel's host side: binding its listeners on the host port it wants
//! (or the next free one), starting to carry, and looking at which host
//! ports the host's own processes hold.

use super::targets::PortOp;
use super::tunnels::Entry;
use super::Reconciler;
use crate::model::{Failure, Holder, Note, Origin, Proto, TunnelId};
use crate::plan::{Want, PRIVILEGED};
use crate::sockets::Sockets;
use crate::tunnel;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

impl Reconciler {
    /// Binds the host listeners of a tunnel, starts its accept loops and
    /// asks the backend to prepare the port; or says why it cannot.
    pub(super) fn listen(
        &mut self,
        id: &TunnelId,
        want: &Want,
        entry: &mut Entry,
    ) -> Result<(), Failure> {
        if let Some(why) = self.cannot_carry(id, want) {
            return Err(why);
        }
        let (host_port, sockets, host_was) = self.bind_host(id, want)?;
        entry.opened_at = Some(chrono::Utc::now());
        entry.host_port = host_port;
        if want.origin == Origin::Auto && !want.exact {
            self.host_ports.record(id, host_port);
        }
        entry.host_addresses = sockets.local_addrs();
        note_moves(id, want, entry, host_was);
        self.carry(id, entry, sockets);
        Ok(())
    }

    /// Why tunnel `id` cannot be made whatever the host port: its backend
    /// cannot carry it, or another tunnel holds the port it must have.
    fn cannot_carry(&self, id: &TunnelId, want: &Want) -> Option<Failure> {
        let backend = self.targets[&id.target].backend.get();
        if let Some(why) = backend.no_udp().filter(|_| id.proto == Proto::Udp) {
            return Some(Failure::Backend(why.to_string()));
        }
        if let Some(why) = backend.unreachable(&want.addresses) {
            return Some(Failure::Backend(why));
        }
        let holder = want.held_by.as_ref()?;
        Some(Failure::HeldBy {
            host_port: want.host_port,
            holder: holder.clone(),
            exact: want.exact,
        })
    }

    /// The host sockets of tunnel `id`: on the port it wants, or (when it
    /// may move) the next free one no host process held lately; and how
    /// long ago a host process held the port it wanted, if one did.
    fn bind_host(
        &self,
        id: &TunnelId,
        want: &Want,
    ) -> Result<(u16, Sockets, Option<Duration>), Failure> {
        let remap = self.opts.remap && !want.exact;
        // An admin's OpenTunnel may take a port a host process just left;
        // nothing a container says may.
        let now = std::time::Instant::now();
        let automatic = matches!(want.origin, Origin::Auto);
        let held = &self.host_held;
        let kept = |port| automatic && held.recently(id.proto, port, now).is_some();
        let host_was = match held.recently(id.proto, want.host_port, now) {
            Some(crate::hostheld::Held::Ago(ago)) if automatic => Some(ago),
            _ => None,
        };
        if let Some(ago) = host_was.filter(|_| !remap) {
            return Err(kept_for_host(want, ago));
        }
        let (port, sockets) =
            Sockets::allocate(id.proto, &self.opts.bind, want.host_port, remap, kept)
                .map_err(|e| bind_failure(want, e))?;
        Ok((port, sockets, host_was))
    }

    /// Starts carrying tunnel `id` from its host `sockets`, and asks the
    /// backend to prepare the port where it must (the tunnel is ACTIVE
    /// when it is done).
    fn carry(&self, id: &TunnelId, entry: &mut Entry, sockets: Sockets) {
        let t = &self.targets[&id.target];
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
            None => entry.active(),
        }
    }

    /// Notes which host ports processes other than this tunnel-svc's
    /// tunnels listen on (see `hostheld`).
    pub(super) fn scan_host(&mut self) {
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
}

/// Says why tunnel `id` is not on the host port it wanted, when it is
/// not (a note for `ls`, a line for the log).
fn note_moves(id: &TunnelId, want: &Want, entry: &mut Entry, host_was: Option<Duration>) {
    let moved = |n: &&Note| {
        matches!(
            n,
            Note::Moved {
                by: Holder::Tunnel(_),
                ..
            }
        )
    };
    if let Some(note) = want.note.as_ref().filter(moved) {
        tracing::warn!(%note, "host port held by another tunnel; moved");
    }
    let host_port = entry.host_port;
    if host_port != want.host_port {
        tracing::warn!(
            wanted = want.host_port,
            host_port,
            "host port busy; remapped"
        );
        entry.notes.push(Note::Busy {
            wanted: want.host_port,
            to: host_port,
            host_process_ago: host_was,
        });
    }
    if id.port < PRIVILEGED && host_port != id.port {
        tracing::warn!(
            host_port,
            "privileged container port forwarded on an unprivileged host port"
        );
    }
}

/// Why an exact host port is not taken: a host process held it lately.
fn kept_for_host(want: &Want, ago: Duration) -> Failure {
    Failure::KeptForHost {
        host_port: want.host_port,
        pinned_by: want.pinned_by,
        ago,
        left: crate::hostheld::QUIET.saturating_sub(ago),
    }
}

/// Why a tunnel cannot listen on its host port.
fn bind_failure(want: &Want, e: std::io::Error) -> Failure {
    if e.kind() != std::io::ErrorKind::AddrInUse {
        return Failure::CannotListen {
            host_port: want.host_port,
            error: e.to_string(),
        };
    }
    Failure::Busy {
        host_port: want.host_port,
        origin: want.origin,
        exact: want.exact,
        pinned_by: want.pinned_by,
    }
}
