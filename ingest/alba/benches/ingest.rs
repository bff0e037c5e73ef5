//! Ingest throughput against the raw producer, on the stack `./dev up` runs:
//! 32-channel 256 Hz frames of 1/8 s, posted as binary and as JSON batches and
//! streamed over WebSocket by several devices at once, each compared with a plain
//! rdkafka producer (ingest's producer settings) writing the same record bytes to the
//! same broker. Ingest writes through its default number of producers
//! (`Config::producers`), each partition through one; the raw producer is one.
//! Prints frames/s and MB/s of frame records.
//!
//! The broker's speed drifts (its JIT warming up, log rolls, the page cache), so the
//! figures come after an untimed warm-up of every kind of run, every input of a round
//! is made before the round's first run, the raw producer runs before and after each
//! round's ingest runs, and the verdict is the median of five rounds' ratios, each
//! against the faster of its round's two raw runs. Ingest
//! runs in this process on the allocator its binary uses, tuned as its binary tunes it.
//!
//! Each run also prints the CPU it took per frame, from `/proc`: the whole machine,
//! the broker (`java`; and of that, its JIT compilers' and garbage collector's
//! threads), Postgres, librdkafka's threads, and the runtime's threads (ingest and its
//! clients share them). On a machine whose cores are all busy, that
//! is what bounds the figure. And it prints the producer's requests, from librdkafka's
//! statistics (ingest's `alba_producer_*` metrics, and the same counters for the raw
//! producer): how many, how full, the broker's mean round trip, the share of the run
//! a request was outstanding, and how long records waited to be sent.
//!
//!     ./dev up && eval "$(./dev env)" && cargo bench -p clisonix-alba --bench ingest

#[path = "../tests/common/mod.rs"]
mod common;

#[global_allocator]
static ALLOCATOR: clisonix_alba::Allocator = clisonix_alba::ALLOCATOR;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use clisonix_alba::config::Config;
use clisonix_alba::metrics::ProducerMetrics;
use clisonix_alba::publisher::{producer_config, ProducerStats};
use clisonix_player::http::{Client, Format};
use clisonix_player::stream::{stream_frames, StreamOptions};
use clisonix_schemas::{encode, Frame, SessionId, Timestamp};
use common::{frames, metric, TestIngest, PRODUCER_STATS_INTERVAL as STATS_INTERVAL};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Statistics};

const CHANNELS: usize = 32;
const SAMPLES: u32 = 32; // 1/8 s at 256 Hz
const DEVICES: usize = 16;
const ROUNDS: usize = 5;

struct Figure {
    frames: usize,
    bytes: usize,
    elapsed: Duration,
}

impl Figure {
    fn line(&self, what: &str) -> String {
        let s = self.elapsed.as_secs_f64();
        format!(
            "{what:<34} {:>8.0} frames/s {:>8.1} MB/s  ({} frames in {:.2} s)",
            self.frames as f64 / s,
            self.bytes as f64 / s / 1e6,
            self.frames,
            s
        )
    }
    fn rate(&self) -> f64 {
        self.frames as f64 / self.elapsed.as_secs_f64()
    }
}

fn workload(per_device: u64) -> Vec<Vec<Frame>> {
    (0..DEVICES)
        .map(|_| frames(SessionId::random(), per_device, CHANNELS, SAMPLES))
        .collect()
}

fn record_bytes(devices: &[Vec<Frame>]) -> usize {
    devices
        .iter()
        .flatten()
        .map(|f| encode(f).unwrap().len())
        .sum()
}

/// The raw producer's records: the same bytes ingest publishes, keyed the same way.
fn raw_records(t: &TestIngest, devices: &[Vec<Frame>]) -> Vec<(Vec<u8>, Vec<u8>)> {
    devices
        .iter()
        .flatten()
        .map(|f| {
            let mut f = f.clone();
            f.tenant_id = t.tenant.id;
            (encode(&f.key()).unwrap(), encode(&f).unwrap())
        })
        .collect()
}

/// The raw producer's context: its statistics feed the counters ingest's producer
/// feeds (`alba_producer_*`).
struct RawStats(ProducerStats);

impl ClientContext for RawStats {
    fn stats(&self, statistics: Statistics) {
        self.0.observe(&statistics);
    }
}

async fn raw(
    t: &TestIngest,
    producer: &FutureProducer<RawStats>,
    records: Vec<(Vec<u8>, Vec<u8>)>,
) -> Figure {
    let topic = t.frames_topic();
    let bytes = records.iter().map(|(_, v)| v.len()).sum();
    let started = Instant::now();
    let mut pending = Vec::with_capacity(records.len());
    for (k, v) in &records {
        loop {
            match producer.send_result(FutureRecord::to(&topic).key(k).payload(v)) {
                Ok(d) => {
                    pending.push(d);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    for d in pending {
        d.await.unwrap().unwrap();
    }
    Figure {
        frames: records.len(),
        bytes,
        elapsed: started.elapsed(),
    }
}

/// A run's HTTP bodies, per device, with the frame count and record bytes they carry.
struct Bodies {
    devices: Vec<Vec<(&'static str, Vec<u8>)>>,
    frames: usize,
    bytes: usize,
}

fn bodies(devices: &[Vec<Frame>], format: Format, batch: usize) -> Bodies {
    Bodies {
        devices: devices
            .iter()
            .map(|frames| frames.chunks(batch).map(|c| format.body(c)).collect())
            .collect(),
        frames: devices.iter().map(Vec::len).sum(),
        bytes: record_bytes(devices),
    }
}

async fn http(t: &TestIngest, bodies: Bodies) -> Figure {
    post_all(&t.url, &t.tenant.key, bodies).await
}

/// A server that reads each body and answers 200 with its length: what moving the
/// bodies over HTTP costs on this machine, without ingest's work.
async fn sink() -> String {
    let app = axum::Router::new().route(
        "/v1/frames",
        axum::routing::post(|body: axum::body::Bytes| async move { body.len().to_string() }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

async fn post_all(url: &str, key: &str, bodies: Bodies) -> Figure {
    let started = Instant::now();
    let tasks: Vec<_> = bodies
        .devices
        .into_iter()
        .map(|bodies| {
            let (url, key) = (url.to_owned(), key.to_owned());
            tokio::spawn(async move {
                let mut c = Client::new(&url, &key).unwrap();
                for (ct, body) in bodies {
                    let a = c.post("/v1/frames", ct, body).await.unwrap();
                    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    Figure {
        frames: bodies.frames,
        bytes: bodies.bytes,
        elapsed: started.elapsed(),
    }
}

async fn websocket(t: &TestIngest, devices: Vec<Vec<Frame>>) -> Figure {
    let bytes = record_bytes(&devices);
    let count = devices.iter().map(Vec::len).sum();
    let started = Instant::now();
    let tasks: Vec<_> = devices
        .into_iter()
        .map(|frames| {
            let (url, key) = (t.url.clone(), t.tenant.key.clone());
            tokio::spawn(async move {
                let options = StreamOptions {
                    window: 1024,
                    max_batch: 128,
                    ..Default::default()
                };
                let now = Instant::now();
                let stats = stream_frames(&url, &key, &frames, |_| now, &options, None)
                    .await
                    .unwrap();
                assert_eq!(stats.acked, frames.len());
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    Figure {
        frames: count,
        bytes,
        elapsed: started.elapsed(),
    }
}

/// Parts of the broker's CPU time: its JIT compilers' threads and its garbage
/// collector's (counted in "broker" too).
const BROKER_JIT: &str = "broker's JIT";
const BROKER_GC: &str = "broker's GC";

/// CPU time, in clock ticks, by where it went: this process's threads by kind, the
/// broker's and Postgres's processes, and the machine as a whole (Linux `/proc`).
#[derive(Debug, Default, Clone)]
struct Cpu {
    parts: BTreeMap<&'static str, u64>,
    busy: u64,
    idle: u64,
}

/// A thread's or process's name and user+system ticks from its `stat` file.
fn ticks(dir: &Path) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let (head, rest) = stat.rsplit_once(") ")?;
    let name = head.split_once(" (")?.1.to_owned();
    let fields: Vec<&str> = rest.split(' ').collect();
    Some((
        name,
        fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?,
    ))
}

impl Cpu {
    fn now() -> Cpu {
        let mut cpu = Cpu::default();
        let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten();
        for (name, t) in tasks.flatten().filter_map(|e| ticks(&e.path())) {
            let part = if name.starts_with("tokio") {
                "ingest and clients"
            } else if name.starts_with("rdk:") || name == "producer pollin" {
                "librdkafka"
            } else {
                "bench main"
            };
            *cpu.parts.entry(part).or_default() += t;
        }
        let processes = std::fs::read_dir("/proc").into_iter().flatten();
        for process in processes.flatten() {
            let Some((name, t)) = ticks(&process.path()) else {
                continue;
            };
            let part = match name.as_str() {
                "java" => "broker",
                "postgres" => "postgres",
                _ => continue,
            };
            *cpu.parts.entry(part).or_default() += t;
            if part == "broker" {
                // Of the broker's time, its compilers' and its collector's.
                let threads = std::fs::read_dir(process.path().join("task"));
                for (name, t) in threads
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| ticks(&e.path()))
                {
                    let part = if name.starts_with("C1 ") || name.starts_with("C2 ") {
                        BROKER_JIT
                    } else if name.starts_with("G1 ") || name.starts_with("GC ") {
                        BROKER_GC
                    } else {
                        continue;
                    };
                    *cpu.parts.entry(part).or_default() += t;
                }
            }
        }
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let all: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        if all.len() >= 5 {
            cpu.idle = all[3] + all[4];
            cpu.busy = all.iter().sum::<u64>() - cpu.idle;
        }
        cpu
    }

    fn since(&self, before: &Cpu) -> Cpu {
        let mut parts = self.parts.clone();
        for (k, v) in parts.iter_mut() {
            *v -= before.parts.get(k).copied().unwrap_or(0).min(*v);
        }
        Cpu {
            parts,
            busy: self.busy - before.busy,
            idle: self.idle - before.idle,
        }
    }

    /// Microseconds of CPU per frame (clock ticks are 10 ms).
    fn per_frame(ticks: u64, frames: usize) -> f64 {
        ticks as f64 * 10_000.0 / frames as f64
    }

    fn line(&self, frames: usize) -> String {
        let named: u64 = self
            .parts
            .iter()
            .filter(|(part, _)| ![BROKER_JIT, BROKER_GC].contains(part))
            .map(|(_, t)| t)
            .sum();
        let mut line = format!(
            "CPU {:5.1} us/frame, machine {:2.0}% idle:",
            Cpu::per_frame(self.busy, frames),
            100.0 * self.idle as f64 / (self.busy + self.idle).max(1) as f64
        );
        for (part, t) in self.parts.iter().filter(|(_, t)| **t > 0) {
            line += &format!(" {part} {:.1},", Cpu::per_frame(*t, frames));
        }
        line += &format!(
            " kernel and rest {:.1}",
            Cpu::per_frame(self.busy.saturating_sub(named), frames)
        );
        line
    }
}

/// A producer's requests over a run (see [`ProducerMetrics`]).
#[derive(Debug, Default, Clone, Copy)]
struct Requests {
    produce: f64,
    bytes: f64,
    trips: f64,
    trip_seconds: f64,
    records: f64,
    wait_seconds: f64,
}

/// Where a run's producer counts its requests.
enum Producer<'a> {
    Raw(&'a ProducerMetrics),
    /// Ingest, at this URL: its `/metrics`.
    Ingest(&'a str),
    None,
}

impl Producer<'_> {
    async fn requests(&self) -> Requests {
        match self {
            Producer::Raw(m) => Requests {
                produce: m.produce_requests.get() as f64,
                bytes: m.sent_bytes.get() as f64,
                trips: m.round_trips.get() as f64,
                trip_seconds: m.round_trip_seconds.get(),
                records: m.queued_records.get() as f64,
                wait_seconds: m.queue_wait_seconds.get(),
            },
            Producer::Ingest(url) => {
                let mut c = Client::new(url, "").unwrap();
                let text =
                    String::from_utf8(c.get("/metrics").await.unwrap().body.to_vec()).unwrap();
                let m = |name: &str| metric(&text, &format!("alba_producer_{name}"));
                Requests {
                    produce: m("produce_requests_total"),
                    bytes: m("sent_bytes_total"),
                    trips: m("round_trips_total"),
                    trip_seconds: m("round_trip_seconds_total"),
                    records: m("queued_records_total"),
                    wait_seconds: m("queue_wait_seconds_total"),
                }
            }
            Producer::None => Requests::default(),
        }
    }
}

impl Requests {
    fn since(&self, before: &Requests) -> Requests {
        Requests {
            produce: self.produce - before.produce,
            bytes: self.bytes - before.bytes,
            trips: self.trips - before.trips,
            trip_seconds: self.trip_seconds - before.trip_seconds,
            records: self.records - before.records,
            wait_seconds: self.wait_seconds - before.wait_seconds,
        }
    }

    fn line(&self, elapsed: Duration) -> String {
        if self.produce < 1.0 {
            return "no produce requests".into();
        }
        format!(
            "{:.0} produce requests of {:.0} KB, round trip {:.2} ms, a request outstanding {:.0}% of the run, records queued {:.1} ms",
            self.produce,
            self.bytes / self.produce / 1e3,
            1e3 * self.trip_seconds / self.trips.max(1.0),
            100.0 * self.trip_seconds / elapsed.as_secs_f64(),
            1e3 * self.wait_seconds / self.records.max(1.0),
        )
    }
}

/// Runs one timed run and measures the CPU it took and its producer's requests.
async fn measured(
    producer: Producer<'_>,
    run: impl Future<Output = Figure>,
) -> (Figure, Cpu, Requests) {
    let requests = producer.requests().await;
    let before = Cpu::now();
    let figure = run.await;
    let cpu = Cpu::now().since(&before);
    // The run's last round trips are in the producer's next report (both producers
    // report at the interval of ingest's test harness).
    tokio::time::sleep(STATS_INTERVAL + STATS_INTERVAL / 2).await;
    let requests = producer.requests().await.since(&requests);
    (figure, cpu, requests)
}

fn main() {
    clisonix_alba::tune_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let t = TestIngest::spawn().await;
        // Ingest's producer settings; only its queue bound is librdkafka's default
        // instead of ingest's in-flight budget, as this producer enqueues a whole run.
        let raw_metrics = ProducerMetrics::new();
        let producer: FutureProducer<RawStats> =
            producer_config(&t.env.kafka, Duration::from_secs(30), 1 << 30)
                .set(
                    "statistics.interval.ms",
                    STATS_INTERVAL.as_millis().to_string(),
                )
                .create_with_context(RawStats(ProducerStats::new(raw_metrics.clone())))
                .unwrap();
        let sink = sink().await;
        let per_device = 4_000u64;
        println!(
            "ingest: {DEVICES} devices x {per_device} frames of {CHANNELS} channels x {SAMPLES} samples (1/8 s at 256 Hz), {} bytes per record; ingest writes through {} producers, the raw producer is one; started {:?}",
            encode(&frames(SessionId::random(), 1, CHANNELS, SAMPLES)[0]).unwrap().len(),
            Config::defaults().producers,
            Timestamp::now()
        );
        // Warm-up, untimed: connections, the producer, the database pool, and the
        // broker's JIT on every path.
        raw(&t, &producer, raw_records(&t, &workload(per_device / 2))).await;
        http(&t, bodies(&workload(per_device / 2), Format::Binary, 128)).await;
        post_all(&sink, "", bodies(&workload(per_device / 2), Format::Binary, 128)).await;
        websocket(&t, workload(per_device / 2)).await;
        http(&t, bodies(&workload(per_device / 10), Format::Json, 128)).await;
        let mut ratios = Vec::new();
        let mut cpus: [Vec<f64>; 4] = Default::default();
        for round in 1..=ROUNDS {
            // Every input of the round is made before its first run: no run shares
            // the machine with the making of another's input.
            let raw_before = raw_records(&t, &workload(per_device));
            let binary = bodies(&workload(per_device), Format::Binary, 128);
            let to_sink = bodies(&workload(per_device), Format::Binary, 128);
            let ws = workload(per_device);
            let json = bodies(&workload(per_device / 5), Format::Json, 128);
            let raw_after = raw_records(&t, &workload(per_device));
            // Each ratio is against the raw runs before and after it.
            let (by_raw, by_ingest) = (|| Producer::Raw(&raw_metrics), || Producer::Ingest(&t.url));
            let raw_before = measured(by_raw(), raw(&t, &producer, raw_before)).await;
            let binary = measured(by_ingest(), http(&t, binary)).await;
            let to_sink = measured(Producer::None, post_all(&sink, "", to_sink)).await;
            let ws = measured(by_ingest(), websocket(&t, ws)).await;
            let json = measured(by_ingest(), http(&t, json)).await;
            let raw_after = measured(by_raw(), raw(&t, &producer, raw_after)).await;
            println!("round {round}");
            let runs = [
                ("raw rdkafka producer (before)", &raw_before),
                ("raw rdkafka producer (after)", &raw_after),
                ("ingest HTTP binary (128/request)", &binary),
                ("ingest WebSocket binary", &ws),
                ("ingest HTTP JSON (128/request)", &json),
                ("HTTP alone: binary to a sink", &to_sink),
            ];
            for (what, (figure, cpu, requests)) in runs {
                println!("  {}", figure.line(what));
                println!("      {}", cpu.line(figure.frames));
                println!("      {}", requests.line(figure.elapsed));
            }
            let raw = Figure {
                frames: raw_before.0.frames + raw_after.0.frames,
                bytes: raw_before.0.bytes + raw_after.0.bytes,
                elapsed: raw_before.0.elapsed + raw_after.0.elapsed,
            };
            // The verdict is against the faster of the two raw runs: the broker's
            // speed swings between runs, and a slow raw run must not flatter ingest.
            let fastest = raw_before.0.rate().max(raw_after.0.rate());
            let ratio = [&binary, &ws, &json].map(|(f, _, _)| f.rate() / fastest);
            println!(
                "  vs the faster raw run: binary/raw {:.2}, websocket/raw {:.2}, json/raw {:.2} (vs both raw runs: binary/raw {:.2})",
                ratio[0],
                ratio[1],
                ratio[2],
                binary.0.rate() / raw.rate()
            );
            ratios.push(ratio);
            let raw_busy = raw_before.1.busy + raw_after.1.busy;
            cpus[0].push(Cpu::per_frame(raw_busy, raw.frames));
            for (i, (f, c, _)) in [&binary, &ws, &json].into_iter().enumerate() {
                cpus[i + 1].push(Cpu::per_frame(c.busy, f.frames));
            }
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let ratio = |i: usize| median(ratios.iter().map(|r| r[i]).collect());
        println!(
            "median over {ROUNDS} rounds, each against its faster raw run: binary/raw {:.2} (goal >= 0.80), websocket/raw {:.2}, json/raw {:.2}",
            ratio(0),
            ratio(1),
            ratio(2)
        );
        let [raw, binary, ws, json] = cpus.map(median);
        println!(
            "median CPU per frame, whole machine: raw {raw:.1} us, binary {binary:.1} us, websocket {ws:.1} us, json {json:.1} us"
        );
        t.stop().await;
    });
}
