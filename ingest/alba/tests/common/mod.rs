//! The harness of ingest's tests: ingest in-process on port 0, on its own database
//! and topics, with a tenant holding keys of each kind, and a second tenant.

#![allow(dead_code)]

use std::time::Duration;

use clisonix_alba::{Application, Config};
use clisonix_e2e::{TestDatabase, TestEnv};
use clisonix_player::http::{Client, Format};
use clisonix_schemas::{decode, Frame, SessionId, TenantId, Timestamp};
use clisonix_tenancy::keys::new_key;
use clisonix_topics::catalog::{EEG_FRAMES, USAGE_EVENTS};
use clisonix_topics::{KafkaSettings, Topics};
use rdkafka::consumer::StreamConsumer;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How often ingest's producer reports its statistics here (`alba_producer_*`).
pub const PRODUCER_STATS_INTERVAL: Duration = Duration::from_millis(200);

pub struct Tenant {
    pub id: TenantId,
    /// ingest scope.
    pub key: String,
    /// read scope only.
    pub read_key: String,
    /// ingest scope, revoked.
    pub revoked_key: String,
}

pub struct TestIngest {
    pub env: TestEnv,
    pub db: TestDatabase,
    pub topics: Topics,
    pub url: String,
    pub tenant: Tenant,
    pub other: Tenant,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn tenant(db: &TestDatabase, name: &str) -> Tenant {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
        .bind(id)
        .bind(name)
        .execute(&db.pool)
        .await
        .unwrap();
    // Tests stream many sessions at once: a plan without a session limit or hard
    // quotas (the quota tests choose their own).
    set_plan(db, TenantId::new(id), "enterprise").await;
    let make = async |scopes: &[&str], revoked: bool| {
        let k = new_key();
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, prefix, key_hash, scopes, revoked_at) VALUES ($1, $2, 'test', $3, $4, $5, CASE WHEN $6 THEN now() END)",
        )
        .bind(k.id)
        .bind(id)
        .bind(&k.prefix)
        .bind(&k.hash)
        .bind(scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .bind(revoked)
        .execute(&db.pool)
        .await
        .unwrap();
        k.key
    };
    Tenant {
        id: TenantId::new(id),
        key: make(&["ingest"], false).await,
        read_key: make(&["read"], false).await,
        revoked_key: make(&["ingest"], true).await,
    }
}

/// Puts `tenant` on the newest version of `plan`.
pub async fn set_plan(db: &TestDatabase, tenant: TenantId, plan: &str) {
    let done = sqlx::query(
        "UPDATE subscriptions SET plan_id = $2, plan_version = (SELECT max(version) FROM plans WHERE plan_id = $2) WHERE tenant_id = $1",
    )
    .bind(tenant.as_uuid())
    .bind(plan)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(done.rows_affected(), 1);
}

impl TestIngest {
    /// Ingest on the shared test broker.
    pub async fn spawn() -> TestIngest {
        Self::spawn_with(|_| {}).await
    }

    /// Ingest on the shared test broker, its configuration tuned by `tune`.
    pub async fn spawn_with(tune: impl FnOnce(&mut Config)) -> TestIngest {
        let env = TestEnv::get();
        let topics = env.topics();
        env.create_catalog(&topics).await;
        Self::spawn_on(env, topics, tune).await
    }

    /// Ingest on the broker `env` names, with `topics` already created.
    pub async fn spawn_on(
        env: TestEnv,
        topics: Topics,
        tune: impl FnOnce(&mut Config),
    ) -> TestIngest {
        let db = env.fresh_database().await;
        let Instance {
            url,
            shutdown,
            server,
        } = Instance::spawn(&env, &topics, &db, tune).await;
        let tenant = tenant(&db, "alpha").await;
        let other = tenant_named(&db).await;
        TestIngest {
            env,
            db,
            topics,
            url,
            tenant,
            other,
            shutdown,
            server,
        }
    }

    /// Another ingest instance on the same database, broker and topics.
    pub async fn another(&self, tune: impl FnOnce(&mut Config)) -> Instance {
        Instance::spawn(&self.env, &self.topics, &self.db, tune).await
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url, &self.tenant.key).unwrap()
    }

    pub fn frames_topic(&self) -> String {
        self.topics.name(&EEG_FRAMES)
    }

    pub fn usage_topic(&self) -> String {
        self.topics.name(&USAGE_EVENTS)
    }

    pub fn frames_consumer(&self) -> StreamConsumer {
        self.env.consumer(&[&self.frames_topic()])
    }

    /// Reads `count` frames from `eeg.frames`, decoded, in topic order.
    pub async fn read_frames(
        &self,
        consumer: &StreamConsumer,
        count: usize,
    ) -> Vec<(Vec<u8>, Frame)> {
        self.env
            .consume(consumer, count, Duration::from_secs(60))
            .await
            .into_iter()
            .map(|r| {
                let f = decode::<Frame>(&r.value).expect("ingest writes valid frames");
                (r.value, f)
            })
            .collect()
    }

    pub async fn post(&self, frames: &[Frame], format: Format) -> clisonix_player::http::Answer {
        self.client().post_frames(frames, format).await.unwrap()
    }

    /// Stops ingest and drops its database and topics (the benchmark alone writes
    /// gigabytes a run; left behind, they fill a developer's disk).
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.server).await;
        self.db.drop_now().await;
        self.env.delete_topics(self.topics.prefix()).await;
    }
}

/// The sum of a metric's samples (every label set) in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The EDF recording of `../shared/data/`.
pub fn recording_path() -> std::path::PathBuf {
    let dir = std::env::var("CLISONIX_DATA_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| clisonix_e2e::root().join("../shared/data"));
    dir.join("eeglab_sample_32ch_128hz_238s.edf")
}

/// One ingest instance, in-process.
pub struct Instance {
    pub url: String,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Instance {
    async fn spawn(
        env: &TestEnv,
        topics: &Topics,
        db: &TestDatabase,
        tune: impl FnOnce(&mut Config),
    ) -> Instance {
        let mut config = Config::defaults();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.database_url = clisonix_service::config::Secret::new(db.url());
        config.kafka = KafkaSettings::new(env.kafka.bootstrap.clone(), "alba-test");
        config.topic_prefix = topics.prefix().to_owned();
        config.usage_interval = Duration::from_millis(300);
        config.producer_stats_interval = PRODUCER_STATS_INTERVAL;
        tune(&mut config);
        let app = Application::build(config).await.expect("ingest starts");
        let url = format!("http://127.0.0.1:{}", app.port());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        Instance {
            url,
            shutdown,
            server,
        }
    }

    /// Stops it as a deployment does: streams answered, sessions let go.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.server).await;
    }

    /// Stops it as a crash does: nothing let go, nothing written any more.
    pub async fn crash(self) {
        self.server.abort();
        let _ = self.server.await;
    }
}

async fn tenant_named(db: &TestDatabase) -> Tenant {
    tenant(db, "beta").await
}

/// `n` frames of one session: `channels` channels of `per_channel` samples at 256 Hz,
/// seq 0.., a quarter second apart starting now.
pub fn frames(session: SessionId, n: u64, channels: usize, per_channel: u32) -> Vec<Frame> {
    let start = Timestamp::now().as_micros();
    (0..n)
        .map(|seq| {
            let mut f = clisonix_schemas::examples::frame(seq, channels, per_channel);
            f.session_id = session;
            f.seq = seq;
            f.device_time = Timestamp::from_micros(start + seq as i64 * 125_000);
            f.markers.clear();
            f
        })
        .collect()
}

/// What ingest must have published for a sent frame: the same frame, owned by the
/// caller's tenant, stamped with ingest's receive time.
/// What ingest adds to a session's first frame for the test tenants' plan
/// (enterprise): the list of the audio presets it renders.
pub fn with_plan_list(mut first: Frame) -> Frame {
    first.markers.push(clisonix_schemas::Marker {
        sample_offset: 0,
        duration_us: None,
        label: format!(
            "{}audification,parameter_mapping",
            clisonix_schemas::AUDIO_PLAN_MARKER
        ),
    });
    first
}

pub fn as_published(sent: &Frame, tenant: TenantId, received_at: Timestamp) -> Frame {
    Frame {
        tenant_id: tenant,
        received_at,
        ..sent.clone()
    }
}
