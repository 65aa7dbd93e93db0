//! A tunnel's host side: binding its TCP listeners or UDP sockets on every
//! bind address, on the port it wants or the next free one.

use crate::model::Proto;
use std::io;
use std::net::{IpAddr, SocketAddr};
use tokio::net::{TcpListener, TcpSocket, UdpSocket};

/// A tunnel's host side: TCP listeners or UDP sockets.
pub enum Sockets {
    Tcp(Vec<TcpListener>),
    Udp(Vec<UdpSocket>),
}

impl Sockets {
    /// Binds `port` for `proto` on every address (see [`bind_all`]).
    pub fn bind(proto: Proto, addrs: &[IpAddr], port: u16) -> io::Result<Sockets> {
        match proto {
            Proto::Tcp => bind_all(addrs, port, bind_tcp).map(Sockets::Tcp),
            Proto::Udp => bind_all(addrs, port, bind_udp).map(Sockets::Udp),
        }
    }

    /// The sockets of `proto` on `wanted` or, with `next`, the next free
    /// port (see [`allocate`]), and the port they got.
    pub fn allocate(
        proto: Proto,
        addrs: &[IpAddr],
        wanted: u16,
        next: bool,
        kept: impl Fn(u16) -> bool,
    ) -> io::Result<(u16, Sockets)> {
        match proto {
            Proto::Tcp => allocate(addrs, wanted, next, kept, bind_tcp)
                .map(|(port, ls)| (port, Sockets::Tcp(ls))),
            Proto::Udp => allocate(addrs, wanted, next, kept, bind_udp)
                .map(|(port, ss)| (port, Sockets::Udp(ss))),
        }
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        match self {
            Sockets::Tcp(ls) => ls.iter().filter_map(|l| l.local_addr().ok()).collect(),
            Sockets::Udp(ss) => ss.iter().filter_map(|s| s.local_addr().ok()).collect(),
        }
    }
}

/// Binds `port` on every address with `bind` (a TCP listener or a UDP
/// socket), or none: a port counts as free only if all of them are.
/// Addresses the host does not have (no IPv6) are left out.
pub fn bind_all<L>(
    addrs: &[IpAddr],
    port: u16,
    bind: impl Fn(SocketAddr) -> io::Result<L>,
) -> io::Result<Vec<L>> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for ip in addrs {
        match bind(SocketAddr::new(*ip, port)) {
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

/// A TCP listener on `addr`.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
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

/// Finds host listeners (or UDP sockets) for a tunnel: `wanted` itself, or
/// with `next` the first free port after it (up to 1000 tries). A port
/// `kept` for someone else counts as busy.
pub fn allocate<L>(
    addrs: &[IpAddr],
    wanted: u16,
    next: bool,
    kept: impl Fn(u16) -> bool,
    bind: impl Fn(SocketAddr) -> io::Result<L> + Copy,
) -> io::Result<(u16, Vec<L>)> {
    let first_err = if kept(wanted) {
        io::Error::from(io::ErrorKind::AddrInUse)
    } else {
        match bind_all(addrs, wanted, bind) {
            Ok(ls) => return Ok((wanted, ls)),
            Err(e) => e,
        }
    };
    if first_err.kind() != io::ErrorKind::AddrInUse || !next {
        return Err(first_err);
    }
    for port in (u32::from(wanted) + 1..=65535).take(1000) {
        if kept(port as u16) {
            continue;
        }
        match bind_all(addrs, port as u16, bind) {
            Ok(ls) => return Ok((port as u16, ls)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    Err(first_err)
}

pub use porthole::net::bind_udp;
