//! A metering replay's own copy of the metering tables: the Postgres schema
//! `replay_<run>` in the live database, beside the live tables, which it never writes.
//!
//! The copy holds what metering writes (`metering_offsets`, `metering_events`,
//! `usage_hourly`, `usage_carried`, `usage_sessions`, `usage_alerts`, and the
//! `usage_periods` view over them) and what it moves as it counts
//! (`subscriptions`, `billing_periods`: copied from live when the run starts, so usage
//! lands in the periods it landed in live). The plans are read from live (a published
//! plan version never changes). Copies carry the live tables' columns, defaults,
//! checks and indexes, not their triggers: a replay sends no webhooks.
//!
//! A store whose connections put the run's schema first on their `search_path`
//! ([`ReplaySchema::search_path`]) runs [`crate::MeteringStore`] unchanged into the
//! copy, exactly once by the copy's own `metering_offsets`: a run killed at any moment
//! and started again counts every record once. The run's plan (each input partition's
//! start and end) is kept in the schema too (`replay_plan`), so a resumed run reads the
//! same records.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;

use crate::store::StoreError;

/// What metering writes, copied empty.
const WRITTEN: [&str; 6] = [
    "metering_offsets",
    "metering_events",
    "usage_hourly",
    "usage_carried",
    "usage_sessions",
    "usage_alerts",
];

/// What metering moves as it counts, copied with its rows.
const COPIED: [&str; 2] = ["subscriptions", "billing_periods"];

/// The longest run name that makes a schema name Postgres keeps whole (63 bytes).
pub const MAX_RUN: usize = 63 - "replay_".len();

/// One input partition of a run: read from `start` to `end` (exclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRange {
    pub topic: String,
    pub partition: i32,
    pub start: i64,
    pub end: i64,
}

/// What a run reads: its input partitions' ranges and the sessions it keeps (empty:
/// all), as recorded when it first started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunPlan {
    pub ranges: Vec<PlannedRange>,
    pub sessions: Vec<String>,
}

/// Per meter, what a run counted and what live counted in the same tenants' same hours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterComparison {
    pub meter: String,
    pub replay: i64,
    pub live: i64,
    /// (tenant, hour) pairs whose quantities differ.
    pub hours_differing: i64,
    pub hours: i64,
}

/// A run's schema, and the live schema beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaySchema {
    pub name: String,
    pub live: String,
}

fn quoted(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

impl ReplaySchema {
    /// Creates the run's schema, or finds it when the run was started before. `run` is
    /// a run name (letters, digits, `-`, `_`) of at most [`MAX_RUN`] bytes.
    pub async fn prepare(pool: &PgPool, run: &str) -> Result<ReplaySchema, StoreError> {
        let name = format!("replay_{run}");
        let mut tx = pool.begin().await?;
        // Two starts of a run at once create it once.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(&name)
            .execute(&mut *tx)
            .await?;
        let live: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&mut *tx)
            .await?;
        let schema = ReplaySchema { name, live };
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)")
                .bind(&schema.name)
                .fetch_one(&mut *tx)
                .await?;
        if !exists {
            let (s, l) = (quoted(&schema.name), quoted(&schema.live));
            let mut ddl = vec![format!("CREATE SCHEMA {s}")];
            for table in WRITTEN.iter().chain(&COPIED) {
                ddl.push(format!(
                    "CREATE TABLE {s}.{table} (LIKE {l}.{table} \
                     INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)"
                ));
            }
            for table in COPIED {
                ddl.push(format!("INSERT INTO {s}.{table} SELECT * FROM {l}.{table}"));
            }
            ddl.push(format!(
                "CREATE VIEW {s}.usage_periods AS \
                 SELECT tenant_id, meter, period_start, sum(quantity)::bigint AS quantity \
                 FROM (SELECT tenant_id, meter, period_start, quantity FROM {s}.usage_hourly \
                       UNION ALL \
                       SELECT tenant_id, meter, period_start, quantity FROM {s}.usage_carried) u \
                 GROUP BY tenant_id, meter, period_start"
            ));
            ddl.push(format!(
                "CREATE TABLE {s}.replay_plan ( \
                     topic text NOT NULL, partition integer NOT NULL, \
                     start_offset bigint NOT NULL, end_offset bigint NOT NULL, \
                     sessions text[] NOT NULL, planned_at timestamptz NOT NULL DEFAULT now(), \
                     PRIMARY KEY (topic, partition))"
            ));
            for statement in ddl {
                sqlx::query(sqlx::AssertSqlSafe(statement))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(schema)
    }

    /// The `search_path` of the connections that count into the copy.
    pub fn search_path(&self) -> String {
        format!("{}, {}", quoted(&self.name), quoted(&self.live))
    }

    /// Connections to `url` that count into the copy: a [`crate::MeteringStore`] on
    /// them writes the run's tables.
    pub async fn connect(&self, url: &str, connections: u32) -> Result<PgPool, StoreError> {
        let search_path = self.search_path();
        Ok(PgPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                let search_path = search_path.clone();
                Box::pin(async move {
                    sqlx::query("SELECT set_config('search_path', $1, false)")
                        .bind(search_path)
                        .execute(conn)
                        .await
                        .map(|_| ())
                })
            })
            .connect(url)
            .await?)
    }

    /// The run's plan, as first recorded (empty before).
    pub async fn plan(&self, pool: &PgPool) -> Result<RunPlan, StoreError> {
        let sql = format!(
            "SELECT topic, partition, start_offset, end_offset, sessions FROM {}.replay_plan \
             ORDER BY topic, partition",
            quoted(&self.name)
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(pool)
            .await?;
        let mut plan = RunPlan::default();
        for r in rows {
            plan.sessions = r.get("sessions");
            plan.ranges.push(PlannedRange {
                topic: r.get("topic"),
                partition: r.get("partition"),
                start: r.get("start_offset"),
                end: r.get("end_offset"),
            });
        }
        Ok(plan)
    }

    /// Records `plan` as the run's plan unless it has one; returns the plan recorded.
    pub async fn record_plan(&self, pool: &PgPool, plan: &RunPlan) -> Result<RunPlan, StoreError> {
        let sql = format!(
            "INSERT INTO {}.replay_plan (topic, partition, start_offset, end_offset, sessions) \
             SELECT t, p, s, e, $5 FROM unnest($1::text[], $2::int[], $3::bigint[], $4::bigint[]) \
                 AS r(t, p, s, e) \
             WHERE NOT EXISTS (SELECT FROM {}.replay_plan)",
            quoted(&self.name),
            quoted(&self.name)
        );
        let ranges = &plan.ranges;
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(&self.name)
            .execute(&mut *tx)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(ranges.iter().map(|r| r.topic.as_str()).collect::<Vec<_>>())
            .bind(ranges.iter().map(|r| r.partition).collect::<Vec<_>>())
            .bind(ranges.iter().map(|r| r.start).collect::<Vec<_>>())
            .bind(ranges.iter().map(|r| r.end).collect::<Vec<_>>())
            .bind(&plan.sessions)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.plan(pool).await
    }

    /// The next offset to count per input partition, as the copy records it.
    pub async fn next_offsets(
        &self,
        pool: &PgPool,
    ) -> Result<BTreeMap<(String, i32), i64>, StoreError> {
        let sql = format!(
            "SELECT topic, partition, next_offset FROM {}.metering_offsets",
            quoted(&self.name)
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| ((r.get("topic"), r.get("partition")), r.get("next_offset")))
            .collect())
    }

    /// Per meter, the run's usage against live's in the same (tenant, hour) pairs
    /// (hourly and carried usage together, whatever period it counted in). Equal when
    /// the run read all that live counted in those hours; a run over a time range or
    /// some sessions reads only part of its edge hours.
    pub async fn compare(&self, pool: &PgPool) -> Result<Vec<MeterComparison>, StoreError> {
        let per_hour = |schema: &str| {
            let s = quoted(schema);
            format!(
                "SELECT tenant_id, meter, hour, sum(quantity)::bigint AS quantity FROM ( \
                     SELECT tenant_id, meter, hour, quantity FROM {s}.usage_hourly \
                     UNION ALL \
                     SELECT tenant_id, meter, occurred_hour, quantity FROM {s}.usage_carried) u \
                 GROUP BY tenant_id, meter, hour"
            )
        };
        let sql = format!(
            "WITH r AS ({}), l AS ({}) \
             SELECT r.meter, sum(r.quantity)::bigint AS replay, \
                    coalesce(sum(l.quantity), 0)::bigint AS live, \
                    count(*) FILTER (WHERE l.quantity IS DISTINCT FROM r.quantity) AS differing, \
                    count(*) AS hours \
             FROM r LEFT JOIN l USING (tenant_id, meter, hour) \
             GROUP BY r.meter ORDER BY r.meter",
            per_hour(&self.name),
            per_hour(&self.live)
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| MeterComparison {
                meter: r.get("meter"),
                replay: r.get("replay"),
                live: r.get("live"),
                hours_differing: r.get("differing"),
                hours: r.get("hours"),
            })
            .collect())
    }
}
