//! Albi: turns each session's frames into features per channel and window.
//!
//! Windows are counted from the session's first accepted sample: window `w` covers
//! samples `[w*hop, w*hop + window)` (default 2 s, non-overlapping). Frames are taken
//! in arrival order per session:
//! - a frame whose `seq` jumps ahead is accepted and the missing frames are counted as
//!   `seq_gaps` (the window then spans the gap and says so);
//! - a frame whose `seq` was already seen is a duplicate: dropped and counted;
//! - a frame that arrives after a later one (not seen before) is out of order: it cannot
//!   be put back into samples already windowed, so it is dropped and counted.
//!
//! The counts are reported on the next window emitted for the session. Poison frames
//! (non-finite samples, a sample rate or channel set that changes mid-session, a rate
//! the features cannot use) are rejected to the dead-letter topic.
//!
//! Deterministic: sessions live in ordered maps, and idle sessions are evicted by the
//! records' own timestamps, never by the wall clock. An open session holds the
//! committed offset at its first frame ([`Stage::needed_from`]): window numbers count
//! from the session's first sample, so a restarted Albi re-reads the whole open session
//! (cheaply: replayed windows are counted off without computing features).

use std::collections::{BTreeMap, VecDeque};

use clisonix_schemas::{
    Bands, DeviceId, Features, Frame, Hjorth, SampleUnit, Timestamp, WindowQuality,
};
use clisonix_signal::{FeatureEngine, SignalError, WindowFeatures, ALGORITHM_VERSION};
use clisonix_stage::{
    check_same_stream, check_samples, Arrival, Output, OutputTopic, Placement, RecordMeta,
    Rejection, SeqTracker, SessionRef, SessionTable, Stage, Tracked,
};

/// The stage's name (its consumer group) and version.
pub const NAME: &str = "albi";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Clone, PartialEq)]
pub struct AlbiConfig {
    /// Window length in seconds.
    pub window_seconds: f64,
    /// Step between window starts in seconds (= window: non-overlapping).
    pub hop_seconds: f64,
    /// A session without frames for this long (by record timestamps) is closed and its
    /// partial window dropped, so it stops holding back the committed offset.
    pub idle_ms: i64,
}

impl Default for AlbiConfig {
    fn default() -> Self {
        AlbiConfig {
            window_seconds: 2.0,
            hop_seconds: 2.0,
            idle_ms: 15 * 60 * 1000,
        }
    }
}

/// A frame whose samples are (partly) still buffered.
#[derive(Debug, Clone, Copy)]
struct BufferedFrame {
    first_sample: u64,
    samples: u64,
    device_time_us: i64,
}

#[derive(Debug)]
struct Session {
    /// Its first frame's offset: window numbering and sequence state are built from
    /// there, so a restart re-reads from there.
    placed: Placement,
    device: DeviceId,
    fs: f64,
    unit: SampleUnit,
    labels: Vec<String>,
    window: usize,
    hop: usize,
    /// Per channel, samples from `buffer_start` on.
    buffers: Vec<VecDeque<f32>>,
    buffer_start: u64,
    next_window: u64,
    frames: VecDeque<BufferedFrame>,
    seqs: SeqTracker,
    gaps: u32,
    duplicates: u32,
    out_of_order: u32,
}

impl Tracked for Session {
    fn placement(&self) -> &Placement {
        &self.placed
    }
}

impl Session {
    fn buffered_end(&self) -> u64 {
        self.buffer_start + self.buffers[0].len() as u64
    }

    /// Device time of session sample `s` (which must be buffered).
    fn time_of(&self, s: u64) -> Timestamp {
        let frame = self
            .frames
            .iter()
            .find(|f| s >= f.first_sample && s < f.first_sample + f.samples)
            .expect("a buffered sample belongs to a buffered frame");
        let offset = (s - frame.first_sample) as f64 * 1e6 / self.fs;
        Timestamp::from_micros(frame.device_time_us + offset.round() as i64)
    }
}

/// The Albi stage.
#[derive(Debug)]
pub struct Albi {
    config: AlbiConfig,
    sessions: SessionTable<Session>,
    /// One engine per (sample rate, window length), shared by sessions.
    engines: BTreeMap<(u64, usize), FeatureEngine>,
    features: WindowFeatures,
    window: Vec<f64>,
}

impl Albi {
    pub fn new(config: AlbiConfig) -> Albi {
        Albi {
            config,
            sessions: SessionTable::default(),
            engines: BTreeMap::new(),
            features: WindowFeatures::default(),
            window: Vec::new(),
        }
    }

    /// Open sessions (for metrics).
    pub fn open_sessions(&self) -> usize {
        self.sessions.len()
    }

    fn sweep_idle(&mut self, partition: i32, now_ms: i64) {
        // An idle session's partial window is dropped with it.
        self.sessions
            .take_idle(partition, now_ms, self.config.idle_ms);
    }

    /// Emits every window the buffered samples complete; with `compute` false (replay)
    /// the windows are only counted off, as their features are already out.
    fn emit_ready_windows(&mut self, key: SessionRef, compute: bool, out: &mut Vec<Output>) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let engine = self
            .engines
            .get_mut(&(session.fs.to_bits(), session.window))
            .expect("an engine exists for every open session");
        loop {
            let start = session.next_window * session.hop as u64;
            let end = start + session.window as u64;
            if session.buffered_end() < end {
                break;
            }
            let window_start = session.time_of(start);
            let skip = (start - session.buffer_start) as usize;
            let quality_counts = (session.gaps, session.duplicates, session.out_of_order);
            let channels = if compute { session.buffers.len() } else { 0 };
            for (c, buffer) in session.buffers.iter().enumerate().take(channels) {
                self.window.clear();
                self.window.extend(
                    buffer
                        .range(skip..skip + session.window)
                        .map(|&v| f64::from(v)),
                );
                engine
                    .compute(&self.window, &mut self.features)
                    .expect("frames are checked finite and windows sized by the engine");
                let f = &self.features;
                let features = Features {
                    tenant_id: key.tenant,
                    session_id: key.session,
                    device_id: session.device.clone(),
                    channel_index: c as u32,
                    channel_label: session.labels[c].clone(),
                    window_index: session.next_window,
                    window_start_sample: start,
                    window_start,
                    window_samples: session.window as u32,
                    sample_rate_hz: session.fs,
                    unit: session.unit,
                    algorithm_version: ALGORITHM_VERSION.to_owned(),
                    abs: bands(f.abs),
                    total_abs: f.total_abs,
                    rel: bands(f.rel),
                    peak_alpha_hz: f.peak_alpha_hz,
                    peak_alpha_psd: f.peak_alpha_psd,
                    spectral_entropy: f.spectral_entropy,
                    hjorth: Hjorth {
                        activity: f.hjorth_activity,
                        mobility: f.hjorth_mobility,
                        complexity: f.hjorth_complexity,
                    },
                    aperiodic_exponent: f.aperiodic_exponent,
                    psd_resolution_hz: engine.resolution_hz(),
                    psd: f.psd.clone(),
                    quality: WindowQuality {
                        flat: f.flat,
                        clipped_fraction: f.clipped_fraction,
                        line_noise_50hz: f.line_noise_50hz,
                        line_noise_60hz: f.line_noise_60hz,
                        seq_gaps: quality_counts.0,
                        duplicate_frames: quality_counts.1,
                        out_of_order_frames: quality_counts.2,
                    },
                };
                out.push(Output::new(
                    OutputTopic::EegFeatures,
                    &features.key(),
                    &features,
                ));
            }
            session.gaps = 0;
            session.duplicates = 0;
            session.out_of_order = 0;
            session.next_window += 1;
            // Drop what no later window needs.
            let keep_from = session.next_window * session.hop as u64;
            let drop = keep_from.saturating_sub(session.buffer_start) as usize;
            let drop = drop.min(session.buffers[0].len());
            for buffer in &mut session.buffers {
                buffer.drain(..drop);
            }
            session.buffer_start += drop as u64;
            while session
                .frames
                .front()
                .is_some_and(|f| f.first_sample + f.samples <= session.buffer_start)
            {
                session.frames.pop_front();
            }
        }
    }
}

fn bands(values: [Option<f64>; 5]) -> Bands {
    let [delta, theta, alpha, beta, gamma] = values;
    Bands {
        delta,
        theta,
        alpha,
        beta,
        gamma,
    }
}

impl Stage for Albi {
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
        self.sweep_idle(meta.partition, now_ms);
        check_samples(&frame)?;
        let key = SessionRef::of(&frame);
        let fs = frame.sample_rate_hz;
        match self.sessions.get_mut(&key) {
            Some(session) => {
                check_same_stream(session.fs, &session.labels, &frame)?;
                session.placed.last_seen_ms = now_ms;
                match session.seqs.observe(frame.seq) {
                    Arrival::Duplicate => {
                        session.duplicates += 1;
                        return Ok(());
                    }
                    Arrival::OutOfOrder => {
                        session.out_of_order += 1;
                        return Ok(());
                    }
                    Arrival::InOrder { missing } => {
                        session.gaps = session
                            .gaps
                            .saturating_add(missing.min(u32::MAX as u64) as u32);
                    }
                }
            }
            None => {
                let window = (self.config.window_seconds * fs).round() as usize;
                let hop = ((self.config.hop_seconds * fs).round() as usize).max(1);
                let engine_key = (fs.to_bits(), window);
                if let std::collections::btree_map::Entry::Vacant(slot) =
                    self.engines.entry(engine_key)
                {
                    let engine = FeatureEngine::new(fs, window).map_err(|e| match e {
                        SignalError::SampleRate(_) => Rejection::new(
                            "unsupported_sample_rate",
                            format!("frame {}: {e}", frame.seq),
                        ),
                        other => Rejection::new("unsupported_window", other.to_string()),
                    })?;
                    slot.insert(engine);
                }
                self.sessions.insert(
                    key,
                    Session {
                        placed: Placement::first(&meta, now_ms),
                        device: frame.device_id.clone(),
                        fs,
                        unit: frame.unit,
                        labels: frame.channel_labels.clone(),
                        window,
                        hop,
                        buffers: vec![VecDeque::new(); frame.channel_labels.len()],
                        buffer_start: 0,
                        next_window: 0,
                        frames: VecDeque::new(),
                        seqs: {
                            let mut seqs = SeqTracker::new();
                            seqs.observe(frame.seq);
                            seqs
                        },
                        gaps: 0,
                        duplicates: 0,
                        out_of_order: 0,
                    },
                );
            }
        }
        let session = self.sessions.get_mut(&key).expect("inserted above");
        let n = frame.samples_per_channel as u64;
        let first_sample = session.buffered_end();
        for (c, buffer) in session.buffers.iter_mut().enumerate() {
            buffer.extend(frame.channel(c));
        }
        if n > 0 {
            session.frames.push_back(BufferedFrame {
                first_sample,
                samples: n,
                device_time_us: frame.device_time.as_micros(),
            });
        }
        self.emit_ready_windows(key, !meta.replay, out);
        Ok(())
    }

    fn needed_from(&self, partition: i32) -> Option<i64> {
        self.sessions.needed_from(partition)
    }

    fn forget(&mut self, partition: i32) {
        self.sessions.forget(partition);
    }
}
