//! The metering stage's throughput: a backlog of usage events (ingest's frames and
//! bytes of 1,000 sessions of 100 tenants, emitted every 5 s) drained by metering into
//! a fresh database of the local stack's Postgres, exactly as it runs (batches of 500,
//! each one transaction with its offsets). Prints events/s, and events per CPU-second
//! of metering itself (its threads in this process, from `/proc`) and of metering and
//! Postgres together: the figure to steer by is events per CPU-second, since the
//! machine's speed swings. Three runs, each on fresh topics and a fresh database;
//! the median and the spread.
//!
//!     ./dev up && eval "$(./dev env)" && cargo bench -p clisonix-e2e --bench metering

use std::time::{Duration, Instant};

use clisonix_e2e::TestEnv;
use clisonix_metering::MeteringStore;
use clisonix_schemas::{encode, DeviceId, SessionId, TenantId, Timestamp, UsageEvent, UsageKind};
use clisonix_stage_runtime::{run_tables, Health, Metering, TablesConfig};
use clisonix_topics::catalog::USAGE_EVENTS;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

const TENANTS: usize = 100;
const SESSIONS_PER_TENANT: usize = 10;
/// Emission rounds: 1,000 sessions x 2 events x 100 rounds = 200,000 events.
const ROUNDS: usize = 100;

/// User+system clock ticks of processes named `name`, or of this process.
fn ticks(name: Option<&str>) -> u64 {
    let read = |path: std::path::PathBuf| -> Option<(String, u64)> {
        let stat = std::fs::read_to_string(path).ok()?;
        let (head, rest) = stat.rsplit_once(") ")?;
        let comm = head.split_once(" (")?.1.to_owned();
        let f: Vec<&str> = rest.split(' ').collect();
        Some((
            comm,
            f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
        ))
    };
    match name {
        None => read("/proc/self/stat".into()).map_or(0, |(_, t)| t),
        Some(name) => std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| read(e.path().join("stat")))
            .filter(|(comm, _)| comm == name)
            .map(|(_, t)| t)
            .sum(),
    }
}

const TICKS_PER_SECOND: f64 = 100.0;

struct Run {
    events: usize,
    seconds: f64,
    metering_cpu: f64,
    postgres_cpu: f64,
}

async fn run_once(env: &TestEnv) -> Run {
    let topics = env.topics();
    env.create_catalog(&topics).await;
    let db = env.fresh_database().await;
    sqlx::migrate!("../gateway/migrations")
        .run(&db.pool)
        .await
        .unwrap();
    let mut tenants = Vec::new();
    for i in 0..TENANTS {
        let id = uuid::Uuid::new_v4();
        sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
            .bind(id)
            .bind(format!("t{i}"))
            .execute(&db.pool)
            .await
            .unwrap();
        tenants.push(TenantId::new(id));
    }
    // The backlog, produced before metering starts.
    let producer: FutureProducer = env.producer();
    let topic = topics.name(&USAGE_EVENTS);
    let device = DeviceId::parse("bench").unwrap();
    let sessions: Vec<(TenantId, SessionId)> = tenants
        .iter()
        .flat_map(|t| (0..SESSIONS_PER_TENANT).map(move |_| (*t, SessionId::random())))
        .collect();
    let start = Timestamp::now().as_micros() - ROUNDS as i64 * 5_000_000;
    let mut pending = Vec::new();
    let mut events = 0usize;
    let mut frames = 0i64;
    for round in 0..ROUNDS {
        for (tenant, session) in &sessions {
            for (kind, quantity) in [
                (UsageKind::FramesIngested, 40),
                (UsageKind::BytesIngested, 40 * 4_500),
            ] {
                let event = UsageEvent {
                    event_id: uuid::Uuid::new_v4(),
                    tenant_id: *tenant,
                    kind,
                    quantity,
                    occurred_at: Timestamp::from_micros(start + round as i64 * 5_000_000),
                    source: "ingest".into(),
                    session_id: Some(*session),
                    device_id: Some(device.clone()),
                    detail: None,
                };
                if kind == UsageKind::FramesIngested {
                    frames += quantity;
                }
                let key = encode(&event.key()).unwrap();
                let value = encode(&event).unwrap();
                pending.push(
                    producer
                        .send_result(FutureRecord::to(&topic).key(&key).payload(&value))
                        .unwrap(),
                );
                events += 1;
                if pending.len() >= 10_000 {
                    for d in pending.drain(..) {
                        d.await.unwrap().unwrap();
                    }
                }
            }
        }
    }
    for d in pending.drain(..) {
        d.await.unwrap().unwrap();
    }

    let stop = CancellationToken::new();
    let health = Health::default();
    let metering = Metering::new(
        MeteringStore::new(db.pool.clone()),
        &topics,
        health.metrics.clone(),
    );
    let config = TablesConfig {
        kafka: env.kafka.clone(),
        topics: topics.clone(),
        group: TestEnv::unique("metering"),
        batch_max: 500,
        batch_linger: Duration::from_millis(20),
    };
    let (self_before, pg_before) = (ticks(None), ticks(Some("postgres")));
    let started = Instant::now();
    let task = tokio::spawn(run_tables(metering, config, health, stop.clone()));
    loop {
        let counted: Option<i64> = sqlx::query_scalar(
            "SELECT sum(quantity)::bigint FROM usage_hourly WHERE meter = 'frames'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if counted == Some(frames) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "metering did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (self_after, pg_after) = (ticks(None), ticks(Some("postgres")));
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop_now().await;
    env.delete_topics(topics.prefix()).await;
    Run {
        events,
        seconds,
        metering_cpu: (self_after - self_before) as f64 / TICKS_PER_SECOND,
        postgres_cpu: (pg_after - pg_before) as f64 / TICKS_PER_SECOND,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let env = TestEnv::get();
        let mut runs = Vec::new();
        for i in 0..3 {
            let r = run_once(&env).await;
            println!(
                "run {}: {} events in {:.2} s = {:.0} events/s; metering {:.2} CPU-s ({:.0} events per CPU-second), Postgres {:.2} CPU-s ({:.0} events per CPU-second of both)",
                i + 1,
                r.events,
                r.seconds,
                r.events as f64 / r.seconds,
                r.metering_cpu,
                r.events as f64 / r.metering_cpu,
                r.postgres_cpu,
                r.events as f64 / (r.metering_cpu + r.postgres_cpu)
            );
            runs.push(r);
        }
        let figure = |f: &dyn Fn(&Run) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            (v[1], v[0], v[2])
        };
        for (name, f) in [
            ("events/s", &(|r: &Run| r.events as f64 / r.seconds) as &dyn Fn(&Run) -> f64),
            ("events per CPU-second of metering", &|r: &Run| r.events as f64 / r.metering_cpu),
            ("events per CPU-second of metering and Postgres", &|r: &Run| {
                r.events as f64 / (r.metering_cpu + r.postgres_cpu)
            }),
        ] {
            let (median, low, high) = figure(f);
            println!("{name}: median {median:.0} (runs {low:.0} to {high:.0})");
        }
    });
}
