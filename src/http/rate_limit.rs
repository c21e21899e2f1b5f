//! Rate limits per client IP (every API request) and per userId (votes), answered with 429
//! and `Retry-After`.
//!
//! Behind a proxy the client's IP comes from the configured header only (the last address,
//! the one the proxy itself appended); anything else a client sends is ignored.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::HeaderName;
use warp::{Filter, Rejection};

use super::connection::PeerAddr;
use super::error::ApiError;
use crate::config::Rate;

/// The limiter's quota for a configured rate.
fn quota(rate: Rate) -> Quota {
    Quota::per_second(rate.per_second).allow_burst(rate.burst)
}

/// The limiters, shared by every request.
#[derive(Clone, Default)]
pub struct RateLimits {
    per_ip: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    per_user: Option<Arc<DefaultKeyedRateLimiter<String>>>,
    client_ip_header: Option<HeaderName>,
}

impl RateLimits {
    /// How often start-up has idle keys forgotten ([`RateLimits::sweep`]).
    pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

    /// Limiters for the given rates (`None`: no limit).
    pub fn new(
        per_ip: Option<Rate>,
        per_user: Option<Rate>,
        client_ip_header: Option<HeaderName>,
    ) -> Self {
        Self {
            per_ip: per_ip.map(|r| Arc::new(RateLimiter::keyed(quota(r)))),
            per_user: per_user.map(|r| Arc::new(RateLimiter::keyed(quota(r)))),
            client_ip_header,
        }
    }

    /// Whether any limit is configured (else there is nothing to sweep).
    pub fn is_limiting(&self) -> bool {
        self.per_ip.is_some() || self.per_user.is_some()
    }

    /// Forgets the keys whose limit has fully recovered, and gives their memory back.
    pub fn sweep(&self) {
        if let Some(limiter) = &self.per_ip {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(limiter) = &self.per_user {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Counts one vote of `user`; refuses it when the user is over the limit.
    pub fn check_user(&self, user: &str) -> Result<(), ApiError> {
        match &self.per_user {
            Some(limiter) => check(limiter, &user.to_owned()),
            None => Ok(()),
        }
    }

    /// Counts a request that does not go through warp's routes (Socket.IO, the vote fast
    /// path) against its client IP.
    pub fn check_ip(
        &self,
        peer: Option<PeerAddr>,
        headers: &http::HeaderMap,
    ) -> Result<(), ApiError> {
        let forwarded =
            (self.client_ip_header.as_ref()).and_then(|name| forwarded_value(headers, name));
        self.check_forwarded(peer, forwarded)
    }

    /// Counts a request against its client's IP (`forwarded`: the configured proxy header's
    /// value, see [`forwarded_value`]); 429 over the limit.
    fn check_forwarded(
        &self,
        peer: Option<PeerAddr>,
        forwarded: Option<String>,
    ) -> Result<(), ApiError> {
        let Some(limiter) = &self.per_ip else {
            return Ok(());
        };
        match self.client_ip(peer, forwarded) {
            Some(ip) => check(limiter, &ip),
            // A proxy that did not set the configured header is misconfigured; refuse
            // rather than lump every such client under one key.
            None => Err(ApiError::NoClientAddress),
        }
    }

    /// The client's IP: from the configured proxy header's value (`forwarded`) when one is
    /// configured, else the TCP peer's.
    fn client_ip(&self, peer: Option<PeerAddr>, forwarded: Option<String>) -> Option<IpAddr> {
        if self.client_ip_header.is_some() {
            // Why the last address: a proxy appends the peer it saw, so only the last entry
            // was written by a machine we trust.
            return forwarded?.rsplit(',').next()?.trim().parse().ok();
        }
        peer.map(|p| p.0.ip())
    }
}

/// The configured client-address header's value in `headers`. Why the last line: a client
/// may send the header itself, and a proxy that finds one appends its own line (or address)
/// after it; the first line is the client's word.
fn forwarded_value(headers: &http::HeaderMap, name: &HeaderName) -> Option<String> {
    headers
        .get_all(name)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn check<K>(limiter: &DefaultKeyedRateLimiter<K>, key: &K) -> Result<(), ApiError>
where
    K: std::hash::Hash + Eq + Clone,
{
    limiter.check_key(key).map_err(|not_until| {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        metrics::counter!("pollcast_rate_limited_total").increment(1);
        ApiError::RateLimited(wait)
    })
}

/// Charges `extra` more requests to the client's IP, for a request that costs that much more
/// than the one request `per_ip` already counted (a long page of polls); 429 over the limit.
pub fn charge(
    limits: &RateLimits,
) -> impl Filter<Extract = (Charge,), Error = Rejection> + Clone + use<> {
    let limits = limits.clone();
    warp::ext::optional::<PeerAddr>()
        .and(forwarded_header(limits.client_ip_header.clone()))
        .map(
            move |peer: Option<PeerAddr>, forwarded: Option<String>| Charge {
                ip: limits.client_ip(peer, forwarded),
                limiter: limits.per_ip.clone(),
            },
        )
}

/// What [`charge`] hands a handler: the client's IP and its limiter.
pub struct Charge {
    ip: Option<IpAddr>,
    limiter: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
}

impl Charge {
    /// Counts `extra` more requests against the client; refuses over its limit. Why a charge
    /// is cut to the burst less the one request already counted: a client that has been
    /// idle can then always be served, whatever the configured burst.
    pub fn extra(&self, extra: u32) -> Result<(), ApiError> {
        let (Some(limiter), Some(ip), Some(n)) = (&self.limiter, self.ip, NonZeroU32::new(extra))
        else {
            return Ok(());
        };
        let outcome = match limiter.check_key_n(&ip, n) {
            Ok(outcome) => outcome,
            Err(governor::InsufficientCapacity(burst)) => {
                let Some(most) = NonZeroU32::new(burst.saturating_sub(1)) else {
                    return Ok(());
                };
                limiter
                    .check_key_n(&ip, most)
                    .expect("less than the burst fits the burst")
            }
        };
        outcome.map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            metrics::counter!("pollcast_rate_limited_total").increment(1);
            ApiError::RateLimited(wait)
        })
    }
}

/// Counts a request against its client IP; rejects it with 429 over the limit.
pub fn per_ip(limits: &RateLimits) -> impl Filter<Extract = (), Error = Rejection> + Clone + use<> {
    let limits = limits.clone();
    warp::ext::optional::<PeerAddr>()
        .and(forwarded_header(limits.client_ip_header.clone()))
        .and_then(move |peer: Option<PeerAddr>, forwarded: Option<String>| {
            let limits = limits.clone();
            async move {
                limits
                    .check_forwarded(peer, forwarded)
                    .map_err(Rejection::from)
            }
        })
        .untuple_one()
}

/// The value of the configured client-address header; without one configured, no header is
/// read at all (this runs on every API request).
fn forwarded_header(name: Option<HeaderName>) -> warp::filters::BoxedFilter<(Option<String>,)> {
    match name {
        Some(name) => warp::header::headers_cloned()
            .map(move |headers: http::HeaderMap| forwarded_value(&headers, &name))
            .boxed(),
        None => warp::any().map(|| None).boxed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: u32, burst: u32) -> Rate {
        Rate {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    #[test]
    fn a_sweep_forgets_only_the_users_whose_limit_has_recovered() {
        // 1,000 a second: a key used once is back to full after a millisecond.
        let limits = RateLimits::new(None, Some(rate(1000, 1)), None);
        let users = limits.per_user.clone().unwrap();
        limits.check_user("early").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        limits.sweep();
        assert_eq!(users.len(), 0, "a recovered key is forgotten");

        let slow = RateLimits::new(None, Some(rate(1, 1)), None);
        slow.check_user("busy").unwrap();
        slow.sweep();
        assert!(
            slow.check_user("busy").is_err(),
            "its limit is still in force"
        );
    }
}
