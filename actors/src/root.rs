//! `RootSupervisor`: the top of the tree.
//!
//! ```text
//! RootSupervisor
//! ├── ServerActor           restarted alone (one-for-one)
//! └── the pipeline          restarted together (one-for-all): its actors hold each other's refs
//!     ├── Broadcaster
//!     ├── IngestActor
//!     └── AggregatorSupervisor
//!         └── PollAggregator × N
//! ```
//!
//! The HTTP server keeps accepting votes (they only need the log and the guard) while the
//! pipeline restarts, and the pipeline resumes from the last committed log position. A child
//! supervisor that exhausts its restart budget escalates; the root then stops, and the process
//! exits non-zero.

use std::sync::Arc;
use std::time::Duration;

use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr, SupervisionEvent,
    call_t,
};

use crate::aggregator_supervisor::{AggregatorSupervisor, AggregatorSupervisorArgs};
use crate::broadcast::{BroadcastHub, Broadcaster, BroadcasterArgs, BroadcasterMsg};
use crate::faults::FaultHooks;
use crate::ingest::{IngestActor, IngestArgs, IngestSettings};
use crate::messages::{AggregatorSupervisorMsg, IngestMsg};
use crate::ports::{CountsBus, PollEvents, PollStore, VoteSourceFactory};
use crate::server_actor::{Server, ServerActor, ServerMsg};
use crate::supervision::{Escalation, RestartBudget, RestartPolicy};

/// Longest wait for the final flush at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the tree is built from; the wiring module fills it from config.toml.
#[derive(Clone)]
pub struct RootArgs {
    /// Poll store (SQLite or Postgres).
    pub store: Arc<dyn PollStore>,
    /// Vote log consumer factory (embedded log or Kafka).
    pub source: Arc<dyn VoteSourceFactory>,
    /// Subscriber registry shared with the WebSocket handlers.
    pub hub: BroadcastHub,
    /// Count updates shared with other processes (multi-node mode only).
    pub bus: Option<Arc<dyn CountsBus>>,
    /// The HTTP server.
    pub http: Arc<dyn Server>,
    /// How often aggregators flush.
    pub flush_interval: Duration,
    /// How many buffered votes make an aggregator flush before its tick.
    pub flush_max_votes: usize,
    /// Told about every committed flush (webhooks).
    pub events: Arc<dyn PollEvents>,
    /// How long after a close the final counts wait for late votes.
    pub close_grace: Duration,
    /// How the log is read and committed.
    pub ingest: IngestSettings,
    /// Restart budget of every supervisor.
    pub restart: RestartPolicy,
    /// Test-only failure switches.
    pub faults: FaultHooks,
}

/// Messages of the [`RootSupervisor`].
#[derive(Debug)]
pub enum RootMsg {
    /// A backoff elapsed: start the pipeline again.
    RestartPipeline,
    /// A backoff elapsed: start the HTTP server again.
    RestartHttp,
    /// Graceful shutdown: stop accepting, flush, commit; replies when done.
    Shutdown(RpcReplyPort<()>),
}

struct Pipeline {
    broadcaster: ActorRef<BroadcasterMsg>,
    ingest: ActorRef<IngestMsg>,
    aggregators: ActorRef<AggregatorSupervisorMsg>,
}

impl Pipeline {
    fn contains(&self, cell: &ActorCell) -> bool {
        let id = cell.get_id();
        [
            self.broadcaster.get_id(),
            self.ingest.get_id(),
            self.aggregators.get_id(),
        ]
        .contains(&id)
    }

    async fn stop(self) {
        // Aggregators first: nothing may be flushed after the ingest actor is gone.
        let _ = self.aggregators.stop_and_wait(None, None).await;
        let _ = self.ingest.stop_and_wait(None, None).await;
        let _ = self.broadcaster.stop_and_wait(None, None).await;
    }
}

/// The restart delay, or the error that stops the root (and so the process), logged.
fn give_up_past_budget(
    budget: &mut RestartBudget,
    what: &str,
) -> Result<Duration, ActorProcessingErr> {
    budget.on_failure(what).map_err(|escalation| {
        tracing::error!(reason = %escalation, "stopping pollcast");
        escalation.into()
    })
}

/// State of the [`RootSupervisor`].
pub struct RootState {
    args: RootArgs,
    http: Option<ActorRef<ServerMsg>>,
    pipeline: Option<Pipeline>,
    budget: RestartBudget,
    stopping: bool,
}

/// The root of the supervision tree.
#[derive(Debug, Default)]
pub struct RootSupervisor;

impl RootSupervisor {
    async fn start_pipeline(myself: &ActorCell, args: &RootArgs) -> Result<Pipeline, SpawnErr> {
        let broadcaster_args = BroadcasterArgs {
            hub: args.hub.clone(),
            bus: args.bus.clone(),
        };
        let (broadcaster, _) =
            Actor::spawn_linked(None, Broadcaster, broadcaster_args, myself.clone()).await?;
        let ingest_args = IngestArgs {
            source: args.source.clone(),
            settings: args.ingest,
        };
        let ingest = match Actor::spawn_linked(None, IngestActor, ingest_args, myself.clone()).await
        {
            Ok((ingest, _)) => ingest,
            Err(err) => {
                let _ = broadcaster.stop_and_wait(None, None).await;
                return Err(err);
            }
        };
        let supervisor_args = AggregatorSupervisorArgs {
            store: args.store.clone(),
            broadcaster: broadcaster.clone(),
            ingest: ingest.clone(),
            flush_interval: args.flush_interval,
            flush_max_votes: args.flush_max_votes,
            events: args.events.clone(),
            close_grace: args.close_grace,
            restart: args.restart,
            faults: args.faults.clone(),
        };
        let (aggregators, _) =
            Actor::spawn_linked(None, AggregatorSupervisor, supervisor_args, myself.clone())
                .await?;
        let _ = ingest.cast(IngestMsg::Attach(aggregators.clone()));
        Ok(Pipeline {
            broadcaster,
            ingest,
            aggregators,
        })
    }

    async fn restart_pipeline_later(
        myself: &ActorRef<RootMsg>,
        state: &mut RootState,
        why: &str,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(pipeline) = state.pipeline.take() {
            pipeline.stop().await;
        }
        metrics::counter!("pollcast_actor_restarts_total", "actor" => "pipeline").increment(1);
        let delay = give_up_past_budget(&mut state.budget, "vote pipeline")?;
        tracing::warn!(
            reason = why,
            restart_in_ms = delay.as_millis() as u64,
            "vote pipeline failed; restarting it"
        );
        myself.send_after(delay, || RootMsg::RestartPipeline);
        Ok(())
    }
}

impl Actor for RootSupervisor {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RootArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let pipeline = Self::start_pipeline(&myself.get_cell(), &args).await?;
        let (http, _) =
            Actor::spawn_linked(None, ServerActor, args.http.clone(), myself.get_cell()).await?;
        Ok(RootState {
            budget: RestartBudget::new(args.restart),
            args,
            http: Some(http),
            pipeline: Some(pipeline),
            stopping: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RootMsg::RestartPipeline if !state.stopping => {
                match Self::start_pipeline(&myself.get_cell(), &state.args).await {
                    Ok(pipeline) => {
                        tracing::info!("vote pipeline restarted");
                        state.pipeline = Some(pipeline);
                    }
                    Err(err) => {
                        Self::restart_pipeline_later(&myself, state, &err.to_string()).await?
                    }
                }
            }
            RootMsg::RestartHttp if !state.stopping => {
                let (http, _) = Actor::spawn_linked(
                    None,
                    ServerActor,
                    state.args.http.clone(),
                    myself.get_cell(),
                )
                .await?;
                tracing::info!("HTTP server restarted");
                state.http = Some(http);
            }
            RootMsg::RestartPipeline | RootMsg::RestartHttp => {}
            RootMsg::Shutdown(reply) => {
                state.stopping = true;
                if let Some(http) = state.http.take() {
                    // Stop accepting first, so no vote is accepted after the final flush.
                    let _ = http.stop_and_wait(None, None).await;
                }
                if let Some(pipeline) = state.pipeline.take() {
                    let timeout = DRAIN_TIMEOUT.as_millis() as u64;
                    if let Err(err) = call_t!(pipeline.ingest, IngestMsg::Drain, timeout) {
                        tracing::warn!(error = %err, "final flush incomplete; unflushed votes stay in the log");
                    }
                    pipeline.stop().await;
                }
                let _ = reply.send(());
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
        let (cell, why, escalated) = match &event {
            SupervisionEvent::ActorFailed(cell, err) => (
                cell,
                err.to_string(),
                err.downcast_ref::<Escalation>().is_some(),
            ),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell,
                reason
                    .clone()
                    .unwrap_or_else(|| "stopped unexpectedly".into()),
                false,
            ),
            _ => return Ok(()),
        };
        if state.stopping {
            return Ok(());
        }
        if escalated {
            tracing::error!(reason = %why, "a supervisor gave up; stopping pollcast");
            return Err(why.into());
        }
        if state
            .http
            .as_ref()
            .is_some_and(|h| h.get_id() == cell.get_id())
        {
            state.http = None;
            metrics::counter!("pollcast_actor_restarts_total", "actor" => "http").increment(1);
            let delay = give_up_past_budget(&mut state.budget, "HTTP server")?;
            tracing::warn!(reason = %why, restart_in_ms = delay.as_millis() as u64, "HTTP server failed; restarting it");
            myself.send_after(delay, || RootMsg::RestartHttp);
        } else if state.pipeline.as_ref().is_some_and(|p| p.contains(cell)) {
            Self::restart_pipeline_later(&myself, state, &why).await?;
        }
        Ok(())
    }
}
