//! Follows one monitor's WatchEvents stream and reports the target's open
//! ports to the reconciler. Reconnects with backoff, resuming by
//! (instance_id, seq); the monitor answers with a snapshot when it
//! restarted or its buffer moved on. While the monitor is unreachable the
//! last known ports stand, so tunnels stay up.

use crate::backoff::Backoff;
use crate::model::{Listener, PortKey, Proto};
use crate::reconcile::{Handle, Link};
use porthole::auth::AuthChannel;
use porthole::pb::v1::{
    port_events_client::PortEventsClient, watch_events_response::Kind, EventType, Port, Protocol,
    WatchEventsRequest,
};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub struct Watcher {
    pub target: String,
    /// Carries the monitor's token, if any.
    pub channel: AuthChannel,
    pub reconciler: Handle,
    /// Listeners on these addresses are never reported (Docker's embedded
    /// DNS server).
    pub ignore: Vec<IpAddr>,
}

#[derive(Default)]
struct Position {
    instance_id: String,
    seq: u64,
    /// Open TCP listeners and UDP servers by the monitor's key.
    ports: BTreeMap<String, (Proto, Listener)>,
}

/// Largest message taken from a monitor. A snapshot holds every listening
/// port with its process (command lines are capped at 4 KiB each), so
/// tonic's 4 MiB default is too small for a container with many listeners.
pub const MAX_MESSAGE: usize = 256 << 20;

/// A port a monitor reported as a [`Listener`], or why it cannot be acted
/// on: the container is less trusted than the host, so nothing it sends is
/// used unchecked.
pub fn listener(p: &Port) -> Result<Listener, String> {
    let port = u16::try_from(p.port)
        .ok()
        .filter(|n| *n != 0)
        .ok_or_else(|| format!("port {} is not in 1..65535", p.port))?;
    let address: IpAddr = p.address.parse().map_err(|_| {
        format!(
            "address {:?} is not an IP address",
            porthole::text::clip(&p.address, 64)
        )
    })?;
    Ok(Listener {
        port,
        address,
        dual_stack: p.dual_stack,
        process: p.process.clone(),
        since: None,
    })
}

/// Why a monitor cannot be followed, in words that apply: the monitor's
/// own status (`Code: message`), or, when the connection itself failed,
/// the cause (an address that refused, a monitor that could not start in
/// a container) without the layers' wrapping words.
fn describe(status: &tonic::Status) -> String {
    /// What the gRPC and HTTP layers add around a connection's failure.
    const WRAPPING: [&str; 3] = [
        "transport error",
        "client error (Connect)",
        "error trying to connect",
    ];
    let mut parts: Vec<String> = Vec::new();
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        let part = e.to_string();
        if !WRAPPING.contains(&part.as_str()) && !parts.iter().any(|p| p.contains(&part)) {
            parts.push(part);
        }
        cause = e.source();
    }
    let text = if parts.is_empty() {
        format!("{:?}: {}", status.code(), status.message())
    } else {
        parts.join(": ")
    };
    porthole::text::clip(&text, 300).into_owned()
}

/// The open ports among `ports`, with their listeners.
fn by_port(ports: &BTreeMap<String, (Proto, Listener)>) -> BTreeMap<PortKey, Vec<Listener>> {
    let mut open: BTreeMap<PortKey, Vec<Listener>> = BTreeMap::new();
    for (proto, l) in ports.values() {
        open.entry((*proto, l.port)).or_default().push(l.clone());
    }
    open
}

impl Watcher {
    /// `p` as a listener if it is a valid TCP listener or UDP server (the
    /// monitor's `server` flag: UDP client sockets are never forwarded);
    /// logs (at most once per interval) why an invalid one is ignored.
    fn checked(&self, p: &Port) -> Option<(Proto, Listener)> {
        static LOG: porthole::telemetry::RateLimit =
            porthole::telemetry::RateLimit::new(Duration::from_secs(10));
        let proto = match Protocol::try_from(p.protocol) {
            Ok(Protocol::Tcp) => Proto::Tcp,
            Ok(Protocol::Udp) if p.server => Proto::Udp,
            _ => return None,
        };
        match listener(p) {
            Ok(l) if self.ignore.contains(&l.address) => None,
            Ok(l) => Some((proto, l)),
            Err(why) => {
                if let Some(suppressed) = LOG.check() {
                    tracing::warn!(error = %why, suppressed, "monitor reported an invalid port; ignored");
                }
                None
            }
        }
    }

    /// Follows the monitor until `shutdown`, inside a `watch{target}` span.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = tracing::info_span!("watch", target = %self.target);
        self.follow_forever(shutdown).instrument(span).await
    }

    async fn follow_forever(self, shutdown: CancellationToken) {
        // The same failure again is logged at debug: the target shows it.
        let mut last_warned = String::new();
        let mut pos = Position::default();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let ended = tokio::select! {
                _ = shutdown.cancelled() => return,
                ended = self.follow(&mut pos, &mut backoff) => ended,
            };
            let why = match ended {
                Ok(()) => {
                    tracing::info!("monitor ended the stream; reconnecting");
                    "the monitor ended the stream".to_string()
                }
                Err(status) => {
                    let why = describe(&status);
                    if why != last_warned {
                        tracing::warn!(code = ?status.code(), error = %why, "monitor unreachable; tunnels stay up, retrying");
                    } else {
                        tracing::debug!(error = %why, "monitor still unreachable");
                    }
                    last_warned.clone_from(&why);
                    why
                }
            };
            let target = &self.target;
            self.reconciler
                .link(target, Link::Down { error: why })
                .await;
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
        let up = Link::Up {
            instance_id: pos.instance_id.clone(),
        };
        self.reconciler.link(&self.target, up).await;
        use futures_util::{FutureExt, StreamExt};
        while let Some(msg) = stream.message().await? {
            // Everything already here is taken in one go: a wave of ports
            // closing (or opening) is one change for the reconciler, not a
            // change per port.
            let mut batch = vec![msg];
            while batch.len() < MAX_BATCH {
                match stream.next().now_or_never() {
                    Some(Some(next)) => batch.push(next?),
                    _ => break,
                }
            }
            let mut changed = false;
            for msg in batch {
                changed |= self.apply(msg, pos).await;
            }
            if changed
                && !self
                    .reconciler
                    .ports(&self.target, by_port(&pos.ports))
                    .await
            {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Takes one message of the stream into `pos`; whether it was news.
    async fn apply(&self, msg: porthole::pb::v1::WatchEventsResponse, pos: &mut Position) -> bool {
        match msg.kind {
            Some(Kind::Snapshot(s)) => {
                if s.instance_id != pos.instance_id {
                    tracing::info!(instance_id = %porthole::text::clip(&s.instance_id, 64), ports = s.ports.len(), "monitor snapshot");
                    let id = porthole::text::clip(&s.instance_id, 64).into_owned();
                    let up = Link::Up { instance_id: id };
                    self.reconciler.link(&self.target, up).await;
                }
                pos.instance_id = s.instance_id;
                pos.seq = s.seq;
                pos.ports = s
                    .ports
                    .iter()
                    .filter_map(|p| Some((p.key.clone(), self.checked(p)?)))
                    .collect();
            }
            Some(Kind::Event(e)) if e.seq > pos.seq => {
                pos.seq = e.seq;
                if let Some(port) = e.port {
                    if e.r#type == EventType::Closed as i32 {
                        pos.ports.remove(&port.key);
                    } else if let Some((proto, mut l)) = self.checked(&port) {
                        l.since = e.timestamp.as_ref().and_then(porthole::time::from_proto);
                        pos.ports.insert(port.key, (proto, l));
                    }
                }
            }
            _ => return false,
        }
        true
    }
}

/// Most stream messages taken into one change.
const MAX_BATCH: usize = 4096;
