//! Capped exponential backoff with jitter, for reconnecting to monitors and
//! restarting ssh masters.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        Backoff {
            base,
            cap,
            attempt: 0,
            rng: seed ^ u64::from(std::process::id()),
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay: base·2^attempt capped, scaled by a random factor in
    /// [0.5, 1.0) so many clients do not retry in step.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = 0.5 + (self.rng % 1000) as f64 / 2000.0;
        exp.mul_f64(frac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] < Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] < Duration::from_millis(800));
        assert!(d.iter().all(|x| *x < Duration::from_secs(2)), "{d:?}");
        assert!(d[9] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(100));
    }
}
