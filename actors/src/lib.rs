//! pollcast's core: the domain, the ports, and the supervised actor tree that turns a log of
//! votes into exact, live counts.
//!
//! Nothing here knows about HTTP frameworks, SQL dialects, Kafka or Redis: adapters implement
//! the traits in [`ports`], and the binary crate wires them in.

pub mod aggregator;
pub mod aggregator_supervisor;
pub mod broadcast;
pub mod domain;
pub mod faults;
pub mod http_actor;
pub mod ingest;
pub mod ports;
pub mod root;
pub mod supervision;

pub use broadcast::{BroadcastHub, CountsFrame, Subscription};
pub use domain::{CountsUpdate, NewPoll, OptionCount, OptionId, Poll, PollId, PollOption, Vote};
pub use faults::FaultHooks;
pub use http_actor::{HttpServer, ServeFuture};
pub use ingest::IngestSettings;
pub use ports::{
    ConsumerStatus, CountsBus, CountsFeed, DedupGuard, FlushOutcome, GuardError, LogError,
    LogRecord, Offset, Partition, PollStore, SourceEvent, StoreError, VoteAppender, VoteSource,
    VoteSourceFactory,
};
pub use root::{RootArgs, RootMsg, RootSupervisor};
pub use supervision::{Escalation, RestartPolicy};
