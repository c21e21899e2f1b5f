//! `ServerActor`: owns the API server's lifecycle (not its requests). The server itself
//! (HTTP, WebSocket, Socket.IO) is the binary's `http::HttpServer`; the tree knows it only
//! as a [`Server`].
//!
//! Handlers call the duplicate guard and the vote log directly through cheap clonable handles;
//! funnelling every request through one mailbox would cap throughput at one core. The actor
//! starts the server, fails (and so is restarted) if the server dies, and shuts it down
//! gracefully when stopped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::ports::BoxError;

/// A future that serves HTTP until its token is cancelled.
pub type ServeFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// The HTTP server, as the actor tree sees it: something that can be started (again).
pub trait Server: Send + Sync + 'static {
    /// Serves until `stop` is cancelled, then finishes in-flight requests and returns.
    fn serve(&self, stop: CancellationToken) -> ServeFuture;
}

/// How long a graceful stop may take before the server task is abandoned.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Messages of the [`ServerActor`].
#[derive(Debug)]
pub enum ServerMsg {
    /// The server task ended on its own.
    ServerExited(Result<(), String>),
}

/// State of the [`ServerActor`].
pub struct ServerState {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// Runs the HTTP server.
#[derive(Debug, Default)]
pub struct ServerActor;

impl Actor for ServerActor {
    type Msg = ServerMsg;
    type State = ServerState;
    type Arguments = Arc<dyn Server>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        server: Arc<dyn Server>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let stop = CancellationToken::new();
        let serving = server.serve(stop.clone());
        let task = tokio::spawn(async move {
            let result = serving.await.map_err(|e| e.to_string());
            let _ = myself.cast(ServerMsg::ServerExited(result));
        });
        Ok(ServerState {
            stop,
            task: Some(task),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.stop.cancel();
        if let Some(task) = state.task.take()
            && tokio::time::timeout(STOP_GRACE, task).await.is_err()
        {
            tracing::warn!("HTTP server did not stop within {STOP_GRACE:?}");
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ServerMsg::ServerExited(result) => {
                state.task = None;
                if state.stop.is_cancelled() {
                    return Ok(());
                }
                let why = result.err().unwrap_or_else(|| "exited".into());
                Err(format!("HTTP server stopped unexpectedly: {why}").into())
            }
        }
    }
}
