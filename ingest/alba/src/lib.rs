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
/// declares it, and calls [`tune_allocator`] first in `main`:
/// `#[global_allocator] static ALLOCATOR: clisonix_alba::Allocator = clisonix_alba::ALLOCATOR;`
pub type Allocator = mimalloc::MiMalloc;

/// The value of [`Allocator`] for a `#[global_allocator]` static.
pub const ALLOCATOR: Allocator = mimalloc::MiMalloc;

/// How long memory the allocator no longer uses stays with the process before it is
/// given back to the system (mimalloc's default: one second). Every binary request
/// takes a fresh body of about half a megabyte, often in memory just given back and
/// faulted in again. Under the throughput benchmark, alternating, ten seconds took the
/// benchmark's process a fifth fewer page faults and ingest with its clients about 15%
/// less CPU per frame (README, "Benchmarks"). What is held this way is bounded by the
/// in-flight budget and the body limit, and goes back after ten quiet seconds.
pub const ALLOCATOR_PURGE_DELAY: std::time::Duration = std::time::Duration::from_secs(10);

/// `mi_option_purge_delay` in mimalloc's `mi_option_t` (mimalloc.h, v3, as built by
/// the locked `libmimalloc-sys`); a unit test checks it is the purge delay.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

#[allow(unsafe_code)]
mod mi {
    unsafe extern "C" {
        #[cfg(test)]
        pub fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
        pub fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    }
}

/// Sets [`ALLOCATOR_PURGE_DELAY`]. A binary that hosts ingest calls it first in
/// `main`, before it starts any thread: mimalloc keeps an option in a plain `long`
/// that its threads read without synchronisation.
#[allow(unsafe_code)]
pub fn tune_allocator() {
    // SAFETY: `mi_option_set` takes an option index and a value and writes the value
    // into mimalloc's static option table (the index is checked by the test below).
    // Called before other threads start, no allocation reads it concurrently.
    unsafe {
        mi::mi_option_set(
            MI_OPTION_PURGE_DELAY,
            ALLOCATOR_PURGE_DELAY.as_millis() as std::ffi::c_long,
        )
    }
}

/// The allocator's purge delay now, in milliseconds.
#[cfg(test)]
#[allow(unsafe_code)]
fn allocator_purge_delay_ms() -> i64 {
    // SAFETY: as in `tune_allocator`.
    unsafe { mi::mi_option_get(MI_OPTION_PURGE_DELAY) as i64 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_option_tuned_is_the_allocators_purge_delay() {
        // mimalloc v3's default purge delay is 1000 ms and no other option's default
        // is; a wrong option index reads something else. (`MIMALLOC_PURGE_DELAY` in the
        // environment would change the default.)
        assert_eq!(super::allocator_purge_delay_ms(), 1000);
        super::tune_allocator();
        assert_eq!(super::allocator_purge_delay_ms(), 10_000);
    }
}
