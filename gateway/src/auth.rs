//! Credentials: email and password rules, argon2id hashing, access tokens (JWT, HS256
//! pinned, with issuer, audience, expiry and not-before checked) and refresh tokens
//! (random, stored only as SHA-256 hashes).

use std::time::{SystemTime, UNIX_EPOCH};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::Config;
use crate::error::ApiError;
use crate::startup::AppState;

/// Normalises an email (trimmed, lowercase) and checks its shape.
pub fn normalize_email(raw: &str) -> Result<String, ApiError> {
    let email = raw.trim().to_lowercase();
    let valid = email.len() <= 254
        && email.split('@').count() == 2
        && email.split('@').all(|part| !part.is_empty())
        && email
            .rsplit('@')
            .next()
            .is_some_and(|domain| domain.contains('.'))
        && !email.chars().any(char::is_whitespace);
    if valid {
        Ok(email)
    } else {
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_email",
            "not a valid email address",
        )
        .field("email"))
    }
}

/// Minimum strength: 12 to 1024 characters, from at least three of lowercase,
/// uppercase, digits and other characters.
pub fn check_password(password: &str, field: &str) -> Result<(), ApiError> {
    let classes = [
        password.chars().any(|c| c.is_lowercase()),
        password.chars().any(|c| c.is_uppercase()),
        password.chars().any(|c| c.is_ascii_digit()),
        password.chars().any(|c| !c.is_alphanumeric()),
    ]
    .iter()
    .filter(|&&has| has)
    .count();
    let length = password.chars().count();
    if !(12..=1024).contains(&length) || classes < 3 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "weak_password",
            "a password needs 12 or more characters from at least three of: lowercase, uppercase, digits, symbols",
        )
        .field(field));
    }
    Ok(())
}

/// Hashes a password with argon2id (off the async reactor: it is deliberately slow).
pub async fn hash_password(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(ApiError::internal)
    })
    .await
    .map_err(ApiError::internal)?
}

/// Checks a password against a stored hash (constant work whether or not it matches).
pub async fn verify_password(password: String, hash: String) -> Result<bool, ApiError> {
    tokio::task::spawn_blocking(move || {
        let parsed = PasswordHash::new(&hash).map_err(ApiError::internal)?;
        Ok(Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok())
    })
    .await
    .map_err(ApiError::internal)?
}

/// A hash to verify against when the account does not exist, so a login takes as long
/// for an unknown email as for a wrong password.
pub fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        Argon2::default()
            .hash_password(b"not-a-real-password")
            .expect("hashing works")
            .to_string()
    })
}

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// The user.
    pub sub: Uuid,
    /// The tenant the token acts in.
    pub tid: Uuid,
    pub role: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: Uuid,
}

/// Signing and verification keys, built once.
#[derive(Clone)]
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(***)")
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Keys {
    pub fn new(config: &Config) -> Keys {
        let secret = config.jwt_secret.expose().as_bytes();
        // Pinned: HS256 only (so `none` and every other algorithm fail), issuer,
        // audience, expiry and not-before all required and checked.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        Keys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn issue(&self, claims: &Claims) -> Result<String, ApiError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(ApiError::internal)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| ApiError::unauthorized(format!("invalid access token: {e}")))
    }
}

/// A new refresh token and its stored hash.
pub fn new_refresh_token() -> (String, Vec<u8>) {
    let mut bytes = Vec::with_capacity(32);
    bytes.extend_from_slice(Uuid::new_v4().as_bytes());
    bytes.extend_from_slice(Uuid::new_v4().as_bytes());
    let token = format!("rt_{}", hex(&bytes));
    let hash = token_hash(&token);
    (token, hash)
}

pub use clisonix_tenancy::keys::token_hash;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The authenticated caller of a route (from `Authorization: Bearer <access token>`).
#[derive(Debug, Clone)]
pub struct Caller(pub Claims);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::unauthorized("missing Authorization header"))?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| ApiError::unauthorized("expected a Bearer token"))?;
        let claims = state.keys.verify(token)?;
        // The tenant's plan sets the rates; premium users (and admins) get its higher one.
        let (member, premium) = state
            .plan_rates
            .of(&state.pool, claims.tid, state.config.rates())
            .await;
        let per_minute = match claims.role.as_str() {
            "member" => member,
            _ => premium,
        };
        state
            .request_limits
            .take((claims.tid, claims.sub), per_minute)
            .map_err(|wait| {
                ApiError::too_many(
                    "rate_limited",
                    format!("too many requests; retry in {wait} s"),
                    wait,
                )
            })?;
        Ok(Caller(claims))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            normalize_email("  Ada@Example.ORG ").unwrap(),
            "ada@example.org"
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.org",
            "a@b@c.org",
            "ada@localhost",
            "a da@x.org",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn weak_passwords_are_refused() {
        for weak in [
            "short1A!",
            "alllowercaseletters",
            "ALLUPPER123456",
            "123456789012",
        ] {
            assert!(check_password(weak, "password").is_err(), "{weak}");
        }
        check_password("Correct horse 42", "password").unwrap();
    }
}
