//! The OpenAPI 3.1 document, generated from the route and type annotations, and the
//! docs page that renders it.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// The error shape every route answers with.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, serde::Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable, e.g. `invalid_field`, `unauthorized`, `not_found`.
    pub code: String,
    pub message: String,
    /// The request field at fault, when there is one.
    pub field: Option<String>,
    /// Also in the `x-request-id` response header.
    pub request_id: String,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi, Debug)]
#[openapi(
    info(title = "Clisonix API", description = "Accounts, tenants, authentication and API keys of the Clisonix EEG service."),
    paths(
        crate::accounts::signup,
        crate::accounts::login,
        crate::accounts::refresh,
        crate::accounts::logout,
        crate::accounts::me,
        crate::tenant::change_password,
        crate::tenant::create_key,
        crate::tenant::list_keys,
        crate::tenant::revoke_key,
        crate::tenant::audit_log,
        crate::members::list,
        crate::members::change_role,
        crate::members::invite,
        crate::members::accept,
        crate::results::list_sessions,
        crate::results::get_session,
        crate::results::features,
        crate::results::audio,
        crate::results::audio_chunk,
        crate::live::live,
        crate::plans::list,
        crate::plans::get,
        crate::plans::change,
        crate::usage::usage,
        crate::usage::session,
        crate::billing::list,
        crate::billing::get,
        crate::stripe::webhook,
        crate::stripe::checkout,
        crate::stripe::portal,
        crate::webhooks::create,
        crate::webhooks::list,
        crate::webhooks::delete,
        crate::webhooks::deliveries,
        crate::webhooks::replay,
        crate::startup::health,
        crate::startup::ready,
        crate::startup::metrics,
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerAuth),
    tags(
        (name = "auth", description = "Sign-up, log-in, tokens"),
        (name = "api keys", description = "Keys for programs and devices"),
        (name = "tenant", description = "Members, invitations, audit log"),
        (name = "plans", description = "The plan catalog and the tenant's subscription"),
        (name = "usage", description = "What the tenant used, per meter, over time and per session"),
        (name = "billing", description = "Invoices, Stripe checkout and portal, Stripe's webhooks"),
        (name = "webhooks", description = "The tenant's endpoints for events, and their deliveries"),
        (name = "operations", description = "Health, readiness, metrics"),
    )
)]
pub struct ApiDoc;

/// The docs page: ReDoc rendering `/openapi.json`.
pub const DOCS_PAGE: &str = r#"<!doctype html>
<html>
  <head>
    <meta charset="utf-8">
    <title>Clisonix API</title>
    <meta name="viewport" content="width=device-width, initial-scale=1">
  </head>
  <body>
    <redoc spec-url="/openapi.json"></redoc>
    <script src="https://cdn.redoc.ly/redoc/v2.1.5/bundles/redoc.standalone.js"></script>
  </body>
</html>
"#;
