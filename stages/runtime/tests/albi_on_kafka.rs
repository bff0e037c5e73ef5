//! Albi as a real process on the real broker (`./dev test`): a recording's frames in,
//! the expected features out; kill -9 and restart; poison records; two instances and a
//! rebalance. Outputs are compared byte for byte with Albi run in-process on the same
//! frames, which is deterministic.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clisonix_albi::{Albi, AlbiConfig};
use clisonix_e2e::TestEnv;
use clisonix_schemas::{decode, encode, DeadLetter, Features, Frame, SessionId, TenantId};
use clisonix_stage::{RecordMeta, Stage};
use clisonix_topics::catalog::{DEAD_LETTERS, EEG_FEATURES, EEG_FRAMES};

use common::{
    assert_same_set, data_dir, http_get, produce_frames, read_all, recording, StageProcess,
};

/// What Albi makes of these frames (feature key bytes -> value bytes).
fn expected(frames: &[Frame]) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut albi = Albi::new(AlbiConfig::default());
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        albi.process(
            f.clone(),
            RecordMeta {
                partition: 0,
                offset: i as i64,
                timestamp_ms: None,
                replay: false,
            },
            &mut out,
        )
        .unwrap();
    }
    out.into_iter().map(|o| (o.key, o.value)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_becomes_the_expected_features() {
    let env = TestEnv::get();
    let topics = env.topics();
    env.create_catalog(&topics).await;
    let frames = recording(TenantId::random(), SessionId::random(), 400);
    let want = expected(&frames);
    assert_eq!(want.len(), 25 * 32);
    produce_frames(&env, &topics, &frames).await;
    let mut stage =
        StageProcess::spawn(&env, &topics, &TestEnv::unique("albi"), "a", 500, &["albi"]);
    let got = read_all(
        &env,
        &topics.name(&EEG_FEATURES),
        want.len(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    assert_same_set(&got, &want);

    // The first windows equal the reference values (through f32 frames).
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data_dir().join("eeglab_sample_32ch_128hz_238s.reference.json"))
            .unwrap(),
    )
    .unwrap();
    for w in reference["windows"].as_array().unwrap() {
        let f: Features = got
            .iter()
            .map(|(_, v)| decode::<Features>(v).unwrap())
            .find(|f| {
                u64::from(f.channel_index) == w["channel"].as_u64().unwrap()
                    && f.window_index == w["window"].as_u64().unwrap()
            })
            .unwrap();
        let want = w["total_abs"].as_f64().unwrap();
        assert!((f.total_abs.unwrap() - want).abs() <= 1e-6 * want);
        assert_eq!(f.peak_alpha_hz, w["peak_alpha_hz"].as_f64());
    }

    let addr = stage.http_addr();
    assert_eq!(http_get(&addr, "/health").0, 200);
    assert_eq!(http_get(&addr, "/ready").0, 200);
    let (status, metrics) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("clisonix_stage_records_in_total{stage=\"albi\"} 400"),
        "{metrics}"
    );
    assert!(metrics.contains("clisonix_stage_processing_seconds_bucket"));
    assert!(
        stage.terminate().success(),
        "a SIGTERM is a clean stop:\n{}",
        stage.log()
    );
    assert!(stage.log().contains("stage stopped"));
    env.delete_topics(topics.prefix()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_and_restart_gives_the_same_set() {
    let env = TestEnv::get();
    let topics = env.topics();
    env.create_catalog(&topics).await;
    let frames = recording(TenantId::random(), SessionId::random(), 1904);
    let want = expected(&frames);
    produce_frames(&env, &topics, &frames).await;
    let group = TestEnv::unique("albi");
    // Small batches: many transactions, so the kill lands between and inside them.
    let mut first = StageProcess::spawn(&env, &topics, &group, "k", 7, &["albi"]);
    let some = read_all(
        &env,
        &topics.name(&EEG_FEATURES),
        600,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    assert!(some.len() >= 600);
    first.kill9();
    let _second = StageProcess::spawn(&env, &topics, &group, "k", 7, &["albi"]);
    let got = read_all(
        &env,
        &topics.name(&EEG_FEATURES),
        want.len(),
        Duration::from_secs(120),
        Duration::from_secs(3),
    )
    .await;
    assert_same_set(&got, &want);
    env.delete_topics(topics.prefix()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_go_to_the_dead_letter_topic_and_the_stage_goes_on() {
    let env = TestEnv::get();
    let topics = env.topics();
    env.create_catalog(&topics).await;
    let frames = recording(TenantId::random(), SessionId::random(), 40);
    let producer = env.producer();
    let topic = topics.name(&EEG_FRAMES);
    let key = encode(&frames[0].key()).unwrap();
    let mut nan = frames[5].clone();
    nan.samples[0] = f32::NAN;
    let mut clean = frames.clone();
    clean.remove(5);
    for (i, f) in frames.iter().enumerate() {
        if i == 3 {
            env.produce(&producer, &topic, &key, b"garbage, not avro")
                .await;
        }
        let value = if i == 5 {
            encode(&nan).unwrap()
        } else {
            encode(f).unwrap()
        };
        env.produce(&producer, &topic, &key, &value).await;
    }
    let _stage = StageProcess::spawn(&env, &topics, &TestEnv::unique("albi"), "p", 500, &["albi"]);
    let dead = read_all(
        &env,
        &topics.name(&DEAD_LETTERS),
        2,
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(dead.len(), 2);
    // Keyed by source position, the letters spread over partitions: order them.
    let mut letters: Vec<DeadLetter> = dead.iter().map(|(_, v)| decode(v).unwrap()).collect();
    letters.sort_by_key(|l| l.source_offset);
    assert_eq!(letters[0].reason_code, "not_avro");
    assert_eq!(letters[0].value.as_deref(), Some(&b"garbage, not avro"[..]));
    assert_eq!(letters[0].source_topic, topic);
    assert_eq!(letters[0].stage, "albi");
    assert_eq!(letters[1].reason_code, "non_finite_samples");
    assert_eq!(letters[1].value, Some(encode(&nan).unwrap()));
    assert_eq!(letters[1].source_offset, letters[0].source_offset + 3);
    // The stage went on: the valid frames (the NaN one dropped: a gap) still give windows.
    let want = expected(&clean);
    let got = read_all(
        &env,
        &topics.name(&EEG_FEATURES),
        want.len(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    assert_same_set(&got, &want);
    let w0: Features = decode(
        &got.iter()
            .find(|(k, _)| want.keys().next() == Some(k))
            .unwrap()
            .1,
    )
    .unwrap();
    assert_eq!(
        w0.quality.seq_gaps, 1,
        "the rejected frame is reported as a gap"
    );
    env.delete_topics(topics.prefix()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_the_partitions_and_a_rebalance_loses_nothing() {
    let env = TestEnv::get();
    let topics = env.topics();
    env.create_catalog(&topics).await;
    let tenant = TenantId::random();
    let sessions: Vec<Vec<Frame>> = (0..6)
        .map(|_| recording(tenant, SessionId::random(), 480))
        .collect();
    let mut want = BTreeMap::new();
    for s in &sessions {
        want.extend(expected(s));
    }
    // Interleave the sessions as devices would stream them.
    let mut interleaved = Vec::new();
    for i in 0..480 {
        for s in &sessions {
            interleaved.push(s[i].clone());
        }
    }
    produce_frames(&env, &topics, &interleaved).await;
    let group = TestEnv::unique("albi");
    let mut a = StageProcess::spawn(&env, &topics, &group, "a", 25, &["albi"]);
    let early = read_all(
        &env,
        &topics.name(&EEG_FEATURES),
        300,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    assert!(early.len() >= 300);
    let b = StageProcess::spawn(&env, &topics, &group, "b", 25, &["albi"]);
    // Cooperative rebalancing hands B some of A's partitions (B's first assignment is
    // empty; the second carries what A revoked). Then A leaves and B takes the rest.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(b.log().contains("partitions assigned partitions=[0")
        || (1..6).any(|p| {
            b.log()
                .contains(&format!("partitions assigned partitions=[{p}"))
        }))
        || !a.log().contains("partitions revoked")
    {
        assert!(
            Instant::now() < deadline,
            "no handover:\nA:\n{}\nB:\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.terminate().success());
    let got = read_all(
        &env,
        &topics.name(&EEG_FEATURES),
        want.len(),
        Duration::from_secs(120),
        Duration::from_secs(3),
    )
    .await;
    assert_same_set(&got, &want);
    assert!(
        a.log().contains("partitions revoked"),
        "A gave partitions up:\n{}",
        a.log()
    );
    env.delete_topics(topics.prefix()).await;
}
