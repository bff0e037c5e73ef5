//! Every record type through the real broker: produced with rdkafka, consumed by a
//! consumer group, decoded and compared with what was sent.

use std::collections::HashMap;
use std::fmt::Debug;
use std::time::Duration;

use clisonix_e2e::{Received, TestEnv};
use clisonix_schemas::{decode, encode, examples, AvroRecord};
use clisonix_topics::catalog::*;
use clisonix_topics::CATALOG;

/// Encoded (key, value) by (partition, offset).
type Sent = HashMap<(i32, i64), (Vec<u8>, Vec<u8>)>;

/// Sends `(key, value)` records to `topic`, returning what each should decode back to,
/// by offset.
async fn send<K: AvroRecord, V: AvroRecord>(
    env: &TestEnv,
    topic: &str,
    records: &[(K, V)],
) -> Sent {
    let producer = env.producer();
    let mut sent = HashMap::new();
    for (k, v) in records {
        let (key, value) = (encode(k).unwrap(), encode(v).unwrap());
        let position = env.produce(&producer, topic, &key, &value).await;
        sent.insert(position, (key, value));
    }
    sent
}

fn check<K, V>(received: &[Received], topic: &str, records: &[(K, V)], sent: &Sent)
where
    K: AvroRecord + PartialEq + Debug,
    V: AvroRecord + PartialEq + Debug,
{
    let mine: Vec<&Received> = received.iter().filter(|r| r.topic == topic).collect();
    assert_eq!(
        mine.len(),
        records.len(),
        "{topic}: every record arrives once"
    );
    for r in mine {
        let (key, value) = &sent[&(r.partition, r.offset)];
        assert_eq!(&r.key, key, "{topic}: key bytes unchanged");
        assert_eq!(&r.value, value, "{topic}: value bytes unchanged");
        let k: K = decode(&r.key).expect("key decodes");
        let v: V = decode(&r.value).expect("value decodes");
        assert!(
            records.iter().any(|(ek, ev)| *ek == k && *ev == v),
            "{topic}: decoded record was sent: {k:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_type_round_trips_through_the_broker() {
    let env = TestEnv::get();
    let topics = env.topics();
    env.create_catalog(&topics).await;

    let frames: Vec<_> = (0..12)
        .map(|i| {
            let mut f = examples::frame(i % 3, 32, 32);
            f.seq = i / 3;
            (f.key(), f)
        })
        .collect();
    let features: Vec<_> = (0..10)
        .map(|i| (examples::features(i).key(), examples::features(i)))
        .collect();
    let audio: Vec<_> = (0..5)
        .map(|i| (examples::audio_chunk(i).key(), examples::audio_chunk(i)))
        .collect();
    let sessions: Vec<_> = (0..5)
        .map(|i| (examples::session_state(i).key(), examples::session_state(i)))
        .collect();
    let usage: Vec<_> = (0..8)
        .map(|i| (examples::usage_event(i).key(), examples::usage_event(i)))
        .collect();
    let dead: Vec<_> = (0..4)
        .map(|i| (examples::dead_letter(i).key(), examples::dead_letter(i)))
        .collect();

    // One topic of each catalog entry, in catalog order (frames first, dead letters last).
    let names: Vec<String> = CATALOG.iter().map(|spec| topics.name(spec)).collect();
    assert_eq!(CATALOG[0], EEG_FRAMES);
    assert_eq!(CATALOG[5], DEAD_LETTERS);
    let mut sent = HashMap::new();
    sent.extend(
        send(&env, &names[0], &frames)
            .await
            .into_iter()
            .map(|(p, r)| ((0, p), r)),
    );
    sent.extend(
        send(&env, &names[1], &features)
            .await
            .into_iter()
            .map(|(p, r)| ((1, p), r)),
    );
    sent.extend(
        send(&env, &names[2], &audio)
            .await
            .into_iter()
            .map(|(p, r)| ((2, p), r)),
    );
    sent.extend(
        send(&env, &names[3], &sessions)
            .await
            .into_iter()
            .map(|(p, r)| ((3, p), r)),
    );
    sent.extend(
        send(&env, &names[4], &usage)
            .await
            .into_iter()
            .map(|(p, r)| ((4, p), r)),
    );
    sent.extend(
        send(&env, &names[5], &dead)
            .await
            .into_iter()
            .map(|(p, r)| ((5, p), r)),
    );
    let by_topic = |t: usize| -> Sent {
        sent.iter()
            .filter(|((i, _), _)| *i == t)
            .map(|((_, p), r)| (*p, r.clone()))
            .collect()
    };

    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let consumer = env.consumer(&refs);
    let total =
        frames.len() + features.len() + audio.len() + sessions.len() + usage.len() + dead.len();
    let received = env.consume(&consumer, total, Duration::from_secs(60)).await;

    check(&received, &names[0], &frames, &by_topic(0));
    check(&received, &names[1], &features, &by_topic(1));
    check(&received, &names[2], &audio, &by_topic(2));
    check(&received, &names[3], &sessions, &by_topic(3));
    check(&received, &names[4], &usage, &by_topic(4));
    check(&received, &names[5], &dead, &by_topic(5));

    // Frames are keyed by session: each session's frames share a partition, in seq order.
    let mut per_session: HashMap<Vec<u8>, Vec<&Received>> = HashMap::new();
    for r in received.iter().filter(|r| r.topic == names[0]) {
        per_session.entry(r.key.clone()).or_default().push(r);
    }
    assert_eq!(per_session.len(), 3);
    for records in per_session.values() {
        assert!(records.iter().all(|r| r.partition == records[0].partition));
        let seqs: Vec<u64> = records
            .iter()
            .map(|r| decode::<clisonix_schemas::Frame>(&r.value).unwrap().seq)
            .collect();
        assert_eq!(seqs, vec![0, 1, 2, 3]);
    }
    env.delete_topics(topics.prefix()).await;
}
