//! What a tenant used, as the metering stage counted it: over time (per hour, day or
//! billing period) with the plan's included quantities and what remains of them this
//! period, and per session. Members read it; every query is scoped by the caller's
//! tenant.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use clisonix_tenancy::plans::LimitKind;
use clisonix_tenancy::Meter;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::plans::SubscriptionView;
use crate::results::{invalid, parse_time, query_error};
use crate::startup::AppState;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// Start (RFC 3339; default: the current billing period's start).
    pub from: Option<String>,
    /// End, exclusive (RFC 3339; default: now).
    pub to: Option<String>,
    /// `hour` (at most 31 days), `day` (at most 400 days) or `period` (default).
    pub granularity: Option<String>,
    /// Comma-separated meters (default: all).
    pub meters: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Point {
    /// The hour, day (UTC) or billing period this quantity is for.
    pub start: DateTime<Utc>,
    pub quantity: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MeterUsage {
    pub meter: String,
    pub unit: String,
    /// Used from `from` to `to`.
    pub total: i64,
    /// Oldest first; hours and days without usage are left out.
    pub series: Vec<Point>,
    /// Used in the current billing period (including usage carried into it from a
    /// closed period).
    pub period_used: i64,
    /// The plan's included quantity per period, and what remains of it (absent when
    /// the plan does not meter this).
    pub included: Option<i64>,
    pub remaining: Option<i64>,
    /// `hard`: refused once the included quantity is used; `soft`: billed as overage.
    pub limit: Option<LimitKind>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CurrentPeriod {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub plan_id: String,
    pub plan_version: i32,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub granularity: String,
    pub period: CurrentPeriod,
    pub meters: Vec<MeterUsage>,
}

fn meters_of(list: Option<&str>) -> Result<Vec<Meter>, ApiError> {
    let Some(list) = list else {
        return Ok(Meter::ALL.to_vec());
    };
    let mut meters = Vec::new();
    for name in list.split(',').map(str::trim) {
        let meter = Meter::parse(name).ok_or_else(|| {
            let known: Vec<&str> = Meter::ALL.iter().map(|m| m.as_str()).collect();
            invalid(
                "meters",
                format!(
                    "meters: unknown meter {name:?} (known: {})",
                    known.join(", ")
                ),
            )
        })?;
        if !meters.contains(&meter) {
            meters.push(meter);
        }
    }
    Ok(meters)
}

#[utoipa::path(get, path = "/v1/usage", tag = "usage", security(("bearer" = [])), params(UsageQuery),
    responses((status = 200, body = UsageReport), (status = 401, description = "Missing or invalid token", body = crate::openapi::ErrorBody),
        (status = 422, description = "A query parameter is invalid", body = crate::openapi::ErrorBody)))]
/// `GET /v1/usage` (members): the tenant's usage per meter over a time range, by hour,
/// day or billing period, with the plan's included quantities and what remains.
///
/// Hours and days show usage when it happened; periods show what each period bills,
/// which includes usage that arrived after its own period had closed.
pub async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<UsageReport>, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let tenant = caller.0.tid;
    let granularity = q.granularity.as_deref().unwrap_or("period");
    let longest = match granularity {
        "hour" => Duration::days(31),
        "day" => Duration::days(400),
        "period" => Duration::days(3660),
        _ => return Err(invalid("granularity", "granularity: hour, day or period")),
    };
    let meters = meters_of(q.meters.as_deref())?;
    let SubscriptionView { subscription, plan } = crate::plans::view(&state, tenant).await?;
    let from = parse_time("from", q.from.as_deref())?.unwrap_or(subscription.period_start);
    let to = parse_time("to", q.to.as_deref())?.unwrap_or_else(Utc::now);
    if from >= to {
        return Err(invalid("to", "to: must be after from"));
    }
    if to - from > longest {
        return Err(invalid(
            "from",
            format!("from: at most {} days by {granularity}", longest.num_days()),
        ));
    }
    let names: Vec<&str> = meters.iter().map(|m| m.as_str()).collect();
    let series: Vec<(String, DateTime<Utc>, i64)> = if granularity == "period" {
        sqlx::query_as(
            "SELECT u.meter, u.period_start, u.quantity FROM usage_periods u \
             JOIN billing_periods b ON b.tenant_id = u.tenant_id AND b.period_start = u.period_start \
             WHERE u.tenant_id = $1 AND u.meter = ANY($2) AND b.period_start < $4 AND b.period_end > $3 \
             ORDER BY u.meter, u.period_start",
        )
        .bind(tenant)
        .bind(&names)
        .bind(from)
        .bind(to)
        .fetch_all(&state.pool)
        .await?
    } else {
        // Hours are the unit of storage: a range starting mid-hour includes that hour.
        sqlx::query_as(
            "SELECT meter, date_trunc($5, hour, 'UTC') AS start, sum(quantity)::bigint FROM ( \
                 SELECT meter, hour, quantity FROM usage_hourly WHERE tenant_id = $1 \
                 UNION ALL \
                 SELECT meter, occurred_hour, quantity FROM usage_carried WHERE tenant_id = $1) u \
             WHERE meter = ANY($2) AND hour >= date_trunc('hour', $3::timestamptz, 'UTC') AND hour < $4 \
             GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .bind(tenant)
        .bind(&names)
        .bind(from)
        .bind(to)
        .bind(granularity)
        .fetch_all(&state.pool)
        .await?
    };
    let used: Vec<(String, i64)> = sqlx::query_as(
        "SELECT meter, quantity FROM usage_periods WHERE tenant_id = $1 AND period_start = $2",
    )
    .bind(tenant)
    .bind(subscription.period_start)
    .fetch_all(&state.pool)
    .await?;
    let report = meters
        .iter()
        .map(|&meter| {
            let points: Vec<Point> = series
                .iter()
                .filter(|(m, _, _)| m == meter.as_str())
                .map(|&(_, start, quantity)| Point { start, quantity })
                .collect();
            let period_used = used
                .iter()
                .find(|(m, _)| m == meter.as_str())
                .map_or(0, |(_, q)| *q);
            let terms = plan.meter(meter);
            MeterUsage {
                meter: meter.as_str().to_owned(),
                unit: meter.unit().to_owned(),
                total: points.iter().map(|p| p.quantity).sum(),
                series: points,
                period_used,
                included: terms.map(|t| t.included),
                remaining: terms.map(|t| (t.included - period_used).max(0)),
                limit: terms.map(|t| t.limit),
            }
        })
        .collect();
    Ok(Json(UsageReport {
        from,
        to,
        granularity: granularity.to_owned(),
        period: CurrentPeriod {
            start: subscription.period_start,
            end: subscription.period_end,
            plan_id: subscription.plan_id,
            plan_version: subscription.plan_version,
        },
        meters: report,
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionMeter {
    pub meter: String,
    /// What the quantity is of within its meter, where the meter is split (the audio
    /// preset of `audio_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub unit: String,
    pub quantity: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionUsage {
    pub session_id: Uuid,
    /// Every meter the session used, by name.
    pub meters: Vec<SessionMeter>,
}

#[utoipa::path(get, path = "/v1/usage/sessions/{id}", tag = "usage", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The session")),
    responses((status = 200, body = SessionUsage), (status = 401, description = "Missing or invalid token", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such session in this tenant", body = crate::openapi::ErrorBody)))]
/// `GET /v1/usage/sessions/{id}` (members): what one session used, per meter.
pub async fn session(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SessionUsage>, ApiError> {
    let not_found = || {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "session_not_found",
            "no such session",
        )
    };
    let session = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT meter, detail, quantity FROM usage_sessions WHERE session_id = $1 AND tenant_id = $2 \
         ORDER BY meter, detail",
    )
    .bind(session)
    .bind(caller.0.tid)
    .fetch_all(&state.pool)
    .await?;
    if rows.is_empty() {
        // A session of this tenant that has used nothing metered yet answers zeros.
        let known: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM ingest_sessions WHERE session_id = $1 AND tenant_id = $2) \
                 OR EXISTS (SELECT 1 FROM sessions WHERE session_id = $1 AND tenant_id = $2)",
        )
        .bind(session)
        .bind(caller.0.tid)
        .fetch_one(&state.pool)
        .await?;
        if !known {
            return Err(not_found());
        }
    }
    Ok(Json(SessionUsage {
        session_id: session,
        meters: rows
            .into_iter()
            .map(|(meter, detail, quantity)| SessionMeter {
                unit: Meter::parse(&meter).map_or("", Meter::unit).to_owned(),
                meter,
                detail: Some(detail).filter(|d| !d.is_empty()),
                quantity,
            })
            .collect(),
    }))
}
