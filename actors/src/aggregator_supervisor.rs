//! `AggregatorSupervisor`: spawns one [`PollAggregator`] per poll on demand and restarts
//! failed ones with the same settings (rereading their poll), with backoff, within a restart
//! budget.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};

use crate::aggregator::{AggregatorArgs, PollAggregator, PollAtStart};
use crate::broadcast::BroadcasterMsg;
use crate::domain::PollId;
use crate::faults::FaultHooks;
use crate::messages::{AggregatorMsg, AggregatorSupervisorMsg, IngestMsg};
use crate::poll::Poll;
use crate::ports::{PollEvents, PollStore};
use crate::supervision::{RestartBudget, RestartPolicy};

/// Arguments of the [`AggregatorSupervisor`].
#[derive(Clone)]
pub struct AggregatorSupervisorArgs {
    /// Passed on to every aggregator.
    pub store: Arc<dyn PollStore>,
    /// Passed on to every aggregator.
    pub broadcaster: ActorRef<BroadcasterMsg>,
    /// Told when an aggregator goes down and comes back.
    pub ingest: ActorRef<IngestMsg>,
    /// Flush interval of every aggregator.
    pub flush_interval: Duration,
    /// Largest buffer of every aggregator before it flushes early.
    pub flush_max_votes: usize,
    /// Told about every committed flush (webhooks).
    pub events: Arc<dyn PollEvents>,
    /// How long after a close the final counts wait for late votes.
    pub close_grace: Duration,
    /// Restart budget and backoff.
    pub restart: RestartPolicy,
    /// Test-only failure switches.
    pub faults: FaultHooks,
}

/// State of the [`AggregatorSupervisor`].
pub struct AggregatorSupervisorState {
    args: AggregatorSupervisorArgs,
    running: HashMap<PollId, ActorRef<AggregatorMsg>>,
    polls_by_actor: HashMap<ActorId, PollId>,
    restarting: HashSet<PollId>,
    budget: RestartBudget,
}

/// Supervises the per-poll aggregators (one-for-one).
#[derive(Debug, Default)]
pub struct AggregatorSupervisor;

impl AggregatorSupervisor {
    async fn spawn_aggregator(
        myself: &ActorRef<AggregatorSupervisorMsg>,
        state: &mut AggregatorSupervisorState,
        poll_id: PollId,
        poll: PollAtStart,
    ) -> Result<ActorRef<AggregatorMsg>, SpawnErr> {
        let args = AggregatorArgs {
            poll_id,
            poll,
            store: state.args.store.clone(),
            broadcaster: state.args.broadcaster.clone(),
            ingest: state.args.ingest.clone(),
            flush_interval: state.args.flush_interval,
            flush_max_votes: state.args.flush_max_votes,
            events: state.args.events.clone(),
            close_grace: state.args.close_grace,
            faults: state.args.faults.clone(),
        };
        let (aggregator, _) =
            Actor::spawn_linked(None, PollAggregator, args, myself.get_cell()).await?;
        state.running.insert(poll_id, aggregator.clone());
        state.polls_by_actor.insert(aggregator.get_id(), poll_id);
        Ok(aggregator)
    }

    /// The polls among `ids`, read together; `None` if the store could not be read.
    async fn read_polls(
        state: &AggregatorSupervisorState,
        ids: &[PollId],
    ) -> Option<HashMap<PollId, Poll>> {
        if ids.is_empty() {
            return Some(HashMap::new());
        }
        match state.args.store.get_polls(ids).await {
            Ok(polls) => Some(polls.into_iter().map(|p| (p.id, p)).collect()),
            Err(err) => {
                tracing::warn!(polls = ids.len(), error = %err, "could not read the polls of new aggregators; they read them at their first flush");
                None
            }
        }
    }

    /// Schedules a restart, or escalates when the budget is spent.
    fn on_child_failure(
        myself: &ActorRef<AggregatorSupervisorMsg>,
        state: &mut AggregatorSupervisorState,
        poll_id: PollId,
        why: &str,
    ) -> Result<(), ActorProcessingErr> {
        metrics::counter!("pollcast_actor_restarts_total", "actor" => "aggregator").increment(1);
        state.running.remove(&poll_id);
        state.restarting.insert(poll_id);
        let _ = state.args.ingest.cast(IngestMsg::AggregatorDown(poll_id));
        let delay = state
            .budget
            .on_failure(&format!("aggregator of poll {poll_id}"))?;
        tracing::warn!(
            poll_id,
            reason = why,
            restart_in_ms = delay.as_millis() as u64,
            "aggregator failed; restarting it"
        );
        myself.send_after(delay, move || AggregatorSupervisorMsg::Restart(poll_id));
        Ok(())
    }
}

impl Actor for AggregatorSupervisor {
    type Msg = AggregatorSupervisorMsg;
    type State = AggregatorSupervisorState;
    type Arguments = AggregatorSupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: AggregatorSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(AggregatorSupervisorState {
            budget: RestartBudget::new(args.restart),
            args,
            running: HashMap::new(),
            polls_by_actor: HashMap::new(),
            restarting: HashSet::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AggregatorSupervisorMsg::Aggregators(poll_ids, reply) => {
                let new: Vec<PollId> = poll_ids
                    .iter()
                    .copied()
                    .filter(|id| !state.running.contains_key(id) && !state.restarting.contains(id))
                    .collect();
                let mut polls = Self::read_polls(state, &new).await;
                let mut aggregators = Vec::with_capacity(poll_ids.len());
                for poll_id in poll_ids {
                    aggregators.push(if let Some(running) = state.running.get(&poll_id) {
                        Some(running.clone())
                    } else if state.restarting.contains(&poll_id) {
                        None
                    } else {
                        let poll = match polls.as_mut().map(|p| p.remove(&poll_id)) {
                            Some(Some(poll)) => PollAtStart::Given(poll),
                            // Not in the store (yet), or the store unreadable: the first
                            // flush looks again.
                            Some(None) | None => PollAtStart::Unavailable,
                        };
                        Some(Self::spawn_aggregator(&myself, state, poll_id, poll).await?)
                    });
                }
                let _ = reply.send(aggregators);
            }
            AggregatorSupervisorMsg::Retire(poll_id) => {
                if let Some(aggregator) = state.running.remove(&poll_id) {
                    state.polls_by_actor.remove(&aggregator.get_id());
                    aggregator.stop(Some("idle".into()));
                    tracing::debug!(poll_id, "idle aggregator retired");
                }
            }
            AggregatorSupervisorMsg::Restart(poll_id) => {
                state.restarting.remove(&poll_id);
                match Self::spawn_aggregator(&myself, state, poll_id, PollAtStart::Unread).await {
                    Ok(aggregator) => {
                        tracing::info!(poll_id, "aggregator restarted");
                        let _ = state
                            .args
                            .ingest
                            .cast(IngestMsg::AggregatorUp(poll_id, aggregator));
                    }
                    Err(err) => Self::on_child_failure(&myself, state, poll_id, &err.to_string())?,
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match &event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            // Aggregators only stop when their supervisor does; any other exit is a fault.
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell,
                reason
                    .clone()
                    .unwrap_or_else(|| "stopped unexpectedly".into()),
            ),
            _ => return Ok(()),
        };
        if let Some(poll_id) = state.polls_by_actor.remove(&cell.get_id()) {
            Self::on_child_failure(&myself, state, poll_id, &why)?;
        }
        Ok(())
    }
}
