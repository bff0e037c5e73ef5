//! Plans and subscriptions (`gateway/migrations/20261207000001_plans.sql`). A plan is
//! data: a `(plan_id, version)` with its limits and a row per meter; a published
//! version never changes, a change is a new version. A tenant has one subscription,
//! naming the version it is on and its current billing period.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, Row};
use uuid::Uuid;

use crate::Meter;

/// What happens when a meter's included quantity is used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// Usage is refused until the period resets.
    Hard,
    /// Usage goes on and is billed as overage; events at 80% and 100%.
    Soft,
}

impl LimitKind {
    fn parse(s: &str) -> LimitKind {
        if s == "hard" {
            LimitKind::Hard
        } else {
            LimitKind::Soft
        }
    }
}

/// A meter's terms in a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PlanMeter {
    /// The meter's name (`frames`, `device_ms`, ...).
    pub meter: String,
    /// Its unit.
    pub unit: String,
    /// Included per billing period.
    pub included: i64,
    /// Overage: `price_minor` (in the plan's currency's minor unit) per `price_per`
    /// units beyond the included quantity.
    pub price_minor: i64,
    pub price_per: i64,
    pub limit: LimitKind,
}

/// A version of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Plan {
    pub plan_id: String,
    pub version: i32,
    pub name: String,
    /// ISO 4217; every amount is in its minor unit.
    pub currency: String,
    pub base_fee_minor: i64,
    /// None: no limit.
    pub max_concurrent_sessions: Option<i32>,
    pub max_devices: Option<i32>,
    /// Authenticated API requests per minute and caller, for members and for the
    /// premium, admin and owner roles.
    pub requests_per_minute_member: i32,
    pub requests_per_minute_premium: i32,
    pub audio_presets: Vec<String>,
    pub retention_days: i32,
    pub public: bool,
    pub meters: Vec<PlanMeter>,
}

impl Plan {
    /// The plan's terms for `meter`, if it has any (a meter a plan does not name is
    /// neither limited nor billed).
    pub fn meter(&self, meter: Meter) -> Option<&PlanMeter> {
        self.meters.iter().find(|m| m.meter == meter.as_str())
    }
}

/// Where a subscription stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    Trialing,
    Active,
    PastDue,
    Canceled,
}

impl SubscriptionStatus {
    pub fn parse(s: &str) -> Option<SubscriptionStatus> {
        Some(match s {
            "trialing" => SubscriptionStatus::Trialing,
            "active" => SubscriptionStatus::Active,
            "past_due" => SubscriptionStatus::PastDue,
            "canceled" => SubscriptionStatus::Canceled,
            _ => return None,
        })
    }
}

/// A tenant's subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Subscription {
    pub tenant_id: Uuid,
    pub plan_id: String,
    pub plan_version: i32,
    pub status: SubscriptionStatus,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub past_due_since: Option<DateTime<Utc>>,
}

const PLAN_COLUMNS: &str = "p.plan_id, p.version, p.name, p.currency, p.base_fee_minor, \
    p.max_concurrent_sessions, p.max_devices, p.requests_per_minute_member, \
    p.requests_per_minute_premium, p.audio_presets, p.retention_days, p.public, \
    coalesce((SELECT array_agg(m.meter ORDER BY m.meter) FROM plan_meters m \
              WHERE m.plan_id = p.plan_id AND m.version = p.version), '{}') AS meter_names, \
    coalesce((SELECT array_agg(m.included ORDER BY m.meter) FROM plan_meters m \
              WHERE m.plan_id = p.plan_id AND m.version = p.version), '{}') AS included, \
    coalesce((SELECT array_agg(m.price_minor ORDER BY m.meter) FROM plan_meters m \
              WHERE m.plan_id = p.plan_id AND m.version = p.version), '{}') AS price_minor, \
    coalesce((SELECT array_agg(m.price_per ORDER BY m.meter) FROM plan_meters m \
              WHERE m.plan_id = p.plan_id AND m.version = p.version), '{}') AS price_per, \
    coalesce((SELECT array_agg(m.limit_kind ORDER BY m.meter) FROM plan_meters m \
              WHERE m.plan_id = p.plan_id AND m.version = p.version), '{}') AS limit_kinds";

fn plan_from(row: &sqlx::postgres::PgRow) -> Plan {
    let names: Vec<String> = row.get("meter_names");
    let included: Vec<i64> = row.get("included");
    let price_minor: Vec<i64> = row.get("price_minor");
    let price_per: Vec<i64> = row.get("price_per");
    let limits: Vec<String> = row.get("limit_kinds");
    let meters = names
        .into_iter()
        .enumerate()
        .map(|(i, meter)| PlanMeter {
            unit: Meter::parse(&meter).map_or("", Meter::unit).to_owned(),
            meter,
            included: included[i],
            price_minor: price_minor[i],
            price_per: price_per[i],
            limit: LimitKind::parse(&limits[i]),
        })
        .collect();
    Plan {
        plan_id: row.get("plan_id"),
        version: row.get("version"),
        name: row.get("name"),
        currency: row.get("currency"),
        base_fee_minor: row.get("base_fee_minor"),
        max_concurrent_sessions: row.get("max_concurrent_sessions"),
        max_devices: row.get("max_devices"),
        requests_per_minute_member: row.get("requests_per_minute_member"),
        requests_per_minute_premium: row.get("requests_per_minute_premium"),
        audio_presets: row.get("audio_presets"),
        retention_days: row.get("retention_days"),
        public: row.get("public"),
        meters,
    }
}

/// The newest version of every public plan, cheapest first.
pub async fn catalog(db: impl PgExecutor<'_>) -> Result<Vec<Plan>, sqlx::Error> {
    let sql = format!(
        "SELECT {PLAN_COLUMNS} FROM plans p \
         WHERE p.public AND p.version = (SELECT max(version) FROM plans q WHERE q.plan_id = p.plan_id) \
         ORDER BY p.base_fee_minor, p.plan_id"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(db).await?;
    Ok(rows.iter().map(plan_from).collect())
}

/// One version of a plan, or its newest when `version` is None.
pub async fn plan(
    db: impl PgExecutor<'_>,
    plan_id: &str,
    version: Option<i32>,
) -> Result<Option<Plan>, sqlx::Error> {
    let sql = format!(
        "SELECT {PLAN_COLUMNS} FROM plans p WHERE p.plan_id = $1 \
         AND p.version = coalesce($2, (SELECT max(version) FROM plans q WHERE q.plan_id = $1))"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(plan_id)
        .bind(version)
        .fetch_optional(db)
        .await?;
    Ok(row.as_ref().map(plan_from))
}

/// A tenant's subscription.
pub async fn subscription(
    db: impl PgExecutor<'_>,
    tenant: Uuid,
) -> Result<Option<Subscription>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT tenant_id, plan_id, plan_version, status, period_start, period_end, past_due_since \
         FROM subscriptions WHERE tenant_id = $1",
    )
    .bind(tenant)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|row| Subscription {
        tenant_id: row.get("tenant_id"),
        plan_id: row.get("plan_id"),
        plan_version: row.get("plan_version"),
        status: SubscriptionStatus::parse(row.get::<&str, _>("status"))
            .unwrap_or(SubscriptionStatus::Active),
        period_start: row.get("period_start"),
        period_end: row.get("period_end"),
        past_due_since: row.get("past_due_since"),
    }))
}
