//! The embedded [`DedupGuard`]: an in-process map of claims with expiry.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use pollcast_actors::{Claim, DedupGuard, GuardError, PollId, Voter};
use tokio::time::Instant;

/// How often expired claims are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Each claim holds the vote id it was made for, to tell a retry from a duplicate.
type Claims = DashMap<(PollId, Box<str>), (Box<str>, Instant)>;

/// Claims live in memory for `ttl`; the process's own restarts are covered by warming the
/// map from the store's ledger ([`MemoryGuard::warm`]).
#[derive(Debug, Clone)]
pub struct MemoryGuard {
    claims: Arc<Claims>,
    ttl: Duration,
}

impl MemoryGuard {
    /// An empty guard whose claims expire after `ttl`; sweeps expired claims in the
    /// background for as long as the guard lives.
    pub fn new(ttl: Duration) -> Self {
        let claims = Arc::new(Claims::new());
        let weak: Weak<Claims> = Arc::downgrade(&claims);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(claims) = weak.upgrade() else { return };
                let now = Instant::now();
                claims.retain(|_, (_, expires)| *expires > now);
            }
        });
        Self { claims, ttl }
    }

    /// Claims every (poll, user) already counted, so a duplicate after a restart still gets
    /// a 409 instead of a 202 that the ledger would then ignore.
    pub fn warm(&self, voters: impl IntoIterator<Item = Voter>) -> usize {
        let expires = Instant::now() + self.ttl;
        let before = self.claims.len();
        for v in voters {
            let key = (v.poll_id, v.user_id.into_boxed_str());
            self.claims
                .insert(key, (v.vote_id.into_boxed_str(), expires));
        }
        self.claims.len() - before
    }
}

#[async_trait]
impl DedupGuard for MemoryGuard {
    async fn claim(&self, poll: PollId, user: &str, vote_id: &str) -> Result<Claim, GuardError> {
        let now = Instant::now();
        let fresh = (Box::<str>::from(vote_id), now + self.ttl);
        match self.claims.entry((poll, user.into())) {
            Entry::Occupied(e) if e.get().1 > now && &*e.get().0 == vote_id => Ok(Claim::Retry),
            Entry::Occupied(e) if e.get().1 > now => Ok(Claim::Taken),
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
