//! The metering stage: `usage.events`, `eeg.sessions` and `eeg.features` into usage per
//! tenant, meter and hour ([`clisonix_metering::MeteringStore`]) through the Postgres
//! consumers' loop ([`crate::tables`]). Exactly once by the store's transaction, which
//! records the offsets it applied; the consumer group's own offsets only say where to
//! start reading.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clisonix_metering::{Input, MeteringStore};
use clisonix_schemas::{decode, Features, SessionState, Timestamp, UsageEvent};
use clisonix_stage::{Position, Rejection};
use clisonix_topics::catalog::{EEG_FEATURES, EEG_SESSIONS, USAGE_EVENTS};
use clisonix_topics::Topics;
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use std::sync::Mutex;
use tracing::warn;

use crate::metrics::StageMetrics;
use crate::tables::TableWriter;

pub use clisonix_metering::NAME;

/// Counted event ids are kept this long (`usage.events` keeps records 35 days).
const EVENT_IDS_DAYS: i32 = 40;
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Usage,
    Sessions,
    Features,
}

/// Metering as a [`TableWriter`].
#[derive(Debug)]
pub struct Metering {
    store: MeteringStore,
    inputs: BTreeMap<String, Kind>,
    metrics: StageMetrics,
    pruned: Mutex<Option<Instant>>,
}

impl Metering {
    pub fn new(store: MeteringStore, topics: &Topics, metrics: StageMetrics) -> Metering {
        let inputs = [
            (topics.name(&USAGE_EVENTS), Kind::Usage),
            (topics.name(&EEG_SESSIONS), Kind::Sessions),
            (topics.name(&EEG_FEATURES), Kind::Features),
        ]
        .into_iter()
        .collect();
        Metering {
            store,
            inputs,
            metrics,
            pruned: Mutex::new(None),
        }
    }
}

impl TableWriter for Metering {
    type Record = Input;

    fn name(&self) -> &'static str {
        NAME
    }

    fn inputs(&self) -> Vec<String> {
        self.inputs.keys().cloned().collect()
    }

    fn decode(&self, m: &OwnedMessage) -> Result<Input, Rejection> {
        let Some(bytes) = m.payload() else {
            return Err(Rejection::new("empty", "the record has no value"));
        };
        let reject =
            |e: clisonix_schemas::DecodeError| Rejection::new(e.reason_code(), e.to_string());
        Ok(match self.inputs.get(m.topic()) {
            Some(Kind::Usage) => Input::Usage(decode::<UsageEvent>(bytes).map_err(reject)?),
            Some(Kind::Sessions) => Input::Session(decode::<SessionState>(bytes).map_err(reject)?),
            Some(Kind::Features) => {
                Input::Features(Box::new(decode::<Features>(bytes).map_err(reject)?))
            }
            None => {
                return Err(Rejection::new(
                    "unexpected_topic",
                    format!("metering does not read {}", m.topic()),
                ))
            }
        })
    }

    async fn write(
        &self,
        batch: &[(Position, Option<Input>)],
    ) -> Result<Vec<(&'static str, u64)>, String> {
        let now_ms = Timestamp::now().as_millis();
        let applied = self
            .store
            .apply(batch, now_ms)
            .await
            .map_err(|e| e.to_string())?;
        for (meter, quantity) in &applied.usage {
            self.metrics
                .usage
                .with_label_values(&[meter.as_str()])
                .inc_by(*quantity as u64);
        }
        for (meter, quantity) in &applied.carried {
            warn!(
                meter = meter.as_str(),
                quantity, "usage of a closed billing period carried into the open one"
            );
            self.metrics
                .usage_carried
                .with_label_values(&[meter.as_str()])
                .inc_by(*quantity as u64);
        }
        for (meter, threshold) in &applied.alerts {
            tracing::info!(
                meter = meter.as_str(),
                threshold,
                "a tenant's usage crossed a threshold of its plan"
            );
            self.metrics
                .usage_alerts
                .with_label_values(&[meter.as_str(), &threshold.to_string()])
                .inc();
        }
        for (reason, n) in [
            ("offset_applied", applied.already_applied),
            ("duplicate_event", applied.duplicate_events),
        ] {
            self.metrics
                .metering_skipped
                .with_label_values(&[reason])
                .inc_by(n);
        }
        Ok(vec![("usage", applied.applied)])
    }

    async fn tick(&self) {
        if let Err(error) = self.store.roll_periods().await {
            warn!(%error, "starting and closing billing periods failed; trying again soon");
        }
        let due = self
            .pruned
            .lock()
            .expect("not poisoned")
            .is_none_or(|at| at.elapsed() >= PRUNE_EVERY);
        if due {
            match self.store.prune_event_ids(EVENT_IDS_DAYS).await {
                Ok(_) => *self.pruned.lock().expect("not poisoned") = Some(Instant::now()),
                Err(error) => warn!(%error, "forgetting old usage event ids failed"),
            }
        }
    }
}
