//! The host side of one tunnel: listeners on the host addresses, an accept
//! loop per address, and one task per connection that dials the container
//! through the backend and copies and counts the bytes (spliced in the
//! kernel between sockets, framed for relay streams). This is the only
//! place bytes are copied on the host, for every backend.

use crate::backend::{Backend, BackendCell, DialError, Upstream};
use porthole::net::ResetOnDrop;
use porthole::telemetry::RateLimit;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Connections and UDP flows carried right now, by every tunnel: when it
/// falls, freed memory is handed back (see [`crate::sys`]).
pub static LIVE: AtomicU64 = AtomicU64::new(0);

/// Live counters of one tunnel.
#[derive(Debug, Default)]
pub struct Stats {
    pub active: AtomicU64,
    pub total: AtomicU64,
    /// Host client → container.
    pub bytes_in: AtomicU64,
    /// Container → host client.
    pub bytes_out: AtomicU64,
    /// UDP datagrams host client → container.
    pub datagrams_in: AtomicU64,
    /// UDP datagrams container → host client.
    pub datagrams_out: AtomicU64,
    /// UDP datagrams from host clients no flow could take.
    pub datagrams_dropped: AtomicU64,
    /// UDP: bytes of datagrams waiting in the flows' queues.
    pub queued: std::sync::atomic::AtomicUsize,
    /// Connections failing in a row, until one gets through again: an
    /// ACTIVE tunnel whose far end is unreachable says so.
    failing: Mutex<Option<crate::model::Failing>>,
}

impl Stats {
    /// A connection failed; ListTunnels shows why, how many in a row and
    /// since when.
    pub fn set_error(&self, why: String) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        let now = failing.get_or_insert_with(|| crate::model::Failing {
            why: String::new(),
            count: 0,
            since: chrono::Utc::now(),
        });
        now.why = why;
        now.count += 1;
    }

    /// The far end was reached: the failures no longer hold.
    pub fn connected(&self) {
        self.failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    pub fn failing(&self) -> Option<crate::model::Failing> {
        self.failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// How long connections in flight get to finish on their own when their
/// tunnel closes or tunnel-svc stops; then they are reset.
pub const DRAIN: Duration = Duration::from_secs(2);

/// One warning per this interval for a tunnel's failing connections (any
/// client can make connections fail), with a count of the rest.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// How long a new connection waits for its path while the path is being
/// re-established (a monitor restarting, a container paused, a network
/// reconnected), and how many may wait at once per tunnel.
#[derive(Clone, Copy, Debug)]
pub struct Park {
    pub wait: Duration,
    pub max: usize,
}

impl Default for Park {
    fn default() -> Park {
        Park {
            wait: DEFAULT_PARK,
            max: MAX_PARKED,
        }
    }
}

/// `--park`'s default: longer than a monitor's restart, a short pause or a
/// network reconnect; shorter than a user's patience.
pub const DEFAULT_PARK: Duration = Duration::from_secs(15);

/// Connections of one tunnel waiting for their path at once; more fail
/// at their first failed dial.
pub const MAX_PARKED: usize = 256;

/// What the accept loops of one tunnel need.
pub struct Carry {
    pub container_port: u16,
    pub park: Park,
    pub stats: Arc<Stats>,
    /// Closes the listeners; connections in flight then get [`DRAIN`].
    pub cancel: CancellationToken,
    /// Tracks every connection task, so shutdown can wait for the drain.
    pub tracker: TaskTracker,
    /// `tunnel{id}`: every connection's span is inside it.
    pub span: tracing::Span,
}

/// A tunnel's accept loops share this.
struct Shared {
    carry: Carry,
    backend: Arc<BackendCell>,
    /// Failed connections, logged once per interval.
    failures: RateLimit,
    /// Failed accepts, logged once per interval.
    accept_errors: RateLimit,
    /// Connections waiting for their path now.
    parked: tokio::sync::Semaphore,
}

/// How a carried connection (or UDP flow) went wrong.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CarryError {
    /// The far end could not be reached: the tunnel's `error` says so.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// A connection that was carried ended badly (a reset, a peer gone).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("relay: {0}")]
    Relay(#[from] porthole::relay::PumpError),
}

/// Accepts connections on `listeners` until `cancel`, carrying each one to
/// the container through `backend`. The listeners are closed when it is
/// cancelled; connections in flight get [`DRAIN`] to finish, then are reset.
pub fn serve(listeners: Vec<TcpListener>, backend: Arc<BackendCell>, carry: Carry) {
    let shared = Arc::new(Shared {
        backend,
        failures: RateLimit::new(FAILURE_LOG_EVERY),
        accept_errors: RateLimit::new(porthole::net::ACCEPT_LOG_EVERY),
        parked: tokio::sync::Semaphore::new(carry.park.max),
        carry,
    });
    for listener in listeners {
        let shared = shared.clone();
        let span = shared.carry.span.clone();
        tokio::spawn(
            async move {
                loop {
                    let (conn, peer) = tokio::select! {
                        _ = shared.carry.cancel.cancelled() => break,
                        accepted = porthole::net::accept(&listener, &shared.accept_errors) => accepted,
                    };
                    let span = tracing::info_span!("conn", %peer);
                    let tracker = shared.carry.tracker.clone();
                    tracker.spawn(handle(ResetOnDrop::new(conn), shared.clone()).instrument(span));
                }
            }
            .instrument(span),
        );
    }
}

/// Carries one accepted connection and counts it.
async fn handle(conn: ResetOnDrop, shared: Arc<Shared>) {
    let carry = &shared.carry;
    let stats = &carry.stats;
    stats.active.fetch_add(1, Relaxed);
    stats.total.fetch_add(1, Relaxed);
    LIVE.fetch_add(1, Relaxed);
    let work = carry_one(conn, &shared);
    let result = porthole::shutdown::drained(work, &carry.cancel, DRAIN).await;
    match result {
        Some(Ok(())) => {}
        Some(Err(CarryError::Dial(why))) => {
            if let Some(suppressed) = shared.failures.check() {
                tracing::warn!(error = %why, suppressed, "connection failed");
            }
            stats.set_error(format!("last connection failed: {why}"));
        }
        Some(Err(e)) => tracing::debug!(error = %e, "connection broke; both ends reset"),
        None => tracing::debug!("connection still open after the drain; reset"),
    }
    stats.active.fetch_sub(1, Relaxed);
    LIVE.fetch_sub(1, Relaxed);
}

/// Dials the container's port through the target's backend as it is at
/// each try: a failed dial is tried again, with backoff, until the park
/// time is over (the path may be coming back: a new monitor brings a new
/// backend), unless too many connections of the tunnel wait already.
async fn dial_parked(shared: &Shared) -> Result<Upstream, DialError> {
    let Park { wait, .. } = shared.carry.park;
    let deadline = tokio::time::Instant::now() + wait;
    let mut slot = None;
    let mut delay = Duration::from_millis(20);
    loop {
        let backend: Arc<Backend> = shared.backend.get();
        let why = match backend.dial(shared.carry.container_port).await {
            Ok(upstream) => return Ok(upstream),
            Err(why) => why,
        };
        if slot.is_none() {
            slot = Some(shared.parked.try_acquire().map_err(|_| why.clone())?);
        }
        if tokio::time::Instant::now() + delay >= deadline {
            return Err(why);
        }
        tracing::debug!(error = %why, "dial failed; waiting for the path");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// Dials the container's port and copies both ways until both ends
/// finished. `conn` ends with a FIN only when the far side ended cleanly;
/// on any failure it (and the far side) is reset as it drops.
async fn carry_one(mut conn: ResetOnDrop, shared: &Shared) -> Result<(), CarryError> {
    let stats = &shared.carry.stats;
    let upstream = dial_parked(shared).await?;
    stats.connected();
    let (bytes_in, bytes_out) = (&stats.bytes_in, &stats.bytes_out);
    match upstream {
        Upstream::Tcp(mut up) | Upstream::Raw(mut up, _) => {
            porthole::splice::copy(&mut *conn, &mut *up, bytes_in, bytes_out).await?;
            up.finish();
        }
        Upstream::Forward {
            mut stream,
            ended_cleanly,
        } => {
            porthole::splice::copy_verified(
                &mut *conn,
                &mut stream,
                bytes_in,
                bytes_out,
                &*ended_cleanly,
            )
            .await?;
        }
        Upstream::Relay(mut relay) => {
            // On failure the stream ends without close_write, so the
            // monitor resets its side too.
            porthole::relay::pump(
                &mut *conn,
                &mut relay.inbound,
                &relay.tx,
                |f| f,
                bytes_in,
                bytes_out,
            )
            .await?;
            relay.finish().await?;
        }
    }
    conn.finish();
    Ok(())
}
