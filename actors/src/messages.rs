//! The pipeline's messages, in one file: who tells whom what. The ingest actor routes
//! batches of the log to aggregators and commits what they acknowledge; the aggregator
//! supervisor starts, restarts and retires aggregators. Why a module of their own: each
//! actor sends to the others, so their messages are the contract between them, and keeping
//! them apart from the actors keeps the actors from depending on each other.

use ractor::{ActorId, ActorRef, RpcReplyPort};

use crate::domain::{LogEntry, PollId};

/// Sequence number the ingest actor gives every batch it routes to an aggregator. An
/// aggregator acknowledges "flushed everything up to seq N", which tells the ingest actor
/// which log positions are now safe to commit.
pub type RouteSeq = u64;

/// Messages of the [`IngestActor`](crate::ingest::IngestActor).
#[derive(Debug)]
pub enum IngestMsg {
    /// The aggregator supervisor is up: reading can start.
    Attach(ActorRef<AggregatorSupervisorMsg>),
    /// Read the next batch from the log (the actor sends this to itself).
    ReadLog,
    /// Commit what is committable (sent every commit interval).
    CommitTick,
    /// An aggregator flushed every batch it was sent up to `through`.
    Flushed {
        /// The aggregator's poll.
        poll_id: PollId,
        /// Highest routing sequence number flushed.
        through: RouteSeq,
        /// The aggregator: only batches delivered to this very actor are acknowledged.
        from: ActorId,
    },
    /// An aggregator failed; its supervisor will restart it.
    AggregatorDown(PollId),
    /// An aggregator was restarted: rewind the log to what it lost.
    AggregatorUp(PollId, ActorRef<AggregatorMsg>),
    /// Shutdown: stop reading, flush every aggregator, commit, reply.
    Drain(RpcReplyPort<()>),
}

/// Messages of a [`PollAggregator`](crate::aggregator::PollAggregator).
#[derive(Debug)]
pub enum AggregatorMsg {
    /// Records read from the log, all for this aggregator's poll, in log order.
    Votes {
        /// The batch's routing sequence number.
        seq: RouteSeq,
        /// Votes, and possibly the marker that closes the poll.
        entries: Vec<LogEntry>,
    },
    /// Time to flush (sent every flush interval).
    Tick,
    /// Flush now and reply with the routing sequence number flushed through (shutdown and
    /// partition revocation).
    FlushNow(RpcReplyPort<Result<RouteSeq, String>>),
}

/// Messages of the [`AggregatorSupervisor`](crate::aggregator_supervisor::AggregatorSupervisor).
#[derive(Debug)]
pub enum AggregatorSupervisorMsg {
    /// The aggregators of these polls, in the same order, spawned where there is none;
    /// `None` for a poll whose aggregator is being restarted (the ingest actor is told when
    /// it is back). The polls of the aggregators spawned are read from the store together.
    Aggregators(
        Vec<PollId>,
        RpcReplyPort<Vec<Option<ActorRef<AggregatorMsg>>>>,
    ),
    /// A backoff elapsed: restart the aggregator of this poll.
    Restart(PollId),
    /// The poll's aggregator is idle with nothing to flush: stop it.
    Retire(PollId),
}
