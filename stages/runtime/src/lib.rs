//! The stage runtime: everything between Kafka and a [`clisonix_stage::Stage`] — the
//! consume–process–produce–commit loop in transactions, dead letters, restoring state
//! after restarts and rebalances ([`runner`]), metrics ([`metrics`]) and the
//! `/metrics`, `/health`, `/ready` endpoints ([`http`]); and the loop of the consumers
//! that write to Postgres ([`tables`]): the results sink ([`sink`]) and metering
//! ([`metering`]).

pub mod http;
pub mod metering;
pub mod metrics;
pub mod runner;
pub mod sink;
pub mod tables;

pub use http::{router, Health};
pub use metering::Metering;
pub use metrics::StageMetrics;
pub use runner::{replay, run, ReplayProgress, ReplaySpec, RuntimeConfig, RuntimeError};
pub use sink::Sink;
pub use tables::{replay_tables, run_tables, TableRange, TableWriter, TablesConfig};
