//! Per poll: the votes it was given, and how long its counts stood still on the
//! subscribers' screens while it was being given votes.
//!
//! Why: while a partition changes hands (a process stopped, a rebalance) every process still
//! answers 202, but nobody counts that partition's polls, so their viewers see nothing move.
//! That stand-still, the longest of any poll, is what an audience notices during a rolling
//! restart; the votes' latency does not show it at all.
//!
//! A poll's counts "move" when any subscriber first sees a newer `seq` of it (a counts
//! message, or the snapshot of a subscriber that reconnected). A stand-still is the time
//! between two moves; it counts only if a vote for the poll was accepted after the first of
//! them (the quiet after the load is not a stall). Atomics only: every subscriber reports
//! every message here, and a lock shared by thousands of them costs what they measure.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `moved_us` before the load started: stand-stills count from the start.
const NOT_STARTED: u64 = u64::MAX;

#[derive(Debug)]
struct PollTimes {
    id: i64,
    /// Votes accepted (202) for it.
    accepted: AtomicU64,
    /// When the last of them was accepted, in µs since the origin (0: none yet).
    accepted_us: AtomicU64,
    /// The newest `seq` any subscriber saw (`i64::MIN`: never watched).
    seq: AtomicI64,
    /// The total of the newest counts seen.
    shown: AtomicI64,
    /// The total shown when the load started (votes from before it).
    base: AtomicI64,
    /// When its counts last moved, in µs since the origin.
    moved_us: AtomicU64,
    /// The longest stand-still so far, and when it ended.
    longest_us: AtomicU64,
    longest_end_us: AtomicU64,
}

/// Every poll of a run, in the order the votes go round them.
#[derive(Debug)]
pub struct Stalls {
    origin: Instant,
    started_us: AtomicU64,
    polls: Vec<PollTimes>,
}

/// The longest stand-still of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stall {
    /// The longest time any watched poll's counts stood still while it was given votes.
    pub longest_ms: u64,
    /// That poll.
    pub poll: i64,
    /// When that stand-still ended, in seconds from the start of the load.
    pub ended_at_s: f64,
    /// The median (the lower, for an even count) over the watched polls of each one's
    /// longest stand-still: whether the longest was one poll's bad luck or every poll's lot.
    pub median_ms: u64,
    /// Polls some subscriber watched.
    pub polls_watched: usize,
}

impl Stalls {
    pub fn new(polls: &[i64]) -> Self {
        Self {
            origin: Instant::now(),
            started_us: AtomicU64::new(0),
            polls: polls
                .iter()
                .map(|&id| PollTimes {
                    id,
                    accepted: AtomicU64::new(0),
                    accepted_us: AtomicU64::new(0),
                    seq: AtomicI64::new(i64::MIN),
                    shown: AtomicI64::new(0),
                    base: AtomicI64::new(0),
                    moved_us: AtomicU64::new(NOT_STARTED),
                    longest_us: AtomicU64::new(0),
                    longest_end_us: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    fn now_us(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }

    /// The index of poll `id`, for [`Stalls::seen`].
    pub fn index_of(&self, id: i64) -> Option<usize> {
        self.polls.iter().position(|p| p.id == id)
    }

    /// The load starts: stand-stills count from now, and what the polls showed is their base.
    pub fn start(&self) {
        let now = self.now_us();
        self.started_us.store(now, Ordering::Relaxed);
        for p in &self.polls {
            p.base
                .store(p.shown.load(Ordering::Relaxed), Ordering::Relaxed);
            p.moved_us.store(now, Ordering::Relaxed);
        }
    }

    /// A vote for the `index`-th poll was accepted.
    pub fn accepted(&self, index: usize) {
        let p = &self.polls[index];
        p.accepted.fetch_add(1, Ordering::Relaxed);
        p.accepted_us.fetch_max(self.now_us(), Ordering::Relaxed);
    }

    /// Votes accepted per poll, in the order given to [`Stalls::new`].
    pub fn accepted_by_poll(&self) -> Vec<u64> {
        self.polls
            .iter()
            .map(|p| p.accepted.load(Ordering::Relaxed))
            .collect()
    }

    /// A subscriber of the `index`-th poll saw its counts at `seq`, totalling `total`.
    pub fn seen(&self, index: usize, seq: i64, total: Option<i64>) {
        let p = &self.polls[index];
        if let Some(total) = total {
            p.shown.fetch_max(total, Ordering::Relaxed);
        }
        if p.seq.fetch_max(seq, Ordering::Relaxed) >= seq {
            return; // another subscriber saw this version first
        }
        let now = self.now_us();
        let moved = p.moved_us.swap(now, Ordering::Relaxed);
        if moved != NOT_STARTED && p.accepted_us.load(Ordering::Relaxed) > moved {
            Self::stood_still(p, now - moved.min(now), now);
        }
    }

    fn stood_still(p: &PollTimes, for_us: u64, ended_us: u64) {
        if p.longest_us.fetch_max(for_us, Ordering::Relaxed) < for_us {
            p.longest_end_us.store(ended_us, Ordering::Relaxed);
        }
    }

    /// The longest stand-still, once the subscribers have seen what they will: a watched
    /// poll whose counts never caught up with its votes stood still until now. `None` when no
    /// poll was watched.
    pub fn finish(&self) -> Option<Stall> {
        let now = self.now_us();
        let started = self.started_us.load(Ordering::Relaxed);
        let watched: Vec<&PollTimes> = self
            .polls
            .iter()
            .filter(|p| p.seq.load(Ordering::Relaxed) != i64::MIN)
            .collect();
        for p in &watched {
            let expected =
                p.base.load(Ordering::Relaxed) + p.accepted.load(Ordering::Relaxed) as i64;
            let moved = p.moved_us.load(Ordering::Relaxed);
            if p.shown.load(Ordering::Relaxed) < expected && moved != NOT_STARTED {
                Self::stood_still(p, now.saturating_sub(moved), now);
            }
        }
        let worst = watched
            .iter()
            .max_by_key(|p| p.longest_us.load(Ordering::Relaxed))?;
        let mut longest: Vec<u64> = watched
            .iter()
            .map(|p| p.longest_us.load(Ordering::Relaxed))
            .collect();
        longest.sort_unstable();
        let ms = |us: u64| Duration::from_micros(us).as_millis() as u64;
        Some(Stall {
            longest_ms: ms(worst.longest_us.load(Ordering::Relaxed)),
            poll: worst.id,
            ended_at_s: worst
                .longest_end_us
                .load(Ordering::Relaxed)
                .saturating_sub(started) as f64
                / 1e6,
            median_ms: ms(longest[(longest.len() - 1) / 2]),
            polls_watched: watched.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleep(ms: u64) {
        std::thread::sleep(Duration::from_millis(ms));
    }

    #[test]
    fn a_poll_stands_still_between_two_new_versions_while_it_takes_votes() {
        let stalls = Stalls::new(&[7, 8]);
        stalls.seen(0, 0, Some(0));
        stalls.seen(1, 0, Some(0));
        stalls.start();
        stalls.accepted(0);
        stalls.accepted(1);
        sleep(20);
        stalls.seen(0, 1, Some(1));
        stalls.seen(1, 1, Some(1));
        sleep(1);
        stalls.accepted(1);
        sleep(120);
        // A second subscriber seeing the same version is not a move.
        stalls.seen(0, 1, Some(1));
        stalls.seen(1, 2, Some(2));
        let stall = stalls.finish().unwrap();
        assert_eq!(stall.poll, 8);
        assert!(stall.longest_ms >= 120, "{stall:?}");
        assert!(stall.ended_at_s >= 0.14, "{stall:?}");
        assert_eq!(stall.polls_watched, 2);
        assert_eq!(stalls.accepted_by_poll(), [1, 2]);
    }

    #[test]
    fn the_quiet_after_the_load_is_not_a_stall_but_counts_that_never_catch_up_are() {
        let stalls = Stalls::new(&[1, 2, 3]);
        for i in 0..2 {
            stalls.seen(i, 5, Some(10));
        }
        stalls.start();
        stalls.accepted(0);
        stalls.accepted(1);
        sleep(1);
        stalls.seen(0, 6, Some(11));
        sleep(100);
        // Poll 1 shows its vote after a long quiet with no vote taken: no stall. Poll 2's
        // vote is never shown: it stood still until the end.
        stalls.seen(0, 7, Some(11));
        let stall = stalls.finish().unwrap();
        assert_eq!(stall.poll, 2, "{stall:?}");
        assert!(stall.longest_ms >= 100);
        assert_eq!(stall.polls_watched, 2, "poll 3 was never watched");
        assert!(stall.median_ms < 100, "{stall:?}");
    }
}
