//! The JSON frame, as devices send it to `POST /v1/frames` and over WebSocket text
//! messages, and the seed's legacy `POST /collect` body.
//!
//! A body is one frame object, an array of frames, or `{"frames": [...]}`. The batch is
//! split into raw frame texts first and each frame is parsed on its own, so one bad
//! frame is refused by index while the others go on.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use clisonix_schemas::{DeviceId, Frame, Marker, SampleUnit, SessionId, TenantId, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::validate::{Reason, Rejection};

/// One frame of multichannel EEG from a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonFrame {
    /// The session's UUID, chosen by the device when it starts recording.
    pub session_id: String,
    /// The device's id: 1 to 128 characters of `A-Z a-z 0-9 . _ : -`.
    pub device_id: String,
    /// 0 for the session's first frame, then increasing (gaps allowed, never back).
    pub seq: u64,
    /// Device clock time of the first sample, RFC 3339 (`2026-11-25T10:00:00.125Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_time: Option<String>,
    /// The same as microseconds since the Unix epoch (give one of the two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_time_us: Option<i64>,
    pub sample_rate_hz: f64,
    /// `uV` (default), `mV` or `V`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Channel labels, in the order of `samples`.
    pub channels: Vec<String>,
    /// One array per channel, all the same length.
    pub samples: Vec<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub markers: Vec<JsonMarker>,
}

/// An event within a frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonMarker {
    /// Offset from the frame's first sample, in samples.
    pub sample_offset: u32,
    pub label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<i64>,
}

impl JsonFrame {
    /// The contract frame, owned by `tenant` (never by anything in the body).
    /// Checks the fields' types and domains; [`crate::validate::validate`] checks the rest.
    pub fn into_frame(self, tenant: TenantId, received_at: Timestamp) -> Result<Frame, Rejection> {
        let session_id = SessionId::parse(&self.session_id)
            .map_err(|e| Rejection::new(Reason::InvalidField, e.to_string()).field("session_id"))?;
        let device_id = DeviceId::parse(&self.device_id)
            .map_err(|e| Rejection::new(Reason::InvalidField, e.to_string()).field("device_id"))?;
        if self.seq > i64::MAX as u64 {
            return Err(
                Rejection::new(Reason::InvalidField, "seq must be below 2^63").field("seq"),
            );
        }
        let device_time = match (&self.device_time, self.device_time_us) {
            (Some(text), None) => DateTime::parse_from_rfc3339(text)
                .map(|t| Timestamp::from_micros(t.with_timezone(&Utc).timestamp_micros()))
                .map_err(|e| {
                    Rejection::new(
                        Reason::BadDeviceTime,
                        format!("device_time is not RFC 3339: {e}"),
                    )
                    .field("device_time")
                })?,
            (None, Some(us)) => Timestamp::from_micros(us),
            _ => {
                return Err(Rejection::new(
                    Reason::BadDeviceTime,
                    "give exactly one of device_time (RFC 3339) and device_time_us",
                )
                .field("device_time"))
            }
        };
        let unit = match self.unit.as_deref() {
            None => SampleUnit::Microvolt,
            Some(s) => SampleUnit::from_symbol(s).ok_or_else(|| {
                Rejection::new(
                    Reason::InvalidField,
                    format!("unit {s:?} is not one of uV, mV, V"),
                )
                .field("unit")
            })?,
        };
        if self.samples.len() != self.channels.len() {
            return Err(Rejection::new(
                Reason::WrongSampleCount,
                format!(
                    "{} sample arrays for {} channels",
                    self.samples.len(),
                    self.channels.len()
                ),
            )
            .field("samples"));
        }
        let n = self.samples.first().map_or(0, Vec::len);
        let mut samples = Vec::with_capacity(n * self.samples.len());
        for (c, block) in self.samples.iter().enumerate() {
            if block.len() != n {
                return Err(Rejection::new(
                    Reason::WrongSampleCount,
                    format!("channel {c} has {} samples, channel 0 has {n}", block.len()),
                )
                .field(format!("samples[{c}]")));
            }
            samples.extend(block.iter().map(|&x| x as f32));
        }
        let samples_per_channel = u32::try_from(n).map_err(|_| {
            Rejection::new(Reason::FrameTooLarge, "too many samples").field("samples")
        })?;
        Ok(Frame {
            tenant_id: tenant,
            device_id,
            session_id,
            seq: self.seq,
            device_time,
            received_at,
            sample_rate_hz: self.sample_rate_hz,
            unit,
            channel_labels: self.channels,
            samples_per_channel,
            samples,
            markers: self
                .markers
                .into_iter()
                .map(|m| Marker {
                    sample_offset: m.sample_offset,
                    duration_us: m.duration_us,
                    label: m.label,
                })
                .collect(),
        })
    }

    /// The JSON form of a contract frame (what the player sends).
    pub fn from_frame(frame: &Frame) -> JsonFrame {
        JsonFrame {
            session_id: frame.session_id.to_string(),
            device_id: frame.device_id.to_string(),
            seq: frame.seq,
            device_time: None,
            device_time_us: Some(frame.device_time.as_micros()),
            sample_rate_hz: frame.sample_rate_hz,
            unit: Some(frame.unit.symbol().to_owned()),
            channels: frame.channel_labels.clone(),
            samples: (0..frame.channel_count())
                .map(|c| frame.channel(c).iter().map(|&x| f64::from(x)).collect())
                .collect(),
            markers: frame
                .markers
                .iter()
                .map(|m| JsonMarker {
                    sample_offset: m.sample_offset,
                    label: m.label.clone(),
                    duration_us: m.duration_us,
                })
                .collect(),
        }
    }
}

/// A request body that is not JSON of the expected shape at all.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(pub String);

/// Splits a JSON body into the raw text of each frame (one, an array, or
/// `{"frames": [...]}`), without parsing the frames themselves.
pub fn split_body(body: &[u8]) -> Result<Vec<&RawValue>, BodyError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        Some(b'[') => serde_json::from_slice::<Vec<&RawValue>>(body)
            .map_err(|e| BodyError(format!("not a JSON array of frames: {e}"))),
        Some(b'{') => {
            let object = serde_json::from_slice::<BTreeMap<&str, &RawValue>>(body)
                .map_err(|e| BodyError(format!("not a JSON object: {e}")))?;
            match object.get("frames") {
                Some(frames) if object.len() == 1 => {
                    serde_json::from_str::<Vec<&RawValue>>(frames.get()).map_err(|e| {
                        BodyError(format!("\"frames\" must be an array of frames: {e}"))
                    })
                }
                _ => serde_json::from_slice::<&RawValue>(body)
                    .map(|one| vec![one])
                    .map_err(|e| BodyError(e.to_string())),
            }
        }
        _ => Err(BodyError(
            "expected a frame object, an array of frames, or {\"frames\": [...]}".into(),
        )),
    }
}

/// Parses one frame's text, naming the field at fault where serde says which.
pub fn parse_frame(raw: &RawValue) -> Result<JsonFrame, Rejection> {
    serde_json::from_str::<JsonFrame>(raw.get()).map_err(serde_rejection)
}

/// A serde error as a rejection: `missing field `seq``, `unknown field `x``, a wrong
/// type. The field is taken from the backticks serde puts around names.
pub fn serde_rejection(e: serde_json::Error) -> Rejection {
    let text = e.to_string();
    let field = text
        .split('`')
        .nth(1)
        .filter(|f| !f.contains(' '))
        .map(str::to_owned);
    let mut r = Rejection::new(Reason::InvalidField, text);
    r.field = field;
    r
}

/// The seed's `POST /collect` body: one multichannel sample, kept for old clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegacyCollect {
    pub timestamp: DateTime<Utc>,
    /// One value per channel.
    pub channels: Vec<f64>,
    pub sample_rate: i64,
}

/// The seed's answer: `{"status": "accepted", "frame_id": "<session>:<seq>"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegacyAnswer {
    pub status: String,
    pub frame_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clisonix_schemas::examples;

    #[test]
    fn a_frame_survives_the_json_form() {
        let frame = examples::frame(3, 4, 32);
        let json = serde_json::to_string(&JsonFrame::from_frame(&frame)).unwrap();
        let back: JsonFrame = serde_json::from_str(&json).unwrap();
        let back = back.into_frame(frame.tenant_id, frame.received_at).unwrap();
        assert_eq!(back, frame);
    }

    #[test]
    fn bodies_of_one_many_or_wrapped_frames_split_alike() {
        let one = serde_json::to_string(&JsonFrame::from_frame(&examples::frame(1, 2, 4))).unwrap();
        assert_eq!(split_body(one.as_bytes()).unwrap().len(), 1);
        let list = format!("[{one},{one},{one}]");
        assert_eq!(split_body(list.as_bytes()).unwrap().len(), 3);
        let wrapped = format!(" {{\"frames\": [{one},{one}]}}");
        assert_eq!(split_body(wrapped.as_bytes()).unwrap().len(), 2);
        assert!(split_body(b"{\"frames\": 3}").is_err());
        assert!(split_body(b"nonsense").is_err());
        assert!(split_body(b"[{\"a\":1},").is_err());
    }

    #[test]
    fn field_errors_name_the_field() {
        let raw: Box<RawValue> =
            serde_json::from_str(r#"{"session_id":"x","device_id":"d"}"#).unwrap();
        let err = parse_frame(&raw).unwrap_err();
        assert_eq!(err.code, "invalid_field");
        assert_eq!(err.field.as_deref(), Some("seq"), "{err:?}");
        let raw: Box<RawValue> = serde_json::from_str(r#"{"sessionid":"x"}"#).unwrap();
        assert_eq!(
            parse_frame(&raw).unwrap_err().field.as_deref(),
            Some("sessionid")
        );
    }

    #[test]
    fn conversion_checks_ids_times_units_and_shapes() {
        let base = JsonFrame::from_frame(&examples::frame(1, 2, 4));
        let t = TenantId::random();
        let now = Timestamp::now();
        let field = |f: JsonFrame| f.into_frame(t, now).unwrap_err().field.unwrap();
        assert_eq!(
            field(JsonFrame {
                session_id: "nope".into(),
                ..base.clone()
            }),
            "session_id"
        );
        assert_eq!(
            field(JsonFrame {
                device_id: "a b".into(),
                ..base.clone()
            }),
            "device_id"
        );
        assert_eq!(
            field(JsonFrame {
                unit: Some("furlong".into()),
                ..base.clone()
            }),
            "unit"
        );
        assert_eq!(
            field(JsonFrame {
                device_time: Some("2026-11-25T10:00:00Z".into()),
                ..base.clone()
            }),
            "device_time"
        );
        let mut ragged = base.clone();
        ragged.samples[1].pop();
        assert_eq!(field(ragged), "samples[1]");
        let mut short = base.clone();
        short.samples.pop();
        assert_eq!(field(short), "samples");
        let text = JsonFrame {
            device_time: Some("2026-11-25T10:00:00.125Z".into()),
            device_time_us: None,
            ..base
        };
        assert_eq!(
            text.into_frame(t, now).unwrap().device_time.as_micros(),
            1_795_600_800_125_000
        );
    }
}
