//! The topic catalog and the Kafka plumbing every Clisonix part shares: the catalog
//! itself ([`catalog`]), the client settings ([`client`]) and the admin operations
//! behind the `clisonix-topics` tool ([`admin`]).

pub mod admin;
pub mod catalog;
pub mod client;
pub mod consume;
pub mod diff;
pub mod export;
pub mod lag;
pub mod offsets;
pub mod records;

pub use admin::{Admin, AdminError, Difference, Outcome, Replication, TopicReport};
pub use catalog::{TopicSpec, Topics, CATALOG};
pub use client::KafkaSettings;
