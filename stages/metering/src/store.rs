//! Metering's Postgres side: a batch of input records applied in one transaction,
//! together with the input offsets (`metering_offsets`), so a record is counted if and
//! only if its offset is recorded as applied. This is what makes the counts exact
//! across a kill -9 at any moment, restarts, rebalances and replays:
//! - the transaction locks the batch's partitions' offset rows and skips every record
//!   below the recorded next offset (already counted by an earlier transaction, by this
//!   instance or another, under any consumer group);
//! - usage events are also deduplicated by event id (`metering_events`), in the same
//!   transaction: a producer that resent an event whose first attempt landed wrote it
//!   twice, at two offsets;
//! - a session's device and channel time are counted as the difference between its
//!   cumulative state and what `usage_sessions` already holds for it;
//! - usage counts in the billing period its moment falls in, unless that period is
//!   closed: then it is carried into the next open period (`usage_carried`), and the
//!   closed period's rows never change. The period rows are locked (shared) while a
//!   batch writes into them, so closing a period waits for batches in flight.
//!
//! Knows nothing of Kafka: the runtime's metering loop hands it decoded records with
//! their positions and commits the consumer's offsets only afterwards (those are a
//! starting point for reading, not the truth; the truth is here).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use clisonix_schemas::TenantId;
use clisonix_stage::Position;
use sqlx::postgres::PgPool;
use sqlx::types::chrono::{DateTime, TimeZone, Utc};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use crate::{from_event, from_features, hour_of, session_totals, Input, Meter, Usage};

/// What a batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Records applied now.
    pub applied: u64,
    /// Records skipped: their offsets had been applied before.
    pub already_applied: u64,
    /// Usage events skipped: their ids had been counted before.
    pub duplicate_events: u64,
    /// Quantities counted, per meter.
    pub usage: BTreeMap<Meter, i64>,
    /// Quantities carried out of a closed period into the open one, per meter.
    pub carried: BTreeMap<Meter, i64>,
    /// Thresholds (80 or 100 percent of the included quantity) crossed now, per meter.
    pub alerts: Vec<(Meter, i16)>,
}

#[derive(Debug, thiserror::Error)]
#[error("metering's database: {0}")]
pub struct StoreError(#[from] sqlx::Error);

/// The period usage of a tenant without a subscription is kept under.
fn unattributed() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH
}

fn time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// The metering tables.
#[derive(Debug, Clone)]
pub struct MeteringStore {
    pool: PgPool,
}

impl MeteringStore {
    pub fn new(pool: PgPool) -> MeteringStore {
        MeteringStore { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies a batch: every `(position, record)` (a record that did not decode is
    /// `None`: its offset is applied, nothing is counted) in one transaction. `now_ms`
    /// bounds usage times: usage stamped later than now (a clock ahead) counts now.
    pub async fn apply(
        &self,
        batch: &[(Position, Option<Input>)],
        now_ms: i64,
    ) -> Result<Applied, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut applied = Applied::default();
        let fresh = fresh_records(&mut tx, batch, &mut applied).await?;
        let usage = usages(&mut tx, &fresh, now_ms, &mut applied).await?;
        applied.applied = fresh.len() as u64;
        write_usage(&mut tx, &usage, &mut applied).await?;
        tx.commit().await?;
        Ok(applied)
    }

    /// Starts the periods that are due and closes those past their grace.
    pub async fn roll_periods(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT clisonix_roll_periods(now())")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets counted event ids older than `days` (longer than `usage.events` keeps
    /// its records, so no event that can still be read is forgotten).
    pub async fn prune_event_ids(&self, days: i32) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM metering_events WHERE occurred_at < now() - make_interval(days => $1)",
        )
        .bind(days)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

/// Locks the batch's offset rows and returns the records not applied before (in
/// batch order), after moving the offsets past the whole batch.
async fn fresh_records<'b>(
    tx: &mut Transaction<'_, Postgres>,
    batch: &'b [(Position, Option<Input>)],
    applied: &mut Applied,
) -> Result<Vec<(&'b Position, &'b Input)>, StoreError> {
    let mut ends: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for (p, _) in batch {
        let end = ends.entry((p.topic.as_str(), p.partition)).or_insert(0);
        *end = (*end).max(p.offset + 1);
    }
    let topics: Vec<&str> = ends.keys().map(|(t, _)| *t).collect();
    let partitions: Vec<i32> = ends.keys().map(|(_, p)| *p).collect();
    let next: Vec<i64> = ends.values().copied().collect();
    sqlx::query(
        "INSERT INTO metering_offsets (topic, partition, next_offset) \
         SELECT * FROM unnest($1::text[], $2::int[], $3::bigint[]) ON CONFLICT DO NOTHING",
    )
    .bind(&topics)
    .bind(&partitions)
    .bind(vec![0_i64; topics.len()])
    .execute(&mut **tx)
    .await?;
    // Locked in key order, so two instances never wait on each other in a cycle.
    let rows = sqlx::query(
        "SELECT o.topic, o.partition, o.next_offset FROM metering_offsets o \
         JOIN unnest($1::text[], $2::int[]) AS b(topic, partition) USING (topic, partition) \
         ORDER BY o.topic, o.partition FOR UPDATE OF o",
    )
    .bind(&topics)
    .bind(&partitions)
    .fetch_all(&mut **tx)
    .await?;
    // Keyed by the batch's own names, so a record's lookup allocates nothing.
    let mut from: HashMap<(&str, i32), i64> = HashMap::with_capacity(rows.len());
    for row in rows {
        let (topic, partition): (&str, i32) = (row.get("topic"), row.get("partition"));
        if let Some(&key) = ends.keys().find(|k| **k == (topic, partition)) {
            from.insert(key, row.get("next_offset"));
        }
    }
    sqlx::query(
        "UPDATE metering_offsets o SET next_offset = greatest(o.next_offset, b.next) \
         FROM unnest($1::text[], $2::int[], $3::bigint[]) AS b(topic, partition, next) \
         WHERE o.topic = b.topic AND o.partition = b.partition",
    )
    .bind(&topics)
    .bind(&partitions)
    .bind(&next)
    .execute(&mut **tx)
    .await?;
    let mut fresh = Vec::with_capacity(batch.len());
    for (p, record) in batch {
        let done = from
            .get(&(p.topic.as_str(), p.partition))
            .is_some_and(|next| p.offset < *next);
        if done {
            applied.already_applied += 1;
        } else if let Some(record) = record {
            fresh.push((p, record));
        }
    }
    Ok(fresh)
}

/// The usage of fresh records: events not counted before, sessions' time beyond what
/// was counted, feature windows.
async fn usages(
    tx: &mut Transaction<'_, Postgres>,
    fresh: &[(&Position, &Input)],
    now_ms: i64,
    applied: &mut Applied,
) -> Result<Vec<Usage>, StoreError> {
    // Event ids: the ones this transaction inserts are new.
    let mut ids = Vec::new();
    let mut id_times = Vec::new();
    for (_, input) in fresh {
        if let Input::Usage(e) = input {
            ids.push(e.event_id);
            id_times.push(time(e.occurred_at.as_millis()));
        }
    }
    let new_ids: BTreeSet<Uuid> = if ids.is_empty() {
        BTreeSet::new()
    } else {
        sqlx::query_scalar(
            "INSERT INTO metering_events (event_id, occurred_at) \
             SELECT * FROM unnest($1::uuid[], $2::timestamptz[]) ON CONFLICT DO NOTHING \
             RETURNING event_id",
        )
        .bind(&ids)
        .bind(&id_times)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect()
    };
    // Sessions' time counted so far.
    let sessions: Vec<Uuid> = fresh
        .iter()
        .filter_map(|(_, i)| match i {
            Input::Session(s) => Some(s.session_id.as_uuid()),
            _ => None,
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut counted: HashMap<(Uuid, Meter), i64> = HashMap::new();
    if !sessions.is_empty() {
        let rows = sqlx::query(
            "SELECT session_id, meter, quantity FROM usage_sessions \
             WHERE session_id = ANY($1) AND meter IN ('device_ms', 'channel_ms') AND detail = '' \
             ORDER BY session_id, meter FOR UPDATE",
        )
        .bind(&sessions)
        .fetch_all(&mut **tx)
        .await?;
        for row in rows {
            let meter = Meter::parse(row.get::<&str, _>("meter")).unwrap_or(Meter::DeviceMs);
            counted.insert((row.get("session_id"), meter), row.get("quantity"));
        }
    }
    let mut out = Vec::with_capacity(fresh.len() * 2);
    let mut seen = BTreeSet::new();
    for (position, input) in fresh {
        match input {
            Input::Usage(e) => {
                // The first copy in this batch of an id new to the table counts.
                if !new_ids.contains(&e.event_id) || !seen.insert(e.event_id) {
                    applied.duplicate_events += 1;
                    continue;
                }
                out.extend(from_event(e));
            }
            Input::Session(s) => {
                let (device, channel) = session_totals(s);
                let at_ms = s.last_frame_at.as_millis();
                for (meter, total) in [(Meter::DeviceMs, device), (Meter::ChannelMs, channel)] {
                    let so_far = counted.entry((s.session_id.as_uuid(), meter)).or_insert(0);
                    if total > *so_far {
                        out.push(Usage {
                            tenant: s.tenant_id,
                            session: Some(s.session_id),
                            meter,
                            at_ms,
                            quantity: total - *so_far,
                            detail: None,
                        });
                        *so_far = total;
                    }
                }
            }
            Input::Features(f) => {
                let at_ms = position.timestamp_ms.unwrap_or(now_ms);
                out.extend(from_features(f, at_ms));
            }
        }
    }
    for u in &mut out {
        u.at_ms = u.at_ms.min(now_ms);
    }
    Ok(out)
}

/// A billing period as a batch sees it.
#[derive(Debug, Clone, Copy)]
struct Period {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    closed: bool,
    /// The next open period, where usage of a closed one is carried.
    next_open: Option<DateTime<Utc>>,
}

/// The periods of `(tenant, moment)` pairs, locked (shared) for the transaction.
async fn periods(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[(TenantId, i64)],
) -> Result<Vec<Option<Period>>, StoreError> {
    let tenants: Vec<Uuid> = keys.iter().map(|(t, _)| t.as_uuid()).collect();
    let at: Vec<DateTime<Utc>> = keys.iter().map(|(_, ms)| time(*ms)).collect();
    // The latest period that started at or before the moment (else the first one),
    // and the first open period after it.
    let rows = sqlx::query(
        "SELECT i.idx, p.period_start, p.period_end, p.closed, o.period_start AS next_open \
         FROM unnest($1::uuid[], $2::timestamptz[]) WITH ORDINALITY AS i(tenant_id, at, idx) \
         LEFT JOIN LATERAL ( \
             SELECT b.period_start, b.period_end, b.closed_at IS NOT NULL AS closed \
             FROM billing_periods b WHERE b.tenant_id = i.tenant_id \
             ORDER BY (b.period_start <= i.at) DESC, \
                      CASE WHEN b.period_start <= i.at THEN b.period_start END DESC, \
                      b.period_start \
             LIMIT 1 FOR SHARE) p ON true \
         LEFT JOIN LATERAL ( \
             SELECT b.period_start FROM billing_periods b \
             WHERE b.tenant_id = i.tenant_id AND b.closed_at IS NULL \
               AND b.period_start > p.period_start \
             ORDER BY b.period_start LIMIT 1 FOR SHARE) o ON true \
         ORDER BY i.idx",
    )
    .bind(&tenants)
    .bind(&at)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let start: Option<DateTime<Utc>> = row.get("period_start");
            start.map(|start| Period {
                start,
                end: row.get("period_end"),
                closed: row.get("closed"),
                next_open: row.get("next_open"),
            })
        })
        .collect())
}

/// Adds the usage to the hourly, carried and per-session rows.
async fn write_usage(
    tx: &mut Transaction<'_, Postgres>,
    usage: &[Usage],
    applied: &mut Applied,
) -> Result<(), StoreError> {
    if usage.is_empty() {
        return Ok(());
    }
    let keys: Vec<(TenantId, i64)> = usage
        .iter()
        .map(|u| (u.tenant, u.at_ms))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut found = periods(tx, &keys).await?;
    // A moment past a tenant's newest period: start the periods due, then look again.
    let latest = keys
        .iter()
        .zip(&found)
        .filter_map(|((_, ms), p)| p.filter(|p| time(*ms) >= p.end).map(|_| *ms))
        .max();
    if let Some(ms) = latest {
        sqlx::query("SELECT clisonix_roll_periods($1)")
            .bind(time(ms))
            .execute(&mut **tx)
            .await?;
        found = periods(tx, &keys).await?;
    }
    let period_of: HashMap<(TenantId, i64), Option<Period>> =
        keys.iter().copied().zip(found).collect();

    let mut hourly: BTreeMap<(Uuid, Meter, i64, DateTime<Utc>), i64> = BTreeMap::new();
    let mut carried: BTreeMap<(Uuid, Meter, i64, DateTime<Utc>), i64> = BTreeMap::new();
    let mut per_session: BTreeMap<(Uuid, Meter, &str), (Uuid, i64)> = BTreeMap::new();
    for u in usage {
        let tenant = u.tenant.as_uuid();
        let hour = hour_of(u.at_ms);
        match period_of.get(&(u.tenant, u.at_ms)).copied().flatten() {
            None => {
                *hourly
                    .entry((tenant, u.meter, hour, unattributed()))
                    .or_default() += u.quantity
            }
            Some(p) if !p.closed => {
                *hourly.entry((tenant, u.meter, hour, p.start)).or_default() += u.quantity
            }
            Some(p) => {
                // The next open period; a tenant whose periods are all closed has none
                // yet (the roll is behind): the period after the closed one.
                let into = p.next_open.unwrap_or(p.end);
                *carried.entry((tenant, u.meter, hour, into)).or_default() += u.quantity;
                *applied.carried.entry(u.meter).or_default() += u.quantity;
            }
        }
        *applied.usage.entry(u.meter).or_default() += u.quantity;
        if let Some(session) = u.session {
            let detail = u.detail.as_deref().unwrap_or("");
            per_session
                .entry((session.as_uuid(), u.meter, detail))
                .or_insert((tenant, 0))
                .1 += u.quantity;
        }
    }
    upsert(tx, "usage_hourly", "hour", &hourly).await?;
    upsert(tx, "usage_carried", "occurred_hour", &carried).await?;
    let periods: BTreeSet<(Uuid, DateTime<Utc>)> = hourly
        .keys()
        .chain(carried.keys())
        .map(|k| (k.0, k.3))
        .collect();
    applied.alerts = alerts(tx, &periods).await?;
    if !per_session.is_empty() {
        let sessions: Vec<Uuid> = per_session.keys().map(|k| k.0).collect();
        let meters: Vec<&str> = per_session.keys().map(|k| k.1.as_str()).collect();
        let details: Vec<&str> = per_session.keys().map(|k| k.2).collect();
        let tenants: Vec<Uuid> = per_session.values().map(|(t, _)| *t).collect();
        let quantities: Vec<i64> = per_session.values().map(|(_, q)| *q).collect();
        sqlx::query(
            "INSERT INTO usage_sessions (session_id, meter, detail, tenant_id, quantity) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::bigint[]) \
             ON CONFLICT (session_id, meter, detail) DO UPDATE \
             SET quantity = usage_sessions.quantity + EXCLUDED.quantity, updated_at = now()",
        )
        .bind(&sessions)
        .bind(&meters)
        .bind(&details)
        .bind(&tenants)
        .bind(&quantities)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Records the 80% and 100% thresholds of the plans' included quantities that the
/// `periods`' usage has crossed and that were not recorded yet.
async fn alerts(
    tx: &mut Transaction<'_, Postgres>,
    periods: &BTreeSet<(Uuid, DateTime<Utc>)>,
) -> Result<Vec<(Meter, i16)>, StoreError> {
    if periods.is_empty() {
        return Ok(Vec::new());
    }
    let tenants: Vec<Uuid> = periods.iter().map(|p| p.0).collect();
    let starts: Vec<DateTime<Utc>> = periods.iter().map(|p| p.1).collect();
    let crossed: Vec<(String, i16)> = sqlx::query_as(
        "INSERT INTO usage_alerts (tenant_id, period_start, meter, threshold, used, included, limit_kind)          SELECT u.tenant_id, u.period_start, u.meter, t.threshold, u.quantity, m.included, m.limit_kind          FROM unnest($1::uuid[], $2::timestamptz[]) AS p(tenant_id, period_start)          JOIN usage_periods u USING (tenant_id, period_start)          JOIN billing_periods b USING (tenant_id, period_start)          JOIN plan_meters m ON m.plan_id = b.plan_id AND m.version = b.plan_version AND m.meter = u.meter          CROSS JOIN (VALUES (80::smallint), (100::smallint)) AS t(threshold)          WHERE m.included > 0 AND u.quantity * 100 >= m.included * t.threshold          ON CONFLICT DO NOTHING          RETURNING meter, threshold",
    )
    .bind(&tenants)
    .bind(&starts)
    .fetch_all(&mut **tx)
    .await?;
    Ok(crossed
        .into_iter()
        .filter_map(|(m, t)| Some((Meter::parse(&m)?, t)))
        .collect())
}

/// Adds quantities to `usage_hourly` or `usage_carried` (whose hour column is `hour`).
async fn upsert(
    tx: &mut Transaction<'_, Postgres>,
    table: &'static str,
    hour: &'static str,
    rows: &BTreeMap<(Uuid, Meter, i64, DateTime<Utc>), i64>,
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let tenants: Vec<Uuid> = rows.keys().map(|k| k.0).collect();
    let meters: Vec<&str> = rows.keys().map(|k| k.1.as_str()).collect();
    let hours: Vec<DateTime<Utc>> = rows.keys().map(|k| time(k.2)).collect();
    let periods: Vec<DateTime<Utc>> = rows.keys().map(|k| k.3).collect();
    let quantities: Vec<i64> = rows.values().copied().collect();
    let sql = format!(
        "INSERT INTO {table} (tenant_id, meter, {hour}, period_start, quantity) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::bigint[]) \
         ON CONFLICT (tenant_id, meter, {hour}, period_start) DO UPDATE \
         SET quantity = {table}.quantity + EXCLUDED.quantity, updated_at = now()"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&tenants)
        .bind(&meters)
        .bind(&hours)
        .bind(&periods)
        .bind(&quantities)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
