//! Login attempt limits per account and per client address: a sliding window of
//! attempts, kept in memory (one gateway instance's view; behind several instances
//! each enforces its own share).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct AttemptLimiter {
    window: Duration,
    per_account: usize,
    per_ip: usize,
    attempts: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl AttemptLimiter {
    pub fn new(window: Duration, per_account: usize, per_ip: usize) -> AttemptLimiter {
        AttemptLimiter {
            window,
            per_account,
            per_ip,
            attempts: Mutex::new(HashMap::new()),
        }
    }

    /// Records an attempt; `Err(seconds to wait)` when either limit is exceeded.
    pub fn attempt(&self, account: &str, ip: &str) -> Result<(), u64> {
        let now = Instant::now();
        let mut attempts = self.attempts.lock().expect("not poisoned");
        if attempts.len() > 100_000 {
            let window = self.window;
            attempts.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < window));
        }
        let mut wait = 0;
        for (key, limit) in [
            (format!("a:{account}"), self.per_account),
            (format!("i:{ip}"), self.per_ip),
        ] {
            let q = attempts.entry(key).or_default();
            while q
                .front()
                .is_some_and(|t| now.duration_since(*t) >= self.window)
            {
                q.pop_front();
            }
            if q.len() >= limit {
                let oldest = *q.front().expect("non-empty at the limit");
                let left = self.window.saturating_sub(now.duration_since(oldest));
                wait = wait.max(left.as_secs().max(1));
            }
        }
        if wait > 0 {
            return Err(wait);
        }
        for key in [format!("a:{account}"), format!("i:{ip}")] {
            attempts.entry(key).or_default().push_back(now);
        }
        Ok(())
    }
}

/// Requests per minute per caller, as a token bucket: a caller may burst up to the
/// per-minute figure, then is held to its rate.
#[derive(Debug, Default)]
pub struct RequestLimiter {
    buckets: Mutex<HashMap<(uuid::Uuid, uuid::Uuid), (f64, Instant)>>,
}

impl RequestLimiter {
    /// Takes one request from the caller's bucket; `Err(seconds to wait)` when empty.
    pub fn take(&self, caller: (uuid::Uuid, uuid::Uuid), per_minute: u32) -> Result<(), u64> {
        let now = Instant::now();
        let capacity = f64::from(per_minute.max(1));
        let rate = capacity / 60.0;
        let mut buckets = self.buckets.lock().expect("not poisoned");
        if buckets.len() > 100_000 {
            buckets.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(120));
        }
        let (tokens, at) = buckets.entry(caller).or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(capacity);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

/// Each tenant's request rates from its plan (`requests_per_minute_member`,
/// `_premium`), read from the database at most every [`PlanRates::TTL`] per tenant, so
/// a plan change applies within that. A tenant without a plan (no subscription) gets
/// the configured rates.
#[derive(Debug, Default)]
pub struct PlanRates {
    /// Per tenant: (member, premium) per minute, and when they were read.
    rates: Mutex<HashMap<uuid::Uuid, (Rates, Instant)>>,
}

/// Requests per minute: (member, premium).
type Rates = (u32, u32);

impl PlanRates {
    pub const TTL: Duration = Duration::from_secs(30);

    /// `(member, premium)` requests per minute for `tenant`; `fallback` when its plan
    /// cannot be read.
    pub async fn of(
        &self,
        pool: &sqlx::PgPool,
        tenant: uuid::Uuid,
        fallback: (u32, u32),
    ) -> (u32, u32) {
        let cached = {
            let rates = self.rates.lock().expect("not poisoned");
            rates
                .get(&tenant)
                .filter(|(_, at)| at.elapsed() < Self::TTL)
                .map(|(r, _)| *r)
        };
        if let Some(r) = cached {
            return r;
        }
        let read: Result<Option<(i32, i32)>, sqlx::Error> = sqlx::query_as(
            "SELECT p.requests_per_minute_member, p.requests_per_minute_premium \
             FROM subscriptions s JOIN plans p ON p.plan_id = s.plan_id AND p.version = s.plan_version \
             WHERE s.tenant_id = $1",
        )
        .bind(tenant)
        .fetch_optional(pool)
        .await;
        let r = match read {
            Ok(Some((member, premium))) => (member.max(1) as u32, premium.max(1) as u32),
            Ok(None) => fallback,
            Err(error) => {
                tracing::warn!(%error, %tenant, "reading the plan's request rates failed");
                return fallback;
            }
        };
        let mut rates = self.rates.lock().expect("not poisoned");
        if rates.len() > 100_000 {
            rates.clear();
        }
        rates.insert(tenant, (r, Instant::now()));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_and_addresses_are_limited_separately() {
        let l = AttemptLimiter::new(Duration::from_secs(60), 3, 5);
        for _ in 0..3 {
            l.attempt("ada", "1.1.1.1").unwrap();
        }
        assert!(
            l.attempt("ada", "2.2.2.2").is_err(),
            "the account is limited from anywhere"
        );
        l.attempt("bob", "1.1.1.1").unwrap();
        l.attempt("eve", "1.1.1.1").unwrap();
        let wait = l.attempt("zed", "1.1.1.1").unwrap_err();
        assert!((1..=60).contains(&wait));
    }

    #[test]
    fn buckets_allow_a_burst_then_the_rate() {
        let l = RequestLimiter::default();
        let a = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        for _ in 0..6 {
            l.take(a, 6).unwrap();
        }
        let wait = l.take(a, 6).unwrap_err();
        assert!((1..=10).contains(&wait), "{wait}");
        l.take((uuid::Uuid::new_v4(), a.1), 6).unwrap();
    }
}
