//! Sockets as both services use them: accepting without spinning when file
//! descriptors run out, the file-descriptor limit, and TCP connections that
//! end with a reset unless they finished cleanly; UDP sockets with room for
//! bursts; and [`Proto`], TCP or UDP, as tunnel-svc and the test kit name a
//! port's transport.

use crate::telemetry::RateLimit;
use std::io;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// HTTP/2 keepalive on every connection a porthole server accepts: a peer
/// that stops answering (killed, its link down) is noticed within about
/// 15 s and its streams fail instead of waiting forever.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// UDP socket buffers asked for: a burst of large datagrams fits (a
/// reassembled 8 KiB datagram takes about 16 KiB of buffer, so the
/// kernel's default 208 KiB holds only a dozen). The kernel caps them at
/// `net.core.rmem_max`/`wmem_max`.
const UDP_BUFFER: usize = 4 << 20;

/// A UDP socket bound to `addr`, with large buffers.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    // Best effort: the kernel's limits apply.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// How long an accept loop pauses when the process or the system is out of
/// file descriptors (or socket memory): the pending connection waits in the
/// backlog instead of the loop spinning on the same error.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One "accept failed" log line per this interval, with a count.
pub const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(5);

/// Whether an error means "out of descriptors or memory", where retrying at
/// once can only fail again.
pub fn is_exhaustion(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let errno = Errno::from_io_error(e);
    [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM]
        .iter()
        .any(|x| Some(*x) == errno)
}

/// Accepts the next connection. Errors are logged at most once per
/// [`ACCEPT_LOG_EVERY`] (through `log`) and never end the loop; running out
/// of file descriptors backs off for [`ACCEPT_BACKOFF`] instead of spinning.
pub async fn accept(listener: &TcpListener, log: &RateLimit) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                let exhausted = is_exhaustion(&e);
                if let Some(suppressed) = log.check() {
                    let addr = listener.local_addr().ok();
                    tracing::warn!(
                        addr = ?addr,
                        error = %e,
                        suppressed,
                        "accept failed{}",
                        if exhausted { "; backing off until connections close" } else { "" }
                    );
                }
                if exhausted {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every relayed
/// connection costs two descriptors, and the usual soft limit of 1,024 is
/// reached long before memory is. Returns the limit now in force.
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!(error = %e, "cannot raise the file-descriptor limit");
            return getrlimit(Resource::Nofile).current;
        }
    }
    limit.current
}

/// A relayed TCP connection that ends with a reset (RST) unless
/// [`ResetOnDrop::finish`] says it ended cleanly. `SO_LINGER 0` is set as
/// soon as it is wrapped, so even the process dying (SIGKILL) resets it:
/// the peer never mistakes a broken transfer for a finished one.
#[derive(Debug)]
pub struct ResetOnDrop(TcpStream);

impl ResetOnDrop {
    pub fn new(stream: TcpStream) -> ResetOnDrop {
        // Both only fail on a socket that is already gone.
        let _ = stream.set_zero_linger();
        let _ = stream.set_nodelay(true);
        ResetOnDrop(stream)
    }

    /// Both directions ended cleanly: close with the normal FIN handshake.
    pub fn finish(self) {
        let _ = socket2::SockRef::from(&self.0).set_linger(None);
    }
}

impl Deref for ResetOnDrop {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.0
    }
}

impl DerefMut for ResetOnDrop {
    fn deref_mut(&mut self) -> &mut TcpStream {
        &mut self.0
    }
}

/// Makes a long-lived relay connection notice a dead peer as the HTTP/2
/// keepalive does (see [`KEEPALIVE_INTERVAL`]): TCP
/// keepalive probes after 10 s of silence, 5 s apart, and sent data left
/// unacknowledged for 15 s, fail it instead of hanging on a cut link.
pub fn detect_dead_peer(stream: &TcpStream) {
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_INTERVAL)
        .with_interval(KEEPALIVE_TIMEOUT)
        .with_retries(1);
    // Both only fail on a socket that is already gone.
    let _ = sock.set_tcp_keepalive(&keepalive);
    let _ = sock.set_tcp_user_timeout(Some(KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT));
}

/// Connects with a deadline: a listener that drops SYNs fails the
/// connection after `timeout` instead of the kernel's two minutes.
pub async fn connect(
    addr: impl tokio::net::ToSocketAddrs,
    timeout: Duration,
) -> io::Result<TcpStream> {
    match awake_timeout(timeout, TcpStream::connect(addr)).await {
        Some(result) => result,
        None => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {}s", timeout.as_secs()),
        )),
    }
}

/// `fut`'s output, or None once it has taken `limit` of the time this
/// process was running. Time spent frozen does not count: a paused
/// container's clock runs on, and a plain timeout started before `docker
/// pause` fires the moment the container thaws, failing what would have
/// worked. Counted in ticks of [`AWAKE_TICK`]; a tick that took longer
/// than two was a freeze and counts as two.
pub async fn awake_timeout<F: std::future::Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut counted = Duration::ZERO;
    loop {
        let tick = tokio::time::Instant::now();
        tokio::select! {
            biased;
            out = &mut fut => return Some(out),
            _ = tokio::time::sleep(AWAKE_TICK.min(limit)) => {}
        }
        counted += tick.elapsed().min(AWAKE_TICK * 2);
        if counted >= limit {
            return None;
        }
    }
}

/// The tick [`awake_timeout`] counts in.
pub const AWAKE_TICK: Duration = Duration::from_millis(100);

/// How long a service start-up keeps retrying a listen address that is
/// still in use (a predecessor killed a moment ago).
pub const BIND_RETRY: Duration = Duration::from_secs(3);

/// Binds `addr`, retrying for up to [`BIND_RETRY`] while it is in use.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let deadline = tokio::time::Instant::now() + BIND_RETRY;
    loop {
        match TcpListener::bind(addr).await {
            Err(e)
                if e.kind() == io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// This network namespace's ephemeral port range (the kernel's default if
/// it cannot be read): where the ports of sockets that do not choose one
/// come from.
pub fn ephemeral_range() -> std::ops::RangeInclusive<u16> {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut parts = text.split_whitespace().map(|p| p.parse::<u16>());
    match (parts.next(), parts.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => lo..=hi,
        _ => 32768..=60999,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn exhaustion_errors_are_recognised() {
        assert!(is_exhaustion(&io::Error::from_raw_os_error(24)));
        assert!(is_exhaustion(&io::Error::from_raw_os_error(23)));
        assert!(!is_exhaustion(&io::Error::from_raw_os_error(103)));
        assert!(!is_exhaustion(&io::Error::other("x")));
    }

    #[tokio::test]
    async fn dropped_connection_resets_and_finished_one_closes_cleanly() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for clean in [false, true] {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let mut server = ResetOnDrop::new(server);
            server.write_all(b"partial").await.unwrap();
            if clean {
                server.shutdown().await.unwrap();
                server.finish();
            } else {
                drop(server);
            }
            let mut got = Vec::new();
            let result = client.read_to_end(&mut got).await;
            if clean {
                assert_eq!(result.unwrap(), 7);
            } else {
                let err = result.unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
            }
        }
    }
}

/// The transport of a port, a tunnel or a relay: TCP or UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    pub fn to_pb(self) -> crate::pb::v1::Protocol {
        match self {
            Proto::Tcp => crate::pb::v1::Protocol::Tcp,
            Proto::Udp => crate::pb::v1::Protocol::Udp,
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Proto, String> {
        <Proto as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| format!("protocol {s:?}: use tcp or udp"))
    }
}
