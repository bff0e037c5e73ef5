//! `clisonix-gateway billing ...`: the operator's billing actions, on the deployment's
//! database (`DATABASE_URL`), for self-hosted mode where Clisonix's invoices are the
//! bill: list and show invoices, mark one paid, void one, issue a credit note. Each
//! action is audited in the tenant's log with who did it, and emits the tenant's
//! webhook (`clisonix_billing::settle`).

use std::fmt::Write as _;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use clisonix_billing::settle::{self, Actor};
use clisonix_billing::store::{self, Invoice, InvoiceStatus};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use uuid::Uuid;

#[derive(Debug, Subcommand)]
pub enum Billing {
    /// Lists invoices, newest period first.
    Invoices {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<Uuid>,
        /// Only those in this state: draft, finalized, paid or void.
        #[arg(long, value_parser = parse_status)]
        status: Option<InvoiceStatus>,
        /// At most this many.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
        /// As JSON, one invoice per line.
        #[arg(long)]
        json: bool,
    },
    /// Shows one invoice with its lines and credit notes.
    Show {
        invoice: Uuid,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Marks a finalized invoice paid (a payment received outside Stripe).
    MarkPaid {
        invoice: Uuid,
        /// The payment's reference (a bank transfer's, say), 1 to 200 characters.
        #[arg(long)]
        reference: String,
        /// Who records it, for the audit log (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// Voids a finalized invoice: issued in error, not owed.
    Void {
        invoice: Uuid,
        /// Why, 1 to 1000 characters (kept with the invoice and audited).
        #[arg(long)]
        reason: String,
        #[arg(long)]
        by: Option<String>,
    },
    /// Issues a credit note on a finalized or paid invoice.
    CreditNote {
        invoice: Uuid,
        /// How much, in the invoice currency's minor units (cents): at most what its
        /// total less earlier credit notes leaves.
        #[arg(long)]
        amount_minor: i64,
        /// Why, 1 to 1000 characters (shown to the tenant).
        #[arg(long)]
        reason: String,
        #[arg(long)]
        by: Option<String>,
    },
}

fn parse_status(s: &str) -> Result<InvoiceStatus, String> {
    InvoiceStatus::parse(s).ok_or_else(|| format!("{s:?} is not draft, finalized, paid or void"))
}

fn actor(by: Option<String>) -> Actor {
    let name = by
        .or_else(|| std::env::var("USER").ok())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "unknown".into());
    Actor(format!("operator:{}", name.trim()))
}

/// Runs `command` against `database_url`; answers what to print.
pub async fn run(command: Billing, database_url: &str) -> anyhow::Result<String> {
    let db = PgPoolOptions::new()
        .max_connections(2)
        .connect(database_url)
        .await
        .context("connecting to the database (DATABASE_URL)")?;
    let out = match command {
        Billing::Invoices {
            tenant,
            status,
            limit,
            json,
        } => {
            let list = invoices(&db, tenant, status, limit).await?;
            if json {
                let mut out = String::new();
                for i in &list {
                    writeln!(out, "{}", serde_json::to_string(i)?)?;
                }
                out
            } else {
                table(&list)
            }
        }
        Billing::Show { invoice, json } => {
            let tenant: Uuid = sqlx::query_scalar("SELECT tenant_id FROM invoices WHERE id = $1")
                .bind(invoice)
                .fetch_optional(&db)
                .await?
                .ok_or(settle::SettleError::NotFound(invoice))?;
            let i = store::invoice(&db, tenant, invoice)
                .await?
                .ok_or(settle::SettleError::NotFound(invoice))?;
            if json {
                format!("{}\n", serde_json::to_string_pretty(&i)?)
            } else {
                show(&i)
            }
        }
        Billing::MarkPaid {
            invoice,
            reference,
            by,
        } => {
            let at = settle::mark_paid(&db, invoice, &reference, &actor(by)).await?;
            format!("invoice {invoice} paid at {}\n", at.to_rfc3339())
        }
        Billing::Void {
            invoice,
            reason,
            by,
        } => {
            let at = settle::void(&db, invoice, &reason, &actor(by)).await?;
            format!("invoice {invoice} void at {}\n", at.to_rfc3339())
        }
        Billing::CreditNote {
            invoice,
            amount_minor,
            reason,
            by,
        } => {
            let note = settle::credit_note(&db, invoice, amount_minor, &reason, &actor(by)).await?;
            format!(
                "credit note {:06} ({}) of {} {} on invoice {invoice}\n",
                note.number,
                note.id,
                money(note.amount_minor),
                note.currency
            )
        }
    };
    db.close().await;
    Ok(out)
}

async fn invoices(
    db: &PgPool,
    tenant: Option<Uuid>,
    status: Option<InvoiceStatus>,
    limit: i64,
) -> anyhow::Result<Vec<Invoice>> {
    let ids = sqlx::query(
        "SELECT id, tenant_id FROM invoices \
         WHERE ($1::uuid IS NULL OR tenant_id = $1) AND ($2::text IS NULL OR status = $2) \
         ORDER BY period_start DESC, number DESC NULLS FIRST LIMIT $3",
    )
    .bind(tenant)
    .bind(status.map(InvoiceStatus::as_str))
    .bind(limit)
    .fetch_all(db)
    .await?;
    let mut out = Vec::with_capacity(ids.len());
    for r in ids {
        if let Some(mut i) = store::invoice(db, r.get("tenant_id"), r.get("id")).await? {
            i.lines.clear();
            i.credit_notes.clear();
            out.push(i);
        }
    }
    Ok(out)
}

fn money(minor: i64) -> String {
    crate::billing::money(minor)
}

fn day(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M").to_string()
}

fn number(i: &Invoice) -> String {
    i.number
        .map(|n| format!("{n:06}"))
        .unwrap_or_else(|| "draft".into())
}

fn table(list: &[Invoice]) -> String {
    let mut out = format!(
        "{:<8} {:<36} {:<36} {:<9} {:<16} {:>12} {:>12} {:<4}\n",
        "number", "invoice", "tenant", "status", "period start", "total", "due", ""
    );
    for i in list {
        let _ = writeln!(
            out,
            "{:<8} {:<36} {:<36} {:<9} {:<16} {:>12} {:>12} {:<4}",
            number(i),
            i.id,
            i.tenant_id,
            i.status.as_str(),
            day(i.period_start),
            money(i.total_minor),
            money(i.amount_due_minor),
            i.currency
        );
    }
    out
}

fn show(i: &Invoice) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "invoice   {} ({})", number(i), i.id);
    let _ = writeln!(out, "tenant    {}", i.tenant_id);
    let _ = writeln!(out, "status    {}", i.status.as_str());
    let _ = writeln!(
        out,
        "period    {} to {} UTC",
        day(i.period_start),
        day(i.period_end)
    );
    for l in &i.lines {
        let _ = writeln!(
            out,
            "  {:<60} {:>14} {}",
            l.description,
            money(l.amount_minor),
            i.currency
        );
    }
    let _ = writeln!(
        out,
        "subtotal  {} {}\ntax       {} {} ({}%)\ntotal     {} {}",
        money(i.subtotal_minor),
        i.currency,
        money(i.tax_minor),
        i.currency,
        money(i64::from(i.tax_rate_bp)),
        money(i.total_minor),
        i.currency
    );
    for c in &i.credit_notes {
        let _ = writeln!(
            out,
            "credit    {:06} {} {} on {}: {}",
            c.number,
            money(c.amount_minor),
            c.currency,
            day(c.created_at),
            c.reason
        );
    }
    if let (Some(at), Some(r)) = (i.paid_at, &i.payment_reference) {
        let _ = writeln!(out, "paid      {} UTC, reference {r}", day(at));
    }
    if let (Some(at), Some(r)) = (i.voided_at, &i.void_reason) {
        let _ = writeln!(out, "void      {} UTC: {r}", day(at));
    }
    let _ = writeln!(
        out,
        "due       {} {}",
        money(i.amount_due_minor),
        i.currency
    );
    out
}
