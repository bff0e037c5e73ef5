//! Audio objects on real Postgres and a real local store: a chunk's row names an
//! object that decodes to its PCM; written again, the chunk reuses its object; the
//! sweep deletes what no row names once its check is past the grace, keeps everything
//! else, and never runs while a batch is between its objects and its commit.

use std::time::Duration;

use chrono::Utc;
use clisonix_audio::{flac, AudioStore, ObjectKey, StoredObject};
use clisonix_e2e::{TestDatabase, TestEnv};
use clisonix_schemas::{examples, AudioChunk};
use clisonix_sink::{Results, SinkRecord};
use futures::TryStreamExt;
use sqlx::PgPool;

async fn objects(store: &AudioStore) -> Vec<StoredObject> {
    let mut all: Vec<StoredObject> = store.list().try_collect().await.unwrap();
    all.sort_by(|a, b| a.key.cmp(&b.key));
    all
}

async fn row_key(pool: &PgPool, a: &AudioChunk) -> String {
    sqlx::query_scalar(
        "SELECT object_key FROM audio_chunks WHERE session_id = $1 AND preset = $2 AND chunk_index = $3",
    )
    .bind(a.session_id.as_uuid())
    .bind(&a.preset)
    .bind(a.chunk_index as i64)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn checks(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audio_object_checks")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn write(results: &Results, chunks: &[AudioChunk]) {
    let records: Vec<SinkRecord> = chunks.iter().cloned().map(SinkRecord::Audio).collect();
    results
        .write(&records.iter().collect::<Vec<_>>())
        .await
        .unwrap();
}

/// A fresh migrated database, its own audio store, and the results writer on both.
async fn setup() -> (TestDatabase, AudioStore, Results) {
    let db = TestEnv::get().fresh_database().await;
    sqlx::migrate!("../../gateway/migrations")
        .run(&db.pool)
        .await
        .unwrap();
    let store = AudioStore::from_url(&db.audio_store()).unwrap();
    let results = Results::new(db.pool.clone(), store.clone());
    (db, store, results)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_are_written_before_rows_reused_and_swept_when_no_row_names_them() {
    let (db, store, results) = setup().await;
    let pool = &db.pool;
    let hour = Duration::from_secs(3600);

    // Three chunks of a session, one of them long enough for several FLAC blocks.
    let mut chunks: Vec<AudioChunk> = (0..3).map(examples::audio_chunk).collect();
    let (tenant, session) = (chunks[0].tenant_id, chunks[0].session_id);
    for c in &mut chunks[1..] {
        (c.tenant_id, c.session_id) = (tenant, session);
    }
    chunks[2].pcm = (0..2 * 44_100)
        .map(|i| ((i * 37) % 65_536 - 32_768) as i16)
        .collect();
    write(&results, &chunks).await;
    let stored = objects(&store).await;
    assert_eq!(stored.len(), 3);
    for c in &chunks {
        let key = ObjectKey::parse(&row_key(pool, c).await).unwrap();
        let back = flac::decode(&store.get(&key).await.unwrap()).unwrap();
        assert_eq!(back.samples, c.pcm, "chunk {}", c.chunk_index);
    }

    // Written again (a batch re-read after a crash), each chunk twice in one batch (a
    // record produced again): the same objects, nothing new.
    write(&results, &[chunks.clone(), chunks.clone()].concat()).await;
    assert_eq!(
        objects(&store)
            .await
            .iter()
            .map(|o| o.key.clone())
            .collect::<Vec<_>>(),
        stored.iter().map(|o| o.key.clone()).collect::<Vec<_>>()
    );

    // A chunk rendered differently: its row keeps the first object; the new one is
    // written under a key of its own, overwriting nothing.
    let mut other = chunks[1].clone();
    other.pcm.iter_mut().for_each(|s| *s = s.wrapping_add(1));
    write(&results, std::slice::from_ref(&other)).await;
    assert_eq!(objects(&store).await.len(), 4);
    let first = ObjectKey::parse(&row_key(pool, &chunks[1]).await).unwrap();
    assert_eq!(
        flac::decode(&store.get(&first).await.unwrap())
            .unwrap()
            .samples,
        chunks[1].pcm
    );

    // A sink killed between its objects and its rows: an object and its check, no row.
    let lost = examples::audio_chunk(9);
    let bytes = flac::encode(&lost.pcm, lost.channels, lost.sample_rate_hz).unwrap();
    let lost_key = ObjectKey::new(
        lost.tenant_id.as_uuid(),
        lost.session_id.as_uuid(),
        &lost.preset,
        lost.chunk_index,
        &bytes,
    );
    sqlx::query("INSERT INTO audio_object_checks (object_key) VALUES ($1)")
        .bind(lost_key.as_str())
        .execute(pool)
        .await
        .unwrap();
    store.put(&lost_key, bytes.into()).await.unwrap();
    assert_eq!(objects(&store).await.len(), 5);

    // Within the grace, nothing is looked at.
    let s = results
        .sweep_objects(Utc::now(), hour, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((s.checked, s.deleted), (0, 0));
    // Past it (an hour on), every check is done once: the three named objects stay,
    // the re-rendered one and the lost one go. Batches of two: it goes on to the end.
    let later = Utc::now() + chrono::Duration::hours(2);
    let s = results
        .sweep_objects(later, hour, 2)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((s.checked, s.deleted), (5, 2));
    assert_eq!(checks(pool).await, 0);
    let left: Vec<ObjectKey> = objects(&store).await.into_iter().map(|o| o.key).collect();
    assert_eq!(
        left,
        stored.iter().map(|o| o.key.clone()).collect::<Vec<_>>()
    );
    let s = results
        .sweep_objects(later, hour, 2)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((s.checked, s.deleted), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_waits_for_a_batch_between_its_objects_and_its_commit() {
    let (db, _, results) = setup().await;
    let pool = &db.pool;
    sqlx::query(
        "INSERT INTO audio_object_checks (object_key, created_at) VALUES ($1, '-infinity')",
    )
    .bind(ObjectKey::new(uuid::Uuid::new_v4(), uuid::Uuid::new_v4(), "p", 0, b"x").as_str())
    .execute(pool)
    .await
    .unwrap();
    // A batch holds the lock shared, as the sink's writes do from before their objects
    // until their commit: the sweep gives up after its timeout and deletes nothing.
    let mut batch = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(clisonix_sink::objects::LOCK)
        .execute(&mut *batch)
        .await
        .unwrap();
    let swept = results
        .sweep_objects(Utc::now(), Duration::ZERO, 100)
        .await
        .unwrap();
    assert_eq!(swept, None);
    assert_eq!(checks(pool).await, 1);
    batch.commit().await.unwrap();
    let s = results
        .sweep_objects(Utc::now(), Duration::ZERO, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((s.checked, s.deleted), (1, 1));
}
