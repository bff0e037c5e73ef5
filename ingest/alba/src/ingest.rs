//! The heart of ingest, shared by every transport: checked frames of one tenant are
//! grouped by session; each session's group is published while this instance holds the
//! session (see [`crate::sessions`]), and answered only from the broker's confirmations.
//!
//! Per session group:
//! 1. hold the session: one group of it at a time, served by this instance alone
//!    (claimed in the database, and created with the first frame's device, rate, unit
//!    and channels, when this instance does not serve it yet); refuse the group if the
//!    session belongs to another tenant;
//! 2. a frame at or below the session's `last_seq` is a duplicate (not published);
//!    one not above the previous frame of the group is out of order; one whose device,
//!    rate, unit or channels differ from the session's is a mismatch;
//! 3. publish the rest in order to `eeg.frames` (key: tenant+session, so one
//!    partition, in order) and wait for the broker;
//! 4. advance `last_seq` over the confirmed prefix (in memory; written to the row
//!    within a tick) and let the next group of the session go.
//!
//! A session is served by one instance at a time, so a resend after a reconnect
//! anywhere sees what was published. A crash loses at most the last tick of
//! `last_seq` updates: those frames' resend is published again (at least once;
//! downstream stages count and drop duplicate sequence numbers), never lost.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use clisonix_ingest_protocol::answer::{FrameResult, FrameStatus};
use clisonix_ingest_protocol::binary::{self, Stamps};
use clisonix_ingest_protocol::validate::{validate, validate_view};
use clisonix_ingest_protocol::{Limits, QuotaDetail, Reason, Rejection};
use clisonix_schemas::{
    decode, encode, listed_in, DeviceId, Frame, Marker, SampleUnit, SessionId, TenantId, Timestamp,
    AUDIO_PLAN_MARKER, AUDIO_PRESETS_MARKER, NO_AUDIO,
};
use clisonix_tenancy::quota::{Amounts, QuotaBook, Refusal};
use sqlx::PgPool;
use uuid::Uuid;

use crate::metrics::{Metrics, Transport};
use crate::publisher::{PublishError, Publisher, Record};
use crate::sessions::{ClaimError, Sessions};
use crate::usage::Usage;

/// A frame ready to publish: checked, owned by the caller's tenant, encoded.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Position in the request or stream.
    pub index: usize,
    pub head: Head,
    /// The record to publish: its own buffer, or a slice of the body it came in.
    pub value: Bytes,
}

/// What ingest needs of a checked frame besides its record: where it goes, how it is
/// numbered, and what its session must agree with.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub session_id: SessionId,
    pub seq: u64,
    pub device_id: DeviceId,
    pub sample_rate_hz: f64,
    pub unit: SampleUnit,
    /// Shared by the frames of a body that carry the same labels.
    pub channel_labels: Arc<[String]>,
    pub received_at: Timestamp,
    pub markers: usize,
    /// The frame carries the session's end marker.
    pub ends_session: bool,
    pub samples_per_channel: u32,
    /// The audio presets the frame picks for its session (its `clisonix.audio=`
    /// marker), checked against the tenant's plan.
    pub audio_presets: Vec<String>,
}

impl Head {
    pub fn of(frame: &Frame) -> Head {
        Head {
            session_id: frame.session_id,
            seq: frame.seq,
            device_id: frame.device_id.clone(),
            sample_rate_hz: frame.sample_rate_hz,
            unit: frame.unit,
            channel_labels: frame.channel_labels.clone().into(),
            received_at: frame.received_at,
            markers: frame.markers.len(),
            ends_session: frame.ends_session(),
            samples_per_channel: frame.samples_per_channel,
            audio_presets: picked_presets(frame.markers.iter().map(|m| m.label.as_str())),
        }
    }
}

/// The presets a frame's markers pick (none, nearly always: no allocation then).
fn picked_presets<'a>(labels: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    listed_in(labels, AUDIO_PRESETS_MARKER)
        .map(|names| names.into_iter().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The refusal of a frame picking an audio preset the tenant's plan does not render.
pub fn preset_refusal(picked: &[String], plan: &[String]) -> Option<Rejection> {
    let missing: Vec<&str> = picked
        .iter()
        .filter(|p| p.as_str() != NO_AUDIO && !plan.contains(p))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        return None;
    }
    let rendered = if plan.is_empty() {
        "none".to_owned()
    } else {
        plan.join(", ")
    };
    Some(
        Rejection::new(
            Reason::PresetNotInPlan,
            format!(
                "the plan does not render the audio preset(s) {} (it renders: {rendered}); change plan or pick others",
                missing.join(", ")
            ),
        )
        .field("markers"),
    )
}

/// The marker ingest puts on a session's first frame: the presets its plan renders,
/// which Jona keeps to whatever the session picks or Jona's defaults are.
pub fn plan_marker(plan: &[String]) -> Marker {
    Marker {
        sample_offset: 0,
        duration_us: None,
        label: format!("{AUDIO_PLAN_MARKER}{}", plan.join(",")),
    }
}

impl Prepared {
    /// Adds the marker listing the plan's presets (after the frame is checked: devices
    /// cannot send it). The record is decoded and encoded again: once per session.
    pub fn add_plan_marker(&mut self, plan: &[String]) {
        let Ok(mut frame) = decode::<Frame>(&self.value) else {
            return;
        };
        frame.markers.push(plan_marker(plan));
        if let Ok(value) = encode(&frame) {
            self.value = value.into();
            self.head.markers += 1;
        }
    }
}

impl Prepared {
    /// What accepting this frame uses of the tenant's quotas.
    pub fn amounts(&self) -> Amounts {
        Amounts::frames(
            1,
            self.value.len() as i64,
            u64::from(self.head.samples_per_channel),
            self.head.channel_labels.len(),
            self.head.sample_rate_hz,
        )
    }
}

/// Bodies are parsed and checked on the runtime thread they arrive on when that is
/// about 100 µs of work at most (tokio's rule of thumb for a task between two awaits),
/// and on the blocking pool otherwise, which costs a hand-off to another thread and
/// back. `prepare_body` takes about 0.56 µs for a 4.4 KB binary frame and 56 µs for the
/// same frame in JSON, 19.8 KB (`cargo bench -p clisonix-alba --bench prepare`): so
/// up to this many bytes of binary body,
pub const INLINE_PREPARE_BYTES: usize = 768 * 1024;
/// each byte of JSON counting as this many.
pub const JSON_PREPARE_COST: usize = 24;

/// Whether a body of `binary` bytes of binary frames and `json` bytes of JSON is
/// prepared on the runtime thread; see [`INLINE_PREPARE_BYTES`].
pub fn prepare_inline(binary: usize, json: usize) -> bool {
    binary.saturating_add(json.saturating_mul(JSON_PREPARE_COST)) <= INLINE_PREPARE_BYTES
}

/// Preparing a body panicked: a bug, which the request answers as an internal error
/// wherever the body was prepared.
#[derive(Debug, thiserror::Error)]
#[error("preparing the body panicked")]
pub struct PreparePanicked;

/// Runs `prepare` (parsing and checking a body) here when `inline`, else on the
/// blocking pool; see [`prepare_inline`].
pub async fn run_prepare<T: Send + 'static>(
    inline: bool,
    prepare: impl FnOnce() -> T + Send + 'static,
) -> Result<T, PreparePanicked> {
    if inline {
        // Nothing `prepare` owns or borrows is used again after a panic.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(prepare)).map_err(|_| PreparePanicked)
    } else {
        tokio::task::spawn_blocking(prepare)
            .await
            .map_err(|_| PreparePanicked)
    }
}

/// Checks and encodes a frame, or says why not.
pub fn prepare(
    index: usize,
    frame: Result<Frame, Rejection>,
    limits: &Limits,
    now: Timestamp,
) -> Result<Prepared, Box<FrameResult>> {
    let frame = frame.map_err(|r| Box::new(rejected(index, None, None, r)))?;
    let refuse = |r| Box::new(rejected(index, Some(frame.session_id), Some(frame.seq), r));
    validate(&frame, limits, now).map_err(refuse)?;
    match encode(&frame) {
        Ok(value) => Ok(Prepared {
            index,
            head: Head::of(&frame),
            value: value.into(),
        }),
        Err(e) => Err(refuse(Rejection::new(
            Reason::MalformedFrame,
            e.to_string(),
        ))),
    }
}

/// The labels of the last frame of a body that passed: a later frame with the same
/// label bytes shares them, already checked.
#[derive(Debug, Default)]
pub struct LastLabels<'a> {
    raw: &'a [u8],
    labels: Option<Arc<[String]>>,
}

/// A binary body's frames: each checked, and its record made from the client's own
/// bytes with tenant and receive time replaced. The body is rewritten where it lies
/// and each record is a slice of it, so a frame's bytes are not copied on their way
/// to the broker; a record whose new fields do not fit where the old ones were (see
/// [`Stamps::stamp`]) is copied instead. The body is copied once first if it is
/// shared. Items are numbered from `first`.
///
/// [`Stamps::stamp`]: clisonix_ingest_protocol::binary::Stamps::stamp
pub fn prepare_binary_body(
    body: Bytes,
    first: usize,
    tenant: TenantId,
    limits: &Limits,
    now: Timestamp,
) -> Result<Vec<Result<Prepared, Box<FrameResult>>>, Rejection> {
    let mut body = body
        .try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
    let mut checked = {
        let start = body.as_ptr() as usize;
        let mut last = LastLabels::default();
        binary::split_items(&body)?
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let at = item.as_ptr() as usize - start;
                prepare_binary(first + i, item, at, &mut last, tenant, limits, now)
            })
            .collect::<Vec<_>>()
    };
    let tenant_text = tenant.to_string();
    for c in checked.iter_mut().flatten() {
        if let Source::InBody { at, stamps } = &c.record {
            let item = &mut body[at.clone()];
            if !stamps.stamp(item, &tenant_text, now) {
                c.record = Source::Copied(stamps.record(item, &tenant_text, now).into());
            }
        }
    }
    let body = body.freeze();
    Ok(checked
        .into_iter()
        .map(|c| {
            c.map(|c| Prepared {
                index: c.index,
                head: c.head,
                value: match c.record {
                    Source::InBody { at, .. } => body.slice(at),
                    Source::Copied(value) => value,
                },
            })
        })
        .collect())
}

/// A checked binary item, its record still to be stamped.
struct Checked {
    index: usize,
    head: Head,
    record: Source,
}

/// Where a checked item's record comes from.
enum Source {
    /// The item's own bytes, at `at` in the body, once tenant and receive time are
    /// written in.
    InBody { at: Range<usize>, stamps: Stamps },
    /// A record of its own: decoded and encoded again, or too different to stamp in
    /// place.
    Copied(Bytes),
}

/// A binary body item at `at`: read in place when it is a record of the current
/// version, otherwise through the full decoder, which names what is wrong.
fn prepare_binary<'a>(
    index: usize,
    item: &'a [u8],
    at: usize,
    last: &mut LastLabels<'a>,
    tenant: TenantId,
    limits: &Limits,
    now: Timestamp,
) -> Result<Checked, Box<FrameResult>> {
    let Some(view) = binary::view(item) else {
        return prepare(index, binary::decode_frame(item, tenant, now), limits, now).map(|p| {
            Checked {
                index,
                head: p.head,
                record: Source::Copied(p.value),
            }
        });
    };
    let known = last.labels.as_ref().filter(|_| last.raw == view.labels_raw);
    if let Err(r) = validate_view(&view, known.is_some(), limits, now) {
        return Err(Box::new(rejected(
            index,
            Some(view.session_id),
            Some(view.seq),
            r,
        )));
    }
    let channel_labels = match known {
        Some(labels) => labels.clone(),
        None => {
            let labels: Arc<[String]> = view
                .channel_labels
                .iter()
                .map(|l| (*l).to_owned())
                .collect();
            *last = LastLabels {
                raw: view.labels_raw,
                labels: Some(labels.clone()),
            };
            labels
        }
    };
    Ok(Checked {
        index,
        record: Source::InBody {
            at: at..at + item.len(),
            stamps: view.stamps(),
        },
        head: Head {
            session_id: view.session_id,
            seq: view.seq,
            ends_session: view.ends_session(),
            markers: view.markers.len(),
            audio_presets: picked_presets(view.markers.iter().map(|m| m.label)),
            device_id: view.device_id,
            sample_rate_hz: view.sample_rate_hz,
            unit: view.unit,
            channel_labels,
            received_at: now,
            samples_per_channel: view.samples_per_channel,
        },
    })
}

pub fn rejected(
    index: usize,
    session: Option<SessionId>,
    seq: Option<u64>,
    error: Rejection,
) -> FrameResult {
    FrameResult {
        index,
        session_id: session.map(|s| s.to_string()),
        seq,
        status: FrameStatus::Rejected,
        error: Some(error),
    }
}

/// The refusal of frames beyond a tenant's quota.
pub fn quota_rejection(refusal: &Refusal) -> Rejection {
    match refusal {
        Refusal::QuotaExceeded {
            meter,
            limit,
            used,
            resets_at,
        } => {
            let wait = (*resets_at - chrono::Utc::now())
                .num_milliseconds()
                .max(1000);
            Rejection::new(Reason::QuotaExceeded, refusal.to_string())
                .retry_after_ms(wait as u64)
                .quota(QuotaDetail {
                    meter: meter.as_str().to_owned(),
                    limit: *limit,
                    used: *used,
                    resets_at: Some(resets_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                })
        }
        Refusal::PaymentRequired { .. } => {
            Rejection::new(Reason::PaymentRequired, refusal.to_string())
        }
    }
}

/// A frame's result; `session` is its session id as text, made once per group.
fn done(p: &Prepared, session: &str, status: FrameStatus) -> FrameResult {
    FrameResult {
        index: p.index,
        session_id: Some(session.to_owned()),
        seq: Some(p.head.seq),
        status,
        error: None,
    }
}

/// Who numbers a session's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numbering {
    /// The device: sequence numbers are checked.
    Device,
    /// Ingest: each frame gets the session's next number (legacy `/collect`).
    Assigned,
}

/// What the session row says.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub tenant_id: Uuid,
    pub device_id: String,
    pub sample_rate_hz: f64,
    pub unit: String,
    pub channel_labels: Vec<String>,
    /// -1 before the first frame.
    pub last_seq: i64,
    /// A frame with the end marker was published: no more frames.
    pub ended: bool,
    /// An ingest instance holds the session (its lease has not run out).
    pub claimed: bool,
}

/// Everything a transport needs to get frames to the broker.
#[derive(Debug)]
pub struct Ingest {
    pub pool: PgPool,
    pub sessions: Arc<Sessions>,
    pub publisher: Arc<Publisher>,
    pub frames_topic: String,
    pub limits: Limits,
    pub usage: Arc<Usage>,
    /// The tenants' quotas, checked before a frame is published.
    pub quotas: Arc<QuotaBook>,
    pub metrics: Metrics,
    pub retry_after: Duration,
}

impl Ingest {
    /// The session's row, if it exists (no lock).
    pub async fn session(&self, session: SessionId) -> Result<Option<SessionRow>, sqlx::Error> {
        crate::sessions::read(&self.pool, session, false).await
    }

    /// The retryable refusal when the database does not answer.
    pub fn unavailable(&self, what: impl std::fmt::Display) -> Rejection {
        Rejection::new(
            Reason::Unavailable,
            format!("ingest cannot reach its database: {what}"),
        )
        .retry_after_ms(self.retry_after.as_millis() as u64)
    }

    /// Why frames of a session this instance cannot serve now are refused.
    pub fn claim_refusal(&self, e: ClaimError) -> Rejection {
        match e {
            ClaimError::Forbidden(s) => forbidden(s),
            ClaimError::Busy(_) => Rejection::new(Reason::SessionBusy, e.to_string())
                .retry_after_ms(self.retry_after.as_millis() as u64),
            ClaimError::SessionLimit { limit, active } => {
                Rejection::new(Reason::ConcurrentSessionsExceeded, e.to_string()).quota(
                    QuotaDetail {
                        meter: "concurrent_sessions".into(),
                        limit: i64::from(limit),
                        used: active,
                        resets_at: None,
                    },
                )
            }
            ClaimError::DeviceLimit { limit, devices } => {
                Rejection::new(Reason::DevicesExceeded, e.to_string()).quota(QuotaDetail {
                    meter: "devices".into(),
                    limit: i64::from(limit),
                    used: devices,
                    resets_at: None,
                })
            }
            ClaimError::Database(e) => self.unavailable(e),
        }
    }

    /// Loads the tenant's quota standing when this instance does not have it yet (one
    /// query on its first request here). Without the database the frames are not
    /// refused for it: quotas are checked again at the next request.
    pub async fn load_quota(&self, tenant: TenantId) {
        if let Err(error) = self.quotas.ensure(tenant.as_uuid()).await {
            tracing::warn!(%error, %tenant, "reading the tenant's quotas failed");
        }
    }

    /// Refuses `device` when it is new to the tenant and the tenant's plan allows no
    /// more devices (recording uploads; streamed sessions check it as they are created).
    pub async fn check_device(&self, tenant: TenantId, device: &DeviceId) -> Result<(), Rejection> {
        let Some(limit) = self.quotas.session_limits(tenant.as_uuid()).devices else {
            return Ok(());
        };
        match crate::sessions::device_refusal(&self.pool, tenant, device, limit).await {
            Err(e) => Err(self.unavailable(e)),
            Ok(None) => Ok(()),
            Ok(Some(refusal)) => Err(self.claim_refusal(refusal)),
        }
    }

    /// Counts a refusal in the metrics.
    pub fn count_rejections(&self, results: &[FrameResult]) {
        for r in results {
            if let Some(e) = &r.error {
                self.metrics
                    .rejected
                    .with_label_values(&[e.code.as_str()])
                    .inc();
            }
        }
    }

    /// Publishes checked frames of `tenant`, session by session (up to eight sessions
    /// at once, each holding a database connection; each session in order). Returns
    /// one result per frame, in no particular order.
    pub async fn publish(
        &self,
        tenant: TenantId,
        transport: Transport,
        frames: Vec<Prepared>,
        numbering: Numbering,
    ) -> Vec<FrameResult> {
        let mut groups: Vec<(SessionId, Vec<Prepared>)> = Vec::new();
        for p in frames {
            match groups.iter_mut().find(|(s, _)| *s == p.head.session_id) {
                Some((_, g)) => g.push(p),
                None => groups.push((p.head.session_id, vec![p])),
            }
        }
        use futures::StreamExt;
        let runs = groups
            .into_iter()
            .map(|(_, group)| self.publish_session(tenant, transport, group, numbering));
        futures::stream::iter(runs)
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// One session's group; see the module documentation.
    pub async fn publish_session(
        &self,
        tenant: TenantId,
        transport: Transport,
        mut frames: Vec<Prepared>,
        numbering: Numbering,
    ) -> Vec<FrameResult> {
        let Some(first) = frames.first() else {
            return Vec::new();
        };
        self.load_quota(tenant).await;
        let session = first.head.session_id;
        let session_text = session.to_string();
        let fail_all = |frames: &[Prepared], error: Rejection| -> Vec<FrameResult> {
            frames
                .iter()
                .map(|p| rejected(p.index, Some(session), Some(p.head.seq), error.clone()))
                .collect()
        };
        let mut results = Vec::with_capacity(frames.len());
        // Presets the plan does not render are refused before the session is held, so
        // a session none of whose frames can go out is not opened.
        let plan_presets = self.quotas.audio_presets(tenant.as_uuid());
        if let Some(plan) = plan_presets.as_deref() {
            frames.retain(|p| match preset_refusal(&p.head.audio_presets, plan) {
                None => true,
                Some(refusal) => {
                    results.push(rejected(p.index, Some(session), Some(p.head.seq), refusal));
                    false
                }
            });
        }
        let Some(first) = frames.first() else {
            self.count_rejections(&results);
            return results;
        };
        let held = match self.sessions.hold(tenant, transport, &first.head).await {
            Ok(held) => held,
            Err(e) => {
                results.extend(fail_all(&frames, self.claim_refusal(e)));
                self.count_rejections(&results);
                return results;
            }
        };
        let locked = &held.row;
        let mut to_publish = Vec::with_capacity(frames.len());
        let mut high = locked.last_seq;
        let mut ended = locked.ended;
        let mut matched = None;
        for mut p in frames.drain(..) {
            if let Some(mismatch) = mismatch(locked, &p.head, &mut matched) {
                results.push(rejected(p.index, Some(session), Some(p.head.seq), mismatch));
                continue;
            }
            match numbering {
                Numbering::Assigned => {
                    p.head.seq = (high + 1) as u64;
                    p.value = binary::renumber(&p.value, p.head.seq)
                        .expect("ingest's own records are of the current version")
                        .into();
                }
                Numbering::Device => {
                    let seq = p.head.seq as i64;
                    if seq <= locked.last_seq {
                        self.metrics.duplicates.inc();
                        results.push(done(&p, &session_text, FrameStatus::Duplicate));
                        continue;
                    }
                    if ended {
                        results.push(rejected(
                            p.index,
                            Some(session),
                            Some(p.head.seq),
                            Rejection::new(
                                Reason::SessionEnded,
                                "the session has ended (a frame carried its end marker): open a new one",
                            ),
                        ));
                        continue;
                    }
                    if seq <= high {
                        results.push(rejected(
                            p.index,
                            Some(session),
                            Some(p.head.seq),
                            Rejection::new(
                                Reason::OutOfOrder,
                                format!("seq {seq} is not above the previous frame's {high}"),
                            )
                            .field("seq"),
                        ));
                        continue;
                    }
                }
            }
            high = p.head.seq as i64;
            ended |= p.head.ends_session;
            // The session's first frame lists what its plan renders, for Jona.
            if locked.last_seq < 0 && to_publish.is_empty() {
                if let Some(plan) = plan_presets.as_deref() {
                    p.add_plan_marker(plan);
                }
            }
            to_publish.push(p);
        }
        // The tenant's quotas: the frames that fit are reserved; the rest are refused.
        let (reservation, fit, refusal) = self
            .quotas
            .reserve_prefix(tenant.as_uuid(), to_publish.iter().map(Prepared::amounts));
        if let Some(refusal) = refusal {
            let rejection = quota_rejection(&refusal);
            for p in to_publish.drain(fit..) {
                results.push(rejected(
                    p.index,
                    Some(session),
                    Some(p.head.seq),
                    rejection.clone(),
                ));
            }
        }
        let key = Bytes::from(
            encode(&clisonix_schemas::SessionKey {
                tenant_id: tenant,
                session_id: session,
            })
            .expect("keys encode"),
        );
        let records: Vec<Record> = to_publish
            .iter()
            .map(|p| Record {
                key: key.clone(),
                value: p.value.clone(),
                timestamp_ms: p.head.received_at.as_millis(),
            })
            .collect();
        let outcome = self.publisher.publish(&self.frames_topic, records).await;
        let mut confirmed = 0usize;
        let mut bytes = 0usize;
        let mut used = Amounts::default();
        let mut last = None;
        // The session ends once a frame with the end marker is confirmed.
        let mut ended_now = false;
        for (p, r) in to_publish.iter().zip(&outcome) {
            match r {
                Ok(()) => {
                    confirmed += 1;
                    ended_now |= p.head.ends_session;
                    bytes += p.value.len();
                    used.add(&p.amounts());
                    last = Some(p.head.seq);
                    results.push(done(p, &session_text, FrameStatus::Accepted));
                }
                Err(e) => {
                    let reason = match e {
                        PublishError::Overloaded => Reason::Overloaded,
                        PublishError::Unavailable(_) => Reason::BrokerUnavailable,
                    };
                    results.push(rejected(
                        p.index,
                        Some(session),
                        Some(p.head.seq),
                        Rejection::new(reason, e.to_string())
                            .retry_after_ms(self.retry_after.as_millis() as u64),
                    ));
                }
            }
        }
        self.quotas.settle(reservation, used);
        if let Some(last) = last {
            held.confirmed(last, confirmed, ended_now);
            self.metrics
                .frames
                .with_label_values(&[transport.as_str()])
                .inc_by(confirmed as u64);
            let device = &to_publish[0].head.device_id;
            self.usage.record(tenant, session, device, confirmed, bytes);
        }
        drop(held);
        self.count_rejections(&results);
        results
    }

    /// Locks the session's row in `tx`, creating it (and its device) from `first`
    /// (recordings, which publish a whole session under the lock).
    pub async fn lock_session(
        &self,
        tx: &mut sqlx::PgConnection,
        tenant: TenantId,
        transport: Transport,
        first: &Head,
    ) -> Result<SessionRow, sqlx::Error> {
        let session = first.session_id;
        if let Some(found) = crate::sessions::read(&mut *tx, session, true).await? {
            return Ok(found);
        }
        crate::sessions::create(&mut *tx, tenant, transport, first, None).await?;
        // Another request may have created it meanwhile: read whatever won, locked.
        crate::sessions::read(&mut *tx, session, true)
            .await?
            .ok_or(sqlx::Error::RowNotFound)
    }
}

/// The refusal of a session that belongs to another tenant.
pub fn forbidden(session: SessionId) -> Rejection {
    Rejection::new(
        Reason::SessionForbidden,
        format!("session {session} belongs to another tenant"),
    )
    .field("session_id")
}

/// How a frame differs from its session, if it does. `matched`: labels already found
/// equal to the session's (the frames of a body share theirs).
fn mismatch(
    session: &SessionRow,
    frame: &Head,
    matched: &mut Option<Arc<[String]>>,
) -> Option<Rejection> {
    let mut labels_differ = || {
        if matched
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(m, &frame.channel_labels))
        {
            return false;
        }
        let differ = *frame.channel_labels != *session.channel_labels;
        if !differ {
            *matched = Some(frame.channel_labels.clone());
        }
        differ
    };
    let (field, what) = if frame.device_id.as_str() != session.device_id {
        ("device_id", format!("device {:?}", session.device_id))
    } else if frame.sample_rate_hz != session.sample_rate_hz {
        ("sample_rate_hz", format!("{} Hz", session.sample_rate_hz))
    } else if frame.unit.symbol() != session.unit {
        ("unit", session.unit.clone())
    } else if labels_differ() {
        ("channels", format!("channels {:?}", session.channel_labels))
    } else {
        return None;
    };
    Some(
        Rejection::new(
            Reason::SessionMismatch,
            format!("the session was started with {what}; start a new session to change it"),
        )
        .field(field),
    )
}

#[cfg(test)]
mod tests {
    use super::{prepare_inline, run_prepare};

    #[test]
    fn bodies_of_up_to_about_100_microseconds_of_work_are_prepared_inline() {
        // The benchmark's 128-frame binary body, and a single JSON frame.
        assert!(prepare_inline(561_000, 0));
        assert!(prepare_inline(0, 19_800));
        assert!(prepare_inline(500_000, 10_000));
        assert!(!prepare_inline(1 << 20, 0));
        assert!(!prepare_inline(0, 64 * 1024));
        assert!(!prepare_inline(700_000, 19_800));
        assert!(!prepare_inline(0, usize::MAX));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_bodies_are_prepared_on_the_runtime_thread_and_others_on_the_pool() {
        let here = std::thread::current().id();
        let inline = run_prepare(true, || std::thread::current().id()).await;
        let pooled = run_prepare(false, || std::thread::current().id()).await;
        assert_eq!(inline.unwrap(), here);
        assert_ne!(pooled.unwrap(), here);
    }

    #[tokio::test]
    async fn a_panic_while_preparing_is_an_error_inline_as_on_the_pool() {
        assert!(run_prepare(true, || panic!("a bug")).await.is_err());
        assert!(run_prepare(false, || panic!("a bug")).await.is_err());
        assert_eq!(run_prepare(true, || 7).await.unwrap(), 7);
    }
}
