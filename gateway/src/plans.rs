//! Plans and the tenant's subscription: the public catalog, the subscription members
//! read, and the plan change admins make (effective at once, in the current period;
//! audited). Plans are data (`clisonix_tenancy::plans`), seeded by a migration.

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use clisonix_tenancy::plans::{self, Plan, Subscription};
use serde::{Deserialize, Serialize};

use crate::accounts::ApiJson;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::startup::AppState;
use crate::tenant::require_admin;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PlanList {
    /// The newest version of every public plan, cheapest first.
    pub plans: Vec<Plan>,
}

#[utoipa::path(get, path = "/v1/plans", tag = "plans", responses((status = 200, body = PlanList)))]
/// `GET /v1/plans` (public): the plans a tenant can subscribe to.
pub async fn list(State(state): State<AppState>) -> Result<Json<PlanList>, ApiError> {
    Ok(Json(PlanList {
        plans: plans::catalog(&state.pool).await?,
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SubscriptionView {
    pub subscription: Subscription,
    /// The plan version the subscription is on.
    pub plan: Plan,
}

/// Starts the billing periods that are due (metering does it every few seconds; a
/// read does not wait for it). A failure here (a lock conflict with a concurrent
/// roll) is not the reader's: the answer is then at most one roll behind.
pub(crate) async fn roll_periods(state: &AppState) {
    if let Err(error) = sqlx::query("SELECT clisonix_roll_periods(now())")
        .execute(&state.pool)
        .await
    {
        tracing::warn!(%error, "starting due billing periods failed; answering as they are");
    }
}

/// The tenant's subscription, with its periods brought up to now, and its plan.
pub(crate) async fn view(
    state: &AppState,
    tenant: uuid::Uuid,
) -> Result<SubscriptionView, ApiError> {
    roll_periods(state).await;
    let subscription = plans::subscription(&state.pool, tenant)
        .await?
        .ok_or_else(|| ApiError::internal(format!("tenant {tenant} has no subscription")))?;
    let plan = plans::plan(
        &state.pool,
        &subscription.plan_id,
        Some(subscription.plan_version),
    )
    .await?
    .ok_or_else(|| ApiError::internal("a subscription names a missing plan"))?;
    Ok(SubscriptionView { subscription, plan })
}

#[utoipa::path(get, path = "/v1/subscription", tag = "plans", security(("bearer" = [])),
    responses((status = 200, body = SubscriptionView), (status = 401, description = "Missing or invalid token", body = crate::openapi::ErrorBody)))]
/// `GET /v1/subscription` (members): the tenant's plan and current billing period.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<SubscriptionView>, ApiError> {
    Ok(Json(view(&state, caller.0.tid).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePlan {
    /// A public plan's id (`GET /v1/plans`).
    pub plan_id: String,
}

type Peer = ConnectInfo<std::net::SocketAddr>;

#[utoipa::path(put, path = "/v1/subscription", tag = "plans", security(("bearer" = [])), request_body = ChangePlan,
    responses((status = 200, body = SubscriptionView), (status = 401, description = "Missing or invalid token", body = crate::openapi::ErrorBody),
        (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody),
        (status = 422, description = "Unknown or unavailable plan", body = crate::openapi::ErrorBody)))]
/// `PUT /v1/subscription` (admins): moves the tenant to the newest version of a public
/// plan, at once; the current billing period is on the new plan from now (its invoice
/// prorates the two, see `docs/billing.md`). Audited as `subscription_changed`.
pub async fn change(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    caller: Caller,
    ApiJson(body): ApiJson<ChangePlan>,
) -> Result<Json<SubscriptionView>, ApiError> {
    require_admin(&caller)?;
    let unknown = || {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_plan",
            format!(
                "no public plan {:?} (GET /v1/plans lists them)",
                body.plan_id
            ),
        )
        .field("plan_id")
    };
    let plan = plans::plan(&state.pool, &body.plan_id, None)
        .await?
        .filter(|p| p.public)
        .ok_or_else(unknown)?;
    let mut tx = state.pool.begin().await?;
    let before: Option<(String, i32, DateTime<Utc>)> = sqlx::query_as(
        "SELECT plan_id, plan_version, period_start FROM subscriptions WHERE tenant_id = $1 FOR UPDATE",
    )
    .bind(caller.0.tid)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((from_plan, from_version, period_start)) = before else {
        return Err(ApiError::internal(format!(
            "tenant {} has no subscription",
            caller.0.tid
        )));
    };
    sqlx::query(
        "UPDATE subscriptions SET plan_id = $2, plan_version = $3, updated_at = now() WHERE tenant_id = $1",
    )
    .bind(caller.0.tid)
    .bind(&plan.plan_id)
    .bind(plan.version)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE billing_periods SET plan_id = $3, plan_version = $4 WHERE tenant_id = $1 AND period_start = $2",
    )
    .bind(caller.0.tid)
    .bind(period_start)
    .bind(&plan.plan_id)
    .bind(plan.version)
    .execute(&mut *tx)
    .await?;
    // In the same transaction: no change without its audit record.
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, user_id, action, detail, ip) VALUES ($1, $2, 'subscription_changed', $3, $4)",
    )
    .bind(caller.0.tid)
    .bind(caller.0.sub)
    .bind(sqlx::types::Json(serde_json::json!({
        "from": {"plan_id": from_plan, "version": from_version},
        "to": {"plan_id": plan.plan_id, "version": plan.version},
    })))
    .bind(peer.ip().to_string())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(view(&state, caller.0.tid).await?))
}
