//! The one backoff rule: how long to wait after the n-th failure in a row, for restarts,
//! flushes and webhook deliveries alike.

use std::time::Duration;

/// Exponential backoff: `initial · 2^(n-1)` after the n-th failure in a row, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failure.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Backoff {
    /// The wait after `failures` failures in a row (1 after the first; 0 is taken as 1).
    pub fn after(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.initial.saturating_mul(1u32 << doublings).min(self.max)
    }

    /// The same, spread by `jitter` (drawn uniformly from [0, 1)) between half and all of
    /// it. Why: many clients that failed at the same moment (webhooks of many polls whose
    /// receiver went down) then do not all come back in the same instant.
    pub fn jittered(&self, failures: u32, jitter: f64) -> Duration {
        self.after(failures)
            .mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(1000),
    };

    #[test]
    fn each_failure_doubles_the_wait_up_to_the_max() {
        let waits: Vec<u128> = (1..=6).map(|n| B.after(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(B.after(0), B.after(1));
        assert_eq!(B.after(u32::MAX), B.max, "no overflow");
    }

    #[test]
    fn jitter_spreads_between_half_and_all_of_the_wait() {
        assert_eq!(B.jittered(3, 0.0).as_millis(), 200);
        assert_eq!(B.jittered(3, 0.999_999).as_millis(), 399);
        assert_eq!(B.jittered(3, 7.0).as_millis(), 400, "clamped");
    }
}
