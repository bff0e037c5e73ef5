//! Capacity of the whole pipeline: real-time devices are added in steps until the
//! pipeline no longer keeps up.
//!
//! The services run as separate release processes, as in production: the gateway,
//! ingest, Albi, Jona, sessions, the results sink and metering, on the local Kafka and
//! Postgres. The devices are `clisonix-player` processes (the reference recording: 32
//! channels at 128 Hz in frames of 1/8 s, over WebSocket, binary), a share of them
//! asking for `parameter_mapping` audio (`clisonix.audio=parameter_mapping`), the rest
//! for none (`clisonix.audio=none`). Each step streams its devices for the same time
//! with new sessions, then waits for the pipeline to drain before the next.
//!
//! Per step it prints: devices; frames/s acknowledged; the last frame of a window
//! acknowledged -> that window pushed on the live WebSocket (up to 100 sessions
//! watched) and readable through the API (`GET /v1/sessions/{id}`, up to 10 sessions
//! polled every 50 ms), p50/p99/worst; the same for audio chunks readable; how long
//! after the last frame the pipeline had drained; each process's CPU per device-hour
//! (from /proc: user + system time over the step, drain included) and its largest RSS;
//! Postgres's WAL bytes and the audio objects' bytes per device-hour. The devices' and
//! this process's (the observer's) CPU are reported apart from the pipeline's, and so is
//! the cost of serving the observers: the gateway and its Postgres backends (devices
//! talk to ingest only; Postgres's CPU is split by each service's application_name).
//!
//! A step keeps up when every watched window was pushed, p99 of the live push is under
//! 1 s, and the pipeline drained within 10 s of the last frame; the first step that
//! does not ends the run.
//!
//! Run: `eval "$(./dev env)"; cargo bench -p clisonix-e2e --bench capacity`
//! - `CLISONIX_CAPACITY_DEVICES`: the steps (default `100,250,500,750,1000,1250,1500`)
//! - `CLISONIX_CAPACITY_SECONDS`: seconds streamed per device per step (default 60, at
//!   most the recording's 238)
//! - `CLISONIX_CAPACITY_AUDIO_SHARE`: the share of devices with audio (default 0.1)
//!
//! It builds the release binaries it runs (`cargo build --release`) first.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use clisonix_e2e::procfs::{clock_ticks, stat_fields, ticks};
use clisonix_e2e::{free_port, TestEnv};
use clisonix_player::http::Client;
use clisonix_schemas::SessionId;
use clisonix_topics::catalog::{
    AUDIO_CHUNKS, EEG_FEATURES, EEG_FRAMES, EEG_SESSIONS, USAGE_EVENTS,
};
use clisonix_topics::Topics;
use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// 2 s windows of 1/8 s frames; 1 s audio chunks.
const FRAMES_PER_WINDOW: u64 = 16;
const FRAMES_PER_CHUNK: u64 = 8;
const WATCHED_LIVE: usize = 100;
const POLLED: usize = 10;
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Each polled session has a key of its own (up to 40 requests/s each); the watchers
/// share them.
const READ_KEYS: usize = POLLED;

const BINARIES: [(&str, &str); 4] = [
    ("clisonix-gateway", "clisonix-gateway"),
    ("clisonix-alba", "clisonix-alba"),
    ("clisonix-stage-runtime", "clisonix-stage"),
    ("clisonix-player", "clisonix-player"),
];

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn release_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    target.join("release").join(name)
}

fn build_binaries() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace())
        .args(["build", "--release", "--locked"]);
    for (package, _) in BINARIES {
        cmd.args(["-p", package]);
    }
    let status = cmd.status().expect("cargo runs");
    assert!(status.success(), "building the release binaries failed");
}

/// A service process, its log kept in a temporary folder.
struct Service {
    name: String,
    child: Child,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(logs: &Path, name: &str, bin: &str, args: &[&str], vars: &[(&str, String)]) -> Service {
    let log = std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
    let child = Command::new(release_bin(bin))
        .args(args)
        .env("RUST_LOG", "warn,librdkafka=warn")
        .env("NO_COLOR", "1")
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
    Service {
        name: name.to_owned(),
        child,
    }
}

async fn wait_healthy(url: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut c) = Client::new(url, "") {
            if let Ok(a) = c.send("GET", "/ready", None, Vec::new(), None).await {
                if a.status == 200 {
                    return;
                }
            }
        }
        assert!(Instant::now() < deadline, "{what} did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// --- /proc ------------------------------------------------------------------------

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The processes the benchmark measures, by name.
struct Processes {
    services: Vec<(String, u32)>,
    kafka: Option<u32>,
    postmaster: Option<u32>,
}

/// The process listening on TCP `port` (from /proc/net/tcp*, then the socket's owner).
fn listener(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && f.get(3) == Some(&"0A") {
                inodes.extend(f.get(9).map(|i| format!("socket:[{i}]")));
            }
        }
    }
    pids().into_iter().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.filter_map(Result::ok).any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
            })
        })
    })
}

impl Processes {
    async fn find(services: &[Service], kafka_bootstrap: &str, pool: &sqlx::PgPool) -> Processes {
        let port = kafka_bootstrap
            .split(',')
            .next()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok());
        let backend: Option<i32> = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(pool)
            .await
            .ok();
        let postmaster = backend
            .and_then(|b| stat_fields(b as u32))
            .and_then(|f| f.first().copied())
            .map(|p| p as u32);
        Processes {
            services: services
                .iter()
                .map(|s| (s.name.clone(), s.child.id()))
                .collect(),
            kafka: port.and_then(listener),
            postmaster,
        }
    }

    /// CPU ticks per process name (Postgres: every backend alive, plus those ended),
    /// and Postgres's split by client: the backends of each service (by the
    /// `application_name` its `DATABASE_URL` sets), `server` (the postmaster and its
    /// background workers) and `ended` (backends gone since it started).
    async fn sample(&self, pool: &sqlx::PgPool) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
        let clients: BTreeMap<i32, String> = sqlx::query_as(
            "SELECT pid, application_name FROM pg_stat_activity WHERE backend_type = 'client backend'",
        )
        .fetch_all(pool)
        .await
        .unwrap_or_default()
        .into_iter()
        .collect();
        let mut split: BTreeMap<String, u64> = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (name, pid) in &self.services {
            out.insert(name.clone(), ticks(*pid).0);
        }
        if let Some(k) = self.kafka {
            out.insert("kafka".into(), ticks(k).0);
        }
        if let Some(pm) = self.postmaster {
            let (own, ended) = ticks(pm);
            *split.entry("server".into()).or_default() += own;
            *split.entry("ended".into()).or_default() += ended;
            for p in pids()
                .into_iter()
                .filter(|&p| stat_fields(p).and_then(|f| f.first().copied()) == Some(pm as u64))
            {
                let client = match clients.get(&(p as i32)) {
                    Some(app) if !app.is_empty() => app.clone(),
                    Some(_) => "observer".into(),
                    None => "server".into(),
                };
                *split.entry(client).or_default() += ticks(p).0;
            }
            out.insert("postgres".into(), split.values().sum());
        }
        (out, split)
    }

    fn rss(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (name, pid) in &self.services {
            out.insert(name.clone(), rss_mb(*pid));
        }
        if let Some(k) = self.kafka {
            out.insert("kafka".into(), rss_mb(k));
        }
        out
    }
}

// --- observing ----------------------------------------------------------------------

/// When each window index arrived on a session's live stream, until it ends.
async fn watch_live(gateway: String, key: String, session: SessionId) -> BTreeMap<u64, SystemTime> {
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    // Reconnects (resuming after the last window seen) until the stream says the
    // session ended.
    loop {
        let from = seen.keys().next_back().map_or(0, |w| w + 1);
        let url = format!(
            "{}/v1/sessions/{session}/live?audio=false&from_window={from}&access_token={key}",
            gateway.replace("http", "ws")
        );
        let mut ws = match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                // 404 until the session's first state is stored.
                if Instant::now() > deadline {
                    eprintln!("live {session}: connecting: {e}");
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        loop {
            match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                    match v["type"].as_str() {
                        Some("features") => {
                            seen.entry(v["window_index"].as_u64().unwrap_or(0))
                                .or_insert_with(SystemTime::now);
                        }
                        Some("end") => return seen,
                        _ => {}
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => {
                    eprintln!("live {session}: {e}; reconnecting");
                    break;
                }
                Ok(None) => {
                    eprintln!("live {session}: closed before the end; reconnecting");
                    break;
                }
                Err(_) => {
                    eprintln!("live {session}: nothing for 60 s");
                    return seen;
                }
            }
        }
        if Instant::now() > deadline {
            return seen;
        }
    }
}

/// When each watched session's windows were produced by Albi (the latest record
/// timestamp of its channels, set at the produce call) and became visible to a
/// read-committed consumer (its last channel received), read from the end of the
/// features topic by a consumer of this process (assigned, not in a group), until
/// `stop` is set. It splits the live push's latency into Albi's share, its
/// transaction's and the gateway's.
struct Tap {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<BTreeMap<(SessionId, u64), (SystemTime, SystemTime)>>,
}

impl Tap {
    fn start(
        settings: &clisonix_topics::KafkaSettings,
        topic: String,
        watched: std::collections::HashSet<SessionId>,
    ) -> Tap {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::Message as _;
        let consumer: BaseConsumer = settings
            .consumer(&format!("capacity-tap-{}", std::process::id()))
            .set("fetch.wait.max.ms", "10")
            .create()
            .expect("the tap's consumer");
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("the features topic's metadata");
        let mut assignment = rdkafka::TopicPartitionList::new();
        for p in metadata.topics()[0].partitions() {
            assignment
                .add_partition_offset(&topic, p.id(), rdkafka::Offset::End)
                .unwrap();
        }
        consumer
            .assign(&assignment)
            .expect("assigning the features topic");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen: BTreeMap<(SessionId, u64), (SystemTime, SystemTime, usize)> =
                BTreeMap::new();
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let now = SystemTime::now();
                let Some(key) = m
                    .key()
                    .and_then(|k| clisonix_schemas::decode::<clisonix_schemas::FeatureKey>(k).ok())
                else {
                    continue;
                };
                if !watched.contains(&key.session_id) {
                    continue;
                }
                let produced = SystemTime::UNIX_EPOCH
                    + Duration::from_millis(m.timestamp().to_millis().unwrap_or(0).max(0) as u64);
                let e = seen
                    .entry((key.session_id, key.window_index))
                    .or_insert((produced, now, 0));
                e.0 = e.0.max(produced);
                e.1 = now;
                e.2 += 1;
            }
            seen.into_iter()
                .filter(|(_, (_, _, n))| *n >= 32)
                .map(|(k, (p, v, _))| (k, (p, v)))
                .collect()
        });
        Tap { stop, thread }
    }

    fn finish(self) -> BTreeMap<(SessionId, u64), (SystemTime, SystemTime)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// When each window (all its channels) and chunk became readable through the API, by
/// polling a session's features from its first incomplete window on
/// (`GET /v1/sessions/{id}/features?from_window=…&features=abs_alpha&format=csv`) and,
/// for a session with audio, its detail (`GET /v1/sessions/{id}`: chunks stored),
/// until it has `windows` windows and `chunks` chunks.
#[derive(Debug, Default)]
struct Readable {
    windows: BTreeMap<u64, SystemTime>,
    chunks: BTreeMap<u64, SystemTime>,
}

async fn poll_api(
    gateway: String,
    key: String,
    session: SessionId,
    windows: u64,
    chunks: u64,
    stop: tokio_util::sync::CancellationToken,
) -> Readable {
    const CHANNELS: usize = 32;
    let mut got = Readable::default();
    let mut c = Client::new(&gateway, &key).unwrap();
    while !stop.is_cancelled() {
        let next = got.windows.len() as u64;
        if next < windows {
            let path = format!(
                "/v1/sessions/{session}/features?from_window={next}&features=abs_alpha&format=csv"
            );
            if let Ok(a) = c.send("GET", &path, None, Vec::new(), Some(&key)).await {
                let now = SystemTime::now();
                if a.status == 200 {
                    let mut rows: BTreeMap<u64, usize> = BTreeMap::new();
                    for line in String::from_utf8_lossy(&a.body).lines().skip(1) {
                        if let Some(Ok(w)) = line.split(',').next().map(str::parse::<u64>) {
                            *rows.entry(w).or_default() += 1;
                        }
                    }
                    // Readable in order: a window counts once it and those before it
                    // are complete.
                    let mut w = next;
                    while rows.get(&w) == Some(&CHANNELS) {
                        got.windows.insert(w, now);
                        w += 1;
                    }
                }
            }
        }
        if (got.chunks.len() as u64) < chunks {
            let path = format!("/v1/sessions/{session}");
            if let Ok(a) = c.send("GET", &path, None, Vec::new(), Some(&key)).await {
                let now = SystemTime::now();
                if a.status == 200 {
                    let ch = a.json()["audio"]
                        .as_array()
                        .and_then(|a| a.first())
                        .and_then(|p| p["chunks"].as_u64())
                        .unwrap_or(0);
                    for i in 0..ch {
                        got.chunks.entry(i).or_insert(now);
                    }
                }
            }
        }
        if got.windows.len() as u64 >= windows && got.chunks.len() as u64 >= chunks {
            break;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    got
}

/// Per device, when each frame (by seq) was acknowledged; from the players' files.
fn read_acks(path: &Path) -> BTreeMap<SessionId, BTreeMap<u64, SystemTime>> {
    let mut out: BTreeMap<SessionId, BTreeMap<u64, SystemTime>> = BTreeMap::new();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 4 {
            continue;
        }
        let (Ok(session), Ok(seq), Ok(us)) = (
            SessionId::parse(f[1]),
            f[2].parse::<u64>(),
            f[3].parse::<u64>(),
        ) else {
            continue;
        };
        out.entry(session)
            .or_default()
            .insert(seq, SystemTime::UNIX_EPOCH + Duration::from_micros(us));
    }
    out
}

fn ms(later: SystemTime, earlier: SystemTime) -> f64 {
    later
        .duration_since(earlier)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or_else(|e| -e.duration().as_secs_f64() * 1e3)
}

#[derive(Debug, Default)]
struct Latencies(Vec<f64>);

impl Latencies {
    fn push(&mut self, v: f64) {
        self.0.push(v);
    }
    fn at(&self, p: f64) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
    fn show(&self) -> String {
        format!(
            "{:>5.0} {:>5.0} {:>6.0}",
            self.at(0.5),
            self.at(0.99),
            self.at(1.0)
        )
    }
}

// --- a step -------------------------------------------------------------------------

struct Bench {
    env: TestEnv,
    topics: Topics,
    gateway: String,
    ingest: String,
    ingest_key: String,
    /// Read keys: each key's requests are limited by the plan's rate, so the
    /// observers spread over several.
    read_keys: Vec<String>,
    services: Vec<Service>,
    logs: PathBuf,
    /// The folder of the local audio store the sink writes to.
    audio_dir: PathBuf,
    seconds: f64,
    audio_share: f64,
    tick: f64,
}

/// What one step measured.
struct Step {
    keeps_up: bool,
}

impl Bench {
    fn groups(&self) -> Vec<(String, Vec<String>)> {
        let t = |s| self.topics.name(s);
        let p = self.topics.prefix();
        vec![
            (format!("{p}albi"), vec![t(&EEG_FRAMES)]),
            (format!("{p}jona"), vec![t(&EEG_FRAMES)]),
            (format!("{p}sessions"), vec![t(&EEG_FRAMES)]),
            (
                format!("{p}sink"),
                vec![t(&EEG_SESSIONS), t(&EEG_FEATURES), t(&AUDIO_CHUNKS)],
            ),
            (
                format!("{p}metering"),
                vec![t(&USAGE_EVENTS), t(&EEG_SESSIONS), t(&EEG_FEATURES)],
            ),
        ]
    }

    /// Records behind, all groups together (None while a group has no offsets yet).
    fn lag(&self) -> Option<i64> {
        let mut total = 0;
        for (group, topics) in self.groups() {
            let observed = clisonix_topics::lag::observe(
                &self.env.kafka,
                &group,
                &topics,
                Duration::ZERO,
                Duration::from_secs(1),
            )
            .ok()?;
            total += observed.lag;
        }
        Some(total)
    }

    /// Bytes of the audio objects stored so far.
    fn audio_bytes(&self) -> u64 {
        fn walk(dir: &std::path::Path) -> u64 {
            std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| match e.file_type() {
                            Ok(t) if t.is_dir() => walk(&e.path()),
                            _ => e.metadata().map_or(0, |m| m.len()),
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(&self.audio_dir)
    }

    async fn wal_bytes(&self, pool: &sqlx::PgPool) -> i64 {
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
            .fetch_one(pool)
            .await
            .unwrap_or(0)
    }

    async fn step(&self, devices: usize, pool: &sqlx::PgPool) -> Step {
        let dir = self.logs.join(format!("step-{devices}"));
        std::fs::create_dir_all(&dir).unwrap();
        let audio = ((devices as f64 * self.audio_share).round() as usize).min(devices);
        let sessions: Vec<SessionId> = (0..devices).map(|_| SessionId::random()).collect();
        let frames = (self.seconds * 8.0).ceil() as u64;
        let windows = frames / FRAMES_PER_WINDOW;
        let chunks = frames / FRAMES_PER_CHUNK;
        // Watched: audio sessions first, in proportion.
        let watched: Vec<SessionId> = sessions.iter().copied().take(WATCHED_LIVE).collect();
        let polled: Vec<(SessionId, bool)> = {
            let with_audio = audio.min(POLLED / 2);
            let mut p: Vec<(SessionId, bool)> =
                sessions[..with_audio].iter().map(|s| (*s, true)).collect();
            p.extend(
                sessions[audio..]
                    .iter()
                    .take(POLLED - with_audio)
                    .map(|s| (*s, false)),
            );
            p
        };
        let key = |i: usize| self.read_keys[i % self.read_keys.len()].clone();
        let tap = Tap::start(
            &self.env.kafka,
            self.topics.name(&EEG_FEATURES),
            watched.iter().copied().collect(),
        );
        let live: Vec<_> = watched
            .iter()
            .enumerate()
            .map(|(i, s)| tokio::spawn(watch_live(self.gateway.clone(), key(i), *s)))
            .collect();
        let stop_polls = tokio_util::sync::CancellationToken::new();
        let polls: Vec<_> = polled
            .iter()
            .enumerate()
            .map(|(i, (s, a))| {
                tokio::spawn(poll_api(
                    self.gateway.clone(),
                    key(i),
                    *s,
                    windows,
                    if *a { chunks } else { 0 },
                    stop_polls.clone(),
                ))
            })
            .collect();

        let processes = Processes::find(&self.services, &self.env.kafka.bootstrap, pool).await;
        let me = std::process::id();
        let (cpu0, pg0) = processes.sample(pool).await;
        let ((me0, children0), wal0) = (ticks(me), self.wal_bytes(pool).await);
        let audio0 = self.audio_bytes();
        let started = Instant::now();
        // The devices: one player with audio, one without.
        let mut players = Vec::new();
        for (i, (range, presets)) in [(0..audio, "parameter_mapping"), (audio..devices, "none")]
            .into_iter()
            .enumerate()
        {
            if range.is_empty() {
                continue;
            }
            let ids = dir.join(format!("sessions-{i}.txt"));
            let mut f = std::fs::File::create(&ids).unwrap();
            for s in &sessions[range.clone()] {
                writeln!(f, "{s}").unwrap();
            }
            let acks = dir.join(format!("acks-{i}.tsv"));
            let log = std::fs::File::create(dir.join(format!("player-{i}.log"))).unwrap();
            let child = Command::new(release_bin("clisonix-player"))
                .arg(common::recording_path())
                .args(["--url", &self.ingest, "--key", &self.ingest_key])
                .args(["--devices", &range.len().to_string()])
                .args(["--seconds", &self.seconds.to_string()])
                .args(["--audio-presets", presets])
                .args(["--device-prefix", &format!("cap{devices}-{i}")])
                // Devices switched on at different moments: windows complete at
                // different times, not all in the same instant every 2 s.
                .args(["--spread", "2"])
                .arg("--sessions")
                .arg(&ids)
                .arg("--acks")
                .arg(&acks)
                .arg("--quiet")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("the player runs");
            players.push((child, acks));
        }
        let mut rss_max: BTreeMap<String, f64> = BTreeMap::new();
        let mut rss_first: BTreeMap<String, f64> = BTreeMap::new();
        // After a fifth of the step (warmed up) and at its end: flat means these agree.
        let mut rss_warm: BTreeMap<String, f64> = BTreeMap::new();
        let mut rss_last: BTreeMap<String, f64> = BTreeMap::new();
        let warm_after = Duration::from_secs_f64(self.seconds / 5.0);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            for (name, mb) in processes.rss() {
                rss_first.entry(name.clone()).or_insert(mb);
                if started.elapsed() >= warm_after {
                    rss_warm.entry(name.clone()).or_insert(mb);
                }
                rss_last.insert(name.clone(), mb);
                let e = rss_max.entry(name).or_insert(0.0);
                *e = e.max(mb);
            }
            let mut running = false;
            for (child, _) in &mut players {
                running |= matches!(child.try_wait(), Ok(None));
            }
            if !running {
                break;
            }
        }
        let streamed = started.elapsed();
        let last_frame = SystemTime::now();
        let acks: BTreeMap<SessionId, BTreeMap<u64, SystemTime>> = players
            .iter()
            .flat_map(|(_, path)| read_acks(path))
            .collect();
        let acked: usize = acks.values().map(BTreeMap::len).sum();
        for (_, path) in &players {
            // Tens of MB at a thousand devices; the logs stay.
            let _ = std::fs::remove_file(path);
        }

        // Drain: the watched sessions' windows pushed, the polled ones readable, no lag.
        let drain_deadline = Instant::now() + Duration::from_secs(180);
        let mut pushed = Vec::new();
        for l in live {
            let left = drain_deadline.saturating_duration_since(Instant::now());
            pushed.push(
                tokio::time::timeout(left, l)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default(),
            );
        }
        let hops = tap.finish();
        let mut readable = Vec::new();
        for p in polls {
            let left = drain_deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, p).await {
                Ok(Ok(r)) => readable.push(r),
                _ => {
                    stop_polls.cancel();
                    readable.push(Readable::default());
                }
            }
        }
        loop {
            if self.lag() == Some(0) || Instant::now() > drain_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let drained_s = ms(SystemTime::now(), last_frame) / 1e3;
        let (cpu1, pg1) = processes.sample(pool).await;
        // The players' CPU: they were reaped by this process, so it is in its
        // children's ticks (the services are still running: not in them).
        let (me1, children1) = ticks(me);
        let devices_ticks = children1.saturating_sub(children0);
        let wal1 = self.wal_bytes(pool).await;
        let audio1 = self.audio_bytes();

        // Latencies from each window's (chunk's) last frame acknowledged.
        let (mut live_ms, mut api_ms, mut chunk_ms) = (
            Latencies::default(),
            Latencies::default(),
            Latencies::default(),
        );
        // The live push in three: ack -> Albi produced the window's records (its fetch,
        // linger and work), -> visible to a read-committed consumer (its transaction),
        // -> pushed (the gateway's fetch and the WebSocket).
        let mut hop_ms: [Latencies; 3] = Default::default();
        let mut missing_live = 0;
        for (s, seen) in watched.iter().zip(&pushed) {
            let Some(a) = acks.get(s) else { continue };
            for w in 0..windows {
                let Some(&ack) = a.get(&(w * FRAMES_PER_WINDOW + FRAMES_PER_WINDOW - 1)) else {
                    continue;
                };
                match seen.get(&w) {
                    Some(&t) => {
                        live_ms.push(ms(t, ack));
                        if let Some(&(produced, visible)) = hops.get(&(*s, w)) {
                            hop_ms[0].push(ms(produced, ack));
                            hop_ms[1].push(ms(visible, produced));
                            hop_ms[2].push(ms(t, visible));
                        }
                    }
                    None => missing_live += 1,
                }
            }
        }
        for ((s, _), r) in polled.iter().zip(&readable) {
            let Some(a) = acks.get(s) else { continue };
            for (&w, &t) in &r.windows {
                if let Some(&ack) = a.get(&(w * FRAMES_PER_WINDOW + FRAMES_PER_WINDOW - 1)) {
                    api_ms.push(ms(t, ack));
                }
            }
            for (&c, &t) in &r.chunks {
                if let Some(&ack) = a.get(&(c * FRAMES_PER_CHUNK + FRAMES_PER_CHUNK - 1)) {
                    chunk_ms.push(ms(t, ack));
                }
            }
        }

        let device_hours = devices as f64 * self.seconds / 3600.0;
        let per_dh = |t: u64| t as f64 / self.tick / device_hours;
        let mut cpu_line = String::new();
        let mut pipeline = 0.0;
        for (name, t1) in &cpu1 {
            let used = t1.saturating_sub(*cpu0.get(name).unwrap_or(&0));
            pipeline += per_dh(used);
            cpu_line.push_str(&format!(" {name} {:.1}", per_dh(used)));
        }
        // A backend that ended during the step moves its ticks from its client to
        // `ended`: the split is approximate, its sum exact.
        let mut pg_line = String::new();
        let mut pg_gateway = 0.0;
        for (client, t1) in &pg1 {
            let used = t1.saturating_sub(*pg0.get(client).unwrap_or(&0));
            if used > 0 {
                pg_line.push_str(&format!(" {client} {:.1}", per_dh(used)));
            }
            if client == "gateway" {
                pg_gateway = per_dh(used);
            }
        }
        // The gateway serves only the observers here (devices talk to ingest): it and
        // its Postgres backends are the cost of reading, apart from the pipeline's.
        let gateway = cpu1.get("gateway").map_or(0.0, |t1| {
            per_dh(t1.saturating_sub(*cpu0.get("gateway").unwrap_or(&0)))
        });
        let serving = gateway + pg_gateway;
        let everything = pipeline;
        let pipeline = everything - serving;
        let mut rss_line = String::new();
        for (name, mb) in &rss_max {
            let at = |m: &BTreeMap<String, f64>| m.get(name).copied().unwrap_or(0.0);
            rss_line.push_str(&format!(
                " {name} {:.0}→{:.0}→{:.0} ({mb:.0})",
                at(&rss_first),
                at(&rss_warm),
                at(&rss_last),
            ));
        }
        let keeps_up = missing_live == 0 && live_ms.at(0.99) < 1000.0 && drained_s < 10.0;
        println!(
            "{devices:>5} devices ({audio} with audio): {:>6.0} frames/s | live push p50/p99/max ms {} | API windows {} | API chunks {} | drained {:.1} s{} | {}",
            acked as f64 / streamed.as_secs_f64(),
            live_ms.show(),
            api_ms.show(),
            chunk_ms.show(),
            drained_s,
            if missing_live > 0 {
                format!(", {missing_live} watched windows never pushed")
            } else {
                String::new()
            },
            if keeps_up { "keeps up" } else { "DOES NOT KEEP UP" },
        );
        println!(
            "      live push in parts, p50 p99 max ms: ack→Albi produced {} | produced→committed {} | committed→pushed {}",
            hop_ms[0].show(),
            hop_ms[1].show(),
            hop_ms[2].show()
        );
        println!(
            "      CPU-s per device-hour: pipeline {pipeline:.1} without serving the observers {serving:.1} (gateway {gateway:.1}, its Postgres {pg_gateway:.1}); all {everything:.1} ({cpu_line} ); devices {:.1}; observer {:.1}",
            per_dh(devices_ticks),
            per_dh(me1.saturating_sub(me0)),
        );
        println!("      Postgres's CPU-s per device-hour by client:{pg_line}");
        println!(
            "      RSS MB (start→a fifth in→end (max)):{rss_line}; Postgres WAL {:.0} MB and audio objects {:.0} MB per device-hour",
            (wal1 - wal0) as f64 / 1e6 / device_hours,
            audio1.saturating_sub(audio0) as f64 / 1e6 / device_hours
        );
        Step { keeps_up }
    }
}

fn main() {
    let steps: Vec<usize> = std::env::var("CLISONIX_CAPACITY_DEVICES")
        .unwrap_or_else(|_| "100,250,500,750,1000,1250,1500".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let seconds: f64 = std::env::var("CLISONIX_CAPACITY_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60.0);
    let audio_share: f64 = std::env::var("CLISONIX_CAPACITY_AUDIO_SHARE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.1);
    // The devices play the reference recording once: a step cannot stream longer.
    let recording = clisonix_player::recording::load(&common::recording_path(), 125)
        .expect("the reference recording loads");
    let longest = recording.frames.len() as f64 * recording.frame_seconds();
    assert!(
        seconds > 0.0 && seconds <= longest,
        "CLISONIX_CAPACITY_SECONDS must be above 0 and at most the recording's {longest:.0} s"
    );
    build_binaries();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let env = TestEnv::get();
        let topics = env.topics();
        env.create_catalog(&topics).await;
        let db = env.fresh_database().await;
        let database_url = db.url();
        let logs = std::env::temp_dir().join(format!("clisonix-capacity-{}", std::process::id()));
        std::fs::create_dir_all(&logs).unwrap();
        let (gateway_port, ingest_port) = (free_port(), free_port());
        let gateway = format!("http://127.0.0.1:{gateway_port}");
        let ingest = format!("http://127.0.0.1:{ingest_port}");
        let audio_store = db.audio_store();
        let audio_dir = PathBuf::from(audio_store.trim_start_matches("file://"));
        // Each service's Postgres backends are told apart by their application_name.
        let named = |service: &str| {
            let joiner = if database_url.contains('?') { '&' } else { '?' };
            format!("{database_url}{joiner}application_name={service}")
        };
        let common_vars = vec![
            ("DATABASE_URL", database_url.clone()),
            ("CLISONIX_AUDIO_STORE", audio_store),
            ("CLISONIX_KAFKA_BOOTSTRAP", env.kafka.bootstrap.clone()),
            ("CLISONIX_TOPIC_PREFIX", topics.prefix().to_owned()),
        ];
        let mut services = Vec::new();
        let mut vars = common_vars.clone();
        vars.push(("CLISONIX_GATEWAY_LISTEN", format!("127.0.0.1:{gateway_port}")));
        vars.push(("CLISONIX_MIGRATE", "true".into()));
        vars.push(("CLISONIX_RATE_MEMBER_PER_MINUTE", "1000000".into()));
        vars.push(("CLISONIX_RATE_PREMIUM_PER_MINUTE", "1000000".into()));
        vars.push(("DATABASE_URL", named("gateway")));
        services.push(spawn(&logs, "gateway", "clisonix-gateway", &[], &vars));
        wait_healthy(&gateway, "the gateway").await;
        let mut vars = common_vars.clone();
        vars.push(("CLISONIX_INGEST_LISTEN", format!("127.0.0.1:{ingest_port}")));
        vars.push(("CLISONIX_MIGRATE", "false".into()));
        vars.push(("CLISONIX_INGEST_QUOTA_REFRESH_MS", "1000".into()));
        vars.push(("DATABASE_URL", named("ingest")));
        services.push(spawn(&logs, "ingest", "clisonix-alba", &[], &vars));
        wait_healthy(&ingest, "ingest").await;
        let mut vars = common_vars.clone();
        vars.push(("CLISONIX_MIGRATE", "false".into()));
        for stage in ["albi", "jona", "sessions", "sink", "metering"] {
            let group = format!("{}{stage}", topics.prefix());
            let mut vars = vars.clone();
            vars.push(("DATABASE_URL", named(stage)));
            services.push(spawn(
                &logs,
                stage,
                "clisonix-stage",
                &[
                    "--group",
                    &group,
                    "--instance-id",
                    &group,
                    "--http-addr",
                    "127.0.0.1:0",
                    stage,
                ],
                &vars,
            ));
        }
        let tenant = clisonix_dev::run::sign_up(&gateway, "capacity")
            .await
            .expect("signing up");
        clisonix_dev::run::choose_plan(&gateway, &tenant.access_token, "enterprise")
            .await
            .expect("choosing enterprise");
        let mut read_keys = vec![tenant.read_key.clone()];
        for i in 1..READ_KEYS {
            let name = format!("capacity read {i}");
            read_keys.push(
                clisonix_dev::run::create_key(&gateway, &tenant.access_token, &name, "read")
                    .await
                    .expect("creating a read key"),
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let bench = Bench {
            env: env.clone(),
            topics: topics.clone(),
            gateway,
            ingest,
            ingest_key: tenant.ingest_key,
            read_keys,
            services,
            logs: logs.clone(),
            audio_dir,
            seconds,
            audio_share,
            tick: clock_ticks(),
        };
        println!(
            "capacity: real-time devices (32 ch, 128 Hz, 1/8 s frames, WebSocket binary), {seconds:.0} s per step, {:.0}% with audio; services as release processes; logs in {}",
            audio_share * 100.0,
            logs.display()
        );
        println!("latencies in ms from a window's (chunk's) last frame acknowledged: p50 p99 worst");
        let pool = db.pool.clone();
        for devices in steps {
            let step = bench.step(devices, &pool).await;
            if !step.keeps_up {
                break;
            }
        }
        drop(bench);
        db.drop_now().await;
        env.delete_topics(topics.prefix()).await;
    });
}
