//! The plumbing every HTTP service shares: the request-id and metrics middleware, and
//! the shutdown signal.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{HistogramVec, IntCounterVec};
use tokio_util::sync::CancellationToken;

use crate::error::REQUEST_ID;

/// The request-id and metrics middleware every HTTP service shares: the request id
/// comes from `x-request-id` (or is made), is set for the error bodies and echoed;
/// `requests` and `latency` are labelled by matched route, method and status.
pub async fn observed(
    request: Request,
    next: Next,
    requests: &IntCounterVec,
    latency: &HistogramVec,
) -> Response {
    let started = Instant::now();
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().to_string();
    let mut response = REQUEST_ID.scope(id.clone(), next.run(request)).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    let status = response.status().as_u16().to_string();
    let labels = [route.as_str(), method.as_str(), status.as_str()];
    requests.with_label_values(&labels).inc();
    latency
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// A token cancelled on SIGTERM or Ctrl-C (logging `stopping`), for a service's
/// graceful shutdown.
pub fn shutdown_on_signal(stopping: &'static str) -> CancellationToken {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM can be handled");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("{stopping}");
        signal.cancel();
    });
    shutdown
}
