//! Which ingest instance serves a session, and the session's state while it does.
//!
//! A session is served by one instance at a time: the instance that **claims** it
//! writes its id and a lease deadline into the session's `ingest_sessions` row. While
//! the lease runs, that instance alone publishes the session's frames and keeps the
//! session's state (last sequence number, end) in memory, so a group of frames costs
//! no database round trip. Every `tick` a background task writes what changed (one
//! statement for all sessions), renews leases that are a fifth used, and lets go of
//! sessions idle for `idle` or wanted by another instance.
//!
//! - **Another instance** that gets frames of a claimed session asks for it (sets
//!   `handoff_at`) and retries its claim for up to `handoff_wait`; the owner lets go at
//!   its next tick once its current group is done. If the owner does not let go in
//!   time the frames are refused `session_busy` (503, retryable).
//! - **A crashed instance** keeps its sessions until their leases run out; then any
//!   instance claims them. The state written last is at most one `tick` old (and
//!   commits do not wait for the disk): frames confirmed after it are published again
//!   if resent, at least once as before, never lost.
//! - **The database down**: sessions already claimed keep being served until their
//!   lease has less than the `margin` left; then their frames are refused
//!   `unavailable` (503) until the database answers.
//! - A group starts only with more than the `margin` (the longest a group can be with
//!   the publisher) left on its lease, so a lease does not run out while one of its
//!   groups is with the broker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clisonix_schemas::{DeviceId, SessionId, TenantId};
use clisonix_tenancy::quota::{QuotaBook, SessionLimits};
use prometheus::{IntCounter, IntGauge};
use sqlx::PgPool;
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::ingest::{Head, SessionRow};
use crate::metrics::{Metrics, Transport};

/// How sessions are held; see the module documentation.
#[derive(Debug, Clone)]
pub struct Leases {
    /// How long a claim (or renewal) holds a session.
    pub lease: Duration,
    /// How often changes are written, leases renewed and sessions let go.
    pub tick: Duration,
    /// A session without frames for this long is let go.
    pub idle: Duration,
    /// How long frames of a session claimed elsewhere wait for it to be handed over.
    pub handoff_wait: Duration,
    /// A group starts only with more than this left on its lease: the longest a group
    /// can be with the publisher (`Config::longest_publish`).
    pub margin: Duration,
}

/// Why a session cannot be served here now.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("session {0} belongs to another tenant")]
    Forbidden(SessionId),
    #[error(
        "session {0} is served by another ingest instance, which did not hand it over in time"
    )]
    Busy(SessionId),
    #[error("the tenant has {active} sessions open, as many as its plan allows ({limit}): end one first")]
    SessionLimit { limit: i32, active: i64 },
    #[error("the tenant streams from {devices} devices, as many as its plan allows ({limit})")]
    DeviceLimit { limit: i32, devices: i64 },
    #[error("the database: {0}")]
    Database(#[from] sqlx::Error),
}

/// The sessions this instance serves.
#[derive(Debug)]
pub struct Sessions {
    pool: PgPool,
    /// The tenants' plans: how many sessions each may have open.
    quotas: Arc<QuotaBook>,
    /// This instance's id, written as the owner of the sessions it claims.
    instance: Uuid,
    leases: Leases,
    held: Mutex<HashMap<SessionId, Arc<Entry>>>,
    owned: IntGauge,
    claims: IntCounter,
    write_failures: IntCounter,
}

#[derive(Debug)]
struct Entry {
    /// One group of the session at a time.
    serial: Arc<tokio::sync::Mutex<()>>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The session as this instance serves it; `None` until claimed, and once the
    /// lease is lost or let go.
    row: Option<SessionRow>,
    /// Until when this instance may start groups (the database's deadline is later).
    lease_until: Instant,
    /// `last_seq` as written to the row.
    written_seq: i64,
    /// Frames confirmed and not yet counted in the row.
    unwritten: i64,
    /// The end confirmed and not yet written.
    end_unwritten: bool,
    last_used: Instant,
    /// Another instance asked for the session.
    wanted: bool,
    /// Let go and out of the map: a group that waited on it looks again.
    gone: bool,
}

impl State {
    fn dirty(&self) -> bool {
        self.unwritten > 0
            || self.end_unwritten
            || self
                .row
                .as_ref()
                .is_some_and(|r| r.last_seq != self.written_seq)
    }
}

/// A session held for one group: its state as of now, and the right to publish.
#[derive(Debug)]
pub struct Held {
    entry: Arc<Entry>,
    _serial: OwnedMutexGuard<()>,
    pub row: SessionRow,
}

impl Held {
    /// Records frames the broker confirmed: up to `last`, `count` of them, and
    /// whether one ended the session.
    pub fn confirmed(&self, last: u64, count: usize, ended: bool) {
        let mut s = self.entry.state.lock().expect("not poisoned");
        if let Some(row) = &mut s.row {
            row.last_seq = row.last_seq.max(last as i64);
            row.ended |= ended;
        }
        s.unwritten += count as i64;
        s.end_unwritten |= ended;
        s.last_used = Instant::now();
    }
}

const COLUMNS: &str = "tenant_id, device_id, sample_rate_hz, unit, channel_labels, last_seq, ended_at IS NOT NULL, owner IS NOT NULL AND coalesce(owner_until >= now(), false)";

type RowTuple = (Uuid, String, f64, String, Vec<String>, i64, bool, bool);

fn row(t: RowTuple) -> SessionRow {
    SessionRow {
        tenant_id: t.0,
        device_id: t.1,
        sample_rate_hz: t.2,
        unit: t.3,
        channel_labels: t.4,
        last_seq: t.5,
        ended: t.6,
        claimed: t.7,
    }
}

/// The session's row as the database has it (no lock, no claim).
pub(crate) async fn read(
    conn: impl sqlx::PgExecutor<'_>,
    session: SessionId,
    lock: bool,
) -> Result<Option<SessionRow>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM ingest_sessions WHERE session_id = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    Ok(sqlx::query_as::<_, RowTuple>(sqlx::AssertSqlSafe(sql))
        .bind(session.as_uuid())
        .fetch_optional(conn)
        .await?
        .map(row))
}

/// Creates the session (and its device) from its first frame unless it exists, in one
/// statement, claimed by `owner` for its lease when given: the new row, or `None` when
/// the session exists (made meanwhile by another request or instance, or another
/// tenant's; the caller reads it and claims or refuses it as any existing session).
pub(crate) async fn create(
    conn: impl sqlx::PgExecutor<'_>,
    tenant: TenantId,
    transport: Transport,
    first: &Head,
    owner: Option<(Uuid, Duration)>,
) -> Result<Option<SessionRow>, sqlx::Error> {
    // The device's row is inserted by the same statement (the session's foreign key is
    // checked at the statement's end, when it is there), and only for a session that
    // does not exist: a refused frame leaves no device behind.
    let created = sqlx::query_as::<_, RowTuple>(sqlx::AssertSqlSafe(format!(
        "WITH device AS (\
            INSERT INTO devices (tenant_id, device_id) \
            SELECT $2, $3 WHERE NOT EXISTS (SELECT 1 FROM ingest_sessions WHERE session_id = $1) \
            ON CONFLICT DO NOTHING) \
         INSERT INTO ingest_sessions (session_id, tenant_id, device_id, sample_rate_hz, unit, channel_labels, source, owner, owner_until) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $8 IS NULL THEN NULL ELSE now() + $9 * interval '1 millisecond' END) \
         ON CONFLICT (session_id) DO NOTHING \
         RETURNING {COLUMNS}"
    )))
    .bind(first.session_id.as_uuid())
    .bind(tenant.as_uuid())
    .bind(first.device_id.as_str())
    .bind(first.sample_rate_hz)
    .bind(first.unit.symbol())
    .bind(&first.channel_labels[..])
    .bind(transport.as_str())
    .bind(owner.map(|(id, _)| id))
    .bind(owner.map_or(0, |(_, lease)| lease.as_millis() as i64))
    .fetch_optional(conn)
    .await?;
    Ok(created.map(row))
}

/// A session is open, for the plan's concurrent-session limit, from its first frame
/// until it ends (its end marker, or an upload's last frame) or has had no frame for
/// this long: the stages' idle timeout, after which they close it too.
pub const OPEN_FOR: Duration = Duration::from_secs(900);

/// A session none of whose frames went out (all refused: quota, mismatch) counts as
/// open this long after it was created, then no more: long enough to cover its first
/// frames' confirmation being written to its row (within a tick), short enough that a
/// device retrying new sessions while refused does not use up the plan's sessions.
pub const EMPTY_OPEN_FOR: Duration = Duration::from_secs(60);

/// As [`create`], unless the tenant already has as many sessions open as `limits`
/// allow ([`ClaimError::SessionLimit`]) or the session's device would be one more
/// than they allow ([`ClaimError::DeviceLimit`]). The tenant's new sessions are
/// counted and created one at a time (a lock per tenant, for the transaction), so two
/// cannot both take the last place.
pub(crate) async fn create_within(
    pool: &PgPool,
    tenant: TenantId,
    transport: Transport,
    first: &Head,
    owner: Option<(Uuid, Duration)>,
    limits: SessionLimits,
) -> Result<Option<SessionRow>, ClaimError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 2024))")
        .bind(tenant.as_uuid())
        .execute(&mut *tx)
        .await?;
    let (exists, active): (bool, i64) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM ingest_sessions WHERE session_id = $1), \
                (SELECT count(*) FROM ingest_sessions WHERE tenant_id = $2 AND ended_at IS NULL \
                   AND coalesce(last_frame_at, created_at) > now() - $3 * interval '1 millisecond' \
                   AND (last_seq >= 0 OR created_at > now() - $4 * interval '1 millisecond'))",
    )
    .bind(first.session_id.as_uuid())
    .bind(tenant.as_uuid())
    .bind(OPEN_FOR.as_millis() as i64)
    .bind(EMPTY_OPEN_FOR.as_millis() as i64)
    .fetch_one(&mut *tx)
    .await?;
    if exists {
        // Not new: the caller claims it as any existing session.
        return Ok(None);
    }
    if let Some(limit) = limits.devices {
        if let Some(refusal) = device_refusal(&mut *tx, tenant, &first.device_id, limit).await? {
            return Err(refusal);
        }
    }
    if let Some(limit) = limits.sessions {
        if active >= i64::from(limit) {
            return Err(ClaimError::SessionLimit { limit, active });
        }
    }
    let created = create(&mut *tx, tenant, transport, first, owner).await?;
    tx.commit().await?;
    Ok(created)
}

/// The refusal of `device` when it is new to the tenant and the tenant already streams
/// from `limit` devices.
pub(crate) async fn device_refusal(
    conn: impl sqlx::PgExecutor<'_>,
    tenant: TenantId,
    device: &DeviceId,
    limit: i32,
) -> Result<Option<ClaimError>, sqlx::Error> {
    let (known, devices): (bool, i64) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM devices WHERE tenant_id = $1 AND device_id = $2), \
                (SELECT count(*) FROM devices WHERE tenant_id = $1)",
    )
    .bind(tenant.as_uuid())
    .bind(device.as_str())
    .fetch_one(conn)
    .await?;
    Ok((!known && devices >= i64::from(limit))
        .then_some(ClaimError::DeviceLimit { limit, devices }))
}

impl Sessions {
    pub fn new(
        pool: PgPool,
        leases: Leases,
        metrics: &Metrics,
        quotas: Arc<QuotaBook>,
    ) -> Sessions {
        Sessions {
            quotas,
            pool,
            instance: Uuid::new_v4(),
            leases,
            held: Mutex::default(),
            owned: metrics.owned_sessions.clone(),
            claims: metrics.session_claims.clone(),
            write_failures: metrics.session_write_failures.clone(),
        }
    }

    fn entry(&self, session: SessionId) -> Arc<Entry> {
        let mut held = self.held.lock().expect("not poisoned");
        let entry = held
            .entry(session)
            .or_insert_with(|| {
                Arc::new(Entry {
                    serial: Arc::default(),
                    state: Mutex::new(State {
                        row: None,
                        lease_until: Instant::now(),
                        written_seq: -1,
                        unwritten: 0,
                        end_unwritten: false,
                        last_used: Instant::now(),
                        wanted: false,
                        gone: false,
                    }),
                })
            })
            .clone();
        self.owned.set(held.len() as i64);
        entry
    }

    /// Holds the session for one group of `tenant`'s frames, claiming it first if this
    /// instance does not serve it (and creating it from `first` if it does not exist).
    pub async fn hold(
        &self,
        tenant: TenantId,
        transport: Transport,
        first: &Head,
    ) -> Result<Held, ClaimError> {
        let (entry, serial, row) = self
            .serve(tenant, first.session_id, Some((transport, first)))
            .await?;
        Ok(Held {
            entry,
            _serial: serial,
            row: row.expect("claimed with its first frame, so it exists"),
        })
    }

    /// Claims an existing session of `tenant` for a stream about to send its frames,
    /// and says how far it got: `None` when it does not exist yet (it is created with
    /// its first frame).
    pub async fn open(
        &self,
        tenant: TenantId,
        session: SessionId,
    ) -> Result<Option<SessionRow>, ClaimError> {
        Ok(self.serve(tenant, session, None).await?.2)
    }

    /// The session's entry, its `serial` taken, and its state: from memory while the
    /// lease has more than the margin left, otherwise claimed (see [`Sessions::claim`]).
    async fn serve(
        &self,
        tenant: TenantId,
        session: SessionId,
        create_from: Option<(Transport, &Head)>,
    ) -> Result<(Arc<Entry>, OwnedMutexGuard<()>, Option<SessionRow>), ClaimError> {
        loop {
            let entry = self.entry(session);
            let serial = entry.serial.clone().lock_owned().await;
            let served = {
                let mut s = entry.state.lock().expect("not poisoned");
                if s.gone {
                    continue;
                }
                let now = Instant::now();
                s.last_used = now;
                let fresh = s.lease_until > now + self.leases.margin;
                s.row.clone().filter(|_| fresh)
            };
            let row = match served {
                Some(row) if row.tenant_id != tenant.as_uuid() => {
                    return Err(ClaimError::Forbidden(session))
                }
                Some(row) => Some(row),
                None => self.claim(&entry, tenant, session, create_from).await?,
            };
            return Ok((entry, serial, row));
        }
    }

    /// Claims the session in the database (the caller holds its entry's `serial`),
    /// creating it from `create_from` if missing, and asking its owner for it if
    /// another instance holds it.
    async fn claim(
        &self,
        entry: &Entry,
        tenant: TenantId,
        session: SessionId,
        create_from: Option<(Transport, &Head)>,
    ) -> Result<Option<SessionRow>, ClaimError> {
        let deadline = Instant::now() + self.leases.handoff_wait;
        let mut asked = false;
        // Until the database says the session exists, a miss may mean it is new.
        let mut may_be_new = true;
        loop {
            let mut sent = Instant::now();
            let mut claimed = sqlx::query_as::<_, RowTuple>(sqlx::AssertSqlSafe(format!(
                "UPDATE ingest_sessions SET owner = $2, owner_until = now() + $3 * interval '1 millisecond', handoff_at = NULL \
                 WHERE session_id = $1 AND tenant_id = $4 AND (owner IS NULL OR owner = $2 OR owner_until IS NULL OR owner_until < now()) \
                 RETURNING {COLUMNS}"
            )))
            .bind(session.as_uuid())
            .bind(self.instance)
            .bind(self.leases.lease.as_millis() as i64)
            .bind(tenant.as_uuid())
            .fetch_optional(&self.pool)
            .await?
            .map(row);
            if claimed.is_none() && may_be_new {
                if let Some((transport, first)) = create_from {
                    sent = Instant::now();
                    let owner = Some((self.instance, self.leases.lease));
                    let limits = self.quotas.session_limits(tenant.as_uuid());
                    claimed = if limits.any() {
                        create_within(&self.pool, tenant, transport, first, owner, limits).await?
                    } else {
                        create(&self.pool, tenant, transport, first, owner).await?
                    };
                    may_be_new = false;
                }
            }
            if let Some(stored) = claimed {
                self.claims.inc();
                let mut s = entry.state.lock().expect("not poisoned");
                s.written_seq = stored.last_seq;
                let row = match s.row.take() {
                    // Claimed again while still held here (the lease ran low, as when
                    // the database did not answer for a while): what this instance
                    // confirmed and could not write yet is kept, and is newer than the
                    // row unless another instance served the session meanwhile.
                    Some(mut mine) => {
                        mine.last_seq = mine.last_seq.max(stored.last_seq);
                        mine.ended |= stored.ended;
                        mine
                    }
                    None => {
                        s.unwritten = 0;
                        s.end_unwritten = false;
                        stored
                    }
                };
                s.wanted = false;
                s.lease_until = sent + self.leases.lease;
                s.last_used = Instant::now();
                s.row = Some(row.clone());
                return Ok(Some(row));
            }
            match read(&self.pool, session, false).await? {
                // Gone since (its tenant deleted, say): created again next time round.
                None if create_from.is_some() => may_be_new = true,
                None => {
                    self.forget(entry, session);
                    return Ok(None);
                }
                Some(r) if r.tenant_id != tenant.as_uuid() => {
                    self.forget(entry, session);
                    return Err(ClaimError::Forbidden(session));
                }
                Some(r) if r.claimed => {
                    if Instant::now() >= deadline {
                        return Err(ClaimError::Busy(session));
                    }
                    if !asked {
                        sqlx::query(
                            "UPDATE ingest_sessions SET handoff_at = coalesce(handoff_at, now()) WHERE session_id = $1 AND owner <> $2",
                        )
                        .bind(session.as_uuid())
                        .bind(self.instance)
                        .execute(&self.pool)
                        .await?;
                        asked = true;
                    }
                    tokio::time::sleep(self.leases.tick.min(Duration::from_millis(50))).await;
                }
                // Let go meanwhile: claim again.
                Some(_) if Instant::now() < deadline => {}
                Some(_) => return Err(ClaimError::Busy(session)),
            }
        }
    }

    /// Drops an entry that holds no claim (a session that turned out missing or
    /// another tenant's), so the map only holds sessions served here. The caller holds
    /// its `serial`.
    fn forget(&self, entry: &Entry, session: SessionId) {
        let mut held = self.held.lock().expect("not poisoned");
        let mut s = entry.state.lock().expect("not poisoned");
        if s.row.is_none() && !s.gone {
            s.gone = true;
            held.remove(&session);
        }
        self.owned.set(held.len() as i64);
    }

    /// Writes changes, renews leases and lets go of idle or wanted sessions every
    /// tick; lets go of every session when `stop` is cancelled.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(self.leases.tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            if let Err(error) = self.write(false).await {
                self.write_failures.inc();
                tracing::warn!(%error, "writing the sessions' state failed (kept, retried next tick)");
            }
        }
        if let Err(error) = self.write(true).await {
            self.write_failures.inc();
            tracing::warn!(%error, "letting go of the sessions at shutdown failed (their leases run out instead)");
        }
    }

    /// One tick: see [`Sessions::run`]. `all`: let go of every session not busy.
    pub async fn write(&self, all: bool) -> Result<(), sqlx::Error> {
        let entries: Vec<(SessionId, Arc<Entry>)> = {
            let held = self.held.lock().expect("not poisoned");
            if held.is_empty() {
                return Ok(());
            }
            held.iter().map(|(s, e)| (*s, e.clone())).collect()
        };
        if !all {
            let wanted: Vec<Uuid> = sqlx::query_scalar(
                "SELECT session_id FROM ingest_sessions WHERE owner = $1 AND handoff_at IS NOT NULL",
            )
            .bind(self.instance)
            .fetch_all(&self.pool)
            .await?;
            for (s, e) in &entries {
                if wanted.contains(&s.as_uuid()) {
                    e.state.lock().expect("not poisoned").wanted = true;
                }
            }
        }
        let now = Instant::now();
        // What each written session's row is told, and the serial guards of those let go.
        struct Write {
            session: SessionId,
            entry: Arc<Entry>,
            last_seq: i64,
            frames: i64,
            ended: bool,
            release: Option<OwnedMutexGuard<()>>,
        }
        let mut writes = Vec::new();
        for (session, entry) in entries {
            let mut s = entry.state.lock().expect("not poisoned");
            let idle = now.duration_since(s.last_used) >= self.leases.idle;
            let Some(row) = &s.row else {
                // Not claimed (a claim that failed, a lease lost): dropped once idle.
                if idle && entry.serial.try_lock().is_ok() {
                    s.gone = true;
                    drop(s);
                    self.held.lock().expect("not poisoned").remove(&session);
                }
                continue;
            };
            let release = if all || idle || s.wanted {
                entry.serial.clone().try_lock_owned().ok()
            } else {
                None
            };
            let renew = s.lease_until < now + self.leases.lease.mul_f64(0.8);
            if !(s.dirty() || renew || release.is_some()) {
                continue;
            }
            let w = Write {
                session,
                last_seq: row.last_seq,
                frames: s.unwritten,
                ended: s.end_unwritten,
                entry: entry.clone(),
                release,
            };
            s.wanted &= w.release.is_none();
            drop(s);
            writes.push(w);
        }
        if writes.is_empty() {
            return Ok(());
        }
        let sent = Instant::now();
        let written: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE ingest_sessions s SET \
                last_seq = greatest(s.last_seq, w.last_seq), \
                frames = s.frames + w.frames, \
                last_frame_at = CASE WHEN w.frames > 0 THEN now() ELSE s.last_frame_at END, \
                ended_at = CASE WHEN w.ended THEN coalesce(s.ended_at, now()) ELSE s.ended_at END, \
                owner = CASE WHEN w.release THEN NULL ELSE s.owner END, \
                owner_until = CASE WHEN w.release THEN NULL ELSE now() + $2 * interval '1 millisecond' END \
             FROM unnest($3::uuid[], $4::int8[], $5::int8[], $6::bool[], $7::bool[]) AS w(session_id, last_seq, frames, ended, release) \
             WHERE s.session_id = w.session_id AND s.owner = $1 \
             RETURNING s.session_id",
        )
        .bind(self.instance)
        .bind(self.leases.lease.as_millis() as i64)
        .bind(writes.iter().map(|w| w.session.as_uuid()).collect::<Vec<_>>())
        .bind(writes.iter().map(|w| w.last_seq).collect::<Vec<_>>())
        .bind(writes.iter().map(|w| w.frames).collect::<Vec<_>>())
        .bind(writes.iter().map(|w| w.ended).collect::<Vec<_>>())
        .bind(writes.iter().map(|w| w.release.is_some()).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        let mut held = self.held.lock().expect("not poisoned");
        for w in writes {
            let mut s = w.entry.state.lock().expect("not poisoned");
            if !written.contains(&w.session.as_uuid()) {
                // The lease ran out and another instance claimed the session: what was
                // not written is lost to the row (a resend is published again).
                tracing::warn!(session = %w.session, unwritten = s.unwritten, "a session's lease was lost");
                s.row = None;
            } else {
                s.written_seq = w.last_seq;
                s.unwritten -= w.frames;
                s.end_unwritten &= !w.ended;
                s.lease_until = sent + self.leases.lease;
            }
            if w.release.is_some() || s.row.is_none() {
                s.row = None;
                if w.release.is_some() {
                    s.gone = true;
                    held.remove(&w.session);
                }
            }
        }
        self.owned.set(held.len() as i64);
        Ok(())
    }
}
