//! Webhooks out: admins register their endpoints, see every delivery and its attempts,
//! and replay one by hand; the gateway delivers the outbox in the background
//! ([`run_delivering`], `clisonix_billing::webhooks`). Every query is scoped by the
//! caller's tenant.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use clisonix_billing::signatures::new_secret;
use clisonix_billing::webhooks::{Deliverer, Outcome, EVENT_TYPES};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::accounts::{audit, ApiJson};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::results::{invalid, query_error};
use crate::startup::AppState;
use crate::tenant::require_admin;

type Peer = ConnectInfo<std::net::SocketAddr>;

/// Delivers due webhooks until `stop`: up to `webhook_concurrency` attempts in flight,
/// at most `webhook_endpoint_concurrency` of them to one endpoint, more taken every
/// `webhook_interval` and as soon as one ends, each recorded when it ends; so an
/// endpoint that hangs holds its few slots for at most the attempt's timeout. At `stop`
/// the attempts in flight finish (each within its timeout) and are recorded.
pub async fn run_delivering(state: AppState, stop: CancellationToken) {
    let mut deliverer = Deliverer::new(state.pool.clone());
    deliverer.first_retry = state.config.webhook_first_retry;
    let room = state.config.webhook_concurrency;
    let per_endpoint = state.config.webhook_endpoint_concurrency;
    let mut flying: JoinSet<(Uuid, Result<Outcome, sqlx::Error>)> = JoinSet::new();
    let mut to: HashMap<Uuid, i32> = HashMap::new();
    let mut every = tokio::time::interval(state.config.webhook_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ended =
        |to: &mut HashMap<Uuid, i32>,
         ended: Result<(Uuid, Result<Outcome, sqlx::Error>), tokio::task::JoinError>| {
            let outcome = match ended {
                Ok((endpoint, outcome)) => {
                    if let Some(n) = to.get_mut(&endpoint) {
                        *n -= 1;
                        if *n <= 0 {
                            to.remove(&endpoint);
                        }
                    }
                    outcome
                }
                Err(error) => {
                    // Not expected; the lease brings the delivery back.
                    tracing::error!(%error, "a webhook attempt panicked");
                    to.clear();
                    return;
                }
            };
            match outcome {
                Ok(outcome) => state
                    .metrics
                    .webhook_deliveries
                    .with_label_values(&[match outcome {
                        Outcome::Delivered => "delivered",
                        Outcome::Retrying => "retrying",
                        Outcome::Failed => "failed",
                    }])
                    .inc(),
                Err(error) => tracing::warn!(%error,
                "recording a webhook attempt failed; it is tried again when its lease ends"),
            }
        };
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = every.tick() => {}
            Some(done) = flying.join_next(), if !flying.is_empty() => ended(&mut to, done),
        }
        let free = room.saturating_sub(flying.len());
        if free == 0 {
            continue;
        }
        let busy: Vec<(Uuid, i32)> = to.iter().map(|(e, n)| (*e, *n)).collect();
        match deliverer.take(free as i64, per_endpoint, &busy).await {
            Ok(due) => {
                for d in due {
                    let endpoint = d.endpoint();
                    *to.entry(endpoint).or_default() += 1;
                    let deliverer = deliverer.clone();
                    flying.spawn(async move { (endpoint, deliverer.attempt(d).await) });
                }
            }
            Err(error) => tracing::warn!(%error, "taking due webhooks failed; trying again soon"),
        }
    }
    while let Some(done) = flying.join_next().await {
        ended(&mut to, done);
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEndpoint {
    /// Where deliveries are POSTed (http or https).
    pub url: String,
    /// The event types to deliver: `session.ended`, `usage.threshold_reached`,
    /// `invoice.finalized`, `invoice.paid`, `invoice.payment_failed`, `invoice.voided`,
    /// `credit_note.created`.
    pub events: Vec<String>,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Endpoint {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub description: String,
    pub created_at: DateTime<Utc>,
    /// The signing secret (`whsec_…`): only in the answer that creates the endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EndpointList {
    pub endpoints: Vec<Endpoint>,
}

fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "webhook_not_found",
        "no such webhook endpoint",
    )
}

fn endpoint_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_id",
            "the endpoint id is not a UUID",
        )
        .field("id")
    })
}

#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks", security(("bearer" = [])), request_body = NewEndpoint,
    responses((status = 201, body = Endpoint, description = "Created; the secret is shown this once"),
        (status = 401, description = "Missing or invalid token", body = crate::openapi::ErrorBody),
        (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody),
        (status = 422, description = "A bad URL or event type", body = crate::openapi::ErrorBody)))]
/// `POST /v1/webhooks` (admins): registers an endpoint. Deliveries are signed the
/// Standard Webhooks way with the secret answered here (and never again).
pub async fn create(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    caller: Caller,
    ApiJson(body): ApiJson<NewEndpoint>,
) -> Result<(StatusCode, Json<Endpoint>), ApiError> {
    require_admin(&caller)?;
    let url = body.url.trim();
    let url_ok = (url.starts_with("https://") || url.starts_with("http://"))
        && (8..=2048).contains(&url.len())
        && !url.chars().any(char::is_whitespace);
    if !url_ok {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "url must be an http(s) URL of at most 2048 characters",
        )
        .field("url"));
    }
    let mut events = body.events.clone();
    events.sort();
    events.dedup();
    if events.is_empty() || events.iter().any(|e| !EVENT_TYPES.contains(&e.as_str())) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!(
                "events must name at least one of: {}",
                EVENT_TYPES.join(", ")
            ),
        )
        .field("events"));
    }
    if body.description.chars().count() > 500 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "description holds at most 500 characters",
        )
        .field("description"));
    }
    let id = Uuid::new_v4();
    let secret = new_secret();
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO webhook_endpoints (id, tenant_id, url, description, events, secret) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING created_at",
    )
    .bind(id)
    .bind(caller.0.tid)
    .bind(url)
    .bind(&body.description)
    .bind(&events)
    .bind(&secret)
    .fetch_one(&state.pool)
    .await?;
    audit(
        &state,
        Some(caller.0.tid),
        Some(caller.0.sub),
        "webhook_created",
        json!({"endpoint_id": id, "url": url, "events": events}),
        &peer.ip().to_string(),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(Endpoint {
            id,
            url: url.to_owned(),
            events,
            description: body.description,
            created_at,
            secret: Some(secret),
        }),
    ))
}

#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks", security(("bearer" = [])),
    responses((status = 200, body = EndpointList), (status = 401, description = "Missing or invalid token", body = crate::openapi::ErrorBody),
        (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody)))]
/// `GET /v1/webhooks` (admins): the tenant's endpoints (without their secrets).
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<EndpointList>, ApiError> {
    require_admin(&caller)?;
    let endpoints: Vec<Endpoint> = sqlx::query_as(
        "SELECT id, url, events, description, created_at, NULL::text AS secret FROM webhook_endpoints \
         WHERE tenant_id = $1 AND deleted_at IS NULL ORDER BY created_at",
    )
    .bind(caller.0.tid)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(EndpointList { endpoints }))
}

#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 204, description = "Deleted: nothing more is delivered to it"),
        (status = 401, description = "Missing or invalid token", body = crate::openapi::ErrorBody),
        (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such endpoint in the tenant", body = crate::openapi::ErrorBody)))]
/// `DELETE /v1/webhooks/{id}` (admins): deletes an endpoint; its pending deliveries
/// are dropped (their log stays).
pub async fn delete(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    require_admin(&caller)?;
    let id = endpoint_id(&id)?;
    let mut tx = state.pool.begin().await?;
    let done = sqlx::query(
        "UPDATE webhook_endpoints SET deleted_at = now() WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL",
    )
    .bind(id)
    .bind(caller.0.tid)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(not_found());
    }
    sqlx::query(
        "UPDATE webhook_deliveries SET status = 'failed', last_error = 'the endpoint was deleted' \
         WHERE endpoint_id = $1 AND status = 'pending'",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    audit(
        &state,
        Some(caller.0.tid),
        Some(caller.0.sub),
        "webhook_deleted",
        json!({"endpoint_id": id}),
        &peer.ip().to_string(),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    /// At most this many, newest event first (1 to 100, default 50).
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Attempt {
    #[serde(skip)]
    pub event_id: String,
    pub attempted_at: DateTime<Utc>,
    /// The HTTP status answered; absent when there was no answer (`error`).
    pub status: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i32,
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Delivery {
    /// The `webhook-id` of every attempt.
    pub event_id: String,
    pub event_type: String,
    pub event_created_at: DateTime<Utc>,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    #[sqlx(skip)]
    pub attempts: Vec<Attempt>,
    /// The event as delivered.
    #[schema(value_type = Object)]
    pub payload: sqlx::types::Json<serde_json::Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryLog {
    pub deliveries: Vec<Delivery>,
}

#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", tag = "webhooks", security(("bearer" = [])), params(("id" = Uuid, Path), DeliveriesQuery),
    responses((status = 200, body = DeliveryLog), (status = 401, description = "Missing or invalid token", body = crate::openapi::ErrorBody),
        (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such endpoint in the tenant", body = crate::openapi::ErrorBody)))]
/// `GET /v1/webhooks/{id}/deliveries` (admins): the endpoint's deliveries, newest
/// first, each with every attempt.
pub async fn deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> Result<Json<DeliveryLog>, ApiError> {
    require_admin(&caller)?;
    let Query(q) = query.map_err(query_error)?;
    let id = endpoint_id(&id)?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=100).contains(&limit) {
        return Err(invalid("limit", "limit must be 1 to 100"));
    }
    owned(&state, caller.0.tid, id).await?;
    let mut deliveries: Vec<Delivery> = sqlx::query_as(
        "SELECT d.event_id, ev.type AS event_type, ev.created_at AS event_created_at, d.status, \
                CASE WHEN d.status = 'pending' THEN d.next_attempt_at END AS next_attempt_at, \
                d.delivered_at, ev.payload \
         FROM webhook_deliveries d JOIN webhook_events ev ON ev.id = d.event_id \
         WHERE d.endpoint_id = $1 ORDER BY ev.created_at DESC, d.event_id LIMIT $2",
    )
    .bind(id)
    .bind(limit)
    .fetch_all(&state.pool)
    .await?;
    let ids: Vec<String> = deliveries.iter().map(|d| d.event_id.clone()).collect();
    let attempts: Vec<Attempt> = sqlx::query_as(
        "SELECT event_id, attempted_at, status, error, duration_ms FROM webhook_attempts \
         WHERE endpoint_id = $1 AND event_id = ANY($2) ORDER BY id",
    )
    .bind(id)
    .bind(&ids)
    .fetch_all(&state.pool)
    .await?;
    for a in attempts {
        if let Some(d) = deliveries.iter_mut().find(|d| d.event_id == a.event_id) {
            d.attempts.push(a);
        }
    }
    Ok(Json(DeliveryLog { deliveries }))
}

async fn owned(state: &AppState, tenant: Uuid, id: Uuid) -> Result<(), ApiError> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM webhook_endpoints WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL)",
    )
    .bind(id)
    .bind(tenant)
    .fetch_one(&state.pool)
    .await?;
    if exists {
        Ok(())
    } else {
        Err(not_found())
    }
}

#[utoipa::path(post, path = "/v1/webhooks/{id}/deliveries/{event_id}/replay", tag = "webhooks", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("event_id" = String, Path)),
    responses((status = 202, description = "Due again now (same webhook-id)"),
        (status = 401, description = "Missing or invalid token", body = crate::openapi::ErrorBody),
        (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such endpoint or delivery in the tenant", body = crate::openapi::ErrorBody)))]
/// `POST /v1/webhooks/{id}/deliveries/{event_id}/replay` (admins): delivers an event
/// to the endpoint again, now, under its same `webhook-id` (a failed attempt is retried
/// while the event is less than a day old).
pub async fn replay(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    caller: Caller,
    Path((id, event_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    require_admin(&caller)?;
    let id = endpoint_id(&id)?;
    owned(&state, caller.0.tid, id).await?;
    let done = sqlx::query(
        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now(), delivered_at = NULL \
         WHERE endpoint_id = $1 AND event_id = $2",
    )
    .bind(id)
    .bind(&event_id)
    .execute(&state.pool)
    .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "delivery_not_found",
            "no such delivery to this endpoint",
        ));
    }
    audit(
        &state,
        Some(caller.0.tid),
        Some(caller.0.sub),
        "webhook_replayed",
        json!({"endpoint_id": id, "event_id": event_id}),
        &peer.ip().to_string(),
    )
    .await?;
    Ok(StatusCode::ACCEPTED)
}
