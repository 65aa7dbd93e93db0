//! grpc backend: each host connection is carried by monitor-svc. When the
//! monitor is reached over TCP, each gets a raw relay connection of its own
//! to the monitor's port (see [`porthole::rawrelay`]: bytes spliced by the
//! kernel at both ends); otherwise (the Docker exec stream, or a monitor
//! that does not offer the raw path) one `Relay.Dial` stream on the
//! target's single HTTP/2 connection.

use super::{DialError, Upstream};
use porthole::auth::AuthChannel;
use porthole::net::ResetOnDrop;
use porthole::pb::v1::{
    relay_client::RelayClient, relay_frame::Kind, DialRequest, Protocol, RelayFrame,
};
use porthole::rawrelay::{self, Answer};
use porthole::relay::PumpError;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::sync::Semaphore;
use tokio_stream::wrappers::ReceiverStream;

/// How long reaching the monitor and its dial to the port may take: a
/// monitor or a listener that drops packets fails the connection in time.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// A dial the monitor refused, in words: a missing or wrong token says
/// how to give it, where the user gives it (not in Docker mode, where
/// tunnel-svc hands each monitor its own).
fn monitor_said(unauthenticated: bool, message: &str, token: TokenFrom) -> DialError {
    if unauthenticated && token == TokenFrom::User {
        DialError::NoToken(message.to_string())
    } else {
        DialError::Monitor(message.to_string())
    }
}

/// Whether HTTP/2 refused the stream before the monitor saw it.
fn refused_stream(status: &tonic::Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cause = e.source();
    }
    false
}

/// A dial the monitor did not answer within [`DIAL_TIMEOUT`].
fn no_answer() -> DialError {
    DialError::MonitorUnreachable(format!(
        "no answer to the dial within {}s",
        DIAL_TIMEOUT.as_secs()
    ))
}

/// How long the monitor may take to end a relay stream whose connection
/// ended cleanly in both directions.
const FINISH_WAIT: Duration = Duration::from_secs(5);

pub struct Grpc {
    /// Carries the monitor's token, if any.
    pub channel: AuthChannel,
    /// Where that token came from.
    pub token: TokenFrom,
    /// The raw data path, when the monitor is reached over TCP.
    pub raw: Option<Raw>,
}

/// Where a monitor takes raw relay connections.
/// Where a monitor's token comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenFrom {
    /// `--monitor-token-file`/`--token-file`.
    User,
    /// Made by tunnel-svc and handed to the monitor it started.
    Handed,
}

pub struct Raw {
    pub host: String,
    pub port: u16,
    pub token: Option<porthole::auth::Token>,
    /// Set once the monitor answered a raw request as something else (an
    /// older monitor): Relay streams from then on.
    unsupported: AtomicBool,
    /// Raw connections open at once; beyond them, Relay streams. (The
    /// monitor counts one against its `--max-connections` only until its
    /// token is checked, and bounds open raw relays itself.)
    slots: Arc<Semaphore>,
    /// Raw connections being opened at once: until its token is checked a
    /// raw connection takes one of the monitor's per-peer connection slots
    /// (a quarter of `--max-connections`), so a burst waits here instead of
    /// being refused there.
    handshakes: Semaphore,
}

/// Raw relay connections one target opens at once.
const RAW_HANDSHAKES: usize = 8;

/// Raw relay connections one target holds at once.
pub const RAW_CONNECTIONS: usize = 1024;

impl Raw {
    pub fn new(host: String, port: u16, token: Option<porthole::auth::Token>) -> Raw {
        Raw {
            host,
            port,
            token,
            unsupported: AtomicBool::new(false),
            slots: Arc::new(Semaphore::new(RAW_CONNECTIONS)),
            handshakes: Semaphore::new(RAW_HANDSHAKES),
        }
    }

    /// A raw relay connection to TCP `port`, or why not; `Ok(None)` when
    /// the monitor does not offer the raw path or this process is out of
    /// file descriptors (a Relay stream then carries the connection).
    /// (`from`: where the token came from, for the words of a refusal.)
    async fn dial(&self, port: u16, from: TokenFrom) -> Result<Option<Upstream>, DialError> {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return Ok(None);
        };
        let Ok(_handshake) = self.handshakes.acquire().await else {
            return Ok(None);
        };
        let token = self.token.as_ref();
        let asked = async {
            let mut stream = porthole::net::connect(
                (self.host.as_str(), self.port),
                super::direct::CONNECT_TIMEOUT,
            )
            .await?;
            porthole::net::detect_dead_peer(&stream);
            let answer = rawrelay::request(&mut stream, port, token).await?;
            std::io::Result::Ok((stream, answer))
        };
        let (stream, answer) = match asked.await {
            Ok(asked) => asked,
            // Out of descriptors (the Relay stream needs none), or closed
            // without an answer (the monitor is at its connection limit;
            // the Relay stream shares the connection it has).
            Err(e)
                if porthole::net::is_exhaustion(&e)
                    || matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(DialError::MonitorUnreachable(e.to_string())),
        };
        match answer {
            Answer::Ok(_) => Ok(Some(Upstream::Raw(ResetOnDrop::new(stream), slot))),
            // The monitor's raw relays are all taken: a Relay stream.
            Answer::Err {
                code: tonic::Code::ResourceExhausted,
                ..
            } => Ok(None),
            Answer::Err { code, message } => Err(monitor_said(
                code == tonic::Code::Unauthenticated,
                &message,
                from,
            )),
            Answer::Unknown(what) => {
                if !self.unsupported.swap(true, Relaxed) {
                    tracing::info!(answer = %what, "the monitor offers no raw relay path; tunnel bytes go in Relay streams");
                }
                Ok(None)
            }
        }
    }
}

/// A `Relay.Dial` stream the monitor confirmed: frames out, frames in.
pub struct RelayStream {
    pub tx: mpsc::Sender<RelayFrame>,
    pub inbound: tonic::Streaming<RelayFrame>,
}

impl RelayStream {
    /// After both directions ended cleanly: lets the last frames (our
    /// close_write) go out and waits for the monitor to end the stream,
    /// whose status says whether the container side ended cleanly too.
    /// Dropping the response first would cancel the request before it is
    /// sent.
    pub async fn finish(self) -> Result<(), PumpError> {
        let RelayStream { tx, mut inbound } = self;
        drop(tx);
        match tokio::time::timeout(FINISH_WAIT, inbound.message()).await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(_))) => Err(PumpError::Protocol("data after close_write")),
            Ok(Err(status)) => Err(PumpError::Stream(status)),
            Err(_) => Err(PumpError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the monitor did not end the relay stream",
            ))),
        }
    }
}

impl Grpc {
    /// A connection to TCP `port` through the monitor: a raw relay
    /// connection when it can, else a relay stream; waits (bounded) for the
    /// monitor to connect it.
    pub async fn dial(&self, port: u16) -> Result<Upstream, DialError> {
        if let Some(raw) = self.raw.as_ref().filter(|r| !r.unsupported.load(Relaxed)) {
            let dialed = tokio::time::timeout(DIAL_TIMEOUT, raw.dial(port, self.token))
                .await
                .map_err(|_| no_answer())?;
            if let Some(upstream) = dialed? {
                return Ok(upstream);
            }
        }
        self.dial_as(Protocol::Tcp, port).await.map(Upstream::Relay)
    }

    /// Opens a UDP flow to `port`: the monitor confirms only a port it sees
    /// bound.
    pub async fn dial_udp(&self, port: u16) -> Result<RelayStream, DialError> {
        self.dial_as(Protocol::Udp, port).await
    }

    async fn dial_as(&self, protocol: Protocol, port: u16) -> Result<RelayStream, DialError> {
        // The monitor may refuse a new stream when it still counts streams
        // that already ended here (HTTP/2 REFUSED_STREAM: it did nothing
        // with it, so trying again is safe).
        let open = async {
            let mut attempt = 0;
            loop {
                match self.open(protocol, port).await {
                    Err(status) if refused_stream(&status) && attempt < 20 => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(5 * attempt)).await;
                    }
                    other => return other,
                }
            }
        };
        let dialed = tokio::time::timeout(DIAL_TIMEOUT, open)
            .await
            .map_err(|_| no_answer())?;
        dialed.map_err(|status| {
            // A status with a source is tonic's own (no answer from the
            // monitor); one without came from the monitor.
            let transport = std::error::Error::source(&status).is_some();
            match status.code() {
                tonic::Code::Unavailable if transport => {
                    DialError::MonitorUnreachable(status.message().to_string())
                }
                code => monitor_said(
                    code == tonic::Code::Unauthenticated,
                    status.message(),
                    self.token,
                ),
            }
        })
    }

    /// Opens a `Relay.Dial` stream to `port` and waits for the monitor to
    /// confirm it connected.
    async fn open(&self, protocol: Protocol, port: u16) -> Result<RelayStream, tonic::Status> {
        let (tx, rx) = mpsc::channel(8);
        let dial = DialRequest {
            protocol: protocol as i32,
            port: u32::from(port),
        };
        tx.send(RelayFrame {
            kind: Some(Kind::Dial(dial)),
        })
        .await
        .map_err(|_| tonic::Status::cancelled("relay stream closed"))?;
        let req = tonic::Request::new(ReceiverStream::new(rx));
        let mut inbound = RelayClient::new(self.channel.clone())
            .dial(req)
            .await?
            .into_inner();
        match inbound.message().await? {
            Some(RelayFrame {
                kind: Some(Kind::Dialed(_)),
            }) => Ok(RelayStream { tx, inbound }),
            _ => Err(tonic::Status::internal("monitor did not confirm the dial")),
        }
    }
}

/// A lazily connecting channel to a monitor, tuned for relaying: no Nagle,
/// large HTTP/2 windows, keepalives that notice a dead monitor. Every call
/// on it carries `token`.
pub fn monitor_channel(
    url: &crate::config::MonitorUrl,
    token: Option<porthole::auth::Token>,
) -> anyhow::Result<porthole::auth::AuthChannel> {
    let endpoint = monitor_endpoint(tonic::transport::Endpoint::from_shared(url.endpoint())?)
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true);
    Ok(porthole::auth::with_token(endpoint.connect_lazy(), token))
}

/// What every connection to a monitor is tuned with, whatever carries it
/// (TCP, or a Docker exec stream): large HTTP/2 windows for relaying, and
/// keepalives that notice a dead monitor.
pub fn monitor_endpoint(endpoint: tonic::transport::Endpoint) -> tonic::transport::Endpoint {
    endpoint
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(porthole::server::STREAM_WINDOW)
        .initial_connection_window_size(porthole::server::CONNECTION_WINDOW)
}
