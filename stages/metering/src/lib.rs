//! Metering: what a tenant used, per meter and hour, counted exactly once.
//!
//! Three inputs feed it: `usage.events` (frames and bytes ingest accepted, and what
//! other services report), `eeg.sessions` (each session's cumulative samples, from
//! which device and channel time are counted) and `eeg.features` (each channel-window
//! Albi computed, and whether its signal was usable: [`clean`]). This module turns a
//! decoded record into [`Usage`] (pure, unit-tested without a broker or a database);
//! [`store`] applies a batch of them to Postgres in one transaction together with the
//! input offsets, which is what makes the counts exact.

pub mod clean;
pub mod replay;
pub mod store;

use clisonix_schemas::{Features, SessionId, SessionState, TenantId, UsageEvent, UsageKind};

pub use clean::{CleanRule, CLEAN_RULE};
pub use clisonix_stage::Position;
pub use clisonix_tenancy::Meter;
pub use store::{Applied, MeteringStore, StoreError};

/// The stage's name: its consumer group and the `stage` of its dead letters.
pub const NAME: &str = "metering";

/// A decoded input record.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Usage(UsageEvent),
    Session(SessionState),
    Features(Box<Features>),
}

impl Input {
    /// The session the record belongs to, when it belongs to one.
    pub fn session_id(&self) -> Option<SessionId> {
        match self {
            Input::Usage(e) => e.session_id,
            Input::Session(s) => Some(s.session_id),
            Input::Features(f) => Some(f.session_id),
        }
    }
}

/// A quantity a tenant used at a moment (milliseconds since the epoch), in a session
/// when the usage belongs to one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub tenant: TenantId,
    pub session: Option<SessionId>,
    pub meter: Meter,
    pub at_ms: i64,
    pub quantity: i64,
    /// What the quantity is of within its meter (the audio preset), kept per session.
    pub detail: Option<String>,
}

/// The meter a usage event counts in, or `None` for kinds metering counts from
/// another input (feature windows come from `eeg.features` itself, so an event of
/// that kind would count them twice) or does not know.
pub fn event_meter(kind: UsageKind) -> Option<Meter> {
    match kind {
        UsageKind::FramesIngested => Some(Meter::Frames),
        UsageKind::BytesIngested => Some(Meter::Bytes),
        UsageKind::AudioMilliseconds => Some(Meter::AudioMs),
        UsageKind::ApiRequests => Some(Meter::ApiRequests),
        UsageKind::RecordingUploads => Some(Meter::RecordingUploads),
        UsageKind::FeatureWindows | UsageKind::Unknown => None,
    }
}

/// The usage of an event, if it counts.
pub fn from_event(event: &UsageEvent) -> Option<Usage> {
    let meter = event_meter(event.kind)?;
    (event.quantity > 0).then(|| Usage {
        tenant: event.tenant_id,
        session: event.session_id,
        meter,
        at_ms: event.occurred_at.as_millis(),
        quantity: event.quantity,
        detail: event.detail.clone().filter(|_| meter == Meter::AudioMs),
    })
}

/// A session's device and channel time so far, in milliseconds, from its cumulative
/// state: `samples_per_channel / rate` and that times the channels, each rounded down
/// once from the whole (so a session's total is never off by more than a millisecond,
/// however many states it took to get there).
pub fn session_totals(state: &SessionState) -> (i64, i64) {
    if state.sample_rate_hz.is_nan() || state.sample_rate_hz <= 0.0 {
        return (0, 0);
    }
    let samples = state.samples_per_channel as f64;
    let channels = state.channel_labels.len() as f64;
    let device = (samples * 1000.0 / state.sample_rate_hz).floor() as i64;
    let channel = (samples * channels * 1000.0 / state.sample_rate_hz).floor() as i64;
    (device, channel)
}

/// Milliseconds of `samples` at `rate`, rounded to the nearest (exact at the usual
/// EEG rates and window lengths: 2 s at 128, 250, 256, 500 or 512 Hz).
pub fn samples_ms(samples: u64, rate_hz: f64) -> i64 {
    if rate_hz.is_nan() || rate_hz <= 0.0 {
        return 0;
    }
    (samples as f64 * 1000.0 / rate_hz).round() as i64
}

/// The usage of one feature record (one channel-window): a feature window, and its
/// clean channel time when [`CLEAN_RULE`] finds it usable. `at_ms` is when it was
/// computed (the record's Kafka timestamp).
pub fn from_features(f: &Features, at_ms: i64) -> impl Iterator<Item = Usage> {
    let usage = move |meter, quantity| Usage {
        tenant: f.tenant_id,
        session: Some(f.session_id),
        meter,
        at_ms,
        quantity,
        detail: None,
    };
    let windows = usage(Meter::FeatureWindows, 1);
    let clean = CLEAN_RULE
        .is_clean(&f.quality)
        .then(|| {
            let owned =
                clean::owned_samples(f.window_index, f.window_start_sample, f.window_samples);
            usage(Meter::CleanChannelMs, samples_ms(owned, f.sample_rate_hz))
        })
        .filter(|u| u.quantity > 0);
    std::iter::once(windows).chain(clean)
}

/// The start of the UTC hour of `ms`.
pub fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(3_600_000) * 3_600_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use clisonix_schemas::examples;

    #[test]
    fn events_count_in_their_meter_and_feature_window_events_do_not() {
        let mut e = examples::usage_event(1);
        e.kind = UsageKind::FramesIngested;
        e.quantity = 7;
        let u = from_event(&e).unwrap();
        assert_eq!(
            (u.meter, u.quantity, u.tenant),
            (Meter::Frames, 7, e.tenant_id)
        );
        assert_eq!(u.at_ms, e.occurred_at.as_millis());
        e.kind = UsageKind::FeatureWindows;
        assert_eq!(from_event(&e), None);
        e.kind = UsageKind::Unknown;
        assert_eq!(from_event(&e), None);
        e.kind = UsageKind::BytesIngested;
        e.quantity = 0;
        assert_eq!(from_event(&e), None, "nothing used, nothing counted");
    }

    #[test]
    fn session_time_is_rounded_down_once_from_the_cumulative_samples() {
        let mut s = examples::session_state(1);
        s.sample_rate_hz = 128.0;
        s.channel_labels = vec!["a".into(); 32];
        s.samples_per_channel = 16;
        assert_eq!(session_totals(&s), (125, 4000));
        s.sample_rate_hz = 300.0;
        s.samples_per_channel = 1;
        // 3.33 ms of device time, 106.67 ms of channel time.
        assert_eq!(session_totals(&s), (3, 106));
        s.samples_per_channel = 3;
        assert_eq!(session_totals(&s), (10, 320));
        s.sample_rate_hz = 0.0;
        assert_eq!(session_totals(&s), (0, 0));
    }

    #[test]
    fn hours_are_utc_and_floor_negative_times() {
        assert_eq!(hour_of(3_600_000 * 5 + 17), 3_600_000 * 5);
        assert_eq!(hour_of(-1), -3_600_000);
    }
}
