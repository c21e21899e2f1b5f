//! `[aggregator]` and `[supervision]`: how the actor tree counts, and how it restarts.

use std::time::Duration;

use pollcast_actors::RestartPolicy;
use serde::Deserialize;

use super::ConfigError;

/// `[aggregator]` as written.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAggregator {
    /// How often each poll's buffered votes are flushed to the store.
    pub flush_interval_ms: u64,
    /// A poll with this many buffered votes is flushed at once, before its interval is up:
    /// a big flush holds the store's writer, and other polls' flushes wait behind it.
    pub flush_max_votes: usize,
    /// Reading the vote log pauses while this many votes read from it wait for a flush:
    /// what bounds memory while a backlog (after an outage or a restart) is counted.
    pub max_unflushed_votes: usize,
    /// A poll's aggregator is stopped after this long without votes (and started again,
    /// from the store, at its next vote).
    pub idle_timeout_secs: u64,
    /// How long after a poll closes its final counts are published: votes accepted just
    /// before the close (by a process whose poll cache had not seen it yet, or whose append
    /// was slow) still make it into them.
    pub close_grace_ms: u64,
}

impl Default for RawAggregator {
    fn default() -> Self {
        Self {
            flush_interval_ms: 2000,
            flush_max_votes: 20_000,
            max_unflushed_votes: 500_000,
            idle_timeout_secs: 300,
            close_grace_ms: 3000,
        }
    }
}

/// `[aggregator]`, checked.
#[derive(Debug, Clone)]
pub struct AggregatorSettings {
    /// How often buffered votes are flushed (10 ms to 60 s).
    pub flush_interval: Duration,
    /// Buffered votes that make a flush at once (1 to 1,000,000).
    pub flush_max_votes: usize,
    /// Votes read from the log and not yet flushed that pause reading (1 to 10,000,000).
    pub max_unflushed_votes: usize,
    /// An aggregator without votes for this long stops (positive).
    pub idle_timeout: Duration,
    /// How long final counts wait for late votes (at most 60 s).
    pub close_grace: Duration,
}

impl RawAggregator {
    /// Checks every key.
    pub(super) fn parse(self) -> Result<AggregatorSettings, ConfigError> {
        if !(10..=60_000).contains(&self.flush_interval_ms) {
            return Err(ConfigError::invalid(
                "aggregator.flush_interval_ms",
                "must be between 10 and 60000",
            ));
        }
        if !(1..=1_000_000).contains(&self.flush_max_votes) {
            return Err(ConfigError::invalid(
                "aggregator.flush_max_votes",
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=10_000_000).contains(&self.max_unflushed_votes) {
            return Err(ConfigError::invalid(
                "aggregator.max_unflushed_votes",
                "must be between 1 and 10000000",
            ));
        }
        if self.close_grace_ms > 60_000 {
            return Err(ConfigError::invalid(
                "aggregator.close_grace_ms",
                "must be at most 60000",
            ));
        }
        if self.idle_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "aggregator.idle_timeout_secs",
                "must be positive",
            ));
        }
        Ok(AggregatorSettings {
            flush_interval: Duration::from_millis(self.flush_interval_ms),
            flush_max_votes: self.flush_max_votes,
            max_unflushed_votes: self.max_unflushed_votes,
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            close_grace: Duration::from_millis(self.close_grace_ms),
        })
    }
}

/// `[supervision]` as written; checked, it is the [`RestartPolicy`] of every supervisor.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSupervision {
    /// Restarts a supervisor may make within `window_secs` before it gives up.
    pub max_restarts: u32,
    /// Window over which restarts are counted.
    pub window_secs: u64,
    /// First restart delay; doubled per further restart.
    pub backoff_initial_ms: u64,
    /// Longest restart delay.
    pub backoff_max_ms: u64,
}

impl Default for RawSupervision {
    fn default() -> Self {
        let policy = RestartPolicy::default();
        Self {
            max_restarts: policy.max_restarts,
            window_secs: policy.window.as_secs(),
            backoff_initial_ms: policy.backoff_initial.as_millis() as u64,
            backoff_max_ms: policy.backoff_max.as_millis() as u64,
        }
    }
}

impl RawSupervision {
    /// Checks every key.
    pub(super) fn parse(self) -> Result<RestartPolicy, ConfigError> {
        if self.window_secs == 0 {
            return Err(ConfigError::invalid(
                "supervision.window_secs",
                "must be positive",
            ));
        }
        if self.backoff_initial_ms > self.backoff_max_ms {
            return Err(ConfigError::invalid(
                "supervision.backoff_initial_ms",
                "must not exceed supervision.backoff_max_ms",
            ));
        }
        Ok(RestartPolicy {
            max_restarts: self.max_restarts,
            window: Duration::from_secs(self.window_secs),
            backoff_initial: Duration::from_millis(self.backoff_initial_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
        })
    }
}
