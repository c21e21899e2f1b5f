//! pollcast's core: the domain, the ports, and the supervised actor tree that turns a log of
//! votes into exact, live counts.
//!
//! Nothing here knows about HTTP frameworks, SQL dialects, Kafka or Redis: adapters implement
//! the traits in [`ports`], and the binary crate wires them in.

pub mod aggregator;
pub mod aggregator_supervisor;
pub mod backoff;
pub mod ballot;
pub mod broadcast;
pub mod domain;
pub mod faults;
pub mod ids;
pub mod ingest;
pub mod messages;
pub mod poll;
pub mod ports;
pub mod root;
pub mod server_actor;
pub mod service;
pub mod supervision;

pub use backoff::Backoff;
pub use broadcast::{AllPolls, AllPollsUpdate, BroadcastHub, CountsFrame, Subscription};
pub use domain::{CountsUpdate, LogEntry, OptionCount, OptionId, PollId, Vote};
pub use faults::FaultHooks;
pub use ingest::IngestSettings;
pub use poll::{
    BallotRejection, InvalidPoll, NewPoll, Poll, PollDraft, PollOption, PollRules, PollSettings,
    WebhookDraft, WebhookTarget,
};
pub use ports::{
    Claim, ConsumerStatus, CountsBus, CountsFeed, DedupGuard, FlushOutcome, GuardError, LedgerRow,
    LogError, LogRecord, NoEvents, Offset, Partition, PollEvents, PollPage, PollStore, SourceEvent,
    StoreError, VoteAppender, VoteSource, VoteSourceFactory, Voter,
};
pub use root::{RootArgs, RootMsg, RootSupervisor};
pub use server_actor::{ServeFuture, Server};
pub use supervision::{Escalation, RestartPolicy};
