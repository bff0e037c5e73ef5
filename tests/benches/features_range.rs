//! Reading one session's time range from the `features` table at millions of rows: the
//! results API's query (every scalar feature, by session and `window_start`, in window
//! order) against 64 sessions × 1000 windows × 32 channels (2,048,000 rows, each with a
//! 65-bin PSD, like 128 Hz data), on a fresh database of the local stack's Postgres.
//!
//! Run: `eval "$(./dev env)"; cargo bench -p clisonix-e2e --bench features_range`

use std::time::Instant;

use clisonix_e2e::TestEnv;

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
) -> (f64, usize) {
    let started = Instant::now();
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(session)
        .bind(from.parse::<chrono::DateTime<chrono::Utc>>().unwrap())
        .bind(to.parse::<chrono::DateTime<chrono::Utc>>().unwrap())
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
        let started = Instant::now();
        sqlx::query(
            "INSERT INTO features (session_id, window_index, channel_index, tenant_id, channel_label, \
               window_start, window_start_sample, window_samples, sample_rate_hz, unit, algorithm_version, \
               abs_delta, abs_theta, abs_alpha, abs_beta, abs_gamma, total_abs, rel_delta, rel_theta, \
               rel_alpha, rel_beta, rel_gamma, peak_alpha_hz, peak_alpha_psd, spectral_entropy, \
               hjorth_activity, hjorth_mobility, hjorth_complexity, aperiodic_exponent, flat, \
               clipped_fraction, line_noise_50hz, line_noise_60hz, seq_gaps, duplicate_frames, \
               out_of_order_frames, psd_resolution_hz, psd) \
             SELECT md5(s::text)::uuid, w, c, md5('tenant')::uuid, 'ch' || c, \
               timestamptz '2026-01-01 00:00:00+00' + s * interval '1 hour' + w * interval '2 seconds', \
               w * 256, 256, 128, 'uV', 'albi-features/1.0.1', \
               random(), random(), random(), random(), random(), random(), random(), random(), \
               random(), random(), random(), 10, random(), random(), random(), random(), random(), \
               random(), false, 0, random(), random(), 0, 0, 0, 1, \
               decode(repeat(md5(s::text || w || c), 32) || repeat('00', 8), 'hex') \
             FROM generate_series(1, 64) s, generate_series(0, 999) w, generate_series(0, 31) c \
             ORDER BY w, s, c",
        )
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
            "SELECT {COLUMNS} FROM features WHERE session_id = $1 AND tenant_id = md5('tenant')::uuid \
             AND window_start >= $2 AND window_start < $3 ORDER BY window_start, window_index, channel_index"
        );
        let session: uuid::Uuid = sqlx::query_scalar("SELECT md5('17')::uuid").fetch_one(&db.pool).await.unwrap();
        let plan: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
            .bind(session)
            .bind("2026-01-01T17:05:00Z".parse::<chrono::DateTime<chrono::Utc>>().unwrap())
            .bind("2026-01-01T17:15:00Z".parse::<chrono::DateTime<chrono::Utc>>().unwrap())
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
                let (ms, rows) = timed(&db.pool, &sql, session, from, to).await;
                times.push(ms);
                n = rows;
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{label}: {n} rows, p50 {:.1} ms, max {:.1} ms (21 reads)",
                times[10], times[20]
            );
        }
        db.drop_now().await;
    });
}
