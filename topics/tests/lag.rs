//! `clisonix-topics lag` against the real broker (`./dev test`): a group nobody
//! consumes for is STOP, one that consumes slower than records arrive is WARN, and the
//! lag in seconds is the age of the oldest record not yet consumed.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clisonix_topics::{Admin, KafkaSettings, Replication, Topics};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

fn settings() -> KafkaSettings {
    KafkaSettings::new(
        std::env::var("CLISONIX_KAFKA_BOOTSTRAP")
            .expect("CLISONIX_KAFKA_BOOTSTRAP is not set: run the tests with ./dev test"),
        "lag-test",
    )
}

fn lag(prefix: &str, group: &str) -> (i32, Value, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_clisonix-topics"))
        .args(["--bootstrap", &settings().bootstrap, "--prefix", prefix])
        .args(["lag", group, "--window", "4s", "--json"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    let err = String::from_utf8_lossy(&output.stderr).into_owned();
    let v = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
    (output.status.code().unwrap_or(-1), v, err)
}

#[test]
fn a_stopped_group_is_stop_a_slow_one_warn_with_the_lag_in_seconds() {
    let prefix = format!("lag-{}.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let topics = Topics::new(&prefix);
    Admin::connect(&settings())
        .unwrap()
        .ensure(&topics, Replication::Auto)
        .unwrap();
    let topic = topics.name(&clisonix_topics::catalog::USAGE_EVENTS);

    // 100 records on partition 0, written over the ten seconds from two minutes ago.
    let t0 = chrono::Utc::now().timestamp_millis() - 120_000;
    let producer: BaseProducer = settings().producer().create().unwrap();
    for i in 0..100i64 {
        producer
            .send(
                BaseRecord::<[u8], [u8]>::to(&topic)
                    .partition(0)
                    .payload(b"x")
                    .timestamp(t0 + i * 100),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    // A group that read half and is gone: STOP, 50 behind, the oldest unread record
    // written 115 s ago.
    let stopped = format!("{prefix}stopped");
    let c: BaseConsumer = settings().consumer(&stopped).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(50))
        .unwrap();
    c.commit(&tpl, CommitMode::Sync).unwrap();
    drop(c);
    let (code, v, err) = lag(&prefix, &stopped);
    assert_eq!(code, 3, "not OK: {err}");
    assert_eq!(v["status"], "STOP", "{v}");
    let p = &v["partitions"][0];
    assert_eq!(
        (
            p["committed"].as_i64(),
            p["end"].as_i64(),
            p["lag"].as_i64()
        ),
        (Some(50), Some(100), Some(50))
    );
    let truth = (chrono::Utc::now().timestamp_millis() - (t0 + 50 * 100)) as f64 / 1000.0;
    let seconds = p["lag_seconds"].as_f64().unwrap();
    assert!(
        (seconds - truth).abs() < 3.0,
        "{seconds} s reported, {truth} s true"
    );

    // A group that consumes 5 records a second while 20 a second arrive: WARN.
    let slow = format!("{prefix}slow");
    let stop = Arc::new(AtomicBool::new(false));
    let consumed = Arc::new(AtomicI64::new(-1));
    let consumer = {
        let (stop, consumed, topic, slow) =
            (stop.clone(), consumed.clone(), topic.clone(), slow.clone());
        std::thread::spawn(move || {
            let c: BaseConsumer = settings().consumer(&slow).create().unwrap();
            c.subscribe(&[&topic]).unwrap();
            while !stop.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                    c.commit_message(&m, CommitMode::Sync).unwrap();
                    consumed.store(m.offset(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        })
    };
    let writer = {
        let (stop, topic) = (stop.clone(), topic.clone());
        std::thread::spawn(move || {
            let producer: BaseProducer = settings().producer().create().unwrap();
            while !stop.load(Ordering::Relaxed) {
                producer
                    .send(
                        BaseRecord::<[u8], [u8]>::to(&topic)
                            .partition(0)
                            .payload(b"y"),
                    )
                    .unwrap();
                producer.poll(Duration::ZERO);
                std::thread::sleep(Duration::from_millis(50));
            }
            producer.flush(Duration::from_secs(10)).unwrap();
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while consumed.load(Ordering::Relaxed) < 0 {
        assert!(Instant::now() < deadline, "the slow consumer never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, v, err) = lag(&prefix, &slow);
    let at = consumed.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    consumer.join().unwrap();
    writer.join().unwrap();
    assert_eq!(code, 3, "{err}");
    assert_eq!(v["status"], "WARN", "{v}");
    assert_eq!(v["state"], "Stable", "{v}");
    assert_eq!(v["members"].as_array().unwrap().len(), 1, "{v}");
    let p = &v["partitions"][0];
    let committed = p["committed"].as_i64().unwrap();
    assert!(
        committed > 0 && committed <= at + 1,
        "{committed} (consumed to {at})"
    );
    let truth = (chrono::Utc::now().timestamp_millis() - (t0 + committed * 100)) as f64 / 1000.0;
    let seconds = p["lag_seconds"].as_f64().unwrap();
    assert!(
        (seconds - truth).abs() < 3.0,
        "{seconds} s reported, {truth} s true"
    );

    // A stage that keeps a session open commits the oldest record it still needs, and
    // how far its outputs are out in the metadata: that is its position.
    let stage = format!("{prefix}stage");
    let c: BaseConsumer = settings().consumer(&stage).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(10))
        .unwrap();
    tpl.find_partition(&topic, 0)
        .unwrap()
        .set_metadata("emitted_through=59");
    c.commit(&tpl, CommitMode::Sync).unwrap();
    drop(c);
    let (_, v, err) = lag(&prefix, &stage);
    assert_eq!(v["partitions"][0]["committed"], 60, "{v}{err}");

    // Transactional output: a group past the last record is caught up, whatever
    // transaction markers follow it.
    let tx_topic = topics.name(&clisonix_topics::catalog::EEG_SESSIONS);
    let producer: BaseProducer = settings()
        .producer()
        .set("transactional.id", format!("{prefix}tx"))
        .create()
        .unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    let mut last = 0;
    for _ in 0..3 {
        producer.begin_transaction().unwrap();
        producer
            .send(
                BaseRecord::<[u8], [u8]>::to(&tx_topic)
                    .partition(0)
                    .key(b"k")
                    .payload(b"z"),
            )
            .unwrap();
        producer
            .commit_transaction(Duration::from_secs(30))
            .unwrap();
        last += 2; // the record and its transaction's marker
    }
    let done = format!("{prefix}done");
    let c: BaseConsumer = settings().consumer(&done).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&tx_topic, 0, Offset::Offset(last - 1))
        .unwrap();
    c.commit(&tpl, CommitMode::Sync).unwrap();
    drop(c);
    let (code, v, err) = lag(&prefix, &done);
    assert_eq!(code, 0, "{v}{err}");
    assert_eq!(
        (v["status"].as_str(), v["lag"].as_i64()),
        (Some("OK"), Some(0)),
        "{v}"
    );

    // Unknown groups are a clear error.
    let (code, _, err) = lag(&prefix, "no-such-group");
    assert_eq!(code, 1);
    assert!(err.contains("no consumer group no-such-group"), "{err}");
}
