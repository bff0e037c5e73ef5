//! Stripe's API, for real (`STRIPE_SECRET_KEY`): a customer per tenant, Checkout and
//! customer-portal sessions, and the tenants' usage reported to Stripe's meters.
//!
//! Every call carries an `Idempotency-Key` and is retried with exponential backoff on
//! 429, 5xx and network errors (the same key each time, so a retried call takes effect
//! once); other 4xx are Stripe refusing the request and are not retried. Nothing on
//! ingest's path or the API's waits for Stripe except the two routes that exist to
//! reach it (checkout and portal), which answer 503 while Stripe does not.
//!
//! **Usage to meters** ([`report_usage`]): each completed hour of each tenant's usage
//! that has a Stripe customer goes out as one meter event per meter, pre-aggregated,
//! once the hour is over. The event's `identifier` and the call's idempotency key are
//! `{tenant}:{meter}:{hour}:{total}`: a retried hour sends the same key (Stripe takes
//! it once), and usage arriving late for an hour already reported goes out as the
//! difference under a key of its own. What was reported is recorded
//! (`stripe_meter_reports`) after Stripe accepted it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// Stripe's API.
pub const STRIPE_API: &str = "https://api.stripe.com";

#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    /// Stripe refused the request (a 4xx other than 429): not retried.
    #[error("Stripe refused {path}: {status} {message}")]
    Refused {
        path: String,
        status: u16,
        message: String,
    },
    /// Stripe did not answer, or answered 429 or 5xx, every time.
    #[error("Stripe is unavailable for {path} after {attempts} attempts: {last}")]
    Unavailable {
        path: String,
        attempts: u32,
        last: String,
    },
    #[error("billing database: {0}")]
    Database(#[from] sqlx::Error),
}

/// A client of Stripe's API (or of stripe-mock, which speaks the same).
#[derive(Debug, Clone)]
pub struct Stripe {
    http: reqwest::Client,
    base: String,
    key: String,
    attempts: u32,
    backoff: Duration,
}

impl Stripe {
    /// A client of `base` (e.g. [`STRIPE_API`]) with the secret `key`.
    pub fn new(base: &str, key: &str) -> Stripe {
        Stripe {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .connect_timeout(Duration::from_secs(5))
                .build()
                .expect("a TLS client"),
            base: base.trim_end_matches('/').to_owned(),
            key: key.to_owned(),
            attempts: 4,
            backoff: Duration::from_millis(250),
        }
    }

    /// Retries: `attempts` in all, waiting `backoff`, then twice as long each time.
    pub fn with_retries(mut self, attempts: u32, backoff: Duration) -> Stripe {
        self.attempts = attempts.max(1);
        self.backoff = backoff;
        self
    }

    /// `POST {path}` with a form body and an idempotency key; the answer's JSON.
    pub async fn post(
        &self,
        path: &str,
        form: &[(&str, String)],
        idempotency_key: &str,
    ) -> Result<Value, StripeError> {
        let mut wait = self.backoff;
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            let sent = self
                .http
                .post(format!("{}{path}", self.base))
                .basic_auth(&self.key, Some(""))
                .header("Idempotency-Key", idempotency_key)
                .form(form)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    return r.json().await.map_err(|e| StripeError::Unavailable {
                        path: path.to_owned(),
                        attempts: attempt,
                        last: format!("an answer that is not JSON: {e}"),
                    });
                }
                Ok(r) if r.status().as_u16() == 429 || r.status().is_server_error() => {
                    last = format!("{}", r.status());
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    return Err(StripeError::Refused {
                        path: path.to_owned(),
                        status,
                        message: body["error"]["message"]
                            .as_str()
                            .unwrap_or("no message")
                            .to_owned(),
                    });
                }
                Err(e) => last = e.to_string(),
            }
            if attempt < self.attempts {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
        Err(StripeError::Unavailable {
            path: path.to_owned(),
            attempts: self.attempts,
            last,
        })
    }

    /// The tenant's Stripe customer, created once (its key is the tenant's).
    pub async fn customer(
        &self,
        pool: &PgPool,
        tenant: Uuid,
        name: &str,
    ) -> Result<String, StripeError> {
        let known: Option<String> =
            sqlx::query_scalar("SELECT customer_id FROM stripe_customers WHERE tenant_id = $1")
                .bind(tenant)
                .fetch_optional(pool)
                .await?;
        if let Some(id) = known {
            return Ok(id);
        }
        let created = self
            .post(
                "/v1/customers",
                &[
                    ("name", name.to_owned()),
                    ("metadata[tenant_id]", tenant.to_string()),
                ],
                &format!("customer-{tenant}"),
            )
            .await?;
        let id = created["id"].as_str().unwrap_or_default().to_owned();
        sqlx::query(
            "INSERT INTO stripe_customers (tenant_id, customer_id) VALUES ($1, $2) ON CONFLICT (tenant_id) DO NOTHING",
        )
        .bind(tenant)
        .bind(&id)
        .execute(pool)
        .await?;
        // A concurrent call may have stored its own first: that one is the customer.
        Ok(
            sqlx::query_scalar("SELECT customer_id FROM stripe_customers WHERE tenant_id = $1")
                .bind(tenant)
                .fetch_one(pool)
                .await?,
        )
    }
}

/// The key of an hour's report: the tenant, meter, hour and the total reported.
pub fn report_key(tenant: Uuid, meter: &str, hour: DateTime<Utc>, total: i64) -> String {
    format!("{tenant}:{meter}:{}:{total}", hour.timestamp())
}

/// What one reporting run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reported {
    pub events: u64,
    pub failed: u64,
}

/// Reports every completed hour (before `now`'s hour) of usage of the tenants with a
/// Stripe customer that is not reported yet, at most `limit` hours a run.
pub async fn report_usage(
    stripe: &Stripe,
    pool: &PgPool,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Reported, StripeError> {
    let due: Vec<(Uuid, String, String, DateTime<Utc>, i64, i64)> = sqlx::query_as(
        "SELECT u.tenant_id, c.customer_id, u.meter, u.hour, u.quantity, coalesce(r.reported, 0) \
         FROM (SELECT tenant_id, meter, hour, sum(quantity)::bigint AS quantity FROM usage_hourly \
               WHERE hour < date_trunc('hour', $1::timestamptz, 'UTC') GROUP BY tenant_id, meter, hour) u \
         JOIN stripe_customers c ON c.tenant_id = u.tenant_id \
         LEFT JOIN stripe_meter_reports r ON (r.tenant_id, r.meter, r.hour) = (u.tenant_id, u.meter, u.hour) \
         WHERE u.quantity > coalesce(r.reported, 0) \
         ORDER BY u.hour, u.tenant_id, u.meter LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let mut done = Reported::default();
    for (tenant, customer, meter, hour, total, reported) in due {
        let key = report_key(tenant, &meter, hour, total);
        let sent = stripe
            .post(
                "/v1/billing/meter_events",
                &[
                    ("event_name", meter.clone()),
                    ("payload[stripe_customer_id]", customer),
                    ("payload[value]", (total - reported).to_string()),
                    ("timestamp", hour.timestamp().to_string()),
                    ("identifier", key.clone()),
                ],
                &key,
            )
            .await;
        match sent {
            Ok(_) => {
                sqlx::query(
                    "INSERT INTO stripe_meter_reports (tenant_id, meter, hour, reported, identifier) \
                     VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (tenant_id, meter, hour) DO UPDATE SET reported = EXCLUDED.reported, \
                         identifier = EXCLUDED.identifier, reported_at = now() \
                     WHERE stripe_meter_reports.reported < EXCLUDED.reported",
                )
                .bind(tenant)
                .bind(&meter)
                .bind(hour)
                .bind(total)
                .bind(&key)
                .execute(pool)
                .await?;
                done.events += 1;
            }
            Err(e @ (StripeError::Refused { .. } | StripeError::Unavailable { .. })) => {
                // Tried again at the next run, with the same key.
                tracing::warn!(%tenant, %meter, %hour, error = %e, "reporting usage to Stripe failed");
                done.failed += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
