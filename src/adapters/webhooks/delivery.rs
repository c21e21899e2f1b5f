//! Delivering one event: the HTTP attempt, and the retries until one succeeds, the attempts
//! run out, a newer event supersedes it or shutdown's grace ends.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pollcast_actors::{Backoff, WebhookTarget};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::event::{EventKind, WebhookEvent};
use super::signing::{HmacSha256, hmac_key, signature};
use crate::config::{WebhookSettings, redact_url};

/// Sent as `User-Agent`, so receivers can tell pollcast's requests (and its version) apart.
pub const USER_AGENT: &str = concat!("pollcast-webhooks/", env!("CARGO_PKG_VERSION"));

/// How deliveries are attempted and retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Longest one attempt may take.
    pub timeout: Duration,
    /// Attempts per event, the first included.
    pub max_attempts: u32,
    /// The wait after each failed attempt, jittered (see [`Backoff::jittered`]) so that the
    /// retries of many polls whose receiver failed at the same moment do not all hit it at
    /// once when it returns.
    pub backoff: Backoff,
}

impl From<&WebhookSettings> for RetryPolicy {
    fn from(s: &WebhookSettings) -> Self {
        Self {
            timeout: s.timeout,
            max_attempts: s.max_attempts.get(),
            backoff: Backoff {
                initial: s.initial_backoff,
                max: s.max_backoff,
            },
        }
    }
}

/// A receiver: where to post and how to sign. Deliberately not `Debug`: it holds the key.
pub(super) struct Endpoint {
    url: String,
    /// The URL with any password masked, for logs.
    shown_url: String,
    key: HmacSha256,
}

impl Endpoint {
    pub(super) fn new(target: &WebhookTarget) -> Self {
        Self {
            url: target.url.clone(),
            shown_url: redact_url(&target.url),
            key: hmac_key(&target.secret),
        }
    }
}

/// What every delivery task shares.
pub(super) struct Shared {
    client: reqwest::Client,
    pub(super) policy: RetryPolicy,
    in_flight: Semaphore,
    /// Every delivery task (and webhook lookup), so that shutdown can wait for them.
    pub(super) tracker: TaskTracker,
    /// Cancelled when the shutdown grace runs out: every task stops at once.
    pub(super) stop: CancellationToken,
}

/// Why an attempt failed, for the give-up log line.
enum Failure {
    /// Worth another attempt.
    Retry(String),
    /// No attempt can succeed (the URL is unusable).
    Permanent(String),
}

impl Shared {
    pub(super) fn new(settings: &WebhookSettings) -> Self {
        let policy = RetryPolicy::from(settings);
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(policy.timeout)
            // Why not follow redirects: the operator named this URL; a redirect elsewhere
            // would carry signed counts to a host nobody chose.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            // Fails only if the TLS backend cannot initialise: bundled roots, no system state.
            .expect("the webhook HTTP client builds");
        Self {
            client,
            policy,
            in_flight: Semaphore::new(settings.max_in_flight.get()),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
        }
    }

    async fn attempt(&self, endpoint: &Endpoint, event: &WebhookEvent) -> Result<(), Failure> {
        let _permit = self
            .in_flight
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let started = Instant::now();
        let sent = self
            .client
            .post(&endpoint.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("X-Pollcast-Event", event.kind.as_str())
            .header("X-Pollcast-Delivery", &event.id)
            .header(
                "X-Pollcast-Signature",
                signature(&endpoint.key, timestamp, &event.body),
            )
            .body(event.body.clone())
            .send()
            .await;
        metrics::histogram!("pollcast_webhook_delivery_seconds")
            .record(started.elapsed().as_secs_f64());
        let (label, outcome) = match sent {
            Ok(response) if response.status().is_success() => ("delivered", Ok(())),
            Ok(response) => (
                "rejected",
                Err(Failure::Retry(format!(
                    "HTTP {}",
                    response.status().as_u16()
                ))),
            ),
            Err(err) if err.is_builder() => (
                "error",
                Err(Failure::Permanent(error_chain(&err.without_url()))),
            ),
            Err(err) if err.is_timeout() => (
                "timeout",
                Err(Failure::Retry(format!(
                    "timed out after {:?}",
                    self.policy.timeout
                ))),
            ),
            Err(err) => (
                "error",
                Err(Failure::Retry(error_chain(&err.without_url()))),
            ),
        };
        metrics::counter!("pollcast_webhook_attempts_total", "result" => label).increment(1);
        outcome
    }
}

/// An error and its sources, `outer: inner: …` (reqwest's own message alone is vague).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

pub(super) fn count_delivery(kind: EventKind, result: &'static str) {
    metrics::counter!(
        "pollcast_webhook_deliveries_total",
        "event" => kind.as_str(),
        "result" => result,
    )
    .increment(1);
}

/// Delivers one event: after the poll's previous delivery is over (`previous`), so a poll's
/// events arrive in order, then attempt after attempt until one succeeds, the attempts run
/// out, `superseded` is cancelled (a newer `poll.results`, or the poll's `poll.closed`) or
/// the shutdown grace ends.
pub(super) async fn deliver(
    shared: Arc<Shared>,
    endpoint: Arc<Endpoint>,
    event: WebhookEvent,
    previous: Option<JoinHandle<()>>,
    superseded: CancellationToken,
) {
    if let Some(previous) = previous {
        // Why ignore the result: a panicked predecessor is over all the same.
        let _ = previous.await;
    }
    let policy = shared.policy;
    let mut last_failure = String::new();
    for attempt in 1..=policy.max_attempts {
        if superseded.is_cancelled() {
            count_delivery(event.kind, "dropped");
            tracing::debug!(
                poll_id = event.poll_id,
                delivery = %event.id,
                "webhook event superseded before delivery"
            );
            return;
        }
        let outcome = tokio::select! {
            biased;
            () = shared.stop.cancelled() => {
                count_delivery(event.kind, "dropped");
                tracing::warn!(
                    poll_id = event.poll_id,
                    event = event.kind.as_str(),
                    url = %endpoint.shown_url,
                    "webhook delivery abandoned at shutdown"
                );
                return;
            }
            outcome = shared.attempt(&endpoint, &event) => outcome,
        };
        match outcome {
            Ok(()) => {
                count_delivery(event.kind, "delivered");
                tracing::debug!(
                    poll_id = event.poll_id,
                    delivery = %event.id,
                    attempt,
                    "webhook delivered"
                );
                return;
            }
            Err(Failure::Permanent(why)) => {
                last_failure = why;
                break;
            }
            Err(Failure::Retry(why)) => last_failure = why,
        }
        if attempt == policy.max_attempts {
            break;
        }
        let delay = policy.backoff.jittered(attempt, rand::random::<f64>());
        tracing::debug!(
            poll_id = event.poll_id,
            delivery = %event.id,
            attempt,
            failure = %last_failure,
            retry_in_ms = delay.as_millis() as u64,
            "webhook attempt failed; will retry"
        );
        tokio::select! {
            () = sleep(delay) => {}
            () = superseded.cancelled() => {}
            () = shared.stop.cancelled() => {}
        }
    }
    if shared.stop.is_cancelled() || superseded.is_cancelled() {
        // The loop's checks report these on the next turn; after the last attempt they
        // still were not delivered.
        count_delivery(event.kind, "dropped");
        return;
    }
    count_delivery(event.kind, "failed");
    tracing::error!(
        poll_id = event.poll_id,
        event = event.kind.as_str(),
        delivery = %event.id,
        url = %endpoint.shown_url,
        attempts = policy.max_attempts,
        last_failure = %last_failure,
        "webhook delivery failed; giving up"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let policy = RetryPolicy {
            timeout: Duration::from_secs(5),
            max_attempts: 8,
            backoff: Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(60),
            },
        };
        let ms = |failed, jitter| policy.backoff.jittered(failed, jitter).as_millis();
        // Without jitter's upper half: half of each step; with all of it: the whole step.
        assert_eq!(
            (1..=9).map(|n| ms(n, 0.0)).collect::<Vec<_>>(),
            [250, 500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000]
        );
        assert_eq!(
            (1..=9).map(|n| ms(n, 1.0)).collect::<Vec<_>>(),
            [500, 1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000]
        );
        assert_eq!(ms(3, 0.5), 1500);
        // Far past the cap, nothing overflows.
        assert_eq!(ms(u32::MAX, 1.0), 60_000);
    }
}
