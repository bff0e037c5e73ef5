//! The compact body for clients that stream a lot: a sequence of items, each a 4-byte
//! big-endian length and then one Avro single-object encoded `eeg_frame` record
//! (`schemas/avro/eeg_frame/`), the topic's own contract, so any Avro library can
//! write it. `tenant_id` and `received_at_us` are overwritten by ingest: the tenant
//! always comes from the caller's key (send any string, e.g. the nil UUID). Sending a
//! 36-character tenant (the nil UUID) and the client's clock as the receive time lets
//! ingest write both into the record where it lies; anything else costs a copy.
//!
//! Content type: [`CONTENT_TYPE`]. A WebSocket binary message is a body of this form.

use apache_avro::types::Value;
use clisonix_schemas::codec::{read_datum, write_bytes, write_long, zigzag, HEADER_LEN};
use clisonix_schemas::{
    encode_into, writer_schema, AvroRecord, DeviceId, Family, Frame, Marker, SampleUnit, SessionId,
    TenantId, Timestamp,
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

/// A record of the current `eeg_frame` version read in place, borrowing the client's
/// bytes: what checking and routing a frame need, without building a [`Frame`].
#[derive(Debug, Clone, PartialEq)]
pub struct FrameView<'a> {
    pub device_id: DeviceId,
    pub session_id: SessionId,
    pub seq: u64,
    pub device_time: Timestamp,
    pub sample_rate_hz: f64,
    pub unit: SampleUnit,
    /// The channel labels as written: equal bytes are equal labels.
    pub labels_raw: &'a [u8],
    pub channel_labels: Vec<&'a str>,
    pub samples_per_channel: u32,
    /// The samples, little-endian `f32`, channel-major; exactly
    /// `4 * channels * samples_per_channel` bytes.
    pub samples: &'a [u8],
    pub markers: Vec<MarkerView<'a>>,
    /// Where the tenant ends and where the receive time lies, for [`FrameView::record`].
    tenant_end: usize,
    received: (usize, usize),
}

/// A marker of a [`FrameView`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MarkerView<'a> {
    pub sample_offset: u32,
    pub duration_us: Option<i64>,
    pub label: &'a str,
}

/// The fast path for the current `eeg_frame` version: reads the record straight from
/// its bytes (no generic Avro values, no copies of labels or samples). `None` when the
/// item is not a well-formed record of that version; the caller then takes
/// [`decode_frame`], which says what is wrong.
pub fn view(item: &[u8]) -> Option<FrameView<'_>> {
    let version = writer_schema(item).ok()?;
    if version.family != Family::EegFrame || version.version != 1 {
        return None;
    }
    let mut c = Cursor {
        b: item,
        pos: HEADER_LEN,
    };
    // Whatever tenant the client wrote is replaced; it must still be a string.
    c.str()?;
    let tenant_end = c.pos;
    let device_id = DeviceId::parse(c.str()?).ok()?;
    let session_id = SessionId::parse(c.str()?).ok()?;
    let seq = u64::try_from(c.long()?).ok()?;
    let device_time = Timestamp::from_micros(c.long()?);
    let received_start = c.pos;
    c.long()?;
    let received = (received_start, c.pos);
    let sample_rate_hz = c.double()?;
    let unit = match c.long()? {
        0 => SampleUnit::Microvolt,
        1 => SampleUnit::Millivolt,
        2 => SampleUnit::Volt,
        _ => return None,
    };
    let labels_start = c.pos;
    let mut channel_labels = Vec::new();
    c.array(|c| {
        channel_labels.push(c.str()?);
        Some(())
    })?;
    let labels_raw = &item[labels_start..c.pos];
    let samples_per_channel = u32::try_from(c.long()?).ok()?;
    let samples = c.bytes()?;
    if samples.len() != 4 * channel_labels.len() * samples_per_channel as usize {
        return None;
    }
    let mut markers = Vec::new();
    c.array(|c| {
        let sample_offset = u32::try_from(c.long()?).ok()?;
        let duration_us = match c.long()? {
            0 => None,
            1 => Some(c.long()?),
            _ => return None,
        };
        markers.push(MarkerView {
            sample_offset,
            duration_us,
            label: c.str()?,
        });
        Some(())
    })?;
    if c.pos != item.len() {
        return None;
    }
    Some(FrameView {
        device_id,
        session_id,
        seq,
        device_time,
        sample_rate_hz,
        unit,
        labels_raw,
        channel_labels,
        samples_per_channel,
        samples,
        markers,
        tenant_end,
        received,
    })
}

/// Where a record's `tenant_id` and `received_at_us` lie: the two fields ingest
/// replaces in a client's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamps {
    tenant_end: usize,
    received: (usize, usize),
}

impl Stamps {
    /// The record to publish, as a copy: `item` (the bytes these stamps were read
    /// from) with only `tenant_id` and `received_at_us` replaced.
    pub fn record(&self, item: &[u8], tenant: &str, received_at: Timestamp) -> Vec<u8> {
        let mut out = Vec::with_capacity(item.len() + 48);
        out.extend_from_slice(&item[..HEADER_LEN]);
        write_bytes(&mut out, tenant.as_bytes());
        out.extend_from_slice(&item[self.tenant_end..self.received.0]);
        write_long(&mut out, received_at.as_micros());
        out.extend_from_slice(&item[self.received.1..]);
        out
    }

    /// The same record written over `item` itself, when both new fields take exactly
    /// the bytes of the old ones: a tenant of the same length (any 36-character one,
    /// such as the nil UUID, for a real tenant) and a receive time of this era (any
    /// time in microseconds between 1974 and 2541). False, and `item` unchanged,
    /// otherwise: the caller then makes the copy.
    pub fn stamp(&self, item: &mut [u8], tenant: &str, received_at: Timestamp) -> bool {
        let (tenant_len, tenant_len_size) = zigzag(tenant.len() as i64);
        let (received, received_size) = zigzag(received_at.as_micros());
        let (r0, r1) = self.received;
        if item.len() < r1
            || tenant_len_size + tenant.len() != self.tenant_end - HEADER_LEN
            || received_size != r1 - r0
        {
            return false;
        }
        let text = HEADER_LEN + tenant_len_size;
        item[HEADER_LEN..text].copy_from_slice(&tenant_len[..tenant_len_size]);
        item[text..self.tenant_end].copy_from_slice(tenant.as_bytes());
        item[r0..r1].copy_from_slice(&received[..received_size]);
        true
    }
}

impl FrameView<'_> {
    /// Where this record's tenant and receive time lie.
    pub fn stamps(&self) -> Stamps {
        Stamps {
            tenant_end: self.tenant_end,
            received: self.received,
        }
    }

    /// The samples as numbers, channel-major.
    pub fn sample_values(&self) -> impl Iterator<Item = f32> + Clone + '_ {
        self.samples
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Whether the frame carries the session's end marker.
    pub fn ends_session(&self) -> bool {
        self.markers
            .iter()
            .any(|m| m.label == clisonix_schemas::SESSION_END_MARKER)
    }

    /// The whole frame, owned, as `tenant`'s received at `received_at`.
    pub fn to_frame(&self, tenant: TenantId, received_at: Timestamp) -> Frame {
        Frame {
            tenant_id: tenant,
            device_id: self.device_id.clone(),
            session_id: self.session_id,
            seq: self.seq,
            device_time: self.device_time,
            received_at,
            sample_rate_hz: self.sample_rate_hz,
            unit: self.unit,
            channel_labels: self
                .channel_labels
                .iter()
                .map(|l| (*l).to_owned())
                .collect(),
            samples_per_channel: self.samples_per_channel,
            samples: self.sample_values().collect(),
            markers: self
                .markers
                .iter()
                .map(|m| Marker {
                    sample_offset: m.sample_offset,
                    duration_us: m.duration_us,
                    label: m.label.to_owned(),
                })
                .collect(),
        }
    }
}

/// A record of the current version with its sequence number replaced (ingest numbers
/// the frames of legacy clients). `None` when `record` is not one.
pub fn renumber(record: &[u8], seq: u64) -> Option<Vec<u8>> {
    let v = view(record)?;
    let mut c = Cursor {
        b: record,
        pos: v.tenant_end,
    };
    c.str()?;
    c.str()?;
    let start = c.pos;
    c.long()?;
    let end = c.pos;
    let mut out = Vec::with_capacity(record.len() + 8);
    out.extend_from_slice(&record[..start]);
    write_long(&mut out, i64::try_from(seq).ok()?);
    out.extend_from_slice(&record[end..]);
    Some(out)
}

/// Reads Avro binary primitives from a slice; `None` on anything malformed.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// A zig-zag varint `long` (or `int`).
    fn long(&mut self) -> Option<i64> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.pos)?;
            self.pos += 1;
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Some((value >> 1) as i64 ^ -((value & 1) as i64));
            }
        }
        None
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.long()?).ok()?;
        let end = self.pos.checked_add(len)?;
        let out = self.b.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    fn double(&mut self) -> Option<f64> {
        let b = self.b.get(self.pos..self.pos + 8)?;
        self.pos += 8;
        Some(f64::from_le_bytes(b.try_into().ok()?))
    }

    /// An array: blocks of items (a negative count is followed by the block's size).
    fn array(&mut self, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        loop {
            let mut n = self.long()?;
            if n == 0 {
                return Some(());
            }
            if n < 0 {
                n = n.checked_neg()?;
                self.long()?;
            }
            for _ in 0..n {
                item(self)?;
            }
        }
    }
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

    /// The fast path whole: the frame read in place, owned, and the record to publish.
    fn restamp(item: &[u8], tenant: TenantId, received_at: Timestamp) -> Option<(Frame, Vec<u8>)> {
        let v = view(item)?;
        Some((
            v.to_frame(tenant, received_at),
            v.stamps().record(item, &tenant.to_string(), received_at),
        ))
    }

    #[test]
    fn stamping_in_place_gives_the_copy_or_leaves_the_item_alone() {
        let tenant = TenantId::random();
        let now = Timestamp::now();
        let frame = examples::frame(3, 4, 8);
        let published = encode(&Frame {
            tenant_id: tenant,
            received_at: now,
            ..frame.clone()
        })
        .unwrap();
        // The example's tenant is a UUID and its receive time of this era: both fit.
        let mut item = encode(&frame).unwrap();
        let stamps = view(&item).unwrap().stamps();
        assert_eq!(stamps.record(&item, &tenant.to_string(), now), published);
        assert!(stamps.stamp(&mut item, &tenant.to_string(), now));
        assert_eq!(item, published);
        // A one-character tenant ("x") does not: the item stays as it was.
        let uuid_field = 1 + 36;
        let short = [
            &published[..HEADER_LEN],
            &[2, b'x'][..],
            &published[HEADER_LEN + uuid_field..],
        ]
        .concat();
        let stamps = view(&short).unwrap().stamps();
        let mut unchanged = short.clone();
        assert!(!stamps.stamp(&mut unchanged, &tenant.to_string(), now));
        assert_eq!(unchanged, short);
        assert_eq!(stamps.record(&short, &tenant.to_string(), now), published);
    }

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
    fn the_fast_path_gives_what_decoding_and_encoding_again_give() {
        let tenant = TenantId::random();
        let now = Timestamp::from_micros(1_800_000_000_123_456);
        for (seed, channels, n) in [(0, 1, 1), (7, 4, 16), (300, 32, 32), (1 << 40, 3, 5)] {
            let mut frame = examples::frame(seed, channels, n);
            frame.markers.push(clisonix_schemas::Marker {
                sample_offset: 0,
                duration_us: None,
                label: "ä".into(),
            });
            let item = encode(&frame).unwrap();
            let (fast, bytes) = restamp(&item, tenant, now).expect("the fast path reads it");
            let slow = decode_frame(&item, tenant, now).unwrap();
            assert_eq!(fast, slow);
            assert_eq!(bytes, encode(&slow).unwrap(), "the same record bytes");
        }
        // Every truncation and many corruptions fall back (never panic, never accept
        // what the slow path refuses).
        let item = encode(&examples::frame(3, 4, 8)).unwrap();
        for cut in 0..item.len() {
            assert!(restamp(&item[..cut], tenant, now).is_none());
        }
        for i in HEADER_LEN..item.len() {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut bad = item.clone();
                bad[i] ^= flip;
                if let Some((fast, _)) = restamp(&bad, tenant, now) {
                    assert_eq!(
                        Ok(fast),
                        decode_frame(&bad, tenant, now),
                        "byte {i} ^ {flip:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn renumbering_changes_the_sequence_number_only() {
        let mut frame = examples::frame(5, 3, 8);
        let record = encode(&frame).unwrap();
        for seq in [0, 1, 63, 64, 1 << 20, u64::MAX >> 1] {
            frame.seq = seq;
            assert_eq!(renumber(&record, seq).unwrap(), encode(&frame).unwrap());
        }
        assert_eq!(renumber(&record, u64::MAX), None);
        assert_eq!(renumber(&record[..record.len() - 1], 1), None);
    }

    #[test]
    fn a_view_shares_label_bytes_only_when_the_labels_are_equal() {
        let a = encode(&examples::frame(1, 4, 8)).unwrap();
        let b = encode(&examples::frame(2, 4, 8)).unwrap();
        let mut other = examples::frame(1, 4, 8);
        other.channel_labels[3] = "Oz".into();
        let c = encode(&other).unwrap();
        let (va, vb, vc) = (view(&a).unwrap(), view(&b).unwrap(), view(&c).unwrap());
        assert_eq!(va.labels_raw, vb.labels_raw);
        assert_eq!(va.channel_labels, vb.channel_labels);
        assert_ne!(va.labels_raw, vc.labels_raw);
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
