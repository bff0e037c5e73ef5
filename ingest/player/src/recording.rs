//! A recording as frames, once, to be replayed by any number of devices.

use std::path::Path;

use anyhow::Context;
use clisonix_edf::{FrameSpec, Framer, Reader};
use clisonix_schemas::{
    DeviceId, Frame, Marker, SessionId, TenantId, Timestamp, AUDIO_PRESETS_MARKER,
    SESSION_END_MARKER,
};

/// A recording's frames (session, device and tenant still to be set per device).
#[derive(Debug, Clone)]
pub struct Recording {
    pub frames: Vec<Frame>,
    pub sample_rate_hz: f64,
    pub samples_per_frame: u32,
    pub channels: usize,
}

impl Recording {
    /// Seconds of EEG in one frame.
    pub fn frame_seconds(&self) -> f64 {
        f64::from(self.samples_per_frame) / self.sample_rate_hz
    }

    /// The frames as device `device` streaming session `session` would send them,
    /// starting at `start` (the recording's own start time if `None`).
    pub fn for_device(
        &self,
        device: &DeviceId,
        session: SessionId,
        start: Option<Timestamp>,
    ) -> Vec<Frame> {
        let shift = match (start, self.frames.first()) {
            (Some(s), Some(f)) => s.as_micros() - f.device_time.as_micros(),
            _ => 0,
        };
        self.frames
            .iter()
            .map(|f| Frame {
                device_id: device.clone(),
                session_id: session,
                device_time: Timestamp::from_micros(f.device_time.as_micros() + shift),
                ..f.clone()
            })
            .collect()
    }
}

/// Marks a session's frames: its audio presets on the first frame, and the end marker
/// on the last.
pub fn mark_session(frames: &mut [Frame], audio_presets: Option<&str>, end: bool) {
    if let (Some(presets), Some(first)) = (audio_presets, frames.first_mut()) {
        first.markers.push(Marker {
            sample_offset: 0,
            duration_us: None,
            label: format!("{AUDIO_PRESETS_MARKER}{presets}"),
        });
    }
    if let (true, Some(last)) = (end, frames.last_mut()) {
        last.markers.push(Marker {
            sample_offset: last.samples_per_channel.saturating_sub(1),
            duration_us: None,
            label: SESSION_END_MARKER.to_owned(),
        });
    }
}

/// Reads and frames a recording; frames of `frame_ms` milliseconds.
pub fn load(path: &Path, frame_ms: u32) -> anyhow::Result<Recording> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = Reader::new(std::io::BufReader::new(file))
        .with_context(|| format!("reading {}", path.display()))?;
    let header = reader.header().clone();
    let first = *header
        .data_signals()
        .first()
        .context("the recording has no data signals")?;
    let fs = header.sample_rate(first);
    let samples_per_frame = ((fs * f64::from(frame_ms) / 1000.0).round() as u32).max(1);
    let spec = FrameSpec {
        tenant_id: TenantId::new(Default::default()),
        device_id: DeviceId::parse("player").expect("valid"),
        session_id: SessionId::new(Default::default()),
        samples_per_frame,
    };
    let mut framer = Framer::new(&header, spec)?;
    let mut frames = Vec::new();
    let now = Timestamp::now();
    while let Some(record) = reader.next_record()? {
        framer.push(&record, now, &mut frames);
    }
    framer.finish(now, &mut frames);
    anyhow::ensure!(!frames.is_empty(), "the recording holds no samples");
    Ok(Recording {
        channels: framer.channel_labels().len(),
        frames,
        sample_rate_hz: fs,
        samples_per_frame,
    })
}
