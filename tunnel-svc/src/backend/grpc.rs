//! grpc backend: each host connection is one `Relay.Dial` stream on the
//! target's single HTTP/2 connection to monitor-svc.

use super::CarryError;
use crate::tunnel::Stats;
use porthole::auth::AuthChannel;
use porthole::net::ResetOnDrop;
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

impl Grpc {
    pub async fn carry(
        &self,
        mut conn: ResetOnDrop,
        port: u16,
        stats: &Stats,
    ) -> Result<(), CarryError> {
        let dialed = tokio::time::timeout(DIAL_TIMEOUT, self.dial(port))
            .await
            .map_err(|_| {
                CarryError::Dial(format!(
                    "monitor unreachable: no answer to the dial within {}s",
                    DIAL_TIMEOUT.as_secs()
                ))
            })?;
        let (tx, mut inbound) = dialed.map_err(|status| {
            // A status with a source is tonic's own (no answer from the
            // monitor); one without came from the monitor.
            let transport = std::error::Error::source(&status).is_some();
            CarryError::Dial(match status.code() {
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
        })?;
        // The far end is reached: an earlier failure no longer holds.
        stats.connected();
        // On failure `conn` is reset as it drops, and the stream ends
        // without close_write, so the monitor resets its side too.
        porthole::relay::pump(
            &mut *conn,
            &mut inbound,
            &tx,
            |f| f,
            &stats.bytes_in,
            &stats.bytes_out,
        )
        .await?;
        // Both directions ended. Let the last frames (our close_write) go
        // out and the monitor end the stream: dropping the response first
        // would cancel the request before it is sent. Its status says
        // whether the container side ended cleanly too.
        drop(tx);
        match tokio::time::timeout(FINISH_WAIT, inbound.message()).await {
            Ok(Ok(None)) => {
                conn.finish();
                Ok(())
            }
            Ok(Ok(Some(_))) => Err(PumpError::Protocol("data after close_write").into()),
            Ok(Err(status)) => Err(PumpError::Stream(status).into()),
            Err(_) => Err(CarryError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the monitor did not end the relay stream",
            ))),
        }
    }

    /// Opens a `Relay.Dial` stream to `port` and waits for the monitor to
    /// confirm it connected.
    async fn dial(
        &self,
        port: u16,
    ) -> Result<(mpsc::Sender<RelayFrame>, tonic::Streaming<RelayFrame>), tonic::Status> {
        let (tx, rx) = mpsc::channel(8);
        let dial = DialRequest {
            protocol: Protocol::Tcp as i32,
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
            }) => Ok((tx, inbound)),
            _ => Err(tonic::Status::internal("monitor did not confirm the dial")),
        }
    }
}
