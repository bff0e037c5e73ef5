//! What a stream stage is, independent of Kafka: a value that receives decoded records
//! one at a time and pushes its outputs into a buffer it is handed. Windows and other
//! state live inside the stage. The runtime (`clisonix-stage-runtime`) owns the loop —
//! consume, decode, process, produce, commit — as well as dead letters and metrics, so
//! a stage is tested with plain vectors.
//!
//! Two duties make exactly-once restarts possible without a state store:
//! - **Determinism.** Given the same records of a partition in the same order, a stage
//!   pushes the same outputs (no wall clock, no randomness, no iteration over hash maps
//!   into outputs).
//! - **Low watermarks.** [`Stage::needed_from`] tells the runtime the oldest input
//!   offset of a partition that the stage's open state still needs. The runtime commits
//!   that offset, so after a crash or rebalance it re-reads from there and the stage
//!   rebuilds its state; outputs of records it had already processed are discarded.

use clisonix_schemas::{AvroRecord, Family};

mod session;

pub use session::{
    check_same_stream, check_samples, Arrival, Placement, SeqTracker, SessionRef, SessionTable,
    Tracked, SEEN_HORIZON,
};

/// Where an input record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMeta {
    pub partition: i32,
    pub offset: i64,
    /// Kafka timestamp, milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    /// The record is re-read to rebuild state after a restart or rebalance: its outputs
    /// were already written and will be discarded, so a stage may skip costly work
    /// that only produces outputs (but must update its state exactly as usual).
    pub replay: bool,
}

impl RecordMeta {
    /// The record's time in milliseconds: its Kafka timestamp, else `fallback` (the
    /// frame's receive time). Stages judge idleness by it, never by the wall clock.
    pub fn record_time_ms(&self, fallback: clisonix_schemas::Timestamp) -> i64 {
        self.timestamp_ms.unwrap_or(fallback.as_millis())
    }
}

/// Where a record was read, for consumers that keep their own offsets (metering
/// records the offsets it applied in its database transaction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The record's Kafka timestamp, milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
}

/// Which catalog topic an output goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputTopic {
    EegFeatures,
    AudioChunks,
    EegSessions,
    UsageEvents,
}

/// One encoded output record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub topic: OutputTopic,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

impl Output {
    /// Encodes a key and value for `topic`. Encoding a domain value that the stage built
    /// itself cannot fail unless the stage has a bug, hence the panic.
    pub fn new<K: AvroRecord, V: AvroRecord>(topic: OutputTopic, key: &K, value: &V) -> Output {
        let key = clisonix_schemas::encode(key)
            .unwrap_or_else(|e| panic!("a stage built an invalid {} key: {e}", K::FAMILY));
        let value = clisonix_schemas::encode(value)
            .unwrap_or_else(|e| panic!("a stage built an invalid {} value: {e}", V::FAMILY));
        Output { topic, key, value }
    }
}

/// A record the stage refuses: it goes to the dead-letter topic with this reason, and
/// the stage goes on with the next record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Machine-readable reason, e.g. `non_finite_samples`, `sample_rate_changed`.
    pub code: &'static str,
    pub detail: String,
}

impl Rejection {
    pub fn new(code: &'static str, detail: impl Into<String>) -> Rejection {
        Rejection {
            code,
            detail: detail.into(),
        }
    }
}

/// A stream stage.
pub trait Stage: Send {
    /// The value type of the input topic.
    type Input: AvroRecord;

    /// The stage's name: its consumer group and the `stage` of its dead letters.
    fn name(&self) -> &'static str;

    /// The stage's version, written into dead letters and (by convention) outputs.
    fn version(&self) -> &'static str;

    /// A per-record timing histogram of this stage's own, as `(name, help)`: the
    /// runtime observes each processed record's time in it (replays excepted).
    fn timing_metric(&self) -> Option<(&'static str, &'static str)> {
        None
    }

    /// The input record family (for checks and messages).
    fn input_family(&self) -> Family {
        Self::Input::FAMILY
    }

    /// Processes one record, pushing any outputs to `out`.
    fn process(
        &mut self,
        record: Self::Input,
        meta: RecordMeta,
        out: &mut Vec<Output>,
    ) -> Result<(), Rejection>;

    /// The oldest offset of `partition` that open state still needs, or `None` when
    /// nothing is open (everything processed so far can be committed).
    fn needed_from(&self, partition: i32) -> Option<i64>;

    /// Drops all state of a partition (it was revoked, or is about to be re-read).
    fn forget(&mut self, partition: i32);

    /// The partition has had no record for a while: `now_ms` is its last record's time
    /// moved on by the wall time since. A stage that reports state at intervals writes
    /// what a later record would have made it write by now (the sessions stage: a state
    /// that changed since it was last written). The outputs go out in a transaction of
    /// their own. Called only once the partition is caught up (not while replaying).
    /// By default, nothing.
    fn idle(&mut self, partition: i32, now_ms: i64, out: &mut Vec<Output>) {
        let _ = (partition, now_ms, out);
    }
}
