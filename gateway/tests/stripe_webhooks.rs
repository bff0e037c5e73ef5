//! Stripe's webhooks in, on the real Postgres, with deliveries signed the way Stripe
//! signs them: a valid event changes the subscription (and is audited); a wrong
//! secret, a stale signature, a replayed delivery or a body that is not an event is
//! refused with 400 (audited) and changes nothing; Stripe's redelivery of an event is
//! acknowledged once more without effect; a rotated secret is accepted; an older event
//! arriving after a newer one changes nothing; unknown types are acknowledged.

mod common;

use clisonix_billing::signatures::stripe_header;
use clisonix_gateway::config::Secret;
use common::{assert_error, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

const SECRET: &str = "whsec_current";
const OLD_SECRET: &str = "whsec_rotating_out";

fn event(id: &str, kind: &str, created: i64, object: Value) -> String {
    json!({"id": id, "object": "event", "type": kind, "created": created, "data": {"object": object}})
        .to_string()
}

async fn deliver(app: &TestApp, body: &str, signature: &str) -> common::Reply {
    app.request(
        "POST",
        "/v1/billing/stripe/webhook",
        Some(body),
        &[("Stripe-Signature", signature)],
    )
    .await
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn subscription(app: &TestApp, tenant: Uuid) -> (String, String, bool) {
    sqlx::query_as(
        "SELECT plan_id, status, past_due_since IS NOT NULL FROM subscriptions WHERE tenant_id = $1",
    )
    .bind(tenant)
    .fetch_one(app.pool())
    .await
    .unwrap()
}

async fn audited(app: &TestApp, action: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = $1")
        .bind(action)
        .fetch_one(app.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_validly_signed_new_events_change_a_subscription() {
    let app = TestApp::spawn_with(|c| {
        c.stripe_webhook_secrets = vec![Secret::new(SECRET), Secret::new(OLD_SECRET)]
    })
    .await;
    let owner = app.signup("owner@example.org").await;
    let tenant = Uuid::parse_str(owner["tenant_id"].as_str().unwrap()).unwrap();
    let t0 = now() - 100;

    // Checkout completed: the customer is the tenant's, on pro, active.
    let body = event(
        "evt_checkout",
        "checkout.session.completed",
        t0,
        json!({"object": "checkout.session", "client_reference_id": tenant.to_string(),
               "customer": "cus_1", "subscription": "sub_1", "metadata": {"plan_id": "pro"}}),
    );
    let r = deliver(&app, &body, &stripe_header(SECRET, now(), body.as_bytes())).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["outcome"], "applied");
    assert_eq!(
        subscription(&app, tenant).await,
        ("pro".into(), "active".into(), false)
    );
    let customer: String =
        sqlx::query_scalar("SELECT customer_id FROM stripe_customers WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(customer, "cus_1");

    // A payment fails: past due from now.
    let failed = event(
        "evt_failed",
        "invoice.payment_failed",
        t0 + 10,
        json!({"object": "invoice", "customer": "cus_1"}),
    );
    let signed = stripe_header(SECRET, now(), failed.as_bytes());
    let r = deliver(&app, &failed, &signed).await;
    assert_eq!(
        (r.status, r.body["outcome"].as_str()),
        (200, Some("applied"))
    );
    assert_eq!(
        subscription(&app, tenant).await,
        ("pro".into(), "past_due".into(), true)
    );

    // Refused and audited, changing nothing: the same delivery again, a wrong secret,
    // a stale signature, a tampered body, no signature, a validly signed non-event.
    let paid = event(
        "evt_paid",
        "invoice.paid",
        t0 + 20,
        json!({"object": "invoice", "customer": "cus_1"}),
    );
    let before = audited(&app, "stripe_webhook_refused").await;
    assert_error(
        &deliver(&app, &failed, &signed).await,
        400,
        "replayed_delivery",
    );
    assert_error(
        &deliver(
            &app,
            &paid,
            &stripe_header("whsec_forged", now(), paid.as_bytes()),
        )
        .await,
        400,
        "invalid_signature",
    );
    assert_error(
        &deliver(
            &app,
            &paid,
            &stripe_header(SECRET, now() - 301, paid.as_bytes()),
        )
        .await,
        400,
        "stale_signature",
    );
    let tampered = paid.replace("cus_1", "cus_2");
    assert_error(
        &deliver(
            &app,
            &tampered,
            &stripe_header(SECRET, now(), paid.as_bytes()),
        )
        .await,
        400,
        "invalid_signature",
    );
    assert_error(
        &app.request("POST", "/v1/billing/stripe/webhook", Some(&paid), &[])
            .await,
        400,
        "invalid_signature",
    );
    let garbage = "{not json";
    assert_error(
        &deliver(
            &app,
            garbage,
            &stripe_header(SECRET, now(), garbage.as_bytes()),
        )
        .await,
        400,
        "malformed_event",
    );
    assert_eq!(audited(&app, "stripe_webhook_refused").await, before + 6);
    assert_eq!(
        subscription(&app, tenant).await,
        ("pro".into(), "past_due".into(), true)
    );

    // Stripe's own redelivery (signed anew) is acknowledged and changes nothing.
    let r = deliver(
        &app,
        &failed,
        &stripe_header(SECRET, now() + 1, failed.as_bytes()),
    )
    .await;
    assert_eq!(
        (r.status, r.body["outcome"].as_str()),
        (200, Some("duplicate"))
    );

    // Signed with the secret rotating out: accepted. Paid: active again.
    let r = deliver(
        &app,
        &paid,
        &stripe_header(OLD_SECRET, now(), paid.as_bytes()),
    )
    .await;
    assert_eq!(
        (r.status, r.body["outcome"].as_str()),
        (200, Some("applied"))
    );
    assert_eq!(
        subscription(&app, tenant).await,
        ("pro".into(), "active".into(), false)
    );

    // An update older than what was applied arrives late: no change.
    let old = event(
        "evt_old_update",
        "customer.subscription.updated",
        t0 + 5,
        json!({"object": "subscription", "id": "sub_1", "customer": "cus_1", "status": "past_due",
               "metadata": {"plan_id": "free"}}),
    );
    let r = deliver(&app, &old, &stripe_header(SECRET, now(), old.as_bytes())).await;
    assert_eq!((r.status, r.body["outcome"].as_str()), (200, Some("stale")));
    assert_eq!(
        subscription(&app, tenant).await,
        ("pro".into(), "active".into(), false)
    );

    // Unknown types, and customers that are no tenant's, are acknowledged and ignored.
    for (id, kind, customer) in [
        ("evt_unknown", "charge.refunded", "cus_1"),
        ("evt_stranger", "invoice.paid", "cus_nobody"),
    ] {
        let e = event(
            id,
            kind,
            t0 + 30,
            json!({"object": "x", "customer": customer}),
        );
        let r = deliver(&app, &e, &stripe_header(SECRET, now(), e.as_bytes())).await;
        assert_eq!(
            (r.status, r.body["outcome"].as_str()),
            (200, Some("ignored")),
            "{id}"
        );
    }

    // The subscription is deleted at Stripe: canceled.
    let deleted = event(
        "evt_deleted",
        "customer.subscription.deleted",
        t0 + 40,
        json!({"object": "subscription", "id": "sub_1", "customer": "cus_1", "status": "canceled"}),
    );
    let r = deliver(
        &app,
        &deleted,
        &stripe_header(SECRET, now(), deleted.as_bytes()),
    )
    .await;
    assert_eq!(
        (r.status, r.body["outcome"].as_str()),
        (200, Some("applied"))
    );
    assert_eq!(subscription(&app, tenant).await.1, "canceled");
    let applied: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE tenant_id = $1 AND action = 'stripe_event_applied'",
    )
    .bind(tenant)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(applied, 4);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_webhook_secret_the_endpoint_is_not_there() {
    let app = TestApp::spawn().await;
    let body = event("evt_x", "invoice.paid", now(), json!({"customer": "cus_1"}));
    assert_error(
        &deliver(
            &app,
            &body,
            &stripe_header("anything", now(), body.as_bytes()),
        )
        .await,
        404,
        "stripe_not_configured",
    );
    app.stop().await;
}
