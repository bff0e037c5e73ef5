//! Sessions out of the topics as files other EEG tools open: frames as EDF+ or BDF+
//! (markers as annotations), features as NDJSON or CSV, and a BIDS EEG dataset.
//!
//! A session is found through its state in `eeg.sessions`; its frames are read from
//! `eeg.frames` from a minute before it started. A session whose first frames are no
//! longer retained is refused with when it started and what the topic keeps.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clisonix_edf::writer::{self, Annotation, Recording, WriteFormat, Written};
use clisonix_schemas::{decode, Frame, SampleUnit, SessionKey};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::catalog::{EEG_FEATURES, EEG_FRAMES, EEG_SESSIONS};
use crate::client::KafkaSettings;
use crate::consume::{consume, plan, ConsumeError, Position, Query, Quiet};
use crate::Topics;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("session {0} is in neither eeg.sessions nor eeg.frames (never streamed, or older than the topics keep)")]
    Unknown(String),
    #[error("session {session} started {started}, but eeg.frames keeps {retention_days} days: {what}; nothing was written")]
    Expired {
        session: String,
        started: String,
        retention_days: i64,
        what: String,
    },
    #[error("channel {channel} of session {session} would be written with up to {error} {unit} of error in EDF's 16 bits, more than --max-error {max}; use --format bdf (24 bits)")]
    TooCoarse {
        session: String,
        channel: String,
        error: f64,
        unit: String,
        max: f64,
    },
    #[error(
        "session {0}: its frames change sample rate or channels mid-session; export it in parts"
    )]
    Inconsistent(String),
    #[error(transparent)]
    Consume(#[from] ConsumeError),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing the recording: {0}")]
    Edf(#[from] writer::WriteError),
    #[error("writing Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
}

/// How to write features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureFormat {
    Ndjson,
    Csv,
    Parquet,
}

/// What an export writes.
#[derive(Debug, Clone)]
pub struct Options {
    pub format: WriteFormat,
    /// Refuse a channel whose largest error would exceed this (physical units).
    pub max_error: Option<f64>,
    pub features: Option<FeatureFormat>,
}

/// One exported session.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exported {
    pub session: String,
    pub device: String,
    pub start_us: i64,
    pub frames: u64,
    pub missing_frames: u64,
    pub channels: Vec<String>,
    pub sample_rate_hz: f64,
    pub seconds: f64,
    pub file: PathBuf,
    pub bytes: u64,
    /// Per channel: the largest difference between a sample and what a reader gets.
    pub max_error: Vec<f64>,
    pub unit: String,
    pub annotations: usize,
    pub features_file: Option<PathBuf>,
    pub features: u64,
}

/// A session's latest state in eeg.sessions (decoded), if it is there.
pub fn session_state(
    settings: &KafkaSettings,
    topics: &Topics,
    session: &str,
) -> Result<Option<Value>, ExportError> {
    let q = Query {
        session: Some(session.to_owned()),
        ..Query::whole(topics.name(&EEG_SESSIONS))
    };
    let mut last = None;
    consume(
        settings,
        &q,
        |r| {
            last = Some(r.value.clone());
            true
        },
        || false,
    )?;
    Ok(last)
}

/// Every session state in eeg.sessions (the newest of each), for choosing by tenant
/// and time.
pub fn session_states(
    settings: &KafkaSettings,
    topics: &Topics,
) -> Result<Vec<Value>, ExportError> {
    let q = Query::whole(topics.name(&EEG_SESSIONS));
    let mut by: BTreeMap<String, Value> = BTreeMap::new();
    consume(
        settings,
        &q,
        |r| {
            if let Some(s) = r.value.get("session_id").and_then(Value::as_str) {
                by.insert(s.to_owned(), r.value.clone());
            }
            true
        },
        || false,
    )?;
    Ok(by.into_values().collect())
}

fn micros(v: &Value) -> Option<i64> {
    let s = v.as_str()?;
    Some(
        chrono::DateTime::parse_from_rfc3339(s)
            .ok()?
            .timestamp_micros(),
    )
}

/// The session's frames from `from`, in sequence order, each once.
fn frames(
    settings: &KafkaSettings,
    topics: &Topics,
    session: &str,
    from: Position,
) -> Result<Vec<Frame>, ExportError> {
    let topic = topics.name(&EEG_FRAMES);
    let q = Query {
        from,
        ..Query::whole(&topic)
    };
    let ranges = plan(settings, &q)?;
    let mut config = settings.consumer(&format!("clisonix-export-{}", std::process::id()));
    config.set("enable.partition.eof", "true");
    let c: BaseConsumer<Quiet> = config.create_with_context(Quiet)?;
    let mut tpl = TopicPartitionList::new();
    let mut open: BTreeMap<i32, i64> = BTreeMap::new();
    for r in &ranges {
        if let Some(end) = r.end.filter(|&e| e > r.start) {
            tpl.add_partition_offset(&topic, r.partition, Offset::Offset(r.start))?;
            open.insert(r.partition, end);
        }
    }
    let mut by_seq: BTreeMap<u64, Frame> = BTreeMap::new();
    if !open.is_empty() {
        c.assign(&tpl)?;
    }
    let mut idle = 0;
    while !open.is_empty() && idle < 150 {
        let Some(polled) = c.poll(Duration::from_millis(200)) else {
            idle += 1;
            continue;
        };
        idle = 0;
        match polled {
            Err(KafkaError::PartitionEOF(p)) => {
                open.remove(&p);
            }
            Err(e) => return Err(e.into()),
            Ok(m) => {
                let p = m.partition();
                if open.get(&p).is_some_and(|&end| m.offset() + 1 >= end) {
                    open.remove(&p);
                }
                let ours = m
                    .key()
                    .and_then(|k| decode::<SessionKey>(k).ok())
                    .is_some_and(|k| k.session_id.to_string() == session);
                if !ours {
                    continue;
                }
                if let Some(f) = m.payload().and_then(|v| decode::<Frame>(v).ok()) {
                    by_seq.entry(f.seq).or_insert(f);
                }
            }
        }
    }
    Ok(by_seq.into_values().collect())
}

fn unit_name(u: SampleUnit) -> &'static str {
    match u {
        SampleUnit::Microvolt => "uV",
        SampleUnit::Millivolt => "mV",
        SampleUnit::Volt => "V",
    }
}

/// The session's frames joined into channels, with its markers as annotations; missing
/// frames are zeros with a `clisonix.gap` annotation.
struct Joined {
    channels: Vec<Vec<f32>>,
    annotations: Vec<Annotation>,
    missing: u64,
}

fn join(session: &str, frames: &[Frame]) -> Result<Joined, ExportError> {
    let first = &frames[0];
    let n_ch = first.channel_labels.len();
    let fs = first.sample_rate_hz;
    let mut channels: Vec<Vec<f32>> = vec![Vec::new(); n_ch];
    let mut annotations = Vec::new();
    let mut missing = 0;
    let mut expected = first.seq;
    for f in frames {
        if f.channel_labels != first.channel_labels || f.sample_rate_hz != fs {
            return Err(ExportError::Inconsistent(session.to_owned()));
        }
        let n = f.samples_per_channel as usize;
        if f.seq > expected {
            // The frames between are missing: as long as this one, in zeros.
            let gap = (f.seq - expected) as usize;
            let at = channels[0].len() as f64 / fs;
            for c in &mut channels {
                c.extend(std::iter::repeat_n(0.0, gap * n));
            }
            missing += gap as u64;
            annotations.push(Annotation {
                onset_s: at,
                duration_s: Some((gap * n) as f64 / fs),
                text: format!("clisonix.gap {gap} frame(s) missing"),
            });
        }
        expected = f.seq + 1;
        let base = channels[0].len();
        for (c, ch) in channels.iter_mut().enumerate() {
            ch.extend_from_slice(&f.samples[c * n..(c + 1) * n]);
        }
        for m in &f.markers {
            if m.label.starts_with("clisonix.") {
                continue;
            }
            annotations.push(Annotation {
                onset_s: (base + m.sample_offset as usize) as f64 / fs,
                duration_s: m.duration_us.map(|d| d as f64 / 1e6),
                text: m.label.clone(),
            });
        }
    }
    Ok(Joined {
        channels,
        annotations,
        missing,
    })
}

fn write_file(
    path: &Path,
    f: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<(), ExportError> {
    let mut file = std::fs::File::create(path).map_err(|source| ExportError::Write {
        path: path.to_owned(),
        source,
    })?;
    f(&mut file).map_err(|source| ExportError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Exports one session into `dir` as `<stem>.edf|.bdf` (and its features).
pub fn export_session(
    settings: &KafkaSettings,
    topics: &Topics,
    session: &str,
    dir: &Path,
    stem: &str,
    options: &Options,
) -> Result<Exported, ExportError> {
    let state = session_state(settings, topics, session)?;
    let started = state.as_ref().and_then(|s| micros(&s["started_at_us"]));
    let from = match started {
        Some(us) => Position::Time(
            chrono::DateTime::from_timestamp_micros(us - 60_000_000).unwrap_or_default(),
        ),
        None => Position::Earliest,
    };
    let frames = frames(settings, topics, session, from)?;
    let retention_days = EEG_FRAMES.retention_ms.unwrap_or(0) / 86_400_000;
    let started_text = state
        .as_ref()
        .and_then(|s| s["started_at_us"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "at an unknown time".into());
    if frames.is_empty() {
        return Err(match state {
            Some(_) => ExportError::Expired {
                session: session.to_owned(),
                started: started_text,
                retention_days,
                what: "none of its frames are left".into(),
            },
            None => ExportError::Unknown(session.to_owned()),
        });
    }
    if frames[0].seq > 0 {
        return Err(ExportError::Expired {
            session: session.to_owned(),
            started: started_text,
            retention_days,
            what: format!(
                "its frames before number {} are gone (the oldest left is from {})",
                frames[0].seq,
                chrono::DateTime::from_timestamp_micros(frames[0].device_time.as_micros())
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default()
            ),
        });
    }
    let joined = join(session, &frames)?;
    let first = &frames[0];
    let unit = unit_name(first.unit).to_owned();
    let rec = Recording {
        format: options.format,
        patient: [
            first.device_id.to_string(),
            "X".into(),
            "X".into(),
            "X".into(),
        ],
        recording: [session.to_owned(), "X".into(), "Clisonix".into()],
        start_us: first.device_time.as_micros(),
        sample_rate_hz: first.sample_rate_hz,
        labels: first.channel_labels.clone(),
        unit: unit.clone(),
        channels: joined.channels,
        annotations: joined.annotations,
    };
    let ext = match options.format {
        WriteFormat::EdfPlus => "edf",
        WriteFormat::BdfPlus => "bdf",
    };
    std::fs::create_dir_all(dir).map_err(|source| ExportError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let file = dir.join(format!("{stem}.{ext}"));
    let mut written: Option<Written> = None;
    // Checked before writing, so a refused export leaves nothing behind; the error
    // depends on each channel's range only.
    if let Some(max) = options.max_error {
        for (c, ch) in rec.channels.iter().enumerate() {
            let error = writer::scaling(ch, options.format).max_error;
            if error > max {
                return Err(ExportError::TooCoarse {
                    session: session.to_owned(),
                    channel: rec.labels[c].clone(),
                    error,
                    unit,
                    max,
                });
            }
        }
    }
    write_file(&file, |f| {
        written = Some(writer::write(&rec, f).map_err(std::io::Error::other)?);
        Ok(())
    })?;
    let written = written.expect("written");
    let mut exported = Exported {
        session: session.to_owned(),
        device: first.device_id.to_string(),
        start_us: rec.start_us,
        frames: frames.len() as u64,
        missing_frames: joined.missing,
        channels: rec.labels.clone(),
        sample_rate_hz: rec.sample_rate_hz,
        seconds: rec.channels[0].len() as f64 / rec.sample_rate_hz,
        file,
        bytes: written.bytes,
        max_error: written.max_error,
        unit,
        annotations: rec.annotations.len(),
        features_file: None,
        features: 0,
    };
    if let Some(format) = options.features {
        let (path, n) = export_features(settings, topics, session, from, dir, stem, format)?;
        exported.features_file = Some(path);
        exported.features = n;
    }
    Ok(exported)
}

/// Scalar columns of a features CSV, in order (the PSD goes last, `;`-separated).
fn csv_value(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.clone()
            }
        }
        Value::Array(a) => a.iter().map(csv_value).collect::<Vec<_>>().join(";"),
        other => other.to_string(),
    }
}

fn export_features(
    settings: &KafkaSettings,
    topics: &Topics,
    session: &str,
    from: Position,
    dir: &Path,
    stem: &str,
    format: FeatureFormat,
) -> Result<(PathBuf, u64), ExportError> {
    let q = Query {
        from,
        session: Some(session.to_owned()),
        ..Query::whole(topics.name(&EEG_FEATURES))
    };
    // Newest record per window, in (channel, window) order.
    let mut rows: BTreeMap<(i64, i64), Value> = BTreeMap::new();
    consume(
        settings,
        &q,
        |r| {
            let k = (
                r.value["channel_index"].as_i64().unwrap_or(0),
                r.value["window_index"].as_i64().unwrap_or(0),
            );
            rows.insert(k, r.value.clone());
            true
        },
        || false,
    )?;
    let path = match format {
        FeatureFormat::Ndjson => dir.join(format!("{stem}.features.ndjson")),
        FeatureFormat::Csv => dir.join(format!("{stem}.features.csv")),
        FeatureFormat::Parquet => dir.join(format!("{stem}.features.parquet")),
    };
    if format == FeatureFormat::Parquet {
        let rows: Vec<&Value> = rows.values().collect();
        let file = std::fs::File::create(&path).map_err(|source| ExportError::Write {
            path: path.clone(),
            source,
        })?;
        write_parquet(&rows, file)?;
        return Ok((path, rows.len() as u64));
    }
    write_file(&path, |f| {
        let mut w = std::io::BufWriter::new(f);
        match format {
            FeatureFormat::Ndjson => {
                for v in rows.values() {
                    writeln!(w, "{v}")?;
                }
            }
            FeatureFormat::Parquet => unreachable!("written above"),
            FeatureFormat::Csv => {
                let columns: Vec<String> = rows
                    .values()
                    .next()
                    .and_then(Value::as_object)
                    .map(|o| o.keys().cloned().collect())
                    .unwrap_or_default();
                writeln!(w, "{}", columns.join(","))?;
                for v in rows.values() {
                    let line: Vec<String> = columns.iter().map(|c| csv_value(&v[c])).collect();
                    writeln!(w, "{}", line.join(","))?;
                }
            }
        }
        w.flush()
    })?;
    Ok((path, rows.len() as u64))
}

/// A BIDS label: letters and digits only.
fn label(s: &str) -> String {
    let l: String = s.chars().filter(char::is_ascii_alphanumeric).collect();
    if l.is_empty() {
        "device".into()
    } else {
        l
    }
}

/// Exports sessions as a BIDS EEG dataset rooted at `dir`: one subject per device, one
/// run per session in time order, task `clisonix`.
pub fn export_bids(
    settings: &KafkaSettings,
    topics: &Topics,
    sessions: &[String],
    dir: &Path,
    format: WriteFormat,
    max_error: Option<f64>,
) -> Result<Vec<Exported>, ExportError> {
    // Each session's device and start, to name it.
    let mut found = Vec::new();
    for s in sessions {
        let state = session_state(settings, topics, s)?;
        let device = state
            .as_ref()
            .and_then(|v| v["device_id"].as_str().map(str::to_owned));
        let start = state.as_ref().and_then(|v| micros(&v["started_at_us"]));
        found.push((s.clone(), device, start));
    }
    found.sort_by_key(|(s, _, start)| (start.unwrap_or(i64::MAX), s.clone()));
    let mut runs: BTreeMap<String, u32> = BTreeMap::new();
    let mut out = Vec::new();
    let options = Options {
        format,
        max_error,
        features: None,
    };
    for (session, device, _) in &found {
        let sub = label(device.as_deref().unwrap_or("device"));
        let run = runs.entry(sub.clone()).or_default();
        *run += 1;
        let eeg = dir.join(format!("sub-{sub}")).join("eeg");
        let stem = format!("sub-{sub}_task-clisonix_run-{run}_eeg");
        let e = export_session(settings, topics, session, &eeg, &stem, &options)?;
        let base = format!("sub-{sub}_task-clisonix_run-{run}");
        let sidecar = json!({
            "TaskName": "clisonix",
            "TaskDescription": "A Clisonix streaming session",
            "SamplingFrequency": e.sample_rate_hz,
            "EEGReference": "n/a",
            "PowerLineFrequency": "n/a",
            "SoftwareFilters": "n/a",
            "EEGChannelCount": e.channels.len(),
            "RecordingDuration": e.seconds,
            "RecordingType": "continuous",
            "DeviceSerialNumber": e.device,
        });
        write_file(&eeg.join(format!("{base}_eeg.json")), |f| {
            writeln!(
                f,
                "{}",
                serde_json::to_string_pretty(&sidecar).unwrap_or_default()
            )
        })?;
        let unit = if e.unit == "uV" {
            "µV".to_owned()
        } else {
            e.unit.clone()
        };
        write_file(&eeg.join(format!("{base}_channels.tsv")), |f| {
            writeln!(f, "name\ttype\tunits")?;
            for c in &e.channels {
                writeln!(f, "{c}\tEEG\t{unit}")?;
            }
            Ok(())
        })?;
        // The annotations again, as events.
        let events = events_of(&e.file)?;
        write_file(&eeg.join(format!("{base}_events.tsv")), |f| {
            writeln!(f, "onset\tduration\ttrial_type")?;
            for (onset, duration, text) in &events {
                let d = duration.map_or("n/a".to_owned(), |d| format!("{d}"));
                let t = text.replace(['\t', '\n'], " ");
                writeln!(f, "{onset}\t{d}\t{t}")?;
            }
            Ok(())
        })?;
        out.push(e);
    }
    let subjects: std::collections::BTreeSet<&String> = runs.keys().collect();
    write_file(&dir.join("participants.tsv"), |f| {
        writeln!(f, "participant_id")?;
        for s in &subjects {
            writeln!(f, "sub-{s}")?;
        }
        Ok(())
    })?;
    write_file(&dir.join("participants.json"), |f| {
        writeln!(
            f,
            "{}",
            json!({"participant_id": {"Description": "One subject per Clisonix device (its id, letters and digits only)"}})
        )
    })?;
    write_file(&dir.join("dataset_description.json"), |f| {
        writeln!(
            f,
            "{}",
            serde_json::to_string_pretty(&json!({
                "Name": "Clisonix sessions",
                "BIDSVersion": "1.9.0",
                "DatasetType": "raw",
                "Authors": ["Clisonix export"],
                "GeneratedBy": [{"Name": "clisonix-topics export", "Version": env!("CARGO_PKG_VERSION")}],
            }))
            .unwrap_or_default()
        )
    })?;
    write_file(&dir.join("README"), |f| {
        writeln!(
            f,
            "EEG sessions exported from Clisonix with `clisonix-topics export --bids`.\n\
             One subject per device, one run per session (in time order), task `clisonix`.\n\
             Samples are {} with the scaling in each file's header; events are the\n\
             sessions' markers.",
            match format {
                WriteFormat::EdfPlus => "EDF+ (16-bit)",
                WriteFormat::BdfPlus => "BDF+ (24-bit)",
            }
        )
    })?;
    Ok(out)
}

/// The annotations of a file just written, read back with the reader (what a BIDS
/// reader will see), without the end marker.
fn events_of(path: &Path) -> Result<Vec<(f64, Option<f64>, String)>, ExportError> {
    let file = std::fs::File::open(path).map_err(|source| ExportError::Write {
        path: path.to_owned(),
        source,
    })?;
    let io = |e: clisonix_edf::EdfError| ExportError::Write {
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    };
    let mut r = clisonix_edf::Reader::new(std::io::BufReader::new(file)).map_err(io)?;
    let mut out = Vec::new();
    let mut first_onset = None;
    while let Some(rec) = r.next_record().map_err(io)? {
        let start = *first_onset.get_or_insert(rec.onset_s);
        for a in rec.annotations {
            if a.text == "clisonix.end" {
                continue;
            }
            out.push((a.onset_s - start, a.duration_s, a.text));
        }
    }
    Ok(out)
}

/// A Parquet column of the features: a scalar field, or one element of an array field
/// (`psd_0`, `psd_1`, …).
#[derive(Debug, Clone)]
struct Column {
    name: String,
    field: String,
    index: Option<usize>,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Int,
    Float,
    Bool,
}

fn kind_of(v: &Value) -> Option<Kind> {
    match v {
        Value::String(_) => Some(Kind::Text),
        Value::Bool(_) => Some(Kind::Bool),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(Kind::Int),
        Value::Number(_) => Some(Kind::Float),
        _ => None,
    }
}

/// The columns of `rows`: every field, arrays spread over one column per element
/// (as long as the longest), each typed by its first non-null value (numbers that
/// are sometimes fractional are doubles).
fn columns(rows: &[&Value]) -> Vec<Column> {
    let mut fields: Vec<String> = Vec::new();
    let mut lengths: BTreeMap<String, usize> = BTreeMap::new();
    let mut kinds: BTreeMap<(String, Option<usize>), Kind> = BTreeMap::new();
    let mut note = |key: (String, Option<usize>), v: &Value| {
        if let Some(k) = kind_of(v) {
            let e = kinds.entry(key).or_insert(k);
            if *e == Kind::Int && k == Kind::Float {
                *e = Kind::Float;
            }
        }
    };
    for r in rows {
        let Some(o) = r.as_object() else { continue };
        for (f, v) in o {
            if !fields.contains(f) {
                fields.push(f.clone());
            }
            match v {
                Value::Array(items) => {
                    let l = lengths.entry(f.clone()).or_default();
                    *l = (*l).max(items.len());
                    for (i, item) in items.iter().enumerate() {
                        note((f.clone(), Some(i)), item);
                    }
                }
                v => note((f.clone(), None), v),
            }
        }
    }
    let mut out = Vec::new();
    for f in fields {
        match lengths.get(&f) {
            Some(&n) => {
                for i in 0..n {
                    out.push(Column {
                        name: format!("{f}_{i}"),
                        field: f.clone(),
                        index: Some(i),
                        kind: kinds
                            .get(&(f.clone(), Some(i)))
                            .copied()
                            .unwrap_or(Kind::Float),
                    });
                }
            }
            None => out.push(Column {
                name: f.clone(),
                field: f.clone(),
                index: None,
                kind: kinds
                    .get(&(f.clone(), None))
                    .copied()
                    .unwrap_or(Kind::Float),
            }),
        }
    }
    out
}

/// Writes the feature rows as one Parquet row group, every column optional.
fn write_parquet<W: Write + Send>(rows: &[&Value], out: W) -> Result<(), ExportError> {
    use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    let cols = columns(rows);
    let mut message = String::from("message features {\n");
    for c in &cols {
        let t = match c.kind {
            Kind::Text => "binary",
            Kind::Int => "int64",
            Kind::Float => "double",
            Kind::Bool => "boolean",
        };
        let annotation = if c.kind == Kind::Text { " (UTF8)" } else { "" };
        message.push_str(&format!("  optional {t} {}{annotation};\n", c.name));
    }
    message.push('}');
    let schema = std::sync::Arc::new(parse_message_type(&message)?);
    let props = std::sync::Arc::new(WriterProperties::builder().build());
    let mut w = SerializedFileWriter::new(out, schema, props)?;
    let mut group = w.next_row_group()?;
    for c in &cols {
        let value = |r: &Value| -> Option<Value> {
            let v = r.get(&c.field)?;
            match c.index {
                Some(i) => v.get(i).cloned(),
                None => Some(v.clone()),
            }
            .filter(|v| !v.is_null())
        };
        let present: Vec<Option<Value>> = rows.iter().map(|r| value(r)).collect();
        let defs: Vec<i16> = present.iter().map(|v| i16::from(v.is_some())).collect();
        let mut col = group.next_column()?.expect("a column per schema field");
        match c.kind {
            Kind::Text => {
                let vals: Vec<ByteArray> = present
                    .iter()
                    .flatten()
                    .map(|v| ByteArray::from(v.as_str().unwrap_or_default()))
                    .collect();
                col.typed::<ByteArrayType>()
                    .write_batch(&vals, Some(&defs), None)?;
            }
            Kind::Int => {
                let vals: Vec<i64> = present
                    .iter()
                    .flatten()
                    .map(|v| v.as_i64().unwrap_or(0))
                    .collect();
                col.typed::<Int64Type>()
                    .write_batch(&vals, Some(&defs), None)?;
            }
            Kind::Float => {
                let vals: Vec<f64> = present
                    .iter()
                    .flatten()
                    .map(|v| v.as_f64().unwrap_or(f64::NAN))
                    .collect();
                col.typed::<DoubleType>()
                    .write_batch(&vals, Some(&defs), None)?;
            }
            Kind::Bool => {
                let vals: Vec<bool> = present
                    .iter()
                    .flatten()
                    .map(|v| v.as_bool().unwrap_or(false))
                    .collect();
                col.typed::<BoolType>()
                    .write_batch(&vals, Some(&defs), None)?;
            }
        }
        col.close()?;
    }
    group.close()?;
    w.close()?;
    Ok(())
}
