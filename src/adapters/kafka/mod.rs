//! The production vote log: Kafka through rdkafka.
//!
//! - Producer ([`KafkaVoteLog`]): idempotent, `acks=all`; `raw-votes` records are keyed by
//!   pollId, so a poll's votes stay in one partition, in order. A 202 is sent only after the
//!   delivery report.
//! - Consumer ([`KafkaSourceFactory`]): one group member per process. Offsets are never
//!   committed automatically: the ingest actor commits them after the flush that applied them.
//!   `consumer.poll` runs on a dedicated thread that only fetches while the ingest actor asks
//!   for records, so nothing fetched sits in a buffer of ours when the actor seeks. On a
//!   revocation the rebalance callback hands the ingest actor a `Revoked` event and holds the
//!   rebalance until the actor has flushed and committed those partitions.
//! - Failover: group sessions are as short as Kafka allows by default (6 s, see
//!   [`GROUP_DEFAULTS`]), so a crashed process's partitions move within seconds; a graceful
//!   stop leaves the group explicitly ([`VoteSource::close`]) after its final commit, so its
//!   partitions move at once.
//! - Counts bus ([`KafkaCountsBus`]): every flush's counts go to `poll-updates`; every process
//!   reads all of it (its own consumer group, from the latest offset) for its WebSockets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pollcast_actors::{
    ConsumerStatus, CountsBus, CountsFeed, CountsUpdate, LogEntry, LogError, LogRecord, Offset,
    OptionCount, Partition, SourceEvent, VoteAppender, VoteSource, VoteSourceFactory,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset as KafkaOffset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::config::KafkaSection;

/// Which kind of client a configuration is for (each gets its own extra properties).
#[derive(Clone, Copy)]
enum Role {
    Admin,
    Producer,
    Consumer,
}

impl KafkaSection {
    /// pollcast's defaults for `role`, then the operator's properties over them.
    fn client_config(&self, role: Role, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("broker.address.family", "v4");
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        let extra = match role {
            Role::Admin => None,
            Role::Producer => Some(&self.producer_properties),
            Role::Consumer => Some(&self.consumer_properties),
        };
        for (key, value) in self.properties.iter().chain(extra.into_iter().flatten()) {
            // Underscores stand for dots, so that environment variables can name properties.
            config.set(key.replace('_', "."), value);
        }
        config
    }
}

/// Group membership defaults of every consumer (operators may override them).
///
/// Why these: librdkafka's 45 s session timeout means a crashed process's partitions, and
/// the polls in them, wait 45 s and more before another process counts them. 6000 ms is the
/// least a Kafka broker accepts by default (`group.min.session.timeout.ms`); a broker
/// configured otherwise refuses it, which pollcast reports naming the property. Heartbeats
/// every second also tell the survivors of a rebalance within a second.
pub const GROUP_DEFAULTS: [(&str, &str); 2] = [
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "1000"),
];

fn kafka_err(what: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> LogError {
    move |e| LogError::new(what, e)
}

/// Creates the topics if they are missing.
pub async fn ensure_topics(settings: &KafkaSection) -> Result<(), LogError> {
    let admin: AdminClient<DefaultClientContext> = settings
        .client_config(Role::Admin, &[])
        .create()
        .map_err(kafka_err("create a Kafka admin client"))?;
    let topics: Vec<_> = [&settings.raw_votes_topic, &settings.poll_updates_topic]
        .into_iter()
        .chain(&settings.seed_poll_updates_topic)
        .map(|name| {
            NewTopic::new(
                name,
                settings.partitions,
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

/// The producing side of `raw-votes`.
#[derive(Clone)]
pub struct KafkaVoteLog {
    /// Replaced after a fatal error: an idempotent producer that hit one (e.g. fenced after
    /// an outage) refuses every later message, and only a new instance recovers.
    producer: Arc<RwLock<FutureProducer>>,
    config: ClientConfig,
    topic: String,
    timeout: Duration,
}

impl KafkaVoteLog {
    /// An idempotent producer of votes.
    pub fn new(settings: &KafkaSection) -> Result<Self, LogError> {
        let timeout_ms = settings.produce_timeout.as_millis().to_string();
        let config = settings.client_config(
            Role::Producer,
            &[
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("linger.ms", "1"),
                ("message.timeout.ms", &timeout_ms),
            ],
        );
        let producer = config
            .create()
            .map_err(kafka_err("create the Kafka producer"))?;
        Ok(Self {
            producer: Arc::new(RwLock::new(producer)),
            config,
            topic: settings.raw_votes_topic.clone(),
            timeout: settings.produce_timeout,
        })
    }

    fn producer(&self) -> FutureProducer {
        self.producer.read().expect("not poisoned").clone()
    }

    /// Replaces `failed` if `error` shows it can never produce again (and nobody replaced it
    /// yet): librdkafka's fatal state, or a broker that no longer accepts its producer id.
    fn recover_from_fatal(&self, failed: &FutureProducer, error: &KafkaError) {
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
        match self.config.create::<FutureProducer>() {
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

type Reply = oneshot::Sender<Result<SourceEvent, LogError>>;

/// Rebalance callbacks of the ingest consumer; they run on its poll thread.
struct IngestContext {
    topic: String,
    /// High offsets from the statistics, shared with the source.
    high_offsets: Arc<Mutex<HashMap<Partition, Offset>>>,
    /// What readiness checks report.
    status: Arc<Mutex<ConsumerStatus>>,
    /// The reply of the request being served: the revocation callback answers it with
    /// `Revoked` instead of records.
    reply: Arc<Mutex<Option<Reply>>>,
    /// Signalled by the ingest actor once it has flushed and committed a revocation.
    revoke_done: Mutex<std_mpsc::Receiver<()>>,
    revoke_timeout: Duration,
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

/// What the ingest actor asks of the consumer thread.
enum Request {
    /// Fetch up to `max` records, waiting at most `wait` for the first.
    Poll {
        max: usize,
        wait: Duration,
        reply: Reply,
    },
    /// Leave the group and stop; answered once left.
    Close(oneshot::Sender<()>),
}

/// Longest a graceful stop waits for the consumer to leave its group.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

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
            .client_config(
                Role::Consumer,
                &[
                    GROUP_DEFAULTS[0],
                    GROUP_DEFAULTS[1],
                    ("group.id", &self.settings.group_id),
                    ("enable.auto.commit", "false"),
                    ("enable.auto.offset.store", "false"),
                    ("auto.offset.reset", "earliest"),
                    ("partition.assignment.strategy", "range"),
                    ("statistics.interval.ms", "5000"),
                    // Why not the default 500 ms: at low traffic the broker holds a fetch
                    // that long for more bytes, and each vote waits it out on its way to
                    // the screen.
                    ("fetch.wait.max.ms", "50"),
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

fn serve_polls(
    consumer: Arc<BaseConsumer<IngestContext>>,
    reply_slot: Arc<Mutex<Option<Reply>>>,
    mut requests: mpsc::Receiver<Request>,
) {
    while let Some(request) = requests.blocking_recv() {
        let (max, wait, reply) = match request {
            Request::Poll { max, wait, reply } => (max, wait, reply),
            Request::Close(done) => {
                leave_group(consumer);
                let _ = done.send(());
                return;
            }
        };
        *reply_slot.lock().expect("not poisoned") = Some(reply);
        let deadline = Instant::now() + wait;
        let mut records = Vec::new();
        let mut failure = None;
        while records.len() < max {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let timeout = if records.is_empty() {
                remaining
            } else {
                Duration::ZERO
            };
            match consumer.poll(timeout) {
                Some(Ok(message)) => records.push(LogRecord {
                    partition: message.partition(),
                    offset: message.offset(),
                    next_offset: message.offset() + 1,
                    entry: decode_entry(&message),
                }),
                Some(Err(e)) => {
                    failure = Some(read_error(e));
                    break;
                }
                None if records.is_empty() && !remaining.is_zero() => {}
                None => break,
            }
            if reply_slot.lock().expect("not poisoned").is_none() {
                break; // revoked while fetching
            }
        }
        let Some(reply) = reply_slot.lock().expect("not poisoned").take() else {
            // The revocation answered this request. Records fetched before it are dropped:
            // their partitions' next owner reads them again from the committed offsets.
            continue;
        };
        let _ = reply.send(match failure {
            Some(e) if records.is_empty() => Err(e),
            _ => Ok(SourceEvent::Records(records)),
        });
    }
    tracing::debug!("vote consumer thread stopped");
}

/// What a consumer error means for the operator.
fn read_error(e: KafkaError) -> LogError {
    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::InvalidSessionTimeout) {
        tracing::error!(
            error = %e,
            "the Kafka broker refused the consumer's session timeout: set \
             log.kafka.consumer_properties.session_timeout_ms within the broker's \
             group.min.session.timeout.ms and group.max.session.timeout.ms (Kafka's defaults: \
             6000 and 1800000; pollcast's default is 6000), or change the broker's limits"
        );
        return LogError::new(
            "join the Kafka consumer group",
            format!(
                "{e}: log.kafka.consumer_properties.session_timeout_ms is outside the broker's group.min/max.session.timeout.ms"
            ),
        );
    }
    LogError::new("read from Kafka", e)
}

/// Leaves the consumer group. Dropping the last handle of the consumer does it: rdkafka's
/// drop closes it (librdkafka revokes the assignment, which our callback lets pass as there
/// is no request to answer and nothing left to flush, sends the coordinator a LeaveGroup and
/// waits until that is done). Closing it here as well would make that drop fail. The
/// coordinator then rebalances the group at once instead of waiting for this member's
/// session to time out.
fn leave_group(consumer: Arc<BaseConsumer<IngestContext>>) {
    let started = Instant::now();
    match Arc::into_inner(consumer) {
        Some(consumer) => drop(consumer),
        None => {
            tracing::warn!("the Kafka consumer is still in use; it leaves its group when released");
            return;
        }
    }
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "left the Kafka consumer group"
    );
}

fn decode_entry(message: &impl Message) -> Option<LogEntry> {
    let payload = message.payload()?;
    match LogEntry::from_json(payload) {
        Ok(entry) => Some(entry),
        Err(e) => {
            tracing::warn!(partition = message.partition(), offset = message.offset(), error = %e, "skipping a raw-votes record that is not a vote");
            None
        }
    }
}

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
    producer: FutureProducer,
    settings: KafkaSection,
}

impl KafkaCountsBus {
    /// A producer of updates; subscribers are created by [`CountsBus::subscribe`].
    pub fn new(settings: &KafkaSection) -> Result<Self, LogError> {
        let producer = settings
            .client_config(
                Role::Producer,
                &[("linger.ms", "0"), ("message.timeout.ms", "5000")],
            )
            .create()
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
        if update.hide_results && update.closed_at.is_none() {
            return;
        }
        let counts = if update.closed_at.is_some() {
            &update.all
        } else {
            &update.changed
        };
        for count in counts {
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
            r#type: if update.closed_at.is_some() {
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
            .client_config(
                Role::Consumer,
                &[
                    GROUP_DEFAULTS[0],
                    GROUP_DEFAULTS[1],
                    ("group.id", &group),
                    ("enable.auto.commit", "false"),
                    ("auto.offset.reset", "latest"),
                    // Counts from other processes should not wait for more bytes either.
                    ("fetch.wait.max.ms", "50"),
                ],
            )
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
