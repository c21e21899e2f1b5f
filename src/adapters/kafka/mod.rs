//! The production vote log: Kafka through rdkafka.
//!
//! - Producer ([`KafkaVoteLog`]): idempotent, `acks=all`; `raw-votes` records are keyed by
//!   pollId, so a poll's votes stay in one partition, in order. A 202 is sent only after the
//!   delivery report.
//! - Consumer ([`KafkaSourceFactory`]): one group member per process. Offsets are never
//!   committed automatically: the ingest actor commits them after the flush that applied them.
//!   `consumer.poll` runs on a dedicated thread that only fetches while the ingest actor asks
//!   for records, so nothing fetched sits in a buffer of ours when the actor seeks. On a
//!   revocation the rebalance callback hands the ingest actor a `Revoked` event and holds the
//!   rebalance until the actor has flushed and committed those partitions.
//! - Failover: group sessions are as short as Kafka allows by default (6 s, see
//!   `GROUP_DEFAULTS` in `client_config.rs`), so a crashed process's partitions move within
//!   seconds; a graceful stop leaves the group explicitly
//!   ([`VoteSource::close`](pollcast_actors::VoteSource::close)) after its final commit, so
//!   its partitions move at once.
//! - Counts bus ([`KafkaCountsBus`]): every flush's counts go to `poll-updates`; every process
//!   reads all of it (its own consumer group, from the latest offset) for its WebSockets.
//!
//! | file | what |
//! |---|---|
//! | `producer.rs` | [`KafkaVoteLog`]: appending votes to `raw-votes` |
//! | `consumer.rs` | [`KafkaSourceFactory`]: the ingest actor's group consumer of `raw-votes` |
//! | `consumer_thread.rs` | the thread that polls that consumer when the actor asks |
//! | `rebalance.rs` | its rebalance callbacks: revocations handed to the actor |
//! | `produce_stats.rs` | produce requests and records per producer, from librdkafka's statistics |
//! | `counts_bus.rs` | [`KafkaCountsBus`]: `poll-updates`, counts shared between processes |
//! | `client_config.rs` | librdkafka properties: pollcast's defaults, then the operator's |
//! | `topics.rs` | [`ensure_topics`]: creates missing topics at startup |

mod client_config;
mod consumer;
mod consumer_thread;
mod counts_bus;
mod produce_stats;
mod producer;
mod rebalance;
mod topics;

use pollcast_actors::LogError;

pub use self::consumer::KafkaSourceFactory;
pub use self::counts_bus::KafkaCountsBus;
pub use self::producer::KafkaVoteLog;
pub use self::topics::ensure_topics;

/// Turns an rdkafka error into the port's, saying what was being done.
fn kafka_err(what: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> LogError {
    move |e| LogError::new(what, e)
}
