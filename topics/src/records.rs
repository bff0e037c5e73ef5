//! Any record of any Clisonix topic as JSON, decoded by the schema its fingerprint
//! names: what `clisonix-topics consume` prints.
//!
//! Timestamps are RFC 3339 (UTC, microseconds); unions are their value (`null` or the
//! branch's); frames' samples are one array of numbers per channel (each the shortest
//! decimal that reads back as the same binary32); other bytes are base64.

use apache_avro::types::Value as Avro;
use base64::Engine;
use chrono::{DateTime, Utc};
use clisonix_schemas::codec::{read_datum, writer_schema, HEADER_LEN};
use clisonix_schemas::{DecodeError, Family, SchemaVersion};
use serde_json::{json, Map, Value};

/// A decoded record: the schema that wrote it and its content.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub schema: &'static SchemaVersion,
    pub value: Value,
}

impl Decoded {
    /// `eeg_frame/v1`.
    pub fn schema_name(&self) -> String {
        format!("{}/v{}", self.schema.family.dir(), self.schema.version)
    }

    /// A string field at the top of the record (`tenant_id`, `session_id`).
    pub fn field(&self, name: &str) -> Option<&str> {
        self.value.get(name).and_then(Value::as_str)
    }
}

/// Decodes single-object-encoded `bytes` to JSON.
pub fn decode_json(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let schema = writer_schema(bytes)?;
    let datum = read_datum(schema, &bytes[HEADER_LEN..])?;
    let mut value = to_json(datum);
    if schema.family == Family::EegFrame {
        split_samples(&mut value);
    }
    Ok(Decoded { schema, value })
}

fn micros(us: i64) -> Value {
    match DateTime::<Utc>::from_timestamp_micros(us) {
        Some(t) => Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        None => json!(us),
    }
}

fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

fn to_json(v: Avro) -> Value {
    match v {
        Avro::Null => Value::Null,
        Avro::Boolean(b) => Value::Bool(b),
        Avro::Int(i) => json!(i),
        Avro::Long(i) => json!(i),
        Avro::Float(f) => float(shortest(f)),
        Avro::Double(f) => float(f),
        Avro::Bytes(b) | Avro::Fixed(_, b) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        Avro::String(s) | Avro::Enum(_, s) => Value::String(s),
        Avro::Union(_, inner) => to_json(*inner),
        Avro::Array(items) => Value::Array(items.into_iter().map(to_json).collect()),
        Avro::Map(m) => Value::Object(m.into_iter().map(|(k, v)| (k, to_json(v))).collect()),
        Avro::Record(fields) => {
            let mut o = Map::new();
            for (k, v) in fields {
                o.insert(k, to_json(v));
            }
            Value::Object(o)
        }
        Avro::TimestampMicros(us) | Avro::LocalTimestampMicros(us) => micros(us),
        Avro::TimestampMillis(ms) | Avro::LocalTimestampMillis(ms) => {
            micros(ms.saturating_mul(1000))
        }
        Avro::Date(d) => json!(d),
        Avro::TimeMillis(t) => json!(t),
        Avro::TimeMicros(t) => json!(t),
        Avro::Uuid(u) => Value::String(u.to_string()),
        other => Value::String(format!("{other:?}")),
    }
}

/// The shortest decimal that reads back as `f`, as a double.
fn shortest(f: f32) -> f64 {
    format!("{f}").parse().unwrap_or(f64::from(f))
}

/// A frame's `samples` (base64 of little-endian binary32, channel-major) as one array
/// per channel.
fn split_samples(frame: &mut Value) {
    let per = frame["samples_per_channel"].as_u64().unwrap_or(0) as usize;
    let Some(b64) = frame["samples"].as_str() else {
        return;
    };
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b64) else {
        return;
    };
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if per == 0 {
        return;
    }
    let channels: Vec<Value> = values
        .chunks(per)
        .map(|ch| Value::Array(ch.iter().map(|&f| float(shortest(f))).collect()))
        .collect();
    frame["samples"] = Value::Array(channels);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clisonix_schemas::{encode, examples};

    #[test]
    fn a_frame_reads_as_json_with_its_samples_per_channel() {
        let frame = examples::frame(1, 3, 4);
        let d = decode_json(&encode(&frame).unwrap()).unwrap();
        assert_eq!(d.schema_name(), "eeg_frame/v1");
        assert_eq!(
            d.field("session_id"),
            Some(frame.session_id.to_string().as_str())
        );
        let samples = d.value["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 3);
        for (c, ch) in samples.iter().enumerate() {
            for (i, v) in ch.as_array().unwrap().iter().enumerate() {
                let expected = frame.samples[c * 4 + i];
                assert_eq!(v.as_f64().unwrap() as f32, expected);
            }
        }
        assert!(d.value["device_time_us"].as_str().unwrap().ends_with('Z'));
        assert_eq!(shortest(0.1), 0.1);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode_json(b"nope").is_err());
        assert!(decode_json(&[0xC3, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
    }
}
