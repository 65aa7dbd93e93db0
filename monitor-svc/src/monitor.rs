//! The monitor task: owns the detector, the event log and the subscribers.
//! It scans on a tick, appends each scan's changes atomically and pushes them
//! to subscribers; RPC handlers talk to it through [`Handle`].

use crate::detect::Detector;
use crate::log::{diff, Event, EventLog, Page, Since};
use crate::metrics::Metrics;
use chrono::Utc;
use porthole::fanout::{self, Fanout, Subscription};
use porthole::pb::v1::{self, watch_events_response::Kind, EventType, WatchEventsResponse};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// Messages queued per WatchEvents subscriber before it counts as slow.
pub const SUBSCRIBER_QUEUE: usize = 256;
/// Bytes (encoded) queued per WatchEvents subscriber before it counts as
/// slow. Queued items are shared between subscribers, so this bounds what
/// one subscriber can keep alive, not a copy per subscriber.
pub const SUBSCRIBER_BYTES: usize = 1 << 20;
/// How often a subscriber that fell behind is checked for room for its
/// fresh snapshot.
const RESYNC_CHECK: Duration = Duration::from_millis(100);
/// How often subscribers that went away are forgotten when no event does it.
const HOUSEKEEPING: Duration = Duration::from_secs(5);

pub type WatchItem = fanout::Item<WatchEventsResponse>;

#[derive(Clone, Debug)]
pub struct Config {
    pub interval: Duration,
    pub buffer_size: usize,
    /// WatchEvents streams at once; more are refused (RESOURCE_EXHAUSTED).
    pub max_subscribers: usize,
}

/// The answer to a since-query, with where the log stands.
#[derive(Debug)]
pub struct EventsReply {
    pub page: Page,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// The monitor task stopped (shutdown).
#[derive(Debug, thiserror::Error)]
#[error("monitor is shutting down")]
pub struct Stopped;

impl From<Stopped> for Status {
    fn from(e: Stopped) -> Status {
        Status::unavailable(e.to_string())
    }
}

enum Command {
    Events {
        since: Since,
        reply: oneshot::Sender<EventsReply>,
    },
    Ports {
        /// Only the sockets of this protocol and port, when set.
        only: Option<(v1::Protocol, u32)>,
        reply: oneshot::Sender<(u64, Vec<v1::Port>)>,
    },
    Watch {
        instance_id: String,
        after_seq: u64,
        reply: oneshot::Sender<Result<Subscription<WatchEventsResponse>, fanout::Full>>,
    },
}

/// A cheap, cloneable way to ask the monitor task things.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    pub instance_id: Arc<str>,
    pub metrics: Arc<Metrics>,
    pub source: &'static str,
}

impl Handle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    pub async fn events(&self, since: Since) -> Result<EventsReply, Stopped> {
        self.ask(|reply| Command::Events { since, reply }).await
    }

    /// The seq of the newest event, and every port listening as of it.
    pub async fn ports(&self) -> Result<(u64, Vec<v1::Port>), Stopped> {
        self.ask(|reply| Command::Ports { only: None, reply }).await
    }

    /// Every socket of one port and protocol right now (what Relay may
    /// dial): TCP listeners, or bound UDP sockets.
    pub async fn sockets(
        &self,
        protocol: v1::Protocol,
        port: u16,
    ) -> Result<Vec<v1::Port>, Stopped> {
        let only = Some((protocol, u32::from(port)));
        let (_, ports) = self.ask(|reply| Command::Ports { only, reply }).await?;
        Ok(ports)
    }

    /// A subscription: a Snapshot or the resumed events, then live events.
    pub async fn watch(
        &self,
        instance_id: String,
        after_seq: u64,
    ) -> Result<Subscription<WatchEventsResponse>, Status> {
        let subscribed = self
            .ask(|reply| Command::Watch {
                instance_id,
                after_seq,
                reply,
            })
            .await?;
        subscribed.map_err(|full| {
            self.metrics.refused_subscribers.fetch_add(1, Relaxed);
            full.into()
        })
    }
}

/// Starts the monitor task. The first scan runs before any request is
/// answered, so ports already listening are logged as `opened` at start-up.
pub fn spawn(
    detector: Detector,
    config: Config,
    shutdown: CancellationToken,
) -> std::io::Result<(Handle, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(64);
    let instance_id: Arc<str> = new_instance_id().into();
    let metrics = Arc::new(Metrics::default());
    let handle = Handle {
        tx,
        instance_id: instance_id.clone(),
        metrics: metrics.clone(),
        source: match detector.source() {
            crate::scan::Source::Netlink => "netlink",
            crate::scan::Source::Procfs => "procfs",
        },
    };
    let task = Monitor {
        instance_id,
        log: EventLog::new(config.buffer_size),
        ports: BTreeMap::new(),
        subscribers: subscribers(config.max_subscribers),
        snapshot: None,
        metrics,
    };
    let (scans_tx, scans_rx) = mpsc::channel(4);
    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    let thread = spawn_detector(
        detector,
        config.interval,
        handle.metrics.clone(),
        scans_tx,
        stop_rx,
    )?;
    let join = tokio::spawn(async move {
        task.run(scans_rx, rx, shutdown).await;
        drop(stop_tx);
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    });
    Ok((handle, join))
}

/// A random-enough id for this run: time and pid, so a restarted monitor is
/// never mistaken for the previous one.
fn new_instance_id() -> String {
    let now = Utc::now();
    format!(
        "{:x}-{:x}",
        now.timestamp_nanos_opt().unwrap_or_default(),
        std::process::id()
    )
}

fn subscribers(max: usize) -> Fanout<WatchEventsResponse> {
    let bounds = fanout::Bounds {
        items: SUBSCRIBER_QUEUE,
        bytes: SUBSCRIBER_BYTES,
        subscribers: max,
    };
    Fanout::new(bounds, prost::Message::encoded_len)
}

struct Monitor {
    instance_id: Arc<str>,
    log: EventLog,
    ports: BTreeMap<String, v1::Port>,
    subscribers: Fanout<WatchEventsResponse>,
    /// The snapshot of the current ports, built once per change and shared
    /// by every subscriber that needs it; dropped whenever the ports change.
    snapshot: Option<Arc<WatchEventsResponse>>,
    metrics: Arc<Metrics>,
}

/// What the detector thread reports.
enum Scan {
    /// The ports now, sent on the first scan and whenever they changed.
    Ports(BTreeMap<String, v1::Port>),
}

fn snapshot(
    instance_id: &str,
    log: &EventLog,
    ports: &BTreeMap<String, v1::Port>,
) -> WatchEventsResponse {
    WatchEventsResponse {
        kind: Some(Kind::Snapshot(v1::Snapshot {
            instance_id: instance_id.to_string(),
            seq: log.last_seq(),
            ports: ports.values().cloned().collect(),
        })),
    }
}

/// Runs the detector on a thread of its own: it scans every `interval` and
/// wakes the monitor task only when the ports changed, so an idle monitor
/// costs one socket dump and a compare per tick. It stops when `stop` is
/// dropped or the monitor task goes away.
fn spawn_detector(
    mut detector: Detector,
    interval: Duration,
    metrics: Arc<Metrics>,
    scans: mpsc::Sender<Scan>,
    stop: std::sync::mpsc::Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("detector".into())
        .spawn(move || {
            let mut last_error = String::new();
            loop {
                let started = Instant::now();
                let result = detector.poll_changed();
                metrics.scan_took(started.elapsed());
                match result {
                    Ok(Some(ports)) => {
                        if scans.blocking_send(Scan::Ports(ports)).is_err() {
                            return;
                        }
                        last_error.clear();
                    }
                    Ok(None) => last_error.clear(),
                    Err(e) => {
                        metrics.scan_errors.fetch_add(1, Relaxed);
                        let msg = e.to_string();
                        if msg != last_error {
                            tracing::warn!(error = %msg, "scan failed; retrying every tick");
                            last_error = msg;
                        }
                    }
                }
                match stop.recv_timeout(interval) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                    _ => return,
                }
            }
        })
}

impl Monitor {
    async fn run(
        mut self,
        mut scans: mpsc::Receiver<Scan>,
        mut commands: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) {
        // Answer nothing before the first scan: start-up ports come first.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            first = scans.recv() => match first {
                Some(scan) => self.scanned(scan),
                None => return,
            },
        }
        // Notices subscribers that went away while nothing happened.
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut resync = tokio::time::interval(RESYNC_CHECK);
        resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let lagging = self.subscribers.any_behind();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(cmd) = commands.recv() => self.handle(cmd),
                scan = scans.recv() => match scan {
                    Some(scan) => self.scanned(scan),
                    None => {
                        tracing::error!("detector stopped");
                        break;
                    }
                },
                _ = resync.tick(), if lagging => self.resync_waiting(),
                _ = housekeeping.tick() => {
                    self.subscribers.prune();
                    self.count_subscribers();
                }
            }
        }
        self.subscribers.close(Status::unavailable(
            "monitor-svc is shutting down; reconnect to resume",
        ));
        self.metrics.subscribers.store(0, Relaxed);
    }

    fn scanned(&mut self, scan: Scan) {
        let Scan::Ports(scanned) = scan;
        let changes = diff(&self.ports, &scanned);
        self.ports = scanned;
        self.snapshot = None;
        self.metrics.ports.store(self.ports.len() as u64, Relaxed);
        if !changes.is_empty() {
            let events = self.log.append_scan(Utc::now(), changes);
            for e in &events {
                let counter = match e.kind {
                    EventType::Closed => &self.metrics.events_closed,
                    _ => &self.metrics.events_opened,
                };
                counter.fetch_add(1, Relaxed);
                tracing::info!(seq = e.seq, kind = ?e.kind, port = %e.port.key, "port event");
            }
            self.publish(&events);
        }
        self.resync_waiting();
    }

    /// The current snapshot, built at most once per change of the ports.
    fn snapshot(&mut self) -> Arc<WatchEventsResponse> {
        let (id, log, ports) = (&self.instance_id, &self.log, &self.ports);
        self.snapshot
            .get_or_insert_with(|| Arc::new(snapshot(id, log, ports)))
            .clone()
    }

    fn publish(&mut self, events: &[Event]) {
        let items: Vec<Arc<WatchEventsResponse>> = events
            .iter()
            .map(|e| {
                Arc::new(WatchEventsResponse {
                    kind: Some(Kind::Event(e.to_proto())),
                })
            })
            .collect();
        let behind = self.subscribers.publish(&items);
        if behind > 0 {
            self.metrics.resyncs.fetch_add(behind as u64, Relaxed);
            tracing::info!(
                subscribers = behind,
                "subscriber fell behind; it will get a fresh snapshot"
            );
        }
        self.count_subscribers();
    }

    /// Sends owed snapshots to subscribers that have room again.
    fn resync_waiting(&mut self) {
        if self.subscribers.any_behind() {
            let snap = self.snapshot();
            self.subscribers.resync(|| vec![snap]);
        }
        self.count_subscribers();
    }

    fn count_subscribers(&self) {
        self.metrics
            .subscribers
            .store(self.subscribers.len() as u64, Relaxed);
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Events { since, reply } => {
                let _ = reply.send(EventsReply {
                    page: self.log.since(since),
                    first_seq: self.log.first_seq(),
                    last_seq: self.log.last_seq(),
                });
            }
            Command::Ports { only, reply } => {
                let ports = self
                    .ports
                    .values()
                    .filter(|p| {
                        only.is_none_or(|(proto, n)| p.port == n && p.protocol == proto as i32)
                    })
                    .cloned()
                    .collect();
                let _ = reply.send((self.log.last_seq(), ports));
            }
            Command::Watch {
                instance_id,
                after_seq,
                reply,
            } => {
                let resumed = (instance_id == *self.instance_id)
                    .then(|| self.log.resume(after_seq))
                    .flatten();
                let initial = match resumed {
                    Some(events) => events
                        .iter()
                        .map(|e| {
                            Arc::new(WatchEventsResponse {
                                kind: Some(Kind::Event(e.to_proto())),
                            })
                        })
                        .collect(),
                    None => vec![self.snapshot()],
                };
                let subscribed = self.subscribers.subscribe(initial);
                self.count_subscribers();
                let _ = reply.send(subscribed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use porthole::pb::v1::{Port, Protocol};

    fn monitor() -> Monitor {
        Monitor {
            instance_id: "test-instance".into(),
            log: EventLog::new(10_000),
            ports: BTreeMap::new(),
            subscribers: subscribers(1000),
            snapshot: None,
            metrics: Arc::new(Metrics::default()),
        }
    }

    fn ports(n: u32) -> BTreeMap<String, Port> {
        (1..=n)
            .map(|p| {
                let key = format!("tcp:0.0.0.0:{p}");
                let port = Port {
                    protocol: Protocol::Tcp as i32,
                    address: "0.0.0.0".into(),
                    port: p,
                    key: key.clone(),
                    process: None,
                    dual_stack: false,
                    server: true,
                };
                (key, port)
            })
            .collect()
    }

    async fn subscribe(
        m: &mut Monitor,
        instance_id: &str,
        after_seq: u64,
    ) -> Subscription<WatchEventsResponse> {
        let (reply, rx) = oneshot::channel();
        m.handle(Command::Watch {
            instance_id: instance_id.into(),
            after_seq,
            reply,
        });
        rx.await.unwrap().unwrap()
    }

    fn kind(item: WatchItem) -> Kind {
        item.unwrap().kind.clone().unwrap()
    }

    #[tokio::test]
    async fn slow_subscriber_is_resynced_never_skipped() {
        let mut m = monitor();
        let mut sub = subscribe(&mut m, "", 0).await;
        assert!(matches!(kind(sub.try_recv().unwrap()), Kind::Snapshot(_)));
        // Far more scans than the queue holds, nobody reading.
        let scans = SUBSCRIBER_QUEUE as u32 + 50;
        for n in 1..=scans {
            m.scanned(Scan::Ports(ports(n)));
        }
        assert!(
            m.subscribers.any_behind(),
            "the subscriber is marked behind"
        );
        assert_eq!(m.metrics.resyncs.load(Relaxed), 1);
        // What it got is a gapless prefix...
        let mut seqs = Vec::new();
        while let Some(item) = sub.try_recv() {
            match kind(item) {
                Kind::Event(e) => seqs.push(e.seq),
                Kind::Snapshot(_) => panic!("no snapshot while the queue is full"),
            }
        }
        assert_eq!(seqs, (1..=SUBSCRIBER_QUEUE as u64).collect::<Vec<_>>());
        // ...and once it has room, a snapshot of everything, then live events.
        m.resync_waiting();
        match kind(sub.try_recv().unwrap()) {
            Kind::Snapshot(s) => {
                assert_eq!(s.seq, u64::from(scans));
                assert_eq!(s.ports.len(), scans as usize);
            }
            other => panic!("expected a snapshot, got {other:?}"),
        }
        m.scanned(Scan::Ports(ports(scans + 1)));
        match kind(sub.try_recv().unwrap()) {
            Kind::Event(e) => assert_eq!(e.seq, u64::from(scans) + 1),
            other => panic!("expected the next event, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn resume_replays_only_for_the_same_instance() {
        let mut m = monitor();
        m.scanned(Scan::Ports(ports(3)));
        let mut resumed = subscribe(&mut m, "test-instance", 1).await;
        let seqs: Vec<u64> = std::iter::from_fn(|| resumed.try_recv())
            .map(|i| match kind(i) {
                Kind::Event(e) => e.seq,
                Kind::Snapshot(_) => panic!("resume must not snapshot"),
            })
            .collect();
        assert_eq!(seqs, [2, 3]);
        let mut other = subscribe(&mut m, "another-instance", 1).await;
        assert!(matches!(kind(other.try_recv().unwrap()), Kind::Snapshot(s) if s.seq == 3));
    }

    #[tokio::test]
    async fn closed_subscribers_are_dropped() {
        let mut m = monitor();
        let sub = subscribe(&mut m, "", 0).await;
        assert_eq!(m.metrics.subscribers.load(Relaxed), 1);
        drop(sub);
        m.scanned(Scan::Ports(ports(1)));
        assert_eq!(m.metrics.subscribers.load(Relaxed), 0);
    }
}
