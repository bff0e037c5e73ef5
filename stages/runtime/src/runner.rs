//! The loop every stage runs in: consume a batch, decode, process, then produce the
//! outputs, the dead letters and the input offsets in one Kafka transaction.
//!
//! Exactly once, without a state store:
//! - each batch is one transaction: outputs, dead letters and offsets commit together
//!   or not at all (consumers of the outputs read committed);
//! - the offset committed for a partition is the oldest input the stage's open state
//!   still needs ([`Stage::needed_from`]), not the last one processed, and its commit
//!   metadata records the last offset whose outputs are already out
//!   (`emitted_through=N`);
//! - after a restart, a rebalance or an aborted transaction the partition is re-read
//!   from the committed offset: records up to `emitted_through` rebuild the stage's
//!   state and their outputs are discarded; the rest is processed normally. Stages are
//!   deterministic, so the outputs are the same set as a run that never stopped.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clisonix_schemas::{decode, encode, AvroRecord, DeadLetter, Header, Timestamp};
use clisonix_stage::{OutputTopic, RecordMeta, Rejection, Stage};
use clisonix_topics::catalog::{
    AUDIO_CHUNKS, CATALOG, DEAD_LETTERS, EEG_FEATURES, EEG_SESSIONS, USAGE_EVENTS,
};
use clisonix_topics::offsets::{metadata_value, EMITTED_THROUGH as METADATA_KEY};
use clisonix_topics::{KafkaSettings, Topics};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::task::block_in_place;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::http::Health;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);
/// A replay's end offset of the partition, kept with its progress so a resumed run
/// reads exactly what the first start planned.
const END_KEY: &str = "end=";
const LAG_EVERY: Duration = Duration::from_secs(5);
const IDLE_TICK: Duration = Duration::from_millis(250);
/// How often the stage gets its idle call ([`Stage::idle`]).
const IDLE_EVERY: Duration = Duration::from_secs(1);

/// How a stage connects and batches.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub kafka: KafkaSettings,
    pub topics: Topics,
    /// The consumer group (default: the stage's name).
    pub group: String,
    /// Stable per instance (e.g. the pod name): restarting with the same id fences the
    /// previous incarnation's open transaction at once.
    pub instance_id: String,
    pub batch_max: usize,
    pub batch_linger: Duration,
}

/// Why a stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the stage's input family {0} travels on no catalog topic")]
    NoInputTopic(clisonix_schemas::Family),
    #[error("replay: {0}")]
    Replay(String),
    #[error("Kafka {what} failed: {source}")]
    Kafka {
        what: &'static str,
        #[source]
        source: KafkaError,
    },
}

fn kafka(what: &'static str) -> impl FnOnce(KafkaError) -> RuntimeError {
    move |source| RuntimeError::Kafka { what, source }
}

#[derive(Debug)]
enum Event {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// Records partition assignments and revocations, which librdkafka reports from
/// inside a poll; the loop applies them before the records that poll returned.
#[derive(Debug, Default)]
struct RebalanceEvents {
    events: Mutex<Vec<Event>>,
}

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ClientContext for RebalanceEvents {
    fn error(&self, error: KafkaError, reason: &str) {
        // A replay reads to the partitions' ends on purpose.
        if !matches!(
            error,
            KafkaError::PartitionEOF(_)
                | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::error!(%error, reason, "Kafka client error");
        }
    }
}

impl ConsumerContext for RebalanceEvents {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.events
                .lock()
                .expect("not poisoned")
                .push(Event::Revoked(partitions(tpl)));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.events
                .lock()
                .expect("not poisoned")
                .push(Event::Assigned(partitions(tpl)));
        }
    }
}

/// Per assigned partition.
#[derive(Debug, Clone, Copy)]
struct PartitionState {
    /// Outputs of records up to here are already out (from the commit metadata).
    emitted_through: i64,
    /// The last record processed in this incarnation.
    last: Option<i64>,
    /// That record's time (its Kafka timestamp) and when it was processed, from which
    /// an idle partition's record time moves on ([`Stage::idle`]).
    last_time: Option<(i64, Instant)>,
}

struct Loop<S: Stage> {
    stage: S,
    consumer: StreamConsumer<RebalanceEvents>,
    producer: FutureProducer,
    health: Health,
    input: String,
    dead_letters: String,
    topics: Topics,
    parts: BTreeMap<i32, PartitionState>,
    config: RuntimeConfig,
    timing: Option<prometheus::Histogram>,
    /// A replay's bounds (none for a live stage).
    bounds: Option<Bounds>,
}

/// What a replay reads: each partition up to its end, only some sessions.
struct Bounds {
    ends: BTreeMap<i32, i64>,
    /// Only these sessions' records go to the stage (empty: all).
    sessions: std::collections::HashSet<String>,
    done: std::collections::BTreeSet<i32>,
}

/// Runs `stage` until `shutdown` is cancelled (finishing and committing the batch in
/// hand, then leaving the group) or a Kafka error makes going on unsafe.
pub async fn run<S: Stage + 'static>(
    stage: S,
    config: RuntimeConfig,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let family = S::Input::FAMILY;
    let spec = CATALOG
        .iter()
        .find(|t| t.value == family)
        .ok_or(RuntimeError::NoInputTopic(family))?;
    let input = config.topics.name(spec);
    let consumer: StreamConsumer<RebalanceEvents> = config
        .kafka
        .consumer(&config.group)
        .create_with_context(RebalanceEvents::default())
        .map_err(kafka("creating the consumer"))?;
    let producer: FutureProducer = config
        .kafka
        .producer()
        .set(
            "transactional.id",
            format!("{}-{}", config.group, config.instance_id),
        )
        .set("transaction.timeout.ms", "30000")
        .create()
        .map_err(kafka("creating the producer"))?;
    block_in_place(|| producer.init_transactions(KAFKA_TIMEOUT))
        .map_err(kafka("initialising transactions"))?;
    consumer
        .subscribe(&[&input])
        .map_err(kafka("subscribing"))?;
    info!(stage = stage.name(), %input, group = %config.group, "stage running");
    let timing = stage
        .timing_metric()
        .map(|(name, help)| health.metrics.stage_timing(name, help));
    let mut this = Loop {
        timing,
        dead_letters: config.topics.name(&DEAD_LETTERS),
        topics: config.topics.clone(),
        stage,
        consumer,
        producer,
        health,
        input,
        parts: BTreeMap::new(),
        config,
        bounds: None,
    };
    this.health.ready.store(true, Ordering::Relaxed);
    let result = this.run(shutdown).await;
    this.health.ready.store(false, Ordering::Relaxed);
    // Leave the group now rather than when the session times out.
    this.consumer.unsubscribe();
    info!(stage = this.stage.name(), "stage stopped");
    result
}

impl<S: Stage> Loop<S> {
    async fn run(&mut self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        let mut last_lag = Instant::now();
        let mut last_idle = Instant::now();
        loop {
            // Every second, busy or not: a session quiet on a busy partition is due too.
            if last_idle.elapsed() >= IDLE_EVERY {
                last_idle = Instant::now();
                self.idle()?;
            }
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                m = self.consumer.recv() => m.map(|m| m.detach()),
                // Idle: still apply rebalances (an instance may own only empty
                // partitions) and keep the lag current.
                _ = tokio::time::sleep(IDLE_TICK) => {
                    self.apply_events(&mut Vec::new())?;
                    if last_lag.elapsed() >= LAG_EVERY {
                        last_lag = Instant::now();
                        block_in_place(|| update_lag(&self.consumer, self.stage.name(), &self.health));
                    }
                    continue;
                }
            };
            let started = Instant::now();
            let deadline = tokio::time::Instant::now() + self.config.batch_linger;
            let mut batch: Vec<OwnedMessage> = Vec::new();
            let mut next = Some(first);
            while let Some(received) = next.take() {
                // Rebalances reported by that poll come before its record.
                self.apply_events(&mut batch)?;
                match received {
                    Ok(m) => batch.push(m),
                    Err(error) => warn!(%error, "consumer error"),
                }
                if batch.len() >= self.config.batch_max {
                    break;
                }
                if let Ok(m) = tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                    next = Some(m.map(|m| m.detach()));
                }
            }
            self.apply_events(&mut batch)?;
            if batch.is_empty() {
                continue;
            }
            let outputs = block_in_place(|| self.process(&batch));
            match block_in_place(|| self.commit(&batch, &outputs)) {
                Ok(()) => {
                    self.metric_transaction("committed");
                    let stage = self.stage.name();
                    self.health
                        .metrics
                        .batch
                        .with_label_values(&[stage])
                        .observe(started.elapsed().as_secs_f64());
                }
                Err(error) => {
                    self.metric_transaction("aborted");
                    warn!(%error, "transaction failed; rewinding to the committed offsets");
                    block_in_place(|| self.abort_and_rewind())?;
                }
            }
            if last_lag.elapsed() >= LAG_EVERY {
                last_lag = Instant::now();
                block_in_place(|| update_lag(&self.consumer, self.stage.name(), &self.health));
            }
        }
    }

    /// Gives the stage its idle call on every caught-up partition, and produces what
    /// it writes in a transaction of its own (no offsets move).
    fn idle(&mut self) -> Result<(), RuntimeError> {
        let mut buf = Vec::new();
        let ps: Vec<(i32, i64)> = self
            .parts
            .iter()
            .filter(|(_, st)| st.last.is_some_and(|last| last > st.emitted_through))
            .filter_map(|(p, st)| {
                let (t, at) = st.last_time?;
                Some((*p, t + at.elapsed().as_millis() as i64))
            })
            .collect();
        for (p, now_ms) in ps {
            self.stage.idle(p, now_ms, &mut buf);
        }
        if buf.is_empty() {
            return Ok(());
        }
        let stage = self.stage.name();
        let outputs: Vec<(String, Vec<u8>, Vec<u8>)> = buf
            .into_iter()
            .map(|o| {
                let topic = self.output_topic(o.topic);
                self.health
                    .metrics
                    .records_out
                    .with_label_values(&[stage, &topic])
                    .inc();
                (topic, o.key, o.value)
            })
            .collect();
        match block_in_place(|| self.commit(&[], &outputs)) {
            Ok(()) => self.metric_transaction("committed"),
            Err(error) => {
                self.metric_transaction("aborted");
                warn!(%error, "an idle transaction failed; rewinding to the committed offsets");
                block_in_place(|| self.abort_and_rewind())?;
            }
        }
        Ok(())
    }

    fn metric_transaction(&self, outcome: &str) {
        self.health
            .metrics
            .transactions
            .with_label_values(&[self.stage.name(), outcome])
            .inc();
    }

    /// Applies assignments and revocations: state of a revoked partition is dropped
    /// (with its records in the batch); a newly assigned one starts afresh from its
    /// committed offset, remembering what was already emitted.
    fn apply_events(&mut self, batch: &mut Vec<OwnedMessage>) -> Result<(), RuntimeError> {
        let events: Vec<Event> =
            std::mem::take(&mut *self.consumer.context().events.lock().expect("not poisoned"));
        for event in events {
            match event {
                Event::Revoked(ps) => {
                    info!(partitions = ?ps, "partitions revoked");
                    for p in ps {
                        self.stage.forget(p);
                        self.parts.remove(&p);
                        batch.retain(|m| m.partition() != p);
                    }
                }
                Event::Assigned(ps) => {
                    info!(partitions = ?ps, "partitions assigned");
                    for (p, offset, state) in block_in_place(|| self.committed(&ps))? {
                        info!(
                            partition = p,
                            ?offset,
                            state.emitted_through,
                            "resuming partition"
                        );
                        self.stage.forget(p);
                        self.parts.insert(p, state);
                    }
                }
            }
        }
        Ok(())
    }

    /// Committed offsets (where re-reading starts) and `emitted_through` marks of
    /// partitions.
    fn committed(&self, ps: &[i32]) -> Result<Vec<(i32, Offset, PartitionState)>, RuntimeError> {
        let mut tpl = TopicPartitionList::new();
        for &p in ps {
            tpl.add_partition(&self.input, p);
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, KAFKA_TIMEOUT)
            .map_err(kafka("fetching committed offsets"))?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| {
                let emitted_through = metadata_value(e.metadata(), METADATA_KEY).unwrap_or(-1);
                let state = PartitionState {
                    emitted_through,
                    last: None,
                    last_time: None,
                };
                (e.partition(), e.offset(), state)
            })
            .collect())
    }

    /// Decodes and processes a batch; returns the records to produce.
    fn process(&mut self, batch: &[OwnedMessage]) -> Vec<(String, Vec<u8>, Vec<u8>)> {
        let stage_name = self.stage.name();
        let metrics = self.health.metrics.clone();
        let mut outputs = Vec::new();
        let mut buf = Vec::new();
        for m in batch {
            let p = m.partition();
            let state = self.parts.entry(p).or_insert(PartitionState {
                emitted_through: -1,
                last: None,
                last_time: None,
            });
            let replaying = m.offset() <= state.emitted_through;
            state.last = Some(m.offset());
            if let Some(b) = &self.bounds {
                if !b.sessions.is_empty() {
                    let session = m
                        .key()
                        .and_then(|k| decode::<clisonix_schemas::SessionKey>(k).ok())
                        .map(|k| k.session_id.to_string());
                    if !session.is_some_and(|s| b.sessions.contains(&s)) {
                        continue;
                    }
                }
            }
            if let Some(t) = m.timestamp().to_millis() {
                state.last_time = Some((t, Instant::now()));
            }
            metrics.records_in.with_label_values(&[stage_name]).inc();
            if replaying {
                metrics.replayed.with_label_values(&[stage_name]).inc();
            }
            let started = Instant::now();
            let meta = RecordMeta {
                partition: p,
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
                replay: replaying,
            };
            buf.clear();
            let result = match m.payload() {
                None => Err(Rejection::new("empty", "the record has no value")),
                Some(bytes) => match decode::<S::Input>(bytes) {
                    Ok(record) => self.stage.process(record, meta, &mut buf),
                    Err(e) => Err(Rejection::new(e.reason_code(), e.to_string())),
                },
            };
            let took = started.elapsed().as_secs_f64();
            metrics
                .processing
                .with_label_values(&[stage_name])
                .observe(took);
            if replaying {
                continue;
            }
            if let Some(timing) = &self.timing {
                timing.observe(took);
            }
            for o in buf.drain(..) {
                let topic = self.output_topic(o.topic);
                metrics
                    .records_out
                    .with_label_values(&[stage_name, &topic])
                    .inc();
                outputs.push((topic, o.key, o.value));
            }
            if let Err(rejection) = result {
                warn!(stage = stage_name, partition = p, offset = m.offset(), code = rejection.code,
                      detail = %rejection.detail, "record rejected to the dead-letter topic");
                metrics
                    .dead_letters
                    .with_label_values(&[stage_name, rejection.code])
                    .inc();
                outputs.push(dead_letter(
                    self.stage.name(),
                    self.stage.version(),
                    &self.dead_letters,
                    m,
                    rejection,
                ));
            }
        }
        outputs
    }

    fn output_topic(&self, topic: OutputTopic) -> String {
        self.topics.name(match topic {
            OutputTopic::EegFeatures => &EEG_FEATURES,
            OutputTopic::AudioChunks => &AUDIO_CHUNKS,
            OutputTopic::EegSessions => &EEG_SESSIONS,
            OutputTopic::UsageEvents => &USAGE_EVENTS,
        })
    }

    /// Produces the outputs and commits the batch's offsets in one transaction.
    fn commit(
        &self,
        batch: &[OwnedMessage],
        outputs: &[(String, Vec<u8>, Vec<u8>)],
    ) -> Result<(), KafkaError> {
        self.producer.begin_transaction()?;
        for (topic, key, value) in outputs {
            loop {
                let record = FutureRecord::to(topic).key(key).payload(value);
                match self.producer.send_result(record) {
                    // Delivery is confirmed by the commit, which fails if any send did.
                    Ok(_delivery) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((e, _)) => return Err(e),
                }
            }
        }
        let mut offsets = TopicPartitionList::new();
        let touched: std::collections::BTreeSet<i32> =
            batch.iter().map(|m| m.partition()).collect();
        for p in touched {
            let Some(state) = self.parts.get(&p) else {
                continue;
            };
            let Some(last) = state.last else { continue };
            let from = self
                .stage
                .needed_from(p)
                .map_or(last + 1, |needed| needed.min(last + 1));
            offsets.add_partition_offset(&self.input, p, Offset::Offset(from))?;
            if let Some(mut e) = offsets.find_partition(&self.input, p) {
                // Never lower the mark while replaying below it.
                let mut metadata = format!("{METADATA_KEY}{}", last.max(state.emitted_through));
                if let Some(end) = self.bounds.as_ref().and_then(|b| b.ends.get(&p)) {
                    metadata.push_str(&format!(";{END_KEY}{end}"));
                }
                e.set_metadata(metadata);
            }
        }
        if offsets.count() > 0 {
            // A consumer that returned records has joined its group, so this is set.
            let Some(group) = self.consumer.group_metadata() else {
                return Err(KafkaError::Canceled);
            };
            self.producer
                .send_offsets_to_transaction(&offsets, &group, KAFKA_TIMEOUT)?;
        }
        let committing = Instant::now();
        clisonix_topics::client::commit_transaction(&self.producer, KAFKA_TIMEOUT)?;
        self.health
            .metrics
            .commit
            .with_label_values(&[self.stage.name()])
            .observe(committing.elapsed().as_secs_f64());
        Ok(())
    }

    /// After a failed transaction: abort it, drop all state and re-read every assigned
    /// partition from its committed offset.
    fn abort_and_rewind(&mut self) -> Result<(), RuntimeError> {
        self.producer
            .abort_transaction(KAFKA_TIMEOUT)
            .map_err(kafka("aborting a transaction"))?;
        let ps: Vec<i32> = self.parts.keys().copied().collect();
        for (p, offset, state) in self.committed(&ps)? {
            self.stage.forget(p);
            self.parts.insert(p, state);
            let from = match offset {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            self.consumer
                .seek(&self.input, p, from, KAFKA_TIMEOUT)
                .map_err(kafka("seeking back"))?;
        }
        Ok(())
    }
}

/// The dead-letter record for input `m`: original key, value and headers, where it came
/// from, and why `stage` refused it.
pub(crate) fn dead_letter(
    stage: &str,
    stage_version: &str,
    topic: &str,
    m: &OwnedMessage,
    rejection: Rejection,
) -> (String, Vec<u8>, Vec<u8>) {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| Header {
                    name: h.key.to_owned(),
                    value: h.value.map(<[u8]>::to_vec),
                })
                .collect()
        })
        .unwrap_or_default();
    let letter = DeadLetter {
        stage: stage.to_owned(),
        stage_version: stage_version.to_owned(),
        source_topic: m.topic().to_owned(),
        source_partition: m.partition(),
        source_offset: m.offset(),
        source_timestamp_ms: m.timestamp().to_millis(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers,
        reason_code: rejection.code.to_owned(),
        reason_detail: rejection.detail,
        failed_at: Timestamp::now(),
    };
    let key = encode(&letter.key()).expect("a dead-letter key encodes");
    let value = encode(&letter).expect("a dead letter encodes");
    (topic.to_owned(), key, value)
}

/// Sets the consumer-lag gauge of every assigned partition (labelled by partition, or
/// `topic/partition` when a consumer reads several topics).
pub(crate) fn update_lag<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    stage: &str,
    health: &Health,
) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    let elements = positions.elements();
    let topics: std::collections::BTreeSet<&str> = elements.iter().map(|e| e.topic()).collect();
    for e in &elements {
        let Offset::Offset(position) = e.offset() else {
            continue;
        };
        if let Ok((_, high)) =
            consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(2))
        {
            let label = if topics.len() > 1 {
                format!("{}/{}", e.topic(), e.partition())
            } else {
                e.partition().to_string()
            };
            health
                .metrics
                .lag
                .with_label_values(&[stage, &label])
                .set(high - position);
        }
    }
}

/// What a replay reads and where it writes.
#[derive(Debug, Clone)]
pub struct ReplaySpec {
    /// The run's name: its output topics are `replay.<run>.<live prefix><topic>` and its
    /// consumer group `replay.<run>.<live prefix><stage>`. Starting a run again with the
    /// same name resumes it (what it read and wrote is kept with its offsets).
    pub run: String,
    pub from: clisonix_topics::consume::Position,
    /// Where to stop (exclusive); none: the end of the input as it is at the run's
    /// first start.
    pub to: Option<clisonix_topics::consume::Position>,
    /// Only these sessions' records (empty: all).
    pub sessions: Vec<String>,
}

impl ReplaySpec {
    /// The run's copy of the catalog.
    pub fn topics(&self, live: &Topics) -> Topics {
        Topics::new(format!("replay.{}.{}", self.run, live.prefix()))
    }

    /// Whether `run` is a usable run name (it becomes part of topic names).
    pub fn valid_run(run: &str) -> bool {
        !run.is_empty()
            && run.len() <= 64
            && run
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    }
}

/// A replay's progress: input offsets read of those planned (records, and the
/// transaction markers between them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayProgress {
    pub read: u64,
    pub total: u64,
    pub finished: bool,
}

/// Runs `stage` over a bounded part of its live input into the run's own copy of the
/// topics, under the run's own consumer group, in the same exactly-once transactions
/// as a live stage; returns when every partition has reached its end (or at
/// `shutdown`, resumable). Live topics are only read; live groups are never touched.
/// Wall-clock work (the stage's idle calls) does not happen in a replay, so the same
/// build over the same input writes the same bytes.
pub async fn replay<S: Stage + 'static>(
    stage: S,
    config: RuntimeConfig,
    spec: ReplaySpec,
    health: Health,
    mut progress: impl FnMut(ReplayProgress) + Send,
    shutdown: CancellationToken,
) -> Result<ReplayProgress, RuntimeError> {
    let family = S::Input::FAMILY;
    let input_spec = CATALOG
        .iter()
        .find(|t| t.value == family)
        .ok_or(RuntimeError::NoInputTopic(family))?;
    let input = config.topics.name(input_spec);
    let out = spec.topics(&config.topics);
    let group = format!("{}{}", out.prefix(), stage.name());
    block_in_place(|| {
        clisonix_topics::Admin::connect(&config.kafka)
            .and_then(|a| a.ensure(&out, clisonix_topics::Replication::Auto))
    })
    .map_err(|e| RuntimeError::Replay(format!("creating the run's topics: {e}")))?;
    // Where each partition starts and ends: the run's own commits when it was started
    // before, else the spec resolved now (and committed at once, so a resumed run
    // reads the same records).
    let query = clisonix_topics::consume::Query {
        from: spec.from,
        to: spec.to,
        ..clisonix_topics::consume::Query::whole(&input)
    };
    let planned = block_in_place(|| clisonix_topics::consume::plan(&config.kafka, &query))
        .map_err(|e| RuntimeError::Replay(e.to_string()))?;
    // First the producer: initialising its transactions fences a killed run's open
    // transaction, whose pending offsets would hold the offset fetch below until the
    // transaction timed out.
    let producer: FutureProducer = config
        .kafka
        .producer()
        .set(
            "transactional.id",
            format!("{}-{}", group, config.instance_id),
        )
        .set("transaction.timeout.ms", "30000")
        .create()
        .map_err(kafka("creating the producer"))?;
    block_in_place(|| producer.init_transactions(KAFKA_TIMEOUT))
        .map_err(kafka("initialising transactions"))?;
    let consumer: StreamConsumer<RebalanceEvents> = config
        .kafka
        .consumer(&group)
        // The end of a partition as it is now is at or past the run's end there (the
        // run's ends were the last stable offsets when it was planned).
        .set("enable.partition.eof", "true")
        .create_with_context(RebalanceEvents::default())
        .map_err(kafka("creating the consumer"))?;
    let mut tpl = TopicPartitionList::new();
    for r in &planned {
        tpl.add_partition(&input, r.partition);
    }
    let committed = block_in_place(|| consumer.committed_offsets(tpl, KAFKA_TIMEOUT))
        .map_err(kafka("fetching the run's offsets"))?;
    let mut ends = BTreeMap::new();
    let mut starts = BTreeMap::new();
    let mut first_commit = TopicPartitionList::new();
    for r in &planned {
        let e = committed.find_partition(&input, r.partition);
        let resumed = e.as_ref().and_then(|e| {
            let end = metadata_value(e.metadata(), END_KEY)?;
            Some((e.offset().to_raw()?, end))
        });
        let (start, end) = match resumed {
            Some(se) => se,
            None => {
                let end = r.end.unwrap_or(r.start);
                first_commit
                    .add_partition_offset(&input, r.partition, Offset::Offset(r.start))
                    .map_err(kafka("planning"))?;
                if let Some(mut e) = first_commit.find_partition(&input, r.partition) {
                    e.set_metadata(format!("{METADATA_KEY}-1;{END_KEY}{end}"));
                }
                (r.start, end)
            }
        };
        starts.insert(r.partition, start);
        ends.insert(r.partition, end);
    }
    if first_commit.count() > 0 {
        block_in_place(|| consumer.commit(&first_commit, rdkafka::consumer::CommitMode::Sync))
            .map_err(kafka("recording the run's plan"))?;
    }
    let total: u64 = planned
        .iter()
        .map(|r| (ends[&r.partition] - r.start).max(0) as u64)
        .sum();

    let mut assign = TopicPartitionList::new();
    let mut done = std::collections::BTreeSet::new();
    for (&p, &start) in &starts {
        if start >= ends[&p] {
            done.insert(p);
        } else {
            assign
                .add_partition_offset(&input, p, Offset::Offset(start))
                .map_err(kafka("assigning"))?;
        }
    }
    consumer.assign(&assign).map_err(kafka("assigning"))?;
    info!(stage = stage.name(), %input, %group, total, "replay running");
    let mut this = Loop {
        timing: None,
        dead_letters: out.name(&DEAD_LETTERS),
        topics: out,
        stage,
        consumer,
        producer,
        health,
        input,
        parts: BTreeMap::new(),
        config,
        bounds: Some(Bounds {
            ends,
            sessions: spec.sessions.into_iter().collect(),
            done,
        }),
    };
    let ps: Vec<i32> = starts.keys().copied().collect();
    for (p, _, state) in block_in_place(|| this.committed(&ps))? {
        this.parts.insert(p, state);
    }
    let planned_starts: BTreeMap<i32, i64> =
        planned.iter().map(|r| (r.partition, r.start)).collect();
    let report = |this: &Loop<S>| -> ReplayProgress {
        let b = this.bounds.as_ref().expect("a replay has bounds");
        let read: u64 = b
            .ends
            .iter()
            .map(|(p, &end)| {
                let start = planned_starts[p];
                let at = if b.done.contains(p) {
                    end
                } else {
                    this.parts
                        .get(p)
                        .and_then(|s| s.last)
                        .map_or(start, |l| l + 1)
                };
                (at.min(end) - start).max(0) as u64
            })
            .sum();
        ReplayProgress {
            read,
            total,
            finished: b.done.len() == b.ends.len(),
        }
    };
    progress(report(&this));
    loop {
        if this
            .bounds
            .as_ref()
            .is_some_and(|b| b.done.len() == b.ends.len())
        {
            break;
        }
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            m = this.consumer.recv() => m.map(|m| m.detach()),
            _ = tokio::time::sleep(IDLE_TICK) => {
                block_in_place(|| this.check_done())?;
                progress(report(&this));
                continue;
            }
        };
        let deadline = tokio::time::Instant::now() + this.config.batch_linger;
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let mut at_end = Vec::new();
        let mut next = Some(first);
        while let Some(received) = next.take() {
            match received {
                Ok(m) => batch.push(m),
                Err(KafkaError::PartitionEOF(p)) => at_end.push(p),
                Err(error) => warn!(%error, "consumer error"),
            }
            if batch.len() >= this.config.batch_max {
                break;
            }
            if let Ok(m) = tokio::time::timeout_at(deadline, this.consumer.recv()).await {
                next = Some(m.map(|m| m.detach()));
            }
        }
        if let Some(b) = &this.bounds {
            batch.retain(|m| b.ends.get(&m.partition()).is_some_and(|&e| m.offset() < e));
        }
        if !batch.is_empty() {
            let outputs = block_in_place(|| this.process(&batch));
            match block_in_place(|| this.commit(&batch, &outputs)) {
                Ok(()) => this.metric_transaction("committed"),
                Err(error) => {
                    this.metric_transaction("aborted");
                    warn!(%error, "transaction failed; rewinding to the committed offsets");
                    block_in_place(|| this.abort_and_rewind())?;
                    // Re-read from the committed offsets: nothing is at its end yet.
                    at_end.clear();
                    continue;
                }
            }
        }
        block_in_place(|| this.check_done())?;
        if !at_end.is_empty() {
            block_in_place(|| this.finish(&at_end))?;
        }
        progress(report(&this));
    }
    let last = report(&this);
    progress(last);
    info!(
        stage = this.stage.name(),
        read = last.read,
        finished = last.finished,
        "replay stopped"
    );
    Ok(last)
}

impl<S: Stage> Loop<S> {
    /// A replay's partitions whose read position reached their end: done, paused.
    fn check_done(&mut self) -> Result<(), RuntimeError> {
        let Some(b) = &self.bounds else {
            return Ok(());
        };
        let positions = self
            .consumer
            .position()
            .map_err(kafka("reading positions"))?;
        let mut finished = Vec::new();
        for (&p, &end) in &b.ends {
            if b.done.contains(&p) {
                continue;
            }
            let at = positions
                .find_partition(&self.input, p)
                .and_then(|e| e.offset().to_raw())
                .unwrap_or(-1);
            let processed = self
                .parts
                .get(&p)
                .and_then(|s| s.last)
                .map_or(-1, |l| l + 1);
            if at >= end || processed >= end {
                finished.push(p);
            }
        }
        self.finish(&finished)
    }

    /// Marks a replay's partitions done and stops reading them.
    fn finish(&mut self, finished: &[i32]) -> Result<(), RuntimeError> {
        let finished: Vec<i32> = match &self.bounds {
            Some(b) => finished
                .iter()
                .copied()
                .filter(|p| b.ends.contains_key(p) && !b.done.contains(p))
                .collect(),
            None => return Ok(()),
        };
        if finished.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for &p in &finished {
            tpl.add_partition(&self.input, p);
        }
        self.consumer.pause(&tpl).map_err(kafka("pausing"))?;
        if let Some(b) = &mut self.bounds {
            b.done.extend(finished);
        }
        Ok(())
    }
}
