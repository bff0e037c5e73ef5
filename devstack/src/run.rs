//! The main job, at this stage of the product: stream a real recording's frames
//! through `eeg.frames`, read them back checking every byte, and read the features
//! Albi (running alongside) computes from them out of `eeg.features`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clisonix_edf::{FrameSpec, Framer, Reader};
use clisonix_schemas::{
    decode, encode, DeviceId, FeatureKey, Features, Frame, SessionId, TenantId, Timestamp,
};
use clisonix_topics::catalog::{EEG_FEATURES, EEG_FRAMES};
use clisonix_topics::{KafkaSettings, Topics};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

/// The tenant of local runs, until accounts exist (the gateway issue).
pub const LOCAL_TENANT: &str = "00000000-0000-4000-8000-00000000c115";

#[derive(Debug, Clone)]
pub struct PlayOptions {
    pub frame_ms: u32,
    pub realtime: bool,
}

#[derive(Debug)]
pub struct PlaySummary {
    pub session: SessionId,
    pub frames: usize,
    pub channels: usize,
    pub sample_rate_hz: f64,
    pub seconds_of_eeg: f64,
    pub bytes: usize,
    pub produce: Duration,
    pub partition: i32,
    pub offsets: (i64, i64),
    pub verify: Duration,
    /// Samples per channel streamed (for the expected number of windows).
    pub samples_per_channel: u64,
}

/// Streams the recording at `path` into `eeg.frames`, then consumes the same range
/// back and compares it with what was sent.
pub async fn play(
    settings: &KafkaSettings,
    topics: &Topics,
    path: &Path,
    options: &PlayOptions,
) -> anyhow::Result<PlaySummary> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening the recording {}", path.display()))?;
    let mut reader = Reader::new(std::io::BufReader::new(file))
        .with_context(|| format!("reading {}", path.display()))?;
    let header = reader.header().clone();
    let first = header.data_signals()[0];
    let fs = header.sample_rate(first);
    let samples_per_frame = ((fs * f64::from(options.frame_ms) / 1000.0).round() as u32).max(1);
    let session = SessionId::random();
    let spec = FrameSpec {
        tenant_id: TenantId::parse(LOCAL_TENANT).expect("a valid UUID"),
        device_id: DeviceId::parse("edf-player").expect("valid"),
        session_id: session,
        samples_per_frame,
    };
    let mut framer = Framer::new(&header, spec)?;
    let topic = topics.name(&EEG_FRAMES);
    let producer: FutureProducer = settings
        .producer()
        .create()
        .context("creating a producer")?;

    eprintln!(
        "==> Streaming {} ({} channels at {fs} Hz, {} s) into {topic} as session {session}, {samples_per_frame} samples per frame{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        framer.channel_labels().len(),
        header.record_count.unwrap_or(0) as f64 * header.record_duration_s,
        if options.realtime { ", in real time" } else { "" }
    );
    let started = Instant::now();
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let mut deliveries = Vec::new();
    let mut frames = Vec::new();
    let mut key_bytes = None;
    let mut eeg_seconds = 0.0;
    let mut record = reader.next_record()?;
    loop {
        frames.clear();
        match &record {
            Some(r) => framer.push(r, Timestamp::now(), &mut frames),
            None => framer.finish(Timestamp::now(), &mut frames),
        }
        for frame in &frames {
            if options.realtime {
                let due = Duration::from_secs_f64(eeg_seconds);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            eeg_seconds += f64::from(frame.samples_per_channel) / fs;
            let key = key_bytes.get_or_insert_with(|| encode(&frame.key()).expect("keys encode"));
            let mut frame = frame.clone();
            frame.received_at = Timestamp::now();
            let value = encode(&frame).context("encoding a frame")?;
            deliveries.push(send(&producer, &topic, key, &value, frame.received_at).await?);
            sent.push(value);
            if sent.len() % 400 == 0 {
                eprintln!("    {} frames, {:.0} s of EEG", sent.len(), eeg_seconds);
            }
        }
        if record.is_none() {
            break;
        }
        record = reader.next_record()?;
    }
    let mut positions = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        let delivered = delivery
            .await
            .context("the producer was dropped")?
            .map_err(|(e, _)| e)
            .context("the broker did not acknowledge a frame")?;
        positions.push((delivered.partition, delivered.offset));
    }
    let produce = started.elapsed();
    let partition = positions[0].0;
    if positions.iter().any(|(p, _)| *p != partition) {
        bail!(
            "one session's frames landed on several partitions: the key must decide the partition"
        );
    }
    let offsets = (positions[0].1, positions[positions.len() - 1].1);
    eprintln!(
        "==> {} frames acknowledged by the broker (partition {partition}, offsets {}..={}) in {:.2} s",
        sent.len(),
        offsets.0,
        offsets.1,
        produce.as_secs_f64()
    );

    let verify_started = Instant::now();
    verify(
        settings,
        &topic,
        partition,
        &positions,
        &sent,
        key_bytes.as_deref(),
    )
    .await?;
    Ok(PlaySummary {
        session,
        frames: sent.len(),
        channels: framer.channel_labels().len(),
        sample_rate_hz: fs,
        seconds_of_eeg: eeg_seconds,
        bytes: sent.iter().map(Vec::len).sum(),
        produce,
        partition,
        offsets,
        verify: verify_started.elapsed(),
        samples_per_channel: (eeg_seconds * fs).round() as u64,
    })
}

type Delivery = rdkafka::producer::DeliveryFuture;

/// Enqueues one record, waiting while the producer's queue is full (backpressure).
async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    value: &[u8],
    at: Timestamp,
) -> anyhow::Result<Delivery> {
    loop {
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(value)
            .timestamp(at.as_millis());
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(e).context("producing a frame"),
        }
    }
}

/// Reads the produced range back and checks it record by record.
async fn verify(
    settings: &KafkaSettings,
    topic: &str,
    partition: i32,
    positions: &[(i32, i64)],
    sent: &[Vec<u8>],
    key: Option<&[u8]>,
) -> anyhow::Result<()> {
    let consumer: StreamConsumer = settings
        .consumer(&format!("clisonix-dev-verify-{}", uuid::Uuid::new_v4()))
        .create()
        .context("creating a consumer")?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(positions[0].1))?;
    consumer.assign(&assignment)?;
    let mut previous_seq = None;
    for ((_, offset), bytes) in positions.iter().zip(sent) {
        let message = loop {
            let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                .await
                .context("timed out reading the frames back")??;
            // Records of other sessions interleave on the partition.
            if message.offset() >= *offset && message.key() == key {
                break message;
            }
        };
        if message.offset() != *offset {
            bail!("expected offset {offset}, read {}", message.offset());
        }
        if message.payload() != Some(bytes.as_slice()) {
            bail!("the record at offset {offset} differs from what was sent");
        }
        let frame: Frame = decode(bytes).context("decoding a frame read back")?;
        if previous_seq.is_some_and(|p: u64| frame.seq != p + 1) {
            bail!(
                "frame {} follows frame {previous_seq:?}: out of order",
                frame.seq
            );
        }
        previous_seq = Some(frame.seq);
    }
    eprintln!(
        "==> Read all {} frames back from {topic}: byte-exact, in order, decoded",
        sent.len()
    );
    Ok(())
}

/// Waits until `expected` feature records of `session` are in `eeg.features` (read
/// committed) and returns them ordered by window and channel.
pub async fn features_of(
    settings: &KafkaSettings,
    topics: &Topics,
    session: SessionId,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Features>> {
    let topic = topics.name(&EEG_FEATURES);
    let consumer: StreamConsumer = settings
        .consumer(&format!("clisonix-dev-features-{}", uuid::Uuid::new_v4()))
        .create()
        .context("creating a consumer")?;
    consumer.subscribe(&[&topic])?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut found = std::collections::BTreeMap::new();
    while found.len() < expected {
        let message = match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(m) => m?,
            Err(_) => bail!(
                "only {} of {expected} feature records arrived within {timeout:?}",
                found.len()
            ),
        };
        let Some(key) = message.key().and_then(|k| decode::<FeatureKey>(k).ok()) else {
            continue;
        };
        if key.session_id != session {
            continue;
        }
        let features: Features =
            decode(message.payload().unwrap_or_default()).context("decoding a feature record")?;
        if found
            .insert((key.window_index, key.channel_index), features)
            .is_some()
        {
            bail!(
                "window {} of channel {} arrived twice",
                key.window_index,
                key.channel_index
            );
        }
    }
    Ok(found.into_values().collect())
}
