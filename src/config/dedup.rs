//! `[dedup]`: the duplicate guard, which answers a second vote of a user in a poll at once.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use super::secret::ServiceUrl;

/// Which duplicate guard to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupKind {
    /// An in-process map with expiry.
    Memory,
    /// Redis `SET NX EX`.
    Redis,
}

/// `[dedup]` as written.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDedup {
    /// Which guard.
    pub kind: DedupKind,
    /// How long a (poll, user) claim lives.
    pub ttl_secs: u64,
    /// Redis, when `kind = "redis"`.
    pub redis_url: String,
    /// Prepended to Redis keys (`""`: the seed app's `vote:{pollId}:{userId}`).
    pub key_prefix: String,
    /// Longest a Redis command may take before the vote gets a 503.
    pub timeout_ms: u64,
}

impl Default for RawDedup {
    fn default() -> Self {
        Self {
            kind: DedupKind::Memory,
            ttl_secs: 24 * 60 * 60,
            redis_url: "redis://127.0.0.1:6379".into(),
            key_prefix: String::new(),
            timeout_ms: 1000,
        }
    }
}

/// `[dedup]`, checked.
#[derive(Debug, Clone)]
pub struct DedupSettings {
    /// How long a (poll, user) claim lives (positive).
    pub ttl: Duration,
    /// The guard chosen by `dedup.kind`.
    pub guard: GuardSettings,
}

/// The duplicate guard, with its settings.
#[derive(Debug, Clone)]
pub enum GuardSettings {
    /// In the process.
    Memory,
    /// In Redis.
    Redis {
        /// `redis://HOST:PORT`, which may name a password.
        url: ServiceUrl,
        /// Prepended to keys.
        key_prefix: String,
        /// Longest a command may take.
        timeout: Duration,
    },
}

impl RawDedup {
    /// Checks every key (the Redis URL only when Redis is the guard).
    pub(super) fn parse(self) -> Result<DedupSettings, ConfigError> {
        let guard = match self.kind {
            DedupKind::Memory => GuardSettings::Memory,
            DedupKind::Redis if !self.redis_url.starts_with("redis") => {
                return Err(ConfigError::invalid(
                    "dedup.redis_url",
                    "must be a redis://HOST:PORT URL",
                ));
            }
            DedupKind::Redis => GuardSettings::Redis {
                url: self.redis_url.into(),
                key_prefix: self.key_prefix,
                timeout: Duration::from_millis(self.timeout_ms),
            },
        };
        if self.ttl_secs == 0 {
            return Err(ConfigError::invalid("dedup.ttl_secs", "must be positive"));
        }
        Ok(DedupSettings {
            ttl: Duration::from_secs(self.ttl_secs),
            guard,
        })
    }
}
