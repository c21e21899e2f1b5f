//! The process's background tasks: every long-lived task outside the supervision tree runs
//! here, is started through one [`Background`] that start-up creates, and is stopped by one
//! mechanism: its stage's token is cancelled, then start-up waits for the stage's tasks.
//!
//! Why stages: what a task may still need decides when it can stop. The closing scheduler
//! must stop before the tree's final flush (a close marker must not land behind the final
//! commit); webhook deliveries after it (the final flush may publish a closed poll's final
//! counts); the store's and the log's writers after those, once what is queued is written;
//! the sweepers and the poll cache's refresher whenever, so last.
//!
//! Tasks of the tree itself (the HTTP server's sessions, the ingest's Kafka consumer thread)
//! belong to the actors that own them, and stop with the tree.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// When a background task stops, in the order [`Background::stop_all`] stops them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Feeds the vote log: stops before the tree's final flush (the closing scheduler).
    Intake,
    /// Fed by the tree: stops after its final flush (webhook deliveries).
    Delivery,
    /// Writes what others queued: stops after everything that queues, draining first
    /// (the SQLite writer, the embedded log's writer thread).
    Storage,
    /// Keeps caches lean or fresh; nothing waits on it (sweepers, the catalog refresher).
    Upkeep,
}

impl Stage {
    const ALL: [Stage; 4] = [
        Stage::Intake,
        Stage::Delivery,
        Stage::Storage,
        Stage::Upkeep,
    ];
}

/// The tasks of one stage and what stops them.
#[derive(Default)]
struct Crew {
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// A handle on the process's background tasks; clones share them.
///
/// A task is handed the stage's stop token and must return soon after it is cancelled; one
/// whose work would be lost (a writer) drains what is queued first. A task started after its
/// stage stopped sees the token already cancelled.
#[derive(Clone, Default)]
pub struct Background {
    crews: Arc<[Crew; 4]>,
}

impl Background {
    /// No tasks yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn crew(&self, stage: Stage) -> &Crew {
        &self.crews[stage as usize]
    }

    /// Runs `task(stop)` on the runtime.
    pub fn spawn<F, Fut>(&self, stage: Stage, name: &'static str, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let crew = self.crew(stage);
        let work = task(crew.stop.clone());
        crew.tasks.spawn(async move {
            work.await;
            tracing::debug!(task = name, "background task stopped");
        });
    }

    /// Runs `work` until it ends by itself or the stage stops, whichever is first: for a
    /// task with nothing to finish when it is stopped.
    pub fn spawn_until_stopped<Fut>(&self, stage: Stage, name: &'static str, work: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.spawn(stage, name, |stop| async move {
            tokio::select! {
                () = work => {}
                () = stop.cancelled() => {}
            }
        });
    }

    /// Calls `tick` every `period` until the stage stops (the first call after one period).
    pub fn every(
        &self,
        stage: Stage,
        name: &'static str,
        period: Duration,
        mut tick: impl FnMut() + Send + 'static,
    ) {
        self.spawn_until_stopped(stage, name, async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await;
            loop {
                interval.tick().await;
                tick();
            }
        });
    }

    /// Runs `work(stop)` on a thread of its own, for blocking work (file I/O and fsync).
    pub fn spawn_thread(
        &self,
        stage: Stage,
        name: &'static str,
        work: impl FnOnce(CancellationToken) + Send + 'static,
    ) -> std::io::Result<()> {
        let crew = self.crew(stage);
        let (stop, running) = (crew.stop.clone(), crew.tasks.token());
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                work(stop);
                tracing::debug!(task = name, "background thread stopped");
                // Why hold it until here: the stage's `stop` waits until every token is gone.
                drop(running);
            })
            .map(drop)
    }

    /// Stops one stage: cancels its token, then waits for its tasks to return.
    pub async fn stop(&self, stage: Stage) {
        let crew = self.crew(stage);
        crew.stop.cancel();
        crew.tasks.close();
        crew.tasks.wait().await;
    }

    /// Stops every stage still running, in order.
    pub async fn stop_all(&self) {
        for stage in Stage::ALL {
            self.stop(stage).await;
        }
    }
}

/// A writer's next batch: up to `max` queued items into `batch`, waiting for the first.
/// Once `stop` is cancelled the queue is closed, and what was queued before is still handed
/// over (its senders were promised an answer); 0 means the writer is done: stopped and
/// drained, or every sender gone.
pub async fn next_batch<T>(
    queue: &mut mpsc::Receiver<T>,
    batch: &mut Vec<T>,
    max: usize,
    stop: &CancellationToken,
) -> usize {
    loop {
        // Why close before taking: a queue that never runs dry must not keep a stopped
        // writer going.
        if stop.is_cancelled() {
            queue.close();
        }
        tokio::select! {
            biased;
            taken = queue.recv_many(batch, max) => return taken,
            () = stop.cancelled(), if !queue.is_closed() => queue.close(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A task of `stage` that records, once stopped, that it stopped.
    fn record_stop(background: &Background, stage: Stage, log: &Arc<Mutex<Vec<Stage>>>) {
        let log = log.clone();
        background.spawn(stage, "recorder", move |stop| async move {
            stop.cancelled().await;
            // Why yield: a later stage must still wait for this one to finish, not just to
            // be cancelled.
            tokio::task::yield_now().await;
            log.lock().unwrap().push(stage);
        });
    }

    #[tokio::test]
    async fn stages_stop_in_order_each_waiting_for_its_tasks() {
        let background = Background::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        for stage in [
            Stage::Upkeep,
            Stage::Storage,
            Stage::Intake,
            Stage::Delivery,
        ] {
            record_stop(&background, stage, &log);
            record_stop(&background, stage, &log);
        }
        background.stop_all().await;
        let stopped = log.lock().unwrap().clone();
        let mut sorted = stopped.clone();
        sorted.sort();
        assert_eq!(stopped, sorted);
        assert_eq!(stopped.len(), 8);
    }

    #[tokio::test]
    async fn stopping_one_stage_leaves_the_others_running() {
        let background = Background::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        record_stop(&background, Stage::Intake, &log);
        record_stop(&background, Stage::Storage, &log);
        background.stop(Stage::Intake).await;
        assert_eq!(*log.lock().unwrap(), vec![Stage::Intake]);
        background.stop_all().await;
        assert_eq!(*log.lock().unwrap(), vec![Stage::Intake, Stage::Storage]);
    }

    #[tokio::test]
    async fn a_thread_is_waited_for_until_it_returns() {
        let background = Background::new();
        let finished = Arc::new(AtomicUsize::new(0));
        let seen = finished.clone();
        background
            .spawn_thread(Stage::Storage, "test-writer", move |stop| {
                while !stop.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(Duration::from_millis(50));
                seen.store(1, Ordering::SeqCst);
            })
            .unwrap();
        background.stop_all().await;
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_periodic_task_runs_each_period_until_stopped() {
        let background = Background::new();
        let ticks = Arc::new(AtomicUsize::new(0));
        let counted = ticks.clone();
        background.every(
            Stage::Upkeep,
            "ticker",
            Duration::from_secs(60),
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
            },
        );
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(ticks.load(Ordering::SeqCst), 0);
        tokio::time::sleep(Duration::from_secs(150)).await;
        assert_eq!(ticks.load(Ordering::SeqCst), 3);
        background.stop_all().await;
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(ticks.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_stopped_writer_takes_what_was_queued_then_is_done() {
        let (tx, mut queue) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let mut batch = Vec::new();
        tx.send(1).await.unwrap();
        assert_eq!(next_batch(&mut queue, &mut batch, 8, &stop).await, 1);
        tx.send(2).await.unwrap();
        tx.send(3).await.unwrap();
        stop.cancel();
        batch.clear();
        assert_eq!(next_batch(&mut queue, &mut batch, 8, &stop).await, 2);
        assert_eq!(batch, [2, 3]);
        assert!(tx.send(4).await.is_err(), "closed once stopped");
        assert_eq!(next_batch(&mut queue, &mut batch, 8, &stop).await, 0);
    }

    #[tokio::test]
    async fn a_task_started_after_its_stage_stopped_is_told_to_stop_at_once() {
        let background = Background::new();
        background.stop(Stage::Delivery).await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        background.spawn(Stage::Delivery, "late", move |stop| async move {
            let _ = tx.send(stop.is_cancelled());
        });
        assert!(rx.await.unwrap());
    }
}
