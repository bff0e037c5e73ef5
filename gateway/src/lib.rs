//! The Clisonix gateway: the public HTTP API that SaaS users and device clients
//! authenticate against. This first part holds accounts and authentication; results,
//! keys, roles, audit reads and billing build on it.

pub mod accounts;
pub mod auth;
pub mod config;
pub mod error;
pub mod keys;
pub mod limits;
pub mod members;
pub mod openapi;
pub mod startup;
pub mod tenant;

pub use config::Config;
pub use startup::{router, AppState, Application};
