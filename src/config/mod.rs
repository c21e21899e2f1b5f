//! Settings: config.toml, overridden by `POLLCAST__SECTION__KEY` environment variables.
//!
//! Every section rejects unknown keys and every value is checked before anything starts, so
//! a typo stops start-up with a message naming the key instead of being silently ignored.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pollcast_actors::{IngestSettings, RestartPolicy};
use serde::Deserialize;

/// Environment variables with this prefix override config.toml (`POLLCAST__HTTP__ADDR`).
pub const ENV_PREFIX: &str = "POLLCAST";

/// All of pollcast's settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// HTTP server.
    pub http: HttpSettings,
    /// Poll store.
    pub store: StoreSettings,
    /// Vote log.
    pub log: LogSettings,
    /// Duplicate guard.
    pub dedup: DedupSettings,
    /// Aggregators.
    pub aggregator: AggregatorSettings,
    /// Restart budgets.
    pub supervision: SupervisionSettings,
    /// Administration.
    pub admin: AdminSettings,
    /// Rate limits.
    pub rate_limit: RateLimitSettings,
    /// Who a voter is.
    pub voters: VoterSettings,
    /// Delivery of poll webhooks.
    pub webhooks: WebhookSettings,
    /// The seed's Socket.IO clients.
    pub socketio: SocketIoSettings,
}

/// `[socketio]`: the seed app's live clients (`io(url)`, `on('poll-stats')`), served at
/// `/socket.io/` on `http.addr`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketIoSettings {
    /// Serve Socket.IO at all.
    pub enabled: bool,
    /// Send every poll's updates to a client that has not narrowed to chosen polls (the
    /// seed's behaviour). Off: such a client gets nothing until it subscribes.
    pub broadcast_all: bool,
}

impl Default for SocketIoSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            broadcast_all: true,
        }
    }
}

/// Where a vote's userId comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VoterIdentity {
    /// The request body's `userId` (the seed app's way; trusts the client).
    Body,
    /// A token signed by the operator's backend (`Authorization: Bearer <token>`).
    Signed,
}

/// `[voters]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VoterSettings {
    /// Where the userId comes from.
    pub identity: VoterIdentity,
    /// The secret shared with the backend that signs voter tokens (`signed` mode).
    pub secret: Option<String>,
}

impl Default for VoterSettings {
    fn default() -> Self {
        Self {
            identity: VoterIdentity::Body,
            secret: None,
        }
    }
}

impl fmt::Debug for VoterSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VoterSettings")
            .field("identity", &self.identity)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `[webhooks]`: how poll events are delivered to the URL each poll names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// Longest one delivery attempt may take (connecting, sending, the response's head).
    pub timeout_ms: u64,
    /// Attempts per event, the first included, before it is given up.
    pub max_attempts: u32,
    /// Delay before the first retry; doubled for each further one (with jitter).
    pub initial_backoff_ms: u64,
    /// Longest delay between two attempts.
    pub max_backoff_ms: u64,
    /// Events waiting for the dispatcher at most; more are dropped (and counted).
    pub queue_capacity: usize,
    /// Delivery attempts in flight at once, across all polls.
    pub max_in_flight: usize,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            timeout_ms: 5000,
            max_attempts: 8,
            initial_backoff_ms: 500,
            max_backoff_ms: 60_000,
            queue_capacity: 10_000,
            max_in_flight: 64,
        }
    }
}

/// `[rate_limit]`: a rate of 0 turns that limit off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    /// API requests per second per client IP, sustained.
    pub per_ip_per_sec: u32,
    /// API requests per client IP at once.
    pub per_ip_burst: u32,
    /// Votes per second per userId, sustained.
    pub per_user_per_sec: u32,
    /// Votes per userId at once.
    pub per_user_burst: u32,
    /// Behind a reverse proxy: the header it sets to the client's address (e.g.
    /// `x-forwarded-for`; its last address is used). Unset: the TCP peer's address.
    pub client_ip_header: Option<String>,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            per_ip_per_sec: 200,
            per_ip_burst: 2000,
            per_user_per_sec: 5,
            per_user_burst: 10,
            client_ip_header: None,
        }
    }
}

/// Connections from one address when `http.max_connections_per_ip` is unset and no proxy
/// is configured. Why this many: an audience on a venue's network often shares one address
/// behind NAT, and each viewer holds a WebSocket; one client still cannot take every slot.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 5_000;

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address to listen on; port 0 picks a free port.
    pub addr: String,
    /// Largest accepted request body, in bytes (larger: 413).
    pub max_body_bytes: u64,
    /// Open connections at most (WebSockets included); more are closed at once.
    pub max_connections: usize,
    /// Open connections from one peer address at most (WebSockets included); 0: no cap.
    /// Unset: 5000, or no cap behind a proxy (`rate_limit.client_ip_header` set), where
    /// every connection comes from the proxy's address.
    pub max_connections_per_ip: Option<usize>,
    /// A second listener for `/healthz`, `/readyz` and `/metrics` alone (plain HTTP), so
    /// that probes get through while the public one is saturated. Unset: none.
    pub admin_addr: Option<String>,
    /// Longest a client may take to send a request body once its head is in.
    pub body_read_timeout_ms: u64,
    /// The address the audience reaches pollcast at (`https://polls.example.com`), for the
    /// join links and QR codes of the presenter screen. Unset: the host each request named.
    pub public_url: Option<String>,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// Longest a client may take to send a request head.
    pub header_read_timeout_ms: u64,
    /// WebSocket subscribers are pinged this often.
    pub ws_ping_interval_secs: u64,
    /// A WebSocket subscriber that sends nothing (not even a pong) for this long is closed.
    pub ws_idle_timeout_secs: u64,
    /// Serve HTTPS with this certificate chain (PEM); needs `tls_key_path` too.
    pub tls_cert_path: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert_path`.
    pub tls_key_path: Option<PathBuf>,
    /// Origins allowed to call the API from a browser on another origin
    /// (`https://polls.example.com`); empty: no cross-origin access.
    pub cors_origins: Vec<String>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8080".into(),
            max_body_bytes: 16 * 1024,
            max_connections: 50_000,
            max_connections_per_ip: None,
            admin_addr: None,
            body_read_timeout_ms: 10_000,
            public_url: None,
            max_header_bytes: 16 * 1024,
            header_read_timeout_ms: 10_000,
            ws_ping_interval_secs: 30,
            ws_idle_timeout_secs: 90,
            cors_origins: Vec::new(),
            tls_cert_path: None,
            tls_key_path: None,
        }
    }
}

/// `[store]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// `sqlite://PATH` (embedded) or `postgres://USER@HOST/DB`; migrated on start.
    pub url: String,
    /// Connections at most (Postgres; SQLite uses one writer and up to this many readers).
    pub max_connections: u32,
    /// Longest wait for a connection (Postgres).
    pub acquire_timeout_ms: u64,
    /// Longest a statement may run (Postgres).
    pub statement_timeout_ms: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            url: "sqlite://data/pollcast.db".into(),
            max_connections: 8,
            acquire_timeout_ms: 5000,
            statement_timeout_ms: 10_000,
        }
    }
}

impl fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreSettings")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout_ms", &self.acquire_timeout_ms)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .finish()
    }
}

impl fmt::Debug for DedupSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupSettings")
            .field("kind", &self.kind)
            .field("ttl_secs", &self.ttl_secs)
            .field("redis_url", &redact_url(&self.redis_url))
            .field("key_prefix", &self.key_prefix)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// A URL with its password masked, for logs, errors and debug output.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!("{}:***{}", &url[..scheme + 3 + colon], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl StoreSettings {
    /// Whether the URL names a Postgres database.
    pub fn is_postgres(&self) -> bool {
        self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")
    }
}

/// Which vote log to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogKind {
    /// A durable, group-committed log in local files.
    Embedded,
    /// Kafka (`[log.kafka]`).
    Kafka,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// Which log.
    pub kind: LogKind,
    /// Directory of the embedded log.
    pub path: PathBuf,
    /// Size at which the embedded log starts a new segment file.
    pub segment_bytes: u64,
    /// Kafka, when `kind = "kafka"`.
    pub kafka: KafkaSection,
}

/// `[log.kafka]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSection {
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
    /// Partitions of the topics pollcast creates.
    pub partitions: i32,
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

impl Default for KafkaSection {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            raw_votes_topic: "raw-votes".into(),
            poll_updates_topic: "poll-updates".into(),
            seed_poll_updates_topic: None,
            group_id: "pollcast".into(),
            partitions: 6,
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

impl KafkaSection {
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

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            kind: LogKind::Embedded,
            path: "data/log".into(),
            segment_bytes: 64 * 1024 * 1024,
            kafka: KafkaSection::default(),
        }
    }
}

/// Which duplicate guard to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupKind {
    /// An in-process map with expiry.
    Memory,
    /// Redis `SET NX EX`.
    Redis,
}

/// `[dedup]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupSettings {
    /// Which guard.
    pub kind: DedupKind,
    /// How long a (poll, user) claim lives.
    pub ttl_secs: u64,
    /// Redis, when `kind = "redis"`.
    pub redis_url: String,
    /// Prepended to Redis keys (`""`: the seed app's `vote:{pollId}:{userId}`).
    pub key_prefix: String,
    /// Longest a Redis command may take before the vote gets a 503.
    pub timeout_ms: u64,
}

impl Default for DedupSettings {
    fn default() -> Self {
        Self {
            kind: DedupKind::Memory,
            ttl_secs: 24 * 60 * 60,
            redis_url: "redis://127.0.0.1:6379".into(),
            key_prefix: String::new(),
            timeout_ms: 1000,
        }
    }
}

/// `[aggregator]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorSettings {
    /// How often each poll's buffered votes are flushed to the store.
    pub flush_interval_ms: u64,
    /// A poll with this many buffered votes is flushed at once, before its interval is up:
    /// a big flush holds the store's writer, and other polls' flushes wait behind it.
    pub flush_max_votes: usize,
    /// A poll's aggregator is stopped after this long without votes (and started again,
    /// from the store, at its next vote).
    pub idle_timeout_secs: u64,
    /// How long after a poll closes its final counts are published: votes accepted just
    /// before the close (by a process whose poll cache had not seen it yet, or whose append
    /// was slow) still make it into them.
    pub close_grace_ms: u64,
}

impl Default for AggregatorSettings {
    fn default() -> Self {
        Self {
            flush_interval_ms: 2000,
            flush_max_votes: 20_000,
            idle_timeout_secs: 300,
            close_grace_ms: 3000,
        }
    }
}

/// `[supervision]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionSettings {
    /// Restarts a supervisor may make within `window_secs` before it gives up.
    pub max_restarts: u32,
    /// Window over which restarts are counted.
    pub window_secs: u64,
    /// First restart delay; doubled per further restart.
    pub backoff_initial_ms: u64,
    /// Longest restart delay.
    pub backoff_max_ms: u64,
}

impl Default for SupervisionSettings {
    fn default() -> Self {
        let policy = RestartPolicy::default();
        Self {
            max_restarts: policy.max_restarts,
            window_secs: policy.window.as_secs(),
            backoff_initial_ms: policy.backoff_initial.as_millis() as u64,
            backoff_max_ms: policy.backoff_max.as_millis() as u64,
        }
    }
}

/// `[admin]`
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Creating and closing polls needs `Authorization: Bearer <token>`. When unset, a random
    /// token is generated at start and logged once.
    pub token: Option<String>,
}

impl fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminSettings")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named with `--config` does not exist.
    #[error("config file {0} not found")]
    Missing(PathBuf),
    /// A key is unknown, or a value has the wrong type.
    #[error("{0}")]
    Parse(#[from] config::ConfigError),
    /// A value has the right type but is not usable.
    #[error("invalid value for `{key}`: {why}")]
    Invalid {
        /// The key, as `section.key`.
        key: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

impl Settings {
    /// Loads `path` (which must exist when `required`), then applies `POLLCAST__…`
    /// environment overrides, then validates.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        if required && !path.exists() {
            return Err(ConfigError::Missing(path.to_owned()));
        }
        let settings: Settings = config::Config::builder()
            .add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(required),
            )
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, why: &str| ConfigError::Invalid {
            key,
            why: why.to_owned(),
        };
        self.http
            .addr
            .parse::<SocketAddr>()
            .map_err(|e| invalid("http.addr", &format!("{e} (expected IP:PORT)")))?;
        if self.http.max_connections == 0 {
            return Err(invalid("http.max_connections", "must be positive"));
        }
        if let Some(admin) = &self.http.admin_addr {
            admin
                .parse::<SocketAddr>()
                .map_err(|e| invalid("http.admin_addr", &format!("{e} (expected IP:PORT)")))?;
        }
        if let Some(url) = &self.http.public_url {
            let rest = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"));
            let host = rest.map(|r| r.trim_end_matches('/'));
            if host.is_none_or(|h| h.is_empty() || h.contains(['/', '?', '#', ' ', '"'])) {
                return Err(invalid(
                    "http.public_url",
                    "must be an origin like https://polls.example.com (no path)",
                ));
            }
        }
        if self.http.body_read_timeout_ms == 0 {
            return Err(invalid("http.body_read_timeout_ms", "must be positive"));
        }
        if self.http.max_header_bytes < 8192 {
            return Err(invalid("http.max_header_bytes", "must be at least 8192"));
        }
        if self.http.ws_ping_interval_secs == 0
            || self.http.ws_idle_timeout_secs <= self.http.ws_ping_interval_secs
        {
            return Err(invalid(
                "http.ws_idle_timeout_secs",
                "must exceed http.ws_ping_interval_secs, which must be positive",
            ));
        }
        if self.http.tls_cert_path.is_some() != self.http.tls_key_path.is_some() {
            return Err(invalid(
                "http.tls_cert_path",
                "http.tls_cert_path and http.tls_key_path go together",
            ));
        }
        for origin in &self.http.cors_origins {
            let valid = (origin.starts_with("https://") || origin.starts_with("http://"))
                && !origin
                    .split("://")
                    .nth(1)
                    .is_some_and(|rest| rest.is_empty() || rest.contains('/'))
                && http::HeaderValue::from_str(origin).is_ok();
            if !valid {
                return Err(ConfigError::Invalid {
                    key: "http.cors_origins",
                    why: format!("{origin:?} is not an origin like https://polls.example.com"),
                });
            }
        }
        if let Some(seed) = &self.log.kafka.seed_poll_updates_topic
            && (seed.is_empty()
                || *seed == self.log.kafka.poll_updates_topic
                || *seed == self.log.kafka.raw_votes_topic)
        {
            return Err(invalid(
                "log.kafka.seed_poll_updates_topic",
                "must be a topic of its own (not log.kafka.poll_updates_topic nor raw_votes_topic)",
            ));
        }
        if self.http.header_read_timeout_ms == 0 {
            return Err(invalid("http.header_read_timeout_ms", "must be positive"));
        }
        if self.http.max_body_bytes < 256 {
            return Err(invalid("http.max_body_bytes", "must be at least 256"));
        }
        if !self.store.url.starts_with("sqlite:") && !self.store.is_postgres() {
            return Err(invalid(
                "store.url",
                "must be a sqlite://PATH or postgres://USER@HOST/DB URL",
            ));
        }
        if self.store.max_connections == 0 {
            return Err(invalid("store.max_connections", "must be positive"));
        }
        if self.log.kind == LogKind::Kafka {
            let k = &self.log.kafka;
            if k.brokers.trim().is_empty() {
                return Err(invalid(
                    "log.kafka.brokers",
                    "must name at least one broker",
                ));
            }
            if k.raw_votes_topic.is_empty() || k.poll_updates_topic.is_empty() {
                return Err(invalid(
                    "log.kafka.raw_votes_topic",
                    "topic names must not be empty",
                ));
            }
            if k.group_id.is_empty() {
                return Err(invalid("log.kafka.group_id", "must not be empty"));
            }
            if k.partitions < 1 || k.replication_factor < 1 {
                return Err(invalid(
                    "log.kafka.partitions",
                    "partitions and replication_factor must be positive",
                ));
            }
        }
        self.log.kafka.check_properties()?;
        if self.dedup.kind == DedupKind::Redis && !self.dedup.redis_url.starts_with("redis") {
            return Err(invalid(
                "dedup.redis_url",
                "must be a redis://HOST:PORT URL",
            ));
        }
        if self.log.path.as_os_str().is_empty() {
            return Err(invalid("log.path", "must not be empty"));
        }
        if self.log.segment_bytes < 4096 {
            return Err(invalid("log.segment_bytes", "must be at least 4096"));
        }
        if self.dedup.ttl_secs == 0 {
            return Err(invalid("dedup.ttl_secs", "must be positive"));
        }
        if !(10..=60_000).contains(&self.aggregator.flush_interval_ms) {
            return Err(invalid(
                "aggregator.flush_interval_ms",
                "must be between 10 and 60000",
            ));
        }
        if !(1..=1_000_000).contains(&self.aggregator.flush_max_votes) {
            return Err(invalid(
                "aggregator.flush_max_votes",
                "must be between 1 and 1000000",
            ));
        }
        if self.aggregator.close_grace_ms > 60_000 {
            return Err(invalid(
                "aggregator.close_grace_ms",
                "must be at most 60000",
            ));
        }
        if self.aggregator.idle_timeout_secs == 0 {
            return Err(invalid("aggregator.idle_timeout_secs", "must be positive"));
        }
        if self.supervision.window_secs == 0 {
            return Err(invalid("supervision.window_secs", "must be positive"));
        }
        if self.supervision.backoff_initial_ms > self.supervision.backoff_max_ms {
            return Err(invalid(
                "supervision.backoff_initial_ms",
                "must not exceed supervision.backoff_max_ms",
            ));
        }
        if let Some(header) = &self.rate_limit.client_ip_header
            && http::HeaderName::from_bytes(header.as_bytes()).is_err()
        {
            return Err(invalid(
                "rate_limit.client_ip_header",
                "must be a header name",
            ));
        }
        if self.voters.identity == VoterIdentity::Signed
            && self.voters.secret.as_deref().is_none_or(|s| s.len() < 32)
        {
            return Err(invalid(
                "voters.secret",
                "signed voter identity needs a secret of at least 32 characters",
            ));
        }
        if self.admin.token.as_deref().is_some_and(|t| t.len() < 8) {
            return Err(invalid("admin.token", "must be at least 8 characters"));
        }
        let w = &self.webhooks;
        if w.timeout_ms == 0 {
            return Err(invalid("webhooks.timeout_ms", "must be positive"));
        }
        if w.max_attempts == 0 {
            return Err(invalid("webhooks.max_attempts", "must be at least 1"));
        }
        if w.initial_backoff_ms == 0 || w.initial_backoff_ms > w.max_backoff_ms {
            return Err(invalid(
                "webhooks.initial_backoff_ms",
                "must be positive and not exceed webhooks.max_backoff_ms",
            ));
        }
        if w.queue_capacity == 0 {
            return Err(invalid("webhooks.queue_capacity", "must be positive"));
        }
        if w.max_in_flight == 0 {
            return Err(invalid("webhooks.max_in_flight", "must be positive"));
        }
        Ok(())
    }

    /// The listen address (validated at load).
    pub fn http_addr(&self) -> SocketAddr {
        self.http.addr.parse().expect("validated at load")
    }

    /// The admin listener's address, if one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        let addr = self.http.admin_addr.as_deref()?;
        Some(addr.parse().expect("validated at load"))
    }

    /// Connections one peer address may hold open (0: no cap). Why no cap behind a proxy by
    /// default: the peer is then the proxy, which holds every client's connection.
    pub fn max_connections_per_ip(&self) -> usize {
        match (
            self.http.max_connections_per_ip,
            &self.rate_limit.client_ip_header,
        ) {
            (Some(max), _) => max,
            (None, Some(_)) => 0,
            (None, None) => DEFAULT_MAX_CONNECTIONS_PER_IP,
        }
    }

    /// The flush interval.
    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.aggregator.flush_interval_ms)
    }

    /// How long after a close the final counts wait for late votes.
    pub fn close_grace(&self) -> Duration {
        Duration::from_millis(self.aggregator.close_grace_ms)
    }

    /// The restart policy of every supervisor.
    pub fn restart_policy(&self) -> RestartPolicy {
        RestartPolicy {
            max_restarts: self.supervision.max_restarts,
            window: Duration::from_secs(self.supervision.window_secs),
            backoff_initial: Duration::from_millis(self.supervision.backoff_initial_ms),
            backoff_max: Duration::from_millis(self.supervision.backoff_max_ms),
        }
    }

    /// How the ingest actor reads the log.
    pub fn ingest_settings(&self) -> IngestSettings {
        IngestSettings {
            idle_timeout: Duration::from_secs(self.aggregator.idle_timeout_secs),
            ..IngestSettings::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_every_secret() {
        let mut settings = Settings::default();
        settings.store.url = "postgres://pollcast:db-password@db:5432/pollcast".into();
        settings.dedup.redis_url = "redis://:redis-password@cache:6379".into();
        settings.admin.token = Some("admin-token-value".into());
        settings.voters.secret = Some("voter-signing-secret".into());
        let shown = format!("{settings:?}");
        for secret in [
            "db-password",
            "redis-password",
            "admin-token-value",
            "voter-signing-secret",
        ] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert!(shown.contains("postgres://pollcast:***@db:5432/pollcast"));
    }

    #[test]
    fn bad_webhook_settings_name_their_key() {
        type Spoil = fn(&mut WebhookSettings);
        let cases: [(Spoil, &str); 5] = [
            (|w| w.timeout_ms = 0, "webhooks.timeout_ms"),
            (|w| w.max_attempts = 0, "webhooks.max_attempts"),
            (
                |w| w.initial_backoff_ms = 70_000,
                "webhooks.initial_backoff_ms",
            ),
            (|w| w.queue_capacity = 0, "webhooks.queue_capacity"),
            (|w| w.max_in_flight = 0, "webhooks.max_in_flight"),
        ];
        for (spoil, key) in cases {
            let mut settings = Settings::default();
            spoil(&mut settings.webhooks);
            match settings.validate() {
                Err(ConfigError::Invalid { key: named, .. }) => assert_eq!(named, key),
                other => panic!("{key}: expected an error naming it, got {other:?}"),
            }
        }
        assert!(Settings::default().validate().is_ok());
    }

    #[test]
    fn kafka_properties_that_break_exactly_once_are_refused_naming_them() {
        type Table = fn(&mut KafkaSection) -> &mut HashMap<String, String>;
        let consumer: Table = |k| &mut k.consumer_properties;
        let producer: Table = |k| &mut k.producer_properties;
        let common: Table = |k| &mut k.properties;
        let refused = [
            (
                consumer,
                "enable_auto_commit",
                "true",
                "log.kafka.consumer_properties",
            ),
            (common, "enable.auto.commit", "true", "log.kafka.properties"),
            (
                consumer,
                "enable_auto_offset_store",
                "true",
                "log.kafka.consumer_properties",
            ),
            (
                consumer,
                "auto_offset_reset",
                "latest",
                "log.kafka.consumer_properties",
            ),
            (
                consumer,
                "group_id",
                "other",
                "log.kafka.consumer_properties",
            ),
            (
                consumer,
                "partition_assignment_strategy",
                "cooperative-sticky",
                "log.kafka.consumer_properties",
            ),
            (
                consumer,
                "isolation_level",
                "read_uncommitted",
                "log.kafka.consumer_properties",
            ),
            (
                producer,
                "enable_idempotence",
                "false",
                "log.kafka.producer_properties",
            ),
            (producer, "acks", "1", "log.kafka.producer_properties"),
            (common, "acks", "0", "log.kafka.properties"),
            (
                producer,
                "request_required_acks",
                "1",
                "log.kafka.producer_properties",
            ),
        ];
        for (table, name, value, key) in refused {
            let mut settings = Settings::default();
            table(&mut settings.log.kafka).insert(name.into(), value.into());
            match settings.validate() {
                Err(ConfigError::Invalid { key: named, why }) => {
                    assert_eq!(named, key, "{name}");
                    assert!(why.contains(name), "names {name}: {why}");
                }
                other => panic!("{name}={value}: expected a refusal, got {other:?}"),
            }
        }
        let kept = [
            (consumer, "session_timeout_ms", "10000"),
            (consumer, "enable_auto_commit", "false"),
            (consumer, "partition_assignment_strategy", "roundrobin"),
            (consumer, "isolation_level", "read_committed"),
            (producer, "acks", "all"),
            (producer, "enable_idempotence", "true"),
            (producer, "linger_ms", "5"),
            // A consumer-only property in the producers' table reaches no consumer.
            (producer, "auto_offset_reset", "latest"),
        ];
        for (table, name, value) in kept {
            let mut settings = Settings::default();
            table(&mut settings.log.kafka).insert(name.into(), value.into());
            assert!(settings.validate().is_ok(), "{name}={value} is harmless");
        }
    }
}
