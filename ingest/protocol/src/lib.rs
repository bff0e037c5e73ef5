//! What device clients and ingest (Alba) say to each other, in one pure crate that both
//! the service and the player use:
//!
//! - [`json`]: the JSON frame (`POST /v1/frames`, WebSocket text messages) and the
//!   seed's legacy `POST /collect` body;
//! - [`binary`]: the compact body — length-prefixed Avro single-object `eeg_frame`
//!   records, the topic's own contract;
//! - [`validate`]: the rules every frame must pass, with a machine-readable reason;
//! - [`answer`]: the per-frame answer of a batch;
//! - [`ws`]: the WebSocket session protocol (open, frames, acks by sequence number).
//!
//! It knows nothing of HTTP servers, Kafka or Postgres.

pub mod answer;
pub mod binary;
pub mod json;
pub mod validate;
pub mod ws;

pub use answer::{BatchAnswer, FrameResult, FrameStatus};
pub use validate::{Limits, QuotaDetail, Reason, Rejection};
