//! `./dev`: the local development stack of Clisonix and the project's two set-up
//! commands, `./dev run` (the main job) and `./dev test` (the whole test suite).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};

use clisonix_dev::stack::Stack;
use clisonix_dev::{procs, run};

// `./dev run` hosts ingest in this process: it runs on ingest's allocator, tuned as
// ingest's own binary tunes it (`clisonix_alba::tune_allocator`, first in `main`).
#[global_allocator]
static ALLOCATOR: clisonix_alba::Allocator = clisonix_alba::ALLOCATOR;

const ABOUT: &str = "The Clisonix development stack: Apache Kafka (KRaft, one node) and Postgres \
on loopback, the catalog's topics and the database migrations.";

const EXAMPLES: &str = "\
Examples:
  ./dev run                 # the main job: stack up, Albi, a real recording -> eeg.frames -> eeg.features
  ./dev test                # the whole test suite on the real broker and database
  ./dev up && ./dev status  # bring the stack up and see what runs where
  eval \"$(./dev env)\"       # point your shell (cargo test, the tools) at the stack
  ./dev down                # stop it; data is kept
  ./dev reset --yes         # stop it and delete its data

Environment:
  DATABASE_URL                    use this Postgres instead of a private cluster
  CLISONIX_KAFKA_BOOTSTRAP        use this Kafka instead of the local node
  CLISONIX_KAFKA_PORT             local broker port (19092); CLISONIX_KAFKA_CONTROLLER_PORT (19093)
  CLISONIX_KAFKA_JAVA_OPTS        extra JVM options for the local broker, after ours
  CLISONIX_PG_PORT                private Postgres port (15432)
  CLISONIX_TOPIC_PREFIX           prefix of every topic name
  CLISONIX_CACHE_DIR              where Kafka is fetched to (~/.cache/clisonix)
  CLISONIX_DATA_DIR               the shared example data (../shared/data)";

#[derive(Debug, Parser)]
#[command(name = "./dev", about = ABOUT, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start Postgres and Kafka, create the topics, apply the migrations
    Up,
    /// Stop the stack (data is kept)
    Down,
    /// Show what runs where
    Status,
    /// Print shell exports that point programs at the stack
    Env,
    /// Stop the stack and delete all its data
    Reset {
        /// Confirm the deletion
        #[arg(long)]
        yes: bool,
    },
    /// Print the end of a part's log
    Logs {
        #[arg(value_parser = ["kafka", "postgres"])]
        part: String,
        /// Number of lines
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
    },
    /// The main job: the whole pipeline (stack, gateway, ingest, Albi, Jona, sessions,
    /// the sink) with a recording streamed through it as a device, in real time
    Run {
        /// The EDF/BDF recording (default: the shared example recording)
        #[arg(long)]
        file: Option<PathBuf>,
        /// Frame length in milliseconds
        #[arg(long, default_value_t = 125)]
        frame_ms: u32,
        /// Stream as fast as possible instead of in real time
        #[arg(long)]
        fast: bool,
        /// Stream at this multiple of real time
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Stop once the results are in instead of serving until Ctrl-C
        #[arg(long)]
        exit_when_done: bool,
        /// Where the gateway (the public API) listens
        #[arg(long, default_value = "127.0.0.1:8000")]
        gateway_listen: std::net::SocketAddr,
        /// Where ingest listens
        #[arg(long, default_value = "127.0.0.1:8100")]
        ingest_listen: std::net::SocketAddr,
        /// Leave the stack (Kafka, Postgres) running afterwards
        #[arg(long)]
        keep_running: bool,
    },
    /// Make the tests' Python environment (from PyPI, once) and print its interpreter
    Python,
    /// Run the whole test suite against the stack (brought up for it, and stopped after
    /// if it was not running before); extra arguments go to `cargo test`
    Test {
        /// Leave the stack running afterwards
        #[arg(long)]
        keep_running: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    clisonix_alba::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,librdkafka=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("devstack/ sits in the workspace root")
        .to_owned()
}

fn data_dir(root: &Path) -> PathBuf {
    std::env::var_os("CLISONIX_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/data"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let root = root();
    let stack = Stack::from_env(&root)?;
    match cli.command {
        Cmd::Up => {
            stack.up(&runtime()?)?;
            print_status(&stack);
        }
        Cmd::Down => stack.down()?,
        Cmd::Status => {
            print_status(&stack);
            if !stack.running() {
                return Ok(ExitCode::from(3));
            }
        }
        Cmd::Env => {
            for (k, v) in stack.env_vars() {
                println!("export {k}='{v}'");
            }
        }
        Cmd::Reset { yes } => {
            if !yes {
                anyhow::bail!(
                    "reset deletes the local Kafka and Postgres data; confirm with --yes"
                );
            }
            stack.reset()?;
            eprintln!("==> Local data deleted");
        }
        Cmd::Logs { part, lines } => {
            let path = match part.as_str() {
                "kafka" => stack.kafka.as_ref().map(|k| k.log_file()),
                _ => stack.postgres.log_file(),
            }
            .with_context(|| format!("{part} is external: its logs are where it runs"))?;
            println!("{}", procs::tail(&path, lines));
        }
        Cmd::Run {
            file,
            frame_ms,
            fast,
            speed,
            exit_when_done,
            gateway_listen,
            ingest_listen,
            keep_running,
        } => {
            if speed.is_nan() || speed <= 0.0 {
                anyhow::bail!("--speed must be above 0 (--fast streams as fast as possible)");
            }
            let file =
                file.unwrap_or_else(|| data_dir(&root).join("eeglab_sample_32ch_128hz_238s.edf"));
            let options = run::RunOptions {
                file,
                frame_ms,
                speed: if fast { 0.0 } else { speed },
                exit_when_done,
                gateway: gateway_listen,
                ingest: ingest_listen,
                out_dir: run::out_dir(&root),
            };
            let rt = runtime()?;
            let started = stack.up(&rt)?;
            let stop = tokio_util::sync::CancellationToken::new();
            let outcome = rt.block_on(async {
                let signal = stop.clone();
                tokio::spawn(async move {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        signal.cancel();
                    }
                });
                run::run_pipeline(&stack, &options, stop.clone()).await
            });
            drop(rt);
            if keep_running || !started.any() {
                eprintln!("==> The stack keeps running (./dev down stops it)");
                print_status(&stack);
            } else {
                stack.down_started(started)?;
            }
            outcome?;
            if stop.is_cancelled() {
                return Ok(ExitCode::from(130));
            }
        }
        Cmd::Python => {
            println!("{}", stack.python.ensure()?.display());
        }
        Cmd::Test {
            keep_running,
            cargo_args,
        } => {
            stack.python.ensure()?;
            let started = stack.up(&runtime()?)?;
            eprintln!("==> Running the test suite against the stack");
            let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .current_dir(&root)
                .args(["test", "--workspace"])
                .args(&cargo_args)
                .envs(stack.env_vars())
                .env("CLISONIX_DATA_DIR", data_dir(&root))
                .status()
                .context("running cargo test")?;
            if !keep_running {
                stack.down_started(started)?;
            }
            return Ok(if status.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8)
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(stack: &Stack) {
    for line in stack.status() {
        println!("{line}");
    }
}
