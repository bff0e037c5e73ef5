//! A tenant's members: listing, role changes, invitations and accepting them.

use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::accounts::{audit, issue_tokens, ApiJson, Tokens};
use crate::auth::{self, Caller};
use crate::error::ApiError;
use crate::startup::AppState;
use crate::tenant::require_admin;

type Peer = ConnectInfo<std::net::SocketAddr>;

/// Roles an admin may grant (ownership is not granted, only created with a tenant).
fn grantable(role: &str) -> Result<&str, ApiError> {
    match role {
        "member" | "premium" | "admin" => Ok(role),
        _ => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "role must be member, premium or admin",
        )
        .field("role")),
    }
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Member {
    pub user_id: Uuid,
    pub email: String,
    pub role: String,
    pub created_at: DateTime<Utc>,
}

#[utoipa::path(get, path = "/v1/members", tag = "tenant", security(("bearer" = [])), responses((status = 200, body = [Member]), (status = 401, description = "Missing, invalid or expired token", body = crate::openapi::ErrorBody), (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody)))]
/// `GET /v1/members` (admin).
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Member>>, ApiError> {
    require_admin(&caller)?;
    let members = sqlx::query_as::<_, Member>(
        "SELECT u.id AS user_id, u.email, m.role, m.created_at FROM memberships m JOIN users u ON u.id = m.user_id WHERE m.tenant_id = $1 ORDER BY m.created_at",
    )
    .bind(caller.0.tid)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(members))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleChange {
    pub role: String,
}

#[utoipa::path(put, path = "/v1/members/{user_id}", tag = "tenant", security(("bearer" = [])), params(("user_id" = uuid::Uuid, Path, description = "The member")), request_body = RoleChange, responses((status = 204, description = "Changed"), (status = 404, description = "No such member (or the owner)", body = crate::openapi::ErrorBody), (status = 401, description = "Missing, invalid or expired token", body = crate::openapi::ErrorBody), (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody), (status = 400, description = "Malformed JSON", body = crate::openapi::ErrorBody), (status = 422, description = "A field is invalid", body = crate::openapi::ErrorBody)))]
/// `PUT /v1/members/{user_id}` (admin): changes a member's role (the owner's role is
/// not changed here).
pub async fn change_role(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    caller: Caller,
    Path(user): Path<Uuid>,
    ApiJson(body): ApiJson<RoleChange>,
) -> Result<StatusCode, ApiError> {
    require_admin(&caller)?;
    let role = grantable(&body.role)?;
    let previous: Option<String> = sqlx::query_scalar(
        "UPDATE memberships m SET role = $3 FROM memberships old WHERE m.tenant_id = $1 AND m.user_id = $2 AND old.tenant_id = m.tenant_id AND old.user_id = m.user_id AND m.role <> 'owner' RETURNING old.role",
    )
    .bind(caller.0.tid)
    .bind(user)
    .bind(role)
    .fetch_optional(&state.pool)
    .await?;
    let Some(previous) = previous else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such member (or the owner)",
        ));
    };
    audit(
        &state,
        Some(caller.0.tid),
        Some(caller.0.sub),
        "role_changed",
        serde_json::json!({"user_id": user, "from": previous, "to": role}),
        &peer.ip().to_string(),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Invite {
    pub email: String,
    pub role: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Invitation {
    /// Shown only here: the invited person presents it to accept.
    pub token: String,
    pub email: String,
    pub role: String,
    pub expires_at: DateTime<Utc>,
}

#[utoipa::path(post, path = "/v1/invitations", tag = "tenant", security(("bearer" = [])), request_body = Invite, responses((status = 201, description = "The invitation token, shown only here", body = Invitation), (status = 401, description = "Missing, invalid or expired token", body = crate::openapi::ErrorBody), (status = 403, description = "Needs the admin role", body = crate::openapi::ErrorBody), (status = 400, description = "Malformed JSON", body = crate::openapi::ErrorBody), (status = 422, description = "A field is invalid", body = crate::openapi::ErrorBody)))]
/// `POST /v1/invitations` (admin): invites an email address with a role (valid 7 days).
pub async fn invite(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    caller: Caller,
    ApiJson(body): ApiJson<Invite>,
) -> Result<impl IntoResponse, ApiError> {
    require_admin(&caller)?;
    let email = auth::normalize_email(&body.email)?;
    let role = grantable(&body.role)?.to_owned();
    let (secret, _) = auth::new_refresh_token();
    let token = secret.replacen("rt_", "inv_", 1);
    let hash = auth::token_hash(&token);
    let expires_at = Utc::now() + ChronoDuration::days(7);
    sqlx::query("INSERT INTO invitations (token_hash, tenant_id, email, role, invited_by, expires_at) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(&hash)
        .bind(caller.0.tid)
        .bind(&email)
        .bind(&role)
        .bind(caller.0.sub)
        .bind(expires_at)
        .execute(&state.pool)
        .await?;
    audit(
        &state,
        Some(caller.0.tid),
        Some(caller.0.sub),
        "invitation_created",
        serde_json::json!({"email": email, "role": role}),
        &peer.ip().to_string(),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(Invitation {
            token,
            email,
            role,
            expires_at,
        }),
    ))
}

#[derive(Debug, sqlx::FromRow)]
struct InvitationRow {
    tenant_id: Uuid,
    email: String,
    role: String,
    expires_at: DateTime<Utc>,
    accepted_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Accept {
    pub token: String,
    /// The existing account's password, or the new account's.
    pub password: String,
}

#[utoipa::path(post, path = "/v1/auth/accept-invitation", tag = "auth", request_body = Accept, responses((status = 200, body = Tokens), (status = 404, description = "No such invitation", body = crate::openapi::ErrorBody), (status = 410, description = "Used or expired", body = crate::openapi::ErrorBody), (status = 401, description = "Wrong password for the existing account", body = crate::openapi::ErrorBody), (status = 400, description = "Malformed JSON", body = crate::openapi::ErrorBody), (status = 422, description = "A field is invalid", body = crate::openapi::ErrorBody)))]
/// `POST /v1/auth/accept-invitation`: joins the tenant, creating the account when the
/// email has none; answers with tokens for that tenant.
pub async fn accept(
    State(state): State<AppState>,
    ConnectInfo(peer): Peer,
    ApiJson(body): ApiJson<Accept>,
) -> Result<Json<Tokens>, ApiError> {
    let hash = auth::token_hash(&body.token);
    let invitation: Option<InvitationRow> = sqlx::query_as(
        "SELECT tenant_id, email, role, expires_at, accepted_at FROM invitations WHERE token_hash = $1",
    )
    .bind(&hash)
    .fetch_optional(&state.pool)
    .await?;
    let Some(InvitationRow {
        tenant_id: tenant,
        email,
        role,
        expires_at: expires,
        accepted_at: accepted,
    }) = invitation
    else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such invitation",
        ));
    };
    if accepted.is_some() || expires <= Utc::now() {
        return Err(ApiError::new(
            StatusCode::GONE,
            "invitation_used",
            "the invitation was used or expired",
        ));
    }
    let account: Option<(Uuid, String)> =
        sqlx::query_as("SELECT id, password_hash FROM users WHERE email = $1")
            .bind(&email)
            .fetch_optional(&state.pool)
            .await?;
    // Check the password (or hash the new one) before the transaction: argon2 is slow.
    let (user, new_hash) = match account {
        Some((id, stored)) => {
            if !auth::verify_password(body.password, stored).await? {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_credentials",
                    "wrong password for this account",
                ));
            }
            (id, None)
        }
        None => {
            auth::check_password(&body.password, "password")?;
            (
                Uuid::new_v4(),
                Some(auth::hash_password(body.password).await?),
            )
        }
    };
    // Claiming the invitation, creating the account and joining commit together or not
    // at all: of two people racing with one token, one wins and the other changes nothing.
    let mut tx = state.pool.begin().await?;
    let claimed = sqlx::query(
        "UPDATE invitations SET accepted_at = now() WHERE token_hash = $1 AND accepted_at IS NULL",
    )
    .bind(&hash)
    .execute(&mut *tx)
    .await?;
    if claimed.rows_affected() == 0 {
        return Err(ApiError::new(
            StatusCode::GONE,
            "invitation_used",
            "the invitation was used or expired",
        ));
    }
    if let Some(new_hash) = new_hash {
        let created = sqlx::query(
            "INSERT INTO users (id, email, password_hash) VALUES ($1, $2, $3) ON CONFLICT (email) DO NOTHING",
        )
        .bind(user)
        .bind(&email)
        .bind(new_hash)
        .execute(&mut *tx)
        .await?;
        if created.rows_affected() == 0 {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "email_taken",
                "an account with this email was just created; accept again with its password",
            ));
        }
    }
    sqlx::query("INSERT INTO memberships (tenant_id, user_id, role) VALUES ($1, $2, $3) ON CONFLICT (tenant_id, user_id) DO NOTHING")
        .bind(tenant)
        .bind(user)
        .bind(&role)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let role: String =
        sqlx::query_scalar("SELECT role FROM memberships WHERE tenant_id = $1 AND user_id = $2")
            .bind(tenant)
            .bind(user)
            .fetch_one(&state.pool)
            .await?;
    audit(
        &state,
        Some(tenant),
        Some(user),
        "invitation_accepted",
        serde_json::json!({"email": email, "role": role}),
        &peer.ip().to_string(),
    )
    .await?;
    Ok(Json(issue_tokens(&state, user, tenant, &role, None).await?))
}
