//! `porthole.v1.Relay`: carries one TCP connection, or one UDP flow, per
//! call to a port that is listening (bound, for UDP) inside the container
//! right now, on that socket's own address, and nowhere else.

use crate::metrics::RelayCount;
use crate::monitor::Handle;
use porthole::net::ResetOnDrop;
use porthole::pb::v1::{relay_frame::Kind, relay_server::Relay, DialReply, Protocol, RelayFrame};
use porthole::relay::PumpError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// Frames buffered per direction; with 64 KiB frames this bounds a
/// connection's memory to about half a megabyte each way.
const FRAMES_IN_FLIGHT: usize = 8;

/// How long connecting to a listener inside the container may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long relayed connections get to finish on their own once the
/// monitor is asked to stop; then they are reset and their streams end
/// with UNAVAILABLE.
pub const DRAIN: Duration = Duration::from_secs(2);

/// How long the final error status may wait for room in a stream whose
/// caller is not reading.
const STATUS_WAIT: Duration = Duration::from_secs(1);

/// The status a Relay stream ends with when its connection broke.
fn broken(port: u16, e: &PumpError) -> Status {
    match e {
        PumpError::Io(e) => Status::aborted(format!(
            "connection to port {port} inside the container failed: {e}; it was reset"
        )),
        PumpError::Stream(s) => Status::aborted(format!(
            "the relay stream failed ({}); the connection to port {port} was reset",
            s.message()
        )),
        PumpError::PeerGone => Status::aborted(format!(
            "the relay stream ended without close_write; the connection to port {port} was reset"
        )),
        PumpError::Protocol(what) => {
            Status::invalid_argument(format!("{what}; the connection to port {port} was reset"))
        }
    }
}
pub struct RelayService {
    monitor: Handle,
    shutdown: CancellationToken,
}

impl RelayService {
    pub fn new(monitor: Handle, shutdown: CancellationToken) -> Self {
        RelayService { monitor, shutdown }
    }
}

/// Where to reach a listener, in the order to try: its own address; for a
/// wildcard, a loopback it accepts. `0.0.0.0` → `127.0.0.1`; an IPv6-only
/// `::` → `::1`; a dual-stack `::` → `127.0.0.1` first, which exists in
/// every container with `lo` up, then `::1`, which does not exist where
/// IPv6 is off (Docker's default), where dialling it fails with "Cannot
/// assign requested address".
pub fn reach(addr: IpAddr, dual_stack: bool, port: u16) -> Vec<SocketAddr> {
    let ips = match addr {
        IpAddr::V4(v4) if v4.is_unspecified() => vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        IpAddr::V6(v6) if v6.is_unspecified() && dual_stack => vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ],
        IpAddr::V6(v6) if v6.is_unspecified() => vec![IpAddr::V6(Ipv6Addr::LOCALHOST)],
        other => vec![other],
    };
    ips.into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

/// Every address to try for the sockets the monitor sees on `port`: each
/// one's [`reach`], IPv4 before IPv6, no address twice.
fn candidates(sockets: &[porthole::pb::v1::Port], port: u16) -> Vec<SocketAddr> {
    let mut all: Vec<SocketAddr> = sockets
        .iter()
        .filter_map(|p| Some(reach(p.address.parse().ok()?, p.dual_stack, port)))
        .flatten()
        .collect();
    all.sort_by_key(|a| a.is_ipv6());
    all.dedup();
    all
}

/// Reads and checks the dial frame; returns the protocol and port.
async fn dial_request(inbound: &mut Streaming<RelayFrame>) -> Result<(Protocol, u16), Status> {
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the stream ended before a dial frame"))?;
    let Some(Kind::Dial(dial)) = first.kind else {
        return Err(Status::invalid_argument(
            "the first frame must be a dial frame",
        ));
    };
    let protocol = match Protocol::try_from(dial.protocol) {
        Ok(Protocol::Tcp | Protocol::Unspecified) => Protocol::Tcp,
        Ok(Protocol::Udp) => Protocol::Udp,
        _ => return Err(Status::invalid_argument("protocol must be TCP or UDP")),
    };
    let port = u16::try_from(dial.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            Status::invalid_argument(format!("port {} is not in 1..65535", dial.port))
        })?;
    Ok((protocol, port))
}

/// Largest UDP payload (IPv4: 65535 - 8 - 20).
const MAX_DATAGRAM: usize = 65_507;

/// Carries one UDP flow: each `data` frame in is one datagram to the
/// socket, each datagram back is one `data` frame out; ends cleanly at the
/// caller's `close_write`.
async fn udp_flow(
    socket: tokio::net::UdpSocket,
    inbound: &mut Streaming<RelayFrame>,
    out: &Outbound,
    sent: &AtomicU64,
    received: &AtomicU64,
) -> Result<(), PumpError> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            frame = inbound.message() => match frame?.and_then(|f| f.kind) {
                Some(Kind::Data(datagram)) => {
                    socket.send(&datagram).await?;
                    sent.fetch_add(datagram.len() as u64, Relaxed);
                }
                Some(Kind::CloseWrite(true)) => return Ok(()),
                None => return Err(PumpError::PeerGone),
                Some(_) => return Err(PumpError::Protocol("a dial frame after the dial")),
            },
            got = socket.recv(&mut buf) => {
                // A datagram the port refused (ICMP unreachable) ends the flow.
                let n = got?;
                received.fetch_add(n as u64, Relaxed);
                let frame = RelayFrame { kind: Some(Kind::Data(buf[..n].to_vec().into())) };
                out.send(Ok(frame)).await.map_err(|_| PumpError::PeerGone)?;
            }
        }
    }
}

/// Connects to TCP `port` inside the container on a listener's own address
/// (loopback of its family for a wildcard), if the monitor sees one.
async fn connect_listener(monitor: &Handle, port: u16) -> Result<(TcpStream, SocketAddr), Status> {
    let candidates = candidates(&monitor.sockets(Protocol::Tcp, port).await?, port);
    if candidates.is_empty() {
        return Err(Status::failed_precondition(format!(
            "no TCP listener on port {port} inside the container"
        )));
    }
    let mut last_err = None;
    for addr in &candidates {
        match porthole::net::connect(*addr, CONNECT_TIMEOUT).await {
            Ok(c) => return Ok((c, *addr)),
            Err(e) => last_err = Some(format!("{addr}: {e}")),
        }
    }
    Err(Status::unavailable(format!(
        "cannot connect to port {port}: {}",
        last_err.unwrap_or_default()
    )))
}

/// Raw relays open at once (each holds two sockets, and two pipes while
/// bytes flow); beyond them, RESOURCE_EXHAUSTED (the caller then uses a
/// Relay stream).
pub const MAX_RAW_RELAYS: usize = 4096;

/// Serves one raw relay connection (see [`porthole::rawrelay`]): checks
/// the request line and the token, connects the port, answers, then
/// splices both ways. Any failure resets both connections. The connection
/// holds its server slot until the token is checked; from then on it
/// counts among the `relays` instead.
pub async fn raw(
    monitor: Handle,
    token: Option<porthole::auth::Token>,
    relays: Arc<tokio::sync::Semaphore>,
    shutdown: CancellationToken,
    (mut client, slot): (TcpStream, porthole::server::ConnectionSlot),
) {
    use porthole::rawrelay;
    use tokio::io::AsyncWriteExt;
    let client_addr = client.peer_addr().ok();
    let answered = async {
        let line = rawrelay::read_line(&mut client)
            .await
            .map_err(|e| Status::invalid_argument(format!("reading the request: {e}")))?;
        let req = rawrelay::parse_request(&line).map_err(Status::invalid_argument)?;
        if let Some(token) = &token {
            if !rawrelay::admits(token, req.port, req.token.as_deref()) {
                return Err(Status::unauthenticated("missing or wrong bearer token"));
            }
        }
        let relay = relays.try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{MAX_RAW_RELAYS} raw relays are open; use a Relay stream"
            ))
        })?;
        drop(slot);
        let (conn, addr) = connect_listener(&monitor, req.port).await?;
        Ok((req.port, conn, addr, relay))
    }
    .await;
    let (port, conn, addr, _relay) = match answered {
        Ok(connected) => connected,
        Err(status) => {
            tracing::debug!(client = ?client_addr, error = %status.message(), "raw relay refused");
            let line = rawrelay::error_line(status.code(), status.message());
            let _ = tokio::time::timeout(STATUS_WAIT, client.write_all(&line)).await;
            return;
        }
    };
    porthole::net::detect_dead_peer(&client);
    let mut conn = ResetOnDrop::new(conn);
    let mut client = ResetOnDrop::new(client);
    if client
        .write_all(format!("OK {addr}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let count = monitor.metrics.relay_started();
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let copy = porthole::splice::copy(&mut *client, &mut *conn, &sent, &received);
    let result = porthole::shutdown::drained(copy, &shutdown, DRAIN)
        .await
        .unwrap_or_else(|| Err(std::io::Error::other("monitor-svc is shutting down")));
    match result {
        Ok(()) => {
            conn.finish();
            client.finish();
            tracing::debug!(port, %addr, sent = sent.load(Relaxed), received = received.load(Relaxed), "raw relay closed");
        }
        Err(e) => {
            count.failed();
            tracing::debug!(port, %addr, error = %e, "raw relay reset");
        }
    }
}

#[tonic::async_trait]
impl Relay for RelayService {
    type DialStream = ReceiverStream<Result<RelayFrame, Status>>;

    async fn dial(
        &self,
        request: Request<Streaming<RelayFrame>>,
    ) -> Result<Response<Self::DialStream>, Status> {
        let mut inbound = request.into_inner();
        let (protocol, port) = dial_request(&mut inbound).await?;
        if protocol == Protocol::Udp {
            return self.dial_udp(inbound, port).await;
        }
        let (conn, addr) = connect_listener(&self.monitor, port).await?;
        // Reset, never closed cleanly, unless the transfer ends cleanly:
        // even this process dying resets it.
        let mut conn = ResetOnDrop::new(conn);

        let (out_tx, out_rx, count) = self.answer(addr).await?;
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
            let pump =
                porthole::relay::pump(&mut *conn, &mut inbound, &out_tx, Ok, &sent, &received);
            let result = match porthole::shutdown::drained(pump, &shutdown, DRAIN).await {
                Some(result) => result.map_err(|e| broken(port, &e)),
                None => Err(Status::unavailable(format!(
                    "monitor-svc is shutting down; the connection to port {port} was reset"
                ))),
            };
            match result {
                Ok(()) => {
                    conn.finish();
                    tracing::debug!(port, %addr, sent = sent.load(Relaxed), received = received.load(Relaxed), "relay closed");
                }
                Err(status) => {
                    count.failed();
                    tracing::debug!(port, %addr, sent = sent.load(Relaxed), received = received.load(Relaxed), error = %status.message(), "relay reset");
                    drop((conn, count));
                    let _ = tokio::time::timeout(STATUS_WAIT, out_tx.send(Err(status))).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }
}

/// The caller's half of a relay stream.
type Outbound = mpsc::Sender<Result<RelayFrame, Status>>;

impl RelayService {
    /// Opens the reply stream with its `dialed` frame (the address reached)
    /// and counts the relay as started.
    async fn answer(
        &self,
        addr: SocketAddr,
    ) -> Result<
        (
            Outbound,
            mpsc::Receiver<Result<RelayFrame, Status>>,
            RelayCount,
        ),
        Status,
    > {
        let (out_tx, out_rx) = mpsc::channel(FRAMES_IN_FLIGHT);
        let dialed = RelayFrame {
            kind: Some(Kind::Dialed(DialReply {
                address: addr.to_string(),
            })),
        };
        out_tx
            .send(Ok(dialed))
            .await
            .map_err(|_| Status::cancelled("caller went away"))?;
        Ok((out_tx, out_rx, self.monitor.metrics.relay_started()))
    }

    /// A UDP flow to a socket bound on `port` inside the container, sent to
    /// that socket's own address (loopback of its family for a wildcard).
    async fn dial_udp(
        &self,
        mut inbound: Streaming<RelayFrame>,
        port: u16,
    ) -> Result<Response<ReceiverStream<Result<RelayFrame, Status>>>, Status> {
        let bound = self.monitor.sockets(Protocol::Udp, port).await?;
        let candidates = candidates(&bound, port);
        if candidates.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no UDP socket bound on port {port} inside the container"
            )));
        }
        // Connecting a UDP socket sends nothing; it fails only where the
        // address cannot be used at all (`::1` with IPv6 off).
        let mut last_err = None;
        let mut connected = None;
        for addr in candidates {
            let local: SocketAddr = if addr.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = async {
                let s = porthole::net::bind_udp(local)?;
                s.connect(addr).await?;
                std::io::Result::Ok(s)
            };
            match socket.await {
                Ok(s) => {
                    connected = Some((s, addr));
                    break;
                }
                Err(e) => last_err = Some(format!("{addr}: {e}")),
            }
        }
        let (socket, addr) = connected.ok_or_else(|| {
            Status::unavailable(format!(
                "cannot reach UDP port {port}: {}",
                last_err.unwrap_or_default()
            ))
        })?;
        let (out_tx, out_rx, count) = self.answer(addr).await?;
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
            let result = tokio::select! {
                result = udp_flow(socket, &mut inbound, &out_tx, &sent, &received) => {
                    result.map_err(|e| broken(port, &e))
                }
                _ = shutdown.cancelled() => Err(Status::unavailable(format!(
                    "monitor-svc is shutting down; the UDP flow to port {port} ended"
                ))),
            };
            if let Err(status) = result {
                count.failed();
                drop(count);
                tracing::debug!(port, %addr, error = %status.message(), "udp flow ended badly");
                let _ = tokio::time::timeout(STATUS_WAIT, out_tx.send(Err(status))).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::reach;

    #[test]
    fn wildcards_are_reached_on_a_loopback_they_accept() {
        let at = |addr: &str, dual_stack| -> Vec<String> {
            reach(addr.parse().unwrap(), dual_stack, 80)
                .iter()
                .map(|a| a.to_string())
                .collect()
        };
        assert_eq!(at("0.0.0.0", false), ["127.0.0.1:80"]);
        assert_eq!(
            at("::", false),
            ["[::1]:80"],
            "IPv6-only: IPv4 would not reach it"
        );
        assert_eq!(
            at("::", true),
            ["127.0.0.1:80", "[::1]:80"],
            "dual-stack: IPv4 loopback first, it exists with IPv6 off"
        );
        assert_eq!(at("198.18.0.2", false), ["198.18.0.2:80"]);
        assert_eq!(at("::1", false), ["[::1]:80"]);
    }

    #[test]
    fn candidates_are_ipv4_first_and_each_once() {
        use porthole::pb::v1::Port;
        let port = |address: &str, dual_stack| Port {
            address: address.into(),
            dual_stack,
            port: 80,
            ..Default::default()
        };
        let all = super::candidates(&[port("::", true), port("127.0.0.1", false)], 80);
        let all: Vec<String> = all.iter().map(|a| a.to_string()).collect();
        assert_eq!(all, ["127.0.0.1:80", "[::1]:80"]);
    }
}
