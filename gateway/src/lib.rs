//! The Clisonix gateway: the public HTTP API that SaaS users and device clients
//! authenticate against. It holds accounts, authentication, keys, roles and audit reads,
//! the results API (sessions, features, audio), and plans, subscriptions and usage.

pub mod accounts;
pub mod api_usage;
pub mod audio;
pub mod auth;
pub mod billing;
pub mod config;
mod feature_parquet;
pub mod limits;
pub mod live;
pub mod members;
pub mod openapi;
pub mod operator;
pub mod plans;
pub mod results;
pub mod startup;
pub mod stripe;
pub mod tenant;
pub mod usage;
pub mod webhooks;

pub use clisonix_service::error;
pub use clisonix_tenancy::keys;
pub use config::Config;
pub use startup::{router, AppState, Application};
