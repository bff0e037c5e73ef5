//! Paying through Stripe, against stripe-mock (Stripe's own API simulator, started by
//! `./dev`): checkout and portal sessions for admins with a customer made once per
//! tenant; usage reported to Stripe's meters per completed hour under keys that make a
//! retried hour report once; Stripe down answers 503 on its two routes and nothing
//! else notices.

mod common;

use std::time::Duration;

use chrono::{DurationRound, TimeDelta, Utc};
use clisonix_billing::stripe::{report_key, report_usage, Stripe};
use clisonix_gateway::config::Secret;
use common::{assert_error, token, TestApp};
use serde_json::json;
use uuid::Uuid;

fn stripe_mock() -> String {
    std::env::var("CLISONIX_STRIPE_API_BASE")
        .expect("CLISONIX_STRIPE_API_BASE (stripe-mock): run the tests with ./dev test")
}

async fn app_on(base: String) -> TestApp {
    TestApp::spawn_with(move |c| {
        c.stripe_secret_key = Some(Secret::new("sk_test_clisonix"));
        c.stripe_api_base = base;
        c.stripe_prices = vec![("pro".into(), "price_pro_monthly".into())];
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_get_checkout_and_portal_sessions_with_one_customer_per_tenant() {
    let app = app_on(stripe_mock()).await;
    let owner = app.signup("owner@example.org").await;
    let tenant = Uuid::parse_str(owner["tenant_id"].as_str().unwrap()).unwrap();
    let t = token(&owner);
    let checkout = json!({"plan_id": "pro", "success_url": "https://app.example.org/paid",
                          "cancel_url": "https://app.example.org/plans"});
    let r = app
        .authed("POST", "/v1/billing/checkout", &t, Some(checkout.clone()))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body["url"].as_str().unwrap().starts_with("https://"),
        "{}",
        r.body
    );
    assert!(
        r.body["id"].as_str().unwrap().starts_with("cs_"),
        "{}",
        r.body
    );
    let customer: String =
        sqlx::query_scalar("SELECT customer_id FROM stripe_customers WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert!(customer.starts_with("cus_"), "{customer}");
    // The same customer the second time.
    let r = app
        .authed("POST", "/v1/billing/checkout", &t, Some(checkout))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let portal = app
        .authed(
            "POST",
            "/v1/billing/portal",
            &t,
            Some(json!({"return_url": "https://app.example.org/billing"})),
        )
        .await;
    assert_eq!(portal.status, 200, "{}", portal.body);
    assert!(portal.body["url"].as_str().unwrap().starts_with("https://"));
    let customers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM stripe_customers WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(customers, 1);
    let audited: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE tenant_id = $1 AND action LIKE 'billing_%' ORDER BY id",
    )
    .bind(tenant)
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(
        audited,
        [
            "billing_checkout_created",
            "billing_checkout_created",
            "billing_portal_opened"
        ]
    );

    // Bad input: a clear 4xx, nothing sent.
    for (body, status, code) in [
        (
            json!({"plan_id": "gold", "success_url": "https://x.org"}),
            422,
            "unknown_plan",
        ),
        (
            json!({"plan_id": "enterprise", "success_url": "https://x.org"}),
            422,
            "plan_not_sold",
        ),
        (
            json!({"plan_id": "pro", "success_url": "ftp://x.org"}),
            422,
            "invalid_field",
        ),
        (json!({"plan_id": "pro"}), 422, "invalid_field"),
    ] {
        let r = app
            .authed("POST", "/v1/billing/checkout", &t, Some(body))
            .await;
        assert_error(&r, status, code);
    }
    // Members may not.
    sqlx::query("UPDATE memberships SET role = 'member' WHERE user_id = $1::uuid")
        .bind(owner["user_id"].as_str().unwrap())
        .execute(app.pool())
        .await
        .unwrap();
    let member = app
        .post(
            "/v1/auth/login",
            json!({"email": "owner@example.org", "password": "Correct horse 42"}),
        )
        .await;
    let m = member.body["access_token"].as_str().unwrap();
    let r = app
        .authed(
            "POST",
            "/v1/billing/portal",
            m,
            Some(json!({"return_url": "https://x.org"})),
        )
        .await;
    assert_error(&r, 403, "forbidden");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_hours_are_reported_once_under_keys_a_retry_repeats() {
    let app = app_on(stripe_mock()).await;
    let owner = app.signup("owner@example.org").await;
    let tenant = Uuid::parse_str(owner["tenant_id"].as_str().unwrap()).unwrap();
    let pool = app.pool();
    sqlx::query("INSERT INTO stripe_customers (tenant_id, customer_id) VALUES ($1, 'cus_report')")
        .bind(tenant)
        .execute(pool)
        .await
        .unwrap();
    let hour = Utc::now().duration_trunc(TimeDelta::hours(1)).unwrap() - TimeDelta::hours(2);
    let add = |quantity: i64, hour: chrono::DateTime<Utc>| async move {
        sqlx::query(
            "INSERT INTO usage_hourly (tenant_id, meter, hour, period_start, quantity) \
             SELECT $1, 'device_ms', $2, period_start, $3 FROM subscriptions WHERE tenant_id = $1 \
             ON CONFLICT (tenant_id, meter, hour, period_start) DO UPDATE SET quantity = usage_hourly.quantity + EXCLUDED.quantity",
        )
        .bind(tenant)
        .bind(hour)
        .bind(quantity)
        .execute(pool)
        .await
        .unwrap();
    };
    add(3_600_000, hour).await;
    // The hour in progress is not reported yet.
    add(
        1_000,
        Utc::now().duration_trunc(TimeDelta::hours(1)).unwrap(),
    )
    .await;
    let stripe = Stripe::new(&stripe_mock(), "sk_test_clisonix");
    let reported = |tenant: Uuid| async move {
        sqlx::query_as::<_, (i64, String)>(
            "SELECT reported, identifier FROM stripe_meter_reports WHERE tenant_id = $1",
        )
        .bind(tenant)
        .fetch_all(pool)
        .await
        .unwrap()
    };
    let done = report_usage(&stripe, pool, Utc::now(), 100).await.unwrap();
    assert_eq!((done.events, done.failed), (1, 0));
    let first = report_key(tenant, "device_ms", hour, 3_600_000);
    assert_eq!(reported(tenant).await, [(3_600_000, first.clone())]);
    // Nothing new: nothing sent.
    assert_eq!(
        report_usage(&stripe, pool, Utc::now(), 100)
            .await
            .unwrap()
            .events,
        0
    );

    // A crash after Stripe took the event, before it was recorded: the retry goes out
    // under the same key, which Stripe takes once.
    sqlx::query("DELETE FROM stripe_meter_reports WHERE tenant_id = $1")
        .bind(tenant)
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(
        report_usage(&stripe, pool, Utc::now(), 100)
            .await
            .unwrap()
            .events,
        1
    );
    assert_eq!(reported(tenant).await, [(3_600_000, first)]);

    // Late usage of a reported hour goes out as the difference, under a key of its own.
    add(400_000, hour).await;
    assert_eq!(
        report_usage(&stripe, pool, Utc::now(), 100)
            .await
            .unwrap()
            .events,
        1
    );
    assert_eq!(
        reported(tenant).await,
        [(4_000_000, report_key(tenant, "device_ms", hour, 4_000_000))]
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_down_answers_503_on_its_routes_and_nothing_else_notices() {
    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let app = app_on(base.clone()).await;
    let owner = app.signup("owner@example.org").await;
    let t = token(&owner);
    let started = std::time::Instant::now();
    let r = app
        .authed(
            "POST",
            "/v1/billing/checkout",
            &t,
            Some(json!({"plan_id": "pro", "success_url": "https://x.org"})),
        )
        .await;
    assert_error(&r, 503, "stripe_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "retries are bounded"
    );
    // The rest of the API answers as ever.
    assert_eq!(
        app.authed("GET", "/v1/subscription", &t, None).await.status,
        200
    );
    assert_eq!(
        app.authed("GET", "/v1/billing/invoices", &t, None)
            .await
            .status,
        200
    );
    // Reporting usage fails without losing anything: tried again later.
    let stripe = Stripe::new(&base, "sk").with_retries(2, Duration::from_millis(10));
    let tenant = Uuid::parse_str(owner["tenant_id"].as_str().unwrap()).unwrap();
    sqlx::query("INSERT INTO stripe_customers (tenant_id, customer_id) VALUES ($1, 'cus_x')")
        .bind(tenant)
        .execute(app.pool())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO usage_hourly (tenant_id, meter, hour, period_start, quantity) \
         SELECT $1, 'frames', date_trunc('hour', now()) - interval '1 hour', period_start, 10 \
         FROM subscriptions WHERE tenant_id = $1",
    )
    .bind(tenant)
    .execute(app.pool())
    .await
    .unwrap();
    let done = report_usage(&stripe, app.pool(), Utc::now(), 100)
        .await
        .unwrap();
    assert_eq!((done.events, done.failed), (0, 1));
    app.stop().await;
}
