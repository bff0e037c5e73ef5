//! `clisonix-topics consume` against the real broker (`./dev test`): by time it returns
//! exactly the records in the range, by session only that session's (found through
//! eeg.sessions), decoded by their schemas; bad arguments and unknown topics are clear
//! errors.

use std::process::Command;
use std::time::Duration;

use clisonix_schemas::{encode, examples, Timestamp};
use clisonix_topics::{Admin, KafkaSettings, Replication, Topics, CATALOG};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::Value;

fn settings() -> KafkaSettings {
    KafkaSettings::new(
        std::env::var("CLISONIX_KAFKA_BOOTSTRAP")
            .expect("CLISONIX_KAFKA_BOOTSTRAP is not set: run the tests with ./dev test"),
        "consume-test",
    )
}

fn run(prefix: &str, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_clisonix-topics"))
        .args(["--bootstrap", &settings().bootstrap, "--prefix", prefix])
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn consume_by_time_and_by_session_returns_exactly_those_records() {
    let prefix = format!(
        "consume-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let topics = Topics::new(&prefix);
    Admin::connect(&settings())
        .unwrap()
        .ensure(&topics, Replication::Auto)
        .unwrap();
    let frames_topic = topics.name(&CATALOG[0]);
    let sessions_topic = topics.name(&clisonix_topics::catalog::EEG_SESSIONS);

    // Three sessions' frames, interleaved, one every 10 s from an hour ago; each
    // session's state in eeg.sessions.
    let producer: BaseProducer = settings().producer().create().unwrap();
    let t0 = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let mut sent = Vec::new();
    for i in 0..30u64 {
        let mut frame = examples::frame(1 + i % 3, 2, 4);
        frame.seq = i / 3;
        let ts = t0 + i as i64 * 10_000;
        let key = encode(&frame.key()).unwrap();
        let value = encode(&frame).unwrap();
        producer
            .send(
                BaseRecord::to(&frames_topic)
                    .key(&key)
                    .payload(&value)
                    .timestamp(ts),
            )
            .unwrap();
        sent.push((ts, frame.session_id.to_string(), frame.seq));
    }
    for seed in 1..=3u64 {
        let mut state = examples::session_state(seed);
        state.started_at = Timestamp::from_micros((t0 + (seed as i64 - 1) * 10_000) * 1000);
        let key = encode(&state.key()).unwrap();
        let value = encode(&state).unwrap();
        producer
            .send(BaseRecord::to(&sessions_topic).key(&key).payload(&value))
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    // By time: [t0 + 50 s, t0 + 150 s) holds frames 5 to 14.
    let time = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339()
    };
    let (code, out, err) = run(
        &prefix,
        &[
            "consume",
            "eeg.frames",
            "--from",
            &time(t0 + 50_000),
            "--to",
            &time(t0 + 150_000),
            "--format",
            "ndjson",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let mut got: Vec<(i64, String, u64)> = lines(&out)
        .iter()
        .map(|r| {
            assert_eq!(r["schema"], "eeg_frame/v1");
            let ts = chrono::DateTime::parse_from_rfc3339(r["timestamp"].as_str().unwrap())
                .unwrap()
                .timestamp_millis();
            (
                ts,
                r["value"]["session_id"].as_str().unwrap().to_owned(),
                r["value"]["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(got, sent[5..15].to_vec());
    assert!(err.contains("10 record(s)"), "{err}");
    let sample = &lines(&out)[0]["value"]["samples"];
    assert_eq!(sample.as_array().unwrap().len(), 2, "one array per channel");

    // By session: all of session 2's frames and nothing else, its start found in
    // eeg.sessions; the key is decoded too.
    let session = sent[1].1.clone();
    let (code, out, err) = run(
        &prefix,
        &[
            "consume",
            "eeg.frames",
            "--session",
            &session,
            "--format",
            "ndjson",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let records = lines(&out);
    assert_eq!(records.len(), 10, "{err}");
    assert!(records
        .iter()
        .all(|r| r["key"]["session_id"] == session.as_str()));
    let mut seqs: Vec<u64> = records
        .iter()
        .map(|r| r["value"]["seq"].as_u64().unwrap())
        .collect();
    seqs.sort();
    assert_eq!(seqs, (0..10).collect::<Vec<_>>());
    assert!(err.contains("20 filtered out"), "{err}");

    // A duration back, a limit, one partition.
    let (code, out, _) = run(
        &prefix,
        &[
            "consume",
            "eeg.frames",
            "--from",
            "-2h",
            "--limit",
            "3",
            "--format",
            "ndjson",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(lines(&out).len(), 3);

    // Clear errors.
    let (code, _, err) = run(&prefix, &["consume", "no.such.topic"]);
    assert_eq!(code, 1);
    assert!(err.contains("no topic no.such.topic"), "{err}");
    let (code, _, err) = run(&prefix, &["consume", "eeg.frames", "--from", "yesterday"]);
    assert_eq!(code, 1);
    assert!(err.contains("is not earliest, latest, an offset"), "{err}");
    let (code, _, err) = run(&prefix, &["consume", "eeg.frames", "--partition", "99"]);
    assert_eq!(code, 1);
    assert!(err.contains("no partition 99"), "{err}");
    let unknown = uuid::Uuid::new_v4().to_string();
    let (code, _, err) = run(&prefix, &["consume", "eeg.frames", "--session", &unknown]);
    assert_eq!(code, 1);
    assert!(err.contains("is not in"), "{err}");
}

#[test]
fn diff_exits_3_when_outputs_differ_beyond_the_tolerance_and_0_when_not() {
    let prefix = format!("diff-{}.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let topics = Topics::new(&prefix);
    Admin::connect(&settings())
        .unwrap()
        .ensure(&topics, Replication::Auto)
        .unwrap();
    // Two copies of ten windows: the second with one window's total power moved by
    // 1e-3 relative and one window missing.
    let a = topics.name(&clisonix_topics::catalog::EEG_FEATURES);
    let copy = Topics::new(format!("{prefix}copy."));
    let same = Topics::new(format!("{prefix}same."));
    for t in [&copy, &same] {
        Admin::connect(&settings())
            .unwrap()
            .ensure(t, Replication::Auto)
            .unwrap();
    }
    let b = copy.name(&clisonix_topics::catalog::EEG_FEATURES);
    let c = same.name(&clisonix_topics::catalog::EEG_FEATURES);
    let producer: BaseProducer = settings().producer().create().unwrap();
    for seed in 0..10u64 {
        let mut f = examples::features(seed);
        f.window_index = seed;
        let key = encode(&f.key()).unwrap();
        for (topic, f) in [(&a, f.clone()), (&c, f.clone())] {
            producer
                .send(
                    BaseRecord::to(topic)
                        .key(&key)
                        .payload(&encode(&f).unwrap()),
                )
                .unwrap();
        }
        if seed == 9 {
            continue;
        }
        if seed == 3 {
            f.total_abs = f.total_abs.map(|t| t * 1.001);
        }
        producer
            .send(BaseRecord::to(&b).key(&key).payload(&encode(&f).unwrap()))
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let (code, out, err) = run(&prefix, &["diff", "eeg.features", &b, "--relative", "1e-6"]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        out.contains("only in A 1, only in B 0, in both 9, of which 1 differ"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("total_abs") && l.contains(" 1 ")),
        "{out}"
    );
    // Within a looser tolerance the change is not one; the missing window still is.
    let (code, out, _) = run(
        &prefix,
        &["diff", "eeg.features", &b, "--relative", "1e-2", "--json"],
    );
    assert_eq!(code, 3);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (
            v["report"]["changed"].as_u64(),
            v["report"]["only_in_a"].as_u64()
        ),
        (Some(0), Some(1))
    );
    // The same records: 0.
    let (code, out, err) = run(&prefix, &["diff", "eeg.features", &c]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("SAME within the tolerance"), "{out}");
    // An unknown topic: a clear error.
    let (code, _, err) = run(&prefix, &["diff", "eeg.features", "no.such.features"]);
    assert_eq!(code, 1);
    assert!(err.contains("no topic no.such.features"), "{err}");
}
