//! Invoices through the API on the real Postgres: a tenant's ended and closed period is
//! invoiced by the gateway's own background run, and its admins read it as JSON, CSV
//! and HTML; members are refused, other tenants find nothing, bad input gets a 4xx.

mod common;

use std::time::{Duration, Instant};

use common::{assert_error, token, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

fn tenant(v: &Value) -> Uuid {
    Uuid::parse_str(v["tenant_id"].as_str().unwrap()).unwrap()
}

/// Moves the tenant's current period into the past: it started 31 days ago on pro
/// and ended 2 hours ago (closed an hour later), with 700 device-hours used.
async fn ended_period(app: &TestApp, tenant: Uuid) {
    let pool = app.pool();
    for sql in [
        "UPDATE subscriptions SET plan_id = 'pro', anchor = now() - interval '31 days', \
             period_start = now() - interval '31 days', period_end = now() - interval '2 hours' \
         WHERE tenant_id = $1",
        "DELETE FROM subscription_changes WHERE tenant_id = $1",
        "INSERT INTO subscription_changes (tenant_id, at, plan_id, plan_version) \
         VALUES ($1, now() - interval '40 days', 'pro', 1)",
        "UPDATE billing_periods SET period_start = now() - interval '31 days', \
             period_end = now() - interval '2 hours', plan_id = 'pro' WHERE tenant_id = $1",
        "INSERT INTO usage_hourly (tenant_id, meter, hour, period_start, quantity) \
         SELECT $1, 'device_ms', date_trunc('hour', now() - interval '10 days'), period_start, 2520000000 \
         FROM billing_periods WHERE tenant_id = $1",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(tenant)
            .execute(pool)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_read_their_invoices_as_json_csv_and_html_and_no_one_else_does() {
    let app = TestApp::spawn_with(|c| c.invoice_interval = Duration::from_millis(200)).await;
    let owner = app.signup("owner@example.org").await;
    let other = app.signup("other@example.org").await;
    ended_period(&app, tenant(&owner)).await;

    // The gateway's background run finalizes it (the period closed an hour ago).
    let deadline = Instant::now() + Duration::from_secs(20);
    let list = loop {
        let r = app
            .authed("GET", "/v1/billing/invoices", &token(&owner), None)
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        if r.body["invoices"][0]["status"] == "finalized" {
            break r.body;
        }
        assert!(Instant::now() < deadline, "never invoiced: {}", r.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(list["invoices"].as_array().unwrap().len(), 1);
    let inv = &list["invoices"][0];
    assert_eq!(inv["number"], 1);
    assert_eq!(inv["currency"], "EUR");
    let id = inv["id"].as_str().unwrap().to_owned();

    // Pro: 49.00 a period; 500 device-hours included, then 0.50 per device-hour:
    // 700 used, 200 beyond, 100.00.
    let one = app
        .authed(
            "GET",
            &format!("/v1/billing/invoices/{id}"),
            &token(&owner),
            None,
        )
        .await;
    assert_eq!(one.status, 200, "{}", one.body);
    let lines = one.body["lines"].as_array().unwrap();
    assert_eq!(lines[0]["kind"], "base_fee");
    assert_eq!(lines[0]["amount_minor"], 4_900);
    let device = lines.iter().find(|l| l["meter"] == "device_ms").unwrap();
    assert_eq!(
        (
            &device["quantity"],
            &device["billable"],
            &device["amount_minor"]
        ),
        (
            &json!(2_520_000_000i64),
            &json!(720_000_000i64),
            &json!(10_000)
        )
    );
    assert_eq!(one.body["total_minor"], 14_900);

    let csv = app
        .authed(
            "GET",
            &format!("/v1/billing/invoices/{id}?format=csv"),
            &token(&owner),
            None,
        )
        .await;
    assert_eq!(csv.status, 200);
    assert!(
        csv.headers.contains("content-type: text/csv"),
        "{}",
        csv.headers
    );
    assert!(
        csv.headers.contains("invoice-000001.csv"),
        "{}",
        csv.headers
    );
    let text = csv.body.as_str().unwrap();
    assert!(text.starts_with("invoice,number,status,currency,kind,"));
    assert!(text
        .lines()
        .any(|l| l.contains(",device_ms,") && l.ends_with(",10000")));
    assert!(text
        .lines()
        .last()
        .unwrap()
        .ends_with(",total,,,,,,,,,,,,14900"));
    let page = app
        .authed(
            "GET",
            &format!("/v1/billing/invoices/{id}?format=html"),
            &token(&owner),
            None,
        )
        .await;
    assert_eq!(page.status, 200);
    assert!(page.headers.contains("content-type: text/html"));
    let html = page.body.as_str().unwrap();
    assert!(
        html.contains("<h1>Invoice 000001</h1>") && html.contains("149.00 EUR"),
        "{html}"
    );

    // The business metrics: pro's 49.00 a month, one finalized invoice, audited.
    let metrics = app.request("GET", "/metrics", None, &[]).await;
    let text = metrics.body.as_str().unwrap();
    assert!(
        text.contains("clisonix_revenue_mrr{currency=\"EUR\"} 49\n"),
        "{text}"
    );
    assert!(
        text.contains("clisonix_invoices{status=\"finalized\"} 1\n"),
        "{text}"
    );
    assert!(app
        .audit_actions()
        .await
        .contains(&"invoice_finalized".to_owned()));

    // Another tenant's admin finds nothing; a member is refused; bad input is a 4xx.
    let theirs = app
        .authed(
            "GET",
            &format!("/v1/billing/invoices/{id}"),
            &token(&other),
            None,
        )
        .await;
    assert_error(&theirs, 404, "invoice_not_found");
    let none = app
        .authed("GET", "/v1/billing/invoices", &token(&other), None)
        .await;
    assert_eq!(none.body["invoices"], json!([]));
    sqlx::query("UPDATE memberships SET role = 'member' WHERE user_id = $1::uuid")
        .bind(owner["user_id"].as_str().unwrap())
        .execute(app.pool())
        .await
        .unwrap();
    let relogin = app
        .post(
            "/v1/auth/login",
            json!({"email": "owner@example.org", "password": "Correct horse 42"}),
        )
        .await;
    let member = relogin.body["access_token"].as_str().unwrap().to_owned();
    assert_error(
        &app.authed("GET", "/v1/billing/invoices", &member, None)
            .await,
        403,
        "forbidden",
    );
    assert_error(
        &app.authed("GET", &format!("/v1/billing/invoices/{id}"), &member, None)
            .await,
        403,
        "forbidden",
    );
    let t = token(&other);
    for (path, status, code) in [
        ("/v1/billing/invoices/nope", 422, "invalid_id"),
        ("/v1/billing/invoices?limit=0", 422, "invalid_query"),
        (
            "/v1/billing/invoices?before=yesterday",
            422,
            "invalid_query",
        ),
        ("/v1/billing/invoices?colour=red", 422, "invalid_query"),
    ] {
        assert_error(&app.authed("GET", path, &t, None).await, status, code);
    }
    assert_error(
        &app.authed(
            "GET",
            &format!("/v1/billing/invoices/{id}?format=pdf"),
            &t,
            None,
        )
        .await,
        422,
        "invalid_query",
    );
    assert_error(
        &app.request("GET", "/v1/billing/invoices", None, &[]).await,
        401,
        "unauthorized",
    );
    app.stop().await;
}
