//! Splitting a recording into contract [`Frame`]s: fixed-length frames of every data
//! signal, timestamped from the header's start time, with annotations as markers.
//!
//! Annotation onsets are absolute (from the file's start) and EDF+ may store them in an
//! earlier record than the one they fall in, so they are held until the frame that
//! contains them is emitted. An annotation whose frame has already gone out (stored
//! late) is attached to the next frame at offset 0 rather than dropped.

use clisonix_schemas::{DeviceId, Frame, Marker, SampleUnit, SessionId, TenantId, Timestamp};

use crate::{Header, Record};

/// Why a recording cannot be framed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FramerError {
    #[error("the recording has no data signals")]
    NoSignals,
    #[error(
        "signal {label:?} is sampled at {rate} Hz, others at {expected} Hz: frames need one rate"
    )]
    MixedRates {
        label: String,
        rate: f64,
        expected: f64,
    },
    #[error("signal {label:?} is in {unit:?}, not a voltage unit (uV, mV, V)")]
    Unit { label: String, unit: String },
    #[error("signal {label:?} is in {unit}, others in {expected}")]
    MixedUnits {
        label: String,
        unit: &'static str,
        expected: &'static str,
    },
    #[error("frames must hold at least one sample")]
    EmptyFrames,
}

/// Who the frames belong to and how long they are.
#[derive(Debug, Clone)]
pub struct FrameSpec {
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub session_id: SessionId,
    pub samples_per_frame: u32,
}

/// Turns data records into frames; see the module documentation.
#[derive(Debug)]
pub struct Framer {
    spec: FrameSpec,
    labels: Vec<String>,
    unit: SampleUnit,
    sample_rate_hz: f64,
    start_us: i64,
    gains: Vec<(f64, f64, i32)>,
    /// Per channel, samples not yet framed.
    pending: Vec<Vec<f32>>,
    /// Session sample index of `pending[..][0]`.
    pending_start: u64,
    /// Annotations by session sample index, sorted when drained.
    markers: Vec<(u64, Marker)>,
    next_seq: u64,
}

impl Framer {
    pub fn new(header: &Header, spec: FrameSpec) -> Result<Framer, FramerError> {
        if spec.samples_per_frame == 0 {
            return Err(FramerError::EmptyFrames);
        }
        let signals = header.data_signals();
        let first = *signals.first().ok_or(FramerError::NoSignals)?;
        let sample_rate_hz = header.sample_rate(first);
        let unit_of = |i: usize| {
            let s = &header.signals[i];
            SampleUnit::from_symbol(&s.physical_dimension).ok_or_else(|| FramerError::Unit {
                label: s.label.clone(),
                unit: s.physical_dimension.clone(),
            })
        };
        let unit = unit_of(first)?;
        for &i in &signals {
            let rate = header.sample_rate(i);
            if rate != sample_rate_hz {
                return Err(FramerError::MixedRates {
                    label: header.signals[i].label.clone(),
                    rate,
                    expected: sample_rate_hz,
                });
            }
            let u = unit_of(i)?;
            if u != unit {
                return Err(FramerError::MixedUnits {
                    label: header.signals[i].label.clone(),
                    unit: u.symbol(),
                    expected: unit.symbol(),
                });
            }
        }
        Ok(Framer {
            spec,
            labels: signals
                .iter()
                .map(|&i| header.signals[i].label.clone())
                .collect(),
            unit,
            sample_rate_hz,
            start_us: header.start.unix_micros(),
            gains: signals
                .iter()
                .map(|&i| {
                    let s = &header.signals[i];
                    (s.physical_min, s.gain(), s.digital_min)
                })
                .collect(),
            pending: vec![Vec::new(); signals.len()],
            pending_start: 0,
            markers: Vec::new(),
            next_seq: 0,
        })
    }

    pub fn sample_rate_hz(&self) -> f64 {
        self.sample_rate_hz
    }

    pub fn channel_labels(&self) -> &[String] {
        &self.labels
    }

    /// Adds a record's samples and annotations; appends every completed frame to `out`.
    pub fn push(&mut self, record: &Record, received_at: Timestamp, out: &mut Vec<Frame>) {
        for (c, digital) in record.digital.iter().enumerate() {
            let (pmin, gain, dmin) = self.gains[c];
            self.pending[c].extend(
                digital
                    .iter()
                    .map(|&d| (pmin + f64::from(d - dmin) * gain) as f32),
            );
        }
        for a in &record.annotations {
            let index = (a.onset_s * self.sample_rate_hz).floor().max(0.0) as u64;
            self.markers.push((
                index,
                Marker {
                    sample_offset: 0,
                    duration_us: a.duration_s.map(|d| (d * 1e6).round() as i64),
                    label: a.text.clone(),
                },
            ));
        }
        let n = self.spec.samples_per_frame as usize;
        while self.pending[0].len() >= n {
            let frame = self.take(n, received_at, false);
            out.push(frame);
        }
    }

    /// Emits what is left as a final, shorter frame (if anything is left).
    pub fn finish(&mut self, received_at: Timestamp, out: &mut Vec<Frame>) {
        let n = self.pending[0].len();
        if n > 0 || !self.markers.is_empty() {
            if n == 0 {
                // Only markers remain (annotated past the last sample): nothing to carry them.
                self.markers.clear();
                return;
            }
            let frame = self.take(n, received_at, true);
            out.push(frame);
        }
    }

    fn take(&mut self, n: usize, received_at: Timestamp, last: bool) -> Frame {
        let start = self.pending_start;
        let end = start + n as u64;
        let mut samples = Vec::with_capacity(n * self.pending.len());
        for channel in &mut self.pending {
            samples.extend(channel.drain(..n));
        }
        self.markers.sort_by_key(|(i, _)| *i);
        let due = self
            .markers
            .iter()
            .take_while(|(i, _)| *i < end || last)
            .count();
        let markers = self
            .markers
            .drain(..due)
            .map(|(i, mut m)| {
                m.sample_offset = i.saturating_sub(start).min(n as u64 - 1) as u32;
                m
            })
            .collect();
        let device_time = self.start_us + (start as f64 * 1e6 / self.sample_rate_hz).round() as i64;
        self.pending_start = end;
        let seq = self.next_seq;
        self.next_seq += 1;
        Frame {
            tenant_id: self.spec.tenant_id,
            device_id: self.spec.device_id.clone(),
            session_id: self.spec.session_id,
            seq,
            device_time: Timestamp::from_micros(device_time),
            received_at,
            sample_rate_hz: self.sample_rate_hz,
            unit: self.unit,
            channel_labels: self.labels.clone(),
            samples_per_channel: n as u32,
            samples,
            markers,
        }
    }
}
