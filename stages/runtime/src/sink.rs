//! The results sink: `eeg.sessions`, `eeg.features` and `audio.chunks` into Postgres
//! ([`clisonix_sink::Results`]) through the Postgres consumers' loop
//! ([`crate::tables`]): at least once with idempotent writes, which together give
//! exactly-once rows (a batch re-read after a crash between its write and its offset
//! commit is written again and changes nothing; see `clisonix-sink`).

use std::collections::BTreeMap;

use clisonix_schemas::{decode, AudioChunk, Features, SessionState};
use clisonix_sink::{Results, SinkRecord};
use clisonix_stage::{Position, Rejection};
use clisonix_topics::catalog::{AUDIO_CHUNKS, EEG_FEATURES, EEG_SESSIONS};
use clisonix_topics::Topics;
use rdkafka::message::OwnedMessage;
use rdkafka::Message;

use crate::tables::TableWriter;

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
        Sink { results, inputs }
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
            Some(Kind::Audio) => SinkRecord::Audio(decode::<AudioChunk>(bytes).map_err(reject)?),
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
}
