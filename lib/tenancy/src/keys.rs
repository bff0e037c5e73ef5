//! API keys: creation (the key is shown once), hashing, and verification with a short
//! cache. Other services (ingest) verify device keys with [`KeyVerifier`]; a revoked
//! key stops working everywhere within [`KeyVerifier::CACHE_TTL`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use sha2::{Digest, Sha256};

/// The SHA-256 of a token: what is stored of API keys (and of the gateway's refresh
/// tokens and invitations) instead of the token itself.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Send frames (devices).
    Ingest,
    /// Read results.
    Read,
    /// Manage the tenant.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "ingest" => Some(Scope::Ingest),
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// A freshly made key: the secret (to show once) and what is stored.
#[derive(Debug)]
pub struct NewKey {
    pub id: Uuid,
    pub key: String,
    pub prefix: String,
    pub hash: Vec<u8>,
}

/// Makes a key `ck_<8 hex>_<64 hex>`; its prefix `ck_<8 hex>` identifies it in listings.
pub fn new_key() -> NewKey {
    let id = Uuid::new_v4();
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut secret = Vec::with_capacity(32);
    secret.extend_from_slice(Uuid::new_v4().as_bytes());
    secret.extend_from_slice(Uuid::new_v4().as_bytes());
    let prefix = format!("ck_{}", &hex(id.as_bytes())[..8]);
    let key = format!("{prefix}_{}", hex(&secret));
    NewKey {
        id,
        hash: token_hash(&key),
        key,
        prefix,
    }
}

/// A key that checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedKey {
    pub key_id: Uuid,
    pub tenant_id: Uuid,
    pub scopes: Vec<Scope>,
}

impl VerifiedKey {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// Why a key was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("unknown API key")]
    Unknown,
    #[error("the API key was revoked")]
    Revoked,
    #[error("the API key expired")]
    Expired,
    #[error("the database failed: {0}")]
    Database(#[from] sqlx::Error),
}

#[derive(Debug, sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    tenant_id: Uuid,
    scopes: Vec<String>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

type CacheEntry = (
    Result<(VerifiedKey, Option<DateTime<Utc>>), KeyFailure>,
    Instant,
);

#[derive(Debug, Clone, Copy)]
enum KeyFailure {
    Unknown,
    Revoked,
}

/// Verifies API keys against the database, caching answers for a few seconds.
#[derive(Debug)]
pub struct KeyVerifier {
    pool: PgPool,
    cache: Mutex<HashMap<Vec<u8>, CacheEntry>>,
    /// Last-used times are written at most this often per key.
    touched: Mutex<HashMap<Uuid, Instant>>,
}

impl KeyVerifier {
    /// How long an answer is reused: the longest a revoked key keeps working.
    pub const CACHE_TTL: Duration = Duration::from_secs(2);
    const TOUCH_EVERY: Duration = Duration::from_secs(60);

    pub fn new(pool: PgPool) -> KeyVerifier {
        KeyVerifier {
            pool,
            cache: Mutex::new(HashMap::new()),
            touched: Mutex::new(HashMap::new()),
        }
    }

    pub async fn verify(&self, key: &str) -> Result<VerifiedKey, KeyError> {
        let hash = token_hash(key);
        let cached = {
            let cache = self.cache.lock().expect("not poisoned");
            cache
                .get(&hash)
                .filter(|(_, at)| at.elapsed() < Self::CACHE_TTL)
                .map(|(answer, _)| answer.clone())
        };
        let answer = match cached {
            Some(answer) => answer,
            None => {
                let row: Option<KeyRow> =
                    sqlx::query_as(
                        "SELECT id, tenant_id, scopes, expires_at, revoked_at FROM api_keys WHERE key_hash = $1",
                    )
                    .bind(&hash)
                    .fetch_optional(&self.pool)
                    .await?;
                let answer = match row {
                    None => Err(KeyFailure::Unknown),
                    Some(row) if row.revoked_at.is_some() => Err(KeyFailure::Revoked),
                    Some(row) => Ok((
                        VerifiedKey {
                            key_id: row.id,
                            tenant_id: row.tenant_id,
                            scopes: row.scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
                        },
                        row.expires_at,
                    )),
                };
                let mut cache = self.cache.lock().expect("not poisoned");
                if cache.len() > 100_000 {
                    cache.clear();
                }
                cache.insert(hash, (answer.clone(), Instant::now()));
                answer
            }
        };
        let (verified, expires) = match answer {
            Ok(ok) => ok,
            Err(KeyFailure::Unknown) => return Err(KeyError::Unknown),
            Err(KeyFailure::Revoked) => return Err(KeyError::Revoked),
        };
        if expires.is_some_and(|e| e <= Utc::now()) {
            return Err(KeyError::Expired);
        }
        self.touch(verified.key_id).await;
        Ok(verified)
    }

    /// Records the key's last use (at most once a minute per key, best effort).
    async fn touch(&self, key_id: Uuid) {
        let due = {
            let mut touched = self.touched.lock().expect("not poisoned");
            let due = touched
                .get(&key_id)
                .is_none_or(|at| at.elapsed() >= Self::TOUCH_EVERY);
            if due {
                touched.insert(key_id, Instant::now());
            }
            due
        };
        if due {
            if let Err(error) =
                sqlx::query("UPDATE api_keys SET last_used_at = now() WHERE id = $1")
                    .bind(key_id)
                    .execute(&self.pool)
                    .await
            {
                tracing::warn!(%error, %key_id, "recording an API key's last use failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_a_visible_prefix_and_are_stored_hashed() {
        let k = new_key();
        assert!(k.key.starts_with(&format!("{}_", k.prefix)));
        assert_eq!(k.prefix.len(), 11);
        assert_eq!(k.key.len(), 11 + 1 + 64);
        assert_eq!(k.hash, token_hash(&k.key));
        assert_ne!(new_key().key, k.key);
    }
}
