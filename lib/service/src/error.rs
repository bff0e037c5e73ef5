//! One JSON error shape for every route:
//! `{"error": {"code", "message", "field"?, "request_id"}}` with the matching status.

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

tokio::task_local! {
    /// The id of the request being served (set by the request-id middleware).
    pub static REQUEST_ID: String;
}

/// An API error: status, machine-readable code, message, and the field at fault.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// Seconds to wait, sent as `Retry-After` (429, 503).
    pub retry_after: Option<u64>,
    /// More members of the error object, beside `code` and `message` (a quota's
    /// `meter`, `limit`, `used`, `resets_at`).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
            extra: serde_json::Map::new(),
        }
    }

    /// Adds a member to the error object.
    pub fn with(mut self, name: &str, value: impl Into<serde_json::Value>) -> ApiError {
        self.extra.insert(name.to_owned(), value.into());
        self
    }

    /// 429 with `Retry-After`.
    pub fn too_many(code: &'static str, message: impl Into<String>, wait_seconds: u64) -> ApiError {
        let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message);
        e.retry_after = Some(wait_seconds);
        e
    }

    pub fn field(mut self, field: impl Into<String>) -> ApiError {
        self.field = Some(field.into());
        self
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn internal(error: impl std::fmt::Display) -> ApiError {
        tracing::error!(%error, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

impl From<sqlx::Error> for ApiError {
    /// The database out of reach (no connection within the pool's acquire timeout, a
    /// connection lost, the server shutting down or starting) is a retryable 503
    /// `database_unavailable` with `Retry-After: 1`; anything else is internal.
    fn from(e: sqlx::Error) -> ApiError {
        if database_unreachable(&e) {
            tracing::warn!(error = %e, "the database is out of reach");
            let mut err = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database cannot be reached now; try again shortly",
            );
            err.retry_after = Some(1);
            return err;
        }
        ApiError::internal(e)
    }
}

/// Whether an error says the database cannot be reached now (rather than that a
/// statement is wrong).
pub fn database_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed => true,
        // Class 08: connection exceptions; 57P01-57P03: shutting down, starting up.
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || ["57P01", "57P02", "57P03"].contains(&&*c)),
        _ => false,
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        match rejection {
            JsonRejection::JsonDataError(e) => {
                // serde says e.g. "missing field `email` at line 1 column 2".
                let text = e.body_text();
                let field = text.split('`').nth(1).map(str::to_owned);
                let mut err =
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", text);
                err.field = field;
                err
            }
            JsonRejection::JsonSyntaxError(e) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.body_text())
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: application/json",
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                other.body_text(),
            ),
            other => ApiError::new(other.status(), "invalid_body", other.body_text()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = REQUEST_ID.try_with(Clone::clone).unwrap_or_default();
        let mut body = json!({
            "code": self.code,
            "message": self.message,
            "request_id": request_id,
        });
        if let Some(field) = self.field {
            body["field"] = json!(field);
        }
        for (name, value) in self.extra {
            body[name] = value;
        }
        let mut response = (self.status, axum::Json(json!({ "error": body }))).into_response();
        if let Some(wait) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, wait.into());
        }
        response
    }
}
