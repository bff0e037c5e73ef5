//! The development stack as a whole: where each part runs, bringing it up (Postgres,
//! Kafka, topics, migrations, stripe-mock) and down, and what runs where.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clisonix_topics::{Admin, KafkaSettings, Outcome, Replication, Topics};

use crate::kafka::{self, KafkaNode};
use crate::postgres::{redact, Postgres};
use crate::stripe_mock::{self, StripeMock};

/// The stack of this checkout, configured from the environment.
#[derive(Debug, Clone)]
pub struct Stack {
    pub root: PathBuf,
    /// Our own broker, unless `CLISONIX_KAFKA_BOOTSTRAP` names another Kafka.
    pub kafka: Option<KafkaNode>,
    external_kafka: Option<String>,
    pub postgres: Postgres,
    pub topics: Topics,
    /// Stripe's API simulator, which the Stripe calls are tested against.
    pub stripe_mock: StripeMock,
    /// The tests' Python environment (independent implementations to check against).
    pub python: crate::python::Python,
    /// Where the sink writes audio and the gateway reads it (`CLISONIX_AUDIO_STORE`;
    /// by default the folder `.dev/audio`).
    pub audio_store: String,
}

/// What `up` started (so a caller can stop exactly that again).
#[derive(Debug, Clone, Copy, Default)]
pub struct Started {
    pub kafka: bool,
    pub postgres: bool,
    pub stripe_mock: bool,
}

impl Started {
    pub fn any(self) -> bool {
        self.kafka || self.postgres || self.stripe_mock
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn port(name: &str, default: u16) -> anyhow::Result<u16> {
    match env(name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .with_context(|| format!("{name}={v} is not a port number")),
    }
}

impl Stack {
    pub fn from_env(root: &Path) -> anyhow::Result<Stack> {
        let state = root.join(".dev");
        let node = KafkaNode {
            dir: state.join("kafka"),
            cache: cache_dir()?.join(format!("kafka-{}", kafka::VERSION)),
            port: port("CLISONIX_KAFKA_PORT", 19092)?,
            controller_port: port("CLISONIX_KAFKA_CONTROLLER_PORT", 19093)?,
            java_options: env("CLISONIX_KAFKA_JAVA_OPTS")
                .map(|o| o.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
        };
        let private = Postgres::Private {
            dir: state.join("postgres"),
            port: port("CLISONIX_PG_PORT", 15432)?,
        };
        // After `eval "$(./dev env)"` these variables name the stack itself: only an
        // address other than our own means someone else's service.
        let external_kafka = env("CLISONIX_KAFKA_BOOTSTRAP").filter(|b| *b != node.bootstrap());
        let kafka = external_kafka.is_none().then_some(node);
        let postgres = match env("DATABASE_URL") {
            Some(url) if url != private.url() => Postgres::External { url },
            _ => private,
        };
        Ok(Stack {
            root: root.to_owned(),
            kafka,
            external_kafka,
            postgres,
            topics: Topics::new(env("CLISONIX_TOPIC_PREFIX").unwrap_or_default()),
            stripe_mock: StripeMock {
                dir: state.join("stripe-mock"),
                cache: cache_dir()?.join(format!("stripe-mock-{}", stripe_mock::VERSION)),
                port: port("CLISONIX_STRIPE_MOCK_PORT", 12111)?,
            },
            python: crate::python::Python::new(root, &cache_dir()?),
            audio_store: env("CLISONIX_AUDIO_STORE")
                .unwrap_or_else(|| format!("file://{}", state.join("audio").display())),
        })
    }

    pub fn bootstrap(&self) -> String {
        match (&self.kafka, &self.external_kafka) {
            (Some(node), _) => node.bootstrap(),
            (None, Some(external)) => external.clone(),
            (None, None) => unreachable!("either our node or an external one"),
        }
    }

    pub fn kafka_settings(&self, client_id: &str) -> KafkaSettings {
        KafkaSettings::new(self.bootstrap(), client_id)
    }

    pub fn migrations(&self) -> PathBuf {
        self.root.join("gateway/migrations")
    }

    /// Environment variables that point programs at this stack.
    pub fn env_vars(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            ("CLISONIX_KAFKA_BOOTSTRAP", self.bootstrap()),
            ("DATABASE_URL", self.postgres.url()),
            ("CLISONIX_STRIPE_API_BASE", self.stripe_mock.url()),
            ("CLISONIX_AUDIO_STORE", self.audio_store.clone()),
        ];
        if let Ok(python) = self.python.interpreter() {
            vars.push(("CLISONIX_PYTHON", python.display().to_string()));
        }
        vars
    }

    /// Brings everything up; idempotent. Returns what it started. When a step fails,
    /// what this call started is stopped again, so a failed `up` leaves nothing behind.
    pub fn up(&self, runtime: &tokio::runtime::Runtime) -> anyhow::Result<Started> {
        let mut started = Started::default();
        let result = self.bring_up(runtime, &mut started);
        if let Err(error) = result {
            if let Err(cleanup) = self.down_started(started) {
                eprintln!("warning: stopping what was started failed: {cleanup:#}");
            }
            return Err(error);
        }
        Ok(started)
    }

    fn bring_up(
        &self,
        runtime: &tokio::runtime::Runtime,
        started: &mut Started,
    ) -> anyhow::Result<()> {
        started.postgres = self.postgres.start().context("starting Postgres")?;
        if let Some(node) = &self.kafka {
            started.kafka = node.start().context("starting Kafka")?;
        }
        let admin =
            Admin::connect(&self.kafka_settings("clisonix-dev")).context("connecting to Kafka")?;
        let reports = admin
            .ensure(&self.topics, Replication::Auto)
            .context("creating the catalog's topics")?;
        let conflicts: Vec<String> = reports
            .iter()
            .filter_map(|r| match &r.outcome {
                Outcome::Conflict(diffs) => Some(format!(
                    "{}: {}",
                    r.topic,
                    diffs
                        .iter()
                        .map(|d| format!("{} is {} (catalog: {})", d.setting, d.actual, d.expected))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                _ => None,
            })
            .collect();
        if !conflicts.is_empty() {
            bail!(
                "topics differ from the catalog (nothing was changed):\n  {}\n\
                 Start afresh with ./dev reset --yes, or use CLISONIX_TOPIC_PREFIX.",
                conflicts.join("\n  ")
            );
        }
        let created = reports
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Created { .. }))
            .count();
        if created > 0 {
            eprintln!("==> Created {created} topics");
        }
        runtime
            .block_on(self.postgres.prepare(&self.migrations()))
            .context("preparing the database")?;
        started.stripe_mock = self.stripe_mock.start().context("starting stripe-mock")?;
        Ok(())
    }

    /// Stops what runs of our own stack (external services are left alone).
    pub fn down(&self) -> anyhow::Result<()> {
        if let Some(node) = &self.kafka {
            if node.stop()? {
                eprintln!("==> Kafka stopped");
            }
        }
        if self.postgres.stop()? {
            eprintln!("==> Postgres stopped");
        }
        if self.stripe_mock.stop()? {
            eprintln!("==> stripe-mock stopped");
        }
        Ok(())
    }

    /// Stops exactly what an `up` started.
    pub fn down_started(&self, started: Started) -> anyhow::Result<()> {
        if started.kafka {
            if let Some(node) = &self.kafka {
                node.stop()?;
                eprintln!("==> Kafka stopped");
            }
        }
        if started.postgres && self.postgres.stop()? {
            eprintln!("==> Postgres stopped");
        }
        if started.stripe_mock && self.stripe_mock.stop()? {
            eprintln!("==> stripe-mock stopped");
        }
        Ok(())
    }

    /// Deletes all local data (stops the stack first).
    pub fn reset(&self) -> anyhow::Result<()> {
        self.down()?;
        if let Some(node) = &self.kafka {
            node.reset()?;
        }
        self.postgres.reset()?;
        Ok(())
    }

    /// One line per part: what runs where.
    pub fn status(&self) -> Vec<String> {
        let mut lines = Vec::new();
        match &self.kafka {
            Some(node) => lines.push(match node.running() {
                Some(pid) => format!(
                    "kafka     running   {} (Apache Kafka {} KRaft, pid {pid}, data {}, log {})",
                    node.bootstrap(),
                    kafka::VERSION,
                    node.dir.join("data").display(),
                    node.log_file().display()
                ),
                None => format!(
                    "kafka     stopped   {} (./dev up starts it)",
                    node.bootstrap()
                ),
            }),
            None => lines.push(format!(
                "kafka     external  {} (CLISONIX_KAFKA_BOOTSTRAP)",
                self.bootstrap()
            )),
        }
        lines.push(match &self.postgres {
            Postgres::External { url } => {
                format!("postgres  external  {} (DATABASE_URL)", redact(url))
            }
            Postgres::Private { dir, .. } => {
                if self.postgres.running() {
                    format!(
                        "postgres  running   {} (data {}, log {})",
                        self.postgres.url(),
                        dir.join("data").display(),
                        dir.join("postgres.log").display()
                    )
                } else {
                    format!(
                        "postgres  stopped   {} (./dev up starts it)",
                        self.postgres.url()
                    )
                }
            }
        });
        lines.push(match self.stripe_mock.running() {
            Some(pid) => format!(
                "stripe    running   {} (stripe-mock {}, pid {pid}, log {})",
                self.stripe_mock.url(),
                stripe_mock::VERSION,
                self.stripe_mock.log_file().display()
            ),
            None => format!(
                "stripe    stopped   {} (./dev up starts stripe-mock)",
                self.stripe_mock.url()
            ),
        });
        lines
    }

    /// Whether our own parts all run.
    pub fn running(&self) -> bool {
        self.kafka.as_ref().is_none_or(|n| n.running().is_some())
            && self.postgres.running()
            && self.stripe_mock.running().is_some()
    }
}

/// Where fetched artifacts are kept across checkouts.
/// Where fetched artifacts (the Kafka server) are cached, shared by checkouts.
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = env("CLISONIX_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = env("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("clisonix"));
    }
    let home = env("HOME").context("HOME is not set; set CLISONIX_CACHE_DIR")?;
    Ok(PathBuf::from(home).join(".cache/clisonix"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stacks_own_addresses_are_not_external() {
        // The only test that touches these variables (they are process-wide).
        let root = Path::new("/tmp/clisonix-stack-test");
        std::env::set_var("CLISONIX_KAFKA_BOOTSTRAP", "127.0.0.1:19092");
        std::env::set_var(
            "DATABASE_URL",
            "postgres://clisonix@127.0.0.1:15432/clisonix",
        );
        let own = Stack::from_env(root).unwrap();
        assert!(
            own.kafka.is_some(),
            "eval \"$(./dev env)\" still means our broker"
        );
        assert!(matches!(own.postgres, Postgres::Private { .. }));
        std::env::set_var("CLISONIX_KAFKA_BOOTSTRAP", "kafka.example:9092");
        std::env::set_var("DATABASE_URL", "postgres://app@db.example/clisonix");
        let other = Stack::from_env(root).unwrap();
        assert!(other.kafka.is_none());
        assert_eq!(other.bootstrap(), "kafka.example:9092");
        assert!(matches!(other.postgres, Postgres::External { .. }));
        std::env::remove_var("CLISONIX_KAFKA_BOOTSTRAP");
        std::env::remove_var("DATABASE_URL");
    }
}
