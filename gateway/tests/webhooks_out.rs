//! Webhooks out, to a real HTTP receiver started here, on the real Postgres: an event
//! written with its cause is delivered, signed the Standard Webhooks way, retried with
//! the same `webhook-id` while the receiver fails, through a restart of the gateway,
//! and logged; replayable by hand; admins only, each tenant its own.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use clisonix_billing::signatures::sign_standard;
use clisonix_gateway::startup::Application;
use common::{assert_error, token, TestApp};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What the receiver saw: (webhook-id, webhook-timestamp, webhook-signature, body).
type Seen = Arc<Mutex<Vec<(String, i64, String, String)>>>;

/// A receiver that answers 500 to its first `fail` requests, then 204.
async fn receiver(fail: usize) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let s = s.clone();
            async move {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned()
                };
                let mut seen = s.lock().unwrap();
                seen.push((
                    h("webhook-id"),
                    h("webhook-timestamp").parse().unwrap_or(0),
                    h("webhook-signature"),
                    String::from_utf8_lossy(&body).into_owned(),
                ));
                if seen.len() <= fail {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A session of `tenant` ends, the way the sink stores it.
async fn session_ends(app: &TestApp, tenant: Uuid) -> Uuid {
    let session = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO sessions (session_id, tenant_id, device_id, status, started_at, last_frame_at, \
             first_device_time, last_device_time, sample_rate_hz, channel_labels, frames, \
             samples_per_channel, seq_gaps, duplicate_frames, out_of_order_frames, ended_at, end_reason) \
         VALUES ($1, $2, 'dev-1', 'ended', now(), now(), now(), now(), 128, '{Cz}', 10, 160, 0, 0, 0, now(), 'end_marker')",
    )
    .bind(session)
    .bind(tenant)
    .execute(app.pool())
    .await
    .unwrap();
    session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_signed_retried_under_one_id_through_a_restart_and_logged() {
    let app = TestApp::spawn_with(|c| {
        c.webhook_interval = Duration::from_millis(100);
        c.webhook_first_retry = Duration::from_millis(300);
    })
    .await;
    let owner = app.signup("owner@example.org").await;
    let tenant = Uuid::parse_str(owner["tenant_id"].as_str().unwrap()).unwrap();
    let t = token(&owner);
    let (url, seen) = receiver(2).await;
    let r = app
        .authed(
            "POST",
            "/v1/webhooks",
            &t,
            Some(json!({"url": url, "events": ["session.ended", "invoice.finalized"], "description": "ops"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let endpoint = r.body["id"].as_str().unwrap().to_owned();
    let secret = r.body["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    let listed = app.authed("GET", "/v1/webhooks", &t, None).await;
    assert_eq!(listed.body["endpoints"][0]["id"], endpoint.as_str());
    assert!(
        listed.body["endpoints"][0].get("secret").is_none(),
        "shown once"
    );

    // A session ends: one event, delivered after two failures, under one id.
    let session = session_ends(&app, tenant).await;
    until("three attempts", || seen.lock().unwrap().len() >= 3).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "no attempt after the one that succeeded");
    let id = got[0].0.clone();
    assert!(id.starts_with("msg_"));
    for (i, (wid, ts, sig, body)) in got.iter().enumerate() {
        assert_eq!(wid, &id, "attempt {i}");
        assert_eq!(
            sig,
            &sign_standard(&secret, wid, *ts, body.as_bytes()),
            "attempt {i}"
        );
        assert!((chrono::Utc::now().timestamp() - ts).abs() < 30);
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["type"], "session.ended");
        assert_eq!(v["data"]["session_id"], session.to_string());
        assert_eq!(v["data"]["end_reason"], "end_marker");
    }
    assert!(
        got[1].1 >= got[0].1 && got[2].1 >= got[1].1,
        "the time is signed anew"
    );

    let log = app
        .authed(
            "GET",
            &format!("/v1/webhooks/{endpoint}/deliveries"),
            &t,
            None,
        )
        .await;
    assert_eq!(log.status, 200, "{}", log.body);
    let d = &log.body["deliveries"][0];
    assert_eq!(
        (d["event_id"].as_str(), d["status"].as_str()),
        (Some(id.as_str()), Some("delivered"))
    );
    let statuses: Vec<Value> = d["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].clone())
        .collect();
    assert_eq!(statuses, [json!(500), json!(500), json!(204)]);

    // Replayed by hand: once more, the same id.
    let r = app
        .authed(
            "POST",
            &format!("/v1/webhooks/{endpoint}/deliveries/{id}/replay"),
            &t,
            None,
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    until("the replay", || seen.lock().unwrap().len() == 4).await;
    assert_eq!(seen.lock().unwrap()[3].0, id);

    // A restart mid-retry loses nothing: a second endpoint fails twice; the gateway
    // stops after its first failure and another one on the same database goes on.
    let (url2, seen2) = receiver(2).await;
    let r = app
        .authed(
            "POST",
            "/v1/webhooks",
            &t,
            Some(json!({"url": url2, "events": ["session.ended"]})),
        )
        .await;
    assert_eq!(r.status, 201);
    session_ends(&app, tenant).await;
    until("a first failure", || !seen2.lock().unwrap().is_empty()).await;
    app.stop.cancel();
    let next = Application::build(app.config.clone()).await.unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(next.run_until_stopped(stop.clone()));
    until("delivered after the restart", || {
        seen2.lock().unwrap().len() >= 3
    })
    .await;
    let got2 = seen2.lock().unwrap().clone();
    assert!(
        got2.iter().all(|a| a.0 == got2[0].0),
        "one id through the restart"
    );
    // The first endpoint is subscribed too: it got that event once.
    until("the first endpoint's copy", || {
        seen.lock().unwrap().len() == 5
    })
    .await;
    stop.cancel();
    let mut app = app;
    app.stop = CancellationToken::new();
    app.stop().await;
}

/// A receiver that never answers (the attempt times out); counts the requests.
async fn hanging_receiver() -> (String, Arc<Mutex<usize>>) {
    let seen: Arc<Mutex<usize>> = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let s = s.clone();
            async move {
                *s.lock().unwrap() += 1;
                tokio::time::sleep(Duration::from_secs(3600)).await;
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_hangs_costs_the_others_nothing() {
    let app = TestApp::spawn_with(|c| {
        c.webhook_interval = Duration::from_millis(100);
        c.webhook_concurrency = 4;
        c.webhook_endpoint_concurrency = 2;
    })
    .await;
    let owner = app.signup("owner@example.org").await;
    let tenant = Uuid::parse_str(owner["tenant_id"].as_str().unwrap()).unwrap();
    let (hang, hung) = hanging_receiver().await;
    let (url, seen) = receiver(0).await;
    for u in [&hang, &url] {
        let r = app
            .authed(
                "POST",
                "/v1/webhooks",
                &token(&owner),
                Some(json!({"url": u, "events": ["session.ended"]})),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    // Sessions end one after another while the hanging endpoint's attempts (10 s of
    // timeout each) are in flight: each reaches the healthy endpoint promptly.
    for n in 1..=6 {
        let t0 = Instant::now();
        session_ends(&app, tenant).await;
        until("the healthy endpoint's copy", || {
            seen.lock().unwrap().len() == n
        })
        .await;
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "session {n} reached the healthy endpoint after {:?}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The hanging endpoint holds at most its two slots.
    let hung = *hung.lock().unwrap();
    assert!((1..=2).contains(&hung), "{hung} attempts in flight");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_the_tenants_admins_and_bad_input_is_refused() {
    let app = TestApp::spawn_with(|c| c.webhook_interval = Duration::from_millis(100)).await;
    let owner = app.signup("owner@example.org").await;
    let other = app.signup("other@example.org").await;
    let t = token(&owner);
    for (body, field) in [
        (
            json!({"url": "ftp://x.org/h", "events": ["session.ended"]}),
            "url",
        ),
        (json!({"url": "https://x.org/h", "events": []}), "events"),
        (
            json!({"url": "https://x.org/h", "events": ["session.started"]}),
            "events",
        ),
        (
            json!({"url": "https://x.org/h", "events": ["session.ended"], "description": "d".repeat(501)}),
            "description",
        ),
    ] {
        let r = app.authed("POST", "/v1/webhooks", &t, Some(body)).await;
        assert_error(&r, 422, "invalid_field");
        assert_eq!(r.body["error"]["field"], field);
    }
    let r = app
        .authed(
            "POST",
            "/v1/webhooks",
            &t,
            Some(json!({"url": "https://x.org/h", "events": ["invoice.paid"]})),
        )
        .await;
    let id = r.body["id"].as_str().unwrap().to_owned();
    // Another tenant sees nothing of it.
    let o = token(&other);
    assert_error(
        &app.authed("GET", &format!("/v1/webhooks/{id}/deliveries"), &o, None)
            .await,
        404,
        "webhook_not_found",
    );
    assert_error(
        &app.authed("DELETE", &format!("/v1/webhooks/{id}"), &o, None)
            .await,
        404,
        "webhook_not_found",
    );
    assert_eq!(
        app.authed("GET", "/v1/webhooks", &o, None).await.body["endpoints"],
        json!([])
    );
    assert_error(
        &app.authed("DELETE", "/v1/webhooks/nope", &t, None).await,
        422,
        "invalid_id",
    );
    // Members may not.
    sqlx::query("UPDATE memberships SET role = 'member' WHERE user_id = $1::uuid")
        .bind(other["user_id"].as_str().unwrap())
        .execute(app.pool())
        .await
        .unwrap();
    let member = app
        .post(
            "/v1/auth/login",
            json!({"email": "other@example.org", "password": "Correct horse 42"}),
        )
        .await;
    let m = member.body["access_token"].as_str().unwrap();
    assert_error(
        &app.authed("GET", "/v1/webhooks", m, None).await,
        403,
        "forbidden",
    );
    // Deleted: gone from the list, and its log with it.
    let r = app
        .authed("DELETE", &format!("/v1/webhooks/{id}"), &t, None)
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        app.authed("GET", "/v1/webhooks", &t, None).await.body["endpoints"],
        json!([])
    );
    assert_error(
        &app.authed("GET", &format!("/v1/webhooks/{id}/deliveries"), &t, None)
            .await,
        404,
        "webhook_not_found",
    );
    let audited = app.audit_actions().await;
    assert!(
        audited.contains(&"webhook_created".to_owned())
            && audited.contains(&"webhook_deleted".to_owned())
    );
    app.stop().await;
}
