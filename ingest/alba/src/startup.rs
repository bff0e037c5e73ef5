//! Building and running ingest: `Application::build(config)` connects to Postgres and
//! the broker and binds the listener (port 0 in tests); `run_until_stopped` serves
//! until the shutdown token fires, then drains: open streams are closed after their
//! current group, the last usage counts are emitted and the producer is flushed.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use clisonix_service::error::ApiError;
use clisonix_service::http::observed;
use clisonix_tenancy::keys::KeyVerifier;
use clisonix_topics::catalog::{EEG_FRAMES, USAGE_EVENTS};
use clisonix_topics::Topics;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::{self, AppState};
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::publisher::Publisher;
use crate::recording::{self, UploadSlots};
use crate::sessions::Sessions;
use crate::usage::Usage;
use crate::ws;
use clisonix_tenancy::quota::QuotaBook;

pub fn router(state: AppState) -> Router {
    let max_body = state.config.max_body_bytes;
    Router::new()
        .route("/v1/frames", post(http::post_frames))
        .route("/collect", post(http::collect))
        .route("/v1/stream", get(ws::stream))
        .route(
            "/v1/recordings",
            // The upload enforces its own (larger) limit while it streams.
            post(recording::upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/health", get(http::health))
        .route("/ready", get(http::ready))
        .route("/metrics", get(http::metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Request ids (echoed in `x-request-id` and error bodies) and request metrics.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let m = &state.ingest.metrics;
    observed(request, next, &m.requests, &m.request_latency).await
}

/// Ingest, bound and connected.
#[derive(Debug)]
pub struct Application {
    listener: tokio::net::TcpListener,
    state: AppState,
    usage_topic: String,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        let options: PgConnectOptions = config
            .database_url
            .expose()
            .parse()
            .context("DATABASE_URL is not a Postgres URL")?;
        // Ingest's writes record which frames the broker already holds (the sessions'
        // state, every tick); losing the last of them in a database crash can only make
        // a resend publish a duplicate (which downstream drops by sequence number),
        // never lose a frame. So commits do not wait for the disk.
        let options = options.options([("synchronous_commit", "off")]);
        // No ping before each use: sqlx already pings a connection when it is released
        // and closes it if broken. One the server dropped meanwhile fails its statement
        // (a claim is answered 503, retryable; a tick is retried).
        let pool = PgPoolOptions::new()
            .max_connections(32)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .context("connecting to the database")?;
        if config.migrate {
            sqlx::migrate!("../../gateway/migrations")
                .run(&pool)
                .await
                .context("applying the migrations")?;
        }
        let topics = Topics::new(config.topic_prefix.clone());
        let frames_topic = topics.name(&EEG_FRAMES);
        let metrics = Metrics::new();
        let publisher = Arc::new(
            Publisher::new(&config, frames_topic.clone(), metrics.clone())
                .context("creating the Kafka producer")?,
        );
        if !publisher.probe().await {
            tracing::warn!(
                bootstrap = %config.kafka.bootstrap,
                topic = %frames_topic,
                "the broker does not answer yet (or the topic is missing); ingest answers 503 until it does"
            );
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let quotas = Arc::new(QuotaBook::new(pool.clone()));
        let sessions = Arc::new(Sessions::new(
            pool.clone(),
            config.leases(),
            &metrics,
            quotas.clone(),
        ));
        let ingest = Ingest {
            pool: pool.clone(),
            sessions,
            publisher,
            frames_topic,
            limits: config.limits.clone(),
            usage: Arc::new(Usage::default()),
            quotas,
            metrics,
            retry_after: config.retry_after,
        };
        let state = AppState {
            ingest: Arc::new(ingest),
            keys: Arc::new(KeyVerifier::new(pool)),
            config: Arc::new(config),
            uploads: Arc::new(UploadSlots::default()),
            shutdown: CancellationToken::new(),
            streams: tokio_util::task::TaskTracker::new(),
        };
        Ok(Application {
            listener,
            state,
            usage_topic: topics.name(&USAGE_EVENTS),
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let state = self.state;
        let ingest = state.ingest.clone();
        let background = CancellationToken::new();
        let probe = tokio::spawn(ingest.publisher.clone().run_probe(background.clone()));
        // Part of this future, not a task of its own: when the future is dropped the
        // instance stops serving its sessions (their leases run out), as in a crash.
        // Once the streams are done it lets go of every session, writing its state.
        let sessions = ingest.sessions.clone().run(background.clone());
        let usage = tokio::spawn(ingest.usage.clone().run(
            ingest.publisher.clone(),
            self.usage_topic,
            ingest.metrics.clone(),
            ingest.quotas.clone(),
            state.config.usage_interval,
            background.clone(),
        ));
        let quotas = tokio::spawn(refresh_quotas(
            ingest.quotas.clone(),
            state.config.quota_refresh,
            background.clone(),
        ));
        // Streams watch the state's token; requests finish on their own.
        let streams = state.shutdown.clone();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            signal.cancelled().await;
            streams.cancel();
        });
        let streams = state.streams.clone();
        let serve = async {
            let served = axum::serve(self.listener, router(state))
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            // Streams finish their current group and send its answers before the close.
            streams.close();
            if tokio::time::timeout(Duration::from_secs(20), streams.wait())
                .await
                .is_err()
            {
                tracing::warn!("WebSocket streams did not finish within 20 s");
            }
            background.cancel();
            served
        };
        let (served, ()) = tokio::join!(serve, sessions);
        let _ = probe.await;
        let _ = usage.await;
        let _ = quotas.await;
        let publisher = ingest.publisher.clone();
        let flushed =
            tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(10))).await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::warn!("the producer did not flush within 10 s");
        }
        tracing::info!("ingest stopped");
        served
    }
}

/// Reads the tenants' quota standing again every `every`, until `stop`.
async fn refresh_quotas(quotas: Arc<QuotaBook>, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(error) = quotas.refresh().await {
            tracing::warn!(%error, "refreshing the tenants' quotas failed; trying again");
        }
    }
}
