//! Moving a consumer group's committed offsets, safely: a plan first (per partition,
//! from → to, each target inside what the partition retains), applied only on request
//! and only while the group has no live members (a running consumer would overwrite
//! the move with its next commit). Plans can be written to a file and applied later.

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::client::{KafkaSettings, ADMIN_TIMEOUT};

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("group {group} has {members} live member(s) ({state}): stop its consumers first, or they overwrite the move")]
    Live {
        group: String,
        members: usize,
        state: String,
    },
    #[error("group {0} has no committed offsets on these topics, and no --topic was given")]
    Nothing(String),
    #[error("no topic {0} on the cluster")]
    UnknownTopic(String),
    #[error("the plan is for group {plan}, not {group}")]
    OtherGroup { plan: String, group: String },
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// The commit-metadata key under which a Clisonix stage records the last input offset
/// whose outputs are out (it commits the oldest offset its open state still needs).
pub const EMITTED_THROUGH: &str = "emitted_through=";

/// The number after `key` in commit metadata such as `emitted_through=12;end=40`.
pub fn metadata_value(metadata: &str, key: &str) -> Option<i64> {
    metadata
        .split(';')
        .find_map(|part| part.strip_prefix(key))
        .and_then(|n| n.parse().ok())
}

/// Where to move a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Earliest,
    Latest,
    Offset(i64),
    /// The first record at or after this time.
    Time(DateTime<Utc>),
    /// This many records later (negative: earlier) than the committed offset.
    Shift(i64),
}

/// One partition's move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub topic: String,
    pub partition: i32,
    /// The committed offset now (none: never committed).
    pub from: Option<i64>,
    pub to: i64,
}

/// A plan: a group's moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub group: String,
    pub moves: Vec<Move>,
}

fn offsets_consumer(settings: &KafkaSettings, group: &str) -> Result<BaseConsumer, KafkaError> {
    // The offsets committed, not waiting for a crashed member's open transaction.
    settings
        .consumer(group)
        .set("isolation.level", "read_uncommitted")
        .create()
}

/// The group's state and how many members it has (`Dead`, 0 when it does not exist).
pub fn members(settings: &KafkaSettings, group: &str) -> Result<(String, usize), ResetError> {
    let c: BaseConsumer = settings.admin().create()?;
    let list = c.fetch_group_list(Some(group), ADMIN_TIMEOUT)?;
    Ok(list
        .groups()
        .iter()
        .find(|g| g.name() == group)
        .map_or(("Dead".to_owned(), 0), |g| {
            (g.state().to_owned(), g.members().len())
        }))
}

/// Plans moving `group` to `target` on `topics`: every partition of them the group has
/// committed on, or, with `all_partitions`, every partition of them.
pub fn plan(
    settings: &KafkaSettings,
    group: &str,
    topics: &[String],
    all_partitions: bool,
    target: Target,
) -> Result<Plan, ResetError> {
    let c = offsets_consumer(settings, group)?;
    let metadata = c.fetch_metadata(None, ADMIN_TIMEOUT)?;
    let mut tpl = TopicPartitionList::new();
    for name in topics {
        let Some(t) = metadata
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
        else {
            if all_partitions {
                return Err(ResetError::UnknownTopic(name.clone()));
            }
            continue;
        };
        for p in t.partitions() {
            tpl.add_partition(name, p.id());
        }
    }
    let committed = c.committed_offsets(tpl, ADMIN_TIMEOUT)?;
    let mut moves = Vec::new();
    for e in committed.elements() {
        let from = e.offset().to_raw().filter(|&o| o >= 0);
        if from.is_none() && !all_partitions {
            continue;
        }
        let (low, high) = c.fetch_watermarks(e.topic(), e.partition(), ADMIN_TIMEOUT)?;
        let to = match target {
            Target::Earliest => low,
            Target::Latest => high,
            Target::Offset(o) => o,
            Target::Shift(n) => from.unwrap_or(low).saturating_add(n),
            Target::Time(t) => {
                let mut q = TopicPartitionList::new();
                q.add_partition_offset(
                    e.topic(),
                    e.partition(),
                    Offset::Offset(t.timestamp_millis()),
                )?;
                let found = c.offsets_for_times(q, ADMIN_TIMEOUT)?;
                match found.elements().first().map(|x| x.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => high,
                }
            }
        }
        .clamp(low, high);
        moves.push(Move {
            topic: e.topic().to_owned(),
            partition: e.partition(),
            from,
            to,
        });
    }
    if moves.is_empty() {
        return Err(ResetError::Nothing(group.to_owned()));
    }
    moves.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(Plan {
        group: group.to_owned(),
        moves,
    })
}

/// Applies `plan` to `group`, refusing while the group has live members.
pub fn apply(settings: &KafkaSettings, group: &str, plan: &Plan) -> Result<(), ResetError> {
    if plan.group != group {
        return Err(ResetError::OtherGroup {
            plan: plan.group.clone(),
            group: group.to_owned(),
        });
    }
    let (state, live) = members(settings, group)?;
    if live > 0 {
        return Err(ResetError::Live {
            group: group.to_owned(),
            members: live,
            state,
        });
    }
    let c = offsets_consumer(settings, group)?;
    let mut tpl = TopicPartitionList::new();
    for m in &plan.moves {
        tpl.add_partition_offset(&m.topic, m.partition, Offset::Offset(m.to))?;
    }
    c.commit(&tpl, CommitMode::Sync)?;
    Ok(())
}
