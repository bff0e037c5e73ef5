//! Feature rows as Parquet, for bulk readers (pandas, Polars, DuckDB, Spark): the
//! features API's `format=parquet`.
//!
//! Columns: `window_index` (int64), `window_start` (timestamp, µs, UTC),
//! `channel_index` (int32), `channel_label` (UTF-8), then the selected features in
//! their order: numbers as optional doubles (null where the JSON answer has null),
//! `flat` as boolean, counts as int32, text as UTF-8, and `psd` as a list of doubles.
//! Rows go out in row groups of [`ROWS_PER_GROUP`] (fewer with the PSD), each sent as
//! soon as it is written, so memory stays bounded however long the session.

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use sqlx::postgres::PgRow;
use sqlx::Row;

use crate::results::Column;

pub(crate) const CONTENT_TYPE: &str = "application/vnd.apache.parquet";

/// Rows per row group without the PSD; with it, an eighth (65 doubles a row).
pub(crate) const ROWS_PER_GROUP: usize = 65_536;

/// Why a Parquet answer could not be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    #[error("reading a row: {0}")]
    Row(#[from] sqlx::Error),
    #[error("writing Parquet: {0}")]
    Parquet(#[from] ParquetError),
}

/// What the file writer wrote, taken piece by piece.
#[derive(Debug, Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Shared {
    fn take(&self) -> Bytes {
        Bytes::from(std::mem::take(&mut *self.0.lock().expect("not poisoned")))
    }
}

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One column's values of the row group being gathered.
enum Values {
    Int64(Vec<i64>),
    Int32(Vec<i32>),
    /// Values of the present ones, and a definition level per row (0: null).
    Double(Vec<f64>, Vec<i16>),
    Bool(Vec<bool>),
    Text(Vec<ByteArray>),
    /// Every element, and per element (or per empty list) its levels.
    List {
        values: Vec<f64>,
        defs: Vec<i16>,
        reps: Vec<i16>,
    },
}

/// A Parquet answer being written: rows are pushed, row groups taken as they fill.
pub(crate) struct FeatureParquet {
    names: Vec<(&'static str, Column)>,
    columns: Vec<Values>,
    rows: usize,
    rows_per_group: usize,
    writer: SerializedFileWriter<Shared>,
    out: Shared,
}

impl std::fmt::Debug for FeatureParquet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureParquet")
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl FeatureParquet {
    /// A file of the four key columns and the `names` selected.
    pub(crate) fn new(names: &[(&'static str, Column)]) -> Result<FeatureParquet, WriteError> {
        let mut message = String::from(
            "message features {\n  required int64 window_index;\n  required int64 window_start (TIMESTAMP(MICROS,true));\n  required int32 channel_index;\n  required binary channel_label (UTF8);\n",
        );
        for (name, kind) in names {
            let field = match kind {
                Column::Float => format!("  optional double {name};\n"),
                Column::Bool => format!("  required boolean {name};\n"),
                Column::Int => format!("  required int32 {name};\n"),
                Column::Text => format!("  required binary {name} (UTF8);\n"),
                Column::Psd => format!(
                    "  optional group {name} (LIST) {{\n    repeated group list {{\n      required double element;\n    }}\n  }}\n"
                ),
            };
            message.push_str(&field);
        }
        message.push('}');
        let schema = Arc::new(parse_message_type(&message)?);
        let props = Arc::new(WriterProperties::builder().build());
        let out = Shared::default();
        let writer = SerializedFileWriter::new(out.clone(), schema, props)?;
        let mut parquet = FeatureParquet {
            names: names.to_vec(),
            columns: Vec::new(),
            rows: 0,
            rows_per_group: if names.iter().any(|(_, k)| *k == Column::Psd) {
                ROWS_PER_GROUP / 8
            } else {
                ROWS_PER_GROUP
            },
            writer,
            out,
        };
        parquet.columns = parquet.empty_columns();
        Ok(parquet)
    }

    fn empty_columns(&self) -> Vec<Values> {
        let mut columns = vec![
            Values::Int64(Vec::new()),
            Values::Int64(Vec::new()),
            Values::Int32(Vec::new()),
            Values::Text(Vec::new()),
        ];
        columns.extend(self.names.iter().map(|(_, kind)| match kind {
            Column::Float => Values::Double(Vec::new(), Vec::new()),
            Column::Bool => Values::Bool(Vec::new()),
            Column::Int => Values::Int32(Vec::new()),
            Column::Text => Values::Text(Vec::new()),
            Column::Psd => Values::List {
                values: Vec::new(),
                defs: Vec::new(),
                reps: Vec::new(),
            },
        }));
        columns
    }

    /// Adds a row; returns a written row group's bytes when one filled.
    pub(crate) fn push(&mut self, row: &PgRow) -> Result<Option<Bytes>, WriteError> {
        // The query's columns: these four, then the selection's, in order; their types
        // are the table's, so they are decoded without sqlx's check of each (a
        // tenth of the CPU per row), which the API's tests would catch going wrong.
        let window: i64 = row.try_get_unchecked(0)?;
        let start: DateTime<Utc> = row.try_get_unchecked(1)?;
        let channel: i32 = row.try_get_unchecked(2)?;
        let label: &str = row.try_get_unchecked(3)?;
        let mut columns = self.columns.iter_mut();
        let mut next = || columns.next().expect("a buffer per column");
        if let Values::Int64(v) = next() {
            v.push(window);
        }
        if let Values::Int64(v) = next() {
            v.push(start.timestamp_micros());
        }
        if let Values::Int32(v) = next() {
            v.push(channel);
        }
        if let Values::Text(v) = next() {
            v.push(ByteArray::from(label));
        }
        for i in 4..4 + self.names.len() {
            match next() {
                Values::Double(values, defs) => {
                    match row
                        .try_get_unchecked::<Option<f64>, _>(i)?
                        .filter(|v| v.is_finite())
                    {
                        Some(v) => {
                            values.push(v);
                            defs.push(1);
                        }
                        None => defs.push(0),
                    }
                }
                Values::Bool(v) => v.push(row.try_get_unchecked(i)?),
                Values::Int32(v) => v.push(row.try_get_unchecked(i)?),
                Values::Text(v) => v.push(ByteArray::from(row.try_get_unchecked::<&str, _>(i)?)),
                Values::List { values, defs, reps } => {
                    let bytes: Option<&[u8]> = row.try_get_unchecked(i)?;
                    match bytes {
                        None => {
                            defs.push(0);
                            reps.push(0);
                        }
                        Some(b) if b.len() < 8 => {
                            defs.push(1);
                            reps.push(0);
                        }
                        Some(b) => {
                            for (i, v) in b.chunks_exact(8).enumerate() {
                                values.push(f64::from_le_bytes(v.try_into().expect("8 bytes")));
                                defs.push(2);
                                reps.push(i16::from(i > 0));
                            }
                        }
                    }
                }
                Values::Int64(_) => unreachable!("only the key columns are int64"),
            }
        }
        self.rows += 1;
        if self.rows >= self.rows_per_group {
            return self.write_group().map(Some);
        }
        Ok(None)
    }

    /// Writes the gathered rows as a row group and returns the bytes written so far.
    fn write_group(&mut self) -> Result<Bytes, WriteError> {
        let empty = self.empty_columns();
        let columns = std::mem::replace(&mut self.columns, empty);
        self.rows = 0;
        let mut group = self.writer.next_row_group()?;
        for values in &columns {
            let mut col = group.next_column()?.expect("a column per schema field");
            match values {
                Values::Int64(v) => {
                    col.typed::<Int64Type>().write_batch(v, None, None)?;
                }
                Values::Int32(v) => {
                    col.typed::<Int32Type>().write_batch(v, None, None)?;
                }
                Values::Double(v, defs) => {
                    col.typed::<DoubleType>().write_batch(v, Some(defs), None)?;
                }
                Values::Bool(v) => {
                    col.typed::<BoolType>().write_batch(v, None, None)?;
                }
                Values::Text(v) => {
                    col.typed::<ByteArrayType>().write_batch(v, None, None)?;
                }
                Values::List { values, defs, reps } => {
                    col.typed::<DoubleType>()
                        .write_batch(values, Some(defs), Some(reps))?;
                }
            }
            col.close()?;
        }
        group.close()?;
        Ok(self.out.take())
    }

    /// Writes the last row group (if any rows are left) and the footer; the rest of the
    /// file.
    pub(crate) fn finish(mut self) -> Result<Bytes, WriteError> {
        let mut rest = Vec::new();
        if self.rows > 0 {
            rest.extend_from_slice(&self.write_group()?);
        }
        self.writer.close()?;
        rest.extend_from_slice(&self.out.take());
        Ok(Bytes::from(rest))
    }
}
