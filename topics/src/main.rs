//! `clisonix-topics`: the data-engineering tool for Clisonix topics.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use clisonix_schemas::Family;
use clisonix_topics::admin::TopicDescription;
use clisonix_topics::consume::{consume, parse_position, Position, Query};
use clisonix_topics::{Admin, KafkaSettings, Outcome, Replication, Topics, CATALOG};

const EXAMPLES: &str = "\
Examples:
  # Create every catalog topic on the local stack (safe to repeat)
  clisonix-topics create

  # Create them on a production cluster with three replicas
  clisonix-topics --bootstrap kafka-1:9092,kafka-2:9092 create --replication-factor 3

  # An isolated copy of the catalog for an experiment, behind a prefix
  clisonix-topics --prefix exp42. create

  # Which topics exist, with partitions and retained records
  clisonix-topics list

  # Partitions, leaders, watermarks and settings of one topic
  clisonix-topics describe eeg.frames

  # The last hour of features as NDJSON, decoded by their schemas
  clisonix-topics consume eeg.features --from -1h > features.ndjson

  # One session's frames, found through eeg.sessions; a table on a terminal
  clisonix-topics consume eeg.frames --session 3f0c…

  # A time range of one tenant's usage events, then keep following
  clisonix-topics consume usage.events --tenant 9b1e… --from 2026-12-07T08:00:00Z -f

  # Every consumer group's lag in records and seconds, with Burrow's statuses
  clisonix-topics lag

  # One stage's group, every 10 s, as JSON for a script
  clisonix-topics lag albi --watch --json

  # What moving a stopped stage back an hour would do, then doing it
  clisonix-topics reset-offsets albi --by-duration -1h
  clisonix-topics reset-offsets albi --by-duration -1h --execute

  # A plan saved for review, applied later
  clisonix-topics reset-offsets sink --to-datetime 2026-12-07T08:00:00Z --export plan.json
  clisonix-topics reset-offsets sink --from-file plan.json --execute

  # Live features against a replay's, within 1e-6 relative (exit 3 when they differ)
  clisonix-topics diff eeg.features replay.win4.eeg.features --relative 1e-6

  # A session as EDF+ with its features as CSV; a tenant's sessions of a day as BIDS
  clisonix-topics export --session 3f0c… --out out/ --features csv
  clisonix-topics export --tenant 9b1e… --from 2026-12-06T00:00:00Z --to 2026-12-07T00:00:00Z --bids --out dataset/

  # Every schema version with the fingerprint records carry (no broker needed)
  clisonix-topics schemas

  # One schema's text, or its Parsing Canonical Form
  clisonix-topics schemas eeg_frame
  clisonix-topics schemas clisonix.EegFrame --canonical

Exit status: 0 on success, 2 when an existing topic's settings differ from the
catalog (nothing is changed; the differences are printed), 1 on any other error.";

#[derive(Debug, Parser)]
#[command(name = "clisonix-topics", version, about = "The Clisonix topics: create and describe them, read them decoded, list their schemas", after_help = EXAMPLES)]
struct Cli {
    /// Kafka bootstrap servers
    #[arg(long, env = "CLISONIX_KAFKA_BOOTSTRAP", default_value = clisonix_topics::client::DEFAULT_BOOTSTRAP, global = true)]
    bootstrap: String,
    /// Prefix of every topic name (isolates environments sharing a cluster)
    #[arg(long, env = "CLISONIX_TOPIC_PREFIX", default_value = "", global = true)]
    prefix: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create every missing catalog topic; check the existing ones against the catalog
    Create {
        /// Copies of each partition (default: 3, or fewer on a smaller cluster)
        #[arg(long)]
        replication_factor: Option<i32>,
    },
    /// List the catalog's topics and whether they exist
    List,
    /// Show partitions (leader, replicas, watermarks) and settings of topics
    Describe {
        /// Topic names as deployed (default: every catalog topic)
        topics: Vec<String>,
    },
    /// Print a topic's records decoded by their schemas (NDJSON, or a table on a terminal)
    #[command(after_help = "Examples:
  clisonix-topics consume eeg.features --from -1h > features.ndjson
  clisonix-topics consume eeg.frames --session 3f0c6a4e-0d6c-4c59-9a53-2f8f1c9d7b11
  clisonix-topics consume usage.events --tenant 9b1e… --from 2026-12-07T08:00:00Z -f
  clisonix-topics consume eeg.frames --partition 2 --from 1200 --to 1300 --format table

Positions: earliest, latest, an offset, an RFC 3339 time, or a duration back (-90s, -15m, -1h, -2d).
The summary (delivered, filtered, skipped, undecodable) goes to stderr. Exit status 1 on an error.")]
    Consume {
        /// The topic (a catalog name such as eeg.frames gets --prefix; another name is used as given)
        topic: String,
        /// Where to start: earliest, latest, an offset, an RFC 3339 time, or a duration back (-1h)
        #[arg(long, allow_hyphen_values = true)]
        from: Option<String>,
        /// Where to stop (exclusive), the same ways; default: the end as it is now
        #[arg(long, allow_hyphen_values = true)]
        to: Option<String>,
        /// Keep reading new records (Ctrl-C stops)
        #[arg(short, long, conflicts_with = "to")]
        follow: bool,
        /// Only these partitions
        #[arg(long = "partition", short = 'p')]
        partitions: Vec<i32>,
        /// Only records of this tenant
        #[arg(long)]
        tenant: Option<uuid::Uuid>,
        /// Only this session's records; without --from, read from its start (found in eeg.sessions)
        #[arg(long)]
        session: Option<uuid::Uuid>,
        /// Stop after this many records
        #[arg(long)]
        limit: Option<u64>,
        /// ndjson or table (default: table on a terminal, else ndjson)
        #[arg(long, value_parser = ["ndjson", "table"])]
        format: Option<String>,
    },
    /// Lag of consumer groups per partition: records, seconds, and a status (OK, WARN,
    /// STALL, STOP, REWIND) from offsets sampled over a window
    #[command(after_help = "Examples:
  clisonix-topics lag
  clisonix-topics lag albi --window 30s
  clisonix-topics lag sink --watch --json

Statuses: OK, WARN (falling behind), STALL (members, no progress), STOP (no members, lag),
REWIND (offsets went back). Exit status 0 when every group is OK, 3 when one is not, 1 on an error.")]
    Lag {
        /// One group (default: every consumer group on the cluster)
        group: Option<String>,
        /// How long to watch offsets before judging (e.g. 10s, 1m)
        #[arg(long, default_value = "10s", value_parser = parse_seconds)]
        window: u64,
        /// Repeat, each window, until Ctrl-C
        #[arg(long)]
        watch: bool,
        /// One JSON object per group
        #[arg(long)]
        json: bool,
        /// Topics to evaluate besides the catalog's (as deployed)
        #[arg(long = "topic")]
        topics: Vec<String>,
    },
    /// Move a consumer group's committed offsets: prints the plan (per partition, from
    /// -> to); --execute applies it, refused while the group has live members
    #[command(group(clap::ArgGroup::new("target").required(true).multiple(false)))]
    #[command(after_help = "Examples:
  clisonix-topics reset-offsets albi --by-duration -1h
  clisonix-topics reset-offsets albi --by-duration -1h --execute
  clisonix-topics reset-offsets sink --to-datetime 2026-12-07T08:00:00Z --export plan.json
  clisonix-topics reset-offsets sink --from-file plan.json --execute
  clisonix-topics reset-offsets jona --shift-by -500 --topic eeg.frames

Without --execute nothing changes. A group with live members is refused: stop it first.")]
    ResetOffsets {
        group: String,
        /// To each partition's first retained record
        #[arg(long, group = "target")]
        to_earliest: bool,
        /// To each partition's end (skip everything there is)
        #[arg(long, group = "target")]
        to_latest: bool,
        /// To this offset (clamped to what each partition retains)
        #[arg(long, group = "target")]
        to_offset: Option<i64>,
        /// To the first record at or after this RFC 3339 time
        #[arg(long, group = "target")]
        to_datetime: Option<String>,
        /// To the first record at or after this long ago (-1h, -30m, -2d)
        #[arg(long, group = "target", allow_hyphen_values = true)]
        by_duration: Option<String>,
        /// By this many records from the committed offset (negative: back)
        #[arg(long, group = "target", allow_hyphen_values = true)]
        shift_by: Option<i64>,
        /// The plan in this file (from --export)
        #[arg(long, group = "target")]
        from_file: Option<std::path::PathBuf>,
        /// Only these topics, every partition (catalog names get --prefix); default:
        /// the catalog topics the group has committed on
        #[arg(long = "topic")]
        topics: Vec<String>,
        /// Write the plan to this file (JSON)
        #[arg(long)]
        export: Option<std::path::PathBuf>,
        /// Apply the plan (without it, nothing changes)
        #[arg(long)]
        execute: bool,
    },
    /// Compare two feature outputs keyed by session, channel and window: records only in
    /// one, and per feature how many differ beyond the tolerance (exit 3 when any)
    #[command(after_help = "Examples:
  clisonix-topics diff eeg.features replay.win4.eeg.features
  clisonix-topics diff replay.a.eeg.features replay.b.eeg.features --relative 1e-6 --json

Exit status 0 when the two agree within the tolerance, 3 when they differ, 1 on an error.")]
    Diff {
        /// The first output (a catalog name such as eeg.features gets --prefix)
        a: String,
        /// The second (e.g. replay.<run>.eeg.features)
        b: String,
        /// Numbers this close are the same
        #[arg(long, default_value_t = 0.0)]
        absolute: f64,
        /// Numbers within this fraction of the larger are the same
        #[arg(long, default_value_t = 1e-9)]
        relative: f64,
        /// Only these sessions
        #[arg(long = "session")]
        sessions: Vec<uuid::Uuid>,
        /// The report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Write sessions to files: EDF+ or BDF+ (markers as annotations), features as
    /// NDJSON or CSV, or a BIDS EEG dataset
    #[command(group(clap::ArgGroup::new("which").required(true).args(["sessions", "tenant"])))]
    #[command(after_help = "Examples:
  clisonix-topics export --session 3f0c… --out out/
  clisonix-topics export --session 3f0c… --session 9a1d… --format bdf --features parquet --out out/
  clisonix-topics export --tenant 9b1e… --from -1d --bids --out dataset/

Each session's largest read-back error per channel is printed (and in --json).")]
    Export {
        /// These sessions
        #[arg(long = "session")]
        sessions: Vec<uuid::Uuid>,
        /// Or a tenant's sessions that started in --from..--to
        #[arg(long)]
        tenant: Option<uuid::Uuid>,
        /// With --tenant: sessions started at or after (RFC 3339, or a duration back)
        #[arg(long, requires = "tenant", allow_hyphen_values = true)]
        from: Option<String>,
        /// With --tenant: sessions started before
        #[arg(long, requires = "tenant", allow_hyphen_values = true)]
        to: Option<String>,
        /// Where to write (created if missing)
        #[arg(long)]
        out: std::path::PathBuf,
        /// edf (EDF+, 16-bit) or bdf (BDF+, 24-bit)
        #[arg(long, default_value = "edf", value_parser = ["edf", "bdf"])]
        format: String,
        /// Refuse a channel whose samples would read back more than this far off (in
        /// the frames' unit, e.g. 0.01 uV): then use --format bdf
        #[arg(long)]
        max_error: Option<f64>,
        /// Also the sessions' features: ndjson, csv or parquet
        #[arg(long, value_parser = ["ndjson", "csv", "parquet"], conflicts_with = "bids")]
        features: Option<String>,
        /// As a BIDS EEG dataset rooted at --out
        #[arg(long)]
        bids: bool,
        /// One JSON object per session exported
        #[arg(long)]
        json: bool,
    },
    /// List every schema version with its fingerprint, or print one schema
    #[command(after_help = "Examples:
  clisonix-topics schemas
  clisonix-topics schemas eeg_frame
  clisonix-topics schemas clisonix.EegFrame --canonical --version 1
  clisonix-topics schemas --json")]
    Schemas {
        /// A schema (`eeg_frame`, or `clisonix.EegFrame`): print its text
        name: Option<String>,
        /// Which version of it (default: the one this build writes)
        #[arg(long, requires = "name")]
        version: Option<u32>,
        /// Print its Parsing Canonical Form instead (what the fingerprint is of)
        #[arg(long, requires = "name")]
        canonical: bool,
        /// The list as JSON, one schema version per line
        #[arg(long, conflicts_with = "name")]
        json: bool,
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
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Schemas {
        name,
        version,
        canonical,
        json,
    } = &cli.command
    {
        return schemas(name.as_deref(), *version, *canonical, *json);
    }
    let settings = KafkaSettings::new(&cli.bootstrap, "clisonix-topics");
    let topics = Topics::new(cli.prefix);
    let admin = Admin::connect(&settings).context("connecting to Kafka")?;
    match cli.command {
        Command::Create { replication_factor } => {
            let replication = replication_factor.map_or(Replication::Auto, Replication::Fixed);
            let reports = admin.ensure(&topics, replication)?;
            let mut conflicts = 0;
            for report in &reports {
                match &report.outcome {
                    Outcome::Created { replication } => {
                        println!("created    {} (replication {replication})", report.topic)
                    }
                    Outcome::Unchanged => println!("ok         {}", report.topic),
                    Outcome::Conflict(differences) => {
                        conflicts += 1;
                        println!("CONFLICT   {}", report.topic);
                        for d in differences {
                            println!(
                                "             {}: catalog says {}, topic has {}",
                                d.setting, d.expected, d.actual
                            );
                        }
                    }
                }
            }
            if conflicts > 0 {
                eprintln!(
                    "{conflicts} topic(s) differ from the catalog; nothing was changed. \
                     Fix them with kafka-configs/kafka-topics, or use another --prefix."
                );
                return Ok(ExitCode::from(2));
            }
        }
        Command::List => {
            let described = admin.describe(&topics, &[])?;
            println!(
                "{:<32} {:>6} {:>10} {:>8} {:>12}  purpose",
                "topic", "exists", "partitions", "cleanup", "records"
            );
            for (d, spec) in described.iter().zip(CATALOG.iter()) {
                println!(
                    "{:<32} {:>6} {:>10} {:>8} {:>12}  {}",
                    d.topic,
                    if d.partitions.is_some() { "yes" } else { "no" },
                    d.partitions
                        .as_ref()
                        .map_or("-".into(), |p| p.len().to_string()),
                    spec.cleanup.as_str(),
                    d.partitions
                        .as_ref()
                        .map_or("-".into(), |_| d.retained_records().to_string()),
                    spec.purpose
                );
            }
        }
        Command::Describe { topics: only } => {
            for d in admin.describe(&topics, &only)? {
                print_description(&d);
            }
        }
        Command::Schemas { .. } => unreachable!("answered before connecting"),
        Command::Export {
            sessions,
            tenant,
            from,
            to,
            out,
            format,
            max_error,
            features,
            bids,
            json,
        } => {
            use clisonix_edf::writer::WriteFormat;
            use clisonix_topics::export::{
                export_bids, export_session, session_states, FeatureFormat, Options,
            };
            let format = if format == "bdf" {
                WriteFormat::BdfPlus
            } else {
                WriteFormat::EdfPlus
            };
            if let Some(m) = max_error {
                anyhow::ensure!(m > 0.0, "--max-error must be more than 0");
            }
            let mut ids: Vec<String> = sessions.iter().map(|s| s.to_string()).collect();
            if let Some(t) = tenant {
                let now = chrono::Utc::now();
                let time = |s: &Option<String>| -> anyhow::Result<Option<i64>> {
                    match s.as_deref().map(|s| parse_position(s, now)) {
                        None => Ok(None),
                        Some(Ok(Position::Time(t))) => Ok(Some(t.timestamp_micros())),
                        Some(Ok(_)) => anyhow::bail!("--from and --to are times or durations back"),
                        Some(Err(e)) => anyhow::bail!("{e}"),
                    }
                };
                let (lo, hi) = (time(&from)?, time(&to)?);
                let t = t.to_string();
                for state in session_states(&settings, &topics)? {
                    let started = state["started_at_us"]
                        .as_str()
                        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                        .map(|d| d.timestamp_micros());
                    let (Some(started), Some(id)) = (started, state["session_id"].as_str()) else {
                        continue;
                    };
                    if state["tenant_id"] == t.as_str()
                        && lo.is_none_or(|lo| started >= lo)
                        && hi.is_none_or(|hi| started < hi)
                    {
                        ids.push(id.to_owned());
                    }
                }
                anyhow::ensure!(
                    !ids.is_empty(),
                    "tenant {t} has no sessions in eeg.sessions in that range"
                );
            }
            let exported = if bids {
                export_bids(&settings, &topics, &ids, &out, format, max_error)?
            } else {
                let features = features.as_deref().map(|f| match f {
                    "csv" => FeatureFormat::Csv,
                    "parquet" => FeatureFormat::Parquet,
                    _ => FeatureFormat::Ndjson,
                });
                let options = Options {
                    format,
                    max_error,
                    features,
                };
                let mut all = Vec::new();
                for id in &ids {
                    let e = export_session(&settings, &topics, id, &out, id, &options)?;
                    all.push(e);
                }
                all
            };
            for e in &exported {
                if json {
                    println!("{}", serde_json::to_string(e)?);
                } else {
                    let worst = e.max_error.iter().copied().fold(0.0, f64::max);
                    println!(
                        "{}  {} channels, {} Hz, {:.1} s, {} frames{}  -> {} ({} bytes; samples within {:.3e} {}){}",
                        e.session,
                        e.channels.len(),
                        e.sample_rate_hz,
                        e.seconds,
                        e.frames,
                        if e.missing_frames > 0 { format!(" ({} missing, zero-filled)", e.missing_frames) } else { String::new() },
                        e.file.display(),
                        e.bytes,
                        worst,
                        e.unit,
                        e.features_file
                            .as_ref()
                            .map(|f| format!("; {} feature records -> {}", e.features, f.display()))
                            .unwrap_or_default()
                    );
                }
            }
        }
        Command::Diff {
            a,
            b,
            absolute,
            relative,
            sessions,
            json,
        } => {
            anyhow::ensure!(
                absolute >= 0.0 && relative >= 0.0,
                "--absolute and --relative are 0 or more"
            );
            let name = |t: String| match clisonix_topics::catalog::TopicSpec::find(&t) {
                Some(spec) => topics.name(spec),
                None => t,
            };
            let (a, b) = (name(a), name(b));
            let sessions: Vec<String> = sessions.iter().map(|s| s.to_string()).collect();
            let read = |topic: &str| -> anyhow::Result<std::collections::BTreeMap<_, _>> {
                let mut out = std::collections::BTreeMap::new();
                let mut other = 0u64;
                let query = Query::whole(topic);
                consume(
                    &settings,
                    &query,
                    |r| {
                        match clisonix_topics::diff::key(&r.value) {
                            Some(k) if sessions.is_empty() || sessions.contains(&k.0) => {
                                out.insert(k, r.value.clone());
                            }
                            Some(_) => {}
                            None => other += 1,
                        }
                        true
                    },
                    || false,
                )?;
                anyhow::ensure!(
                    other == 0 || !out.is_empty(),
                    "{topic} holds no feature records ({other} others): diff compares eeg.features outputs"
                );
                Ok(out)
            };
            let (ra, rb) = (read(&a)?, read(&b)?);
            let tol = clisonix_topics::diff::Tolerance { absolute, relative };
            let report = clisonix_topics::diff::diff(&ra, &rb, tol);
            if json {
                println!(
                    "{}",
                    serde_json::json!({"a": a, "b": b, "tolerance": tol, "differs": report.differs(), "report": report})
                );
            } else {
                println!("A  {a}: {} records", report.records_a);
                println!("B  {b}: {} records", report.records_b);
                println!(
                    "only in A {}, only in B {}, in both {}, of which {} differ beyond the tolerance (absolute {absolute}, relative {relative})",
                    report.only_in_a, report.only_in_b, report.in_both, report.changed
                );
                println!(
                    "  {:<24} {:>9} {:>14} {:>14}",
                    "field", "changed", "max abs diff", "max rel diff"
                );
                for (f, d) in &report.fields {
                    if d.changed > 0 || d.max_abs > 0.0 {
                        println!(
                            "  {:<24} {:>9} {:>14.3e} {:>14.3e}",
                            f, d.changed, d.max_abs, d.max_rel
                        );
                    }
                }
                for (what, keys) in [
                    ("only in A", &report.examples_only_in_a),
                    ("only in B", &report.examples_only_in_b),
                    ("changed", &report.examples_changed),
                ] {
                    for (s, c, w) in keys {
                        println!("  e.g. {what}: session {s} channel {c} window {w}");
                    }
                }
                println!(
                    "{}",
                    if report.differs() {
                        "DIFFERENT"
                    } else {
                        "SAME within the tolerance"
                    }
                );
            }
            return Ok(if report.differs() {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            });
        }
        Command::ResetOffsets {
            group,
            to_earliest,
            to_latest,
            to_offset,
            to_datetime,
            by_duration,
            shift_by,
            from_file,
            topics: only,
            export,
            execute,
        } => {
            use clisonix_topics::offsets::{apply, plan, Plan, Target};
            let plan = if let Some(path) = from_file {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let plan: Plan = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a plan from --export", path.display()))?;
                plan
            } else {
                let now = chrono::Utc::now();
                let time = |s: &str| match parse_position(s, now) {
                    Ok(Position::Time(t)) => Ok(t),
                    Ok(_) => Err(anyhow::anyhow!("{s:?} is not a time")),
                    Err(e) => Err(anyhow::anyhow!("{e}")),
                };
                let target = if to_earliest {
                    Target::Earliest
                } else if to_latest {
                    Target::Latest
                } else if let Some(o) = to_offset {
                    anyhow::ensure!(o >= 0, "--to-offset must be 0 or more");
                    Target::Offset(o)
                } else if let Some(t) = to_datetime {
                    anyhow::ensure!(!t.starts_with('-'), "--to-datetime takes an RFC 3339 time; for a duration back use --by-duration");
                    Target::Time(time(&t)?)
                } else if let Some(d) = by_duration {
                    anyhow::ensure!(
                        d.starts_with('-'),
                        "--by-duration takes a duration back, such as -1h"
                    );
                    Target::Time(time(&d)?)
                } else if let Some(n) = shift_by {
                    Target::Shift(n)
                } else {
                    unreachable!("clap requires a target")
                };
                let (names, all) = if only.is_empty() {
                    (
                        CATALOG.iter().map(|s| topics.name(s)).collect::<Vec<_>>(),
                        false,
                    )
                } else {
                    let names = only
                        .into_iter()
                        .map(|t| match clisonix_topics::catalog::TopicSpec::find(&t) {
                            Some(spec) => topics.name(spec),
                            None => t,
                        })
                        .collect();
                    (names, true)
                };
                plan(&settings, &group, &names, all, target)?
            };
            println!(
                "group {}: {}",
                plan.group,
                if execute {
                    "moving"
                } else {
                    "plan (nothing changes without --execute)"
                }
            );
            println!(
                "  {:<32} {:>9} {:>12} {:>12} {:>10}",
                "topic", "partition", "from", "to", "change"
            );
            for m in &plan.moves {
                println!(
                    "  {:<32} {:>9} {:>12} {:>12} {:>+10}",
                    m.topic,
                    m.partition,
                    m.from.map_or("-".into(), |f| f.to_string()),
                    m.to,
                    m.to - m.from.unwrap_or(m.to)
                );
            }
            if let Some(path) = export {
                std::fs::write(&path, serde_json::to_string_pretty(&plan)? + "\n")
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("plan written to {}", path.display());
            }
            if execute {
                apply(&settings, &group, &plan)?;
                println!("done: {} partition(s) moved", plan.moves.len());
            }
        }
        Command::Lag {
            group,
            window,
            watch,
            json,
            topics: extra,
        } => {
            let mut names: Vec<String> = CATALOG.iter().map(|s| topics.name(s)).collect();
            names.extend(extra);
            return lag(&settings, group, &names, window, watch, json);
        }
        Command::Consume {
            topic,
            from,
            to,
            follow,
            partitions,
            tenant,
            session,
            limit,
            format,
        } => {
            let deployed = match clisonix_topics::catalog::TopicSpec::find(&topic) {
                Some(spec) => topics.name(spec),
                None => topic,
            };
            let now = chrono::Utc::now();
            let position = |s: &str| parse_position(s, now).map_err(|e| anyhow::anyhow!("{e}"));
            let from = match (from, session) {
                (Some(f), _) => position(&f)?,
                (None, Some(s)) => session_start(&settings, &topics, s)?,
                (None, None) => Position::Earliest,
            };
            let to = to.as_deref().map(position).transpose()?;
            let query = Query {
                topic: deployed,
                partitions,
                from,
                to,
                follow,
                tenant: tenant.map(|t| t.to_string()),
                session: session.map(|s| s.to_string()),
                limit,
            };
            let table = match format.as_deref() {
                Some("table") => true,
                Some(_) => false,
                None => std::io::stdout().is_terminal(),
            };
            return consume_to_stdout(&settings, &query, table);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_seconds(s: &str) -> Result<u64, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: a duration is <number><s|m>, e.g. 10s"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        _ => return Err(format!("{s:?}: the unit is s or m")),
    };
    if !(2..=3600).contains(&secs) {
        return Err(format!("{s:?}: the window is 2 s to 60 m"));
    }
    Ok(secs)
}

fn lag(
    settings: &KafkaSettings,
    group: Option<String>,
    topics: &[String],
    window: u64,
    watch: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use clisonix_topics::lag::{groups, observe, LagError, Status};
    let window = std::time::Duration::from_secs(window);
    let every = std::time::Duration::from_secs(1);
    loop {
        let names: Vec<String> = match &group {
            Some(g) => vec![g.clone()],
            None => groups(settings)?.into_iter().map(|(g, _)| g).collect(),
        };
        if names.is_empty() {
            eprintln!("no consumer groups on the cluster");
        }
        // Groups are observed side by side over the same window.
        let observed: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = names
                .iter()
                .map(|g| s.spawn(move || (g.clone(), observe(settings, g, topics, window, every))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("an observer"))
                .collect()
        });
        let mut worst = Status::Ok;
        for (g, result) in observed {
            let lag = match result {
                Ok(l) => l,
                Err(LagError::NoOffsets(_)) if group.is_none() => continue,
                Err(e) => return Err(e.into()),
            };
            worst = worst.max(lag.status);
            if json {
                println!("{}", serde_json::to_string(&lag)?);
                continue;
            }
            println!(
                "{g}  {}  state {}, {} member(s){}  lag {} records, {:.1} s",
                lag.status.as_str(),
                lag.state,
                lag.members.len(),
                if lag.members.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({})",
                        lag.members
                            .iter()
                            .map(|m| format!("{}@{}", m.client_id, m.host))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
                lag.lag,
                lag.max_lag_seconds
            );
            println!(
                "  {:<32} {:>9} {:>12} {:>12} {:>10} {:>10}  status",
                "topic", "partition", "committed", "end", "lag", "seconds"
            );
            for p in &lag.partitions {
                println!(
                    "  {:<32} {:>9} {:>12} {:>12} {:>10} {:>10.1}  {}",
                    p.topic,
                    p.partition,
                    p.committed.map_or("-".into(), |c| c.to_string()),
                    p.end,
                    p.lag,
                    p.lag_seconds,
                    p.status.as_str()
                );
            }
            println!();
        }
        if !watch {
            // Scripts can tell a healthy set of groups from one that needs a look.
            return Ok(if worst == Status::Ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            });
        }
        let _ = std::io::stdout().flush();
    }
}

/// Where a session's records begin: a minute before it started (its state in
/// eeg.sessions), so every record of it is in the range.
fn session_start(
    settings: &KafkaSettings,
    topics: &Topics,
    session: uuid::Uuid,
) -> anyhow::Result<Position> {
    let query = Query {
        session: Some(session.to_string()),
        ..Query::whole(topics.name(&clisonix_topics::catalog::EEG_SESSIONS))
    };
    let mut started: Option<String> = None;
    consume(
        settings,
        &query,
        |r| {
            if let Some(s) = r.value.get("started_at_us").and_then(|v| v.as_str()) {
                started = Some(s.to_owned());
            }
            true
        },
        || false,
    )?;
    let Some(started) = started else {
        anyhow::bail!(
            "session {session} is not in {} (never streamed, or older than the topic keeps); \
             give --from to read anyway",
            query.topic
        );
    };
    let t = chrono::DateTime::parse_from_rfc3339(&started)?.with_timezone(&chrono::Utc);
    Ok(Position::Time(t - chrono::Duration::minutes(1)))
}

fn consume_to_stdout(
    settings: &KafkaSettings,
    query: &Query,
    table: bool,
) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if table {
        let _ = writeln!(
            out,
            "{:>4} {:>10}  {:<24} {:<16} {:<44} value",
            "part", "offset", "timestamp", "schema", "key"
        );
    }
    let mut broken = false;
    let (stats, ranges) = consume(
        settings,
        query,
        |r| {
            let written = if table {
                let key = summary(&r.key, 44);
                let value = summary(&r.value, 120);
                writeln!(
                    out,
                    "{:>4} {:>10}  {:<24} {:<16} {:<44} {}",
                    r.partition,
                    r.offset,
                    r.timestamp
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                        .unwrap_or_default(),
                    r.schema,
                    key,
                    value
                )
            } else {
                writeln!(out, "{}", r.to_json())
            };
            // Follow mode flushes every record; a closed pipe ends the read.
            let flushed = if query.follow { out.flush() } else { Ok(()) };
            broken = written.and(flushed).is_err();
            !broken
        },
        || false,
    )?;
    if !broken {
        out.flush()?;
    }
    drop(out);
    let spans: Vec<String> = ranges
        .iter()
        .map(|r| match r.end {
            Some(e) => format!("{}:{}..{}", r.partition, r.start, e),
            None => format!("{}:{}..", r.partition, r.start),
        })
        .collect();
    eprintln!(
        "{} record(s) from {} [{}]; {} filtered out, {} offsets skipped (transaction markers, aborted records), {} undecodable",
        stats.delivered,
        query.topic,
        spans.join(" "),
        stats.filtered,
        stats.skipped,
        stats.undecodable
    );
    Ok(ExitCode::SUCCESS)
}

/// `v` as compact JSON, cut to `width` characters.
fn summary(v: &serde_json::Value, width: usize) -> String {
    let s = v.to_string();
    if s.chars().count() <= width {
        s
    } else {
        let mut cut: String = s.chars().take(width - 1).collect();
        cut.push('…');
        cut
    }
}

/// A fingerprint as the single-object header carries it: 8 bytes, little-endian, in hex.
fn wire(fingerprint: u64) -> String {
    fingerprint
        .to_le_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The catalog topics whose keys or values are `family`.
fn used_by(family: Family) -> Vec<String> {
    CATALOG
        .iter()
        .filter_map(|t| {
            if t.key == family {
                Some(format!("{} (key)", t.name))
            } else if t.value == family {
                Some(t.name.to_owned())
            } else {
                None
            }
        })
        .collect()
}

fn schemas(
    name: Option<&str>,
    version: Option<u32>,
    canonical: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if let Some(name) = name {
        let Some(family) = Family::ALL
            .into_iter()
            .find(|f| f.dir() == name || f.full_name() == name)
        else {
            anyhow::bail!(
                "no schema {name:?}; the schemas are {}",
                Family::ALL.map(|f| f.dir()).join(", ")
            );
        };
        let v = match version {
            None => family.current(),
            Some(n) => family.versions().find(|v| v.version == n).ok_or_else(|| {
                anyhow::anyhow!("{name} has versions 1 to {}", family.current().version)
            })?,
        };
        if canonical {
            println!(
                "{}",
                clisonix_schemas::canonical::parsing_canonical_form(v.source)?
            );
        } else {
            print!("{}", v.source);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !json {
        println!(
            "{:<20} {:>7} {:<24} {:<16} {:<16}  topics",
            "schema", "version", "full name", "fingerprint", "also read"
        );
    }
    for family in Family::ALL {
        let current = family.current().version;
        for v in family.versions() {
            let also = (v.legacy_fingerprint != v.fingerprint).then(|| wire(v.legacy_fingerprint));
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "schema": family.dir(),
                        "version": v.version,
                        "full_name": family.full_name(),
                        "fingerprint": wire(v.fingerprint),
                        "legacy_fingerprint": also,
                        "written": v.version == current,
                        "canonical_form": clisonix_schemas::canonical::parsing_canonical_form(v.source)?,
                        "topics": used_by(family),
                    })
                );
            } else {
                println!(
                    "{:<20} {:>7} {:<24} {:<16} {:<16}  {}",
                    family.dir(),
                    if v.version == current {
                        format!("{} (w)", v.version)
                    } else {
                        v.version.to_string()
                    },
                    family.full_name(),
                    wire(v.fingerprint),
                    also.as_deref().unwrap_or("-"),
                    used_by(family).join(", ")
                );
            }
        }
    }
    if !json {
        println!(
            "\n(w): the version this build writes. Fingerprints are CRC-64-AVRO of the Parsing \
             Canonical Form, as records' single-object headers carry them (8 bytes, \
             little-endian); \"also read\": the one builds before 2026-12-07 wrote."
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_description(d: &TopicDescription) {
    println!("{}", d.topic);
    if let Some(spec) = d.spec {
        println!("  key      {}", spec.key);
        println!("  value    {}", spec.value);
        println!("  purpose  {}", spec.purpose);
    }
    let Some(partitions) = &d.partitions else {
        println!("  (does not exist)\n");
        return;
    };
    for (k, v) in &d.configs {
        println!("  config   {k}={v}");
    }
    println!(
        "  {:>9} {:>7} {:>10} {:>10} {:>12} {:>12} {:>10}",
        "partition", "leader", "replicas", "in-sync", "low", "high", "records"
    );
    for p in partitions {
        let ids = |v: &[i32]| {
            v.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        println!(
            "  {:>9} {:>7} {:>10} {:>10} {:>12} {:>12} {:>10}",
            p.id,
            p.leader,
            ids(&p.replicas),
            ids(&p.in_sync),
            p.low,
            p.high,
            p.high - p.low
        );
    }
    println!();
}
