//! `GET /v1/stream`: the WebSocket session protocol of
//! [`clisonix_ingest_protocol::ws`]. A reader task takes messages off the socket
//! into a small bounded queue; the publishing loop drains whatever is queued into one
//! group, publishes it, and answers every frame. When the queue is full the reader
//! stops reading, so TCP slows the device down (flow control) instead of ingest
//! buffering without bound; when the broker is unavailable the loop also pauses before
//! reading on.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use clisonix_ingest_protocol::answer::{FrameResult, FrameStatus};
use clisonix_ingest_protocol::ws::{ClientMessage, ServerMessage};
use clisonix_ingest_protocol::{Reason, Rejection};
use clisonix_schemas::{SessionId, TenantId, Timestamp};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::http::{AppState, DeviceKey};
use crate::ingest::{
    prepare, prepare_binary_body, prepare_inline, rejected, run_prepare, Numbering, Prepared,
};
use crate::metrics::Transport;

/// Messages read ahead of the publishing loop.
const READ_AHEAD: usize = 16;
/// Frames published as one group at most.
const MAX_GROUP: usize = 1024;
/// How long a client has to send `open`.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Close codes (RFC 6455).
const POLICY: u16 = 1008;
const GOING_AWAY: u16 = 1001;

pub async fn stream(
    State(state): State<AppState>,
    key: DeviceKey,
    upgrade: WebSocketUpgrade,
) -> Response {
    let tenant = key.tenant();
    let shutdown = state.shutdown.clone();
    let streams = state.streams.clone();
    upgrade
        .max_message_size(state.config.max_message_bytes)
        .on_upgrade(move |socket| {
            streams.track_future(async move {
                state.ingest.metrics.ws_connections.inc();
                serve(socket, state.clone(), tenant, shutdown).await;
                state.ingest.metrics.ws_connections.dec();
            })
        })
}

fn text(m: &ServerMessage) -> Message {
    Message::Text(Utf8Bytes::from(
        serde_json::to_string(m).expect("messages serialise"),
    ))
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason.to_owned()),
    }))
}

async fn serve(socket: WebSocket, state: AppState, tenant: TenantId, shutdown: CancellationToken) {
    let (mut tx, mut rx) = socket.split();
    let session = match open(&mut rx, &state, tenant).await {
        Ok((session, last_seq)) => {
            let opened = ServerMessage::Opened {
                session_id: session.to_string(),
                last_seq,
            };
            if tx.send(text(&opened)).await.is_err() {
                return;
            }
            session
        }
        Err((code, message)) => {
            let _ = tx
                .send(text(&ServerMessage::Error {
                    code: code.into(),
                    message,
                }))
                .await;
            let _ = tx.send(close(POLICY, code)).await;
            return;
        }
    };
    tracing::debug!(%session, %tenant, "stream opened");
    let (queue, mut queued) = mpsc::channel::<Message>(READ_AHEAD);
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = rx.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
            let data = matches!(message, Message::Binary(_) | Message::Text(_));
            if data && queue.send(message).await.is_err() {
                break;
            }
        }
    });
    let ingest = state.ingest.clone();
    let mut next_index = 0usize;
    // After a retryable refusal of frame `h`, later frames are held back (refused,
    // retryable) until the client's resend reaches `h` again: otherwise a later frame
    // could be published first, and the resent one would then look like a duplicate.
    let mut hold: Option<u64> = None;
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = tx.send(close(GOING_AWAY, "ingest is stopping")).await;
                break;
            }
            m = queued.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let mut messages = vec![first];
        while let Ok(m) = queued.try_recv() {
            messages.push(m);
            if messages.len() >= READ_AHEAD {
                break;
            }
        }
        let (mut binary, mut json) = (0, 0);
        for m in &messages {
            match m {
                Message::Binary(b) => binary += b.len(),
                Message::Text(t) => json += t.len(),
                _ => {}
            }
        }
        let (bytes, inline) = (binary + json, prepare_inline(binary, json));
        ingest
            .metrics
            .bytes_in
            .with_label_values(&[Transport::WebSocket.as_str()])
            .inc_by(bytes as u64);
        let base = next_index;
        let limits = ingest.limits.clone();
        let now = Timestamp::now();
        let (ready, mut results, count) = run_prepare(inline, move || {
            prepare_messages(messages, base, session, tenant, now, &limits)
        })
        .await
        .expect("preparing frames does not panic");
        next_index += count;
        ingest.count_rejections(&results);
        // Whether a frame failed now (the broker or database away, ingest overloaded),
        // as opposed to frames held back behind an earlier failure: only the former
        // pauses reading.
        let mut failed = results
            .iter()
            .any(|r| r.error.as_ref().is_some_and(Rejection::retryable));
        for chunk in chunks(ready, MAX_GROUP) {
            let (chunk, held) = hold_back(&mut hold, chunk, ingest.retry_after);
            ingest.count_rejections(&held);
            results.extend(held);
            let published = ingest
                .publish_session(tenant, Transport::WebSocket, chunk, Numbering::Device)
                .await;
            if let Some(first_failed) = published
                .iter()
                .filter(|r| r.error.as_ref().is_some_and(Rejection::retryable))
                .filter_map(|r| r.seq)
                .min()
            {
                hold = Some(first_failed);
                failed = true;
            }
            results.extend(published);
        }
        results.sort_by_key(|r| r.index);
        for m in answers(&results) {
            if tx.send(text(&m)).await.is_err() {
                reader.abort();
                return;
            }
        }
        if failed {
            // The broker or database is unavailable: stop reading for a while, so the
            // device holds its frames instead of ingest. Frames only held back (sent
            // before the device heard of the failure) are refused without a pause:
            // pausing for each group of them kept a device's backlog waiting for
            // about a minute after the broker was back.
            tokio::time::sleep(ingest.retry_after).await;
        }
    }
    reader.abort();
}

/// Waits for `open`; answers the session's last published sequence number.
async fn open(
    rx: &mut futures::stream::SplitStream<WebSocket>,
    state: &AppState,
    tenant: TenantId,
) -> Result<(SessionId, Option<u64>), (&'static str, String)> {
    let first = tokio::time::timeout(OPEN_TIMEOUT, rx.next())
        .await
        .map_err(|_| {
            (
                "open_expected",
                "send {\"type\":\"open\",\"session_id\":...} first".to_owned(),
            )
        })?;
    let Some(Ok(Message::Text(t))) = first else {
        return Err((
            "open_expected",
            "the first message must be a text open message".into(),
        ));
    };
    let session = match serde_json::from_str::<ClientMessage>(t.as_str()) {
        Ok(ClientMessage::Open { session_id }) => {
            SessionId::parse(&session_id).map_err(|e| ("invalid_field", e.to_string()))?
        }
        Ok(_) => return Err(("open_expected", "the first message must be open".into())),
        Err(e) => return Err(("invalid_field", e.to_string())),
    };
    // The stream's frames go to this instance: claim the session now, so the resume
    // point is the one this instance serves from.
    match state.ingest.sessions.open(tenant, session).await {
        Err(e) => {
            let r = state.ingest.claim_refusal(e);
            let code = r.reason().map_or(Reason::Unavailable.code(), Reason::code);
            Err((code, r.message))
        }
        Ok(row) => Ok((session, row.and_then(|r| u64::try_from(r.last_seq).ok()))),
    }
}

/// Applies the hold (see `serve`): frames above the held sequence number are refused
/// until one at or below it arrives.
fn hold_back(
    hold: &mut Option<u64>,
    frames: Vec<Prepared>,
    retry_after: std::time::Duration,
) -> (Vec<Prepared>, Vec<FrameResult>) {
    let mut go = Vec::with_capacity(frames.len());
    let mut held = Vec::new();
    for p in frames {
        match *hold {
            Some(h) if p.head.seq > h => held.push(rejected(
                p.index,
                Some(p.head.session_id),
                Some(p.head.seq),
                Rejection::new(
                    Reason::BrokerUnavailable,
                    format!("frame {h} was not published; resend from it first"),
                )
                .retry_after_ms(retry_after.as_millis() as u64),
            )),
            Some(_) => {
                *hold = None;
                go.push(p);
            }
            None => go.push(p),
        }
    }
    (go, held)
}

fn chunks(mut v: Vec<Prepared>, size: usize) -> Vec<Vec<Prepared>> {
    let mut out = Vec::new();
    while v.len() > size {
        let rest = v.split_off(size);
        out.push(v);
        v = rest;
    }
    if !v.is_empty() {
        out.push(v);
    }
    out
}

/// Frames of the queued messages, numbered from `base` in arrival order: the ready
/// ones, the refused ones, and how many frames there were.
fn prepare_messages(
    messages: Vec<Message>,
    base: usize,
    session: SessionId,
    tenant: TenantId,
    now: Timestamp,
    limits: &clisonix_ingest_protocol::Limits,
) -> (Vec<Prepared>, Vec<FrameResult>, usize) {
    let mut out: Vec<Result<Prepared, Box<FrameResult>>> = Vec::new();
    let refuse = |i: usize, r: Rejection| Err(Box::new(rejected(i, None, None, r)));
    for m in messages {
        match m {
            Message::Binary(bytes) => {
                match prepare_binary_body(bytes, base + out.len(), tenant, limits, now) {
                    Ok(frames) => out.extend(frames),
                    Err(r) => out.push(refuse(base + out.len(), r)),
                }
            }
            Message::Text(t) => match serde_json::from_str::<ClientMessage>(t.as_str()) {
                Ok(ClientMessage::Frames { frames: list }) => {
                    for f in list {
                        let i = base + out.len();
                        out.push(prepare(i, f.into_frame(tenant, now), limits, now));
                    }
                }
                Ok(ClientMessage::Open { .. }) => out.push(refuse(
                    base + out.len(),
                    Rejection::new(Reason::MalformedFrame, "the stream is already open"),
                )),
                Err(e) => out.push(refuse(
                    base + out.len(),
                    Rejection::new(Reason::MalformedFrame, e.to_string()),
                )),
            },
            _ => {}
        }
    }
    let count = out.len();
    let mut ready = Vec::with_capacity(count);
    let mut refused = Vec::new();
    for p in out {
        match p {
            Ok(p) if p.head.session_id != session => refused.push(rejected(
                p.index,
                Some(p.head.session_id),
                Some(p.head.seq),
                Rejection::new(
                    Reason::WrongSession,
                    format!("this stream is open for session {session}"),
                )
                .field("session_id"),
            )),
            Ok(p) => ready.push(p),
            Err(r) => refused.push(*r),
        }
    }
    (ready, refused, count)
}

/// The messages that answer `results` (sorted by index): runs of acks and duplicates,
/// one reject per refused frame.
pub fn answers(results: &[FrameResult]) -> Vec<ServerMessage> {
    let mut out: Vec<ServerMessage> = Vec::new();
    for r in results {
        let seq = r.seq.unwrap_or_default();
        match (r.status, out.last_mut()) {
            (
                FrameStatus::Accepted,
                Some(ServerMessage::Ack {
                    last_seq, frames, ..
                }),
            )
            | (
                FrameStatus::Duplicate,
                Some(ServerMessage::Duplicate {
                    last_seq, frames, ..
                }),
            ) => {
                *last_seq = seq;
                *frames += 1;
            }
            (FrameStatus::Accepted, _) => out.push(ServerMessage::Ack {
                first_seq: seq,
                last_seq: seq,
                frames: 1,
            }),
            (FrameStatus::Duplicate, _) => out.push(ServerMessage::Duplicate {
                first_seq: seq,
                last_seq: seq,
                frames: 1,
            }),
            (FrameStatus::Rejected, _) => {
                let e = r
                    .error
                    .clone()
                    .unwrap_or_else(|| Rejection::new(Reason::MalformedFrame, "refused"));
                out.push(ServerMessage::Reject {
                    seq: r.seq,
                    retryable: e.retryable(),
                    code: e.code,
                    message: e.message,
                    field: e.field,
                    retry_after_ms: e.retry_after_ms,
                    quota: e.quota,
                });
            }
        }
    }
    out
}
