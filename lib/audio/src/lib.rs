//! Audio chunks as objects. Jona's chunks leave Postgres: the results sink encodes each
//! one as lossless FLAC ([`flac`]), writes it to an object store ([`AudioStore`]: a
//! local folder, or S3 and what speaks its API, such as MinIO) and only then commits the
//! chunk's index row, which names the object; the gateway reads the row, then the
//! object. So no reader sees an index row without its audio.
//!
//! An object's key holds a digest of its bytes ([`ObjectKey`]). The encoder is
//! deterministic, so a chunk written again (a sink killed between the object and its
//! row, then re-reading the chunk) lands on the same key and is reused; a chunk rendered
//! differently gets a key of its own and never overwrites audio a row already names.
//! Objects that no row names (a sink killed for good between the two writes, rows
//! deleted by retention before their objects) are collected by the sink's sweep once
//! older than a grace period.

pub mod flac;
mod store;

pub use store::{AudioStore, ObjectKey, StoreError, StoredObject};
