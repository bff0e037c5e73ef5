//! Alba, the ingest service: device clients send frames over HTTP (JSON or the
//! compact binary body), a WebSocket stream, the seed's legacy `POST /collect`, or as
//! an uploaded EDF/BDF recording; every frame is checked, owned by the tenant of the
//! caller's device key, and published to `eeg.frames`. A frame is acknowledged only
//! after the broker confirmed it (idempotent producer, `acks=all`); when the broker is
//! slow or down, clients are pushed back (429/503 with `Retry-After`, WebSocket flow
//! control), never silently dropped.
//!
//! The wire formats and rules are in `clisonix-ingest-protocol`; [`ingest`] is the
//! transport-independent core; [`sessions`] decides which instance serves a session
//! and keeps its state; [`publisher`] writes to Kafka (and [`recording`] holds each
//! upload's transactional producer).

pub mod config;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod publisher;
pub mod recording;
pub mod sessions;
pub mod startup;
pub mod usage;
pub mod ws;

pub use config::Config;
pub use startup::{router, Application};

/// The allocator ingest is built and measured with. Every request allocates and frees
/// hundreds of kilobytes across threads (bodies, records, answers). Under the
/// throughput benchmark glibc's allocator took about a quarter of the request threads'
/// CPU time; with mimalloc binary ingest went from 24,000–37,000 to 39,000–59,000
/// frames/s on the same broker (README, "Benchmarks"). A binary that hosts ingest
/// declares it:
/// `#[global_allocator] static ALLOCATOR: clisonix_alba::Allocator = clisonix_alba::ALLOCATOR;`
pub type Allocator = mimalloc::MiMalloc;

/// The value of [`Allocator`] for a `#[global_allocator]` static.
pub const ALLOCATOR: Allocator = mimalloc::MiMalloc;
