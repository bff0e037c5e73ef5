//! The compact body for clients that stream a lot: a sequence of items, each a 4-byte
//! big-endian length and then one Avro single-object encoded `eeg_frame` record
//! (`schemas/avro/eeg_frame/`), the topic's own contract, so any Avro library can
//! write it. `tenant_id` and `received_at_us` are overwritten by ingest: the tenant
//! always comes from the caller's key (send any string, e.g. the nil UUID).
//!
//! Content type: [`CONTENT_TYPE`]. A WebSocket binary message is a body of this form.

use apache_avro::types::Value;
use clisonix_schemas::codec::{read_datum, HEADER_LEN};
use clisonix_schemas::{
    encode_into, writer_schema, AvroRecord, Family, Frame, TenantId, Timestamp,
};

use crate::validate::{Reason, Rejection};

/// The media type of a binary frame body.
pub const CONTENT_TYPE: &str = "application/vnd.clisonix.frames";

/// The length prefix of one item.
pub const PREFIX_LEN: usize = 4;

/// Appends one frame as an item.
pub fn write_frame(frame: &Frame, buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.extend_from_slice(&[0; PREFIX_LEN]);
    encode_into(frame, buf).expect("a valid frame encodes");
    let len = u32::try_from(buf.len() - start - PREFIX_LEN).expect("a frame is below 4 GiB");
    buf[start..start + PREFIX_LEN].copy_from_slice(&len.to_be_bytes());
}

/// A body of frames.
pub fn encode_frames<'a>(frames: impl IntoIterator<Item = &'a Frame>) -> Vec<u8> {
    let mut buf = Vec::new();
    for f in frames {
        write_frame(f, &mut buf);
    }
    buf
}

/// The body's items, in order. A broken length prefix ends the sequence with an error
/// (nothing after it can be found); a bad record inside a well-framed item is that
/// item's own error, found when it is decoded.
pub fn split_items(body: &[u8]) -> Result<Vec<&[u8]>, Rejection> {
    let mut items = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        if rest.len() < PREFIX_LEN {
            return Err(Rejection::new(
                Reason::MalformedFrame,
                format!(
                    "item {}: {} bytes left, too few for a length prefix",
                    items.len(),
                    rest.len()
                ),
            ));
        }
        let len = u32::from_be_bytes(rest[..PREFIX_LEN].try_into().expect("4 bytes")) as usize;
        rest = &rest[PREFIX_LEN..];
        if len > rest.len() {
            return Err(Rejection::new(
                Reason::MalformedFrame,
                format!(
                    "item {}: length {len} runs past the end of the body ({} bytes left)",
                    items.len(),
                    rest.len()
                ),
            ));
        }
        items.push(&rest[..len]);
        rest = &rest[len..];
    }
    Ok(items)
}

/// Decodes one item as a frame of `tenant`, whatever tenant the bytes name.
pub fn decode_frame(
    item: &[u8],
    tenant: TenantId,
    received_at: Timestamp,
) -> Result<Frame, Rejection> {
    let malformed =
        |e: clisonix_schemas::DecodeError| Rejection::new(Reason::MalformedFrame, e.to_string());
    let version = writer_schema(item).map_err(malformed)?;
    if version.family != Family::EegFrame {
        return Err(Rejection::new(
            Reason::MalformedFrame,
            format!(
                "expected an eeg_frame record, found {} v{}",
                version.family, version.version
            ),
        ));
    }
    let mut value = read_datum(version, &item[HEADER_LEN..]).map_err(malformed)?;
    if let Value::Record(fields) = &mut value {
        for (name, v) in fields.iter_mut() {
            match name.as_str() {
                "tenant_id" => *v = Value::String(tenant.to_string()),
                "received_at_us" => *v = Value::TimestampMicros(received_at.as_micros()),
                _ => {}
            }
        }
    }
    Frame::from_avro(value).map_err(|e| {
        let field = match &e {
            clisonix_schemas::DecodeError::Invalid { field, .. } => Some((*field).to_owned()),
            _ => None,
        };
        let mut r = Rejection::new(Reason::InvalidField, e.to_string());
        r.field = field;
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clisonix_schemas::{decode, encode, examples};

    #[test]
    fn frames_round_trip_and_take_the_callers_tenant() {
        let frames: Vec<Frame> = (0..3).map(|s| examples::frame(s, 4, 16)).collect();
        let body = encode_frames(&frames);
        let items = split_items(&body).unwrap();
        assert_eq!(items.len(), 3);
        let tenant = TenantId::random();
        let now = Timestamp::from_micros(1_800_000_000_000_000);
        for (item, frame) in items.iter().zip(&frames) {
            let got = decode_frame(item, tenant, now).unwrap();
            assert_eq!(got.tenant_id, tenant);
            assert_eq!(got.received_at, now);
            assert_eq!(got.samples, frame.samples);
            assert_eq!(got.seq, frame.seq);
            assert_eq!(decode::<Frame>(&encode(&got).unwrap()).unwrap(), got);
        }
    }

    #[test]
    fn broken_bodies_and_items_are_malformed() {
        let body = encode_frames(&[examples::frame(1, 2, 4)]);
        for cut in 1..body.len() {
            match split_items(&body[..cut]) {
                Err(r) => assert_eq!(r.code, "malformed_frame"),
                Ok(items) => panic!("{cut}: {} items", items.len()),
            }
        }
        let mut bad = body.clone();
        bad[PREFIX_LEN + 3] ^= 0xFF; // in the fingerprint
        let items = split_items(&bad).unwrap();
        let tenant = TenantId::random();
        assert!(decode_frame(items[0], tenant, Timestamp::now()).is_err());
        let key = encode(&examples::frame(1, 2, 4).key()).unwrap();
        let mut other = (key.len() as u32).to_be_bytes().to_vec();
        other.extend_from_slice(&key);
        let items = split_items(&other).unwrap();
        assert_eq!(
            decode_frame(items[0], tenant, Timestamp::now())
                .unwrap_err()
                .code,
            "malformed_frame"
        );
    }
}
