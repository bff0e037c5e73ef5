//! The contracts of Clisonix: the Avro schema of every topic's key and value
//! (`schemas/avro/<record>/vN.avsc`, the source of truth), the domain types the
//! services use, and the single-object codec between them.
//!
//! This crate is pure: it does not depend on Kafka, tokio or a database, so every
//! service, stage and tool can share it and it can be tested with plain vectors.
//!
//! ```
//! use clisonix_schemas::{decode, encode, SessionKey, SessionId, TenantId};
//! let key = SessionKey { tenant_id: TenantId::random(), session_id: SessionId::random() };
//! let bytes = encode(&key).unwrap();
//! assert_eq!(decode::<SessionKey>(&bytes).unwrap(), key);
//! ```

pub mod canonical;
pub mod codec;
pub mod compat;
pub mod domain;
pub mod examples;
pub mod records;
pub mod registry;

pub use codec::{decode, encode, encode_into, writer_schema, AvroRecord, DecodeError, EncodeError};
pub use domain::*;
pub use registry::{Family, SchemaVersion};
