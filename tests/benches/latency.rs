//! End-to-end latency of the whole pipeline: from the ingest acknowledgement of the last
//! frame of a 2 s window to that window's features being readable through the API
//! (all 32 channels stored: polled in Postgres every 20 ms, so readings are up to 20 ms
//! late) and pushed on the live WebSocket, with 10 and 100 devices streaming the
//! reference recording in real time. Gateway, ingest, Albi, Jona (`parameter_mapping`),
//! sessions and the sink run in this process on the local stack, all on the same cores,
//! with the player's devices.
//!
//! Run: `eval "$(./dev env)"; cargo bench -p clisonix-e2e --bench latency`
//! (`CLISONIX_LATENCY_SECONDS` sets the seconds streamed per device, default 40;
//! `CLISONIX_LATENCY_DEVICES` the device counts, default `10,100`.)

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use clisonix_player::http::Format;
use clisonix_player::play::{play, PlayOptions, Transport};
use clisonix_player::recording::load;
use clisonix_schemas::SessionId;
use common::{recording_path, Pipeline};
use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// 2 s windows of 1/8 s frames.
const FRAMES_PER_WINDOW: u64 = 16;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Window arrival times on one session's live stream, until it ends; connects once
/// the session's first state is stored (the route answers 404 before).
async fn watch(pool: sqlx::PgPool, session: uuid::Uuid, url: String) -> BTreeMap<u64, SystemTime> {
    let mut seen = BTreeMap::new();
    loop {
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM sessions WHERE session_id = $1")
                .bind(session)
                .fetch_optional(&pool)
                .await
                .unwrap_or(None);
        if exists.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("the live stream opens");
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
            match v["type"].as_str() {
                Some("features") => {
                    seen.insert(v["window_index"].as_u64().unwrap_or(0), SystemTime::now());
                }
                Some("end") => break,
                _ => {}
            }
        }
    }
    seen
}

/// Polls Postgres for windows with all their channels stored; first time seen.
async fn poll_readable(
    pool: sqlx::PgPool,
    sessions: Vec<uuid::Uuid>,
    stop: tokio_util::sync::CancellationToken,
) -> BTreeMap<(uuid::Uuid, u64), SystemTime> {
    let mut seen: BTreeMap<(uuid::Uuid, u64), SystemTime> = BTreeMap::new();
    let mut floor: i64 = 0;
    while !stop.is_cancelled() {
        let rows: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
            "SELECT session_id, window_index FROM features WHERE session_id = ANY($1) \
             AND window_index >= $2 GROUP BY 1, 2 HAVING count(*) = 32",
        )
        .bind(&sessions)
        .bind(floor)
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        let now = SystemTime::now();
        for (s, w) in rows {
            seen.entry((s, w as u64)).or_insert(now);
        }
        // Every session has its windows below this one: no need to look again.
        let per_session = |s: &uuid::Uuid| {
            (0..)
                .take_while(|w| seen.contains_key(&(*s, *w as u64)))
                .count() as i64
        };
        floor = sessions.iter().map(per_session).min().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

fn ms(later: SystemTime, earlier: SystemTime) -> f64 {
    later
        .duration_since(earlier)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or_else(|e| -e.duration().as_secs_f64() * 1e3)
}

async fn measure(p: &Pipeline, devices: usize, seconds: f64) {
    let mut recording = load(&recording_path(), 125).unwrap();
    recording.frames.truncate((seconds * 8.0) as usize);
    let sessions: Vec<SessionId> = (0..devices).map(|_| SessionId::random()).collect();
    let ws_base = p.gateway.replace("http", "ws");
    let watchers: Vec<_> = sessions
        .iter()
        .map(|s| {
            tokio::spawn(watch(
                p.db.pool.clone(),
                s.as_uuid(),
                format!(
                    "{ws_base}/v1/sessions/{s}/live?audio=false&access_token={}",
                    p.tenant.read_key
                ),
            ))
        })
        .collect();
    let stop = tokio_util::sync::CancellationToken::new();
    let poller = tokio::spawn(poll_readable(
        p.db.pool.clone(),
        sessions.iter().map(|s| s.as_uuid()).collect(),
        stop.clone(),
    ));
    let report = play(
        &recording,
        &PlayOptions {
            url: p.ingest.clone(),
            key: p.tenant.ingest_key.clone(),
            transport: Transport::WebSocket,
            format: Format::Binary,
            devices,
            speed: 1.0,
            session_ids: sessions.clone(),
            device_prefix: format!("lat{devices}"),
            ..PlayOptions::default()
        },
    )
    .await
    .unwrap();
    let mut pushed = Vec::new();
    for w in watchers {
        pushed.push(
            tokio::time::timeout(Duration::from_secs(120), w)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    stop.cancel();
    let readable = poller.await.unwrap();
    let (mut api, mut live) = (Vec::new(), Vec::new());
    for (d, session) in sessions.iter().enumerate() {
        let acked: BTreeMap<u64, SystemTime> = report.acked_at[d].iter().copied().collect();
        let windows = recording.frames.len() as u64 / FRAMES_PER_WINDOW;
        for w in 0..windows {
            let Some(&ack) = acked.get(&(w * FRAMES_PER_WINDOW + FRAMES_PER_WINDOW - 1)) else {
                continue;
            };
            if let Some(&t) = readable.get(&(session.as_uuid(), w)) {
                api.push(ms(t, ack));
            }
            if let Some(&t) = pushed[d].get(&w) {
                live.push(ms(t, ack));
            }
        }
    }
    api.sort_by(f64::total_cmp);
    live.sort_by(f64::total_cmp);
    println!(
        "{devices:>4} devices, {seconds:.0} s each: acks p50 {:.1} ms p99 {:.1} ms; \
         readable through the API p50 {:.0} ms p99 {:.0} ms ({} windows); \
         pushed live p50 {:.0} ms p99 {:.0} ms ({} windows)",
        report.percentile_ms(0.5).unwrap_or(f64::NAN),
        report.percentile_ms(0.99).unwrap_or(f64::NAN),
        percentile(&api, 0.5),
        percentile(&api, 0.99),
        api.len(),
        percentile(&live, 0.5),
        percentile(&live, 0.99),
        live.len(),
    );
}

fn main() {
    let seconds: f64 = std::env::var("CLISONIX_LATENCY_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40.0);
    let counts: Vec<usize> = std::env::var("CLISONIX_LATENCY_DEVICES")
        .unwrap_or_else(|_| "10,100".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let p = Pipeline::start().await;
        println!("pipeline latency: last frame of a window acknowledged -> its features readable / pushed");
        for devices in counts {
            measure(&p, devices, seconds).await;
        }
        p.stop().await;
    });
}
