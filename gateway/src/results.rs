//! The results API: a tenant's sessions, their features and their audio, read from
//! the tables the sink writes (`migrations/20261125000002_results.sql`).
//!
//! Callers are a tenant's users (`Authorization: Bearer <access token>`) or API keys
//! with the `read` scope (`Authorization: Bearer ck_…` or `X-API-Key`). Every query
//! filters by the caller's tenant: another tenant's session is `404`, as if it did
//! not exist. Large answers are streamed as they are read from the database.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::header::{
    ACCEPT, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use crate::error::ApiError;
use crate::keys::{KeyError, Scope};
use crate::startup::AppState;

/// Who reads results: a tenant, through a user's token or a `read` API key.
#[derive(Debug, Clone, Copy)]
pub struct Reader {
    pub tenant: Uuid,
}

impl Reader {
    /// The reader of an authenticated request on the results API, which counts in the
    /// tenant's `api_requests` meter.
    fn counted(state: &AppState, tenant: Uuid) -> Reader {
        if let Some(usage) = &state.api_usage {
            usage.record(tenant);
        }
        Reader { tenant }
    }
}

/// The credential a request carries: `X-API-Key`, or the `Authorization` bearer.
pub(crate) fn credential(headers: &HeaderMap) -> Option<&str> {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    header("x-api-key")
        .or_else(|| header("authorization").and_then(|v| v.strip_prefix("Bearer ")))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// A reader from an API key (`ck_…`, with the `read` scope).
async fn key_reader(state: &AppState, key: &str) -> Result<Reader, ApiError> {
    let verified = state.api_keys.verify(key).await.map_err(|e| match e {
        KeyError::Database(e) => ApiError::internal(e),
        other => ApiError::new(StatusCode::UNAUTHORIZED, "invalid_key", other.to_string()),
    })?;
    if !verified.allows(Scope::Read) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_scope",
            "this key has no read scope",
        ));
    }
    // Keys are programs (dashboards, exports): the plan's higher rate.
    let (_, premium) = state
        .plan_rates
        .of(&state.pool, verified.tenant_id, state.config.rates())
        .await;
    state
        .request_limits
        .take((verified.tenant_id, verified.key_id), premium)
        .map_err(|wait| {
            ApiError::too_many(
                "rate_limited",
                format!("too many requests; retry in {wait} s"),
                wait,
            )
        })?;
    Ok(Reader::counted(state, verified.tenant_id))
}

/// A reader from a token given outside the headers (a WebSocket's query string).
pub(crate) async fn reader_from(state: &AppState, token: &str) -> Result<Reader, ApiError> {
    if token.starts_with("ck_") {
        return key_reader(state, token).await;
    }
    let claims = state.keys.verify(token)?;
    Ok(Reader::counted(state, claims.tid))
}

impl FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match credential(&parts.headers) {
            Some(key) if key.starts_with("ck_") => key_reader(state, key).await,
            _ => {
                let caller = crate::auth::Caller::from_request_parts(parts, state).await?;
                Ok(Reader::counted(state, caller.0.tid))
            }
        }
    }
}

pub(crate) fn query_error(rejection: QueryRejection) -> ApiError {
    let text = rejection.body_text();
    let field = text.split('`').nth(1).map(str::to_owned);
    let mut e = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_query", text);
    e.field = field;
    e
}

pub(crate) fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_query", message).field(field)
}

fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "session_not_found",
        "no such session",
    )
}

pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(crate) fn parse_time(
    field: &str,
    value: Option<&str>,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    value
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| invalid(field, format!("{field}: expected RFC 3339 time ({e})")))
        })
        .transpose()
}

// ---------------------------------------------------------------------------------
// Sessions

/// A session as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Session {
    pub session_id: Uuid,
    pub device_id: String,
    /// `active` or `ended`.
    pub status: String,
    /// Ingest time of the first frame.
    pub started_at: DateTime<Utc>,
    /// Ingest time of the latest frame.
    pub last_frame_at: DateTime<Utc>,
    /// Device time of the first sample.
    pub first_device_time: DateTime<Utc>,
    /// Device time just after the last sample.
    pub last_device_time: DateTime<Utc>,
    pub sample_rate_hz: f64,
    pub channel_labels: Vec<String>,
    /// Distinct frames seen.
    pub frames: i64,
    pub samples_per_channel: i64,
    /// Frames missing between the lowest and highest sequence number seen.
    pub seq_gaps: i64,
    pub duplicate_frames: i64,
    pub out_of_order_frames: i64,
    pub ended_at: Option<DateTime<Utc>>,
    /// `explicit` or `idle_timeout`.
    pub end_reason: Option<String>,
}

const SESSION_COLUMNS: &str = "session_id, device_id, status, started_at, last_frame_at, \
    first_device_time, last_device_time, sample_rate_hz, channel_labels, frames, \
    samples_per_channel, seq_gaps, duplicate_frames, out_of_order_frames, ended_at, end_reason";

fn session_of(row: &PgRow) -> Result<Session, sqlx::Error> {
    Ok(Session {
        session_id: row.try_get("session_id")?,
        device_id: row.try_get("device_id")?,
        status: row.try_get("status")?,
        started_at: row.try_get("started_at")?,
        last_frame_at: row.try_get("last_frame_at")?,
        first_device_time: row.try_get("first_device_time")?,
        last_device_time: row.try_get("last_device_time")?,
        sample_rate_hz: row.try_get("sample_rate_hz")?,
        channel_labels: row.try_get("channel_labels")?,
        frames: row.try_get("frames")?,
        samples_per_channel: row.try_get("samples_per_channel")?,
        seq_gaps: row.try_get("seq_gaps")?,
        duplicate_frames: row.try_get("duplicate_frames")?,
        out_of_order_frames: row.try_get("out_of_order_frames")?,
        ended_at: row.try_get("ended_at")?,
        end_reason: row.try_get("end_reason")?,
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SessionFilter {
    /// Only this device's sessions.
    pub device_id: Option<String>,
    /// `active` or `ended`.
    pub status: Option<String>,
    /// Sessions still running at or after this time (RFC 3339).
    pub from: Option<String>,
    /// Sessions started before this time (RFC 3339).
    pub to: Option<String>,
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionPage {
    /// Newest first.
    pub sessions: Vec<Session>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

fn cursor_of(s: &Session) -> String {
    format!("{}_{}", s.started_at.timestamp_micros(), s.session_id)
}

fn parse_cursor(c: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let bad = || invalid("cursor", "cursor: not a cursor this API gave");
    let (t, id) = c.split_once('_').ok_or_else(bad)?;
    let t = DateTime::from_timestamp_micros(t.parse().map_err(|_| bad())?).ok_or_else(bad)?;
    Ok((t, Uuid::parse_str(id).map_err(|_| bad())?))
}

#[utoipa::path(get, path = "/v1/sessions", tag = "results", security(("bearer" = [])), params(SessionFilter),
    responses((status = 200, body = SessionPage), (status = 401, description = "Missing or invalid token or key", body = crate::openapi::ErrorBody), (status = 422, description = "A query parameter is invalid", body = crate::openapi::ErrorBody)))]
/// `GET /v1/sessions`: the tenant's sessions, newest first, by device, status and
/// time, a page at a time.
pub async fn list_sessions(
    State(state): State<AppState>,
    reader: Reader,
    query: Result<Query<SessionFilter>, QueryRejection>,
) -> Result<Json<SessionPage>, ApiError> {
    let Query(f) = query.map_err(query_error)?;
    let limit = f.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(invalid("limit", "limit: 1 to 500"));
    }
    if let Some(s) = &f.status {
        if s != "active" && s != "ended" {
            return Err(invalid("status", "status: active or ended"));
        }
    }
    let from = parse_time("from", f.from.as_deref())?;
    let to = parse_time("to", f.to.as_deref())?;
    let cursor = f.cursor.as_deref().map(parse_cursor).transpose()?;
    let mut q = sqlx::QueryBuilder::new(format!(
        "SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant_id = "
    ));
    q.push_bind(reader.tenant);
    if let Some(d) = &f.device_id {
        q.push(" AND device_id = ").push_bind(d);
    }
    if let Some(s) = &f.status {
        q.push(" AND status = ").push_bind(s);
    }
    if let Some(t) = from {
        q.push(" AND coalesce(ended_at, last_frame_at) >= ")
            .push_bind(t);
    }
    if let Some(t) = to {
        q.push(" AND started_at < ").push_bind(t);
    }
    if let Some((t, id)) = cursor {
        q.push(" AND (started_at, session_id) < (")
            .push_bind(t)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    q.push(" ORDER BY started_at DESC, session_id DESC LIMIT ")
        .push_bind(limit + 1);
    let rows = q.build().fetch_all(&state.pool).await?;
    let mut sessions = rows.iter().map(session_of).collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if sessions.len() as i64 > limit {
        sessions.truncate(limit as usize);
        sessions.last().map(cursor_of)
    } else {
        None
    };
    Ok(Json(SessionPage {
        sessions,
        next_cursor,
    }))
}

/// What is stored for a session beyond its state.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionDetail {
    #[serde(flatten)]
    pub session: Session,
    /// Feature windows stored so far (per channel).
    pub feature_windows: i64,
    /// The audio presets rendered so far.
    pub audio: Vec<AudioSummary>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AudioSummary {
    pub preset: String,
    pub preset_version: String,
    pub chunks: i64,
    pub seconds: f64,
    pub sample_rate_hz: i32,
    pub channels: i16,
}

pub(crate) async fn find_session(
    state: &AppState,
    reader: Reader,
    id: Uuid,
) -> Result<Session, ApiError> {
    find_session_row(&state.pool, reader.tenant, id).await
}

pub(crate) async fn find_session_row(
    pool: &sqlx::PgPool,
    tenant: Uuid,
    id: Uuid,
) -> Result<Session, ApiError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = $1 AND tenant_id = $2"
    )))
    .bind(id)
    .bind(tenant)
    .fetch_optional(pool)
    .await?;
    Ok(session_of(&row.ok_or_else(not_found)?)?)
}

pub(crate) async fn audio_presets(
    state: &AppState,
    reader: Reader,
    id: Uuid,
) -> Result<Vec<AudioSummary>, ApiError> {
    let rows = sqlx::query(
        "SELECT preset, max(preset_version) AS preset_version, count(*) AS chunks, \
                sum(frames)::float8 / max(sample_rate_hz) AS seconds, \
                max(sample_rate_hz) AS sample_rate_hz, max(channels) AS channels \
         FROM audio_chunks WHERE session_id = $1 AND tenant_id = $2 GROUP BY preset ORDER BY preset",
    )
    .bind(id)
    .bind(reader.tenant)
    .fetch_all(&state.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(AudioSummary {
                preset: r.try_get("preset")?,
                preset_version: r.try_get("preset_version")?,
                chunks: r.try_get("chunks")?,
                seconds: r.try_get("seconds")?,
                sample_rate_hz: r.try_get("sample_rate_hz")?,
                channels: r.try_get("channels")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(ApiError::from)
}

#[utoipa::path(get, path = "/v1/sessions/{id}", tag = "results", security(("bearer" = [])), params(("id" = Uuid, Path, description = "The session")),
    responses((status = 200, body = SessionDetail), (status = 404, description = "No such session in this tenant", body = crate::openapi::ErrorBody), (status = 401, description = "Missing or invalid token or key", body = crate::openapi::ErrorBody)))]
/// `GET /v1/sessions/{id}`: a session's state, how many feature windows and which
/// audio presets are stored.
pub async fn get_session(
    State(state): State<AppState>,
    reader: Reader,
    Path(id): Path<Uuid>,
) -> Result<Json<SessionDetail>, ApiError> {
    let session = find_session(&state, reader, id).await?;
    let last: Option<i64> = sqlx::query_scalar(
        "SELECT max(window_index) FROM features WHERE session_id = $1 AND tenant_id = $2",
    )
    .bind(id)
    .bind(reader.tenant)
    .fetch_one(&state.pool)
    .await?;
    let audio = audio_presets(&state, reader, id).await?;
    Ok(Json(SessionDetail {
        session,
        feature_windows: last.map_or(0, |w| w + 1),
        audio,
    }))
}

// ---------------------------------------------------------------------------------
// Features

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Column {
    Float,
    Bool,
    Int,
    Text,
    Psd,
}

/// Every feature a caller may ask for, in the default order, with its column type.
const FEATURES: [(&str, Column); 29] = [
    ("abs_delta", Column::Float),
    ("abs_theta", Column::Float),
    ("abs_alpha", Column::Float),
    ("abs_beta", Column::Float),
    ("abs_gamma", Column::Float),
    ("total_abs", Column::Float),
    ("rel_delta", Column::Float),
    ("rel_theta", Column::Float),
    ("rel_alpha", Column::Float),
    ("rel_beta", Column::Float),
    ("rel_gamma", Column::Float),
    ("peak_alpha_hz", Column::Float),
    ("peak_alpha_psd", Column::Float),
    ("spectral_entropy", Column::Float),
    ("hjorth_activity", Column::Float),
    ("hjorth_mobility", Column::Float),
    ("hjorth_complexity", Column::Float),
    ("aperiodic_exponent", Column::Float),
    ("flat", Column::Bool),
    ("clipped_fraction", Column::Float),
    ("line_noise_50hz", Column::Float),
    ("line_noise_60hz", Column::Float),
    ("seq_gaps", Column::Int),
    ("duplicate_frames", Column::Int),
    ("out_of_order_frames", Column::Int),
    ("algorithm_version", Column::Text),
    ("unit", Column::Text),
    ("psd_resolution_hz", Column::Float),
    ("psd", Column::Psd),
];

/// The feature names whose values are single numbers (everything but the PSD and
/// the text columns): the default selection.
fn default_features() -> impl Iterator<Item = (&'static str, Column)> {
    FEATURES
        .iter()
        .filter(|(_, k)| *k != Column::Psd)
        .map(|(n, k)| (*n, *k))
}

/// The default feature columns, comma-separated, for a SELECT.
pub(crate) fn scalar_feature_columns() -> String {
    default_features()
        .map(|(n, _)| n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The default features of a row selected with [`scalar_feature_columns`], as JSON.
pub(crate) fn scalar_features(
    row: &PgRow,
) -> Result<Vec<(&'static str, serde_json::Value)>, sqlx::Error> {
    default_features()
        .map(|(name, kind)| {
            let value = match kind {
                Column::Float => serde_json::json!(row
                    .try_get::<Option<f64>, _>(name)?
                    .filter(|v| v.is_finite())),
                Column::Bool => serde_json::json!(row.try_get::<bool, _>(name)?),
                Column::Int => serde_json::json!(row.try_get::<i32, _>(name)?),
                Column::Text => serde_json::json!(row.try_get::<String, _>(name)?),
                Column::Psd => serde_json::Value::Null,
            };
            Ok((name, value))
        })
        .collect()
}

/// A feature record's channel as the live stream and the API show it: its index,
/// label and default features, the same values and order as a row read with
/// [`scalar_feature_columns`] (what the sink stores of the record).
pub(crate) fn feature_values_of(
    f: &clisonix_schemas::Features,
) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::json;
    let float = |v: Option<f64>| json!(v.filter(|v| v.is_finite()));
    let q = &f.quality;
    let mut m = serde_json::Map::new();
    m.insert("channel_index".into(), json!(f.channel_index as i32));
    m.insert("channel_label".into(), json!(f.channel_label));
    for (name, _) in default_features() {
        let value = match name {
            "abs_delta" => float(f.abs.delta),
            "abs_theta" => float(f.abs.theta),
            "abs_alpha" => float(f.abs.alpha),
            "abs_beta" => float(f.abs.beta),
            "abs_gamma" => float(f.abs.gamma),
            "total_abs" => float(f.total_abs),
            "rel_delta" => float(f.rel.delta),
            "rel_theta" => float(f.rel.theta),
            "rel_alpha" => float(f.rel.alpha),
            "rel_beta" => float(f.rel.beta),
            "rel_gamma" => float(f.rel.gamma),
            "peak_alpha_hz" => float(f.peak_alpha_hz),
            "peak_alpha_psd" => float(f.peak_alpha_psd),
            "spectral_entropy" => float(f.spectral_entropy),
            "hjorth_activity" => float(f.hjorth.activity),
            "hjorth_mobility" => float(f.hjorth.mobility),
            "hjorth_complexity" => float(f.hjorth.complexity),
            "aperiodic_exponent" => float(f.aperiodic_exponent),
            "flat" => json!(q.flat),
            "clipped_fraction" => float(Some(q.clipped_fraction)),
            "line_noise_50hz" => float(q.line_noise_50hz),
            "line_noise_60hz" => float(q.line_noise_60hz),
            "seq_gaps" => json!(q.seq_gaps as i32),
            "duplicate_frames" => json!(q.duplicate_frames as i32),
            "out_of_order_frames" => json!(q.out_of_order_frames as i32),
            "algorithm_version" => json!(f.algorithm_version),
            "unit" => json!(f.unit.symbol()),
            "psd_resolution_hz" => float(Some(f.psd_resolution_hz)),
            // Every default feature is above (tested); a new one must be added.
            _ => serde_json::Value::Null,
        };
        m.insert(name.to_owned(), value);
    }
    m
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Ndjson,
    Csv,
    Parquet,
}

impl Format {
    fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Ndjson => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Parquet => crate::feature_parquet::CONTENT_TYPE,
        }
    }
}

fn format_of(param: Option<&str>, headers: &HeaderMap) -> Result<Format, ApiError> {
    if let Some(p) = param {
        return match p {
            "json" => Ok(Format::Json),
            "ndjson" => Ok(Format::Ndjson),
            "csv" => Ok(Format::Csv),
            "parquet" => Ok(Format::Parquet),
            _ => Err(invalid("format", "format: json, ndjson, csv or parquet")),
        };
    }
    let accept = headers
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Ok(if accept.contains("text/csv") {
        Format::Csv
    } else if accept.contains(crate::feature_parquet::CONTENT_TYPE) {
        Format::Parquet
    } else if accept.contains("ndjson") {
        Format::Ndjson
    } else {
        Format::Json
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FeatureQuery {
    /// Windows starting at or after this time (RFC 3339).
    pub from: Option<String>,
    /// Windows starting before this time (RFC 3339).
    pub to: Option<String>,
    /// Windows from this index on (e.g. to resume).
    pub from_window: Option<i64>,
    /// Comma-separated channel labels or indexes (default: all).
    pub channels: Option<String>,
    /// Comma-separated feature names (default: every scalar feature; `psd` on request).
    pub features: Option<String>,
    /// `json` (default), `ndjson`, `csv` or `parquet`; also chosen by `Accept`.
    pub format: Option<String>,
}

struct Selection {
    names: Vec<(&'static str, Column)>,
}

fn selection(param: Option<&str>) -> Result<Selection, ApiError> {
    let Some(list) = param else {
        return Ok(Selection {
            names: default_features().collect(),
        });
    };
    let mut names = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let (n, k) = FEATURES
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| invalid("features", format!("features: unknown feature {name:?}")))?;
        if !names.iter().any(|(m, _)| m == n) {
            names.push((*n, *k));
        }
    }
    if names.is_empty() {
        return Err(invalid("features", "features: name at least one"));
    }
    Ok(Selection { names })
}

/// Column `i` of a feature row (a feature of kind `kind`), written as JSON or CSV.
/// Numbers are written as the shortest decimal that reads back to the same double
/// (`ryu`, as serde_json writes them), columns are read by position and decoded without
/// sqlx's per-value type check (their types are the table's): formatting floats through
/// `Display`, finding columns by name and checking types were most of the gateway's CPU
/// per row (the features_range benchmark).
fn write_value(
    out: &mut String,
    row: &PgRow,
    i: usize,
    kind: Column,
    csv: bool,
) -> Result<(), sqlx::Error> {
    let mut floats = ryu::Buffer::new();
    match kind {
        Column::Float => match row.try_get_unchecked::<Option<f64>, _>(i)? {
            Some(v) if v.is_finite() => out.push_str(floats.format_finite(v)),
            _ if csv => {}
            _ => out.push_str("null"),
        },
        Column::Bool => {
            let v: bool = row.try_get_unchecked(i)?;
            out.push_str(if v { "true" } else { "false" });
        }
        Column::Int => {
            let v: i32 = row.try_get_unchecked(i)?;
            write!(out, "{v}").expect("writing to a String");
        }
        Column::Text => {
            let v: &str = row.try_get_unchecked(i)?;
            if csv {
                out.push_str(&csv_field(v));
            } else {
                out.push_str(&serde_json::to_string(v).expect("a string serialises"));
            }
        }
        Column::Psd => {
            let bytes: &[u8] = row.try_get_unchecked(i)?;
            let values = bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")));
            let sep = if csv { " " } else { "," };
            out.push_str(if csv { "\"" } else { "[" });
            for (n, v) in values.enumerate() {
                if n > 0 {
                    out.push_str(sep);
                }
                if v.is_finite() {
                    out.push_str(floats.format_finite(v));
                } else if csv {
                    write!(out, "{v}").expect("writing to a String");
                } else {
                    out.push_str("null");
                }
            }
            out.push_str(if csv { "\"" } else { "]" });
        }
    }
    Ok(())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn write_row(
    out: &mut String,
    row: &PgRow,
    sel: &Selection,
    format: Format,
) -> Result<(), sqlx::Error> {
    // The columns' order is the query's: these four, then the selection's.
    let window: i64 = row.try_get_unchecked(0)?;
    let start: DateTime<Utc> = row.try_get_unchecked(1)?;
    let channel: i32 = row.try_get_unchecked(2)?;
    let label: &str = row.try_get_unchecked(3)?;
    if format == Format::Csv {
        write!(
            out,
            "{window},{},{channel},{}",
            rfc3339(start),
            csv_field(label)
        )
        .expect("writing to a String");
        for (i, (_, kind)) in sel.names.iter().enumerate() {
            out.push(',');
            write_value(out, row, 4 + i, *kind, true)?;
        }
        out.push_str("\r\n");
        return Ok(());
    }
    write!(
        out,
        "{{\"window_index\":{window},\"window_start\":\"{}\",\"channel_index\":{channel},\"channel_label\":{}",
        rfc3339(start),
        serde_json::to_string(label).expect("a string serialises")
    )
    .expect("writing to a String");
    for (i, (name, kind)) in sel.names.iter().enumerate() {
        write!(out, ",\"{name}\":").expect("writing to a String");
        write_value(out, row, 4 + i, *kind, false)?;
    }
    out.push('}');
    Ok(())
}

/// Bytes per streamed piece of a large answer.
const STREAM_PIECE: usize = 64 * 1024;

#[utoipa::path(get, path = "/v1/sessions/{id}/features", tag = "results", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The session"), FeatureQuery),
    responses((status = 200, description = "One row per window and channel, in window order: JSON `{session_id, features, rows}`, NDJSON (one row per line), CSV (a header line, then rows) or Parquet (`application/vnd.apache.parquet`: window_index, window_start as a UTC timestamp in µs, channel_index, channel_label, then the features; `psd` as a list of doubles); streamed"),
              (status = 404, description = "No such session in this tenant", body = crate::openapi::ErrorBody),
              (status = 422, description = "A query parameter is invalid", body = crate::openapi::ErrorBody),
              (status = 401, description = "Missing or invalid token or key", body = crate::openapi::ErrorBody)))]
/// `GET /v1/sessions/{id}/features`: a session's features by time range, channels and
/// feature names, as JSON, NDJSON, CSV or Parquet, streamed.
pub async fn features(
    State(state): State<AppState>,
    reader: Reader,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    query: Result<Query<FeatureQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let format = format_of(q.format.as_deref(), &headers)?;
    let sel = selection(q.features.as_deref())?;
    let from = parse_time("from", q.from.as_deref())?;
    let to = parse_time("to", q.to.as_deref())?;
    let (mut indexes, mut labels) = (Vec::<i32>::new(), Vec::<String>::new());
    for c in q
        .channels
        .iter()
        .flat_map(|c| c.split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        match c.parse::<i32>() {
            Ok(i) => indexes.push(i),
            Err(_) => labels.push(c.to_owned()),
        }
    }
    let filter_channels = !(indexes.is_empty() && labels.is_empty());
    // Existence and ownership first, so a 404 is an answer rather than an empty body.
    find_session(&state, reader, id).await?;

    let columns: Vec<&str> = sel.names.iter().map(|(n, _)| *n).collect();
    // Placeholders in the order they are bound below.
    let mut sql = format!(
        "SELECT window_index, window_start, channel_index, channel_label, {} FROM features \
         WHERE session_id = $1 AND tenant_id = $2",
        columns.join(", ")
    );
    let mut n = 2;
    let mut next = || {
        n += 1;
        n
    };
    if from.is_some() {
        write!(sql, " AND window_start >= ${}", next()).expect("writing to a String");
    }
    if to.is_some() {
        write!(sql, " AND window_start < ${}", next()).expect("writing to a String");
    }
    if q.from_window.is_some() {
        write!(sql, " AND window_index >= ${}", next()).expect("writing to a String");
    }
    if filter_channels {
        let (a, b) = (next(), next());
        write!(
            sql,
            " AND (channel_index = ANY(${a}) OR channel_label = ANY(${b}))"
        )
        .expect("writing to a String");
    }
    sql.push_str(" ORDER BY window_start, window_index, channel_index");
    let pool = state.pool.clone();
    let names: Vec<String> = columns.iter().map(|s| s.to_string()).collect();
    let from_window = q.from_window;
    let tenant = reader.tenant;
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).bind(tenant);
        if let Some(t) = from {
            query = query.bind(t);
        }
        if let Some(t) = to {
            query = query.bind(t);
        }
        if let Some(w) = from_window {
            query = query.bind(w);
        }
        if filter_channels {
            query = query.bind(indexes).bind(labels);
        }
        let mut rows = query.fetch(&pool);
        if format == Format::Parquet {
            stream_parquet(&mut rows, &sel, tx).await;
            return;
        }
        let mut out = String::with_capacity(STREAM_PIECE + 4096);
        match format {
            Format::Json => {
                write!(
                    out,
                    "{{\"session_id\":\"{id}\",\"features\":{},\"rows\":[",
                    serde_json::to_string(&names).expect("names serialise")
                )
                .expect("writing to a String");
            }
            Format::Csv => {
                out.push_str("window_index,window_start,channel_index,channel_label");
                for n in &names {
                    out.push(',');
                    out.push_str(n);
                }
                out.push_str("\r\n");
            }
            Format::Ndjson | Format::Parquet => {}
        }
        let mut first = true;
        while let Some(row) = rows.next().await {
            let written = row.and_then(|row| {
                if format == Format::Json && !first {
                    out.push(',');
                }
                first = false;
                write_row(&mut out, &row, &sel, format)?;
                if format == Format::Ndjson {
                    out.push('\n');
                }
                Ok(())
            });
            if let Err(e) = written {
                tracing::error!(error = %e, "reading features failed mid-answer");
                let _ = tx.send(Err(std::io::Error::other(e))).await;
                return;
            }
            if out.len() >= STREAM_PIECE
                && tx
                    .send(Ok(Bytes::from(std::mem::take(&mut out))))
                    .await
                    .is_err()
            {
                return; // the client went away
            }
        }
        if format == Format::Json {
            out.push_str("]}");
        }
        let _ = tx.send(Ok(Bytes::from(out))).await;
    });
    Ok((
        [(
            CONTENT_TYPE,
            HeaderValue::from_static(format.content_type()),
        )],
        Body::from_stream(rx),
    )
        .into_response())
}

/// Streams `rows` as a Parquet file, a row group at a time.
async fn stream_parquet(
    rows: &mut (impl futures::Stream<Item = Result<PgRow, sqlx::Error>> + Unpin),
    sel: &Selection,
    mut tx: futures::channel::mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let written: Result<(), crate::feature_parquet::WriteError> = async {
        let mut file = crate::feature_parquet::FeatureParquet::new(&sel.names)?;
        while let Some(row) = rows.next().await {
            if let Some(group) = file.push(&row?)? {
                if tx.send(Ok(group)).await.is_err() {
                    return Ok(()); // the client went away
                }
            }
        }
        let _ = tx.send(Ok(file.finish()?)).await;
        Ok(())
    }
    .await;
    if let Err(e) = written {
        tracing::error!(error = %e, "writing features as Parquet failed mid-answer");
        let _ = tx.send(Err(std::io::Error::other(e))).await;
    }
}

// ---------------------------------------------------------------------------------
// Audio

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AudioQuery {
    /// The preset (default: `parameter_mapping` if rendered, else the first one).
    pub preset: Option<String>,
    /// Chunks whose EEG starts at or after this time (RFC 3339).
    pub from: Option<String>,
    /// Chunks whose EEG starts before this time (RFC 3339).
    pub to: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct ChunkSpan {
    chunk_index: i64,
    /// Byte offset of the chunk's PCM in the WAV's data.
    data_start: u64,
    bytes: u64,
}

const WAV_HEADER: u64 = 44;
/// Chunks fetched per query while streaming.
const CHUNKS_PER_FETCH: usize = 16;

/// The 44-byte header of a 16-bit PCM WAV file.
pub fn wav_header(sample_rate: u32, channels: u16, data_bytes: u32) -> [u8; 44] {
    let mut h = [0u8; 44];
    let block = channels * 2;
    h[0..4].copy_from_slice(b"RIFF");
    h[4..8].copy_from_slice(&(36 + data_bytes).to_le_bytes());
    h[8..12].copy_from_slice(b"WAVE");
    h[12..16].copy_from_slice(b"fmt ");
    h[16..20].copy_from_slice(&16u32.to_le_bytes());
    h[20..22].copy_from_slice(&1u16.to_le_bytes());
    h[22..24].copy_from_slice(&channels.to_le_bytes());
    h[24..28].copy_from_slice(&sample_rate.to_le_bytes());
    h[28..32].copy_from_slice(&(sample_rate * u32::from(block)).to_le_bytes());
    h[32..34].copy_from_slice(&block.to_le_bytes());
    h[34..36].copy_from_slice(&16u16.to_le_bytes());
    h[36..40].copy_from_slice(b"data");
    h[40..44].copy_from_slice(&data_bytes.to_le_bytes());
    h
}

/// A single `bytes=` range of a file of `len` bytes, as inclusive `[start, end]`;
/// `Err(())` when it cannot be satisfied. Several ranges are answered as the whole.
fn parse_range(header: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let suffix: u64 = b.parse().ok()?;
        if suffix == 0 || len == 0 {
            return Some(Err(()));
        }
        (len.saturating_sub(suffix), len - 1)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            b.parse::<u64>().ok()?.min(len.saturating_sub(1))
        };
        if start >= len || end < start {
            return Some(Err(()));
        }
        (start, end)
    };
    Some(Ok(range))
}

#[utoipa::path(get, path = "/v1/sessions/{id}/audio", tag = "results", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The session"), AudioQuery),
    responses((status = 200, description = "The session's audio (or the chunks in the time range) as a 16-bit PCM WAV file, streamed", content_type = "audio/wav"),
              (status = 206, description = "The requested byte range (`Range: bytes=a-b`)", content_type = "audio/wav"),
              (status = 416, description = "The range is outside the file"),
              (status = 404, description = "No such session in this tenant, or no audio (for this preset) yet", body = crate::openapi::ErrorBody),
              (status = 401, description = "Missing or invalid token or key", body = crate::openapi::ErrorBody)))]
/// `GET /v1/sessions/{id}/audio`: the session's audio as WAV, streamed, with byte
/// ranges; a time range selects the chunks whose EEG starts in it.
pub async fn audio(
    State(state): State<AppState>,
    reader: Reader,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    query: Result<Query<AudioQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let from = parse_time("from", q.from.as_deref())?;
    let to = parse_time("to", q.to.as_deref())?;
    find_session(&state, reader, id).await?;
    let presets = audio_presets(&state, reader, id).await?;
    let preset = match &q.preset {
        Some(p) => presets.iter().find(|s| &s.preset == p).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "audio_not_found",
                format!("no {p} audio for this session"),
            )
        })?,
        None => presets
            .iter()
            .find(|s| s.preset == "parameter_mapping")
            .or(presets.first())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "audio_not_found",
                    "no audio for this session yet",
                )
            })?,
    };
    let mut qb = sqlx::QueryBuilder::new(
        "SELECT chunk_index, frames, channels FROM audio_chunks WHERE session_id = ",
    );
    qb.push_bind(id)
        .push(" AND tenant_id = ")
        .push_bind(reader.tenant)
        .push(" AND preset = ")
        .push_bind(&preset.preset);
    if let Some(t) = from {
        qb.push(" AND eeg_start >= ").push_bind(t);
    }
    if let Some(t) = to {
        qb.push(" AND eeg_start < ").push_bind(t);
    }
    qb.push(" ORDER BY chunk_index");
    let rows = qb.build().fetch_all(&state.pool).await?;
    let channels = u16::try_from(preset.channels).unwrap_or(2).max(1);
    let mut spans = Vec::with_capacity(rows.len());
    let mut data_len = 0u64;
    for r in &rows {
        let frames: i64 = r.try_get("frames")?;
        let bytes = frames as u64 * u64::from(channels) * 2;
        spans.push(ChunkSpan {
            chunk_index: r.try_get("chunk_index")?,
            data_start: data_len,
            bytes,
        });
        data_len += bytes;
    }
    let data_bytes = u32::try_from(data_len).map_err(|_| {
        invalid(
            "to",
            "the audio is over 4 GiB, beyond WAV: ask for a time range",
        )
    })?;
    let header = wav_header(preset.sample_rate_hz as u32, channels, data_bytes);
    let len = WAV_HEADER + data_len;
    let etag = format!(
        "\"{id}-{}-{}-{}\"",
        preset.preset, preset.preset_version, data_len
    );
    let range = headers
        .get(axum::http::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| parse_range(r, len));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len - 1),
        Some(Ok((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Some(Err(())) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response());
        }
    };
    let pool = state.pool.clone();
    let store = state.audio.clone();
    let preset_name = preset.preset.clone();
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        if start < WAV_HEADER {
            let piece = &header[start as usize..=(end.min(WAV_HEADER - 1)) as usize];
            if tx.send(Ok(Bytes::copy_from_slice(piece))).await.is_err() {
                return;
            }
        }
        let (data_start, data_end) = (start.saturating_sub(WAV_HEADER), end + 1 - WAV_HEADER);
        let wanted: Vec<ChunkSpan> = spans
            .into_iter()
            .filter(|s| {
                s.data_start + s.bytes > data_start && s.data_start < data_end && s.bytes > 0
            })
            .collect();
        for group in wanted.chunks(CHUNKS_PER_FETCH) {
            let pcm = match fetch_pcm(&pool, store.as_ref(), id, &preset_name, group).await {
                Ok(pcm) => pcm,
                Err(e) => {
                    tracing::error!(error = %e, "reading audio failed mid-answer");
                    let _ = tx.send(Err(std::io::Error::other(e))).await;
                    return;
                }
            };
            for (span, pcm) in group.iter().zip(pcm) {
                let from = data_start.saturating_sub(span.data_start) as usize;
                let to = ((data_end - span.data_start).min(span.bytes)) as usize;
                if pcm.len() < to {
                    let _ = tx
                        .send(Err(std::io::Error::other(
                            "a chunk is shorter than its row says",
                        )))
                        .await;
                    return;
                }
                if tx
                    .send(Ok(Bytes::copy_from_slice(&pcm[from..to])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    let mut response = Response::new(Body::from_stream(rx));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("audio/wav"));
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(end + 1 - start));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("private, no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
            h.insert(CONTENT_RANGE, v);
        }
    }
    Ok(response)
}

/// The PCM of a group of chunks, in the group's order (objects fetched and decoded
/// concurrently).
async fn fetch_pcm(
    pool: &sqlx::PgPool,
    store: Option<&clisonix_audio::AudioStore>,
    session: Uuid,
    preset: &str,
    group: &[ChunkSpan],
) -> Result<Vec<Vec<u8>>, crate::audio::ReadError> {
    use crate::audio::{ReadError, Stored};
    let indexes: Vec<i64> = group.iter().map(|s| s.chunk_index).collect();
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT chunk_index, {} FROM audio_chunks WHERE session_id = $1 AND preset = $2 \
         AND chunk_index = ANY($3) ORDER BY chunk_index",
        crate::audio::COLUMNS
    )))
    .bind(session)
    .bind(preset)
    .bind(&indexes)
    .fetch_all(pool)
    .await?;
    let mut by_index = BTreeMap::new();
    for r in &rows {
        by_index.insert(r.try_get::<i64, _>("chunk_index")?, Stored::from_row(r)?);
    }
    let reads = group.iter().map(|span| {
        let stored = by_index.remove(&span.chunk_index);
        async move {
            match stored {
                Some(s) => s.pcm(store).await,
                // Retention deleted the session while it was being read.
                None => Err(ReadError::Database(sqlx::Error::RowNotFound)),
            }
        }
    });
    futures::future::try_join_all(reads).await
}

/// Which chunk: its preset (default as for the WAV file).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ChunkQuery {
    /// The preset (default: `parameter_mapping` if rendered, else the first one).
    pub preset: Option<String>,
}

#[utoipa::path(get, path = "/v1/sessions/{id}/audio/chunks/{chunk_index}", tag = "results", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The session"), ("chunk_index" = i64, Path, description = "The chunk, from 0"), ChunkQuery),
    responses((status = 200, description = "The chunk's audio as lossless FLAC (16-bit), as stored: a fraction of the WAV's size", content_type = "audio/flac"),
              (status = 404, description = "No such session in this tenant, or no such chunk (for this preset)", body = crate::openapi::ErrorBody),
              (status = 503, description = "The audio store cannot be read now", body = crate::openapi::ErrorBody),
              (status = 401, description = "Missing or invalid token or key", body = crate::openapi::ErrorBody)))]
/// `GET /v1/sessions/{id}/audio/chunks/{chunk_index}`: one chunk as FLAC, the compressed
/// form bulk readers fetch chunk by chunk (the session's detail says how many there are).
pub async fn audio_chunk(
    State(state): State<AppState>,
    reader: Reader,
    Path((id, chunk_index)): Path<(Uuid, i64)>,
    query: Result<Query<ChunkQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let presets = audio_presets(&state, reader, id).await?;
    if presets.is_empty() {
        find_session(&state, reader, id).await?;
    }
    let preset = match &q.preset {
        Some(p) => p.clone(),
        None => presets
            .iter()
            .find(|s| s.preset == "parameter_mapping")
            .or(presets.first())
            .map(|s| s.preset.clone())
            .unwrap_or_default(),
    };
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT preset_version, {} FROM audio_chunks \
         WHERE session_id = $1 AND tenant_id = $2 AND preset = $3 AND chunk_index = $4",
        crate::audio::COLUMNS
    )))
    .bind(id)
    .bind(reader.tenant)
    .bind(&preset)
    .bind(chunk_index)
    .fetch_optional(&state.pool)
    .await?
    .ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "audio_not_found",
            format!("no {preset} audio chunk {chunk_index} for this session"),
        )
    })?;
    let stored = crate::audio::Stored::from_row(&row)?;
    let etag = match &stored {
        crate::audio::Stored::Object(key) => format!("\"{}\"", key.digest()),
        crate::audio::Stored::Inline { .. } => format!(
            "\"{id}-{preset}-{}-{chunk_index}\"",
            row.try_get::<String, _>("preset_version")?
        ),
    };
    let flac = stored.flac(state.audio.as_ref()).await?;
    let mut response = Response::new(Body::from(flac));
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("audio/flac"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("private, no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(ETAG, v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_parsed_like_rfc_9110_says() {
        assert_eq!(parse_range("bytes=0-99", 1000), Some(Ok((0, 99))));
        assert_eq!(parse_range("bytes=900-", 1000), Some(Ok((900, 999))));
        assert_eq!(parse_range("bytes=-100", 1000), Some(Ok((900, 999))));
        assert_eq!(parse_range("bytes=990-2000", 1000), Some(Ok((990, 999))));
        assert_eq!(parse_range("bytes=1000-", 1000), Some(Err(())));
        assert_eq!(parse_range("bytes=5-2", 1000), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), None);
        assert_eq!(parse_range("items=0-1", 1000), None);
    }

    #[test]
    fn a_wav_header_describes_16_bit_pcm() {
        let h = wav_header(44_100, 2, 4000);
        assert_eq!(&h[..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(h[4..8].try_into().unwrap()), 4036);
        assert_eq!(u32::from_le_bytes(h[28..32].try_into().unwrap()), 176_400);
        assert_eq!(u16::from_le_bytes(h[32..34].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(h[40..44].try_into().unwrap()), 4000);
    }
}
