//! Invoices in Postgres (`gateway/migrations/20261207000003_invoices.sql`).
//!
//! [`Invoicing::run`] brings every ended billing period's invoice up to date: a period
//! that has ended gets a draft, computed again at every run while the period is open to
//! late usage; once the period is closed the draft is computed a last time and
//! finalized with the next number. Each period is one transaction that locks the
//! period's row first, and an invoice is unique per tenant and period, so runs that
//! overlap, repeat, or die half-way leave exactly one invoice, right.

use chrono::{DateTime, Utc};
use clisonix_tenancy::plans::{plan, Plan};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::invoice::{compute, Draft, InvoiceError, Line, LineKind, Segment, UsageRow};
use crate::settle::CreditNote;

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("billing database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("invoice of tenant {tenant}, period from {period_start}: {source}")]
    Invoice {
        tenant: Uuid,
        period_start: DateTime<Utc>,
        source: InvoiceError,
    },
    #[error("plan {0} version {1} is not in the catalog")]
    UnknownPlan(String, i32),
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Invoiced {
    /// Drafts created or computed again.
    pub drafted: u64,
    /// Invoices finalized (numbered).
    pub finalized: u64,
}

/// An invoice's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InvoiceStatus {
    Draft,
    Finalized,
    Paid,
    Void,
}

impl InvoiceStatus {
    pub fn parse(s: &str) -> Option<InvoiceStatus> {
        Some(match s {
            "draft" => InvoiceStatus::Draft,
            "finalized" => InvoiceStatus::Finalized,
            "paid" => InvoiceStatus::Paid,
            "void" => InvoiceStatus::Void,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            InvoiceStatus::Draft => "draft",
            InvoiceStatus::Finalized => "finalized",
            InvoiceStatus::Paid => "paid",
            InvoiceStatus::Void => "void",
        }
    }
}

/// A stored invoice with its lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Invoice {
    pub id: Uuid,
    pub tenant_id: Uuid,
    /// Gapless across the deployment; absent while a draft.
    pub number: Option<i64>,
    pub status: InvoiceStatus,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    /// ISO 4217; amounts in its minor unit.
    pub currency: String,
    pub subtotal_minor: i64,
    pub tax_rate_bp: i32,
    pub tax_minor: i64,
    pub total_minor: i64,
    pub created_at: DateTime<Utc>,
    pub finalized_at: Option<DateTime<Utc>>,
    pub paid_at: Option<DateTime<Utc>>,
    /// The payment's reference, when the operator marked it paid.
    pub payment_reference: Option<String>,
    pub voided_at: Option<DateTime<Utc>>,
    pub void_reason: Option<String>,
    /// What its credit notes give back in all.
    pub credited_minor: i64,
    /// What is still owed: the total less credit notes while draft or finalized;
    /// nothing once paid or void.
    pub amount_due_minor: i64,
    /// Its lines (not in lists).
    pub lines: Vec<Line>,
    /// Its credit notes, oldest first (not in lists).
    pub credit_notes: Vec<CreditNote>,
}

/// Periods invoiced per transaction-run batch.
const BATCH: i64 = 200;

/// Generates and finalizes invoices.
#[derive(Debug, Clone)]
pub struct Invoicing {
    pool: PgPool,
}

impl Invoicing {
    pub fn new(pool: PgPool) -> Invoicing {
        Invoicing { pool }
    }

    /// Brings the invoices of every period that ended by `now` up to date (see the
    /// module documentation).
    pub async fn run(&self, now: DateTime<Utc>) -> Result<Invoiced, BillingError> {
        sqlx::query("SELECT clisonix_roll_periods($1)")
            .bind(now)
            .execute(&self.pool)
            .await?;
        let mut done = Invoiced::default();
        let mut after: Option<(DateTime<Utc>, Uuid)> = None;
        loop {
            // Ended periods without a finished invoice, in a stable order.
            let due: Vec<(Uuid, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
                "SELECT bp.tenant_id, bp.period_start, bp.period_end FROM billing_periods bp \
                 WHERE bp.period_end <= $1 \
                   AND ($2::timestamptz IS NULL OR (bp.period_end, bp.tenant_id) > ($2, $3)) \
                   AND NOT EXISTS (SELECT 1 FROM invoices i WHERE i.tenant_id = bp.tenant_id \
                                   AND i.period_start = bp.period_start AND i.status <> 'draft') \
                 ORDER BY bp.period_end, bp.tenant_id LIMIT $4",
            )
            .bind(now)
            .bind(after.map(|a| a.0))
            .bind(after.map(|a| a.1))
            .bind(BATCH)
            .fetch_all(&self.pool)
            .await?;
            for &(tenant, period_start, period_end) in &due {
                let mut tx = self.pool.begin().await?;
                match invoice_period(&mut tx, tenant, period_start, now).await? {
                    Some(true) => done.finalized += 1,
                    Some(false) => done.drafted += 1,
                    None => {}
                }
                tx.commit().await?;
                after = Some((period_end, tenant));
            }
            if (due.len() as i64) < BATCH {
                return Ok(done);
            }
        }
    }
}

/// Brings one period's invoice up to date in `tx`: `Some(true)` when it was finalized,
/// `Some(false)` when it is (still) a draft, `None` when there was nothing to do.
async fn invoice_period(
    tx: &mut PgConnection,
    tenant: Uuid,
    period_start: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Option<bool>, BillingError> {
    // The period's row lock orders every run's work on it.
    let Some(row) = sqlx::query(
        "SELECT period_end, plan_id, plan_version, closed_at FROM billing_periods \
         WHERE tenant_id = $1 AND period_start = $2 FOR UPDATE",
    )
    .bind(tenant)
    .bind(period_start)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(None);
    };
    let period_end: DateTime<Utc> = row.get("period_end");
    let closed = row.get::<Option<DateTime<Utc>>, _>("closed_at").is_some();
    let status: Option<String> = sqlx::query_scalar(
        "SELECT status FROM invoices WHERE tenant_id = $1 AND period_start = $2",
    )
    .bind(tenant)
    .bind(period_start)
    .fetch_optional(&mut *tx)
    .await?;
    if status.as_deref().is_some_and(|s| s != "draft") || period_end > now {
        return Ok(None);
    }
    let first = (
        row.get::<String, _>("plan_id"),
        row.get::<i32, _>("plan_version"),
    );
    let segments = segments(&mut *tx, tenant, period_start, period_end, first).await?;
    let usage: Vec<UsageRow> = sqlx::query_as::<_, (String, DateTime<Utc>, i64)>(
        "SELECT meter, hour, quantity FROM usage_hourly WHERE tenant_id = $1 AND period_start = $2 \
         UNION ALL \
         SELECT meter, occurred_hour, quantity FROM usage_carried WHERE tenant_id = $1 AND period_start = $2",
    )
    .bind(tenant)
    .bind(period_start)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|(meter, hour, quantity)| UsageRow {
        meter,
        hour,
        quantity,
    })
    .collect();
    let tax_rate_bp: i32 = sqlx::query_scalar("SELECT tax_rate_bp FROM billing_settings")
        .fetch_one(&mut *tx)
        .await?;
    let draft =
        compute(period_start, period_end, &segments, &usage, tax_rate_bp).map_err(|source| {
            BillingError::Invoice {
                tenant,
                period_start,
                source,
            }
        })?;
    let id = store_draft(&mut *tx, tenant, period_start, period_end, &draft).await?;
    if !closed {
        return Ok(Some(false));
    }
    let number: i64 = sqlx::query_scalar(
        "UPDATE invoice_numbers SET last = last + 1 WHERE series = 'invoice' RETURNING last",
    )
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE invoices SET status = 'finalized', number = $2, finalized_at = now(), updated_at = now() \
         WHERE id = $1",
    )
    .bind(id)
    .bind(number)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, action, detail) VALUES ($1, 'invoice_finalized', \
             jsonb_build_object('invoice_id', $2::uuid, 'number', $3::bigint, 'total_minor', $4::bigint))",
    )
    .bind(tenant)
    .bind(id)
    .bind(number)
    .bind(draft.total_minor)
    .execute(&mut *tx)
    .await?;
    // The tenant's webhook, in the same transaction.
    sqlx::query(
        "SELECT clisonix_webhook_emit($1, 'invoice.finalized', 'invoice.finalized:' || $2::text, \
             jsonb_build_object('invoice_id', $2::uuid, 'number', $3::bigint, 'period_start', $4::timestamptz, \
                                'period_end', $5::timestamptz, 'currency', $6::text, 'total_minor', $7::bigint))",
    )
    .bind(tenant)
    .bind(id)
    .bind(number)
    .bind(period_start)
    .bind(period_end)
    .bind(&draft.currency)
    .bind(draft.total_minor)
    .execute(&mut *tx)
    .await?;
    Ok(Some(true))
}

/// The plan versions in force from `period_start` to `period_end`: the one in force
/// when the period started (the last change at or before it; `fallback`, the period's
/// own, when none is recorded), then each change made during it.
async fn segments(
    tx: &mut PgConnection,
    tenant: Uuid,
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    fallback: (String, i32),
) -> Result<Vec<Segment>, BillingError> {
    let first: (String, i32) = sqlx::query_as(
        "SELECT plan_id, plan_version FROM subscription_changes \
         WHERE tenant_id = $1 AND at <= $2 ORDER BY at DESC, id DESC LIMIT 1",
    )
    .bind(tenant)
    .bind(period_start)
    .fetch_optional(&mut *tx)
    .await?
    .unwrap_or(fallback);
    let changes: Vec<(DateTime<Utc>, String, i32)> = sqlx::query_as(
        "SELECT at, plan_id, plan_version FROM subscription_changes \
         WHERE tenant_id = $1 AND at > $2 AND at < $3 ORDER BY at, id",
    )
    .bind(tenant)
    .bind(period_start)
    .bind(period_end)
    .fetch_all(&mut *tx)
    .await?;
    let mut cuts: Vec<(DateTime<Utc>, (String, i32))> = vec![(period_start, first)];
    for (at, plan_id, version) in changes {
        match cuts.last_mut() {
            // Several changes at one instant: the last one holds.
            Some(last) if last.0 == at => last.1 = (plan_id, version),
            _ => cuts.push((at, (plan_id, version))),
        }
    }
    let mut out: Vec<Segment> = Vec::with_capacity(cuts.len());
    for (i, (from, (plan_id, version))) in cuts.iter().enumerate() {
        let to = cuts.get(i + 1).map_or(period_end, |c| c.0);
        let p = load_plan(&mut *tx, plan_id, *version).await?;
        match out.last_mut() {
            // A change back to the same version is no cut.
            Some(prev) if prev.plan.plan_id == p.plan_id && prev.plan.version == p.version => {
                prev.to = to;
            }
            _ => out.push(Segment {
                plan: p,
                from: *from,
                to,
            }),
        }
    }
    Ok(out)
}

async fn load_plan(
    tx: &mut PgConnection,
    plan_id: &str,
    version: i32,
) -> Result<Plan, BillingError> {
    plan(&mut *tx, plan_id, Some(version))
        .await?
        .ok_or_else(|| BillingError::UnknownPlan(plan_id.to_owned(), version))
}

/// Writes `draft` as the period's draft invoice (created, or its content replaced).
async fn store_draft(
    tx: &mut PgConnection,
    tenant: Uuid,
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    draft: &Draft,
) -> Result<Uuid, BillingError> {
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO invoices (id, tenant_id, period_start, period_end, status, currency, \
             subtotal_minor, tax_rate_bp, tax_minor, total_minor) \
         VALUES ($1, $2, $3, $4, 'draft', $5, $6, $7, $8, $9) \
         ON CONFLICT (tenant_id, period_start) DO UPDATE SET \
             currency = EXCLUDED.currency, subtotal_minor = EXCLUDED.subtotal_minor, \
             tax_rate_bp = EXCLUDED.tax_rate_bp, tax_minor = EXCLUDED.tax_minor, \
             total_minor = EXCLUDED.total_minor, updated_at = now() \
         RETURNING id",
    )
    .bind(Uuid::new_v4())
    .bind(tenant)
    .bind(period_start)
    .bind(period_end)
    .bind(&draft.currency)
    .bind(draft.subtotal_minor)
    .bind(draft.tax_rate_bp)
    .bind(draft.tax_minor)
    .bind(draft.total_minor)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM invoice_lines WHERE invoice_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    for (i, l) in draft.lines.iter().enumerate() {
        sqlx::query(
            "INSERT INTO invoice_lines (invoice_id, line_no, kind, plan_id, plan_version, meter, \
                 description, period_from, period_to, share_ppm, quantity, included, billable, \
                 unit_price_minor, price_per, amount_minor) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        )
        .bind(id)
        .bind(i as i32 + 1)
        .bind(l.kind.as_str())
        .bind(&l.plan_id)
        .bind(l.plan_version)
        .bind(&l.meter)
        .bind(&l.description)
        .bind(l.from)
        .bind(l.to)
        .bind(l.share_ppm)
        .bind(l.quantity)
        .bind(l.included)
        .bind(l.billable)
        .bind(l.unit_price_minor)
        .bind(l.price_per)
        .bind(l.amount_minor)
        .execute(&mut *tx)
        .await?;
    }
    Ok(id)
}

const INVOICE_COLUMNS: &str = "id, tenant_id, number, status, period_start, period_end, currency, \
    subtotal_minor, tax_rate_bp, tax_minor, total_minor, created_at, finalized_at, paid_at, voided_at, \
    payment_reference, void_reason, \
    (SELECT coalesce(sum(c.amount_minor), 0) FROM credit_notes c WHERE c.invoice_id = invoices.id)::bigint \
        AS credited_minor";

/// A tenant's invoices, newest period first, without their lines.
pub async fn invoices(
    db: &PgPool,
    tenant: Uuid,
    limit: i64,
    before: Option<DateTime<Utc>>,
) -> Result<Vec<Invoice>, sqlx::Error> {
    let sql = format!(
        "SELECT {INVOICE_COLUMNS} FROM invoices WHERE tenant_id = $1 \
         AND ($2::timestamptz IS NULL OR period_start < $2) ORDER BY period_start DESC LIMIT $3"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant)
        .bind(before)
        .bind(limit)
        .fetch_all(db)
        .await?;
    Ok(rows.iter().map(invoice_from).collect())
}

/// One of a tenant's invoices with its lines (None: not the tenant's, or no such).
pub async fn invoice(db: &PgPool, tenant: Uuid, id: Uuid) -> Result<Option<Invoice>, sqlx::Error> {
    let sql = format!("SELECT {INVOICE_COLUMNS} FROM invoices WHERE tenant_id = $1 AND id = $2");
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant)
        .bind(id)
        .fetch_optional(db)
        .await?
    else {
        return Ok(None);
    };
    let mut inv = invoice_from(&row);
    let lines = sqlx::query(
        "SELECT kind, plan_id, plan_version, meter, description, period_from, period_to, share_ppm, \
             quantity, included, billable, unit_price_minor, price_per, amount_minor \
         FROM invoice_lines WHERE invoice_id = $1 ORDER BY line_no",
    )
    .bind(id)
    .fetch_all(db)
    .await?;
    inv.lines = lines
        .iter()
        .map(|r| Line {
            kind: LineKind::parse(r.get("kind")).unwrap_or(LineKind::Usage),
            plan_id: r.get("plan_id"),
            plan_version: r.get("plan_version"),
            meter: r.get("meter"),
            description: r.get("description"),
            from: r.get("period_from"),
            to: r.get("period_to"),
            share_ppm: r.get("share_ppm"),
            quantity: r.get("quantity"),
            included: r.get("included"),
            billable: r.get("billable"),
            unit_price_minor: r.get("unit_price_minor"),
            price_per: r.get("price_per"),
            amount_minor: r.get("amount_minor"),
        })
        .collect();
    inv.credit_notes = crate::settle::credit_notes(db, tenant, id).await?;
    Ok(Some(inv))
}

fn invoice_from(r: &sqlx::postgres::PgRow) -> Invoice {
    let status = InvoiceStatus::parse(r.get("status")).unwrap_or(InvoiceStatus::Draft);
    let total_minor: i64 = r.get("total_minor");
    let credited_minor: i64 = r.get("credited_minor");
    Invoice {
        id: r.get("id"),
        tenant_id: r.get("tenant_id"),
        number: r.get("number"),
        status,
        period_start: r.get("period_start"),
        period_end: r.get("period_end"),
        currency: r.get("currency"),
        subtotal_minor: r.get("subtotal_minor"),
        tax_rate_bp: r.get("tax_rate_bp"),
        tax_minor: r.get("tax_minor"),
        total_minor,
        created_at: r.get("created_at"),
        finalized_at: r.get("finalized_at"),
        paid_at: r.get("paid_at"),
        payment_reference: r.get("payment_reference"),
        voided_at: r.get("voided_at"),
        void_reason: r.get("void_reason"),
        credited_minor,
        amount_due_minor: match status {
            InvoiceStatus::Draft | InvoiceStatus::Finalized => total_minor - credited_minor,
            InvoiceStatus::Paid | InvoiceStatus::Void => 0,
        },
        lines: Vec::new(),
        credit_notes: Vec::new(),
    }
}
