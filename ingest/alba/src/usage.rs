//! Per-tenant ingest counters for metering: frames and bytes accepted and recordings
//! uploaded, per tenant, session and device, summed in memory and emitted to `usage.events` every interval
//! (and at shutdown). An emission that fails is kept and retried at the next interval.
//! A crash loses at most one interval of counts; `eeg.frames` itself remains the
//! complete record to recount from.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clisonix_schemas::{encode, DeviceId, SessionId, TenantId, Timestamp, UsageEvent, UsageKind};
use clisonix_tenancy::quota::QuotaBook;
use clisonix_tenancy::Meter;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::publisher::{Publisher, Record};

type Key = (TenantId, SessionId, DeviceId);

#[derive(Debug, Default)]
pub struct Usage {
    /// Counts not yet made into events: (frames, bytes, recording uploads).
    pending: Mutex<HashMap<Key, (i64, i64, i64)>>,
    /// Events whose emission failed, resent as they are (same event ids, so metering
    /// counts a resent event once even if the failed attempt did write it).
    unsent: Mutex<Vec<(Record, Emitted)>>,
}

/// What an event carries, for the quota book.
#[derive(Debug, Clone, Copy)]
struct Emitted {
    tenant: TenantId,
    event_id: Uuid,
    meter: Meter,
    quantity: i64,
}

impl Usage {
    pub fn record(
        &self,
        tenant: TenantId,
        session: SessionId,
        device: &DeviceId,
        frames: usize,
        bytes: usize,
    ) {
        if frames == 0 {
            return;
        }
        let mut pending = self.pending.lock().expect("not poisoned");
        let entry = pending
            .entry((tenant, session, device.clone()))
            .or_default();
        entry.0 += frames as i64;
        entry.1 += bytes as i64;
    }

    /// A recording was uploaded as `session`.
    pub fn record_upload(&self, tenant: TenantId, session: SessionId, device: &DeviceId) {
        let mut pending = self.pending.lock().expect("not poisoned");
        pending
            .entry((tenant, session, device.clone()))
            .or_default()
            .2 += 1;
    }

    fn take(&self) -> HashMap<Key, (i64, i64, i64)> {
        std::mem::take(&mut *self.pending.lock().expect("not poisoned"))
    }

    /// Emits what has been counted; returns the number of events written. Each event
    /// written is handed to the quota book, which counts it until metering has.
    pub async fn emit(
        &self,
        publisher: &Publisher,
        topic: &str,
        metrics: &Metrics,
        quotas: &QuotaBook,
    ) -> usize {
        let counts = self.take();
        let mut records = std::mem::take(&mut *self.unsent.lock().expect("not poisoned"));
        if counts.is_empty() && records.is_empty() {
            return 0;
        }
        let now = Timestamp::now();
        for ((tenant, session, device), (frames, bytes, uploads)) in &counts {
            for (kind, meter, quantity) in [
                (UsageKind::FramesIngested, Meter::Frames, *frames),
                (UsageKind::BytesIngested, Meter::Bytes, *bytes),
                (
                    UsageKind::RecordingUploads,
                    Meter::RecordingUploads,
                    *uploads,
                ),
            ] {
                if quantity == 0 {
                    continue;
                }
                let event = UsageEvent {
                    event_id: Uuid::new_v4(),
                    tenant_id: *tenant,
                    kind,
                    quantity,
                    occurred_at: now,
                    source: "ingest".into(),
                    session_id: Some(*session),
                    device_id: Some(device.clone()),
                    detail: None,
                };
                let emitted = Emitted {
                    tenant: *tenant,
                    event_id: event.event_id,
                    meter,
                    quantity,
                };
                records.push((
                    Record {
                        key: encode(&event.key()).expect("keys encode").into(),
                        value: encode(&event).expect("usage events encode").into(),
                        timestamp_ms: now.as_millis(),
                    },
                    emitted,
                ));
            }
        }
        let results = publisher
            .publish(topic, records.iter().map(|(r, _)| r.clone()).collect())
            .await;
        if results.iter().all(Result::is_ok) {
            metrics.usage_events.inc_by(records.len() as u64);
            for (_, e) in &records {
                quotas.emitted(e.tenant.as_uuid(), e.event_id, e.meter, e.quantity);
            }
            records.len()
        } else {
            metrics.usage_failures.inc();
            let mut unsent = self.unsent.lock().expect("not poisoned");
            records.append(&mut unsent);
            *unsent = records;
            0
        }
    }

    pub async fn run(
        self: Arc<Self>,
        publisher: Arc<Publisher>,
        topic: String,
        metrics: Metrics,
        quotas: Arc<QuotaBook>,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            self.emit(&publisher, &topic, &metrics, &quotas).await;
        }
        // The last counts, on the way out.
        self.emit(&publisher, &topic, &metrics, &quotas).await;
    }
}
