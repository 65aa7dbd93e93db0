//! The event log: a bounded ring of port events with strictly increasing
//! sequence numbers, and the diff that turns two scans into events.
//!
//! Pure data structures; the monitor task owns the one instance.

use chrono::{DateTime, TimeDelta, Utc};
use porthole::pb::v1::{EventType, Port, PortEvent};
use std::collections::{BTreeMap, VecDeque};

/// One logged change.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub kind: EventType,
    pub port: Port,
}

impl Event {
    pub fn to_proto(&self) -> PortEvent {
        PortEvent {
            seq: self.seq,
            r#type: self.kind as i32,
            port: Some(self.port.clone()),
            timestamp: Some(porthole::time::to_proto(self.at)),
        }
    }
}

/// What a caller asked for: events after a point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// Every event still held.
    Start,
    /// Events with a timestamp strictly after this instant.
    Time(DateTime<Utc>),
    /// Events with a greater seq.
    Seq(u64),
}

/// The answer to a since-query.
#[derive(Clone, Debug, PartialEq)]
pub struct Page {
    pub events: Vec<Event>,
    /// Events the caller asked for had already been dropped from the ring.
    pub truncated: bool,
}

#[derive(Debug)]
pub struct EventLog {
    ring: VecDeque<Event>,
    capacity: usize,
    last_seq: u64,
    last_at: Option<DateTime<Utc>>,
    /// Timestamp of the newest event dropped from the ring.
    last_dropped_at: Option<DateTime<Utc>>,
}

impl EventLog {
    /// `capacity` must be at least 1.
    pub fn new(capacity: usize) -> EventLog {
        assert!(capacity > 0, "event log capacity must be at least 1");
        EventLog {
            ring: VecDeque::with_capacity(capacity),
            capacity,
            last_seq: 0,
            last_at: None,
            last_dropped_at: None,
        }
    }

    /// Oldest seq still held, 0 when empty.
    pub fn first_seq(&self) -> u64 {
        self.ring.front().map_or(0, |e| e.seq)
    }

    /// Newest seq ever assigned, 0 before the first event.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Appends the changes of one scan, all stamped with one timestamp that
    /// is strictly later than every earlier scan's (even if the wall clock
    /// stepped back), so "strictly after the last timestamp I saw" never
    /// skips a sibling of the same scan nor a later scan. Returns the new
    /// events.
    pub fn append_scan(
        &mut self,
        now: DateTime<Utc>,
        changes: Vec<(EventType, Port)>,
    ) -> Vec<Event> {
        if changes.is_empty() {
            return Vec::new();
        }
        let at = match self.last_at {
            Some(last) if now <= last => last + TimeDelta::nanoseconds(1),
            _ => now,
        };
        self.last_at = Some(at);
        let mut appended = Vec::with_capacity(changes.len());
        for (kind, port) in changes {
            self.last_seq += 1;
            let event = Event {
                seq: self.last_seq,
                at,
                kind,
                port,
            };
            if self.ring.len() == self.capacity {
                let dropped = self.ring.pop_front().expect("full ring is not empty");
                self.last_dropped_at = Some(dropped.at);
            }
            self.ring.push_back(event.clone());
            appended.push(event);
        }
        appended
    }

    /// Events after `since`, oldest first.
    pub fn since(&self, since: Since) -> Page {
        match since {
            Since::Start => Page {
                events: self.ring.iter().cloned().collect(),
                truncated: self.last_dropped_at.is_some(),
            },
            Since::Time(t) => {
                let start = self.ring.partition_point(|e| e.at <= t);
                Page {
                    events: self.ring.range(start..).cloned().collect(),
                    truncated: self.last_dropped_at.is_some_and(|d| d > t),
                }
            }
            Since::Seq(seq) => {
                let start = self.ring.partition_point(|e| e.seq <= seq);
                Page {
                    events: self.ring.range(start..).cloned().collect(),
                    truncated: seq < self.last_seq && seq + 1 < self.first_seq(),
                }
            }
        }
    }

    /// Everything after `seq` when the ring still holds all of it; `None`
    /// when the caller must resync (it fell off, or names a seq this log
    /// never assigned).
    pub fn resume(&self, seq: u64) -> Option<Vec<Event>> {
        if seq > self.last_seq {
            return None;
        }
        let page = self.since(Since::Seq(seq));
        (!page.truncated).then_some(page.events)
    }
}

/// The events that turn `current` into `scanned` (both keyed by the port's
/// key): closes first, then opens, each in key order.
pub fn diff(
    current: &BTreeMap<String, Port>,
    scanned: &BTreeMap<String, Port>,
) -> Vec<(EventType, Port)> {
    let closed = current
        .iter()
        .filter(|(k, _)| !scanned.contains_key(*k))
        .map(|(_, p)| (EventType::Closed, p.clone()));
    let opened = scanned
        .iter()
        .filter(|(k, _)| !current.contains_key(*k))
        .map(|(_, p)| (EventType::Opened, p.clone()));
    closed.chain(opened).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use porthole::pb::v1::Protocol;

    fn port(n: u32) -> Port {
        Port {
            protocol: Protocol::Tcp as i32,
            address: "0.0.0.0".into(),
            port: n,
            key: format!("tcp:0.0.0.0:{n}"),
            process: None,
            dual_stack: false,
            server: true,
        }
    }

    fn opened(ns: &[u32]) -> Vec<(EventType, Port)> {
        ns.iter().map(|n| (EventType::Opened, port(*n))).collect()
    }

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn seqs(events: &[Event]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn seq_starts_at_one_and_increases() {
        let mut log = EventLog::new(10);
        assert_eq!((log.first_seq(), log.last_seq()), (0, 0));
        assert_eq!(seqs(&log.append_scan(t(0), opened(&[1, 2]))), [1, 2]);
        assert!(
            log.append_scan(t(1), vec![]).is_empty(),
            "an empty scan logs nothing"
        );
        assert_eq!(seqs(&log.append_scan(t(2), opened(&[3]))), [3]);
        assert_eq!((log.first_seq(), log.last_seq()), (1, 3));
    }

    #[test]
    fn ring_wraps_and_keeps_the_newest() {
        let mut log = EventLog::new(3);
        for i in 0..5 {
            log.append_scan(t(i), opened(&[i as u32]));
        }
        let page = log.since(Since::Start);
        assert_eq!(seqs(&page.events), [3, 4, 5]);
        assert!(page.truncated);
        assert_eq!((log.first_seq(), log.last_seq()), (3, 5));
    }

    #[test]
    fn one_scan_larger_than_the_ring_keeps_its_tail() {
        let mut log = EventLog::new(2);
        log.append_scan(t(0), opened(&[1, 2, 3, 4]));
        assert_eq!(seqs(&log.since(Since::Start).events), [3, 4]);
        assert!(log.since(Since::Seq(0)).truncated);
        assert!(log.since(Since::Time(t(-1))).truncated);
    }

    #[test]
    fn since_time_is_strictly_after_and_keeps_siblings_together() {
        let mut log = EventLog::new(10);
        log.append_scan(t(0), opened(&[1, 2]));
        log.append_scan(t(1), opened(&[3, 4]));
        log.append_scan(t(2), opened(&[5]));
        // A reader that saw the first event of scan t(1) passes back t(1):
        // it has the whole scan, because scans are appended atomically.
        assert_eq!(seqs(&log.since(Since::Time(t(1))).events), [5]);
        assert_eq!(seqs(&log.since(Since::Time(t(0))).events), [3, 4, 5]);
        assert_eq!(seqs(&log.since(Since::Time(t(-5))).events), [1, 2, 3, 4, 5]);
        assert!(log.since(Since::Time(t(2))).events.is_empty());
        assert!(!log.since(Since::Time(t(-5))).truncated);
    }

    #[test]
    fn scans_never_share_a_timestamp_even_if_the_clock_steps_back() {
        let mut log = EventLog::new(10);
        let a = log.append_scan(t(5), opened(&[1]));
        let b = log.append_scan(t(3), opened(&[2]));
        let c = log.append_scan(t(5), opened(&[3]));
        assert!(a[0].at < b[0].at && b[0].at < c[0].at);
        assert_eq!(seqs(&log.since(Since::Time(a[0].at)).events), [2, 3]);
    }

    #[test]
    fn since_time_is_truncated_only_when_a_wanted_event_was_dropped() {
        let mut log = EventLog::new(2);
        log.append_scan(t(0), opened(&[1]));
        log.append_scan(t(1), opened(&[2]));
        log.append_scan(t(2), opened(&[3])); // drops seq 1 (t0)
        assert!(
            !log.since(Since::Time(t(0))).truncated,
            "the dropped event is not after t0"
        );
        assert!(log.since(Since::Time(t(-1))).truncated);
    }

    #[test]
    fn since_seq_and_truncation() {
        let mut log = EventLog::new(3);
        for i in 0..6 {
            log.append_scan(t(i), opened(&[i as u32]));
        } // holds 4, 5, 6
        assert_eq!(seqs(&log.since(Since::Seq(4)).events), [5, 6]);
        assert!(!log.since(Since::Seq(3)).truncated, "4.. is all still held");
        assert!(log.since(Since::Seq(2)).truncated, "seq 3 was dropped");
        assert!(!log.since(Since::Seq(6)).truncated);
        assert!(log.since(Since::Seq(6)).events.is_empty());
    }

    #[test]
    fn resume_only_when_everything_after_is_held() {
        let mut log = EventLog::new(3);
        assert_eq!(log.resume(0), Some(vec![]), "nothing happened yet");
        for i in 0..5 {
            log.append_scan(t(i), opened(&[i as u32]));
        } // holds 3, 4, 5
        assert_eq!(log.resume(2).map(|e| seqs(&e)), Some(vec![3, 4, 5]));
        assert_eq!(log.resume(4).map(|e| seqs(&e)), Some(vec![5]));
        assert_eq!(log.resume(5).map(|e| seqs(&e)), Some(vec![]));
        assert_eq!(log.resume(1), None, "seq 2 fell off");
        assert_eq!(log.resume(9), None, "never assigned");
    }

    #[test]
    fn diff_reports_closes_then_opens() {
        let map = |ns: &[u32]| {
            ns.iter()
                .map(|n| (port(*n).key, port(*n)))
                .collect::<BTreeMap<_, _>>()
        };
        let changes = diff(&map(&[1, 2, 3]), &map(&[2, 3, 4, 5]));
        let got: Vec<(EventType, u32)> = changes.iter().map(|(k, p)| (*k, p.port)).collect();
        assert_eq!(
            got,
            [
                (EventType::Closed, 1),
                (EventType::Opened, 4),
                (EventType::Opened, 5)
            ]
        );
        assert!(diff(&map(&[1]), &map(&[1])).is_empty());
    }
}
