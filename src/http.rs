//! The operator's HTTP endpoints on one port: `/healthz` (the process
//! answers), `/readyz` (the watch caches have synced, whether or not this
//! replica leads), `/metrics` (Prometheus text format), and the
//! authenticated read-only data API under `/api/v1` ([`crate::api`]), which
//! can instead be served alone over TLS ([`serve_data_api`]). Both are
//! served by [`conn::serve_connections`], which closes connections that do
//! not deliver a request's headers in time (slowloris), idle too long or
//! stop reading their response, and caps the connections open per listener
//! (each listener its own cap: see [`conn`]).

pub mod conn;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::api::ApiState;
use crate::metrics::Metrics;
use conn::{ConnectionLimits, ConnectionMetrics};

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    /// The data API; `None` serves probes and metrics only.
    pub api: Option<ApiState>,
}

pub fn router(state: HttpState) -> Router {
    let api = state.api.clone();
    let probes = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    match api {
        Some(api) => probes.merge(crate::api::router(api)),
        None => probes,
    }
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// Serves until `shutdown` resolves, each connection bounded in time and
/// the connections in number ([`conn::ConnectionLimits`]: the data API's
/// when it is served here, else the defaults), counted in `state.metrics`
/// as listener `http`.
pub async fn serve(
    addr: SocketAddr,
    state: HttpState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_as("http", addr, state, shutdown).await
}

/// Serves the probes and metrics alone (`state.api` is ignored) on their
/// own listener, with its own connection limit (the defaults): a flood on
/// the port serving the data API cannot take its slots. Counted as
/// listener `probes`.
pub async fn serve_probes(
    addr: SocketAddr,
    state: HttpState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_as("probes", addr, HttpState { api: None, ..state }, shutdown).await
}

/// [`serve`] with the listener's metrics label.
async fn serve_as(
    listener_label: &'static str,
    addr: SocketAddr,
    state: HttpState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let limits = state
        .api
        .as_ref()
        .map_or_else(ConnectionLimits::default, |api| api.decisions.settings().connections);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, listener = listener_label, "HTTP endpoints listening");
    let metrics = state.metrics.connection_metrics(listener_label);
    conn::serve_connections(listener, router(state), limits, metrics, shutdown).await;
    Ok(())
}

/// Serves the data API alone on `addr` (no probes, no metrics), over TLS
/// when `tls` is given, until `shutdown` resolves. With TLS the certificate
/// is loaded before listening (a bad one fails here) and reloaded when its
/// files change. Its connections have their own cap, apart from the probe
/// listener's, and are counted in `metrics`.
pub async fn serve_data_api(
    addr: SocketAddr,
    api: ApiState,
    tls: Option<tls::TlsFiles>,
    metrics: ConnectionMetrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let limits = api.decisions.settings().connections;
    let app = crate::api::router(api);
    match tls {
        Some(files) => {
            let listener = tls::TlsListener::bind(addr, files).await?;
            tracing::info!(addr = %axum::serve::Listener::local_addr(&listener)?, "data API listening (TLS)");
            conn::serve_connections(listener, app, limits, metrics, shutdown).await;
        }
        None => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(addr = %listener.local_addr()?, "data API listening (plain HTTP)");
            conn::serve_connections(listener, app, limits, metrics, shutdown).await;
        }
    }
    Ok(())
}
