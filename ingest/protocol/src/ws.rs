//! The WebSocket stream (`GET /v1/stream`), for devices that stream continuously.
//!
//! 1. The client sends `{"type": "open", "session_id": "<uuid>"}` as its first message.
//!    The server answers `{"type": "opened", "session_id", "last_seq"}`: the highest
//!    sequence number already published for the session (`null` for a new session).
//!    After a reconnect the client resends what it sent above `last_seq` and has not
//!    seen acknowledged.
//! 2. The client sends frames of that session: binary messages in the binary body form
//!    (`crate::binary`), or text messages `{"type": "frames", "frames": [...]}` of JSON
//!    frames. It may send ahead without waiting for acknowledgements.
//! 3. Every frame gets exactly one answer, in the order sent: `ack` (published and
//!    confirmed by the broker), `duplicate` (already published earlier, not published
//!    again) — both for a run of consecutive frames `first_seq ..= last_seq` — or
//!    `reject` for one frame, with a reason. A `reject` with `retryable: true` (broker
//!    unavailable, overloaded) means "send it again after `retry_after_ms`". A
//!    `quota_exceeded` reject is not retryable: it names the used-up quota (`meter`,
//!    `limit`, `used`, `resets_at`), and `retry_after_ms` says when the period resets,
//!    before which every frame of the tenant is refused the same way.
//! 4. Flow control: the server reads the next message only when it has room, so a
//!    client that outruns the broker is slowed down by TCP itself; no frame is dropped.
//!
//! A connection-level problem (no `open`, a session of another tenant) is an `error`
//! message followed by a close frame.

use serde::{Deserialize, Serialize};

use crate::json::JsonFrame;
use crate::validate::QuotaDetail;

/// What a client sends as text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Open { session_id: String },
    Frames { frames: Vec<JsonFrame> },
}

/// What the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Opened {
        session_id: String,
        last_seq: Option<u64>,
    },
    /// Frames `first_seq ..= last_seq` (as sent, `frames` of them) were published.
    Ack {
        first_seq: u64,
        last_seq: u64,
        frames: usize,
    },
    /// Frames `first_seq ..= last_seq` were already published; not published again.
    Duplicate {
        first_seq: u64,
        last_seq: u64,
        frames: usize,
    },
    /// One frame refused.
    Reject {
        /// Absent when the frame could not be read far enough to know it.
        seq: Option<u64>,
        code: String,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        field: Option<String>,
        retryable: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        /// The quota behind a `quota_exceeded` (or `concurrent_sessions_exceeded`)
        /// refusal: `meter`, `limit`, `used`, `resets_at`.
        #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
        quota: Option<Box<QuotaDetail>>,
    },
    /// The connection cannot go on; a close follows.
    Error { code: String, message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_their_documented_shape() {
        let m: ClientMessage =
            serde_json::from_str(r#"{"type":"open","session_id":"abc"}"#).unwrap();
        assert_eq!(
            m,
            ClientMessage::Open {
                session_id: "abc".into()
            }
        );
        let ack = ServerMessage::Ack {
            first_seq: 3,
            last_seq: 9,
            frames: 7,
        };
        assert_eq!(
            serde_json::to_string(&ack).unwrap(),
            r#"{"type":"ack","first_seq":3,"last_seq":9,"frames":7}"#
        );
        let opened = ServerMessage::Opened {
            session_id: "s".into(),
            last_seq: None,
        };
        assert_eq!(
            serde_json::to_string(&opened).unwrap(),
            r#"{"type":"opened","session_id":"s","last_seq":null}"#
        );
    }
}
