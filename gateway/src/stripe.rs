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
use clisonix_billing::stripe::{report_usage, Stripe, StripeError};
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
    // The tenant's own systems hear of payments made and failed.
    if let (Some(tenant), Outcome::Applied, Some(kind)) = (
        tenant,
        outcome,
        match event.kind.as_str() {
            "invoice.paid" => Some("invoice.paid"),
            "invoice.payment_failed" => Some("invoice.payment_failed"),
            _ => None,
        },
    ) {
        sqlx::query("SELECT clisonix_webhook_emit($1, $2, 'stripe:' || $3, $4)")
            .bind(tenant)
            .bind(kind)
            .bind(&event.id)
            .bind(sqlx::types::Json(json!({
                "stripe_event_id": event.id,
                "stripe_invoice_id": event.object["id"],
                "amount_due": event.object["amount_due"],
                "currency": event.object["currency"],
            })))
            .execute(&mut *tx)
            .await?;
    }
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

// ---------------------------------------------------------------------------------
// Paying through Stripe: Checkout, the customer portal, usage to Stripe's meters.

/// The Stripe client, when `STRIPE_SECRET_KEY` is set.
pub fn client(config: &crate::config::Config) -> Option<std::sync::Arc<Stripe>> {
    config
        .stripe_secret_key
        .as_ref()
        .map(|key| std::sync::Arc::new(Stripe::new(&config.stripe_api_base, key.expose())))
}

fn not_configured() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "stripe_not_configured",
        "this deployment does not take payments through Stripe (STRIPE_SECRET_KEY is not set): its own invoices are the bill",
    )
}

/// Stripe's failure as the caller's answer: 503 while it is unavailable, 502 when it
/// refused what was asked.
fn stripe_error(state: &AppState, e: StripeError) -> ApiError {
    let kind = match e {
        StripeError::Refused { .. } => "refused",
        StripeError::Unavailable { .. } => "unavailable",
        StripeError::Database(e) => return ApiError::from(e),
    };
    state.metrics.stripe_errors.with_label_values(&[kind]).inc();
    tracing::warn!(error = %e, "a Stripe call failed");
    match kind {
        "refused" => ApiError::new(StatusCode::BAD_GATEWAY, "stripe_refused", e.to_string()),
        _ => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stripe_unavailable",
            "Stripe does not answer; try again shortly",
        ),
    }
}

/// A URL Stripe sends the customer back to.
fn url_field(field: &str, value: &str) -> Result<String, ApiError> {
    let ok = (value.starts_with("https://") || value.starts_with("http://"))
        && value.len() <= 2048
        && !value.chars().any(char::is_whitespace);
    if ok {
        Ok(value.to_owned())
    } else {
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("{field} must be an http(s) URL of at most 2048 characters"),
        )
        .field(field))
    }
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    /// The plan to subscribe to (one sold through Stripe).
    pub plan_id: String,
    /// Where Stripe sends the customer after paying.
    pub success_url: String,
    /// Where Stripe sends the customer who turns back.
    pub cancel_url: Option<String>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct SessionUrl {
    /// Stripe's session id.
    pub id: String,
    /// Where to send the customer.
    pub url: String,
}

#[utoipa::path(post, path = "/v1/billing/checkout", tag = "billing", security(("bearer" = [])), request_body = CheckoutRequest,
    responses((status = 200, body = SessionUrl), (status = 401, description = "Missing or invalid token", body = crate::openapi::ErrorBody),
        (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody),
        (status = 404, description = "Stripe is not configured", body = crate::openapi::ErrorBody),
        (status = 422, description = "Unknown plan, a plan not sold through Stripe, or a bad URL", body = crate::openapi::ErrorBody),
        (status = 502, description = "Stripe refused the request", body = crate::openapi::ErrorBody),
        (status = 503, description = "Stripe does not answer", body = crate::openapi::ErrorBody)))]
/// `POST /v1/billing/checkout` (admins): a Stripe Checkout session to subscribe to a
/// plan (or change to it). The plan takes effect when Stripe reports the checkout
/// completed (`checkout.session.completed` on the webhook).
pub async fn checkout(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    caller: crate::auth::Caller,
    crate::accounts::ApiJson(body): crate::accounts::ApiJson<CheckoutRequest>,
) -> Result<Json<SessionUrl>, ApiError> {
    crate::tenant::require_admin(&caller)?;
    let stripe = state.stripe.clone().ok_or_else(not_configured)?;
    let success = url_field("success_url", &body.success_url)?;
    let cancel = body
        .cancel_url
        .as_deref()
        .map(|u| url_field("cancel_url", u))
        .transpose()?;
    let plan = clisonix_tenancy::plans::plan(&state.pool, &body.plan_id, None)
        .await?
        .filter(|p| p.public)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_plan",
                format!(
                    "no public plan {:?} (GET /v1/plans lists them)",
                    body.plan_id
                ),
            )
            .field("plan_id")
        })?;
    let price = state
        .config
        .stripe_prices
        .iter()
        .find(|(p, _)| *p == plan.plan_id)
        .map(|(_, price)| price.clone())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "plan_not_sold",
                format!("plan {} is not sold through Stripe here", plan.plan_id),
            )
            .field("plan_id")
        })?;
    let tenant = caller.0.tid;
    let name: String = sqlx::query_scalar("SELECT name FROM tenants WHERE id = $1")
        .bind(tenant)
        .fetch_one(&state.pool)
        .await?;
    let customer = stripe
        .customer(&state.pool, tenant, &name)
        .await
        .map_err(|e| stripe_error(&state, e))?;
    let mut form = vec![
        ("mode", "subscription".to_owned()),
        ("customer", customer.clone()),
        ("client_reference_id", tenant.to_string()),
        ("success_url", success),
        ("line_items[0][price]", price),
        ("line_items[0][quantity]", "1".to_owned()),
        ("metadata[plan_id]", plan.plan_id.clone()),
        ("metadata[tenant_id]", tenant.to_string()),
        ("subscription_data[metadata][plan_id]", plan.plan_id.clone()),
        ("subscription_data[metadata][tenant_id]", tenant.to_string()),
    ];
    if let Some(cancel) = cancel {
        form.push(("cancel_url", cancel));
    }
    // One key per request: its retries take effect once, another request is another
    // session.
    let session = stripe
        .post(
            "/v1/checkout/sessions",
            &form,
            &format!("checkout-{}", Uuid::new_v4()),
        )
        .await
        .map_err(|e| stripe_error(&state, e))?;
    let answer = SessionUrl {
        id: session["id"].as_str().unwrap_or_default().to_owned(),
        url: session["url"].as_str().unwrap_or_default().to_owned(),
    };
    audit(
        &state,
        Some(tenant),
        Some(caller.0.sub),
        "billing_checkout_created",
        json!({"plan_id": plan.plan_id, "customer": customer, "session": answer.id}),
        &peer.ip().to_string(),
    )
    .await?;
    Ok(Json(answer))
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortalRequest {
    /// Where Stripe's portal sends the customer back.
    pub return_url: String,
}

#[utoipa::path(post, path = "/v1/billing/portal", tag = "billing", security(("bearer" = [])), request_body = PortalRequest,
    responses((status = 200, body = SessionUrl), (status = 401, description = "Missing or invalid token", body = crate::openapi::ErrorBody),
        (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody),
        (status = 404, description = "Stripe is not configured", body = crate::openapi::ErrorBody),
        (status = 422, description = "A bad URL", body = crate::openapi::ErrorBody),
        (status = 502, description = "Stripe refused the request", body = crate::openapi::ErrorBody),
        (status = 503, description = "Stripe does not answer", body = crate::openapi::ErrorBody)))]
/// `POST /v1/billing/portal` (admins): a session of Stripe's customer portal (payment
/// methods, Stripe's invoices, cancelling).
pub async fn portal(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    caller: crate::auth::Caller,
    crate::accounts::ApiJson(body): crate::accounts::ApiJson<PortalRequest>,
) -> Result<Json<SessionUrl>, ApiError> {
    crate::tenant::require_admin(&caller)?;
    let stripe = state.stripe.clone().ok_or_else(not_configured)?;
    let back = url_field("return_url", &body.return_url)?;
    let tenant = caller.0.tid;
    let name: String = sqlx::query_scalar("SELECT name FROM tenants WHERE id = $1")
        .bind(tenant)
        .fetch_one(&state.pool)
        .await?;
    let customer = stripe
        .customer(&state.pool, tenant, &name)
        .await
        .map_err(|e| stripe_error(&state, e))?;
    let session = stripe
        .post(
            "/v1/billing_portal/sessions",
            &[("customer", customer.clone()), ("return_url", back)],
            &format!("portal-{}", Uuid::new_v4()),
        )
        .await
        .map_err(|e| stripe_error(&state, e))?;
    let answer = SessionUrl {
        id: session["id"].as_str().unwrap_or_default().to_owned(),
        url: session["url"].as_str().unwrap_or_default().to_owned(),
    };
    audit(
        &state,
        Some(tenant),
        Some(caller.0.sub),
        "billing_portal_opened",
        json!({"customer": customer}),
        &peer.ip().to_string(),
    )
    .await?;
    Ok(Json(answer))
}

/// Reports completed hours of usage to Stripe's meters every `stripe_report_interval`
/// until `stop` (only with a Stripe key).
pub async fn run_reporting(
    state: AppState,
    stripe: std::sync::Arc<Stripe>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut every = tokio::time::interval(state.config.stripe_report_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match report_usage(&stripe, &state.pool, Utc::now(), 1000).await {
            Ok(done) => {
                if done.failed > 0 {
                    state
                        .metrics
                        .stripe_errors
                        .with_label_values(&["meter_event"])
                        .inc_by(done.failed);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "reporting usage to Stripe failed; trying again at the next run")
            }
        }
    }
}
