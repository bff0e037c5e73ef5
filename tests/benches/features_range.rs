//! Reading one session's time range from the `features` table at millions of rows: the
//! results API's query (every scalar feature, by session and `window_start`, in window
//! order) against 64 sessions × 1000 windows × 32 channels (2,048,000 rows, each with a
//! 65-bin PSD, like 128 Hz data), on a fresh database of the local stack's Postgres.
//!
//! Then the same ranges served through the gateway (in this process) as JSON, CSV and
//! Parquet: per format, the answer's time and the CPU per row served, of this process
//! (the gateway, and the client reading the answer) and of Postgres (its processes'
//! user + system time from /proc).
//!
//! Run: `eval "$(./dev env)"; cargo bench -p clisonix-e2e --bench features_range`

use std::time::Instant;

use clisonix_e2e::procfs::{clock_ticks, ticks};
use clisonix_e2e::TestEnv;
use clisonix_gateway::{Application, Config};
use tokio_util::sync::CancellationToken;

/// Ticks of every Postgres process (the gateway's connections stay open).
fn postgres_ticks() -> u64 {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "postgres")
        })
        .filter_map(|p| p.parse().ok())
        .map(|p| ticks(p).0)
        .sum()
}

const COLUMNS: &str = "window_index, window_start, channel_index, channel_label, abs_delta, \
    abs_theta, abs_alpha, abs_beta, abs_gamma, total_abs, rel_delta, rel_theta, rel_alpha, \
    rel_beta, rel_gamma, peak_alpha_hz, peak_alpha_psd, spectral_entropy, hjorth_activity, \
    hjorth_mobility, hjorth_complexity, aperiodic_exponent, flat, clipped_fraction, \
    line_noise_50hz, line_noise_60hz, seq_gaps, duplicate_frames, out_of_order_frames";

async fn timed(
    pool: &sqlx::PgPool,
    sql: &str,
    session: uuid::Uuid,
    from: &str,
    to: &str,
    tenant: uuid::Uuid,
) -> (f64, usize) {
    let started = Instant::now();
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(session)
        .bind(from.parse::<chrono::DateTime<chrono::Utc>>().unwrap())
        .bind(to.parse::<chrono::DateTime<chrono::Utc>>().unwrap())
        .bind(tenant)
        .fetch_all(pool)
        .await
        .unwrap();
    (started.elapsed().as_secs_f64() * 1e3, rows.len())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let env = TestEnv::get();
        let db = env.fresh_database().await;
        sqlx::migrate!("../gateway/migrations").run(&db.pool).await.unwrap();
        let mut config = Config::defaults();
        config.database_url = clisonix_gateway::config::Secret::new(db.url());
        config.listen = "127.0.0.1:0".parse().unwrap();
        // Measure the API, not the rate limiter.
        config.requests_per_minute_premium = u32::MAX;
        config.requests_per_minute_member = u32::MAX;
        let app = Application::build(config).await.unwrap();
        let gateway = format!("http://127.0.0.1:{}", app.port());
        let stop = CancellationToken::new();
        tokio::spawn(app.run_until_stopped(stop.clone()));
        let signed = clisonix_dev::run::sign_up(&gateway, "features-range")
            .await
            .expect("signing up");
        let tenant: uuid::Uuid = sqlx::query_scalar("SELECT id FROM tenants")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let started = Instant::now();
        sqlx::query(
            "INSERT INTO features (session_id, window_index, channel_index, tenant_id, channel_label, \
               window_start, window_start_sample, window_samples, sample_rate_hz, unit, algorithm_version, \
               abs_delta, abs_theta, abs_alpha, abs_beta, abs_gamma, total_abs, rel_delta, rel_theta, \
               rel_alpha, rel_beta, rel_gamma, peak_alpha_hz, peak_alpha_psd, spectral_entropy, \
               hjorth_activity, hjorth_mobility, hjorth_complexity, aperiodic_exponent, flat, \
               clipped_fraction, line_noise_50hz, line_noise_60hz, seq_gaps, duplicate_frames, \
               out_of_order_frames, psd_resolution_hz, psd) \
             SELECT md5(s::text)::uuid, w, c, $1, 'ch' || c, \
               timestamptz '2026-01-01 00:00:00+00' + s * interval '1 hour' + w * interval '2 seconds', \
               w * 256, 256, 128, 'uV', 'albi-features/1.0.1', \
               random(), random(), random(), random(), random(), random(), random(), random(), \
               random(), random(), random(), 10, random(), random(), random(), random(), random(), \
               random(), false, 0, random(), random(), 0, 0, 0, 1, \
               decode(repeat(md5(s::text || w || c), 32) || repeat('00', 8), 'hex') \
             FROM generate_series(1, 64) s, generate_series(0, 999) w, generate_series(0, 31) c \
             ORDER BY w, s, c",
        )
        .bind(tenant)
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE features").execute(&db.pool).await.unwrap();
        let (rows, size): (i64, i64) = sqlx::query_as(
            "SELECT count(*), pg_total_relation_size('features') FROM features",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        println!(
            "features: {rows} rows, {:.0} MB with indexes, loaded in {:.0} s (windows arrive interleaved across sessions, as in production)",
            size as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
        let sql = format!(
            "SELECT {COLUMNS} FROM features WHERE session_id = $1 AND tenant_id = $4 \
             AND window_start >= $2 AND window_start < $3 ORDER BY window_start, window_index, channel_index"
        );
        let session: uuid::Uuid = sqlx::query_scalar("SELECT md5('17')::uuid").fetch_one(&db.pool).await.unwrap();
        let plan: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
            .bind(session)
            .bind("2026-01-01T17:05:00Z".parse::<chrono::DateTime<chrono::Utc>>().unwrap())
            .bind("2026-01-01T17:15:00Z".parse::<chrono::DateTime<chrono::Utc>>().unwrap())
            .bind(tenant)
            .fetch_all(&db.pool)
            .await
            .unwrap();
        println!("plan:");
        for (line,) in &plan {
            println!("  {line}");
        }
        for (label, from, to) in [
            ("10 minutes (300 windows)", "2026-01-01T17:05:00Z", "2026-01-01T17:15:00Z"),
            ("the whole session (1000 windows)", "2026-01-01T17:00:00Z", "2026-01-01T18:00:00Z"),
        ] {
            let mut times = Vec::new();
            let mut n = 0;
            for _ in 0..21 {
                let (ms, rows) = timed(&db.pool, &sql, session, from, to, tenant).await;
                times.push(ms);
                n = rows;
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{label}: {n} rows, p50 {:.1} ms, max {:.1} ms (21 reads)",
                times[10], times[20]
            );
        }

        // The same ranges through the API.
        sqlx::query(
            "INSERT INTO sessions (session_id, tenant_id, device_id, status, started_at, \
               last_frame_at, first_device_time, last_device_time, sample_rate_hz, channel_labels, \
               frames, samples_per_channel, seq_gaps, duplicate_frames, out_of_order_frames) \
             VALUES ($1, $2, 'bench', 'ended', timestamptz '2026-01-01 17:00:00+00', \
               timestamptz '2026-01-01 17:33:20+00', timestamptz '2026-01-01 17:00:00+00', \
               timestamptz '2026-01-01 17:33:20+00', 128, \
               (SELECT array_agg('ch' || c ORDER BY c) FROM generate_series(0, 31) c), \
               16000, 256000, 0, 0, 0)",
        )
        .bind(session)
        .bind(tenant)
        .execute(&db.pool)
        .await
        .unwrap();
        let key = signed.read_key;
        let mut client = clisonix_player::http::Client::new(&gateway, &key).unwrap();
        let hz = clock_ticks();
        let me = std::process::id();
        println!("through the API (GET /v1/sessions/{{id}}/features, every scalar feature), 11 answers each:");
        for (label, from, to) in [
            ("10 minutes", "2026-01-01T17:05:00Z", "2026-01-01T17:15:00Z"),
            ("whole session", "2026-01-01T17:00:00Z", "2026-01-01T18:00:00Z"),
        ] {
            for format in ["json", "csv", "parquet"] {
                let path = format!("/v1/sessions/{session}/features?from={from}&to={to}&format={format}");
                let mut times = Vec::new();
                let mut bytes = 0;
                let (me0, pg0) = (ticks(me).0, postgres_ticks());
                for _ in 0..11 {
                    let t = Instant::now();
                    let a = client.send("GET", &path, None, Vec::new(), Some(&key)).await.unwrap();
                    times.push(t.elapsed());
                    assert_eq!(a.status, 200);
                    bytes = a.body.len();
                }
                let (me1, pg1) = (ticks(me).0, postgres_ticks());
                times.sort();
                let rows = if label == "10 minutes" { 300 * 32 } else { 1000 * 32 };
                let per_row = |t: u64| t as f64 / hz / (11.0 * rows as f64) * 1e6;
                println!(
                    "  {label} as {format}: {rows} rows, {:.1} MB, p50 {:.1} ms; CPU per row: gateway and client {:.2} µs, Postgres {:.2} µs",
                    bytes as f64 / 1e6,
                    times[5].as_secs_f64() * 1e3,
                    per_row(me1 - me0),
                    per_row(pg1.saturating_sub(pg0)),
                );
            }
        }
        stop.cancel();
        db.drop_now().await;
    });
}
