//! Invoices: the gateway invoices ended billing periods in the background
//! ([`run_invoicing`], `clisonix-billing`), and admins read their tenant's invoices as
//! JSON, CSV or a printable HTML page. Every query is scoped by the caller's tenant.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use clisonix_billing::store::{self, Invoice};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::results::{invalid, parse_time, query_error};
use crate::startup::AppState;
use crate::tenant::require_admin;

/// Invoices ended periods every `invoice_interval` until `stop`.
pub async fn run_invoicing(state: AppState, stop: CancellationToken) {
    let invoicing = clisonix_billing::Invoicing::new(state.pool.clone());
    let mut every = tokio::time::interval(state.config.invoice_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match invoicing.run(Utc::now()).await {
            Ok(done) => {
                state
                    .metrics
                    .invoicing_runs
                    .with_label_values(&["ok"])
                    .inc();
                if done.drafted + done.finalized > 0 {
                    tracing::info!(
                        drafted = done.drafted,
                        finalized = done.finalized,
                        "invoiced ended billing periods"
                    );
                }
            }
            Err(error) => {
                state
                    .metrics
                    .invoicing_runs
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(%error, "invoicing failed; trying again at the next run");
            }
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// At most this many (1 to 100, default 24).
    pub limit: Option<i64>,
    /// Only invoices of periods that started before this (RFC 3339): the previous
    /// page's last `period_start`.
    pub before: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InvoiceList {
    /// Newest period first, without their lines.
    pub invoices: Vec<Invoice>,
    /// The `before` of the next page, when there may be one.
    pub next_before: Option<DateTime<Utc>>,
}

#[utoipa::path(get, path = "/v1/billing/invoices", tag = "billing", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, body = InvoiceList), (status = 401, description = "Missing or invalid token", body = crate::openapi::ErrorBody),
        (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody),
        (status = 422, description = "Bad query", body = crate::openapi::ErrorBody)))]
/// `GET /v1/billing/invoices` (admins): the tenant's invoices, newest first. A period
/// gets a draft when it ends, recomputed while late usage may still arrive, and is
/// finalized (numbered, immutable) when it closes.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<InvoiceList>, ApiError> {
    require_admin(&caller)?;
    let Query(q) = query.map_err(query_error)?;
    let limit = q.limit.unwrap_or(24);
    if !(1..=100).contains(&limit) {
        return Err(invalid("limit", "limit must be 1 to 100"));
    }
    let before = parse_time("before", q.before.as_deref())?;
    let invoices = store::invoices(&state.pool, caller.0.tid, limit, before).await?;
    let next_before = (invoices.len() as i64 == limit)
        .then(|| invoices.last().map(|i| i.period_start))
        .flatten();
    Ok(Json(InvoiceList {
        invoices,
        next_before,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct InvoiceQuery {
    /// `json` (default), `csv` (one row per line) or `html` (a printable page).
    pub format: Option<String>,
}

#[utoipa::path(get, path = "/v1/billing/invoices/{id}", tag = "billing", security(("bearer" = [])), params(("id" = Uuid, Path), InvoiceQuery),
    responses((status = 200, body = Invoice, description = "The invoice with its lines (or CSV, or HTML)"),
        (status = 401, description = "Missing or invalid token", body = crate::openapi::ErrorBody),
        (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such invoice in the tenant", body = crate::openapi::ErrorBody),
        (status = 422, description = "Bad id or format", body = crate::openapi::ErrorBody)))]
/// `GET /v1/billing/invoices/{id}` (admins): one invoice with its lines.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<InvoiceQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let Query(q) = query.map_err(query_error)?;
    let id = Uuid::parse_str(&id).map_err(|_| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_id",
            "the invoice id is not a UUID",
        )
        .field("id")
    })?;
    let format = q.format.as_deref().unwrap_or("json");
    if !matches!(format, "json" | "csv" | "html") {
        return Err(invalid("format", "format must be json, csv or html"));
    }
    let invoice = store::invoice(&state.pool, caller.0.tid, id)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invoice_not_found",
                "no such invoice",
            )
        })?;
    Ok(match format {
        "csv" => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{}.csv\"", file_name(&invoice)),
                ),
            ],
            csv(&invoice),
        )
            .into_response(),
        "html" => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html(&invoice),
        )
            .into_response(),
        _ => Json(invoice).into_response(),
    })
}

fn file_name(i: &Invoice) -> String {
    match i.number {
        Some(n) => format!("invoice-{n:06}"),
        None => format!("invoice-draft-{}", i.id),
    }
}

/// An amount in minor units as decimal (two decimals: every currency the catalog
/// uses has a minor unit of 1/100).
pub(crate) fn money(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let m = minor.unsigned_abs();
    format!("{sign}{}.{:02}", m / 100, m % 100)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// One row per line, then the totals, amounts in minor units.
fn csv(i: &Invoice) -> String {
    let mut out = String::from(
        "invoice,number,status,currency,kind,plan_id,plan_version,meter,description,from,to,quantity,included,billable,unit_price_minor,price_per,amount_minor\n",
    );
    let number = i.number.map(|n| n.to_string()).unwrap_or_default();
    let head = format!("{},{number},{},{}", i.id, i.status.as_str(), i.currency);
    for l in &i.lines {
        out.push_str(&format!(
            "{head},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            l.kind.as_str(),
            csv_field(&l.plan_id),
            l.plan_version,
            l.meter.as_deref().unwrap_or(""),
            csv_field(&l.description),
            l.from.to_rfc3339(),
            l.to.to_rfc3339(),
            l.quantity,
            l.included,
            l.billable,
            l.unit_price_minor,
            l.price_per,
            l.amount_minor
        ));
    }
    for (what, amount) in [
        ("subtotal", i.subtotal_minor),
        ("tax", i.tax_minor),
        ("total", i.total_minor),
    ] {
        out.push_str(&format!("{head},{what},,,,,,,,,,,,{amount}\n"));
    }
    for c in &i.credit_notes {
        out.push_str(&format!(
            "{head},credit_note,,,,{},{},,,,,,,-{}\n",
            csv_field(&format!("Credit note {:06}: {}", c.number, c.reason)),
            c.created_at.to_rfc3339(),
            c.amount_minor
        ));
    }
    out.push_str(&format!(
        "{head},amount_due,,,,,,,,,,,,{}\n",
        i.amount_due_minor
    ));
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained page (no scripts, no external assets) that prints on one sheet.
fn html(i: &Invoice) -> String {
    let title = match i.number {
        Some(n) => format!("Invoice {n:06}"),
        None => "Draft invoice".to_owned(),
    };
    let day = |t: DateTime<Utc>| t.format("%Y-%m-%d %H:%M UTC").to_string();
    let mut rows = String::new();
    for l in &i.lines {
        rows.push_str(&format!(
            "<tr><td>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{} / {}</td><td class=n>{}</td></tr>\n",
            escape(&l.description),
            l.quantity,
            l.included,
            l.billable,
            money(l.unit_price_minor),
            l.price_per,
            money(l.amount_minor)
        ));
    }
    let cur = escape(&i.currency);
    let mut after = String::new();
    for c in &i.credit_notes {
        after.push_str(&format!(
            "<tr><td colspan=5 class=n>Credit note {:06} ({}): {}</td><td class=n>-{} {cur}</td></tr>",
            c.number,
            day(c.created_at),
            escape(&c.reason),
            money(c.amount_minor)
        ));
    }
    after.push_str(&format!(
        "<tr><td colspan=5 class=n>Amount due</td><td class=n>{} {cur}</td></tr>",
        money(i.amount_due_minor)
    ));
    let mut settled = String::new();
    if let Some(at) = i.paid_at {
        settled.push_str(&format!("<br>Paid: {}", day(at)));
        if let Some(r) = &i.payment_reference {
            settled.push_str(&format!(", reference {}", escape(r)));
        }
    }
    if let Some(at) = i.voided_at {
        settled.push_str(&format!(
            "<br>Void: {}: {}",
            day(at),
            escape(i.void_reason.as_deref().unwrap_or(""))
        ));
    }
    format!(
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>{title}</title>\n\
<style>body{{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#111}}table{{border-collapse:collapse;width:100%}}\
td,th{{border-bottom:1px solid #ccc;padding:.3em .5em;text-align:left}}.n{{text-align:right;white-space:nowrap}}\
tfoot td{{font-weight:bold;border:0}}@media print{{body{{margin:0}}}}</style></head><body>\n\
<h1>{title}</h1>\n<p>Status: {status}<br>Tenant: {tenant}<br>Invoice id: {id}<br>Period: {from} to {to}<br>Currency: {cur}{settled}</p>\n\
<table><thead><tr><th>Line</th><th class=n>Quantity</th><th class=n>Included</th><th class=n>Billable</th><th class=n>Unit price</th><th class=n>Amount</th></tr></thead>\n<tbody>\n{rows}</tbody>\n\
<tfoot><tr><td colspan=5 class=n>Subtotal</td><td class=n>{subtotal} {cur}</td></tr>\
<tr><td colspan=5 class=n>Tax ({rate}%)</td><td class=n>{tax} {cur}</td></tr>\
<tr><td colspan=5 class=n>Total</td><td class=n>{total} {cur}</td></tr>{after}</tfoot></table>\n</body></html>\n",
        status = i.status.as_str(),
        tenant = i.tenant_id,
        id = i.id,
        from = day(i.period_start),
        to = day(i.period_end),
        subtotal = money(i.subtotal_minor),
        rate = money(i64::from(i.tax_rate_bp)),
        tax = money(i.tax_minor),
        total = money(i.total_minor),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_and_csv_fields_are_written_exactly() {
        assert_eq!(money(0), "0.00");
        assert_eq!(money(7), "0.07");
        assert_eq!(money(490_000), "4900.00");
        assert_eq!(money(-1_205), "-12.05");
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a, \"b\""), "\"a, \"\"b\"\"\"");
        assert_eq!(escape("<b>&\"</b>"), "&lt;b&gt;&amp;&quot;&lt;/b&gt;");
    }
}
