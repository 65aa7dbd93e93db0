//! Pushing one stream of updates to many subscribers without ever waiting
//! on a slow one and without letting one grow memory: each subscriber has a
//! queue bounded in items and in bytes; one that fills it is marked behind,
//! gets nothing more, and is sent a fresh snapshot once its queue has room
//! again. Nothing is silently skipped: a subscriber sees a gapless prefix,
//! then a snapshot. Items are shared (`Arc`) between subscribers, so a
//! thousand subscribers hold one copy of each update, and the number of
//! subscribers is capped.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tonic::Status;

pub type Item<T> = Result<Arc<T>, Status>;

/// The receiving end of a subscription: a stream of shared items.
pub struct Subscription<T> {
    rx: mpsc::Receiver<(Item<T>, usize)>,
    queued: Arc<AtomicUsize>,
}

impl<T> Subscription<T> {
    /// The next item already queued, if any (for tests and polling callers).
    pub fn try_recv(&mut self) -> Option<Item<T>> {
        let (item, size) = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(size, Relaxed);
        Some(item)
    }
}

impl<T> futures_util::Stream for Subscription<T> {
    type Item = Item<T>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item<T>>> {
        self.rx.poll_recv(cx).map(|next| {
            next.map(|(item, size)| {
                self.queued.fetch_sub(size, Relaxed);
                item
            })
        })
    }
}

struct Subscriber<T> {
    tx: mpsc::Sender<(Item<T>, usize)>,
    /// Bytes of the items in its queue, lowered as the stream takes them.
    queued: Arc<AtomicUsize>,
    behind: bool,
}

impl<T> Subscriber<T> {
    /// Queues `item` if it fits both bounds (an item larger than the byte
    /// bound alone fits an empty queue).
    fn offer(&self, item: &Arc<T>, size: usize, max_bytes: usize) -> bool {
        let queued = self.queued.load(Relaxed);
        if queued != 0 && queued + size > max_bytes {
            return false;
        }
        let Ok(permit) = self.tx.try_reserve() else {
            return false;
        };
        self.queued.fetch_add(size, Relaxed);
        permit.send((Ok(item.clone()), size));
        true
    }

    fn room_for(&self, items: &[(Arc<T>, usize)], max_bytes: usize) -> bool {
        let bytes: usize = items.iter().map(|(_, s)| s).sum();
        let queued = self.queued.load(Relaxed);
        self.tx.capacity() >= items.len() && (queued == 0 || queued + bytes <= max_bytes)
    }
}

/// There are already as many subscribers as allowed.
#[derive(Debug, thiserror::Error)]
#[error("too many subscribers ({0}); try again later")]
pub struct Full(pub usize);

impl From<Full> for Status {
    fn from(e: Full) -> Status {
        Status::resource_exhausted(e.to_string())
    }
}

/// Bounds of a [`Fanout`].
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Items queued per subscriber.
    pub items: usize,
    /// Bytes queued per subscriber (as `size` measures them).
    pub bytes: usize,
    /// Subscribers at once.
    pub subscribers: usize,
}

pub struct Fanout<T> {
    bounds: Bounds,
    size: fn(&T) -> usize,
    subscribers: Vec<Subscriber<T>>,
}

impl<T> Fanout<T> {
    /// `size` measures an item (its encoded length) for the byte bound.
    pub fn new(bounds: Bounds, size: fn(&T) -> usize) -> Fanout<T> {
        Fanout {
            bounds,
            size,
            subscribers: Vec::new(),
        }
    }

    fn sized(&self, items: impl IntoIterator<Item = Arc<T>>) -> Vec<(Arc<T>, usize)> {
        items
            .into_iter()
            .map(|i| {
                let n = (self.size)(&i);
                (i, n)
            })
            .collect()
    }

    /// A new subscriber that first receives `initial` (or, when that does not
    /// fit its queue, a snapshot as soon as [`Fanout::resync`] runs).
    pub fn subscribe(&mut self, initial: Vec<Arc<T>>) -> Result<Subscription<T>, Full> {
        self.prune();
        if self.subscribers.len() >= self.bounds.subscribers {
            return Err(Full(self.bounds.subscribers));
        }
        let (tx, rx) = mpsc::channel(self.bounds.items);
        let queued = Arc::new(AtomicUsize::new(0));
        let mut sub = Subscriber {
            tx,
            queued: queued.clone(),
            behind: false,
        };
        let initial = self.sized(initial);
        if sub.room_for(&initial, self.bounds.bytes) {
            for (item, size) in &initial {
                assert!(sub.offer(item, *size, usize::MAX), "room was checked");
            }
        } else {
            sub.behind = true;
        }
        self.subscribers.push(sub);
        Ok(Subscription { rx, queued })
    }

    /// Sends `items` to every subscriber that is keeping up. Returns how
    /// many fell behind just now.
    pub fn publish(&mut self, items: &[Arc<T>]) -> usize {
        self.prune();
        let items = self.sized(items.iter().cloned());
        let max_bytes = self.bounds.bytes;
        let mut fell_behind = 0;
        for sub in self.subscribers.iter_mut().filter(|s| !s.behind) {
            for (item, size) in &items {
                if !sub.offer(item, *size, max_bytes) {
                    sub.behind = true;
                    fell_behind += 1;
                    break;
                }
            }
        }
        fell_behind
    }

    /// Sends a snapshot to each subscriber that is behind and has room for
    /// it again. `snapshot` is built only when someone needs it, and once.
    pub fn resync(&mut self, snapshot: impl FnOnce() -> Vec<Arc<T>>) {
        self.prune();
        let mut built: Option<Vec<(Arc<T>, usize)>> = None;
        let mut snapshot = Some(snapshot);
        let size = self.size;
        let max_bytes = self.bounds.bytes;
        for sub in self.subscribers.iter_mut().filter(|s| s.behind) {
            let items = built.get_or_insert_with(|| {
                (snapshot.take().expect("built once"))()
                    .into_iter()
                    .map(|i| {
                        let n = size(&i);
                        (i, n)
                    })
                    .collect()
            });
            if sub.room_for(items, max_bytes) {
                for (item, size) in items.iter() {
                    assert!(sub.offer(item, *size, usize::MAX), "room was checked");
                }
                sub.behind = false;
            }
        }
    }

    /// Forgets subscribers whose stream has gone away.
    pub fn prune(&mut self) {
        self.subscribers.retain(|s| !s.tx.is_closed());
    }

    pub fn any_behind(&self) -> bool {
        self.subscribers.iter().any(|s| s.behind)
    }

    pub fn len(&self) -> usize {
        self.subscribers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subscribers.is_empty()
    }

    /// Ends every stream with `status` (where the queue has room for it).
    pub fn close(&mut self, status: Status) {
        for sub in self.subscribers.drain(..) {
            let _ = sub.tx.try_send((Err(status.clone()), 0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        items: 4,
        bytes: 1 << 20,
        subscribers: 8,
    };

    fn drain(rx: &mut Subscription<u32>) -> Vec<u32> {
        std::iter::from_fn(|| rx.try_recv())
            .map(|i| *i.unwrap())
            .collect()
    }

    fn arcs(items: &[u32]) -> Vec<Arc<u32>> {
        items.iter().copied().map(Arc::new).collect()
    }

    fn unit(_: &u32) -> usize {
        1
    }

    #[test]
    fn a_slow_subscriber_gets_a_prefix_then_a_snapshot() {
        let mut f = Fanout::new(BOUNDS, unit);
        let mut slow = f.subscribe(arcs(&[0])).unwrap();
        let mut fast = f.subscribe(vec![]).unwrap();
        for i in 1..=10 {
            f.publish(&arcs(&[i]));
            drain(&mut fast);
        }
        assert!(f.any_behind());
        assert_eq!(
            drain(&mut slow),
            [0, 1, 2, 3],
            "a gapless prefix, queue-bounded"
        );
        f.resync(|| arcs(&[100, 101]));
        assert!(!f.any_behind());
        f.publish(&arcs(&[11]));
        assert_eq!(drain(&mut slow), [100, 101, 11]);
    }

    #[test]
    fn the_byte_bound_holds_whatever_the_item_count() {
        let bounds = Bounds {
            items: 1000,
            bytes: 10,
            subscribers: 8,
        };
        let mut f = Fanout::new(bounds, |n: &u32| *n as usize);
        let mut sub = f.subscribe(vec![]).unwrap();
        f.publish(&arcs(&[4, 4, 4]));
        assert!(f.any_behind(), "the third item would pass 10 bytes");
        assert_eq!(drain(&mut sub), [4, 4]);
        // A snapshot larger than the bound alone still reaches an empty queue.
        f.resync(|| arcs(&[50]));
        assert!(!f.any_behind());
        assert_eq!(drain(&mut sub), [50]);
    }

    #[test]
    fn subscribers_are_capped_and_shared_items_are_not_copied() {
        let bounds = Bounds {
            subscribers: 2,
            ..BOUNDS
        };
        let mut f = Fanout::new(bounds, unit);
        let a = f.subscribe(vec![]).unwrap();
        let _b = f.subscribe(vec![]).unwrap();
        let err = f.subscribe(vec![]).err().expect("a third is refused");
        assert_eq!(Status::from(err).code(), tonic::Code::ResourceExhausted);
        let item = Arc::new(7);
        f.publish(std::slice::from_ref(&item));
        assert_eq!(Arc::strong_count(&item), 3, "one shared copy per queue");
        drop(a);
        assert!(
            f.subscribe(vec![]).is_ok(),
            "a gone subscriber frees its place"
        );
    }

    #[test]
    fn snapshot_waits_for_room_and_closed_subscribers_go() {
        let bounds = Bounds { items: 2, ..BOUNDS };
        let mut f = Fanout::new(bounds, unit);
        let mut rx = f.subscribe(arcs(&[1, 2, 3])).unwrap();
        assert!(f.any_behind(), "the initial items did not fit");
        assert!(rx.try_recv().is_none());
        f.resync(|| arcs(&[7, 8, 9]));
        assert!(f.any_behind(), "still no room for three");
        f.resync(|| arcs(&[7, 8]));
        assert_eq!(drain(&mut rx), [7, 8]);
        drop(rx);
        f.publish(&arcs(&[1]));
        assert!(f.is_empty());
    }

    #[test]
    fn close_ends_streams_with_a_status() {
        let mut f = Fanout::<u32>::new(BOUNDS, unit);
        let mut rx = f.subscribe(vec![]).unwrap();
        f.close(Status::unavailable("bye"));
        assert_eq!(
            rx.try_recv().unwrap().unwrap_err().code(),
            tonic::Code::Unavailable
        );
        assert!(f.is_empty());
    }
}
