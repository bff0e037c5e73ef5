//! `./dev`: the local development stack of Clisonix and the project's two set-up
//! commands, `./dev run` (the main job) and `./dev test` (the whole test suite).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};

use clisonix_dev::stack::{Stack, Started};
use clisonix_dev::{procs, run};

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
    /// The main job: bring the stack up, run Albi, stream a recording through eeg.frames,
    /// read it back and read its features
    Run {
        /// The EDF/BDF recording (default: the shared example recording)
        #[arg(long)]
        file: Option<PathBuf>,
        /// Frame length in milliseconds
        #[arg(long, default_value_t = 125)]
        frame_ms: u32,
        /// Pace the frames at the recording's own speed instead of as fast as possible
        #[arg(long)]
        realtime: bool,
        /// Leave the stack running afterwards
        #[arg(long)]
        keep_running: bool,
    },
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
            realtime,
            keep_running,
        } => {
            let file =
                file.unwrap_or_else(|| data_dir(&root).join("eeglab_sample_32ch_128hz_238s.edf"));
            let rt = runtime()?;
            let started = stack.up(&rt)?;
            let options = run::PlayOptions { frame_ms, realtime };
            let settings = stack.kafka_settings("clisonix-dev-run");
            let outcome = rt.block_on(async {
                // Albi runs alongside, in its own consumer group, as it would in production.
                let albi_stop = tokio_util::sync::CancellationToken::new();
                let albi = tokio::spawn(clisonix_stage_runtime::run(
                    clisonix_albi::Albi::new(clisonix_albi::AlbiConfig::default()),
                    clisonix_stage_runtime::RuntimeConfig {
                        kafka: stack.kafka_settings("clisonix-albi"),
                        topics: stack.topics.clone(),
                        group: clisonix_albi::NAME.to_owned(),
                        instance_id: "dev-run".to_owned(),
                        batch_max: 500,
                        batch_linger: std::time::Duration::from_millis(50),
                    },
                    clisonix_stage_runtime::Health::default(),
                    albi_stop.clone(),
                ));
                let job = async {
                    let summary = run::play(&settings, &stack.topics, &file, &options).await?;
                    // Albi's default windows: 2 s, non-overlapping.
                    let window = (2.0 * summary.sample_rate_hz).round() as u64;
                    let windows = summary.samples_per_channel / window;
                    let expected = windows as usize * summary.channels;
                    let started = std::time::Instant::now();
                    let features = run::features_of(
                        &settings,
                        &stack.topics,
                        summary.session,
                        expected,
                        std::time::Duration::from_secs(180),
                    )
                    .await?;
                    anyhow::Ok((summary, features, started.elapsed()))
                };
                let outcome = tokio::select! {
                    result = job => Some(result),
                    _ = tokio::signal::ctrl_c() => None,
                };
                albi_stop.cancel();
                match albi.await {
                    Ok(Ok(())) => outcome,
                    Ok(Err(e)) => Some(Err(anyhow::Error::from(e).context("Albi failed"))),
                    Err(e) => Some(Err(anyhow::anyhow!("the Albi task failed: {e}"))),
                }
            });
            drop(rt);
            let finish = |stack: &Stack, started: Started| -> anyhow::Result<()> {
                if keep_running || !started.any() {
                    eprintln!("==> The stack keeps running (./dev down stops it)");
                    print_status(stack);
                    Ok(())
                } else {
                    stack.down_started(started)
                }
            };
            match outcome {
                None => {
                    eprintln!("==> Interrupted; stopping");
                    finish(&stack, started)?;
                    return Ok(ExitCode::from(130));
                }
                Some(Err(error)) => {
                    finish(&stack, started)?;
                    return Err(error);
                }
                Some(Ok((s, features, features_took))) => {
                    finish(&stack, started)?;
                    println!(
                        "Done: session {} — {} frames ({} channels, {} Hz, {:.1} s of EEG, {:.2} MB) \
                         through eeg.frames partition {} (offsets {}..={}); produced and acknowledged \
                         in {:.2} s ({:.0} frames/s), read back and verified in {:.2} s.",
                        s.session,
                        s.frames,
                        s.channels,
                        s.sample_rate_hz,
                        s.seconds_of_eeg,
                        s.bytes as f64 / 1e6,
                        s.partition,
                        s.offsets.0,
                        s.offsets.1,
                        s.produce.as_secs_f64(),
                        s.frames as f64 / s.produce.as_secs_f64(),
                        s.verify.as_secs_f64()
                    );
                    print_features(&features, features_took);
                }
            }
        }
        Cmd::Test {
            keep_running,
            cargo_args,
        } => {
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

/// A few lines about the features Albi computed: enough to see it worked.
fn print_features(features: &[clisonix_schemas::Features], took: std::time::Duration) {
    let windows = features
        .iter()
        .map(|f| f.window_index)
        .max()
        .map_or(0, |w| w + 1);
    println!(
        "Albi: {} feature records ({windows} windows x {} channels) in eeg.features, all read back within {:.1} s of the last frame.",
        features.len(),
        features.len() / windows.max(1) as usize,
        took.as_secs_f64()
    );
    println!(
        "  {:<6} {:>6} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "channel", "window", "delta", "alpha", "beta", "peak Hz", "entropy"
    );
    for f in features
        .iter()
        .filter(|f| f.channel_label == "Cz" || f.channel_label == "Oz")
        .take(6)
    {
        let pct = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{:.1} %", 100.0 * v));
        println!(
            "  {:<6} {:>6} {:>10} {:>10} {:>10} {:>9} {:>9}",
            f.channel_label,
            f.window_index,
            pct(f.rel.delta),
            pct(f.rel.alpha),
            pct(f.rel.beta),
            f.peak_alpha_hz
                .map_or("-".to_owned(), |v| format!("{v:.0}")),
            f.spectral_entropy
                .map_or("-".to_owned(), |v| format!("{v:.3}")),
        );
    }
}
