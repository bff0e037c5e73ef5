//! The catalog applied to the real broker: creation is idempotent, a conflicting
//! existing topic is reported and left alone, describe reports watermarks.

use clisonix_e2e::TestEnv;
use clisonix_topics::catalog::*;
use clisonix_topics::{Outcome, Replication, CATALOG};

fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    tokio::task::spawn_blocking(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_the_topics_twice_is_a_no_op() {
    let env = TestEnv::get();
    let topics = env.topics();
    let (e, t) = (env.clone(), topics.clone());
    let (first, second, described) = blocking(move || {
        let admin = e.admin();
        let first = admin.ensure(&t, Replication::Auto).unwrap();
        let second = admin.ensure(&t, Replication::Auto).unwrap();
        let described = admin.describe(&t, &[]).unwrap();
        (first, second, described)
    })
    .await
    .unwrap();
    assert_eq!(first.len(), CATALOG.len());
    assert!(
        first
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Created { replication: 1 })),
        "{first:?}"
    );
    assert!(
        second.iter().all(|r| r.outcome == Outcome::Unchanged),
        "{second:?}"
    );
    for (d, spec) in described.iter().zip(CATALOG.iter()) {
        assert_eq!(d.topic, topics.name(spec));
        let partitions = d.partitions.as_ref().expect("the topic exists");
        assert_eq!(partitions.len(), spec.partitions as usize);
        assert_eq!(d.configs["cleanup.policy"], spec.cleanup.as_str());
        assert_eq!(
            d.configs["retention.ms"],
            spec.retention_ms.unwrap_or(-1).to_string()
        );
    }
    env.delete_topics(topics.prefix()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_existing_topic_is_reported_and_left_alone() {
    let env = TestEnv::get();
    let topics = env.topics();
    env.create_topic(&topics.name(&EEG_FRAMES), 2, &[("retention.ms", "3600000")])
        .await;
    env.create_topic(
        &topics.name(&EEG_SESSIONS),
        EEG_SESSIONS.partitions,
        &[("cleanup.policy", "delete")],
    )
    .await;
    let (e, t) = (env.clone(), topics.clone());
    let (reports, frames) = blocking(move || {
        let admin = e.admin();
        let reports = admin.ensure(&t, Replication::Auto).unwrap();
        let frames = admin.describe(&t, &[t.name(&EEG_FRAMES)]).unwrap();
        (reports, frames)
    })
    .await
    .unwrap();
    let outcome = |spec: &TopicSpec| {
        reports
            .iter()
            .find(|r| r.topic == topics.name(spec))
            .map(|r| r.outcome.clone())
            .unwrap()
    };
    let Outcome::Conflict(diffs) = outcome(&EEG_FRAMES) else {
        panic!("eeg.frames conflicts: {reports:?}");
    };
    let settings: Vec<(&str, &str, &str)> = diffs
        .iter()
        .map(|d| (d.setting.as_str(), d.expected.as_str(), d.actual.as_str()))
        .collect();
    assert!(settings.contains(&("partitions", "6", "2")), "{settings:?}");
    assert!(
        settings.contains(&("retention.ms", "604800000", "3600000")),
        "{settings:?}"
    );
    let Outcome::Conflict(diffs) = outcome(&EEG_SESSIONS) else {
        panic!("eeg.sessions conflicts: {reports:?}");
    };
    assert!(diffs
        .iter()
        .any(|d| d.setting == "cleanup.policy" && d.actual == "delete"));
    assert!(matches!(outcome(&EEG_FEATURES), Outcome::Created { .. }));
    // Nothing was changed on the conflicting topic.
    assert_eq!(frames[0].partitions.as_ref().unwrap().len(), 2);
    assert_eq!(frames[0].configs["retention.ms"], "3600000");
    env.delete_topics(topics.prefix()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_reports_partition_watermarks() {
    let env = TestEnv::get();
    let topics = env.topics();
    env.create_catalog(&topics).await;
    let producer = env.producer();
    let topic = topics.name(&USAGE_EVENTS);
    for i in 0..7u64 {
        let event = clisonix_schemas::examples::usage_event(i % 2);
        let key = clisonix_schemas::encode(&event.key()).unwrap();
        let value = clisonix_schemas::encode(&event).unwrap();
        env.produce(&producer, &topic, &key, &value).await;
    }
    let (e, t, name) = (env.clone(), topics.clone(), topic.clone());
    let described = blocking(move || e.admin().describe(&t, &[name]).unwrap())
        .await
        .unwrap();
    let d = &described[0];
    assert_eq!(d.retained_records(), 7);
    let partitions = d.partitions.as_ref().unwrap();
    assert_eq!(partitions.iter().map(|p| p.high).sum::<i64>(), 7);
    assert!(partitions.iter().all(|p| p.low == 0 && p.leader == 1));
    // Two tenants, so at most two partitions hold records.
    assert!(partitions.iter().filter(|p| p.high > 0).count() <= 2);
    env.delete_topics(topics.prefix()).await;
}
