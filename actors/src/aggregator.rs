//! `PollAggregator`: one actor per active poll that buffers its votes and flushes them to
//! the store as one idempotent transaction every flush interval.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::broadcast::BroadcasterMsg;
use crate::domain::{CountsUpdate, OptionId, PollId, UnixMillis, Vote, now_millis};
use crate::faults::FaultHooks;
use crate::ingest::IngestMsg;
use crate::ports::{PollStore, StoreError};

/// Sequence number the ingest actor gives every batch it routes to an aggregator. An
/// aggregator acknowledges "flushed everything up to seq N", which tells the ingest actor
/// which log positions are now safe to commit.
pub type RouteSeq = u64;

/// Longest pause between retries of a failing flush.
const MAX_FLUSH_BACKOFF: Duration = Duration::from_secs(10);

/// Everything an aggregator is started with; kept by its supervisor to restart it with the
/// same arguments.
#[derive(Clone)]
pub struct AggregatorArgs {
    /// The poll this aggregator counts.
    pub poll_id: PollId,
    /// Where counts are flushed.
    pub store: Arc<dyn PollStore>,
    /// Where new counts go after a flush.
    pub broadcaster: ActorRef<BroadcasterMsg>,
    /// Who is told when routed votes are safely in the store.
    pub ingest: ActorRef<IngestMsg>,
    /// How often buffered votes are flushed.
    pub flush_interval: Duration,
    /// Test-only failure switches.
    pub faults: FaultHooks,
}

/// Messages of a [`PollAggregator`].
#[derive(Debug)]
pub enum AggregatorMsg {
    /// Votes read from the log, all for this aggregator's poll, in log order.
    Votes {
        /// The batch's routing sequence number.
        seq: RouteSeq,
        /// The votes.
        votes: Vec<Vote>,
    },
    /// Time to flush (sent every flush interval).
    Tick,
    /// Flush now and reply with the routing sequence number flushed through (shutdown and
    /// partition revocation).
    FlushNow(RpcReplyPort<Result<RouteSeq, String>>),
}

/// A buffered vote, keyed by its user in [`AggregatorState::buffer`].
#[derive(Debug, Clone, Copy)]
struct Buffered {
    option_id: OptionId,
    voted_at: Option<UnixMillis>,
}

/// State of a [`PollAggregator`].
pub struct AggregatorState {
    args: AggregatorArgs,
    /// The poll's option ids; `None` while the poll is unknown or could not be loaded.
    options: Option<HashSet<OptionId>>,
    /// Votes not yet flushed, one per user: the first in log order wins, as in the ledger.
    buffer: HashMap<String, Buffered>,
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
    async fn load_options(args: &AggregatorArgs) -> Result<Option<HashSet<OptionId>>, StoreError> {
        Ok(args
            .store
            .get_poll(args.poll_id)
            .await?
            .map(|poll| poll.options.iter().map(|o| o.id).collect()))
    }

    /// Writes the buffer to the store. Returns the routing sequence number everything is
    /// flushed through; on error the buffer is kept for the next attempt.
    async fn flush(&self, state: &mut AggregatorState) -> Result<RouteSeq, StoreError> {
        let through = state.received_through;
        if state.buffer.is_empty() {
            return Ok(through);
        }
        let poll_id = state.args.poll_id;
        state.args.faults.check_flush(poll_id);
        if state.options.is_none() {
            // Why reload: the poll may have been created after this actor started, or the
            // store was unreachable when it did.
            state.options = Self::load_options(&state.args).await?;
        }
        let Some(options) = &state.options else {
            tracing::warn!(
                poll_id,
                dropped = state.buffer.len(),
                "votes for an unknown poll dropped"
            );
            state.buffer.clear();
            return Ok(through);
        };
        let mut votes = Vec::with_capacity(state.buffer.len());
        let mut invalid = 0usize;
        for (user_id, b) in state.buffer.drain() {
            if options.contains(&b.option_id) {
                votes.push(Vote {
                    poll_id,
                    option_id: b.option_id,
                    user_id,
                    voted_at: b.voted_at,
                });
            } else {
                invalid += 1;
            }
        }
        if invalid > 0 {
            tracing::warn!(
                poll_id,
                dropped = invalid,
                "votes for unknown options dropped"
            );
        }
        if votes.is_empty() {
            return Ok(through);
        }
        let started = Instant::now();
        let outcome = match state.args.store.apply_votes(poll_id, &votes).await {
            Ok(outcome) => outcome,
            Err(err) => {
                state.buffer.extend(votes.into_iter().map(|v| {
                    let b = Buffered {
                        option_id: v.option_id,
                        voted_at: v.voted_at,
                    };
                    (v.user_id, b)
                }));
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
            let update = CountsUpdate {
                poll_id,
                seq: outcome.seq,
                changed: outcome.changed,
                all: outcome.all,
                flushed_at: now_millis(),
            };
            // Why ignore the error: the broadcaster is only gone while the tree shuts down or
            // restarts, and subscribers then resync from a fresh snapshot.
            let _ = state.args.broadcaster.cast(BroadcasterMsg::Publish(update));
        }
        Ok(through)
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
                let delay = state
                    .args
                    .flush_interval
                    .saturating_mul(1 << state.failures.min(8))
                    .min(MAX_FLUSH_BACKOFF);
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
        args: AggregatorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Why not fail when the store is down: a restart loop would burn the restart budget;
        // the options are loaded again at the first flush instead.
        let options = Self::load_options(&args).await.unwrap_or_else(|err| {
            tracing::warn!(poll_id = args.poll_id, error = %err, "could not load poll; will retry at flush");
            None
        });
        let ticker = myself.send_interval(args.flush_interval, || AggregatorMsg::Tick);
        tracing::debug!(poll_id = args.poll_id, "aggregator started");
        Ok(AggregatorState {
            args,
            options,
            buffer: HashMap::new(),
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
            AggregatorMsg::Votes { seq, votes } => {
                state.received_through = state.received_through.max(seq);
                for vote in votes {
                    state.buffer.entry(vote.user_id).or_insert(Buffered {
                        option_id: vote.option_id,
                        voted_at: vote.voted_at,
                    });
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
