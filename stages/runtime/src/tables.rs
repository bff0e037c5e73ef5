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
//!
//! [`replay_tables`] is the same loop over a bounded part of the inputs (a metering
//! replay into its own copy of the tables): assigned partitions from planned offsets to
//! planned ends instead of a subscription, done when every partition reached its end.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clisonix_stage::{Position, Rejection};
use clisonix_topics::catalog::DEAD_LETTERS;
use clisonix_topics::consume::Quiet;
use clisonix_topics::{KafkaSettings, Topics};
use rdkafka::consumer::{
    CommitMode, Consumer, ConsumerContext, DefaultConsumerContext, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::task::block_in_place;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::http::Health;
use crate::runner::{dead_letter, update_lag};
use crate::{ReplayProgress, RuntimeError};

const LAG_EVERY: Duration = Duration::from_secs(5);
const IDLE_TICK: Duration = Duration::from_millis(250);
/// The longest wait between attempts at a batch while the database is away: a retry
/// is one connection attempt, and the batch should go in soon after its return.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How a Postgres consumer connects and batches.
#[derive(Debug, Clone)]
pub struct TablesConfig {
    pub kafka: KafkaSettings,
    /// Where its dead letters go: the live catalog, or a replay run's copy.
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

fn kafka(what: &'static str) -> impl FnOnce(KafkaError) -> RuntimeError {
    move |source| RuntimeError::Kafka { what, source }
}

/// What both loops hold while they run.
struct Tables<'a, W: TableWriter> {
    writer: &'a W,
    producer: FutureProducer,
    dead_letters: String,
    health: &'a Health,
}

impl<'a, W: TableWriter> Tables<'a, W> {
    fn new(
        writer: &'a W,
        config: &TablesConfig,
        health: &'a Health,
    ) -> Result<Tables<'a, W>, RuntimeError> {
        Ok(Tables {
            writer,
            producer: config
                .kafka
                .producer()
                .create()
                .map_err(kafka("creating the producer"))?,
            dead_letters: config.topics.name(&DEAD_LETTERS),
            health,
        })
    }

    /// Decodes a batch; what does not decode goes to the dead-letter topic and reaches
    /// the writer as `None`.
    async fn decode(
        &self,
        batch: &[OwnedMessage],
    ) -> Result<Vec<(Position, Option<W::Record>)>, RuntimeError> {
        let name = self.writer.name();
        let metrics = &self.health.metrics;
        metrics
            .records_in
            .with_label_values(&[name])
            .inc_by(batch.len() as u64);
        let mut records = Vec::with_capacity(batch.len());
        for m in batch {
            let position = Position {
                topic: m.topic().to_owned(),
                partition: m.partition(),
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
            };
            match self.writer.decode(m) {
                Ok(r) => records.push((position, Some(r))),
                Err(rejection) => {
                    warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(),
                          code = rejection.code, detail = %rejection.detail,
                          "record sent to the dead-letter topic");
                    metrics
                        .dead_letters
                        .with_label_values(&[name, rejection.code])
                        .inc();
                    let (topic, key, value) = dead_letter(
                        name,
                        env!("CARGO_PKG_VERSION"),
                        &self.dead_letters,
                        m,
                        rejection,
                    );
                    let record = FutureRecord::to(&topic).key(&key).payload(&value);
                    if let Err((error, _)) =
                        self.producer.send(record, Duration::from_secs(30)).await
                    {
                        // Not committed: the batch is read again after a restart.
                        self.health.ready.store(false, Ordering::Relaxed);
                        return Err(RuntimeError::Kafka {
                            what: "writing a dead letter",
                            source: error,
                        });
                    }
                    records.push((position, None));
                }
            }
        }
        Ok(records)
    }

    /// Writes a batch, retrying with backoff until it succeeds (`true`) or `shutdown`
    /// (`false`: nothing of it was written).
    async fn write(
        &self,
        records: &[(Position, Option<W::Record>)],
        shutdown: &CancellationToken,
    ) -> bool {
        let name = self.writer.name();
        let metrics = &self.health.metrics;
        let mut backoff = Duration::from_millis(100);
        let written = loop {
            let write_started = Instant::now();
            match self.writer.write(records).await {
                Ok(w) => {
                    metrics
                        .processing
                        .with_label_values(&[name])
                        .observe(write_started.elapsed().as_secs_f64());
                    break w;
                }
                Err(error) => {
                    self.health.ready.store(false, Ordering::Relaxed);
                    warn!(%error, retry_in = ?backoff, "writing a batch failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        self.health.ready.store(true, Ordering::Relaxed);
        for (table, rows) in written {
            metrics
                .records_out
                .with_label_values(&[name, table])
                .inc_by(rows);
        }
        true
    }
}

/// Commits the offsets after a written batch (a failure only means the batch may be
/// read again, which writes nothing new).
fn commit_batch<X: ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    batch: &[OwnedMessage],
) -> Result<(), RuntimeError> {
    let mut offsets = TopicPartitionList::new();
    let mut next_offsets: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for m in batch {
        let e = next_offsets.entry((m.topic(), m.partition())).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    for ((topic, p), o) in &next_offsets {
        offsets
            .add_partition_offset(topic, *p, Offset::Offset(*o))
            .map_err(kafka("listing offsets"))?;
    }
    if let Err(error) = block_in_place(|| consumer.commit(&offsets, CommitMode::Sync)) {
        warn!(%error, "committing offsets failed (the batch was written)");
    }
    Ok(())
}

/// Receives up to `batch_max` records, waiting at most `linger` after the first.
/// Errors other than a partition's end are logged; whether an end was reached is
/// returned.
async fn gather<X: ConsumerContext + 'static>(
    consumer: &StreamConsumer<X>,
    first: Result<OwnedMessage, KafkaError>,
    config: &TablesConfig,
) -> (Vec<OwnedMessage>, bool) {
    let deadline = tokio::time::Instant::now() + config.batch_linger;
    let mut batch: Vec<OwnedMessage> = Vec::new();
    let mut at_end = false;
    let mut next = Some(first);
    while let Some(received) = next.take() {
        match received {
            Ok(m) => batch.push(m),
            Err(KafkaError::PartitionEOF(_)) => at_end = true,
            Err(error) => warn!(%error, "consumer error"),
        }
        if batch.len() >= config.batch_max {
            break;
        }
        if let Ok(m) = tokio::time::timeout_at(deadline, consumer.recv()).await {
            next = Some(m.map(|m| m.detach()));
        }
    }
    (batch, at_end)
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
    let consumer: StreamConsumer = config
        .kafka
        .consumer(&config.group)
        .create_with_context(DefaultConsumerContext)
        .map_err(kafka("creating the consumer"))?;
    let tables = Tables::new(&writer, &config, &health)?;
    let inputs = writer.inputs();
    let names: Vec<&str> = inputs.iter().map(String::as_str).collect();
    consumer.subscribe(&names).map_err(kafka("subscribing"))?;
    info!(stage = name, topics = ?names, group = %config.group, "running");
    health.ready.store(true, Ordering::Relaxed);
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
        let (batch, _) = gather(&consumer, first, &config).await;
        if batch.is_empty() {
            continue;
        }
        let records = tables.decode(&batch).await?;
        if !tables.write(&records, &shutdown).await {
            break Ok(());
        }
        commit_batch(&consumer, &batch)?;
        health
            .metrics
            .batch
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
    };
    health.ready.store(false, Ordering::Relaxed);
    consumer.unsubscribe();
    info!(stage = name, "stopped");
    result
}

/// One input partition of a bounded run: read from `start` (where a resumed run picks
/// up) to `end` (exclusive); `planned` is where the run first started, for progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRange {
    pub topic: String,
    pub partition: i32,
    pub planned: i64,
    pub start: i64,
    pub end: i64,
}

/// Runs `writer` over `ranges` under `config.group` (whose offsets it commits, for
/// `lag`; where a run resumes is the writer's to record, as metering does) until every
/// range is read, or `shutdown` (after the batch in hand; resumable). Records `keep`
/// refuses reach the writer as `None`: their offsets count as read, nothing else.
/// The writer gets no ticks: a bounded run does no wall-clock work.
pub async fn replay_tables<W: TableWriter>(
    writer: W,
    config: TablesConfig,
    ranges: Vec<TableRange>,
    keep: impl Fn(&W::Record) -> bool + Send,
    health: Health,
    mut progress: impl FnMut(ReplayProgress) + Send,
    shutdown: CancellationToken,
) -> Result<ReplayProgress, RuntimeError> {
    let name = writer.name();
    let consumer: StreamConsumer<Quiet> = config
        .kafka
        .consumer(&config.group)
        .set("enable.partition.eof", "true")
        .create_with_context(Quiet)
        .map_err(kafka("creating the consumer"))?;
    let tables = Tables::new(&writer, &config, &health)?;
    let key = |r: &TableRange| (r.topic.clone(), r.partition);
    let ends: BTreeMap<(String, i32), i64> = ranges.iter().map(|r| (key(r), r.end)).collect();
    // The next offset to read per partition, as far as this run knows.
    let mut at: BTreeMap<(String, i32), i64> = ranges.iter().map(|r| (key(r), r.start)).collect();
    let mut done: std::collections::BTreeSet<(String, i32)> = ranges
        .iter()
        .filter(|r| r.start >= r.end)
        .map(key)
        .collect();
    let mut assign = TopicPartitionList::new();
    for r in ranges.iter().filter(|r| r.start < r.end) {
        assign
            .add_partition_offset(&r.topic, r.partition, Offset::Offset(r.start))
            .map_err(kafka("assigning"))?;
    }
    consumer.assign(&assign).map_err(kafka("assigning"))?;
    let total: u64 = ranges
        .iter()
        .map(|r| (r.end - r.planned).max(0) as u64)
        .sum();
    let report = |at: &BTreeMap<(String, i32), i64>, done: &std::collections::BTreeSet<_>| {
        let read = ranges
            .iter()
            .map(|r| {
                let k = key(r);
                let at = if done.contains(&k) { r.end } else { at[&k] };
                (at.min(r.end) - r.planned).max(0) as u64
            })
            .sum();
        ReplayProgress {
            read,
            total,
            finished: done.len() == ranges.len(),
        }
    };
    // Partitions whose read position reached their end (past any transaction markers
    // and aborted records before it) are done, and paused.
    let check_done = |at: &BTreeMap<(String, i32), i64>,
                      done: &mut std::collections::BTreeSet<(String, i32)>|
     -> Result<(), RuntimeError> {
        let positions = consumer.position().map_err(kafka("reading positions"))?;
        let mut finished = TopicPartitionList::new();
        for ((topic, p), &end) in &ends {
            if done.contains(&(topic.clone(), *p)) {
                continue;
            }
            let position = positions
                .find_partition(topic, *p)
                .and_then(|e| e.offset().to_raw())
                .unwrap_or(-1);
            if position >= end || at[&(topic.clone(), *p)] >= end {
                finished.add_partition(topic, *p);
                done.insert((topic.clone(), *p));
            }
        }
        if finished.count() > 0 {
            consumer.pause(&finished).map_err(kafka("pausing"))?;
        }
        Ok(())
    };
    info!(stage = name, group = %config.group, total, "replay running");
    health.ready.store(true, Ordering::Relaxed);
    progress(report(&at, &done));
    while done.len() < ranges.len() {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            m = consumer.recv() => m.map(|m| m.detach()),
            _ = tokio::time::sleep(IDLE_TICK) => {
                block_in_place(|| check_done(&at, &mut done))?;
                progress(report(&at, &done));
                continue;
            }
        };
        let (mut batch, _) = gather(&consumer, first, &config).await;
        batch.retain(|m| {
            ends.get(&(m.topic().to_owned(), m.partition()))
                .is_some_and(|&end| m.offset() < end)
        });
        if !batch.is_empty() {
            let mut records = tables.decode(&batch).await?;
            for (_, record) in &mut records {
                if record.as_ref().is_some_and(|r| !keep(r)) {
                    *record = None;
                }
            }
            if !tables.write(&records, &shutdown).await {
                break;
            }
            commit_batch(&consumer, &batch)?;
            for m in &batch {
                let next = at.entry((m.topic().to_owned(), m.partition())).or_insert(0);
                *next = (*next).max(m.offset() + 1);
            }
        }
        block_in_place(|| check_done(&at, &mut done))?;
        progress(report(&at, &done));
    }
    health.ready.store(false, Ordering::Relaxed);
    let last = report(&at, &done);
    progress(last);
    info!(
        stage = name,
        read = last.read,
        finished = last.finished,
        "replay stopped"
    );
    Ok(last)
}
