//! `clisonix-alba`: configuration from the environment, then serve until SIGTERM.

use std::process::ExitCode;

use clisonix_alba::{Application, Config};
use tracing::{error, info};

#[global_allocator]
static ALLOCATOR: clisonix_alba::Allocator = clisonix_alba::ALLOCATOR;

fn main() -> ExitCode {
    // Before the runtime starts its threads (see `tune_allocator`).
    clisonix_alba::tune_allocator();
    serve()
}

#[tokio::main]
async fn serve() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(e) => {
            error!(error = %format!("{e:#}"), "ingest cannot start");
            return ExitCode::FAILURE;
        }
    };
    info!(port = app.port(), "ingest listening");
    let shutdown = clisonix_service::http::shutdown_on_signal(
        "stopping: finishing requests and streams in flight",
    );
    match app.run_until_stopped(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "ingest failed");
            ExitCode::FAILURE
        }
    }
}
