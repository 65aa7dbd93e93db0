//! The host side of one tunnel: listeners on the host addresses, an accept
//! loop per address, and one task per connection handed to the backend.

use crate::backend::{Backend, CarryError};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
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
    /// Why the latest connection failed, until one gets through again:
    /// an ACTIVE tunnel whose far end is unreachable says so.
    pub last_error: Mutex<Option<String>>,
}

impl Stats {
    /// A connection failed; ListTunnels shows why.
    pub fn set_error(&self, why: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// A backend reached the far end: the last failure no longer holds.
    pub fn connected(&self) {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
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
/// `container_port` of `target` through `backend`. Cancelling also ends the
/// connections in flight; the listeners are closed when this returns.
pub fn serve(
    listeners: Vec<TcpListener>,
    backend: Arc<Backend>,
    target: &str,
    container_port: u16,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) {
    let target: Arc<str> = target.into();
    for listener in listeners {
        let (backend, stats, cancel) = (backend.clone(), stats.clone(), cancel.clone());
        let target = target.clone();
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
                let target = target.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        result = backend.carry(conn, container_port, &stats) => {
                            match result {
                                Ok(()) => {}
                                Err(CarryError::Dial(why)) => {
                                    tracing::warn!(target = %target, %peer, port = container_port, error = %why, "connection failed");
                                    stats.set_error(format!("last connection failed: {why}"));
                                }
                                Err(e) => {
                                    tracing::debug!(target = %target, %peer, port = container_port, error = %e, "connection ended badly");
                                }
                            }
                        }
                    }
                    stats.active.fetch_sub(1, Relaxed);
                });
            }
        });
    }
}
