//! What operators look at while a worker runs: Prometheus metrics, liveness and
//! readiness, on one HTTP address (see [`App::observe`](crate::App::observe)).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use courier_core::Error;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::worker::Counters;

/// Buckets of the seconds histograms (handler time, queue wait): 1 ms to 5 minutes.
const BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// The process's Prometheus recorder, installed on first use. Installing fails when the
/// application has installed another `metrics` recorder: one process has one.
pub(crate) fn recorder() -> Result<PrometheusHandle, Error> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets(BUCKETS).map_err(|e| e.to_string())?;
            builder.install_recorder().map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| {
            Error::config(
                "observe",
                format!("cannot install the Prometheus recorder ({e}); another `metrics` recorder is installed in this process: serve that one's metrics instead"),
            )
        })
}

/// Binds `addr` now (so a taken port fails the run at its start), then serves until `stop`.
pub(crate) async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    health: Arc<Counters>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::config("observe", format!("cannot listen on {addr} for metrics and health: {e}; choose a free address"))
    })?;
    let ready = health.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = metrics.render();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text) }
            }),
        )
        .route("/livez", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let why = ready.not_ready();
                async move {
                    match why {
                        None => (StatusCode::OK, "ready\n".to_owned()).into_response(),
                        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response(),
                    }
                }
            }),
        );
    tracing::info!(%addr, "serving /metrics, /livez and /readyz");
    Ok(tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::warn!(error = %e, "the metrics and health endpoint stopped");
        }
    }))
}
