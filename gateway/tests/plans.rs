//! Plans, the tenant's subscription and its usage through the API, on the real
//! Postgres: the public catalog, plan changes by admins only (audited), usage per
//! hour, day and period with what remains, per session, each tenant seeing only its
//! own, and a clear 4xx for every bad input.

mod common;

use common::{assert_error, token, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

fn tenant(v: &Value) -> Uuid {
    Uuid::parse_str(v["tenant_id"].as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_is_public_new_tenants_are_on_free_and_admins_change_plans() {
    let app = TestApp::spawn().await;
    let plans = app.request("GET", "/v1/plans", None, &[]).await;
    assert_eq!(plans.status, 200, "{}", plans.body);
    let ids: Vec<&str> = plans.body["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["plan_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["free", "pro", "enterprise"]);
    let free = &plans.body["plans"][0];
    let frames = free["meters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["meter"] == "frames")
        .unwrap();
    assert_eq!(
        (&frames["included"], &frames["limit"], &frames["unit"]),
        (&json!(288000), &json!("hard"), &json!("frames"))
    );
    assert_eq!(free["currency"], "EUR");

    let owner = app.signup("owner@example.org").await;
    let sub = app
        .authed("GET", "/v1/subscription", &token(&owner), None)
        .await;
    assert_eq!(sub.status, 200, "{}", sub.body);
    assert_eq!(sub.body["subscription"]["plan_id"], "free");
    assert_eq!(sub.body["subscription"]["status"], "active");
    assert_eq!(sub.body["plan"]["plan_id"], "free");

    let change = |plan: Value| {
        let t = token(&owner);
        let app = &app;
        async move { app.authed("PUT", "/v1/subscription", &t, Some(plan)).await }
    };
    let pro = change(json!({"plan_id": "pro"})).await;
    assert_eq!(pro.status, 200, "{}", pro.body);
    assert_eq!(pro.body["subscription"]["plan_id"], "pro");
    assert_eq!(pro.body["plan"]["max_concurrent_sessions"], 50);
    let period: String = sqlx::query_scalar(
        "SELECT plan_id FROM billing_periods WHERE tenant_id = $1 ORDER BY period_start DESC LIMIT 1",
    )
    .bind(tenant(&owner))
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(period, "pro", "the current period is on the new plan");
    let detail: Value = sqlx::query_scalar(
        "SELECT detail FROM audit_log WHERE tenant_id = $1 AND action = 'subscription_changed'",
    )
    .bind(tenant(&owner))
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(
        detail,
        json!({"from": {"plan_id": "free", "version": 1}, "to": {"plan_id": "pro", "version": 1}})
    );

    // Bad input changes nothing.
    assert_error(
        &change(json!({"plan_id": "gold"})).await,
        422,
        "unknown_plan",
    );
    assert_eq!(
        change(json!({"plan_id": "gold"})).await.body["error"]["field"],
        "plan_id"
    );
    assert_error(&change(json!({"plan_id": 5})).await, 422, "invalid_field");
    assert_error(
        &change(json!({"plan_id": "pro", "price": 0})).await,
        422,
        "invalid_field",
    );
    app.add_private_plan("internal", 10, 10).await;
    assert_error(
        &change(json!({"plan_id": "internal"})).await,
        422,
        "unknown_plan",
    );
    let still = app
        .authed("GET", "/v1/subscription", &token(&owner), None)
        .await;
    assert_eq!(still.body["subscription"]["plan_id"], "pro");

    // Members read the subscription but do not change it; strangers do neither.
    let member = app.signup("member@example.org").await;
    sqlx::query(
        "INSERT INTO memberships (tenant_id, user_id, role) VALUES ($1, $2::uuid, 'member')",
    )
    .bind(tenant(&owner))
    .bind(member["user_id"].as_str().unwrap())
    .execute(app.pool())
    .await
    .unwrap();
    let login = app
        .post(
            "/v1/auth/login",
            json!({"email": "member@example.org", "password": "Correct horse 42", "tenant_id": owner["tenant_id"]}),
        )
        .await;
    let r = app
        .authed("GET", "/v1/subscription", &token(&login.body), None)
        .await;
    assert_eq!(r.body["subscription"]["plan_id"], "pro");
    let r = app
        .authed(
            "PUT",
            "/v1/subscription",
            &token(&login.body),
            Some(json!({"plan_id": "free"})),
        )
        .await;
    assert_error(&r, 403, "forbidden");
    let r = app.request("GET", "/v1/subscription", None, &[]).await;
    assert_error(&r, 401, "unauthorized");
    let own = app
        .authed("GET", "/v1/subscription", &token(&member), None)
        .await;
    assert_eq!(
        own.body["subscription"]["plan_id"], "free",
        "the member's own tenant is untouched"
    );
    app.stop().await;
}

async fn add_hourly(app: &TestApp, tenant: Uuid, meter: &str, hour: &str, quantity: i64) {
    sqlx::query(
        "INSERT INTO usage_hourly (tenant_id, meter, hour, period_start, quantity) \
         SELECT $1, $2, $3::timestamptz, period_start, $4 FROM subscriptions WHERE tenant_id = $1",
    )
    .bind(tenant)
    .bind(meter)
    .bind(hour)
    .bind(quantity)
    .execute(app.pool())
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_by_hour_day_and_period_with_what_remains_and_per_session() {
    let app = TestApp::spawn().await;
    let a = app.signup("a@example.org").await;
    let b = app.signup("b@example.org").await;
    // The current period began on 2026-01-01 for both.
    sqlx::query(
        "UPDATE subscriptions SET anchor = '2026-01-01T00:00:00Z', period_start = '2026-01-01T00:00:00Z', \
         period_end = '2099-01-01T00:00:00Z'",
    )
    .execute(app.pool())
    .await
    .unwrap();
    sqlx::query(
        "UPDATE billing_periods SET period_start = '2026-01-01T00:00:00Z', period_end = '2099-01-01T00:00:00Z'",
    )
    .execute(app.pool())
    .await
    .unwrap();
    let (ta, tb) = (tenant(&a), tenant(&b));
    add_hourly(&app, ta, "frames", "2026-03-01T10:00:00Z", 1000).await;
    add_hourly(&app, ta, "frames", "2026-03-01T11:00:00Z", 500).await;
    add_hourly(&app, ta, "frames", "2026-03-02T09:00:00Z", 8).await;
    add_hourly(&app, ta, "device_ms", "2026-03-01T10:00:00Z", 60_000).await;
    add_hourly(&app, tb, "frames", "2026-03-01T10:00:00Z", 7).await;
    // Usage carried into this period from a closed one, which happened in 2025.
    sqlx::query(
        "INSERT INTO usage_carried (tenant_id, meter, occurred_hour, period_start, quantity) \
         VALUES ($1, 'frames', '2025-12-31T23:00:00Z', '2026-01-01T00:00:00Z', 2)",
    )
    .bind(ta)
    .execute(app.pool())
    .await
    .unwrap();
    let get = |path: &str, who: &Value| {
        let t = token(who);
        let path = path.to_owned();
        let app = &app;
        async move { app.authed("GET", &path, &t, None).await }
    };

    let hourly = get(
        "/v1/usage?granularity=hour&meters=frames,device_ms&from=2026-03-01T10:30:00Z&to=2026-03-02T00:00:00Z",
        &a,
    )
    .await;
    assert_eq!(hourly.status, 200, "{}", hourly.body);
    let frames = &hourly.body["meters"][0];
    assert_eq!(frames["meter"], "frames");
    assert_eq!(
        frames["series"],
        json!([{"start": "2026-03-01T10:00:00Z", "quantity": 1000}, {"start": "2026-03-01T11:00:00Z", "quantity": 500}])
    );
    assert_eq!(frames["total"], 1500);
    assert_eq!(frames["period_used"], 1510);
    assert_eq!(frames["included"], 288000);
    assert_eq!(frames["remaining"], 288000 - 1510);
    assert_eq!(frames["limit"], "hard");
    assert_eq!(hourly.body["meters"][1]["meter"], "device_ms");
    assert_eq!(hourly.body["meters"][1]["total"], 60_000);
    assert_eq!(hourly.body["meters"].as_array().unwrap().len(), 2);

    let daily = get(
        "/v1/usage?granularity=day&meters=frames&from=2025-12-01T00:00:00Z&to=2026-04-01T00:00:00Z",
        &a,
    )
    .await;
    assert_eq!(
        daily.body["meters"][0]["series"],
        json!([
            {"start": "2025-12-31T00:00:00Z", "quantity": 2},
            {"start": "2026-03-01T00:00:00Z", "quantity": 1500},
            {"start": "2026-03-02T00:00:00Z", "quantity": 8}
        ])
    );
    let periods = get("/v1/usage?meters=frames", &a).await;
    assert_eq!(periods.body["granularity"], "period");
    assert_eq!(
        periods.body["meters"][0]["series"],
        json!([{"start": "2026-01-01T00:00:00Z", "quantity": 1510}]),
        "the period bills what was carried into it"
    );
    assert_eq!(periods.body["period"]["plan_id"], "free");
    let everything = get("/v1/usage", &a).await;
    assert_eq!(everything.body["meters"].as_array().unwrap().len(), 9);
    let theirs = get("/v1/usage?meters=frames", &b).await;
    assert_eq!(
        theirs.body["meters"][0]["period_used"], 7,
        "each tenant sees its own"
    );

    // Bad input: a 422 naming the field.
    for (query, field) in [
        ("granularity=week", "granularity"),
        ("meters=frames,nope", "meters"),
        ("from=2026-03-02T00:00:00Z&to=2026-03-01T00:00:00Z", "to"),
        ("from=yesterday", "from"),
        (
            "granularity=hour&from=2026-01-01T00:00:00Z&to=2026-03-01T00:00:00Z",
            "from",
        ),
        ("colour=blue", "colour"),
    ] {
        let r = get(&format!("/v1/usage?{query}"), &a).await;
        assert_eq!(r.status, 422, "{query}: {}", r.body);
        assert_eq!(r.body["error"]["field"], field, "{query}: {}", r.body);
    }
    let r = app.request("GET", "/v1/usage", None, &[]).await;
    assert_error(&r, 401, "unauthorized");

    // One session's usage, to its tenant only.
    let session = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO usage_sessions (session_id, meter, detail, tenant_id, quantity) \
         VALUES ($1, 'frames', '', $2, 1904), ($1, 'device_ms', '', $2, 238000), \
                ($1, 'audio_ms', 'audification', $2, 3967), ($1, 'audio_ms', 'parameter_mapping', $2, 238000)",
    )
    .bind(session)
    .bind(ta)
    .execute(app.pool())
    .await
    .unwrap();
    let mine = get(&format!("/v1/usage/sessions/{session}"), &a).await;
    assert_eq!(mine.status, 200, "{}", mine.body);
    assert_eq!(
        mine.body["meters"],
        json!([
            {"meter": "audio_ms", "detail": "audification", "unit": "milliseconds", "quantity": 3967},
            {"meter": "audio_ms", "detail": "parameter_mapping", "unit": "milliseconds", "quantity": 238000},
            {"meter": "device_ms", "unit": "milliseconds", "quantity": 238000},
            {"meter": "frames", "unit": "frames", "quantity": 1904}
        ])
    );
    for (path, who) in [
        (format!("/v1/usage/sessions/{session}"), &b),
        (format!("/v1/usage/sessions/{}", Uuid::new_v4()), &a),
        ("/v1/usage/sessions/not-a-session".to_owned(), &a),
    ] {
        assert_error(&get(&path, who).await, 404, "session_not_found");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_the_results_api_are_reported_to_metering_as_usage_events() {
    use clisonix_schemas::{decode, UsageEvent, UsageKind};
    let env = clisonix_e2e::TestEnv::get();
    let topics = env.topics();
    env.create_catalog(&topics).await;
    let (bootstrap, prefix) = (env.kafka.bootstrap.clone(), topics.prefix().to_owned());
    let app = TestApp::spawn_with(move |c| {
        c.kafka_bootstrap = Some(bootstrap);
        c.topic_prefix = prefix;
        c.usage_interval = std::time::Duration::from_millis(200);
    })
    .await;
    let a = app.signup("a@example.org").await;
    let key = app
        .authed(
            "POST",
            "/v1/api-keys",
            &token(&a),
            Some(json!({"name": "reader", "scopes": ["read"]})),
        )
        .await;
    let key = key.body["key"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        let r = app
            .request(
                "GET",
                "/v1/sessions",
                None,
                &[("Authorization", &format!("Bearer {key}"))],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for path in ["/v1/sessions", &format!("/v1/sessions/{}", Uuid::new_v4())] {
        app.authed("GET", path, &token(&a), None).await;
    }
    // Not on the results API, or not authenticated: not counted.
    app.request("GET", "/v1/plans", None, &[]).await;
    app.request("GET", "/v1/sessions", None, &[]).await;
    app.authed("GET", "/v1/usage", &token(&a), None).await;

    let consumer = env.consumer(&[&topics.name(&clisonix_topics::catalog::USAGE_EVENTS)]);
    let mut counted = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while counted < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "{counted} of 5 requests reported"
        );
        let got = env
            .consume(&consumer, 1, std::time::Duration::from_secs(30))
            .await;
        let e: UsageEvent = decode(&got[0].value).unwrap();
        assert_eq!(
            (e.kind, e.source.as_str()),
            (UsageKind::ApiRequests, "gateway")
        );
        assert_eq!(e.tenant_id.as_uuid(), tenant(&a));
        counted += e.quantity;
    }
    assert_eq!(
        counted, 5,
        "each request on the results API once, the 404 included"
    );
    app.stop().await;
    env.delete_topics(topics.prefix()).await;
}
