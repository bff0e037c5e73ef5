//! Reading any topic: records decoded by their schemas' fingerprints, from and to an
//! offset, a time or a duration back, filtered by tenant, session and partition;
//! read-committed, counting what was skipped. What `clisonix-topics consume` runs.
//!
//! The reader is assigned its partitions (no consumer group joins, nothing is
//! committed), so reading never moves any group's offsets.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

use crate::client::{KafkaSettings, ADMIN_TIMEOUT};
use crate::records::decode_json;

#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("no topic {0} on the cluster (clisonix-topics list shows which exist)")]
    UnknownTopic(String),
    #[error("topic {topic} has no partition {partition} (it has {count})")]
    UnknownPartition {
        topic: String,
        partition: i32,
        count: usize,
    },
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// Where reading starts or stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Earliest,
    Latest,
    /// This offset, in every partition read.
    Offset(i64),
    /// The first record at or after this time (record timestamps).
    Time(DateTime<Utc>),
}

/// Parses `earliest`, `latest`, an offset (`1200`), an RFC 3339 time, or a duration
/// back from `now` (`-90s`, `-15m`, `-1h`, `-2d`).
pub fn parse_position(s: &str, now: DateTime<Utc>) -> Result<Position, String> {
    let s = s.trim();
    match s {
        "earliest" | "beginning" => return Ok(Position::Earliest),
        "latest" | "end" | "now" => return Ok(Position::Latest),
        _ => {}
    }
    if let Some(d) = s.strip_prefix('-') {
        let (n, unit) = d.split_at(d.find(|c: char| !c.is_ascii_digit()).unwrap_or(d.len()));
        let n: i64 = n
            .parse()
            .map_err(|_| format!("{s:?}: a duration back is -<number><s|m|h|d>, e.g. -1h"))?;
        let secs = match unit {
            "s" => n,
            "m" => n * 60,
            "h" => n * 3600,
            "d" => n * 86_400,
            _ => return Err(format!("{s:?}: the unit is s, m, h or d, e.g. -1h")),
        };
        return Ok(Position::Time(now - chrono::Duration::seconds(secs)));
    }
    if let Ok(offset) = s.parse::<i64>() {
        if offset < 0 {
            return Err(format!("{s:?}: an offset is 0 or more"));
        }
        return Ok(Position::Offset(offset));
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| Position::Time(t.with_timezone(&Utc)))
        .map_err(|_| {
            format!(
                "{s:?} is not earliest, latest, an offset, an RFC 3339 time \
                 (2026-12-07T10:00:00Z) or a duration back (-1h)"
            )
        })
}

/// What to read.
#[derive(Debug, Clone)]
pub struct Query {
    /// The topic as deployed (with any prefix).
    pub topic: String,
    /// Only these partitions (default: all).
    pub partitions: Vec<i32>,
    pub from: Position,
    /// Where to stop (exclusive). Without it: at the end as it was when reading
    /// started, or never when following.
    pub to: Option<Position>,
    /// Keep reading new records.
    pub follow: bool,
    /// Only records whose key or value has this `tenant_id`.
    pub tenant: Option<String>,
    /// Only records whose key or value has this `session_id`.
    pub session: Option<String>,
    /// Stop after this many records delivered.
    pub limit: Option<u64>,
}

impl Query {
    /// Every record of `topic` retained now, no filter.
    pub fn whole(topic: impl Into<String>) -> Query {
        Query {
            topic: topic.into(),
            partitions: Vec::new(),
            from: Position::Earliest,
            to: None,
            follow: false,
            tenant: None,
            session: None,
            limit: None,
        }
    }
}

/// One record read.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp, when it has one.
    pub timestamp: Option<DateTime<Utc>>,
    /// `eeg_frame/v1`, or `undecodable`.
    pub schema: String,
    pub key: Value,
    pub value: Value,
    /// Why the value (or key) could not be decoded.
    pub error: Option<String>,
}

impl Record {
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.timestamp.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            "schema": self.schema,
            "key": self.key,
            "value": self.value,
        });
        if let Some(e) = &self.error {
            v["error"] = Value::String(e.clone());
        }
        v
    }
}

/// What a read did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records handed on.
    pub delivered: u64,
    /// Records read but not matching the filters.
    pub filtered: u64,
    /// Offsets in the range that were never delivered: transaction markers and the
    /// records of aborted transactions (read-committed).
    pub skipped: u64,
    /// Records whose key or value no registered schema decodes.
    pub undecodable: u64,
}

/// Per partition: where reading starts and (unless following) stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub partition: i32,
    pub start: i64,
    /// Exclusive; `None` while following.
    pub end: Option<i64>,
}

/// Reaching a partition's end is how a bounded read knows it is done, not an error
/// to log.
#[derive(Debug)]
pub struct Quiet;

impl rdkafka::ClientContext for Quiet {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(
            error,
            KafkaError::PartitionEOF(_)
                | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::error!(%error, reason, "Kafka client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for Quiet {}

fn consumer(settings: &KafkaSettings) -> Result<BaseConsumer<Quiet>, KafkaError> {
    let mut config = settings.consumer(&format!("clisonix-topics-reader-{}", std::process::id()));
    config
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "100");
    config.create_with_context(Quiet)
}

/// Resolves the query's positions to offsets per partition.
pub fn plan(settings: &KafkaSettings, q: &Query) -> Result<Vec<Range>, ConsumeError> {
    let c = consumer(settings)?;
    ranges(&c, q)
}

fn ranges(c: &BaseConsumer<Quiet>, q: &Query) -> Result<Vec<Range>, ConsumeError> {
    let metadata = c.fetch_metadata(Some(&q.topic), ADMIN_TIMEOUT)?;
    let topic = metadata
        .topics()
        .iter()
        .find(|t| t.name() == q.topic)
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .ok_or_else(|| ConsumeError::UnknownTopic(q.topic.clone()))?;
    let all: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
    let partitions = if q.partitions.is_empty() {
        all.clone()
    } else {
        for &p in &q.partitions {
            if !all.contains(&p) {
                return Err(ConsumeError::UnknownPartition {
                    topic: q.topic.clone(),
                    partition: p,
                    count: all.len(),
                });
            }
        }
        q.partitions.clone()
    };
    let mut out = Vec::with_capacity(partitions.len());
    for p in partitions {
        let (low, high) = c.fetch_watermarks(&q.topic, p, ADMIN_TIMEOUT)?;
        let at = |pos: Position| -> Result<i64, ConsumeError> {
            Ok(match pos {
                Position::Earliest => low,
                Position::Latest => high,
                Position::Offset(o) => o.clamp(low, high),
                Position::Time(t) => offset_for_time(c, &q.topic, p, t, high)?,
            })
        };
        let start = at(q.from)?;
        let end = match q.to {
            Some(pos) => Some(at(pos)?.max(start)),
            None if q.follow => None,
            None => Some(high.max(start)),
        };
        out.push(Range {
            partition: p,
            start,
            end,
        });
    }
    Ok(out)
}

/// The first offset whose record's timestamp is at or after `t` (`high` when none).
fn offset_for_time(
    c: &BaseConsumer<Quiet>,
    topic: &str,
    partition: i32,
    t: DateTime<Utc>,
    high: i64,
) -> Result<i64, ConsumeError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(t.timestamp_millis()))?;
    let found = c.offsets_for_times(tpl, ADMIN_TIMEOUT)?;
    Ok(match found.elements().first().map(|e| e.offset()) {
        Some(Offset::Offset(o)) => o,
        _ => high,
    })
}

fn matches(want: &Option<String>, field: &str, key: &Value, value: &Value) -> bool {
    match want {
        None => true,
        Some(w) => {
            key.get(field).and_then(Value::as_str) == Some(w.as_str())
                || value.get(field).and_then(Value::as_str) == Some(w.as_str())
        }
    }
}

/// Reads what `q` asks for, handing each matching record to `each` (which answers
/// whether to go on); stops at the query's end, its limit, or when `stop` says so.
pub fn consume(
    settings: &KafkaSettings,
    q: &Query,
    mut each: impl FnMut(&Record) -> bool,
    stop: impl Fn() -> bool,
) -> Result<(Stats, Vec<Range>), ConsumeError> {
    let c = consumer(settings)?;
    let ranges = ranges(&c, q)?;
    let mut tpl = TopicPartitionList::new();
    // Per partition: the next offset expected, and the end.
    let mut next: HashMap<i32, (i64, Option<i64>)> = HashMap::new();
    for r in &ranges {
        if r.end.is_some_and(|e| e <= r.start) {
            continue;
        }
        tpl.add_partition_offset(&q.topic, r.partition, Offset::Offset(r.start))?;
        next.insert(r.partition, (r.start, r.end));
    }
    let mut stats = Stats::default();
    if next.is_empty() {
        return Ok((stats, ranges));
    }
    c.assign(&tpl)?;
    let mut idle_since = Instant::now();
    while !next.is_empty() && !stop() {
        let Some(polled) = c.poll(Duration::from_millis(200)) else {
            // Read-committed: an open transaction holds the end back; the range's
            // end is where the last stable offset was, so this is only a wait.
            if !q.follow && idle_since.elapsed() > Duration::from_secs(30) {
                break;
            }
            continue;
        };
        idle_since = Instant::now();
        let m = match polled {
            Ok(m) => m,
            Err(KafkaError::PartitionEOF(p)) => {
                // The end of what is readable now: what was not delivered was skipped.
                if let Some(&(expected, end)) = next.get(&p) {
                    let at = c.position().ok().and_then(|tpl| {
                        tpl.find_partition(&q.topic, p)
                            .and_then(|e| e.offset().to_raw())
                    });
                    if let Some(at) = at {
                        let upto = end.map_or(at, |e| at.min(e));
                        stats.skipped += (upto - expected).max(0) as u64;
                        next.insert(p, (upto.max(expected), end));
                    }
                    if !q.follow && end.is_none_or(|e| next[&p].0 >= e) {
                        next.remove(&p);
                    }
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let p = m.partition();
        let Some(&(expected, end)) = next.get(&p) else {
            continue;
        };
        let offset = m.offset();
        if end.is_some_and(|e| offset >= e) {
            stats.skipped += (end.unwrap_or(offset) - expected).max(0) as u64;
            next.remove(&p);
            continue;
        }
        stats.skipped += (offset - expected).max(0) as u64;
        next.insert(p, (offset + 1, end));
        if end.is_some_and(|e| offset + 1 >= e) {
            next.remove(&p);
        }
        let mut error = None;
        let key = match m.key().map(decode_json) {
            Some(Ok(d)) => d.value,
            Some(Err(e)) => {
                error = Some(format!("key: {e}"));
                Value::Null
            }
            None => Value::Null,
        };
        let (value, schema) = match m.payload().map(decode_json) {
            Some(Ok(d)) => {
                let name = d.schema_name();
                (d.value, name)
            }
            Some(Err(e)) => {
                error = Some(format!("value: {e}"));
                (Value::Null, "undecodable".to_owned())
            }
            None => (Value::Null, "tombstone".to_owned()),
        };
        if !matches(&q.tenant, "tenant_id", &key, &value)
            || !matches(&q.session, "session_id", &key, &value)
        {
            stats.filtered += 1;
            continue;
        }
        if error.is_some() {
            stats.undecodable += 1;
        }
        let record = Record {
            partition: p,
            offset,
            timestamp: m
                .timestamp()
                .to_millis()
                .and_then(DateTime::<Utc>::from_timestamp_millis),
            schema,
            key,
            value,
            error,
        };
        stats.delivered += 1;
        if !each(&record) || q.limit.is_some_and(|l| stats.delivered >= l) {
            break;
        }
    }
    Ok((stats, ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_and_bad_ones_say_why() {
        let now = DateTime::parse_from_rfc3339("2026-12-07T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        for (s, p) in [
            ("earliest", Position::Earliest),
            ("latest", Position::Latest),
            ("1200", Position::Offset(1200)),
            ("-90s", Position::Time(t("2026-12-07T11:58:30Z"))),
            ("-1h", Position::Time(t("2026-12-07T11:00:00Z"))),
            ("-2d", Position::Time(t("2026-12-05T12:00:00Z"))),
            (
                "2026-12-07T10:00:00+01:00",
                Position::Time(t("2026-12-07T09:00:00Z")),
            ),
        ] {
            assert_eq!(parse_position(s, now), Ok(p), "{s}");
        }
        for s in ["-1w", "-h", "yesterday", "-", "1.5"] {
            assert!(parse_position(s, now).is_err(), "{s}");
        }
    }
}
