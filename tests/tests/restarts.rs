//! kill -9 of Jona and of the results sink while a session streams: after their
//! restarts every audio chunk and feature row is stored once, none missing, and the
//! audio read through the API (decoded from the FLAC objects) is bit for bit what an
//! uninterrupted Jona renders. And kill -9 of the sink between a batch's audio objects
//! and its rows: nothing is visible meanwhile, the restarted sink reuses the objects,
//! nothing is left over.

mod common;
#[path = "../../stages/runtime/tests/common/mod.rs"]
mod stages;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use clisonix_audio::AudioStore;
use futures::TryStreamExt;

use clisonix_e2e::TestEnv;
use clisonix_jona::{Jona, JonaConfig};
use clisonix_player::http::{Client, Format};
use clisonix_player::play::{play, PlayOptions, Transport};
use clisonix_player::recording::{load, mark_session, Recording};
use clisonix_schemas::{decode, AudioChunk, DeviceId, SessionId};
use clisonix_stage::{RecordMeta, Stage};
use common::{recording_path, Parts, Pipeline};
use stages::StageProcess;

const PRESETS: [&str; 2] = ["audification", "parameter_mapping"];

async fn count(p: &Pipeline, sql: &str, session: SessionId) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(session.as_uuid())
        .fetch_one(&p.db.pool)
        .await
        .unwrap()
}

async fn wait_until(
    p: &Pipeline,
    sql: &str,
    session: SessionId,
    at_least: i64,
    logs: &[&StageProcess],
) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while count(p, sql, session).await < at_least {
        assert!(
            Instant::now() < deadline,
            "{sql}: fewer than {at_least}\n{}",
            logs.iter()
                .map(|l| l.log())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_jona_and_the_sink_leaves_no_gap_and_no_duplicate() {
    let p = Pipeline::start_with(Parts {
        jona: false,
        sink: false,
    })
    .await;
    let url = p.db.url();
    let (jona_group, sink_group) = (TestEnv::unique("jona"), TestEnv::unique("sink"));
    let jona_args = ["jona"];
    let sink_args = ["sink"];
    // The gateway migrated the database already.
    let vars = [
        ("DATABASE_URL", url.as_str()),
        ("CLISONIX_MIGRATE", "false"),
        ("CLISONIX_AUDIO_STORE", p.audio_store.as_str()),
    ];
    // Small batches: many transactions and commits for the kills to land among.
    let mut jona = StageProcess::spawn(&p.env, &p.topics, &jona_group, "j", 5, &jona_args);
    let mut sink =
        StageProcess::spawn_with_env(&p.env, &p.topics, &sink_group, "s", 20, &sink_args, &vars);

    let (recording, session) = play_session(&p, &PRESETS).await;

    let audio_rows = "SELECT count(*) FROM audio_chunks WHERE session_id = $1";
    wait_until(&p, audio_rows, session, 20, &[&jona, &sink]).await;
    let (_, metrics) = stages::http_get(&jona.http_addr(), "/metrics");
    let taken: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("clisonix_stage_records_in_total{stage=\"jona\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        taken < 1904.0,
        "Jona is mid-stream when killed ({taken} frames in)"
    );
    jona.kill9();
    let jona = StageProcess::spawn(&p.env, &p.topics, &jona_group, "j", 5, &jona_args);
    wait_until(&p, audio_rows, session, 200, &[&jona, &sink]).await;
    sink.kill9();
    let sink =
        StageProcess::spawn_with_env(&p.env, &p.topics, &sink_group, "s", 20, &sink_args, &vars);

    // Everything arrives: 238 one-second chunks and the closing one, per preset; 119
    // windows of 32 channels.
    wait_until(&p, audio_rows, session, 2 * 239, &[&jona, &sink]).await;
    wait_until(
        &p,
        "SELECT count(*) FROM features WHERE session_id = $1",
        session,
        3808,
        &[&jona, &sink],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&p, audio_rows, session).await,
        2 * 239,
        "no chunk twice"
    );

    let clean = clean_render(&recording, session, &PRESETS);
    let mut reader = p.reader(&p.tenant.read_key);
    for preset in PRESETS {
        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT chunk_index, start_frame, frames FROM audio_chunks \
             WHERE session_id = $1 AND preset = $2 ORDER BY chunk_index",
        )
        .bind(session.as_uuid())
        .bind(preset)
        .fetch_all(&p.db.pool)
        .await
        .unwrap();
        let mut next = 0;
        for (i, (index, start, frames)) in rows.iter().enumerate() {
            assert_eq!((*index, *start), (i as i64, next), "{preset}: contiguous");
            next += frames;
        }
        assert_audio_is(&mut reader, session, preset, &clean).await;
    }
    drop((jona, sink));
    p.stop().await;
}

/// Streams the reference recording as one new session asking for `presets`, as fast
/// as ingest takes it, every frame acknowledged.
async fn play_session(p: &Pipeline, presets: &[&str]) -> (Recording, SessionId) {
    let recording = load(&recording_path(), 125).unwrap();
    let session = SessionId::random();
    let report = play(
        &recording,
        &PlayOptions {
            url: p.ingest.clone(),
            key: p.tenant.ingest_key.clone(),
            transport: Transport::WebSocket,
            format: Format::Binary,
            speed: 0.0,
            audio_presets: Some(presets.join(",")),
            session_ids: vec![session],
            ..PlayOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(report.acked, 1904);
    (recording, session)
}

/// The audio chunks an uninterrupted Jona renders from the session's frames.
fn clean_render(recording: &Recording, session: SessionId, presets: &[&str]) -> Vec<AudioChunk> {
    let mut frames = recording.for_device(&DeviceId::parse("player-0").unwrap(), session, None);
    mark_session(&mut frames, Some(&presets.join(",")), true);
    let mut clean = Jona::new(JonaConfig::default());
    let mut out = Vec::new();
    for (i, f) in frames.into_iter().enumerate() {
        let meta = RecordMeta {
            partition: 0,
            offset: i as i64,
            timestamp_ms: None,
            replay: false,
        };
        clean.process(f, meta, &mut out).unwrap();
    }
    out.iter()
        .filter(|o| o.topic == clisonix_stage::OutputTopic::AudioChunks)
        .map(|o| decode::<AudioChunk>(&o.value).unwrap())
        .collect()
}

/// The session's WAV through the API is the clean render's PCM, bit for bit.
async fn assert_audio_is(
    reader: &mut Client,
    session: SessionId,
    preset: &str,
    clean: &[AudioChunk],
) {
    let want: Vec<u8> = clean
        .iter()
        .filter(|c| c.preset == preset)
        .flat_map(|c| clisonix_sink::pcm_bytes(&c.pcm))
        .collect();
    let wav = reader
        .get(&format!("/v1/sessions/{session}/audio?preset={preset}"))
        .await
        .unwrap();
    assert_eq!(wav.status, 200);
    assert!(
        wav.body[44..] == want[..],
        "{preset}: the audio equals an uninterrupted run's"
    );
}

async fn stored_objects(p: &Pipeline) -> BTreeSet<String> {
    let store = AudioStore::from_url(&p.audio_store).unwrap();
    store
        .list()
        .map_ok(|o| o.key.as_str().to_owned())
        .try_collect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_sink_between_its_objects_and_its_rows_shows_nothing_and_leaves_nothing() {
    let p = Pipeline::start_with(Parts {
        jona: true,
        sink: false,
    })
    .await;
    let url = p.db.url();
    let group = TestEnv::unique("sink");
    let vars = [
        ("DATABASE_URL", url.as_str()),
        ("CLISONIX_MIGRATE", "false"),
        ("CLISONIX_AUDIO_STORE", p.audio_store.as_str()),
    ];
    // A transaction holding a lock that inserts into audio_chunks wait for: the sink
    // writes a batch's objects, then waits at its rows, where it is killed.
    let mut blocker = p.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE audio_chunks IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let mut sink =
        StageProcess::spawn_with_env(&p.env, &p.topics, &group, "s", 20, &["sink"], &vars);
    let presets = ["parameter_mapping"];
    let (recording, session) = play_session(&p, &presets).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored_objects(&p).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no object written\n{}",
            sink.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Objects are there, no row names them, and no reader sees a chunk.
    let audio_rows = "SELECT count(*) FROM audio_chunks WHERE session_id = $1";
    assert_eq!(count(&p, audio_rows, session).await, 0);
    let mut reader = p.reader(&p.tenant.read_key);
    let wav = reader
        .get(&format!("/v1/sessions/{session}/audio"))
        .await
        .unwrap();
    assert_eq!(wav.status, 404, "{}", String::from_utf8_lossy(&wav.body));
    sink.kill9();
    blocker.rollback().await.unwrap();
    let before = stored_objects(&p).await;
    assert!(!before.is_empty());

    let sink = StageProcess::spawn_with_env(&p.env, &p.topics, &group, "s", 20, &["sink"], &vars);
    wait_until(&p, audio_rows, session, 239, &[&sink]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count(&p, audio_rows, session).await, 239, "no chunk twice");
    let named: BTreeSet<String> =
        sqlx::query_scalar("SELECT object_key FROM audio_chunks WHERE session_id = $1")
            .bind(session.as_uuid())
            .fetch_all(&p.db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let after = stored_objects(&p).await;
    assert!(
        before.is_subset(&named),
        "the objects written before the kill are reused"
    );
    assert_eq!(after, named, "an object per row, none left over");
    let clean = clean_render(&recording, session, &presets);
    assert_audio_is(&mut reader, session, presets[0], &clean).await;
    drop(sink);
    p.stop().await;
}
