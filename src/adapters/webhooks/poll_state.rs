//! A poll's webhook state, as the worker tracks it: its receiver, its results pacing and the
//! chain of its deliveries, so that they arrive one after the other and a `poll.results`
//! still waiting is dropped once a newer one or the poll's `poll.closed` exists.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use pollcast_actors::{CountsUpdate, PollId, WebhookTarget};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::delivery::{Endpoint, Shared, deliver};
use super::event::WebhookEvent;
use super::throttle::{Offer, ResultsThrottle};

/// A poll with a webhook, as the worker tracks it.
pub(super) struct Hooked {
    endpoint: Arc<Endpoint>,
    /// `None`: the poll wants no periodic results.
    pub(super) throttle: Option<ResultsThrottle>,
    /// Already closed when it was looked up: its results are no longer sent.
    closed: bool,
    /// The poll's latest delivery; the next one waits for it.
    tail: Option<JoinHandle<()>>,
    /// Cancels the poll's latest `poll.results` delivery if it is still waiting or retrying.
    results: CancellationToken,
}

impl Hooked {
    pub(super) fn new(target: &WebhookTarget, closed: bool) -> Self {
        Self {
            endpoint: Arc::new(Endpoint::new(target)),
            throttle: target
                .results_every_secs
                .map(|secs| ResultsThrottle::new(Duration::from_secs(u64::from(secs.max(1))))),
            closed,
            tail: None,
            results: CancellationToken::new(),
        }
    }

    pub(super) fn dispatch(
        &mut self,
        shared: &Arc<Shared>,
        event: WebhookEvent,
        superseded: CancellationToken,
    ) {
        let previous = self.tail.take();
        self.tail = Some(shared.tracker.spawn(deliver(
            shared.clone(),
            self.endpoint.clone(),
            event,
            previous,
            superseded,
        )));
    }

    pub(super) fn dispatch_results(&mut self, shared: &Arc<Shared>, update: &CountsUpdate) {
        self.results.cancel();
        self.results = CancellationToken::new();
        let superseded = self.results.clone();
        self.dispatch(shared, WebhookEvent::of_update(update), superseded);
    }

    /// Acts on a count update of this poll; returns whether the poll is done (closed).
    pub(super) fn on_update(
        &mut self,
        shared: &Arc<Shared>,
        timers: &mut BinaryHeap<Reverse<(Instant, PollId)>>,
        update: CountsUpdate,
        now: Instant,
    ) -> bool {
        if update.is_final() {
            self.results.cancel();
            if let Some(throttle) = &mut self.throttle {
                throttle.clear();
            }
            self.dispatch(
                shared,
                WebhookEvent::of_update(&update),
                CancellationToken::new(),
            );
            return true;
        }
        // Hidden counts are secret until the poll closes.
        if update.is_hidden() || self.closed {
            return false;
        }
        let Some(throttle) = &mut self.throttle else {
            return false;
        };
        let poll_id = update.poll_id;
        match throttle.offer(update, now) {
            Offer::Send(update) => self.dispatch_results(shared, &update),
            Offer::HeldUntil(at) => timers.push(Reverse((at, poll_id))),
            Offer::Coalesced | Offer::Stale => {}
        }
        false
    }
}

/// What the worker knows of a poll it tracks.
pub(super) enum PollState {
    /// Its webhook is being looked up; updates that came meanwhile (coalesced).
    Resolving(Vec<CountsUpdate>),
    /// It has a webhook.
    Hooked(Hooked),
}

/// Keeps an update that came while its poll's webhook is looked up: only the newest of the
/// open poll's counts matter, and a final one is always kept.
pub(super) fn hold(waiting: &mut Vec<CountsUpdate>, update: CountsUpdate) {
    if !update.is_final() {
        waiting.retain(|u| u.is_final());
    }
    waiting.push(update);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::webhooks::tests::update;

    #[test]
    fn updates_held_during_a_lookup_keep_the_newest_and_the_final_one() {
        let mut waiting = vec![update(1, 1, None)];
        hold(&mut waiting, update(1, 2, None));
        assert_eq!(waiting, vec![update(1, 2, None)]);
        hold(&mut waiting, update(1, 3, Some(5)));
        hold(&mut waiting, update(1, 4, None));
        assert_eq!(waiting, vec![update(1, 3, Some(5)), update(1, 4, None)]);
    }
}
