//! The results sink as a real process on the real broker and Postgres (`./dev test`):
//! session states, features and audio chunks from their topics into their tables,
//! idempotently (records written again change nothing, an older session state cannot
//! undo a newer one), through a kill -9, with undecodable records dead-lettered.

mod common;

use std::time::{Duration, Instant};

use clisonix_albi::{Albi, AlbiConfig};
use clisonix_e2e::{TestDatabase, TestEnv};
use clisonix_jona::{Jona, JonaConfig, Preset};
use clisonix_schemas::{
    decode, AudioChunk, DeadLetter, Features, Frame, Marker, SessionId, SessionState, TenantId,
    SESSION_END_MARKER,
};
use clisonix_sessions::{Sessions, SessionsConfig};
use clisonix_stage::{Output, RecordMeta, Stage};
use clisonix_topics::catalog::{AUDIO_CHUNKS, DEAD_LETTERS, EEG_FEATURES, EEG_SESSIONS};
use clisonix_topics::Topics;
use rdkafka::producer::FutureProducer;
use sqlx::Row;

use common::{recording, StageProcess};

/// Every output of the three frame stages for these frames, in order.
fn outputs(frames: &[Frame]) -> (Vec<Output>, Vec<Output>, Vec<Output>) {
    let mut albi = Albi::new(AlbiConfig::default());
    let mut jona = Jona::new(JonaConfig {
        presets: Preset::ALL.to_vec(),
        ..JonaConfig::default()
    });
    let mut sessions = Sessions::new(SessionsConfig::default());
    let (mut f, mut a, mut s) = (Vec::new(), Vec::new(), Vec::new());
    for (i, frame) in frames.iter().enumerate() {
        let meta = RecordMeta {
            partition: 0,
            offset: i as i64,
            timestamp_ms: Some(frame.received_at.as_millis() + i as i64 * 125),
            replay: false,
        };
        albi.process(frame.clone(), meta, &mut f).unwrap();
        jona.process(frame.clone(), meta, &mut a).unwrap();
        sessions.process(frame.clone(), meta, &mut s).unwrap();
    }
    // Jona's usage events go to usage.events, not to the sink.
    a.retain(|o| o.topic == clisonix_stage::OutputTopic::AudioChunks);
    (f, a, s)
}

fn ended(mut frames: Vec<Frame>) -> Vec<Frame> {
    frames.last_mut().unwrap().markers.push(Marker {
        sample_offset: 0,
        duration_us: None,
        label: SESSION_END_MARKER.into(),
    });
    frames
}

async fn produce(env: &TestEnv, producer: &FutureProducer, topic: &str, records: &[Output]) {
    for o in records {
        env.produce(producer, topic, &o.key, &o.value).await;
    }
}

fn spawn_sink(
    env: &TestEnv,
    topics: &Topics,
    db: &TestDatabase,
    group: &str,
    batch: usize,
) -> StageProcess {
    StageProcess::spawn_with_env(
        env,
        topics,
        group,
        "s",
        batch,
        &["sink"],
        &[
            ("DATABASE_URL", &db.url()),
            ("CLISONIX_AUDIO_STORE", &db.audio_store()),
        ],
    )
}

async fn count(db: &TestDatabase, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&db.pool)
        .await
        .unwrap_or(0)
}

/// Waits until `table` holds `want` rows.
async fn wait_rows(db: &TestDatabase, table: &str, want: i64, sink: &StageProcess) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let n = count(db, table).await;
        if n == want {
            return;
        }
        assert!(n < want, "{table}: {n} rows, more than the {want} records");
        assert!(
            Instant::now() < deadline,
            "{table}: {n} of {want} rows\n{}",
            sink.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_land_in_postgres_once_and_replays_change_nothing() {
    let env = TestEnv::get();
    let topics = env.topics();
    env.create_catalog(&topics).await;
    let db = env.fresh_database().await;
    let frames = ended(recording(TenantId::random(), SessionId::random(), 160));
    let (features, audio, states) = outputs(&frames);
    assert_eq!(features.len(), 10 * 32);
    let producer = env.producer();
    produce(&env, &producer, &topics.name(&EEG_FEATURES), &features).await;
    produce(&env, &producer, &topics.name(&AUDIO_CHUNKS), &audio).await;
    produce(&env, &producer, &topics.name(&EEG_SESSIONS), &states).await;
    let sink = spawn_sink(&env, &topics, &db, &TestEnv::unique("sink"), 100);
    wait_rows(&db, "features", features.len() as i64, &sink).await;
    wait_rows(&db, "audio_chunks", audio.len() as i64, &sink).await;
    wait_rows(&db, "sessions", 1, &sink).await;

    // Values as the records have them.
    let f: Features = decode(&features[37].value).unwrap();
    let row = sqlx::query(
        "SELECT tenant_id, channel_label, total_abs, rel_alpha, peak_alpha_hz, psd, window_start \
         FROM features WHERE session_id = $1 AND window_index = $2 AND channel_index = $3",
    )
    .bind(f.session_id.as_uuid())
    .bind(f.window_index as i64)
    .bind(f.channel_index as i32)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(row.get::<uuid::Uuid, _>("tenant_id"), f.tenant_id.as_uuid());
    assert_eq!(row.get::<String, _>("channel_label"), f.channel_label);
    assert_eq!(row.get::<Option<f64>, _>("total_abs"), f.total_abs);
    assert_eq!(row.get::<Option<f64>, _>("rel_alpha"), f.rel.alpha);
    assert_eq!(row.get::<Option<f64>, _>("peak_alpha_hz"), f.peak_alpha_hz);
    assert_eq!(
        row.get::<Vec<u8>, _>("psd"),
        clisonix_sink::psd_bytes(&f.psd)
    );
    // Every chunk's row names its object, none holds PCM, and each object decodes to
    // its record's PCM bit for bit.
    let store = clisonix_audio::AudioStore::from_url(&db.audio_store()).unwrap();
    for record in &audio {
        let a: AudioChunk = decode(&record.value).unwrap();
        let (key, bytes, inline): (String, i32, bool) = sqlx::query_as(
            "SELECT object_key, object_bytes, pcm IS NOT NULL FROM audio_chunks \
             WHERE session_id = $1 AND preset = $2 AND chunk_index = $3",
        )
        .bind(a.session_id.as_uuid())
        .bind(&a.preset)
        .bind(a.chunk_index as i64)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert!(!inline, "no PCM in Postgres");
        let flac = store
            .get(&clisonix_audio::ObjectKey::parse(&key).unwrap())
            .await
            .unwrap();
        assert_eq!(flac.len(), bytes as usize);
        let back = clisonix_audio::flac::decode(&flac).unwrap();
        assert_eq!(
            back.samples, a.pcm,
            "chunk {} of {}",
            a.chunk_index, a.preset
        );
        assert_eq!(back.channels, a.channels);
        assert_eq!(back.sample_rate_hz, a.sample_rate_hz);
    }
    let objects: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(store.list())
        .await
        .unwrap();
    assert_eq!(objects.len(), audio.len(), "an object per chunk");
    let last: SessionState = decode(&states.last().unwrap().value).unwrap();
    let (status, frames_seen, reason): (String, i64, Option<String>) =
        sqlx::query_as("SELECT status, frames, end_reason FROM sessions WHERE session_id = $1")
            .bind(last.session_id.as_uuid())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), frames_seen, reason.as_deref()),
        ("ended", 160, Some("explicit"))
    );

    // Everything again, and the first (older) session state last: nothing changes.
    produce(&env, &producer, &topics.name(&EEG_FEATURES), &features).await;
    produce(&env, &producer, &topics.name(&AUDIO_CHUNKS), &audio).await;
    produce(&env, &producer, &topics.name(&EEG_SESSIONS), &states[..1]).await;
    // A garbage record on the way is dead-lettered, and the sink goes on.
    env.produce(&producer, &topics.name(&EEG_FEATURES), b"k", b"not avro")
        .await;
    // So is a chunk FLAC cannot hold (nine channels), which would fail every batch.
    let mut wide: AudioChunk = decode(&audio[0].value).unwrap();
    (wide.channels, wide.pcm, wide.chunk_index) = (9, vec![1; 9 * 10], 999);
    let wide = Output::new(clisonix_stage::OutputTopic::AudioChunks, &wide.key(), &wide);
    produce(&env, &producer, &topics.name(&AUDIO_CHUNKS), &[wide]).await;
    let marker = {
        let mut s = last.clone();
        s.session_id = SessionId::random();
        Output::new(clisonix_stage::OutputTopic::EegSessions, &s.key(), &s)
    };
    produce(&env, &producer, &topics.name(&EEG_SESSIONS), &[marker]).await;
    wait_rows(&db, "sessions", 2, &sink).await;
    assert_eq!(count(&db, "features").await, features.len() as i64);
    assert_eq!(count(&db, "audio_chunks").await, audio.len() as i64);
    let status: String = sqlx::query_scalar("SELECT status FROM sessions WHERE session_id = $1")
        .bind(last.session_id.as_uuid())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(status, "ended", "an older state does not undo the end");
    let letters = env
        .consume(
            &env.consumer(&[&topics.name(&DEAD_LETTERS)]),
            2,
            Duration::from_secs(30),
        )
        .await;
    let mut letters: Vec<DeadLetter> = letters.iter().map(|l| decode(&l.value).unwrap()).collect();
    letters.sort_by_key(|l| l.reason_code.clone());
    assert!(letters.iter().all(|l| l.stage == "sink"));
    assert_eq!(letters[0].reason_code, "invalid_audio");
    assert_eq!(letters[1].value.as_deref(), Some(&b"not avro"[..]));
    drop(sink);
    db.drop_now().await;
    env.delete_topics(topics.prefix()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_and_restart_leaves_every_row_once() {
    let env = TestEnv::get();
    let topics = env.topics();
    env.create_catalog(&topics).await;
    let db = env.fresh_database().await;
    let frames = ended(recording(TenantId::random(), SessionId::random(), 960));
    let (features, audio, _) = outputs(&frames);
    let producer = env.producer();
    produce(&env, &producer, &topics.name(&EEG_FEATURES), &features).await;
    produce(&env, &producer, &topics.name(&AUDIO_CHUNKS), &audio).await;
    let group = TestEnv::unique("sink");
    let mut first = spawn_sink(&env, &topics, &db, &group, 20);
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&db, "features").await < 300 {
        assert!(Instant::now() < deadline, "{}", first.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill9();
    let second = spawn_sink(&env, &topics, &db, &group, 20);
    wait_rows(&db, "features", features.len() as i64, &second).await;
    wait_rows(&db, "audio_chunks", audio.len() as i64, &second).await;
    // Every record's row is there, with the record's values.
    for o in features.iter().step_by(97) {
        let f: Features = decode(&o.value).unwrap();
        let total: Option<f64> = sqlx::query_scalar(
            "SELECT total_abs FROM features WHERE session_id = $1 AND window_index = $2 AND channel_index = $3",
        )
        .bind(f.session_id.as_uuid())
        .bind(f.window_index as i64)
        .bind(f.channel_index as i32)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(total, f.total_abs);
    }
    drop(second);
    db.drop_now().await;
    env.delete_topics(topics.prefix()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_postgres_outage_the_sink_writes_its_backlog_within_seconds() {
    // A private cluster of its own, so stopping it disturbs no other test.
    let pg = clisonix_dev::postgres::PrivatePostgres::start(clisonix_e2e::free_port()).await;
    let dir = std::env::temp_dir().join(TestEnv::unique("clisonix-sink-outage-audio"));
    let env = TestEnv::get();
    let topics = env.topics();
    env.create_catalog(&topics).await;
    let store = format!("file://{}", dir.join("audio").display());
    let sink = StageProcess::spawn_with_env(
        &env,
        &topics,
        &TestEnv::unique("sink"),
        "s",
        100,
        &["sink"],
        &[
            ("DATABASE_URL", &pg.url()),
            ("CLISONIX_MIGRATE", "false"),
            ("CLISONIX_AUDIO_STORE", &store),
        ],
    );
    let (features, _, _) = outputs(&recording(TenantId::random(), SessionId::random(), 160));
    let (first, second) = features.split_at(features.len() / 2);
    let producer = env.producer();
    let feature_rows = || async {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&pg.url()).await?;
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM features")
            .fetch_one(&mut conn)
            .await
    };
    let wait_for = |want: usize, within: Duration| async move {
        let since = Instant::now();
        loop {
            if feature_rows().await.is_ok_and(|n| n == want as i64) {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < within,
                "{want} rows not written within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    produce(&env, &producer, &topics.name(&EEG_FEATURES), first).await;
    wait_for(first.len(), Duration::from_secs(60)).await;

    // Postgres away while records keep coming: the sink retries, skips nothing.
    pg.down().await;
    produce(&env, &producer, &topics.name(&EEG_FEATURES), second).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    pg.up().await;
    let caught_up = wait_for(features.len(), Duration::from_secs(30)).await;
    println!("the sink wrote its backlog {caught_up:?} after Postgres came back");
    assert!(
        caught_up < Duration::from_secs(3),
        "backlog written {caught_up:?} after Postgres's return\n{}",
        sink.log()
    );
}
