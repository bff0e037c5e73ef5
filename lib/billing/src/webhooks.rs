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
//! then it has failed. Each attempt has a timeout and attempts run side by side, each
//! recorded as soon as it ends: the gateway keeps up to a number of attempts in flight,
//! at most a few to any one endpoint, and takes more as each ends ([`Deliverer::take`],
//! [`Deliverer::attempt`]), so an endpoint that hangs or fails holds its few slots for
//! at most the timeout and costs the others nothing.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::signatures::sign_standard;

/// The event types a tenant can subscribe to.
pub const EVENT_TYPES: [&str; 7] = [
    "session.ended",
    "usage.threshold_reached",
    "invoice.finalized",
    "invoice.paid",
    "invoice.payment_failed",
    "invoice.voided",
    "credit_note.created",
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

/// What became of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Failed this time; due again after the backoff.
    Retrying,
    /// Failed for good: a day of attempts, or the endpoint was deleted.
    Failed,
}

impl Outcome {
    /// The delivery's status after it (and the metric's label).
    pub fn status(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Retrying => "pending",
            Outcome::Failed => "failed",
        }
    }
}

impl Due {
    /// The endpoint it goes to.
    pub fn endpoint(&self) -> Uuid {
        self.endpoint_id
    }
}

impl Delivered {
    pub fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Delivered => self.delivered += 1,
            Outcome::Retrying => self.retrying += 1,
            Outcome::Failed => self.failed += 1,
        }
    }
}

/// A due delivery taken on a lease, with what is needed to send it.
#[derive(Debug, sqlx::FromRow)]
pub struct Due {
    endpoint_id: Uuid,
    event_id: String,
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

    /// Sends what is due now, side by side, and waits for all of it; answers what
    /// became of it.
    pub async fn run_once(&self) -> Result<Delivered, sqlx::Error> {
        let due = self.take(self.batch, self.batch as i32, &[]).await?;
        let results = futures::future::join_all(due.into_iter().map(|d| self.attempt(d))).await;
        let mut done = Delivered::default();
        for outcome in results {
            done.count(outcome?);
        }
        Ok(done)
    }

    /// Takes up to `limit` due deliveries on a lease: no one else attempts them until
    /// the lease (twice the attempt's timeout, and some) has run out. At most
    /// `per_endpoint` of one endpoint's, less the attempts `in_flight` to it already
    /// (endpoint, count): an endpoint that hangs cannot take every slot. Each endpoint's
    /// oldest due first, then the oldest of all.
    pub async fn take(
        &self,
        limit: i64,
        per_endpoint: i32,
        in_flight: &[(Uuid, i32)],
    ) -> Result<Vec<Due>, sqlx::Error> {
        let lease_ms = (self.timeout.as_millis() as i64) * 2 + 5_000;
        let (busy, counts): (Vec<Uuid>, Vec<i32>) = in_flight.iter().copied().unzip();
        sqlx::query_as(
            "WITH busy AS (SELECT * FROM unnest($3::uuid[], $4::int[]) AS b(endpoint_id, n)), \
             due AS ( \
                 SELECT x.event_id, x.endpoint_id FROM webhook_endpoints e \
                 LEFT JOIN busy b ON b.endpoint_id = e.id \
                 CROSS JOIN LATERAL ( \
                     SELECT d.event_id, d.endpoint_id, d.next_attempt_at FROM webhook_deliveries d \
                     WHERE d.endpoint_id = e.id AND d.status = 'pending' AND d.next_attempt_at <= now() \
                     ORDER BY d.next_attempt_at LIMIT greatest($5 - coalesce(b.n, 0), 0) \
                     FOR UPDATE SKIP LOCKED) x \
                 ORDER BY x.next_attempt_at LIMIT $1), \
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
        .bind(limit)
        .bind(lease_ms)
        .bind(busy)
        .bind(counts)
        .bind(per_endpoint)
        .fetch_all(&self.pool)
        .await
    }

    /// Sends one delivery taken by [`Deliverer::take`] and records the attempt.
    pub async fn attempt(&self, d: Due) -> Result<Outcome, sqlx::Error> {
        let started = Instant::now();
        let answer = if d.deleted {
            Answer::Error("the endpoint was deleted".into())
        } else {
            self.send(&d).await
        };
        let took = started.elapsed();
        let (status, error) = match &answer {
            Answer::Status(s) => (Some(i32::from(*s)), None),
            Answer::Error(e) => (None, Some(e.clone())),
        };
        let ok = matches!(answer, Answer::Status(s) if (200..300).contains(&s));
        let age = (Utc::now() - d.created_at).to_std().unwrap_or_default();
        let next = self.backoff(d.attempts);
        let outcome = if ok {
            Outcome::Delivered
        } else if d.deleted || age + next > self.give_up_after {
            Outcome::Failed
        } else {
            Outcome::Retrying
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
        .bind(outcome.status())
        .bind(status)
        .bind(&error)
        .bind(next.as_millis() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(outcome)
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
