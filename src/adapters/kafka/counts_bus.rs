//! The counts bus, `poll-updates`: every flush's counts go there, and every process reads
//! all of it (a consumer group of its own, from the latest offset) for its WebSockets. Its
//! records are encoded here, at the edge that sends them; with `seed_poll_updates_topic`
//! set, the seed app's records too.

use async_trait::async_trait;
use pollcast_actors::{CountsBus, CountsFeed, CountsUpdate, LogError, OptionCount};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

use super::kafka_err;
use super::produce_stats::{ProduceStats, STATISTICS_INTERVAL_MS};
use crate::config::KafkaSection;

/// `poll-updates` record: the WebSocket counts message plus every option's count.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CountsRecord {
    r#type: String,
    poll_id: i64,
    seq: i64,
    counts: Vec<OptionCount>,
    all_counts: Vec<OptionCount>,
    flushed_at: i64,
    /// Set on a poll's final update (`type` is then "closed").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    closed_at: Option<i64>,
    #[serde(default)]
    hide_results: bool,
}

/// The seed app's `poll-updates` record: one changed option's new count, ids as strings.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SeedStatsRecord {
    option_id: String,
    poll_id: String,
    new_count: i64,
}

/// Count updates shared between processes through `poll-updates`.
pub struct KafkaCountsBus {
    producer: FutureProducer<ProduceStats>,
    settings: KafkaSection,
}

impl KafkaCountsBus {
    /// A producer of updates; subscribers are created by [`CountsBus::subscribe`].
    pub fn new(settings: &KafkaSection) -> Result<Self, LogError> {
        let producer = settings
            .producer_config(&[
                ("linger.ms", "0"),
                ("message.timeout.ms", "5000"),
                ("statistics.interval.ms", STATISTICS_INTERVAL_MS),
            ])
            .create_with_context(ProduceStats::new("counts"))
            .map_err(kafka_err("create the counts producer"))?;
        Ok(Self {
            producer,
            settings: settings.clone(),
        })
    }
}

impl KafkaCountsBus {
    /// Writes the seed's records of a flush made here (only here: each flush once, by the
    /// process that made it): one per option it changed, every option at the close, and
    /// nothing while the poll hides its results.
    fn publish_seed_records(&self, topic: &str, update: &CountsUpdate, key: &str) {
        if update.is_hidden() {
            return;
        }
        for count in update.counts(true) {
            let record = SeedStatsRecord {
                option_id: count.option_id.to_string(),
                poll_id: key.to_owned(),
                new_count: count.new_count,
            };
            let payload = serde_json::to_vec(&record).expect("seed record serializes");
            let record = FutureRecord::to(topic).key(key).payload(&payload);
            if let Err((e, _)) = self.producer.send_result(record) {
                tracing::warn!(poll_id = update.poll_id, error = %e, "could not write a seed poll-updates record");
            }
        }
    }
}

#[async_trait]
impl CountsBus for KafkaCountsBus {
    fn publish(&self, update: &CountsUpdate) {
        let record = CountsRecord {
            r#type: if update.is_final() {
                "closed"
            } else {
                "counts"
            }
            .into(),
            poll_id: update.poll_id,
            seq: update.seq,
            counts: update.changed.clone(),
            all_counts: update.all.clone(),
            flushed_at: update.flushed_at,
            closed_at: update.closed_at,
            hide_results: update.hide_results,
        };
        let payload = serde_json::to_vec(&record).expect("counts record serializes");
        let key = update.poll_id.to_string();
        let record = FutureRecord::to(&self.settings.poll_updates_topic)
            .key(&key)
            .payload(&payload);
        if let Err((e, _)) = self.producer.send_result(record) {
            tracing::warn!(poll_id = update.poll_id, error = %e, "could not publish counts to other processes");
        }
        if let Some(topic) = &self.settings.seed_poll_updates_topic {
            self.publish_seed_records(topic, update, &key);
        }
    }

    async fn subscribe(&self) -> Result<Box<dyn CountsFeed>, LogError> {
        // Why a group of its own: every process must see every update, and only new ones.
        let group = format!(
            "{}-updates-{}-{}",
            self.settings.group_id,
            std::process::id(),
            pollcast_actors::domain::now_millis()
        );
        let consumer: StreamConsumer = self
            .settings
            .consumer_config(&group, "latest", &[])
            .create()
            .map_err(kafka_err("create the counts consumer"))?;
        consumer
            .subscribe(&[&self.settings.poll_updates_topic])
            .map_err(kafka_err("subscribe to the counts topic"))?;
        Ok(Box::new(KafkaCountsFeed { consumer }))
    }
}

struct KafkaCountsFeed {
    consumer: StreamConsumer,
}

#[async_trait]
impl CountsFeed for KafkaCountsFeed {
    async fn next(&mut self) -> Result<CountsUpdate, LogError> {
        loop {
            let message = self
                .consumer
                .recv()
                .await
                .map_err(kafka_err("read count updates"))?;
            let Some(payload) = message.payload() else {
                continue;
            };
            match serde_json::from_slice::<CountsRecord>(payload) {
                Ok(r) => {
                    return Ok(CountsUpdate {
                        poll_id: r.poll_id,
                        seq: r.seq,
                        changed: r.counts,
                        all: r.all_counts,
                        flushed_at: r.flushed_at,
                        closed_at: r.closed_at,
                        hide_results: r.hide_results,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a poll-updates record that is not a counts message")
                }
            }
        }
    }
}
