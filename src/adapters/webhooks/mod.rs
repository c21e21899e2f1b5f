//! Webhooks: a poll may name an operator's URL that receives signed JSON events:
//! `poll.opened`, `poll.closed` (with the final counts) and, when the poll asks for them,
//! `poll.results` at most once per `resultsEverySecs` while it is open.
//!
//! The vote pipeline's actors only push onto a bounded queue ([`WebhookDispatcher`]'s
//! [`PollEvents`] calls never wait; a full queue drops the event and counts it). One worker
//! task decides what to send; each delivery runs in its own task, retried with exponential
//! backoff and jitter, so a slow or failing receiver holds up only its own poll's later
//! events.
//!
//! What a receiver gets, as a `POST`:
//!
//! - Body: `{"id", "type", "pollId", "seq", "occurredAt", "counts": [{"optionId",
//!   "newCount"}], "closedAt"}`; `poll.opened` adds `"poll": {"id", "question", "options":
//!   [{"id", "text"}], "closesAt", "maxChoices"}`. `counts` lists every option.
//! - Headers: `X-Pollcast-Event: <type>`, `X-Pollcast-Delivery: <id>`, and
//!   `X-Pollcast-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`,
//!   signed with the secret shown when the poll was created. A receiver recomputes the HMAC
//!   over the raw body and rejects a `t` too far from its clock (a replay).
//! - Delivery is at least once: a 2xx answer is success; anything else, a timeout or a
//!   connection error is retried (redirects are not followed). The `id` is the same in every
//!   attempt, so receivers drop duplicates by it. A process makes a poll's deliveries one
//!   after the other (with several processes, `seq` orders them); a `poll.results` still
//!   waiting or retrying is dropped once a newer one or the poll's `poll.closed` exists.
//!
//! Where each part lives:
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`WebhookDispatcher`], the pipeline's [`PollEvents`]: the bounded queue |
//! | `event.rs` | the events' JSON bodies and ids (the wire format) |
//! | `signing.rs` | `X-Pollcast-Signature` |
//! | `delivery.rs` | one event's HTTP attempts and their retry policy |
//! | `throttle.rs` | at most one `poll.results` per interval |
//! | `poll_state.rs` | a poll's state: its receiver, pacing and chain of deliveries |
//! | `worker.rs` | the task that turns queued notices into deliveries; shutdown |

mod delivery;
mod event;
mod poll_state;
mod signing;
mod throttle;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use pollcast_actors::domain::now_millis;
use pollcast_actors::service::PollCatalog;
use pollcast_actors::{CountsUpdate, Poll, PollEvents, PollId};
use tokio::sync::mpsc;

use self::delivery::{Shared, count_delivery};
use self::worker::Notice;
use crate::background::{Background, Stage};
use crate::config::WebhookSettings;

/// A full queue drops events by the thousand under overload; one warning this often says so.
const DROP_WARNING_EVERY_MS: i64 = 10_000;

/// Sends poll events to each poll's webhook (see the module documentation): the
/// [`PollEvents`] of a process with webhooks.
pub struct WebhookDispatcher {
    queue: mpsc::Sender<Notice>,
    /// The process's poll cache: the updates of a poll it knows to have no webhook (settings
    /// never change) are not even queued.
    catalog: PollCatalog,
    dropped_since_warning: AtomicU64,
    last_drop_warning: AtomicI64,
}

impl WebhookDispatcher {
    /// Starts the dispatcher's worker in `background`'s `Delivery` stage. Polls' webhooks
    /// not learnt from [`PollEvents::opened`] are looked up in the catalog's store once, and
    /// the catalog remembers the polls that have none. When the stage stops, the worker takes
    /// no more events; deliveries under way then get a few seconds to finish.
    pub fn start(
        catalog: PollCatalog,
        settings: &WebhookSettings,
        background: &Background,
    ) -> Arc<Self> {
        let (queue, notices) = mpsc::channel(settings.queue_capacity.get());
        let (worker, resolved) = worker::Worker::new(catalog.clone(), Shared::new(settings));
        background.spawn(Stage::Delivery, "webhook deliveries", |stop| {
            worker.run(notices, resolved, stop)
        });
        Arc::new(Self {
            queue,
            catalog,
            dropped_since_warning: AtomicU64::new(0),
            last_drop_warning: AtomicI64::new(0),
        })
    }

    fn enqueue(&self, notice: Notice) {
        let kind = notice.kind();
        match self.queue.try_send(notice) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                count_delivery(kind, "dropped");
                self.warn_dropped();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                count_delivery(kind, "dropped");
                tracing::debug!(
                    event = kind.as_str(),
                    "webhook event after shutdown dropped"
                );
            }
        }
    }

    fn warn_dropped(&self) {
        self.dropped_since_warning.fetch_add(1, Ordering::Relaxed);
        let now = now_millis();
        let last = self.last_drop_warning.load(Ordering::Relaxed);
        if now - last >= DROP_WARNING_EVERY_MS
            && self
                .last_drop_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let dropped = self.dropped_since_warning.swap(0, Ordering::Relaxed);
            tracing::warn!(
                dropped,
                "webhook queue full: events dropped (receivers too slow, or \
                 webhooks.queue_capacity too small)"
            );
        }
    }
}

impl PollEvents for WebhookDispatcher {
    fn opened(&self, poll: &Poll) {
        if poll.settings.webhook.is_none() {
            self.catalog.remember(poll);
            return;
        }
        self.enqueue(Notice::Opened(Box::new(poll.clone())));
    }

    fn flushed(&self, update: &CountsUpdate) {
        if has_no_webhook(&self.catalog, update.poll_id) {
            return;
        }
        self.enqueue(Notice::Flushed(update.clone()));
    }
}

#[cfg(test)]
mod tests;

/// Whether the catalog knows the poll to have no webhook (then none of its events is sent).
fn has_no_webhook(catalog: &PollCatalog, poll: PollId) -> bool {
    catalog
        .known(poll)
        .is_some_and(|meta| !meta.rules.has_webhook())
}
