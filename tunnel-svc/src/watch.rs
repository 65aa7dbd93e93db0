//! Follows one monitor's WatchEvents stream and reports the target's open
//! ports to the reconciler. Reconnects with backoff, resuming by
//! (instance_id, seq); the monitor answers with a snapshot when it
//! restarted or its buffer moved on. While the monitor is unreachable the
//! last known ports stand, so tunnels stay up.

use crate::backoff::Backoff;
use crate::reconcile::Command;
use porthole::pb::v1::{
    port_events_client::PortEventsClient, watch_events_response::Kind, EventType, Port,
    WatchEventsRequest,
};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub struct Watcher {
    pub target: String,
    pub channel: Channel,
    pub token: Option<porthole::auth::Token>,
    pub commands: mpsc::Sender<Command>,
}

#[derive(Default)]
struct Position {
    instance_id: String,
    seq: u64,
    ports: BTreeMap<String, Port>,
}

impl Watcher {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut pos = Position::default();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let ended = tokio::select! {
                _ = shutdown.cancelled() => return,
                ended = self.follow(&mut pos, &mut backoff) => ended,
            };
            match ended {
                Ok(()) => {
                    tracing::info!(target = %self.target, "monitor ended the stream; reconnecting")
                }
                Err(status) => tracing::warn!(
                    target = %self.target,
                    code = ?status.code(),
                    error = %status.message(),
                    "monitor unreachable; tunnels stay up, retrying"
                ),
            }
            let _ = self
                .commands
                .send(Command::Link {
                    target: self.target.clone(),
                    up: false,
                })
                .await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn follow(&self, pos: &mut Position, backoff: &mut Backoff) -> Result<(), tonic::Status> {
        let mut req = tonic::Request::new(WatchEventsRequest {
            instance_id: pos.instance_id.clone(),
            after_seq: pos.seq,
        });
        if let Some(token) = &self.token {
            token.authorize(&mut req);
        }
        let mut stream = PortEventsClient::new(self.channel.clone())
            .watch_events(req)
            .await?
            .into_inner();
        let mut announced = false;
        while let Some(msg) = stream.message().await? {
            match msg.kind {
                Some(Kind::Snapshot(s)) => {
                    if s.instance_id != pos.instance_id {
                        tracing::info!(target = %self.target, instance_id = %s.instance_id, ports = s.ports.len(), "monitor snapshot");
                    }
                    pos.instance_id = s.instance_id;
                    pos.seq = s.seq;
                    pos.ports = s.ports.into_iter().map(|p| (p.key.clone(), p)).collect();
                }
                Some(Kind::Event(e)) if e.seq > pos.seq => {
                    pos.seq = e.seq;
                    if let Some(port) = e.port {
                        if e.r#type == EventType::Closed as i32 {
                            pos.ports.remove(&port.key);
                        } else {
                            pos.ports.insert(port.key.clone(), port);
                        }
                    }
                }
                _ => continue,
            }
            if !announced {
                announced = true;
                backoff.reset();
                let _ = self
                    .commands
                    .send(Command::Link {
                        target: self.target.clone(),
                        up: true,
                    })
                    .await;
            }
            let ports = pos.ports.values().cloned().collect();
            if self
                .commands
                .send(Command::Ports {
                    target: self.target.clone(),
                    ports,
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        Ok(())
    }
}
