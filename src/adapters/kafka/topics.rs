//! The topics pollcast uses, created at startup if they are missing.

use std::time::Duration;

use pollcast_actors::LogError;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use super::kafka_err;
use crate::config::KafkaSection;

/// Creates the topics if they are missing.
pub async fn ensure_topics(settings: &KafkaSection) -> Result<(), LogError> {
    let admin: AdminClient<DefaultClientContext> = settings
        .admin_config()
        .create()
        .map_err(kafka_err("create a Kafka admin client"))?;
    // The counts topic has partitions of its own: every process reads all of it (see
    // `log.kafka.poll_updates_partitions`).
    let topics: Vec<_> = [
        (&settings.raw_votes_topic, settings.partitions),
        (
            &settings.poll_updates_topic,
            settings.poll_updates_partitions,
        ),
    ]
    .into_iter()
    .chain(
        settings
            .seed_poll_updates_topic
            .iter()
            .map(|seed| (seed, settings.partitions)),
    )
    .map(|(name, partitions)| {
        NewTopic::new(
            name,
            partitions,
            TopicReplication::Fixed(settings.replication_factor),
        )
    })
    .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&topics, &options)
        .await
        .map_err(kafka_err("create Kafka topics"))?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(topic, "created Kafka topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(LogError::new(
                    "create Kafka topics",
                    format!("{topic}: {code}"),
                ));
            }
        }
    }
    Ok(())
}
