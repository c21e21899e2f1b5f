//! The embedded [`DedupGuard`]: an in-process map of claims with expiry.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use pollcast_actors::{DedupGuard, GuardError, PollId};
use tokio::time::Instant;

/// How often expired claims are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

type Claims = DashMap<(PollId, Box<str>), Instant>;

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
                claims.retain(|_, expires| *expires > now);
            }
        });
        Self { claims, ttl }
    }

    /// Claims every (poll, user) already counted, so a duplicate after a restart still gets
    /// a 409 instead of a 202 that the ledger would then ignore.
    pub fn warm(&self, voters: impl IntoIterator<Item = (PollId, String)>) -> usize {
        let expires = Instant::now() + self.ttl;
        let before = self.claims.len();
        for (poll, user) in voters {
            self.claims.insert((poll, user.into_boxed_str()), expires);
        }
        self.claims.len() - before
    }
}

#[async_trait]
impl DedupGuard for MemoryGuard {
    async fn claim(&self, poll: PollId, user: &str) -> Result<bool, GuardError> {
        let now = Instant::now();
        match self.claims.entry((poll, user.into())) {
            Entry::Occupied(e) if *e.get() > now => Ok(false),
            Entry::Occupied(mut e) => {
                e.insert(now + self.ttl);
                Ok(true)
            }
            Entry::Vacant(e) => {
                e.insert(now + self.ttl);
                Ok(true)
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
        assert!(guard.claim(1, "u").await.unwrap());
        assert!(!guard.claim(1, "u").await.unwrap());
        assert!(guard.claim(2, "u").await.unwrap(), "other poll");
    }

    #[tokio::test]
    async fn released_claim_can_be_made_again() {
        let guard = MemoryGuard::new(Duration::from_secs(60));
        assert!(guard.claim(1, "u").await.unwrap());
        guard.release(1, "u").await.unwrap();
        assert!(guard.claim(1, "u").await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn claims_expire_after_the_ttl() {
        let guard = MemoryGuard::new(Duration::from_secs(5));
        assert!(guard.claim(1, "u").await.unwrap());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(guard.claim(1, "u").await.unwrap());
    }

    #[tokio::test]
    async fn warmed_voters_are_duplicates() {
        let guard = MemoryGuard::new(Duration::from_secs(60));
        assert_eq!(guard.warm([(1, "u".to_string())]), 1);
        assert!(!guard.claim(1, "u").await.unwrap());
    }
}
