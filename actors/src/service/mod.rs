//! The application layer: what pollcast does with polls, in one place. The HTTP API, the
//! Socket.IO edge and the closing scheduler call a [`PollService`]; it asks the poll's
//! rules (`crate::poll`, the one home of what a poll allows) and drives the ports
//! (store, duplicate guard, vote log, lifecycle events).
//!
//! Taking a vote is the whole hot path of `POST /vote`: check it against the poll's rules
//! (from the [`PollCatalog`], no store round trip), claim the voter in the duplicate guard,
//! append the vote durably to the log.

mod catalog;
mod coalesce;
mod finish_on_drop;
#[cfg(test)]
mod memory_store;

use std::sync::Arc;
use std::time::Duration;

use crate::domain::now_millis;
use crate::ids::random_id;
use crate::{
    BallotRejection, Claim, DedupGuard, GuardError, InvalidPoll, LedgerRow, LogEntry, LogError,
    OptionId, Poll, PollDraft, PollEvents, PollId, PollPage, StoreError, Vote, VoteAppender,
};

pub use catalog::{PollCatalog, PollMeta};
use coalesce::Coalesced;
use finish_on_drop::FinishOnDrop;

/// Why a vote was refused: the poll's rules, or the voter's earlier vote. Each is the
/// client's to fix (a 4xx); a failing dependency is [`Unavailable`] instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VoteRejection {
    /// No such poll.
    #[error("poll {0} does not exist")]
    UnknownPoll(PollId),
    /// The ballot does not fit the poll.
    #[error("poll {poll}: {why}")]
    Ballot {
        /// The poll.
        poll: PollId,
        /// The rule it breaks.
        why: BallotRejection,
    },
    /// The poll is closed.
    #[error("poll {0} is closed")]
    Closed(PollId),
    /// This user already voted in this poll.
    #[error("user already voted in poll {0}")]
    Duplicate(PollId),
    /// The vote id (idempotency key) was used before by this user in this poll, for another
    /// ballot.
    #[error("this voteId (Idempotency-Key) was already used in poll {0} for another ballot")]
    VoteIdReused(PollId),
}

impl VoteRejection {
    /// The option asked for that the poll does not have, if that is why.
    pub fn unknown_option(&self) -> Option<(PollId, OptionId)> {
        match self {
            Self::Ballot {
                poll,
                why: BallotRejection::UnknownOption(option),
            } => Some((*poll, *option)),
            _ => None,
        }
    }
}

/// A dependency failed: nothing is known to be wrong with the request, and a retry may
/// succeed (a 503).
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The duplicate guard could not be reached; nothing was appended.
    #[error(transparent)]
    Guard(#[from] GuardError),
    /// The vote log could not be written; for a vote, its claim was released if the vote
    /// certainly is not in the log.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Why a vote was not taken.
#[derive(Debug, thiserror::Error)]
pub enum VoteError {
    /// Refused: the client's to fix.
    #[error(transparent)]
    Rejected(#[from] VoteRejection),
    /// Not taken now: a dependency failed.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
}

/// Why `?` on a port's error works in the vote path: each is a dependency failing.
macro_rules! unavailable_from {
    ($($port:ty),*) => {$(
        impl From<$port> for VoteError {
            fn from(err: $port) -> Self {
                Self::Unavailable(err.into())
            }
        }
    )*};
}
unavailable_from!(StoreError, GuardError, LogError);

/// Why a poll was not created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The draft breaks a rule (a 422).
    #[error(transparent)]
    Invalid(#[from] InvalidPoll),
    /// The store could not create it.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
}

/// One read of a whole poll, as shared by the callers it serves.
type PollRead = Result<Option<Poll>, Arc<StoreError>>;

/// Everything pollcast does with polls; cheap to clone, shared by every request.
#[derive(Clone)]
pub struct PollService {
    /// The process's poll cache, in front of the store (`catalog.store()`).
    catalog: PollCatalog,
    /// Reads of a whole poll (every WebSocket's first snapshot) that arrive together share
    /// one store read: see `coalesce`.
    reads: Arc<Coalesced<PollId, PollRead>>,
    guard: Arc<dyn DedupGuard>,
    log: Arc<dyn VoteAppender>,
    events: Arc<dyn PollEvents>,
}

impl PollService {
    /// The service over its ports, with `catalog` (the process's one poll cache, shared
    /// with the lifecycle events) in front of its store.
    pub fn new(
        catalog: PollCatalog,
        guard: Arc<dyn DedupGuard>,
        log: Arc<dyn VoteAppender>,
        events: Arc<dyn PollEvents>,
    ) -> Self {
        Self {
            catalog,
            reads: Arc::new(Coalesced::new()),
            guard,
            log,
            events,
        }
    }

    /// Creates a poll from `draft` if it keeps the rules. A webhook gets a fresh signing
    /// secret, shown once in the created poll's settings.
    pub async fn create(&self, draft: PollDraft) -> Result<Poll, CreateError> {
        let secret: [u8; 32] = rand::random();
        let secret = secret.iter().map(|b| format!("{b:02x}")).collect();
        let new = draft.check(now_millis(), secret)?;
        let poll = self
            .catalog
            .store()
            .create_poll(new)
            .await
            .map_err(Unavailable::from)?;
        self.catalog.remember(&poll);
        self.events.opened(&poll);
        tracing::info!(
            poll_id = poll.id,
            options = poll.options.len(),
            max_choices = poll.settings.max_choices,
            closes_at = poll.settings.closes_at,
            webhook = poll.settings.webhook.is_some(),
            "poll created"
        );
        Ok(poll)
    }

    /// The poll with its counts as stored now (read after this call began); `None`: no
    /// such poll.
    pub async fn get(&self, id: PollId) -> Result<Option<Poll>, Unavailable> {
        let store = self.catalog.store();
        let read = || async move { store.get_poll(id).await.map_err(Arc::new) };
        self.reads.get(id, read).await.map_err(|shared| {
            // Each caller gets its own error; the cause is the one read's, as text.
            StoreError::new(shared.what, shared.source.to_string()).into()
        })
    }

    /// A page of polls, newest first.
    pub async fn list(&self, page: PollPage) -> Result<Vec<Poll>, Unavailable> {
        Ok(self.catalog.store().list_polls(page).await?)
    }

    /// A page of the poll's ledger: the ballots after row `after`, at most `limit`.
    pub async fn ledger(
        &self,
        poll: PollId,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LedgerRow>, Unavailable> {
        Ok(self.catalog.store().ledger(poll, after, limit).await?)
    }

    /// Whether the poll exists, from the cache when it is known.
    pub async fn exists(&self, id: PollId) -> Result<bool, Unavailable> {
        Ok(self.catalog.get(id).await?.is_some())
    }

    /// Takes a vote. `Ok` means it is durable in the log and will be counted exactly once.
    pub async fn submit(&self, mut vote: Vote) -> Result<(), VoteError> {
        let meta = self
            .catalog
            .get(vote.poll_id)
            .await?
            .ok_or(VoteRejection::UnknownPoll(vote.poll_id))?;
        meta.rules
            .check_ballot(&vote.choices)
            .map_err(|why| VoteRejection::Ballot {
                poll: vote.poll_id,
                why,
            })?;
        let now = now_millis();
        if meta.is_closed_at(now) {
            return Err(VoteRejection::Closed(vote.poll_id).into());
        }
        vote.voted_at = Some(now);
        // Why always an id: the ledger keys votes by (poll, user, vote id), so a vote without
        // a client key still replays as itself, and a later change is told apart from it.
        vote.vote_id.get_or_insert_with(|| random_id("s-"));
        let allow_change = meta.rules.allows_change();
        let this = self.clone();
        // Why: if the client hangs up mid-request, hyper drops the handler future.
        // Claim-then-append must still finish as a unit, or the voter would stay locked out
        // by a claim whose vote never reached the log.
        FinishOnDrop::new(async move { this.claim_and_append(vote, allow_change).await }).await
    }

    async fn claim_and_append(&self, vote: Vote, allow_change: bool) -> Result<(), VoteError> {
        // Random, so that a claim names the request that holds it, across processes too.
        let attempt: u64 = rand::random();
        let claim = self.guard.claim(&vote, attempt).await?;
        // A retry is appended again rather than answered from memory: the first attempt may
        // still be failing, and the ledger applies the vote id once however often it is read.
        // A change is appended too where the poll allows it; the ledger orders it after the
        // ballot it replaces. A vote id reused for another ballot never is: the ledger would
        // skip it as the vote already applied, and a 202 must mean "counted".
        match claim {
            Claim::Reused => return Err(VoteRejection::VoteIdReused(vote.poll_id).into()),
            Claim::Taken if !allow_change => {
                return Err(VoteRejection::Duplicate(vote.poll_id).into());
            }
            _ => {}
        }
        let (poll_id, user_id) = (vote.poll_id, vote.user_id.clone());
        if let Err(err) = self.log.append(LogEntry::Vote(vote)).await {
            // Released only where this attempt made the claim and the vote is certainly not
            // in the log: a retry's claim may stand for an earlier attempt still in flight,
            // and a vote whose append has an unknown outcome may yet be delivered and counted
            // (then a retry with its vote id is a retry, and another vote a 409). The guard
            // releases the claim only while this attempt holds it.
            if claim == Claim::Fresh && !err.outcome_unknown {
                match self.guard.release(poll_id, &user_id, attempt).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::debug!(poll_id, user_id = %user_id, "the claim of a vote that was not appended was taken over by a retry; kept");
                    }
                    Err(release) => {
                        tracing::error!(poll_id, user_id = %user_id, error = %release, "could not release the claim of a vote that was not appended");
                    }
                }
            }
            return Err(err.into());
        }
        tracing::trace!(poll_id, user_id = %user_id, ?claim, "vote appended");
        Ok(())
    }

    /// Closes a poll now: the store refuses it new votes from this moment, and the close
    /// marker, appended behind every vote already in the log, makes its aggregator publish
    /// the final counts once those are flushed. `None`: no such poll.
    pub async fn close(&self, id: PollId) -> Result<Option<Poll>, Unavailable> {
        let Some((poll, newly)) = self.catalog.store().close_poll(id, now_millis()).await? else {
            return Ok(None);
        };
        self.catalog.remember(&poll);
        // Closing twice appends one marker: the first (or the scheduler's re-send) seals it.
        if newly {
            let closed_at = poll.closed_at.unwrap_or_else(now_millis);
            self.log.append(LogEntry::closed(id, closed_at)).await?;
        }
        Ok(Some(poll))
    }

    /// Closes the polls whose closing time has come, and re-sends the close marker of
    /// polls whose final counts were never published (the marker was lost in a crash).
    /// Returns how many markers were appended.
    pub async fn close_due_polls(&self, lost_after: Duration) -> Result<usize, Unavailable> {
        let now = now_millis();
        let unsealed_before = now - lost_after.as_millis() as i64;
        let due = self
            .catalog
            .store()
            .polls_to_seal(now, unsealed_before)
            .await?;
        for (poll_id, closed_at) in &due {
            self.log
                .append(LogEntry::closed(*poll_id, *closed_at))
                .await?;
            tracing::info!(poll_id, "poll closed on schedule");
        }
        Ok(due.len())
    }
}
