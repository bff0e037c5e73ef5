//! Domain types: what the services reason about. They know nothing of Avro; the
//! mapping to the wire lives in [`crate::records`].

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

/// A malformed identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("not a UUID: {0:?}")]
    NotUuid(String),
    #[error("device id must be 1 to 128 characters of A-Z a-z 0-9 . _ : -, got {0:?}")]
    BadDeviceId(String),
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            pub fn new(id: Uuid) -> Self {
                Self(id)
            }
            /// A fresh random (v4) id.
            pub fn random() -> Self {
                Self(Uuid::new_v4())
            }
            pub fn parse(s: &str) -> Result<Self, IdError> {
                Uuid::parse_str(s)
                    .map(Self)
                    .map_err(|_| IdError::NotUuid(s.to_owned()))
            }
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Lowercase hyphenated: the one spelling used on the wire and in keys,
                // so equal ids always give equal key bytes (and the same partition).
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

uuid_id!(
    /// A tenant (an account's organisation): every record belongs to exactly one.
    TenantId
);
uuid_id!(
    /// One continuous recording from one device.
    SessionId
);

/// A device's identifier, chosen by the tenant (serial number, host name, ...).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(s: &str) -> Result<Self, IdError> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if ok {
            Ok(DeviceId(s.to_owned()))
        } else {
            Err(IdError::BadDeviceId(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A point in time: microseconds since the Unix epoch (UTC), the resolution of the
/// contracts' `timestamp-micros` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_micros(micros: i64) -> Self {
        Timestamp(micros)
    }

    pub const fn as_micros(self) -> i64 {
        self.0
    }

    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(i64::try_from(since.as_micros()).unwrap_or(i64::MAX))
    }

    /// Milliseconds since the epoch (Kafka's record timestamp resolution).
    pub const fn as_millis(self) -> i64 {
        self.0.div_euclid(1000)
    }
}

/// Physical unit of EEG samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SampleUnit {
    #[default]
    Microvolt,
    Millivolt,
    Volt,
}

impl SampleUnit {
    /// The unit as EDF headers and humans write it.
    pub fn symbol(self) -> &'static str {
        match self {
            SampleUnit::Microvolt => "uV",
            SampleUnit::Millivolt => "mV",
            SampleUnit::Volt => "V",
        }
    }

    /// Parses the common spellings of an EDF "physical dimension" field.
    pub fn from_symbol(s: &str) -> Option<SampleUnit> {
        match s.trim() {
            "uV" | "µV" | "μV" | "microvolt" | "microvolts" => Some(SampleUnit::Microvolt),
            "mV" | "millivolt" | "millivolts" => Some(SampleUnit::Millivolt),
            "V" | "volt" | "volts" => Some(SampleUnit::Volt),
            _ => None,
        }
    }
}

/// Marker label a device puts on its last frame to end the session (stages close it
/// at once; ingest refuses later frames of the session).
pub const SESSION_END_MARKER: &str = "clisonix.end";

/// Prefix of the marker label that picks a session's audio presets, e.g.
/// `clisonix.audio=audification,parameter_mapping`, read from the session's first frame.
pub const AUDIO_PRESETS_MARKER: &str = "clisonix.audio=";

/// The name a session lists after [`AUDIO_PRESETS_MARKER`] to have no audio rendered
/// (`clisonix.audio=none`), whatever the audio stage's defaults are.
pub const NO_AUDIO: &str = "none";

/// Prefix of the marker ingest puts on a session's first frame, listing the audio
/// presets the tenant's plan renders, e.g. `clisonix.audio.plan=parameter_mapping`.
/// Devices cannot send it (ingest refuses it as `bad_marker`). Jona renders only
/// presets it lists, whether the session picked them or they are Jona's defaults.
pub const AUDIO_PLAN_MARKER: &str = "clisonix.audio.plan=";

/// The names a frame's markers list after `prefix` (comma-separated, empty names
/// skipped), in order: the presets a session picks ([`AUDIO_PRESETS_MARKER`]) or its
/// plan renders ([`AUDIO_PLAN_MARKER`]). `None` when no marker has the prefix.
pub fn listed_in<'a, I>(labels: I, prefix: &str) -> Option<Vec<&'a str>>
where
    I: IntoIterator<Item = &'a str>,
{
    let mut found = None;
    for label in labels {
        if let Some(list) = label.strip_prefix(prefix) {
            found
                .get_or_insert_with(Vec::new)
                .extend(list.split(',').map(str::trim).filter(|n| !n.is_empty()));
        }
    }
    found
}

/// An event inside a frame: an annotation, a trigger.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    /// Offset from the frame's first sample, in samples.
    pub sample_offset: u32,
    pub duration_us: Option<i64>,
    pub label: String,
}

/// Key of `eeg.frames` and `eeg.sessions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub tenant_id: TenantId,
    pub session_id: SessionId,
}

/// One frame of multichannel EEG.
///
/// Invariant (checked when encoding and decoding): `samples.len() ==
/// channel_labels.len() * samples_per_channel`, channel-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub session_id: SessionId,
    pub seq: u64,
    pub device_time: Timestamp,
    pub received_at: Timestamp,
    pub sample_rate_hz: f64,
    pub unit: SampleUnit,
    pub channel_labels: Vec<String>,
    pub samples_per_channel: u32,
    /// Channel-major: channel `c` is `samples[c*n .. (c+1)*n]` with `n = samples_per_channel`.
    pub samples: Vec<f32>,
    pub markers: Vec<Marker>,
}

impl Frame {
    pub fn key(&self) -> SessionKey {
        SessionKey {
            tenant_id: self.tenant_id,
            session_id: self.session_id,
        }
    }

    pub fn channel_count(&self) -> usize {
        self.channel_labels.len()
    }

    /// Whether the frame carries the [`SESSION_END_MARKER`].
    pub fn ends_session(&self) -> bool {
        self.markers.iter().any(|m| m.label == SESSION_END_MARKER)
    }

    /// The samples of channel `c`. Panics if `c` is out of range.
    pub fn channel(&self, c: usize) -> &[f32] {
        let n = self.samples_per_channel as usize;
        &self.samples[c * n..(c + 1) * n]
    }
}

/// Key of `eeg.features`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FeatureKey {
    pub tenant_id: TenantId,
    pub session_id: SessionId,
    pub channel_index: u32,
    pub window_index: u64,
}

/// Band powers; `None` where undefined (e.g. a flat window).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Bands {
    pub delta: Option<f64>,
    pub theta: Option<f64>,
    pub alpha: Option<f64>,
    pub beta: Option<f64>,
    pub gamma: Option<f64>,
}

/// Hjorth parameters of a window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Hjorth {
    pub activity: Option<f64>,
    pub mobility: Option<f64>,
    pub complexity: Option<f64>,
}

/// Signal quality and stream integrity of a window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WindowQuality {
    pub flat: bool,
    pub clipped_fraction: f64,
    pub line_noise_50hz: Option<f64>,
    pub line_noise_60hz: Option<f64>,
    pub seq_gaps: u32,
    pub duplicate_frames: u32,
    pub out_of_order_frames: u32,
}

/// Features of one channel over one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    pub tenant_id: TenantId,
    pub session_id: SessionId,
    pub device_id: DeviceId,
    pub channel_index: u32,
    pub channel_label: String,
    pub window_index: u64,
    pub window_start_sample: u64,
    pub window_start: Timestamp,
    pub window_samples: u32,
    pub sample_rate_hz: f64,
    pub unit: SampleUnit,
    pub algorithm_version: String,
    pub abs: Bands,
    pub total_abs: Option<f64>,
    pub rel: Bands,
    pub peak_alpha_hz: Option<f64>,
    pub peak_alpha_psd: Option<f64>,
    pub spectral_entropy: Option<f64>,
    pub hjorth: Hjorth,
    pub aperiodic_exponent: Option<f64>,
    pub psd_resolution_hz: f64,
    pub psd: Vec<f64>,
    pub quality: WindowQuality,
}

impl Features {
    pub fn key(&self) -> FeatureKey {
        FeatureKey {
            tenant_id: self.tenant_id,
            session_id: self.session_id,
            channel_index: self.channel_index,
            window_index: self.window_index,
        }
    }
}

/// Key of `audio.chunks`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AudioChunkKey {
    pub tenant_id: TenantId,
    pub session_id: SessionId,
    pub preset: String,
    pub chunk_index: u64,
}

/// A span of synthesized audio.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioChunk {
    pub tenant_id: TenantId,
    pub session_id: SessionId,
    pub preset: String,
    pub preset_version: String,
    pub chunk_index: u64,
    pub start_frame: u64,
    pub eeg_start: Timestamp,
    pub sample_rate_hz: u32,
    pub channels: u16,
    /// Interleaved by audio channel: `pcm.len() == channels * frames`.
    pub pcm: Vec<i16>,
    pub source_first_seq: u64,
    pub source_last_seq: u64,
}

impl AudioChunk {
    pub fn key(&self) -> AudioChunkKey {
        AudioChunkKey {
            tenant_id: self.tenant_id,
            session_id: self.session_id,
            preset: self.preset.clone(),
            chunk_index: self.chunk_index,
        }
    }
}

/// Lifecycle status of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionStatus {
    Active,
    Ended,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// The device or a user closed it.
    Explicit,
    /// No frame arrived for the configured idle time.
    IdleTimeout,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Explicit => "explicit",
            EndReason::IdleTimeout => "idle_timeout",
        }
    }

    pub fn parse(s: &str) -> Option<EndReason> {
        match s {
            "explicit" => Some(EndReason::Explicit),
            "idle_timeout" => Some(EndReason::IdleTimeout),
            _ => None,
        }
    }
}

/// The latest state of a session (compacted `eeg.sessions`).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionState {
    pub tenant_id: TenantId,
    pub session_id: SessionId,
    pub device_id: DeviceId,
    pub status: SessionStatus,
    pub started_at: Timestamp,
    pub last_frame_at: Timestamp,
    pub first_device_time: Timestamp,
    pub last_device_time: Timestamp,
    pub sample_rate_hz: f64,
    pub channel_labels: Vec<String>,
    pub frames: u64,
    pub samples_per_channel: u64,
    pub seq_gaps: u64,
    pub duplicate_frames: u64,
    pub out_of_order_frames: u64,
    pub ended: Option<(Timestamp, EndReason)>,
}

impl SessionState {
    pub fn key(&self) -> SessionKey {
        SessionKey {
            tenant_id: self.tenant_id,
            session_id: self.session_id,
        }
    }
}

/// Key of `usage.events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TenantKey {
    pub tenant_id: TenantId,
}

/// What a usage event counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UsageKind {
    FramesIngested,
    BytesIngested,
    FeatureWindows,
    /// Milliseconds of synthesized audio.
    AudioMilliseconds,
    ApiRequests,
    /// A kind added by a newer writer than this reader.
    Unknown,
    /// Recordings uploaded.
    RecordingUploads,
}

/// A metered quantity used by a tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEvent {
    pub event_id: Uuid,
    pub tenant_id: TenantId,
    pub kind: UsageKind,
    pub quantity: i64,
    pub occurred_at: Timestamp,
    pub source: String,
    pub session_id: Option<SessionId>,
    pub device_id: Option<DeviceId>,
    /// What the quantity is of within its kind, where a kind has parts (the audio
    /// preset of audio milliseconds).
    pub detail: Option<String>,
}

impl UsageEvent {
    /// An event id derived from what the event counts (`parts`, e.g. a session, a
    /// preset and a chunk index), so that a stage that replays its input emits the
    /// same events with the same ids. A UUID of version 8 from the first 16 bytes of
    /// the SHA-256 of the parts, each length-prefixed.
    pub fn derived_id(parts: &[&[u8]]) -> Uuid {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for part in parts {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part);
        }
        let digest = hash.finalize();
        let mut bytes: [u8; 16] = digest[..16].try_into().expect("16 bytes");
        bytes[6] = (bytes[6] & 0x0F) | 0x80;
        bytes[8] = (bytes[8] & 0x3F) | 0x80;
        Uuid::from_bytes(bytes)
    }

    pub fn key(&self) -> TenantKey {
        TenantKey {
            tenant_id: self.tenant_id,
        }
    }
}

/// Key of `stages.deadletter`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeadLetterKey {
    pub stage: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
}

/// A Kafka header of the original record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Option<Vec<u8>>,
}

/// A record a stage could not process.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub stage: String,
    pub stage_version: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub source_timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<Header>,
    pub reason_code: String,
    pub reason_detail: String,
    pub failed_at: Timestamp,
}

impl DeadLetter {
    pub fn key(&self) -> DeadLetterKey {
        DeadLetterKey {
            stage: self.stage.clone(),
            source_topic: self.source_topic.clone(),
            source_partition: self.source_partition,
            source_offset: self.source_offset,
        }
    }
}
