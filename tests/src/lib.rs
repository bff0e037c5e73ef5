//! The harness of the end-to-end tests: the real broker and the real Postgres of the
//! stack `./dev test` brings up, reached through `CLISONIX_KAFKA_BOOTSTRAP` and
//! `DATABASE_URL`. Every test gets its own topics (a random prefix), consumer groups
//! and database, so tests run in parallel and never see each other's data.

pub mod procfs;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clisonix_topics::{Admin, KafkaSettings, Replication, Topics};
use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// A record as read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// The stack the tests run against.
#[derive(Debug, Clone)]
pub struct TestEnv {
    pub kafka: KafkaSettings,
    pub database_url: String,
}

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with ./dev test (it brings up Kafka and Postgres)")
    })
}

impl TestEnv {
    pub fn get() -> TestEnv {
        TestEnv {
            kafka: KafkaSettings::new(required("CLISONIX_KAFKA_BOOTSTRAP"), "clisonix-tests"),
            database_url: required("DATABASE_URL"),
        }
    }

    /// A name no other test run uses: `<what>-<8 hex>`.
    pub fn unique(what: &str) -> String {
        format!("{what}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
    }

    /// A fresh, randomly prefixed copy of the topic catalog (not yet created).
    pub fn topics(&self) -> Topics {
        Topics::new(format!("{}.", Self::unique("t")))
    }

    pub fn admin(&self) -> Admin {
        Admin::connect(&self.kafka).expect("the broker answers")
    }

    /// Creates the catalog's topics under `topics`' prefix (blocking admin calls are
    /// moved off the async runtime).
    pub async fn create_catalog(&self, topics: &Topics) {
        let env = self.clone();
        let topics = topics.clone();
        tokio::task::spawn_blocking(move || {
            env.admin()
                .ensure(&topics, Replication::Auto)
                .expect("catalog topics are created")
        })
        .await
        .unwrap();
    }

    /// Creates one topic with plain settings, or with the given configs.
    pub async fn create_topic(&self, name: &str, partitions: i32, configs: &[(&str, &str)]) {
        let admin: AdminClient<DefaultClientContext> = self.kafka.admin().create().unwrap();
        let topic = configs.iter().fold(
            NewTopic::new(name, partitions, TopicReplication::Fixed(1)),
            |t, (k, v)| t.set(k, v),
        );
        let results = admin
            .create_topics([&topic], &AdminOptions::new())
            .await
            .expect("create topics answers");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
        }
    }

    /// Deletes every topic whose name starts with `prefix` (best effort clean-up).
    pub async fn delete_topics(&self, prefix: &str) {
        let admin: AdminClient<DefaultClientContext> = self.kafka.admin().create().unwrap();
        let names: Vec<String> = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|m| {
                m.topics()
                    .iter()
                    .map(|t| t.name().to_owned())
                    .filter(|n| n.starts_with(prefix))
                    .collect()
            })
            .unwrap_or_default();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        if !refs.is_empty() {
            let _ = admin.delete_topics(&refs, &AdminOptions::new()).await;
        }
    }

    pub fn producer(&self) -> FutureProducer {
        self.kafka.producer().create().expect("a producer")
    }

    /// Produces one record and waits for the broker's acknowledgement.
    pub async fn produce(
        &self,
        producer: &FutureProducer,
        topic: &str,
        key: &[u8],
        value: &[u8],
    ) -> (i32, i64) {
        let delivery = producer
            .send(
                FutureRecord::to(topic).key(key).payload(value),
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
        (delivery.partition, delivery.offset)
    }

    /// A consumer in a new group, subscribed to `topics`.
    pub fn consumer(&self, topics: &[&str]) -> StreamConsumer {
        let consumer: StreamConsumer = self
            .kafka
            .consumer(&Self::unique("g"))
            .create()
            .expect("a consumer");
        consumer.subscribe(topics).expect("subscribes");
        consumer
    }

    /// Reads until `count` records arrived (or fails after `timeout`).
    pub async fn consume(
        &self,
        consumer: &StreamConsumer,
        count: usize,
        timeout: Duration,
    ) -> Vec<Received> {
        let mut out = Vec::with_capacity(count);
        let mut stream = consumer.stream();
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < count {
            let message = tokio::time::timeout_at(deadline, stream.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "only {} of {count} records arrived in {timeout:?}",
                        out.len()
                    )
                })
                .expect("the stream does not end")
                .expect("a record, not an error");
            out.push(Received {
                topic: message.topic().to_owned(),
                partition: message.partition(),
                offset: message.offset(),
                key: message.key().unwrap_or_default().to_vec(),
                value: message.payload().unwrap_or_default().to_vec(),
            });
        }
        out
    }

    /// A new, empty database on the test server, dropped by [`TestDatabase::drop_now`].
    pub async fn fresh_database(&self) -> TestDatabase {
        let name = Self::unique("test").replace('-', "_");
        let options: PgConnectOptions = self.database_url.parse().expect("a valid DATABASE_URL");
        let mut admin = options
            .clone()
            .database("postgres")
            .connect()
            .await
            .expect("Postgres answers");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("creates the test database");
        admin.close().await.ok();
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone().database(&name))
            .await
            .expect("connects to the test database");
        TestDatabase {
            name,
            pool,
            options,
        }
    }
}

/// A database of one test.
#[derive(Debug)]
pub struct TestDatabase {
    pub name: String,
    pub pool: PgPool,
    options: PgConnectOptions,
}

impl TestDatabase {
    /// An audio store of this database's own (a folder named after it), for a sink
    /// and a gateway on this database.
    pub fn audio_store(&self) -> String {
        let dir = std::env::temp_dir().join(format!("clisonix-audio-{}", self.name));
        std::fs::create_dir_all(&dir).expect("the temporary directory is writable");
        format!("file://{}", dir.display())
    }

    /// A connection URL for this database (for services that connect themselves).
    pub fn url(&self) -> String {
        self.options
            .clone()
            .database(&self.name)
            .to_url_lossy()
            .to_string()
    }

    pub async fn drop_now(self) {
        self.pool.close().await;
        if let Ok(mut admin) = self.options.clone().database("postgres").connect().await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut admin)
            .await;
        }
    }
}

/// A TCP port on 127.0.0.1 free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_owned()
}
