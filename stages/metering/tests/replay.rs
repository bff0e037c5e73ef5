//! A metering replay's schema on the real Postgres (`./dev test`): the unchanged store,
//! on connections whose search path puts the run's schema first, counts into the copy
//! and never into the live tables; the copy fires no webhooks; a run is created once,
//! its plan recorded once; the comparison with live counts per meter and hour.

use clisonix_e2e::{TestDatabase, TestEnv};
use clisonix_metering::replay::{PlannedRange, ReplaySchema, RunPlan};
use clisonix_metering::{Input, MeteringStore, Position};
use clisonix_schemas::{examples, TenantId, Timestamp, UsageKind};
use sqlx::postgres::PgPool;
use uuid::Uuid;

async fn database() -> TestDatabase {
    let db = TestEnv::get().fresh_database().await;
    sqlx::migrate!("../../gateway/migrations")
        .run(&db.pool)
        .await
        .unwrap();
    db
}

fn frames(tenant: TenantId, quantity: i64, offset: i64) -> (Position, Option<Input>) {
    let mut e = examples::usage_event(1);
    e.event_id = Uuid::new_v4();
    e.tenant_id = tenant;
    e.kind = UsageKind::FramesIngested;
    e.quantity = quantity;
    e.occurred_at = Timestamp::now();
    let position = Position {
        topic: "usage.events".into(),
        partition: 0,
        offset,
        timestamp_ms: None,
    };
    (position, Some(Input::Usage(e)))
}

async fn scalar(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn a_run_counts_into_its_own_schema_and_never_into_live() {
    let db = database().await;
    let tenant = Uuid::new_v4();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 't')")
        .bind(tenant)
        .execute(&db.pool)
        .await
        .unwrap();
    let tenant = TenantId::new(tenant);
    // Live: 1,000 frames counted.
    let live = MeteringStore::new(db.pool.clone());
    let first = frames(tenant, 1_000, 0);
    live.apply(std::slice::from_ref(&first), Timestamp::now().as_millis())
        .await
        .unwrap();

    let schema = ReplaySchema::prepare(&db.pool, "audit-1").await.unwrap();
    assert_eq!(schema.name, "replay_audit-1");
    assert_eq!(schema.live, "public");
    let run = MeteringStore::new(schema.connect(&db.url(), 2).await.unwrap());
    // The same record, and one that crosses the free plan's 288,000 included frames:
    // the run records the threshold in its copy; no webhook is written anywhere.
    let second = frames(tenant, 300_000, 1);
    let applied = run
        .apply(&[first.clone(), second], Timestamp::now().as_millis())
        .await
        .unwrap();
    assert_eq!(applied.applied, 2, "the run's offsets start empty");
    assert!(!applied.alerts.is_empty(), "{applied:?}");
    // Prepared again (a resumed run), the schema and its copies are kept as they are.
    assert_eq!(
        ReplaySchema::prepare(&db.pool, "audit-1").await.unwrap(),
        schema
    );
    // Applied again (a resumed run reading the batch again), nothing more counts.
    let again = run
        .apply(&[first], Timestamp::now().as_millis())
        .await
        .unwrap();
    assert_eq!(again.already_applied, 1);

    let sum = "SELECT coalesce(sum(quantity), 0)::bigint FROM public.usage_hourly";
    assert_eq!(scalar(&db.pool, sum).await, 1_000, "live untouched");
    assert_eq!(
        scalar(
            &db.pool,
            "SELECT sum(quantity)::bigint FROM \"replay_audit-1\".usage_hourly"
        )
        .await,
        301_000
    );
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM public.usage_alerts").await,
        0
    );
    assert_eq!(
        scalar(
            &db.pool,
            "SELECT count(*) FROM \"replay_audit-1\".usage_alerts"
        )
        .await,
        2,
        "80% and 100% of the included frames, in the run's copy"
    );
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM webhook_events").await,
        0,
        "the copy has no triggers"
    );
    assert_eq!(
        scalar(
            &db.pool,
            "SELECT next_offset FROM public.metering_offsets WHERE topic = 'usage.events'"
        )
        .await,
        1
    );
    // The periods were copied, so the run counted in live's period.
    let periods = "SELECT count(*) FROM \"replay_audit-1\".usage_hourly h \
                   JOIN public.billing_periods b USING (tenant_id, period_start)";
    assert_eq!(scalar(&db.pool, periods).await, 1);

    // Per meter: the run's 301,000 frames against live's 1,000 in the same hour.
    let compared = schema.compare(&db.pool).await.unwrap();
    assert_eq!(compared.len(), 1);
    let c = &compared[0];
    assert_eq!(
        (
            c.meter.as_str(),
            c.replay,
            c.live,
            c.hours_differing,
            c.hours
        ),
        ("frames", 301_000, 1_000, 1, 1)
    );

    // A plan is recorded once: a second start keeps the first's.
    let plan = |end| RunPlan {
        ranges: vec![PlannedRange {
            topic: "usage.events".into(),
            partition: 0,
            start: 0,
            end,
        }],
        sessions: vec![],
    };
    assert_eq!(schema.plan(&db.pool).await.unwrap(), RunPlan::default());
    assert_eq!(
        schema.record_plan(&db.pool, &plan(2)).await.unwrap(),
        plan(2)
    );
    assert_eq!(
        schema.record_plan(&db.pool, &plan(9)).await.unwrap(),
        plan(2)
    );
    let next = schema.next_offsets(&db.pool).await.unwrap();
    assert_eq!(next.get(&("usage.events".to_owned(), 0)), Some(&2));
}
