//! The rules a frame must pass before ingest publishes it, and the reasons it gives
//! when one does not. Every rejection names a machine-readable code, an HTTP status,
//! and (where one is at fault) the field.

use clisonix_schemas::{Frame, Timestamp, AUDIO_PLAN_MARKER, AUDIO_PRESETS_MARKER};
use serde::{Deserialize, Serialize};

use crate::binary::{FrameView, MarkerView};

/// Why a frame (or a request) was refused. The code is the wire name and the metric
/// label; the status is what HTTP answers when the whole request fails for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not a frame at all: bad JSON, a broken binary item, an undecodable record.
    MalformedFrame,
    /// A field has the wrong type or a value out of its domain (ids, unit, seq).
    InvalidField,
    /// NaN or ±Inf among the samples.
    NonFiniteSample,
    /// The number of sample blocks differs from the number of channel labels, or the
    /// channels have different lengths.
    WrongSampleCount,
    /// The sample rate is not finite, not positive or beyond the configured bounds.
    BadSampleRate,
    /// More samples (or a longer time span) than one frame may hold.
    FrameTooLarge,
    /// No channels, too many, empty, overlong or repeated labels.
    BadChannels,
    /// A marker outside the frame, or an overlong label.
    BadMarker,
    /// The device time is missing, given twice, or implausible.
    BadDeviceTime,
    /// The sequence number is not above the previous frame's in the same request.
    OutOfOrder,
    /// The session belongs to another tenant.
    SessionForbidden,
    /// The frame's device, sample rate, unit or channels differ from the session's.
    SessionMismatch,
    /// A WebSocket stream carries a frame of another session than the one it opened.
    WrongSession,
    /// The broker did not confirm the write in time: retry after a pause.
    BrokerUnavailable,
    /// Ingest holds as much unconfirmed data as it may: retry after a pause.
    Overloaded,
    /// Ingest cannot reach its database (sessions, keys): retry after a pause.
    Unavailable,
    /// The session has ended (a frame carried the end marker): open a new one.
    SessionEnded,
    /// Another ingest instance serves the session and did not hand it over in time:
    /// retry after a pause (or send the session's frames to the instance serving it).
    SessionBusy,
    /// A hard limit of the tenant's plan is used up for this billing period: not
    /// retryable before the period resets (`resets_at`).
    QuotaExceeded,
    /// The tenant's subscription is past due beyond its grace period, or canceled.
    PaymentRequired,
    /// The tenant has as many sessions open as its plan allows: end one first.
    ConcurrentSessionsExceeded,
    /// A new device would be one more than the tenant's plan allows.
    DevicesExceeded,
    /// The frame asks for an audio preset the tenant's plan does not render.
    PresetNotInPlan,
}

impl Reason {
    pub const ALL: [Reason; 23] = [
        Reason::MalformedFrame,
        Reason::InvalidField,
        Reason::NonFiniteSample,
        Reason::WrongSampleCount,
        Reason::BadSampleRate,
        Reason::FrameTooLarge,
        Reason::BadChannels,
        Reason::BadMarker,
        Reason::BadDeviceTime,
        Reason::OutOfOrder,
        Reason::SessionForbidden,
        Reason::SessionMismatch,
        Reason::WrongSession,
        Reason::BrokerUnavailable,
        Reason::Overloaded,
        Reason::Unavailable,
        Reason::SessionEnded,
        Reason::SessionBusy,
        Reason::QuotaExceeded,
        Reason::PaymentRequired,
        Reason::ConcurrentSessionsExceeded,
        Reason::DevicesExceeded,
        Reason::PresetNotInPlan,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Reason::MalformedFrame => "malformed_frame",
            Reason::InvalidField => "invalid_field",
            Reason::NonFiniteSample => "non_finite_sample",
            Reason::WrongSampleCount => "wrong_sample_count",
            Reason::BadSampleRate => "bad_sample_rate",
            Reason::FrameTooLarge => "frame_too_large",
            Reason::BadChannels => "bad_channels",
            Reason::BadMarker => "bad_marker",
            Reason::BadDeviceTime => "bad_device_time",
            Reason::OutOfOrder => "out_of_order",
            Reason::SessionForbidden => "session_forbidden",
            Reason::SessionMismatch => "session_mismatch",
            Reason::WrongSession => "wrong_session",
            Reason::BrokerUnavailable => "broker_unavailable",
            Reason::Overloaded => "overloaded",
            Reason::Unavailable => "unavailable",
            Reason::SessionEnded => "session_ended",
            Reason::SessionBusy => "session_busy",
            Reason::QuotaExceeded => "quota_exceeded",
            Reason::PaymentRequired => "payment_required",
            Reason::ConcurrentSessionsExceeded => "concurrent_sessions_exceeded",
            Reason::DevicesExceeded => "devices_exceeded",
            Reason::PresetNotInPlan => "preset_not_in_plan",
        }
    }

    pub fn from_code(code: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The HTTP status a request gets when it fails for this reason.
    pub fn status(self) -> u16 {
        match self {
            Reason::MalformedFrame => 400,
            Reason::FrameTooLarge => 413,
            Reason::SessionForbidden => 403,
            Reason::SessionMismatch
            | Reason::OutOfOrder
            | Reason::WrongSession
            | Reason::SessionEnded => 409,
            Reason::BrokerUnavailable | Reason::Unavailable | Reason::SessionBusy => 503,
            Reason::Overloaded => 429,
            Reason::QuotaExceeded
            | Reason::PaymentRequired
            | Reason::ConcurrentSessionsExceeded
            | Reason::DevicesExceeded
            | Reason::PresetNotInPlan => 402,
            _ => 422,
        }
    }

    /// Whether sending the same frame again later can succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Reason::BrokerUnavailable
                | Reason::Overloaded
                | Reason::Unavailable
                | Reason::SessionBusy
        )
    }
}

/// A refused frame: why, in words, and which field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Set for retryable reasons: resend the frame after this long. Also set for a
    /// used-up quota: nothing is accepted before then (the period's reset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// Which quota refused the frame (`quota_exceeded`, and the session count of
    /// `concurrent_sessions_exceeded`), beside the code.
    #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Box<QuotaDetail>>,
}

/// The quota behind a `quota_exceeded` or `concurrent_sessions_exceeded` refusal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaDetail {
    /// The meter (`frames`, `bytes`, `device_ms`, `channel_ms`, `recording_uploads`),
    /// or `concurrent_sessions`.
    pub meter: String,
    pub limit: i64,
    pub used: i64,
    /// When the period resets (RFC 3339); absent for the concurrent-session limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<String>,
}

impl Rejection {
    pub fn new(reason: Reason, message: impl Into<String>) -> Rejection {
        Rejection {
            code: reason.code().to_owned(),
            message: message.into(),
            field: None,
            retry_after_ms: None,
            quota: None,
        }
    }

    pub fn quota(mut self, quota: QuotaDetail) -> Rejection {
        self.quota = Some(Box::new(quota));
        self
    }

    pub fn field(mut self, field: impl Into<String>) -> Rejection {
        self.field = Some(field.into());
        self
    }

    pub fn retry_after_ms(mut self, ms: u64) -> Rejection {
        self.retry_after_ms = Some(ms);
        self
    }

    /// The reason, when the code is one this version knows.
    pub fn reason(&self) -> Option<Reason> {
        Reason::from_code(&self.code)
    }

    pub fn retryable(&self) -> bool {
        self.reason().is_some_and(Reason::retryable)
    }
}

/// Bounds on what one frame may be.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_channels: usize,
    /// Samples of all channels together (a frame must fit a Kafka record).
    pub max_frame_samples: usize,
    pub min_sample_rate_hz: f64,
    pub max_sample_rate_hz: f64,
    /// The longest span one frame may cover, in seconds.
    pub max_frame_seconds: f64,
    pub max_label_chars: usize,
    pub max_markers: usize,
    pub max_marker_label_chars: usize,
    /// Device times before this are refused (the EDF format dates from 1985).
    pub earliest_device_time: Timestamp,
    /// How far ahead of the ingest clock a device time may be, in microseconds.
    pub max_clock_skew_us: i64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_channels: 512,
            max_frame_samples: 200_000,
            min_sample_rate_hz: 1.0,
            max_sample_rate_hz: 100_000.0,
            max_frame_seconds: 60.0,
            max_label_chars: 64,
            max_markers: 1024,
            max_marker_label_chars: 1024,
            // 1985-01-01T00:00:00Z
            earliest_device_time: Timestamp::from_micros(473_385_600_000_000),
            max_clock_skew_us: 24 * 3600 * 1_000_000,
        }
    }
}

/// Checks a frame against the limits; `now` is the ingest clock.
pub fn validate(frame: &Frame, limits: &Limits, now: Timestamp) -> Result<(), Rejection> {
    let labels: Vec<&str> = frame.channel_labels.iter().map(String::as_str).collect();
    let markers: Vec<MarkerView<'_>> = frame
        .markers
        .iter()
        .map(|m| MarkerView {
            sample_offset: m.sample_offset,
            duration_us: m.duration_us,
            label: &m.label,
        })
        .collect();
    check(
        &Fields {
            sample_rate_hz: frame.sample_rate_hz,
            channel_labels: Some(&labels),
            channels: labels.len(),
            samples_per_channel: frame.samples_per_channel,
            sample_count: frame.samples.len(),
            first_non_finite: &|| first_non_finite(frame.samples.iter().copied()),
            device_time: frame.device_time,
            markers: &markers,
        },
        limits,
        now,
    )
}

/// Checks a frame read in place (the binary fast path). `labels_checked`: the same
/// label bytes already passed (a body's frames usually share their labels), so their
/// checks are skipped.
pub fn validate_view(
    view: &FrameView<'_>,
    labels_checked: bool,
    limits: &Limits,
    now: Timestamp,
) -> Result<(), Rejection> {
    check(
        &Fields {
            sample_rate_hz: view.sample_rate_hz,
            channel_labels: (!labels_checked).then_some(view.channel_labels.as_slice()),
            channels: view.channel_labels.len(),
            samples_per_channel: view.samples_per_channel,
            sample_count: view.samples.len() / 4,
            first_non_finite: &|| first_non_finite(view.sample_values()),
            device_time: view.device_time,
            markers: &view.markers,
        },
        limits,
        now,
    )
}

/// The first sample that is not finite: its index and value. Every sample is
/// looked at, so this first asks only whether there is one, in a pass without
/// branches that the compiler vectorises (a search that stops at the first finds
/// nothing in a valid frame, one sample at a time); only then does it search.
fn first_non_finite(samples: impl Iterator<Item = f32> + Clone) -> Option<(usize, f32)> {
    if !samples.clone().fold(false, |bad, x| bad | !x.is_finite()) {
        return None;
    }
    samples.enumerate().find(|(_, x)| !x.is_finite())
}

/// What the rules look at, however the frame is held.
struct Fields<'a> {
    sample_rate_hz: f64,
    /// `None`: already checked.
    channel_labels: Option<&'a [&'a str]>,
    channels: usize,
    samples_per_channel: u32,
    sample_count: usize,
    /// The first sample that is not finite: its index and value.
    first_non_finite: &'a dyn Fn() -> Option<(usize, f32)>,
    device_time: Timestamp,
    markers: &'a [MarkerView<'a>],
}

fn check(frame: &Fields<'_>, limits: &Limits, now: Timestamp) -> Result<(), Rejection> {
    let fs = frame.sample_rate_hz;
    if !fs.is_finite() || fs < limits.min_sample_rate_hz || fs > limits.max_sample_rate_hz {
        return Err(Rejection::new(
            Reason::BadSampleRate,
            format!(
                "sample rate {fs} Hz is outside {} ..= {} Hz",
                limits.min_sample_rate_hz, limits.max_sample_rate_hz
            ),
        )
        .field("sample_rate_hz"));
    }
    let channels = frame.channels;
    if channels == 0 || channels > limits.max_channels {
        return Err(Rejection::new(
            Reason::BadChannels,
            format!(
                "a frame needs 1 to {} channels, got {channels}",
                limits.max_channels
            ),
        )
        .field("channels"));
    }
    let labels = frame.channel_labels.unwrap_or_default();
    for (i, label) in labels.iter().enumerate() {
        let chars = label.chars().count();
        if label.trim().is_empty() || chars > limits.max_label_chars {
            return Err(Rejection::new(
                Reason::BadChannels,
                format!(
                    "channel label {i} must be 1 to {} characters and not blank",
                    limits.max_label_chars
                ),
            )
            .field(format!("channels[{i}]")));
        }
        if labels[..i].contains(label) {
            return Err(Rejection::new(
                Reason::BadChannels,
                format!("channel label {label:?} appears twice"),
            )
            .field(format!("channels[{i}]")));
        }
    }
    let n = frame.samples_per_channel as usize;
    if n == 0 {
        return Err(Rejection::new(
            Reason::WrongSampleCount,
            "a frame needs at least one sample",
        )
        .field("samples"));
    }
    if frame.sample_count != channels * n {
        return Err(Rejection::new(
            Reason::WrongSampleCount,
            format!(
                "{} samples for {channels} channels of {n}",
                frame.sample_count
            ),
        )
        .field("samples"));
    }
    if frame.sample_count > limits.max_frame_samples {
        return Err(Rejection::new(
            Reason::FrameTooLarge,
            format!(
                "{} samples in one frame; at most {} (split it)",
                frame.sample_count, limits.max_frame_samples
            ),
        )
        .field("samples"));
    }
    if n as f64 / fs > limits.max_frame_seconds {
        return Err(Rejection::new(
            Reason::FrameTooLarge,
            format!(
                "the frame spans {:.3} s; at most {} s",
                n as f64 / fs,
                limits.max_frame_seconds
            ),
        )
        .field("samples"));
    }
    if let Some((at, x)) = (frame.first_non_finite)() {
        return Err(Rejection::new(
            Reason::NonFiniteSample,
            format!("sample {} of channel {} is {}", at % n, at / n, x),
        )
        .field(format!("samples[{}][{}]", at / n, at % n)));
    }
    let t = frame.device_time.as_micros();
    if t < limits.earliest_device_time.as_micros()
        || t > now.as_micros().saturating_add(limits.max_clock_skew_us)
    {
        return Err(Rejection::new(
            Reason::BadDeviceTime,
            format!(
                "device time {t} µs since the epoch is before 1985 or more than {} h ahead of ingest's clock",
                limits.max_clock_skew_us / 3_600_000_000
            ),
        )
        .field("device_time"));
    }
    if frame.markers.len() > limits.max_markers {
        return Err(Rejection::new(
            Reason::BadMarker,
            format!("at most {} markers per frame", limits.max_markers),
        )
        .field("markers"));
    }
    for (i, m) in frame.markers.iter().enumerate() {
        if m.sample_offset as usize >= n {
            return Err(Rejection::new(
                Reason::BadMarker,
                format!(
                    "marker at sample {} is outside the frame's {n} samples",
                    m.sample_offset
                ),
            )
            .field(format!("markers[{i}].sample_offset")));
        }
        if m.label.chars().count() > limits.max_marker_label_chars {
            return Err(Rejection::new(
                Reason::BadMarker,
                format!(
                    "marker labels hold at most {} characters",
                    limits.max_marker_label_chars
                ),
            )
            .field(format!("markers[{i}].label")));
        }
        if m.duration_us.is_some_and(|d| d < 0) {
            return Err(Rejection::new(
                Reason::BadMarker,
                "a marker's duration cannot be negative",
            )
            .field(format!("markers[{i}].duration_us")));
        }
        if m.label.starts_with(AUDIO_PLAN_MARKER) {
            return Err(Rejection::new(
                Reason::BadMarker,
                format!("{AUDIO_PLAN_MARKER} markers are ingest's own (the plan's audio presets); pick presets with {AUDIO_PRESETS_MARKER}"),
            )
            .field(format!("markers[{i}].label")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clisonix_schemas::examples;

    /// Checks the rule on the frame, and on the frame read in place from its record
    /// (the binary fast path) where the record can be read that way: both must give
    /// the same refusal, and skipping label checks must not hide any other.
    fn check(edit: impl FnOnce(&mut Frame), reason: Reason, field: &str) {
        let mut frame = examples::frame(1, 4, 32);
        edit(&mut frame);
        let now = Timestamp::now();
        let err = validate(&frame, &Limits::default(), now).unwrap_err();
        assert_eq!(err.code, reason.code(), "{err:?}");
        assert_eq!(err.field.as_deref(), Some(field), "{err:?}");
        let Ok(item) = clisonix_schemas::encode(&frame) else {
            return;
        };
        if let Some(view) = crate::binary::view(&item) {
            assert_eq!(
                validate_view(&view, false, &Limits::default(), now),
                Err(err.clone())
            );
            if reason != Reason::BadChannels {
                assert_eq!(
                    validate_view(&view, true, &Limits::default(), now),
                    Err(err)
                );
            }
        }
    }

    #[test]
    fn a_good_frame_passes() {
        let item = clisonix_schemas::encode(&examples::frame(1, 4, 32)).unwrap();
        let view = crate::binary::view(&item).unwrap();
        validate_view(&view, false, &Limits::default(), Timestamp::now()).unwrap();
        validate(
            &examples::frame(1, 4, 32),
            &Limits::default(),
            Timestamp::now(),
        )
        .unwrap();
    }

    #[test]
    fn each_rule_names_its_reason_and_field() {
        check(
            |f| f.sample_rate_hz = 0.0,
            Reason::BadSampleRate,
            "sample_rate_hz",
        );
        check(
            |f| f.sample_rate_hz = -256.0,
            Reason::BadSampleRate,
            "sample_rate_hz",
        );
        check(
            |f| f.sample_rate_hz = f64::NAN,
            Reason::BadSampleRate,
            "sample_rate_hz",
        );
        check(
            |f| f.sample_rate_hz = 1e9,
            Reason::BadSampleRate,
            "sample_rate_hz",
        );
        check(
            |f| f.channel_labels.clear(),
            Reason::BadChannels,
            "channels",
        );
        check(
            |f| f.channel_labels[1] = f.channel_labels[0].clone(),
            Reason::BadChannels,
            "channels[1]",
        );
        check(
            |f| f.channel_labels[0] = " ".into(),
            Reason::BadChannels,
            "channels[0]",
        );
        check(
            |f| {
                f.samples.pop();
            },
            Reason::WrongSampleCount,
            "samples",
        );
        check(
            |f| f.samples[5] = f32::NAN,
            Reason::NonFiniteSample,
            "samples[0][5]",
        );
        let n = examples::frame(1, 4, 32).samples_per_channel as usize;
        check(
            |f| f.samples[n + 1] = f32::INFINITY,
            Reason::NonFiniteSample,
            "samples[1][1]",
        );
        check(
            |f| f.device_time = Timestamp::from_micros(0),
            Reason::BadDeviceTime,
            "device_time",
        );
        check(
            |f| f.markers[0].sample_offset = f.samples_per_channel,
            Reason::BadMarker,
            "markers[0].sample_offset",
        );
        check(
            |f| f.markers[0].label = "clisonix.audio.plan=audification".into(),
            Reason::BadMarker,
            "markers[0].label",
        );
        check(
            |f| {
                f.samples_per_channel = 100_000;
                f.samples = vec![0.0; 100_000 * f.channel_labels.len()];
                f.markers.clear();
            },
            Reason::FrameTooLarge,
            "samples",
        );
    }

    #[test]
    fn the_first_non_finite_sample_is_named_wherever_it_is() {
        // 3 channels of 13 samples: 39, not a multiple of any vector width, so the
        // last samples are in the checking pass's remainder.
        let good = examples::frame(1, 3, 13);
        let n = good.samples_per_channel as usize;
        let now = Timestamp::now();
        let odd_nan = f32::from_bits(0xffc0_0001);
        for at in 0..good.samples.len() {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, odd_nan] {
                let mut frame = good.clone();
                frame.samples[at] = bad;
                // A later one too: the first is the one named.
                if let Some(later) = frame.samples.get_mut(at + 7) {
                    *later = f32::NAN;
                }
                let field = format!("samples[{}][{}]", at / n, at % n);
                let err = validate(&frame, &Limits::default(), now).unwrap_err();
                assert_eq!(err.code, "non_finite_sample", "{err:?}");
                assert_eq!(err.field.as_deref(), Some(field.as_str()));
                let item = clisonix_schemas::encode(&frame).unwrap();
                let view = crate::binary::view(&item).unwrap();
                assert_eq!(
                    validate_view(&view, true, &Limits::default(), now),
                    Err(err)
                );
            }
        }
        validate(&good, &Limits::default(), now).unwrap();
    }

    #[test]
    fn codes_round_trip_and_retryability_is_for_transient_reasons_only() {
        for r in Reason::ALL {
            assert_eq!(Reason::from_code(r.code()), Some(r));
            assert_eq!(r.retryable(), matches!(r.status(), 429 | 503), "{r:?}");
        }
    }
}
