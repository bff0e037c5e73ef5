//! The data engineers' tools' speed: reading a topic decoded to NDJSON (records/s,
//! MB/s), and exporting EEG (hours of 32-channel EEG per second, and per CPU-second
//! of this process): the EDF+ writer alone, and a whole export from the broker.
//! Needs the stack for the broker parts (`./dev up`, then `eval "$(./dev env)"`).
//!
//! Run: `cargo bench -p clisonix-topics --bench data`

use std::time::{Duration, Instant};

use clisonix_edf::writer::{self, Recording, WriteFormat};
use clisonix_schemas::{encode, examples, SessionId, TenantId, Timestamp};
use clisonix_topics::consume::{consume, Query};
use clisonix_topics::export::{export_session, Options};
use clisonix_topics::{Admin, KafkaSettings, Replication, Topics};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const CHANNELS: usize = 32;
const FS: f64 = 128.0;

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
    (ticks(11) + ticks(12)) / 100.0
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    writer_alone();
    let Ok(bootstrap) = std::env::var("CLISONIX_KAFKA_BOOTSTRAP") else {
        eprintln!("the broker parts need the stack: ./dev up && eval \"$(./dev env)\"");
        return;
    };
    from_the_broker(&bootstrap);
}

/// One hour of 32 channels at 128 Hz written as EDF+ and BDF+, five times.
fn writer_alone() {
    let n = 3600 * FS as usize;
    let channels: Vec<Vec<f32>> = (0..CHANNELS)
        .map(|c| {
            (0..n)
                .map(|i| ((i * (c + 3)) as f32 * 0.013).sin() * 90.0)
                .collect()
        })
        .collect();
    for format in [WriteFormat::EdfPlus, WriteFormat::BdfPlus] {
        let rec = Recording {
            format,
            patient: ["bench".into(), "X".into(), "X".into(), "X".into()],
            recording: ["bench".into(), "X".into(), "X".into()],
            start_us: 1_765_000_000_000_000,
            sample_rate_hz: FS,
            labels: (0..CHANNELS).map(|c| format!("C{c}")).collect(),
            unit: "uV".into(),
            channels: channels.clone(),
            annotations: Vec::new(),
        };
        let mut per_cpu = Vec::new();
        let mut per_wall = Vec::new();
        for _ in 0..5 {
            let (t, c) = (Instant::now(), cpu_seconds());
            writer::write(&rec, std::io::sink()).unwrap();
            per_wall.push(1.0 / t.elapsed().as_secs_f64());
            per_cpu.push(1.0 / (cpu_seconds() - c).max(0.01));
        }
        let (w, wl, wh) = median(per_wall);
        let (c, cl, ch) = median(per_cpu);
        println!(
            "writer alone, {format:?}, 32 ch x 128 Hz: {w:.0} EEG hours/s ({wl:.0}-{wh:.0}), {c:.0} hours per CPU-second ({cl:.0}-{ch:.0}) = {:.0} hours per core-minute",
            c * 60.0
        );
    }
}

fn from_the_broker(bootstrap: &str) {
    let kafka = KafkaSettings::new(bootstrap, "data-bench");
    let topics = Topics::new(format!(
        "bench-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    Admin::connect(&kafka)
        .unwrap()
        .ensure(&topics, Replication::Auto)
        .unwrap();
    // One hour of one session: 28,800 frames of 1/8 s, 32 channels at 128 Hz.
    let frames_topic = topics.name(&clisonix_topics::catalog::EEG_FRAMES);
    let producer: BaseProducer = kafka.producer().create().unwrap();
    let tenant = TenantId::random();
    let session = SessionId::random();
    let start_us = 1_765_000_000_000_000i64;
    let frames = 28_800u64;
    let mut bytes = 0u64;
    for seq in 0..frames {
        let mut f = examples::frame(seq, CHANNELS, 16);
        f.tenant_id = tenant;
        f.session_id = session;
        f.seq = seq;
        f.sample_rate_hz = FS;
        f.device_time = Timestamp::from_micros(start_us + seq as i64 * 125_000);
        f.markers.clear();
        let (k, v) = (encode(&f.key()).unwrap(), encode(&f).unwrap());
        bytes += v.len() as u64;
        while producer
            .send(BaseRecord::to(&frames_topic).key(&k).payload(&v))
            .is_err()
        {
            producer.poll(Duration::from_millis(5));
        }
    }
    let mut state = examples::session_state(1);
    state.tenant_id = tenant;
    state.session_id = session;
    state.started_at = Timestamp::from_micros(chrono::Utc::now().timestamp_micros() - 60_000_000);
    let (k, v) = (encode(&state.key()).unwrap(), encode(&state).unwrap());
    producer
        .send(
            BaseRecord::to(&topics.name(&clisonix_topics::catalog::EEG_SESSIONS))
                .key(&k)
                .payload(&v),
        )
        .unwrap();
    producer.flush(Duration::from_secs(120)).unwrap();

    // consume: every frame decoded to one NDJSON line.
    let q = Query::whole(frames_topic.clone());
    let mut rates = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..3 {
        let (t, c) = (Instant::now(), cpu_seconds());
        let mut out = 0usize;
        let (stats, _) = consume(
            &kafka,
            &q,
            |r| {
                out += r.to_json().to_string().len() + 1;
                true
            },
            || false,
        )
        .unwrap();
        assert_eq!(stats.delivered, frames);
        rates.push(frames as f64 / t.elapsed().as_secs_f64());
        cpu.push((cpu_seconds() - c) * 1e6 / frames as f64);
        std::hint::black_box(out);
    }
    let (r, rl, rh) = median(rates);
    let (c, cl, ch) = median(cpu);
    println!(
        "consume eeg.frames to NDJSON (32 ch x 16 samples a frame, {:.1} KB each): {r:.0} records/s ({rl:.0}-{rh:.0}), {:.1} MB/s of records, {c:.0} us of CPU per record ({cl:.0}-{ch:.0})",
        bytes as f64 / frames as f64 / 1e3,
        r * bytes as f64 / frames as f64 / 1e6
    );

    // export: that hour from the broker to EDF+.
    let dir = std::env::temp_dir().join(format!("{}export", topics.prefix()));
    let mut hours = Vec::new();
    let mut per_cpu = Vec::new();
    for _ in 0..3 {
        let (t, c) = (Instant::now(), cpu_seconds());
        let e = export_session(
            &kafka,
            &topics,
            &session.to_string(),
            &dir,
            "bench",
            &Options {
                format: WriteFormat::EdfPlus,
                max_error: None,
                features: None,
            },
        )
        .unwrap();
        assert!((e.seconds - 3600.0).abs() < 1e-6);
        hours.push(1.0 / t.elapsed().as_secs_f64());
        per_cpu.push(1.0 / (cpu_seconds() - c).max(0.01));
    }
    let (h, hl, hh) = median(hours);
    let (c, cl, ch) = median(per_cpu);
    println!(
        "export one hour of 32 ch x 128 Hz from eeg.frames to EDF+: {h:.2} EEG hours/s ({hl:.2}-{hh:.2}), {c:.2} hours per CPU-second of this process ({cl:.2}-{ch:.2}) = {:.0} hours per core-minute",
        c * 60.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
