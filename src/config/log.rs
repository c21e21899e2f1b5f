//! `[log]`: the vote log, embedded (`[log]`'s own keys) or Kafka (`[log.kafka]`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// Which vote log to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogKind {
    /// A durable, group-committed log in local files.
    Embedded,
    /// Kafka (`[log.kafka]`).
    Kafka,
}

/// `[log]` as written.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// Which log.
    pub kind: LogKind,
    /// Directory of the embedded log.
    pub path: PathBuf,
    /// Size at which the embedded log starts a new segment file.
    pub segment_bytes: u64,
    /// Kafka, when `kind = "kafka"`.
    pub kafka: RawKafka,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            kind: LogKind::Embedded,
            path: "data/log".into(),
            segment_bytes: 64 * 1024 * 1024,
            kafka: RawKafka::default(),
        }
    }
}

/// `[log.kafka]` as written.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawKafka {
    /// Bootstrap brokers, `host:port,host:port`.
    pub brokers: String,
    /// Topic of votes (the seed app's `raw-votes`).
    pub raw_votes_topic: String,
    /// Topic of count updates shared between processes.
    pub poll_updates_topic: String,
    /// Also write the seed app's `poll-updates` records (`{optionId, pollId, newCount}` per
    /// changed option, string ids, keyed by pollId) to this topic, for the seed's own
    /// consumers. Unset: not written.
    pub seed_poll_updates_topic: Option<String>,
    /// Consumer group of every pollcast process.
    pub group_id: String,
    /// Partitions of the vote topic when pollcast creates it (and of the seed's topic).
    pub partitions: i32,
    /// Partitions of the counts topic when pollcast creates it. Why one by default: every
    /// process reads all of it, so its partitions spread no work, yet each is read by each
    /// process in every fetch, and a broker's cost of a fetch grows with them (in an idle
    /// cluster of six, half of the test broker's CPU went to the five partitions nobody
    /// needed: docs/BENCHMARKS.md, "Where the machine goes, and what pollcast costs the
    /// broker"). It carries one small record per flush of each active poll.
    pub poll_updates_partitions: i32,
    /// Replication factor of the topics pollcast creates.
    pub replication_factor: i32,
    /// Create missing topics at start.
    pub create_topics: bool,
    /// Longest wait for a vote's delivery report before answering 503.
    pub produce_timeout_ms: u64,
    /// Longest a partition revocation waits for the final flush and commit.
    pub revoke_timeout_ms: u64,
    /// Extra librdkafka properties for every client, e.g. `socket_timeout_ms = "10000"`
    /// (underscores stand for dots, so that environment variables can set them).
    pub properties: HashMap<String, String>,
    /// Extra librdkafka properties for consumers only, e.g. `session_timeout_ms = "6000"`.
    pub consumer_properties: HashMap<String, String>,
    /// Extra librdkafka properties for producers only.
    pub producer_properties: HashMap<String, String>,
}

impl Default for RawKafka {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            raw_votes_topic: "raw-votes".into(),
            poll_updates_topic: "poll-updates".into(),
            seed_poll_updates_topic: None,
            group_id: "pollcast".into(),
            partitions: 6,
            poll_updates_partitions: 1,
            replication_factor: 1,
            create_topics: true,
            produce_timeout_ms: 5000,
            revoke_timeout_ms: 30_000,
            properties: HashMap::new(),
            consumer_properties: HashMap::new(),
            producer_properties: HashMap::new(),
        }
    }
}

/// `[log]`, checked: the log chosen by `log.kind`, with its settings.
#[derive(Debug, Clone)]
// Why not box the large variant: settings are made once per process.
#[allow(clippy::large_enum_variant)]
pub enum LogSettings {
    /// The embedded log.
    Embedded(FileLogSettings),
    /// Kafka.
    Kafka(KafkaSection),
}

/// The embedded log's settings.
#[derive(Debug, Clone)]
pub struct FileLogSettings {
    /// Its directory (not empty).
    pub path: PathBuf,
    /// The size at which it starts a new segment file (at least 4096).
    pub segment_bytes: u64,
}

/// `[log.kafka]`, checked, when Kafka is the log (see [`RawKafka`] for what each key
/// means).
#[derive(Debug, Clone)]
pub struct KafkaSection {
    /// Bootstrap brokers (at least one).
    pub brokers: String,
    /// Topic of votes (named).
    pub raw_votes_topic: String,
    /// Topic of count updates (named).
    pub poll_updates_topic: String,
    /// The seed's `poll-updates` topic, if written: named, and neither of the two above.
    pub seed_poll_updates_topic: Option<String>,
    /// Consumer group (named).
    pub group_id: String,
    /// Partitions of the created vote topic (positive).
    pub partitions: i32,
    /// Partitions of the created counts topic (positive).
    pub poll_updates_partitions: i32,
    /// Replication of created topics (positive).
    pub replication_factor: i32,
    /// Whether missing topics are created at start.
    pub create_topics: bool,
    /// Longest wait for a vote's delivery report.
    pub produce_timeout: Duration,
    /// Longest a revocation waits for the final flush and commit.
    pub revoke_timeout: Duration,
    /// librdkafka properties of every client: none that breaks counting exactly once (nor
    /// in the two tables below).
    pub properties: HashMap<String, String>,
    /// librdkafka properties of consumers.
    pub consumer_properties: HashMap<String, String>,
    /// librdkafka properties of producers.
    pub producer_properties: HashMap<String, String>,
}

impl RawLog {
    /// Checks every key, those of the log not chosen too (a mistake there is one still).
    pub(super) fn parse(self) -> Result<LogSettings, ConfigError> {
        let kafka = self.kafka.parse(self.kind == LogKind::Kafka)?;
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::invalid("log.path", "must not be empty"));
        }
        if self.segment_bytes < 4096 {
            return Err(ConfigError::invalid(
                "log.segment_bytes",
                "must be at least 4096",
            ));
        }
        Ok(match self.kind {
            LogKind::Embedded => LogSettings::Embedded(FileLogSettings {
                path: self.path,
                segment_bytes: self.segment_bytes,
            }),
            LogKind::Kafka => LogSettings::Kafka(kafka),
        })
    }
}

impl RawKafka {
    /// Checks every key; brokers, topics, the group and the topics' shape only when Kafka
    /// is the log (`chosen`).
    fn parse(self, chosen: bool) -> Result<KafkaSection, ConfigError> {
        if let Some(seed) = &self.seed_poll_updates_topic
            && (seed.is_empty()
                || *seed == self.poll_updates_topic
                || *seed == self.raw_votes_topic)
        {
            return Err(ConfigError::invalid(
                "log.kafka.seed_poll_updates_topic",
                "must be a topic of its own (not log.kafka.poll_updates_topic nor raw_votes_topic)",
            ));
        }
        if chosen {
            if self.brokers.trim().is_empty() {
                return Err(ConfigError::invalid(
                    "log.kafka.brokers",
                    "must name at least one broker",
                ));
            }
            if self.raw_votes_topic.is_empty() || self.poll_updates_topic.is_empty() {
                return Err(ConfigError::invalid(
                    "log.kafka.raw_votes_topic",
                    "topic names must not be empty",
                ));
            }
            if self.group_id.is_empty() {
                return Err(ConfigError::invalid(
                    "log.kafka.group_id",
                    "must not be empty",
                ));
            }
            for (key, value) in [
                ("log.kafka.partitions", self.partitions),
                (
                    "log.kafka.poll_updates_partitions",
                    self.poll_updates_partitions,
                ),
                ("log.kafka.replication_factor", self.replication_factor),
            ] {
                if value < 1 {
                    return Err(ConfigError::invalid(key, "must be positive"));
                }
            }
        }
        self.check_properties()?;
        Ok(KafkaSection {
            brokers: self.brokers,
            raw_votes_topic: self.raw_votes_topic,
            poll_updates_topic: self.poll_updates_topic,
            seed_poll_updates_topic: self.seed_poll_updates_topic,
            group_id: self.group_id,
            partitions: self.partitions,
            poll_updates_partitions: self.poll_updates_partitions,
            replication_factor: self.replication_factor,
            create_topics: self.create_topics,
            produce_timeout: Duration::from_millis(self.produce_timeout_ms),
            revoke_timeout: Duration::from_millis(self.revoke_timeout_ms),
            properties: self.properties,
            consumer_properties: self.consumer_properties,
            producer_properties: self.producer_properties,
        })
    }

    /// Refuses librdkafka properties that would break the delivery guarantees (see
    /// [`GUARDED_KAFKA_PROPERTIES`]), naming the table and the property.
    fn check_properties(&self) -> Result<(), ConfigError> {
        let tables: [(&'static str, &HashMap<String, String>, &[Reaches]); 3] = [
            (
                "log.kafka.properties",
                &self.properties,
                &[Reaches::Consumers, Reaches::Producers],
            ),
            (
                "log.kafka.consumer_properties",
                &self.consumer_properties,
                &[Reaches::Consumers],
            ),
            (
                "log.kafka.producer_properties",
                &self.producer_properties,
                &[Reaches::Producers],
            ),
        ];
        for (table, properties, reaches) in tables {
            for (name, value) in properties {
                // As the clients will see it: underscores stand for dots.
                let dotted = name.replace('_', ".").to_ascii_lowercase();
                let Some((_, _, allowed)) = GUARDED_KAFKA_PROPERTIES
                    .iter()
                    .find(|(key, to, _)| *key == dotted && reaches.contains(to))
                else {
                    continue;
                };
                let value = value.trim().to_ascii_lowercase().replace(' ', "");
                if allowed.is_some_and(|ok| ok.contains(&value.as_str())) {
                    continue;
                }
                let why = match (dotted.as_str(), allowed) {
                    ("group.id", _) => "set log.kafka.group_id instead".to_owned(),
                    (_, None) => "pollcast sets it and it must not be overridden".to_owned(),
                    (_, Some(ok)) => format!(
                        "only {} keeps every vote counted exactly once",
                        ok.join(" or ")
                    ),
                };
                return Err(ConfigError::Invalid {
                    key: table,
                    why: format!(
                        "`{name}` (librdkafka `{dotted}`) = {value:?} would break counting exactly once: {why}"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Which clients a property of one of the `log.kafka.*properties` tables reaches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reaches {
    Consumers,
    Producers,
}

/// librdkafka properties whose override would break counting exactly once, with the values
/// that keep it (lower case; `None`: no override at all). pollcast's ledger makes replays
/// harmless, but only if offsets are committed after the flush, nothing is skipped and every
/// 202 is durable:
/// - `enable.auto.commit`, `enable.auto.offset.store`: offsets would be committed before the
///   flush that applies them; a crash in between loses those votes.
/// - `auto.offset.reset`: the vote consumer must start a partition without a committed offset
///   from its beginning (`latest` skips votes), the counts consumer from its end.
/// - `group.id`: the counts consumers need a group each (`log.kafka.group_id` names the
///   vote consumers' group).
/// - `partition.assignment.strategy`: a cooperative (incremental) rebalance revokes some
///   partitions while the process keeps others, and pollcast drops what it fetched when any
///   partition is revoked, so records of the kept ones would be skipped. Eager only.
/// - `isolation.level`: `read_uncommitted` would count votes of aborted transactions.
/// - `enable.idempotence`, `acks` (`request.required.acks`): a 202 must mean every in-sync
///   replica has the vote, and a retried send must not duplicate or reorder it.
const GUARDED_KAFKA_PROPERTIES: &[(&str, Reaches, Option<&[&str]>)] = &[
    ("enable.auto.commit", Reaches::Consumers, Some(&["false"])),
    (
        "enable.auto.offset.store",
        Reaches::Consumers,
        Some(&["false"]),
    ),
    ("auto.offset.reset", Reaches::Consumers, None),
    ("group.id", Reaches::Consumers, None),
    (
        "partition.assignment.strategy",
        Reaches::Consumers,
        Some(&[
            "range",
            "roundrobin",
            "range,roundrobin",
            "roundrobin,range",
        ]),
    ),
    (
        "isolation.level",
        Reaches::Consumers,
        Some(&["read_committed"]),
    ),
    ("enable.idempotence", Reaches::Producers, Some(&["true"])),
    ("acks", Reaches::Producers, Some(&["all", "-1"])),
    (
        "request.required.acks",
        Reaches::Producers,
        Some(&["all", "-1"]),
    ),
];
