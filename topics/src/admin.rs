//! Applying the catalog to a cluster: create the topics idempotently, report existing
//! topics whose settings differ, list and describe them with partition watermarks.
//!
//! These calls block (with [`ADMIN_TIMEOUT`]); from async code run them in
//! `spawn_blocking`. rdkafka's admin futures are driven by the client's own thread,
//! so they are awaited here with a plain executor and need no async runtime.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::executor::block_on;
use rdkafka::admin::{
    AdminClient, AdminOptions, ConfigSource, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;

use crate::catalog::{TopicSpec, Topics};
use crate::client::{KafkaSettings, ADMIN_TIMEOUT};

/// A failed admin operation.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach Kafka at {bootstrap}: {source}")]
    Connect {
        bootstrap: String,
        #[source]
        source: KafkaError,
    },
    #[error("Kafka {operation} failed: {source}")]
    Kafka {
        operation: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("creating topic {topic} failed: {code}")]
    Create {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("describing the config of topic {topic} failed: {code}")]
    DescribeConfig {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("topic {topic} was created but its partitions have no serving leader yet")]
    NotReady { topic: String },
    #[error("replication factor {requested} needs that many brokers; the cluster has {brokers}")]
    Replication { requested: i32, brokers: usize },
}

/// How many copies of each partition to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replication {
    /// Three where the cluster has three brokers, else as many as it has.
    #[default]
    Auto,
    Fixed(i32),
}

/// A setting of an existing topic that is not what the catalog says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub setting: String,
    pub expected: String,
    pub actual: String,
}

/// What `ensure` did with one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created {
        replication: i32,
    },
    Unchanged,
    /// The topic exists with other settings; nothing was changed.
    Conflict(Vec<Difference>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicReport {
    pub topic: String,
    pub outcome: Outcome,
}

/// One partition of a described topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub id: i32,
    pub leader: i32,
    pub replicas: Vec<i32>,
    pub in_sync: Vec<i32>,
    /// Offset of the oldest retained record.
    pub low: i64,
    /// Offset the next record will get.
    pub high: i64,
}

/// A topic as the cluster has it.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicDescription {
    pub topic: String,
    pub spec: Option<&'static TopicSpec>,
    /// `None` when the topic does not exist.
    pub partitions: Option<Vec<PartitionInfo>>,
    /// Settings that are not the broker's defaults.
    pub configs: BTreeMap<String, String>,
}

impl TopicDescription {
    /// Records currently retained (sum of high - low).
    pub fn retained_records(&self) -> i64 {
        self.partitions
            .iter()
            .flatten()
            .map(|p| p.high - p.low)
            .sum()
    }
}

/// A connection for administering the catalog's topics.
pub struct Admin {
    client: AdminClient<DefaultClientContext>,
    settings: KafkaSettings,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("bootstrap", &self.settings.bootstrap)
            .finish()
    }
}

impl Admin {
    /// Connects and checks that the cluster answers.
    pub fn connect(settings: &KafkaSettings) -> Result<Admin, AdminError> {
        let connect = |source| AdminError::Connect {
            bootstrap: settings.bootstrap.clone(),
            source,
        };
        let client: AdminClient<DefaultClientContext> =
            settings.admin().create().map_err(connect)?;
        client
            .inner()
            .fetch_metadata(None, ADMIN_TIMEOUT)
            .map_err(connect)?;
        Ok(Admin {
            client,
            settings: settings.clone(),
        })
    }

    fn metadata(&self, topic: Option<&str>) -> Result<Metadata, AdminError> {
        self.client
            .inner()
            .fetch_metadata(topic, ADMIN_TIMEOUT)
            .map_err(|source| AdminError::Kafka {
                operation: "metadata",
                source,
            })
    }

    /// Partition count of every existing topic.
    fn existing(&self) -> Result<BTreeMap<String, usize>, AdminError> {
        Ok(existing_in(&self.metadata(None)?))
    }

    /// Creates every catalog topic that is missing and checks every one that exists.
    /// Running it twice changes nothing the second time; an existing topic with other
    /// settings is reported as a [`Outcome::Conflict`] and left as it is.
    pub fn ensure(
        &self,
        topics: &Topics,
        replication: Replication,
    ) -> Result<Vec<TopicReport>, AdminError> {
        // One metadata fetch answers both: which topics exist, and how many brokers.
        let metadata = self.metadata(None)?;
        let existing = existing_in(&metadata);
        let brokers = metadata.brokers().len();
        let factor = match replication {
            Replication::Auto => brokers.min(3) as i32,
            Replication::Fixed(n) if n as usize > brokers || n < 1 => {
                return Err(AdminError::Replication {
                    requested: n,
                    brokers,
                })
            }
            Replication::Fixed(n) => n,
        };

        let mut reports = Vec::new();
        let missing: Vec<(String, &TopicSpec)> = topics
            .all()
            .filter(|(name, _)| !existing.contains_key(name))
            .collect();
        let configs: Vec<Vec<(&str, String)>> =
            missing.iter().map(|(_, spec)| spec.configs()).collect();
        let new_topics: Vec<NewTopic> = missing
            .iter()
            .zip(&configs)
            .map(|((name, spec), configs)| {
                configs.iter().fold(
                    NewTopic::new(name, spec.partitions, TopicReplication::Fixed(factor)),
                    |topic, (k, v)| topic.set(k, v),
                )
            })
            .collect();
        let mut raced = Vec::new();
        if !new_topics.is_empty() {
            let results = block_on(self.client.create_topics(
                &new_topics,
                &AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)),
            ))
            .map_err(|source| AdminError::Kafka {
                operation: "create topics",
                source,
            })?;
            for result in results {
                match result {
                    Ok(topic) => reports.push(TopicReport {
                        topic,
                        outcome: Outcome::Created {
                            replication: factor,
                        },
                    }),
                    // Someone else created it meanwhile: check it like any existing topic.
                    Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => raced.push(topic),
                    Err((topic, code)) => return Err(AdminError::Create { topic, code }),
                }
            }
        }

        for (name, spec) in topics.all() {
            let partitions = match existing.get(&name) {
                Some(&p) => p,
                None if raced.contains(&name) => self.partition_count_when_listed(&name)?,
                None => continue,
            };
            let differences = self.differences(&name, spec, partitions)?;
            reports.push(TopicReport {
                topic: name,
                outcome: if differences.is_empty() {
                    Outcome::Unchanged
                } else {
                    Outcome::Conflict(differences)
                },
            });
        }
        let created: Vec<String> = reports
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Created { .. }))
            .map(|r| r.topic.clone())
            .collect();
        self.wait_ready(&created)?;
        // Report in catalog order.
        let order: Vec<String> = topics.all().map(|(n, _)| n).collect();
        reports.sort_by_key(|r| order.iter().position(|n| *n == r.topic));
        Ok(reports)
    }

    /// Waits until every partition of `topics` has a leader that answers offset
    /// queries, so a topic reported as created can be used at once.
    fn wait_ready(&self, topics: &[String]) -> Result<(), AdminError> {
        for topic in topics {
            for partition in 0..self.partition_count_when_listed(topic)? {
                self.watermarks(topic, partition as i32)?;
            }
        }
        Ok(())
    }

    /// The partition count of a (possibly just created) topic, once metadata lists it
    /// with a leader for every partition.
    fn partition_count_when_listed(&self, topic: &str) -> Result<usize, AdminError> {
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        loop {
            let metadata = self.metadata(Some(topic))?;
            let listed = metadata.topics().first().filter(|t| {
                t.error().is_none()
                    && !t.partitions().is_empty()
                    && t.partitions()
                        .iter()
                        .all(|p| p.leader() >= 0 && p.error().is_none())
            });
            if let Some(t) = listed {
                return Ok(t.partitions().len());
            }
            if Instant::now() > deadline {
                return Err(AdminError::NotReady {
                    topic: topic.to_owned(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Low and high watermark of a partition, retrying while leadership settles
    /// (a new topic's leader can be listed before it serves offset queries).
    fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), AdminError> {
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        loop {
            match self
                .client
                .inner()
                .fetch_watermarks(topic, partition, ADMIN_TIMEOUT)
            {
                Ok(marks) => return Ok(marks),
                Err(e) if is_transient(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(AdminError::Kafka {
                        operation: "watermarks",
                        source,
                    })
                }
            }
        }
    }

    fn differences(
        &self,
        topic: &str,
        spec: &TopicSpec,
        partitions: usize,
    ) -> Result<Vec<Difference>, AdminError> {
        let mut differences = Vec::new();
        if partitions != spec.partitions as usize {
            differences.push(Difference {
                setting: "partitions".into(),
                expected: spec.partitions.to_string(),
                actual: partitions.to_string(),
            });
        }
        let actual = self.configs(topic, true)?;
        for (setting, expected) in spec.configs() {
            let value = actual.get(setting).cloned().unwrap_or_default();
            if value != expected {
                differences.push(Difference {
                    setting: setting.to_owned(),
                    expected,
                    actual: value,
                });
            }
        }
        Ok(differences)
    }

    /// A topic's configs: all of them, or only those not at the broker's defaults.
    fn configs(&self, topic: &str, all: bool) -> Result<BTreeMap<String, String>, AdminError> {
        let results = block_on(self.client.describe_configs(
            &[ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT)),
        ))
        .map_err(|source| AdminError::Kafka {
            operation: "describe configs",
            source,
        })?;
        let mut configs = BTreeMap::new();
        for result in results {
            let resource = result.map_err(|code| AdminError::DescribeConfig {
                topic: topic.to_owned(),
                code,
            })?;
            for entry in resource.entries {
                let explicit = matches!(entry.source, ConfigSource::DynamicTopic);
                if all || explicit {
                    configs.insert(entry.name, entry.value.unwrap_or_default());
                }
            }
        }
        Ok(configs)
    }

    /// Describes catalog topics (or the given deployed names): partitions with
    /// leaders, replicas and watermarks, and non-default settings.
    pub fn describe(
        &self,
        topics: &Topics,
        only: &[String],
    ) -> Result<Vec<TopicDescription>, AdminError> {
        let names: Vec<String> = if only.is_empty() {
            topics.all().map(|(n, _)| n).collect()
        } else {
            only.to_vec()
        };
        let existing = self.existing()?;
        let mut out = Vec::new();
        for topic in names {
            let spec = topics.spec_of(&topic);
            if !existing.contains_key(&topic) {
                out.push(TopicDescription {
                    topic,
                    spec,
                    partitions: None,
                    configs: BTreeMap::new(),
                });
                continue;
            }
            let metadata = self.metadata(Some(&topic))?;
            let mut partitions = Vec::new();
            for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
                let (low, high) = self.watermarks(&topic, p.id())?;
                partitions.push(PartitionInfo {
                    id: p.id(),
                    leader: p.leader(),
                    replicas: p.replicas().to_vec(),
                    in_sync: p.isr().to_vec(),
                    low,
                    high,
                });
            }
            partitions.sort_by_key(|p| p.id);
            let configs = self.configs(&topic, false)?;
            out.push(TopicDescription {
                topic,
                spec,
                partitions: Some(partitions),
                configs,
            });
        }
        Ok(out)
    }
}

/// Partition count of every topic the metadata lists without error.
fn existing_in(metadata: &Metadata) -> BTreeMap<String, usize> {
    metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_owned(), t.partitions().len()))
        .collect()
}

/// Errors that pass once partition leadership settles.
fn is_transient(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::UnknownTopic
        )
    )
}
