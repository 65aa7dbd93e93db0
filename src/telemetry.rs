//! Logging set-up shared by both services: `--log-level` takes a level or a
//! full `tracing` filter (`info,monitor_svc=debug`), `--log-format` picks
//! human-readable text or one JSON object per line.

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber, writing to stderr.
pub fn init(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(filter).map_err(|e| format!("bad log level {filter:?}: {e}"))?;
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        // Without the module path: services log a `target` field of their own
        // (a tunnel target), and JSON objects cannot hold the key twice.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_target(false)
            .try_init(),
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))
}

/// At most one log line per interval for something that can happen at any
/// rate (a failing accept, a refused client): [`RateLimit::check`] says when
/// to log and how many occurrences went unlogged since.
#[derive(Debug)]
pub struct RateLimit {
    every: std::time::Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl RateLimit {
    pub const fn new(every: std::time::Duration) -> RateLimit {
        RateLimit {
            every,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(suppressed)` when this occurrence should be logged, with the
    /// number of occurrences not logged since the last line; `None` otherwise.
    pub fn check(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, suppressed) = &mut *state;
        if last.is_some_and(|t| now.duration_since(t) < self.every) {
            *suppressed += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(suppressed))
    }
}

/// A log budget for one source (a target, a container): up to `burst`
/// lines at once, refilled at `per_sec`. Lines past it are held back and
/// counted; the next line let through says how many, and so does
/// [`Budget::held`] at a quiet moment.
#[derive(Debug)]
pub struct Budget {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: std::time::Instant,
    held: u64,
}

impl Budget {
    pub fn new(per_sec: u32, burst: u32) -> Budget {
        Budget {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: std::time::Instant::now(),
            held: 0,
        }
    }

    /// `Some(n)`: write the line, saying `n` were held back before it;
    /// `None`: hold it back.
    pub fn take(&mut self, now: std::time::Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        if self.tokens < 1.0 {
            self.held += 1;
            return None;
        }
        self.tokens -= 1.0;
        Some(std::mem::take(&mut self.held))
    }

    /// The lines held back and not yet said, now said: to be logged as a
    /// summary once the source has calmed down (a full budget again).
    pub fn held(&mut self, now: std::time::Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        let refilled = self.tokens + elapsed * self.per_sec >= self.burst;
        (self.held > 0 && refilled).then(|| std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::{Budget, RateLimit};
    use std::time::{Duration, Instant};

    #[test]
    fn rate_limit_logs_once_per_interval_and_counts_the_rest() {
        let limit = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(limit.check(), Some(0));
        for _ in 0..1000 {
            assert_eq!(limit.check(), None);
        }
        let now = RateLimit::new(Duration::ZERO);
        assert_eq!(now.check(), Some(0));
        assert_eq!(now.check(), Some(0));
    }

    #[test]
    fn a_budget_holds_back_what_is_past_it_and_says_how_much() {
        let mut b = Budget::new(10, 5);
        let t = Instant::now();
        let let_through = (0..100).filter(|_| b.take(t).is_some()).count();
        assert_eq!(let_through, 5, "the burst");
        assert_eq!(b.held(t), None, "not quiet yet");
        // A tenth of a second later: one more, saying 95 were held back.
        assert_eq!(b.take(t + Duration::from_millis(100)), Some(95));
        assert_eq!(b.take(t + Duration::from_millis(100)), None);
        // Quiet again: the one held back since is said.
        assert_eq!(b.held(t + Duration::from_secs(1)), Some(1));
        assert_eq!(b.held(t + Duration::from_secs(2)), None);
    }
}
