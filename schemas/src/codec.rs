//! Avro single-object encoding of the records, and the typed errors of decoding.
//!
//! Every record on every topic is `C3 01`, the writer schema's 8-byte little-endian
//! CRC-64-AVRO fingerprint, then the Avro binary datum. A reader therefore knows which
//! schema (family and version) wrote the bytes without a registry service; older
//! versions are resolved into the newest one on the way in.
//!
//! Decoding never panics on bad input: garbage, a foreign fingerprint, a record of
//! another family, a truncated datum or trailing bytes each give a [`DecodeError`]
//! whose [`DecodeError::reason_code`] is what a stage writes into a dead letter.

use std::io::Cursor;
use std::sync::LazyLock;

use apache_avro::{
    reader::datum::GenericDatumReader, types::Value, util::max_allocation_bytes,
    writer::datum::GenericDatumWriter,
};

use crate::registry::{registry, Family, SchemaVersion};

/// The two marker bytes that open an Avro single-object encoded record.
pub const MAGIC: [u8; 2] = [0xC3, 0x01];
/// Marker plus fingerprint.
pub const HEADER_LEN: usize = 10;
/// The largest single allocation a decoded length prefix may ask for. Kafka records are
/// far smaller; without a bound, eight bytes of garbage could ask for gigabytes.
pub const MAX_ALLOCATION: usize = 64 * 1024 * 1024;

/// Why bytes could not be decoded into a record.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("record is {len} bytes, shorter than the {HEADER_LEN}-byte single-object header")]
    TooShort { len: usize },
    #[error("record does not start with the Avro single-object marker C3 01")]
    BadMagic,
    #[error("record was written with an unknown schema (fingerprint {fingerprint:016x})")]
    UnknownSchema { fingerprint: u64 },
    #[error("expected a {expected} record, found {found} v{version}")]
    WrongSchema {
        expected: Family,
        found: Family,
        version: u32,
    },
    #[error("{family} v{version} datum is malformed: {reason}")]
    Malformed {
        family: Family,
        version: u32,
        reason: String,
    },
    #[error("{count} bytes left over after the {family} datum")]
    TrailingBytes { family: Family, count: usize },
    #[error("{family}.{field}: {reason}")]
    Invalid {
        family: Family,
        field: &'static str,
        reason: String,
    },
}

impl DecodeError {
    /// A stable, machine-readable reason for dead letters and metrics.
    pub fn reason_code(&self) -> &'static str {
        match self {
            DecodeError::TooShort { .. } | DecodeError::BadMagic => "not_avro",
            DecodeError::UnknownSchema { .. } => "unknown_schema",
            DecodeError::WrongSchema { .. } => "wrong_schema",
            DecodeError::Malformed { .. } | DecodeError::TrailingBytes { .. } => "malformed",
            DecodeError::Invalid { .. } => "invalid_field",
        }
    }
}

/// Why a record could not be encoded: a domain value the contract cannot carry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("{family}.{field}: {reason}")]
    Invalid {
        family: Family,
        field: &'static str,
        reason: String,
    },
    #[error("{family} value does not match its schema: {reason}")]
    Schema { family: Family, reason: String },
}

/// A domain type that travels as one Avro record family.
///
/// Implementations map between the domain type and the Avro value of the family's
/// newest schema; they live in [`crate::records`], the only place that knows field names.
pub trait AvroRecord: Sized {
    const FAMILY: Family;
    fn to_avro(&self) -> Result<Value, EncodeError>;
    fn from_avro(value: Value) -> Result<Self, DecodeError>;

    /// Writes the datum of schema `version` straight from the record, without building
    /// generic values, when the type knows that version's layout: the same bytes the
    /// generic writer gives (each such writer is tested against it). `false` leaves
    /// `buf` as it was and [`encode_into`] takes the generic path, which also says what
    /// is wrong with a record that does not encode.
    fn write_datum(&self, _version: u32, _buf: &mut Vec<u8>) -> bool {
        false
    }
}

/// `v` as Avro writes a `long` or `int` (a zig-zag varint): the bytes and how many are
/// used.
pub fn zigzag(v: i64) -> ([u8; 10], usize) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    let mut bytes = [0; 10];
    let mut len = 0;
    loop {
        if z < 0x80 {
            bytes[len] = z as u8;
            return (bytes, len + 1);
        }
        bytes[len] = (z as u8 & 0x7F) | 0x80;
        len += 1;
        z >>= 7;
    }
}

/// Appends `v` as an Avro `long` (or `int`).
pub fn write_long(buf: &mut Vec<u8>, v: i64) {
    let (bytes, len) = zigzag(v);
    buf.extend_from_slice(&bytes[..len]);
}

/// Appends `bytes` as an Avro `bytes` or `string`: its length, then itself.
pub fn write_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    write_long(buf, bytes.len() as i64);
    buf.extend_from_slice(bytes);
}

/// Encodes a record: header, then datum.
pub fn encode<R: AvroRecord>(record: &R) -> Result<Vec<u8>, EncodeError> {
    let mut buf = Vec::new();
    encode_into(record, &mut buf)?;
    Ok(buf)
}

/// Encodes a record, appending to `buf` (reuse a buffer on hot paths).
pub fn encode_into<R: AvroRecord>(record: &R, buf: &mut Vec<u8>) -> Result<(), EncodeError> {
    let codec = codecs().writer(R::FAMILY);
    let start = buf.len();
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&codec.version.fingerprint.to_le_bytes());
    if record.write_datum(codec.version.version, buf) {
        return Ok(());
    }
    write_generic(record, codec, buf).inspect_err(|_| buf.truncate(start))
}

/// Appends the datum through generic Avro values.
fn write_generic<R: AvroRecord>(
    record: &R,
    codec: &WriterCodec,
    buf: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let value = record.to_avro()?;
    codec
        .writer
        .write_value_ref(buf, &value)
        .map(drop)
        .map_err(|e| EncodeError::Schema {
            family: R::FAMILY,
            reason: e.to_string(),
        })
}

/// The datum as the generic writer gives it, whatever [`AvroRecord::write_datum`] does:
/// what a direct writer is tested against.
#[cfg(test)]
pub(crate) fn generic_datum<R: AvroRecord>(record: &R) -> Result<Vec<u8>, EncodeError> {
    let mut buf = Vec::new();
    write_generic(record, codecs().writer(R::FAMILY), &mut buf)?;
    Ok(buf)
}

/// Decodes a record of type `R`, resolving older schema versions into the newest.
pub fn decode<R: AvroRecord>(bytes: &[u8]) -> Result<R, DecodeError> {
    let version = writer_schema(bytes)?;
    if version.family != R::FAMILY {
        return Err(DecodeError::WrongSchema {
            expected: R::FAMILY,
            found: version.family,
            version: version.version,
        });
    }
    let value = read_datum(version, &bytes[HEADER_LEN..])?;
    R::from_avro(value)
}

/// Which schema wrote these bytes (checks only the header).
pub fn writer_schema(bytes: &[u8]) -> Result<&'static SchemaVersion, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::TooShort { len: bytes.len() });
    }
    if bytes[..2] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let fingerprint = u64::from_le_bytes(bytes[2..HEADER_LEN].try_into().expect("8 bytes"));
    registry()
        .by_fingerprint(fingerprint)
        .ok_or(DecodeError::UnknownSchema { fingerprint })
}

/// Decodes the datum written by `version` as the generic Avro value of its family's
/// newest schema. Used by [`decode`] and by tools that show records of any family.
pub fn read_datum(version: &'static SchemaVersion, datum: &[u8]) -> Result<Value, DecodeError> {
    let reader = codecs().reader(version);
    let mut cursor = Cursor::new(datum);
    let value = reader
        .read_value(&mut cursor)
        .map_err(|e| DecodeError::Malformed {
            family: version.family,
            version: version.version,
            reason: e.to_string(),
        })?;
    let left = datum.len() - cursor.position() as usize;
    if left != 0 {
        return Err(DecodeError::TrailingBytes {
            family: version.family,
            count: left,
        });
    }
    Ok(value)
}

struct WriterCodec {
    version: &'static SchemaVersion,
    writer: GenericDatumWriter<'static>,
}

struct ReaderCodec {
    fingerprint: u64,
    reader: GenericDatumReader<'static>,
}

/// Readers and writers built once: building one resolves the schema's names, which
/// costs more than decoding a small record.
struct Codecs {
    writers: Vec<(Family, WriterCodec)>,
    readers: Vec<ReaderCodec>,
}

impl Codecs {
    fn build() -> Codecs {
        max_allocation_bytes(MAX_ALLOCATION);
        let registry = registry();
        let writers = Family::ALL
            .iter()
            .map(|&family| {
                let version = family.current();
                let writer = GenericDatumWriter::builder(&version.schema)
                    .build()
                    .expect("a parsed schema resolves");
                (family, WriterCodec { version, writer })
            })
            .collect();
        let readers = registry
            .versions
            .iter()
            .map(|version| {
                let current = version.family.current();
                let reader_schema =
                    (current.fingerprint != version.fingerprint).then_some(&current.schema);
                let reader = GenericDatumReader::builder(&version.schema)
                    .maybe_reader_schema(reader_schema)
                    .build()
                    .expect("a parsed schema resolves");
                ReaderCodec {
                    fingerprint: version.fingerprint,
                    reader,
                }
            })
            .collect();
        Codecs { writers, readers }
    }

    fn writer(&self, family: Family) -> &WriterCodec {
        &self
            .writers
            .iter()
            .find(|(f, _)| *f == family)
            .expect("a writer per family")
            .1
    }

    fn reader(&self, version: &SchemaVersion) -> &GenericDatumReader<'static> {
        &self
            .readers
            .iter()
            .find(|r| r.fingerprint == version.fingerprint)
            .expect("a reader per registered version")
            .reader
    }
}

fn codecs() -> &'static Codecs {
    static CODECS: LazyLock<Codecs> = LazyLock::new(Codecs::build);
    &CODECS
}
