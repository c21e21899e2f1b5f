//! The embedded [`DedupGuard`]: an in-process map of claims with expiry.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use pollcast_actors::{Claim, DedupGuard, GuardError, OptionId, PollId, Vote, Voter};
use tokio::time::Instant;

/// What a claim remembers: fingerprints of the vote id and of the ballot it was made for,
/// to tell a retry from a duplicate and from a vote id reused for another ballot; the attempt
/// that holds it, so that only that attempt releases it; and when it expires.
///
/// Why fingerprints and not the id: a claim is kept for every vote of the TTL, and the id
/// (a heap string of ~34 bytes, allocated per vote) was most of its size; 16 bytes inline
/// took 29 MB off 450,000 claims (docs/BENCHMARKS.md), and the ballot and the attempt add 8
/// more (3.6 MB for as many). Two different ids of one voter that
/// share a 64-bit fingerprint would pass as a retry, and two ballots that share a 32-bit one
/// as the same ballot: the ledger's keys still count that voter once (and report the second
/// ballot, see `pollcast_vote_id_reused_total`).
#[derive(Debug, Clone, Copy)]
struct Held {
    vote: u64,
    ballot: u32,
    /// The low half of the attempt's number: two attempts of one vote that share it would
    /// let the earlier one release the later one's claim, with a chance of 2⁻³².
    attempt: u32,
    /// Milliseconds since the guard's epoch.
    expires: u64,
}

type Claims = DashMap<(PollId, Box<str>), Held>;

/// Claims live in memory for `ttl`; the process's own restarts are covered by warming the
/// map from the store's ledger ([`MemoryGuard::warm`]).
#[derive(Debug, Clone)]
pub struct MemoryGuard {
    claims: Arc<Claims>,
    ttl: Duration,
    epoch: Instant,
}

/// The same for the same id within a process (`DefaultHasher::new` has fixed keys), which
/// is as long as a claim lives.
fn fingerprint(vote_id: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    vote_id.hash(&mut hasher);
    hasher.finish()
}

/// The same for the same options in any order, without sorting them: a sum of each
/// option's mixed bits (splitmix64's finalizer). Options of a ballot are distinct.
fn ballot_fingerprint(choices: &[OptionId]) -> u32 {
    let mix = |option: OptionId| {
        let mut z = (option as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let sum = choices
        .iter()
        .fold(0u64, |sum, o| sum.wrapping_add(mix(*o)));
    (sum ^ (sum >> 32)) as u32
}

fn millis_since(epoch: Instant) -> u64 {
    Instant::now().saturating_duration_since(epoch).as_millis() as u64
}

impl MemoryGuard {
    /// How often start-up sweeps expired claims out.
    pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

    /// An empty guard whose claims expire after `ttl`. Expired claims stay in memory until
    /// [`MemoryGuard::sweep`], which start-up runs every
    /// [`MemoryGuard::SWEEP_EVERY`].
    pub fn new(ttl: Duration) -> Self {
        Self {
            claims: Arc::new(Claims::new()),
            ttl,
            epoch: Instant::now(),
        }
    }

    /// Drops the expired claims (an expired claim already counts as absent; this frees it).
    pub fn sweep(&self) {
        let now = millis_since(self.epoch);
        self.claims.retain(|_, held| held.expires > now);
    }

    /// When a claim made at `now` (milliseconds since the epoch) expires.
    fn expires_after(&self, now: u64) -> u64 {
        now + self.ttl.as_millis() as u64
    }

    /// Claims every (poll, user) already counted, so a duplicate after a restart still gets
    /// a 409 instead of a 202 that the ledger would then ignore.
    pub fn warm(&self, voters: impl IntoIterator<Item = Voter>) -> usize {
        let expires = self.expires_after(millis_since(self.epoch));
        let before = self.claims.len();
        for v in voters {
            let held = Held {
                vote: fingerprint(&v.vote_id),
                ballot: ballot_fingerprint(&v.choices),
                // No attempt of this process made it: none releases it.
                attempt: 0,
                expires,
            };
            let key = (v.poll_id, v.user_id.into_boxed_str());
            self.claims.insert(key, held);
        }
        self.claims.len() - before
    }
}

#[async_trait]
impl DedupGuard for MemoryGuard {
    async fn claim(&self, vote: &Vote, attempt: u64) -> Result<Claim, GuardError> {
        let now = millis_since(self.epoch);
        let fresh = Held {
            vote: fingerprint(vote.ledger_id()),
            ballot: ballot_fingerprint(&vote.choices),
            attempt: attempt as u32,
            expires: self.expires_after(now),
        };
        match self
            .claims
            .entry((vote.poll_id, vote.user_id.as_str().into()))
        {
            Entry::Occupied(mut e) if e.get().expires > now => {
                let held = e.get_mut();
                Ok(if held.vote != fresh.vote {
                    Claim::Taken
                } else if held.ballot != fresh.ballot {
                    Claim::Reused
                } else {
                    // Taken over, expiry kept: an earlier attempt that fails now finds the
                    // claim is not its own to release.
                    held.attempt = fresh.attempt;
                    Claim::Retry
                })
            }
            Entry::Occupied(mut e) => {
                e.insert(fresh);
                Ok(Claim::Fresh)
            }
            Entry::Vacant(e) => {
                e.insert(fresh);
                Ok(Claim::Fresh)
            }
        }
    }

    async fn release(&self, poll: PollId, user: &str, attempt: u64) -> Result<bool, GuardError> {
        let key = (poll, Box::<str>::from(user));
        let released = self
            .claims
            .remove_if(&key, |_, held| held.attempt == attempt as u32)
            .is_some();
        Ok(released)
    }

    async fn ping(&self) -> Result<(), GuardError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vote `id` of user `u` in poll `poll`, for `choices`.
    fn vote(poll: PollId, user: &str, id: &str, choices: &[OptionId]) -> Vote {
        Vote {
            vote_id: Some(id.into()),
            choices: choices.to_vec(),
            ..Vote::single(poll, 0, user)
        }
    }

    #[tokio::test]
    async fn second_claim_of_the_same_voter_is_refused() {
        let guard = MemoryGuard::new(Duration::from_secs(60));
        assert_eq!(
            guard.claim(&vote(1, "u", "a", &[1]), 1).await.unwrap(),
            Claim::Fresh
        );
        assert_eq!(
            guard.claim(&vote(1, "u", "b", &[1]), 2).await.unwrap(),
            Claim::Taken
        );
        assert_eq!(
            guard.claim(&vote(2, "u", "b", &[1]), 3).await.unwrap(),
            Claim::Fresh,
            "other poll"
        );
    }

    #[tokio::test]
    async fn a_claim_with_the_same_vote_id_and_ballot_is_a_retry() {
        let guard = MemoryGuard::new(Duration::from_secs(60));
        assert_eq!(
            guard.claim(&vote(1, "u", "a", &[1, 3]), 1).await.unwrap(),
            Claim::Fresh
        );
        assert_eq!(
            guard.claim(&vote(1, "u", "a", &[3, 1]), 2).await.unwrap(),
            Claim::Retry,
            "the same options in another order"
        );
    }

    #[tokio::test]
    async fn the_same_vote_id_with_another_ballot_is_a_reuse() {
        let guard = MemoryGuard::new(Duration::from_secs(60));
        assert_eq!(
            guard.claim(&vote(1, "u", "a", &[1]), 1).await.unwrap(),
            Claim::Fresh
        );
        assert_eq!(
            guard.claim(&vote(1, "u", "a", &[3]), 2).await.unwrap(),
            Claim::Reused
        );
        assert_eq!(
            guard.claim(&vote(1, "u", "a", &[1, 3]), 3).await.unwrap(),
            Claim::Reused
        );
        assert_eq!(
            guard.claim(&vote(1, "u", "a", &[1]), 4).await.unwrap(),
            Claim::Retry,
            "the claim still holds the first ballot"
        );
    }

    #[tokio::test]
    async fn released_claim_can_be_made_again() {
        let guard = MemoryGuard::new(Duration::from_secs(60));
        assert_eq!(
            guard.claim(&vote(1, "u", "a", &[1]), 7).await.unwrap(),
            Claim::Fresh
        );
        assert!(guard.release(1, "u", 7).await.unwrap());
        assert_eq!(
            guard.claim(&vote(1, "u", "b", &[1]), 8).await.unwrap(),
            Claim::Fresh
        );
    }

    #[tokio::test]
    async fn only_the_attempt_that_holds_a_claim_releases_it() {
        let guard = MemoryGuard::new(Duration::from_secs(60));
        assert_eq!(
            guard.claim(&vote(1, "u", "a", &[1]), 7).await.unwrap(),
            Claim::Fresh
        );
        assert!(
            !guard.release(1, "u", 8).await.unwrap(),
            "another attempt's"
        );
        assert_eq!(
            guard.claim(&vote(1, "u", "b", &[1]), 9).await.unwrap(),
            Claim::Taken
        );
        // A retry takes the claim over: the first attempt, failing late, leaves it alone.
        assert_eq!(
            guard.claim(&vote(1, "u", "a", &[1]), 10).await.unwrap(),
            Claim::Retry
        );
        assert!(
            !guard.release(1, "u", 7).await.unwrap(),
            "taken over by the retry"
        );
        assert_eq!(
            guard.claim(&vote(1, "u", "b", &[1]), 11).await.unwrap(),
            Claim::Taken
        );
        assert!(guard.release(1, "u", 10).await.unwrap(), "the retry's own");
        assert_eq!(
            guard.claim(&vote(1, "u", "b", &[1]), 12).await.unwrap(),
            Claim::Fresh
        );
    }

    #[tokio::test(start_paused = true)]
    async fn claims_expire_after_the_ttl() {
        let guard = MemoryGuard::new(Duration::from_secs(5));
        assert_eq!(
            guard.claim(&vote(1, "u", "a", &[1]), 1).await.unwrap(),
            Claim::Fresh
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(
            guard.claim(&vote(1, "u", "b", &[1]), 2).await.unwrap(),
            Claim::Fresh
        );
        assert!(
            !guard.release(1, "u", 1).await.unwrap(),
            "the expired claim's attempt"
        );
        assert_eq!(
            guard.claim(&vote(1, "u", "c", &[1]), 3).await.unwrap(),
            Claim::Taken
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_sweep_frees_expired_claims_and_keeps_live_ones() {
        let guard = MemoryGuard::new(Duration::from_secs(5));
        guard.claim(&vote(1, "old", "a", &[1]), 1).await.unwrap();
        tokio::time::advance(Duration::from_secs(3)).await;
        guard.claim(&vote(1, "new", "b", &[1]), 2).await.unwrap();
        tokio::time::advance(Duration::from_secs(3)).await;
        guard.sweep();
        assert_eq!(guard.claims.len(), 1);
        assert_eq!(
            guard.claim(&vote(1, "new", "c", &[1]), 3).await.unwrap(),
            Claim::Taken,
            "the live claim survives the sweep"
        );
    }

    #[tokio::test]
    async fn warmed_voters_are_duplicates_and_their_retries_retries() {
        let guard = MemoryGuard::new(Duration::from_secs(60));
        let voter = Voter {
            poll_id: 1,
            user_id: "u".into(),
            vote_id: "a".into(),
            choices: vec![2, 1],
        };
        assert_eq!(guard.warm([voter]), 1);
        assert_eq!(
            guard.claim(&vote(1, "u", "b", &[1]), 1).await.unwrap(),
            Claim::Taken
        );
        assert_eq!(
            guard.claim(&vote(1, "u", "a", &[2]), 2).await.unwrap(),
            Claim::Reused
        );
        assert_eq!(
            guard.claim(&vote(1, "u", "a", &[1, 2]), 3).await.unwrap(),
            Claim::Retry
        );
    }

    #[test]
    fn ballot_fingerprints_ignore_order_and_tell_ballots_apart() {
        assert_eq!(ballot_fingerprint(&[1, 3]), ballot_fingerprint(&[3, 1]));
        let all: std::collections::HashSet<u32> = (1..=32)
            .flat_map(|a| (a..=32).map(move |b| if a == b { vec![a] } else { vec![a, b] }))
            .map(|ballot| ballot_fingerprint(&ballot))
            .collect();
        assert_eq!(
            all.len(),
            32 + 32 * 31 / 2,
            "no two of these ballots collide"
        );
    }
}
