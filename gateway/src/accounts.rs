//! Sign-up, log-in, refresh, log-out and the caller's identity.

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{Duration as ChronoDuration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::{self, Caller, Claims};
use crate::error::ApiError;
use crate::startup::AppState;

/// Request bodies are parsed with this, so every parse error has the API's shape.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for ApiJson<T>
where
    Json<T>: axum::extract::FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| ApiJson(v))
            .map_err(ApiError::from)
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignUp {
    pub email: String,
    pub password: String,
    pub tenant_name: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogIn {
    pub email: String,
    pub password: String,
    /// The tenant to act in, for users of several (default: their oldest membership).
    pub tenant_id: Option<Uuid>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Tokens {
    pub user_id: Uuid,
    pub tenant_id: Uuid,
    pub role: String,
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub refresh_token: String,
}

type Peer = ConnectInfo<std::net::SocketAddr>;

/// Appends to the audit log.
pub async fn audit(
    state: &AppState,
    tenant: Option<Uuid>,
    user: Option<Uuid>,
    action: &str,
    detail: serde_json::Value,
    ip: &str,
) -> Result<(), ApiError> {
    sqlx::query("INSERT INTO audit_log (tenant_id, user_id, action, detail, ip) VALUES ($1, $2, $3, $4, $5)")
        .bind(tenant)
        .bind(user)
        .bind(action)
        .bind(sqlx::types::Json(detail))
        .bind(ip)
        .execute(&state.pool)
        .await?;
    Ok(())
}

/// Issues an access token and starts (or continues) a refresh-token family.
pub async fn issue_tokens(
    state: &AppState,
    user: Uuid,
    tenant: Uuid,
    role: &str,
    family: Option<Uuid>,
) -> Result<Tokens, ApiError> {
    let now = auth::now_secs();
    let ttl = state.config.access_ttl.as_secs();
    let claims = Claims {
        iss: state.config.issuer.clone(),
        aud: state.config.audience.clone(),
        sub: user,
        tid: tenant,
        role: role.to_owned(),
        iat: now,
        nbf: now,
        exp: now + ttl,
        jti: Uuid::new_v4(),
    };
    let access_token = state.keys.issue(&claims)?;
    let (refresh_token, hash) = auth::new_refresh_token();
    let expires = Utc::now() + ChronoDuration::seconds(state.config.refresh_ttl.as_secs() as i64);
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, family_id, user_id, tenant_id, expires_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(hash)
    .bind(family.unwrap_or_else(Uuid::new_v4))
    .bind(user)
    .bind(tenant)
    .bind(expires)
    .execute(&state.pool)
    .await?;
    Ok(Tokens {
        user_id: user,
        tenant_id: tenant,
        role: role.to_owned(),
        access_token,
        token_type: "Bearer",
        expires_in: ttl,
        refresh_token,
    })
}

#[utoipa::path(post, path = "/v1/auth/signup", tag = "auth", request_body = SignUp, responses((status = 201, description = "The tenant, its owner and their tokens", body = Tokens), (status = 409, description = "The email has an account", body = crate::openapi::ErrorBody), (status = 400, description = "Malformed JSON", body = crate::openapi::ErrorBody), (status = 422, description = "A field is invalid", body = crate::openapi::ErrorBody)))]
/// `POST /v1/auth/signup`: a new tenant and its owner.
pub async fn signup(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    ApiJson(body): ApiJson<SignUp>,
) -> Result<impl IntoResponse, ApiError> {
    let email = auth::normalize_email(&body.email)?;
    auth::check_password(&body.password, "password")?;
    let tenant_name = body.tenant_name.trim();
    if tenant_name.is_empty() || tenant_name.chars().count() > 200 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "tenant_name must be 1 to 200 characters",
        )
        .field("tenant_name"));
    }
    let hash = auth::hash_password(body.password).await?;
    let (user, tenant) = (Uuid::new_v4(), Uuid::new_v4());
    let mut tx = state.pool.begin().await?;
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
        .bind(tenant)
        .bind(tenant_name)
        .execute(&mut *tx)
        .await?;
    let inserted = sqlx::query("INSERT INTO users (id, email, password_hash) VALUES ($1, $2, $3) ON CONFLICT (email) DO NOTHING")
        .bind(user)
        .bind(&email)
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "email_taken",
            "an account with this email exists",
        )
        .field("email"));
    }
    sqlx::query("INSERT INTO memberships (tenant_id, user_id, role) VALUES ($1, $2, 'owner')")
        .bind(tenant)
        .bind(user)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    audit(
        &state,
        Some(tenant),
        Some(user),
        "signup",
        serde_json::json!({"email": email}),
        &peer.ip().to_string(),
    )
    .await?;
    let tokens = issue_tokens(&state, user, tenant, "owner", None).await?;
    Ok((StatusCode::CREATED, Json(tokens)))
}

#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = LogIn, responses((status = 200, body = Tokens), (status = 401, description = "Wrong email or password", body = crate::openapi::ErrorBody), (status = 429, description = "Too many attempts", body = crate::openapi::ErrorBody), (status = 400, description = "Malformed JSON", body = crate::openapi::ErrorBody), (status = 422, description = "A field is invalid", body = crate::openapi::ErrorBody)))]
/// `POST /v1/auth/login`.
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    ApiJson(body): ApiJson<LogIn>,
) -> Result<Json<Tokens>, ApiError> {
    let email = auth::normalize_email(&body.email)?;
    let ip = peer.ip().to_string();
    if let Err(wait) = state.login_limits.attempt(&email, &ip) {
        return Err(ApiError::too_many(
            "too_many_attempts",
            format!("too many log-in attempts; retry in {wait} s"),
            wait,
        ));
    }
    let account: Option<(Uuid, String)> =
        sqlx::query_as("SELECT id, password_hash FROM users WHERE email = $1")
            .bind(&email)
            .fetch_optional(&state.pool)
            .await?;
    let (hash, user) = match &account {
        Some((id, hash)) => (hash.clone(), Some(*id)),
        None => (auth::dummy_hash().to_owned(), None),
    };
    let valid = auth::verify_password(body.password, hash).await? && user.is_some();
    let membership: Option<(Uuid, String)> = match user {
        Some(user) if valid => {
            sqlx::query_as(
                "SELECT tenant_id, role FROM memberships WHERE user_id = $1 AND ($2::uuid IS NULL OR tenant_id = $2) ORDER BY created_at LIMIT 1",
            )
            .bind(user)
            .bind(body.tenant_id)
            .fetch_optional(&state.pool)
            .await?
        }
        _ => None,
    };
    let Some((tenant, role)) = membership else {
        audit(
            &state,
            None,
            user,
            "login_failed",
            serde_json::json!({"email": email}),
            &ip,
        )
        .await?;
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "wrong email or password",
        ));
    };
    let user = user.expect("valid implies a user");
    audit(
        &state,
        Some(tenant),
        Some(user),
        "login",
        serde_json::json!({}),
        &ip,
    )
    .await?;
    Ok(Json(issue_tokens(&state, user, tenant, &role, None).await?))
}

#[utoipa::path(post, path = "/v1/auth/refresh", tag = "auth", request_body = RefreshRequest, responses((status = 200, description = "New tokens; the presented refresh token stops working", body = Tokens), (status = 401, description = "Missing, invalid or expired token", body = crate::openapi::ErrorBody), (status = 400, description = "Malformed JSON", body = crate::openapi::ErrorBody), (status = 422, description = "A field is invalid", body = crate::openapi::ErrorBody)))]
/// `POST /v1/auth/refresh`: a new access token and a new refresh token; the old
/// refresh token stops working. Presenting a replaced token revokes its whole family.
pub async fn refresh(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<Json<Tokens>, ApiError> {
    let hash = auth::token_hash(&body.refresh_token);
    let mut tx = state.pool.begin().await?;
    type Row = (
        Uuid,
        Uuid,
        Uuid,
        chrono::DateTime<Utc>,
        Option<chrono::DateTime<Utc>>,
        Option<chrono::DateTime<Utc>>,
    );
    let row: Option<Row> = sqlx::query_as(
        "SELECT family_id, user_id, tenant_id, expires_at, replaced_at, revoked_at FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE",
    )
    .bind(&hash)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((family, user, tenant, expires, replaced, revoked)) = row else {
        return Err(ApiError::unauthorized("unknown refresh token"));
    };
    if replaced.is_some() {
        sqlx::query("UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL")
            .bind(family)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        audit(
            &state,
            Some(tenant),
            Some(user),
            "refresh_token_reused",
            serde_json::json!({"family": family}),
            &peer.ip().to_string(),
        )
        .await?;
        return Err(ApiError::unauthorized(
            "refresh token already used; its sessions are revoked",
        ));
    }
    if revoked.is_some() || expires < Utc::now() {
        return Err(ApiError::unauthorized("refresh token expired or revoked"));
    }
    sqlx::query("UPDATE refresh_tokens SET replaced_at = now() WHERE token_hash = $1")
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
    let role: Option<String> =
        sqlx::query_scalar("SELECT role FROM memberships WHERE user_id = $1 AND tenant_id = $2")
            .bind(user)
            .bind(tenant)
            .fetch_optional(&mut *tx)
            .await?;
    tx.commit().await?;
    let role = role.ok_or_else(|| ApiError::unauthorized("no longer a member of this tenant"))?;
    Ok(Json(
        issue_tokens(&state, user, tenant, &role, Some(family)).await?,
    ))
}

#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth", request_body = RefreshRequest, responses((status = 204, description = "The session family is revoked"), (status = 401, description = "Missing, invalid or expired token", body = crate::openapi::ErrorBody), (status = 400, description = "Malformed JSON", body = crate::openapi::ErrorBody), (status = 422, description = "A field is invalid", body = crate::openapi::ErrorBody)))]
/// `POST /v1/auth/logout`: revokes the refresh token's family.
pub async fn logout(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    let hash = auth::token_hash(&body.refresh_token);
    let revoked = sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = (SELECT family_id FROM refresh_tokens WHERE token_hash = $1) AND revoked_at IS NULL",
    )
    .bind(&hash)
    .execute(&state.pool)
    .await?;
    if revoked.rows_affected() == 0 {
        return Err(ApiError::unauthorized(
            "unknown or already revoked refresh token",
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Me {
    pub user_id: Uuid,
    pub email: String,
    pub tenant_id: Uuid,
    pub tenant_name: String,
    pub role: String,
}

#[utoipa::path(get, path = "/v1/me", tag = "auth", security(("bearer" = [])), responses((status = 200, body = Me), (status = 401, description = "Missing, invalid or expired token", body = crate::openapi::ErrorBody)))]
/// `GET /v1/me`: who the access token speaks for.
pub async fn me(
    State(state): State<AppState>,
    Caller(claims): Caller,
) -> Result<Json<Me>, ApiError> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT u.email, t.name FROM users u JOIN memberships m ON m.user_id = u.id JOIN tenants t ON t.id = m.tenant_id WHERE u.id = $1 AND t.id = $2",
    )
    .bind(claims.sub)
    .bind(claims.tid)
    .fetch_optional(&state.pool)
    .await?;
    let (email, tenant_name) =
        row.ok_or_else(|| ApiError::unauthorized("the account no longer exists"))?;
    Ok(Json(Me {
        user_id: claims.sub,
        email,
        tenant_id: claims.tid,
        tenant_name,
        role: claims.role,
    }))
}
