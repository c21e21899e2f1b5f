//! The ports: the three small traits the core is written against.
//!
//! Each has a production adapter (Postgres, Kafka, Redis) and an embedded one (SQLite, a
//! local durable log, an in-process map); the actors never know which one they talk to.
//! Handles are shared as `Arc<dyn …>` so that choosing an adapter in config.toml does not
//! multiply the actor tree by every combination of backends.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::domain::{CountsUpdate, LogEntry, OptionCount, OptionId, PollId, UnixMillis, Vote};
use crate::poll::{NewPoll, Poll};

/// Any error from a backend, kept as its source so logs show the whole chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

macro_rules! port_error {
    ($(#[$doc:meta])* $name:ident, $label:literal) => {
        $(#[$doc])*
        #[derive(Debug, thiserror::Error)]
        #[error("{} {}: {}", $label, .what, .source)]
        pub struct $name {
            /// The operation that failed, for the log line and the 503 body.
            pub what: &'static str,
            /// What the backend said.
            #[source]
            pub source: BoxError,
        }

        impl $name {
            /// Wraps a backend error with the name of the operation that failed.
            pub fn new(what: &'static str, source: impl Into<BoxError>) -> Self {
                Self { what, source: source.into() }
            }
        }
    };
}

port_error!(
    /// The store could not do what was asked; nothing was half-applied (every write is one
    /// transaction).
    StoreError,
    "store:"
);
/// The vote log could not append, read or commit.
#[derive(Debug)]
pub struct LogError {
    /// The operation that failed, for the log line and the 503 body.
    pub what: &'static str,
    /// What the backend said.
    pub source: BoxError,
    /// Whether an append may still take effect: the log gave no answer in time (a Kafka
    /// producer still holds the record and may deliver it), as opposed to a definite refusal.
    /// The vote path keeps the voter's claim then, so that a retry with the same vote id is
    /// a retry and not a second ballot.
    pub outcome_unknown: bool,
}

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vote log: {}: {}", self.what, self.source)?;
        if self.outcome_unknown {
            f.write_str(" (outcome unknown: it may still be appended)")?;
        }
        Ok(())
    }
}

impl std::error::Error for LogError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

impl LogError {
    /// Wraps a backend error with the name of the operation that failed: nothing was done.
    pub fn new(what: &'static str, source: impl Into<BoxError>) -> Self {
        Self {
            what,
            source: source.into(),
            outcome_unknown: false,
        }
    }

    /// An append whose outcome is not known: it may still be appended (the field
    /// `outcome_unknown` is set).
    pub fn outcome_unknown(what: &'static str, source: impl Into<BoxError>) -> Self {
        Self {
            outcome_unknown: true,
            ..Self::new(what, source)
        }
    }
}
port_error!(
    /// The duplicate guard could not be reached.
    GuardError,
    "duplicate guard:"
);

/// What a flush changed, as committed by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushOutcome {
    /// Ledger rows actually inserted (votes counted by this flush).
    pub inserted: u64,
    /// The poll's version after the flush; unchanged when nothing was inserted.
    pub seq: i64,
    /// New counts of the options this flush changed.
    pub changed: Vec<OptionCount>,
    /// Counts of every option after the flush.
    pub all: Vec<OptionCount>,
}

/// Polls, their counts, and the vote ledger that makes counting idempotent.
#[async_trait]
pub trait PollStore: Send + Sync + 'static {
    /// Creates a poll with options numbered 1..=n.
    async fn create_poll(&self, poll: NewPoll) -> Result<Poll, StoreError>;

    /// At most `page.limit` polls older than `page.before` (all when `None`), newest first.
    async fn list_polls(&self, page: PollPage) -> Result<Vec<Poll>, StoreError>;

    /// One poll with its current counts.
    async fn get_poll(&self, id: PollId) -> Result<Option<Poll>, StoreError>;

    /// The polls among `ids` that exist, with their current counts, in no particular order.
    /// Stores answer it in a few round trips whatever the number of ids: when 10,000 polls
    /// get their first votes at once, their aggregators start from one read, not 10,000.
    async fn get_polls(&self, ids: &[PollId]) -> Result<Vec<Poll>, StoreError> {
        let mut polls = Vec::with_capacity(ids.len());
        for &id in ids {
            polls.extend(self.get_poll(id).await?);
        }
        Ok(polls)
    }

    /// Whether a poll is closed (`None`: no such poll). Cheaper than [`Self::get_poll`]:
    /// the vote path re-checks it every second for every active poll.
    async fn is_closed(&self, id: PollId) -> Result<Option<bool>, StoreError>;

    /// Which of `ids` are closed (unknown ids are not). Stores answer it in one round trip:
    /// the vote path re-reads the flags of all the polls being voted in twice a second,
    /// which with 10,000 active polls one read each could not afford.
    async fn closed_among(&self, ids: &[PollId]) -> Result<Vec<PollId>, StoreError> {
        let mut closed = Vec::new();
        for &id in ids {
            if self.is_closed(id).await? == Some(true) {
                closed.push(id);
            }
        }
        Ok(closed)
    }

    /// Marks a poll closed as of `at` (idempotent: a closed poll keeps its closing time) and
    /// returns it, with whether this call closed it; `None` if it does not exist.
    async fn close_poll(
        &self,
        id: PollId,
        at: UnixMillis,
    ) -> Result<Option<(Poll, bool)>, StoreError>;

    /// The polls that need a close marker appended now: every open poll whose `closes_at`
    /// is not after `now` (closed by this call, as of its `closes_at`), and every closed poll
    /// whose final counts are still unpublished although its last marker was sent before
    /// `resend_before` (that marker was lost). Several processes may call this at once; each
    /// poll is returned to exactly one of them.
    async fn polls_to_seal(
        &self,
        now: UnixMillis,
        resend_before: UnixMillis,
    ) -> Result<Vec<(PollId, UnixMillis)>, StoreError>;

    /// Applies a batch of votes of one poll, in log order, in a single transaction (see
    /// [`crate::ballot`]): a vote already in the ledger (same poll, user and vote id) is
    /// skipped, a voter's first ballot is counted, and a later one replaces it only where
    /// the poll allows changes. Replaying a batch therefore changes nothing.
    ///
    /// Every vote must be for `poll` and choose only its options; `allow_change` is the
    /// poll's [`crate::PollRules::allows_change`] (the caller knows the poll's rules, so the
    /// store keeps no copy of them). Why shared: a store that hands the batch to a writer
    /// task of its own would otherwise copy every vote.
    async fn apply_votes(
        &self,
        poll: PollId,
        allow_change: bool,
        votes: Arc<[Vote]>,
    ) -> Result<FlushOutcome, StoreError>;

    /// Marks the poll's final counts as published: bumps its version and returns every
    /// count, for the `closed` message; `None` if it was sealed before (a repeated marker).
    async fn seal_poll(&self, poll: PollId) -> Result<Option<FlushOutcome>, StoreError>;

    /// Up to `limit` ledger rows of a poll after `after` (a row number; 0 for the first
    /// page), in the order they were counted.
    async fn ledger(
        &self,
        poll: PollId,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LedgerRow>, StoreError>;

    /// Current ballots recorded since `since`, to warm an in-process duplicate guard after
    /// a restart.
    async fn voters_since(&self, since: UnixMillis) -> Result<Vec<Voter>, StoreError>;

    /// Cheap round trip, for readiness checks.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// One page of the poll list: polls with an id below `before`, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollPage {
    /// Only polls older than this one (the previous page's last id); `None`: from the newest.
    pub before: Option<PollId>,
    /// Polls at most.
    pub limit: i64,
}

impl PollPage {
    /// As many polls as a store lists in one read.
    pub const ALL: Self = Self {
        before: None,
        limit: i64::MAX,
    };
}

/// A voter whose ballot is in the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Voter {
    /// The poll.
    pub poll_id: PollId,
    /// The voter.
    pub user_id: String,
    /// The vote id of the ballot (empty when the vote had none).
    pub vote_id: String,
    /// The options of the ballot.
    pub choices: Vec<OptionId>,
}

/// One row of a poll's ledger: a counted vote, current or replaced by a later one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerRow {
    /// Position in the ledger (the export's paging cursor).
    pub row: i64,
    /// The voter.
    pub user_id: String,
    /// The vote's id (empty when it had none).
    pub vote_id: String,
    /// The options chosen.
    pub option_ids: Vec<i64>,
    /// When the vote was accepted.
    pub voted_at: UnixMillis,
    /// Whether this is the voter's ballot now (false: replaced by a change).
    pub current: bool,
}

/// The producing side of the vote log, shared by every HTTP handler.
#[async_trait]
pub trait VoteAppender: Send + Sync + 'static {
    /// Appends a vote (or a close marker) and returns only once it is durable (fsync'd
    /// locally, or acknowledged by all in-sync Kafka replicas). What got `Ok` is never lost.
    /// Why by value: a log may keep the entry itself (the embedded one hands it to its
    /// reader) rather than a copy.
    async fn append(&self, entry: LogEntry) -> Result<(), LogError>;

    /// Cheap check that the log can take appends, for readiness checks.
    async fn ping(&self) -> Result<(), LogError> {
        Ok(())
    }
}

/// A partition of the vote log; the embedded log has exactly one, partition 0.
pub type Partition = i32;

/// A position in a partition. Committing offset `o` means "every record before `o` has been
/// applied to the store"; reading resumes at `o`.
pub type Offset = i64;

/// One record read from the vote log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Partition the record came from.
    pub partition: Partition,
    /// Its offset; the next record of the partition is at a greater offset.
    pub offset: Offset,
    /// The offset just past this record: what to commit once it has been applied.
    pub next_offset: Offset,
    /// The decoded record, or `None` for one that is neither a vote nor a marker (logged by
    /// the adapter and skipped, so one bad record cannot stall a partition).
    pub entry: Option<LogEntry>,
}

/// What reading the vote log produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// Records, in offset order within each partition (possibly empty after a timeout).
    Records(Vec<LogRecord>),
    /// This consumer now owns these partitions (Kafka group rebalance).
    Assigned(Vec<Partition>),
    /// This consumer is about to lose these partitions: flush and commit what it read from
    /// them, then call [`VoteSource::commit`]; the adapter may hold the rebalance until then.
    Revoked(Vec<Partition>),
}

/// The consuming side of the vote log, owned by the ingest actor.
#[async_trait]
pub trait VoteSource: Send + 'static {
    /// Waits at most `wait` for records and returns up to `max` of them, or a rebalance.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<SourceEvent, LogError>;

    /// Durably records how far each partition has been applied to the store.
    async fn commit(&mut self, positions: &[(Partition, Offset)]) -> Result<(), LogError>;

    /// The end of each partition this consumer reads (the offset the next record appended
    /// will get), for the consumer-lag metric; empty when unknown.
    fn end_offsets(&self) -> Vec<(Partition, Offset)> {
        Vec::new()
    }

    /// Moves the read position of a partition back, so that records that were read but lost
    /// before they were applied (a crashed aggregator) are read again.
    async fn seek(&mut self, partition: Partition, offset: Offset) -> Result<(), LogError>;

    /// Stops reading for good, after the final flush and commit: a group consumer leaves
    /// its group now, so that the others take its partitions over at once instead of after
    /// its session times out.
    async fn close(&mut self) {}
}

/// Whether the vote log's consumer is reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerStatus {
    /// A local log: always reading.
    Local,
    /// A group consumer that has not (yet) been given its partitions.
    Joining,
    /// A group consumer and the partitions it owns (possibly none, in a group with more
    /// members than partitions).
    Assigned(Vec<Partition>),
}

/// Opens a [`VoteSource`] positioned at the last committed offsets; called again whenever the
/// ingest actor is restarted.
#[async_trait]
pub trait VoteSourceFactory: Send + Sync + 'static {
    /// Opens a consumer of the vote log.
    async fn open(&self) -> Result<Box<dyn VoteSource>, LogError>;

    /// The current consumer's status, for readiness checks.
    fn status(&self) -> ConsumerStatus {
        ConsumerStatus::Local
    }
}

/// What [`DedupGuard::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nobody had claimed (poll, user): the claim is now this attempt's.
    Fresh,
    /// The claim is held by a vote with the same vote id and the same ballot: this is a retry
    /// of it. The claim is now this attempt's (an earlier attempt that fails can no longer
    /// release it), except for a claim written by an older pollcast, which stays as it is.
    Retry,
    /// The claim is held by a vote with the same vote id but another ballot: the id (an
    /// `Idempotency-Key`) was reused for a different vote, which must be refused rather than
    /// acknowledged and then skipped by the ledger.
    Reused,
    /// The claim is held by another vote of this user: a duplicate.
    Taken,
}

/// The fast-path duplicate guard: at most one accepted vote per (poll, user) while a claim
/// lives. The store's ledger stays the truth; the guard only turns most duplicates into a 409
/// before they reach the log.
///
/// A claim records the vote id, the ballot (its options, in any order) and the attempt that
/// made or last retried it. Attempts are random numbers the caller draws per request.
#[async_trait]
pub trait DedupGuard: Send + Sync + 'static {
    /// Atomically claims (vote.poll_id, vote.user_id) for this vote, as attempt `attempt`.
    async fn claim(&self, vote: &Vote, attempt: u64) -> Result<Claim, GuardError>;

    /// Releases the claim of a vote that could not be appended, so the voter may retry, but
    /// only while attempt `attempt` still holds it (checked and deleted in one step): a claim
    /// a retry took over, or another vote's, is left alone. Returns whether it was released.
    async fn release(&self, poll: PollId, user: &str, attempt: u64) -> Result<bool, GuardError>;

    /// Cheap round trip, for readiness checks.
    async fn ping(&self) -> Result<(), GuardError>;
}

/// Shares count updates between pollcast processes (Kafka `poll-updates`), so that a
/// WebSocket client on any process sees the polls whose votes another process counts.
/// Single-process deployments have none.
#[async_trait]
pub trait CountsBus: Send + Sync + 'static {
    /// Publishes an update of a flush made here (fire and forget: subscribers resync from a
    /// snapshot if one is lost).
    fn publish(&self, update: &CountsUpdate);

    /// Starts receiving every process's updates, from now on.
    async fn subscribe(&self) -> Result<Box<dyn CountsFeed>, LogError>;
}

/// A stream of count updates from [`CountsBus::subscribe`].
#[async_trait]
pub trait CountsFeed: Send + 'static {
    /// The next update.
    async fn next(&mut self) -> Result<CountsUpdate, LogError>;
}

/// Told about polls opened and flushes committed by this process (webhooks). Calls must
/// return at once: they are made on the vote pipeline's actors.
pub trait PollEvents: Send + Sync + 'static {
    /// A poll was created here.
    fn opened(&self, poll: &Poll);

    /// A flush committed here changed a poll's counts, or published its final ones
    /// (`update.closed_at` is set).
    fn flushed(&self, update: &CountsUpdate);
}

/// [`PollEvents`] for a process that sends none.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEvents;

impl PollEvents for NoEvents {
    fn opened(&self, _poll: &Poll) {}

    fn flushed(&self, _update: &CountsUpdate) {}
}
