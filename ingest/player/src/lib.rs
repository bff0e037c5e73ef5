//! The player: a command-line EEG device for demos, load and reliability tests. It
//! reads a recording (EDF, EDF+, BDF) into frames and streams them to ingest as one
//! or many simulated devices, over HTTP ([`http`]) or WebSocket ([`stream`]), in real
//! time or as fast as possible ([`play`]).
//!
//! The clients here follow the ingest protocol's rules for resending: over WebSocket,
//! after a reconnect, everything above the session's `last_seq` that was not
//! acknowledged is sent again; after a retryable refusal, sending resumes from the
//! refused frame. Tests use these clients as real devices.

pub mod http;
pub mod play;
pub mod recording;
pub mod stream;

pub use play::{play, PlayOptions, PlayReport, Transport};
pub use recording::{load, Recording};
