//! Stripe's webhooks in: `POST /v1/billing/stripe/webhook`.
//!
//! Nothing of a delivery is read before its `Stripe-Signature` passes
//! ([`clisonix_billing::signatures::verify_stripe`]: a configured secret, 300 s of
//! tolerance, constant-time comparison). A refused delivery (no or bad signature,
//! stale, replayed, not an event) answers 400 and is audited; an event is recorded by
//! its id in the transaction that applies it, so Stripe's redeliveries change nothing
//! again (200, `duplicate`), and an event older than one already applied to the
//! subscription changes nothing (`stale`). Types this deployment does not act on are
//! acknowledged and ignored.
//!
//! What events do to the tenant's subscription (the tenant is found by the Stripe
//! customer, or for a checkout by the `client_reference_id` the checkout was made with):
//! - `checkout.session.completed`: the customer and the Stripe subscription are the
//!   tenant's; the plan in the checkout's `metadata.plan_id` is in force; `active`;
//! - `customer.subscription.created` / `updated`: its status (`active`, `trialing`,
//!   `past_due`; `unpaid` is `past_due`; `canceled` and `incomplete_expired` are
//!   `canceled`) and the plan in its `metadata.plan_id`;
//! - `customer.subscription.deleted`: `canceled`;
//! - `invoice.paid`: `active` again (no longer past due);
//! - `invoice.payment_failed`: `past_due` (from then; ingest refuses the tenant once the
//!   grace period has passed, see `docs/metering.md`).

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use chrono::{DateTime, Utc};
use clisonix_billing::signatures::{verify_stripe, SignatureError};
use serde_json::{json, Value};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::accounts::audit;
use crate::error::ApiError;
use crate::startup::AppState;

type Peer = ConnectInfo<std::net::SocketAddr>;

/// What an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Applied,
    Ignored,
    Stale,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Ignored => "ignored",
            Outcome::Stale => "stale",
        }
    }
}

#[utoipa::path(post, path = "/v1/billing/stripe/webhook", tag = "billing",
    responses((status = 200, description = "Received: `{\"received\": true, \"outcome\": \"applied|ignored|stale|duplicate\"}`"),
        (status = 400, description = "Refused: no or bad signature, stale, replayed, or not an event", body = crate::openapi::ErrorBody),
        (status = 404, description = "Stripe webhooks are not configured (`STRIPE_WEBHOOK_SECRET`)", body = crate::openapi::ErrorBody)))]
/// `POST /v1/billing/stripe/webhook`: Stripe's events (signed with the endpoint's
/// secret; see the module documentation for what each does).
pub async fn webhook(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    if state.config.stripe_webhook_secrets.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "stripe_not_configured",
            "this deployment does not take Stripe webhooks (STRIPE_WEBHOOK_SECRET is not set)",
        ));
    }
    let ip = peer.ip().to_string();
    let refuse = |code: &'static str, message: String, event: Option<&str>| {
        let state = state.clone();
        let ip = ip.clone();
        let event = event.map(str::to_owned);
        async move {
            state
                .metrics
                .stripe_webhooks
                .with_label_values(&[code])
                .inc();
            audit(
                &state,
                None,
                None,
                "stripe_webhook_refused",
                json!({"reason": code, "message": message, "event_id": event}),
                &ip,
            )
            .await?;
            Err::<Json<Value>, ApiError>(ApiError::new(StatusCode::BAD_REQUEST, code, message))
        }
    };
    let secrets: Vec<String> = state
        .config
        .stripe_webhook_secrets
        .iter()
        .map(|s| s.expose().to_owned())
        .collect();
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let signed_at = match verify_stripe(signature, &body, &secrets, Utc::now().timestamp()) {
        Ok(t) => t,
        Err(e) => {
            let code = match e {
                SignatureError::Stale(_) => "stale_signature",
                _ => "invalid_signature",
            };
            return refuse(code, e.to_string(), None).await;
        }
    };
    let Some(event) = Event::parse(&body) else {
        return refuse(
            "malformed_event",
            "the body is not a Stripe event (id, type, created, data.object)".into(),
            None,
        )
        .await;
    };
    let mut tx = state.pool.begin().await?;
    let seen: Option<i64> =
        sqlx::query_scalar("SELECT signed_at FROM stripe_events WHERE event_id = $1 FOR UPDATE")
            .bind(&event.id)
            .fetch_optional(&mut *tx)
            .await?;
    match seen {
        Some(t) if t == signed_at => {
            drop(tx);
            return refuse(
                "replayed_delivery",
                format!(
                    "event {} was delivered with this signature before",
                    event.id
                ),
                Some(&event.id),
            )
            .await;
        }
        Some(_) => {
            state
                .metrics
                .stripe_webhooks
                .with_label_values(&["duplicate"])
                .inc();
            return Ok(Json(json!({"received": true, "outcome": "duplicate"})));
        }
        None => {}
    }
    let (tenant, outcome) = apply(&mut tx, &event).await?;
    sqlx::query(
        "INSERT INTO stripe_events (event_id, type, tenant_id, signed_at, created, outcome) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&event.id)
    .bind(&event.kind)
    .bind(tenant)
    .bind(signed_at)
    .bind(event.created)
    .bind(outcome.as_str())
    .execute(&mut *tx)
    .await?;
    if outcome == Outcome::Applied {
        sqlx::query(
            "INSERT INTO audit_log (tenant_id, action, detail, ip) VALUES ($1, 'stripe_event_applied', $2, $3)",
        )
        .bind(tenant)
        .bind(sqlx::types::Json(
            json!({"event_id": event.id, "type": event.kind}),
        ))
        .bind(&ip)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    state
        .metrics
        .stripe_webhooks
        .with_label_values(&[outcome.as_str()])
        .inc();
    Ok(Json(json!({"received": true, "outcome": outcome.as_str()})))
}

/// The parts of a Stripe event this deployment reads.
#[derive(Debug)]
struct Event {
    id: String,
    kind: String,
    created: DateTime<Utc>,
    object: Value,
}

impl Event {
    fn parse(body: &[u8]) -> Option<Event> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let id = v["id"]
            .as_str()
            .filter(|s| !s.is_empty() && s.len() <= 255)?;
        Some(Event {
            id: id.to_owned(),
            kind: v["type"].as_str()?.to_owned(),
            created: DateTime::from_timestamp(v["created"].as_i64()?, 0)?,
            object: v["data"]["object"].clone(),
        })
        .filter(|e| e.object.is_object())
    }

    fn str(&self, field: &str) -> Option<&str> {
        self.object[field].as_str()
    }
}

/// Applies `event` in `tx`: the tenant it concerns, and what it did.
async fn apply(tx: &mut PgConnection, event: &Event) -> Result<(Option<Uuid>, Outcome), ApiError> {
    if event.kind == "checkout.session.completed" {
        let Some(tenant) = event
            .str("client_reference_id")
            .and_then(|s| Uuid::parse_str(s).ok())
        else {
            return Ok((None, Outcome::Ignored));
        };
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM subscriptions WHERE tenant_id = $1)")
                .bind(tenant)
                .fetch_one(&mut *tx)
                .await?;
        if !exists {
            return Ok((None, Outcome::Ignored));
        }
        if let Some(customer) = event.str("customer") {
            sqlx::query(
                "INSERT INTO stripe_customers (tenant_id, customer_id) VALUES ($1, $2) \
                 ON CONFLICT (tenant_id) DO UPDATE SET customer_id = EXCLUDED.customer_id",
            )
            .bind(tenant)
            .bind(customer)
            .execute(&mut *tx)
            .await?;
        }
        let plan = event.object["metadata"]["plan_id"].as_str();
        let outcome = update(
            tx,
            tenant,
            event,
            Some("active"),
            plan,
            event.str("subscription"),
        )
        .await?;
        return Ok((Some(tenant), outcome));
    }
    let (status, subscription): (Option<&str>, Option<&str>) = match event.kind.as_str() {
        "customer.subscription.created" | "customer.subscription.updated" => (
            match event.str("status") {
                Some("active") => Some("active"),
                Some("trialing") => Some("trialing"),
                Some("past_due") | Some("unpaid") => Some("past_due"),
                Some("canceled") | Some("incomplete_expired") => Some("canceled"),
                _ => None,
            },
            event.str("id"),
        ),
        "customer.subscription.deleted" => (Some("canceled"), event.str("id")),
        "invoice.paid" => (Some("active"), None),
        "invoice.payment_failed" => (Some("past_due"), None),
        _ => return Ok((None, Outcome::Ignored)),
    };
    let Some(customer) = event.str("customer") else {
        return Ok((None, Outcome::Ignored));
    };
    let tenant: Option<Uuid> =
        sqlx::query_scalar("SELECT tenant_id FROM stripe_customers WHERE customer_id = $1")
            .bind(customer)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(tenant) = tenant else {
        return Ok((None, Outcome::Ignored));
    };
    let plan = if event.kind.starts_with("customer.subscription.") {
        event.object["metadata"]["plan_id"].as_str()
    } else {
        None
    };
    let outcome = update(tx, tenant, event, status, plan, subscription).await?;
    Ok((Some(tenant), outcome))
}

/// Sets the tenant's subscription's status (and plan, and Stripe subscription) from
/// `event`, unless a newer event was applied already.
async fn update(
    tx: &mut PgConnection,
    tenant: Uuid,
    event: &Event,
    status: Option<&str>,
    plan: Option<&str>,
    subscription: Option<&str>,
) -> Result<Outcome, ApiError> {
    let row =
        sqlx::query("SELECT stripe_event_at FROM subscriptions WHERE tenant_id = $1 FOR UPDATE")
            .bind(tenant)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(row) = row else {
        return Ok(Outcome::Ignored);
    };
    let last: Option<DateTime<Utc>> = row.get("stripe_event_at");
    if last.is_some_and(|t| t > event.created) {
        return Ok(Outcome::Stale);
    }
    // A plan this deployment does not have is left alone (the status still applies).
    let plan: Option<(String, i32)> = match plan {
        Some(id) => {
            sqlx::query_as(
                "SELECT plan_id, max(version) FROM plans WHERE plan_id = $1 GROUP BY plan_id",
            )
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        }
        None => None,
    };
    sqlx::query(
        "UPDATE subscriptions SET \
             status = coalesce($2, status), \
             past_due_since = CASE WHEN coalesce($2, status) = 'past_due' THEN coalesce(past_due_since, now()) ELSE NULL END, \
             plan_id = coalesce($3, plan_id), plan_version = coalesce($4, plan_version), \
             stripe_subscription_id = coalesce($5, stripe_subscription_id), \
             stripe_event_at = $6, updated_at = now() \
         WHERE tenant_id = $1",
    )
    .bind(tenant)
    .bind(status)
    .bind(plan.as_ref().map(|p| p.0.as_str()))
    .bind(plan.as_ref().map(|p| p.1))
    .bind(subscription)
    .bind(event.created)
    .execute(&mut *tx)
    .await?;
    if let Some((plan_id, version)) = &plan {
        // The current period is on the new plan from now, as a change through the API.
        sqlx::query(
            "UPDATE billing_periods SET plan_id = $2, plan_version = $3 \
             WHERE tenant_id = $1 AND period_start = (SELECT period_start FROM subscriptions WHERE tenant_id = $1)",
        )
        .bind(tenant)
        .bind(plan_id)
        .bind(version)
        .execute(&mut *tx)
        .await?;
    }
    Ok(Outcome::Applied)
}
