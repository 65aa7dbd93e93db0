//! A tunnel's host side: binding its listeners on the host port it wants
//! (or the next free one), starting to carry, and looking at which host
//! ports the host's own processes hold.

use super::targets::PortOp;
use super::tunnels::Entry;
use super::Reconciler;
use crate::model::{Origin, Proto, State, TunnelId};
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
    ) -> Result<(), String> {
        let t = &self.targets[&id.target];
        let backend = t.backend.get();
        if let Some(why) = backend.no_udp().filter(|_| id.proto == Proto::Udp) {
            return Err(why.to_string());
        }
        if let Some(why) = backend.unreachable(&want.addresses) {
            return Err(why);
        }
        if let Some(holder) = &want.held_by {
            return Err(format!(
                "host port {} is held by {holder}{}",
                want.host_port,
                if want.exact {
                    ""
                } else {
                    " (--on-conflict=fail)"
                }
            ));
        }
        let remap = self.opts.remap && !want.exact;
        let (bind, wanted) = (&self.opts.bind, want.host_port);
        // An admin's OpenTunnel may take a port a host process just left;
        // nothing a container says may.
        let now = std::time::Instant::now();
        let automatic = matches!(want.origin, Origin::Auto);
        let held = &self.host_held;
        let kept = |port| automatic && held.recently(id.proto, port, now).is_some();
        let host_was = match held.recently(id.proto, wanted, now) {
            Some(crate::hostheld::Held::Ago(ago)) if automatic => Some(ago),
            _ => None,
        };
        if let Some(ago) = host_was.filter(|_| !remap) {
            return Err(kept_for_host(want, ago));
        }
        let (host_port, sockets) = Sockets::allocate(id.proto, bind, wanted, remap, kept)
            .map_err(|e| bind_failure(want, e))?;
        entry.opened_at = Some(chrono::Utc::now());
        entry.host_port = host_port;
        if want.origin == Origin::Auto && !want.exact {
            self.host_ports.record(id, host_port);
        }
        entry.host_addresses = sockets.local_addrs();
        if let Some(note) = want.note.as_ref().filter(|n| n.contains(" is held by ")) {
            tracing::warn!(%note, "host port held by another tunnel; moved");
        }
        if host_port != want.host_port {
            tracing::warn!(
                wanted = want.host_port,
                host_port,
                "host port busy; remapped"
            );
            let busy = match host_was {
                Some(ago) => format!(
                    "host port {} was held by a host process {}s ago and is kept for it; \
                     forwarded on {host_port} instead",
                    want.host_port,
                    ago.as_secs()
                ),
                None => format!(
                    "host port {} is busy; forwarded on {host_port} instead",
                    want.host_port
                ),
            };
            entry.note = Some(match entry.note.take() {
                Some(n) => format!("{n}; {busy}"),
                None => busy,
            });
        }
        if id.port < PRIVILEGED && host_port != id.port {
            tracing::warn!(
                host_port,
                "privileged container port forwarded on an unprivileged host port"
            );
        }
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
            None => entry.state = State::Active,
        }
        Ok(())
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

/// Why an exact host port is not taken: a host process held it lately.
fn kept_for_host(want: &Want, ago: Duration) -> String {
    let left = crate::hostheld::QUIET.saturating_sub(ago).as_secs();
    let pinned = match &want.pinned_by {
        Some(rule) => format!(" (pinned by {rule})"),
        None => String::new(),
    };
    format!(
        "host port {}{pinned} was held by a host process {}s ago; it is kept for that \
         process for {left}s more (a restarting service gets its port back)",
        want.host_port,
        ago.as_secs()
    )
}

fn bind_failure(want: &Want, e: std::io::Error) -> String {
    if e.kind() != std::io::ErrorKind::AddrInUse {
        return format!("cannot listen on host port {}: {e}", want.host_port);
    }
    match want.origin {
        Origin::Egress => format!(
            "port {} is busy: the gate must listen on the upstream's own port (a port in a git \
             URL overrides the ssh config's), so it waits for it",
            want.host_port
        ),
        Origin::Manual if want.exact => format!(
            "host port {} is busy (asked for by OpenTunnel)",
            want.host_port
        ),
        _ if want.exact => match want.pinned_by {
            Some(rule) => format!("host port {} is busy (pinned by {rule})", want.host_port),
            None => format!("host port {} is busy", want.host_port),
        },
        _ => format!("host port {} is busy (--on-conflict=fail)", want.host_port),
    }
}
