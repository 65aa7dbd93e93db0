//! Counters behind `GET /metrics`, in the Prometheus text format.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Metrics {
    pub scans: AtomicU64,
    pub scan_errors: AtomicU64,
    scan_nanos_sum: AtomicU64,
    scan_nanos_last: AtomicU64,
    pub events_opened: AtomicU64,
    pub events_closed: AtomicU64,
    pub ports: AtomicU64,
    pub subscribers: AtomicU64,
    pub resyncs: AtomicU64,
    pub refused_subscribers: AtomicU64,
    relays_failed: AtomicU64,
    pub relays_active: AtomicU64,
    relays_total: AtomicU64,
}

/// One relay (a raw relay connection, a Relay TCP stream or UDP flow)
/// while it runs: counted as started when made, as ended when dropped.
pub struct RelayCount(Arc<Metrics>);

impl RelayCount {
    /// The relay ended badly (reset, refused, cut off).
    pub fn failed(&self) {
        self.0.relays_failed.fetch_add(1, Relaxed);
    }
}

impl Drop for RelayCount {
    fn drop(&mut self) {
        self.0.relays_active.fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    /// Counts a relay as started until the returned guard drops.
    pub fn relay_started(self: &Arc<Self>) -> RelayCount {
        self.relays_total.fetch_add(1, Relaxed);
        self.relays_active.fetch_add(1, Relaxed);
        RelayCount(self.clone())
    }

    pub fn scan_took(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.scans.fetch_add(1, Relaxed);
        self.scan_nanos_sum.fetch_add(nanos, Relaxed);
        self.scan_nanos_last.store(nanos, Relaxed);
    }

    pub fn render(&self, source: &str) -> String {
        let secs = |n: &AtomicU64| n.load(Relaxed) as f64 / 1e9;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, String)]| {
            porthole::prometheus::family(&mut out, name, kind, help, samples)
        };
        let source_label = format!("{{source=\"{source}\"}}");
        metric(
            "porthole_monitor_scans_total",
            "counter",
            "Port scans completed.",
            &[(&source_label, self.scans.load(Relaxed).to_string())],
        );
        metric(
            "porthole_monitor_scan_duration_seconds",
            "summary",
            "Time spent scanning sockets and resolving their processes.",
            &[
                ("_sum", secs(&self.scan_nanos_sum).to_string()),
                ("_count", self.scans.load(Relaxed).to_string()),
            ],
        );
        metric(
            "porthole_monitor_last_scan_duration_seconds",
            "gauge",
            "Duration of the most recent scan.",
            &[("", secs(&self.scan_nanos_last).to_string())],
        );
        metric(
            "porthole_monitor_events_total",
            "counter",
            "Port events logged.",
            &[
                (
                    "{type=\"opened\"}",
                    self.events_opened.load(Relaxed).to_string(),
                ),
                (
                    "{type=\"closed\"}",
                    self.events_closed.load(Relaxed).to_string(),
                ),
            ],
        );
        for (name, kind, help, value) in COUNTS {
            metric(
                name,
                kind,
                help,
                &[("", value(self).load(Relaxed).to_string())],
            );
        }
        out
    }
}

/// A metric that is one number: name, type, help, where the number is.
type Count = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Metrics) -> &AtomicU64,
);

/// The metrics that are one number each.
const COUNTS: [Count; 8] = [
    (
        "porthole_monitor_scan_errors_total",
        "counter",
        "Port scans that failed.",
        |m| &m.scan_errors,
    ),
    (
        "porthole_monitor_ports",
        "gauge",
        "Ports listening now.",
        |m| &m.ports,
    ),
    (
        "porthole_monitor_subscribers",
        "gauge",
        "Open WatchEvents streams.",
        |m| &m.subscribers,
    ),
    (
        "porthole_monitor_subscriber_resyncs_total",
        "counter",
        "Times a subscriber fell behind and was sent a fresh snapshot.",
        |m| &m.resyncs,
    ),
    (
        "porthole_monitor_refused_subscribers_total",
        "counter",
        "WatchEvents streams refused because --max-subscribers were open.",
        |m| &m.refused_subscribers,
    ),
    (
        "porthole_monitor_relays_failed_total",
        "counter",
        "Relay.Dial connections that ended with an error (both ends reset).",
        |m| &m.relays_failed,
    ),
    (
        "porthole_monitor_relays_active",
        "gauge",
        "Relay.Dial connections open now.",
        |m| &m.relays_active,
    ),
    (
        "porthole_monitor_relays_total",
        "counter",
        "Relay.Dial connections made.",
        |m| &m.relays_total,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.scan_took(Duration::from_millis(2));
        m.scan_took(Duration::from_millis(4));
        m.events_opened.fetch_add(3, Relaxed);
        let text = m.render("netlink");
        assert!(
            text.contains("porthole_monitor_scans_total{source=\"netlink\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("porthole_monitor_scan_duration_seconds_sum 0.006\n"),
            "{text}"
        );
        assert!(
            text.contains("porthole_monitor_scan_duration_seconds_count 2\n"),
            "{text}"
        );
        assert!(
            text.contains("porthole_monitor_events_total{type=\"opened\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE porthole_monitor_subscribers gauge\n"),
            "{text}"
        );
    }
}
