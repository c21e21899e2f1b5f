//! The ingest consumer's callbacks: a revocation is handed to the ingest actor and the
//! rebalance held until the actor has flushed and committed those partitions; assignments
//! set what readiness checks report; statistics give each partition's high offset.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::Duration;

use pollcast_actors::{ConsumerStatus, LogError, Offset, Partition, SourceEvent};
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, TopicPartitionList};

/// Where the answer to a read the ingest actor asked the consumer thread for goes (a
/// revocation answers it early, so that the actor flushes before the partitions go).
pub(super) type Reply = tokio::sync::oneshot::Sender<Result<SourceEvent, LogError>>;

/// Rebalance callbacks of the ingest consumer; they run on its poll thread.
pub(super) struct IngestContext {
    pub(super) topic: String,
    /// High offsets from the statistics, shared with the source.
    pub(super) high_offsets: Arc<Mutex<HashMap<Partition, Offset>>>,
    /// What readiness checks report.
    pub(super) status: Arc<Mutex<ConsumerStatus>>,
    /// The reply of the request being served: the revocation callback answers it with
    /// `Revoked` instead of records.
    pub(super) reply: Arc<Mutex<Option<Reply>>>,
    /// Signalled by the ingest actor once it has flushed and committed a revocation.
    pub(super) revoke_done: Mutex<std_mpsc::Receiver<()>>,
    pub(super) revoke_timeout: Duration,
}

impl ClientContext for IngestContext {
    /// librdkafka's periodic statistics: keeps each partition's high offset for the lag metric.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut high = self.high_offsets.lock().expect("not poisoned");
        for (partition, stats) in &topic.partitions {
            if *partition >= 0 && stats.hi_offset >= 0 {
                high.insert(*partition, stats.hi_offset);
            }
        }
    }
}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let partitions: Vec<Partition> = list.elements().iter().map(|e| e.partition()).collect();
        tracing::info!(?partitions, "Kafka revokes partitions");
        *self.status.lock().expect("not poisoned") = ConsumerStatus::Joining;
        let Some(reply) = self.reply.lock().expect("not poisoned").take() else {
            return; // nobody is reading (shutting down): nothing to hand over
        };
        if reply.send(Ok(SourceEvent::Revoked(partitions))).is_err() {
            return;
        }
        let done = self.revoke_done.lock().expect("not poisoned");
        if done.recv_timeout(self.revoke_timeout).is_err() {
            tracing::warn!(
                "revocation not acknowledged in time; the next owner replays from the last commit"
            );
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let partitions: Vec<Partition> =
                list.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?partitions, "Kafka assigned partitions");
            *self.status.lock().expect("not poisoned") = ConsumerStatus::Assigned(partitions);
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "Kafka offset commit failed");
        }
    }
}
