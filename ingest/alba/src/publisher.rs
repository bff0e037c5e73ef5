//! The one place ingest writes to Kafka: an idempotent producer (`acks=all`) whose
//! confirmations decide every answer, a bound on unconfirmed bytes, and a probe that
//! knows whether the broker answers.
//!
//! Backpressure, not buffering: a group of frames first takes its size from the
//! in-flight budget ([`Config::max_in_flight_bytes`]); when the budget stays exhausted
//! the group is refused as overloaded (429). When the broker does not answer, the
//! producer's `message.timeout.ms` ([`Config::publish_timeout`]) fails the writes, the
//! probe marks the broker down, and later groups are refused at once (503) until it
//! answers again. Nothing is queued beyond those bounds and nothing is dropped silently.
//!
//! Several producers, each partition through one: librdkafka puts one partition's
//! batch in a produce request and ingest keeps one request in flight per connection,
//! so through one producer the broker writes one partition at a time. Ingest writes
//! through [`Config::producers`] producers (each its own connection), and a record's
//! key picks the producer ([`lane`]) the way librdkafka's partitioner picks its
//! partition, so when their count divides a topic's partitions each partition is
//! written by one producer: its order is kept, its batches are not split between
//! connections, and the broker works on several partitions at once.
//!
//! No copies: a record's bytes (usually a slice of the request body they came in) are
//! handed to librdkafka as they are, referenced by the produce request rather than
//! copied into it, written uncompressed (EEG frames do not compress), and kept alive by
//! their group until the broker confirms them (see [`producer_config`]).
//!
//! [`Config::max_in_flight_bytes`]: crate::config::Config::max_in_flight_bytes
//! [`Config::publish_timeout`]: crate::config::Config::publish_timeout
//! [`Config::producers`]: crate::config::Config::producers

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext};
use rdkafka::error::KafkaError;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::Timeout;
use rdkafka::IntoOpaque;
use rdkafka::{ClientContext, Statistics};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::{Metrics, ProducerMetrics};

/// How long a group waits for room in the in-flight budget before it is refused as
/// overloaded.
pub const BUDGET_WAIT: Duration = Duration::from_secs(1);

/// One record to write. Its bytes are shared, not copied: librdkafka reads them where
/// they are until the broker confirms the record (see [`Publisher::publish`]).
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Bytes,
    pub value: Bytes,
    pub timestamp_ms: i64,
}

/// Why a record was not written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("the broker did not confirm the write: {0}")]
    Unavailable(String),
    #[error("ingest holds as much unconfirmed data as it may")]
    Overloaded,
}

/// A group of records written together: the broker's confirmations are counted here
/// (on librdkafka's polling thread) and the group's task is woken once, when the last
/// one is in, instead of once per record.
#[derive(Debug)]
struct Group {
    remaining: AtomicUsize,
    /// The first record that failed, and why; every later record counts as failed too.
    failed: Mutex<Option<(usize, String)>>,
    done: Notify,
    /// The records being written. librdkafka reads their bytes in place rather than
    /// copying them, so they live as long as the group: until its last confirmation.
    records: Vec<Record>,
}

impl Group {
    fn settle(&self, index: usize, error: Option<String>) {
        if let Some(e) = error {
            let mut failed = self.failed.lock().expect("not poisoned");
            if failed.as_ref().is_none_or(|(i, _)| index < *i) {
                *failed = Some((index, e));
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }
}

/// Turns librdkafka's statistics (every `statistics.interval.ms`) into
/// [`ProducerMetrics`]: its running totals become increments since its previous
/// report, and its windows, which restart at every report, are added whole.
#[derive(Debug)]
pub struct ProducerStats {
    metrics: ProducerMetrics,
    /// Per broker: produce requests and bytes sent at the previous report.
    seen: Mutex<HashMap<String, (u64, u64)>>,
}

impl ProducerStats {
    pub fn new(metrics: ProducerMetrics) -> ProducerStats {
        ProducerStats {
            metrics,
            seen: Mutex::new(HashMap::new()),
        }
    }

    pub fn observe(&self, statistics: &Statistics) {
        let mut seen = self.seen.lock().expect("not poisoned");
        for (name, broker) in &statistics.brokers {
            let produce = broker.req.get("Produce").copied().unwrap_or(0).max(0) as u64;
            let before = seen.insert(name.clone(), (produce, broker.txbytes));
            let (produce_before, bytes_before) = before.unwrap_or((0, 0));
            // A total below the previous report's counts from zero again.
            let since = |now: u64, then: u64| if now >= then { now - then } else { now };
            let m = &self.metrics;
            m.produce_requests.inc_by(since(produce, produce_before));
            m.sent_bytes.inc_by(since(broker.txbytes, bytes_before));
            if let Some(w) = broker.rtt.as_ref().filter(|w| w.cnt > 0) {
                m.round_trips.inc_by(w.cnt as u64);
                m.round_trip_seconds.inc_by(w.sum.max(0) as f64 / 1e6);
            }
            if let Some(w) = broker.int_latency.as_ref().filter(|w| w.cnt > 0) {
                m.queued_records.inc_by(w.cnt as u64);
                m.queue_wait_seconds.inc_by(w.sum.max(0) as f64 / 1e6);
            }
        }
    }
}

/// The producer's context: hands each confirmation to its record's group, and its
/// statistics to the metrics.
struct Confirmations {
    stats: ProducerStats,
}

impl ClientContext for Confirmations {
    fn stats(&self, statistics: Statistics) {
        self.stats.observe(&statistics);
    }
}

impl ProducerContext for Confirmations {
    /// The record's group and its position in it.
    type DeliveryOpaque = Box<(Arc<Group>, usize)>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let (group, index) = *opaque;
        group.settle(index, result.as_ref().err().map(|(e, _)| e.to_string()));
    }
}

type KafkaProducer = ThreadedProducer<Confirmations>;

/// Which of `lanes` producers writes a record with `key`: librdkafka's own keyed
/// partitioner (the key's CRC32 modulo the count) asked for `lanes` partitions. The
/// partition librdkafka then picks is the same CRC32 modulo the topic's partition
/// count, so when `lanes` divides that count, all of a partition's records go through
/// one producer (the partition modulo `lanes`).
#[allow(unsafe_code)]
pub fn lane(key: &[u8], lanes: usize) -> usize {
    if lanes <= 1 {
        return 0;
    }
    let lanes = i32::try_from(lanes).unwrap_or(i32::MAX);
    // SAFETY: the partitioner reads `key.len()` bytes at `key` and nothing else (it
    // does not use the topic or the opaques, which may be null).
    let lane = unsafe {
        rdkafka::bindings::rd_kafka_msg_partitioner_consistent(
            std::ptr::null(),
            key.as_ptr().cast(),
            key.len(),
            lanes,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    lane as usize
}

/// Hands one record to librdkafka without copying its bytes (`RD_KAFKA_MSG_F_COPY`
/// unset, unlike rust-rdkafka's `send`): the key and value are read where they are,
/// by the partitioner now and, the value, by the write of its produce request later.
#[allow(unsafe_code)]
fn produce(
    producer: &KafkaProducer,
    topic: &CStr,
    record: &Record,
    opaque: Box<(Arc<Group>, usize)>,
) -> Result<(), RDKafkaErrorCode> {
    use rdkafka::bindings::{self as rdsys, rd_kafka_vtype_t::*};
    let opaque = opaque.into_ptr();
    // SAFETY: the pointers are valid for the lengths given. The bytes they point to
    // belong to `record`, which the group in `opaque` owns; librdkafka hands `opaque`
    // back exactly once, in the record's delivery report ([`Confirmations::delivery`]),
    // and drops its own use of the bytes before that. So they outlive librdkafka's
    // reads, even if the waiting task is dropped. The variadic arguments follow
    // rust-rdkafka's own call, with flags 0 instead of `RD_KAFKA_MSG_F_COPY`.
    let error = unsafe {
        rdsys::rd_kafka_producev(
            producer.client().native_ptr(),
            RD_KAFKA_VTYPE_TOPIC,
            topic.as_ptr(),
            RD_KAFKA_VTYPE_PARTITION,
            -1i32,
            RD_KAFKA_VTYPE_MSGFLAGS,
            0 as c_int,
            RD_KAFKA_VTYPE_VALUE,
            record.value.as_ptr() as *mut c_void,
            record.value.len(),
            RD_KAFKA_VTYPE_KEY,
            record.key.as_ptr() as *mut c_void,
            record.key.len(),
            RD_KAFKA_VTYPE_OPAQUE,
            opaque,
            RD_KAFKA_VTYPE_TIMESTAMP,
            record.timestamp_ms,
            RD_KAFKA_VTYPE_END,
        )
    };
    if error == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        // SAFETY: librdkafka refused the record and did not keep `opaque`; this takes
        // back the box made above, once.
        drop(unsafe { Box::<(Arc<Group>, usize)>::from_ptr(opaque) });
        Err(error.into())
    }
}

/// Ingest's producer settings: the project's ([`KafkaSettings::producer`]) and
/// - `message.timeout.ms` at the publish timeout;
/// - librdkafka's own queue bounded by the in-flight budget (plus headroom for usage
///   events), so it never holds more than ingest admitted;
/// - one produce request in flight per broker connection instead of five. The broker
///   serves a connection's requests one at a time anyway, and while one is served the
///   groups of many requests gather into the next, so requests are fewer and fuller.
///   In the ingest benchmark (alternating, 12 runs each, three times) librdkafka's CPU
///   per frame fell by about half (5.4–7.2 to 3.0–3.7 µs) and the rate held or rose.
///   Ordering and idempotence are unchanged.
/// - no compression instead of lz4: EEG frames do not compress (lz4 makes the
///   reference recording's 1/8 s frames 1.00 of their size), and compressing them cost
///   librdkafka's broker thread about a fifth of its time, a fresh output buffer per
///   request, and the broker a decompression to check every batch;
/// - records referenced in the request, not copied into it (`message.copy.max.bytes`
///   0, librdkafka's default copies records up to 64 KiB): ingest hands them over
///   without copying ([`Publisher::publish`]) and keeps them until the broker confirms
///   them, so the request is written to the socket from where they lie.
///
/// Together, in the ingest benchmark (alternating on one running broker, six benchmarks
/// each), the machine's CPU per frame of binary ingest fell from 14.1–19.4 to
/// 11.6–13.4 µs and the benchmark's binary/raw medians rose from 0.69–0.87 to
/// 0.75–0.89 (on a fresh broker each they stayed at 0.67–0.92, median 0.78).
///
/// [`KafkaSettings::producer`]: clisonix_topics::KafkaSettings::producer
pub fn producer_config(
    settings: &clisonix_topics::KafkaSettings,
    timeout: Duration,
    max_in_flight_bytes: usize,
) -> ClientConfig {
    let mut config = settings.producer();
    config
        .set("message.timeout.ms", timeout.as_millis().to_string())
        .set(
            "queue.buffering.max.kbytes",
            (max_in_flight_bytes / 1024 + 16 * 1024).to_string(),
        )
        .set("max.in.flight.requests.per.connection", "1")
        .set("linger.ms", "20")
        .set("compression.type", "none")
        .set("message.copy.max.bytes", "0");
    config
}

pub struct Publisher {
    /// The producers records are written through, picked by [`lane`]; one is made
    /// again in its place after a fatal error.
    producers: Vec<RwLock<Arc<KafkaProducer>>>,
    /// What a producer is made from.
    client_config: ClientConfig,
    publish_timeout: Duration,
    /// Unconfirmed bytes, in KiB permits.
    budget: Arc<Semaphore>,
    budget_kib: u32,
    /// What the probe (and the last failed write) says; groups fail fast while false.
    broker_up: AtomicBool,
    /// The topic the probe asks about.
    probe_topic: String,
    metrics: Metrics,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("bootstrap", &self.client_config.get("bootstrap.servers"))
            .field("producers", &self.producers.len())
            .field("broker_up", &self.broker_up())
            .field("budget_kib", &self.budget_kib)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    pub fn new(
        config: &Config,
        probe_topic: String,
        metrics: Metrics,
    ) -> Result<Publisher, KafkaError> {
        let budget_kib = u32::try_from(config.max_in_flight_bytes / 1024)
            .unwrap_or(u32::MAX)
            .max(1);
        let mut client_config = producer_config(
            &config.kafka,
            config.publish_timeout,
            config.max_in_flight_bytes,
        );
        client_config.set(
            "statistics.interval.ms",
            config.producer_stats_interval.as_millis().to_string(),
        );
        let producers = (0..config.producers.max(1))
            .map(|_| Self::create(&client_config, &metrics).map(RwLock::new))
            .collect::<Result<_, _>>()?;
        let publisher = Publisher {
            producers,
            client_config,
            publish_timeout: config.publish_timeout,
            budget: Arc::new(Semaphore::new(budget_kib as usize)),
            budget_kib,
            broker_up: AtomicBool::new(false),
            probe_topic,
            metrics,
        };
        Ok(publisher)
    }

    fn create(config: &ClientConfig, metrics: &Metrics) -> Result<Arc<KafkaProducer>, KafkaError> {
        let context = Confirmations {
            stats: ProducerStats::new(metrics.producer.clone()),
        };
        KafkaProducer::from_config_and_context(config, context).map(Arc::new)
    }

    fn producer(&self, lane: usize) -> Arc<KafkaProducer> {
        self.producers[lane].read().expect("not poisoned").clone()
    }

    pub fn broker_up(&self) -> bool {
        self.broker_up.load(Ordering::Relaxed)
    }

    /// Writes `records` to `topic` in order and waits for the broker. Results are per
    /// record, in order; after a failure every later record of the group also counts
    /// as failed (it may have been written: the client's resend is then a duplicate
    /// that downstream recognises by sequence number, never a loss).
    pub async fn publish(
        &self,
        topic: &str,
        records: Vec<Record>,
    ) -> Vec<Result<(), PublishError>> {
        if records.is_empty() {
            return Vec::new();
        }
        if !self.broker_up() {
            let e = PublishError::Unavailable("the broker is not answering".into());
            return vec![Err(e); records.len()];
        }
        let bytes: usize = records.iter().map(|r| r.key.len() + r.value.len()).sum();
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.budget_kib);
        let permit =
            match tokio::time::timeout(BUDGET_WAIT, self.budget.clone().acquire_many_owned(kib))
                .await
            {
                Ok(Ok(permit)) => permit,
                _ => return vec![Err(PublishError::Overloaded); records.len()],
            };
        self.metrics.in_flight_bytes.add(bytes as i64);
        let started = Instant::now();
        let producers: Vec<_> = (0..self.producers.len())
            .map(|i| self.producer(i))
            .collect();
        let count = records.len();
        let group = Arc::new(Group {
            remaining: AtomicUsize::new(count),
            failed: Mutex::new(None),
            done: Notify::new(),
            records,
        });
        match CString::new(topic) {
            Ok(name) => {
                // A group of frames is one session's, so one key: its lane is computed
                // once per run of equal keys, not per record.
                let mut last: Option<(&[u8], usize)> = None;
                for (i, r) in group.records.iter().enumerate() {
                    let picked = match last {
                        Some((key, picked)) if key == &r.key[..] => picked,
                        _ => lane(&r.key, producers.len()),
                    };
                    last = Some((&r.key, picked));
                    let producer = &producers[picked];
                    if let Err(e) = produce(producer, &name, r, Box::new((group.clone(), i))) {
                        group.settle(i, Some(e.to_string()));
                    }
                }
            }
            Err(e) => (0..count).for_each(|i| group.settle(i, Some(e.to_string()))),
        }
        let confirmed =
            tokio::time::timeout(self.publish_timeout + Duration::from_secs(5), async {
                while group.remaining.load(Ordering::Acquire) > 0 {
                    group.done.notified().await;
                }
            })
            .await;
        self.metrics.in_flight_bytes.sub(bytes as i64);
        drop(permit);
        let failed = match confirmed {
            Ok(()) => group.failed.lock().expect("not poisoned").take(),
            Err(_) => Some((0, "no confirmation within the publish timeout".to_owned())),
        };
        let results = (0..count)
            .map(|i| match &failed {
                Some((first, e)) if i >= *first => Err(PublishError::Unavailable(e.clone())),
                _ => Ok(()),
            })
            .collect();
        if let Some((_, e)) = failed {
            tracing::warn!(error = %e, topic, "the broker did not confirm frames");
            self.broker_up.store(false, Ordering::Relaxed);
            self.metrics.broker_up.set(0);
            for (lane, producer) in producers.iter().enumerate() {
                self.replace_if_fatal(lane, producer);
            }
        } else {
            self.metrics
                .publish_latency
                .observe(started.elapsed().as_secs_f64());
        }
        results
    }

    /// A producer in a fatal state (librdkafka says so after some idempotence
    /// failures) cannot write again: a new one takes its place.
    fn replace_if_fatal(&self, lane: usize, producer: &KafkaProducer) {
        if let Some(fatal) = producer.client().fatal_error() {
            tracing::error!(
                ?fatal,
                lane,
                "a producer failed fatally; creating a new one"
            );
            match Self::create(&self.client_config, &self.metrics) {
                Ok(fresh) => *self.producers[lane].write().expect("not poisoned") = fresh,
                Err(error) => tracing::error!(%error, "creating a new producer failed"),
            }
        }
    }

    /// Asks the broker for the probe topic's metadata; true when every partition has a
    /// leader.
    pub async fn probe(&self) -> bool {
        let producer = self.producer(0);
        let topic = self.probe_topic.clone();
        let up = tokio::task::spawn_blocking(move || {
            match producer
                .client()
                .fetch_metadata(Some(&topic), Timeout::After(Duration::from_secs(2)))
            {
                Ok(md) => md.topics().iter().any(|t| {
                    t.name() == topic
                        && t.error().is_none()
                        && !t.partitions().is_empty()
                        && t.partitions().iter().all(|p| p.leader() >= 0)
                }),
                Err(_) => false,
            }
        })
        .await
        .unwrap_or(false);
        let was = self.broker_up.swap(up, Ordering::Relaxed);
        if was != up {
            if up {
                tracing::info!(topic = %self.probe_topic, "the broker answers");
            } else {
                tracing::warn!(topic = %self.probe_topic, "the broker does not answer");
            }
        }
        self.metrics.broker_up.set(i64::from(up));
        up
    }

    /// Probes every second while the broker is down and every five while it is up.
    pub async fn run_probe(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let up = self.probe().await;
            let wait = if up {
                Duration::from_secs(5)
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Waits for everything produced to be confirmed (graceful shutdown), by every
    /// producer within `timeout` in all; the first producer's error, if any.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let deadline = Instant::now() + timeout;
        let mut first = Ok(());
        for lane in 0..self.producers.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let flushed = self.producer(lane).flush(Timeout::After(left));
            first = first.and(flushed);
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_picks_its_producer_as_librdkafka_picks_its_partition() {
        // librdkafka's keyed partitioner: the key's CRC-32 (0xCBF43926 for "123456789",
        // the standard check value) modulo the count.
        let key = b"123456789";
        assert_eq!(lane(key, 6), (0xCBF4_3926u32 % 6) as usize);
        assert_eq!(lane(key, 5), (0xCBF4_3926u32 % 5) as usize);
        // With a count that divides a topic's partitions, a partition's keys share one
        // producer: the partition modulo the count.
        for i in 0..1000u32 {
            let key = i.to_be_bytes();
            for lanes in [2, 3, 6] {
                assert_eq!(lane(&key, lanes), lane(&key, 6) % lanes);
            }
        }
        assert_eq!(lane(key, 1), 0);
        assert_eq!(lane(b"", 4), 0);
    }

    #[test]
    fn the_producer_is_idempotent_with_one_request_in_flight_a_bounded_queue_and_no_copies() {
        let settings = clisonix_topics::KafkaSettings::new("127.0.0.1:1", "t");
        let config = producer_config(&settings, Duration::from_secs(10), 128 << 20);
        for (key, value) in [
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("max.in.flight.requests.per.connection", "1"),
            ("linger.ms", "20"),
            ("compression.type", "none"),
            ("message.copy.max.bytes", "0"),
            ("message.timeout.ms", "10000"),
            ("queue.buffering.max.kbytes", "147456"),
        ] {
            assert_eq!(config.get(key), Some(value), "{key}");
        }
        // librdkafka accepts the combination (it refuses idempotence with more than 5).
        let context = Confirmations {
            stats: ProducerStats::new(ProducerMetrics::new()),
        };
        let _: ThreadedProducer<Confirmations> =
            ThreadedProducer::from_config_and_context(&config, context).unwrap();
    }
}
