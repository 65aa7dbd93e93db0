//! Listening-port detection: TCP sockets in LISTEN and bound, unconnected UDP
//! sockets, IPv4 and IPv6, in the calling process's network namespace.
//!
//! Two sources give the same answer. Netlink `sock_diag` ([`netlink`], what
//! `ss` uses) is exact and cheap: the kernel filters by state and says per
//! socket whether an IPv6 wildcard also takes IPv4. The `/proc/net` tables
//! ([`procfs`]) work where netlink is refused (some sandboxes), at the cost of
//! reading every socket's line and guessing dual-stack from a sysctl.
//!
//! [`Scanner::scan`] is called every ~100 ms, so both sources reuse their
//! buffers across scans.

mod netlink;
mod procfs;

use std::{fmt, io, net::IpAddr, path::PathBuf};

/// TCP or UDP: the workspace's one transport enum.
pub use porthole::net::Proto as Protocol;

/// One listening socket: a TCP socket in LISTEN state, or a bound, unconnected
/// UDP socket (port != 0).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Socket {
    pub protocol: Protocol,
    /// As the kernel reports it (IPv4-mapped IPv6 kept as IPv6).
    pub addr: IpAddr,
    pub port: u16,
    /// IPv6 wildcard (`::`) socket that also accepts IPv4 (`IPV6_V6ONLY` off).
    /// `false` for everything else.
    pub dual_stack: bool,
    /// Socket inode, for process lookup; 0 if unknown.
    pub inode: u64,
}

/// Where [`Scanner`] reads sockets from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Netlink,
    Procfs,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Netlink => "netlink",
            Source::Procfs => "procfs",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// No netlink `sock_diag` socket could be opened (EPERM,
    /// EPROTONOSUPPORT, ...).
    #[error("opening a netlink sock_diag socket: {source}")]
    NetlinkOpen { source: io::Error },
    /// Sending a dump request, receiving its reply, or the kernel answered
    /// the request with an error.
    #[error("netlink sock_diag {dump} dump: {op}: {source}")]
    Netlink {
        /// `tcp4`, `tcp6`, `udp4` or `udp6`.
        dump: &'static str,
        op: &'static str,
        source: io::Error,
    },
    /// A reply did not have the layout of `nlmsghdr` + `inet_diag_msg`.
    #[error("netlink sock_diag {dump} dump: malformed reply: {reason}")]
    NetlinkMalformed {
        dump: &'static str,
        reason: &'static str,
    },
    /// A `/proc/net` table exists but could not be read.
    #[error("reading {}: {source}", path.display())]
    Procfs { path: PathBuf, source: io::Error },
    /// A line of a `/proc/net` table did not have the kernel's layout.
    #[error("{}, line {line}: {reason}", path.display())]
    ProcfsMalformed {
        path: PathBuf,
        /// 1-based, counting the header.
        line: usize,
        reason: &'static str,
    },
}

impl ScanError {
    /// Which source failed.
    pub fn source_kind(&self) -> Source {
        match self {
            ScanError::NetlinkOpen { .. }
            | ScanError::Netlink { .. }
            | ScanError::NetlinkMalformed { .. } => Source::Netlink,
            ScanError::Procfs { .. } | ScanError::ProcfsMalformed { .. } => Source::Procfs,
        }
    }
}

/// Lists listening sockets; see the module docs.
pub struct Scanner {
    backend: Backend,
    /// Sockets found last time, to size the next result in one allocation.
    last_len: usize,
}

enum Backend {
    Netlink(netlink::Netlink),
    Procfs(procfs::Procfs),
}

impl Scanner {
    /// Probe netlink `sock_diag` with one full scan; if that does not work
    /// (EPERM, EPROTONOSUPPORT, no UDP diag module, ...), fall back to
    /// `/proc/net`.
    pub fn auto() -> Scanner {
        let probed = Scanner::with_source(Source::Netlink).and_then(|mut scanner| {
            scanner.scan()?;
            Ok(scanner)
        });
        let scanner = match probed {
            Ok(scanner) => scanner,
            Err(error) => {
                tracing::warn!(%error, "netlink sock_diag unusable, falling back to /proc/net");
                Scanner::procfs()
            }
        };
        tracing::info!(source = %scanner.source(), "port detection");
        scanner
    }

    /// Force a source (for `--source netlink|procfs`). Errors only if the
    /// netlink socket cannot be opened; `/proc/net` tables are opened per
    /// scan.
    pub fn with_source(src: Source) -> Result<Scanner, ScanError> {
        let backend = match src {
            Source::Netlink => Backend::Netlink(netlink::Netlink::open(bindv6only())?),
            Source::Procfs => return Ok(Scanner::procfs()),
        };
        Ok(Scanner {
            backend,
            last_len: 0,
        })
    }

    fn procfs() -> Scanner {
        Scanner {
            backend: Backend::Procfs(procfs::Procfs::new("/proc/net".as_ref(), bindv6only())),
            last_len: 0,
        }
    }

    pub fn source(&self) -> Source {
        match self.backend {
            Backend::Netlink(_) => Source::Netlink,
            Backend::Procfs(_) => Source::Procfs,
        }
    }

    /// Every listening socket, TCP and UDP, IPv4 and IPv6, in the calling
    /// process's network namespace. In no particular order.
    ///
    /// An error fails the whole scan (no partial lists, which would read as
    /// ports closing); the next call starts afresh on the same source.
    pub fn scan(&mut self) -> Result<Vec<Socket>, ScanError> {
        let mut out = Vec::with_capacity(self.last_len + self.last_len / 8 + 4);
        match &mut self.backend {
            Backend::Netlink(netlink) => netlink.scan(&mut out)?,
            Backend::Procfs(procfs) => procfs.scan(&mut out)?,
        }
        self.last_len = out.len();
        Ok(out)
    }
}

/// `net.ipv6.bindv6only` of this network namespace: whether IPv6 sockets are
/// IPv6-only unless they say otherwise. Missing (IPv6 disabled) or unreadable
/// reads as the kernel default, off.
fn bindv6only() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only")
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        collections::HashSet,
        net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
        time::{Duration, Instant},
    };

    /// An IPv6 TCP listener with IPV6_V6ONLY set as asked (std leaves it to
    /// the sysctl). `None` where IPv6 is unavailable.
    fn v6_listener(addr: &str, only_v6: bool) -> Option<TcpListener> {
        use socket2::{Domain, Type};
        let addr: SocketAddr = addr.parse().unwrap();
        let sock = socket2::Socket::new(Domain::IPV6, Type::STREAM, None).ok()?;
        sock.set_only_v6(only_v6).ok()?;
        sock.bind(&addr.into()).ok()?;
        sock.listen(16).ok()?;
        Some(sock.into())
    }

    fn find(sockets: &[Socket], protocol: Protocol, local: SocketAddr) -> Vec<&Socket> {
        sockets
            .iter()
            .filter(|s| s.protocol == protocol && s.addr == local.ip() && s.port == local.port())
            .collect()
    }

    /// Scans until none of `inodes` is listed, or panics after a deadline
    /// (a child forked by a parallel test may briefly hold our fds).
    fn wait_gone(scanner: &mut Scanner, inodes: &HashSet<u64>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left: Vec<_> = scanner
                .scan()
                .unwrap()
                .into_iter()
                .filter(|s| inodes.contains(&s.inode))
                .collect();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "still listed after close: {left:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// An IPv6-only `::` listener and an IPv4 listener on the same port.
    /// Other tests' IPv4 sockets may hold the port the kernel picked for the
    /// IPv6 one, so try a few.
    fn v6only_with_ipv4_beside() -> (Option<TcpListener>, Option<TcpListener>) {
        for _ in 0..50 {
            let Some(v6) = v6_listener("[::]:0", true) else {
                return (None, None);
            };
            let port = v6.local_addr().unwrap().port();
            if let Ok(v4) = TcpListener::bind(("0.0.0.0", port)) {
                return (Some(v6), Some(v4));
            }
        }
        panic!("no port was free on both IPv4 and IPv6 in 50 tries");
    }

    fn live(source: Source) {
        let mut scanner = Scanner::with_source(source).unwrap();
        assert_eq!(scanner.source(), source);

        let tcp4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Neither a connected UDP socket nor either end of a TCP connection
        // is listening.
        let udp_connected = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp_connected.connect(udp4.local_addr().unwrap()).unwrap();
        let client = TcpStream::connect(tcp4.local_addr().unwrap()).unwrap();
        let (accepted, _) = tcp4.accept().unwrap();

        let tcp6 = TcpListener::bind("[::1]:0").ok();
        let udp6 = UdpSocket::bind("[::1]:0").ok();
        let dual = v6_listener("[::]:0", false);
        // An IPv4 listener on the IPv6-only socket's port: possible only
        // because it is IPv6-only, and what lets procfs tell.
        let (v6only, beside) = v6only_with_ipv4_beside();
        let mapped = v6_listener("[::ffff:127.0.0.1]:0", false);

        let sockets = scanner.scan().unwrap();
        let mut inodes = HashSet::new();
        let mut expect = |protocol, local: SocketAddr, dual_stack: bool| {
            let found = find(&sockets, protocol, local);
            assert_eq!(
                found.len(),
                1,
                "{source}: {protocol} {local} in {sockets:#?}"
            );
            assert_eq!(found[0].dual_stack, dual_stack, "{source}: {found:?}");
            assert_ne!(found[0].inode, 0);
            inodes.insert(found[0].inode);
        };
        expect(Protocol::Tcp, tcp4.local_addr().unwrap(), false);
        expect(Protocol::Udp, udp4.local_addr().unwrap(), false);
        if let Some(l) = &tcp6 {
            expect(Protocol::Tcp, l.local_addr().unwrap(), false);
        }
        if let Some(s) = &udp6 {
            expect(Protocol::Udp, s.local_addr().unwrap(), false);
        }
        if let Some(l) = &dual {
            // procfs can only go by the sysctl here; netlink knows.
            let dual_stack = source == Source::Netlink || !bindv6only();
            expect(Protocol::Tcp, l.local_addr().unwrap(), dual_stack);
        }
        if let (Some(l), Some(b)) = (&v6only, &beside) {
            expect(Protocol::Tcp, l.local_addr().unwrap(), false);
            expect(Protocol::Tcp, b.local_addr().unwrap(), false);
        }
        if let Some(l) = &mapped {
            let local = l.local_addr().unwrap();
            assert!(local.is_ipv6());
            expect(Protocol::Tcp, local, false);
        }
        assert!(find(&sockets, Protocol::Udp, udp_connected.local_addr().unwrap()).is_empty());
        assert!(find(&sockets, Protocol::Tcp, client.local_addr().unwrap()).is_empty());
        assert!(
            !sockets.iter().any(|s| s.port == 0),
            "unbound sockets are not listening"
        );

        drop((tcp4, udp4, udp_connected, client, accepted));
        drop((tcp6, udp6, dual, v6only, beside, mapped));
        wait_gone(&mut scanner, &inodes);
    }

    #[test]
    fn netlink_sees_listeners_come_and_go() {
        live(Source::Netlink);
    }

    #[test]
    fn procfs_sees_listeners_come_and_go() {
        live(Source::Procfs);
    }

    #[test]
    fn both_sources_agree() {
        let _listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut netlink = Scanner::with_source(Source::Netlink).unwrap();
        let mut procfs = Scanner::with_source(Source::Procfs).unwrap();
        // Parallel tests open and close sockets, so compare until a pair of
        // scans sees the same world.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut a = netlink.scan().unwrap();
            let mut b = procfs.scan().unwrap();
            // Dual-stack is the one thing procfs may only guess.
            for s in a.iter_mut().chain(b.iter_mut()) {
                s.dual_stack = false;
            }
            let key = |s: &Socket| (s.protocol, s.addr, s.port, s.inode);
            a.sort_by_key(key);
            b.sort_by_key(key);
            if a == b {
                return;
            }
            assert!(Instant::now() < deadline, "netlink {a:#?}\nprocfs {b:#?}");
        }
    }

    #[test]
    fn auto_picks_a_working_source() {
        let mut scanner = Scanner::auto();
        scanner.scan().unwrap();
        let src = scanner.source();
        assert!(["netlink", "procfs"].contains(&src.to_string().as_str()));
    }

    /// `cargo test -p monitor-svc --release scan_cost -- --ignored --nocapture`
    /// (raise `ulimit -n` above 10,000 for the largest case).
    #[test]
    #[ignore = "timing report, not a check"]
    fn scan_cost() {
        let mut listeners = Vec::new();
        for n in [10, 1_000, 10_000] {
            while listeners.len() < n {
                match TcpListener::bind("127.0.0.1:0") {
                    Ok(l) => listeners.push(l),
                    Err(e) => {
                        println!("stopped at {} listeners: {e}", listeners.len());
                        return;
                    }
                }
            }
            for source in [Source::Netlink, Source::Procfs] {
                let mut scanner = Scanner::with_source(source).unwrap();
                scanner.scan().unwrap();
                let rounds = if n > 1_000 { 20 } else { 200 };
                let start = Instant::now();
                let mut seen = 0;
                for _ in 0..rounds {
                    seen = scanner.scan().unwrap().len();
                }
                println!(
                    "{source:>7}: {n:>6} listeners ({seen} sockets): {:?} per scan",
                    start.elapsed() / rounds
                );
            }
        }
    }
}
