//! The results sink: `eeg.sessions`, `eeg.features` and `audio.chunks` into Postgres
//! ([`clisonix_sink::Results`]) through the Postgres consumers' loop
//! ([`crate::tables`]): at least once with idempotent writes, which together give
//! exactly-once rows (a batch re-read after a crash between its write and its offset
//! commit is written again and changes nothing; see `clisonix-sink`).
//!
//! Between batches it deletes the results its tenants' plans no longer keep
//! ([`Sink::with_retention`], [`clisonix_sink::retention`]), then the audio objects no
//! row names ([`clisonix_sink::objects`]).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clisonix_schemas::{decode, AudioChunk, Features, SessionState};
use clisonix_sink::{Results, SinkRecord};
use clisonix_stage::{Position, Rejection};
use clisonix_topics::catalog::{AUDIO_CHUNKS, EEG_FEATURES, EEG_SESSIONS};
use clisonix_topics::Topics;
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use tracing::{info, warn};

use crate::metrics::StageMetrics;
use crate::tables::TableWriter;

/// Sessions deleted per transaction by a retention sweep.
const EXPIRE_BATCH: i64 = 100;

/// Audio objects checked per transaction by an object sweep.
const SWEEP_BATCH: i64 = 1_000;

/// The sink's name: its consumer group and the `stage` of its dead letters.
pub const NAME: &str = "sink";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sessions,
    Features,
    Audio,
}

/// The results sink as a [`TableWriter`].
#[derive(Debug)]
pub struct Sink {
    results: Results,
    inputs: BTreeMap<String, Kind>,
    retention: Option<Retention>,
}

/// The sweeps' schedule and what they count.
#[derive(Debug)]
struct Retention {
    every: Duration,
    /// How old an audio object's check must be before the object sweep looks at it.
    grace: Duration,
    metrics: StageMetrics,
    swept: Mutex<Option<Instant>>,
}

impl Sink {
    pub fn new(results: Results, topics: &Topics) -> Sink {
        let inputs = [
            (topics.name(&EEG_SESSIONS), Kind::Sessions),
            (topics.name(&EEG_FEATURES), Kind::Features),
            (topics.name(&AUDIO_CHUNKS), Kind::Audio),
        ]
        .into_iter()
        .collect();
        Sink {
            results,
            inputs,
            retention: None,
        }
    }

    /// Also deletes, every `every`, the sessions (with their features and audio) older
    /// than their tenant's plan keeps, and then the audio objects no row names whose
    /// checks are older than `grace`, counting them in `metrics`.
    pub fn with_retention(
        mut self,
        every: Duration,
        grace: Duration,
        metrics: StageMetrics,
    ) -> Sink {
        self.retention = Some(Retention {
            every,
            grace,
            metrics,
            swept: Mutex::new(None),
        });
        self
    }
}

impl TableWriter for Sink {
    type Record = SinkRecord;

    fn name(&self) -> &'static str {
        NAME
    }

    fn inputs(&self) -> Vec<String> {
        self.inputs.keys().cloned().collect()
    }

    fn decode(&self, m: &OwnedMessage) -> Result<SinkRecord, Rejection> {
        let Some(bytes) = m.payload() else {
            return Err(Rejection::new("empty", "the record has no value"));
        };
        let reject =
            |e: clisonix_schemas::DecodeError| Rejection::new(e.reason_code(), e.to_string());
        Ok(match self.inputs.get(m.topic()) {
            Some(Kind::Sessions) => {
                SinkRecord::Session(decode::<SessionState>(bytes).map_err(reject)?)
            }
            Some(Kind::Features) => {
                SinkRecord::Features(Box::new(decode::<Features>(bytes).map_err(reject)?))
            }
            Some(Kind::Audio) => {
                let chunk = decode::<AudioChunk>(bytes).map_err(reject)?;
                // A chunk FLAC cannot hold would fail every batch it is in.
                clisonix_audio::flac::check(chunk.pcm.len(), chunk.channels, chunk.sample_rate_hz)
                    .map_err(|e| Rejection::new("invalid_audio", e.to_string()))?;
                SinkRecord::Audio(chunk)
            }
            None => {
                return Err(Rejection::new(
                    "unexpected_topic",
                    format!("the sink does not read {}", m.topic()),
                ))
            }
        })
    }

    async fn write(
        &self,
        batch: &[(Position, Option<SinkRecord>)],
    ) -> Result<Vec<(&'static str, u64)>, String> {
        let records: Vec<&SinkRecord> = batch.iter().filter_map(|(_, r)| r.as_ref()).collect();
        let w = self
            .results
            .write(&records)
            .await
            .map_err(|e| e.to_string())?;
        Ok(vec![
            ("sessions", w.sessions),
            ("features", w.features),
            ("audio_chunks", w.audio_chunks),
        ])
    }

    async fn tick(&self) {
        let Some(r) = &self.retention else { return };
        let due = r
            .swept
            .lock()
            .expect("not poisoned")
            .is_none_or(|at| at.elapsed() >= r.every);
        if !due {
            return;
        }
        *r.swept.lock().expect("not poisoned") = Some(Instant::now());
        self.expire(r).await;
        self.sweep_objects(r).await;
    }
}

impl Sink {
    async fn expire(&self, r: &Retention) {
        match self
            .results
            .expire(sqlx::types::chrono::Utc::now(), EXPIRE_BATCH)
            .await
        {
            Ok(expired) => {
                let Some(e) = expired else { return };
                for (table, n) in [
                    ("sessions", e.sessions),
                    ("features", e.features),
                    ("audio_chunks", e.audio_chunks),
                ] {
                    r.metrics
                        .results_expired
                        .with_label_values(&[table])
                        .inc_by(n);
                }
                if e.sessions > 0 {
                    info!(
                        sessions = e.sessions,
                        features = e.features,
                        audio_chunks = e.audio_chunks,
                        "deleted results past their plans' retention"
                    );
                }
            }
            Err(error) => {
                warn!(%error, "deleting results past their retention failed; trying again soon")
            }
        }
    }

    async fn sweep_objects(&self, r: &Retention) {
        match self
            .results
            .sweep_objects(sqlx::types::chrono::Utc::now(), r.grace, SWEEP_BATCH)
            .await
        {
            Ok(Some(s)) => {
                let swept = &r.metrics.audio_objects_swept;
                swept
                    .with_label_values(&["kept"])
                    .inc_by(s.checked - s.deleted);
                swept.with_label_values(&["deleted"]).inc_by(s.deleted);
                if s.deleted > 0 {
                    info!(
                        checked = s.checked,
                        deleted = s.deleted,
                        "deleted audio objects no row names"
                    );
                }
            }
            Ok(None) => {
                info!("the audio object sweep waited too long for the sink's writes; next time")
            }
            Err(error) => {
                warn!(%error, "sweeping audio objects failed; trying again soon")
            }
        }
    }
}
