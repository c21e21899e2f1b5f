//! librdkafka client configurations: pollcast's defaults for each kind of client, then the
//! operator's `log.kafka.*properties` over them (config.rs has already refused those that
//! would break counting exactly once).

use rdkafka::config::ClientConfig;

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

    /// An admin client's configuration (topic creation).
    pub(super) fn admin_config(&self) -> ClientConfig {
        self.client_config(Role::Admin, &[])
    }

    /// A producer's configuration: `defaults`, then the operator's properties over them.
    pub(super) fn producer_config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        self.client_config(Role::Producer, defaults)
    }

    /// A consumer's configuration in `group`, starting where `offset_reset` says when the
    /// group has no committed offset: what every consumer of pollcast's has (group
    /// membership, offsets committed only by pollcast, short fetch waits), then `defaults`,
    /// then the operator's properties over them.
    pub(super) fn consumer_config(
        &self,
        group: &str,
        offset_reset: &str,
        defaults: &[(&str, &str)],
    ) -> ClientConfig {
        let every_consumer = [
            GROUP_DEFAULTS[0],
            GROUP_DEFAULTS[1],
            ("group.id", group),
            ("enable.auto.commit", "false"),
            ("auto.offset.reset", offset_reset),
            // Why not the default 500 ms: at low traffic the broker holds a fetch that long
            // for more bytes, and each vote (and each count from another process) waits it
            // out on its way to the screen.
            ("fetch.wait.max.ms", "50"),
        ];
        let all: Vec<(&str, &str)> = every_consumer
            .into_iter()
            .chain(defaults.iter().copied())
            .collect();
        self.client_config(Role::Consumer, &all)
    }
}

/// Group membership defaults of every consumer (operators may override them).
///
/// Why these: librdkafka's 45 s session timeout means a crashed process's partitions, and
/// the polls in them, wait 45 s and more before another process counts them. 6000 ms is the
/// least a Kafka broker accepts by default (`group.min.session.timeout.ms`); a broker
/// configured otherwise refuses it, which pollcast reports naming the property. Heartbeats
/// every second also tell the survivors of a rebalance within a second.
pub(super) const GROUP_DEFAULTS: [(&str, &str); 2] = [
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "1000"),
];
