//! The consuming side of `raw-votes`, the ingest actor's [`VoteSource`]: one group member
//! per process, its offsets committed only by the ingest actor, after the flush that applied
//! them. A graceful stop leaves the group explicitly ([`VoteSource::close`]) after its final
//! commit, so its partitions move at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::Duration;

use async_trait::async_trait;
use pollcast_actors::{
    ConsumerStatus, LogError, Offset, Partition, SourceEvent, VoteSource, VoteSourceFactory,
};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset as KafkaOffset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use super::consumer_thread::{CLOSE_TIMEOUT, Request, serve_polls};
use super::kafka_err;
use super::rebalance::IngestContext;
use crate::config::KafkaSection;

/// Opens group consumers of `raw-votes`.
pub struct KafkaSourceFactory {
    settings: KafkaSection,
    status: Arc<Mutex<ConsumerStatus>>,
}

impl KafkaSourceFactory {
    /// Consumers of the group in `settings`.
    pub fn new(settings: KafkaSection) -> Self {
        Self {
            settings,
            status: Arc::new(Mutex::new(ConsumerStatus::Joining)),
        }
    }
}

#[async_trait]
impl VoteSourceFactory for KafkaSourceFactory {
    async fn open(&self) -> Result<Box<dyn VoteSource>, LogError> {
        let reply = Arc::new(Mutex::new(None));
        let (revoke_done, revoke_rx) = std_mpsc::channel();
        *self.status.lock().expect("not poisoned") = ConsumerStatus::Joining;
        let high_offsets = Arc::new(Mutex::new(HashMap::new()));
        let context = IngestContext {
            topic: self.settings.raw_votes_topic.clone(),
            high_offsets: high_offsets.clone(),
            status: self.status.clone(),
            reply: reply.clone(),
            revoke_done: Mutex::new(revoke_rx),
            revoke_timeout: self.settings.revoke_timeout,
        };
        // Eager rebalancing ("range"): a revocation takes every partition, so records fetched
        // before it can be dropped (the next owner starts from the committed offsets).
        let consumer: BaseConsumer<IngestContext> = self
            .settings
            .consumer_config(
                &self.settings.group_id,
                "earliest",
                &[
                    ("enable.auto.offset.store", "false"),
                    ("partition.assignment.strategy", "range"),
                    ("statistics.interval.ms", "5000"),
                ],
            )
            .create_with_context(context)
            .map_err(kafka_err("create the Kafka consumer"))?;
        consumer
            .subscribe(&[&self.settings.raw_votes_topic])
            .map_err(kafka_err("subscribe to the vote topic"))?;
        let consumer = Arc::new(consumer);
        let (requests, rx) = mpsc::channel(1);
        let thread_consumer = consumer.clone();
        std::thread::Builder::new()
            .name("vote-consumer".into())
            .spawn(move || serve_polls(thread_consumer, reply, rx))
            .map_err(|e| LogError::new("start the consumer thread", e))?;
        Ok(Box::new(KafkaVoteSource {
            consumer: Some(consumer),
            topic: self.settings.raw_votes_topic.clone(),
            requests,
            revoke_done,
            revoke_pending: false,
            high_offsets,
        }))
    }

    fn status(&self) -> ConsumerStatus {
        self.status.lock().expect("not poisoned").clone()
    }
}

/// A member of the group, read through its consumer thread.
struct KafkaVoteSource {
    high_offsets: Arc<Mutex<HashMap<Partition, Offset>>>,
    /// `None` once closed.
    consumer: Option<Arc<BaseConsumer<IngestContext>>>,
    topic: String,
    requests: mpsc::Sender<Request>,
    revoke_done: std_mpsc::Sender<()>,
    revoke_pending: bool,
}

impl KafkaVoteSource {
    fn consumer(&self, what: &'static str) -> Result<Arc<BaseConsumer<IngestContext>>, LogError> {
        self.consumer
            .clone()
            .ok_or_else(|| LogError::new(what, "the consumer is closed"))
    }

    fn finish_revocation(&mut self) {
        if std::mem::take(&mut self.revoke_pending) {
            let _ = self.revoke_done.send(());
        }
    }
}

#[async_trait]
impl VoteSource for KafkaVoteSource {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<SourceEvent, LogError> {
        // Reading again means the revocation, if any, has been flushed and committed.
        self.finish_revocation();
        let (reply, answer) = oneshot::channel();
        let stopped = || LogError::new("read from Kafka", "the consumer thread has stopped");
        self.requests
            .send(Request::Poll { max, wait, reply })
            .await
            .map_err(|_| stopped())?;
        let event = answer.await.map_err(|_| stopped())??;
        if matches!(event, SourceEvent::Revoked(_)) {
            self.revoke_pending = true;
        }
        Ok(event)
    }

    async fn commit(&mut self, positions: &[(Partition, Offset)]) -> Result<(), LogError> {
        let mut list = TopicPartitionList::new();
        for (partition, offset) in positions {
            list.add_partition_offset(&self.topic, *partition, KafkaOffset::Offset(*offset))
                .map_err(kafka_err("commit offsets"))?;
        }
        let consumer = self.consumer("commit offsets")?;
        let committed =
            tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync))
                .await
                .map_err(|e| LogError::new("commit offsets", e))?;
        self.finish_revocation();
        committed.map_err(kafka_err("commit offsets"))
    }

    fn end_offsets(&self) -> Vec<(Partition, Offset)> {
        let Some(Ok(assignment)) = self.consumer.as_ref().map(|c| c.assignment()) else {
            return Vec::new();
        };
        assignment
            .elements()
            .iter()
            .filter_map(|e| {
                let high = *self
                    .high_offsets
                    .lock()
                    .expect("not poisoned")
                    .get(&e.partition())?;
                Some((e.partition(), high))
            })
            .collect()
    }

    async fn seek(&mut self, partition: Partition, offset: Offset) -> Result<(), LogError> {
        let consumer = self.consumer("seek")?;
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            consumer.seek(
                &topic,
                partition,
                KafkaOffset::Offset(offset),
                Duration::from_secs(10),
            )
        })
        .await
        .map_err(|e| LogError::new("seek", e))?
        .map_err(kafka_err("seek"))
    }

    async fn close(&mut self) {
        // Why drop ours first: the consumer thread's must be the last handle (see leave_group).
        if self.consumer.take().is_none() {
            return;
        }
        let (done, left) = oneshot::channel();
        if self.requests.send(Request::Close(done)).await.is_ok()
            && tokio::time::timeout(CLOSE_TIMEOUT, left).await.is_err()
        {
            tracing::warn!(
                "leaving the Kafka consumer group takes too long; the others take over when its \
                 session times out"
            );
        }
    }
}
