//! The worker: the one task that takes the dispatcher's queue and decides what to send. It
//! tracks each poll's state (looking its webhook up in the store when the pipeline did not
//! tell it), wakes held `poll.results` when they are due, and on shutdown sends what was
//! queued and gives the deliveries under way a grace.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use pollcast_actors::service::PollCatalog;
use pollcast_actors::{CountsUpdate, Poll, PollId, StoreError};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use super::delivery::{Shared, count_delivery};
use super::event::{EventKind, WebhookEvent};
use super::poll_state::{Hooked, PollState, hold};

/// How long deliveries still under way get to finish once shutdown begins.
pub(super) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the dispatcher is told by the pipeline.
pub(super) enum Notice {
    Opened(Box<Poll>),
    Flushed(CountsUpdate),
}

impl Notice {
    pub(super) fn kind(&self) -> EventKind {
        match self {
            Notice::Opened(_) => EventKind::Opened,
            Notice::Flushed(update) => EventKind::of_update(update),
        }
    }
}

/// A poll and what the store said of it.
pub(super) type Lookup = (PollId, Result<Option<Poll>, StoreError>);

/// The single task that turns notices into deliveries.
pub(super) struct Worker {
    shared: Arc<Shared>,
    /// Open polls with a webhook, and polls being looked up.
    polls: HashMap<PollId, PollState>,
    /// When held `poll.results` are due; entries whose update went otherwise are skipped.
    timers: BinaryHeap<Reverse<(Instant, PollId)>>,
    resolved_tx: mpsc::UnboundedSender<Lookup>,
    /// The process's poll cache: it remembers the polls found to have no webhook.
    catalog: PollCatalog,
}

impl Worker {
    /// A worker, and where its store lookups answer (for [`Worker::run`]).
    pub(super) fn new(
        catalog: PollCatalog,
        shared: Shared,
    ) -> (Self, mpsc::UnboundedReceiver<Lookup>) {
        let (resolved_tx, resolved) = mpsc::unbounded_channel();
        let worker = Self {
            shared: Arc::new(shared),
            polls: HashMap::new(),
            timers: BinaryHeap::new(),
            resolved_tx,
            catalog,
        };
        (worker, resolved)
    }

    /// Turns `notices` into deliveries until `shutdown` is cancelled or every sender is
    /// gone, then sends what was queued (see [`Worker::drain`]).
    pub(super) async fn run(
        mut self,
        mut notices: mpsc::Receiver<Notice>,
        mut resolved: mpsc::UnboundedReceiver<Lookup>,
        shutdown: CancellationToken,
    ) {
        loop {
            let wake = self.timers.peek().map(|Reverse((at, _))| *at);
            // Why this order: timers before notices, so a busy queue cannot starve the
            // periodic results.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    self.on_timers(Instant::now());
                }
                Some((poll_id, found)) = resolved.recv() => self.on_resolved(poll_id, found),
                notice = notices.recv() => match notice {
                    Some(notice) => self.on_notice(notice),
                    None => break,
                },
            }
        }
        self.drain(notices, resolved).await;
    }

    /// Shutdown: takes no more notices, sends what was already queued, and gives the
    /// deliveries under way [`SHUTDOWN_GRACE`].
    async fn drain(
        &mut self,
        mut notices: mpsc::Receiver<Notice>,
        mut resolved: mpsc::UnboundedReceiver<Lookup>,
    ) {
        notices.close();
        while let Ok(notice) = notices.try_recv() {
            self.on_notice(notice);
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        self.shared.tracker.close();
        loop {
            tokio::select! {
                biased;
                Some((poll_id, found)) = resolved.recv() => self.on_resolved(poll_id, found),
                () = self.shared.tracker.wait() => break,
                () = sleep_until(deadline) => {
                    tracing::warn!(
                        pending = self.shared.tracker.len(),
                        "webhook deliveries still under way after the shutdown grace are abandoned"
                    );
                    self.shared.stop.cancel();
                    self.shared.tracker.wait().await;
                    break;
                }
            }
        }
    }

    fn on_notice(&mut self, notice: Notice) {
        let now = Instant::now();
        match notice {
            Notice::Opened(poll) => {
                let Some(target) = &poll.settings.webhook else {
                    self.catalog.remember(&poll);
                    return;
                };
                let mut hooked = Hooked::new(target, poll.closed);
                hooked.dispatch(
                    &self.shared,
                    WebhookEvent::opened(&poll),
                    CancellationToken::new(),
                );
                // Why look for a lookup under way: a flush that raced ahead of `opened`
                // started one; its updates follow the opened event, and its answer is moot.
                let waiting = match self.polls.remove(&poll.id) {
                    Some(PollState::Resolving(waiting)) => waiting,
                    _ => Vec::new(),
                };
                for update in waiting {
                    if hooked.on_update(&self.shared, &mut self.timers, update, now) {
                        return;
                    }
                }
                self.polls.insert(poll.id, PollState::Hooked(hooked));
            }
            Notice::Flushed(update) => {
                let poll_id = update.poll_id;
                match self.polls.get_mut(&poll_id) {
                    Some(PollState::Hooked(hooked)) => {
                        if hooked.on_update(&self.shared, &mut self.timers, update, now) {
                            self.polls.remove(&poll_id);
                        }
                    }
                    Some(PollState::Resolving(waiting)) => hold(waiting, update),
                    None if super::has_no_webhook(&self.catalog, poll_id) => {}
                    None => {
                        self.polls
                            .insert(poll_id, PollState::Resolving(vec![update]));
                        self.spawn_lookup(poll_id);
                    }
                }
            }
        }
    }

    fn on_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, poll_id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(PollState::Hooked(hooked)) = self.polls.get_mut(&poll_id)
                && let Some(update) = hooked.throttle.as_mut().and_then(|t| t.take_due(now))
            {
                hooked.dispatch_results(&self.shared, &update);
            }
        }
    }

    /// Looks a poll's webhook up in the store, retrying failures like deliveries, and hands
    /// the answer back to the worker.
    fn spawn_lookup(&self, poll_id: PollId) {
        let store = self.catalog.store().clone();
        let shared = self.shared.clone();
        let answer = self.resolved_tx.clone();
        self.shared.tracker.spawn(async move {
            let mut failed = 0;
            let found = loop {
                let result = tokio::select! {
                    result = store.get_poll(poll_id) => result,
                    () = shared.stop.cancelled() => return,
                };
                match result {
                    Ok(poll) => break Ok(poll),
                    Err(err) => {
                        failed += 1;
                        if failed >= shared.policy.max_attempts {
                            break Err(err);
                        }
                        tracing::warn!(
                            poll_id,
                            error = %err,
                            "looking up a poll's webhook failed; will retry"
                        );
                        tokio::select! {
                            () = sleep(shared.policy.backoff.jittered(failed, rand::random::<f64>())) => {}
                            () = shared.stop.cancelled() => return,
                        }
                    }
                }
            };
            // Why ignore the error: the worker is gone only after shutdown.
            let _ = answer.send((poll_id, found));
        });
    }

    fn on_resolved(&mut self, poll_id: PollId, found: Result<Option<Poll>, StoreError>) {
        // Why check: `opened` may have told the webhook while the lookup ran.
        if !matches!(self.polls.get(&poll_id), Some(PollState::Resolving(_))) {
            return;
        }
        let Some(PollState::Resolving(waiting)) = self.polls.remove(&poll_id) else {
            return;
        };
        let poll = match found {
            Ok(poll) => poll,
            Err(err) => {
                for update in &waiting {
                    count_delivery(EventKind::of_update(update), "dropped");
                }
                tracing::error!(
                    poll_id,
                    error = %err,
                    dropped = waiting.len(),
                    "could not look up the poll's webhook; its events are dropped"
                );
                return;
            }
        };
        let Some(poll) = poll else {
            return;
        };
        let Some(target) = poll.settings.webhook.clone() else {
            self.catalog.remember(&poll);
            return;
        };
        let closed = poll.closed;
        let mut hooked = Hooked::new(&target, closed);
        let now = Instant::now();
        for update in waiting {
            if hooked.on_update(&self.shared, &mut self.timers, update, now) {
                return;
            }
        }
        self.polls.insert(poll_id, PollState::Hooked(hooked));
    }
}
