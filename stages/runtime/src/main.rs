//! `clisonix-stage`: runs one stream stage.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use clisonix_albi::{Albi, AlbiConfig};
use clisonix_jona::{Jona, JonaConfig, Preset};
use clisonix_metering::MeteringStore;
use clisonix_sessions::{Sessions, SessionsConfig};
use clisonix_stage::Stage;
use clisonix_stage_runtime::{
    router, run, run_tables, Health, Metering, RuntimeConfig, RuntimeError, Sink, TablesConfig,
};
use clisonix_topics::{KafkaSettings, Topics};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

const EXAMPLES: &str = "\
Examples:
  # Albi on the local stack, metrics on :9464
  clisonix-stage albi

  # A second instance in the same group (each instance needs its own id)
  clisonix-stage --instance-id albi-1 --http-addr 127.0.0.1:9465 albi

  # Overlapping 4 s windows every second
  clisonix-stage albi --window-seconds 4 --hop-seconds 1

  # Jona rendering both presets for sessions that do not pick theirs
  clisonix-stage --http-addr 127.0.0.1:9466 jona --presets audification,parameter_mapping

  # The sessions stage
  clisonix-stage --http-addr 127.0.0.1:9467 sessions

  # The results sink into Postgres
  DATABASE_URL=postgres://... clisonix-stage --http-addr 127.0.0.1:9468 sink

  # Metering: usage per tenant, meter and hour into Postgres
  DATABASE_URL=postgres://... clisonix-stage --http-addr 127.0.0.1:9469 metering

  # Replay: Albi with 4 s windows over the last two hours of frames, into
  # replay.win4.eeg.features, under its own group (live topics and groups untouched)
  clisonix-stage --replay win4 --from -2h albi --window-seconds 4

  # The same build over two sessions, everything retained of them; run again to resume
  clisonix-stage --replay check --sessions 3f0c...,9a1d... albi

  # Then compare: clisonix-topics diff eeg.features replay.win4.eeg.features

  # Metering recounted over everything retained, into the Postgres schema replay_audit
  # (live usage untouched); prints per meter the run's usage against live's
  DATABASE_URL=postgres://... clisonix-stage --replay audit metering";

#[derive(Debug, Parser)]
#[command(name = "clisonix-stage", version, about = "Run a Clisonix stream stage", after_help = EXAMPLES)]
struct Cli {
    /// Kafka bootstrap servers
    #[arg(long, env = "CLISONIX_KAFKA_BOOTSTRAP", default_value = clisonix_topics::client::DEFAULT_BOOTSTRAP, global = true)]
    bootstrap: String,
    /// Prefix of every topic name
    #[arg(long, env = "CLISONIX_TOPIC_PREFIX", default_value = "", global = true)]
    topic_prefix: String,
    /// Consumer group (default: the stage's name)
    #[arg(long, env = "CLISONIX_STAGE_GROUP", global = true)]
    group: Option<String>,
    /// This instance's stable id (e.g. the pod name); a restart with the same id fences
    /// the previous incarnation's open transaction (default: the host name)
    #[arg(long, env = "CLISONIX_INSTANCE_ID", global = true)]
    instance_id: Option<String>,
    /// Where /metrics, /health and /ready listen
    #[arg(
        long,
        env = "CLISONIX_STAGE_HTTP_ADDR",
        default_value = "127.0.0.1:9464",
        global = true
    )]
    http_addr: SocketAddr,
    /// Largest batch (one transaction)
    #[arg(long, env = "CLISONIX_BATCH_MAX", default_value_t = 500, global = true)]
    batch_max: usize,
    /// How long a batch waits for more records, in milliseconds
    #[arg(
        long,
        env = "CLISONIX_BATCH_LINGER_MS",
        default_value_t = 50,
        global = true
    )]
    batch_linger_ms: u64,
    /// Replay instead of running live: this run's name (letters, digits, - and _).
    /// Reads the live input over --from..--to, writes replay.<RUN>.<topic> under the
    /// group replay.<RUN>.<stage> (metering: into the Postgres schema replay_<RUN>),
    /// stops at the end; the same name resumes the run
    #[arg(long, global = true)]
    replay: Option<String>,
    /// Replay from: earliest, an offset, an RFC 3339 time, or a duration back (-2h)
    #[arg(
        long,
        global = true,
        allow_hyphen_values = true,
        requires = "replay",
        default_value = "earliest"
    )]
    from: String,
    /// Replay to (exclusive), the same ways (default: the input's end at the run's start)
    #[arg(long, global = true, allow_hyphen_values = true, requires = "replay")]
    to: Option<String>,
    /// Replay only these sessions (comma-separated ids)
    #[arg(long, global = true, value_delimiter = ',', requires = "replay")]
    sessions: Vec<uuid::Uuid>,
    #[command(subcommand)]
    stage: StageCmd,
}

#[derive(Debug, Subcommand)]
enum StageCmd {
    /// Albi: eeg.frames -> eeg.features
    Albi {
        /// Window length in seconds
        #[arg(long, default_value_t = 2.0)]
        window_seconds: f64,
        /// Step between windows in seconds (default: the window length)
        #[arg(long)]
        hop_seconds: Option<f64>,
        /// Close a session after this many seconds without frames
        #[arg(long, default_value_t = 900)]
        idle_seconds: i64,
    },
    /// Jona: eeg.frames -> audio.chunks
    Jona {
        /// Presets of sessions that do not name theirs (comma-separated:
        /// audification, parameter_mapping)
        #[arg(long, value_delimiter = ',', default_value = "parameter_mapping", value_parser = parse_preset)]
        presets: Vec<Preset>,
        /// Audio frames per second
        #[arg(long, default_value_t = 44_100, value_parser = clap::value_parser!(u32).range(8_000..=192_000))]
        sample_rate: u32,
        /// EEG seconds per audio chunk
        #[arg(long, default_value_t = 1.0)]
        chunk_seconds: f64,
        /// Close a session after this many seconds without frames
        #[arg(long, default_value_t = 900)]
        idle_seconds: i64,
    },
    /// The results sink: eeg.sessions, eeg.features and audio.chunks -> Postgres
    Sink {
        /// Postgres to write to
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Apply the database migrations at start
        #[arg(long, env = "CLISONIX_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
        migrate: bool,
        /// Delete results past their tenant's plan's retention this often, in seconds
        /// (0: never)
        #[arg(long, env = "CLISONIX_RETENTION_SWEEP_SECONDS", default_value_t = 600)]
        retention_sweep_seconds: u64,
        /// Where audio chunks go, as FLAC: file:///a/folder (or a path) or
        /// s3://bucket[/prefix] (configured by the AWS_* variables); the gateway reads
        /// the same store
        #[arg(long, env = "CLISONIX_AUDIO_STORE")]
        audio_store: String,
        /// An audio object no row names is deleted by the sweep after this many
        /// seconds (a batch in flight is never disturbed; this only spares work)
        #[arg(
            long,
            env = "CLISONIX_AUDIO_ORPHAN_GRACE_SECONDS",
            default_value_t = 600
        )]
        audio_orphan_grace_seconds: u64,
    },
    /// Metering: usage.events, eeg.sessions and eeg.features -> usage per tenant,
    /// meter and hour in Postgres, exactly once
    Metering {
        /// Postgres to write to
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Apply the database migrations at start
        #[arg(long, env = "CLISONIX_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
        migrate: bool,
    },
    /// Sessions: eeg.frames -> eeg.sessions
    Sessions {
        /// A session without frames for this many seconds has ended
        #[arg(long, default_value_t = 900)]
        idle_seconds: i64,
        /// Write an active session's state at most this often, in seconds
        #[arg(long, default_value_t = 5.0)]
        update_seconds: f64,
    },
}

fn parse_preset(s: &str) -> Result<Preset, String> {
    Preset::parse(s).ok_or_else(|| {
        let known: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
        format!("unknown preset {s:?} (known: {})", known.join(", "))
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,librdkafka=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %format!("{e:#}"), "stage failed");
            ExitCode::FAILURE
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "local".into())
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let name = match &cli.stage {
        StageCmd::Albi { .. } => clisonix_albi::NAME,
        StageCmd::Jona { .. } => clisonix_jona::NAME,
        StageCmd::Sessions { .. } => clisonix_sessions::NAME,
        StageCmd::Sink { .. } => clisonix_stage_runtime::sink::NAME,
        StageCmd::Metering { .. } => clisonix_stage_runtime::metering::NAME,
    };
    let replay = match &cli.replay {
        None => None,
        Some(run) => {
            anyhow::ensure!(
                clisonix_stage_runtime::ReplaySpec::valid_run(run),
                "--replay {run:?}: a run's name is 1 to 64 letters, digits, - and _"
            );
            anyhow::ensure!(
                !matches!(cli.stage, StageCmd::Sink { .. }),
                "--replay runs albi, jona, sessions or metering (the sink only stores what \
                 the stages wrote: replay the stage, then read its replay topics)"
            );
            let now = chrono::Utc::now();
            let position = |s: &str| {
                clisonix_topics::consume::parse_position(s, now).map_err(|e| anyhow::anyhow!("{e}"))
            };
            Some(clisonix_stage_runtime::ReplaySpec {
                run: run.clone(),
                from: position(&cli.from)?,
                to: cli.to.as_deref().map(position).transpose()?,
                sessions: cli.sessions.iter().map(|s| s.to_string()).collect(),
            })
        }
    };
    let config = RuntimeConfig {
        kafka: KafkaSettings::new(&cli.bootstrap, format!("clisonix-{name}")),
        topics: Topics::new(cli.topic_prefix),
        group: cli.group.unwrap_or_else(|| name.to_owned()),
        instance_id: cli.instance_id.unwrap_or_else(|| {
            if replay.is_some() {
                "replay".into()
            } else {
                hostname()
            }
        }),
        batch_max: cli.batch_max.max(1),
        batch_linger: Duration::from_millis(cli.batch_linger_ms),
    };
    match cli.stage {
        StageCmd::Albi {
            window_seconds,
            hop_seconds,
            idle_seconds,
        } => {
            let albi = Albi::new(AlbiConfig {
                window_seconds,
                hop_seconds: hop_seconds.unwrap_or(window_seconds),
                idle_ms: idle_seconds * 1000,
            });
            match replay {
                Some(spec) => run_replay(albi, config, spec).await,
                None => serve_stage(albi, config, cli.http_addr).await,
            }
        }
        StageCmd::Jona {
            presets,
            sample_rate,
            chunk_seconds,
            idle_seconds,
        } => {
            anyhow::ensure!(
                chunk_seconds > 0.0 && chunk_seconds <= 60.0,
                "--chunk-seconds must be in (0, 60]"
            );
            let jona = Jona::new(JonaConfig {
                sample_rate_hz: sample_rate,
                chunk_seconds,
                presets,
                idle_ms: idle_seconds * 1000,
            });
            match replay {
                Some(spec) => run_replay(jona, config, spec).await,
                None => serve_stage(jona, config, cli.http_addr).await,
            }
        }
        StageCmd::Sessions {
            idle_seconds,
            update_seconds,
        } => {
            let sessions = Sessions::new(SessionsConfig {
                idle_ms: idle_seconds * 1000,
                update_ms: (update_seconds * 1000.0).round() as i64,
            });
            match replay {
                Some(spec) => run_replay(sessions, config, spec).await,
                None => serve_stage(sessions, config, cli.http_addr).await,
            }
        }
        StageCmd::Sink {
            database_url,
            migrate,
            retention_sweep_seconds,
            audio_store,
            audio_orphan_grace_seconds,
        } => {
            let pool = database(&database_url, migrate).await?;
            let audio = clisonix_audio::AudioStore::from_url(&audio_store)
                .context("opening the audio store (--audio-store, CLISONIX_AUDIO_STORE)")?;
            let topics = config.topics.clone();
            serve_with(cli.http_addr, |health, shutdown| {
                let mut sink = Sink::new(clisonix_sink::Results::new(pool, audio), &topics);
                if retention_sweep_seconds > 0 {
                    sink = sink.with_retention(
                        Duration::from_secs(retention_sweep_seconds),
                        Duration::from_secs(audio_orphan_grace_seconds),
                        health.metrics.clone(),
                    );
                }
                run_tables(sink, tables_config(config), health, shutdown)
            })
            .await
        }
        StageCmd::Metering {
            database_url,
            migrate,
        } => {
            if let Some(spec) = replay {
                return replay_metering(&database_url, migrate, config, spec).await;
            }
            let pool = database(&database_url, migrate).await?;
            let topics = config.topics.clone();
            serve_with(cli.http_addr, |health, shutdown| {
                let metering =
                    Metering::new(MeteringStore::new(pool), &topics, health.metrics.clone());
                run_tables(metering, tables_config(config), health, shutdown)
            })
            .await
        }
    }
}

fn tables_config(config: RuntimeConfig) -> TablesConfig {
    TablesConfig {
        kafka: config.kafka,
        topics: config.topics,
        group: config.group,
        batch_max: config.batch_max,
        batch_linger: config.batch_linger,
    }
}

/// Connects to Postgres and applies the migrations when asked to.
async fn database(url: &str, migrate: bool) -> anyhow::Result<sqlx::PgPool> {
    // While Postgres is away a write gives up after 2 s and is retried (every second
    // at most: `tables.rs`), so a batch goes in within about a second of its return.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect(url)
        .await
        .context("connecting to Postgres")?;
    if migrate {
        sqlx::migrate!("../../gateway/migrations")
            .run(&pool)
            .await
            .context("applying the migrations")?;
    }
    Ok(pool)
}

/// A replay's progress line on stderr: a bar, input offsets, rate and ETA; redrawn in place
/// on a terminal, a line every 5 s otherwise.
fn progress_line() -> impl FnMut(clisonix_stage_runtime::ReplayProgress) + Send {
    use std::io::{IsTerminal, Write};
    let started = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_print = std::time::Instant::now() - Duration::from_secs(10);
    let mut first_read: Option<u64> = None;
    let mut finished_shown = false;
    move |p| {
        let first = *first_read.get_or_insert(p.read);
        if p.finished && std::mem::replace(&mut finished_shown, true) {
            return;
        }
        if !p.finished && last_print.elapsed() < Duration::from_millis(if tty { 250 } else { 5000 })
        {
            return;
        }
        last_print = std::time::Instant::now();
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let rate = (p.read - first) as f64 / secs;
        let left = p.total.saturating_sub(p.read);
        let eta = if rate > 0.0 {
            format!("{:.0} s", left as f64 / rate)
        } else {
            "-".into()
        };
        let pct = if p.total == 0 {
            100.0
        } else {
            100.0 * p.read as f64 / p.total as f64
        };
        let filled = (pct / 5.0).round() as usize;
        let line = format!(
            "[{}{}] {pct:5.1}%  {}/{} offsets  {rate:.0} offsets/s  ETA {eta}",
            "#".repeat(filled.min(20)),
            ".".repeat(20 - filled.min(20)),
            p.read,
            p.total
        );
        let mut err = std::io::stderr();
        let _ = if tty {
            write!(err, "\r{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
}

/// Replays `stage` as `spec` says, with a progress line on stderr, until done (or
/// Ctrl-C / SIGTERM: the run resumes when started again with the same name).
async fn run_replay<S: Stage + 'static>(
    stage: S,
    config: RuntimeConfig,
    spec: clisonix_stage_runtime::ReplaySpec,
) -> anyhow::Result<()> {
    let name = stage.name();
    let out = spec.topics(&config.topics);
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    let started = std::time::Instant::now();
    let done = clisonix_stage_runtime::replay(
        stage,
        config,
        spec.clone(),
        Health::default(),
        progress_line(),
        shutdown,
    )
    .await?;
    end_progress_line();
    if done.finished {
        eprintln!(
            "replay {} of {name} done: {} input offsets read in {:.1} s; outputs in {}eeg.features, {}audio.chunks, {}eeg.sessions",
            spec.run,
            done.read,
            started.elapsed().as_secs_f64(),
            out.prefix(),
            out.prefix(),
            out.prefix()
        );
    } else {
        stopped(&spec, done);
    }
    Ok(())
}

fn end_progress_line() {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
}

fn stopped(spec: &clisonix_stage_runtime::ReplaySpec, at: clisonix_stage_runtime::ReplayProgress) {
    eprintln!(
        "replay {} stopped at {}/{} records; start it again with --replay {} to resume",
        spec.run, at.read, at.total, spec.run
    );
}

/// Replays metering as `spec` says into the Postgres schema `replay_<run>` (a copy of
/// the metering tables beside the live ones, which it never writes), then prints per
/// meter the run's usage against live's in the same hours.
async fn replay_metering(
    database_url: &str,
    migrate: bool,
    config: RuntimeConfig,
    spec: clisonix_stage_runtime::ReplaySpec,
) -> anyhow::Result<()> {
    use clisonix_metering::replay::{PlannedRange, ReplaySchema, RunPlan, MAX_RUN};
    use clisonix_topics::catalog::{EEG_FEATURES, EEG_SESSIONS, USAGE_EVENTS};
    use clisonix_topics::consume::{plan, Query};
    anyhow::ensure!(
        spec.run.len() <= MAX_RUN,
        "--replay {:?}: a metering run's name is at most {MAX_RUN} characters (it names \
         the Postgres schema replay_<run>)",
        spec.run
    );
    let pool = database(database_url, migrate).await?;
    let schema = ReplaySchema::prepare(&pool, &spec.run)
        .await
        .context("creating the run's tables")?;
    let out = spec.topics(&config.topics);
    let kafka = config.kafka.clone();
    tokio::task::block_in_place(|| {
        clisonix_topics::Admin::connect(&kafka)
            .and_then(|a| a.ensure(&out, clisonix_topics::Replication::Auto))
    })
    .context("creating the run's topics")?;
    let mut run_plan = schema.plan(&pool).await.context("reading the run's plan")?;
    if run_plan.ranges.is_empty() {
        let mut ranges = Vec::new();
        for input in [&USAGE_EVENTS, &EEG_SESSIONS, &EEG_FEATURES] {
            let topic = config.topics.name(input);
            let query = Query {
                from: spec.from,
                to: spec.to,
                ..Query::whole(&topic)
            };
            let planned = tokio::task::block_in_place(|| plan(&kafka, &query))
                .with_context(|| format!("planning {topic}"))?;
            ranges.extend(planned.into_iter().map(|r| PlannedRange {
                topic: topic.clone(),
                partition: r.partition,
                start: r.start,
                end: r.end.unwrap_or(r.start),
            }));
        }
        let mut sessions = spec.sessions.clone();
        sessions.sort();
        run_plan = schema
            .record_plan(&pool, &RunPlan { ranges, sessions })
            .await
            .context("recording the run's plan")?;
    } else {
        let mut asked = spec.sessions.clone();
        asked.sort();
        anyhow::ensure!(
            asked.is_empty() || asked == run_plan.sessions,
            "run {:?} was started with other sessions ({}); a run resumes as it started: \
             give another name for another selection",
            spec.run,
            if run_plan.sessions.is_empty() {
                "all".to_owned()
            } else {
                run_plan.sessions.join(",")
            }
        );
    }
    let next = schema
        .next_offsets(&pool)
        .await
        .context("reading the run's offsets")?;
    let ranges = run_plan
        .ranges
        .iter()
        .map(|r| clisonix_stage_runtime::tables::TableRange {
            topic: r.topic.clone(),
            partition: r.partition,
            planned: r.start,
            start: next
                .get(&(r.topic.clone(), r.partition))
                .map_or(r.start, |&n| n.max(r.start)),
            end: r.end,
        })
        .collect();
    // Connections that count into the run's copy of the tables.
    let replay_pool = schema
        .connect(database_url, 4)
        .await
        .context("connecting to Postgres")?;
    let sessions: std::collections::HashSet<uuid::Uuid> = run_plan
        .sessions
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let keep = move |input: &clisonix_metering::Input| {
        sessions.is_empty()
            || input
                .session_id()
                .is_some_and(|s| sessions.contains(&s.as_uuid()))
    };
    let health = Health::default();
    let metering = Metering::new(
        MeteringStore::new(replay_pool),
        &config.topics,
        health.metrics.clone(),
    );
    let tables = TablesConfig {
        group: format!("{}{}", out.prefix(), clisonix_stage_runtime::metering::NAME),
        topics: out,
        ..tables_config(config)
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    let started = std::time::Instant::now();
    let done = clisonix_stage_runtime::tables::replay_tables(
        metering,
        tables,
        ranges,
        keep,
        health,
        progress_line(),
        shutdown,
    )
    .await?;
    end_progress_line();
    if !done.finished {
        stopped(&spec, done);
        return Ok(());
    }
    eprintln!(
        "replay {} of metering done: {} input offsets read in {:.1} s; usage in the Postgres schema {}",
        spec.run,
        done.read,
        started.elapsed().as_secs_f64(),
        schema.name
    );
    let compared = schema
        .compare(&pool)
        .await
        .context("comparing with live usage")?;
    println!(
        "{:<18} {:>16} {:>16} {:>16}  hours differing",
        "meter", "replay", "live", "difference"
    );
    for c in &compared {
        println!(
            "{:<18} {:>16} {:>16} {:>16}  {} of {}",
            c.meter,
            c.replay,
            c.live,
            c.replay - c.live,
            c.hours_differing,
            c.hours
        );
    }
    if compared.is_empty() {
        println!("(the run counted no usage)");
    }
    Ok(())
}

/// Serves `/metrics`, `/health` and `/ready` and runs `stage` until SIGTERM or Ctrl-C.
async fn serve_stage<S: Stage + 'static>(
    stage: S,
    config: RuntimeConfig,
    http_addr: SocketAddr,
) -> anyhow::Result<()> {
    serve_with(http_addr, |health, shutdown| {
        run(stage, config, health, shutdown)
    })
    .await
}

/// Serves `/metrics`, `/health` and `/ready` while `work` runs, until SIGTERM or Ctrl-C.
async fn serve_with<F, Fut>(http_addr: SocketAddr, work: F) -> anyhow::Result<()>
where
    F: FnOnce(Health, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), RuntimeError>>,
{
    let shutdown = CancellationToken::new();
    let health = Health::default();
    let listener = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| format!("binding {http_addr}"))?;
    info!(addr = %listener.local_addr()?, "serving /metrics, /health, /ready");
    let server = {
        let shutdown = shutdown.clone();
        let app = router(health.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await
        })
    };
    tokio::spawn(signals(shutdown.clone()));
    let result = work(health, shutdown.clone()).await;
    // Whatever ended the work ends the server too.
    shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(10), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => error!(error = %e, "the HTTP server failed"),
        Ok(Err(e)) => error!(error = %e, "the HTTP server task failed"),
        Err(_) => error!("the HTTP server did not stop within 10 s"),
    }
    result.context("running the stage")
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
async fn signals(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: finishing the batch in hand, then stopping"),
        _ = tokio::signal::ctrl_c() => info!("Ctrl-C: finishing the batch in hand, then stopping"),
        _ = shutdown.cancelled() => {}
    }
    shutdown.cancel();
}
