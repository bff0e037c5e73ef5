//! Invoices on real Postgres: a period's invoice from known usage and a plan change
//! mid-period, exact to the minor unit; a draft while the period is open to late usage,
//! finalized with the next number once it closes; concurrent and repeated runs leave
//! one invoice per tenant and period; a finalized invoice cannot change.

use chrono::{DateTime, TimeZone, Utc};
use clisonix_billing::{InvoiceStatus, Invoicing};
use clisonix_e2e::TestEnv;
use sqlx::PgPool;
use uuid::Uuid;

fn at(month: u32, day: u32, hour: u32, minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, month, day, hour, minute, 0)
        .unwrap()
}

async fn exec(pool: &PgPool, sql: &'static str) {
    sqlx::query(sql).execute(pool).await.unwrap();
}

/// Two private plans: `small` (free, 1,000 frames included) and `big` (30.00 a period,
/// 3,000,000 frames included, then 0.07 per 1,000).
async fn plans(pool: &PgPool) {
    exec(
        pool,
        "INSERT INTO plans (plan_id, version, name, currency, base_fee_minor, max_concurrent_sessions, \
         max_devices, requests_per_minute_member, requests_per_minute_premium, audio_presets, retention_days, public) \
         VALUES ('small', 1, 'Small', 'EUR', 0, NULL, NULL, 60, 60, '{}', 7, false), \
                ('big', 1, 'Big', 'EUR', 3000, NULL, NULL, 60, 60, '{}', 7, false)",
    )
    .await;
    exec(
        pool,
        "INSERT INTO plan_meters (plan_id, version, meter, included, price_minor, price_per, limit_kind) VALUES \
         ('small', 1, 'frames', 1000, 0, 1, 'hard'), ('big', 1, 'frames', 3000000, 7, 1000, 'soft')",
    )
    .await;
}

/// A tenant whose November period (30 days) starts on `small` and moves to `big`
/// after ten days; its December period is on `big`.
async fn tenant(pool: &PgPool) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'invoiced')")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM billing_periods WHERE tenant_id = $1")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE subscriptions SET plan_id = 'big', plan_version = 1, anchor = $2, period_start = $2, \
             period_end = $3 WHERE tenant_id = $1",
    )
    .bind(id)
    .bind(at(11, 1, 0, 0))
    .bind(at(12, 1, 0, 0))
    .execute(pool)
    .await
    .unwrap();
    // The trigger recorded that change now; the test's history is its own.
    sqlx::query("DELETE FROM subscription_changes WHERE tenant_id = $1")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO billing_periods (tenant_id, period_start, period_end, plan_id, plan_version) \
         VALUES ($1, $2, $3, 'big', 1)",
    )
    .bind(id)
    .bind(at(11, 1, 0, 0))
    .bind(at(12, 1, 0, 0))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO subscription_changes (tenant_id, at, plan_id, plan_version) \
         VALUES ($1, $2, 'small', 1), ($1, $3, 'big', 1)",
    )
    .bind(id)
    .bind(at(10, 20, 0, 0))
    .bind(at(11, 11, 0, 0))
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn usage(pool: &PgPool, tenant: Uuid, hour: DateTime<Utc>, frames: i64) {
    sqlx::query(
        "INSERT INTO usage_hourly (tenant_id, meter, hour, period_start, quantity) \
         VALUES ($1, 'frames', $2, $3, $4) \
         ON CONFLICT (tenant_id, meter, hour, period_start) DO UPDATE SET quantity = usage_hourly.quantity + EXCLUDED.quantity",
    )
    .bind(tenant)
    .bind(hour)
    .bind(at(11, 1, 0, 0))
    .bind(frames)
    .execute(pool)
    .await
    .unwrap();
}

async fn count(pool: &PgPool, tenant: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM invoices WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_period_is_invoiced_once_exactly_drafted_then_finalized_with_the_next_number() {
    let db = TestEnv::get().fresh_database().await;
    let pool = &db.pool;
    sqlx::migrate!("../../gateway/migrations")
        .run(pool)
        .await
        .unwrap();
    plans(pool).await;
    exec(pool, "UPDATE billing_settings SET tax_rate_bp = 1900").await;
    let a = tenant(pool).await;
    let b = tenant(pool).await;
    // Tenant a's systems hear of finalized invoices and crossed thresholds.
    sqlx::query(
        "INSERT INTO webhook_endpoints (id, tenant_id, url, events, secret) \
         VALUES ($1, $2, 'https://hooks.example.org/x', '{invoice.finalized,usage.threshold_reached}', 'whsec_x')",
    )
    .bind(Uuid::new_v4())
    .bind(a)
    .execute(pool)
    .await
    .unwrap();
    usage(pool, a, at(11, 1, 5, 0), 500).await;
    usage(pool, a, at(11, 11, 0, 0), 2_500_000).await;
    usage(pool, a, at(11, 29, 23, 0), 100_001).await;
    let invoicing = Invoicing::new(pool.clone());

    // Before the period ends: nothing.
    let done = invoicing.run(at(11, 30, 12, 0)).await.unwrap();
    assert_eq!((done.drafted, done.finalized), (0, 0));
    assert_eq!(count(pool, a).await, 0);

    // Ended, not closed (close_after: 1 h): drafts, computed again on every run, in
    // runs that overlap.
    let (x, y) = tokio::join!(
        invoicing.run(at(12, 1, 0, 10)),
        invoicing.run(at(12, 1, 0, 10))
    );
    assert_eq!(
        x.unwrap().drafted + y.unwrap().drafted,
        4,
        "each run drafts both"
    );
    assert_eq!((count(pool, a).await, count(pool, b).await), (1, 1));
    let list = clisonix_billing::store::invoices(pool, a, 10, None)
        .await
        .unwrap();
    let draft = clisonix_billing::store::invoice(pool, a, list[0].id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((draft.status, draft.number), (InvoiceStatus::Draft, None));
    // small, 10 of 30 days: 500 frames of 333 included (price 0); big, 20 days: the base
    // fee's two thirds and 2,600,001 frames of 2,000,000 included, 600,001 at 7 per
    // 1,000 = 4,200.007.
    let amounts: Vec<(&str, i64, i64, i64)> = draft
        .lines
        .iter()
        .map(|l| (l.plan_id.as_str(), l.quantity, l.included, l.amount_minor))
        .collect();
    assert_eq!(
        amounts,
        [
            ("small", 500, 333, 0),
            ("big", 1, 0, 2_000),
            ("big", 2_600_001, 2_000_000, 4_200)
        ]
    );
    assert_eq!(
        (
            draft.subtotal_minor,
            draft.tax_rate_bp,
            draft.tax_minor,
            draft.total_minor
        ),
        (6_200, 1_900, 1_178, 7_378)
    );

    // Late usage while the period is open updates the draft.
    usage(pool, a, at(11, 30, 23, 0), 1_000_000).await;
    invoicing.run(at(12, 1, 0, 30)).await.unwrap();
    let draft = clisonix_billing::store::invoice(pool, a, draft.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        draft.lines[2].amount_minor, 11_200,
        "1,600,001 beyond: 11,200.007"
    );
    assert_eq!(draft.subtotal_minor, 13_200);

    // Closed: finalized with consecutive numbers, once, however often it runs.
    let done = invoicing.run(at(12, 1, 1, 30)).await.unwrap();
    assert_eq!((done.drafted, done.finalized), (0, 2));
    invoicing.run(at(12, 1, 2, 0)).await.unwrap();
    let fa = clisonix_billing::store::invoice(pool, a, draft.id)
        .await
        .unwrap()
        .unwrap();
    let fb = clisonix_billing::store::invoices(pool, b, 10, None)
        .await
        .unwrap();
    assert_eq!(fa.status, InvoiceStatus::Finalized);
    let mut numbers = vec![fa.number.unwrap(), fb[0].number.unwrap()];
    numbers.sort();
    assert_eq!(numbers, [1, 2]);
    assert_eq!((count(pool, a).await, count(pool, b).await), (1, 1));
    assert_eq!(fa.subtotal_minor, 13_200, "finalized as last computed");
    // b had no usage: the base fee's two thirds.
    assert_eq!(fb[0].subtotal_minor, 2_000);
    // One webhook event for a's invoice, written with its finalization; none for b
    // (no endpoint), however often invoicing ran.
    let events: Vec<(uuid::Uuid, String, serde_json::Value)> =
        sqlx::query_as("SELECT tenant_id, type, payload FROM webhook_events ORDER BY created_at")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].0, events[0].1.as_str()),
        (a, "invoice.finalized")
    );
    assert_eq!(events[0].2["data"]["total_minor"], 15_708);
    assert_eq!(events[0].2["data"]["number"], fa.number.unwrap());
    // A crossed threshold, recorded by metering, is an event too (once).
    for _ in 0..2 {
        sqlx::query(
            "INSERT INTO usage_alerts (tenant_id, period_start, meter, threshold, used, included, limit_kind) \
             VALUES ($1, $2, 'frames', 80, 800, 1000, 'hard') ON CONFLICT DO NOTHING",
        )
        .bind(a)
        .bind(at(12, 1, 0, 0))
        .execute(pool)
        .await
        .unwrap();
    }
    let thresholds: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM webhook_events e JOIN webhook_deliveries d ON d.event_id = e.id \
         WHERE e.type = 'usage.threshold_reached' AND e.payload -> 'data' ->> 'threshold' = '80'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(thresholds, 1);

    // A finalized invoice's content and lines never change; its state moves on.
    let changed = sqlx::query("UPDATE invoices SET total_minor = 1 WHERE id = $1")
        .bind(fa.id)
        .execute(pool)
        .await;
    assert!(changed.is_err());
    let changed = sqlx::query("DELETE FROM invoice_lines WHERE invoice_id = $1")
        .bind(fa.id)
        .execute(pool)
        .await;
    assert!(changed.is_err());
    sqlx::query("UPDATE invoices SET status = 'paid', paid_at = now() WHERE id = $1")
        .bind(fa.id)
        .execute(pool)
        .await
        .unwrap();
    let back = sqlx::query("UPDATE invoices SET status = 'finalized' WHERE id = $1")
        .bind(fa.id)
        .execute(pool)
        .await;
    assert!(back.is_err(), "paid is final");
    // Other tenants see none of it.
    let other = Uuid::new_v4();
    assert!(clisonix_billing::store::invoice(pool, other, fa.id)
        .await
        .unwrap()
        .is_none());
    assert!(clisonix_billing::store::invoices(pool, b, 10, None)
        .await
        .unwrap()
        .iter()
        .all(|i| i.tenant_id == b));
}
