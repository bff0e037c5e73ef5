//! Retention on real Postgres: sessions older than their tenant's plan keeps are
//! deleted with their feature windows and audio chunks; younger ones, and other
//! tenants' on longer plans, stay; usage stays; a sweep changes nothing the second
//! time; a shorter plan takes effect at the next sweep.

use chrono::{Duration, Utc};
use clisonix_e2e::TestEnv;
use clisonix_schemas::{examples, SessionId, TenantId, Timestamp};
use clisonix_sink::{Results, SinkRecord};
use sqlx::PgPool;

/// A tenant (on the free plan, as every new tenant).
async fn tenant(pool: &PgPool, name: &str) -> TenantId {
    let id = TenantId::random();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
        .bind(id.as_uuid())
        .bind(name)
        .execute(pool)
        .await
        .unwrap();
    id
}

/// A session of `tenant` whose last frame was `days_ago` days ago, with two feature
/// windows and one audio chunk, written the way the sink writes them.
async fn session(results: &Results, tenant: TenantId, days_ago: i64, seed: u64) -> SessionId {
    let session = SessionId::random();
    let last = Timestamp::from_micros((Utc::now() - Duration::days(days_ago)).timestamp_micros());
    let mut state = examples::session_state(seed);
    (state.tenant_id, state.session_id, state.last_frame_at) = (tenant, session, last);
    let mut records = vec![SinkRecord::Session(state)];
    for w in 0..2 {
        let mut f = examples::features(seed * 10 + w);
        (f.tenant_id, f.session_id) = (tenant, session);
        records.push(SinkRecord::Features(Box::new(f)));
    }
    let mut a = examples::audio_chunk(seed);
    (a.tenant_id, a.session_id) = (tenant, session);
    records.push(SinkRecord::Audio(a));
    results
        .write(&records.iter().collect::<Vec<_>>())
        .await
        .unwrap();
    session
}

async fn rows(pool: &PgPool, session: SessionId) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM sessions WHERE session_id = $1), \
                (SELECT count(*) FROM features WHERE session_id = $1), \
                (SELECT count(*) FROM audio_chunks WHERE session_id = $1)",
    )
    .bind(session.as_uuid())
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_past_their_plans_retention_are_deleted_and_nothing_else() {
    let db = TestEnv::get().fresh_database().await;
    let pool = &db.pool;
    sqlx::migrate!("../../gateway/migrations")
        .run(pool)
        .await
        .unwrap();
    let audio = clisonix_audio::AudioStore::from_url(&db.audio_store()).unwrap();
    let results = Results::new(pool.clone(), audio.clone());
    // Free keeps 7 days, enterprise 365.
    let free = tenant(pool, "free").await;
    let big = tenant(pool, "big").await;
    sqlx::query("UPDATE subscriptions SET plan_id = 'enterprise' WHERE tenant_id = $1")
        .bind(big.as_uuid())
        .execute(pool)
        .await
        .unwrap();
    let old = session(&results, free, 8, 1).await;
    let young = session(&results, free, 6, 2).await;
    let kept = session(&results, big, 8, 3).await;
    sqlx::query(
        "INSERT INTO usage_sessions (session_id, tenant_id, meter, detail, quantity) VALUES ($1, $2, 'frames', '', 1904)",
    )
    .bind(old.as_uuid())
    .bind(free.as_uuid())
    .execute(pool)
    .await
    .unwrap();

    // Batches of one: the sweep goes on until nothing is left to delete.
    let e = results
        .expire(Utc::now(), 1)
        .await
        .unwrap()
        .expect("not locked");
    assert_eq!((e.sessions, e.features, e.audio_chunks), (1, 2, 1));
    assert_eq!(rows(pool, old).await, (0, 0, 0));
    assert_eq!(rows(pool, young).await, (1, 2, 1));
    assert_eq!(rows(pool, kept).await, (1, 2, 1));
    let usage: i64 =
        sqlx::query_scalar("SELECT count(*) FROM usage_sessions WHERE session_id = $1")
            .bind(old.as_uuid())
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(usage, 1, "usage is billing data, kept");
    // The expired chunk's object goes at the object sweep that follows, whatever the
    // grace; the others' stay.
    let objects = || async {
        futures::TryStreamExt::try_collect::<Vec<_>>(audio.list())
            .await
            .unwrap()
            .len()
    };
    assert_eq!(objects().await, 3);
    let swept = results
        .sweep_objects(Utc::now(), std::time::Duration::from_secs(3600), 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((swept.checked, swept.deleted), (1, 1));
    assert_eq!(objects().await, 2);
    let again = results.expire(Utc::now(), 1).await.unwrap().unwrap();
    assert_eq!(again.sessions, 0);

    // Two days on, the young session is past free's seven days too.
    let e = results
        .expire(Utc::now() + Duration::days(2), 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.sessions, 1);
    assert_eq!(rows(pool, young).await, (0, 0, 0));

    // Moving to free shortens the big tenant's retention at the next sweep.
    sqlx::query("UPDATE subscriptions SET plan_id = 'free' WHERE tenant_id = $1")
        .bind(big.as_uuid())
        .execute(pool)
        .await
        .unwrap();
    let e = results.expire(Utc::now(), 100).await.unwrap().unwrap();
    assert_eq!((e.sessions, e.features, e.audio_chunks), (1, 2, 1));
    assert_eq!(rows(pool, kept).await, (0, 0, 0));

    // While another instance sweeps, this one skips the round.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(clisonix_sink::retention::LOCK)
        .execute(&mut *holder)
        .await
        .unwrap();
    assert!(results.expire(Utc::now(), 100).await.unwrap().is_none());
    holder.rollback().await.unwrap();
}
