//! The host side of a UDP tunnel: a socket on each host address, and one
//! flow per host client address (IP and port), each carried to the
//! container by its own upstream: a `Relay.Dial` UDP stream (grpc) or a
//! UDP socket connected to the container's address (direct). A datagram
//! stays one datagram end to end; replies go back to the client whose flow
//! they came in on. A flow ends after `idle` without a datagram either way,
//! and a tunnel carries at most `max_flows` at once: datagrams from a new
//! client beyond that are dropped (and counted) until a flow ends, and the
//! flow whose client has been quiet longest gives way to it (see
//! [`give_way`]).

use crate::backend::{Backend, BackendCell, UdpUpstream};
use crate::tunnel::{Carry, CarryError};
use bytes::Bytes;
use porthole::pb::v1::{relay_frame::Kind, RelayFrame};
use porthole::relay::PumpError;
use porthole::telemetry::RateLimit;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::Instrument;

/// How long a flow lives without a datagram either way, by default.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);
/// Flows one UDP tunnel carries at once, by default.
pub const DEFAULT_MAX_FLOWS: usize = 256;

/// Datagrams waiting for one flow's upstream (while it dials, or while the
/// container side is slower than the client): beyond this they are dropped,
/// as a full socket buffer would drop them.
const FLOW_QUEUE: usize = 64;

/// Bytes of datagrams waiting in all of one tunnel's flows: with large
/// datagrams the byte bound, not the count, is what holds memory down.
const QUEUED_BYTES: usize = 4 << 20;

/// A flow whose client sent nothing for this long (or a quarter of the idle
/// timeout, if shorter) gives way to a new client when the tunnel is full.
const QUIET: Duration = Duration::from_secs(5);

/// Room for any datagram (IPv6 loopback carries up to 65,527 bytes).
const DATAGRAM_BUF: usize = 65_536;

/// The UDP flow bounds of every tunnel.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub idle: Duration,
    pub max_flows: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            idle: DEFAULT_IDLE,
            max_flows: DEFAULT_MAX_FLOWS,
        }
    }
}

/// What every socket task of one tunnel shares.
struct Shared {
    carry: Carry,
    backend: Arc<BackendCell>,
    limits: Limits,
    failures: RateLimit,
    dropped: RateLimit,
}

/// Receives datagrams on `sockets` until `carry.cancel`, carrying each
/// client's to the container through `backend` on that client's flow.
/// Flows end at once when the tunnel closes (UDP has nothing to drain).
pub fn serve(sockets: Vec<UdpSocket>, backend: Arc<BackendCell>, carry: Carry, limits: Limits) {
    let shared = Arc::new(Shared {
        carry,
        backend,
        limits,
        failures: RateLimit::new(Duration::from_secs(10)),
        dropped: RateLimit::new(Duration::from_secs(10)),
    });
    for socket in sockets {
        let span = shared.carry.span.clone();
        tokio::spawn(receive(Arc::new(socket), shared.clone()).instrument(span));
    }
}

/// One host socket: hands each datagram to its client's flow, starting
/// one for a new client while the tunnel has room.
async fn receive(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    let stats = &shared.carry.stats;
    // The only owner of the senders (a flow that ended has a closed one),
    // and when each client last sent.
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; DATAGRAM_BUF];
    loop {
        let received = tokio::select! {
            _ = shared.carry.cancel.cancelled() => break,
            received = socket.recv_from(&mut buf) => received,
        };
        let (n, peer) = match received {
            Ok(got) => got,
            Err(e) => {
                // An ICMP error of an earlier reply, or a resource limit:
                // the socket itself carries on.
                tracing::debug!(error = %e, "udp receive failed");
                continue;
            }
        };
        let datagram = Bytes::copy_from_slice(&buf[..n]);
        if flows.get(&peer).is_none_or(|f| f.queue.is_closed()) {
            flows.retain(|_, f| !f.queue.is_closed());
            let max = shared.limits.max_flows as u64;
            let room = stats
                .active
                .fetch_update(Relaxed, Relaxed, |a| (a < max).then_some(a + 1));
            if room.is_err() {
                give_way(&mut flows, shared.limits.idle);
                stats.datagrams_dropped.fetch_add(1, Relaxed);
                if let Some(suppressed) = shared.dropped.check() {
                    tracing::warn!(%peer, max, suppressed, "udp flow limit reached; datagrams from new clients are dropped");
                }
                continue;
            }
            stats.total.fetch_add(1, Relaxed);
            crate::tunnel::LIVE.fetch_add(1, Relaxed);
            let (tx, rx) = mpsc::channel(FLOW_QUEUE);
            let span = tracing::info_span!("flow", %peer);
            let work = flow(socket.clone(), peer, rx, shared.clone());
            shared.carry.tracker.spawn(work.instrument(span));
            let heard = tokio::time::Instant::now();
            flows.insert(peer, Flow { queue: tx, heard });
        }
        let f = flows.get_mut(&peer).expect("made above");
        f.heard = tokio::time::Instant::now();
        let tx = &f.queue;
        let n = datagram.len();
        let room = shared
            .carry
            .stats
            .queued
            .fetch_update(Relaxed, Relaxed, |q| {
                (q + n <= QUEUED_BYTES).then_some(q + n)
            })
            .is_ok();
        if !room {
            stats.datagrams_dropped.fetch_add(1, Relaxed);
        } else if tx.try_send(datagram).is_err() {
            shared.carry.stats.queued.fetch_sub(n, Relaxed);
            stats.datagrams_dropped.fetch_add(1, Relaxed);
        }
    }
}

/// The receive task's side of one flow.
struct Flow {
    queue: mpsc::Sender<Bytes>,
    /// When its client last sent a datagram.
    heard: tokio::time::Instant,
}

/// The tunnel is full: the flow whose client has been quiet longest ends,
/// if that is at least [`QUIET`] (or a quarter of `idle`), so that a client
/// resending on many source ports within the idle timeout cannot keep
/// every new client out. Its slot frees as its task ends; the new client's
/// next datagram finds it.
fn give_way(flows: &mut HashMap<SocketAddr, Flow>, idle: Duration) {
    let quiet = QUIET.min(idle / 4);
    let oldest = flows
        .iter()
        .filter(|(_, f)| !f.queue.is_closed())
        .min_by_key(|(_, f)| f.heard)
        .filter(|(_, f)| f.heard.elapsed() >= quiet)
        .map(|(peer, _)| *peer);
    if let Some(peer) = oldest {
        tracing::debug!(%peer, "udp flow ended to make room for a new client");
        flows.remove(&peer);
    }
}

/// Carries one client's flow until it is idle, the tunnel closes, or
/// either end fails; counts it.
async fn flow(
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    mut rx: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
) {
    let stats = &shared.carry.stats;
    let backend = shared.backend.get();
    let port = shared.carry.container_port;
    let work = carry_flow(&socket, peer, &mut rx, &shared, &backend, port);
    let result = tokio::select! {
        result = work => result,
        _ = shared.carry.cancel.cancelled() => Ok(()),
    };
    match result {
        Ok(()) => tracing::debug!("udp flow ended"),
        Err(CarryError::Dial(why)) => {
            if let Some(suppressed) = shared.failures.check() {
                tracing::warn!(error = %why, suppressed, "udp flow failed");
            }
            stats.set_error(format!("last flow failed: {why}"));
        }
        Err(e) => {
            tracing::debug!(error = %e, "udp flow broke");
            stats.set_error(format!("last flow broke: {e}"));
        }
    }
    // What is still queued is dropped, and its bytes given back.
    rx.close();
    while let Ok(datagram) = rx.try_recv() {
        shared.carry.stats.queued.fetch_sub(datagram.len(), Relaxed);
        stats.datagrams_dropped.fetch_add(1, Relaxed);
    }
    stats.active.fetch_sub(1, Relaxed);
    crate::tunnel::LIVE.fetch_sub(1, Relaxed);
}

async fn carry_flow(
    socket: &UdpSocket,
    peer: SocketAddr,
    rx: &mut mpsc::Receiver<Bytes>,
    shared: &Shared,
    backend: &Backend,
    port: u16,
) -> Result<(), CarryError> {
    let upstream = backend.dial_udp(port).await?;
    let stats = &*shared.carry.stats;
    stats.connected();
    let mut ends = FlowEnds {
        socket,
        peer,
        rx,
        stats,
    };
    let timer = tokio::time::sleep(shared.limits.idle);
    tokio::pin!(timer);
    let idle = shared.limits.idle;
    let rearm = |timer: std::pin::Pin<&mut tokio::time::Sleep>| {
        timer.reset(tokio::time::Instant::now() + idle)
    };
    match upstream {
        UdpUpstream::Relay(mut relay) => {
            loop {
                tokio::select! {
                    datagram = ends.next() => {
                        let Some(datagram) = datagram else { break };
                        let n = datagram.len();
                        let frame = RelayFrame { kind: Some(Kind::Data(datagram)) };
                        relay.tx.send(frame).await.map_err(|_| PumpError::PeerGone)?;
                        ends.sent(n);
                    }
                    frame = relay.inbound.message() => {
                        match frame.map_err(PumpError::Stream)?.and_then(|f| f.kind) {
                            Some(Kind::Data(datagram)) => ends.reply(&datagram).await?,
                            None => return Err(PumpError::PeerGone.into()),
                            Some(_) => return Err(PumpError::Protocol("not a datagram").into()),
                        }
                    }
                    _ = &mut timer => break,
                }
                rearm(timer.as_mut());
            }
            // The flow ends cleanly: say so, and let the monitor end it.
            let end = RelayFrame {
                kind: Some(Kind::CloseWrite(true)),
            };
            relay.tx.send(end).await.map_err(|_| PumpError::PeerGone)?;
            relay.finish().await?;
        }
        UdpUpstream::Socket(up) => {
            let mut buf = vec![0u8; DATAGRAM_BUF];
            loop {
                tokio::select! {
                    datagram = ends.next() => {
                        let Some(datagram) = datagram else { break };
                        up.send(&datagram).await?;
                        ends.sent(datagram.len());
                    }
                    // The port refused a datagram (ICMP unreachable): the
                    // flow ends with that error.
                    got = up.recv(&mut buf) => ends.reply(&buf[..got?]).await?,
                    _ = &mut timer => break,
                }
                rearm(timer.as_mut());
            }
        }
    }
    Ok(())
}

/// A flow's host side: its client's datagrams, where replies go, and the
/// tunnel's counters.
struct FlowEnds<'a> {
    socket: &'a UdpSocket,
    peer: SocketAddr,
    rx: &'a mut mpsc::Receiver<Bytes>,
    stats: &'a crate::tunnel::Stats,
}

impl FlowEnds<'_> {
    /// The client's next datagram, its bytes given back to the queue's
    /// bound; none once the flow is over.
    async fn next(&mut self) -> Option<Bytes> {
        let datagram = self.rx.recv().await?;
        self.stats.queued.fetch_sub(datagram.len(), Relaxed);
        Some(datagram)
    }

    /// A datagram of `n` bytes went to the container.
    fn sent(&self, n: usize) {
        self.stats.datagrams_in.fetch_add(1, Relaxed);
        self.stats.bytes_in.fetch_add(n as u64, Relaxed);
    }

    /// Sends the container's `datagram` to the client.
    async fn reply(&self, datagram: &[u8]) -> io::Result<()> {
        self.socket.send_to(datagram, self.peer).await?;
        self.stats.datagrams_out.fetch_add(1, Relaxed);
        self.stats
            .bytes_out
            .fetch_add(datagram.len() as u64, Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! UDP tunnels over the direct backend to a loopback echo server: real
    //! sockets, no root.
    use super::*;
    use crate::backend::direct::Direct;
    use crate::tunnel::Stats;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    /// An echo server on loopback that prefixes nothing and answers each
    /// datagram to its sender; its port.
    async fn echo() -> u16 {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = s.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut buf = vec![0u8; DATAGRAM_BUF];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        port
    }

    struct Tunnel {
        addr: SocketAddr,
        stats: Arc<Stats>,
        cancel: CancellationToken,
    }

    fn tunnel(container_port: u16, limits: Limits) -> Tunnel {
        let socket = crate::sockets::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let cancel = CancellationToken::new();
        let backend = Arc::new(BackendCell::new(Arc::new(Backend::Direct(Direct {
            host: "127.0.0.1".into(),
        }))));
        let carry = Carry {
            container_port,
            park: Default::default(),
            stats: stats.clone(),
            cancel: cancel.clone(),
            tracker: TaskTracker::new(),
            span: tracing::Span::none(),
        };
        serve(vec![socket], backend, carry, limits);
        Tunnel {
            addr,
            stats,
            cancel,
        }
    }

    async fn client(to: SocketAddr) -> UdpSocket {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(to).await.unwrap();
        c
    }

    async fn ask(c: &UdpSocket, what: &[u8]) -> Vec<u8> {
        c.send(what).await.unwrap();
        let mut buf = vec![0u8; DATAGRAM_BUF];
        let n = tokio::time::timeout(Duration::from_secs(5), c.recv(&mut buf))
            .await
            .expect("a reply within 5 s")
            .unwrap();
        buf.truncate(n);
        buf
    }

    /// Polls `cond` every 10 ms for up to 5 s.
    async fn eventually(cond: impl Fn() -> bool) -> bool {
        for _ in 0..500 {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cond()
    }

    #[tokio::test]
    async fn each_client_gets_its_own_replies_whole() {
        let t = tunnel(echo().await, Limits::default());
        let (a, b) = (client(t.addr).await, client(t.addr).await);
        for size in [1, 1400, 9000, 65_507] {
            let (da, db) = (vec![b'a'; size], vec![b'b'; size]);
            assert_eq!(ask(&a, &da).await, da);
            assert_eq!(ask(&b, &db).await, db);
        }
        let s = &t.stats;
        assert_eq!(s.active.load(Relaxed), 2, "one flow per client");
        assert_eq!(s.total.load(Relaxed), 2);
        assert_eq!(s.datagrams_in.load(Relaxed), 8);
        assert_eq!(s.datagrams_out.load(Relaxed), 8);
        let bytes = 2 * (1 + 1400 + 9000 + 65_507);
        assert_eq!(s.bytes_in.load(Relaxed), bytes);
        assert_eq!(s.bytes_out.load(Relaxed), bytes);
        t.cancel.cancel();
        assert!(eventually(|| s.active.load(Relaxed) == 0).await);
    }

    #[tokio::test]
    async fn idle_flows_end_and_the_client_gets_a_new_one() {
        let idle = Duration::from_millis(200);
        let t = tunnel(echo().await, Limits { idle, max_flows: 8 });
        let c = client(t.addr).await;
        assert_eq!(ask(&c, b"one").await, b"one");
        assert_eq!(t.stats.active.load(Relaxed), 1);
        assert!(
            eventually(|| t.stats.active.load(Relaxed) == 0).await,
            "the idle flow ended"
        );
        assert_eq!(ask(&c, b"two").await, b"two");
        assert_eq!(t.stats.total.load(Relaxed), 2, "a new flow");
    }

    #[tokio::test]
    async fn a_flow_that_fails_gives_its_queue_back() {
        // A container port nothing listens on yet: the flow's first
        // datagram is refused, and it ends with the rest still queued.
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = tunnel(port, Limits::default());
        let c = client(t.addr).await;
        let big = vec![7u8; 65_000];
        for _ in 0..100 {
            c.send(&big).await.unwrap();
        }
        assert!(eventually(|| t.stats.failing().is_some()).await);
        assert!(eventually(|| t.stats.active.load(Relaxed) == 0).await);
        // The port opens: a new client's datagrams all go through, so no
        // queued byte of the failed flow is still counted against the
        // tunnel's budget.
        let echo_server = UdpSocket::bind(("127.0.0.1", port)).await.unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; DATAGRAM_BUF];
            while let Ok((n, from)) = echo_server.recv_from(&mut buf).await {
                let _ = echo_server.send_to(&buf[..n], from).await;
            }
        });
        assert_eq!(
            t.stats.queued.load(Relaxed),
            0,
            "every queued byte given back"
        );
        let dropped = t.stats.datagrams_dropped.load(Relaxed);
        let d = client(t.addr).await;
        for i in 0..20u8 {
            assert!(ask(&d, &[i; 40_000]).await == [i; 40_000]);
        }
        assert_eq!(t.stats.datagrams_dropped.load(Relaxed), dropped);
    }

    #[tokio::test]
    async fn flows_beyond_the_bound_are_dropped_and_counted() {
        let t = tunnel(
            echo().await,
            Limits {
                idle: Duration::from_secs(60),
                max_flows: 2,
            },
        );
        let (a, b, c) = (
            client(t.addr).await,
            client(t.addr).await,
            client(t.addr).await,
        );
        assert_eq!(ask(&a, b"a").await, b"a");
        assert_eq!(ask(&b, b"b").await, b"b");
        c.send(b"c").await.unwrap();
        let dropped = || t.stats.datagrams_dropped.load(Relaxed) == 1;
        assert!(eventually(dropped).await, "the third client's datagram");
        assert_eq!(t.stats.active.load(Relaxed), 2);
        // The first two carry on.
        assert_eq!(ask(&a, b"a2").await, b"a2");
    }

    #[tokio::test]
    async fn a_full_tunnel_gives_a_new_client_the_quietest_flow() {
        // Idle flows end after 2 s; a quiet one gives way after 0.5 s.
        let idle = Duration::from_secs(2);
        let t = tunnel(echo().await, Limits { idle, max_flows: 2 });
        let (a, b, c) = (
            client(t.addr).await,
            client(t.addr).await,
            client(t.addr).await,
        );
        assert_eq!(ask(&a, b"a").await, b"a");
        let a_quiet_since = tokio::time::Instant::now();
        // b stays busy; c asks again and again until it gets a flow.
        let mut buf = [0u8; 16];
        let got = loop {
            assert_eq!(ask(&b, b"b").await, b"b");
            c.send(b"c").await.unwrap();
            let reply = tokio::time::timeout(Duration::from_millis(50), c.recv(&mut buf));
            if let Ok(Ok(n)) = reply.await {
                break buf[..n].to_vec();
            }
            assert!(
                a_quiet_since.elapsed() < Duration::from_secs(10),
                "c never got a flow"
            );
        };
        assert_eq!(got, b"c");
        assert!(
            a_quiet_since.elapsed() < idle,
            "a's flow gave way before it would have expired ({:?})",
            a_quiet_since.elapsed()
        );
        assert!(t.stats.datagrams_dropped.load(Relaxed) >= 1, "c waited");
        assert_eq!(t.stats.total.load(Relaxed), 3);
        assert_eq!(ask(&b, b"b").await, b"b", "the busy flow kept going");
    }

    #[tokio::test]
    async fn a_closed_container_port_ends_the_flow_with_the_reason() {
        // A port nothing listens on: the kernel answers ICMP unreachable.
        let port = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        let t = tunnel(port, Limits::default());
        let c = client(t.addr).await;
        c.send(b"anyone?").await.unwrap();
        assert!(eventually(|| t.stats.failing().is_some()).await);
        let why = t.stats.failing().unwrap().why;
        assert!(why.contains("refused"), "{why}");
        assert!(eventually(|| t.stats.active.load(Relaxed) == 0).await);
    }
}
