//! The broker stops mid-stream: clients are pushed back (503 with `Retry-After`,
//! retryable refusals on the WebSocket) and, once it is back, every acknowledged
//! frame is in `eeg.frames`. This test runs a private Kafka node of its own (the
//! cached server, on free ports) so that stopping it disturbs no other test.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clisonix_dev::kafka::{KafkaNode, VERSION};
use clisonix_dev::stack::cache_dir;
use clisonix_e2e::{free_port, TestEnv};
use clisonix_player::http::Format;
use clisonix_player::stream::{stream_frames, Progress, StreamOptions};
use clisonix_schemas::SessionId;
use clisonix_topics::KafkaSettings;
use common::{frames, TestIngest};

/// Frames the device sends ahead without an answer.
const WINDOW: usize = 512;

/// Stops the private broker and deletes its data however the test ends.
struct NodeGuard(KafkaNode);

impl Drop for NodeGuard {
    fn drop(&mut self) {
        let _ = self.0.stop();
        let _ = std::fs::remove_dir_all(&self.0.dir);
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_broker_stops_clients_are_pushed_back_and_nothing_acknowledged_is_lost() {
    let dir = std::env::temp_dir().join(TestEnv::unique("clisonix-outage-kafka"));
    let node = KafkaNode {
        dir,
        cache: cache_dir().unwrap().join(format!("kafka-{VERSION}")),
        port: free_port(),
        controller_port: free_port(),
        java_options: Vec::new(),
    };
    let guard = NodeGuard(node.clone());
    let n = node.clone();
    blocking(move || n.start())
        .await
        .expect("the private broker starts");
    let mut env = TestEnv::get();
    env.kafka = KafkaSettings::new(node.bootstrap(), "alba-outage-test");
    let topics = env.topics();
    env.create_catalog(&topics).await;
    let t = TestIngest::spawn_on(env, topics, |c| {
        c.publish_timeout = Duration::from_secs(2);
        c.retry_after = Duration::from_secs(1);
    })
    .await;

    // A device streams 1000 frames at 100 frames/s over WebSocket.
    let session = SessionId::random();
    let sent = frames(session, 1000, 8, 32);
    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let (url, key, p) = (t.url.clone(), t.tenant.key.clone(), progress.clone());
    let device = tokio::spawn(async move {
        // As a real-time device streams: a frame per message, many in flight (the
        // player's defaults), so that hundreds of frames sent before the device hears
        // of the outage are held back after it.
        let options = StreamOptions {
            window: WINDOW,
            max_batch: 1,
            ..Default::default()
        };
        stream_frames(
            &url,
            &key,
            &sent,
            |i| start + Duration::from_millis(10 * i as u64),
            &options,
            Some(p),
        )
        .await
    });
    while progress.acked.load(Ordering::Relaxed) < 200 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the stream did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n = node.clone();
    blocking(move || n.stop()).await.unwrap();
    let acked_at_stop = progress.acked.load(Ordering::Relaxed);

    // An HTTP client meanwhile gets 503 with Retry-After, for every frame.
    let other = frames(SessionId::random(), 3, 8, 32);
    let mut client = t.client();
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let a = client.post_frames(&other, Format::Binary).await.unwrap();
        if a.status == 503 {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no 503 while the broker is down: {}",
            a.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(refused.retry_after().is_some(), "503 carries Retry-After");
    let b = refused.batch().unwrap();
    assert_eq!(b.accepted, 0);
    assert!(b
        .results
        .iter()
        .all(|r| r.error.as_ref().unwrap().code == "broker_unavailable"));
    assert_eq!(
        client.get("/ready").await.unwrap().status,
        503,
        "not ready without a broker"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked_during = progress.acked.load(Ordering::Relaxed) - acked_at_stop;

    let n = node.clone();
    blocking(move || n.start())
        .await
        .expect("the broker starts again");
    let back = Instant::now();
    let stats = tokio::time::timeout(Duration::from_secs(120), device)
        .await
        .expect("the stream finishes once the broker is back")
        .unwrap()
        .expect("the device streamed everything");
    // The backlog drains at once: the device is done soon after the broker is back
    // (or after its last frame was due, if that is later).
    let due = start + Duration::from_millis(10 * 1000);
    let drained = Instant::now().saturating_duration_since(back.max(due));
    eprintln!("outage: the backlog drained {drained:?} after the broker was back");
    assert!(
        drained < Duration::from_secs(10),
        "the backlog took {drained:?} after the broker was back"
    );
    assert!(stats.rejected.is_empty(), "{:?}", stats.rejected);
    assert_eq!(
        stats.acked + stats.duplicates + stats.resumed,
        1000,
        "{stats:?}"
    );
    assert!(
        stats.resent > 0,
        "the device was pushed back and resent: {stats:?}"
    );
    assert!(
        acked_during <= WINDOW as u64,
        "frames were acknowledged while the broker was down: {acked_during}"
    );

    // Every frame is in the topic; count any published twice.
    let consumer = t.frames_consumer();
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 1000 {
        assert!(
            Instant::now() < deadline,
            "only {} distinct frames arrived",
            seen.len()
        );
        for (_, f) in t.read_frames(&consumer, 1).await {
            if f.session_id == session {
                *seen.entry(f.seq).or_default() += 1;
            }
        }
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..1000).collect::<Vec<_>>()
    );
    let twice = seen.values().filter(|&&c| c > 1).count();
    eprintln!(
        "outage: {} acknowledged, {} resent, {} reconnects; frames published twice: {twice}",
        stats.acked, stats.resent, stats.reconnects
    );
    t.stop().await;
    blocking(move || drop(guard)).await;
}
