//! The sink loop: `eeg.sessions`, `eeg.features` and `audio.chunks` into Postgres
//! ([`clisonix_sink::Results`]), at least once with idempotent writes, which together
//! give exactly-once rows:
//! - a batch is decoded and written in one database transaction; only then are the
//!   batch's offsets committed (synchronously);
//! - a crash between the two re-reads the batch, and writing it again changes nothing
//!   (rows are keyed like the records; see `clisonix-sink`);
//! - while the database is away the batch is retried with backoff, never skipped, and
//!   `/ready` says not ready; records that do not decode go to the dead-letter topic.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clisonix_schemas::{decode, AudioChunk, Features, SessionState};
use clisonix_sink::{Results, SinkRecord};
use clisonix_stage::Rejection;
use clisonix_topics::catalog::{AUDIO_CHUNKS, DEAD_LETTERS, EEG_FEATURES, EEG_SESSIONS};
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

/// The sink's name: its consumer group and the `stage` of its dead letters.
pub const NAME: &str = "sink";
const VERSION: &str = env!("CARGO_PKG_VERSION");
const LAG_EVERY: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How the sink connects and batches.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub kafka: KafkaSettings,
    pub topics: Topics,
    pub group: String,
    pub batch_max: usize,
    pub batch_linger: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sessions,
    Features,
    Audio,
}

/// Runs the sink until `shutdown` is cancelled (after the batch in hand is written and
/// committed, or abandoned uncommitted if the database is away) or Kafka fails.
pub async fn run_sink(
    results: Results,
    config: SinkConfig,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let kafka = |what: &'static str| move |source| RuntimeError::Kafka { what, source };
    let inputs: BTreeMap<String, Kind> = [
        (config.topics.name(&EEG_SESSIONS), Kind::Sessions),
        (config.topics.name(&EEG_FEATURES), Kind::Features),
        (config.topics.name(&AUDIO_CHUNKS), Kind::Audio),
    ]
    .into_iter()
    .collect();
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
    let names: Vec<&str> = inputs.keys().map(String::as_str).collect();
    consumer.subscribe(&names).map_err(kafka("subscribing"))?;
    let dead_letters = config.topics.name(&DEAD_LETTERS);
    info!(topics = ?names, group = %config.group, "sink running");
    health.ready.store(true, Ordering::Relaxed);
    let metrics = health.metrics.clone();
    let mut last_lag = Instant::now();
    let result = loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            m = consumer.recv() => m.map(|m| m.detach()),
            _ = tokio::time::sleep(LAG_EVERY) => {
                block_in_place(|| update_lag(&consumer, NAME, &health));
                continue;
            }
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
            .with_label_values(&[NAME])
            .inc_by(batch.len() as u64);
        let mut records = Vec::with_capacity(batch.len());
        for m in &batch {
            let kind = inputs.get(m.topic()).copied();
            match decoded(kind, m) {
                Ok(r) => records.push(r),
                Err(rejection) => {
                    warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(),
                          code = rejection.code, detail = %rejection.detail,
                          "record sent to the dead-letter topic");
                    metrics
                        .dead_letters
                        .with_label_values(&[NAME, rejection.code])
                        .inc();
                    let (topic, key, value) =
                        dead_letter(NAME, VERSION, &dead_letters, m, rejection);
                    let record = FutureRecord::to(&topic).key(&key).payload(&value);
                    if let Err((error, _)) = producer.send(record, Duration::from_secs(30)).await {
                        // Not committed: the batch is read again after a restart.
                        health.ready.store(false, Ordering::Relaxed);
                        return Err(RuntimeError::Kafka {
                            what: "writing a dead letter",
                            source: error,
                        });
                    }
                }
            }
        }
        // Write, retrying until it succeeds or the sink stops.
        let mut backoff = Duration::from_millis(100);
        let written = loop {
            let write_started = Instant::now();
            match results.write(&records).await {
                Ok(w) => {
                    metrics
                        .processing
                        .with_label_values(&[NAME])
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
        for (table, rows) in [
            ("sessions", written.sessions),
            ("features", written.features),
            ("audio_chunks", written.audio_chunks),
        ] {
            metrics
                .records_out
                .with_label_values(&[NAME, table])
                .inc_by(rows);
        }
        let mut offsets = TopicPartitionList::new();
        let mut next_offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for m in &batch {
            let e = next_offsets
                .entry((m.topic().to_owned(), m.partition()))
                .or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        for ((topic, p), o) in &next_offsets {
            offsets
                .add_partition_offset(topic, *p, Offset::Offset(*o))
                .map_err(kafka("listing offsets"))?;
        }
        if let Err(error) = block_in_place(|| consumer.commit(&offsets, CommitMode::Sync)) {
            // The rows are in; a re-read after a rebalance writes nothing new.
            warn!(%error, "committing offsets failed (the batch was written)");
        }
        metrics
            .batch
            .with_label_values(&[NAME])
            .observe(started.elapsed().as_secs_f64());
        if last_lag.elapsed() >= LAG_EVERY {
            last_lag = Instant::now();
            block_in_place(|| update_lag(&consumer, NAME, &health));
        }
    };
    health.ready.store(false, Ordering::Relaxed);
    consumer.unsubscribe();
    info!("sink stopped");
    result
}

fn decoded(kind: Option<Kind>, m: &OwnedMessage) -> Result<SinkRecord, Rejection> {
    let Some(bytes) = m.payload() else {
        return Err(Rejection::new("empty", "the record has no value"));
    };
    let reject = |e: clisonix_schemas::DecodeError| Rejection::new(e.reason_code(), e.to_string());
    Ok(match kind {
        Some(Kind::Sessions) => SinkRecord::Session(decode::<SessionState>(bytes).map_err(reject)?),
        Some(Kind::Features) => {
            SinkRecord::Features(Box::new(decode::<Features>(bytes).map_err(reject)?))
        }
        Some(Kind::Audio) => SinkRecord::Audio(decode::<AudioChunk>(bytes).map_err(reject)?),
        None => {
            return Err(Rejection::new(
                "unexpected_topic",
                format!("the sink does not read {}", m.topic()),
            ))
        }
    })
}
