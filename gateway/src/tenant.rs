//! Routes of a tenant's administration: API keys, the audit log, and the caller's
//! password. Every query is scoped by the caller's tenant, so another tenant's rows
//! are simply not found (404), never shown.

use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::accounts::{audit, ApiJson};
use crate::auth::{self, Caller};
use crate::error::ApiError;
use crate::keys::{self, Scope};
use crate::startup::AppState;

/// Roles, from least to most: member, premium, admin, owner.
pub fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    match caller.0.role.as_str() {
        "admin" | "owner" => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this needs the admin role",
        )),
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKeyRequest {
    pub name: String,
    pub scopes: Vec<String>,
    /// Days until the key expires (none: it does not).
    pub expires_in_days: Option<u32>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedKey {
    pub id: Uuid,
    /// The key itself: shown only in this answer.
    pub key: String,
    pub prefix: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct KeyInfo {
    pub id: Uuid,
    pub prefix: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

type Peer = ConnectInfo<std::net::SocketAddr>;

#[utoipa::path(post, path = "/v1/api-keys", tag = "api keys", security(("bearer" = [])), request_body = NewKeyRequest, responses((status = 201, description = "The key, shown only here", body = CreatedKey), (status = 401, description = "Missing, invalid or expired token", body = crate::openapi::ErrorBody), (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody), (status = 400, description = "Malformed JSON", body = crate::openapi::ErrorBody), (status = 422, description = "A field is invalid", body = crate::openapi::ErrorBody)))]
/// `POST /v1/api-keys` (admin).
pub async fn create_key(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    caller: Caller,
    ApiJson(body): ApiJson<NewKeyRequest>,
) -> Result<impl IntoResponse, ApiError> {
    require_admin(&caller)?;
    let name = body.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "name must be 1 to 100 characters",
        )
        .field("name"));
    }
    let mut scopes: Vec<Scope> = Vec::new();
    for s in &body.scopes {
        let scope = Scope::parse(s).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                format!("unknown scope {s:?}: ingest, read or admin"),
            )
            .field("scopes")
        })?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    if scopes.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "at least one scope",
        )
        .field("scopes"));
    }
    scopes.sort();
    let scopes: Vec<String> = scopes.iter().map(|s| s.as_str().to_owned()).collect();
    let expires_at = body
        .expires_in_days
        .map(|d| Utc::now() + ChronoDuration::days(i64::from(d.clamp(1, 3650))));
    let key = keys::new_key();
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, created_by, name, prefix, key_hash, scopes, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(key.id)
    .bind(caller.0.tid)
    .bind(caller.0.sub)
    .bind(&name)
    .bind(&key.prefix)
    .bind(&key.hash)
    .bind(&scopes)
    .bind(expires_at)
    .execute(&state.pool)
    .await?;
    audit(
        &state,
        Some(caller.0.tid),
        Some(caller.0.sub),
        "api_key_created",
        serde_json::json!({"key_id": key.id, "prefix": key.prefix, "scopes": scopes}),
        &peer.ip().to_string(),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            id: key.id,
            key: key.key,
            prefix: key.prefix,
            name,
            scopes,
            expires_at,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/api-keys", tag = "api keys", security(("bearer" = [])), responses((status = 200, body = [KeyInfo]), (status = 401, description = "Missing, invalid or expired token", body = crate::openapi::ErrorBody), (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody)))]
/// `GET /v1/api-keys` (admin): the tenant's keys, without secrets.
pub async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<KeyInfo>>, ApiError> {
    require_admin(&caller)?;
    let keys = sqlx::query_as::<_, KeyInfo>(
        "SELECT id, prefix, name, scopes, expires_at, revoked_at, last_used_at, created_at FROM api_keys WHERE tenant_id = $1 ORDER BY created_at DESC",
    )
    .bind(caller.0.tid)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(keys))
}

#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "api keys", security(("bearer" = [])), params(("id" = uuid::Uuid, Path, description = "The key")), responses((status = 204, description = "Revoked"), (status = 404, description = "No such active key in this tenant", body = crate::openapi::ErrorBody), (status = 401, description = "Missing, invalid or expired token", body = crate::openapi::ErrorBody), (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody)))]
/// `DELETE /v1/api-keys/{id}` (admin): revokes at once (verifiers notice within
/// their cache time, a few seconds).
pub async fn revoke_key(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    require_admin(&caller)?;
    let revoked = sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND tenant_id = $2 AND revoked_at IS NULL")
        .bind(id)
        .bind(caller.0.tid)
        .execute(&state.pool)
        .await?;
    if revoked.rows_affected() == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such active key",
        ));
    }
    audit(
        &state,
        Some(caller.0.tid),
        Some(caller.0.sub),
        "api_key_revoked",
        serde_json::json!({"key_id": id}),
        &peer.ip().to_string(),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub user_id: Option<Uuid>,
    pub action: String,
    #[schema(value_type = Object)]
    pub detail: sqlx::types::Json<serde_json::Value>,
    pub ip: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[utoipa::path(get, path = "/v1/audit", tag = "tenant", security(("bearer" = [])), responses((status = 200, body = [AuditEntry]), (status = 401, description = "Missing, invalid or expired token", body = crate::openapi::ErrorBody), (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody)))]
/// `GET /v1/audit` (admin): the tenant's latest 200 security events.
pub async fn audit_log(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    require_admin(&caller)?;
    let entries = sqlx::query_as::<_, AuditEntry>(
        "SELECT id, user_id, action, detail, ip, created_at FROM audit_log WHERE tenant_id = $1 ORDER BY id DESC LIMIT 200",
    )
    .bind(caller.0.tid)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(entries))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    pub current_password: String,
    pub new_password: String,
}

#[utoipa::path(post, path = "/v1/auth/password", tag = "auth", security(("bearer" = [])), request_body = PasswordChange, responses((status = 204, description = "Changed; every session ended"), (status = 403, description = "The current password is wrong", body = crate::openapi::ErrorBody), (status = 401, description = "Missing, invalid or expired token", body = crate::openapi::ErrorBody), (status = 400, description = "Malformed JSON", body = crate::openapi::ErrorBody), (status = 422, description = "A field is invalid", body = crate::openapi::ErrorBody)))]
/// `POST /v1/auth/password`: changes the caller's password and ends every session
/// (all refresh tokens are revoked).
pub async fn change_password(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    caller: Caller,
    ApiJson(body): ApiJson<PasswordChange>,
) -> Result<StatusCode, ApiError> {
    auth::check_password(&body.new_password, "new_password")?;
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
        .bind(caller.0.sub)
        .fetch_optional(&state.pool)
        .await?
        .ok_or_else(|| ApiError::unauthorized("the account no longer exists"))?;
    if !auth::verify_password(body.current_password, hash).await? {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "wrong_password",
            "the current password is wrong",
        )
        .field("current_password"));
    }
    let new_hash = auth::hash_password(body.new_password).await?;
    let mut tx = state.pool.begin().await?;
    sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
        .bind(new_hash)
        .bind(caller.0.sub)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(caller.0.sub)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    audit(
        &state,
        Some(caller.0.tid),
        Some(caller.0.sub),
        "password_changed",
        serde_json::json!({}),
        &peer.ip().to_string(),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
