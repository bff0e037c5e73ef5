//! `clisonix-gateway`: configuration from the environment, then serve until SIGTERM;
//! or, `clisonix-gateway billing ...`, an operator's billing action.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use clisonix_gateway::operator::Billing;
use clisonix_gateway::{Application, Config};
use tracing::{error, info};

/// The Clisonix gateway: the public HTTP API (configured by `CLISONIX_*` variables and
/// `DATABASE_URL`).
#[derive(Debug, Parser)]
#[command(name = "clisonix-gateway", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serves the API until SIGTERM (what running it without a command does).
    Serve,
    /// Operators' billing actions on the database at DATABASE_URL (self-hosted mode).
    #[command(subcommand)]
    Billing(Billing),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Billing(command)) = cli.command {
        return billing(command).await;
    }
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
    let production = config.production;
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(e) => {
            error!(error = %format!("{e:#}"), "the gateway cannot start");
            return ExitCode::FAILURE;
        }
    };
    info!(port = app.port(), production, "gateway listening");
    let shutdown =
        clisonix_gateway::startup::shutdown_on_signal("stopping: finishing requests in flight");
    match app.run_until_stopped(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "the gateway failed");
            ExitCode::FAILURE
        }
    }
}

async fn billing(command: Billing) -> ExitCode {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        eprintln!("error: DATABASE_URL is not set (the gateway's database)");
        return ExitCode::FAILURE;
    };
    match clisonix_gateway::operator::run(command, &url).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
