//! Taking a vote: validate it against the poll, claim the voter in the duplicate guard, append
//! it durably to the vote log. This is the whole hot path of `POST /vote`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use pollcast_actors::domain::now_millis;
use pollcast_actors::{
    DedupGuard, GuardError, LogError, OptionId, Poll, PollId, PollStore, StoreError, Vote,
    VoteAppender,
};
use tokio::time::Instant;

/// How long a cached poll is trusted before it is read again (closing is visible to every
/// process within this delay).
const CATALOG_TTL: Duration = Duration::from_secs(1);

/// What the vote path needs to know about a poll.
#[derive(Debug)]
pub struct PollMeta {
    options: HashSet<OptionId>,
    closed: bool,
    loaded: Instant,
}

impl PollMeta {
    fn of(poll: &Poll) -> Self {
        Self {
            options: poll.options.iter().map(|o| o.id).collect(),
            closed: poll.closed,
            loaded: Instant::now(),
        }
    }
}

/// A read-through cache of poll metadata, so that validating a vote costs no store round trip.
#[derive(Clone)]
pub struct PollCatalog {
    store: Arc<dyn PollStore>,
    polls: Arc<DashMap<PollId, Arc<PollMeta>>>,
}

impl PollCatalog {
    /// An empty cache in front of `store`.
    pub fn new(store: Arc<dyn PollStore>) -> Self {
        Self {
            store,
            polls: Arc::default(),
        }
    }

    /// The poll's metadata, `None` if there is no such poll. While the store is unreachable
    /// a poll already known is served from the cache: votes only need the log and the guard,
    /// so a store outage must not stop them.
    pub async fn get(&self, id: PollId) -> Result<Option<Arc<PollMeta>>, StoreError> {
        let cached = self.polls.get(&id).map(|m| m.clone());
        if let Some(meta) = &cached
            && meta.loaded.elapsed() < CATALOG_TTL
        {
            return Ok(cached);
        }
        match self.store.get_poll(id).await {
            Ok(Some(poll)) => Ok(Some(self.remember(&poll))),
            Ok(None) => Ok(None),
            Err(err) => match cached {
                Some(stale) => {
                    tracing::debug!(poll_id = id, error = %err, "store unreachable; using the cached poll");
                    Ok(Some(stale))
                }
                None => Err(err),
            },
        }
    }

    /// Records what the store just said about a poll (after creating or closing it).
    pub fn remember(&self, poll: &Poll) -> Arc<PollMeta> {
        let meta = Arc::new(PollMeta::of(poll));
        self.polls.insert(poll.id, meta.clone());
        meta
    }
}

/// Why a vote was not taken.
#[derive(Debug, thiserror::Error)]
pub enum VoteRejection {
    /// No such poll.
    #[error("poll {0} does not exist")]
    UnknownPoll(PollId),
    /// The poll has no such option.
    #[error("poll {poll} has no option {option}")]
    UnknownOption {
        /// The poll.
        poll: PollId,
        /// The option asked for.
        option: OptionId,
    },
    /// The poll is closed.
    #[error("poll {0} is closed")]
    Closed(PollId),
    /// This user already voted in this poll.
    #[error("user already voted in poll {0}")]
    Duplicate(PollId),
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The duplicate guard could not be reached; nothing was appended.
    #[error(transparent)]
    Guard(#[from] GuardError),
    /// The vote could not be made durable; the claim was released.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// The vote path's handles; cheap to clone, shared by every request.
#[derive(Clone)]
pub struct VoteIntake {
    catalog: PollCatalog,
    guard: Arc<dyn DedupGuard>,
    log: Arc<dyn VoteAppender>,
}

impl VoteIntake {
    /// Builds the vote path.
    pub fn new(
        catalog: PollCatalog,
        guard: Arc<dyn DedupGuard>,
        log: Arc<dyn VoteAppender>,
    ) -> Self {
        Self {
            catalog,
            guard,
            log,
        }
    }

    /// Takes a vote. `Ok` means it is durable in the log and will be counted exactly once.
    pub async fn submit(&self, mut vote: Vote) -> Result<(), VoteRejection> {
        let meta = self
            .catalog
            .get(vote.poll_id)
            .await?
            .ok_or(VoteRejection::UnknownPoll(vote.poll_id))?;
        if !meta.options.contains(&vote.option_id) {
            return Err(VoteRejection::UnknownOption {
                poll: vote.poll_id,
                option: vote.option_id,
            });
        }
        if meta.closed {
            return Err(VoteRejection::Closed(vote.poll_id));
        }
        vote.voted_at = Some(now_millis());
        let this = self.clone();
        // Why a task: if the client hangs up mid-request, hyper drops the handler future.
        // Claim-then-append must still finish as a unit, or the voter would stay locked out
        // by a claim whose vote never reached the log.
        tokio::spawn(async move { this.claim_and_append(vote).await })
            .await
            .expect("vote task does not panic")
    }

    async fn claim_and_append(&self, vote: Vote) -> Result<(), VoteRejection> {
        if !self.guard.claim(vote.poll_id, &vote.user_id).await? {
            return Err(VoteRejection::Duplicate(vote.poll_id));
        }
        if let Err(err) = self.log.append(&vote).await {
            if let Err(release) = self.guard.release(vote.poll_id, &vote.user_id).await {
                tracing::error!(poll_id = vote.poll_id, user_id = %vote.user_id, error = %release, "could not release the claim of a vote that was not appended");
            }
            return Err(err.into());
        }
        tracing::trace!(poll_id = vote.poll_id, option_id = vote.option_id, user_id = %vote.user_id, "vote appended");
        Ok(())
    }
}
