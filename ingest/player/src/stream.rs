//! The WebSocket device: opens a session on `/v1/stream`, sends frames ahead within a
//! window, matches answers to frames by order, and recovers by the protocol's rules —
//! after a reconnect it resumes above the session's `last_seq`, after a retryable
//! refusal it resends from the refused frame.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clisonix_ingest_protocol::json::JsonFrame;
use clisonix_ingest_protocol::ws::{ClientMessage, ServerMessage};
use clisonix_ingest_protocol::{binary, Rejection};
use clisonix_schemas::{Frame, SessionId};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::http::Format;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How a device streams.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Frames sent and not yet answered, at most.
    pub window: usize,
    /// Frames per message, at most.
    pub max_batch: usize,
    pub format: Format,
    /// Consecutive failed connection attempts before giving up.
    pub max_reconnects: u32,
    /// For reliability tests: drop the connection abruptly (no close frame, answers
    /// unread) after sending this many frames on it.
    pub disconnect_every: Option<usize>,
}

impl Default for StreamOptions {
    fn default() -> StreamOptions {
        StreamOptions {
            window: 512,
            max_batch: 64,
            format: Format::Binary,
            max_reconnects: 30,
            disconnect_every: None,
        }
    }
}

/// Counters shared with a progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub acked: AtomicU64,
    pub rejected: AtomicU64,
}

/// What one device's stream did.
#[derive(Debug, Default, Clone)]
pub struct DeviceStats {
    pub frames: usize,
    pub acked: usize,
    pub duplicates: usize,
    /// Frames found already published when a connection opened (their answers were
    /// lost with the previous connection).
    pub resumed: usize,
    pub rejected: Vec<(u64, Rejection)>,
    pub resent: usize,
    pub reconnects: u32,
    pub bytes: usize,
    /// Send-to-acknowledgement times of acknowledged frames, in microseconds.
    pub latencies_us: Vec<u64>,
    /// When each acknowledged frame (by `seq`) was acknowledged, wall clock.
    pub acked_at: Vec<(u64, std::time::SystemTime)>,
}

/// `http://host:port` → `ws://host:port/v1/stream`.
pub fn stream_url(url: &str) -> anyhow::Result<String> {
    let authority = crate::http::authority(url)?;
    Ok(format!("ws://{authority}/v1/stream"))
}

/// A raw connection, for tests that speak the protocol message by message.
#[derive(Debug)]
pub struct Connection {
    ws: Ws,
}

impl Connection {
    /// Connects with `key` (no `Authorization` header when empty).
    pub async fn connect(url: &str, key: &str) -> anyhow::Result<Connection> {
        let mut request = stream_url(url)?.into_client_request()?;
        if !key.is_empty() {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {key}").parse()?);
        }
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .context("opening the WebSocket")?;
        Ok(Connection { ws })
    }

    /// Connects and opens `session`; returns the session's `last_seq`.
    pub async fn open(
        url: &str,
        key: &str,
        session: SessionId,
    ) -> anyhow::Result<(Connection, Option<u64>)> {
        let mut c = Connection::connect(url, key).await?;
        c.send_json(&ClientMessage::Open {
            session_id: session.to_string(),
        })
        .await?;
        match c.next().await? {
            Some(ServerMessage::Opened { last_seq, .. }) => Ok((c, last_seq)),
            Some(ServerMessage::Error { code, message }) => bail!("{code}: {message}"),
            other => bail!("expected opened, got {other:?}"),
        }
    }

    pub async fn send_json(&mut self, m: &ClientMessage) -> anyhow::Result<()> {
        self.ws
            .send(Message::Text(serde_json::to_string(m)?.into()))
            .await?;
        Ok(())
    }

    /// Sends frames as one message; returns its size.
    pub async fn send_frames(&mut self, frames: &[Frame], format: Format) -> anyhow::Result<usize> {
        let message = match format {
            Format::Binary => Message::Binary(binary::encode_frames(frames).into()),
            Format::Json => Message::Text(
                serde_json::to_string(&ClientMessage::Frames {
                    frames: frames.iter().map(JsonFrame::from_frame).collect(),
                })?
                .into(),
            ),
        };
        let len = message.len();
        self.ws.send(message).await?;
        Ok(len)
    }

    pub async fn send_raw(&mut self, m: Message) -> anyhow::Result<()> {
        self.ws.send(m).await?;
        Ok(())
    }

    /// The next server message; `None` when the connection closed.
    pub async fn next(&mut self) -> anyhow::Result<Option<ServerMessage>> {
        loop {
            match self.ws.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(t))) => return Ok(Some(serde_json::from_str(t.as_str())?)),
                Some(Ok(_)) => {}
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Streams `frames` (one session, increasing seq) until every one is answered for
/// good; frame `i` is not sent before `due(i)`.
pub async fn stream_frames(
    url: &str,
    key: &str,
    frames: &[Frame],
    due: impl Fn(usize) -> Instant,
    options: &StreamOptions,
    progress: Option<Arc<Progress>>,
) -> anyhow::Result<DeviceStats> {
    let n = frames.len();
    let mut stats = DeviceStats {
        frames: n,
        ..Default::default()
    };
    let Some(first) = frames.first() else {
        return Ok(stats);
    };
    let session = first.session_id;
    let mut done = vec![false; n];
    let mut sent_at: Vec<Option<Instant>> = vec![None; n];
    let mut ever_sent = vec![false; n];
    let mut remaining = n;
    let mut failures = 0u32;
    let count = |p: &Option<Arc<Progress>>, acked: u64, rejected: u64| {
        if let Some(p) = p {
            p.acked.fetch_add(acked, Ordering::Relaxed);
            p.rejected.fetch_add(rejected, Ordering::Relaxed);
        }
    };
    'connections: while remaining > 0 {
        let (mut conn, last_seq) = match Connection::open(url, key, session).await {
            Ok(c) => {
                failures = 0;
                c
            }
            Err(e) => {
                failures += 1;
                if failures > options.max_reconnects {
                    return Err(e.context(format!("giving up after {failures} attempts")));
                }
                tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(10)))).await;
                stats.reconnects += 1;
                continue;
            }
        };
        if let Some(last) = last_seq {
            for (i, f) in frames.iter().enumerate() {
                if f.seq <= last && !done[i] {
                    done[i] = true;
                    remaining -= 1;
                    stats.resumed += 1;
                    count(&progress, 1, 0);
                }
            }
        }
        let mut next = 0usize;
        let mut pending: VecDeque<usize> = VecDeque::new();
        let mut resend_from: Option<usize> = None;
        let mut backoff = Duration::ZERO;
        let mut sent_here = 0usize;
        loop {
            if remaining == 0 && pending.is_empty() {
                conn.close().await;
                break 'connections;
            }
            // Send what is due, within the window, unless a resend is pending.
            while resend_from.is_none() && pending.len() < options.window {
                while next < n && done[next] {
                    next += 1;
                }
                let now = Instant::now();
                let mut batch = Vec::new();
                let mut i = next;
                while i < n
                    && batch.len() < options.max_batch
                    && pending.len() + batch.len() < options.window
                    && due(i) <= now
                {
                    if !done[i] {
                        batch.push(i);
                    }
                    i += 1;
                }
                if batch.is_empty() {
                    break;
                }
                let out: Vec<Frame> = batch.iter().map(|&i| frames[i].clone()).collect();
                match conn.send_frames(&out, options.format).await {
                    Ok(bytes) => stats.bytes += bytes,
                    Err(_) => {
                        stats.reconnects += 1;
                        continue 'connections;
                    }
                }
                for &i in &batch {
                    if ever_sent[i] {
                        stats.resent += 1;
                    }
                    ever_sent[i] = true;
                    sent_at[i] = Some(now);
                    pending.push_back(i);
                }
                next = i;
                sent_here += batch.len();
                if options.disconnect_every.is_some_and(|k| sent_here >= k) {
                    // Abrupt: the socket is dropped with answers unread.
                    drop(conn);
                    stats.reconnects += 1;
                    continue 'connections;
                }
            }
            let wake = if resend_from.is_none() && next < n && pending.len() < options.window {
                Some(due(next))
            } else {
                None
            };
            let message = tokio::select! {
                m = conn.next() => m,
                _ = async {
                    match wake {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                } => continue,
            };
            let message = match message {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => {
                    stats.reconnects += 1;
                    continue 'connections;
                }
            };
            let mut pop = |k: usize| -> anyhow::Result<Vec<usize>> {
                if k > pending.len() {
                    bail!(
                        "the server answered {k} frames, {} were pending",
                        pending.len()
                    );
                }
                Ok(pending.drain(..k).collect())
            };
            match message {
                ServerMessage::Ack { frames: k, .. } => {
                    let now = Instant::now();
                    let wall = std::time::SystemTime::now();
                    for i in pop(k)? {
                        if !done[i] {
                            done[i] = true;
                            remaining -= 1;
                            stats.acked += 1;
                            stats.acked_at.push((frames[i].seq, wall));
                            if let Some(t) = sent_at[i] {
                                stats
                                    .latencies_us
                                    .push(now.duration_since(t).as_micros() as u64);
                            }
                        }
                    }
                    count(&progress, k as u64, 0);
                }
                ServerMessage::Duplicate { frames: k, .. } => {
                    for i in pop(k)? {
                        if !done[i] {
                            done[i] = true;
                            remaining -= 1;
                            stats.duplicates += 1;
                        }
                    }
                    count(&progress, k as u64, 0);
                }
                ServerMessage::Reject {
                    seq,
                    code,
                    message,
                    field,
                    retryable,
                    retry_after_ms,
                    quota,
                } => {
                    let i = pop(1)?[0];
                    if retryable {
                        resend_from = Some(resend_from.map_or(i, |r| r.min(i)));
                        backoff = Duration::from_millis(retry_after_ms.unwrap_or(1000));
                    } else if !done[i] {
                        done[i] = true;
                        remaining -= 1;
                        stats.rejected.push((
                            seq.unwrap_or(frames[i].seq),
                            Rejection {
                                code,
                                message,
                                field,
                                retry_after_ms,
                                quota,
                            },
                        ));
                        count(&progress, 0, 1);
                    }
                }
                ServerMessage::Error { code, message } => {
                    bail!("the stream failed: {code}: {message}")
                }
                ServerMessage::Opened { .. } => bail!("unexpected second opened message"),
            }
            if let Some(from) = resend_from {
                if pending.is_empty() {
                    tokio::time::sleep(backoff).await;
                    next = from;
                    resend_from = None;
                }
            }
        }
    }
    Ok(stats)
}
