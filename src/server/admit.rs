//! Who gets a connection slot: a connection must introduce itself whole
//! (an HTTP/2 preface, an HTTP/1 method, a raw relay line) within the
//! handshake timeout; until then it waits apart, each peer within its
//! share, and a peer past its share gives up its own oldest.

use super::*;

/// What a connection's first bytes say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Introduction {
    /// A whole raw relay request line ([`crate::rawrelay::MAGIC`]...`\n`).
    Raw,
    /// The HTTP/2 preface, or an HTTP/1 request line.
    Http,
}

/// What `first` (a connection's first bytes) is: `Ok(Some)` once whole,
/// `Ok(None)` while it may still become one, `Err` when it cannot. An
/// HTTP/1 request is introduced by its method and a space (hyper bounds
/// and times the rest); bytes that start nothing known go to hyper too,
/// which answers them at once.
pub(super) fn introduced(first: &[u8]) -> Result<Option<Introduction>, ()> {
    use crate::rawrelay::{MAGIC, MAX_LINE};
    if first.starts_with(MAGIC) || MAGIC.starts_with(first) {
        return match first.iter().position(|b| *b == b'\n') {
            Some(_) => Ok(Some(Introduction::Raw)),
            None if first.len() > MAGIC.len() + MAX_LINE => Err(()),
            None => Ok(None),
        };
    }
    let openings = std::iter::once(PREFACE).chain(METHODS.iter().copied());
    let mut could_be = false;
    for opening in openings {
        if first.starts_with(opening) {
            return Ok(Some(Introduction::Http));
        }
        could_be |= opening.starts_with(first);
    }
    Ok((!could_be).then_some(Introduction::Http))
}

/// Waits until the connection has introduced itself, within `timeout`;
/// `None` when it did not (silence, a close, too long a line).
pub(super) async fn introduction(stream: &TcpStream, timeout: Duration) -> Option<Introduction> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut first = vec![0u8; INTRODUCTION_MAX];
    // Legitimate clients send their introduction in one write, so the first
    // look nearly always finds it whole; a trickle is looked at less and
    // less often.
    let mut pause = Duration::from_millis(5);
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        match introduced(&first[..n]) {
            Ok(Some(kind)) => return Some(kind),
            Err(()) => return None,
            Ok(None) if tokio::time::Instant::now() + pause >= deadline => return None,
            Ok(None) => tokio::time::sleep(pause).await,
        }
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Connections still introducing themselves, oldest first. A peer holds at
/// most a quarter of the places; a new connection past that closes its own
/// peer's oldest, and past the cap the oldest of the peer holding most. So
/// a peer that trickles first lines only ever closes its own.
pub(super) struct Waiting {
    pub(super) cap: usize,
    pub(super) queue: std::sync::Mutex<Queue>,
}

#[derive(Default)]
pub(super) struct Queue {
    pub(super) next: u64,
    pub(super) turns: std::collections::VecDeque<(u64, std::net::IpAddr, CancellationToken)>,
    pub(super) per_peer: std::collections::HashMap<std::net::IpAddr, usize>,
}

impl Queue {
    /// Closes the oldest waiting connection of `ip`.
    pub(super) fn evict(&mut self, ip: std::net::IpAddr) {
        if let Some(i) = self.turns.iter().position(|(_, from, _)| *from == ip) {
            let (_, _, cancel) = self.turns.remove(i).expect("found");
            cancel.cancel();
            self.left(ip);
        }
    }

    pub(super) fn left(&mut self, ip: std::net::IpAddr) {
        if let Some(n) = self.per_peer.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&ip);
            }
        }
    }
}

/// A connection's place among the [`Waiting`]; leaves it when dropped.
pub(super) struct Turn {
    pub(super) waiting: Arc<Waiting>,
    pub(super) id: u64,
    pub(super) ip: std::net::IpAddr,
    pub(super) cancel: CancellationToken,
}

impl Waiting {
    pub(super) fn new(cap: usize) -> Waiting {
        Waiting {
            cap,
            queue: Default::default(),
        }
    }

    /// A place for a new connection from `ip`, and whether another was
    /// closed for it.
    pub(super) fn enter(self: &Arc<Self>, ip: std::net::IpAddr) -> (Turn, bool) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let share = (self.cap / 4).max(1);
        let mut evicted = false;
        if q.per_peer.get(&ip).copied().unwrap_or(0) >= share {
            q.evict(ip);
            evicted = true;
        } else if q.turns.len() >= self.cap {
            let greediest = q
                .per_peer
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(ip, _)| *ip);
            if let Some(greediest) = greediest {
                q.evict(greediest);
                evicted = true;
            }
        }
        q.next += 1;
        let (id, cancel) = (q.next, CancellationToken::new());
        q.turns.push_back((id, ip, cancel.clone()));
        *q.per_peer.entry(ip).or_default() += 1;
        let turn = Turn {
            waiting: self.clone(),
            id,
            ip,
            cancel,
        };
        (turn, evicted)
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut q = self.waiting.queue.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = q.turns.iter().position(|(id, _, _)| *id == self.id) {
            q.turns.remove(i);
            q.left(self.ip);
        }
    }
}

/// Releases a connection slot (and the peer's share) when the connection goes.
pub(super) struct Slot {
    pub(super) _permit: OwnedSemaphorePermit,
    pub(super) stats: Arc<ServerStats>,
    pub(super) peers: Peers,
    pub(super) ip: std::net::IpAddr,
}

impl Slot {
    /// A slot for a connection from `ip`, within the global limit and the
    /// peer's share; `None` when either is used up.
    pub(super) fn take(
        slots: &Arc<Semaphore>,
        per_peer: usize,
        peers: &Peers,
        ip: std::net::IpAddr,
        stats: &Arc<ServerStats>,
    ) -> Option<Slot> {
        let mut held = peers.lock().unwrap_or_else(|e| e.into_inner());
        let mine = held.entry(ip).or_default();
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) if *mine < per_peer => permit,
            _ => {
                if *mine == 0 {
                    held.remove(&ip);
                }
                return None;
            }
        };
        *mine += 1;
        stats.connections.fetch_add(1, Relaxed);
        Some(Slot {
            _permit: permit,
            stats: stats.clone(),
            peers: peers.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.connections.fetch_sub(1, Relaxed);
        let mut held = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}
