//! Settings: config.toml, overridden by `POLLCAST__SECTION__KEY` environment variables.
//!
//! Two layers. [`RawSettings`] is what an operator writes: config.toml's keys with their
//! defaults, every section rejecting unknown keys. [`Settings::load`] reads it and parses it
//! once into [`Settings`], where every value has its type (a `SocketAddr`, a `Duration`, an
//! [`Origin`], a [`Secret`], an enum naming the backend chosen with that backend's settings),
//! so a typo or a bad value stops start-up with a message naming the key, and nothing
//! downstream checks a value again. Each section has its file: the raw section, the typed
//! one, and the parse between them.

mod actors;
mod auth;
mod dedup;
mod http;
mod log;
mod rate_limit;
mod secret;
mod store;
mod webhooks;

use std::path::{Path, PathBuf};

use pollcast_actors::RestartPolicy;
use serde::Deserialize;

pub use actors::{AggregatorSettings, RawAggregator, RawSupervision};
pub use auth::{AdminSettings, RawAdmin, RawVoters, VoterIdentity, VoterSettings};
pub use dedup::{DedupKind, DedupSettings, GuardSettings, RawDedup};
pub use http::{
    DEFAULT_MAX_CONNECTIONS_PER_IP, HttpSettings, Origin, RawHttp, SocketIoSettings, TlsFiles,
};
pub use log::{FileLogSettings, KafkaSection, LogKind, LogSettings, RawKafka, RawLog};
pub use rate_limit::{Rate, RateLimitSettings, RawRateLimit};
pub use secret::{Secret, ServiceUrl, redact_url};
pub use store::{RawStore, StoreSettings, StoreUrl};
pub use webhooks::{RawWebhooks, WebhookSettings};

/// Environment variables with this prefix override config.toml (`POLLCAST__HTTP__ADDR`).
pub const ENV_PREFIX: &str = "POLLCAST";

/// All of pollcast's settings as written: config.toml's keys and their defaults. Not Debug:
/// it holds secrets as plain text.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSettings {
    /// HTTP server.
    pub http: RawHttp,
    /// Poll store.
    pub store: RawStore,
    /// Vote log.
    pub log: RawLog,
    /// Duplicate guard.
    pub dedup: RawDedup,
    /// Aggregators.
    pub aggregator: RawAggregator,
    /// Restart budgets.
    pub supervision: RawSupervision,
    /// Administration.
    pub admin: RawAdmin,
    /// Rate limits.
    pub rate_limit: RawRateLimit,
    /// Who a voter is.
    pub voters: RawVoters,
    /// Delivery of poll webhooks.
    pub webhooks: RawWebhooks,
    /// The seed's Socket.IO clients.
    pub socketio: SocketIoSettings,
}

/// All of pollcast's settings, checked and typed. Its Debug output shows no secret.
#[derive(Debug, Clone)]
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
    /// The restart policy of every supervisor.
    pub supervision: RestartPolicy,
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

impl ConfigError {
    fn invalid(key: &'static str, why: impl Into<String>) -> Self {
        Self::Invalid {
            key,
            why: why.into(),
        }
    }
}

impl Settings {
    /// Loads `path` (which must exist when `required`), then applies `POLLCAST__…`
    /// environment overrides, then parses the result.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        if required && !path.exists() {
            return Err(ConfigError::Missing(path.to_owned()));
        }
        let raw: RawSettings = config::Config::builder()
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
        Self::parse(raw)
    }

    /// Checks every value of `raw` and gives it its type; the error names the first key
    /// found unusable.
    pub fn parse(raw: RawSettings) -> Result<Self, ConfigError> {
        let behind_proxy = raw.rate_limit.client_ip_header.is_some();
        Ok(Self {
            http: raw.http.parse(behind_proxy)?,
            store: raw.store.parse()?,
            log: raw.log.parse()?,
            dedup: raw.dedup.parse()?,
            aggregator: raw.aggregator.parse()?,
            supervision: raw.supervision.parse()?,
            rate_limit: raw.rate_limit.parse()?,
            voters: raw.voters.parse()?,
            admin: raw.admin.parse()?,
            webhooks: raw.webhooks.parse()?,
            socketio: raw.socketio,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn debug_output_hides_every_secret() {
        let mut raw = RawSettings::default();
        raw.store.url = "postgres://pollcast:db-password@db:5432/pollcast".into();
        raw.dedup.kind = DedupKind::Redis;
        raw.dedup.redis_url = "redis://:redis-password@cache:6379".into();
        raw.admin.token = Some("admin-token-value".into());
        raw.voters.identity = VoterIdentity::Signed;
        raw.voters.secret = Some("voter-signing-secret-of-32-characters".into());
        let settings = Settings::parse(raw).expect("valid");
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
    fn values_are_parsed_once_into_their_types() {
        let mut raw = RawSettings::default();
        raw.http.public_url = Some("https://polls.example.com/".into());
        raw.http.tls_cert_path = Some("cert.pem".into());
        raw.http.tls_key_path = Some("key.pem".into());
        raw.rate_limit.per_user_burst = 0;
        raw.rate_limit.per_ip_per_sec = 0;
        let settings = Settings::parse(raw.clone()).expect("valid");
        assert_eq!(settings.http.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(
            settings.http.public_url.as_deref(),
            Some("https://polls.example.com")
        );
        assert!(settings.http.tls.is_some());
        assert_eq!(
            settings.http.max_connections_per_ip,
            DEFAULT_MAX_CONNECTIONS_PER_IP
        );
        assert!(
            settings.rate_limit.per_ip.is_none(),
            "a rate of 0: no limit"
        );
        let per_user = settings.rate_limit.per_user.expect("a limit");
        assert_eq!((per_user.per_second.get(), per_user.burst.get()), (5, 1));
        assert!(matches!(settings.store.url, StoreUrl::Sqlite(_)));
        assert!(matches!(settings.log, LogSettings::Embedded(_)));
        assert!(matches!(settings.dedup.guard, GuardSettings::Memory));
        assert!(matches!(settings.voters, VoterSettings::Body));

        // Behind a proxy every connection comes from its address: no cap unless one is set.
        raw.rate_limit.client_ip_header = Some("x-forwarded-for".into());
        let proxied = Settings::parse(raw.clone()).expect("valid");
        assert_eq!(proxied.http.max_connections_per_ip, 0);
        raw.http.max_connections_per_ip = Some(7);
        let capped = Settings::parse(raw).expect("valid");
        assert_eq!(capped.http.max_connections_per_ip, 7);
    }

    #[test]
    fn the_counts_topic_has_one_partition_unless_set_and_no_topic_setting_may_be_zero() {
        let mut raw = RawSettings::default();
        raw.log.kind = LogKind::Kafka;
        let LogSettings::Kafka(kafka) = Settings::parse(raw.clone()).expect("valid").log else {
            panic!("kafka chosen");
        };
        assert_eq!((kafka.partitions, kafka.poll_updates_partitions), (6, 1));
        type Spoil = fn(&mut RawKafka);
        let cases: [(Spoil, &str); 3] = [
            (|k| k.partitions = 0, "log.kafka.partitions"),
            (
                |k| k.poll_updates_partitions = 0,
                "log.kafka.poll_updates_partitions",
            ),
            (|k| k.replication_factor = 0, "log.kafka.replication_factor"),
        ];
        for (spoil, key) in cases {
            let mut spoiled = raw.clone();
            spoil(&mut spoiled.log.kafka);
            match Settings::parse(spoiled) {
                Err(ConfigError::Invalid { key: named, .. }) => assert_eq!(named, key),
                other => panic!("{key}: expected an error naming it, got {other:?}"),
            }
        }
    }

    #[test]
    fn bad_webhook_settings_name_their_key() {
        type Spoil = fn(&mut RawWebhooks);
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
            let mut raw = RawSettings::default();
            spoil(&mut raw.webhooks);
            match Settings::parse(raw) {
                Err(ConfigError::Invalid { key: named, .. }) => assert_eq!(named, key),
                other => panic!("{key}: expected an error naming it, got {other:?}"),
            }
        }
        assert!(Settings::parse(RawSettings::default()).is_ok());
    }

    #[test]
    fn kafka_properties_that_break_exactly_once_are_refused_naming_them() {
        type Table = fn(&mut RawKafka) -> &mut HashMap<String, String>;
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
            let mut raw = RawSettings::default();
            table(&mut raw.log.kafka).insert(name.into(), value.into());
            match Settings::parse(raw) {
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
            let mut raw = RawSettings::default();
            table(&mut raw.log.kafka).insert(name.into(), value.into());
            assert!(Settings::parse(raw).is_ok(), "{name}={value} is harmless");
        }
    }
}
