//! The loop of the consumers that leave Kafka for Postgres (the results sink and
//! metering): consume a batch, decode it, hand it to a [`TableWriter`] that writes it
//! in one database transaction, and only then commit the batch's offsets.
//!
//! - While the database is away, the batch is retried with backoff, never skipped, and
//!   `/ready` says not ready.
//! - Records that do not decode go to the dead-letter topic (before the write, so a
//!   crash in between writes a letter twice, never none), and reach the writer as
//!   `None`: a writer that keeps its own offsets moves them past such records too.
//! - What a crash between the write and the offset commit leaves is the writer's to
//!   absorb: the sink's rows are idempotent, metering's transaction records the offsets
//!   it applied.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clisonix_stage::{Position, Rejection};
use clisonix_topics::catalog::DEAD_LETTERS;
use clisonix_topics::{KafkaSettings, Topics};
use rdkafka::consumer::{CommitMode, Consumer, DefaultConsumerContext, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::task::block_in_place;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::http::Health;
use crate::runner::{dead_letter, update_lag};
use crate::RuntimeError;

const LAG_EVERY: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How a Postgres consumer connects and batches.
#[derive(Debug, Clone)]
pub struct TablesConfig {
    pub kafka: KafkaSettings,
    pub topics: Topics,
    pub group: String,
    pub batch_max: usize,
    pub batch_linger: Duration,
}

/// What a Postgres consumer does with its records.
pub trait TableWriter: Send + Sync {
    type Record: Send + Sync;

    /// Its name: the `stage` label of its metrics and dead letters.
    fn name(&self) -> &'static str;

    /// The topics it reads.
    fn inputs(&self) -> Vec<String>;

    /// Decodes a record, or says why it goes to the dead-letter topic.
    fn decode(&self, m: &OwnedMessage) -> Result<Self::Record, Rejection>;

    /// Writes a batch (records that did not decode are `None`) in one transaction;
    /// returns rows written per table, for metrics.
    fn write(
        &self,
        batch: &[(Position, Option<Self::Record>)],
    ) -> impl Future<Output = Result<Vec<(&'static str, u64)>, String>> + Send;

    /// Work done every few seconds between batches (metering starts and closes
    /// billing periods).
    fn tick(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Runs `writer` until `shutdown` is cancelled (after the batch in hand is written and
/// committed, or abandoned uncommitted if the database is away) or Kafka fails.
pub async fn run_tables<W: TableWriter>(
    writer: W,
    config: TablesConfig,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let name = writer.name();
    let version = env!("CARGO_PKG_VERSION");
    let kafka = |what: &'static str| move |source| RuntimeError::Kafka { what, source };
    let consumer: StreamConsumer = config
        .kafka
        .consumer(&config.group)
        .create_with_context(DefaultConsumerContext)
        .map_err(kafka("creating the consumer"))?;
    let producer: FutureProducer = config
        .kafka
        .producer()
        .create()
        .map_err(kafka("creating the producer"))?;
    let inputs = writer.inputs();
    let names: Vec<&str> = inputs.iter().map(String::as_str).collect();
    consumer.subscribe(&names).map_err(kafka("subscribing"))?;
    let dead_letters = config.topics.name(&DEAD_LETTERS);
    info!(stage = name, topics = ?names, group = %config.group, "running");
    health.ready.store(true, Ordering::Relaxed);
    let metrics = health.metrics.clone();
    let mut last_tick = Instant::now();
    let result = loop {
        if last_tick.elapsed() >= LAG_EVERY {
            last_tick = Instant::now();
            block_in_place(|| update_lag(&consumer, name, &health));
            writer.tick().await;
        }
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            m = consumer.recv() => m.map(|m| m.detach()),
            _ = tokio::time::sleep(LAG_EVERY) => continue,
        };
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + config.batch_linger;
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let mut next = Some(first);
        while let Some(received) = next.take() {
            match received {
                Ok(m) => batch.push(m),
                Err(error) => warn!(%error, "consumer error"),
            }
            if batch.len() >= config.batch_max {
                break;
            }
            if let Ok(m) = tokio::time::timeout_at(deadline, consumer.recv()).await {
                next = Some(m.map(|m| m.detach()));
            }
        }
        if batch.is_empty() {
            continue;
        }
        metrics
            .records_in
            .with_label_values(&[name])
            .inc_by(batch.len() as u64);
        let mut records = Vec::with_capacity(batch.len());
        for m in &batch {
            let position = Position {
                topic: m.topic().to_owned(),
                partition: m.partition(),
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
            };
            match writer.decode(m) {
                Ok(r) => records.push((position, Some(r))),
                Err(rejection) => {
                    warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(),
                          code = rejection.code, detail = %rejection.detail,
                          "record sent to the dead-letter topic");
                    metrics
                        .dead_letters
                        .with_label_values(&[name, rejection.code])
                        .inc();
                    let (topic, key, value) =
                        dead_letter(name, version, &dead_letters, m, rejection);
                    let record = FutureRecord::to(&topic).key(&key).payload(&value);
                    if let Err((error, _)) = producer.send(record, Duration::from_secs(30)).await {
                        // Not committed: the batch is read again after a restart.
                        health.ready.store(false, Ordering::Relaxed);
                        return Err(RuntimeError::Kafka {
                            what: "writing a dead letter",
                            source: error,
                        });
                    }
                    records.push((position, None));
                }
            }
        }
        // Write, retrying until it succeeds or the loop stops.
        let mut backoff = Duration::from_millis(100);
        let written = loop {
            let write_started = Instant::now();
            match writer.write(&records).await {
                Ok(w) => {
                    metrics
                        .processing
                        .with_label_values(&[name])
                        .observe(write_started.elapsed().as_secs_f64());
                    break Some(w);
                }
                Err(error) => {
                    health.ready.store(false, Ordering::Relaxed);
                    warn!(%error, retry_in = ?backoff, "writing a batch failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        let Some(written) = written else {
            break Ok(());
        };
        health.ready.store(true, Ordering::Relaxed);
        for (table, rows) in written {
            metrics
                .records_out
                .with_label_values(&[name, table])
                .inc_by(rows);
        }
        let mut offsets = TopicPartitionList::new();
        let mut next_offsets: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for m in &batch {
            let e = next_offsets.entry((m.topic(), m.partition())).or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        for ((topic, p), o) in &next_offsets {
            offsets
                .add_partition_offset(topic, *p, Offset::Offset(*o))
                .map_err(kafka("listing offsets"))?;
        }
        if let Err(error) = block_in_place(|| consumer.commit(&offsets, CommitMode::Sync)) {
            // The batch is written; a re-read after a rebalance writes nothing new.
            warn!(%error, "committing offsets failed (the batch was written)");
        }
        metrics
            .batch
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
    };
    health.ready.store(false, Ordering::Relaxed);
    consumer.unsubscribe();
    info!(stage = name, "stopped");
    result
}
