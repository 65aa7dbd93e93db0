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
        let (tx, rx) = mpsc::channel(8);
        let dial = DialRequest {
            protocol: Protocol::Tcp as i32,
            port: u32::from(port),
        };
        tx.send(RelayFrame {
            kind: Some(Kind::Dial(dial)),
        })
        .await
        .map_err(|_| CarryError::Other("relay stream closed".into()))?;
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
            }) => {}
            _ => return Err(CarryError::Other("monitor did not confirm the dial".into())),
        }
        // The far end is reached: an earlier failure no longer holds.
        stats.connected();
        porthole::relay::pump(conn, inbound, tx, |f| f, &stats.bytes_in, &stats.bytes_out).await?;
        Ok(())
    }
}
