//! `POST /v1/recordings`: upload an EDF, EDF+ or BDF file as one new session.
//!
//! The body is streamed: a blocking task reads it record by record through the EDF
//! reader (`clisonix-edf`), which scales digital to physical values from each signal's
//! header fields, and the framer cuts frames with the original timestamps (header
//! start time plus sample offset), EDF+ annotations becoming markers. Frames are
//! published as they come, inside one Kafka transaction of a producer of this upload
//! alone, committed only when the whole file was read and every frame confirmed: a
//! broken or abandoned upload leaves nothing visible to the stages (which read
//! committed), and a retried upload of the same `session_id` fences an earlier,
//! stuck one. The answer (201) gives the session, the frame count and the timing.
//! The upload is the whole session: its last frame carries the end marker, so the
//! stages close it as soon as they read it, and later frames of it are refused.
//!
//! An upload must finish within the broker's transaction limit (15 minutes by
//! default); [`MAX_CONCURRENT_UPLOADS`] run at once, more get 429.

use std::io::BufReader;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use clisonix_edf::{Format, FrameSpec, Framer, Reader};
use clisonix_ingest_protocol::{Reason, Rejection};
use clisonix_schemas::{
    encode, DeviceId, Frame, Marker, SessionId, Timestamp, AUDIO_PRESETS_MARKER, SESSION_END_MARKER,
};
use clisonix_service::error::ApiError;
use futures::StreamExt;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::http::{rejection_error, AppState, DeviceKey};
use crate::ingest::{forbidden, prepare, preset_refusal, quota_rejection, SessionRow};
use crate::metrics::Transport;
use clisonix_tenancy::quota::Amounts;

/// Uploads processed at once.
pub const MAX_CONCURRENT_UPLOADS: usize = 4;
/// Kafka's default upper bound for a transaction (`transaction.max.timeout.ms`).
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadParams {
    /// The device the recording came from (default `upload`).
    pub device_id: Option<String>,
    /// The new session's id (default: a fresh one). Naming it makes a retried upload
    /// safe: an id that already holds frames answers 409.
    pub session_id: Option<String>,
    /// Frame length in milliseconds (default 125).
    pub frame_ms: Option<u32>,
    /// Audio presets to render, comma-separated (default: the audio stage's
    /// defaults); each must be one the tenant's plan renders.
    pub audio: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordingAnswer {
    pub session_id: String,
    pub device_id: String,
    /// `EDF`, `EDF+C`, `EDF+D`, `BDF`, `BDF+C` or `BDF+D`.
    pub format: String,
    pub frames: u64,
    pub channels: Vec<String>,
    pub sample_rate_hz: f64,
    pub samples_per_frame: u32,
    /// The header's start time (RFC 3339, read as UTC).
    pub start_time: String,
    pub duration_s: f64,
    pub markers: u64,
}

/// What the reading task hands over.
enum Read {
    Header {
        format: Format,
        labels: Vec<String>,
        sample_rate_hz: f64,
        samples_per_frame: u32,
        start_us: i64,
        /// Samples per channel the header announces (None: it does not say).
        samples: Option<u64>,
    },
    Frames(Vec<Frame>),
    Failed(ApiError),
}

/// Counts running uploads; a guard gives the slot back.
#[derive(Debug, Default)]
pub struct UploadSlots(AtomicUsize);

struct Slot<'a>(&'a UploadSlots);

impl UploadSlots {
    fn take(&self) -> Option<Slot<'_>> {
        let prev = self.0.fetch_add(1, Ordering::SeqCst);
        if prev >= MAX_CONCURRENT_UPLOADS {
            self.0.fetch_sub(1, Ordering::SeqCst);
            None
        } else {
            Some(Slot(self))
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn bad_recording(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_recording", message)
}

fn format_name(format: Format) -> &'static str {
    match format {
        Format::Edf => "EDF",
        Format::EdfPlus { continuous: true } => "EDF+C",
        Format::EdfPlus { continuous: false } => "EDF+D",
        Format::Bdf => "BDF",
        Format::BdfPlus { continuous: true } => "BDF+C",
        Format::BdfPlus { continuous: false } => "BDF+D",
    }
}

/// `POST /v1/recordings`. A refusal may come before the body is read to its end: it
/// says `Connection: close`, so the client does not send its next request on a
/// connection whose unread upload the server drops.
pub async fn upload(
    state: State<AppState>,
    key: DeviceKey,
    params: Query<UploadParams>,
    body: Body,
) -> Response {
    match receive(state, key, params, body).await {
        Ok(done) => done.into_response(),
        Err(e) => {
            let mut r = e.into_response();
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

async fn receive(
    State(state): State<AppState>,
    key: DeviceKey,
    Query(params): Query<UploadParams>,
    body: Body,
) -> Result<(StatusCode, Json<RecordingAnswer>), ApiError> {
    let _slot = state.uploads.take().ok_or_else(|| {
        ApiError::too_many(
            "overloaded",
            format!("{MAX_CONCURRENT_UPLOADS} uploads are running; try again shortly"),
            state.config.retry_after.as_secs().max(1),
        )
    })?;
    let tenant = key.tenant();
    let device = DeviceId::parse(params.device_id.as_deref().unwrap_or("upload")).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            e.to_string(),
        )
        .field("device_id")
    })?;
    let session = match &params.session_id {
        Some(s) => SessionId::parse(s).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                e.to_string(),
            )
            .field("session_id")
        })?,
        None => SessionId::random(),
    };
    let frame_ms = params.frame_ms.unwrap_or(state.config.recording_frame_ms);
    if !(1..=10_000).contains(&frame_ms) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "frame_ms must be 1 to 10000",
        )
        .field("frame_ms"));
    }
    let ingest = state.ingest.clone();
    let received_at = Timestamp::now();

    // Read the body on a blocking thread, a bounded queue away from the publisher.
    let max_bytes = state.config.max_recording_bytes;
    let bytes_metric = ingest
        .metrics
        .bytes_in
        .with_label_values(&[Transport::Recording.as_str()]);
    let mut seen = 0usize;
    let stream = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        seen += chunk.len();
        bytes_metric.inc_by(chunk.len() as u64);
        if seen > max_bytes {
            return Err(std::io::Error::other(format!(
                "the upload is larger than {max_bytes} bytes"
            )));
        }
        Ok(chunk)
    });
    let bridge = SyncIoBridge::new(StreamReader::new(stream));
    let (tx, mut rx) = mpsc::channel::<Read>(8);
    let spec = FrameSpec {
        tenant_id: tenant,
        device_id: device.clone(),
        session_id: session,
        samples_per_frame: 1,
    };
    let reading = tokio::task::spawn_blocking(move || {
        read_recording(bridge, spec, frame_ms, received_at, max_bytes, &tx)
    });

    let first = rx.recv().await;
    let Some(Read::Header {
        format,
        labels,
        sample_rate_hz,
        samples_per_frame,
        start_us,
        samples,
    }) = first
    else {
        let _ = reading.await;
        return Err(match first {
            Some(Read::Failed(e)) => e,
            _ => bad_recording("the recording has no readable header"),
        });
    };

    // Refuse a session that exists before reading any further (checked again, under
    // the session's lock, when the first frame is published).
    match ingest.session(session).await {
        Err(e) => return Err(unavailable(&state, e)),
        Ok(Some(row)) if row.tenant_id != tenant.as_uuid() => {
            return Err(rejection_error(&forbidden(session)))
        }
        Ok(Some(row)) => taken(session, &row)?,
        Ok(None) => {}
    }
    // Presets the plan does not render are refused before anything is read further.
    ingest.load_quota(tenant).await;
    let plan_presets = ingest.quotas.audio_presets(tenant.as_uuid());
    let picked: Vec<String> = params
        .audio
        .as_deref()
        .map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if let Some(refusal) = plan_presets
        .as_deref()
        .and_then(|plan| preset_refusal(&picked, plan))
    {
        drop(rx);
        let _ = reading.await;
        return Err(rejection_error(&refusal.field("audio")));
    }
    // The session's first frame carries the picked presets and the plan's.
    let mut picked_marker = (!picked.is_empty()).then(|| Marker {
        sample_offset: 0,
        duration_us: None,
        label: format!("{AUDIO_PRESETS_MARKER}{}", picked.join(",")),
    });
    // The upload must fit the tenant's quotas as a whole, as far as its header tells:
    // one upload, its frames, their time, and at least their samples' bytes. It is
    // refused before anything is published; what it really used is settled after.
    let announced = upload_amounts(samples, samples_per_frame, labels.len(), sample_rate_hz);
    let reservation = match ingest.quotas.reserve(tenant.as_uuid(), announced) {
        Ok(r) => r,
        Err(refusal) => {
            // The reader stops at its next hand-over.
            drop(rx);
            let _ = reading.await;
            return Err(rejection_error(&quota_rejection(&refusal)));
        }
    };
    if let Err(refusal) = ingest.check_device(tenant, &device).await {
        ingest.quotas.settle(reservation, Amounts::default());
        drop(rx);
        let _ = reading.await;
        return Err(rejection_error(&refusal));
    }
    let mut tx_db = match ingest.pool.begin().await {
        Ok(tx) => tx,
        Err(e) => {
            ingest.quotas.settle(reservation, Amounts::default());
            return Err(unavailable(&state, e));
        }
    };
    let mut producer: Option<FutureProducer> = None;
    let key_bytes = encode(&clisonix_schemas::SessionKey {
        tenant_id: tenant,
        session_id: session,
    })
    .expect("keys encode");
    let mut pending: std::collections::VecDeque<DeliveryFuture> = Default::default();
    let mut frames = 0u64;
    let mut markers = 0u64;
    let mut bytes = 0usize;
    let topic = ingest.frames_topic.clone();
    let failure: Option<ApiError> = 'publish: loop {
        let batch = match rx.recv().await {
            None => break None,
            Some(Read::Failed(e)) => break Some(e),
            Some(Read::Header { .. }) => continue,
            Some(Read::Frames(batch)) => batch,
        };
        for mut frame in batch {
            let index = frames as usize;
            let mut added = 0;
            if let Some(m) = picked_marker.take() {
                frame.markers.push(m);
                added += 1;
            }
            let mut p = match prepare(index, Ok(frame), &ingest.limits, Timestamp::now()) {
                Ok(p) => p,
                Err(r) => {
                    let e = r.error.expect("a refusal has a reason");
                    let mut err = rejection_error(&e);
                    err.message = format!("frame {index}: {}", e.message);
                    break 'publish Some(err);
                }
            };
            if index == 0 {
                if let Some(plan) = plan_presets.as_deref() {
                    p.add_plan_marker(plan);
                    added += 1;
                }
            }
            if producer.is_none() {
                match begin(&state, &mut tx_db, tenant, &p.head, session).await {
                    Ok(pr) => producer = Some(pr),
                    Err(e) => break 'publish Some(e),
                }
            }
            let pr = producer.as_ref().expect("begun");
            // The annotations' markers (not the end marker ingest adds).
            markers += (p.head.markers - usize::from(p.head.ends_session) - added) as u64;
            bytes += p.value.len();
            let mut record = FutureRecord::to(&topic)
                .key(&key_bytes)
                .payload(&p.value[..])
                .timestamp(received_at.as_millis());
            let delivery = loop {
                match pr.send_result(record) {
                    Ok(d) => break d,
                    Err((e, r))
                        if e.rdkafka_error_code()
                            == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                    {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => break 'publish Some(broker(&state, e)),
                }
            };
            pending.push_back(delivery);
            frames += 1;
            // Keep the confirmations awaited close behind the sends.
            while pending.len() > 1024 {
                if let Err(e) = confirmed(pending.pop_front().expect("non-empty")).await {
                    break 'publish Some(broker(&state, e));
                }
            }
        }
    };
    // The reader may be waiting to hand over more frames: it stops at its next
    // hand-over once nothing receives them.
    drop(rx);
    let _ = reading.await;
    let failure = match failure {
        Some(e) => Some(e),
        None if frames == 0 => Some(bad_recording("the recording holds no samples")),
        None => {
            let mut failed = None;
            while let Some(d) = pending.pop_front() {
                if let Err(e) = confirmed(d).await {
                    failed = Some(broker(&state, e));
                    break;
                }
            }
            failed
        }
    };
    if let Some(e) = failure {
        ingest.quotas.settle(reservation, Amounts::default());
        if let Some(p) = producer {
            let _ = tokio::task::spawn_blocking(move || {
                p.abort_transaction(Timeout::After(Duration::from_secs(30)))
            })
            .await;
        }
        return Err(e);
    }
    let producer = producer.expect("a frame was sent, so the transaction began");
    let p = producer.clone();
    let committed = tokio::task::spawn_blocking(move || {
        clisonix_topics::client::commit_transaction(&p, Duration::from_secs(60))
    })
    .await
    .map_err(ApiError::internal)
    .and_then(|r| r.map_err(|e| broker(&state, e)));
    if let Err(e) = committed {
        ingest.quotas.settle(reservation, Amounts::default());
        return Err(e);
    }
    let mut used = upload_amounts(
        Some(frames * u64::from(samples_per_frame)),
        samples_per_frame,
        labels.len(),
        sample_rate_hz,
    );
    used.0[1] = bytes as i64;
    ingest.quotas.settle(reservation, used);
    let recorded = sqlx::query(
        "UPDATE ingest_sessions SET last_seq = $2, frames = $3, last_frame_at = now(), ended_at = now() WHERE session_id = $1",
    )
    .bind(session.as_uuid())
    .bind(frames as i64 - 1)
    .bind(frames as i64)
    .execute(&mut *tx_db)
    .await;
    if let Err(error) = match recorded {
        Ok(_) => tx_db.commit().await,
        Err(e) => Err(e),
    } {
        tracing::error!(%error, %session, "recording an uploaded session failed (its frames are published)");
    }
    ingest
        .metrics
        .frames
        .with_label_values(&[Transport::Recording.as_str()])
        .inc_by(frames);
    ingest
        .usage
        .record(tenant, session, &device, frames as usize, bytes);
    ingest.usage.record_upload(tenant, session, &device);
    let duration_s = frames as f64 * f64::from(samples_per_frame) / sample_rate_hz;
    tracing::info!(%session, %tenant, frames, duration_s, "recording ingested");
    let start = chrono::DateTime::from_timestamp_micros(start_us).unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(RecordingAnswer {
            session_id: session.to_string(),
            device_id: device.to_string(),
            format: format_name(format).to_owned(),
            frames,
            channels: labels,
            sample_rate_hz,
            samples_per_frame,
            start_time: start.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            duration_s,
            markers,
        }),
    ))
}

/// What an upload of `samples` samples per channel uses of the quotas: one upload, its
/// frames, its device and channel time, and at least its samples' bytes (the records
/// add their headers). An upload whose header does not give its length counts as
/// one upload and one frame until it is read.
fn upload_amounts(
    samples: Option<u64>,
    samples_per_frame: u32,
    channels: usize,
    rate_hz: f64,
) -> Amounts {
    let samples = samples.unwrap_or(0);
    let frames = samples.div_ceil(u64::from(samples_per_frame.max(1))).max(1);
    let mut amounts = Amounts::frames(
        frames as i64,
        (samples * channels as u64 * 4) as i64,
        samples,
        channels,
        rate_hz,
    );
    amounts.add(&Amounts::upload());
    amounts
}

async fn confirmed(d: DeliveryFuture) -> Result<(), rdkafka::error::KafkaError> {
    match d.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(rdkafka::error::KafkaError::Canceled),
    }
}

fn unavailable(state: &AppState, e: impl std::fmt::Display) -> ApiError {
    rejection_error(&state.ingest.unavailable(e))
}

fn broker(state: &AppState, e: rdkafka::error::KafkaError) -> ApiError {
    tracing::warn!(error = %e, "an upload could not be published");
    rejection_error(
        &Rejection::new(
            Reason::BrokerUnavailable,
            format!("the broker did not take the recording: {e}"),
        )
        .retry_after_ms(state.config.retry_after.as_millis() as u64),
    )
}

/// Refuses a session that holds frames, or that an ingest instance serves (it may have
/// frames its row does not show yet): an upload would mix into it.
fn taken(session: SessionId, row: &SessionRow) -> Result<(), ApiError> {
    let what = if row.last_seq >= 0 {
        format!("already holds {} frames", row.last_seq + 1)
    } else if row.claimed {
        "is being streamed to ingest".to_owned()
    } else {
        return Ok(());
    };
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "session_exists",
        format!("session {session} {what}"),
    )
    .field("session_id"))
}

/// Creates the session (refusing one that exists) and the upload's transactional
/// producer, with its transaction begun.
async fn begin(
    state: &AppState,
    tx_db: &mut sqlx::PgConnection,
    tenant: clisonix_schemas::TenantId,
    first: &crate::ingest::Head,
    session: SessionId,
) -> Result<FutureProducer, ApiError> {
    let row = state
        .ingest
        .lock_session(tx_db, tenant, Transport::Recording, first)
        .await
        .map_err(|e| unavailable(state, e))?;
    if row.tenant_id != tenant.as_uuid() {
        return Err(rejection_error(&forbidden(session)));
    }
    taken(session, &row)?;
    let mut config = state.config.kafka.producer();
    config
        .set("transactional.id", format!("alba-recording-{session}"))
        // Frames do not compress, as for ingest's producers (`producer_config`).
        .set("compression.type", "none")
        .set(
            "transaction.timeout.ms",
            TRANSACTION_TIMEOUT.as_millis().to_string(),
        )
        .set(
            "message.timeout.ms",
            state.config.publish_timeout.as_millis().to_string(),
        );
    let producer: FutureProducer = config.create().map_err(|e| broker(state, e))?;
    let p = producer.clone();
    tokio::task::spawn_blocking(move || {
        p.init_transactions(Timeout::After(Duration::from_secs(30)))?;
        p.begin_transaction()
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| broker(state, e))?;
    Ok(producer)
}

/// The blocking side: reads the file and hands over the header, then frames.
fn read_recording(
    input: impl std::io::Read,
    mut spec: FrameSpec,
    frame_ms: u32,
    received_at: Timestamp,
    max_bytes: usize,
    tx: &mpsc::Sender<Read>,
) {
    let edf_error = |e: clisonix_edf::EdfError| match e {
        clisonix_edf::EdfError::Io(io) if io.to_string().contains("larger than") => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("recordings are limited to {max_bytes} bytes"),
        ),
        other => bad_recording(other.to_string()),
    };
    let mut reader = match Reader::new(BufReader::with_capacity(256 * 1024, input)) {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.blocking_send(Read::Failed(edf_error(e)));
            return;
        }
    };
    let header = reader.header().clone();
    let Some(&first) = header.data_signals().first() else {
        let _ = tx.blocking_send(Read::Failed(bad_recording(
            "the recording has no data signals",
        )));
        return;
    };
    let fs = header.sample_rate(first);
    spec.samples_per_frame = ((fs * f64::from(frame_ms) / 1000.0).round() as u32).max(1);
    let mut framer = match Framer::new(&header, spec.clone()) {
        Ok(f) => f,
        Err(e) => {
            let _ = tx.blocking_send(Read::Failed(bad_recording(e.to_string())));
            return;
        }
    };
    let announced = Read::Header {
        format: header.format,
        labels: framer.channel_labels().to_vec(),
        sample_rate_hz: fs,
        samples_per_frame: spec.samples_per_frame,
        start_us: header.start.unix_micros(),
        samples: header
            .record_count
            .map(|n| n * header.signals[first].samples_per_record as u64),
    };
    if tx.blocking_send(announced).is_err() {
        return;
    }
    let mut out = Vec::new();
    loop {
        match reader.next_record() {
            Ok(Some(record)) => framer.push(&record, received_at, &mut out),
            Ok(None) => {
                framer.finish(received_at, &mut out);
                // The upload is the whole session: its last frame ends it, so every
                // stage sees a finished session at once.
                if let Some(last) = out.last_mut() {
                    last.markers.push(Marker {
                        sample_offset: last.samples_per_channel.saturating_sub(1),
                        duration_us: None,
                        label: SESSION_END_MARKER.to_owned(),
                    });
                    let _ = tx.blocking_send(Read::Frames(out));
                }
                return;
            }
            Err(e) => {
                let _ = tx.blocking_send(Read::Failed(edf_error(e)));
                return;
            }
        }
        // The newest frame stays behind: it may be the last, which gets the end marker.
        if out.len() > 64 {
            let newest = out.pop().expect("more than 64");
            if tx
                .blocking_send(Read::Frames(std::mem::replace(&mut out, vec![newest])))
                .is_err()
            {
                return;
            }
        }
    }
}
