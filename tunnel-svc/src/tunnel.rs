//! The host side of one tunnel: listeners on the host addresses, an accept
//! loop per address, and one task per connection handed to the backend.

use crate::backend::Backend;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

/// Live counters of one tunnel.
#[derive(Debug, Default)]
pub struct Stats {
    pub active: AtomicU64,
    pub total: AtomicU64,
    /// Host client → container.
    pub bytes_in: AtomicU64,
    /// Container → host client.
    pub bytes_out: AtomicU64,
}

/// Binds `port` on every address, or none: a port counts as free only if
/// all of them are. Addresses the host does not have (no IPv6) are left out.
pub fn bind_all(addrs: &[IpAddr], port: u16) -> io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for ip in addrs {
        match bind_one(SocketAddr::new(*ip, port)) {
            Ok(l) => listeners.push(l),
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {
                tracing::debug!(%ip, "address not available on this host; skipped");
            }
            Err(e) => return Err(e),
        }
    }
    if listeners.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "none of the bind addresses exists on this host",
        ));
    }
    Ok(listeners)
}

fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Lets a tunnel come back on its port while old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Finds host listeners for a tunnel: `wanted` itself, or with `next` the
/// first free port after it (up to 1000 tries).
pub fn allocate(addrs: &[IpAddr], wanted: u16, next: bool) -> io::Result<(u16, Vec<TcpListener>)> {
    let first_err = match bind_all(addrs, wanted) {
        Ok(ls) => return Ok((wanted, ls)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && next => e,
        Err(e) => return Err(e),
    };
    for port in (u32::from(wanted) + 1..=65535).take(1000) {
        match bind_all(addrs, port as u16) {
            Ok(ls) => return Ok((port as u16, ls)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    Err(first_err)
}

/// Accepts connections on `listeners` until `cancel`, carrying each one to
/// `container_port` through `backend`. Cancelling also ends the
/// connections in flight; the listeners are closed when this returns.
pub fn serve(
    listeners: Vec<TcpListener>,
    backend: Arc<Backend>,
    container_port: u16,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) {
    for listener in listeners {
        let (backend, stats, cancel) = (backend.clone(), stats.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                let (conn, peer) = tokio::select! {
                    _ = cancel.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            continue;
                        }
                    },
                };
                let _ = conn.set_nodelay(true);
                stats.active.fetch_add(1, Relaxed);
                stats.total.fetch_add(1, Relaxed);
                let (backend, stats, cancel) = (backend.clone(), stats.clone(), cancel.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        result = backend.carry(conn, container_port, &stats) => {
                            if let Err(e) = result {
                                tracing::info!(%peer, port = container_port, error = %e, "connection ended with an error");
                            }
                        }
                    }
                    stats.active.fetch_sub(1, Relaxed);
                });
            }
        });
    }
}
