//! The HTTP routes: `POST /v1/frames` (JSON or binary batches), the seed's
//! `POST /collect`, device-key authentication, and the operational endpoints.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use clisonix_ingest_protocol::answer::FrameResult;
use clisonix_ingest_protocol::json::{parse_frame, split_body, LegacyAnswer, LegacyCollect};
use clisonix_ingest_protocol::{binary, BatchAnswer, Limits, Reason, Rejection};
use clisonix_schemas::{DeviceId, Frame, SampleUnit, SessionId, TenantId, Timestamp};
use clisonix_service::error::{ApiError, REQUEST_ID};
use clisonix_tenancy::keys::{KeyError, KeyVerifier, Scope, VerifiedKey};
use clisonix_tenancy::Meter;
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::Config;
use crate::ingest::{
    prepare, prepare_binary_body, prepare_inline, run_prepare, Ingest, Numbering, Prepared,
};
use crate::metrics::Transport;

#[derive(Debug, Clone)]
pub struct AppState {
    pub ingest: Arc<Ingest>,
    pub keys: Arc<KeyVerifier>,
    pub config: Arc<Config>,
    pub uploads: Arc<crate::recording::UploadSlots>,
    /// Fires at shutdown: open WebSocket streams close after their current group.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The open WebSocket streams, so shutdown can wait for them to finish.
    pub streams: tokio_util::task::TaskTracker,
}

/// A caller holding a valid key with the `ingest` scope: `Authorization: Bearer <key>`
/// or `X-API-Key: <key>`. The tenant comes from the key and nowhere else.
#[derive(Debug, Clone)]
pub struct DeviceKey(pub VerifiedKey);

impl DeviceKey {
    pub fn tenant(&self) -> TenantId {
        TenantId::new(self.0.tenant_id)
    }
}

impl FromRequestParts<AppState> for DeviceKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = |name| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let key = header("x-api-key")
            .or_else(|| header("authorization").and_then(|v| v.strip_prefix("Bearer ")))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "send a device key: Authorization: Bearer <key> or X-API-Key",
                )
            })?;
        let verified = state.keys.verify(key).await.map_err(|e| match e {
            KeyError::Database(e) => {
                tracing::warn!(error = %e, "verifying a key failed");
                let mut err = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "keys cannot be verified right now",
                );
                err.retry_after = Some(state.config.retry_after.as_secs().max(1));
                err
            }
            other => ApiError::new(StatusCode::UNAUTHORIZED, "invalid_key", other.to_string()),
        })?;
        if !verified.allows(Scope::Ingest) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_scope",
                "this key has no ingest scope",
            ));
        }
        Ok(DeviceKey(verified))
    }
}

/// The body kinds of `POST /v1/frames`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Binary,
}

pub fn body_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    let ct = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match ct.as_str() {
        "application/json" => Ok(BodyKind::Json),
        binary::CONTENT_TYPE => Ok(BodyKind::Binary),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "send Content-Type: application/json or {}",
                binary::CONTENT_TYPE
            ),
        )),
    }
}

/// Parses, checks and encodes a body's frames: the ready ones and the refused ones.
pub fn prepare_body(
    kind: BodyKind,
    body: Bytes,
    tenant: TenantId,
    now: Timestamp,
    limits: &Limits,
) -> Result<(Vec<Prepared>, Vec<FrameResult>), Rejection> {
    let prepared: Vec<Result<Prepared, Box<FrameResult>>> = match kind {
        BodyKind::Json => split_body(&body)
            .map_err(|e| Rejection::new(Reason::MalformedFrame, e.0))?
            .into_iter()
            .enumerate()
            .map(|(i, raw)| {
                let frame = parse_frame(raw).and_then(|f| f.into_frame(tenant, now));
                prepare(i, frame, limits, now)
            })
            .collect(),
        BodyKind::Binary => prepare_binary_body(body, 0, tenant, limits, now)?,
    };
    if prepared.is_empty() {
        return Err(Rejection::new(
            Reason::MalformedFrame,
            "the body holds no frames",
        ));
    }
    let mut ready = Vec::with_capacity(prepared.len());
    let mut refused = Vec::new();
    for p in prepared {
        match p {
            Ok(p) => ready.push(p),
            Err(r) => refused.push(*r),
        }
    }
    Ok((ready, refused))
}

/// A body that could not be read: too large, or cut off.
pub fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            rejection.body_text(),
        )
    } else {
        ApiError::new(rejection.status(), "invalid_body", rejection.body_text())
    }
}

/// An error in the common shape, from a rejection.
pub fn rejection_error(r: &Rejection) -> ApiError {
    let reason = r.reason().unwrap_or(Reason::MalformedFrame);
    let mut e = ApiError::new(
        StatusCode::from_u16(reason.status()).unwrap_or(StatusCode::BAD_REQUEST),
        reason.code(),
        r.message.clone(),
    );
    e.field = r.field.clone();
    e.retry_after = r.retry_after_ms.map(|ms| ms.div_ceil(1000).max(1));
    e.extra.extend(quota_members(r));
    e
}

/// A refusal's quota (`meter`, `limit`, `used`, `resets_at`) as members of its error
/// object.
fn quota_members(r: &Rejection) -> serde_json::Map<String, serde_json::Value> {
    match r.quota.as_deref().map(serde_json::to_value) {
        Some(Ok(serde_json::Value::Object(members))) => members,
        _ => serde_json::Map::new(),
    }
}

/// `POST /v1/frames`: one frame or a batch, JSON or binary. See
/// [`clisonix_ingest_protocol::answer`] for the statuses.
pub async fn post_frames(
    State(state): State<AppState>,
    key: DeviceKey,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let kind = body_kind(&headers)?;
    let body = body.map_err(body_error)?;
    let ingest = &state.ingest;
    ingest
        .metrics
        .bytes_in
        .with_label_values(&[Transport::Http.as_str()])
        .inc_by(body.len() as u64);
    let tenant = key.tenant();
    let now = Timestamp::now();
    let limits = ingest.limits.clone();
    let inline = match kind {
        BodyKind::Binary => prepare_inline(body.len(), 0),
        BodyKind::Json => prepare_inline(0, body.len()),
    };
    let prepared = run_prepare(inline, move || {
        prepare_body(kind, body, tenant, now, &limits)
    })
    .await
    .map_err(ApiError::internal)?;
    let (ready, mut results) = match prepared {
        Ok(x) => x,
        Err(r) => {
            ingest
                .metrics
                .rejected
                .with_label_values(&[r.code.as_str()])
                .inc();
            return Err(rejection_error(&r));
        }
    };
    ingest.count_rejections(&results);
    results.extend(
        ingest
            .publish(tenant, Transport::Http, ready, Numbering::Device)
            .await,
    );
    let mut response = answer(BatchAnswer::from_results(results));
    // What remains of the tenant's frame quota, when its plan limits frames.
    if !response.headers().contains_key("ratelimit-limit") {
        if let Some(headroom) = ingest.quotas.headroom(tenant.as_uuid(), Meter::Frames) {
            rate_limit_headers(&mut response, headroom);
        }
    }
    Ok(response)
}

/// The batch answer with its status, `Retry-After`, and the error object when the
/// status is an error.
pub fn answer(answer: BatchAnswer) -> Response {
    /// The answer as sent: the results, and beside them the usual error object.
    #[derive(serde::Serialize)]
    struct Body<'a> {
        #[serde(flatten)]
        answer: &'a BatchAnswer,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<serde_json::Value>,
    }
    let status = StatusCode::from_u16(answer.status()).unwrap_or(StatusCode::OK);
    // 402: a quota, which resets then; 429 and 5xx: retry then.
    let retry = answer
        .retry_after_ms()
        .filter(|_| status.as_u16() == 402 || status.as_u16() >= 429);
    let error = (status.is_client_error() || status.is_server_error())
        .then(|| answer.first_error())
        .flatten()
        .map(|e| {
            let mut error = json!({
                "code": e.code,
                "message": e.message,
                "request_id": REQUEST_ID.try_with(Clone::clone).unwrap_or_default(),
            });
            if let Some(f) = &e.field {
                error["field"] = json!(f);
            }
            for (name, value) in quota_members(e) {
                error[name] = value;
            }
            error
        });
    // A used-up quota of the period (one that resets; not a count of sessions or
    // devices): its RateLimit headers.
    let quota = answer
        .results
        .iter()
        .filter_map(|r| r.error.as_ref())
        .find_map(|e| {
            let q = e.quota.as_ref().filter(|q| q.resets_at.is_some())?;
            Some((q.limit, 0, e.retry_after_ms.unwrap_or(0)))
        });
    let body = Body {
        answer: &answer,
        error,
    };
    let mut response = (status, Json(body)).into_response();
    if let Some(ms) = retry {
        response
            .headers_mut()
            .insert(RETRY_AFTER, ms.div_ceil(1000).max(1).into());
    }
    if let Some(headroom) = quota {
        rate_limit_headers(&mut response, headroom);
    }
    response
}

/// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (seconds) of a
/// quota: `(limit, remaining, milliseconds until the reset)`.
pub fn rate_limit_headers(response: &mut Response, (limit, remaining, reset_ms): (i64, i64, u64)) {
    let headers = response.headers_mut();
    headers.insert("ratelimit-limit", limit.into());
    headers.insert("ratelimit-remaining", remaining.max(0).into());
    headers.insert("ratelimit-reset", reset_ms.div_ceil(1000).into());
}

/// The legacy session of a key, device, rate and channel count: stable, so an old
/// client's posts form one session.
pub fn legacy_session(
    tenant: TenantId,
    key_id: Uuid,
    device: &DeviceId,
    rate: i64,
    channels: usize,
) -> SessionId {
    let digest = Sha256::digest(format!(
        "legacy|{tenant}|{key_id}|{device}|{rate}|{channels}"
    ));
    let mut bytes: [u8; 16] = digest[..16].try_into().expect("16 bytes");
    bytes[6] = (bytes[6] & 0x0F) | 0x80; // version 8: custom
    bytes[8] = (bytes[8] & 0x3F) | 0x80; // RFC 4122 variant
    SessionId::new(Uuid::from_bytes(bytes))
}

/// `POST /collect`: the seed's contract, kept for old clients. One multichannel
/// sample per request; the device comes from `X-Device-Id` (default `legacy`), the
/// session is derived from key, device, rate and channel count, and ingest numbers
/// the frames.
pub async fn collect(
    State(state): State<AppState>,
    key: DeviceKey,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LegacyAnswer>, ApiError> {
    let body = body.map_err(body_error)?;
    let ingest = &state.ingest;
    ingest
        .metrics
        .bytes_in
        .with_label_values(&[Transport::Legacy.as_str()])
        .inc_by(body.len() as u64);
    if body_kind(&headers)? != BodyKind::Json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send Content-Type: application/json",
        ));
    }
    let body: LegacyCollect = serde_json::from_slice(&body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            return ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string());
        }
        let r = clisonix_ingest_protocol::json::serde_rejection(e);
        let mut err = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", r.message);
        err.field = r.field;
        err
    })?;
    let device = headers
        .get("x-device-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("legacy");
    let device = DeviceId::parse(device).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            e.to_string(),
        )
        .field("X-Device-Id")
    })?;
    let tenant = key.tenant();
    let now = Timestamp::now();
    let channels = body.channels.len();
    let frame = Frame {
        tenant_id: tenant,
        device_id: device.clone(),
        session_id: legacy_session(tenant, key.0.key_id, &device, body.sample_rate, channels),
        seq: 0,
        device_time: Timestamp::from_micros(body.timestamp.timestamp_micros()),
        received_at: now,
        sample_rate_hz: body.sample_rate as f64,
        unit: SampleUnit::Microvolt,
        channel_labels: (1..=channels).map(|c| format!("ch{c}")).collect(),
        samples_per_channel: 1,
        samples: body.channels.iter().map(|&x| x as f32).collect(),
        markers: Vec::new(),
    };
    let prepared = match prepare(0, Ok(frame), &ingest.limits, now) {
        Ok(p) => p,
        Err(r) => {
            ingest.count_rejections(std::slice::from_ref(&*r));
            let rejection = r.error.expect("a refusal has a reason");
            return Err(rejection_error(&rejection));
        }
    };
    let result = ingest
        .publish_session(
            tenant,
            Transport::Legacy,
            vec![prepared],
            Numbering::Assigned,
        )
        .await
        .pop()
        .expect("one result per frame");
    if let Some(e) = &result.error {
        return Err(rejection_error(e));
    }
    Ok(Json(LegacyAnswer {
        status: "accepted".into(),
        frame_id: format!(
            "{}:{}",
            result.session_id.unwrap_or_default(),
            result.seq.unwrap_or_default()
        ),
    }))
}

/// `GET /health`: the process is up.
pub async fn health() -> &'static str {
    "ok"
}

/// `GET /ready`: the broker answers (the probe's last word) and the database answers.
pub async fn ready(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    let not_ready = |what: String| {
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", what);
        e.retry_after = Some(1);
        e
    };
    if !state.ingest.publisher.broker_up() {
        return Err(not_ready("the broker does not answer".into()));
    }
    sqlx::query("SELECT 1")
        .execute(&state.ingest.pool)
        .await
        .map_err(|e| not_ready(format!("database: {e}")))?;
    Ok("ready")
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.ingest.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Bytes;
    use clisonix_ingest_protocol::{binary, Limits, Reason};
    use clisonix_schemas::{examples, Frame, TenantId, Timestamp};

    use super::{prepare_body, BodyKind};

    fn frames(n: u64) -> Vec<Frame> {
        let now = Timestamp::now().as_micros();
        (0..n)
            .map(|seq| {
                let mut f = examples::frame(seq, 4, 8);
                f.seq = seq;
                f.device_time = Timestamp::from_micros(now - 1_000_000 + seq as i64);
                f
            })
            .collect()
    }

    #[test]
    fn frames_of_a_body_share_checked_labels_and_new_labels_are_checked_again() {
        let mut frames = frames(4);
        // Frame 2 brings other labels, one of them twice; frame 3 has frame 1's again.
        frames[2].channel_labels[3] = frames[2].channel_labels[0].clone();
        let body = binary::encode_frames(&frames);
        let tenant = TenantId::random();
        let (ready, refused) = prepare_body(
            BodyKind::Binary,
            body.into(),
            tenant,
            Timestamp::now(),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].index, 2);
        let error = refused[0].error.as_ref().unwrap();
        assert_eq!(error.code, Reason::BadChannels.code(), "{error:?}");
        let indices: Vec<usize> = ready.iter().map(|p| p.index).collect();
        assert_eq!(indices, [0, 1, 3]);
        assert!(Arc::ptr_eq(
            &ready[0].head.channel_labels,
            &ready[1].head.channel_labels
        ));
        assert_eq!(
            ready[2].head.channel_labels, ready[0].head.channel_labels,
            "the same labels after other ones"
        );
        for p in &ready {
            let mut frame = frames[p.index].clone();
            frame.tenant_id = tenant;
            frame.received_at = p.head.received_at;
            assert_eq!(p.value, clisonix_schemas::encode(&frame).unwrap());
        }
    }

    /// What ingest publishes for `frames` posted by `tenant` and received at `now`.
    fn published(frames: &[Frame], tenant: TenantId, now: Timestamp) -> Vec<Vec<u8>> {
        frames
            .iter()
            .map(|f| {
                let mut f = f.clone();
                f.tenant_id = tenant;
                f.received_at = now;
                clisonix_schemas::encode(&f).unwrap()
            })
            .collect()
    }

    #[test]
    fn records_are_stamped_in_the_body_or_copied_when_their_fields_do_not_fit() {
        let mut frames = frames(3);
        // A receive time of 0 takes one byte, where ingest's takes eight.
        frames[1].received_at = Timestamp::from_micros(0);
        let tenant = TenantId::random();
        let now = Timestamp::now();
        let expected = published(&frames, tenant, now);
        let limits = Limits::default();

        // A body of its own: records 0 and 2 are slices of it, record 1 a copy.
        let body = Bytes::from(binary::encode_frames(&frames));
        let within = body.as_ptr_range();
        let (ready, refused) = prepare_body(BodyKind::Binary, body, tenant, now, &limits).unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        let values: Vec<&[u8]> = ready.iter().map(|p| &p.value[..]).collect();
        assert_eq!(values, expected);
        let in_body: Vec<bool> = ready
            .iter()
            .map(|p| within.contains(&p.value.as_ptr()))
            .collect();
        assert_eq!(in_body, [true, false, true]);

        // A shared body is copied once and left as it was.
        let body = Bytes::from(binary::encode_frames(&frames));
        let kept = body.clone();
        let (ready, _) = prepare_body(BodyKind::Binary, body, tenant, now, &limits).unwrap();
        let values: Vec<&[u8]> = ready.iter().map(|p| &p.value[..]).collect();
        assert_eq!(values, expected);
        assert_eq!(kept, binary::encode_frames(&frames));
    }
}
