//! Sessions: keeps each session's lifecycle in the compacted `eeg.sessions` topic,
//! where the newest record per session is its state.
//!
//! A session starts with its first frame and is `ACTIVE` until a frame carries the end
//! marker ([`clisonix_schemas::SESSION_END_MARKER`], end reason `explicit`) or no frame
//! arrives for `idle_ms` of record time (`idle_timeout`; its end time is its last
//! frame's). Its state counts distinct frames and their samples, frames missing between
//! the lowest and highest `seq` seen (a late frame fills its gap again), duplicates and
//! late (out-of-order) frames.
//!
//! A state record is written when the session starts, at most every `update_ms` of
//! record time while frames arrive, and when it ends. After an explicit end the session
//! is remembered until it idles out, and frames for it are refused (`session_ended`).
//! Poison frames are refused with the same rules as the other frame stages, so the
//! counts describe the frames the features and audio were made from.
//!
//! Deterministic, with the committed offset held at an open session's first frame like
//! the other frame stages: its counts are rebuilt by re-reading it.

use clisonix_schemas::{EndReason, Frame, SessionState, SessionStatus, Timestamp};
use clisonix_stage::{
    check_same_stream, check_samples, Arrival, Output, OutputTopic, Placement, RecordMeta,
    Rejection, SeqTracker, SessionRef, SessionTable, Stage, Tracked,
};

/// The stage's name (its consumer group) and version.
pub const NAME: &str = "sessions";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Clone, PartialEq)]
pub struct SessionsConfig {
    /// A session without frames for this long (record time) has ended.
    pub idle_ms: i64,
    /// How often an active session's state is written, at most (record time).
    pub update_ms: i64,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            idle_ms: 15 * 60 * 1000,
            update_ms: 5_000,
        }
    }
}

#[derive(Debug)]
struct Open {
    placed: Placement,
    last_written_ms: i64,
    /// The state changed since it was last written.
    unwritten: bool,
    seqs: SeqTracker,
    lowest_seq: u64,
    highest_seq: u64,
    state: SessionState,
}

impl Tracked for Open {
    fn placement(&self) -> &Placement {
        &self.placed
    }
}

impl Open {
    fn write(&mut self, now_ms: i64, emit: bool, out: &mut Vec<Output>) {
        self.last_written_ms = now_ms;
        self.unwritten = false;
        if emit {
            out.push(Output::new(
                OutputTopic::EegSessions,
                &self.state.key(),
                &self.state,
            ));
        }
    }

    fn end(
        &mut self,
        at: Timestamp,
        reason: EndReason,
        now_ms: i64,
        emit: bool,
        out: &mut Vec<Output>,
    ) {
        self.state.status = SessionStatus::Ended;
        self.state.ended = Some((at, reason));
        self.write(now_ms, emit, out);
    }
}

/// Device time just after a frame's last sample.
fn end_of(frame: &Frame) -> Timestamp {
    let span = (f64::from(frame.samples_per_channel) * 1e6 / frame.sample_rate_hz).round() as i64;
    Timestamp::from_micros(frame.device_time.as_micros() + span)
}

/// The sessions stage.
#[derive(Debug)]
pub struct Sessions {
    config: SessionsConfig,
    sessions: SessionTable<Open>,
}

impl Sessions {
    pub fn new(config: SessionsConfig) -> Sessions {
        Sessions {
            config,
            sessions: SessionTable::default(),
        }
    }

    /// Sessions not yet ended (for metrics).
    pub fn open_sessions(&self) -> usize {
        self.sessions
            .values()
            .filter(|s| s.state.status == SessionStatus::Active)
            .count()
    }

    fn sweep_idle(&mut self, partition: i32, now_ms: i64, emit: bool, out: &mut Vec<Output>) {
        for (_, mut open) in self
            .sessions
            .take_idle(partition, now_ms, self.config.idle_ms)
        {
            if open.state.status == SessionStatus::Active {
                let at = open.state.last_frame_at;
                open.end(at, EndReason::IdleTimeout, now_ms, emit, out);
            }
        }
    }
}

impl Stage for Sessions {
    type Input = Frame;

    fn name(&self) -> &'static str {
        NAME
    }

    fn version(&self) -> &'static str {
        VERSION
    }

    fn process(
        &mut self,
        frame: Frame,
        meta: RecordMeta,
        out: &mut Vec<Output>,
    ) -> Result<(), Rejection> {
        let now_ms = meta.record_time_ms(frame.received_at);
        let emit = !meta.replay;
        self.sweep_idle(meta.partition, now_ms, emit, out);
        check_samples(&frame)?;
        let key = SessionRef::of(&frame);
        let ends = frame.ends_session();
        let Some(open) = self.sessions.get_mut(&key) else {
            let mut seqs = SeqTracker::new();
            seqs.observe(frame.seq);
            let mut open = Open {
                placed: Placement::first(&meta, now_ms),
                last_written_ms: now_ms,
                unwritten: false,
                seqs,
                lowest_seq: frame.seq,
                highest_seq: frame.seq,
                state: SessionState {
                    tenant_id: frame.tenant_id,
                    session_id: frame.session_id,
                    device_id: frame.device_id.clone(),
                    status: SessionStatus::Active,
                    started_at: frame.received_at,
                    last_frame_at: frame.received_at,
                    first_device_time: frame.device_time,
                    last_device_time: end_of(&frame),
                    sample_rate_hz: frame.sample_rate_hz,
                    channel_labels: frame.channel_labels.clone(),
                    frames: 1,
                    samples_per_channel: u64::from(frame.samples_per_channel),
                    seq_gaps: 0,
                    duplicate_frames: 0,
                    out_of_order_frames: 0,
                    ended: None,
                },
            };
            if ends {
                open.end(frame.received_at, EndReason::Explicit, now_ms, emit, out);
            } else {
                open.write(now_ms, emit, out);
            }
            self.sessions.insert(key, open);
            return Ok(());
        };
        if open.state.status == SessionStatus::Ended {
            return Err(Rejection::new(
                "session_ended",
                format!("frame {} arrived after its session's end marker", frame.seq),
            ));
        }
        check_same_stream(
            open.state.sample_rate_hz,
            &open.state.channel_labels,
            &frame,
        )?;
        open.placed.last_seen_ms = now_ms;
        let state = &mut open.state;
        state.last_frame_at = state.last_frame_at.max(frame.received_at);
        match open.seqs.observe(frame.seq) {
            Arrival::Duplicate => state.duplicate_frames += 1,
            arrival => {
                if arrival == Arrival::OutOfOrder {
                    state.out_of_order_frames += 1;
                }
                state.frames += 1;
                state.samples_per_channel += u64::from(frame.samples_per_channel);
                open.lowest_seq = open.lowest_seq.min(frame.seq);
                open.highest_seq = open.highest_seq.max(frame.seq);
                state.first_device_time = state.first_device_time.min(frame.device_time);
                state.last_device_time = state.last_device_time.max(end_of(&frame));
                state.seq_gaps =
                    (open.highest_seq - open.lowest_seq + 1).saturating_sub(state.frames);
            }
        }
        if ends {
            open.end(frame.received_at, EndReason::Explicit, now_ms, emit, out);
        } else if now_ms - open.last_written_ms >= self.config.update_ms {
            open.write(now_ms, emit, out);
        } else {
            open.unwritten = true;
        }
        Ok(())
    }

    /// A burst of frames followed by nothing is reflected within the update interval:
    /// a session whose state changed since it was last written is written once the
    /// interval has passed (at the partition's record time moved on by the wall time).
    fn idle(&mut self, partition: i32, now_ms: i64, out: &mut Vec<Output>) {
        let update_ms = self.config.update_ms;
        for open in self.sessions.on_partition_mut(partition) {
            if open.unwritten
                && open.state.status == SessionStatus::Active
                && now_ms - open.last_written_ms >= update_ms
            {
                open.write(now_ms, true, out);
            }
        }
    }

    fn needed_from(&self, partition: i32) -> Option<i64> {
        self.sessions.needed_from(partition)
    }

    fn forget(&mut self, partition: i32) {
        self.sessions.forget(partition);
    }
}
