//! Quotas where data comes in: each tenant's hard limits, what it has used this
//! period, and whether it may stream at all, kept in memory and refreshed from the
//! database in the background, so that checking a frame costs a map lookup and a few
//! additions, never a query.
//!
//! What a tenant has used is the metered usage (`usage_periods`, as of the last
//! refresh) plus what this instance accepted that metering has not counted yet:
//! - frames, bytes and recording uploads reach metering as this instance's usage
//!   events; the book keeps each emitted event's id until a refresh sees it in
//!   `metering_events` (read in the same statement as the usage, so from the same
//!   snapshot), and only then stops adding it. For one ingest instance the count is
//!   therefore exact: a hard limit lets nothing through beyond it. With several
//!   instances, each learns of the others' usage when metering has counted it: the
//!   overshoot is at most what the other instances accepted in one usage interval
//!   plus metering's delay plus one refresh interval.
//! - device and channel time are metered from the sessions stage's states, which are
//!   not this instance's events; the book adds what it accepted since the last
//!   refresh. The overshoot is at most the time each of the tenant's streams
//!   delivered in the sessions stage's update interval plus metering's delay plus
//!   one refresh interval (about 7 s of each stream with the defaults).
//!
//! Accepting takes a reservation first ([`Ledger::reserve_prefix`]), which is settled
//! with what the broker took, releasing the rest ([`Ledger::settle`]), so concurrent
//! requests of a tenant cannot both take the last of its quota.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::plans::SubscriptionStatus;
use crate::Meter;

/// The meters checked where data comes in, in the order of [`Amounts`].
pub const ENFORCED: [Meter; 5] = [
    Meter::Frames,
    Meter::Bytes,
    Meter::DeviceMs,
    Meter::ChannelMs,
    Meter::RecordingUploads,
];

/// Quantities of the [`ENFORCED`] meters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts(pub [i64; 5]);

impl Amounts {
    /// `frames` frames of `bytes` bytes, `samples` samples per channel of `channels`
    /// channels at `rate_hz`.
    pub fn frames(frames: i64, bytes: i64, samples: u64, channels: usize, rate_hz: f64) -> Amounts {
        let ms = |n: f64| {
            if rate_hz > 0.0 {
                (n * 1000.0 / rate_hz).round() as i64
            } else {
                0
            }
        };
        Amounts([
            frames,
            bytes,
            ms(samples as f64),
            ms(samples as f64 * channels as f64),
            0,
        ])
    }

    /// One recording upload.
    pub fn upload() -> Amounts {
        Amounts([0, 0, 0, 0, 1])
    }

    pub fn add(&mut self, other: &Amounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    fn sub(&mut self, other: &Amounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = (*a - b).max(0);
        }
    }

    fn index(meter: Meter) -> Option<usize> {
        ENFORCED.iter().position(|m| *m == meter)
    }
}

/// Why a tenant's data is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A hard limit of the period is used up.
    #[error("the plan's {meter} quota for this period is used up ({used} of {limit}); it resets at {resets_at}")]
    QuotaExceeded {
        meter: Meter,
        limit: i64,
        used: i64,
        resets_at: DateTime<Utc>,
    },
    /// The subscription is past due beyond its grace period (or canceled).
    #[error("the subscription is {status}: payment is required")]
    PaymentRequired { status: &'static str },
}

/// How a tenant stands, as of the last refresh.
#[derive(Debug, Clone)]
pub struct Standing {
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    /// Hard limits per enforced meter (None: not limited).
    limits: [Option<i64>; 5],
    /// Metered usage this period.
    metered: Amounts,
    max_concurrent_sessions: Option<i32>,
    max_devices: Option<i32>,
    /// The audio presets the plan renders.
    audio_presets: Arc<[String]>,
    /// Refused outright (past due beyond the grace, or canceled).
    blocked: Option<&'static str>,
}

#[derive(Debug)]
struct TenantBook {
    standing: Option<Standing>,
    /// Accepted (or reserved) by this instance and not yet metered: frames, bytes and
    /// uploads until their events are seen counted; time since the last refresh.
    local: Amounts,
    /// Emitted events not yet seen counted: id -> amounts.
    pending: HashMap<Uuid, Amounts>,
    last_used: Instant,
}

impl Standing {
    /// A tenant in its period `period_start..period_end` with these hard limits (per
    /// [`ENFORCED`] meter) and metered usage, not blocked.
    pub fn new(
        period_start: DateTime<Utc>,
        period_end: DateTime<Utc>,
        limits: [Option<i64>; 5],
        metered: Amounts,
        max_concurrent_sessions: Option<i32>,
    ) -> Standing {
        Standing {
            period_start,
            period_end,
            limits,
            metered,
            max_concurrent_sessions,
            max_devices: None,
            audio_presets: Arc::from([]),
            blocked: None,
        }
    }
}

impl TenantBook {
    fn new() -> TenantBook {
        TenantBook {
            standing: None,
            local: Amounts::default(),
            pending: HashMap::new(),
            last_used: Instant::now(),
        }
    }

    /// Whether `amounts` more fit.
    fn check(&self, amounts: &Amounts, now: DateTime<Utc>) -> Result<(), Refusal> {
        let Some(s) = &self.standing else {
            return Ok(());
        };
        if let Some(status) = s.blocked {
            return Err(Refusal::PaymentRequired { status });
        }
        // A period that ended since the last refresh has reset.
        let metered = if now >= s.period_end {
            Amounts::default()
        } else {
            s.metered
        };
        // Uploads first: an upload refused for its count says so, not for its frames.
        for i in [4, 0, 1, 2, 3] {
            let Some(limit) = s.limits[i] else { continue };
            let used = metered.0[i] + self.local.0[i];
            if amounts.0[i] > 0 && used + amounts.0[i] > limit {
                return Err(Refusal::QuotaExceeded {
                    meter: ENFORCED[i],
                    limit,
                    used: used.min(limit),
                    resets_at: s.period_end,
                });
            }
        }
        Ok(())
    }
}

/// What a plan allows of a tenant's sessions and devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionLimits {
    /// Sessions open at once.
    pub sessions: Option<i32>,
    /// Devices the tenant streams from.
    pub devices: Option<i32>,
}

impl SessionLimits {
    pub fn any(&self) -> bool {
        self.sessions.is_some() || self.devices.is_some()
    }
}

/// A tenant's quota check passed: `amounts` are counted as used until settled.
#[derive(Debug)]
#[must_use = "settle the reservation with what was accepted"]
pub struct Reservation {
    tenant: Uuid,
    amounts: Amounts,
}

impl Reservation {
    /// What was reserved.
    pub fn amounts(&self) -> Amounts {
        self.amounts
    }
}

/// The quota state of the tenants this instance serves: the [`Ledger`] in memory and
/// the database it is refreshed from.
#[derive(Debug)]
pub struct QuotaBook {
    pool: PgPool,
    ledger: Ledger,
}

/// The in-memory part of the book: every check and reservation works on it alone.
#[derive(Debug, Default)]
pub struct Ledger {
    tenants: Mutex<HashMap<Uuid, TenantBook>>,
}

impl std::ops::Deref for QuotaBook {
    type Target = Ledger;

    fn deref(&self) -> &Ledger {
        &self.ledger
    }
}

impl Ledger {
    /// Reserves `amounts` for `tenant`, or refuses: the first meter whose hard limit
    /// it would pass. A tenant whose standing is not loaded yet passes (see
    /// [`QuotaBook::ensure`]).
    pub fn reserve(&self, tenant: Uuid, amounts: Amounts) -> Result<Reservation, Refusal> {
        match self.reserve_prefix(tenant, [amounts]) {
            (r, 1, _) => Ok(r),
            (_, _, refusal) => Err(refusal.expect("a refusal when nothing was reserved")),
        }
    }

    /// Reserves the longest prefix of `items` (in order) that fits the tenant's quota:
    /// the reservation, how many items it holds, and the refusal of the first that
    /// did not fit, if any.
    pub fn reserve_prefix(
        &self,
        tenant: Uuid,
        items: impl IntoIterator<Item = Amounts>,
    ) -> (Reservation, usize, Option<Refusal>) {
        let now = Utc::now();
        let mut reservation = Reservation {
            tenant,
            amounts: Amounts::default(),
        };
        let mut n = 0;
        let mut tenants = self.tenants.lock().expect("not poisoned");
        let book = tenants.entry(tenant).or_insert_with(TenantBook::new);
        book.last_used = Instant::now();
        for amounts in items {
            if let Err(refusal) = book.check(&amounts, now) {
                return (reservation, n, Some(refusal));
            }
            book.local.add(&amounts);
            reservation.amounts.add(&amounts);
            n += 1;
        }
        (reservation, n, None)
    }

    /// Settles a reservation: `used` of it was accepted (counted until metered), the
    /// rest is released.
    pub fn settle(&self, reservation: Reservation, used: Amounts) {
        let mut unused = reservation.amounts;
        unused.sub(&used);
        let mut tenants = self.tenants.lock().expect("not poisoned");
        if let Some(book) = tenants.get_mut(&reservation.tenant) {
            book.local.sub(&unused);
        }
    }

    /// An accepted amount has gone out as the usage event `event_id`: it stops
    /// counting locally once a refresh sees metering counted that event.
    pub fn emitted(&self, tenant: Uuid, event_id: Uuid, meter: Meter, quantity: i64) {
        let Some(i) = Amounts::index(meter) else {
            return;
        };
        let mut tenants = self.tenants.lock().expect("not poisoned");
        if let Some(book) = tenants.get_mut(&tenant) {
            book.pending.entry(event_id).or_default().0[i] += quantity;
        }
    }

    /// Sets a tenant's standing as a refresh would (for tools and benchmarks that run
    /// without the database).
    pub fn set_standing(&self, tenant: Uuid, standing: Standing) {
        let mut tenants = self.tenants.lock().expect("not poisoned");
        tenants
            .entry(tenant)
            .or_insert_with(TenantBook::new)
            .standing = Some(standing);
    }

    /// A hard-limited meter's `(limit, remaining, milliseconds until the reset)` for
    /// `tenant` (None: not limited, or not loaded).
    pub fn headroom(&self, tenant: Uuid, meter: Meter) -> Option<(i64, i64, u64)> {
        let i = Amounts::index(meter)?;
        let now = Utc::now();
        let tenants = self.tenants.lock().expect("not poisoned");
        let book = tenants.get(&tenant)?;
        let s = book.standing.as_ref()?;
        let limit = s.limits[i]?;
        let metered = if now >= s.period_end {
            0
        } else {
            s.metered.0[i]
        };
        let reset = (s.period_end - now).num_milliseconds().max(0) as u64;
        Some((limit, (limit - metered - book.local.0[i]).max(0), reset))
    }

    /// The plan's limits on `tenant`'s sessions open at once and devices (None: none,
    /// or not loaded).
    pub fn session_limits(&self, tenant: Uuid) -> SessionLimits {
        let tenants = self.tenants.lock().expect("not poisoned");
        let standing = tenants.get(&tenant).and_then(|b| b.standing.as_ref());
        SessionLimits {
            sessions: standing.and_then(|s| s.max_concurrent_sessions),
            devices: standing.and_then(|s| s.max_devices),
        }
    }

    /// The audio presets the tenant's plan renders; `None` while its standing is not
    /// loaded (nothing is refused for it then).
    pub fn audio_presets(&self, tenant: Uuid) -> Option<Arc<[String]>> {
        let tenants = self.tenants.lock().expect("not poisoned");
        let standing = tenants.get(&tenant).and_then(|b| b.standing.as_ref())?;
        Some(standing.audio_presets.clone())
    }
}

/// A tenant unused this long is forgotten (read again when it comes back).
const FORGET_AFTER: Duration = Duration::from_secs(600);

impl QuotaBook {
    pub fn new(pool: PgPool) -> QuotaBook {
        QuotaBook {
            pool,
            ledger: Ledger::default(),
        }
    }

    /// Loads a tenant's standing unless the book has it (its first request on this
    /// instance waits for one query; later ones never do).
    pub async fn ensure(&self, tenant: Uuid) -> Result<(), sqlx::Error> {
        let known = {
            let mut tenants = self.tenants.lock().expect("not poisoned");
            let book = tenants.entry(tenant).or_insert_with(TenantBook::new);
            book.last_used = Instant::now();
            book.standing.is_some()
        };
        if !known {
            self.refresh_tenants(&[tenant]).await?;
        }
        Ok(())
    }

    /// Reads every known tenant's standing again (and forgets idle ones).
    pub async fn refresh(&self) -> Result<(), sqlx::Error> {
        let tenants: Vec<Uuid> = {
            let mut tenants = self.tenants.lock().expect("not poisoned");
            tenants.retain(|_, b| b.last_used.elapsed() < FORGET_AFTER || !b.pending.is_empty());
            tenants.keys().copied().collect()
        };
        if tenants.is_empty() {
            return Ok(());
        }
        self.refresh_tenants(&tenants).await
    }

    async fn refresh_tenants(&self, tenants: &[Uuid]) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT clisonix_roll_periods(now())")
            .execute(&self.pool)
            .await?;
        let pending: Vec<Uuid> = {
            let books = self.tenants.lock().expect("not poisoned");
            tenants
                .iter()
                .filter_map(|t| books.get(t))
                .flat_map(|b| b.pending.keys().copied())
                .collect()
        };
        let meters: Vec<&str> = ENFORCED.iter().map(|m| m.as_str()).collect();
        // One statement: the usage and the counted events come from one snapshot.
        let rows = sqlx::query(
            "SELECT s.tenant_id, s.status, s.period_start, s.period_end, \
                    (s.status = 'canceled' OR (s.status = 'past_due' AND \
                        coalesce(s.past_due_since, now()) + (SELECT past_due_grace FROM billing_settings) <= now())) AS blocked, \
                    p.max_concurrent_sessions, p.max_devices, p.audio_presets, \
                    ARRAY(SELECT coalesce((SELECT m.included FROM plan_meters m \
                                            WHERE m.plan_id = s.plan_id AND m.version = s.plan_version \
                                              AND m.meter = e.meter AND m.limit_kind = 'hard'), -1) \
                          FROM unnest($2::text[]) WITH ORDINALITY AS e(meter, i) ORDER BY e.i) AS limits, \
                    ARRAY(SELECT coalesce((SELECT u.quantity FROM usage_periods u \
                                            WHERE u.tenant_id = s.tenant_id AND u.period_start = s.period_start \
                                              AND u.meter = e.meter), 0) \
                          FROM unnest($2::text[]) WITH ORDINALITY AS e(meter, i) ORDER BY e.i) AS used, \
                    ARRAY(SELECT event_id FROM metering_events WHERE event_id = ANY($3)) AS counted \
             FROM subscriptions s JOIN plans p ON p.plan_id = s.plan_id AND p.version = s.plan_version \
             WHERE s.tenant_id = ANY($1)",
        )
        .bind(tenants)
        .bind(&meters)
        .bind(&pending)
        .fetch_all(&self.pool)
        .await?;
        let mut books = self.tenants.lock().expect("not poisoned");
        for row in rows {
            let tenant: Uuid = row.get("tenant_id");
            let Some(book) = books.get_mut(&tenant) else {
                continue;
            };
            let limits: Vec<i64> = row.get("limits");
            let used: Vec<i64> = row.get("used");
            let counted: Vec<Uuid> = row.get("counted");
            let status = SubscriptionStatus::parse(row.get::<&str, _>("status"));
            let period_start: DateTime<Utc> = row.get("period_start");
            let standing = Standing {
                period_start,
                period_end: row.get("period_end"),
                limits: std::array::from_fn(|i| limits.get(i).copied().filter(|l| *l >= 0)),
                metered: Amounts(std::array::from_fn(|i| used.get(i).copied().unwrap_or(0))),
                max_concurrent_sessions: row.get("max_concurrent_sessions"),
                max_devices: row.get("max_devices"),
                audio_presets: row.get::<Vec<String>, _>("audio_presets").into(),
                blocked: row.get::<bool, _>("blocked").then_some(match status {
                    Some(SubscriptionStatus::Canceled) => "canceled",
                    _ => "past_due",
                }),
            };
            let new_period = book
                .standing
                .as_ref()
                .is_some_and(|s| s.period_start != period_start);
            if new_period {
                // What this instance counted belongs to the period that ended.
                book.local = Amounts::default();
                book.pending.clear();
            } else {
                for id in counted {
                    if let Some(amounts) = book.pending.remove(&id) {
                        book.local.sub(&amounts);
                    }
                }
                // Time is metered from session states, not from this instance's
                // events: what was accepted before this refresh is taken to be in
                // the metered figure from now on (see the module documentation).
                for i in [2, 3] {
                    book.local.0[i] = 0;
                }
            }
            book.standing = Some(standing);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book_with(limits: [Option<i64>; 5], metered: [i64; 5]) -> (Ledger, Uuid) {
        let book = Ledger::default();
        let tenant = Uuid::new_v4();
        let mut t = TenantBook::new();
        t.standing = Some(Standing {
            period_start: Utc::now() - chrono::Duration::hours(1),
            period_end: Utc::now() + chrono::Duration::hours(1),
            limits,
            metered: Amounts(metered),
            max_concurrent_sessions: Some(2),
            max_devices: Some(3),
            audio_presets: Arc::from(["parameter_mapping".to_owned()]),
            blocked: None,
        });
        book.tenants.lock().unwrap().insert(tenant, t);
        (book, tenant)
    }

    fn frames(n: i64) -> Amounts {
        Amounts([n, 0, 0, 0, 0])
    }

    #[test]
    fn a_hard_limit_takes_exactly_what_is_left_and_refuses_the_rest() {
        let (book, t) = book_with([Some(10), None, None, None, None], [7, 0, 0, 0, 0]);
        let (r, n, refusal) = book.reserve_prefix(t, (0..5).map(|_| frames(1)));
        assert_eq!(n, 3);
        match refusal {
            Some(Refusal::QuotaExceeded {
                meter, limit, used, ..
            }) => {
                assert_eq!((meter, limit, used), (Meter::Frames, 10, 10))
            }
            other => panic!("{other:?}"),
        }
        // Only two of the three were accepted: one is given back.
        book.settle(r, frames(2));
        assert!(book.reserve(t, frames(1)).is_ok());
        assert!(book.reserve(t, frames(1)).is_err());
    }

    #[test]
    fn unlimited_meters_and_empty_amounts_always_pass() {
        let (book, t) = book_with([None, Some(0), None, None, None], [1_000_000, 5, 0, 0, 0]);
        assert!(book.reserve(t, frames(1000)).is_ok());
        assert!(
            book.reserve(t, Amounts::default()).is_ok(),
            "nothing of the limited meter"
        );
        assert!(book.reserve(t, Amounts([0, 1, 0, 0, 0])).is_err());
    }

    #[test]
    fn emitted_events_count_until_metered_and_a_new_period_starts_from_nothing() {
        let (book, t) = book_with([Some(10), None, None, None, None], [0, 0, 0, 0, 0]);
        let r = book.reserve(t, frames(10)).unwrap();
        book.settle(r, frames(10));
        book.emitted(t, Uuid::new_v4(), Meter::Frames, 10);
        assert!(
            book.reserve(t, frames(1)).is_err(),
            "counted while in flight to metering"
        );
        // The period ended (and no refresh happened yet): its usage no longer counts
        // against the new one, except what this instance has not seen metered.
        let mut tenants = book.tenants.lock().unwrap();
        let s = tenants.get_mut(&t).unwrap().standing.as_mut().unwrap();
        s.metered = frames(10);
        s.period_end = Utc::now() - chrono::Duration::seconds(1);
        tenants.get_mut(&t).unwrap().local = Amounts::default();
        drop(tenants);
        assert!(book.reserve(t, frames(10)).is_ok());
    }

    #[test]
    fn a_blocked_tenant_is_refused_everything() {
        let (book, t) = book_with([None; 5], [0; 5]);
        book.tenants
            .lock()
            .unwrap()
            .get_mut(&t)
            .unwrap()
            .standing
            .as_mut()
            .unwrap()
            .blocked = Some("past_due");
        assert_eq!(
            book.reserve(t, frames(1)).unwrap_err(),
            Refusal::PaymentRequired { status: "past_due" }
        );
        assert_eq!(
            book.session_limits(t),
            SessionLimits {
                sessions: Some(2),
                devices: Some(3)
            }
        );
    }

    #[test]
    fn amounts_of_frames_count_device_and_channel_time() {
        let a = Amounts::frames(2, 4096, 32, 32, 128.0);
        assert_eq!(a.0, [2, 4096, 250, 8000, 0]);
        assert_eq!(Amounts::upload().0, [0, 0, 0, 0, 1]);
    }
}
