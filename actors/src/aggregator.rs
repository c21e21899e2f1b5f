//! `PollAggregator`: one actor per active poll that buffers its votes and flushes them to
//! the store as one idempotent transaction every flush interval.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::broadcast::BroadcasterMsg;
use crate::domain::{CountsUpdate, LogEntry, PollId, UnixMillis, Vote, now_millis};
use crate::faults::FaultHooks;
use crate::messages::{AggregatorMsg, IngestMsg, RouteSeq};
use crate::poll::{Poll, PollRules};
use crate::ports::{FlushOutcome, PollEvents, PollStore, StoreError};

/// Longest pause between retries of a failing flush.
const MAX_FLUSH_BACKOFF: Duration = Duration::from_secs(10);

/// What an aggregator knows of its poll when it starts.
#[derive(Debug, Clone)]
pub enum PollAtStart {
    /// Read by the supervisor together with the polls of the other aggregators it started
    /// in the same request.
    Given(Poll),
    /// Not read yet: the aggregator reads it as it starts (a restart).
    Unread,
    /// The store could not be read just now: the aggregator reads it at its first flush,
    /// rather than every aggregator of the request waiting out the same failure in turn.
    Unavailable,
}

/// Everything an aggregator is started with.
#[derive(Clone)]
pub struct AggregatorArgs {
    /// The poll this aggregator counts.
    pub poll_id: PollId,
    /// Its poll, if already read.
    pub poll: PollAtStart,
    /// Where counts are flushed.
    pub store: Arc<dyn PollStore>,
    /// Where new counts go after a flush.
    pub broadcaster: ActorRef<BroadcasterMsg>,
    /// Who is told when routed votes are safely in the store.
    pub ingest: ActorRef<IngestMsg>,
    /// How often buffered votes are flushed.
    pub flush_interval: Duration,
    /// A buffer this full is flushed at once, without waiting for the tick.
    pub flush_max_votes: usize,
    /// Told about every committed flush (webhooks).
    pub events: Arc<dyn PollEvents>,
    /// How long after a close the final counts wait for late votes.
    pub close_grace: Duration,
    /// Test-only failure switches.
    pub faults: FaultHooks,
}

/// What the aggregator knows of its poll: the rules its votes are checked against, and
/// whether subscribers see its updates before the final one.
struct KnownPoll {
    rules: PollRules,
    hide_updates: bool,
}

impl KnownPoll {
    /// `close_grace`: how long after closing the final counts go out (see
    /// [`PollRules::hides_updates`]).
    fn of(poll: &Poll, close_grace: Duration) -> Self {
        let rules = poll.rules();
        Self {
            hide_updates: rules.hides_updates(
                poll.closed_at,
                now_millis(),
                close_grace.as_millis() as UnixMillis,
            ),
            rules,
        }
    }

    /// The HTTP side checks the same rule; records written by other producers may not be.
    fn admits(&self, vote: &Vote) -> bool {
        self.rules.check_ballot(&vote.choices).is_ok()
    }
}

/// State of a [`PollAggregator`].
pub struct AggregatorState {
    args: AggregatorArgs,
    /// The poll; `None` while it is unknown or could not be loaded.
    known: Option<KnownPoll>,
    /// Votes not yet flushed, in log order (the ledger decides which count).
    buffer: Vec<Vote>,
    /// A close marker was read: when the poll closed, and the routing sequence number of
    /// the batch that carried it. Once the grace after the close has passed and every vote
    /// is flushed, the final counts are published and this is cleared.
    closing: Option<(UnixMillis, RouteSeq)>,
    received_through: RouteSeq,
    acked_through: RouteSeq,
    failures: u32,
    retry_at: Option<Instant>,
    ticker: Option<JoinHandle<()>>,
}

/// Buffers one poll's votes and flushes them as atomic increments.
#[derive(Debug, Default)]
pub struct PollAggregator;

impl PollAggregator {
    async fn load_poll(args: &AggregatorArgs) -> Result<Option<KnownPoll>, StoreError> {
        Ok(args
            .store
            .get_poll(args.poll_id)
            .await?
            .as_ref()
            .map(|poll| KnownPoll::of(poll, args.close_grace)))
    }

    /// Hands a committed flush to subscribers and to the event sink.
    fn publish(
        state: &AggregatorState,
        outcome: FlushOutcome,
        closed_at: Option<UnixMillis>,
        hide_results: bool,
    ) {
        let update = CountsUpdate {
            poll_id: state.args.poll_id,
            seq: outcome.seq,
            changed: outcome.changed,
            all: outcome.all,
            flushed_at: now_millis(),
            closed_at,
            hide_results,
        };
        state.args.events.flushed(&update);
        // Why ignore the error: the broadcaster is only gone while the tree shuts down or
        // restarts, and subscribers then resync from a fresh snapshot.
        let _ = state.args.broadcaster.cast(BroadcasterMsg::Publish(update));
    }

    /// Writes the buffer to the store, then, if the poll was closed, publishes its final
    /// counts. Returns the routing sequence number everything is flushed through; on error
    /// what was not written is kept for the next attempt.
    async fn flush(&self, state: &mut AggregatorState) -> Result<RouteSeq, StoreError> {
        let through = state.received_through;
        if state.buffer.is_empty() && state.closing.is_none() {
            return Ok(through);
        }
        let poll_id = state.args.poll_id;
        state.args.faults.check_flush(poll_id);
        if state.known.is_none() {
            // Why reload: the poll may have been created after this actor started, or the
            // store was unreachable when it did.
            state.known = Self::load_poll(&state.args).await?;
        }
        let Some(known) = &state.known else {
            tracing::warn!(
                poll_id,
                dropped = state.buffer.len(),
                "votes for an unknown poll dropped"
            );
            state.buffer.clear();
            state.closing = None;
            return Ok(through);
        };
        let hide_results = known.hide_updates;
        let before = state.buffer.len();
        let votes: Arc<[Vote]> = state.buffer.drain(..).filter(|v| known.admits(v)).collect();
        if votes.len() < before {
            tracing::warn!(
                poll_id,
                dropped = before - votes.len(),
                "votes for unknown options or with too many choices dropped"
            );
        }
        if !votes.is_empty() {
            let started = Instant::now();
            let outcome = match state
                .args
                .store
                .apply_votes(poll_id, known.rules.allows_change(), votes.clone())
                .await
            {
                Ok(outcome) => outcome,
                Err(err) => {
                    state.buffer = votes.to_vec();
                    return Err(err);
                }
            };
            metrics::histogram!("pollcast_flush_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!("pollcast_flush_batch_size").record(votes.len() as f64);
            metrics::counter!("pollcast_votes_counted_total").increment(outcome.inserted);
            tracing::debug!(
                poll_id,
                batch = votes.len(),
                counted = outcome.inserted,
                seq = outcome.seq,
                took_ms = started.elapsed().as_millis() as u64,
                "flushed"
            );
            if outcome.inserted > 0 {
                Self::publish(state, outcome, None, hide_results);
            }
        }
        let Some((closed_at, marker_seq)) = state.closing else {
            return Ok(through);
        };
        let seal_at = closed_at + state.args.close_grace.as_millis() as UnixMillis;
        if now_millis() < seal_at {
            // Why not acknowledge the marker yet: its offset must not be committed before
            // the seal, or a crash in between would lose it.
            return Ok(through.min(marker_seq - 1));
        }
        // `None`: already sealed (a repeated or replayed marker); nothing to publish again.
        if let Some(outcome) = state.args.store.seal_poll(poll_id).await? {
            tracing::info!(
                poll_id,
                seq = outcome.seq,
                "poll closed; final counts published"
            );
            Self::publish(state, outcome, Some(closed_at), hide_results);
        }
        // The final counts are out (now or before): later votes' counts are shown as well.
        if let Some(known) = &mut state.known {
            known.hide_updates = false;
        }
        state.closing = None;
        Ok(through)
    }

    fn ticker(myself: &ActorRef<AggregatorMsg>, interval: Duration) -> JoinHandle<()> {
        myself.send_interval(interval, || AggregatorMsg::Tick)
    }

    fn restart_ticker(myself: &ActorRef<AggregatorMsg>, state: &mut AggregatorState) {
        if let Some(old) = state
            .ticker
            .replace(Self::ticker(myself, state.args.flush_interval))
        {
            old.abort();
        }
    }

    async fn on_tick(&self, myself: &ActorRef<AggregatorMsg>, state: &mut AggregatorState) {
        if state.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        match self.flush(state).await {
            Ok(through) => {
                if state.failures > 0 {
                    tracing::info!(poll_id = state.args.poll_id, "flush recovered");
                }
                state.failures = 0;
                state.retry_at = None;
                if through > state.acked_through {
                    state.acked_through = through;
                    let _ = state.args.ingest.cast(IngestMsg::Flushed {
                        poll_id: state.args.poll_id,
                        through,
                        from: myself.get_id(),
                    });
                }
            }
            Err(err) => {
                metrics::counter!("pollcast_flush_failures_total").increment(1);
                state.failures += 1;
                // Twice the interval after the first failure, doubling from there.
                let backoff = crate::Backoff {
                    initial: state.args.flush_interval.saturating_mul(2),
                    max: MAX_FLUSH_BACKOFF,
                };
                let delay = backoff.after(state.failures);
                state.retry_at = Some(Instant::now() + delay);
                tracing::warn!(
                    poll_id = state.args.poll_id,
                    error = %err,
                    pending = state.buffer.len(),
                    retry_in_ms = delay.as_millis() as u64,
                    "flush failed; votes kept and log offsets not committed"
                );
            }
        }
    }
}

impl Actor for PollAggregator {
    type Msg = AggregatorMsg;
    type State = AggregatorState;
    type Arguments = AggregatorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        mut args: AggregatorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Why take the poll out: the arguments live on in the state, and only its rules are
        // needed; 10,000 aggregators need not each keep their poll's texts.
        let known = match std::mem::replace(&mut args.poll, PollAtStart::Unavailable) {
            PollAtStart::Given(poll) => Some(KnownPoll::of(&poll, args.close_grace)),
            PollAtStart::Unavailable => None,
            // Why not fail when the store is down: a restart loop would burn the restart
            // budget; the options are loaded again at the first flush instead.
            PollAtStart::Unread => Self::load_poll(&args).await.unwrap_or_else(|err| {
                tracing::warn!(poll_id = args.poll_id, error = %err, "could not load poll; will retry at flush");
                None
            }),
        };
        let ticker = Self::ticker(&myself, args.flush_interval);
        tracing::debug!(poll_id = args.poll_id, "aggregator started");
        Ok(AggregatorState {
            args,
            known,
            buffer: Vec::new(),
            closing: None,
            received_through: 0,
            acked_through: 0,
            failures: 0,
            retry_at: None,
            ticker: Some(ticker),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(ticker) = state.ticker.take() {
            ticker.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AggregatorMsg::Votes { seq, entries } => {
                state.received_through = state.received_through.max(seq);
                for entry in entries {
                    match entry {
                        LogEntry::Vote(vote) => state.buffer.push(vote),
                        LogEntry::Closed(marker) if state.closing.is_none() => {
                            state.closing = Some((marker.closed_at, seq));
                            // Why a timer of its own: subscribers are watching for the final
                            // result, which should not wait for the next tick as well.
                            let grace = state.args.close_grace.as_millis() as UnixMillis;
                            let wait = (marker.closed_at + grace - now_millis()).max(0);
                            myself.send_after(Duration::from_millis(wait as u64), || {
                                AggregatorMsg::Tick
                            });
                        }
                        LogEntry::Closed(_) => {}
                    }
                }
                // Why not wait for the tick: a flush holds the store's single writer for as
                // long as its votes take to apply, and every other poll's flush queues
                // behind it; bounding its size bounds that wait (docs/BENCHMARKS.md), and
                // this poll's own votes show sooner.
                if state.buffer.len() >= state.args.flush_max_votes {
                    self.on_tick(&myself, state).await;
                    // Why restart the ticker: its next tick could be moments away and flush a
                    // handful of votes right behind these; two flushes close together make a
                    // subscriber still sending the first skip to the second (a missed update).
                    // Restarted, the next flush is a whole interval after this one, which is
                    // as long as any vote waited before.
                    Self::restart_ticker(&myself, state);
                }
            }
            AggregatorMsg::Tick => self.on_tick(&myself, state).await,
            AggregatorMsg::FlushNow(reply) => {
                let result = self.flush(state).await;
                if let Ok(through) = result {
                    state.acked_through = state.acked_through.max(through);
                }
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
        }
        Ok(())
    }
}
