//! grpc backend: each host connection is one `Relay.Dial` stream on the
//! target's single HTTP/2 connection to monitor-svc.

use super::CarryError;
use crate::tunnel::Stats;
use porthole::pb::v1::{
    relay_client::RelayClient, relay_frame::Kind, DialRequest, Protocol, RelayFrame,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub struct Grpc {
    pub channel: Channel,
    pub token: Option<porthole::auth::Token>,
}

impl Grpc {
    pub async fn carry(&self, conn: TcpStream, port: u16, stats: &Stats) -> Result<(), CarryError> {
        let (tx, inbound) = self.dial(port).await.map_err(|status| {
            CarryError::Dial(match status.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    format!("monitor unreachable: {}", status.message())
                }
                _ => format!("monitor refused: {}", status.message()),
            })
        })?;
        // The far end is reached: an earlier failure no longer holds.
        stats.connected();
        porthole::relay::pump(conn, inbound, tx, |f| f, &stats.bytes_in, &stats.bytes_out).await?;
        Ok(())
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
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = &self.token {
            token.authorize(&mut req);
        }
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
