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
const METADATA_KEY: &str = "emitted_through=";
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

impl ClientContext for RebalanceEvents {}

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
                let emitted_through = e
                    .metadata()
                    .strip_prefix(METADATA_KEY)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(-1);
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
                e.set_metadata(format!("{METADATA_KEY}{}", last.max(state.emitted_through)));
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
        self.producer.commit_transaction(KAFKA_TIMEOUT)?;
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
