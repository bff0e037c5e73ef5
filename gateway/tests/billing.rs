//! Invoices through the API on the real Postgres: a tenant's ended and closed period is
//! invoiced by the gateway's own background run, and its admins read it as JSON, CSV
//! and HTML; members are refused, other tenants find nothing, bad input gets a 4xx.
//! The operator settles invoices with the real `clisonix-gateway billing` command: paid,
//! void, credit notes, each by the rules, audited, and told to the tenant's webhooks.

mod common;

use std::process::Command;
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
    // One transaction: the gateway's background runs start due periods.
    let mut tx = app.pool().begin().await.unwrap();
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
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
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
    assert!(text.lines().any(|l| l.ends_with(",total,,,,,,,,,,,,14900")));
    assert!(text
        .lines()
        .last()
        .unwrap()
        .ends_with(",amount_due,,,,,,,,,,,,14900"));
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

/// Waits for the gateway's background run to finalize `tenant`'s invoice; its id.
async fn finalized(app: &TestApp, owner: &Value) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = app
            .authed("GET", "/v1/billing/invoices", &token(owner), None)
            .await;
        if r.body["invoices"][0]["status"] == "finalized" {
            return r.body["invoices"][0]["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "never invoiced: {}", r.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `clisonix-gateway billing <args>` on the app's database: (exit code, stdout,
/// stderr).
fn operator(app: &TestApp, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_clisonix-gateway"))
        .arg("billing")
        .args(args)
        .env("DATABASE_URL", app.config.database_url.expose())
        .env("USER", "ops-test")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_marks_invoices_paid_or_void_and_credits_them_by_the_rules() {
    let app = TestApp::spawn_with(|c| c.invoice_interval = Duration::from_millis(200)).await;
    let a = app.signup("a@example.org").await;
    let b = app.signup("b@example.org").await;
    // A's systems listen for what settles its invoices.
    let hook = app
        .authed(
            "POST",
            "/v1/webhooks",
            &token(&a),
            Some(json!({"url": "http://127.0.0.1:9/hook",
                        "events": ["invoice.paid", "invoice.voided", "credit_note.created"]})),
        )
        .await;
    assert_eq!(hook.status, 201, "{}", hook.body);
    ended_period(&app, tenant(&a)).await;
    let ia = finalized(&app, &a).await;
    ended_period(&app, tenant(&b)).await;
    let ib = finalized(&app, &b).await;

    let (code, out, err) = operator(&app, &["invoices", "--status", "finalized"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&ia) && out.contains(&ib), "{out}");
    assert!(out.contains("149.00") && out.contains("EUR"), "{out}");

    // A credit note of 50.00, then one of 100.00 (150.00 in all, more than 149.00) is
    // refused and changes nothing: the next one is still number 2.
    let (code, out, err) = operator(
        &app,
        &[
            "credit-note",
            &ia,
            "--amount-minor",
            "5000",
            "--reason",
            "Outage on 3 March",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("credit note 000001 ("), "{out}");
    assert!(out.contains("50.00 EUR"), "{out}");
    let (code, _, err) = operator(
        &app,
        &[
            "credit-note",
            &ia,
            "--amount-minor",
            "10000",
            "--reason",
            "More",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("more than the invoice's total of 14900 (5000 credited already)"),
        "{err}"
    );
    // Bad input: nothing happens, and says why.
    for (args, says) in [
        (
            vec!["credit-note", &ia, "--amount-minor", "0", "--reason", "x"],
            "amount: must be a positive",
        ),
        (
            vec!["credit-note", &ia, "--amount-minor", "1", "--reason", "  "],
            "reason: must be 1 to 1000",
        ),
        (
            vec!["mark-paid", &ia, "--reference", ""],
            "reference: must be 1 to 200",
        ),
        (
            vec![
                "void",
                "7b0c5a4e-0000-4000-8000-000000000000",
                "--reason",
                "x",
            ],
            "no invoice 7b0c5a4e-0000-4000-8000-000000000000",
        ),
    ] {
        let (code, _, err) = operator(&app, &args);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let (code, _, err) = operator(&app, &["void", "not-a-uuid", "--reason", "x"]);
    assert_eq!(code, 2, "a usage error: {err}");
    let (code, _, err) = operator(
        &app,
        &[
            "credit-note",
            &ia,
            "--amount-minor",
            "9900",
            "--reason",
            "Goodwill",
        ],
    );
    assert_eq!(code, 0, "{err}");

    // Paid (once), after which it is neither paid again nor voided.
    let (code, out, err) = operator(&app, &["mark-paid", &ia, "--reference", "SEPA 2026-12-001"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("paid at"), "{out}");
    for args in [
        vec!["mark-paid", ia.as_str(), "--reference", "again"],
        vec!["void", ia.as_str(), "--reason", "late"],
    ] {
        let (code, _, err) = operator(&app, &args);
        assert_eq!(code, 1, "{args:?}");
        assert!(
            err.contains("invoice 000001 is paid: only a finalized invoice"),
            "{err}"
        );
    }
    // B's is voided; a void invoice is neither paid nor credited.
    let (code, _, err) = operator(
        &app,
        &["void", &ib, "--reason", "Issued in error", "--by", "alice"],
    );
    assert_eq!(code, 0, "{err}");
    for args in [
        vec!["mark-paid", ib.as_str(), "--reference", "r"],
        vec![
            "credit-note",
            ib.as_str(),
            "--amount-minor",
            "1",
            "--reason",
            "r",
        ],
    ] {
        let (code, _, err) = operator(&app, &args);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains("invoice 000002 is void"), "{err}");
    }

    // The tenant reads what happened, in every format; the other tenant does not.
    let one = app
        .authed(
            "GET",
            &format!("/v1/billing/invoices/{ia}"),
            &token(&a),
            None,
        )
        .await;
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(one.body["status"], "paid");
    assert_eq!(one.body["payment_reference"], "SEPA 2026-12-001");
    assert_eq!(
        (&one.body["credited_minor"], &one.body["amount_due_minor"]),
        (&json!(14_900), &json!(0))
    );
    let notes: Vec<(Value, Value, Value)> = one.body["credit_notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["number"].clone(),
                c["amount_minor"].clone(),
                c["reason"].clone(),
            )
        })
        .collect();
    assert_eq!(
        notes,
        [
            (json!(1), json!(5000), json!("Outage on 3 March")),
            (json!(2), json!(9900), json!("Goodwill"))
        ]
    );
    let page = app
        .authed(
            "GET",
            &format!("/v1/billing/invoices/{ia}?format=html"),
            &token(&a),
            None,
        )
        .await;
    let html = page.body.as_str().unwrap();
    assert!(
        html.contains("Credit note 000001") && html.contains("-50.00 EUR"),
        "{html}"
    );
    assert!(html.contains("reference SEPA 2026-12-001"), "{html}");
    let csv = app
        .authed(
            "GET",
            &format!("/v1/billing/invoices/{ia}?format=csv"),
            &token(&a),
            None,
        )
        .await;
    let csv = csv.body.as_str().unwrap();
    assert!(
        csv.lines()
            .any(|l| l.contains(",credit_note,") && l.ends_with(",-9900")),
        "{csv}"
    );
    assert!(
        csv.lines()
            .last()
            .unwrap()
            .ends_with(",amount_due,,,,,,,,,,,,0"),
        "{csv}"
    );
    let voided = app
        .authed(
            "GET",
            &format!("/v1/billing/invoices/{ib}"),
            &token(&b),
            None,
        )
        .await;
    assert_eq!(
        (&voided.body["status"], &voided.body["void_reason"]),
        (&json!("void"), &json!("Issued in error"))
    );
    assert_error(
        &app.authed(
            "GET",
            &format!("/v1/billing/invoices/{ia}"),
            &token(&b),
            None,
        )
        .await,
        404,
        "invoice_not_found",
    );
    let (code, out, _) = operator(&app, &["show", &ia]);
    assert_eq!(code, 0);
    assert!(
        out.contains("credit    000002 99.00 EUR") && out.contains("due       0.00 EUR"),
        "{out}"
    );

    // Audited with who did it; A's webhooks have an event for each, B's none.
    let audit: Vec<(String, Value)> = sqlx::query_as(
        "SELECT action, detail->'by' FROM audit_log          WHERE action IN ('invoice_paid', 'invoice_voided', 'credit_note_issued') ORDER BY id",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(
        audit,
        [
            ("credit_note_issued".to_owned(), json!("operator:ops-test")),
            ("credit_note_issued".to_owned(), json!("operator:ops-test")),
            ("invoice_paid".to_owned(), json!("operator:ops-test")),
            ("invoice_voided".to_owned(), json!("operator:alice")),
        ]
    );
    let events: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT tenant_id, type FROM webhook_events ORDER BY created_at, id")
            .fetch_all(app.pool())
            .await
            .unwrap();
    assert_eq!(
        events,
        [
            (tenant(&a), "credit_note.created".to_owned()),
            (tenant(&a), "credit_note.created".to_owned()),
            (tenant(&a), "invoice.paid".to_owned()),
        ]
    );
    // What settled an invoice stays as it was, even for the database's own users.
    let changed =
        sqlx::query("UPDATE invoices SET payment_reference = 'other' WHERE id = $1::uuid")
            .bind(&ia)
            .execute(app.pool())
            .await;
    assert!(changed.is_err(), "the payment reference changed");
    let changed = sqlx::query("UPDATE credit_notes SET amount_minor = 1")
        .execute(app.pool())
        .await;
    assert!(changed.is_err(), "a credit note changed");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_while_invoicing_leaves_one_invoice_per_period_numbered_without_gaps() {
    // The test's own gateway does not invoice; a real one, killed mid-run, does.
    let app = TestApp::spawn_with(|c| c.invoice_interval = Duration::ZERO).await;
    const TENANTS: i64 = 400;
    let pool = app.pool();
    sqlx::query("INSERT INTO tenants (id, name) SELECT gen_random_uuid(), 'bulk' FROM generate_series(1, $1)")
        .bind(TENANTS)
        .execute(pool)
        .await
        .unwrap();
    // Every tenant's period: on pro since 31 days ago, ended 2 hours ago, 700
    // device-hours used (149.00 EUR, as above).
    let mut tx = pool.begin().await.unwrap();
    for sql in [
        "UPDATE subscriptions SET plan_id = 'pro', anchor = now() - interval '31 days', \
             period_start = now() - interval '31 days', period_end = now() - interval '2 hours'",
        "DELETE FROM subscription_changes",
        "INSERT INTO subscription_changes (tenant_id, at, plan_id, plan_version) \
         SELECT tenant_id, now() - interval '40 days', 'pro', 1 FROM subscriptions",
        "UPDATE billing_periods SET period_start = now() - interval '31 days', \
             period_end = now() - interval '2 hours', plan_id = 'pro'",
        "INSERT INTO usage_hourly (tenant_id, meter, hour, period_start, quantity) \
         SELECT tenant_id, 'device_ms', date_trunc('hour', now() - interval '10 days'), period_start, 2520000000 \
         FROM billing_periods",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let mut gateway = Command::new(env!("CARGO_BIN_EXE_clisonix-gateway"))
        .env("DATABASE_URL", app.config.database_url.expose())
        .env("CLISONIX_GATEWAY_LISTEN", "127.0.0.1:0")
        .env("CLISONIX_INVOICE_INTERVAL_MS", "100")
        .env("CLISONIX_WEBHOOK_INTERVAL_MS", "0")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let finalized = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM invoices WHERE status = 'finalized'")
            .fetch_one(pool)
            .await
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while finalized().await < 10 {
        assert!(Instant::now() < deadline, "the gateway never invoiced");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    gateway.kill().unwrap(); // SIGKILL
    gateway.wait().unwrap();
    let at_kill = finalized().await;
    eprintln!("killed with {at_kill} of {TENANTS} periods finalized");
    assert!(
        at_kill < TENANTS,
        "killed mid-run: {at_kill} of {TENANTS} were done"
    );

    // The next run (here, twice) finishes the work: one invoice per period, numbered
    // 1 to 400 without a gap, each right.
    let invoicing = clisonix_billing::Invoicing::new(pool.clone());
    invoicing.run(chrono::Utc::now()).await.unwrap();
    invoicing.run(chrono::Utc::now()).await.unwrap();
    let (count, periods, low, high, distinct, wrong): (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (tenant_id, period_start)), min(number), max(number), \
                count(DISTINCT number), count(*) FILTER (WHERE total_minor <> 14900) \
         FROM invoices WHERE status = 'finalized'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        (count, periods, low, high, distinct, wrong),
        (TENANTS, TENANTS, 1, TENANTS, TENANTS, 0),
        "{at_kill} finalized when killed"
    );
    let drafts: i64 = sqlx::query_scalar("SELECT count(*) FROM invoices WHERE status = 'draft'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(drafts, 0);
    app.stop().await;
}
