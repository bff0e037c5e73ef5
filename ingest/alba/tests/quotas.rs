//! Plans enforced where data comes in, on the real broker and Postgres: a tenant on a
//! tiny plan uploads a recording, streams over HTTP and the WebSocket past its frame
//! quota, and opens one session too many. Exactly its quota is accepted and in
//! `eeg.frames` (one ingest instance: no overshoot); everything after is refused with
//! 402 and the quota's figures, and is not; an upload that would not fit is refused
//! before it starts; after the period resets, frames are accepted again.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clisonix_ingest_protocol::ws::ServerMessage;
use clisonix_player::http::Format;
use clisonix_player::stream::Connection;
use clisonix_schemas::SessionId;
use common::{frames, recording_path, TestIngest};

/// The recording's frames at 125 ms, plus 40 streamed.
const FRAME_QUOTA: i64 = 1904 + 40;
const PERIOD: Duration = Duration::from_secs(40);

/// Puts the test's tenant on a plan of its own: `FRAME_QUOTA` frames and one upload
/// per period (hard), one session at a time, two devices; its period starts now and
/// lasts `PERIOD`.
async fn tiny_plan(t: &TestIngest) {
    let pool = &t.db.pool;
    for sql in [
        "INSERT INTO plans (plan_id, version, name, currency, base_fee_minor, max_concurrent_sessions, \
         max_devices, requests_per_minute_member, requests_per_minute_premium, audio_presets, retention_days, public) \
         VALUES ('tiny', 1, 'Tiny', 'EUR', 0, 1, 2, 60, 60, '{}', 1, false)",
        "INSERT INTO plan_meters (plan_id, version, meter, included, price_minor, limit_kind) VALUES \
         ('tiny', 1, 'frames', 1944, 0, 'hard'), ('tiny', 1, 'recording_uploads', 1, 0, 'hard'), \
         ('tiny', 1, 'bytes', 1, 0, 'soft')",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await.unwrap();
    }
    sqlx::query("UPDATE billing_settings SET period_length = $1 * interval '1 second'")
        .bind(PERIOD.as_secs() as i64)
        .execute(pool)
        .await
        .unwrap();
    let tenant = t.tenant.id.as_uuid();
    sqlx::query("DELETE FROM billing_periods WHERE tenant_id = $1")
        .bind(tenant)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "WITH s AS (UPDATE subscriptions SET plan_id = 'tiny', plan_version = 1, anchor = now(), \
             period_start = now(), period_end = now() + $2 * interval '1 second' \
         WHERE tenant_id = $1 RETURNING *) \
         INSERT INTO billing_periods (tenant_id, period_start, period_end, plan_id, plan_version) \
         SELECT tenant_id, period_start, period_end, plan_id, plan_version FROM s",
    )
    .bind(tenant)
    .bind(PERIOD.as_secs() as i64)
    .execute(pool)
    .await
    .unwrap();
}

fn header<'a>(a: &'a clisonix_player::http::Answer, name: &str) -> &'a str {
    a.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_plan_takes_exactly_its_quota_and_refuses_the_rest_until_the_period_resets() {
    let t = TestIngest::spawn().await;
    tiny_plan(&t).await;
    let started = Instant::now();
    let consumer = t.frames_consumer();
    let recording = std::fs::read(recording_path()).unwrap();
    let mut client = t.client();

    // A recording: one upload, 1904 frames; its session ends with it.
    let upload = SessionId::random();
    let a = client
        .post(
            &format!("/v1/recordings?session_id={upload}"),
            "application/octet-stream",
            recording.clone(),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    // A second does not fit (one upload a period, and its frames): refused before
    // anything is published.
    let refused_upload = SessionId::random();
    let a = client
        .post(
            &format!("/v1/recordings?session_id={refused_upload}"),
            "application/octet-stream",
            recording.clone(),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 402, "{}", String::from_utf8_lossy(&a.body));
    let e = &a.json()["error"];
    assert_eq!(e["code"], "quota_exceeded");
    assert_eq!(e["meter"], "recording_uploads");
    assert_eq!(
        (e["limit"].as_i64(), e["used"].as_i64()),
        (Some(1), Some(1))
    );

    // Streaming over HTTP: 30 frames fit, with what remains in the headers.
    let a_session = SessionId::random();
    let sent = frames(a_session, 60, 4, 32);
    let a = t.post(&sent[..30], Format::Binary).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(header(&a, "ratelimit-limit"), FRAME_QUOTA.to_string());
    assert_eq!(header(&a, "ratelimit-remaining"), "10");
    let reset: u64 = header(&a, "ratelimit-reset").parse().unwrap();
    assert!((1..=PERIOD.as_secs()).contains(&reset), "{reset}");

    // A second session while the first is open: one at a time on this plan.
    let b = frames(SessionId::random(), 1, 4, 32);
    let a = t.post(&b, Format::Binary).await;
    assert_eq!(a.status, 402, "{}", String::from_utf8_lossy(&a.body));
    let e = &a.json()["error"];
    assert_eq!(e["code"], "concurrent_sessions_exceeded");
    assert_eq!(
        (e["meter"].as_str(), e["limit"].as_i64(), e["used"].as_i64()),
        (Some("concurrent_sessions"), Some(1), Some(1))
    );

    // A third device (after the upload's and the stream's): refused.
    let mut c = frames(SessionId::random(), 1, 4, 32);
    c[0].device_id = clisonix_schemas::DeviceId::parse("third-device").unwrap();
    let a = t.post(&c, Format::Binary).await;
    assert_eq!(a.status, 402, "{}", String::from_utf8_lossy(&a.body));
    let e = &a.json()["error"];
    assert_eq!(e["code"], "devices_exceeded");
    assert_eq!(
        (e["meter"].as_str(), e["limit"].as_i64(), e["used"].as_i64()),
        (Some("devices"), Some(2), Some(2))
    );

    // Past the quota: the first 10 of 20 are accepted, the rest refused (207).
    let a = t.post(&sent[30..50], Format::Binary).await;
    assert_eq!(a.status, 207, "{}", String::from_utf8_lossy(&a.body));
    let batch = a.batch().unwrap();
    assert_eq!((batch.accepted, batch.rejected), (10, 10));
    for r in batch.results.iter().filter(|r| r.error.is_some()) {
        let e = r.error.as_ref().unwrap();
        assert_eq!(e.code, "quota_exceeded");
        assert!(r.seq.unwrap() >= 40, "the refused are the last ones");
    }
    // Then everything is refused: 402 with the quota's figures and when it resets.
    let a = t.post(&sent[50..55], Format::Json).await;
    assert_eq!(a.status, 402, "{}", String::from_utf8_lossy(&a.body));
    let e = &a.json()["error"];
    assert_eq!(e["code"], "quota_exceeded");
    assert_eq!(e["meter"], "frames");
    assert_eq!(
        (e["limit"].as_i64(), e["used"].as_i64()),
        (Some(FRAME_QUOTA), Some(FRAME_QUOTA))
    );
    let resets_at = chrono::DateTime::parse_from_rfc3339(e["resets_at"].as_str().unwrap()).unwrap();
    assert!(resets_at > chrono::Utc::now());
    assert_eq!(header(&a, "ratelimit-remaining"), "0");
    assert!(header(&a, "retry-after").parse::<u64>().unwrap() >= 1);

    // The WebSocket refuses the same way, not retryable before the reset.
    let (mut ws, last) = Connection::open(&t.url, &t.tenant.key, a_session)
        .await
        .unwrap();
    assert_eq!(last, Some(39));
    ws.send_frames(&sent[55..58], Format::Binary).await.unwrap();
    for _ in 0..3 {
        match ws.next().await.unwrap().unwrap() {
            ServerMessage::Reject {
                code,
                retryable,
                retry_after_ms,
                quota,
                ..
            } => {
                assert_eq!(code, "quota_exceeded");
                assert!(!retryable);
                assert!(retry_after_ms.unwrap() >= 1000);
                let q = quota.unwrap();
                assert_eq!((q.meter.as_str(), q.limit), ("frames", FRAME_QUOTA));
                assert!(q.resets_at.is_some());
            }
            other => panic!("{other:?}"),
        }
    }
    ws.close().await;

    // eeg.frames holds exactly the quota: the upload and the 40 streamed frames.
    let got = t.read_frames(&consumer, FRAME_QUOTA as usize).await;
    let mut per_session: BTreeMap<SessionId, Vec<u64>> = BTreeMap::new();
    for (_, f) in &got {
        per_session.entry(f.session_id).or_default().push(f.seq);
    }
    assert_eq!(per_session.len(), 2, "nothing of the refused sessions");
    assert_eq!(per_session[&upload].len(), 1904);
    assert_eq!(per_session[&a_session], (0..40).collect::<Vec<_>>());

    // After the period resets, frames are accepted again; the next record in the
    // topic is that frame (nothing refused slipped in before it).
    let deadline = started + PERIOD + Duration::from_secs(30);
    loop {
        let a = t.post(&sent[58..59], Format::Binary).await;
        if a.status == 200 {
            break;
        }
        assert_eq!(a.status, 402, "{}", String::from_utf8_lossy(&a.body));
        assert!(Instant::now() < deadline, "the period never reset");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        started.elapsed() >= PERIOD - Duration::from_secs(1),
        "not before the reset"
    );
    let next = t.read_frames(&consumer, 1).await;
    assert_eq!((next[0].1.session_id, next[0].1.seq), (a_session, 58));
    t.stop().await;
}
