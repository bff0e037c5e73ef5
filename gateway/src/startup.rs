//! Building and running the gateway: `Application::build(config)` connects to the
//! database, applies migrations when asked and binds the listener, so tests start the
//! real thing on port 0; `run_until_stopped` serves until the shutdown token fires.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use clisonix_topics::catalog::{EEG_FEATURES, USAGE_EVENTS};
use clisonix_topics::{KafkaSettings, Topics};

use crate::accounts;
use crate::api_usage::ApiUsage;
use crate::auth::Keys;
use crate::config::Config;
pub use clisonix_service::http::{observed, shutdown_on_signal};

use crate::error::ApiError;
use crate::keys::KeyVerifier;
use crate::limits::{AttemptLimiter, PlanRates, RequestLimiter};
use crate::live::{LiveFeed, LiveHub};
use crate::members;
use crate::results;
use crate::tenant;

/// The seed's API metrics, defined once.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    /// The seed's business metrics, read from the database at each scrape: users with
    /// a live session (an unexpired, unrevoked refresh token), and subscriptions in
    /// force (active or trialing) per plan.
    active_users: IntGauge,
    subscriptions: IntGaugeVec,
    /// Invoices by state (`draft`, `finalized`, `paid`, `void`), read at each scrape.
    invoices: IntGaugeVec,
    /// The seed's monthly recurring revenue: the base fees of the subscriptions in
    /// force, per month (a period's fee scaled to 30 days, a month as Postgres counts
    /// one), in major units, by currency.
    mrr: GaugeVec,
    /// Invoicing runs by outcome (`ok`, `error`).
    pub invoicing_runs: IntCounterVec,
    /// Stripe webhook deliveries by outcome (`applied`, `ignored`, `stale`,
    /// `duplicate`, or the refusal's code).
    pub stripe_webhooks: IntCounterVec,
    /// Stripe API calls that failed, by kind (`refused`, `unavailable`, `meter_event`).
    pub stripe_errors: IntCounterVec,
    /// Webhook delivery attempts by outcome (`delivered`, `retrying`, `failed`).
    pub webhook_deliveries: IntCounterVec,
    /// Windows pushed on live streams, by where they were read (`topic`, `database`).
    pub live_windows: IntCounterVec,
}

impl ApiMetrics {
    fn new() -> ApiMetrics {
        let registry = Registry::new();
        let labels = ["route", "method", "status"];
        let requests = IntCounterVec::new(
            Opts::new("clisonix_api_requests_total", "API requests"),
            &labels,
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new("clisonix_api_latency_seconds", "API request latency")
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets")),
            &labels,
        )
        .expect("valid metric");
        let active_users = IntGauge::new(
            "clisonix_active_users",
            "Users with a live session (an unexpired, unrevoked refresh token)",
        )
        .expect("valid metric");
        let subscriptions = IntGaugeVec::new(
            Opts::new(
                "clisonix_subscriptions_active",
                "Subscriptions in force (active or trialing), by plan",
            ),
            &["plan"],
        )
        .expect("valid metric");
        let invoices = IntGaugeVec::new(
            Opts::new("clisonix_invoices", "Invoices by state"),
            &["status"],
        )
        .expect("valid metric");
        let mrr = GaugeVec::new(
            Opts::new(
                "clisonix_revenue_mrr",
                "Monthly recurring revenue: base fees of subscriptions in force per month, in major units",
            ),
            &["currency"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(mrr.clone()))
            .expect("registered once");
        let invoicing_runs = IntCounterVec::new(
            Opts::new(
                "clisonix_invoicing_runs_total",
                "Runs of the invoicing of ended billing periods, by outcome",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let stripe_webhooks = IntCounterVec::new(
            Opts::new(
                "clisonix_stripe_webhooks_total",
                "Stripe webhook deliveries, by outcome",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(stripe_webhooks.clone()))
            .expect("registered once");
        let stripe_errors = IntCounterVec::new(
            Opts::new(
                "clisonix_stripe_api_errors_total",
                "Stripe API calls that failed, by kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(stripe_errors.clone()))
            .expect("registered once");
        let webhook_deliveries = IntCounterVec::new(
            Opts::new(
                "clisonix_webhook_deliveries_total",
                "Webhook delivery attempts to tenants' endpoints, by outcome",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(webhook_deliveries.clone()))
            .expect("registered once");
        let live_windows = IntCounterVec::new(
            Opts::new(
                "clisonix_live_windows_total",
                "Feature windows pushed on live streams, by where they were read",
            ),
            &["source"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(live_windows.clone()))
            .expect("registered once");
        registry
            .register(Box::new(invoices.clone()))
            .expect("registered once");
        registry
            .register(Box::new(invoicing_runs.clone()))
            .expect("registered once");
        registry
            .register(Box::new(requests.clone()))
            .expect("registered once");
        registry
            .register(Box::new(latency.clone()))
            .expect("registered once");
        registry
            .register(Box::new(active_users.clone()))
            .expect("registered once");
        registry
            .register(Box::new(subscriptions.clone()))
            .expect("registered once");
        ApiMetrics {
            registry,
            requests,
            latency,
            active_users,
            subscriptions,
            invoices,
            mrr,
            invoicing_runs,
            stripe_webhooks,
            stripe_errors,
            webhook_deliveries,
            live_windows,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub keys: Keys,
    pub metrics: ApiMetrics,
    pub login_limits: Arc<AttemptLimiter>,
    pub request_limits: Arc<RequestLimiter>,
    /// Each tenant's request rates, from its plan.
    pub plan_rates: Arc<PlanRates>,
    pub api_keys: Arc<KeyVerifier>,
    pub live: LiveHub,
    /// Requests on the results API, reported to metering (when Kafka is configured).
    pub api_usage: Option<Arc<ApiUsage>>,
    /// Stripe's API, when `STRIPE_SECRET_KEY` is set.
    pub stripe: Option<Arc<clisonix_billing::stripe::Stripe>>,
    /// The audio store the sink writes chunks to (`CLISONIX_AUDIO_STORE`).
    pub audio: Option<clisonix_audio::AudioStore>,
}

pub fn router(state: AppState) -> Router {
    let max_body = state.config.max_body_bytes;
    Router::new()
        .route("/v1/auth/signup", post(accounts::signup))
        .route("/v1/auth/login", post(accounts::login))
        .route("/v1/auth/refresh", post(accounts::refresh))
        .route("/v1/auth/logout", post(accounts::logout))
        .route("/v1/auth/password", post(tenant::change_password))
        .route("/v1/me", get(accounts::me))
        .route(
            "/v1/api-keys",
            post(tenant::create_key).get(tenant::list_keys),
        )
        .route(
            "/v1/api-keys/{id}",
            axum::routing::delete(tenant::revoke_key),
        )
        .route("/v1/audit", get(tenant::audit_log))
        .route("/v1/members", get(members::list))
        .route(
            "/v1/members/{user_id}",
            axum::routing::put(members::change_role),
        )
        .route("/v1/invitations", post(members::invite))
        .route("/v1/auth/accept-invitation", post(members::accept))
        .route("/v1/sessions", get(results::list_sessions))
        .route("/v1/sessions/{id}", get(results::get_session))
        .route("/v1/sessions/{id}/features", get(results::features))
        .route("/v1/sessions/{id}/audio", get(results::audio))
        .route(
            "/v1/sessions/{id}/audio/chunks/{chunk_index}",
            get(results::audio_chunk),
        )
        .route("/v1/sessions/{id}/live", get(crate::live::live))
        .route("/v1/plans", get(crate::plans::list))
        .route(
            "/v1/subscription",
            get(crate::plans::get).put(crate::plans::change),
        )
        .route("/v1/usage", get(crate::usage::usage))
        .route("/v1/usage/sessions/{id}", get(crate::usage::session))
        .route("/v1/billing/invoices", get(crate::billing::list))
        .route("/v1/billing/invoices/{id}", get(crate::billing::get))
        .route("/v1/billing/stripe/webhook", post(crate::stripe::webhook))
        .route("/v1/billing/checkout", post(crate::stripe::checkout))
        .route("/v1/billing/portal", post(crate::stripe::portal))
        .route(
            "/v1/webhooks",
            post(crate::webhooks::create).get(crate::webhooks::list),
        )
        .route("/v1/webhooks/{id}", delete(crate::webhooks::delete))
        .route(
            "/v1/webhooks/{id}/deliveries",
            get(crate::webhooks::deliveries),
        )
        .route(
            "/v1/webhooks/{id}/deliveries/{event_id}/replay",
            post(crate::webhooks::replay),
        )
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .route(
            "/docs",
            get(|| async { axum::response::Html(crate::openapi::DOCS_PAGE) }),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Gives each request an id (echoed in `x-request-id` and error bodies) and records
/// the request metrics by matched route.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    observed(
        request,
        next,
        &state.metrics.requests,
        &state.metrics.latency,
    )
    .await
}

/// `GET /health`: the process is up.
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, description = "Up", body = String)))]
pub async fn health() -> &'static str {
    "ok"
}

/// `GET /openapi.json`: this API's OpenAPI 3.1 document.
async fn openapi_json() -> impl IntoResponse {
    use utoipa::OpenApi;
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        crate::openapi::ApiDoc::openapi()
            .to_pretty_json()
            .unwrap_or_default(),
    )
}

/// `GET /ready`: the database answers.
#[utoipa::path(get, path = "/ready", tag = "operations", responses((status = 200, description = "Ready", body = String), (status = 503, description = "The database does not answer", body = crate::openapi::ErrorBody)))]
pub async fn ready(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    sqlx::query("SELECT 1")
        .execute(&state.pool)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                format!("database: {e}"),
            )
        })?;
    Ok("ready")
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus metrics", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    if let Err(error) = business_metrics(&state).await {
        tracing::warn!(%error, "reading the business metrics failed (the last values stay)");
    }
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&state.metrics.registry.gather(), &mut buf)
        .expect("text encoding cannot fail");
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        buf,
    )
}

/// Sets `clisonix_active_users` and `clisonix_subscriptions_active{plan}` from the
/// database.
async fn business_metrics(state: &AppState) -> Result<(), sqlx::Error> {
    let users: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT user_id) FROM refresh_tokens \
         WHERE revoked_at IS NULL AND replaced_at IS NULL AND expires_at > now()",
    )
    .fetch_one(&state.pool)
    .await?;
    let plans: Vec<(String, i64)> = sqlx::query_as(
        "SELECT plan_id, count(*) FROM subscriptions WHERE status IN ('active', 'trialing') GROUP BY plan_id",
    )
    .fetch_all(&state.pool)
    .await?;
    state.metrics.active_users.set(users);
    let invoices: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM invoices GROUP BY status")
            .fetch_all(&state.pool)
            .await?;
    let mrr: Vec<(String, f64)> = sqlx::query_as(
        "SELECT p.currency, (sum(p.base_fee_minor) / 100.0 \
                 * (2592000 / extract(epoch FROM (SELECT period_length FROM billing_settings))))::float8 \
         FROM subscriptions s JOIN plans p ON p.plan_id = s.plan_id AND p.version = s.plan_version \
         WHERE s.status IN ('active', 'trialing', 'past_due') GROUP BY p.currency",
    )
    .fetch_all(&state.pool)
    .await?;
    state.metrics.mrr.reset();
    for (currency, value) in mrr {
        state.metrics.mrr.with_label_values(&[&currency]).set(value);
    }
    for status in ["draft", "finalized", "paid", "void"] {
        let n = invoices
            .iter()
            .find(|(s, _)| s == status)
            .map_or(0, |(_, n)| *n);
        state.metrics.invoices.with_label_values(&[status]).set(n);
    }
    state.metrics.subscriptions.reset();
    for (plan, n) in plans {
        state
            .metrics
            .subscriptions
            .with_label_values(&[&plan])
            .set(n);
    }
    Ok(())
}

/// A built gateway, bound and ready to serve.
#[derive(Debug)]
pub struct Application {
    listener: tokio::net::TcpListener,
    state: AppState,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        use anyhow::Context;
        // A request waits at most 2 s for a connection: while Postgres is away it is
        // answered 503 database_unavailable then, rather than hanging for sqlx's
        // default 30 s.
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .acquire_timeout(std::time::Duration::from_secs(2))
            .connect(config.database_url.expose())
            .await
            .context("connecting to the database")?;
        if config.migrate {
            sqlx::migrate!("./migrations")
                .run(&pool)
                .await
                .context("applying the migrations")?;
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let api_usage = match &config.kafka_bootstrap {
            Some(bootstrap) => {
                let producer = KafkaSettings::new(bootstrap, "clisonix-gateway")
                    .producer()
                    .create()
                    .context("creating the Kafka producer for API usage")?;
                let topic = Topics::new(config.topic_prefix.clone()).name(&USAGE_EVENTS);
                Some(Arc::new(ApiUsage::new(producer, topic)))
            }
            None => {
                tracing::warn!("CLISONIX_KAFKA_BOOTSTRAP is not set: requests on the results API are not metered");
                None
            }
        };
        // Live streams take windows from the committed features topic as Albi writes
        // them (the database remains their catch-up and their fallback).
        let feed = match &config.kafka_bootstrap {
            Some(bootstrap) => Some(
                LiveFeed::start(
                    &KafkaSettings::new(bootstrap, "clisonix-gateway-live"),
                    Topics::new(config.topic_prefix.clone()).name(&EEG_FEATURES),
                )
                .context("starting the live feed")?,
            ),
            None => None,
        };
        let audio = match &config.audio_store {
            Some(url) => {
                Some(clisonix_audio::AudioStore::from_url(url).context("opening the audio store")?)
            }
            None => {
                tracing::warn!("CLISONIX_AUDIO_STORE is not set: audio the sink stored as objects cannot be served");
                None
            }
        };
        let state = AppState {
            api_usage,
            audio: audio.clone(),
            stripe: crate::stripe::client(&config),
            api_keys: Arc::new(KeyVerifier::new(pool.clone())),
            login_limits: Arc::new(AttemptLimiter::new(
                std::time::Duration::from_secs(300),
                config.login_attempts_per_account,
                config.login_attempts_per_ip,
            )),
            request_limits: Arc::new(RequestLimiter::default()),
            plan_rates: Arc::new(PlanRates::default()),
            live: LiveHub::start(pool.clone(), feed),
            pool,
            keys: Keys::new(&config),
            config: Arc::new(config),
            metrics: ApiMetrics::new(),
        };
        Ok(Application { listener, state })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown` is cancelled; live streams are then closed (1001) and
    /// waited for.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let live = self.state.live.clone();
        // API usage goes out every interval, and once more after the last request.
        let usage_stop = CancellationToken::new();
        let usage = self
            .state
            .api_usage
            .clone()
            .map(|u| tokio::spawn(u.run(self.state.config.usage_interval, usage_stop.clone())));
        let invoicing = (!self.state.config.invoice_interval.is_zero()).then(|| {
            tokio::spawn(crate::billing::run_invoicing(
                self.state.clone(),
                usage_stop.clone(),
            ))
        });
        let reporting = self.state.stripe.clone().map(|stripe| {
            tokio::spawn(crate::stripe::run_reporting(
                self.state.clone(),
                stripe,
                usage_stop.clone(),
            ))
        });
        let delivering = (!self.state.config.webhook_interval.is_zero()).then(|| {
            tokio::spawn(crate::webhooks::run_delivering(
                self.state.clone(),
                usage_stop.clone(),
            ))
        });
        let app = router(self.state).into_make_service_with_connect_info::<std::net::SocketAddr>();
        let stop_live = live.stop.clone();
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(async move {
                shutdown.cancelled().await;
                stop_live.cancel();
            })
            .await;
        live.stop.cancel();
        live.streams.close();
        live.streams.wait().await;
        usage_stop.cancel();
        if let Some(usage) = usage {
            let _ = usage.await;
        }
        if let Some(invoicing) = invoicing {
            let _ = invoicing.await;
        }
        if let Some(reporting) = reporting {
            let _ = reporting.await;
        }
        if let Some(delivering) = delivering {
            let _ = delivering.await;
        }
        served
    }
}
