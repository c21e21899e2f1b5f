//! `[store]`: where polls, counts and the ledger live.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use super::secret::ServiceUrl;

/// `[store]` as written.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    /// `sqlite://PATH` (embedded) or `postgres://USER@HOST/DB`; migrated on start.
    pub url: String,
    /// Connections at most (Postgres; SQLite uses one writer and up to this many readers).
    pub max_connections: u32,
    /// Longest wait for a connection (Postgres).
    pub acquire_timeout_ms: u64,
    /// Longest a statement may run (Postgres).
    pub statement_timeout_ms: u64,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            url: "sqlite://data/pollcast.db".into(),
            max_connections: 8,
            acquire_timeout_ms: 5000,
            statement_timeout_ms: 10_000,
        }
    }
}

/// `[store]`, checked.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Which store, and where.
    pub url: StoreUrl,
    /// Connections at most (positive).
    pub max_connections: u32,
    /// Longest wait for a connection (Postgres).
    pub acquire_timeout: Duration,
    /// Longest a statement may run (Postgres).
    pub statement_timeout: Duration,
}

/// `store.url`: the kind of store is its scheme.
#[derive(Debug, Clone)]
pub enum StoreUrl {
    /// `sqlite:…`: the embedded store, as written.
    Sqlite(String),
    /// `postgres://…` or `postgresql://…`, which may name a password.
    Postgres(ServiceUrl),
}

impl RawStore {
    /// Checks every key.
    pub(super) fn parse(self) -> Result<StoreSettings, ConfigError> {
        let url = if self.url.starts_with("postgres://") || self.url.starts_with("postgresql://") {
            StoreUrl::Postgres(self.url.into())
        } else if self.url.starts_with("sqlite:") {
            StoreUrl::Sqlite(self.url)
        } else {
            return Err(ConfigError::invalid(
                "store.url",
                "must be a sqlite://PATH or postgres://USER@HOST/DB URL",
            ));
        };
        if self.max_connections == 0 {
            return Err(ConfigError::invalid(
                "store.max_connections",
                "must be positive",
            ));
        }
        Ok(StoreSettings {
            url,
            max_connections: self.max_connections,
            acquire_timeout: Duration::from_millis(self.acquire_timeout_ms),
            statement_timeout: Duration::from_millis(self.statement_timeout_ms),
        })
    }
}
