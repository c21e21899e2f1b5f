//! The embedded [`DedupGuard`]: an in-process map of claims with expiry.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use pollcast_actors::{Claim, DedupGuard, GuardError, PollId, Voter};
use tokio::time::Instant;

/// How often expired claims are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What a claim remembers: a fingerprint of the vote id it was made for, to tell a retry
/// from a duplicate, and when it expires.
///
/// Why a fingerprint and not the id: a claim is kept for every vote of the TTL, and the id
/// (a heap string of ~34 bytes, allocated per vote) was most of its size; 16 bytes inline
/// take 29 MB off 450,000 claims (docs/BENCHMARKS.md). Two different ids of one voter that
/// share a 64-bit fingerprint would pass as a retry: the ledger's one-ballot-per-voter key
/// still counts that voter once.
#[derive(Debug, Clone, Copy)]
struct Held {
    vote: u64,
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

fn millis_since(epoch: Instant) -> u64 {
    Instant::now().saturating_duration_since(epoch).as_millis() as u64
}

impl MemoryGuard {
    /// An empty guard whose claims expire after `ttl`; sweeps expired claims in the
    /// background for as long as the guard lives.
    pub fn new(ttl: Duration) -> Self {
        let claims = Arc::new(Claims::new());
        let weak: Weak<Claims> = Arc::downgrade(&claims);
        let epoch = Instant::now();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(claims) = weak.upgrade() else { return };
                let now = millis_since(epoch);
                claims.retain(|_, held| held.expires > now);
            }
        });
        Self { claims, ttl, epoch }
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
            let key = (v.poll_id, v.user_id.into_boxed_str());
            let held = Held {
                vote: fingerprint(&v.vote_id),
                expires,
            };
            self.claims.insert(key, held);
        }
        self.claims.len() - before
    }
}

#[async_trait]
impl DedupGuard for MemoryGuard {
    async fn claim(&self, poll: PollId, user: &str, vote_id: &str) -> Result<Claim, GuardError> {
        let now = millis_since(self.epoch);
        let vote = fingerprint(vote_id);
        let fresh = Held {
            vote,
            expires: self.expires_after(now),
        };
        match self.claims.entry((poll, user.into())) {
            Entry::Occupied(e) if e.get().expires > now && e.get().vote == vote => Ok(Claim::Retry),
            Entry::Occupied(e) if e.get().expires > now => Ok(Claim::Taken),
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

    async fn release(&self, poll: PollId, user: &str) -> Result<(), GuardError> {
        self.claims.remove(&(poll, Box::<str>::from(user)));
        Ok(())
    }

    async fn ping(&self) -> Result<(), GuardError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_claim_of_the_same_voter_is_refused() {
        let guard = MemoryGuard::new(Duration::from_secs(60));
        assert_eq!(guard.claim(1, "u", "a").await.unwrap(), Claim::Fresh);
        assert_eq!(guard.claim(1, "u", "b").await.unwrap(), Claim::Taken);
        assert_eq!(
            guard.claim(2, "u", "b").await.unwrap(),
            Claim::Fresh,
            "other poll"
        );
    }

    #[tokio::test]
    async fn a_claim_with_the_same_vote_id_is_a_retry() {
        let guard = MemoryGuard::new(Duration::from_secs(60));
        assert_eq!(guard.claim(1, "u", "a").await.unwrap(), Claim::Fresh);
        assert_eq!(guard.claim(1, "u", "a").await.unwrap(), Claim::Retry);
    }

    #[tokio::test]
    async fn released_claim_can_be_made_again() {
        let guard = MemoryGuard::new(Duration::from_secs(60));
        assert_eq!(guard.claim(1, "u", "a").await.unwrap(), Claim::Fresh);
        guard.release(1, "u").await.unwrap();
        assert_eq!(guard.claim(1, "u", "b").await.unwrap(), Claim::Fresh);
    }

    #[tokio::test(start_paused = true)]
    async fn claims_expire_after_the_ttl() {
        let guard = MemoryGuard::new(Duration::from_secs(5));
        assert_eq!(guard.claim(1, "u", "a").await.unwrap(), Claim::Fresh);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(guard.claim(1, "u", "b").await.unwrap(), Claim::Fresh);
    }

    #[tokio::test]
    async fn warmed_voters_are_duplicates_and_their_retries_retries() {
        let guard = MemoryGuard::new(Duration::from_secs(60));
        let voter = Voter {
            poll_id: 1,
            user_id: "u".into(),
            vote_id: "a".into(),
        };
        assert_eq!(guard.warm([voter]), 1);
        assert_eq!(guard.claim(1, "u", "b").await.unwrap(), Claim::Taken);
        assert_eq!(guard.claim(1, "u", "a").await.unwrap(), Claim::Retry);
    }
}
