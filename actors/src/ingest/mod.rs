//! `IngestActor`: reads the vote log, routes each poll's votes to its aggregator, and commits
//! log positions once — and only once — the votes before them are in the store.
//!
//! The bookkeeping that makes this safe: every batch routed to an aggregator gets a
//! [`RouteSeq`] and is remembered, with the lowest log offset it holds, until the aggregator
//! acknowledges a flush through that seq. A partition is committed up to the lowest offset
//! still remembered (or up to what has been read, when nothing is). When an aggregator dies,
//! its remembered batches tell how far back to rewind the log so they are read again.

mod offsets;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, call_t};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::domain::{LogEntry, PollId};
use crate::messages::{AggregatorMsg, AggregatorSupervisorMsg, IngestMsg, RouteSeq};
use crate::ports::{LogRecord, Offset, Partition, SourceEvent, VoteSource, VoteSourceFactory};
use offsets::{InFlight, PartitionState, contiguous};

/// How the ingest actor reads and commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestSettings {
    /// Most records taken from the log per read.
    pub batch_max: usize,
    /// Longest wait for records in one read; bounds how long other messages wait.
    pub poll_wait: Duration,
    /// How often committable positions are committed.
    pub commit_interval: Duration,
    /// Reading pauses while this many routed votes are not yet flushed (backpressure when
    /// the store is slow or down).
    pub max_unflushed: usize,
    /// Timeout of calls to the aggregator supervisor and to aggregators.
    pub call_timeout: Duration,
    /// An aggregator with nothing to flush that got no vote for this long is retired (a new
    /// one is started, from the store, when its poll gets votes again).
    pub idle_timeout: Duration,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            batch_max: 4096,
            poll_wait: Duration::from_millis(50),
            commit_interval: Duration::from_millis(500),
            max_unflushed: 500_000,
            call_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// How long after a revocation partitions read for the first time count as taken over: the
/// rebalance and the first fetch take seconds.
const TAKEOVER_WINDOW: Duration = Duration::from_secs(30);

/// Arguments of the [`IngestActor`]; the factory opens a fresh consumer at every (re)start.
#[derive(Clone)]
pub struct IngestArgs {
    /// Opens the vote log's consumer.
    pub source: Arc<dyn VoteSourceFactory>,
    /// Reading and committing.
    pub settings: IngestSettings,
}

#[derive(Debug)]
struct Route {
    /// `None` while the aggregator is down or being restarted.
    target: Option<ActorRef<AggregatorMsg>>,
    in_flight: VecDeque<InFlight>,
    last_routed: Instant,
}

impl Default for Route {
    fn default() -> Self {
        Self {
            target: None,
            in_flight: VecDeque::new(),
            last_routed: Instant::now(),
        }
    }
}

/// State of the [`IngestActor`].
pub struct IngestState {
    source: Box<dyn VoteSource>,
    settings: IngestSettings,
    aggregators: Option<ActorRef<AggregatorSupervisorMsg>>,
    routes: HashMap<PollId, Route>,
    partitions: HashMap<Partition, PartitionState>,
    /// Partitions just taken over in a rebalance whose backlog is still being read: their
    /// polls are flushed as soon as their votes are routed, not at the next flush interval,
    /// so that the votes that waited for the takeover are counted (and shown) at once.
    catching_up: HashSet<Partition>,
    /// Until when partitions read for the first time count as taken over (set by a
    /// revocation: with eager rebalancing, the new assignment follows it).
    taking_over_until: Option<Instant>,
    /// Per partition, the offset last read again because a read skipped past it (see
    /// [`contiguous`]).
    gaps: HashMap<Partition, Offset>,
    next_seq: RouteSeq,
    unflushed: usize,
    /// The window (`max_unflushed`) filled and its aggregators were told to flush; reading
    /// waits until half of it is free.
    window_full: bool,
    draining: bool,
    commit_ticker: Option<JoinHandle<()>>,
}

impl IngestState {
    /// Forgets the batches up to `through` that aggregator `from` was given: they are in the
    /// store. Batches given to another (dead) aggregator, or to none, stay until a rewind.
    fn acknowledge(&mut self, poll_id: PollId, through: RouteSeq, from: ActorId) {
        let Some(route) = self.routes.get_mut(&poll_id) else {
            return;
        };
        let mut flushed = Vec::new();
        route.in_flight.retain(|b| {
            let done = b.seq <= through && b.to == Some(from);
            if done {
                flushed.push(*b);
            }
            !done
        });
        for batch in flushed {
            self.unflushed -= batch.votes;
            if let Some(p) = self.partitions.get_mut(&batch.partition) {
                p.forget(batch.min_offset);
            }
        }
    }
}

/// Consumes the vote log and feeds the aggregators.
#[derive(Debug, Default)]
pub struct IngestActor;

impl IngestActor {
    async fn poll_once(
        &self,
        myself: &ActorRef<IngestMsg>,
        state: &mut IngestState,
    ) -> Result<(), ActorProcessingErr> {
        // Backpressure: the store is behind; flushes catch up before reading goes on.
        if state.window_full && state.unflushed > state.settings.max_unflushed / 2 {
            myself.send_after(state.settings.poll_wait, || IngestMsg::ReadLog);
            return Ok(());
        }
        state.window_full = false;
        if state.unflushed >= state.settings.max_unflushed {
            state.window_full = true;
            // Why flush now: with a backlog spread over many polls, each holds less than
            // `flush_max_votes` and would wait for its flush interval while reading waits
            // for them, so a backlog would be counted at the pace of the ticks, not of the
            // store. Why reading resumes only once half the window is free: resumed at
            // the first free vote, it would fill the window again with one small read and
            // ask for the next round of flushes, each a handful of votes.
            for route in state.routes.values() {
                if let Some(target) = route
                    .target
                    .as_ref()
                    .filter(|_| !route.in_flight.is_empty())
                {
                    let _ = target.cast(AggregatorMsg::Tick);
                }
            }
            myself.send_after(state.settings.poll_wait, || IngestMsg::ReadLog);
            return Ok(());
        }
        // Why no more than the room left: then `max_unflushed` bounds the votes held in
        // memory, not that plus a read.
        let asked = state
            .settings
            .batch_max
            .min(state.settings.max_unflushed - state.unflushed);
        let event = state.source.poll(asked, state.settings.poll_wait).await;
        match event {
            Ok(SourceEvent::Records(records)) => {
                // A read that did not fill up has drained what was fetched of its partitions.
                let caught_up: HashSet<Partition> = if records.len() < asked {
                    records.iter().map(|r| r.partition).collect()
                } else {
                    HashSet::new()
                };
                self.route(state, records).await?;
                state.catching_up.retain(|p| !caught_up.contains(p));
            }
            Ok(SourceEvent::Assigned(partitions)) => {
                tracing::info!(?partitions, "vote log partitions assigned");
            }
            Ok(SourceEvent::Revoked(partitions)) => {
                tracing::info!(
                    ?partitions,
                    "vote log partitions revoked; flushing and committing them"
                );
                self.flush_all(state).await;
                self.commit(state).await;
                for p in &partitions {
                    state.partitions.remove(p);
                }
                state.taking_over_until = Some(Instant::now() + TAKEOVER_WINDOW);
                for route in state.routes.values_mut() {
                    route
                        .in_flight
                        .retain(|b| !partitions.contains(&b.partition));
                }
                state.unflushed = state
                    .routes
                    .values()
                    .flat_map(|r| r.in_flight.iter())
                    .map(|b| b.votes)
                    .sum();
            }
            Err(err) => {
                tracing::warn!(error = %err, "reading the vote log failed; retrying");
                myself.send_after(Duration::from_millis(500), || IngestMsg::ReadLog);
                return Ok(());
            }
        }
        let _ = myself.cast(IngestMsg::ReadLog);
        Ok(())
    }

    async fn route(
        &self,
        state: &mut IngestState,
        records: Vec<LogRecord>,
    ) -> Result<(), ActorProcessingErr> {
        let (records, reread) = contiguous(&state.partitions, &mut state.gaps, records);
        for (partition, offset) in reread {
            tracing::warn!(
                partition,
                offset,
                "the vote log skipped past an offset; reading the partition again from it"
            );
            metrics::counter!("pollcast_log_gaps_total").increment(1);
            state.source.seek(partition, offset).await?;
        }
        let mut by_poll: HashMap<PollId, Vec<(Partition, Offset, LogEntry)>> = HashMap::new();
        for record in records {
            if !state.partitions.contains_key(&record.partition)
                && state
                    .taking_over_until
                    .is_some_and(|until| Instant::now() < until)
            {
                // First records of a partition assigned in a rebalance.
                state.catching_up.insert(record.partition);
            }
            let p = state.partitions.entry(record.partition).or_default();
            p.read_next = Some(
                p.read_next
                    .map_or(record.next_offset, |n| n.max(record.next_offset)),
            );
            if let Some(entry) = record.entry {
                by_poll.entry(entry.poll_id()).or_default().push((
                    record.partition,
                    record.offset,
                    entry,
                ));
            }
        }
        self.find_aggregators(state, by_poll.keys().copied())
            .await?;
        for (poll_id, items) in by_poll {
            state.next_seq += 1;
            let seq = state.next_seq;
            let mut lowest: HashMap<Partition, (Offset, usize)> = HashMap::new();
            for (partition, offset, _) in &items {
                let e = lowest.entry(*partition).or_insert((*offset, 0));
                e.0 = e.0.min(*offset);
                e.1 += 1;
            }
            let taken_over = lowest.keys().any(|p| state.catching_up.contains(p));
            let route = state.routes.entry(poll_id).or_default();
            route.last_routed = Instant::now();
            let entries = items.into_iter().map(|(_, _, e)| e).collect();
            let to = match &route.target {
                Some(target) if target.cast(AggregatorMsg::Votes { seq, entries }).is_ok() => {
                    if taken_over {
                        let _ = target.cast(AggregatorMsg::Tick);
                    }
                    Some(target.get_id())
                }
                // Died just now: its supervisor reports the restart, which rewinds.
                Some(_) => {
                    route.target = None;
                    None
                }
                None => None,
            };
            for (partition, (min_offset, votes)) in lowest {
                route.in_flight.push_back(InFlight {
                    seq,
                    partition,
                    min_offset,
                    votes,
                    to,
                });
                *state
                    .partitions
                    .entry(partition)
                    .or_default()
                    .in_flight
                    .entry(min_offset)
                    .or_default() += 1;
                state.unflushed += votes;
            }
        }
        Ok(())
    }

    /// Makes sure the routes of these polls have an aggregator where one can be had, asking
    /// the supervisor once for all those that have none; batches that earlier reached none
    /// are then read again from the log.
    async fn find_aggregators(
        &self,
        state: &mut IngestState,
        poll_ids: impl IntoIterator<Item = PollId>,
    ) -> Result<(), ActorProcessingErr> {
        let missing: Vec<PollId> = poll_ids
            .into_iter()
            .filter(|id| state.routes.get(id).is_none_or(|r| r.target.is_none()))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let found =
            Self::aggregators_for(state.aggregators.as_ref(), &missing, &state.settings).await;
        for (poll_id, target) in missing.into_iter().zip(found) {
            let route = state.routes.entry(poll_id).or_default();
            let undelivered = route.in_flight.iter().any(|b| b.to.is_none());
            route.target = target;
            if route.target.is_some() && undelivered {
                self.rewind_for(state, poll_id).await?;
            }
        }
        Ok(())
    }

    /// Retries polls whose batches reached no aggregator and that got no votes since.
    async fn redeliver(&self, state: &mut IngestState) -> Result<(), ActorProcessingErr> {
        let stranded: Vec<PollId> = state
            .routes
            .iter()
            .filter(|(_, r)| r.target.is_none() && r.in_flight.iter().any(|b| b.to.is_none()))
            .map(|(id, _)| *id)
            .collect();
        self.find_aggregators(state, stranded).await
    }

    /// The aggregators of `poll_ids`, in order; `None` for each that cannot be had now.
    async fn aggregators_for(
        supervisor: Option<&ActorRef<AggregatorSupervisorMsg>>,
        poll_ids: &[PollId],
        settings: &IngestSettings,
    ) -> Vec<Option<ActorRef<AggregatorMsg>>> {
        let Some(supervisor) = supervisor else {
            return vec![None; poll_ids.len()];
        };
        let timeout = settings.call_timeout.as_millis() as u64;
        match call_t!(
            supervisor,
            AggregatorSupervisorMsg::Aggregators,
            timeout,
            poll_ids.to_vec()
        ) {
            Ok(found) => {
                debug_assert_eq!(found.len(), poll_ids.len(), "one answer per poll");
                found
            }
            Err(err) => {
                tracing::warn!(polls = poll_ids.len(), error = %err, "no aggregators for polls; their votes stay in the log");
                vec![None; poll_ids.len()]
            }
        }
    }

    /// Rewinds every partition to the lowest in-flight offset of `poll_id`, which has lost
    /// its unflushed votes, and forgets those batches: they will be routed again.
    async fn rewind_for(
        &self,
        state: &mut IngestState,
        poll_id: PollId,
    ) -> Result<(), ActorProcessingErr> {
        let Some(route) = state.routes.get_mut(&poll_id) else {
            return Ok(());
        };
        let lost: Vec<InFlight> = route.in_flight.drain(..).collect();
        let mut rewind_to: HashMap<Partition, Offset> = HashMap::new();
        for batch in &lost {
            state.unflushed -= batch.votes;
            if let Some(p) = state.partitions.get_mut(&batch.partition) {
                p.forget(batch.min_offset);
            }
            let e = rewind_to.entry(batch.partition).or_insert(batch.min_offset);
            *e = (*e).min(batch.min_offset);
        }
        for (partition, offset) in rewind_to {
            let p = state.partitions.entry(partition).or_default();
            if p.read_next.is_some_and(|next| next <= offset) {
                continue;
            }
            tracing::info!(
                poll_id,
                partition,
                offset,
                "rewinding vote log to replay votes lost by a failed aggregator"
            );
            if let Err(err) = state.source.seek(partition, offset).await {
                // Failing restarts the pipeline, which reads again from the committed offset,
                // below the lost votes.
                return Err(format!("rewinding partition {partition} to {offset}: {err}").into());
            }
            p.read_next = Some(offset);
        }
        Ok(())
    }

    async fn flush_all(&self, state: &mut IngestState) {
        let timeout = state.settings.call_timeout.as_millis() as u64;
        let targets: Vec<(PollId, ActorRef<AggregatorMsg>)> = state
            .routes
            .iter()
            .filter(|(_, r)| !r.in_flight.is_empty())
            .filter_map(|(id, r)| r.target.clone().map(|t| (*id, t)))
            .collect();
        for (poll_id, target) in targets {
            match call_t!(target, AggregatorMsg::FlushNow, timeout) {
                Ok(Ok(through)) => state.acknowledge(poll_id, through, target.get_id()),
                Ok(Err(err)) => {
                    tracing::warn!(poll_id, error = %err, "final flush failed; its votes stay in the log")
                }
                Err(err) => {
                    tracing::warn!(poll_id, error = %err, "aggregator did not flush; its votes stay in the log")
                }
            }
        }
    }

    /// Updates the gauges: votes waiting for a flush, and how far behind the log each
    /// partition is read.
    fn report(&self, state: &IngestState) {
        metrics::gauge!("pollcast_votes_pending_flush").set(state.unflushed as f64);
        for (partition, end) in state.source.end_offsets() {
            let read = state
                .partitions
                .get(&partition)
                .and_then(|p| p.read_next)
                .unwrap_or(end);
            metrics::gauge!("pollcast_consumer_lag", "partition" => partition.to_string())
                .set((end - read).max(0) as f64);
        }
    }

    /// Retires the aggregators of polls with nothing in flight that got no votes lately.
    fn retire_idle(&self, state: &mut IngestState) {
        let Some(supervisor) = &state.aggregators else {
            return;
        };
        let idle_timeout = state.settings.idle_timeout;
        let idle: Vec<PollId> = state
            .routes
            .iter()
            .filter(|(_, r)| r.in_flight.is_empty() && r.last_routed.elapsed() >= idle_timeout)
            .map(|(id, _)| *id)
            .collect();
        for poll_id in idle {
            state.routes.remove(&poll_id);
            // Why this is safe: nothing routed to it is unflushed, and this message reaches the
            // supervisor before any later request for the same poll, which spawns a fresh one.
            let _ = supervisor.cast(AggregatorSupervisorMsg::Retire(poll_id));
        }
    }

    async fn commit(&self, state: &mut IngestState) {
        let positions: Vec<(Partition, Offset)> = state
            .partitions
            .iter()
            .filter_map(|(id, p)| {
                let to = p.committable()?;
                (p.committed.is_none_or(|c| to > c)).then_some((*id, to))
            })
            .collect();
        if positions.is_empty() {
            return;
        }
        match state.source.commit(&positions).await {
            Ok(()) => {
                for (id, offset) in &positions {
                    if let Some(p) = state.partitions.get_mut(id) {
                        p.committed = Some(*offset);
                    }
                }
                tracing::trace!(?positions, "committed vote log positions");
            }
            Err(err) => {
                tracing::warn!(error = %err, "committing vote log positions failed; will retry")
            }
        }
    }
}

impl Actor for IngestActor {
    type Msg = IngestMsg;
    type State = IngestState;
    type Arguments = IngestArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: IngestArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let source = args.source.open().await?;
        let commit_ticker =
            myself.send_interval(args.settings.commit_interval, || IngestMsg::CommitTick);
        Ok(IngestState {
            source,
            settings: args.settings,
            aggregators: None,
            routes: HashMap::new(),
            partitions: HashMap::new(),
            catching_up: HashSet::new(),
            taking_over_until: None,
            gaps: HashMap::new(),
            next_seq: 0,
            unflushed: 0,
            window_full: false,
            draining: false,
            commit_ticker: Some(commit_ticker),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(ticker) = state.commit_ticker.take() {
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
            IngestMsg::Attach(aggregators) => {
                let first = state.aggregators.replace(aggregators).is_none();
                if first {
                    let _ = myself.cast(IngestMsg::ReadLog);
                }
            }
            IngestMsg::ReadLog => {
                if !state.draining {
                    self.poll_once(&myself, state).await?;
                }
            }
            IngestMsg::CommitTick => {
                self.redeliver(state).await?;
                self.commit(state).await;
                self.retire_idle(state);
                self.report(state);
            }
            IngestMsg::Flushed {
                poll_id,
                through,
                from,
            } => state.acknowledge(poll_id, through, from),
            IngestMsg::AggregatorDown(poll_id) => {
                if let Some(route) = state.routes.get_mut(&poll_id) {
                    route.target = None;
                }
            }
            IngestMsg::AggregatorUp(poll_id, aggregator) => {
                self.rewind_for(state, poll_id).await?;
                state.routes.entry(poll_id).or_default().target = Some(aggregator);
            }
            IngestMsg::Drain(reply) => {
                state.draining = true;
                self.flush_all(state).await;
                self.commit(state).await;
                tracing::info!(unflushed = state.unflushed, "ingest drained");
                // Why after the commit: the next owner of these partitions starts from it.
                state.source.close().await;
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: RouteSeq, min_offset: Offset, to: Option<ActorId>) -> InFlight {
        InFlight {
            seq,
            partition: 0,
            min_offset,
            votes: 1,
            to,
        }
    }

    fn state_with(route: Route) -> IngestState {
        struct NoSource;
        #[async_trait::async_trait]
        impl VoteSource for NoSource {
            async fn poll(
                &mut self,
                _: usize,
                _: Duration,
            ) -> Result<SourceEvent, crate::ports::LogError> {
                Ok(SourceEvent::Records(Vec::new()))
            }
            async fn commit(
                &mut self,
                _: &[(Partition, Offset)],
            ) -> Result<(), crate::ports::LogError> {
                Ok(())
            }
            async fn seek(
                &mut self,
                _: Partition,
                _: Offset,
            ) -> Result<(), crate::ports::LogError> {
                Ok(())
            }
        }
        let mut partition = PartitionState::default();
        for b in &route.in_flight {
            *partition.in_flight.entry(b.min_offset).or_default() += 1;
        }
        IngestState {
            source: Box::new(NoSource),
            settings: IngestSettings::default(),
            aggregators: None,
            unflushed: route.in_flight.len(),
            window_full: false,
            routes: HashMap::from([(7, route)]),
            partitions: HashMap::from([(0, partition)]),
            catching_up: HashSet::new(),
            taking_over_until: None,
            gaps: HashMap::new(),
            next_seq: 0,
            draining: false,
            commit_ticker: None,
        }
    }

    #[test]
    fn an_ack_covers_only_batches_that_aggregator_was_given() {
        let (old, new) = (ActorId::Local(1), ActorId::Local(2));
        let route = Route {
            target: None,
            in_flight: VecDeque::from([
                batch(1, 10, Some(old)),
                batch(2, 20, None),
                batch(3, 30, Some(new)),
            ]),
            last_routed: Instant::now(),
        };
        let mut state = state_with(route);
        state.acknowledge(7, 3, new);
        let left: Vec<RouteSeq> = state.routes[&7].in_flight.iter().map(|b| b.seq).collect();
        assert_eq!(
            left,
            [1, 2],
            "the dead aggregator's and the undelivered batch stay"
        );
        assert_eq!(state.partitions[&0].committable(), Some(10));
        assert_eq!(state.unflushed, 2);
    }
}
