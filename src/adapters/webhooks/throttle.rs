//! Pacing of a poll's `poll.results`: at most one per `resultsEverySecs`, the newest counts.

use std::time::Duration;

use pollcast_actors::CountsUpdate;
use tokio::time::Instant;

/// What [`ResultsThrottle::offer`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Send this update now.
    Send(CountsUpdate),
    /// Held until then: call [`ResultsThrottle::take_due`] at that time.
    HeldUntil(Instant),
    /// Replaced the update already held; its time is already set.
    Coalesced,
    /// Not newer than an update already sent or held: ignored.
    Stale,
}

/// Paces a poll's `poll.results`: at most one per interval. Updates that come sooner are
/// coalesced, and the newest goes out as soon as the interval has passed, so a receiver
/// always ends up with the latest counts.
#[derive(Debug)]
pub struct ResultsThrottle {
    every: Duration,
    last_sent: Option<Instant>,
    newest_seq: Option<i64>,
    held: Option<CountsUpdate>,
}

impl ResultsThrottle {
    /// At most one update per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last_sent: None,
            newest_seq: None,
            held: None,
        }
    }

    /// Takes an update that arrived at `now`.
    pub fn offer(&mut self, update: CountsUpdate, now: Instant) -> Offer {
        if self.newest_seq.is_some_and(|seq| update.seq <= seq) {
            return Offer::Stale;
        }
        self.newest_seq = Some(update.seq);
        if self.held.is_some() {
            self.held = Some(update);
            return Offer::Coalesced;
        }
        match self.last_sent {
            Some(sent) if now < sent + self.every => {
                self.held = Some(update);
                Offer::HeldUntil(sent + self.every)
            }
            _ => {
                self.last_sent = Some(now);
                Offer::Send(update)
            }
        }
    }

    /// The held update, if its interval has passed at `now`.
    pub fn take_due(&mut self, now: Instant) -> Option<CountsUpdate> {
        let due = self.last_sent? + self.every;
        if now < due {
            return None;
        }
        let update = self.held.take()?;
        self.last_sent = Some(now);
        Some(update)
    }

    /// Forgets the held update (the poll closed: its final counts supersede it).
    pub fn clear(&mut self) {
        self.held = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::webhooks::tests::update;

    #[test]
    fn results_go_at_most_once_per_interval_carrying_the_newest_counts() {
        let every = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut throttle = ResultsThrottle::new(every);
        assert_eq!(
            throttle.offer(update(1, 1, None), t0),
            Offer::Send(update(1, 1, None))
        );
        assert_eq!(
            throttle.offer(update(1, 2, None), t0 + Duration::from_secs(1)),
            Offer::HeldUntil(t0 + every)
        );
        assert_eq!(
            throttle.offer(update(1, 3, None), t0 + Duration::from_secs(2)),
            Offer::Coalesced
        );
        assert_eq!(
            throttle.offer(update(1, 2, None), t0 + Duration::from_secs(3)),
            Offer::Stale
        );
        assert_eq!(throttle.take_due(t0 + Duration::from_secs(9)), None);
        assert_eq!(throttle.take_due(t0 + every), Some(update(1, 3, None)));
        assert_eq!(throttle.take_due(t0 + every), None);
        // The next interval starts when the held update went.
        assert_eq!(
            throttle.offer(update(1, 4, None), t0 + Duration::from_secs(15)),
            Offer::HeldUntil(t0 + Duration::from_secs(20))
        );
        throttle.clear();
        assert_eq!(throttle.take_due(t0 + Duration::from_secs(20)), None);
        // After a quiet interval, the next update goes at once.
        assert_eq!(
            throttle.offer(update(1, 5, None), t0 + Duration::from_secs(31)),
            Offer::Send(update(1, 5, None))
        );
    }
}
