//! Per-session bookkeeping every frame-consuming stage needs, kept in one place so the
//! stages agree on what a gap, a duplicate and an out-of-order frame are, and on when
//! a session is idle.

use std::collections::{BTreeMap, BTreeSet};

use clisonix_schemas::{Frame, SessionId, TenantId};

use crate::{RecordMeta, Rejection};

/// How many sequence numbers behind the newest a duplicate is still recognised.
pub const SEEN_HORIZON: u64 = 4096;

/// How a frame's `seq` relates to what its session has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Newer than anything seen: take it. `missing` frames were skipped before it.
    InOrder { missing: u64 },
    /// Seen before (or too old to tell): drop it.
    Duplicate,
    /// Older than the newest seen and not seen before: it arrived after a later frame,
    /// so whatever was built from the later one cannot take it back; drop it.
    OutOfOrder,
}

/// Tracks one session's sequence numbers: frames are taken in arrival order; the
/// `seq`s seen within [`SEEN_HORIZON`] of the newest are remembered to tell duplicates
/// from late frames.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    next: Option<u64>,
    seen: BTreeSet<u64>,
}

impl SeqTracker {
    pub fn new() -> SeqTracker {
        SeqTracker::default()
    }

    /// Classifies `seq` and records it.
    pub fn observe(&mut self, seq: u64) -> Arrival {
        let Some(next) = self.next else {
            self.accept(seq);
            return Arrival::InOrder { missing: 0 };
        };
        if seq < next {
            if self.seen.contains(&seq) || next - seq > SEEN_HORIZON {
                return Arrival::Duplicate;
            }
            self.seen.insert(seq);
            return Arrival::OutOfOrder;
        }
        self.accept(seq);
        Arrival::InOrder {
            missing: seq - next,
        }
    }

    fn accept(&mut self, seq: u64) {
        self.seen.insert(seq);
        self.next = Some(seq + 1);
        let horizon = (seq + 1).saturating_sub(SEEN_HORIZON);
        while self.seen.first().is_some_and(|&s| s < horizon) {
            self.seen.pop_first();
        }
    }
}

/// Decides, per partition and by the records' own timestamps, when to look for idle
/// sessions: at most once a second of record time, so a sweep over all sessions is not
/// paid per record. Record time, never the wall clock, keeps stages deterministic.
#[derive(Debug, Clone, Default)]
struct IdleSweep {
    last_ms: BTreeMap<i32, i64>,
}

impl IdleSweep {
    /// Whether a sweep is due on `partition` at record time `now_ms`.
    pub fn due(&mut self, partition: i32, now_ms: i64) -> bool {
        let last = self.last_ms.entry(partition).or_insert(i64::MIN);
        if now_ms < last.saturating_add(1000) {
            return false;
        }
        *last = now_ms;
        true
    }

    pub fn forget(&mut self, partition: i32) {
        self.last_ms.remove(&partition);
    }
}

/// A session's key in a stage's state: ordered, so iteration (and so outputs) is
/// deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SessionRef {
    pub tenant: TenantId,
    pub session: SessionId,
}

impl SessionRef {
    pub fn of(frame: &Frame) -> SessionRef {
        SessionRef {
            tenant: frame.tenant_id,
            session: frame.session_id,
        }
    }
}

/// Where a session's frames arrive and when it last had one: what the
/// [`SessionTable`] needs of a stage's per-session state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The partition the session's frames arrive on.
    pub partition: i32,
    /// The offset of its first frame: a restart must re-read from there.
    pub first_offset: i64,
    /// The record time of its latest frame.
    pub last_seen_ms: i64,
}

impl Placement {
    /// A session whose first frame is the record `meta`, at record time `now_ms`.
    pub fn first(meta: &RecordMeta, now_ms: i64) -> Placement {
        Placement {
            partition: meta.partition,
            first_offset: meta.offset,
            last_seen_ms: now_ms,
        }
    }
}

/// A stage's per-session state, placed.
pub trait Tracked {
    fn placement(&self) -> &Placement;
}

/// A frame stage's open sessions, with what the runtime's contract asks of every such
/// stage: the low watermark per partition ([`Stage::needed_from`](crate::Stage)),
/// forgetting a partition, and closing sessions idle by record time.
#[derive(Debug, Clone)]
pub struct SessionTable<S> {
    sessions: BTreeMap<SessionRef, S>,
    sweep: IdleSweep,
}

impl<S> Default for SessionTable<S> {
    fn default() -> Self {
        SessionTable {
            sessions: BTreeMap::new(),
            sweep: IdleSweep::default(),
        }
    }
}

impl<S: Tracked> SessionTable<S> {
    pub fn get(&self, key: &SessionRef) -> Option<&S> {
        self.sessions.get(key)
    }

    pub fn get_mut(&mut self, key: &SessionRef) -> Option<&mut S> {
        self.sessions.get_mut(key)
    }

    pub fn insert(&mut self, key: SessionRef, state: S) {
        self.sessions.insert(key, state);
    }

    pub fn values(&self) -> impl Iterator<Item = &S> {
        self.sessions.values()
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The sessions of `partition`, in key order.
    pub fn on_partition_mut(&mut self, partition: i32) -> impl Iterator<Item = &mut S> {
        self.sessions
            .values_mut()
            .filter(move |s| s.placement().partition == partition)
    }

    /// The oldest first offset of the sessions open on `partition`.
    pub fn needed_from(&self, partition: i32) -> Option<i64> {
        self.sessions
            .values()
            .filter(|s| s.placement().partition == partition)
            .map(|s| s.placement().first_offset)
            .min()
    }

    /// Drops every session of `partition`.
    pub fn forget(&mut self, partition: i32) {
        self.sessions
            .retain(|_, s| s.placement().partition != partition);
        self.sweep.forget(partition);
    }

    /// Removes and returns, in key order, the sessions of `partition` without a frame
    /// for more than `idle_ms` at record time `now_ms` (looked for at most once a second
    /// of record time).
    pub fn take_idle(&mut self, partition: i32, now_ms: i64, idle_ms: i64) -> Vec<(SessionRef, S)> {
        if !self.sweep.due(partition, now_ms) {
            return Vec::new();
        }
        let expired: Vec<SessionRef> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                let p = s.placement();
                p.partition == partition && now_ms - p.last_seen_ms > idle_ms
            })
            .map(|(k, _)| *k)
            .collect();
        expired
            .into_iter()
            .filter_map(|k| self.sessions.remove(&k).map(|s| (k, s)))
            .collect()
    }
}

/// Refuses a frame no frame stage can use: no channels, or a non-finite sample.
pub fn check_samples(frame: &Frame) -> Result<(), Rejection> {
    if frame.channel_labels.is_empty() {
        return Err(Rejection::new("no_channels", "the frame has no channels"));
    }
    if let Some(i) = frame.samples.iter().position(|v| !v.is_finite()) {
        return Err(Rejection::new(
            "non_finite_samples",
            format!("sample {i} of frame {} is {}", frame.seq, frame.samples[i]),
        ));
    }
    Ok(())
}

/// Refuses a frame whose sample rate or channels differ from its session's.
pub fn check_same_stream(fs: f64, labels: &[String], frame: &Frame) -> Result<(), Rejection> {
    if fs != frame.sample_rate_hz {
        return Err(Rejection::new(
            "sample_rate_changed",
            format!(
                "session at {fs} Hz, frame {} at {} Hz",
                frame.seq, frame.sample_rate_hz
            ),
        ));
    }
    if labels != frame.channel_labels.as_slice() {
        return Err(Rejection::new(
            "channels_changed",
            format!("frame {} has other channels than its session", frame.seq),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_are_classified() {
        let mut t = SeqTracker::new();
        assert_eq!(t.observe(5), Arrival::InOrder { missing: 0 });
        assert_eq!(t.observe(6), Arrival::InOrder { missing: 0 });
        assert_eq!(t.observe(9), Arrival::InOrder { missing: 2 });
        assert_eq!(t.observe(6), Arrival::Duplicate);
        assert_eq!(t.observe(7), Arrival::OutOfOrder);
        assert_eq!(t.observe(7), Arrival::Duplicate);
        assert_eq!(t.observe(10), Arrival::InOrder { missing: 0 });
    }

    #[test]
    fn frames_beyond_the_horizon_count_as_duplicates_and_memory_stays_bounded() {
        let mut t = SeqTracker::new();
        for s in 0..10 * SEEN_HORIZON {
            assert_eq!(t.observe(s), Arrival::InOrder { missing: 0 });
        }
        assert!(t.seen.len() as u64 <= SEEN_HORIZON);
        assert_eq!(t.observe(10), Arrival::Duplicate);
    }

    #[derive(Debug)]
    struct S(Placement);

    impl Tracked for S {
        fn placement(&self) -> &Placement {
            &self.0
        }
    }

    fn placed(partition: i32, first_offset: i64, last_seen_ms: i64) -> S {
        S(Placement {
            partition,
            first_offset,
            last_seen_ms,
        })
    }

    #[test]
    fn the_table_knows_low_watermarks_and_idle_sessions() {
        let key = |n: u128| SessionRef {
            tenant: TenantId::new(uuid_of(1)),
            session: SessionId::new(uuid_of(n)),
        };
        let mut t = SessionTable::default();
        t.insert(key(1), placed(0, 10, 1_000));
        t.insert(key(2), placed(0, 5, 50_000));
        t.insert(key(3), placed(1, 2, 1_000));
        assert_eq!(t.needed_from(0), Some(5));
        assert_eq!(t.needed_from(2), None);
        let idle: Vec<SessionRef> = t
            .take_idle(0, 60_000, 30_000)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            idle,
            vec![key(1)],
            "only partition 0's session idle past 30 s"
        );
        assert!(
            t.take_idle(0, 60_500, 0).is_empty(),
            "not due again within a second"
        );
        assert_eq!(t.needed_from(0), Some(5));
        t.forget(1);
        assert_eq!(t.len(), 1);
    }

    fn uuid_of(n: u128) -> uuid::Uuid {
        uuid::Uuid::from_u128(n)
    }

    #[test]
    fn sweeps_are_due_once_a_second_of_record_time_per_partition() {
        let mut s = IdleSweep::default();
        assert!(s.due(0, 10_000));
        assert!(!s.due(0, 10_999));
        assert!(s.due(1, 10_500));
        assert!(s.due(0, 11_000));
        s.forget(0);
        assert!(s.due(0, 11_001));
    }
}
