//! What the stage-process tests share: the recording as frames, producing them, a
//! stage as a real process, reading a topic to the end.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clisonix_e2e::TestEnv;
use clisonix_edf::{FrameSpec, Framer, Reader};
use clisonix_schemas::{encode, DeviceId, Frame, SessionId, TenantId, Timestamp};
use clisonix_topics::catalog::EEG_FRAMES;
use clisonix_topics::Topics;
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;

pub fn data_dir() -> PathBuf {
    std::env::var_os("CLISONIX_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"))
}

/// The reference recording as 1/8 s frames of one session.
pub fn recording(tenant: TenantId, session: SessionId, frames: usize) -> Vec<Frame> {
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

pub async fn produce_frames(env: &TestEnv, topics: &Topics, frames: &[Frame]) {
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

/// The `clisonix-stage` binary: cargo's own path in this package's tests; elsewhere
/// (the end-to-end tests include this module) the one `cargo test --workspace` built
/// next to the test executable.
pub fn stage_binary() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_clisonix-stage") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let bin = exe
        .parent()
        .and_then(std::path::Path::parent)
        .map(|dir| dir.join("clisonix-stage"))
        .expect("tests run from target/<profile>/deps");
    assert!(
        bin.exists(),
        "{} is missing: `cargo build -p clisonix-stage-runtime` builds it (`./dev test` does)",
        bin.display()
    );
    bin
}

/// A `clisonix-stage` process running the stage that `stage` (its subcommand and
/// arguments) names.
pub struct StageProcess {
    child: Child,
    log: PathBuf,
}

impl StageProcess {
    pub fn spawn(
        env: &TestEnv,
        topics: &Topics,
        group: &str,
        instance: &str,
        batch_max: usize,
        stage: &[&str],
    ) -> StageProcess {
        StageProcess::spawn_with_env(env, topics, group, instance, batch_max, stage, &[])
    }

    /// As [`StageProcess::spawn`], with more environment variables.
    pub fn spawn_with_env(
        env: &TestEnv,
        topics: &Topics,
        group: &str,
        instance: &str,
        batch_max: usize,
        stage: &[&str],
        vars: &[(&str, &str)],
    ) -> StageProcess {
        let log =
            std::env::temp_dir().join(format!("{group}-{instance}-{}.log", uuid::Uuid::new_v4()));
        let child = Command::new(stage_binary())
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
            .args(["--batch-max", &batch_max.to_string()])
            .args(stage)
            .env("RUST_LOG", "info,librdkafka=warn")
            .env("NO_COLOR", "1")
            .envs(vars.iter().copied())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("the stage binary runs");
        StageProcess { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The HTTP address the stage reported.
    pub fn http_addr(&self) -> String {
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

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
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

pub fn http_get(addr: &str, path: &str) -> (u16, String) {
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
pub async fn read_all(
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

pub fn assert_same_set(got: &[(Vec<u8>, Vec<u8>)], want: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let mut keys: Vec<&Vec<u8>> = got.iter().map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), got.len(), "no record is written twice");
    assert_eq!(got.len(), want.len(), "every record, nothing missing");
    for (k, v) in got {
        assert_eq!(
            want.get(k),
            Some(v),
            "the record equals the clean run's, byte for byte"
        );
    }
}
