//! Metering on the whole pipeline: two tenants stream while the metering stage is
//! killed with -9 twice and restarted; then the topics are replayed from the start
//! into the same database by a new consumer group. Every hour's totals equal what
//! ingest accepted (the usage events' sums, per tenant, meter and hour), sessions'
//! time equals their samples, and the replay changes nothing. Last, a metering replay
//! run (`clisonix-stage --replay audit metering`), killed with -9 mid-way and resumed,
//! recounts everything into its own schema: equal to live, hour by hour, with the live
//! tables untouched.

mod common;
#[path = "../../stages/runtime/tests/common/mod.rs"]
mod stages;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clisonix_e2e::TestEnv;
use clisonix_player::http::Format;
use clisonix_player::play::{play, PlayOptions, PlayReport, Transport};
use clisonix_player::recording::load;
use clisonix_schemas::{decode, UsageEvent, UsageKind};
use clisonix_topics::catalog::{EEG_FEATURES, EEG_SESSIONS, USAGE_EVENTS};
use common::{recording_path, Parts, Pipeline};
use sqlx::types::chrono::{DateTime, Utc};
use stages::{read_all, StageProcess};
use uuid::Uuid;

type Totals = BTreeMap<(Uuid, String, DateTime<Utc>), i64>;

/// `usage_hourly` as (tenant, meter, hour) -> quantity.
async fn hourly(p: &Pipeline) -> Totals {
    hourly_in(p, "public").await
}

/// A schema's `usage_hourly` and `usage_carried` as (tenant, meter, hour) -> quantity.
async fn hourly_in(p: &Pipeline, schema: &str) -> Totals {
    let sql = format!(
        "SELECT tenant_id, meter, hour, sum(quantity)::bigint FROM ( \
             SELECT tenant_id, meter, hour, quantity FROM \"{schema}\".usage_hourly \
             UNION ALL \
             SELECT tenant_id, meter, occurred_hour, quantity FROM \"{schema}\".usage_carried) u \
         GROUP BY 1, 2, 3"
    );
    let rows: Vec<(Uuid, String, DateTime<Utc>, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(&p.db.pool)
        .await
        .unwrap();
    rows.into_iter()
        .map(|(t, m, h, q)| ((t, m, h), q))
        .collect()
}

async fn total(p: &Pipeline, tenant: Uuid, meter: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(quantity), 0)::bigint FROM usage_hourly WHERE tenant_id = $1 AND meter = $2",
    )
    .bind(tenant)
    .bind(meter)
    .fetch_one(&p.db.pool)
    .await
    .unwrap()
}

async fn wait_total(p: &Pipeline, tenant: Uuid, meter: &str, want: i64, metering: &StageProcess) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = total(p, tenant, meter).await;
        if got == want {
            return;
        }
        assert!(
            got < want,
            "{meter}: {got} counted, more than the {want} used"
        );
        assert!(
            Instant::now() < deadline,
            "{meter}: {got} of {want}\n{}",
            metering.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn records_in(metering: &StageProcess) -> f64 {
    let (_, metrics) = stages::http_get(&metering.http_addr(), "/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("clisonix_stage_records_in_total{stage=\"metering\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn tenant_of(p: &Pipeline, report: &PlayReport) -> Uuid {
    sqlx::query_scalar("SELECT tenant_id FROM ingest_sessions WHERE session_id = $1")
        .bind(report.sessions[0].1.as_uuid())
        .fetch_one(&p.db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_twice_and_a_replay_leave_every_hour_equal_to_what_ingest_accepted() {
    let p = Pipeline::start_with(Parts {
        jona: false,
        sink: false,
    })
    .await;
    let url = p.db.url();
    let vars = [
        ("DATABASE_URL", url.as_str()),
        ("CLISONIX_MIGRATE", "false"),
    ];
    let group = TestEnv::unique("metering");
    // Small batches: many transactions for the kills to land among.
    let spawn = |group: &str| {
        StageProcess::spawn_with_env(&p.env, &p.topics, group, "m", 10, &["metering"], &vars)
    };
    let mut metering = spawn(&group);

    // Two tenants stream at eight times real time: alpha from two devices, beta one.
    let recording = load(&recording_path(), 125).unwrap();
    let options = |key: &str, devices: usize, format: Format| PlayOptions {
        url: p.ingest.clone(),
        key: key.to_owned(),
        transport: Transport::WebSocket,
        format,
        devices,
        speed: 8.0,
        end_sessions: true,
        ..PlayOptions::default()
    };
    let alpha_options = options(&p.tenant.ingest_key, 2, Format::Binary);
    let beta_options = options(&p.other.ingest_key, 1, Format::Json);
    let streams = async {
        tokio::join!(
            play(&recording, &alpha_options),
            play(&recording, &beta_options)
        )
    };
    let kills = async {
        for _ in 0..2 {
            // Once metering has counted some and before the streams end: kill -9.
            let deadline = Instant::now() + Duration::from_secs(60);
            while records_in(&metering) < 20.0 {
                assert!(Instant::now() < deadline, "{}", metering.log());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_secs(4)).await;
            metering.kill9();
            metering = spawn(&group);
        }
    };
    let ((alpha, beta), ()) = tokio::join!(streams, kills);
    let (alpha, beta) = (alpha.unwrap(), beta.unwrap());
    assert_eq!((alpha.acked, beta.acked), (2 * 1904, 1904));
    let (a, b) = (tenant_of(&p, &alpha).await, tenant_of(&p, &beta).await);

    // Every frame ingest accepted is counted, once; sessions' time is their samples
    // (1904 frames of 16 samples at 128 Hz: 238 s, of 32 channels), their windows
    // 119 per channel.
    for (tenant, sessions, report) in [(a, 2, &alpha), (b, 1, &beta)] {
        wait_total(&p, tenant, "frames", report.acked as i64, &metering).await;
        wait_total(&p, tenant, "device_ms", sessions * 238_000, &metering).await;
        wait_total(&p, tenant, "channel_ms", sessions * 32 * 238_000, &metering).await;
        wait_total(
            &p,
            tenant,
            "feature_windows",
            sessions * 119 * 32,
            &metering,
        )
        .await;
    }
    let (bytes_a, bytes_b) = (total(&p, a, "bytes").await, total(&p, b, "bytes").await);
    // Bytes are the frames' size as stored (whatever the wire format): alpha's two
    // sessions of the recording are twice beta's one.
    assert!(bytes_b > 1904 * 32 * 16 * 4, "bytes: {bytes_b}");
    assert_eq!(bytes_a, 2 * bytes_b);

    // Per hour and meter, the usage events' own sums (each event id once).
    let events = read_all(
        &p.env,
        &p.topics.name(&USAGE_EVENTS),
        1,
        Duration::from_secs(60),
        Duration::from_secs(3),
    )
    .await;
    let mut want: Totals = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for (_, value) in &events {
        let e: UsageEvent = decode(value).unwrap();
        if !seen.insert(e.event_id) {
            continue;
        }
        let meter = match e.kind {
            UsageKind::FramesIngested => "frames",
            UsageKind::BytesIngested => "bytes",
            other => panic!("ingest emitted {other:?}"),
        };
        let hour = e.occurred_at.as_millis().div_euclid(3_600_000) * 3_600_000;
        *want
            .entry((
                e.tenant_id.as_uuid(),
                meter.into(),
                DateTime::from_timestamp_millis(hour).unwrap(),
            ))
            .or_default() += e.quantity;
    }
    let got = hourly(&p).await;
    let got_events: Totals = got
        .iter()
        .filter(|((_, m, _), _)| m == "frames" || m == "bytes")
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert_eq!(
        got_events, want,
        "every hour's totals equal the events' sums"
    );

    // A replay of every input from the start, by a new group, into the same database.
    let inputs: usize = {
        let mut n = events.len();
        for topic in [&EEG_SESSIONS, &EEG_FEATURES] {
            n += read_all(
                &p.env,
                &p.topics.name(topic),
                1,
                Duration::from_secs(60),
                Duration::from_secs(3),
            )
            .await
            .len();
        }
        n
    };
    drop(metering);
    let replay = spawn(&TestEnv::unique("replay"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while records_in(&replay) < inputs as f64 {
        assert!(Instant::now() < deadline, "{}", replay.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(hourly(&p).await, got, "the replay counted nothing twice");
    drop(replay);

    // A metering replay run into its own schema, killed once it has counted some.
    let live_before = live_state(&p).await;
    let schema_offsets = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM replay_audit.metering_offsets",
        )
        .fetch_one(&p.db.pool)
        .await
        .unwrap_or(0)
    };
    let mut run = StageProcess::spawn_with_env(
        &p.env,
        &p.topics,
        "ignored",
        "audit",
        10,
        &["--replay", "audit", "metering"],
        &vars,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while schema_offsets().await < 200 {
        assert!(Instant::now() < deadline, "{}", run.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.kill9();
    let counted_when_killed = schema_offsets().await;
    assert!(
        counted_when_killed < inputs as i64,
        "killed mid-way: {counted_when_killed} of {inputs}"
    );
    let out = std::process::Command::new(stages::stage_binary())
        .args(["--bootstrap", &p.env.kafka.bootstrap])
        .args(["--topic-prefix", p.topics.prefix()])
        .args(["--replay", "audit", "--batch-max", "50", "metering"])
        .env("DATABASE_URL", &url)
        .env("CLISONIX_MIGRATE", "false")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    // Every planned offset read: the records, and the transaction markers between them.
    let read: usize = stderr
        .split("replay audit of metering done: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        read >= inputs,
        "{read} offsets of {inputs} records: {stderr}"
    );
    assert_eq!(
        hourly_in(&p, "replay_audit").await,
        got,
        "the resumed run counted every record once, as live did"
    );
    // Its summary: per meter, the run's usage against live's, no hour differing.
    for meter in [
        "bytes",
        "channel_ms",
        "device_ms",
        "feature_windows",
        "frames",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(meter))
            .unwrap_or_else(|| panic!("{meter} missing:\n{stdout}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], cols[2], "{line}");
        assert_eq!(cols[3], "0", "{line}");
        assert_eq!(cols[4], "0", "no hour differs: {line}");
    }
    assert_eq!(live_state(&p).await, live_before, "live tables untouched");
    // Started again, a finished run reads nothing and counts nothing.
    let again = std::process::Command::new(stages::stage_binary())
        .args(["--bootstrap", &p.env.kafka.bootstrap])
        .args(["--topic-prefix", p.topics.prefix()])
        .args(["--replay", "audit", "metering"])
        .env("DATABASE_URL", &url)
        .env("CLISONIX_MIGRATE", "false")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(hourly_in(&p, "replay_audit").await, got);
    p.stop().await;
}

/// Everything metering writes or moves in the live schema, as text.
async fn live_state(p: &Pipeline) -> Vec<String> {
    let mut state = Vec::new();
    for table in [
        "usage_hourly",
        "usage_carried",
        "usage_sessions",
        "usage_alerts",
        "metering_offsets",
        "metering_events",
        "subscriptions",
        "billing_periods",
        "webhook_events",
    ] {
        let sql = format!(
            "SELECT coalesce(string_agg(t::text, '|' ORDER BY t::text), '') FROM public.{table} t"
        );
        state.push(
            sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql))
                .fetch_one(&p.db.pool)
                .await
                .unwrap(),
        );
    }
    state
}
