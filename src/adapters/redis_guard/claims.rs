//! Claims that ride together. Every claim waiting when the last pipeline was answered goes to
//! Redis in the next one: one write and one read on both sides for all of them, where each
//! claim alone cost Redis a read, a reply and its event-loop turn (docs/BENCHMARKS.md, "What
//! one vote costs"). Each claim is still its own `SET NX GET`, atomic in Redis, so a
//! duplicate is refused exactly as before. Why this adds no wait: a claim that finds nothing
//! in flight is sent at once, alone; only those that arrive while a pipeline is out wait, and
//! they would have waited behind it on the one connection anyway.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pollcast_actors::GuardError;
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::background::{Background, Stage, next_batch};

/// Claims in one pipeline, at most: bounds a pipeline's size on both sides.
const PIPELINE_MAX: usize = 512;

/// What Redis answered a claim: nil when it took the key, else the claim that holds it.
type Answer = Result<Option<String>, GuardError>;

/// One claim waiting for the next pipeline.
struct Pending {
    key: String,
    value: String,
    answer: oneshot::Sender<Answer>,
}

/// The sending side: queues a claim for the pipeline task.
#[derive(Clone)]
pub(super) struct Claims {
    queue: mpsc::Sender<Pending>,
    timeout: Duration,
    /// Pipelines sent (for the tests that check claims do ride together).
    #[cfg(test)]
    pipelines: Arc<AtomicU64>,
}

/// The pipeline task's view of the connection.
struct Sender {
    conn: ConnectionManager,
    ttl_secs: u64,
    timeout: Duration,
    /// Pipelines sent, shared with [`Claims`] for the tests.
    pipelines: Arc<AtomicU64>,
}

impl Claims {
    /// Starts the pipeline task in `background`'s `Storage` stage (it stops after the HTTP
    /// side, answering every claim already queued).
    pub(super) fn start(
        conn: ConnectionManager,
        ttl_secs: u64,
        timeout: Duration,
        background: &Background,
    ) -> Self {
        let (queue, pending) = mpsc::channel(PIPELINE_MAX * 4);
        let pipelines = Arc::new(AtomicU64::new(0));
        let sender = Sender {
            conn,
            ttl_secs,
            timeout,
            pipelines: pipelines.clone(),
        };
        background.spawn(Stage::Storage, "redis claims", |stop| {
            sender.run(pending, stop)
        });
        Self {
            queue,
            timeout,
            #[cfg(test)]
            pipelines,
        }
    }

    /// `SET key value NX GET EX ttl`, in the next pipeline. Waits at most the timeout in
    /// all, queue included: a claim behind a pipeline that hangs fails as promptly as that
    /// pipeline does. (A claim that failed this way may still be set later, as a timed-out
    /// command could be: the voter's retry with the same vote id finds its own claim.)
    pub(super) async fn set(&self, key: String, value: String) -> Answer {
        let stopped = || GuardError::new("claim", "the guard has stopped (shutting down)");
        let claimed = async {
            let (answer, answered) = oneshot::channel();
            self.queue
                .send(Pending { key, value, answer })
                .await
                .map_err(|_| stopped())?;
            answered.await.map_err(|_| stopped())?
        };
        match tokio::time::timeout(self.timeout, claimed).await {
            Ok(answer) => answer,
            Err(_) => Err(GuardError::new(
                "claim",
                format!("no answer within {:?}", self.timeout),
            )),
        }
    }

    #[cfg(test)]
    pub(super) fn pipelines(&self) -> u64 {
        self.pipelines.load(Ordering::Relaxed)
    }
}

impl Sender {
    async fn run(mut self, mut pending: mpsc::Receiver<Pending>, stop: CancellationToken) {
        let mut batch = Vec::with_capacity(PIPELINE_MAX);
        while next_batch(&mut pending, &mut batch, PIPELINE_MAX, &stop).await > 0 {
            let answers = self.send(&batch).await;
            for (claim, answer) in batch.drain(..).zip(answers) {
                let _ = claim.answer.send(answer);
            }
        }
    }

    /// One pipeline of `batch`'s claims; an answer per claim, in order.
    async fn send(&mut self, batch: &[Pending]) -> Vec<Answer> {
        let mut pipe = redis::pipe();
        // Why: one claim's error (a key holding another type) must not fail the others.
        pipe.ignore_errors();
        for claim in batch {
            pipe.cmd("SET")
                .arg(&claim.key)
                .arg(&claim.value)
                .arg("NX")
                .arg("GET")
                .arg("EX")
                .arg(self.ttl_secs);
        }
        self.pipelines.fetch_add(1, Ordering::Relaxed);
        let sent = pipe.query_async::<Vec<redis::RedisResult<Option<String>>>>(&mut self.conn);
        match tokio::time::timeout(self.timeout, sent).await {
            Ok(Ok(answers)) if answers.len() == batch.len() => answers
                .into_iter()
                .map(|a| a.map_err(|e| GuardError::new("claim", e)))
                .collect(),
            Ok(Ok(answers)) => every(batch, || {
                GuardError::new(
                    "claim",
                    format!("{} answers to {} claims", answers.len(), batch.len()),
                )
            }),
            Ok(Err(e)) => every(batch, || GuardError::new("claim", e.to_string())),
            Err(_) => every(batch, || {
                GuardError::new("claim", format!("no answer within {:?}", self.timeout))
            }),
        }
    }
}

/// The same failure for every claim of a batch.
fn every(batch: &[Pending], error: impl Fn() -> GuardError) -> Vec<Answer> {
    batch.iter().map(|_| Err(error())).collect()
}
