//! Follows one monitor's WatchEvents stream and reports the target's open
//! ports to the reconciler. Reconnects with backoff, resuming by
//! (instance_id, seq); the monitor answers with a snapshot when it
//! restarted or its buffer moved on. While the monitor is unreachable the
//! last known ports stand, so tunnels stay up.

use crate::backoff::Backoff;
use crate::reconcile::Command;
use porthole::auth::AuthChannel;
use porthole::pb::v1::{
    port_events_client::PortEventsClient, watch_events_response::Kind, EventType, Port,
    WatchEventsRequest,
};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub struct Watcher {
    pub target: String,
    /// Carries the monitor's token, if any.
    pub channel: AuthChannel,
    pub commands: mpsc::Sender<Command>,
}

#[derive(Default)]
struct Position {
    instance_id: String,
    seq: u64,
    ports: BTreeMap<String, Port>,
}

/// Largest message taken from a monitor. A snapshot holds every listening
/// port with its process (command lines are capped at 4 KiB each), so
/// tonic's 4 MiB default is too small for a container with many listeners.
pub const MAX_MESSAGE: usize = 256 << 20;

/// Why a port a monitor reported cannot be acted on, if it cannot: the
/// container is less trusted than the host, so nothing it sends is used
/// unchecked.
pub fn invalid(p: &Port) -> Option<String> {
    if p.port == 0 || p.port > 65535 {
        return Some(format!("port {} is not in 1..65535", p.port));
    }
    if p.address.parse::<std::net::IpAddr>().is_err() {
        return Some(format!(
            "address {:?} is not an IP address",
            porthole::text::clip(&p.address, 64)
        ));
    }
    None
}

impl Watcher {
    /// `p` if it is valid; otherwise logs why (at most once per interval).
    fn checked(&self, p: Port) -> Option<Port> {
        static LOG: porthole::telemetry::RateLimit =
            porthole::telemetry::RateLimit::new(Duration::from_secs(10));
        match invalid(&p) {
            None => Some(p),
            Some(why) => {
                if let Some(suppressed) = LOG.check() {
                    tracing::warn!(target = %self.target, error = %why, suppressed, "monitor reported an invalid port; ignored");
                }
                None
            }
        }
    }

    /// Tells the reconciler whether the monitor's stream is up.
    async fn link(&self, up: bool, instance_id: String, error: Option<String>) {
        let _ = self
            .commands
            .send(Command::Link {
                target: self.target.clone(),
                up,
                instance_id,
                error,
            })
            .await;
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut pos = Position::default();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let ended = tokio::select! {
                _ = shutdown.cancelled() => return,
                ended = self.follow(&mut pos, &mut backoff) => ended,
            };
            let why = match ended {
                Ok(()) => {
                    tracing::info!(target = %self.target, "monitor ended the stream; reconnecting");
                    "the monitor ended the stream".to_string()
                }
                Err(status) => {
                    tracing::warn!(
                        target = %self.target,
                        code = ?status.code(),
                        error = %status.message(),
                        "monitor unreachable; tunnels stay up, retrying"
                    );
                    format!(
                        "{:?}: {}",
                        status.code(),
                        porthole::text::clip(status.message(), 300)
                    )
                }
            };
            self.link(false, String::new(), Some(why)).await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn follow(&self, pos: &mut Position, backoff: &mut Backoff) -> Result<(), tonic::Status> {
        let req = tonic::Request::new(WatchEventsRequest {
            instance_id: pos.instance_id.clone(),
            after_seq: pos.seq,
        });
        let mut stream = PortEventsClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .watch_events(req)
            .await?
            .into_inner();
        // The monitor answered: the link is up, even when a resume has
        // nothing new to send.
        backoff.reset();
        self.link(true, pos.instance_id.clone(), None).await;
        while let Some(msg) = stream.message().await? {
            match msg.kind {
                Some(Kind::Snapshot(s)) => {
                    if s.instance_id != pos.instance_id {
                        tracing::info!(target = %self.target, instance_id = %porthole::text::clip(&s.instance_id, 64), ports = s.ports.len(), "monitor snapshot");
                        let id = porthole::text::clip(&s.instance_id, 64).into_owned();
                        self.link(true, id, None).await;
                    }
                    pos.instance_id = s.instance_id;
                    pos.seq = s.seq;
                    pos.ports = s
                        .ports
                        .into_iter()
                        .filter_map(|p| self.checked(p))
                        .map(|p| (p.key.clone(), p))
                        .collect();
                }
                Some(Kind::Event(e)) if e.seq > pos.seq => {
                    pos.seq = e.seq;
                    if let Some(port) = e.port {
                        if e.r#type == EventType::Closed as i32 {
                            pos.ports.remove(&port.key);
                        } else if let Some(port) = self.checked(port) {
                            pos.ports.insert(port.key.clone(), port);
                        }
                    }
                }
                _ => continue,
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
