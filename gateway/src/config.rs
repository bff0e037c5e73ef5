//! Configuration: defaults, then a JSON file (`CLISONIX_GATEWAY_CONFIG`), then
//! environment variables. Secrets are wrapped so they never print; in production mode
//! the gateway refuses a missing or default secret. Every invalid setting is reported
//! at once.

pub use clisonix_service::config::{ConfigError, Secret};

use std::net::SocketAddr;
use std::time::Duration;

/// The development signing secret; refused in production mode.
pub const DEV_JWT_SECRET: &str = "clisonix-development-secret-do-not-use-in-production";

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: Secret,
    pub jwt_secret: Secret,
    pub issuer: String,
    pub audience: String,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    /// `CLISONIX_ENV=production`: default secrets are refused.
    pub production: bool,
    /// Apply the database migrations at start.
    pub migrate: bool,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Log-in attempts allowed per account, and per client address, in 5 minutes.
    pub login_attempts_per_account: usize,
    pub login_attempts_per_ip: usize,
    /// Authenticated requests per minute per caller: members, and premium (premium,
    /// admin and owner roles), for a tenant whose plan cannot be read; the plan's
    /// rates apply otherwise.
    pub requests_per_minute_member: u32,
    pub requests_per_minute_premium: u32,
    /// Kafka, where requests on the results API are reported to metering as usage
    /// events (`usage.events`); without it they are not metered.
    pub kafka_bootstrap: Option<String>,
    pub topic_prefix: String,
    /// How often the counted requests are emitted.
    pub usage_interval: Duration,
    /// How often ended billing periods are invoiced (drafts recomputed, closed periods
    /// finalized); zero: never (another gateway instance does it).
    pub invoice_interval: Duration,
    /// The signing secrets of the Stripe webhook endpoint (`STRIPE_WEBHOOK_SECRET`,
    /// comma-separated while one rotates); none: the endpoint answers 404.
    pub stripe_webhook_secrets: Vec<Secret>,
    /// Stripe's secret API key (`STRIPE_SECRET_KEY`): with it, tenants pay through
    /// Stripe (checkout, portal, usage reported to meters); without it Clisonix's own
    /// invoices are the bill (self-hosted mode).
    pub stripe_secret_key: Option<Secret>,
    /// Stripe's API (`CLISONIX_STRIPE_API_BASE`; stripe-mock in development and tests).
    pub stripe_api_base: String,
    /// The Stripe price of each plan sold through Checkout (`CLISONIX_STRIPE_PRICES`,
    /// `pro=price_…,enterprise=price_…`).
    pub stripe_prices: Vec<(String, String)>,
    /// How often completed hours of usage are reported to Stripe's meters.
    pub stripe_report_interval: Duration,
    /// How often due webhooks are delivered (zero: not by this instance).
    pub webhook_interval: Duration,
    /// A failed webhook delivery's first retry; later ones double (at most an hour).
    pub webhook_first_retry: Duration,
    /// Webhook attempts in flight at once (`CLISONIX_WEBHOOK_CONCURRENCY`, 1 to 1000).
    pub webhook_concurrency: usize,
    /// Of those, at most this many to one endpoint
    /// (`CLISONIX_WEBHOOK_ENDPOINT_CONCURRENCY`, 1 to 100).
    pub webhook_endpoint_concurrency: i32,
    /// Where the sink writes audio chunks (`CLISONIX_AUDIO_STORE`: `file:///a/folder`
    /// or `s3://bucket[/prefix]`, the same as the sink's); without it only chunks
    /// stored inline in Postgres by earlier versions can be served.
    pub audio_store: Option<String>,
}

impl Config {
    /// The configured request rates `(member, premium)`: for tenants whose plan cannot
    /// be read (the plan's rates apply otherwise).
    pub fn rates(&self) -> (u32, u32) {
        (
            self.requests_per_minute_member,
            self.requests_per_minute_premium,
        )
    }

    /// Development defaults (no database URL).
    pub fn defaults() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            database_url: Secret::new(""),
            jwt_secret: Secret::new(DEV_JWT_SECRET),
            issuer: "clisonix".into(),
            audience: "clisonix-api".into(),
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            production: false,
            migrate: true,
            max_body_bytes: 64 * 1024,
            login_attempts_per_account: 10,
            login_attempts_per_ip: 100,
            requests_per_minute_member: 120,
            requests_per_minute_premium: 1200,
            kafka_bootstrap: None,
            topic_prefix: String::new(),
            usage_interval: Duration::from_secs(5),
            invoice_interval: Duration::from_secs(60),
            stripe_webhook_secrets: Vec::new(),
            stripe_secret_key: None,
            stripe_api_base: clisonix_billing::stripe::STRIPE_API.to_owned(),
            stripe_prices: Vec::new(),
            stripe_report_interval: Duration::from_secs(300),
            webhook_interval: Duration::from_secs(1),
            webhook_first_retry: Duration::from_secs(5),
            webhook_concurrency: 32,
            webhook_endpoint_concurrency: 4,
            audio_store: None,
        }
    }

    /// Defaults, overridden by the file `CLISONIX_GATEWAY_CONFIG` names (if any), then
    /// by `CLISONIX_*` variables and `DATABASE_URL`.
    pub fn from_env() -> Result<Config, ConfigError> {
        let file = match std::env::var("CLISONIX_GATEWAY_CONFIG") {
            Ok(path) if !path.is_empty() => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    ConfigError(vec![format!("CLISONIX_GATEWAY_CONFIG={path:?}: {e}")])
                })?;
                file_settings(&text).map_err(|errors| {
                    ConfigError(errors.into_iter().map(|e| format!("{path}: {e}")).collect())
                })?
            }
            _ => Default::default(),
        };
        Self::from_vars(|name| std::env::var(name).ok().or_else(|| file.get(name).cloned()))
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
        parse("CLISONIX_GATEWAY_LISTEN", &mut |v| {
            c.listen = v.parse().map_err(|e| format!("{e}"))?;
            Ok(())
        });
        parse("DATABASE_URL", &mut |v| {
            c.database_url = Secret::new(v);
            Ok(())
        });
        parse("CLISONIX_JWT_SECRET", &mut |v| {
            c.jwt_secret = Secret::new(v);
            Ok(())
        });
        parse("CLISONIX_JWT_ISSUER", &mut |v| {
            c.issuer = v.into();
            Ok(())
        });
        parse("CLISONIX_JWT_AUDIENCE", &mut |v| {
            c.audience = v.into();
            Ok(())
        });
        parse("CLISONIX_ACCESS_TTL_SECONDS", &mut |v| {
            c.access_ttl = Duration::from_secs(v.parse().map_err(|e| format!("{e}"))?);
            Ok(())
        });
        parse("CLISONIX_REFRESH_TTL_SECONDS", &mut |v| {
            c.refresh_ttl = Duration::from_secs(v.parse().map_err(|e| format!("{e}"))?);
            Ok(())
        });
        parse("CLISONIX_ENV", &mut |v| match v {
            "production" => {
                c.production = true;
                Ok(())
            }
            "development" => Ok(()),
            _ => Err("expected production or development".into()),
        });
        parse("CLISONIX_RATE_MEMBER_PER_MINUTE", &mut |v| {
            c.requests_per_minute_member = v.parse().map_err(|e| format!("{e}"))?;
            Ok(())
        });
        parse("CLISONIX_RATE_PREMIUM_PER_MINUTE", &mut |v| {
            c.requests_per_minute_premium = v.parse().map_err(|e| format!("{e}"))?;
            Ok(())
        });
        parse("CLISONIX_MIGRATE", &mut |v| {
            c.migrate = v.parse().map_err(|_| "expected true or false".to_owned())?;
            Ok(())
        });
        parse("CLISONIX_KAFKA_BOOTSTRAP", &mut |v| {
            c.kafka_bootstrap = Some(v.to_owned());
            Ok(())
        });
        parse("CLISONIX_TOPIC_PREFIX", &mut |v| {
            c.topic_prefix = v.to_owned();
            Ok(())
        });
        parse("CLISONIX_GATEWAY_USAGE_INTERVAL_MS", &mut |v| {
            let ms: u64 = v.parse().map_err(|e| format!("{e}"))?;
            c.usage_interval = Duration::from_millis(ms.max(10));
            Ok(())
        });
        parse("CLISONIX_INVOICE_INTERVAL_MS", &mut |v| {
            let ms: u64 = v.parse().map_err(|e| format!("{e}"))?;
            c.invoice_interval = Duration::from_millis(ms);
            Ok(())
        });
        parse("STRIPE_WEBHOOK_SECRET", &mut |v| {
            c.stripe_webhook_secrets = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Secret::new)
                .collect();
            Ok(())
        });
        parse("STRIPE_SECRET_KEY", &mut |v| {
            c.stripe_secret_key = Some(Secret::new(v));
            Ok(())
        });
        parse("CLISONIX_AUDIO_STORE", &mut |v| {
            clisonix_audio::AudioStore::from_url(v).map_err(|e| e.to_string())?;
            c.audio_store = Some(v.to_owned());
            Ok(())
        });
        parse("CLISONIX_STRIPE_API_BASE", &mut |v| {
            if !(v.starts_with("https://") || v.starts_with("http://")) {
                return Err("expected an http(s) URL".into());
            }
            c.stripe_api_base = v.to_owned();
            Ok(())
        });
        parse("CLISONIX_STRIPE_PRICES", &mut |v| {
            c.stripe_prices = v
                .split(',')
                .map(|pair| {
                    pair.trim()
                        .split_once('=')
                        .filter(|(plan, price)| !plan.is_empty() && !price.is_empty())
                        .map(|(plan, price)| (plan.to_owned(), price.to_owned()))
                        .ok_or_else(|| format!("{pair:?} is not plan_id=price_id"))
                })
                .collect::<Result<_, _>>()?;
            Ok(())
        });
        parse("CLISONIX_STRIPE_REPORT_INTERVAL_MS", &mut |v| {
            let ms: u64 = v.parse().map_err(|e| format!("{e}"))?;
            c.stripe_report_interval = Duration::from_millis(ms.max(1000));
            Ok(())
        });
        parse("CLISONIX_WEBHOOK_INTERVAL_MS", &mut |v| {
            c.webhook_interval = Duration::from_millis(v.parse().map_err(|e| format!("{e}"))?);
            Ok(())
        });
        parse("CLISONIX_WEBHOOK_FIRST_RETRY_MS", &mut |v| {
            let ms: u64 = v.parse().map_err(|e| format!("{e}"))?;
            c.webhook_first_retry = Duration::from_millis(ms.max(10));
            Ok(())
        });
        parse("CLISONIX_WEBHOOK_CONCURRENCY", &mut |v| {
            let n: usize = v.parse().map_err(|e| format!("{e}"))?;
            if !(1..=1000).contains(&n) {
                return Err("must be 1 to 1000".into());
            }
            c.webhook_concurrency = n;
            Ok(())
        });
        parse("CLISONIX_WEBHOOK_ENDPOINT_CONCURRENCY", &mut |v| {
            let n: i32 = v.parse().map_err(|e| format!("{e}"))?;
            if !(1..=100).contains(&n) {
                return Err("must be 1 to 100".into());
            }
            c.webhook_endpoint_concurrency = n;
            Ok(())
        });
        if c.database_url.expose().is_empty() {
            errors.push("DATABASE_URL is not set".into());
        }
        if c.production {
            let s = c.jwt_secret.expose();
            if s == DEV_JWT_SECRET || var("CLISONIX_JWT_SECRET").is_none() {
                errors
                    .push("CLISONIX_JWT_SECRET must be set in production (not the default)".into());
            } else if s.len() < 32 {
                errors.push("CLISONIX_JWT_SECRET must be at least 32 bytes".into());
            }
        }
        if errors.is_empty() {
            Ok(c)
        } else {
            Err(ConfigError(errors))
        }
    }
}

/// The file's keys and the variables they stand for.
const FILE_KEYS: [(&str, &str); 11] = [
    ("listen", "CLISONIX_GATEWAY_LISTEN"),
    ("database_url", "DATABASE_URL"),
    ("jwt_secret", "CLISONIX_JWT_SECRET"),
    ("jwt_issuer", "CLISONIX_JWT_ISSUER"),
    ("jwt_audience", "CLISONIX_JWT_AUDIENCE"),
    ("access_ttl_seconds", "CLISONIX_ACCESS_TTL_SECONDS"),
    ("refresh_ttl_seconds", "CLISONIX_REFRESH_TTL_SECONDS"),
    ("env", "CLISONIX_ENV"),
    ("migrate", "CLISONIX_MIGRATE"),
    ("rate_member_per_minute", "CLISONIX_RATE_MEMBER_PER_MINUTE"),
    (
        "rate_premium_per_minute",
        "CLISONIX_RATE_PREMIUM_PER_MINUTE",
    ),
];

/// Reads a configuration file: a JSON object of the keys in [`FILE_KEYS`], returned by
/// the names of the variables they stand for (which override them).
pub fn file_settings(text: &str) -> Result<std::collections::HashMap<String, String>, Vec<String>> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| vec![format!("not JSON: {e}")])?;
    let object = value
        .as_object()
        .ok_or_else(|| vec!["expected a JSON object".to_owned()])?;
    let mut out = std::collections::HashMap::new();
    let mut errors = Vec::new();
    for (key, value) in object {
        let Some((_, var)) = FILE_KEYS.iter().find(|(k, _)| k == key) else {
            errors.push(format!("unknown setting {key:?}"));
            continue;
        };
        let text = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            other => {
                errors.push(format!(
                    "{key}: expected a string, number or boolean, got {other}"
                ));
                continue;
            }
        };
        out.insert((*var).to_owned(), text);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn production_refuses_default_or_short_secrets_and_reports_everything() {
        let err = from(&[("CLISONIX_ENV", "production")]).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        let err = from(&[
            ("CLISONIX_ENV", "production"),
            ("DATABASE_URL", "postgres://x"),
            ("CLISONIX_JWT_SECRET", DEV_JWT_SECRET),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("not the default"));
        let err = from(&[
            ("CLISONIX_ENV", "production"),
            ("DATABASE_URL", "postgres://x"),
            ("CLISONIX_JWT_SECRET", "short"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("32 bytes"));
        let ok = from(&[
            ("CLISONIX_ENV", "production"),
            ("DATABASE_URL", "postgres://x"),
            ("CLISONIX_JWT_SECRET", &"k".repeat(40)),
        ])
        .unwrap();
        assert!(ok.production);
        assert_eq!(format!("{:?}", ok.jwt_secret), "Secret(***)");
    }

    #[test]
    fn the_file_layer_sits_between_defaults_and_environment() {
        let file = file_settings(r#"{"jwt_issuer": "from-file", "access_ttl_seconds": 60, "migrate": false, "database_url": "postgres://file"}"#).unwrap();
        let env: HashMap<&str, &str> = HashMap::from([("CLISONIX_JWT_ISSUER", "from-env")]);
        let c = Config::from_vars(|k| {
            env.get(k)
                .map(|v| v.to_string())
                .or_else(|| file.get(k).cloned())
        })
        .unwrap();
        assert_eq!(c.issuer, "from-env", "the environment wins");
        assert_eq!(
            c.access_ttl,
            Duration::from_secs(60),
            "the file beats the default"
        );
        assert!(!c.migrate);
        assert_eq!(c.audience, "clisonix-api", "the default stays");
        let errors = file_settings(r#"{"jwt_isuer": "typo", "listen": [1]}"#).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(file_settings("not json").is_err());
    }

    #[test]
    fn bad_values_are_named() {
        let err = from(&[
            ("DATABASE_URL", "postgres://x"),
            ("CLISONIX_ACCESS_TTL_SECONDS", "soon"),
            ("CLISONIX_GATEWAY_LISTEN", "here"),
        ])
        .unwrap_err();
        assert_eq!(err.0.len(), 2);
        assert!(err.to_string().contains("CLISONIX_ACCESS_TTL_SECONDS"));
    }
}
