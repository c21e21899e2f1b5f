//! `[rate_limit]`: requests per client address and votes per user.

use std::num::NonZeroU32;

use http::HeaderName;
use serde::Deserialize;

use super::ConfigError;

/// One quota: a sustained rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per second, sustained.
    pub per_second: NonZeroU32,
    /// Requests allowed at once.
    pub burst: NonZeroU32,
}

/// `[rate_limit]` as written: a rate of 0 turns that limit off.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRateLimit {
    /// API requests per second per client IP, sustained.
    pub per_ip_per_sec: u32,
    /// API requests per client IP at once.
    pub per_ip_burst: u32,
    /// Votes per second per userId, sustained.
    pub per_user_per_sec: u32,
    /// Votes per userId at once.
    pub per_user_burst: u32,
    /// Behind a reverse proxy: the header it sets to the client's address (e.g.
    /// `x-forwarded-for`; its last address is used). Unset: the TCP peer's address.
    pub client_ip_header: Option<String>,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        Self {
            per_ip_per_sec: 200,
            per_ip_burst: 2000,
            per_user_per_sec: 5,
            per_user_burst: 10,
            client_ip_header: None,
        }
    }
}

/// `[rate_limit]`, checked.
#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    /// API requests per client IP; `None`: no limit.
    pub per_ip: Option<Rate>,
    /// Votes per userId; `None`: no limit.
    pub per_user: Option<Rate>,
    /// The proxy's header naming the client's address; `None`: the TCP peer's address.
    pub client_ip_header: Option<HeaderName>,
}

impl RawRateLimit {
    /// Checks every key.
    pub(super) fn parse(self) -> Result<RateLimitSettings, ConfigError> {
        // A rate of 0 is no limit; a burst of 0 is one request at once.
        let rate = |per_second, burst| {
            Some(Rate {
                per_second: NonZeroU32::new(per_second)?,
                burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
            })
        };
        let client_ip_header = self
            .client_ip_header
            .map(|header| {
                HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                    ConfigError::invalid("rate_limit.client_ip_header", "must be a header name")
                })
            })
            .transpose()?;
        Ok(RateLimitSettings {
            per_ip: rate(self.per_ip_per_sec, self.per_ip_burst),
            per_user: rate(self.per_user_per_sec, self.per_user_burst),
            client_ip_header,
        })
    }
}
