//! The Clisonix gateway: the public HTTP API that SaaS users and device clients
//! authenticate against. It holds accounts, authentication, keys, roles and audit reads,
//! and the results API (sessions, features, audio).

pub mod accounts;
pub mod auth;
pub mod config;
pub mod error;
pub mod keys;
pub mod limits;
pub mod live;
pub mod members;
pub mod openapi;
pub mod results;
pub mod startup;
pub mod tenant;

pub use config::Config;
pub use startup::{router, AppState, Application};
