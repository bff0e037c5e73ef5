//! The stage runtime: everything between Kafka and a [`clisonix_stage::Stage`] — the
//! consume–process–produce–commit loop in transactions, dead letters, restoring state
//! after restarts and rebalances ([`runner`]), metrics ([`metrics`]) and the
//! `/metrics`, `/health`, `/ready` endpoints ([`http`]).

pub mod http;
pub mod metrics;
pub mod runner;
pub mod sink;

pub use http::{router, Health};
pub use metrics::StageMetrics;
pub use runner::{run, RuntimeConfig, RuntimeError};
pub use sink::{run_sink, SinkConfig};
