//! The metering store on the real Postgres (`./dev test`): a batch counts once whatever
//! is re-read, resent or replayed; usage lands in its period, or is carried out of a
//! closed one; sessions' time counts by difference; features count windows and clean
//! channel time.

use clisonix_e2e::{TestDatabase, TestEnv};
use clisonix_metering::{Input, Meter, MeteringStore, Position};
use clisonix_schemas::{examples, SessionId, TenantId, Timestamp, UsageKind};
use sqlx::types::chrono::{DateTime, Utc};
use uuid::Uuid;

const MINUTE: i64 = 60_000;
const HOUR: i64 = 3_600_000;

async fn database() -> (TestDatabase, MeteringStore) {
    let db = TestEnv::get().fresh_database().await;
    sqlx::migrate!("../../gateway/migrations")
        .run(&db.pool)
        .await
        .unwrap();
    let store = MeteringStore::new(db.pool.clone());
    (db, store)
}

async fn new_tenant(db: &TestDatabase) -> TenantId {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 't')")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    TenantId::new(id)
}

fn now_ms() -> i64 {
    Timestamp::now().as_millis()
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap()
}

fn at(topic: &str, partition: i32, offset: i64) -> Position {
    Position {
        topic: topic.into(),
        partition,
        offset,
        timestamp_ms: None,
    }
}

fn event(tenant: TenantId, kind: UsageKind, quantity: i64, at_ms: i64) -> Input {
    let mut e = examples::usage_event(1);
    e.event_id = Uuid::new_v4();
    e.tenant_id = tenant;
    e.kind = kind;
    e.quantity = quantity;
    e.occurred_at = Timestamp::from_micros(at_ms * 1000);
    Input::Usage(e)
}

/// Hourly usage of a tenant's meter: (hour, period start, quantity), oldest first.
async fn hourly(
    db: &TestDatabase,
    tenant: TenantId,
    meter: Meter,
) -> Vec<(DateTime<Utc>, DateTime<Utc>, i64)> {
    sqlx::query_as(
        "SELECT hour, period_start, quantity FROM usage_hourly \
         WHERE tenant_id = $1 AND meter = $2 ORDER BY hour, period_start",
    )
    .bind(tenant.as_uuid())
    .bind(meter.as_str())
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

async fn session_usage(db: &TestDatabase, session: SessionId, meter: Meter) -> i64 {
    sqlx::query_scalar("SELECT quantity FROM usage_sessions WHERE session_id = $1 AND meter = $2")
        .bind(session.as_uuid())
        .bind(meter.as_str())
        .fetch_optional(&db.pool)
        .await
        .unwrap()
        .unwrap_or(0)
}

fn hour(ms: i64) -> DateTime<Utc> {
    time(clisonix_metering::hour_of(ms))
}

#[tokio::test]
async fn a_batch_counts_once_however_often_it_is_read_and_events_once_however_often_sent() {
    let (db, store) = database().await;
    let tenant = new_tenant(&db).await;
    let now = now_ms();
    let period: DateTime<Utc> =
        sqlx::query_scalar("SELECT period_start FROM subscriptions WHERE tenant_id = $1")
            .bind(tenant.as_uuid())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let first = event(tenant, UsageKind::FramesIngested, 40, now);
    let batch = vec![
        (at("u", 0, 0), Some(first.clone())),
        (
            at("u", 0, 1),
            Some(event(tenant, UsageKind::BytesIngested, 1_000, now)),
        ),
        (at("u", 1, 7), None),
        (
            at("u", 1, 8),
            Some(event(tenant, UsageKind::FramesIngested, 2, now)),
        ),
    ];
    let applied = store.apply(&batch, now).await.unwrap();
    assert_eq!(applied.applied, 3);
    assert_eq!(applied.usage.get(&Meter::Frames), Some(&42));
    // Read again (a crash before the consumer's commit, a rebalance, a replay).
    let again = store.apply(&batch, now).await.unwrap();
    assert_eq!((again.applied, again.already_applied), (0, 4));
    assert!(again.usage.is_empty());
    // Partly new: only the new offsets count.
    let mut more = batch.clone();
    more.push((
        at("u", 1, 9),
        Some(event(tenant, UsageKind::FramesIngested, 5, now)),
    ));
    // The first event resent by its producer at a later offset: counted once.
    more.push((at("u", 0, 2), Some(first)));
    let applied = store.apply(&more, now).await.unwrap();
    assert_eq!((applied.applied, applied.duplicate_events), (2, 1));
    assert_eq!(
        hourly(&db, tenant, Meter::Frames).await,
        vec![(hour(now), period, 47)]
    );
    assert_eq!(
        hourly(&db, tenant, Meter::Bytes).await,
        vec![(hour(now), period, 1_000)]
    );
    let offsets: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT topic, partition, next_offset FROM metering_offsets ORDER BY 1, 2")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(offsets, vec![("u".into(), 0, 3), ("u".into(), 1, 10)]);
    // Per session too (the example events carry a session).
    let session = examples::usage_event(1).session_id.unwrap();
    assert_eq!(session_usage(&db, session, Meter::Frames).await, 47);
    db.drop_now().await;
}

#[tokio::test]
async fn usage_of_a_closed_period_is_carried_into_the_open_one_and_the_closed_one_never_changes() {
    let (db, store) = database().await;
    let tenant = new_tenant(&db).await;
    let now = now_ms();
    // Two periods: one that ended two hours ago and is closed, and the current one.
    let (closed_start, open_start, open_end) = (now - 5 * HOUR, now - 2 * HOUR, now + HOUR);
    sqlx::query("DELETE FROM billing_periods WHERE tenant_id = $1")
        .bind(tenant.as_uuid())
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO billing_periods (tenant_id, period_start, period_end, plan_id, plan_version, closed_at) \
         VALUES ($1, $2, $3, 'free', 1, $3 + interval '1 hour'), ($1, $3, $4, 'free', 1, NULL)",
    )
    .bind(tenant.as_uuid())
    .bind(time(closed_start))
    .bind(time(open_start))
    .bind(time(open_end))
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE subscriptions SET anchor = $2, period_start = $2, period_end = $3 WHERE tenant_id = $1")
        .bind(tenant.as_uuid())
        .bind(time(open_start))
        .bind(time(open_end))
        .execute(&db.pool)
        .await
        .unwrap();
    let late = now - 3 * HOUR;
    let batch = vec![
        (
            at("u", 0, 0),
            Some(event(tenant, UsageKind::FramesIngested, 10, late)),
        ),
        (
            at("u", 0, 1),
            Some(event(tenant, UsageKind::FramesIngested, 3, now - MINUTE)),
        ),
    ];
    let applied = store.apply(&batch, now).await.unwrap();
    assert_eq!(applied.carried.get(&Meter::Frames), Some(&10));
    assert_eq!(
        hourly(&db, tenant, Meter::Frames).await,
        vec![(hour(now - MINUTE), time(open_start), 3)],
        "the closed period has no row; the open one counts what happened in it"
    );
    let carried: Vec<(DateTime<Utc>, DateTime<Utc>, i64)> = sqlx::query_as(
        "SELECT occurred_hour, period_start, quantity FROM usage_carried WHERE tenant_id = $1",
    )
    .bind(tenant.as_uuid())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        carried,
        vec![(hour(late), time(open_start), 10)],
        "and says when it happened"
    );
    let period_total: i64 = sqlx::query_scalar(
        "SELECT quantity FROM usage_periods WHERE tenant_id = $1 AND meter = 'frames' AND period_start = $2",
    )
    .bind(tenant.as_uuid())
    .bind(time(open_start))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(period_total, 13);
    db.drop_now().await;
}

#[tokio::test]
async fn periods_roll_when_usage_arrives_after_the_newest_one_ended() {
    let (db, store) = database().await;
    sqlx::query("UPDATE billing_settings SET period_length = '1 minute', close_after = '1 minute'")
        .execute(&db.pool)
        .await
        .unwrap();
    let tenant = new_tenant(&db).await;
    let now = now_ms();
    // The tenant's first period began ten minutes ago and nothing rolled it since.
    let anchor = now - 10 * MINUTE;
    sqlx::query(
        "UPDATE billing_periods SET period_start = $2, period_end = $3 WHERE tenant_id = $1",
    )
    .bind(tenant.as_uuid())
    .bind(time(anchor))
    .bind(time(anchor + MINUTE))
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE subscriptions SET anchor = $2, period_start = $2, period_end = $3 WHERE tenant_id = $1")
        .bind(tenant.as_uuid())
        .bind(time(anchor))
        .bind(time(anchor + MINUTE))
        .execute(&db.pool)
        .await
        .unwrap();
    let batch = vec![(
        at("u", 0, 0),
        Some(event(tenant, UsageKind::FramesIngested, 4, now)),
    )];
    store.apply(&batch, now).await.unwrap();
    let current = anchor + (now - anchor) / MINUTE * MINUTE;
    let rows = hourly(&db, tenant, Meter::Frames).await;
    assert_eq!(
        rows,
        vec![(hour(now), time(current), 4)],
        "in the period that holds it"
    );
    let (start, end): (DateTime<Utc>, DateTime<Utc>) =
        sqlx::query_as("SELECT period_start, period_end FROM subscriptions WHERE tenant_id = $1")
            .bind(tenant.as_uuid())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((start, end), (time(current), time(current + MINUTE)));
    // The periods in between exist, and those past their grace are closed.
    store.roll_periods().await.unwrap();
    let (periods, closed): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(closed_at) FROM billing_periods WHERE tenant_id = $1",
    )
    .bind(tenant.as_uuid())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(periods, 11);
    assert!((8..=9).contains(&closed), "{closed} closed");
    db.drop_now().await;
}

#[tokio::test]
async fn sessions_count_their_time_by_difference_and_features_their_windows_and_clean_time() {
    let (db, store) = database().await;
    let tenant = new_tenant(&db).await;
    let now = now_ms();
    let mut state = examples::session_state(1);
    state.tenant_id = tenant;
    state.sample_rate_hz = 128.0;
    state.channel_labels = vec!["a".into(); 32];
    state.last_frame_at = Timestamp::from_micros((now - MINUTE) * 1000);
    let mut earlier = state.clone();
    earlier.samples_per_channel = 128;
    state.samples_per_channel = 1_280;
    let mut clean = examples::features(1);
    clean.tenant_id = tenant;
    clean.session_id = state.session_id;
    clean.window_index = 0;
    clean.window_start_sample = 0;
    clean.window_samples = 256;
    clean.sample_rate_hz = 128.0;
    clean.quality.flat = false;
    clean.quality.clipped_fraction = 0.0;
    clean.quality.line_noise_50hz = Some(1.0);
    clean.quality.line_noise_60hz = Some(1.0);
    let mut noisy = clean.clone();
    noisy.channel_index += 1;
    noisy.quality.line_noise_50hz = Some(800.0);
    let batch = vec![
        (at("s", 0, 0), Some(Input::Session(earlier.clone()))),
        (at("s", 0, 1), Some(Input::Session(state.clone()))),
        (
            Position {
                timestamp_ms: Some(now),
                ..at("f", 0, 0)
            },
            Some(Input::Features(Box::new(clean))),
        ),
        (
            Position {
                timestamp_ms: Some(now),
                ..at("f", 0, 1)
            },
            Some(Input::Features(Box::new(noisy))),
        ),
    ];
    store.apply(&batch, now).await.unwrap();
    assert_eq!(
        session_usage(&db, state.session_id, Meter::DeviceMs).await,
        10_000
    );
    assert_eq!(
        session_usage(&db, state.session_id, Meter::ChannelMs).await,
        320_000
    );
    assert_eq!(
        session_usage(&db, state.session_id, Meter::FeatureWindows).await,
        2
    );
    assert_eq!(
        session_usage(&db, state.session_id, Meter::CleanChannelMs).await,
        2_000
    );
    // An older state read again at a new offset (a compacted topic replayed) adds
    // nothing; a newer one adds its difference.
    state.samples_per_channel = 1_408;
    let batch = vec![
        (at("s", 0, 2), Some(Input::Session(earlier))),
        (at("s", 0, 3), Some(Input::Session(state.clone()))),
    ];
    store.apply(&batch, now).await.unwrap();
    assert_eq!(
        session_usage(&db, state.session_id, Meter::DeviceMs).await,
        11_000
    );
    let total: i64 = hourly(&db, tenant, Meter::DeviceMs)
        .await
        .iter()
        .map(|r| r.2)
        .sum();
    assert_eq!(total, 11_000);
    db.drop_now().await;
}

#[tokio::test]
async fn usage_of_a_tenant_without_a_subscription_is_kept_apart() {
    let (db, store) = database().await;
    let stranger = TenantId::random();
    let now = now_ms();
    let batch = vec![(
        at("u", 0, 0),
        Some(event(stranger, UsageKind::FramesIngested, 9, now)),
    )];
    store.apply(&batch, now).await.unwrap();
    assert_eq!(
        hourly(&db, stranger, Meter::Frames).await,
        vec![(hour(now), DateTime::<Utc>::UNIX_EPOCH, 9)]
    );
    db.drop_now().await;
}

#[tokio::test]
async fn crossing_80_and_100_percent_of_an_included_quantity_raises_one_alert_each() {
    let (db, store) = database().await;
    let tenant = new_tenant(&db).await;
    let now = now_ms();
    // The free plan includes 288,000 frames a period.
    let batch = |offset: i64, frames: i64| {
        vec![(
            at("u", 0, offset),
            Some(event(tenant, UsageKind::FramesIngested, frames, now)),
        )]
    };
    let a = store.apply(&batch(0, 230_399), now).await.unwrap();
    assert!(a.alerts.is_empty(), "{:?}", a.alerts);
    let a = store.apply(&batch(1, 1), now).await.unwrap();
    assert_eq!(a.alerts, vec![(Meter::Frames, 80)]);
    let a = store.apply(&batch(2, 10), now).await.unwrap();
    assert!(a.alerts.is_empty(), "once per threshold and period");
    let a = store.apply(&batch(3, 100_000), now).await.unwrap();
    assert_eq!(a.alerts, vec![(Meter::Frames, 100)]);
    let rows: Vec<(String, i16, i64, i64, String)> = sqlx::query_as(
        "SELECT meter, threshold, used, included, limit_kind FROM usage_alerts \
         WHERE tenant_id = $1 ORDER BY threshold",
    )
    .bind(tenant.as_uuid())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            ("frames".into(), 80, 230_400, 288_000, "hard".into()),
            ("frames".into(), 100, 330_410, 288_000, "hard".into()),
        ]
    );
    db.drop_now().await;
}
