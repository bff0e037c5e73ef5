//! Configuration: defaults, then environment variables. The database URL is a secret
//! that never prints; every invalid setting is reported at once.

use std::net::SocketAddr;
use std::time::Duration;

use clisonix_ingest_protocol::Limits;
use clisonix_service::config::{ConfigError, Secret};
use clisonix_topics::client::DEFAULT_BOOTSTRAP;
use clisonix_topics::KafkaSettings;

/// The most producers ingest may write through (`CLISONIX_INGEST_PRODUCERS`).
pub const MAX_PRODUCERS: usize = 16;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: Secret,
    pub kafka: KafkaSettings,
    /// Prefix of every topic name (see `clisonix-topics`).
    pub topic_prefix: String,
    /// Apply the database migrations at start.
    pub migrate: bool,
    /// Largest `POST /v1/frames` or `/collect` body.
    pub max_body_bytes: usize,
    /// Largest recording upload.
    pub max_recording_bytes: usize,
    /// Largest WebSocket message.
    pub max_message_bytes: usize,
    /// Frame bytes ingest may hold unconfirmed by the broker; beyond it, requests get
    /// 429 and streams wait.
    pub max_in_flight_bytes: usize,
    /// How many producers (each its own broker connection) ingest writes through. A
    /// record's key picks one, so that when the count divides a topic's partitions
    /// every partition is written by one producer (see `publisher`).
    pub producers: usize,
    /// How long the broker has to confirm a write before the frame is refused with
    /// 503 (`message.timeout.ms`).
    pub publish_timeout: Duration,
    /// What `Retry-After` says when the broker is unavailable or ingest is full.
    pub retry_after: Duration,
    /// How often per-tenant usage is emitted to `usage.events`.
    pub usage_interval: Duration,
    /// How often the tenants' quota standing (plan limits, metered usage) is read
    /// again from the database.
    pub quota_refresh: Duration,
    /// How often the producer's statistics update its metrics (`alba_producer_*`);
    /// zero turns them off.
    pub producer_stats_interval: Duration,
    /// Frame length of uploaded recordings, unless the upload asks otherwise.
    pub recording_frame_ms: u32,
    /// How long a claim holds a session for this instance (see `sessions`); renewed
    /// once a fifth of it is used. Another instance takes over a crashed one's
    /// sessions after it.
    pub session_lease: Duration,
    /// How often the sessions' state is written and idle or wanted sessions let go.
    pub session_tick: Duration,
    /// A session without frames for this long is let go.
    pub session_idle: Duration,
    /// How long frames of a session another instance serves wait for it.
    pub handoff_wait: Duration,
    pub limits: Limits,
}

impl Config {
    /// The longest a group of frames can be with the publisher: waiting for room in
    /// the in-flight budget, then for the broker.
    pub fn longest_publish(&self) -> Duration {
        crate::publisher::BUDGET_WAIT + self.publish_timeout
    }

    /// How sessions are held (see `sessions`).
    pub fn leases(&self) -> crate::sessions::Leases {
        crate::sessions::Leases {
            lease: self.session_lease,
            tick: self.session_tick,
            idle: self.session_idle,
            handoff_wait: self.handoff_wait,
            margin: self.longest_publish(),
        }
    }

    pub fn defaults() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8100)),
            database_url: Secret::new(""),
            kafka: KafkaSettings::new(DEFAULT_BOOTSTRAP, "clisonix-alba"),
            topic_prefix: String::new(),
            migrate: true,
            max_body_bytes: 16 * 1024 * 1024,
            max_recording_bytes: 2 * 1024 * 1024 * 1024,
            max_message_bytes: 4 * 1024 * 1024,
            max_in_flight_bytes: 128 * 1024 * 1024,
            producers: 2,
            publish_timeout: Duration::from_secs(10),
            retry_after: Duration::from_secs(2),
            usage_interval: Duration::from_secs(5),
            quota_refresh: Duration::from_secs(1),
            producer_stats_interval: Duration::from_secs(5),
            recording_frame_ms: 125,
            session_lease: Duration::from_secs(15),
            session_tick: Duration::from_millis(100),
            session_idle: Duration::from_secs(10),
            handoff_wait: Duration::from_secs(2),
            limits: Limits::default(),
        }
    }

    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// As [`Config::from_env`], reading variables through `var` (for tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut c = Config::defaults();
        let mut errors = Vec::new();
        let mut parse = |name: &str, apply: &mut dyn FnMut(&str) -> Result<(), String>| {
            if let Some(v) = var(name).filter(|v| !v.is_empty()) {
                if let Err(e) = apply(&v) {
                    errors.push(format!("{name}={v:?}: {e}"));
                }
            }
        };
        let number = |v: &str| v.parse::<u64>().map_err(|e| e.to_string());
        parse("CLISONIX_INGEST_LISTEN", &mut |v| {
            c.listen = v.parse().map_err(|e| format!("{e}"))?;
            Ok(())
        });
        parse("DATABASE_URL", &mut |v| {
            c.database_url = Secret::new(v);
            Ok(())
        });
        parse("CLISONIX_KAFKA_BOOTSTRAP", &mut |v| {
            c.kafka.bootstrap = v.to_owned();
            Ok(())
        });
        parse("CLISONIX_TOPIC_PREFIX", &mut |v| {
            c.topic_prefix = v.to_owned();
            Ok(())
        });
        parse("CLISONIX_MIGRATE", &mut |v| {
            c.migrate = v.parse().map_err(|_| "expected true or false".to_owned())?;
            Ok(())
        });
        parse("CLISONIX_INGEST_MAX_BODY_BYTES", &mut |v| {
            c.max_body_bytes = number(v)? as usize;
            Ok(())
        });
        parse("CLISONIX_INGEST_MAX_RECORDING_BYTES", &mut |v| {
            c.max_recording_bytes = number(v)? as usize;
            Ok(())
        });
        parse("CLISONIX_INGEST_MAX_IN_FLIGHT_BYTES", &mut |v| {
            c.max_in_flight_bytes = number(v)? as usize;
            Ok(())
        });
        parse("CLISONIX_INGEST_PRODUCERS", &mut |v| {
            c.producers = number(v)? as usize;
            Ok(())
        });
        parse("CLISONIX_INGEST_PUBLISH_TIMEOUT_MS", &mut |v| {
            c.publish_timeout = Duration::from_millis(number(v)?);
            Ok(())
        });
        parse("CLISONIX_INGEST_USAGE_INTERVAL_MS", &mut |v| {
            c.usage_interval = Duration::from_millis(number(v)?);
            Ok(())
        });
        parse("CLISONIX_INGEST_QUOTA_REFRESH_MS", &mut |v| {
            c.quota_refresh = Duration::from_millis(number(v)?.max(1));
            Ok(())
        });
        parse("CLISONIX_INGEST_PRODUCER_STATS_MS", &mut |v| {
            c.producer_stats_interval = Duration::from_millis(number(v)?);
            Ok(())
        });
        for (name, field) in [
            ("CLISONIX_INGEST_SESSION_LEASE_MS", &mut c.session_lease),
            ("CLISONIX_INGEST_SESSION_TICK_MS", &mut c.session_tick),
            ("CLISONIX_INGEST_SESSION_IDLE_MS", &mut c.session_idle),
            ("CLISONIX_INGEST_HANDOFF_WAIT_MS", &mut c.handoff_wait),
        ] {
            parse(name, &mut |v| {
                *field = Duration::from_millis(number(v)?);
                Ok(())
            });
        }
        parse("CLISONIX_INGEST_MAX_SAMPLE_RATE_HZ", &mut |v| {
            c.limits.max_sample_rate_hz = v.parse().map_err(|e| format!("{e}"))?;
            Ok(())
        });
        if c.database_url.expose().is_empty() {
            errors.push("DATABASE_URL is required (ingest verifies device keys and records sessions in Postgres)".into());
        }
        if c.publish_timeout < Duration::from_millis(1000) {
            errors.push("CLISONIX_INGEST_PUBLISH_TIMEOUT_MS must be at least 1000".into());
        }
        if !(1..=MAX_PRODUCERS).contains(&c.producers) {
            errors.push(format!(
                "CLISONIX_INGEST_PRODUCERS must be from 1 to {MAX_PRODUCERS}"
            ));
        }
        if c.producer_stats_interval > Duration::from_secs(86_400) {
            errors
                .push("CLISONIX_INGEST_PRODUCER_STATS_MS must be at most 86400000 (a day)".into());
        }
        if c.session_tick.is_zero() {
            errors.push("CLISONIX_INGEST_SESSION_TICK_MS must be above 0".into());
        }
        // A group starts only with more than its longest publish left on its lease,
        // which is renewed once a fifth of it is used.
        if c.session_lease.mul_f64(0.8) <= c.longest_publish() + c.session_tick * 2 {
            errors.push(
                "CLISONIX_INGEST_SESSION_LEASE_MS must be more than 5/4 of (the publish timeout + 1 s + two ticks)".into(),
            );
        }
        if c.max_in_flight_bytes < c.max_body_bytes {
            errors.push(
                "CLISONIX_INGEST_MAX_IN_FLIGHT_BYTES must be at least the largest body".into(),
            );
        }
        if errors.is_empty() {
            Ok(c)
        } else {
            Err(ConfigError(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_setting_is_reported_at_once() {
        let err = Config::from_vars(|name| match name {
            "CLISONIX_INGEST_LISTEN" => Some("nowhere".into()),
            "CLISONIX_INGEST_PUBLISH_TIMEOUT_MS" => Some("10".into()),
            "CLISONIX_INGEST_PRODUCER_STATS_MS" => Some("86400001".into()),
            "CLISONIX_INGEST_PRODUCERS" => Some("0".into()),
            "CLISONIX_MIGRATE" => Some("perhaps".into()),
            _ => None,
        })
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "CLISONIX_INGEST_LISTEN",
            "PUBLISH_TIMEOUT",
            "PRODUCER_STATS",
            "CLISONIX_INGEST_PRODUCERS",
            "CLISONIX_MIGRATE",
            "DATABASE_URL",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }

    #[test]
    fn a_lease_must_outlast_the_publish_timeout() {
        let with = |lease: &str| {
            Config::from_vars(|name| match name {
                "DATABASE_URL" => Some("postgres://x".into()),
                "CLISONIX_INGEST_PUBLISH_TIMEOUT_MS" => Some("4000".into()),
                "CLISONIX_INGEST_SESSION_LEASE_MS" => Some(lease.into()),
                _ => None,
            })
        };
        // A group starts only with more than its longest publish (4 s + the 1 s budget
        // wait) left, and the lease is renewed once a fifth of it is used: 4/5 of it
        // must exceed 5 s + 2 ticks.
        let err = with("6500").unwrap_err().to_string();
        assert!(err.contains("CLISONIX_INGEST_SESSION_LEASE_MS"), "{err}");
        let c = with("6550").unwrap();
        assert_eq!(c.leases().lease, Duration::from_millis(6550));
        assert_eq!(c.leases().margin, Duration::from_millis(5000));
        let d = Config::defaults();
        assert!(d.session_lease.mul_f64(0.8) > d.longest_publish() + d.session_tick * 2);
    }

    #[test]
    fn the_environment_overrides_defaults() {
        let c = Config::from_vars(|name| match name {
            "DATABASE_URL" => Some("postgres://x".into()),
            "CLISONIX_KAFKA_BOOTSTRAP" => Some("k:9092".into()),
            "CLISONIX_INGEST_PUBLISH_TIMEOUT_MS" => Some("2500".into()),
            "CLISONIX_INGEST_PRODUCER_STATS_MS" => Some("0".into()),
            "CLISONIX_INGEST_PRODUCERS" => Some("3".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.producers, 3);
        assert_eq!(c.kafka.bootstrap, "k:9092");
        assert_eq!(c.producer_stats_interval, Duration::ZERO);
        assert_eq!(c.publish_timeout, Duration::from_millis(2500));
        assert!(format!("{c:?}").contains("Secret(***)"));
    }
}
