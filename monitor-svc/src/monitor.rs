//! The monitor task: owns the detector, the event log and the subscribers.
//! It scans on a tick, appends each scan's changes atomically and pushes them
//! to subscribers; RPC handlers talk to it through [`Handle`].

use crate::detect::Detector;
use crate::log::{diff, Event, EventLog, Page, Since};
use crate::metrics::Metrics;
use crate::scan::ScanError;
use chrono::Utc;
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

pub type WatchItem = Result<WatchEventsResponse, Status>;

#[derive(Clone, Debug)]
pub struct Config {
    pub interval: Duration,
    pub buffer_size: usize,
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
        reply: oneshot::Sender<(u64, Vec<v1::Port>)>,
    },
    Watch {
        instance_id: String,
        after_seq: u64,
        reply: oneshot::Sender<mpsc::Receiver<WatchItem>>,
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
        self.ask(|reply| Command::Ports { reply }).await
    }

    /// A subscription: a Snapshot or the resumed events, then live events.
    pub async fn watch(
        &self,
        instance_id: String,
        after_seq: u64,
    ) -> Result<mpsc::Receiver<WatchItem>, Stopped> {
        self.ask(|reply| Command::Watch {
            instance_id,
            after_seq,
            reply,
        })
        .await
    }
}

/// Starts the monitor task. The first scan runs before any request is
/// answered, so ports already listening are logged as `opened` at start-up.
pub fn spawn(
    detector: Detector,
    config: Config,
    shutdown: CancellationToken,
) -> (Handle, JoinHandle<()>) {
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
        subscribers: Vec::new(),
        metrics,
    };
    let join = tokio::spawn(task.run(detector, config.interval, rx, shutdown));
    (handle, join)
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

struct Subscriber {
    tx: mpsc::Sender<WatchItem>,
    /// Fell behind: owes a fresh snapshot before any further event.
    resync: bool,
}

struct Monitor {
    instance_id: Arc<str>,
    log: EventLog,
    ports: BTreeMap<String, v1::Port>,
    subscribers: Vec<Subscriber>,
    metrics: Arc<Metrics>,
}

type ScanResult = (
    Detector,
    Result<BTreeMap<String, v1::Port>, ScanError>,
    Duration,
);

fn scan_in_background(mut detector: Detector) -> JoinHandle<ScanResult> {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let result = detector.poll();
        (detector, result, started.elapsed())
    })
}

impl Monitor {
    async fn run(
        mut self,
        detector: Detector,
        interval: Duration,
        mut commands: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) {
        let mut scanning = Some(scan_in_background(detector));
        let mut idle: Option<Detector> = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Answer nothing before the first scan: start-up ports come first.
        if let Some(first) = scanning.take() {
            match first.await {
                Ok(result) => idle = Some(self.scanned(result)),
                Err(e) => {
                    tracing::error!(error = %e, "scanner panicked");
                    return;
                }
            }
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(cmd) = commands.recv() => self.handle(cmd),
                _ = ticker.tick(), if idle.is_some() => {
                    scanning = idle.take().map(scan_in_background);
                }
                done = async { scanning.as_mut().expect("guarded").await }, if scanning.is_some() => {
                    scanning = None;
                    match done {
                        Ok(result) => idle = Some(self.scanned(result)),
                        Err(e) => {
                            tracing::error!(error = %e, "scanner panicked");
                            break;
                        }
                    }
                }
            }
        }
        for sub in self.subscribers.drain(..) {
            let _ = sub.tx.try_send(Err(Status::unavailable(
                "monitor-svc is shutting down; reconnect to resume",
            )));
        }
        self.metrics.subscribers.store(0, Relaxed);
    }

    fn scanned(&mut self, (detector, result, took): ScanResult) -> Detector {
        self.metrics.scan_took(took);
        match result {
            Ok(scanned) => {
                let changes = diff(&self.ports, &scanned);
                self.ports = scanned;
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
            }
            Err(e) => {
                self.metrics.scan_errors.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "scan failed; retrying next tick");
            }
        }
        self.resync_waiting();
        detector
    }

    fn snapshot(&self) -> WatchEventsResponse {
        WatchEventsResponse {
            kind: Some(Kind::Snapshot(v1::Snapshot {
                instance_id: self.instance_id.to_string(),
                seq: self.log.last_seq(),
                ports: self.ports.values().cloned().collect(),
            })),
        }
    }

    fn publish(&mut self, events: &[Event]) {
        for sub in &mut self.subscribers {
            if sub.resync {
                continue;
            }
            for e in events {
                let item = Ok(WatchEventsResponse {
                    kind: Some(Kind::Event(e.to_proto())),
                });
                if let Err(mpsc::error::TrySendError::Full(_)) = sub.tx.try_send(item) {
                    sub.resync = true;
                    self.metrics.resyncs.fetch_add(1, Relaxed);
                    tracing::info!("subscriber fell behind; it will get a fresh snapshot");
                    break;
                }
            }
        }
        self.drop_closed();
    }

    /// Sends owed snapshots to subscribers that have room again.
    fn resync_waiting(&mut self) {
        if self
            .subscribers
            .iter()
            .any(|s| s.resync && s.tx.capacity() > 0)
        {
            let snapshot = self.snapshot();
            for sub in self.subscribers.iter_mut().filter(|s| s.resync) {
                if sub.tx.try_send(Ok(snapshot.clone())).is_ok() {
                    sub.resync = false;
                }
            }
        }
        self.drop_closed();
    }

    fn drop_closed(&mut self) {
        self.subscribers.retain(|s| !s.tx.is_closed());
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
            Command::Ports { reply } => {
                let _ = reply.send((self.log.last_seq(), self.ports.values().cloned().collect()));
            }
            Command::Watch {
                instance_id,
                after_seq,
                reply,
            } => {
                let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
                let resumed = (instance_id == *self.instance_id)
                    .then(|| self.log.resume(after_seq))
                    .flatten()
                    .filter(|events| events.len() < SUBSCRIBER_QUEUE);
                match resumed {
                    Some(events) => {
                        for e in events {
                            let item = Ok(WatchEventsResponse {
                                kind: Some(Kind::Event(e.to_proto())),
                            });
                            tx.try_send(item)
                                .expect("fewer events than the queue holds");
                        }
                    }
                    None => tx
                        .try_send(Ok(self.snapshot()))
                        .expect("new queue has room"),
                }
                self.subscribers.push(Subscriber { tx, resync: false });
                self.metrics
                    .subscribers
                    .store(self.subscribers.len() as u64, Relaxed);
                let _ = reply.send(rx);
            }
        }
    }
}
