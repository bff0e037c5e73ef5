//! Webhooks out, to tenants' own systems, from the outbox in Postgres
//! (`gateway/migrations/20261207000005_webhooks.sql`).
//!
//! Events are written by `clisonix_webhook_emit` in the transaction of their cause,
//! one delivery per subscribed endpoint. [`Deliverer::run_once`] takes the deliveries
//! that are due (a lease: another instance, or this one after a crash, takes them
//! again only once the lease has run out), POSTs each with the Standard Webhooks
//! headers — `webhook-id` (the event's id, the same on every attempt),
//! `webhook-timestamp` (now, on every attempt) and `webhook-signature` — and records
//! the attempt. A 2xx delivers it; otherwise it is due again after a backoff that
//! doubles from `first_retry` (at most an hour apart) until a day after the event,
//! then it has failed. Each attempt has a timeout and attempts run side by side, so an
//! endpoint that hangs or fails costs the others nothing.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::signatures::sign_standard;

/// The event types a tenant can subscribe to.
pub const EVENT_TYPES: [&str; 5] = [
    "session.ended",
    "usage.threshold_reached",
    "invoice.finalized",
    "invoice.paid",
    "invoice.payment_failed",
];

/// Delivers the outbox's due deliveries.
#[derive(Debug, Clone)]
pub struct Deliverer {
    pool: PgPool,
    http: reqwest::Client,
    /// The first retry's delay; each later one doubles, up to an hour.
    pub first_retry: Duration,
    /// How long after its event a delivery is tried.
    pub give_up_after: Duration,
    /// How long one attempt may take before it is abandoned (and tried again).
    pub timeout: Duration,
    /// Deliveries taken per run.
    pub batch: i64,
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivered {
    pub delivered: u64,
    pub retrying: u64,
    pub failed: u64,
}

/// A due delivery with what is needed to send it.
#[derive(Debug, sqlx::FromRow)]
struct Due {
    event_id: String,
    endpoint_id: Uuid,
    attempts: i32,
    url: String,
    secret: String,
    deleted: bool,
    body: String,
    created_at: DateTime<Utc>,
}

enum Answer {
    Status(u16),
    Error(String),
}

impl Deliverer {
    pub fn new(pool: PgPool) -> Deliverer {
        Deliverer {
            pool,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("a TLS client"),
            first_retry: Duration::from_secs(5),
            give_up_after: Duration::from_secs(24 * 3600),
            timeout: Duration::from_secs(10),
            batch: 50,
        }
    }

    /// The delay before attempt `attempts + 1`.
    pub fn backoff(&self, attempts: i32) -> Duration {
        let doublings = attempts.clamp(1, 20) as u32 - 1;
        (self.first_retry * 2u32.pow(doublings)).min(Duration::from_secs(3600))
    }

    /// Sends what is due now; answers what became of it.
    pub async fn run_once(&self) -> Result<Delivered, sqlx::Error> {
        // The lease covers the attempt's timeout with room to record it.
        let lease_ms = (self.timeout.as_millis() as i64) * 2 + 5_000;
        let due: Vec<Due> = sqlx::query_as(
            "WITH due AS ( \
                 SELECT event_id, endpoint_id FROM webhook_deliveries \
                 WHERE status = 'pending' AND next_attempt_at <= now() \
                 ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED), \
             taken AS ( \
                 UPDATE webhook_deliveries d SET attempts = d.attempts + 1, \
                        next_attempt_at = now() + $2 * interval '1 millisecond' \
                 FROM due WHERE (d.event_id, d.endpoint_id) = (due.event_id, due.endpoint_id) \
                 RETURNING d.event_id, d.endpoint_id, d.attempts) \
             SELECT t.event_id, t.endpoint_id, t.attempts, e.url, e.secret, \
                    e.deleted_at IS NOT NULL AS deleted, ev.payload::text AS body, ev.created_at \
             FROM taken t JOIN webhook_endpoints e ON e.id = t.endpoint_id \
                          JOIN webhook_events ev ON ev.id = t.event_id",
        )
        .bind(self.batch)
        .bind(lease_ms)
        .fetch_all(&self.pool)
        .await?;
        let sends = due.into_iter().map(|d| async move {
            let started = Instant::now();
            let answer = if d.deleted {
                Answer::Error("the endpoint was deleted".into())
            } else {
                self.send(&d).await
            };
            (d, answer, started.elapsed())
        });
        let results = futures::future::join_all(sends).await;
        let mut done = Delivered::default();
        for (d, answer, took) in results {
            let (status, error) = match &answer {
                Answer::Status(s) => (Some(i32::from(*s)), None),
                Answer::Error(e) => (None, Some(e.clone())),
            };
            let ok = matches!(answer, Answer::Status(s) if (200..300).contains(&s));
            let age = (Utc::now() - d.created_at).to_std().unwrap_or_default();
            let next = self.backoff(d.attempts);
            let outcome = if ok {
                "delivered"
            } else if d.deleted || age + next > self.give_up_after {
                "failed"
            } else {
                "pending"
            };
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "INSERT INTO webhook_attempts (event_id, endpoint_id, status, error, duration_ms) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&d.event_id)
            .bind(d.endpoint_id)
            .bind(status)
            .bind(&error)
            .bind(took.as_millis().min(i32::MAX as u128) as i32)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE webhook_deliveries SET status = $3, last_status = $4, last_error = $5, \
                     delivered_at = CASE WHEN $3 = 'delivered' THEN now() END, \
                     next_attempt_at = now() + $6 * interval '1 millisecond' \
                 WHERE event_id = $1 AND endpoint_id = $2",
            )
            .bind(&d.event_id)
            .bind(d.endpoint_id)
            .bind(outcome)
            .bind(status)
            .bind(&error)
            .bind(next.as_millis() as i64)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            match outcome {
                "delivered" => done.delivered += 1,
                "failed" => done.failed += 1,
                _ => done.retrying += 1,
            }
        }
        Ok(done)
    }

    async fn send(&self, d: &Due) -> Answer {
        let timestamp = Utc::now().timestamp();
        let signature = sign_standard(&d.secret, &d.event_id, timestamp, d.body.as_bytes());
        let sent = self
            .http
            .post(&d.url)
            .timeout(self.timeout)
            .header("content-type", "application/json")
            .header("user-agent", "Clisonix-Webhooks/1")
            .header("webhook-id", &d.event_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(d.body.clone())
            .send()
            .await;
        match sent {
            Ok(r) => Answer::Status(r.status().as_u16()),
            Err(e) if e.is_timeout() => {
                Answer::Error(format!("no answer within {:?}", self.timeout))
            }
            Err(e) => Answer::Error(e.to_string()),
        }
    }
}
