//! The database migrations on the real Postgres, in a fresh database.

use clisonix_e2e::{root, TestEnv};
use sqlx::migrate::Migrator;

#[tokio::test]
async fn migrations_apply_to_a_fresh_database_and_are_idempotent() {
    let env = TestEnv::get();
    let db = env.fresh_database().await;
    let migrator = Migrator::new(root().join("gateway/migrations"))
        .await
        .unwrap();
    assert!(migrator.iter().count() >= 1);
    migrator.run(&db.pool).await.unwrap();
    migrator.run(&db.pool).await.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, migrator.iter().count());
    let tenant = uuid_like();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1::uuid, 'acme')")
        .bind(&tenant)
        .execute(&db.pool)
        .await
        .unwrap();
    let empty_name = sqlx::query("INSERT INTO tenants (id, name) VALUES (gen_random_uuid(), '')")
        .execute(&db.pool)
        .await;
    assert!(empty_name.is_err(), "a tenant needs a name");
    db.drop_now().await;
}

fn uuid_like() -> String {
    "6f1c2d1e-8a1b-4c3d-9e8f-0123456789ab".to_owned()
}
