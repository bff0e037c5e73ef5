//! What every Clisonix HTTP service shares, so that services never depend on each
//! other: the one error shape ([`error`]), the request-id and metrics middleware and
//! the shutdown signal ([`http`]), and configuration secrets ([`config`]).

pub mod config;
pub mod error;
pub mod http;

pub use error::ApiError;
