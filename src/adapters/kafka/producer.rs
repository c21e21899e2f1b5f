//! The producing side of `raw-votes`, the HTTP handlers' [`VoteAppender`]: idempotent,
//! `acks=all`, records keyed by pollId so that a poll's votes stay in one partition, in
//! order. A 202 is sent only after the delivery report.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use pollcast_actors::{LogEntry, LogError, VoteAppender};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use super::kafka_err;
use super::produce_stats::{ProduceStats, STATISTICS_INTERVAL_MS};

/// The `producer` label of this producer's metrics.
const PRODUCER: &str = "votes";
use crate::config::KafkaSection;

/// The producing side of `raw-votes`.
#[derive(Clone)]
pub struct KafkaVoteLog {
    /// Replaced after a fatal error: an idempotent producer that hit one (e.g. fenced after
    /// an outage) refuses every later message, and only a new instance recovers.
    producer: Arc<RwLock<FutureProducer<ProduceStats>>>,
    config: ClientConfig,
    topic: String,
    timeout: Duration,
}

impl KafkaVoteLog {
    /// An idempotent producer of votes.
    pub fn new(settings: &KafkaSection) -> Result<Self, LogError> {
        let timeout_ms = settings.produce_timeout.as_millis().to_string();
        let config = settings.producer_config(&[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "1"),
            ("message.timeout.ms", &timeout_ms),
            ("statistics.interval.ms", STATISTICS_INTERVAL_MS),
        ]);
        let producer = config
            .create_with_context(ProduceStats::new(PRODUCER))
            .map_err(kafka_err("create the Kafka producer"))?;
        Ok(Self {
            producer: Arc::new(RwLock::new(producer)),
            config,
            topic: settings.raw_votes_topic.clone(),
            timeout: settings.produce_timeout,
        })
    }

    fn producer(&self) -> FutureProducer<ProduceStats> {
        self.producer.read().expect("not poisoned").clone()
    }

    /// Replaces `failed` if `error` shows it can never produce again (and nobody replaced it
    /// yet): librdkafka's fatal state, or a broker that no longer accepts its producer id.
    fn recover_from_fatal(&self, failed: &FutureProducer<ProduceStats>, error: &KafkaError) {
        let identity_lost = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::Fatal
            )
        );
        let Some((code, reason)) = failed.client().fatal_error().or_else(|| {
            identity_lost.then(|| (error.rdkafka_error_code().unwrap(), error.to_string()))
        }) else {
            return;
        };
        let mut current = self.producer.write().expect("not poisoned");
        if current.client().native_ptr() != failed.client().native_ptr() {
            return; // already replaced
        }
        match self.config.create_with_context(ProduceStats::new(PRODUCER)) {
            Ok(fresh) => {
                tracing::warn!(%code, %reason, "Kafka producer hit a fatal error; replaced it");
                *current = fresh;
            }
            Err(e) => tracing::error!(error = %e, "could not replace the failed Kafka producer"),
        }
    }
}

#[async_trait]
impl VoteAppender for KafkaVoteLog {
    async fn append(&self, entry: LogEntry) -> Result<(), LogError> {
        let key = entry.poll_id().to_string();
        let payload = entry.to_json();
        let record = FutureRecord::to(&self.topic).key(&key).payload(&payload);
        let producer = self.producer();
        // Why our own bound: with idempotence, librdkafka holds messages that were in flight
        // when a connection dropped well past message.timeout.ms. Should such a vote still
        // land after the 503, the ledger counts it once, and the voter's retry is a replay.
        let sent = tokio::time::timeout(
            self.timeout,
            producer.send(record, Timeout::After(self.timeout)),
        )
        .await;
        match sent {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => {
                self.recover_from_fatal(&producer, &e);
                // A timed-out record may have reached the broker (or may still: librdkafka
                // holds in-flight ones): its outcome is unknown, unlike a refusal.
                let timed_out = matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::MessageTimedOut
                            | RDKafkaErrorCode::RequestTimedOut
                            | RDKafkaErrorCode::OperationTimedOut
                    )
                );
                Err(if timed_out {
                    LogError::outcome_unknown("append to Kafka", e)
                } else {
                    LogError::new("append to Kafka", e)
                })
            }
            Err(_) => Err(LogError::outcome_unknown(
                "append to Kafka",
                format!("no delivery report within {:?}", self.timeout),
            )),
        }
    }

    async fn ping(&self) -> Result<(), LogError> {
        let producer = self.producer();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(2))
                .map(|_| ())
        })
        .await
        .map_err(|e| LogError::new("ping Kafka", e))?
        .map_err(kafka_err("ping Kafka"))
    }
}
