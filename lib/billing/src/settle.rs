//! Settling finalized invoices: marked paid, voided, corrected by credit notes
//! (`gateway/migrations/20261207000006_settlement.sql`).
//!
//! In self-hosted mode (no Stripe) Clisonix's invoices are the bill, and the operator
//! records what happened to them (`clisonix-gateway billing ...`). Each action is one
//! transaction that locks the invoice, checks its state, changes it, writes the audit
//! entry and emits the tenant's webhook (`invoice.paid`, `invoice.voided`,
//! `credit_note.created`): all of it or nothing.
//!
//! The rules: only a finalized invoice is paid or voided (a draft may still change; a
//! paid or void one is settled); a credit note corrects a finalized or paid invoice, for
//! a positive amount, never more in all than the invoice's total; credit notes are
//! numbered without gaps in their own series.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::store::InvoiceStatus;

#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error("no invoice {0}")]
    NotFound(Uuid),
    #[error("invoice {number} is {status}: only a {wanted} invoice can be {action}")]
    State {
        number: String,
        status: &'static str,
        wanted: &'static str,
        action: &'static str,
    },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("a credit note of {amount_minor} would credit more than the invoice's total of {total_minor} ({credited_minor} credited already)")]
    OverCredit {
        amount_minor: i64,
        total_minor: i64,
        credited_minor: i64,
    },
    #[error("billing database: {0}")]
    Database(#[from] sqlx::Error),
}

/// A credit note: an amount given back on a finalized invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CreditNote {
    pub id: Uuid,
    pub invoice_id: Uuid,
    /// Gapless across the deployment, in the credit notes' own series.
    pub number: i64,
    /// In the invoice's currency's minor unit.
    pub amount_minor: i64,
    pub currency: String,
    pub reason: String,
    pub created_at: DateTime<Utc>,
}

/// Who did it, for the audit log (the operator's name, or the tool).
#[derive(Debug, Clone)]
pub struct Actor(pub String);

/// The locked invoice an action works on.
struct Locked {
    tenant: Uuid,
    number: Option<i64>,
    status: InvoiceStatus,
    currency: String,
    total_minor: i64,
}

impl Locked {
    fn label(&self, id: Uuid) -> String {
        match self.number {
            Some(n) => format!("{n:06}"),
            None => format!("{id} (draft)"),
        }
    }
}

async fn lock(tx: &mut PgConnection, id: Uuid) -> Result<Locked, SettleError> {
    let row = sqlx::query(
        "SELECT tenant_id, number, status, currency, total_minor FROM invoices WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(SettleError::NotFound(id))?;
    Ok(Locked {
        tenant: row.get("tenant_id"),
        number: row.get("number"),
        status: InvoiceStatus::parse(row.get("status")).unwrap_or(InvoiceStatus::Draft),
        currency: row.get("currency"),
        total_minor: row.get("total_minor"),
    })
}

fn text(field: &'static str, value: &str, max: usize) -> Result<String, SettleError> {
    let v = value.trim();
    if v.is_empty() || v.chars().count() > max || v.chars().any(char::is_control) {
        return Err(SettleError::Invalid {
            field,
            reason: format!("must be 1 to {max} characters of text"),
        });
    }
    Ok(v.to_owned())
}

async fn audit(
    tx: &mut PgConnection,
    tenant: Uuid,
    action: &str,
    by: &Actor,
    detail: serde_json::Value,
) -> Result<(), sqlx::Error> {
    let mut detail = detail;
    detail["by"] = serde_json::Value::String(by.0.clone());
    sqlx::query("INSERT INTO audit_log (tenant_id, action, detail) VALUES ($1, $2, $3)")
        .bind(tenant)
        .bind(action)
        .bind(sqlx::types::Json(detail))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

async fn emit(
    tx: &mut PgConnection,
    tenant: Uuid,
    kind: &str,
    source: String,
    payload: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT clisonix_webhook_emit($1, $2, $3, $4)")
        .bind(tenant)
        .bind(kind)
        .bind(source)
        .bind(sqlx::types::Json(payload))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// What ends a finalized invoice, and where it is written: paid (with the payment's
/// reference) or void (with why).
struct Settlement {
    status: &'static str,
    at_column: &'static str,
    text_column: &'static str,
    /// The text's name in errors, the audit detail and the webhook.
    key: &'static str,
    max: usize,
    /// For a refusal: "only a finalized invoice can be {action}".
    action: &'static str,
    audit_action: &'static str,
    event: &'static str,
}

const PAID: Settlement = Settlement {
    status: "paid",
    at_column: "paid_at",
    text_column: "payment_reference",
    key: "reference",
    max: 200,
    action: "marked paid",
    audit_action: "invoice_paid",
    event: "invoice.paid",
};

const VOID: Settlement = Settlement {
    status: "void",
    at_column: "voided_at",
    text_column: "void_reason",
    key: "reason",
    max: 1000,
    action: "voided",
    audit_action: "invoice_voided",
    event: "invoice.voided",
};

/// Moves a finalized invoice to `how`, with `text`, in one transaction with its audit
/// entry and the tenant's webhook; answers when.
async fn settle(
    db: &PgPool,
    invoice: Uuid,
    how: &Settlement,
    text_value: &str,
    by: &Actor,
) -> Result<DateTime<Utc>, SettleError> {
    let value = text(how.key, text_value, how.max)?;
    let mut tx = db.begin().await?;
    let inv = lock(&mut tx, invoice).await?;
    if inv.status != InvoiceStatus::Finalized {
        return Err(SettleError::State {
            number: inv.label(invoice),
            status: inv.status.as_str(),
            wanted: "finalized",
            action: how.action,
        });
    }
    let sql = format!(
        "UPDATE invoices SET status = '{}', {at} = now(), {} = $2, updated_at = now() \
         WHERE id = $1 RETURNING {at}",
        how.status,
        how.text_column,
        at = how.at_column
    );
    let at: DateTime<Utc> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(invoice)
        .bind(&value)
        .fetch_one(&mut *tx)
        .await?;
    let mut detail = serde_json::json!({
        "invoice_id": invoice,
        "number": inv.number,
        "total_minor": inv.total_minor,
        "currency": inv.currency,
    });
    detail[how.key] = serde_json::Value::String(value);
    audit(&mut tx, inv.tenant, how.audit_action, by, detail.clone()).await?;
    detail[how.at_column] = serde_json::json!(at);
    let source = format!("{}:{invoice}", how.event);
    emit(&mut tx, inv.tenant, how.event, source, detail).await?;
    tx.commit().await?;
    Ok(at)
}

/// Marks a finalized invoice paid, with the payment's reference (a bank transfer's,
/// say); answers when.
pub async fn mark_paid(
    db: &PgPool,
    invoice: Uuid,
    reference: &str,
    by: &Actor,
) -> Result<DateTime<Utc>, SettleError> {
    settle(db, invoice, &PAID, reference, by).await
}

/// Voids a finalized invoice (it was issued in error and is not owed); answers when.
pub async fn void(
    db: &PgPool,
    invoice: Uuid,
    reason: &str,
    by: &Actor,
) -> Result<DateTime<Utc>, SettleError> {
    settle(db, invoice, &VOID, reason, by).await
}

/// Issues a credit note of `amount_minor` on a finalized or paid invoice.
pub async fn credit_note(
    db: &PgPool,
    invoice: Uuid,
    amount_minor: i64,
    reason: &str,
    by: &Actor,
) -> Result<CreditNote, SettleError> {
    let reason = text("reason", reason, 1000)?;
    if amount_minor <= 0 {
        return Err(SettleError::Invalid {
            field: "amount",
            reason: "must be a positive number of minor units".into(),
        });
    }
    let mut tx = db.begin().await?;
    let inv = lock(&mut tx, invoice).await?;
    if !matches!(inv.status, InvoiceStatus::Finalized | InvoiceStatus::Paid) {
        return Err(SettleError::State {
            number: inv.label(invoice),
            status: inv.status.as_str(),
            wanted: "finalized or paid",
            action: "credited",
        });
    }
    let credited_minor: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(amount_minor), 0)::bigint FROM credit_notes WHERE invoice_id = $1",
    )
    .bind(invoice)
    .fetch_one(&mut *tx)
    .await?;
    if credited_minor.saturating_add(amount_minor) > inv.total_minor {
        return Err(SettleError::OverCredit {
            amount_minor,
            total_minor: inv.total_minor,
            credited_minor,
        });
    }
    let number: i64 = sqlx::query_scalar(
        "UPDATE invoice_numbers SET last = last + 1 WHERE series = 'credit_note' RETURNING last",
    )
    .fetch_one(&mut *tx)
    .await?;
    let id = Uuid::new_v4();
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO credit_notes (id, invoice_id, tenant_id, number, amount_minor, reason) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING created_at",
    )
    .bind(id)
    .bind(invoice)
    .bind(inv.tenant)
    .bind(number)
    .bind(amount_minor)
    .bind(&reason)
    .fetch_one(&mut *tx)
    .await?;
    let note = CreditNote {
        id,
        invoice_id: invoice,
        number,
        amount_minor,
        currency: inv.currency.clone(),
        reason,
        created_at,
    };
    let detail = serde_json::json!({
        "credit_note_id": id,
        "credit_note_number": number,
        "invoice_id": invoice,
        "invoice_number": inv.number,
        "amount_minor": amount_minor,
        "currency": inv.currency,
        "reason": note.reason,
    });
    audit(
        &mut tx,
        inv.tenant,
        "credit_note_issued",
        by,
        detail.clone(),
    )
    .await?;
    emit(
        &mut tx,
        inv.tenant,
        "credit_note.created",
        format!("credit_note.created:{id}"),
        detail,
    )
    .await?;
    tx.commit().await?;
    Ok(note)
}

/// The credit notes of one of a tenant's invoices, oldest first.
pub async fn credit_notes(
    db: &PgPool,
    tenant: Uuid,
    invoice: Uuid,
) -> Result<Vec<CreditNote>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT c.id, c.invoice_id, c.number, c.amount_minor, i.currency, c.reason, c.created_at \
         FROM credit_notes c JOIN invoices i ON i.id = c.invoice_id \
         WHERE c.tenant_id = $1 AND c.invoice_id = $2 ORDER BY c.number",
    )
    .bind(tenant)
    .bind(invoice)
    .fetch_all(db)
    .await?;
    Ok(rows
        .iter()
        .map(|r| CreditNote {
            id: r.get("id"),
            invoice_id: r.get("invoice_id"),
            number: r.get("number"),
            amount_minor: r.get("amount_minor"),
            currency: r.get("currency"),
            reason: r.get("reason"),
            created_at: r.get("created_at"),
        })
        .collect())
}
