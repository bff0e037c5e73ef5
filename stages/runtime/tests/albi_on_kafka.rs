//! Albi as a real process on the real broker (`./dev test`): a recording's frames in,
//! the expected features out; kill -9 and restart; poison records; two instances and a
//! rebalance. Outputs are compared byte for byte with Albi run in-process on the same
//! frames, which is deterministic.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clisonix_albi::{Albi, AlbiConfig};
use clisonix_e2e::TestEnv;
use clisonix_edf::{FrameSpec, Framer, Reader};
use clisonix_schemas::{
    decode, encode, DeadLetter, DeviceId, Features, Frame, SessionId, TenantId, Timestamp,
};
use clisonix_stage::{RecordMeta, Stage};
use clisonix_topics::catalog::{DEAD_LETTERS, EEG_FEATURES, EEG_FRAMES};
use clisonix_topics::Topics;
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;

fn data_dir() -> PathBuf {
    std::env::var_os("CLISONIX_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"))
}

/// The reference recording as 1/8 s frames of one session.
fn recording(tenant: TenantId, session: SessionId, frames: usize) -> Vec<Frame> {
    let file = std::fs::File::open(data_dir().join("eeglab_sample_32ch_128hz_238s.edf")).unwrap();
    let mut reader = Reader::new(std::io::BufReader::new(file)).unwrap();
    let header = reader.header().clone();
    let spec = FrameSpec {
        tenant_id: tenant,
        device_id: DeviceId::parse("edf").unwrap(),
        session_id: session,
        samples_per_frame: 16,
    };
    let mut framer = Framer::new(&header, spec).unwrap();
    let mut out = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        framer.push(&r, Timestamp::from_micros(1_700_000_000_000_000), &mut out);
    }
    out.truncate(frames);
    out
}

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

async fn produce_frames(env: &TestEnv, topics: &Topics, frames: &[Frame]) {
    let producer = env.producer();
    let topic = topics.name(&EEG_FRAMES);
    for f in frames {
        env.produce(
            &producer,
            &topic,
            &encode(&f.key()).unwrap(),
            &encode(f).unwrap(),
        )
        .await;
    }
}

/// A `clisonix-stage albi` process.
struct StageProcess {
    child: Child,
    log: PathBuf,
}

impl StageProcess {
    fn spawn(
        env: &TestEnv,
        topics: &Topics,
        group: &str,
        instance: &str,
        batch_max: usize,
    ) -> StageProcess {
        let log =
            std::env::temp_dir().join(format!("{group}-{instance}-{}.log", uuid::Uuid::new_v4()));
        let child = Command::new(env!("CARGO_BIN_EXE_clisonix-stage"))
            .args([
                "--bootstrap",
                &env.kafka.bootstrap,
                "--topic-prefix",
                topics.prefix(),
            ])
            .args([
                "--group",
                group,
                "--instance-id",
                instance,
                "--http-addr",
                "127.0.0.1:0",
            ])
            .args(["--batch-max", &batch_max.to_string(), "albi"])
            .env("RUST_LOG", "info,librdkafka=warn")
            .env("NO_COLOR", "1")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("the stage binary runs");
        StageProcess { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The HTTP address the stage reported.
    fn http_addr(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains("serving /metrics")) {
                let addr = line.split("addr=").nth(1).unwrap().trim();
                return addr
                    .trim_matches(|c: char| !c.is_ascii_digit() && c != '.' && c != ':')
                    .to_owned();
            }
            assert!(Instant::now() < deadline, "the stage did not start:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the stage did not stop on SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for StageProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("stage log kept: {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, text)
}

/// Reads a topic (read committed) until `want` records arrived and then nothing more
/// for `quiet`; returns every record, duplicates included.
async fn read_all(
    env: &TestEnv,
    topic: &str,
    want: usize,
    timeout: Duration,
    quiet: Duration,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let consumer: StreamConsumer = env.consumer(&[topic]);
    let mut stream = consumer.stream();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let wait = if out.len() >= want {
            quiet
        } else {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        };
        match tokio::time::timeout(wait, stream.next()).await {
            Ok(Some(Ok(m))) => out.push((
                m.key().unwrap_or_default().to_vec(),
                m.payload().unwrap_or_default().to_vec(),
            )),
            Ok(Some(Err(e))) => panic!("consumer error: {e}"),
            Ok(None) => break,
            Err(_) => break,
        }
    }
    drop(stream);
    consumer.unsubscribe();
    out
}

fn assert_same_set(got: &[(Vec<u8>, Vec<u8>)], want: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let mut keys: Vec<&Vec<u8>> = got.iter().map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), got.len(), "no feature record is written twice");
    assert_eq!(
        got.len(),
        want.len(),
        "every window of every channel, nothing missing"
    );
    for (k, v) in got {
        assert_eq!(
            want.get(k),
            Some(v),
            "the record equals the clean run's, byte for byte"
        );
    }
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
    let mut stage = StageProcess::spawn(&env, &topics, &TestEnv::unique("albi"), "a", 500);
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
    let mut first = StageProcess::spawn(&env, &topics, &group, "k", 7);
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
    let _second = StageProcess::spawn(&env, &topics, &group, "k", 7);
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
    let _stage = StageProcess::spawn(&env, &topics, &TestEnv::unique("albi"), "p", 500);
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
    let mut a = StageProcess::spawn(&env, &topics, &group, "a", 25);
    let early = read_all(
        &env,
        &topics.name(&EEG_FEATURES),
        300,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    assert!(early.len() >= 300);
    let b = StageProcess::spawn(&env, &topics, &group, "b", 25);
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
