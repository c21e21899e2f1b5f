//! `[webhooks]`: how poll events are delivered to the URL each poll names.

use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// `[webhooks]` as written.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawWebhooks {
    /// Longest one delivery attempt may take (connecting, sending, the response's head).
    pub timeout_ms: u64,
    /// Attempts per event, the first included, before it is given up.
    pub max_attempts: u32,
    /// Delay before the first retry; doubled for each further one (with jitter).
    pub initial_backoff_ms: u64,
    /// Longest delay between two attempts.
    pub max_backoff_ms: u64,
    /// Events waiting for the dispatcher at most; more are dropped (and counted).
    pub queue_capacity: usize,
    /// Delivery attempts in flight at once, across all polls.
    pub max_in_flight: usize,
}

impl Default for RawWebhooks {
    fn default() -> Self {
        Self {
            timeout_ms: 5000,
            max_attempts: 8,
            initial_backoff_ms: 500,
            max_backoff_ms: 60_000,
            queue_capacity: 10_000,
            max_in_flight: 64,
        }
    }
}

/// `[webhooks]`, checked.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Longest one delivery attempt may take (positive).
    pub timeout: Duration,
    /// Attempts per event, the first included.
    pub max_attempts: NonZeroU32,
    /// Delay before the first retry (positive, at most `max_backoff`).
    pub initial_backoff: Duration,
    /// Longest delay between two attempts.
    pub max_backoff: Duration,
    /// Events waiting for the dispatcher at most.
    pub queue_capacity: NonZeroUsize,
    /// Delivery attempts in flight at once.
    pub max_in_flight: NonZeroUsize,
}

impl RawWebhooks {
    /// Checks every key.
    pub(super) fn parse(self) -> Result<WebhookSettings, ConfigError> {
        if self.timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "webhooks.timeout_ms",
                "must be positive",
            ));
        }
        let max_attempts = NonZeroU32::new(self.max_attempts)
            .ok_or_else(|| ConfigError::invalid("webhooks.max_attempts", "must be at least 1"))?;
        if self.initial_backoff_ms == 0 || self.initial_backoff_ms > self.max_backoff_ms {
            return Err(ConfigError::invalid(
                "webhooks.initial_backoff_ms",
                "must be positive and not exceed webhooks.max_backoff_ms",
            ));
        }
        let positive = |key, n| {
            NonZeroUsize::new(n).ok_or_else(|| ConfigError::invalid(key, "must be positive"))
        };
        Ok(WebhookSettings {
            timeout: Duration::from_millis(self.timeout_ms),
            max_attempts,
            initial_backoff: Duration::from_millis(self.initial_backoff_ms),
            max_backoff: Duration::from_millis(self.max_backoff_ms),
            queue_capacity: positive("webhooks.queue_capacity", self.queue_capacity)?,
            max_in_flight: positive("webhooks.max_in_flight", self.max_in_flight)?,
        })
    }
}
