//! Kafka client settings, in one place: every service, stage, tool and test builds its
//! producers and consumers here, so the settings that matter (BROKER.md) hold
//! everywhere and are changed once.

use std::time::Duration;

use rdkafka::config::ClientConfig;

/// Where the local development stack's broker listens (see `./dev up`).
pub const DEFAULT_BOOTSTRAP: &str = "127.0.0.1:19092";

/// How to reach the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    /// `host:port[,host:port...]`.
    pub bootstrap: String,
    /// Names this process in broker logs and quotas.
    pub client_id: String,
}

impl KafkaSettings {
    pub fn new(bootstrap: impl Into<String>, client_id: impl Into<String>) -> Self {
        KafkaSettings {
            bootstrap: bootstrap.into(),
            client_id: client_id.into(),
        }
    }

    /// From `CLISONIX_KAFKA_BOOTSTRAP`, else the local stack's address.
    pub fn from_env(client_id: impl Into<String>) -> Self {
        let bootstrap = std::env::var("CLISONIX_KAFKA_BOOTSTRAP")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_BOOTSTRAP.to_owned());
        KafkaSettings::new(bootstrap, client_id)
    }

    fn base(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("client.id", &self.client_id)
            // Fail fast on a wrong address instead of retrying quietly for minutes.
            .set("socket.connection.setup.timeout.ms", "10000");
        config
    }

    /// A producer that never loses or duplicates an acknowledged record: idempotent,
    /// acks from all in-sync replicas, batches lingering a few milliseconds (one batch
    /// per record costs the broker far more under load), lz4-compressed.
    pub fn producer(&self) -> ClientConfig {
        let mut config = self.base();
        config
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("message.timeout.ms", "30000");
        config
    }

    /// A consumer in `group` that commits explicitly, reads only committed
    /// transactional output, and fetches with low latency (the default
    /// `fetch.wait.max.ms` of 500 ms would dominate end-to-end latency).
    pub fn consumer(&self, group: &str) -> ClientConfig {
        let mut config = self.base();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "20")
            .set("session.timeout.ms", "10000")
            .set("partition.assignment.strategy", "cooperative-sticky");
        config
    }

    /// An admin or metadata client.
    pub fn admin(&self) -> ClientConfig {
        self.base()
    }
}

/// How long admin and metadata calls wait for the cluster.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);
