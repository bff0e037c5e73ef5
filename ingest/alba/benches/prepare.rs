//! Ingest's own work on a body, without HTTP or the broker: `prepare_body` (split,
//! parse, check, stamp or encode) on 128-frame bodies of 32-channel 256 Hz frames of
//! 1/8 s, binary and JSON, on one thread. Prints microseconds per frame.
//!
//!     cargo bench -p clisonix-alba --bench prepare

#[global_allocator]
static ALLOCATOR: clisonix_alba::Allocator = clisonix_alba::ALLOCATOR;

use std::time::{Duration, Instant};

use axum::body::Bytes;
use clisonix_alba::http::{prepare_body, BodyKind};
use clisonix_ingest_protocol::Limits;
use clisonix_player::http::Format;
use clisonix_schemas::{examples, TenantId, Timestamp};

const FRAMES: u64 = 128;

fn per_frame(kind: BodyKind, body: &[u8], bodies: usize) -> f64 {
    let limits = Limits::default();
    let tenant = TenantId::new(uuid::Uuid::new_v4());
    let mut spent = Duration::ZERO;
    for _ in 0..bodies {
        // A body of its own (binary bodies are stamped where they lie), copied off the
        // clock just before, as ingest's body is just read: in cache, as in ingest.
        let input = Bytes::from(body.to_vec());
        let started = Instant::now();
        let (ready, refused) = prepare_body(kind, input, tenant, Timestamp::now(), &limits)
            .expect("the body is well formed");
        spent += started.elapsed();
        assert_eq!((ready.len(), refused.len()), (FRAMES as usize, 0));
    }
    spent.as_secs_f64() * 1e6 / (bodies as f64 * FRAMES as f64)
}

fn main() {
    clisonix_alba::tune_allocator();
    let frames: Vec<_> = (0..FRAMES).map(|i| examples::frame(i, 32, 32)).collect();
    for (name, kind, format, bodies) in [
        ("binary", BodyKind::Binary, Format::Binary, 400),
        ("JSON", BodyKind::Json, Format::Json, 40),
    ] {
        let (_, body) = format.body(&frames);
        per_frame(kind, &body, bodies / 4);
        let mut runs: Vec<f64> = (0..5).map(|_| per_frame(kind, &body, bodies)).collect();
        runs.sort_by(f64::total_cmp);
        println!(
            "prepare_body, {name:<6} {FRAMES} frames of 32 ch x 32 samples ({} KB): {:.2} us per frame (median of 5 runs; best {:.2})",
            body.len() / 1000,
            runs[2],
            runs[0]
        );
    }
}
