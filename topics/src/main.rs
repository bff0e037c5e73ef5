//! `clisonix-topics`: the data-engineering tool for Clisonix topics.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use clisonix_schemas::Family;
use clisonix_topics::admin::TopicDescription;
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

  # Every schema version with the fingerprint records carry (no broker needed)
  clisonix-topics schemas

  # One schema's text, or its Parsing Canonical Form
  clisonix-topics schemas eeg_frame
  clisonix-topics schemas clisonix.EegFrame --canonical

Exit status: 0 on success, 2 when an existing topic's settings differ from the
catalog (nothing is changed; the differences are printed), 1 on any other error.";

#[derive(Debug, Parser)]
#[command(name = "clisonix-topics", version, about = "Create, list and describe the Clisonix topics", after_help = EXAMPLES)]
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
    /// List every schema version with its fingerprint, or print one schema
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
    }
    Ok(ExitCode::SUCCESS)
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
