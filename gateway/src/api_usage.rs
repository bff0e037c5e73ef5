//! Requests on the results API, metered: counted per tenant in memory as readers are
//! authenticated, and emitted to `usage.events` as `API_REQUESTS` events every
//! interval (and at shutdown), which the metering stage counts in the `api_requests`
//! meter. An emission that fails is kept and sent again, the same events with the
//! same ids, so metering counts each once; a crash loses at most one interval's
//! counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clisonix_schemas::{encode, TenantId, Timestamp, UsageEvent, UsageKind};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// An encoded usage event: key and value.
type Encoded = (Vec<u8>, Vec<u8>);

/// The counts and the producer they go out through.
pub struct ApiUsage {
    producer: FutureProducer,
    topic: String,
    /// Requests per tenant not yet made into events.
    pending: Mutex<HashMap<Uuid, i64>>,
    /// Events whose emission failed, sent again as they are.
    unsent: Mutex<Vec<Encoded>>,
}

impl std::fmt::Debug for ApiUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiUsage")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl ApiUsage {
    pub fn new(producer: FutureProducer, topic: String) -> ApiUsage {
        ApiUsage {
            producer,
            topic,
            pending: Mutex::default(),
            unsent: Mutex::default(),
        }
    }

    /// One request of `tenant` on the results API.
    pub fn record(&self, tenant: Uuid) {
        *self
            .pending
            .lock()
            .expect("not poisoned")
            .entry(tenant)
            .or_default() += 1;
    }

    /// Emits what has been counted; returns how many events went out.
    pub async fn emit(&self) -> usize {
        let counts = std::mem::take(&mut *self.pending.lock().expect("not poisoned"));
        let mut events = std::mem::take(&mut *self.unsent.lock().expect("not poisoned"));
        let now = Timestamp::now();
        for (tenant, quantity) in counts {
            let event = UsageEvent {
                event_id: Uuid::new_v4(),
                tenant_id: TenantId::new(tenant),
                kind: UsageKind::ApiRequests,
                quantity,
                occurred_at: now,
                source: "gateway".into(),
                session_id: None,
                device_id: None,
                detail: None,
            };
            events.push((
                encode(&event.key()).expect("keys encode"),
                encode(&event).expect("usage events encode"),
            ));
        }
        if events.is_empty() {
            return 0;
        }
        let deliveries: Vec<_> = events
            .iter()
            .map(|(key, value)| {
                self.producer.send(
                    FutureRecord::to(&self.topic).key(key).payload(value),
                    Duration::from_secs(10),
                )
            })
            .collect();
        let total = events.len();
        let mut failed = Vec::new();
        for (delivery, event) in futures::future::join_all(deliveries)
            .await
            .into_iter()
            .zip(events)
        {
            if let Err((error, _)) = delivery {
                tracing::warn!(%error, "emitting API usage failed; it is sent again later");
                failed.push(event);
            }
        }
        let sent = total - failed.len();
        self.unsent.lock().expect("not poisoned").extend(failed);
        sent
    }

    /// Emits every `every` until `stop`, then once more.
    pub async fn run(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            self.emit().await;
        }
        self.emit().await;
    }
}
