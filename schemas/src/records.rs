//! The mapping between domain types and the Avro values of the newest schemas: the one
//! place that knows field names and order. Fields are written and read in schema order;
//! a decoded value has already been resolved into the newest schema, so reading can
//! rely on that order too.

use apache_avro::types::Value;
use uuid::Uuid;

use crate::codec::{write_bytes, write_long, AvroRecord, DecodeError, EncodeError};
use crate::domain::*;
use crate::registry::Family;

// ---------------------------------------------------------------------------------
// Encoding helpers

fn record(fields: Vec<(&'static str, Value)>) -> Value {
    Value::Record(
        fields
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect(),
    )
}

fn string(s: impl Into<String>) -> Value {
    Value::String(s.into())
}

fn ts(t: Timestamp) -> Value {
    Value::TimestampMicros(t.as_micros())
}

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> Value) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(x) => Value::Union(1, Box::new(f(x))),
    }
}

fn opt_double(v: Option<f64>) -> Value {
    opt(v, Value::Double)
}

fn strings(items: &[String]) -> Value {
    Value::Array(items.iter().cloned().map(Value::String).collect())
}

fn long(family: Family, field: &'static str, v: u64) -> Result<Value, EncodeError> {
    i64::try_from(v)
        .map(Value::Long)
        .map_err(|_| EncodeError::Invalid {
            family,
            field,
            reason: format!("{v} does not fit in an Avro long"),
        })
}

fn int(family: Family, field: &'static str, v: u32) -> Result<Value, EncodeError> {
    i32::try_from(v)
        .map(Value::Int)
        .map_err(|_| EncodeError::Invalid {
            family,
            field,
            reason: format!("{v} does not fit in an Avro int"),
        })
}

/// The unit's index among `SampleUnit`'s symbols.
fn unit_index(u: SampleUnit) -> i64 {
    match u {
        SampleUnit::Microvolt => 0,
        SampleUnit::Millivolt => 1,
        SampleUnit::Volt => 2,
    }
}

fn unit_value(u: SampleUnit) -> Value {
    let symbol = match u {
        SampleUnit::Microvolt => "MICROVOLT",
        SampleUnit::Millivolt => "MILLIVOLT",
        SampleUnit::Volt => "VOLT",
    };
    Value::Enum(unit_index(u) as u32, symbol.into())
}

// ---------------------------------------------------------------------------------
// Decoding helpers

/// Reads a record's fields in schema order, with typed errors naming the field.
struct Fields {
    family: Family,
    fields: std::vec::IntoIter<(String, Value)>,
}

impl Fields {
    fn of(family: Family, value: Value) -> Result<Fields, DecodeError> {
        match value {
            Value::Record(fields) => Ok(Fields {
                family,
                fields: fields.into_iter(),
            }),
            other => Err(DecodeError::Invalid {
                family,
                field: "(record)",
                reason: format!("expected a record, found {other:?}"),
            }),
        }
    }

    fn invalid(&self, field: &'static str, reason: impl Into<String>) -> DecodeError {
        DecodeError::Invalid {
            family: self.family,
            field,
            reason: reason.into(),
        }
    }

    fn take(&mut self, field: &'static str) -> Result<Value, DecodeError> {
        match self.fields.next() {
            Some((name, value)) if name == field => Ok(value),
            Some((name, _)) => Err(self.invalid(field, format!("found field {name} instead"))),
            None => Err(self.invalid(field, "missing")),
        }
    }

    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        match self.take(field)? {
            Value::String(s) => Ok(s),
            other => Err(self.invalid(field, format!("expected a string, found {other:?}"))),
        }
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        match self.take(field)? {
            Value::Long(v) | Value::TimestampMicros(v) => Ok(v),
            Value::Int(v) => Ok(v.into()),
            other => Err(self.invalid(field, format!("expected a long, found {other:?}"))),
        }
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let v = self.i64(field)?;
        u64::try_from(v).map_err(|_| self.invalid(field, format!("{v} is negative")))
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        match self.take(field)? {
            Value::Int(v) => Ok(v),
            other => Err(self.invalid(field, format!("expected an int, found {other:?}"))),
        }
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let v = self.i32(field)?;
        u32::try_from(v).map_err(|_| self.invalid(field, format!("{v} is negative")))
    }

    fn f64(&mut self, field: &'static str) -> Result<f64, DecodeError> {
        match self.take(field)? {
            Value::Double(v) => Ok(v),
            Value::Float(v) => Ok(v.into()),
            other => Err(self.invalid(field, format!("expected a double, found {other:?}"))),
        }
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.take(field)? {
            Value::Boolean(v) => Ok(v),
            other => Err(self.invalid(field, format!("expected a boolean, found {other:?}"))),
        }
    }

    fn bytes(&mut self, field: &'static str) -> Result<Vec<u8>, DecodeError> {
        match self.take(field)? {
            Value::Bytes(v) => Ok(v),
            other => Err(self.invalid(field, format!("expected bytes, found {other:?}"))),
        }
    }

    fn timestamp(&mut self, field: &'static str) -> Result<Timestamp, DecodeError> {
        self.i64(field).map(Timestamp::from_micros)
    }

    fn symbol(&mut self, field: &'static str) -> Result<String, DecodeError> {
        match self.take(field)? {
            Value::Enum(_, symbol) => Ok(symbol),
            other => Err(self.invalid(field, format!("expected an enum, found {other:?}"))),
        }
    }

    fn array(&mut self, field: &'static str) -> Result<Vec<Value>, DecodeError> {
        match self.take(field)? {
            Value::Array(items) => Ok(items),
            other => Err(self.invalid(field, format!("expected an array, found {other:?}"))),
        }
    }

    fn strings(&mut self, field: &'static str) -> Result<Vec<String>, DecodeError> {
        let items = self.array(field)?;
        items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                other => Err(self.invalid(field, format!("expected strings, found {other:?}"))),
            })
            .collect()
    }

    /// A `["null", T]` union, with `T` converted by `f`.
    fn optional<T>(
        &mut self,
        field: &'static str,
        f: impl FnOnce(Value) -> Option<T>,
    ) -> Result<Option<T>, DecodeError> {
        let value = match self.take(field)? {
            Value::Union(_, inner) => *inner,
            other => other,
        };
        match value {
            Value::Null => Ok(None),
            other => {
                let shown = format!("{other:?}");
                f(other)
                    .map(Some)
                    .ok_or_else(|| self.invalid(field, format!("unexpected value {shown}")))
            }
        }
    }

    fn opt_f64(&mut self, field: &'static str) -> Result<Option<f64>, DecodeError> {
        self.optional(field, |v| match v {
            Value::Double(x) => Some(x),
            _ => None,
        })
    }

    fn opt_i64(&mut self, field: &'static str) -> Result<Option<i64>, DecodeError> {
        self.optional(field, |v| match v {
            Value::Long(x) | Value::TimestampMicros(x) => Some(x),
            _ => None,
        })
    }

    fn opt_string(&mut self, field: &'static str) -> Result<Option<String>, DecodeError> {
        self.optional(field, |v| match v {
            Value::String(x) => Some(x),
            _ => None,
        })
    }

    fn opt_bytes(&mut self, field: &'static str) -> Result<Option<Vec<u8>>, DecodeError> {
        self.optional(field, |v| match v {
            Value::Bytes(x) => Some(x),
            _ => None,
        })
    }

    fn tenant(&mut self, field: &'static str) -> Result<TenantId, DecodeError> {
        let s = self.string(field)?;
        TenantId::parse(&s).map_err(|e| self.invalid(field, e.to_string()))
    }

    fn session(&mut self, field: &'static str) -> Result<SessionId, DecodeError> {
        let s = self.string(field)?;
        SessionId::parse(&s).map_err(|e| self.invalid(field, e.to_string()))
    }

    fn device(&mut self, field: &'static str) -> Result<DeviceId, DecodeError> {
        let s = self.string(field)?;
        DeviceId::parse(&s).map_err(|e| self.invalid(field, e.to_string()))
    }

    fn unit(&mut self, field: &'static str) -> Result<SampleUnit, DecodeError> {
        match self.symbol(field)?.as_str() {
            "MICROVOLT" => Ok(SampleUnit::Microvolt),
            "MILLIVOLT" => Ok(SampleUnit::Millivolt),
            "VOLT" => Ok(SampleUnit::Volt),
            other => Err(self.invalid(field, format!("unknown unit {other}"))),
        }
    }

    fn nested(&self, value: Value, family_field: &'static str) -> Result<Fields, DecodeError> {
        match value {
            Value::Record(fields) => Ok(Fields {
                family: self.family,
                fields: fields.into_iter(),
            }),
            other => Err(self.invalid(family_field, format!("expected a record, found {other:?}"))),
        }
    }
}

// ---------------------------------------------------------------------------------
// Keys

impl AvroRecord for SessionKey {
    const FAMILY: Family = Family::SessionKey;

    fn to_avro(&self) -> Result<Value, EncodeError> {
        Ok(record(vec![
            ("tenant_id", string(self.tenant_id.to_string())),
            ("session_id", string(self.session_id.to_string())),
        ]))
    }

    fn from_avro(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(Self::FAMILY, value)?;
        Ok(SessionKey {
            tenant_id: f.tenant("tenant_id")?,
            session_id: f.session("session_id")?,
        })
    }
}

impl AvroRecord for FeatureKey {
    const FAMILY: Family = Family::FeatureKey;

    fn to_avro(&self) -> Result<Value, EncodeError> {
        Ok(record(vec![
            ("tenant_id", string(self.tenant_id.to_string())),
            ("session_id", string(self.session_id.to_string())),
            (
                "channel_index",
                int(Self::FAMILY, "channel_index", self.channel_index)?,
            ),
            (
                "window_index",
                long(Self::FAMILY, "window_index", self.window_index)?,
            ),
        ]))
    }

    fn from_avro(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(Self::FAMILY, value)?;
        Ok(FeatureKey {
            tenant_id: f.tenant("tenant_id")?,
            session_id: f.session("session_id")?,
            channel_index: f.u32("channel_index")?,
            window_index: f.u64("window_index")?,
        })
    }
}

impl AvroRecord for AudioChunkKey {
    const FAMILY: Family = Family::AudioChunkKey;

    fn to_avro(&self) -> Result<Value, EncodeError> {
        Ok(record(vec![
            ("tenant_id", string(self.tenant_id.to_string())),
            ("session_id", string(self.session_id.to_string())),
            ("preset", string(self.preset.clone())),
            (
                "chunk_index",
                long(Self::FAMILY, "chunk_index", self.chunk_index)?,
            ),
        ]))
    }

    fn from_avro(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(Self::FAMILY, value)?;
        Ok(AudioChunkKey {
            tenant_id: f.tenant("tenant_id")?,
            session_id: f.session("session_id")?,
            preset: f.string("preset")?,
            chunk_index: f.u64("chunk_index")?,
        })
    }
}

impl AvroRecord for TenantKey {
    const FAMILY: Family = Family::TenantKey;

    fn to_avro(&self) -> Result<Value, EncodeError> {
        Ok(record(vec![(
            "tenant_id",
            string(self.tenant_id.to_string()),
        )]))
    }

    fn from_avro(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(Self::FAMILY, value)?;
        Ok(TenantKey {
            tenant_id: f.tenant("tenant_id")?,
        })
    }
}

impl AvroRecord for DeadLetterKey {
    const FAMILY: Family = Family::DeadLetterKey;

    fn to_avro(&self) -> Result<Value, EncodeError> {
        Ok(record(vec![
            ("stage", string(self.stage.clone())),
            ("source_topic", string(self.source_topic.clone())),
            ("source_partition", Value::Int(self.source_partition)),
            ("source_offset", Value::Long(self.source_offset)),
        ]))
    }

    fn from_avro(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(Self::FAMILY, value)?;
        Ok(DeadLetterKey {
            stage: f.string("stage")?,
            source_topic: f.string("source_topic")?,
            source_partition: f.i32("source_partition")?,
            source_offset: f.i64("source_offset")?,
        })
    }
}

// ---------------------------------------------------------------------------------
// Frames

/// Little-endian f32 bytes of the channel-major samples (the `samples` layout).
pub fn samples_to_le_bytes(samples: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    append_samples_le(samples, &mut out);
    out
}

/// Appends the samples' little-endian f32 bytes to `buf`.
fn append_samples_le(samples: &[f32], buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.resize(start + 4 * samples.len(), 0);
    for (out, s) in buf[start..].chunks_exact_mut(4).zip(samples) {
        out.copy_from_slice(&s.to_le_bytes());
    }
}

/// The inverse of [`samples_to_le_bytes`]; `None` if the length is not a multiple of 4.
pub fn samples_from_le_bytes(bytes: &[u8]) -> Option<Vec<f32>> {
    if bytes.len() % 4 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

/// `eeg_frame` v1's datum, written straight from the frame; `false` (and nothing
/// written) when the frame would not pass [`Frame::to_avro`]'s checks.
fn write_frame_v1(f: &Frame, buf: &mut Vec<u8>) -> bool {
    let channels = f.channel_labels.len();
    let (Ok(seq), Ok(per_channel)) = (i64::try_from(f.seq), i32::try_from(f.samples_per_channel))
    else {
        return false;
    };
    if f.samples.len() != channels * f.samples_per_channel as usize
        || f.markers
            .iter()
            .any(|m| i32::try_from(m.sample_offset).is_err())
    {
        return false;
    }
    let mut uuid = [0u8; uuid::fmt::Hyphenated::LENGTH];
    buf.reserve(160 + 8 * channels + 4 * f.samples.len());
    write_bytes(
        buf,
        f.tenant_id
            .as_uuid()
            .hyphenated()
            .encode_lower(&mut uuid)
            .as_bytes(),
    );
    write_bytes(buf, f.device_id.as_str().as_bytes());
    write_bytes(
        buf,
        f.session_id
            .as_uuid()
            .hyphenated()
            .encode_lower(&mut uuid)
            .as_bytes(),
    );
    write_long(buf, seq);
    write_long(buf, f.device_time.as_micros());
    write_long(buf, f.received_at.as_micros());
    buf.extend_from_slice(&f.sample_rate_hz.to_le_bytes());
    write_long(buf, unit_index(f.unit));
    // An array is one block of all its items, then the empty block, as the generic
    // writer does; an empty array is the empty block alone.
    if channels > 0 {
        write_long(buf, channels as i64);
        for label in &f.channel_labels {
            write_bytes(buf, label.as_bytes());
        }
    }
    write_long(buf, 0);
    write_long(buf, i64::from(per_channel));
    write_long(buf, 4 * f.samples.len() as i64);
    append_samples_le(&f.samples, buf);
    if !f.markers.is_empty() {
        write_long(buf, f.markers.len() as i64);
        for m in &f.markers {
            write_long(buf, i64::from(m.sample_offset));
            match m.duration_us {
                None => write_long(buf, 0),
                Some(d) => {
                    write_long(buf, 1);
                    write_long(buf, d);
                }
            }
            write_bytes(buf, m.label.as_bytes());
        }
    }
    write_long(buf, 0);
    true
}

impl AvroRecord for Frame {
    const FAMILY: Family = Family::EegFrame;

    fn write_datum(&self, version: u32, buf: &mut Vec<u8>) -> bool {
        version == 1 && write_frame_v1(self, buf)
    }

    fn to_avro(&self) -> Result<Value, EncodeError> {
        let fam = Self::FAMILY;
        let expected = self.channel_labels.len() * self.samples_per_channel as usize;
        if self.samples.len() != expected {
            return Err(EncodeError::Invalid {
                family: fam,
                field: "samples",
                reason: format!(
                    "{} samples for {} channels x {} samples",
                    self.samples.len(),
                    self.channel_labels.len(),
                    self.samples_per_channel
                ),
            });
        }
        let markers = self
            .markers
            .iter()
            .map(|m| {
                Ok(record(vec![
                    (
                        "sample_offset",
                        int(fam, "markers.sample_offset", m.sample_offset)?,
                    ),
                    ("duration_us", opt(m.duration_us, Value::Long)),
                    ("label", string(m.label.clone())),
                ]))
            })
            .collect::<Result<Vec<_>, EncodeError>>()?;
        Ok(record(vec![
            ("tenant_id", string(self.tenant_id.to_string())),
            ("device_id", string(self.device_id.as_str())),
            ("session_id", string(self.session_id.to_string())),
            ("seq", long(fam, "seq", self.seq)?),
            ("device_time_us", ts(self.device_time)),
            ("received_at_us", ts(self.received_at)),
            ("sample_rate_hz", Value::Double(self.sample_rate_hz)),
            ("unit", unit_value(self.unit)),
            ("channel_labels", strings(&self.channel_labels)),
            (
                "samples_per_channel",
                int(fam, "samples_per_channel", self.samples_per_channel)?,
            ),
            ("samples", Value::Bytes(samples_to_le_bytes(&self.samples))),
            ("markers", Value::Array(markers)),
        ]))
    }

    fn from_avro(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(Self::FAMILY, value)?;
        let tenant_id = f.tenant("tenant_id")?;
        let device_id = f.device("device_id")?;
        let session_id = f.session("session_id")?;
        let seq = f.u64("seq")?;
        let device_time = f.timestamp("device_time_us")?;
        let received_at = f.timestamp("received_at_us")?;
        let sample_rate_hz = f.f64("sample_rate_hz")?;
        let unit = f.unit("unit")?;
        let channel_labels = f.strings("channel_labels")?;
        let samples_per_channel = f.u32("samples_per_channel")?;
        let bytes = f.bytes("samples")?;
        let expected = 4 * channel_labels.len() as u64 * u64::from(samples_per_channel);
        if bytes.len() as u64 != expected {
            return Err(f.invalid(
                "samples",
                format!(
                    "{} bytes for {} channels x {samples_per_channel} samples (expected {expected})",
                    bytes.len(),
                    channel_labels.len()
                ),
            ));
        }
        let samples = samples_from_le_bytes(&bytes).expect("length checked above");
        let mut markers = Vec::new();
        for item in f.array("markers")? {
            let mut m = f.nested(item, "markers")?;
            markers.push(Marker {
                sample_offset: m.u32("sample_offset")?,
                duration_us: m.opt_i64("duration_us")?,
                label: m.string("label")?,
            });
        }
        Ok(Frame {
            tenant_id,
            device_id,
            session_id,
            seq,
            device_time,
            received_at,
            sample_rate_hz,
            unit,
            channel_labels,
            samples_per_channel,
            samples,
            markers,
        })
    }
}

// ---------------------------------------------------------------------------------
// Features

impl AvroRecord for Features {
    const FAMILY: Family = Family::EegFeatures;

    fn to_avro(&self) -> Result<Value, EncodeError> {
        let fam = Self::FAMILY;
        let q = &self.quality;
        let quality = record(vec![
            ("flat", Value::Boolean(q.flat)),
            ("clipped_fraction", Value::Double(q.clipped_fraction)),
            ("line_noise_50hz", opt_double(q.line_noise_50hz)),
            ("line_noise_60hz", opt_double(q.line_noise_60hz)),
            ("seq_gaps", int(fam, "quality.seq_gaps", q.seq_gaps)?),
            (
                "duplicate_frames",
                int(fam, "quality.duplicate_frames", q.duplicate_frames)?,
            ),
            (
                "out_of_order_frames",
                int(fam, "quality.out_of_order_frames", q.out_of_order_frames)?,
            ),
        ]);
        Ok(record(vec![
            ("tenant_id", string(self.tenant_id.to_string())),
            ("session_id", string(self.session_id.to_string())),
            ("device_id", string(self.device_id.as_str())),
            (
                "channel_index",
                int(fam, "channel_index", self.channel_index)?,
            ),
            ("channel_label", string(self.channel_label.clone())),
            (
                "window_index",
                long(fam, "window_index", self.window_index)?,
            ),
            (
                "window_start_sample",
                long(fam, "window_start_sample", self.window_start_sample)?,
            ),
            ("window_start_us", ts(self.window_start)),
            (
                "window_samples",
                int(fam, "window_samples", self.window_samples)?,
            ),
            ("sample_rate_hz", Value::Double(self.sample_rate_hz)),
            ("unit", unit_value(self.unit)),
            ("algorithm_version", string(self.algorithm_version.clone())),
            ("abs_delta", opt_double(self.abs.delta)),
            ("abs_theta", opt_double(self.abs.theta)),
            ("abs_alpha", opt_double(self.abs.alpha)),
            ("abs_beta", opt_double(self.abs.beta)),
            ("abs_gamma", opt_double(self.abs.gamma)),
            ("total_abs", opt_double(self.total_abs)),
            ("rel_delta", opt_double(self.rel.delta)),
            ("rel_theta", opt_double(self.rel.theta)),
            ("rel_alpha", opt_double(self.rel.alpha)),
            ("rel_beta", opt_double(self.rel.beta)),
            ("rel_gamma", opt_double(self.rel.gamma)),
            ("peak_alpha_hz", opt_double(self.peak_alpha_hz)),
            ("peak_alpha_psd", opt_double(self.peak_alpha_psd)),
            ("spectral_entropy", opt_double(self.spectral_entropy)),
            ("hjorth_activity", opt_double(self.hjorth.activity)),
            ("hjorth_mobility", opt_double(self.hjorth.mobility)),
            ("hjorth_complexity", opt_double(self.hjorth.complexity)),
            ("aperiodic_exponent", opt_double(self.aperiodic_exponent)),
            ("psd_resolution_hz", Value::Double(self.psd_resolution_hz)),
            (
                "psd",
                Value::Array(self.psd.iter().copied().map(Value::Double).collect()),
            ),
            ("quality", quality),
        ]))
    }

    fn from_avro(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(Self::FAMILY, value)?;
        let tenant_id = f.tenant("tenant_id")?;
        let session_id = f.session("session_id")?;
        let device_id = f.device("device_id")?;
        let channel_index = f.u32("channel_index")?;
        let channel_label = f.string("channel_label")?;
        let window_index = f.u64("window_index")?;
        let window_start_sample = f.u64("window_start_sample")?;
        let window_start = f.timestamp("window_start_us")?;
        let window_samples = f.u32("window_samples")?;
        let sample_rate_hz = f.f64("sample_rate_hz")?;
        let unit = f.unit("unit")?;
        let algorithm_version = f.string("algorithm_version")?;
        let abs = Bands {
            delta: f.opt_f64("abs_delta")?,
            theta: f.opt_f64("abs_theta")?,
            alpha: f.opt_f64("abs_alpha")?,
            beta: f.opt_f64("abs_beta")?,
            gamma: f.opt_f64("abs_gamma")?,
        };
        let total_abs = f.opt_f64("total_abs")?;
        let rel = Bands {
            delta: f.opt_f64("rel_delta")?,
            theta: f.opt_f64("rel_theta")?,
            alpha: f.opt_f64("rel_alpha")?,
            beta: f.opt_f64("rel_beta")?,
            gamma: f.opt_f64("rel_gamma")?,
        };
        let peak_alpha_hz = f.opt_f64("peak_alpha_hz")?;
        let peak_alpha_psd = f.opt_f64("peak_alpha_psd")?;
        let spectral_entropy = f.opt_f64("spectral_entropy")?;
        let hjorth = Hjorth {
            activity: f.opt_f64("hjorth_activity")?,
            mobility: f.opt_f64("hjorth_mobility")?,
            complexity: f.opt_f64("hjorth_complexity")?,
        };
        let aperiodic_exponent = f.opt_f64("aperiodic_exponent")?;
        let psd_resolution_hz = f.f64("psd_resolution_hz")?;
        let psd = f
            .array("psd")?
            .into_iter()
            .map(|v| match v {
                Value::Double(x) => Ok(x),
                other => Err(f.invalid("psd", format!("expected doubles, found {other:?}"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let quality_value = f.take("quality")?;
        let mut q = f.nested(quality_value, "quality")?;
        let quality = WindowQuality {
            flat: q.bool("flat")?,
            clipped_fraction: q.f64("clipped_fraction")?,
            line_noise_50hz: q.opt_f64("line_noise_50hz")?,
            line_noise_60hz: q.opt_f64("line_noise_60hz")?,
            seq_gaps: q.u32("seq_gaps")?,
            duplicate_frames: q.u32("duplicate_frames")?,
            out_of_order_frames: q.u32("out_of_order_frames")?,
        };
        Ok(Features {
            tenant_id,
            session_id,
            device_id,
            channel_index,
            channel_label,
            window_index,
            window_start_sample,
            window_start,
            window_samples,
            sample_rate_hz,
            unit,
            algorithm_version,
            abs,
            total_abs,
            rel,
            peak_alpha_hz,
            peak_alpha_psd,
            spectral_entropy,
            hjorth,
            aperiodic_exponent,
            psd_resolution_hz,
            psd,
            quality,
        })
    }
}

// ---------------------------------------------------------------------------------
// Audio

impl AvroRecord for AudioChunk {
    const FAMILY: Family = Family::AudioChunk;

    fn to_avro(&self) -> Result<Value, EncodeError> {
        let fam = Self::FAMILY;
        if self.channels == 0 || self.pcm.len() % usize::from(self.channels) != 0 {
            return Err(EncodeError::Invalid {
                family: fam,
                field: "pcm",
                reason: format!(
                    "{} samples are not whole frames of {} channels",
                    self.pcm.len(),
                    self.channels
                ),
            });
        }
        let mut pcm = Vec::with_capacity(self.pcm.len() * 2);
        for s in &self.pcm {
            pcm.extend_from_slice(&s.to_le_bytes());
        }
        Ok(record(vec![
            ("tenant_id", string(self.tenant_id.to_string())),
            ("session_id", string(self.session_id.to_string())),
            ("preset", string(self.preset.clone())),
            ("preset_version", string(self.preset_version.clone())),
            ("chunk_index", long(fam, "chunk_index", self.chunk_index)?),
            ("start_frame", long(fam, "start_frame", self.start_frame)?),
            ("eeg_start_us", ts(self.eeg_start)),
            (
                "sample_rate_hz",
                int(fam, "sample_rate_hz", self.sample_rate_hz)?,
            ),
            ("channels", Value::Int(i32::from(self.channels))),
            ("pcm", Value::Bytes(pcm)),
            (
                "source_first_seq",
                long(fam, "source_first_seq", self.source_first_seq)?,
            ),
            (
                "source_last_seq",
                long(fam, "source_last_seq", self.source_last_seq)?,
            ),
        ]))
    }

    fn from_avro(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(Self::FAMILY, value)?;
        let tenant_id = f.tenant("tenant_id")?;
        let session_id = f.session("session_id")?;
        let preset = f.string("preset")?;
        let preset_version = f.string("preset_version")?;
        let chunk_index = f.u64("chunk_index")?;
        let start_frame = f.u64("start_frame")?;
        let eeg_start = f.timestamp("eeg_start_us")?;
        let sample_rate_hz = f.u32("sample_rate_hz")?;
        let channels = f.u32("channels")?;
        let channels = u16::try_from(channels)
            .ok()
            .filter(|c| *c > 0)
            .ok_or_else(|| f.invalid("channels", format!("{channels} audio channels")))?;
        let bytes = f.bytes("pcm")?;
        if bytes.len() % (2 * usize::from(channels)) != 0 {
            return Err(f.invalid(
                "pcm",
                format!(
                    "{} bytes are not whole frames of {channels} channels",
                    bytes.len()
                ),
            ));
        }
        let pcm = bytes
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        Ok(AudioChunk {
            tenant_id,
            session_id,
            preset,
            preset_version,
            chunk_index,
            start_frame,
            eeg_start,
            sample_rate_hz,
            channels,
            pcm,
            source_first_seq: f.u64("source_first_seq")?,
            source_last_seq: f.u64("source_last_seq")?,
        })
    }
}

// ---------------------------------------------------------------------------------
// Sessions

impl AvroRecord for SessionState {
    const FAMILY: Family = Family::SessionState;

    fn to_avro(&self) -> Result<Value, EncodeError> {
        let fam = Self::FAMILY;
        let status = match self.status {
            SessionStatus::Active => Value::Enum(0, "ACTIVE".into()),
            SessionStatus::Ended => Value::Enum(1, "ENDED".into()),
        };
        Ok(record(vec![
            ("tenant_id", string(self.tenant_id.to_string())),
            ("session_id", string(self.session_id.to_string())),
            ("device_id", string(self.device_id.as_str())),
            ("status", status),
            ("started_at_us", ts(self.started_at)),
            ("last_frame_at_us", ts(self.last_frame_at)),
            ("first_device_time_us", ts(self.first_device_time)),
            ("last_device_time_us", ts(self.last_device_time)),
            ("sample_rate_hz", Value::Double(self.sample_rate_hz)),
            ("channel_labels", strings(&self.channel_labels)),
            ("frames", long(fam, "frames", self.frames)?),
            (
                "samples_per_channel",
                long(fam, "samples_per_channel", self.samples_per_channel)?,
            ),
            ("seq_gaps", long(fam, "seq_gaps", self.seq_gaps)?),
            (
                "duplicate_frames",
                long(fam, "duplicate_frames", self.duplicate_frames)?,
            ),
            (
                "out_of_order_frames",
                long(fam, "out_of_order_frames", self.out_of_order_frames)?,
            ),
            ("ended_at_us", opt(self.ended.map(|(t, _)| t), ts)),
            (
                "end_reason",
                opt(self.ended.map(|(_, r)| r), |r| string(r.as_str())),
            ),
        ]))
    }

    fn from_avro(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(Self::FAMILY, value)?;
        let tenant_id = f.tenant("tenant_id")?;
        let session_id = f.session("session_id")?;
        let device_id = f.device("device_id")?;
        let status = match f.symbol("status")?.as_str() {
            "ACTIVE" => SessionStatus::Active,
            "ENDED" => SessionStatus::Ended,
            other => return Err(f.invalid("status", format!("unknown status {other}"))),
        };
        let started_at = f.timestamp("started_at_us")?;
        let last_frame_at = f.timestamp("last_frame_at_us")?;
        let first_device_time = f.timestamp("first_device_time_us")?;
        let last_device_time = f.timestamp("last_device_time_us")?;
        let sample_rate_hz = f.f64("sample_rate_hz")?;
        let channel_labels = f.strings("channel_labels")?;
        let frames = f.u64("frames")?;
        let samples_per_channel = f.u64("samples_per_channel")?;
        let seq_gaps = f.u64("seq_gaps")?;
        let duplicate_frames = f.u64("duplicate_frames")?;
        let out_of_order_frames = f.u64("out_of_order_frames")?;
        let ended_at = f.opt_i64("ended_at_us")?.map(Timestamp::from_micros);
        let end_reason = match f.opt_string("end_reason")? {
            None => None,
            Some(s) => Some(
                EndReason::parse(&s)
                    .ok_or_else(|| f.invalid("end_reason", format!("unknown reason {s}")))?,
            ),
        };
        let ended = match (ended_at, end_reason) {
            (Some(t), Some(r)) => Some((t, r)),
            (None, None) => None,
            _ => {
                return Err(f.invalid(
                    "end_reason",
                    "ended_at_us and end_reason must be set together",
                ))
            }
        };
        Ok(SessionState {
            tenant_id,
            session_id,
            device_id,
            status,
            started_at,
            last_frame_at,
            first_device_time,
            last_device_time,
            sample_rate_hz,
            channel_labels,
            frames,
            samples_per_channel,
            seq_gaps,
            duplicate_frames,
            out_of_order_frames,
            ended,
        })
    }
}

// ---------------------------------------------------------------------------------
// Usage

const USAGE_KINDS: [(UsageKind, &str); 7] = [
    (UsageKind::FramesIngested, "FRAMES_INGESTED"),
    (UsageKind::BytesIngested, "BYTES_INGESTED"),
    (UsageKind::FeatureWindows, "FEATURE_WINDOWS"),
    (UsageKind::AudioMilliseconds, "AUDIO_MILLISECONDS"),
    (UsageKind::ApiRequests, "API_REQUESTS"),
    (UsageKind::Unknown, "UNKNOWN"),
    (UsageKind::RecordingUploads, "RECORDING_UPLOADS"),
];

impl AvroRecord for UsageEvent {
    const FAMILY: Family = Family::UsageEvent;

    fn to_avro(&self) -> Result<Value, EncodeError> {
        let (index, symbol) = USAGE_KINDS
            .iter()
            .enumerate()
            .find(|(_, (k, _))| *k == self.kind)
            .map(|(i, (_, s))| (i as u32, *s))
            .expect("every kind has a symbol");
        Ok(record(vec![
            ("event_id", string(self.event_id.hyphenated().to_string())),
            ("tenant_id", string(self.tenant_id.to_string())),
            ("kind", Value::Enum(index, symbol.into())),
            ("quantity", Value::Long(self.quantity)),
            ("occurred_at_us", ts(self.occurred_at)),
            ("source", string(self.source.clone())),
            (
                "session_id",
                opt(self.session_id, |s| string(s.to_string())),
            ),
            (
                "device_id",
                opt(self.device_id.as_ref(), |d| string(d.as_str())),
            ),
            ("detail", opt(self.detail.as_ref(), |d| string(d.clone()))),
        ]))
    }

    fn from_avro(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(Self::FAMILY, value)?;
        let event_id = f.string("event_id")?;
        let event_id =
            Uuid::parse_str(&event_id).map_err(|_| f.invalid("event_id", "not a UUID"))?;
        let tenant_id = f.tenant("tenant_id")?;
        let symbol = f.symbol("kind")?;
        let kind = USAGE_KINDS
            .iter()
            .find(|(_, s)| *s == symbol)
            .map(|(k, _)| *k)
            .unwrap_or(UsageKind::Unknown);
        let quantity = f.i64("quantity")?;
        let occurred_at = f.timestamp("occurred_at_us")?;
        let source = f.string("source")?;
        let session_id = match f.opt_string("session_id")? {
            None => None,
            Some(s) => {
                Some(SessionId::parse(&s).map_err(|e| f.invalid("session_id", e.to_string()))?)
            }
        };
        let device_id = match f.opt_string("device_id")? {
            None => None,
            Some(s) => {
                Some(DeviceId::parse(&s).map_err(|e| f.invalid("device_id", e.to_string()))?)
            }
        };
        let detail = f.opt_string("detail")?;
        Ok(UsageEvent {
            event_id,
            tenant_id,
            kind,
            quantity,
            occurred_at,
            source,
            session_id,
            device_id,
            detail,
        })
    }
}

// ---------------------------------------------------------------------------------
// Dead letters

impl AvroRecord for DeadLetter {
    const FAMILY: Family = Family::DeadLetter;

    fn to_avro(&self) -> Result<Value, EncodeError> {
        let headers = self
            .headers
            .iter()
            .map(|h| {
                record(vec![
                    ("name", string(h.name.clone())),
                    ("value", opt(h.value.clone(), Value::Bytes)),
                ])
            })
            .collect();
        Ok(record(vec![
            ("stage", string(self.stage.clone())),
            ("stage_version", string(self.stage_version.clone())),
            ("source_topic", string(self.source_topic.clone())),
            ("source_partition", Value::Int(self.source_partition)),
            ("source_offset", Value::Long(self.source_offset)),
            (
                "source_timestamp_ms",
                opt(self.source_timestamp_ms, Value::Long),
            ),
            ("key", opt(self.key.clone(), Value::Bytes)),
            ("value", opt(self.value.clone(), Value::Bytes)),
            ("headers", Value::Array(headers)),
            ("reason_code", string(self.reason_code.clone())),
            ("reason_detail", string(self.reason_detail.clone())),
            ("failed_at_us", ts(self.failed_at)),
        ]))
    }

    fn from_avro(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(Self::FAMILY, value)?;
        let stage = f.string("stage")?;
        let stage_version = f.string("stage_version")?;
        let source_topic = f.string("source_topic")?;
        let source_partition = f.i32("source_partition")?;
        let source_offset = f.i64("source_offset")?;
        let source_timestamp_ms = f.opt_i64("source_timestamp_ms")?;
        let key = f.opt_bytes("key")?;
        let value = f.opt_bytes("value")?;
        let mut headers = Vec::new();
        for item in f.array("headers")? {
            let mut h = f.nested(item, "headers")?;
            headers.push(Header {
                name: h.string("name")?,
                value: h.opt_bytes("value")?,
            });
        }
        Ok(DeadLetter {
            stage,
            stage_version,
            source_topic,
            source_partition,
            source_offset,
            source_timestamp_ms,
            key,
            value,
            headers,
            reason_code: f.string("reason_code")?,
            reason_detail: f.string("reason_detail")?,
            failed_at: f.timestamp("failed_at_us")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode, generic_datum, HEADER_LEN};
    use crate::examples;

    #[test]
    fn frames_are_written_directly_as_the_generic_writer_writes_them() {
        let mut frames = Vec::new();
        for (seed, channels, n) in [(0, 1, 1), (7, 4, 16), (300, 32, 32), (1 << 40, 3, 5)] {
            frames.push(examples::frame(seed, channels, n));
        }
        let mut f = examples::frame(5, 2, 3);
        f.seq = i64::MAX as u64;
        f.channel_labels = vec!["Fp1".into(), "Ünïcode µV ✓".into()];
        f.device_time = Timestamp::from_micros(-1);
        f.received_at = Timestamp::from_micros(i64::MIN);
        f.sample_rate_hz = 0.1;
        f.unit = SampleUnit::Volt;
        f.samples = vec![0.0, -0.0, f32::MIN_POSITIVE, f32::MAX, -1.5e-30, 7.25];
        f.markers = vec![
            Marker {
                sample_offset: i32::MAX as u32,
                duration_us: None,
                label: String::new(),
            },
            Marker {
                sample_offset: 0,
                duration_us: Some(-3),
                label: "stimulus".into(),
            },
        ];
        frames.push(f.clone());
        f.unit = SampleUnit::Millivolt;
        f.markers.clear();
        f.channel_labels.clear();
        f.samples.clear();
        frames.push(f);
        for frame in &frames {
            let direct = encode(frame).unwrap();
            assert_eq!(
                &direct[HEADER_LEN..],
                generic_datum(frame).unwrap(),
                "{frame:?}"
            );
        }
    }

    #[test]
    fn frames_the_direct_writer_refuses_are_refused_by_the_generic_path_with_its_reason() {
        let mut buf = vec![1, 2, 3];
        let mut short = examples::frame(1, 4, 8);
        short.samples.pop();
        let mut big_seq = examples::frame(1, 1, 1);
        big_seq.seq = u64::MAX;
        let mut big_offset = examples::frame(1, 1, 1);
        big_offset.markers[0].sample_offset = u32::MAX;
        for (frame, field) in [
            (short, "samples"),
            (big_seq, "seq"),
            (big_offset, "markers.sample_offset"),
        ] {
            assert!(!frame.write_datum(1, &mut buf));
            let err = crate::codec::encode_into(&frame, &mut buf).unwrap_err();
            assert!(
                matches!(err, EncodeError::Invalid { field: f, .. } if f == field),
                "{err}"
            );
            assert_eq!(buf, [1, 2, 3], "nothing is left behind");
        }
    }
}
