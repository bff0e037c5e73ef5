//! `GET /v1/sessions/{id}/live`: a WebSocket that pushes a session's features (one
//! message per window, every channel) and audio chunks (a JSON header, then the PCM
//! as a binary message) as the sink stores them, in order, and ends when the session
//! has ended and everything is out.
//!
//! What is pushed is read from the database, so it is exactly what the results API
//! returns; a client resumes with `from_window` and `from_chunk` after a reconnect.
//! The sink's commit notifications (`LISTEN`, [`clisonix_sink::CHANNEL`]) wake the
//! streams of the sessions they name at once; a poll every two seconds covers a lost
//! notification or a reconnecting listener.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{PgPool, Row};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::error::ApiError;
use crate::results;
use crate::startup::AppState;

const POLL: Duration = Duration::from_secs(2);
/// After the session ended, how long without new rows before the stream says so. The
/// sessions stage can mark a session ended while Albi's last windows are still on the
/// way; on a loaded machine 2 s was not always enough (the stream ended windows early).
/// A quiet period is still a guess: ending on "every window of the session's samples
/// is stored" would not be.
const SETTLE: Duration = Duration::from_secs(6);
/// Feature rows and audio chunks read per round.
const ROWS_PER_READ: i64 = 8_192;
const CHUNKS_PER_READ: i64 = 16;
const NORMAL: u16 = 1000;
const GOING_AWAY: u16 = 1001;

/// The fan-out of the sink's notifications to live streams, and their shutdown.
#[derive(Debug, Clone)]
pub struct LiveHub {
    wake: broadcast::Sender<Arc<str>>,
    pub stop: CancellationToken,
    pub streams: TaskTracker,
}

impl LiveHub {
    /// Listens on the sink's channel until `stop` is cancelled, reconnecting as needed.
    pub fn start(pool: PgPool) -> LiveHub {
        let (wake, _) = broadcast::channel(4096);
        let hub = LiveHub {
            wake,
            stop: CancellationToken::new(),
            streams: TaskTracker::new(),
        };
        let (tx, stop) = (hub.wake.clone(), hub.stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                match PgListener::connect_with(&pool).await {
                    Ok(mut listener) => {
                        if let Err(error) = listener.listen(clisonix_sink::CHANNEL).await {
                            tracing::warn!(%error, "LISTEN failed; retrying");
                        } else {
                            loop {
                                tokio::select! {
                                    _ = stop.cancelled() => return,
                                    n = listener.recv() => match n {
                                        Ok(n) => { let _ = tx.send(Arc::from(n.payload())); }
                                        Err(error) => {
                                            tracing::warn!(%error, "the results listener lost its connection");
                                            break;
                                        }
                                    }
                                }
                            }
                        }
                    }
                    Err(error) => tracing::warn!(%error, "cannot LISTEN for results; retrying"),
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        hub
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LiveQuery {
    /// Features from this window on (default 0).
    pub from_window: Option<i64>,
    /// Audio from this chunk on (default 0).
    pub from_chunk: Option<i64>,
    /// The audio preset (default: `parameter_mapping` if rendered, else none).
    pub preset: Option<String>,
    /// `false`: features only.
    pub audio: Option<bool>,
    /// A token or read key, for clients that cannot set headers (browsers).
    pub access_token: Option<String>,
}

#[utoipa::path(get, path = "/v1/sessions/{id}/live", tag = "results", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The session"), LiveQuery),
    responses((status = 101, description = "A WebSocket. Server messages (JSON text): `{type: \"session\", ...}` first; `{type: \"features\", window_index, window_start, channels: [{channel_index, channel_label, <feature>: value, ...}]}` per window, in order; `{type: \"audio\", preset, preset_version, chunk_index, start_frame, frames, eeg_start, sample_rate_hz, channels}` each followed by a binary message with the chunk's PCM (signed 16-bit little-endian, interleaved); `{type: \"end\", session}` when the session has ended and everything is out, then a normal close."),
              (status = 404, description = "No such session in this tenant", body = crate::openapi::ErrorBody),
              (status = 401, description = "Missing or invalid token or key", body = crate::openapi::ErrorBody)))]
/// `GET /v1/sessions/{id}/live`: features and audio pushed as they are stored.
pub async fn live(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    query: Result<Query<LiveQuery>, QueryRejection>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(results::query_error)?;
    let reader = match results::credential(&headers).or(q.access_token.as_deref()) {
        Some(token) => results::reader_from(&state, token).await?,
        None => return Err(ApiError::unauthorized("send a token or a read key")),
    };
    let session = results::find_session(&state, reader, id).await?;
    let presets = results::audio_presets(&state, reader, id).await?;
    let preset = match (q.audio, &q.preset) {
        (Some(false), _) => None,
        (_, Some(p)) => Some(p.clone()),
        _ => Some(
            presets
                .iter()
                .find(|p| p.preset == "parameter_mapping")
                .or(presets.first())
                .map_or_else(|| "parameter_mapping".to_owned(), |p| p.preset.clone()),
        ),
    };
    let stream = Stream {
        pool: state.pool.clone(),
        tenant: reader.tenant,
        session: id,
        channels: session.channel_labels.len(),
        next_window: q.from_window.unwrap_or(0).max(0),
        next_chunk: q.from_chunk.unwrap_or(0).max(0),
        preset,
    };
    let hub = state.live.clone();
    let first = serde_json::to_value(&session).unwrap_or(Value::Null);
    Ok(upgrade.on_upgrade(move |socket| {
        let tracker = hub.streams.clone();
        tracker.track_future(async move {
            if let Err(error) = stream.serve(socket, &hub, first).await {
                tracing::warn!(%error, "a live stream failed");
            }
        })
    }))
}

struct Stream {
    pool: PgPool,
    tenant: Uuid,
    session: Uuid,
    channels: usize,
    next_window: i64,
    next_chunk: i64,
    preset: Option<String>,
}

fn text(v: &Value) -> Message {
    Message::Text(Utf8Bytes::from(v.to_string()))
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason.to_owned()),
    }))
}

fn feature_values(row: &PgRow) -> Result<Map<String, Value>, sqlx::Error> {
    let mut m = Map::new();
    m.insert(
        "channel_index".into(),
        json!(row.try_get::<i32, _>("channel_index")?),
    );
    m.insert(
        "channel_label".into(),
        json!(row.try_get::<String, _>("channel_label")?),
    );
    for (name, value) in results::scalar_features(row)? {
        m.insert(name.to_owned(), value);
    }
    Ok(m)
}

impl Stream {
    async fn serve(
        mut self,
        socket: WebSocket,
        hub: &LiveHub,
        first: Value,
    ) -> Result<(), anyhow::Error> {
        let (mut tx, mut rx) = socket.split();
        let mut wake = hub.wake.subscribe();
        let mut first = first;
        first["type"] = json!("session");
        tx.send(text(&first)).await?;
        let id = self.session.to_string();
        let mut quiet_since = Instant::now();
        loop {
            let progressed = self.push(&mut tx).await?;
            if progressed {
                quiet_since = Instant::now();
                continue;
            }
            let status: Option<String> = sqlx::query_scalar(
                "SELECT status FROM sessions WHERE session_id = $1 AND tenant_id = $2",
            )
            .bind(self.session)
            .bind(self.tenant)
            .fetch_optional(&self.pool)
            .await?;
            if status.as_deref() == Some("ended") && quiet_since.elapsed() >= SETTLE {
                let session = results::find_session_row(&self.pool, self.tenant, self.session)
                    .await
                    .map_err(|e| anyhow::anyhow!("reading the session: {}", e.message))?;
                let mut end = json!({"type": "end"});
                end["session"] = serde_json::to_value(&session)?;
                tx.send(text(&end)).await?;
                tx.send(close(NORMAL, "the session ended")).await?;
                return Ok(());
            }
            let wait = if status.as_deref() == Some("ended") {
                SETTLE
            } else {
                POLL
            };
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    _ = hub.stop.cancelled() => {
                        let _ = tx.send(close(GOING_AWAY, "the server is stopping")).await;
                        return Ok(());
                    }
                    _ = tokio::time::sleep_until(deadline) => break,
                    m = rx.next() => match m {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(()),
                        Some(Ok(_)) => continue,
                    },
                    w = wake.recv() => match w {
                        Ok(payload) if !payload.ends_with(&id) => continue,
                        Ok(payload) if self.preset.is_none() && payload.starts_with("audio:") => continue,
                        // Ours, or missed some: look now, once for all that is queued.
                        _ => {
                            while wake.try_recv().is_ok() {}
                            break;
                        }
                    },
                }
            }
        }
    }

    /// Sends every complete window and every chunk not yet sent; whether it sent any.
    async fn push<S>(&mut self, tx: &mut S) -> Result<bool, anyhow::Error>
    where
        S: futures::Sink<Message, Error = axum::Error> + Unpin,
    {
        let mut progressed = false;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT window_index, window_start, channel_index, channel_label, {} FROM features \
             WHERE session_id = $1 AND tenant_id = $2 AND window_index >= $3 \
             ORDER BY window_index, channel_index LIMIT $4",
            results::scalar_feature_columns()
        )))
        .bind(self.session)
        .bind(self.tenant)
        .bind(self.next_window)
        .bind(ROWS_PER_READ)
        .fetch_all(&self.pool)
        .await?;
        let mut windows: BTreeMap<i64, (String, Vec<Value>)> = BTreeMap::new();
        for row in &rows {
            let w: i64 = row.try_get("window_index")?;
            let start: chrono::DateTime<chrono::Utc> = row.try_get("window_start")?;
            windows
                .entry(w)
                .or_insert_with(|| (results::rfc3339(start), Vec::new()))
                .1
                .push(Value::Object(feature_values(row)?));
        }
        for (w, (start, channels)) in windows {
            // A window goes out complete: its channels travel on different partitions,
            // so a later window's rows can be stored before all of this one's are.
            if w != self.next_window || channels.len() < self.channels {
                break;
            }
            let m = json!({"type": "features", "window_index": w, "window_start": start, "channels": channels});
            tx.send(text(&m)).await?;
            self.next_window = w + 1;
            progressed = true;
        }
        let Some(preset) = &self.preset else {
            return Ok(progressed);
        };
        let chunks = sqlx::query(
            "SELECT chunk_index, preset_version, start_frame, frames, eeg_start, sample_rate_hz, channels, pcm \
             FROM audio_chunks WHERE session_id = $1 AND tenant_id = $2 AND preset = $3 AND chunk_index >= $4 \
             ORDER BY chunk_index LIMIT $5",
        )
        .bind(self.session)
        .bind(self.tenant)
        .bind(preset)
        .bind(self.next_chunk)
        .bind(CHUNKS_PER_READ)
        .fetch_all(&self.pool)
        .await?;
        for c in &chunks {
            let index: i64 = c.try_get("chunk_index")?;
            if index != self.next_chunk {
                break;
            }
            let eeg_start: chrono::DateTime<chrono::Utc> = c.try_get("eeg_start")?;
            let m = json!({
                "type": "audio",
                "preset": preset,
                "preset_version": c.try_get::<String, _>("preset_version")?,
                "chunk_index": index,
                "start_frame": c.try_get::<i64, _>("start_frame")?,
                "frames": c.try_get::<i64, _>("frames")?,
                "eeg_start": results::rfc3339(eeg_start),
                "sample_rate_hz": c.try_get::<i32, _>("sample_rate_hz")?,
                "channels": c.try_get::<i16, _>("channels")?,
            });
            tx.send(text(&m)).await?;
            let pcm: Vec<u8> = c.try_get("pcm")?;
            tx.send(Message::Binary(pcm.into())).await?;
            self.next_chunk = index + 1;
            progressed = true;
        }
        Ok(progressed)
    }
}
