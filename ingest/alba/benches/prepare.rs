//! Ingest's own work on a body, without HTTP or the broker: `prepare_body` (split,
//! parse, check, stamp or encode) on 128-frame bodies of 32-channel 256 Hz frames of
//! 1/8 s, binary and JSON, on one thread; and the quota check a group of them goes
//! through before it is published (the plan's audio presets, each frame's amounts, the
//! reservation, the settlement). Prints microseconds (or nanoseconds) per frame.
//!
//!     cargo bench -p clisonix-alba --bench prepare

#[global_allocator]
static ALLOCATOR: clisonix_alba::Allocator = clisonix_alba::ALLOCATOR;

use std::time::{Duration, Instant};

use axum::body::Bytes;
use clisonix_alba::http::{prepare_body, BodyKind};
use clisonix_alba::ingest::{preset_refusal, Prepared};
use clisonix_ingest_protocol::Limits;
use clisonix_player::http::Format;
use clisonix_schemas::{examples, TenantId, Timestamp};
use clisonix_tenancy::quota::{Amounts, Ledger, Standing};

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

/// The quota check of `bodies` groups of `ready` frames: nanoseconds per frame.
fn quota_per_frame(ledger: &Ledger, tenant: uuid::Uuid, ready: &[Prepared], bodies: usize) -> f64 {
    let started = Instant::now();
    for _ in 0..bodies {
        let plan = ledger.audio_presets(tenant).expect("loaded");
        assert!(ready
            .iter()
            .all(|p| preset_refusal(&p.head.audio_presets, &plan).is_none()));
        let (reservation, fit, refusal) =
            ledger.reserve_prefix(tenant, ready.iter().map(Prepared::amounts));
        assert!(fit == ready.len() && refusal.is_none());
        let mut used = Amounts::default();
        for p in ready {
            used.add(&p.amounts());
        }
        ledger.settle(reservation, used);
    }
    started.elapsed().as_secs_f64() * 1e9 / (bodies as f64 * ready.len() as f64)
}

fn main() {
    clisonix_alba::tune_allocator();
    let frames: Vec<_> = (0..FRAMES).map(|i| examples::frame(i, 32, 32)).collect();
    let mut prepare_us = f64::NAN;
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
        if kind == BodyKind::Binary {
            prepare_us = runs[2];
        }
    }

    // The quota check, for a tenant whose every enforced meter has a hard limit, among
    // 10,000 tenants the instance serves.
    let ledger = Ledger::default();
    let now = chrono::Utc::now();
    let standing = || {
        Standing::new(
            now - chrono::Duration::days(1),
            now + chrono::Duration::days(29),
            [Some(i64::MAX / 4); 5],
            Amounts::default(),
            Some(10),
        )
    };
    for _ in 0..10_000 {
        ledger.set_standing(uuid::Uuid::new_v4(), standing());
    }
    let tenant = uuid::Uuid::new_v4();
    ledger.set_standing(tenant, standing());
    let (_, body) = Format::Binary.body(&frames);
    let (ready, _) = prepare_body(
        BodyKind::Binary,
        Bytes::from(body),
        TenantId::new(tenant),
        Timestamp::now(),
        &Limits::default(),
    )
    .expect("the body is well formed");
    quota_per_frame(&ledger, tenant, &ready, 2_000);
    let mut runs: Vec<f64> = (0..5)
        .map(|_| quota_per_frame(&ledger, tenant, &ready, 20_000))
        .collect();
    runs.sort_by(f64::total_cmp);
    println!(
        "quota check, {FRAMES}-frame groups: {:.1} ns per frame (median of 5 runs; best {:.1}), {:.2}% of prepare_body's binary cost",
        runs[2],
        runs[0],
        runs[2] / 10.0 / prepare_us
    );
}
