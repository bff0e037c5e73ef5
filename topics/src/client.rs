//! Kafka client settings, in one place: every service, stage, tool and test builds its
//! producers and consumers here, so the settings that matter (BROKER.md) hold
//! everywhere and are changed once.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaResult;
use rdkafka::producer::{Partitioner, Producer, ProducerContext};

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
    /// transactional output, and fetches up to 1 MB or 20 ms (the default
    /// `fetch.wait.max.ms` of 500 ms would dominate end-to-end latency; fetching as soon
    /// as one record is there makes a request per record when devices are spread).
    pub fn consumer(&self, group: &str) -> ClientConfig {
        let mut config = self.base();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "20")
            .set("fetch.min.bytes", "1048576")
            // Read-ahead of at most 16 MB (librdkafka's default is 64 MB): a consumer
            // that is behind otherwise holds that much on top of its own memory (the
            // sink grew to 300 MB and Albi to 200 MB at 750 devices), and 16 MB is over
            // a second of eeg.frames at 5,000 frames/s.
            .set("queued.max.messages.kbytes", "16384")
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

/// Commits `producer`'s open transaction, waiting for its records' confirmations first
/// so that it does not pay rust-rdkafka's 100 ms.
///
/// `Producer::commit_transaction` flushes first, and its flush, finding any record not
/// yet confirmed, polls the producer's queue for a full 100 ms (its poll returns at the
/// deadline, not at the first event), even when another thread serves the delivery
/// reports, as a `ThreadedProducer`'s (and so a `FutureProducer`'s) does. A stage that
/// commits right after producing paid it on most transactions: a window's features
/// became visible to read-committed consumers ~100 ms after they were produced instead
/// of ~5 ms. Here the confirmations are awaited in steps of 200 µs (served by the
/// producer's own thread), so that flush finds nothing to wait for; past `timeout` the
/// commit is left to fail or succeed as librdkafka decides.
pub fn commit_transaction<C, Part, P>(producer: &P, timeout: Duration) -> KafkaResult<()>
where
    C: ProducerContext<Part>,
    Part: Partitioner,
    P: Producer<C, Part>,
{
    let started = Instant::now();
    while producer.in_flight_count() > 0 && started.elapsed() < timeout {
        std::thread::sleep(Duration::from_micros(200));
    }
    producer.commit_transaction(timeout.saturating_sub(started.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_read_committed_records_in_fetches_bounded_by_size_and_time() {
        let config = KafkaSettings::new("127.0.0.1:1", "t").consumer("g");
        for (key, value) in [
            ("group.id", "g"),
            ("enable.auto.commit", "false"),
            ("isolation.level", "read_committed"),
            ("fetch.wait.max.ms", "20"),
            ("fetch.min.bytes", "1048576"),
            ("queued.max.messages.kbytes", "16384"),
        ] {
            assert_eq!(config.get(key), Some(value), "{key}");
        }
        // librdkafka accepts the combination.
        let _: rdkafka::consumer::BaseConsumer = config.create().unwrap();
    }
}
