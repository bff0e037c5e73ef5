//! Jona as a real process on the real broker (`./dev test`): a recording's frames in,
//! the same audio chunks as Jona run in-process; kill -9 mid-stream and restart gives
//! the same set, nothing missing and nothing twice.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use clisonix_e2e::TestEnv;
use clisonix_jona::{Jona, JonaConfig, Preset};
use clisonix_schemas::{Frame, Marker, SessionId, TenantId, SESSION_END_MARKER};
use clisonix_stage::{OutputTopic, RecordMeta, Stage};
use clisonix_topics::catalog::AUDIO_CHUNKS;

use common::{assert_same_set, http_get, produce_frames, read_all, recording, StageProcess};

const BOTH: &[&str] = &["jona", "--presets", "audification,parameter_mapping"];

/// What Jona (both presets) makes of these frames (chunk key bytes -> value bytes).
fn expected(frames: &[Frame]) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut jona = Jona::new(JonaConfig {
        presets: Preset::ALL.to_vec(),
        ..JonaConfig::default()
    });
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let meta = RecordMeta {
            partition: 0,
            offset: i as i64,
            timestamp_ms: None,
            replay: false,
        };
        jona.process(f.clone(), meta, &mut out).unwrap();
    }
    out.into_iter()
        .filter(|o| o.topic == OutputTopic::AudioChunks)
        .map(|o| (o.key, o.value))
        .collect()
}

fn ended(mut frames: Vec<Frame>) -> Vec<Frame> {
    frames.last_mut().unwrap().markers.push(Marker {
        sample_offset: 0,
        duration_us: None,
        label: SESSION_END_MARKER.into(),
    });
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_becomes_the_expected_audio() {
    let env = TestEnv::get();
    let topics = env.topics();
    env.create_catalog(&topics).await;
    let frames = ended(recording(TenantId::random(), SessionId::random(), 400));
    let want = expected(&frames);
    // 50 s: 50 one-second chunks and the closing one, per preset.
    assert_eq!(want.len(), 2 * 51);
    produce_frames(&env, &topics, &frames).await;
    let mut stage = StageProcess::spawn(&env, &topics, &TestEnv::unique("jona"), "a", 500, BOTH);
    let got = read_all(
        &env,
        &topics.name(&AUDIO_CHUNKS),
        want.len(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    assert_same_set(&got, &want);
    let (status, metrics) = http_get(&stage.http_addr(), "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("jona_synthesis_duration_seconds_count 400"),
        "the seed's metric counts every frame:\n{metrics}"
    );
    assert!(stage.terminate().success(), "{}", stage.log());
    env.delete_topics(topics.prefix()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_and_restart_gives_the_same_audio() {
    let env = TestEnv::get();
    let topics = env.topics();
    env.create_catalog(&topics).await;
    let frames = ended(recording(TenantId::random(), SessionId::random(), 1904));
    let want = expected(&frames);
    produce_frames(&env, &topics, &frames).await;
    let group = TestEnv::unique("jona");
    let mut first = StageProcess::spawn(&env, &topics, &group, "k", 7, BOTH);
    let some = read_all(
        &env,
        &topics.name(&AUDIO_CHUNKS),
        150,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    assert!(some.len() >= 150);
    first.kill9();
    let _second = StageProcess::spawn(&env, &topics, &group, "k", 7, BOTH);
    let got = read_all(
        &env,
        &topics.name(&AUDIO_CHUNKS),
        want.len(),
        Duration::from_secs(120),
        Duration::from_secs(3),
    )
    .await;
    assert_same_set(&got, &want);
    env.delete_topics(topics.prefix()).await;
}
