//! One listening port that serves gRPC (with health and reflection, v1 and
//! v1alpha) and plain HTTP/1.1, behind an access [`Policy`], with every
//! client-driven resource bounded: connections, streams per connection,
//! connections that never send a request, and how long shutdown waits.

use crate::auth::{self, Policy};
use crate::net;
use crate::pb;
use crate::telemetry::RateLimit;
use axum::{body::Body, extract::Request, response::Response};
use http::StatusCode;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic_health::ServingStatus;

/// HTTP/2 flow-control windows. The 64 KiB default caps a relayed
/// connection far below what loopback carries; these bound per-stream and
/// per-connection buffering instead.
pub const STREAM_WINDOW: u32 = 2 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// How long in-flight calls get to finish once shutdown starts; then the
/// connections that remain are closed and `serve` returns.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

pub use crate::net::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

/// The keepalive timeout of a server on stdio (a monitor that tunnel-svc
/// started in a container): a paused container's clock runs on, so a ping
/// sent just before `docker pause` looks unanswered the moment it thaws;
/// with [`KEEPALIVE_TIMEOUT`] a pause of a few seconds would end the
/// monitor and reset every connection it carries. (Its stdio peer's death
/// is seen as the end of stdin anyway.)
pub const STDIO_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

const HEALTH: &str = "grpc.health.v1.Health";

/// Caps on what clients can make the server hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once, once they have introduced themselves;
    /// more are closed. One peer address may hold a quarter of them, so a
    /// single neighbour cannot take every slot.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection: a tunnel-svc's relay
    /// streams (one per UDP flow, up to its 256 by default, and its TCP
    /// connections where they ride the connection) beside its event stream.
    pub max_streams: u32,
    /// A connection must introduce itself whole — the HTTP/2 preface, an
    /// HTTP/1 request line or a raw relay line — within this time of being
    /// accepted, or it is closed. Connections still introducing themselves
    /// hold no slot: at most `max_connections / 2` wait at once, and the
    /// oldest gives way to a new one, so partial first lines trickled by
    /// any number of peers never lock a client out.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 256,
            max_streams: 1024,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// What the connection limits did, for `/metrics`.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections open now.
    pub connections: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub refused_connections: AtomicU64,
    /// Connections closed for not introducing themselves within
    /// `handshake_timeout` (or with something that is no introduction).
    pub silent_connections: AtomicU64,
    /// Connections still introducing themselves closed to make room for a
    /// newer one.
    pub evicted_connections: AtomicU64,
}

impl ServerStats {
    /// The counters in the Prometheus text format, named `PREFIX_...`.
    pub fn render(&self, prefix: &str, out: &mut String) {
        let rows = [
            (
                "connections",
                "gauge",
                "Client connections open now.",
                &self.connections,
            ),
            (
                "refused_connections_total",
                "counter",
                "Connections closed at once because the connection limit was reached.",
                &self.refused_connections,
            ),
            (
                "silent_connections_total",
                "counter",
                "Connections closed because they sent no whole first request in time.",
                &self.silent_connections,
            ),
            (
                "evicted_connections_total",
                "counter",
                "Connections still sending their first request closed to make room for newer ones.",
                &self.evicted_connections,
            ),
        ];
        for (name, kind, help, value) in rows {
            let name = format!("{prefix}_{name}");
            crate::prometheus::family(
                out,
                &name,
                kind,
                help,
                &[("", value.load(Relaxed).to_string())],
            );
        }
    }
}

/// What a service puts on its port.
pub struct App {
    /// The service's own gRPC services.
    pub grpc: Routes,
    /// Fully qualified names of those services, reported SERVING by health.
    pub grpc_names: Vec<&'static str>,
    /// Plain HTTP routes (`/healthz`, `/metrics`, ...).
    pub http: axum::Router,
    pub policy: Policy,
    pub limits: Limits,
    pub stats: Arc<ServerStats>,
    /// Takes the TCP connections that open with
    /// [`crate::rawrelay::MAGIC`] (the monitor's raw relay path) instead of
    /// the HTTP server, with the connection's slot: it holds the slot until
    /// the connection has proved it may stay (then its own bounds apply).
    pub raw: Option<RawHandler>,
}

/// See [`App::raw`].
pub type RawHandler = Arc<
    dyn Fn(TcpStream, ConnectionSlot) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// A connection's place among [`Limits::max_connections`] (and its peer's
/// share); given back when dropped.
pub struct ConnectionSlot(#[allow(dead_code)] Slot);

/// Where a server takes its connections from.
pub enum Listen {
    /// Clients connecting to a TCP port, within [`Limits`].
    Tcp(TcpListener),
    /// One connection on this process's stdin and stdout: the peer that
    /// started the process (tunnel-svc over a `docker exec` stream). The
    /// server returns once that connection ends.
    Stdio,
    /// Both: the stdio peer (which needs no token) and TCP clients (which
    /// do); `shutdown` is cancelled once the stdio connection ends.
    StdioAndTcp(TcpListener),
}

/// The one stdio connection, and what fires once it has ended.
fn stdio() -> (Conn, tokio::sync::oneshot::Receiver<()>) {
    let (done, ended) = tokio::sync::oneshot::channel::<()>();
    let stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    let conn = Conn {
        stream: Stream::Stdio(stdio),
        _slot: None,
        _done: Some(done),
    };
    (conn, ended)
}

/// Serves `app` on `listen` until `shutdown` is cancelled, then stops
/// accepting, gives in-flight calls [`SHUTDOWN_GRACE`] to finish, closes
/// what remains and returns. Streaming handlers must watch `shutdown`
/// themselves and end their streams.
pub async fn serve(
    listen: Listen,
    app: App,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    for name in &app.grpc_names {
        health
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    let keepalive_timeout = match listen {
        Listen::Tcp(_) => KEEPALIVE_TIMEOUT,
        Listen::Stdio | Listen::StdioAndTcp(_) => STDIO_KEEPALIVE_TIMEOUT,
    };
    let max_streams = app.limits.max_streams;
    let incoming = connections(listen, &app, &shutdown);
    let router = router(app, health_service)?;
    let server = tonic::transport::Server::builder()
        .accept_http1(true)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(keepalive_timeout))
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .max_concurrent_streams(Some(max_streams))
        .add_routes(Routes::from(router))
        .serve_with_incoming_shutdown(incoming, {
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                health
                    .set_service_status("", ServingStatus::NotServing)
                    .await;
            }
        });
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => served?,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            tracing::info!(grace = ?SHUTDOWN_GRACE, "connections still open after the shutdown grace; closing them");
        }
    }
    Ok(())
}

/// Every route of `app`'s port: its gRPC services, health, reflection (of
/// what this port serves) and its HTTP routes, behind its access policy.
fn router(
    app: App,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<axum::Router, ServeError> {
    // List only what this port serves (the descriptor set holds every
    // porthole service); symbols of the others still resolve.
    let reflection = || {
        app.grpc_names.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name(HEALTH),
            |b, name| b.with_service_name(*name),
        )
    };
    let routes = app
        .grpc
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    let policy = app.policy;
    Ok(routes
        .into_axum_router()
        .merge(app.http)
        .fallback(not_found)
        .layer(axum::middleware::from_fn(move |req, next| {
            auth::check(policy.clone(), req, next)
        })))
}

/// The connections the server takes from `listen`. With stdio, the stream
/// ends only once that connection has (an ended stream makes the server
/// send GOAWAY at once); with stdio and TCP, `shutdown` is cancelled then.
fn connections(
    listen: Listen,
    app: &App,
    shutdown: &CancellationToken,
) -> ReceiverStream<std::io::Result<Conn>> {
    let tcp = |listener| {
        let (limits, stats, raw) = (app.limits, app.stats.clone(), app.raw.clone());
        incoming(listener, limits, stats, raw, shutdown.clone())
    };
    match listen {
        Listen::Tcp(listener) => tcp(listener),
        Listen::Stdio => {
            let (tx, rx) = mpsc::channel(1);
            let (conn, ended) = stdio();
            tx.try_send(Ok(conn)).expect("an empty channel of one");
            tokio::spawn(async move {
                let _ = ended.await;
                drop(tx);
            });
            ReceiverStream::new(rx)
        }
        Listen::StdioAndTcp(listener) => {
            let (conn, ended) = stdio();
            let mut tcp = tcp(listener).into_inner();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let _ = ended.await;
                stop.cancel();
            });
            let (merged_tx, merged_rx) = mpsc::channel(64);
            merged_tx
                .try_send(Ok(conn))
                .expect("an empty channel of 64");
            tokio::spawn(async move {
                while let Some(c) = tcp.recv().await {
                    if merged_tx.send(c).await.is_err() {
                        return;
                    }
                }
            });
            ReceiverStream::new(merged_rx)
        }
    }
}

/// Accepts connections for the server: each is handed over once it has
/// introduced itself (see [`Limits::handshake_timeout`]) and found a slot
/// among `max_connections` within its peer's share.
fn incoming(
    listener: TcpListener,
    limits: Limits,
    stats: Arc<ServerStats>,
    raw: Option<RawHandler>,
    shutdown: CancellationToken,
) -> ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_peer = (limits.max_connections / 4).max(1);
    let peers: Peers = Arc::default();
    let waiting = Arc::new(Waiting::new((limits.max_connections / 2).max(1)));
    tokio::spawn(async move {
        static ACCEPT_LOG: RateLimit = RateLimit::new(net::ACCEPT_LOG_EVERY);
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = net::accept(&listener, &ACCEPT_LOG) => accepted,
            };
            let _ = stream.set_nodelay(true);
            let (turn, evicted) = waiting.enter(peer.ip());
            if evicted {
                stats.evicted_connections.fetch_add(1, Relaxed);
            }
            let (tx, stats, raw) = (tx.clone(), stats.clone(), raw.clone());
            let (slots, peers) = (slots.clone(), peers.clone());
            tokio::spawn(async move {
                let kind = tokio::select! {
                    _ = turn.cancel.cancelled() => None,
                    kind = introduction(&stream, limits.handshake_timeout) => kind,
                };
                let cancelled = turn.cancel.is_cancelled();
                drop(turn);
                let Some(kind) = kind else {
                    if !cancelled {
                        stats.silent_connections.fetch_add(1, Relaxed);
                    }
                    let _ = stream.set_zero_linger();
                    return;
                };
                let Some(slot) = Slot::take(&slots, per_peer, &peers, peer.ip(), &stats) else {
                    static REFUSED_LOG: RateLimit = RateLimit::new(net::ACCEPT_LOG_EVERY);
                    stats.refused_connections.fetch_add(1, Relaxed);
                    if let Some(suppressed) = REFUSED_LOG.check() {
                        tracing::warn!(%peer, max = limits.max_connections, per_peer, suppressed, "connection limit reached; closing new connections");
                    }
                    let _ = stream.set_zero_linger();
                    return;
                };
                match (kind, raw) {
                    (Introduction::Raw, Some(raw)) => raw(stream, ConnectionSlot(slot)).await,
                    _ => {
                        let conn = Conn {
                            stream: Stream::Tcp(stream),
                            _slot: Some(slot),
                            _done: None,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The HTTP/2 client preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How HTTP/1 requests start.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Most bytes looked at for an introduction (a raw relay line).
const INTRODUCTION_MAX: usize = crate::rawrelay::MAGIC.len() + crate::rawrelay::MAX_LINE + 1;

/// Connections held per peer address.
type Peers = Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

type StdioStream = tokio::io::Join<tokio::io::Stdin, tokio::io::Stdout>;

/// Calls `$f` on whichever stream a [`Conn`] holds.
macro_rules! on_stream {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.stream {
            Stream::Tcp($s) => $e,
            Stream::Stdio($s) => $e,
        }
    };
}

/// Unknown paths: `UNIMPLEMENTED` for gRPC callers, `404` for HTTP ones.
async fn not_found(req: Request) -> Response {
    let path = crate::text::clip(req.uri().path(), 200);
    if auth::is_grpc(&req) {
        let msg = format!("no such method {path}");
        let (parts, ()) = tonic::Status::unimplemented(msg)
            .into_http::<()>()
            .into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .body(Body::from(format!("no such path {path}\n")))
        .expect("static response")
}

mod admit;
mod conn;

use admit::*;
use conn::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_introduced_only_by_a_whole_first_line_or_preface() {
        assert_eq!(introduced(b""), Ok(None));
        assert_eq!(
            introduced(b"P"),
            Ok(None),
            "a preface or a POST in the making"
        );
        assert_eq!(introduced(&PREFACE[..20]), Ok(None));
        assert_eq!(introduced(PREFACE), Ok(Some(Introduction::Http)));
        assert_eq!(introduced(b"PORTHOLE-RELAY/1 tcp 80"), Ok(None));
        assert_eq!(
            introduced(b"PORTHOLE-RELAY/1 tcp 80 -\nbytes"),
            Ok(Some(Introduction::Raw))
        );
        assert_eq!(introduced(b"GE"), Ok(None));
        assert_eq!(introduced(b"GET /healthz"), Ok(Some(Introduction::Http)));
        // Garbage goes to hyper, which answers it.
        assert_eq!(introduced(b"\x16\x03\x01"), Ok(Some(Introduction::Http)));
        let mut raw = crate::rawrelay::MAGIC.to_vec();
        raw.extend(vec![b'a'; crate::rawrelay::MAX_LINE + 1]);
        assert_eq!(introduced(&raw), Err(()));
    }

    #[test]
    fn a_peer_trickling_first_lines_only_ever_closes_its_own() {
        let waiting = Arc::new(Waiting::new(8));
        let (a, b, c): (std::net::IpAddr, std::net::IpAddr, std::net::IpAddr) = (
            "198.18.0.1".parse().unwrap(),
            "198.18.0.2".parse().unwrap(),
            "198.18.0.3".parse().unwrap(),
        );
        let (legit, _) = waiting.enter(b);
        // `a` fills its share, then each new one closes its own oldest.
        let mut mine = Vec::new();
        for i in 0..10 {
            let (turn, evicted) = waiting.enter(a);
            assert_eq!(evicted, i >= 2, "connection {i}");
            mine.push(turn);
        }
        assert!(!legit.cancel.is_cancelled());
        assert_eq!(mine.iter().filter(|t| !t.cancel.is_cancelled()).count(), 2);
        // Full: the peer holding most gives way.
        let others: Vec<_> = (0..5).map(|_| waiting.enter(c)).collect();
        assert!(!legit.cancel.is_cancelled());
        assert!(others.iter().any(|(_, evicted)| *evicted));
        // Leaving frees the place.
        drop(mine);
        drop(others);
        let q = waiting.queue.lock().unwrap();
        assert_eq!((q.turns.len(), q.per_peer.len()), (1, 1));
    }
}
