//! Schema evolution checks: every version of a family must read data written by the
//! version before it (backward compatibility), so consumers can be upgraded before
//! producers and old records in a topic stay readable.
//!
//! Two checks, both must pass: Avro's static resolution rules
//! ([`SchemaCompatibility::can_read`]) and a data check that writes an example datum
//! with the old schema and reads it with the new one.

use std::collections::HashMap;
use std::io::Cursor;

use apache_avro::{
    reader::datum::GenericDatumReader, schema_compatibility::SchemaCompatibility, types::Value,
    writer::datum::GenericDatumWriter, Schema,
};

use crate::registry::Family;

/// Why a reader schema cannot read what a writer schema wrote.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CompatError {
    #[error("the reader schema cannot resolve the writer schema: {0}")]
    Incompatible(String),
    #[error("an example datum of the writer schema could not be written: {0}")]
    Example(String),
    #[error("the reader schema failed on data written by the writer schema: {0}")]
    Data(String),
    #[error("{family} v{version} cannot read v{previous}: {reason}")]
    Version {
        family: Family,
        version: u32,
        previous: u32,
        reason: Box<CompatError>,
    },
}

/// Checks that `reader` reads everything `writer` writes.
pub fn check_pair(writer: &Schema, reader: &Schema) -> Result<(), CompatError> {
    SchemaCompatibility::can_read(writer, reader)
        .map_err(|e| CompatError::Incompatible(e.to_string()))?;
    let datum = example_value(writer);
    let bytes = GenericDatumWriter::builder(writer)
        .build()
        .and_then(|w| w.write_value_to_vec(datum))
        .map_err(|e| CompatError::Example(e.to_string()))?;
    GenericDatumReader::builder(writer)
        .reader_schema(reader)
        .build()
        .and_then(|r| r.read_value(&mut Cursor::new(&bytes)))
        .map(|_| ())
        .map_err(|e| CompatError::Data(e.to_string()))
}

/// Checks every consecutive pair of a family's versions.
pub fn check_family(family: Family) -> Result<(), CompatError> {
    let versions: Vec<_> = family.versions().collect();
    for pair in versions.windows(2) {
        let (old, new) = (pair[0], pair[1]);
        check_pair(&old.schema, &new.schema).map_err(|reason| CompatError::Version {
            family,
            version: new.version,
            previous: old.version,
            reason: Box::new(reason),
        })?;
    }
    Ok(())
}

/// A deterministic example value of a schema, with every field present, non-empty
/// arrays and the non-null branch of unions, so a data check exercises every field.
pub fn example_value(schema: &Schema) -> Value {
    example(schema, &mut HashMap::new())
}

fn example(schema: &Schema, named: &mut HashMap<String, Schema>) -> Value {
    match schema {
        Schema::Null => Value::Null,
        Schema::Boolean => Value::Boolean(true),
        Schema::Int => Value::Int(7),
        Schema::Long => Value::Long(1_700_000_000_000_000),
        Schema::Float => Value::Float(1.5),
        Schema::Double => Value::Double(2.5),
        Schema::Bytes => Value::Bytes(vec![0, 0, 128, 63]),
        Schema::String => Value::String("example".into()),
        Schema::Array(a) => Value::Array(vec![example(&a.items, named)]),
        Schema::Map(m) => Value::Map(HashMap::from([("k".into(), example(&m.types, named))])),
        Schema::Union(u) => {
            let variants = u.variants();
            let i = variants
                .iter()
                .position(|v| !matches!(v, Schema::Null))
                .unwrap_or(0);
            Value::Union(i as u32, Box::new(example(&variants[i], named)))
        }
        Schema::Record(r) => {
            named.insert(r.name.fullname(None), schema.clone());
            Value::Record(
                r.fields
                    .iter()
                    .map(|f| (f.name.clone(), example(&f.schema, named)))
                    .collect(),
            )
        }
        Schema::Enum(e) => {
            named.insert(e.name.fullname(None), schema.clone());
            Value::Enum(0, e.symbols[0].clone())
        }
        Schema::Fixed(f) => {
            named.insert(f.name.fullname(None), schema.clone());
            Value::Fixed(f.size, vec![0; f.size])
        }
        Schema::Date => Value::Date(19_000),
        Schema::TimeMillis => Value::TimeMillis(1_000),
        Schema::TimeMicros => Value::TimeMicros(1_000_000),
        Schema::TimestampMillis => Value::TimestampMillis(1_700_000_000_000),
        Schema::TimestampMicros => Value::TimestampMicros(1_700_000_000_000_000),
        Schema::TimestampNanos => Value::TimestampNanos(1_700_000_000_000_000_000),
        Schema::LocalTimestampMillis => Value::LocalTimestampMillis(1_700_000_000_000),
        Schema::LocalTimestampMicros => Value::LocalTimestampMicros(1_700_000_000_000_000),
        Schema::LocalTimestampNanos => Value::LocalTimestampNanos(1_700_000_000_000_000_000),
        Schema::Uuid(_) => Value::Uuid(uuid::Uuid::nil()),
        Schema::Ref { name } => {
            let target = named
                .get(&name.fullname(None))
                .cloned()
                .unwrap_or(Schema::Null);
            example(&target, named)
        }
        // Decimal and duration are not used by the contracts; a null makes the data
        // check fail loudly should one ever appear without support here.
        _ => Value::Null,
    }
}
