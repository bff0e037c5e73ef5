//! Consumer lag, evaluated once for every tool that needs it (`clisonix-topics lag`,
//! the health stage): per partition the committed offset, the end offset, the lag in
//! records and in seconds (the age of the oldest record not yet consumed, from its
//! timestamp), and a status by the rules Burrow uses, from offsets sampled over a
//! window:
//!
//! - **REWIND**: the committed offset went backwards within the window;
//! - **OK**: the lag was zero at some point in the window (caught up), or the offsets
//!   moved and the lag shrank;
//! - **STOP**: lag and nobody in the group to consume it (no members);
//! - **STALL**: lag, members, and the committed offset did not move in the window;
//! - **WARN**: the offsets moved, but the lag did not shrink (falling behind).
//!
//! [`evaluate`] is the rule set (pure); [`observe`] samples a group on the broker.
//! Observing joins no group and commits nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::client::{KafkaSettings, ADMIN_TIMEOUT};

#[derive(Debug, thiserror::Error)]
pub enum LagError {
    #[error("no consumer group {0} on the cluster (clisonix-topics lag lists them)")]
    UnknownGroup(String),
    #[error("group {0} has committed no offsets on these topics")]
    NoOffsets(String),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// A partition's (or group's: the worst of its partitions') state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Ok,
    Warn,
    Rewind,
    Stall,
    Stop,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Rewind => "REWIND",
            Status::Stall => "STALL",
            Status::Stop => "STOP",
        }
    }
}

/// One observation of a partition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// The group's committed offset (the next record it will read), if any.
    pub committed: Option<i64>,
    /// The partition's end (the last stable offset).
    pub end: i64,
    /// Records not yet consumed.
    pub lag: i64,
}

/// The status of a partition from its samples, oldest first (Burrow's rules, above).
/// `members`: whether the group has members at all.
pub fn evaluate(samples: &[Sample], members: bool) -> Status {
    let Some(last) = samples.last() else {
        return Status::Ok;
    };
    let committed: Vec<i64> = samples.iter().filter_map(|s| s.committed).collect();
    if committed.windows(2).any(|w| w[1] < w[0]) {
        return Status::Rewind;
    }
    if samples.iter().any(|s| s.lag == 0) {
        return Status::Ok;
    }
    if !members {
        return Status::Stop;
    }
    let first = samples[0];
    if samples.len() < 2 {
        // One observation cannot tell a slow consumer from a stuck one.
        return Status::Ok;
    }
    if first.committed == last.committed {
        return Status::Stall;
    }
    if last.lag >= first.lag {
        return Status::Warn;
    }
    Status::Ok
}

/// A partition's lag as observed at the end of the window.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    pub committed: Option<i64>,
    pub end: i64,
    pub lag: i64,
    /// How long ago the oldest record not yet consumed was written (0 without lag).
    pub lag_seconds: f64,
    pub status: Status,
}

/// A member of a group.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub client_id: String,
    pub host: String,
}

/// A group's lag: its partitions, state and members.
#[derive(Debug, Clone, Serialize)]
pub struct GroupLag {
    pub group: String,
    /// The broker's group state (`Stable`, `Empty`, `PreparingRebalance`, …).
    pub state: String,
    pub members: Vec<Member>,
    /// The worst of its partitions.
    pub status: Status,
    pub lag: i64,
    pub max_lag_seconds: f64,
    pub partitions: Vec<PartitionLag>,
}

/// The consumer groups on the cluster, with their state.
pub fn groups(settings: &KafkaSettings) -> Result<Vec<(String, String)>, LagError> {
    let c: BaseConsumer = settings.admin().create()?;
    let list = c.fetch_group_list(None, ADMIN_TIMEOUT)?;
    let mut out: Vec<(String, String)> = list
        .groups()
        .iter()
        .filter(|g| g.protocol_type() == "consumer" || g.protocol_type().is_empty())
        .map(|g| (g.name().to_owned(), g.state().to_owned()))
        .collect();
    out.sort();
    Ok(out)
}

fn group_info(c: &BaseConsumer, group: &str) -> Result<(String, Vec<Member>), LagError> {
    let list = c.fetch_group_list(Some(group), ADMIN_TIMEOUT)?;
    let g = list
        .groups()
        .iter()
        .find(|g| g.name() == group)
        .ok_or_else(|| LagError::UnknownGroup(group.to_owned()))?;
    if g.state() == "Dead" {
        return Err(LagError::UnknownGroup(group.to_owned()));
    }
    let members = g
        .members()
        .iter()
        .map(|m| Member {
            client_id: m.client_id().to_owned(),
            host: m.client_host().to_owned(),
        })
        .collect();
    Ok((g.state().to_owned(), members))
}

/// Per (topic, partition): the time of its first unconsumed record, if it has one.
type Stamps = HashMap<(String, i32), Option<DateTime<Utc>>>;

/// The timestamp of the first readable record at or after `offset` in each (topic,
/// partition, offset); `None` for a partition with none (only transaction markers
/// are left: nothing to consume). One topic at a time: the end of a partition is
/// reported by partition number only.
fn timestamps(settings: &KafkaSettings, wanted: &[(String, i32, i64)]) -> Result<Stamps, LagError> {
    let mut out = HashMap::new();
    let topics: std::collections::BTreeSet<&String> = wanted.iter().map(|(t, _, _)| t).collect();
    for topic in topics {
        let mut config = settings.consumer(&format!("clisonix-lag-reader-{}", std::process::id()));
        config
            .set("fetch.wait.max.ms", "50")
            .set("enable.partition.eof", "true");
        let c: BaseConsumer<crate::consume::Quiet> =
            config.create_with_context(crate::consume::Quiet)?;
        let mut tpl = TopicPartitionList::new();
        let mut left = 0;
        for (t, p, o) in wanted.iter().filter(|(t, _, _)| t == topic) {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
            left += 1;
        }
        c.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while left > 0 && Instant::now() < deadline {
            let (p, t) = match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => (
                    m.partition(),
                    m.timestamp()
                        .to_millis()
                        .and_then(DateTime::<Utc>::from_timestamp_millis),
                ),
                Some(Err(KafkaError::PartitionEOF(p))) => (p, None),
                _ => continue,
            };
            let k = (topic.clone(), p);
            if out.contains_key(&k) {
                continue;
            }
            out.insert(k, t);
            left -= 1;
            // One record per partition is all that is needed.
            let mut done = TopicPartitionList::new();
            done.add_partition(topic, p);
            let _ = c.incremental_unassign(&done);
        }
    }
    Ok(out)
}

/// Observes `group` on `topics` for `window`, a sample every `every`, and evaluates
/// each partition where the group has committed an offset.
pub fn observe(
    settings: &KafkaSettings,
    group: &str,
    topics: &[String],
    window: Duration,
    every: Duration,
) -> Result<GroupLag, LagError> {
    let admin: BaseConsumer = settings.admin().create()?;
    let (_, _) = group_info(&admin, group)?;
    // A consumer with the group's id, never subscribed: it only fetches offsets.
    let mut config = settings.consumer(group);
    // The offsets committed, not waiting for an open transaction's (a crashed stage's
    // transaction stays open until it times out).
    config
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_uncommitted");
    let offsets: BaseConsumer = config.create()?;
    let metadata = admin.fetch_metadata(None, ADMIN_TIMEOUT)?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        if topics.iter().any(|w| w == t.name()) {
            for p in t.partitions() {
                tpl.add_partition(t.name(), p.id());
            }
        }
    }
    let mut samples: HashMap<(String, i32), Vec<Sample>> = HashMap::new();
    let started = Instant::now();
    loop {
        let committed = offsets.committed_offsets(tpl.clone(), ADMIN_TIMEOUT)?;
        for e in committed.elements() {
            // A Clisonix stage commits the oldest record its open sessions still need,
            // with the last record whose outputs are out in the metadata
            // (`emitted_through=N`): that is how far it has consumed.
            let emitted =
                crate::offsets::metadata_value(e.metadata(), crate::offsets::EMITTED_THROUGH)
                    .filter(|&n| n >= 0);
            let c = e
                .offset()
                .to_raw()
                .filter(|&o| o >= 0)
                .map(|o| emitted.map_or(o, |n| o.max(n + 1)));
            let (low, end) = admin.fetch_watermarks(e.topic(), e.partition(), ADMIN_TIMEOUT)?;
            let lag = (end - c.unwrap_or(low).max(low)).max(0);
            samples
                .entry((e.topic().to_owned(), e.partition()))
                .or_default()
                .push(Sample {
                    committed: c,
                    end,
                    lag,
                });
        }
        if started.elapsed() + every > window {
            break;
        }
        std::thread::sleep(every);
    }
    let (state, members) = group_info(&admin, group)?;
    // Only partitions the group has committed on.
    samples.retain(|_, s| s.iter().any(|x| x.committed.is_some()));
    if samples.is_empty() {
        return Err(LagError::NoOffsets(group.to_owned()));
    }
    let lagging: Vec<(String, i32, i64)> = samples
        .iter()
        .filter_map(|((t, p), s)| {
            let last = s.last()?;
            (last.lag > 0).then(|| (t.clone(), *p, last.end - last.lag))
        })
        .collect();
    let stamps = timestamps(settings, &lagging)?;
    let now = Utc::now();
    let mut partitions: Vec<PartitionLag> = samples
        .into_iter()
        .map(|((topic, partition), mut s)| {
            let stamp = stamps.get(&(topic.clone(), partition));
            if let (Some(None), Some(last)) = (stamp, s.last_mut()) {
                // Only transaction markers after the position: nothing to consume.
                last.lag = 0;
            }
            let last = *s.last().expect("a sample at least");
            let lag_seconds = stamp.copied().flatten().map_or(0.0, |t| {
                ((now - t).num_milliseconds() as f64 / 1000.0).max(0.0)
            });
            PartitionLag {
                status: evaluate(&s, !members.is_empty()),
                topic,
                partition,
                committed: last.committed,
                end: last.end,
                lag: last.lag,
                lag_seconds,
            }
        })
        .collect();
    partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(GroupLag {
        group: group.to_owned(),
        state,
        members,
        status: partitions
            .iter()
            .map(|p| p.status)
            .max()
            .unwrap_or(Status::Ok),
        lag: partitions.iter().map(|p| p.lag).sum(),
        max_lag_seconds: partitions.iter().map(|p| p.lag_seconds).fold(0.0, f64::max),
        partitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(committed: i64, end: i64) -> Sample {
        Sample {
            committed: Some(committed),
            end,
            lag: end - committed,
        }
    }

    #[test]
    fn burrows_rules() {
        // Caught up at some point: OK, whatever else.
        assert_eq!(
            evaluate(&[s(10, 20), s(20, 20), s(20, 30)], true),
            Status::Ok
        );
        // Consuming and catching up: OK.
        assert_eq!(
            evaluate(&[s(10, 40), s(20, 42), s(30, 44)], true),
            Status::Ok
        );
        // Consuming, but the lag grows: WARN.
        assert_eq!(
            evaluate(&[s(10, 20), s(12, 30), s(14, 40)], true),
            Status::Warn
        );
        // Members, lag, and no progress: STALL.
        assert_eq!(
            evaluate(&[s(10, 20), s(10, 25), s(10, 30)], true),
            Status::Stall
        );
        // Nobody in the group and lag: STOP.
        assert_eq!(evaluate(&[s(10, 20), s(10, 20)], false), Status::Stop);
        // Nobody in the group but nothing to read: OK.
        assert_eq!(evaluate(&[s(20, 20)], false), Status::Ok);
        // Offsets went back: REWIND.
        assert_eq!(
            evaluate(&[s(30, 40), s(10, 40), s(12, 40)], true),
            Status::Rewind
        );
        // One sample of a live group with lag: not enough to judge.
        assert_eq!(evaluate(&[s(10, 20)], true), Status::Ok);
        assert_eq!(evaluate(&[], true), Status::Ok);
        assert!(Status::Stop > Status::Stall && Status::Stall > Status::Warn);
    }
}
