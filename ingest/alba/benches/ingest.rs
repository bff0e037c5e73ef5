//! Ingest throughput against the raw producer, on the stack `./dev up` runs:
//! 32-channel 256 Hz frames of 1/8 s, posted as binary and as JSON batches and
//! streamed over WebSocket by several devices at once, each compared with a plain
//! rdkafka producer (the same settings) writing the same record bytes to the same
//! broker. Prints frames/s and MB/s of frame records.
//!
//! The broker's speed drifts (its JIT warming up, log rolls, the page cache), so the
//! figures come after an untimed warm-up of every kind of run, the raw producer runs
//! before and after each round's ingest runs, and the verdict is the median of five
//! rounds' ratios. Ingest runs in this process on the allocator its binary uses.
//!
//!     ./dev up && eval "$(./dev env)" && cargo bench -p clisonix-alba --bench ingest

#[path = "../tests/common/mod.rs"]
mod common;

#[global_allocator]
static ALLOCATOR: clisonix_alba::Allocator = clisonix_alba::ALLOCATOR;

use std::time::{Duration, Instant};

use clisonix_player::http::{Client, Format};
use clisonix_player::stream::{stream_frames, StreamOptions};
use clisonix_schemas::{encode, Frame, SessionId, Timestamp};
use common::{frames, TestIngest};
use rdkafka::producer::{FutureProducer, FutureRecord};

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

async fn raw(t: &TestIngest, devices: &[Vec<Frame>]) -> Figure {
    let producer: FutureProducer = t.env.kafka.producer().create().unwrap();
    let topic = t.frames_topic();
    let records: Vec<(Vec<u8>, Vec<u8>)> = devices
        .iter()
        .flatten()
        .map(|f| {
            let mut f = f.clone();
            f.tenant_id = t.tenant.id;
            (encode(&f.key()).unwrap(), encode(&f).unwrap())
        })
        .collect();
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

async fn http(t: &TestIngest, devices: Vec<Vec<Frame>>, format: Format, batch: usize) -> Figure {
    let bytes = record_bytes(&devices);
    let count = devices.iter().map(Vec::len).sum();
    // The devices' bodies are encoded before the clock starts, as the raw producer's
    // records are: the figure is ingest's, not the client's encoder's.
    let bodies: Vec<Vec<(&'static str, Vec<u8>)>> = devices
        .iter()
        .map(|frames| frames.chunks(batch).map(|c| format.body(c)).collect())
        .collect();
    let started = Instant::now();
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|bodies| {
            let (url, key) = (t.url.clone(), t.tenant.key.clone());
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
        frames: count,
        bytes,
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

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let t = TestIngest::spawn().await;
        let per_device = 4_000u64;
        println!(
            "ingest: {DEVICES} devices x {per_device} frames of {CHANNELS} channels x {SAMPLES} samples (1/8 s at 256 Hz), {} bytes per record; started {:?}",
            encode(&frames(SessionId::random(), 1, CHANNELS, SAMPLES)[0]).unwrap().len(),
            Timestamp::now()
        );
        // Warm-up, untimed: connections, the producer, the database pool, and the
        // broker's JIT on every path.
        let _ = raw(&t, &workload(per_device / 2)).await;
        http(&t, workload(per_device / 2), Format::Binary, 128).await;
        websocket(&t, workload(per_device / 2)).await;
        http(&t, workload(per_device / 10), Format::Json, 128).await;
        let mut ratios = Vec::new();
        for round in 1..=ROUNDS {
            // Each ratio is against the mean of the raw runs before and after it.
            let raw_before = raw(&t, &workload(per_device)).await;
            let binary = http(&t, workload(per_device), Format::Binary, 128).await;
            let ws = websocket(&t, workload(per_device)).await;
            let json = http(&t, workload(per_device / 5), Format::Json, 128).await;
            let raw_after = raw(&t, &workload(per_device)).await;
            let raw = Figure {
                frames: raw_before.frames + raw_after.frames,
                bytes: raw_before.bytes + raw_after.bytes,
                elapsed: raw_before.elapsed + raw_after.elapsed,
            };
            println!("round {round}");
            println!("  {}", raw_before.line("raw rdkafka producer (before)"));
            println!("  {}", raw_after.line("raw rdkafka producer (after)"));
            println!("  {}", binary.line("ingest HTTP binary (128/request)"));
            println!("  {}", ws.line("ingest WebSocket binary"));
            println!("  {}", json.line("ingest HTTP JSON (128/request)"));
            let ratio = [binary.rate(), ws.rate(), json.rate()].map(|r| r / raw.rate());
            println!(
                "  binary/raw {:.2}, websocket/raw {:.2}, json/raw {:.2}",
                ratio[0], ratio[1], ratio[2]
            );
            ratios.push(ratio);
        }
        let median = |i: usize| {
            let mut v: Vec<f64> = ratios.iter().map(|r| r[i]).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "median over {ROUNDS} rounds: binary/raw {:.2} (goal >= 0.80), websocket/raw {:.2}, json/raw {:.2}",
            median(0),
            median(1),
            median(2)
        );
        t.stop().await;
    });
}
