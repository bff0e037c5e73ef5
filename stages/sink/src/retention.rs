//! Results are kept as long as the tenant's plan says (`plans.retention_days`),
//! counted from the session's last frame. [`Results::expire`] deletes the sessions past
//! it together with their feature windows and audio chunks, a batch of sessions per
//! transaction, so the results API never shows part of an expired session. Usage
//! (`usage_sessions`, `usage_hourly`) is billing data and is not touched.
//!
//! Their audio objects are left to the object sweep ([`crate::objects`]): each deleted
//! row's object gets a check that is due at once, so the sweep that follows deletes it.
//!
//! The sink runs it every few minutes; with several sink instances one sweeps at a
//! time (a transaction-scoped advisory lock, [`LOCK`]), the others skip that round.
//! A plan's retention is read at each sweep: a tenant moving to a plan with a shorter
//! retention loses its older results at the next sweep, one moving to a longer one
//! keeps what is not deleted yet. A replay of the result topics writes expired
//! sessions again; the next sweep deletes them again.

use sqlx::types::chrono::{DateTime, Utc};

use crate::{Results, WriteError};

/// The advisory lock of a sweep (any constant the other locks do not use).
pub const LOCK: i64 = 0x636c_6973_7265_7465; // "clisrete"

/// What one sweep deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    pub sessions: u64,
    pub features: u64,
    pub audio_chunks: u64,
}

impl Results {
    /// Deletes every session whose last frame is older than its tenant's retention at
    /// `now`, `batch` sessions per transaction. `None`: another instance is sweeping.
    pub async fn expire(
        &self,
        now: DateTime<Utc>,
        batch: i64,
    ) -> Result<Option<Expired>, WriteError> {
        let mut total = Expired::default();
        loop {
            let mut tx = self.pool.begin().await?;
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                .bind(LOCK)
                .fetch_one(&mut *tx)
                .await?;
            if !locked {
                return Ok(None);
            }
            let (sessions, features, audio_chunks): (i64, i64, i64) = sqlx::query_as(
                "WITH doomed AS ( \
                     SELECT r.session_id FROM sessions r \
                     JOIN subscriptions s ON s.tenant_id = r.tenant_id \
                     JOIN plans p ON p.plan_id = s.plan_id AND p.version = s.plan_version \
                     WHERE r.last_frame_at < $1 - make_interval(days => p.retention_days) \
                     ORDER BY r.last_frame_at LIMIT $2 FOR UPDATE OF r), \
                 f AS (DELETE FROM features WHERE session_id IN (SELECT session_id FROM doomed) RETURNING 1), \
                 a AS (DELETE FROM audio_chunks WHERE session_id IN (SELECT session_id FROM doomed) RETURNING object_key), \
                 o AS (INSERT INTO audio_object_checks (object_key, created_at) \
                       SELECT object_key, '-infinity' FROM a WHERE object_key IS NOT NULL \
                       ON CONFLICT (object_key) DO UPDATE SET created_at = '-infinity'), \
                 s AS (DELETE FROM sessions WHERE session_id IN (SELECT session_id FROM doomed) RETURNING 1) \
                 SELECT (SELECT count(*) FROM s), (SELECT count(*) FROM f), (SELECT count(*) FROM a)",
            )
            .bind(now)
            .bind(batch)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            total.sessions += sessions as u64;
            total.features += features as u64;
            total.audio_chunks += audio_chunks as u64;
            if sessions < batch {
                return Ok(Some(total));
            }
        }
    }
}
