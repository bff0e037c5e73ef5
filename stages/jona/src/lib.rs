//! Jona: turns each session's EEG into audio, per preset, in chunks on `audio.chunks`.
//!
//! A session renders the presets named by its first frame's `clisonix.audio=` marker
//! (see [`clisonix_schemas::AUDIO_PRESETS_MARKER`]), or the configured defaults; of
//! those, only the ones its tenant's plan renders, which ingest lists on the session's
//! first frame ([`clisonix_schemas::AUDIO_PLAN_MARKER`]; a frame without that list, as
//! from before plans, renders them all). Each
//! preset keeps its filters, envelopes and oscillator phases for the whole session, so
//! the audio is continuous across frames and chunks. A chunk closes every
//! `chunk_seconds` of EEG samples (by sample count, so chunking does not depend on how
//! the device framed its samples); the session's last chunk closes when a frame carries
//! the end marker, or when the session idles out, and ends with a short fade.
//!
//! Frames are taken in arrival order per session with the same rules as Albi: a gap is
//! bridged (the chunk's source seqs show it), duplicates and late frames are dropped.
//! Poison frames (non-finite samples, no channels, a rate or channel set that changes,
//! a rate below [`MIN_SAMPLE_RATE_HZ`], a frame after the session's end) are rejected.
//!
//! Deterministic: the same frames give bit-identical audio (`f64` throughout, ordered
//! maps, idle eviction by record time). An open session holds the committed offset at
//! its first frame, so a restarted Jona re-renders it from there; the audio already
//! out is discarded by the runtime, not encoded again.

pub mod dsp;
pub mod presets;

use clisonix_schemas::{
    listed_in, AudioChunk, Frame, SampleUnit, Timestamp, UsageEvent, UsageKind, AUDIO_PLAN_MARKER,
    AUDIO_PRESETS_MARKER, NO_AUDIO,
};
use clisonix_stage::{
    check_same_stream, check_samples, Arrival, Output, OutputTopic, Placement, RecordMeta,
    Rejection, SeqTracker, SessionRef, SessionTable, Stage, Tracked,
};

pub use presets::{Mix, Preset, Side, Synth, MIN_SAMPLE_RATE_HZ};

/// The stage's name (its consumer group) and version.
pub const NAME: &str = "jona";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Audio channels of every chunk (stereo).
pub const AUDIO_CHANNELS: u16 = 2;

#[derive(Debug, Clone, PartialEq)]
pub struct JonaConfig {
    /// Audio frames per second.
    pub sample_rate_hz: u32,
    /// EEG seconds per chunk.
    pub chunk_seconds: f64,
    /// Presets of sessions that do not name theirs.
    pub presets: Vec<Preset>,
    /// A session without frames for this long (by record time) is closed: its last
    /// chunk is written and it stops holding back the committed offset.
    pub idle_ms: i64,
}

impl Default for JonaConfig {
    fn default() -> Self {
        JonaConfig {
            sample_rate_hz: 44_100,
            chunk_seconds: 1.0,
            presets: vec![Preset::ParameterMapping],
            idle_ms: 15 * 60 * 1000,
        }
    }
}

/// One preset's renderer and the chunk it is filling.
#[derive(Debug)]
struct Voice {
    preset: Preset,
    synth: Synth,
    pcm: Vec<i16>,
    chunk_index: u64,
    frames_out: u64,
}

/// Where the chunk being filled starts.
#[derive(Debug, Clone, Copy)]
struct ChunkStart {
    eeg_time: Timestamp,
    first_seq: u64,
}

#[derive(Debug)]
struct Session {
    placed: Placement,
    rate: u32,
    fs: f64,
    labels: Vec<String>,
    to_microvolts: f64,
    mix: Mix,
    seqs: SeqTracker,
    voices: Vec<Voice>,
    chunk_samples: u64,
    in_chunk: u64,
    chunk_start: Option<ChunkStart>,
    last_seq: u64,
    /// Device time just after the last sample taken.
    end_time: Timestamp,
    /// The end marker was seen: the session is kept (without its renderers) until it
    /// idles out, so later frames are refused rather than starting it again.
    ended: bool,
}

impl Tracked for Session {
    fn placement(&self) -> &Placement {
        &self.placed
    }
}

/// The Jona stage.
#[derive(Debug)]
pub struct Jona {
    config: JonaConfig,
    sessions: SessionTable<Session>,
}

impl Jona {
    pub fn new(config: JonaConfig) -> Jona {
        Jona {
            config,
            sessions: SessionTable::default(),
        }
    }

    /// Open sessions (for metrics).
    pub fn open_sessions(&self) -> usize {
        self.sessions.values().filter(|s| !s.ended).count()
    }

    /// The presets a session's first frame asks for (none for `clisonix.audio=none`), or
    /// the defaults; of those, only the ones its plan renders when ingest listed them
    /// on the frame.
    fn presets_of(&self, frame: &Frame) -> Vec<Preset> {
        let labels = || frame.markers.iter().map(|m| m.label.as_str());
        let listed = listed_in(labels(), AUDIO_PRESETS_MARKER).unwrap_or_default();
        if listed.contains(&NO_AUDIO) {
            return Vec::new();
        }
        let mut chosen: Vec<Preset> = listed.into_iter().filter_map(Preset::parse).collect();
        chosen.sort();
        chosen.dedup();
        if chosen.is_empty() {
            chosen = self.config.presets.clone();
        }
        if let Some(plan) = listed_in(labels(), AUDIO_PLAN_MARKER) {
            chosen.retain(|p| plan.contains(&p.name()));
        }
        chosen
    }

    fn sweep_idle(&mut self, partition: i32, now_ms: i64, emit: bool, out: &mut Vec<Output>) {
        for (key, mut session) in self
            .sessions
            .take_idle(partition, now_ms, self.config.idle_ms)
        {
            if !session.ended {
                close(key, &mut session, emit, now_ms, out);
            }
        }
    }
}

fn unit_scale(unit: SampleUnit) -> f64 {
    match unit {
        SampleUnit::Microvolt => 1.0,
        SampleUnit::Millivolt => 1e3,
        SampleUnit::Volt => 1e6,
    }
}

fn time_of(frame: &Frame, i: usize) -> Timestamp {
    let offset = (i as f64 * 1e6 / frame.sample_rate_hz).round() as i64;
    Timestamp::from_micros(frame.device_time.as_micros() + offset)
}

/// Milliseconds of `frames` audio frames at `rate`, rounded down.
fn audio_ms(frames: u64, rate: u32) -> i64 {
    (u128::from(frames) * 1000 / u128::from(rate.max(1))) as i64
}

/// Emits the chunk each voice is filling (if it holds audio) and starts the next,
/// with a usage event of the audio it adds (metering's `audio_ms`, per preset in
/// `detail`): the difference of the session's audio time, in whole milliseconds,
/// before and after it, so a session's total is exact to the millisecond. The event's
/// id is derived from the chunk's key, so a replay emits the same event; its time is
/// the record time of the frame that completed the chunk (`now_ms`).
fn flush(key: SessionRef, session: &mut Session, emit: bool, now_ms: i64, out: &mut Vec<Output>) {
    let Some(start) = session.chunk_start.take() else {
        return;
    };
    for voice in &mut session.voices {
        if voice.pcm.is_empty() {
            continue;
        }
        let frames = (voice.pcm.len() / usize::from(AUDIO_CHANNELS)) as u64;
        let pcm = std::mem::take(&mut voice.pcm);
        if emit {
            let chunk = AudioChunk {
                tenant_id: key.tenant,
                session_id: key.session,
                preset: voice.preset.name().to_owned(),
                preset_version: voice.preset.version().to_owned(),
                chunk_index: voice.chunk_index,
                start_frame: voice.frames_out,
                eeg_start: start.eeg_time,
                sample_rate_hz: session.rate,
                channels: AUDIO_CHANNELS,
                pcm,
                source_first_seq: start.first_seq,
                source_last_seq: session.last_seq,
            };
            out.push(Output::new(OutputTopic::AudioChunks, &chunk.key(), &chunk));
            let rendered = audio_ms(voice.frames_out + frames, session.rate)
                - audio_ms(voice.frames_out, session.rate);
            if rendered > 0 {
                let event = UsageEvent {
                    event_id: UsageEvent::derived_id(&[
                        b"jona.audio",
                        key.session.as_uuid().as_bytes(),
                        voice.preset.name().as_bytes(),
                        &voice.chunk_index.to_le_bytes(),
                    ]),
                    tenant_id: key.tenant,
                    kind: UsageKind::AudioMilliseconds,
                    quantity: rendered,
                    occurred_at: Timestamp::from_micros(now_ms * 1000),
                    source: NAME.to_owned(),
                    session_id: Some(key.session),
                    device_id: None,
                    detail: Some(voice.preset.name().to_owned()),
                };
                out.push(Output::new(OutputTopic::UsageEvents, &event.key(), &event));
            }
        }
        voice.chunk_index += 1;
        voice.frames_out += frames;
    }
    session.in_chunk = 0;
}

/// Ends a session: the renderers finish (pending audio and a fade) into the last chunk.
fn close(key: SessionRef, session: &mut Session, emit: bool, now_ms: i64, out: &mut Vec<Output>) {
    for voice in &mut session.voices {
        voice.synth.finish(&mut voice.pcm);
    }
    if session.chunk_start.is_none() && session.voices.iter().any(|v| !v.pcm.is_empty()) {
        // The fade after a chunk that just closed: it starts where the EEG ended.
        session.chunk_start = Some(ChunkStart {
            eeg_time: session.end_time,
            first_seq: session.last_seq,
        });
    }
    flush(key, session, emit, now_ms, out);
    session.voices.clear();
    session.ended = true;
}

impl Stage for Jona {
    type Input = Frame;

    fn name(&self) -> &'static str {
        NAME
    }

    fn version(&self) -> &'static str {
        VERSION
    }

    fn timing_metric(&self) -> Option<(&'static str, &'static str)> {
        Some((
            "jona_synthesis_duration_seconds",
            "Time to synthesize one frame's audio, every preset of its session",
        ))
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
        let fs = frame.sample_rate_hz;
        match self.sessions.get_mut(&key) {
            Some(session) => {
                if session.ended {
                    return Err(Rejection::new(
                        "session_ended",
                        format!("frame {} arrived after its session's end marker", frame.seq),
                    ));
                }
                check_same_stream(session.fs, &session.labels, &frame)?;
                session.placed.last_seen_ms = now_ms;
                match session.seqs.observe(frame.seq) {
                    Arrival::Duplicate | Arrival::OutOfOrder => return Ok(()),
                    Arrival::InOrder { .. } => {}
                }
            }
            None => {
                if fs.is_nan() || fs < MIN_SAMPLE_RATE_HZ {
                    return Err(Rejection::new(
                        "unsupported_sample_rate",
                        format!(
                            "frame {}: {fs} Hz is below {MIN_SAMPLE_RATE_HZ} Hz",
                            frame.seq
                        ),
                    ));
                }
                let rate = self.config.sample_rate_hz;
                let voices = self
                    .presets_of(&frame)
                    .into_iter()
                    .map(|preset| Voice {
                        preset,
                        synth: Synth::new(preset, fs, rate),
                        pcm: Vec::new(),
                        chunk_index: 0,
                        frames_out: 0,
                    })
                    .collect();
                let mut seqs = SeqTracker::new();
                seqs.observe(frame.seq);
                self.sessions.insert(
                    key,
                    Session {
                        placed: Placement::first(&meta, now_ms),
                        rate,
                        fs,
                        labels: frame.channel_labels.clone(),
                        to_microvolts: unit_scale(frame.unit),
                        mix: Mix::from_labels(&frame.channel_labels),
                        seqs,
                        voices,
                        chunk_samples: ((self.config.chunk_seconds * fs).round() as u64).max(1),
                        in_chunk: 0,
                        chunk_start: None,
                        last_seq: frame.seq,
                        end_time: frame.device_time,
                        ended: false,
                    },
                );
            }
        }
        let session = self
            .sessions
            .get_mut(&key)
            .expect("present or inserted above");
        let n = frame.samples_per_channel as usize;
        for i in 0..n {
            let [l, r] = session.mix.at(&frame.samples, n, i);
            let x = [l * session.to_microvolts, r * session.to_microvolts];
            if session.chunk_start.is_none() {
                session.chunk_start = Some(ChunkStart {
                    eeg_time: time_of(&frame, i),
                    first_seq: frame.seq,
                });
            }
            for voice in &mut session.voices {
                voice.synth.push(x, &mut voice.pcm);
            }
            session.last_seq = frame.seq;
            session.end_time = time_of(&frame, i + 1);
            session.in_chunk += 1;
            if session.in_chunk == session.chunk_samples {
                flush(key, session, emit, now_ms, out);
            }
        }
        session.last_seq = frame.seq;
        if frame.ends_session() {
            close(key, session, emit, now_ms, out);
        }
        Ok(())
    }

    fn needed_from(&self, partition: i32) -> Option<i64> {
        self.sessions.needed_from(partition)
    }

    fn forget(&mut self, partition: i32) {
        self.sessions.forget(partition);
    }
}
