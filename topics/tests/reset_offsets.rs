//! `clisonix-topics reset-offsets` against the real broker (`./dev test`): the plan
//! changes nothing, --execute moves exactly as planned, a group with live members is
//! refused, and an exported plan applies later.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clisonix_topics::{Admin, KafkaSettings, Replication, Topics};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

fn settings() -> KafkaSettings {
    KafkaSettings::new(
        std::env::var("CLISONIX_KAFKA_BOOTSTRAP")
            .expect("CLISONIX_KAFKA_BOOTSTRAP is not set: run the tests with ./dev test"),
        "reset-test",
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

fn committed(group: &str, topic: &str) -> Vec<i64> {
    let c: BaseConsumer = settings().consumer(group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(topic, p);
    }
    c.committed_offsets(tpl, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|e| e.offset().to_raw().unwrap_or(-1))
        .collect()
}

#[test]
fn plans_change_nothing_execute_moves_exactly_and_live_groups_are_refused() {
    let prefix = format!("reset-{}.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let topics = Topics::new(&prefix);
    Admin::connect(&settings())
        .unwrap()
        .ensure(&topics, Replication::Auto)
        .unwrap();
    let topic = topics.name(&clisonix_topics::catalog::USAGE_EVENTS);
    // 100 records on each of the 3 partitions, record i written at t0 + i s.
    let t0 = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let producer: BaseProducer = settings().producer().create().unwrap();
    for p in 0..3 {
        for i in 0..100i64 {
            producer
                .send(
                    BaseRecord::<[u8], [u8]>::to(&topic)
                        .partition(p)
                        .payload(b"x")
                        .timestamp(t0 + i * 1000),
                )
                .unwrap();
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let group = format!("{prefix}stage");
    let c: BaseConsumer = settings().consumer(&group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for (p, o) in [(0, 80), (1, 90), (2, 100)] {
        tpl.add_partition_offset(&topic, p, Offset::Offset(o))
            .unwrap();
    }
    c.commit(&tpl, CommitMode::Sync).unwrap();
    drop(c);

    // A plan: printed, nothing moves.
    let (code, out, err) = run(&prefix, &["reset-offsets", &group, "--shift-by", "-30"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("nothing changes without --execute"), "{out}");
    assert!(
        out.contains("80") && out.contains("50") && out.contains("-30"),
        "{out}"
    );
    assert_eq!(committed(&group, &topic), [80, 90, 100]);

    // Executed: exactly the plan. To a time: the first record at or after it.
    let at = chrono::DateTime::from_timestamp_millis(t0 + 42_500)
        .unwrap()
        .to_rfc3339();
    let (code, out, err) = run(
        &prefix,
        &["reset-offsets", &group, "--to-datetime", &at, "--execute"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 partition(s) moved"), "{out}");
    assert_eq!(committed(&group, &topic), [43, 43, 43]);

    // Exported, then applied from the file; offsets beyond the end are clamped.
    let file = std::env::temp_dir().join(format!("{}plan.json", prefix));
    let (code, _, err) = run(
        &prefix,
        &[
            "reset-offsets",
            &group,
            "--to-offset",
            "500",
            "--export",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        committed(&group, &topic),
        [43, 43, 43],
        "exporting changes nothing"
    );
    let (code, _, err) = run(
        &prefix,
        &[
            "reset-offsets",
            &group,
            "--from-file",
            file.to_str().unwrap(),
            "--execute",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(committed(&group, &topic), [100, 100, 100]);
    let (code, _, err) = run(
        &prefix,
        &[
            "reset-offsets",
            "another",
            "--from-file",
            file.to_str().unwrap(),
            "--execute",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("the plan is for group"), "{err}");

    // A live member: refused, nothing moves.
    let stop = Arc::new(AtomicBool::new(false));
    let member = {
        let (stop, topic, group) = (stop.clone(), topic.clone(), group.clone());
        std::thread::spawn(move || {
            let c: BaseConsumer = settings().consumer(&group).create().unwrap();
            c.subscribe(&[&topic]).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let _ = c.poll(Duration::from_millis(100));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while clisonix_topics::offsets::members(&settings(), &group)
        .unwrap()
        .1
        == 0
    {
        assert!(Instant::now() < deadline, "the member never joined");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, _, err) = run(
        &prefix,
        &["reset-offsets", &group, "--to-earliest", "--execute"],
    );
    stop.store(true, Ordering::Relaxed);
    member.join().unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("1 live member(s)"), "{err}");
    assert_eq!(committed(&group, &topic), [100, 100, 100]);

    // Bad arguments.
    let (code, _, _) = run(&prefix, &["reset-offsets", &group]);
    assert_eq!(code, 2, "a target is required");
    let (code, _, _) = run(
        &prefix,
        &["reset-offsets", &group, "--to-earliest", "--to-latest"],
    );
    assert_eq!(code, 2, "one target");
    let (code, _, err) = run(&prefix, &["reset-offsets", &group, "--by-duration", "1h"]);
    assert_eq!(code, 1);
    assert!(err.contains("a duration back"), "{err}");
    let _ = std::fs::remove_file(file);
}
