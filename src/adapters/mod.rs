//! Adapters: the implementations of the core's ports, side by side.
//!
//! | port | production | embedded (default) |
//! |---|---|---|
//! | [`PollStore`](pollcast_actors::PollStore) | [`PostgresStore`] | [`SqliteStore`] |
//! | [`VoteAppender`](pollcast_actors::VoteAppender) / [`VoteSourceFactory`](pollcast_actors::VoteSourceFactory) | [`KafkaVoteLog`] / [`KafkaSourceFactory`] | [`FileVoteLog`] |
//! | [`CountsBus`](pollcast_actors::CountsBus) | [`KafkaCountsBus`] | none (one process) |
//! | [`DedupGuard`](pollcast_actors::DedupGuard) | [`RedisGuard`] | [`MemoryGuard`] |
//! | [`PollEvents`](pollcast_actors::PollEvents) | [`WebhookDispatcher`] | the same |

mod file_log;
mod kafka;
mod memory_guard;
mod postgres_store;
mod redis_guard;
mod sql_common;
mod sqlite;
mod webhooks;

pub use file_log::FileVoteLog;
pub use kafka::{KafkaCountsBus, KafkaSourceFactory, KafkaVoteLog, ensure_topics};
pub use memory_guard::MemoryGuard;
pub use postgres_store::{PgPoolSettings, PostgresStore};
pub use redis_guard::{RedisGuard, RedisGuardSettings};
pub use sqlite::SqliteStore;
pub use webhooks::WebhookDispatcher;
