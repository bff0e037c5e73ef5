//! Albi's end-to-end throughput from the broker: frames already in `eeg.frames`,
//! consumed, windowed, computed, produced to `eeg.features` and committed in
//! transactions, in frames/s. Needs the stack (`./dev up`, then `eval "$(./dev env)"`).
//!
//! Then the same frames replayed (`clisonix-stage --replay`) into a run's own topics:
//! the replay's rate against the live stage's, wall-clock and CPU of this process.
//!
//! Run: `cargo bench -p clisonix-stage-runtime --bench throughput`

use std::time::{Duration, Instant};

use clisonix_albi::{Albi, AlbiConfig};
use clisonix_schemas::{encode, examples, SessionId, TenantId};
use clisonix_stage_runtime::{replay, run, Health, ReplaySpec, RuntimeConfig};
use clisonix_topics::catalog::EEG_FRAMES;
use clisonix_topics::{Admin, KafkaSettings, Replication, Topics};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

const SESSIONS: u64 = 12;
const FRAMES_PER_SESSION: u64 = 1200; // 150 s of 1/8 s frames

fn main() {
    let bootstrap = std::env::var("CLISONIX_KAFKA_BOOTSTRAP")
        .expect("run against the stack: ./dev up && eval \"$(./dev env)\"");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for (fs, channels) in [(128u32, 32usize), (256, 32)] {
            bench(&bootstrap, fs, channels).await;
        }
    });
}

async fn bench(bootstrap: &str, fs: u32, channels: usize) {
    let kafka = KafkaSettings::new(bootstrap, "albi-bench");
    let topics = Topics::new(format!(
        "bench-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    {
        let (k, t) = (kafka.clone(), topics.clone());
        tokio::task::spawn_blocking(move || {
            Admin::connect(&k)
                .unwrap()
                .ensure(&t, Replication::Auto)
                .unwrap()
        })
        .await
        .unwrap();
    }
    let producer: FutureProducer = kafka.producer().create().unwrap();
    let topic = topics.name(&EEG_FRAMES);
    let samples = fs / 8;
    let mut deliveries = Vec::new();
    let tenant = TenantId::random();
    let sessions: Vec<SessionId> = (0..SESSIONS).map(|_| SessionId::random()).collect();
    for seq in 0..FRAMES_PER_SESSION {
        for session in &sessions {
            let mut f = examples::frame(seq, channels, samples);
            f.tenant_id = tenant;
            f.session_id = *session;
            f.seq = seq;
            f.sample_rate_hz = f64::from(fs);
            let (k, v) = (encode(&f.key()).unwrap(), encode(&f).unwrap());
            loop {
                match producer.send_result(FutureRecord::to(&topic).key(&k).payload(&v)) {
                    Ok(d) => {
                        deliveries.push(d);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                }
            }
        }
    }
    for d in deliveries {
        d.await.unwrap().unwrap();
    }
    let frames = SESSIONS * FRAMES_PER_SESSION;
    let windows_per_session = FRAMES_PER_SESSION * u64::from(samples) / (2 * u64::from(fs));
    let expected = SESSIONS * windows_per_session * channels as u64;

    let health = Health::default();
    let shutdown = CancellationToken::new();
    let config = RuntimeConfig {
        kafka: kafka.clone(),
        topics: topics.clone(),
        group: format!("{}albi", topics.prefix()),
        instance_id: "bench".into(),
        batch_max: 500,
        batch_linger: Duration::from_millis(20),
    };
    let task = tokio::spawn(run(
        Albi::new(AlbiConfig::default()),
        config,
        health.clone(),
        shutdown.clone(),
    ));
    let out = health.metrics.records_out.with_label_values(&[
        "albi",
        &topics.name(&clisonix_topics::catalog::EEG_FEATURES),
    ]);
    let records_in = health.metrics.records_in.with_label_values(&["albi"]);
    // Time from the first record consumed to the last feature committed.
    while records_in.get() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let start = Instant::now();
    let cpu_start = cpu_seconds();
    let committed = health
        .metrics
        .transactions
        .with_label_values(&["albi", "committed"]);
    let mut seen_all_at = None;
    loop {
        if out.get() >= expected && seen_all_at.is_none() {
            seen_all_at = Some(committed.get());
        }
        // Done once a transaction committed after the last output was produced.
        if seen_all_at.is_some_and(|c| committed.get() > c)
            || (out.get() >= expected && records_in.get() >= frames)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    let live_cpu = cpu_seconds() - cpu_start;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let bytes = frames * (channels as u64) * u64::from(samples) * 4;
    println!(
        "albi end to end, {fs} Hz x {channels} ch, 1/8 s frames: {frames} frames ({:.1} MB samples) -> {expected} feature records in {:.2} s: {:.0} frames/s, {:.0} channel-windows/s, {:.0}x real time per stage instance",
        bytes as f64 / 1e6,
        elapsed.as_secs_f64(),
        frames as f64 / elapsed.as_secs_f64(),
        expected as f64 / elapsed.as_secs_f64(),
        (frames as f64 / 8.0) / elapsed.as_secs_f64(),
    );
    println!(
        "  live: {:.1} MB/s of samples, {:.1} us of this process's CPU per frame",
        bytes as f64 / 1e6 / elapsed.as_secs_f64(),
        live_cpu * 1e6 / frames as f64
    );

    // The same frames replayed: bounded, into the run's own topics.
    let config = RuntimeConfig {
        kafka: kafka.clone(),
        topics: topics.clone(),
        group: "unused".into(),
        instance_id: "bench".into(),
        batch_max: 500,
        batch_linger: Duration::from_millis(20),
    };
    let spec = ReplaySpec {
        run: format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..6]),
        from: clisonix_topics::consume::Position::Earliest,
        to: None,
        sessions: Vec::new(),
    };
    let out_topics = spec.topics(&topics);
    let start = Instant::now();
    let cpu_start = cpu_seconds();
    // When the first records were read (setup done: the run's topics created, its
    // plan committed, its producer's transactions initialised) and when all were.
    let first = std::sync::Mutex::new(None::<Instant>);
    let last = std::sync::Mutex::new(None::<Instant>);
    let done = replay(
        Albi::new(AlbiConfig::default()),
        config,
        spec,
        Health::default(),
        |p| {
            if p.read > 0 {
                first.lock().unwrap().get_or_insert_with(Instant::now);
            }
            if p.finished {
                last.lock().unwrap().get_or_insert_with(Instant::now);
            }
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let replay_elapsed = start.elapsed();
    let first = first.into_inner().unwrap().unwrap_or(start);
    let last = last.into_inner().unwrap().unwrap_or_else(Instant::now);
    let setup = first.duration_since(start);
    let reading = last.duration_since(first);
    let replay_cpu = cpu_seconds() - cpu_start;
    assert!(done.finished && done.read == frames, "{done:?}");
    println!(
        "  replay: {frames} frames in {:.2} s, of which {:.2} s setting up (the run's topics, plan, transactions) and {:.2} s reading: {:.0} frames/s read ({:.2}x the live stage), {:.1} MB/s of samples, {:.1} us of CPU per frame",
        replay_elapsed.as_secs_f64(),
        setup.as_secs_f64(),
        reading.as_secs_f64(),
        frames as f64 / reading.as_secs_f64(),
        elapsed.as_secs_f64() / reading.as_secs_f64(),
        bytes as f64 / 1e6 / reading.as_secs_f64(),
        replay_cpu * 1e6 / frames as f64
    );
    let admin = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create::<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>>()
        .unwrap();
    let names: Vec<String> = topics
        .all()
        .chain(out_topics.all())
        .map(|(n, _)| n)
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = admin
        .delete_topics(&refs, &rdkafka::admin::AdminOptions::new())
        .await;
}

/// This process's CPU time so far (user + system), from /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are the 14th and 15th fields; 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}
