//! The whole pipeline in one process, on the real broker and a fresh database: the
//! gateway, ingest, Albi, Jona, sessions and the sink, each as it runs
//! in production but as a task; a tenant signed up through the API with an ingest and
//! a read key (as `./dev run` does); and a second tenant with keys of its own.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clisonix_albi::{Albi, AlbiConfig};
use clisonix_dev::run::{choose_plan, sign_up, Tenant};
use clisonix_e2e::{TestDatabase, TestEnv};
use clisonix_jona::{Jona, JonaConfig};
use clisonix_player::http::{Answer, Client};
use clisonix_sessions::{Sessions, SessionsConfig};
use clisonix_sink::Results;
use clisonix_stage::Stage;
use clisonix_stage_runtime::{run, run_tables, Health, RuntimeConfig, Sink, TablesConfig};
use clisonix_topics::{KafkaSettings, Topics};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub fn data_dir() -> PathBuf {
    std::env::var_os("CLISONIX_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

pub fn recording_path() -> PathBuf {
    data_dir().join("eeglab_sample_32ch_128hz_238s.edf")
}

pub struct Pipeline {
    pub env: TestEnv,
    pub topics: Topics,
    pub db: TestDatabase,
    pub gateway: String,
    pub ingest: String,
    /// The audio store the sink writes to and the gateway reads (`CLISONIX_AUDIO_STORE`).
    pub audio_store: String,
    pub tenant: Tenant,
    pub other: Tenant,
    pub stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn stage_config(env: &TestEnv, topics: &Topics, name: &str) -> RuntimeConfig {
    RuntimeConfig {
        kafka: KafkaSettings::new(env.kafka.bootstrap.clone(), format!("e2e-{name}")),
        topics: topics.clone(),
        group: TestEnv::unique(name),
        instance_id: TestEnv::unique("i"),
        batch_max: 500,
        batch_linger: Duration::from_millis(20),
    }
}

/// Which services run in-process (the others a test runs itself, e.g. as processes).
#[derive(Debug, Clone, Copy)]
pub struct Parts {
    pub jona: bool,
    pub sink: bool,
}

impl Pipeline {
    pub async fn start() -> Pipeline {
        Self::start_with(Parts {
            jona: true,
            sink: true,
        })
        .await
    }

    pub async fn start_with(parts: Parts) -> Pipeline {
        let env = TestEnv::get();
        let topics = env.topics();
        env.create_catalog(&topics).await;
        let db = env.fresh_database().await;
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let audio_store = db.audio_store();

        let mut config = clisonix_gateway::Config::defaults();
        config.database_url = clisonix_gateway::config::Secret::new(db.url());
        config.audio_store = Some(audio_store.clone());
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.kafka_bootstrap = Some(env.kafka.bootstrap.clone());
        config.topic_prefix = topics.prefix().to_owned();
        let app = clisonix_gateway::Application::build(config)
            .await
            .expect("the gateway starts");
        let gateway = format!("http://127.0.0.1:{}", app.port());
        let token = stop.clone();
        tasks.push(tokio::spawn(async move {
            app.run_until_stopped(token).await.unwrap();
        }));

        let mut config = clisonix_alba::Config::defaults();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.database_url = clisonix_gateway::config::Secret::new(db.url());
        config.kafka = KafkaSettings::new(env.kafka.bootstrap.clone(), "e2e-alba");
        config.topic_prefix = topics.prefix().to_owned();
        // Usage counts out often, so that metering has many events to count.
        config.usage_interval = Duration::from_millis(250);
        let app = clisonix_alba::Application::build(config)
            .await
            .expect("ingest starts");
        let ingest = format!("http://127.0.0.1:{}", app.port());
        let token = stop.clone();
        tasks.push(tokio::spawn(async move {
            app.run_until_stopped(token).await.unwrap();
        }));

        let tenant = Tenant {
            email: String::new(),
            password: String::new(),
            access_token: String::new(),
            ingest_key: String::new(),
            read_key: String::new(),
        };
        let mut pipeline = Pipeline {
            other: tenant.clone(),
            tenant,
            env,
            topics,
            db,
            gateway,
            ingest,
            audio_store,
            stop,
            tasks,
        };
        pipeline.spawn_stage(Albi::new(AlbiConfig::default()));
        // Jona as deployed: sessions that want both presets say so in their first frame.
        if parts.jona {
            pipeline.spawn_stage(Jona::new(JonaConfig::default()));
        }
        pipeline.spawn_stage(Sessions::new(SessionsConfig::default()));
        if parts.sink {
            pipeline.spawn_sink();
        }
        pipeline.tenant = sign_up(&pipeline.gateway, "alpha").await.unwrap();
        pipeline.other = sign_up(&pipeline.gateway, "beta").await.unwrap();
        // Tests stream many sessions at once: a plan without a session limit.
        for t in [&pipeline.tenant, &pipeline.other] {
            choose_plan(&pipeline.gateway, &t.access_token, "enterprise")
                .await
                .unwrap();
        }
        pipeline
    }

    pub fn spawn_stage<S: Stage + 'static>(&mut self, stage: S) {
        let config = stage_config(&self.env, &self.topics, stage.name());
        let token = self.stop.clone();
        self.tasks.push(tokio::spawn(async move {
            run(stage, config, Health::default(), token)
                .await
                .expect("the stage runs");
        }));
    }

    pub fn spawn_sink(&mut self) {
        let c = stage_config(&self.env, &self.topics, "sink");
        let audio = clisonix_audio::AudioStore::from_url(&self.audio_store).unwrap();
        let sink = Sink::new(Results::new(self.db.pool.clone(), audio), &c.topics);
        let config = TablesConfig {
            kafka: c.kafka,
            topics: c.topics,
            group: c.group,
            batch_max: 500,
            batch_linger: Duration::from_millis(20),
        };
        let token = self.stop.clone();
        self.tasks.push(tokio::spawn(async move {
            run_tables(sink, config, Health::default(), token)
                .await
                .expect("the sink runs");
        }));
    }

    /// A results client with `key`.
    pub fn reader(&self, key: &str) -> Client {
        Client::new(&self.gateway, key).unwrap()
    }

    /// GETs `path` until `done` holds for the JSON answer (or fails after `timeout`).
    pub async fn wait_for(
        &self,
        client: &mut Client,
        path: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let a = client.get(path).await.unwrap();
            if a.status == 200 {
                let v = a.json();
                if done(&v) {
                    return v;
                }
                assert!(Instant::now() < deadline, "{path} never got there: {v}");
            } else {
                assert!(
                    a.status == 404 && Instant::now() < deadline,
                    "{path}: {} {}",
                    a.status,
                    String::from_utf8_lossy(&a.body)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
        self.db.drop_now().await;
        self.env.delete_topics(self.topics.prefix()).await;
    }
}

/// The body of an answer as text.
pub fn text(a: &Answer) -> String {
    String::from_utf8_lossy(&a.body).into_owned()
}
