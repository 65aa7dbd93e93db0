//! Pushing one stream of updates to many subscribers without ever waiting
//! on a slow one and without letting one grow memory: each subscriber has a
//! bounded queue; one that fills it is marked behind, gets nothing more, and
//! is sent a fresh snapshot once its queue has room again. Nothing is
//! silently skipped: a subscriber sees a gapless prefix, then a snapshot.

use tokio::sync::mpsc;
use tonic::Status;

pub type Item<T> = Result<T, Status>;

struct Subscriber<T> {
    tx: mpsc::Sender<Item<T>>,
    behind: bool,
}

pub struct Fanout<T> {
    queue: usize,
    subscribers: Vec<Subscriber<T>>,
}

impl<T: Clone> Fanout<T> {
    /// `queue`: messages held per subscriber.
    pub fn new(queue: usize) -> Fanout<T> {
        Fanout {
            queue,
            subscribers: Vec::new(),
        }
    }

    /// A new subscriber that first receives `initial` (or, when that does not
    /// fit its queue, a snapshot as soon as [`Fanout::resync`] runs).
    pub fn subscribe(&mut self, initial: Vec<T>) -> mpsc::Receiver<Item<T>> {
        let (tx, rx) = mpsc::channel(self.queue);
        let behind = initial.len() > self.queue;
        if !behind {
            for item in initial {
                tx.try_send(Ok(item)).expect("fits the new queue");
            }
        }
        self.subscribers.push(Subscriber { tx, behind });
        rx
    }

    /// Sends `items` to every subscriber that is keeping up. Returns how
    /// many fell behind just now.
    pub fn publish(&mut self, items: &[T]) -> usize {
        self.subscribers.retain(|s| !s.tx.is_closed());
        let mut fell_behind = 0;
        for sub in self.subscribers.iter_mut().filter(|s| !s.behind) {
            for item in items {
                if sub.tx.try_send(Ok(item.clone())).is_err() {
                    sub.behind = true;
                    fell_behind += 1;
                    break;
                }
            }
        }
        fell_behind
    }

    /// Sends a snapshot to each subscriber that is behind and has room for
    /// it again. `snapshot` is built only when someone needs it.
    pub fn resync(&mut self, snapshot: impl FnOnce() -> Vec<T>) {
        self.subscribers.retain(|s| !s.tx.is_closed());
        let mut built: Option<Vec<T>> = None;
        let mut snapshot = Some(snapshot);
        for sub in self.subscribers.iter_mut().filter(|s| s.behind) {
            let items = built.get_or_insert_with(|| (snapshot.take().expect("built once"))());
            if sub.tx.capacity() >= items.len() {
                for item in items.iter() {
                    sub.tx.try_send(Ok(item.clone())).expect("room was checked");
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
            let _ = sub.tx.try_send(Err(status.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(rx: &mut mpsc::Receiver<Item<u32>>) -> Vec<u32> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|i| i.unwrap())
            .collect()
    }

    #[test]
    fn a_slow_subscriber_gets_a_prefix_then_a_snapshot() {
        let mut f = Fanout::new(4);
        let mut slow = f.subscribe(vec![0]);
        let mut fast = f.subscribe(vec![]);
        for i in 1..=10 {
            f.publish(&[i]);
            drain(&mut fast);
        }
        assert!(f.any_behind());
        assert_eq!(
            drain(&mut slow),
            [0, 1, 2, 3],
            "a gapless prefix, queue-bounded"
        );
        f.resync(|| vec![100, 101]);
        assert!(!f.any_behind());
        f.publish(&[11]);
        assert_eq!(drain(&mut slow), [100, 101, 11]);
    }

    #[test]
    fn snapshot_waits_for_room_and_closed_subscribers_go() {
        let mut f = Fanout::new(2);
        let mut rx = f.subscribe(vec![1, 2, 3]);
        assert!(f.any_behind(), "the initial items did not fit");
        assert!(rx.try_recv().is_err());
        f.resync(|| vec![7, 8, 9]);
        assert!(f.any_behind(), "still no room for three");
        f.resync(|| vec![7, 8]);
        assert_eq!(drain(&mut rx), [7, 8]);
        drop(rx);
        f.publish(&[1]);
        assert!(f.is_empty());
    }

    #[test]
    fn close_ends_streams_with_a_status() {
        let mut f = Fanout::<u32>::new(2);
        let mut rx = f.subscribe(vec![]);
        f.close(Status::unavailable("bye"));
        assert_eq!(
            rx.try_recv().unwrap().unwrap_err().code(),
            tonic::Code::Unavailable
        );
        assert!(f.is_empty());
    }
}
