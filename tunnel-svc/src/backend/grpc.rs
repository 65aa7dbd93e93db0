//! grpc backend: each host connection is one `Relay.Dial` stream on the
//! target's single HTTP/2 connection to monitor-svc.

use super::DialError;
use porthole::auth::AuthChannel;
use porthole::pb::v1::{
    relay_client::RelayClient, relay_frame::Kind, DialRequest, Protocol, RelayFrame,
};
use porthole::relay::PumpError;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// How long reaching the monitor and its dial to the port may take: a
/// monitor or a listener that drops packets fails the connection in time.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the monitor may take to end a relay stream whose connection
/// ended cleanly in both directions.
const FINISH_WAIT: Duration = Duration::from_secs(5);

pub struct Grpc {
    /// Carries the monitor's token, if any.
    pub channel: AuthChannel,
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
    /// Opens a relay stream to TCP `port` and waits (bounded) for the
    /// monitor to connect it.
    pub async fn dial(&self, port: u16) -> Result<RelayStream, DialError> {
        self.dial_as(Protocol::Tcp, port).await
    }

    /// Opens a UDP flow to `port`: the monitor confirms only a port it sees
    /// bound.
    pub async fn dial_udp(&self, port: u16) -> Result<RelayStream, DialError> {
        self.dial_as(Protocol::Udp, port).await
    }

    async fn dial_as(&self, protocol: Protocol, port: u16) -> Result<RelayStream, DialError> {
        let dialed = tokio::time::timeout(DIAL_TIMEOUT, self.open(protocol, port))
            .await
            .map_err(|_| {
                DialError(format!(
                    "monitor unreachable: no answer to the dial within {}s",
                    DIAL_TIMEOUT.as_secs()
                ))
            })?;
        dialed.map_err(|status| {
            // A status with a source is tonic's own (no answer from the
            // monitor); one without came from the monitor.
            let transport = std::error::Error::source(&status).is_some();
            DialError(match status.code() {
                tonic::Code::Unavailable if transport => {
                    format!("monitor unreachable: {}", status.message())
                }
                tonic::Code::Unauthenticated => format!(
                    "monitor refused: {}; give tunnel-svc the monitor's token with \
                     --monitor-token-file (monitor-svc logs where it keeps it)",
                    status.message()
                ),
                _ => format!("the monitor says: {}", status.message()),
            })
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
