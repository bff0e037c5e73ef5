//! `GET /v1/sessions/{id}/live`: a WebSocket that pushes a session's features (one
//! message per window, every channel) and audio chunks (a JSON header, then the PCM
//! as a binary message) as the sink stores them, in order, and ends when the session
//! has ended and everything is out.
//!
//! Windows come from the committed `eeg.features` topic as Albi writes them
//! ([`LiveFeed`]: read-committed, so a window pushed is one the sink will store), so a
//! window is out as soon as its last channel is, without waiting for the sink's
//! batch, its database commit and a read back. The database is the stream's catch-up
//! (the windows stored before it connected, or from `from_window`) and its fallback
//! (a window whose records the feed did not bring, e.g. when a stream fell behind):
//! what is pushed is exactly what the results API returns, whichever way it came
//! (tested). Audio chunks are read from the database. A client resumes with
//! `from_window` and `from_chunk` after a reconnect. The sink's commit notifications
//! (`LISTEN`, [`clisonix_sink::CHANNEL`]) wake the streams of the sessions they name
//! at once; a poll every two seconds covers a lost notification or a reconnecting
//! listener.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use clisonix_schemas::{decode, FeatureKey, Features};
use clisonix_topics::KafkaSettings;
use futures::{SinkExt, StreamExt};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message as _;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{PgPool, Row};
use tokio::sync::{broadcast, mpsc};
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
/// Feature records a stream's feed holds before it falls back to the database.
const FEED_QUEUE: usize = 4096;
/// Windows a stream assembles at once from the feed (later ones come from the
/// database).
const PENDING_WINDOWS: usize = 64;
const NORMAL: u16 = 1000;
const GOING_AWAY: u16 = 1001;

/// Streams by the (tenant, session) they read: a session id is the device's choice,
/// so two tenants may use the same one, and each sees only its own.
type Subscribers = Arc<Mutex<HashMap<(Uuid, Uuid), Vec<mpsc::Sender<Arc<Features>>>>>>;

/// Feature records from the committed topic, handed to the live streams of their
/// sessions. Each gateway reads every partition in a group of its own, from the end
/// (it pushes what is new; what is older is in the database), and commits nothing.
#[derive(Clone)]
pub struct LiveFeed {
    subscribers: Subscribers,
    consumer: Arc<StreamConsumer>,
}

impl std::fmt::Debug for LiveFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveFeed").finish_non_exhaustive()
    }
}

impl LiveFeed {
    /// Subscribes to `topic` (the deployed name of `eeg.features`).
    pub fn start(
        settings: &KafkaSettings,
        topic: String,
    ) -> Result<LiveFeed, rdkafka::error::KafkaError> {
        let group = format!("clisonix-gateway-live-{}", Uuid::new_v4().simple());
        let consumer: StreamConsumer = settings
            .consumer(&group)
            .set("auto.offset.reset", "latest")
            .set("fetch.wait.max.ms", "10")
            // Records are handed on as they come: a small read-ahead is enough, and
            // keeps the gateway's memory flat (librdkafka's default is 64 MB).
            .set("queued.max.messages.kbytes", "8192")
            .create()?;
        consumer.subscribe(&[&topic])?;
        Ok(LiveFeed {
            subscribers: Arc::default(),
            consumer: Arc::new(consumer),
        })
    }

    /// Hands records to subscribers until `stop` is cancelled. Only the keys of
    /// records no stream watches are decoded.
    async fn run(self, stop: CancellationToken) {
        let mut warned: Option<Instant> = None;
        loop {
            let m = tokio::select! {
                _ = stop.cancelled() => return,
                m = self.consumer.recv() => m,
            };
            let m = match m {
                Ok(m) => m,
                Err(error) => {
                    // Once a minute at most (an unknown topic is reported at every
                    // metadata refresh); streams keep reading the database meanwhile.
                    if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!(%error, "the live feed cannot read the features topic; live streams read the database");
                        warned = Some(Instant::now());
                    }
                    continue;
                }
            };
            if let (Some(key), Some(value)) = (m.key(), m.payload()) {
                self.dispatch(key, value);
            }
        }
    }

    /// Hands a record (its key and value as on the topic) to the streams of its tenant's
    /// session; the value is decoded only when a stream watches it.
    fn dispatch(&self, key: &[u8], value: &[u8]) {
        let Some(session) = decode::<FeatureKey>(key)
            .ok()
            .map(|k| (k.tenant_id.as_uuid(), k.session_id.as_uuid()))
        else {
            return;
        };
        let senders = match self.subscribers.lock().expect("not poisoned").get(&session) {
            Some(s) => s.clone(),
            None => return,
        };
        let Some(features) = decode::<Features>(value)
            .ok()
            .filter(|f| (f.tenant_id.as_uuid(), f.session_id.as_uuid()) == session)
        else {
            return;
        };
        let features = Arc::new(features);
        for tx in senders {
            // A full queue drops the record: that stream takes the window from the
            // database instead.
            let _ = tx.try_send(features.clone());
        }
    }

    /// The records of `tenant`'s `session` from now on, until the receiver is dropped.
    fn subscribe(&self, tenant: Uuid, session: Uuid) -> Subscription {
        let session = (tenant, session);
        let (tx, rx) = mpsc::channel(FEED_QUEUE);
        let mut subscribers = self.subscribers.lock().expect("not poisoned");
        let list = subscribers.entry(session).or_default();
        list.retain(|s| !s.is_closed());
        list.push(tx);
        Subscription {
            rx,
            session,
            subscribers: self.subscribers.clone(),
        }
    }
}

/// A stream's share of the feed; unsubscribes when dropped.
struct Subscription {
    rx: mpsc::Receiver<Arc<Features>>,
    session: (Uuid, Uuid),
    subscribers: Subscribers,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.rx.close();
        let mut subscribers = self.subscribers.lock().expect("not poisoned");
        if let Some(list) = subscribers.get_mut(&self.session) {
            list.retain(|s| !s.is_closed());
            if list.is_empty() {
                subscribers.remove(&self.session);
            }
        }
    }
}

/// The fan-out of the sink's notifications and of the feed to live streams, and their
/// shutdown.
#[derive(Debug, Clone)]
pub struct LiveHub {
    wake: broadcast::Sender<Arc<str>>,
    feed: Option<LiveFeed>,
    pub stop: CancellationToken,
    pub streams: TaskTracker,
}

impl LiveHub {
    /// Listens on the sink's channel, and runs `feed` when there is one, until `stop`
    /// is cancelled, reconnecting as needed.
    pub fn start(pool: PgPool, feed: Option<LiveFeed>) -> LiveHub {
        let (wake, _) = broadcast::channel(4096);
        let hub = LiveHub {
            wake,
            feed: feed.clone(),
            stop: CancellationToken::new(),
            streams: TaskTracker::new(),
        };
        if let Some(feed) = feed {
            tokio::spawn(feed.run(hub.stop.clone()));
        }
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
        audio: state.audio.clone(),
        windows_pushed: state.metrics.live_windows.clone(),
        pending: BTreeMap::new(),
        fed: false,
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
    audio: Option<clisonix_audio::AudioStore>,
    windows_pushed: prometheus::IntCounterVec,
    /// Windows being assembled from the feed: their channels so far.
    pending: BTreeMap<u64, Vec<Arc<Features>>>,
    /// The feed has sent windows: from then on the sink's wakes for features are
    /// skipped while it keeps up (see [`Stream::fed`]).
    fed: bool,
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
        // Subscribed before the first read, so no window falls between the two.
        let mut feed = hub
            .feed
            .as_ref()
            .map(|f| f.subscribe(self.tenant, self.session));
        let mut first = first;
        first["type"] = json!("session");
        tx.send(text(&first)).await?;
        let id = self.session.to_string();
        let mut quiet_since = Instant::now();
        loop {
            // The database first (what was stored before, or what the feed missed),
            // then what the feed completed after it.
            let progressed = self.push(&mut tx).await? | self.flush(&mut tx).await?;
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
            // Ended: look again when it will have been quiet for SETTLE (a full SETTLE
            // from here could double the wait); otherwise every POLL.
            let wait = if status.as_deref() == Some("ended") {
                SETTLE
                    .saturating_sub(quiet_since.elapsed())
                    .max(Duration::from_millis(50))
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
                    Some(f) = async {
                        match feed.as_mut() {
                            Some(sub) => sub.rx.recv().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        if self.take(f, &mut tx).await? {
                            quiet_since = Instant::now();
                        }
                        continue;
                    }
                    w = wake.recv() => match w {
                        Ok(payload) if !payload.ends_with(&id) => continue,
                        // The feed brings the windows: a stored batch would be read
                        // back for nothing (the poll still reads the database every
                        // POLL, for a window the feed missed).
                        Ok(payload) if self.fed() && payload.starts_with("features:") => continue,
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

    /// Whether the feed keeps this stream complete: it has sent windows, and holds no
    /// more than two unfinished (more means it missed a record, which the database
    /// brings: wakes count again).
    fn fed(&self) -> bool {
        self.fed && self.pending.len() <= 2
    }

    /// Adds a record from the feed to its window, and sends the windows it completes
    /// (in order, each with every channel); whether it sent any.
    async fn take<S>(&mut self, f: Arc<Features>, tx: &mut S) -> Result<bool, anyhow::Error>
    where
        S: futures::Sink<Message, Error = axum::Error> + Unpin,
    {
        let next = u64::try_from(self.next_window).unwrap_or(0);
        if f.window_index < next {
            return Ok(false);
        }
        if self.channels == 0
            || (!self.pending.contains_key(&f.window_index)
                && self.pending.len() >= PENDING_WINDOWS)
        {
            // A session without channels, or a window too far ahead: the database
            // brings these.
            return Ok(false);
        }
        let window = self.pending.entry(f.window_index).or_default();
        if !window.iter().any(|c| c.channel_index == f.channel_index) {
            window.push(f);
        }
        self.flush(tx).await
    }

    /// Sends the windows the feed completed from the next one on, in order; whether it
    /// sent any.
    async fn flush<S>(&mut self, tx: &mut S) -> Result<bool, anyhow::Error>
    where
        S: futures::Sink<Message, Error = axum::Error> + Unpin,
    {
        let mut sent = false;
        loop {
            let next = u64::try_from(self.next_window).unwrap_or(0);
            let complete = self
                .pending
                .get(&next)
                .is_some_and(|chs| chs.len() >= self.channels);
            if !complete {
                break;
            }
            let mut channels = self.pending.remove(&next).unwrap_or_default();
            channels.sort_by_key(|f| f.channel_index);
            let start =
                chrono::DateTime::from_timestamp_micros(channels[0].window_start.as_micros())
                    .unwrap_or_default();
            let values: Vec<Value> = channels
                .iter()
                .map(|f| Value::Object(results::feature_values_of(f)))
                .collect();
            let m = json!({"type": "features", "window_index": self.next_window, "window_start": results::rfc3339(start), "channels": values});
            tx.send(text(&m)).await?;
            self.windows_pushed.with_label_values(&["topic"]).inc();
            self.next_window += 1;
            self.fed = true;
            sent = true;
        }
        Ok(sent)
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
            self.windows_pushed.with_label_values(&["database"]).inc();
            self.next_window = w + 1;
            progressed = true;
        }
        // What the feed held of windows now sent is not needed.
        let next = u64::try_from(self.next_window).unwrap_or(0);
        self.pending.retain(|w, _| *w >= next);
        let Some(preset) = &self.preset else {
            return Ok(progressed);
        };
        let chunks = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT chunk_index, preset_version, start_frame, frames, eeg_start, {} \
             FROM audio_chunks WHERE session_id = $1 AND tenant_id = $2 AND preset = $3 AND chunk_index >= $4 \
             ORDER BY chunk_index LIMIT $5",
            crate::audio::COLUMNS
        )))
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
            let pcm = crate::audio::Stored::from_row(c)?
                .pcm(self.audio.as_ref())
                .await?;
            tx.send(text(&m)).await?;
            tx.send(Message::Binary(pcm.into())).await?;
            self.next_chunk = index + 1;
            progressed = true;
        }
        Ok(progressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clisonix_schemas::{encode, examples, TenantId};
    use clisonix_sink::{Results, SinkRecord};

    /// A session id is the device's to choose: a stream gets its own tenant's records
    /// of it, never another tenant's with the same id; and none once it is gone.
    #[tokio::test]
    async fn the_feed_hands_a_record_only_to_the_streams_of_its_tenants_session() {
        let feed = LiveFeed::start(
            &KafkaSettings::new("127.0.0.1:1", "test"),
            "eeg.features".into(),
        )
        .unwrap();
        let mine = examples::features(1);
        let mut theirs = mine.clone();
        theirs.tenant_id = TenantId::random();
        let (tenant, session) = (mine.tenant_id.as_uuid(), mine.session_id.as_uuid());
        let mut sub = feed.subscribe(tenant, session);
        for f in [&theirs, &mine] {
            feed.dispatch(&encode(&f.key()).unwrap(), &encode(f).unwrap());
        }
        let got = sub.rx.try_recv().unwrap();
        assert_eq!(*got, mine);
        assert!(sub.rx.try_recv().is_err(), "the other tenant's record");
        drop(sub);
        assert!(feed.subscribers.lock().unwrap().is_empty());
    }

    /// What the live stream pushes of a record from the feed is what it (and the API)
    /// read of the row the sink stores of it: every field, missing and non-finite
    /// values included.
    #[tokio::test]
    async fn a_channel_from_the_feed_equals_the_same_channel_read_from_the_database() {
        let db = clisonix_e2e::TestEnv::get().fresh_database().await;
        sqlx::migrate!("./migrations").run(&db.pool).await.unwrap();
        let mut records = vec![examples::features(1), examples::features(2)];
        records[1].abs.theta = Some(f64::NAN);
        records[1].total_abs = None;
        records[1].quality.flat = true;
        records[1].quality.line_noise_60hz = Some(f64::INFINITY);
        records[1].channel_index = 7;
        let sink: Vec<SinkRecord> = records
            .iter()
            .map(|f| SinkRecord::Features(Box::new(f.clone())))
            .collect();
        Results::new(
            db.pool.clone(),
            clisonix_audio::AudioStore::from_url(&db.audio_store()).unwrap(),
        )
        .write(&sink.iter().collect::<Vec<_>>())
        .await
        .unwrap();
        for f in &records {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT channel_index, channel_label, {} FROM features \
                 WHERE session_id = $1 AND window_index = $2",
                results::scalar_feature_columns()
            )))
            .bind(f.session_id.as_uuid())
            .bind(f.window_index as i64)
            .fetch_one(&db.pool)
            .await
            .unwrap();
            let stored = feature_values(&row).unwrap();
            let fed = results::feature_values_of(f);
            assert_eq!(
                serde_json::to_string(&fed).unwrap(),
                serde_json::to_string(&stored).unwrap(),
                "the same keys, in the same order, with the same values"
            );
            assert!(fed.values().filter(|v| v.is_null()).count() <= 3);
        }
        db.drop_now().await;
    }
}
