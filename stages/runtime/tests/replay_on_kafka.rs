//! Replays on the real broker (`./dev test`): Albi replayed over finished sessions with
//! the live version writes byte for byte what the live stage wrote (diff: no
//! difference); with another window length, diff reports the change; a replay killed
//! mid-way and resumed gives the same output; the live group's offsets and the live
//! topics are untouched throughout.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use clisonix_e2e::TestEnv;
use clisonix_schemas::{SessionId, TenantId};
use clisonix_topics::catalog::{EEG_FEATURES, EEG_FRAMES};
use clisonix_topics::consume::{consume, Query};
use clisonix_topics::diff::{diff, key, Key, Tolerance};
use clisonix_topics::Topics;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;
use serde_json::Value;

use common::{produce_frames, read_all, recording, stage_binary, StageProcess};

/// Runs a replay to its end (or kills it once `kill_after` output records exist).
fn replay(
    env: &TestEnv,
    topics: &Topics,
    run: &str,
    extra: &[&str],
    stage: &[&str],
) -> std::process::Output {
    Command::new(stage_binary())
        .args([
            "--bootstrap",
            &env.kafka.bootstrap,
            "--topic-prefix",
            topics.prefix(),
        ])
        .args(["--replay", run, "--batch-max", "50"])
        .args(extra)
        .args(stage)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn features(env: &TestEnv, topic: &str) -> BTreeMap<Key, Value> {
    let mut out = BTreeMap::new();
    let q = Query::whole(topic);
    consume(
        &env.kafka,
        &q,
        |r| {
            out.insert(key(&r.value).unwrap(), r.value.clone());
            true
        },
        || false,
    )
    .unwrap();
    out
}

/// How many records `topic` holds now (0 while it does not exist).
fn count(env: &TestEnv, topic: &str) -> usize {
    let q = Query::whole(topic);
    let mut n = 0;
    match consume(
        &env.kafka,
        &q,
        |_| {
            n += 1;
            true
        },
        || false,
    ) {
        Ok(_) => n,
        Err(_) => 0,
    }
}

/// The live group's committed offsets and every live topic's end offsets.
fn live_state(env: &TestEnv, topics: &Topics, group: &str) -> (Vec<i64>, Vec<(String, i64)>) {
    let c: BaseConsumer = env.kafka.consumer(group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..6 {
        tpl.add_partition(&topics.name(&EEG_FRAMES), p);
    }
    let committed = c
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|e| e.offset().to_raw().unwrap_or(-1))
        .collect();
    let mut ends = Vec::new();
    for (name, spec) in topics.all() {
        for p in 0..spec.partitions {
            let (_, high) = c
                .fetch_watermarks(&name, p, Duration::from_secs(10))
                .unwrap();
            ends.push((format!("{name}/{p}"), high));
        }
    }
    (committed, ends)
}

fn sorted(mut v: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_deterministic_resumable_and_leave_the_live_stage_alone() {
    let env = TestEnv::get();
    let topics = env.topics();
    env.create_catalog(&topics).await;
    let tenant = TenantId::random();
    let (s1, s2) = (SessionId::random(), SessionId::random());
    let mut frames = recording(tenant, s1, 320);
    frames.extend(recording(tenant, s2, 320));
    produce_frames(&env, &topics, &frames).await;
    let want = 2 * 20 * 32;

    // The live stage makes its features, then stops.
    let live_group = TestEnv::unique("albi");
    let mut live = StageProcess::spawn(&env, &topics, &live_group, "live", 100, &["albi"]);
    let live_out = sorted(
        read_all(
            &env,
            &topics.name(&EEG_FEATURES),
            want,
            Duration::from_secs(90),
            Duration::from_secs(1),
        )
        .await,
    );
    assert_eq!(live_out.len(), want);
    assert!(live.terminate().success());
    let before = live_state(&env, &topics, &live_group);

    // The same build over the same frames: byte for byte the live output; diff agrees.
    let out = replay(&env, &topics, "same", &[], &["albi"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("replay same of albi done: 640 input offsets read"),
        "{stderr}"
    );
    let same = Topics::new(format!("replay.same.{}", topics.prefix()));
    let replayed = sorted(
        read_all(
            &env,
            &same.name(&EEG_FEATURES),
            want,
            Duration::from_secs(30),
            Duration::from_secs(1),
        )
        .await,
    );
    assert_eq!(replayed, live_out, "byte-identical to the live output");
    let tol = Tolerance {
        absolute: 0.0,
        relative: 1e-9,
    };
    let a = features(&env, &topics.name(&EEG_FEATURES));
    let report = diff(&a, &features(&env, &same.name(&EEG_FEATURES)), tol);
    assert!(!report.differs(), "{report:?}");
    assert_eq!(report.in_both, want as u64);

    // Started again under the same name: already done, nothing more is written.
    let out = replay(&env, &topics, "same", &[], &["albi"]);
    assert!(out.status.success());
    let again = read_all(
        &env,
        &same.name(&EEG_FEATURES),
        want,
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(again.len(), want, "a finished run writes nothing more");

    // One session only, killed mid-way and resumed: that session's output, once.
    let mut child = Command::new(stage_binary())
        .args([
            "--bootstrap",
            &env.kafka.bootstrap,
            "--topic-prefix",
            topics.prefix(),
        ])
        .args([
            "--replay",
            "resumed",
            "--batch-max",
            "3",
            "--sessions",
            &s1.to_string(),
            "albi",
        ])
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let resumed = Topics::new(format!("replay.resumed.{}", topics.prefix()));
    let deadline = Instant::now() + Duration::from_secs(60);
    // Killed once it has written some (its topics exist once it has started).
    while count(&env, &resumed.name(&EEG_FEATURES)) < 100 {
        assert!(Instant::now() < deadline, "the replay wrote nothing");
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let out = replay(
        &env,
        &topics,
        "resumed",
        &["--sessions", &s1.to_string()],
        &["albi"],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let got = sorted(
        read_all(
            &env,
            &resumed.name(&EEG_FEATURES),
            want / 2,
            Duration::from_secs(30),
            Duration::from_secs(1),
        )
        .await,
    );
    let s1_live: Vec<(Vec<u8>, Vec<u8>)> = live_out
        .iter()
        .filter(|(_, v)| {
            clisonix_schemas::decode::<clisonix_schemas::Features>(v)
                .unwrap()
                .session_id
                == s1
        })
        .cloned()
        .collect();
    assert_eq!(
        got, s1_live,
        "killed and resumed: the session's output, once, byte for byte"
    );

    // Another window length: diff reports it.
    let out = replay(
        &env,
        &topics,
        "win4",
        &[],
        &["albi", "--window-seconds", "4"],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let win4 = Topics::new(format!("replay.win4.{}", topics.prefix()));
    let b = features(&env, &win4.name(&EEG_FEATURES));
    let report = diff(&a, &b, tol);
    assert!(report.differs());
    assert_eq!(b.len(), want / 2, "half as many 4 s windows");
    assert_eq!(
        report.only_in_a,
        (want / 2) as u64,
        "windows 10 to 19 exist only with 2 s"
    );
    assert!(
        report.changed > 0 && report.fields["total_abs"].changed > 0,
        "{report:?}"
    );

    // The live stage's group and topics saw none of it.
    assert_eq!(live_state(&env, &topics, &live_group), before);
    for t in ["same", "resumed", "win4"] {
        env.delete_topics(&format!("replay.{t}.{}", topics.prefix()))
            .await;
    }
    env.delete_topics(topics.prefix()).await;
}
