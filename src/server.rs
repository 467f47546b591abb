//! The operator's HTTP endpoints: `/metrics` (Prometheus), `/healthz` (the process serves) and
//! `/readyz` (the grant watch has synced; a standby is as ready as the leader, since it only
//! waits for the Lease).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::leader::Leadership;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Probes {
    pub metrics: Metrics,
    pub leadership: Leadership,
    pub synced: Arc<AtomicBool>,
}

pub fn router(probes: Probes) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(probes)
}

/// Binds `addr` (failing at once if taken) and serves until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    probes: Probes,
    cancel: CancellationToken,
) -> std::io::Result<impl Future<Output = std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(address = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    Ok(async move {
        axum::serve(listener, router(probes)).with_graceful_shutdown(async move { cancel.cancelled().await }).await
    })
}

async fn metrics(State(p): State<Probes>) -> impl IntoResponse {
    // Read at scrape time: the Lease may have lapsed since the elector last ran.
    p.metrics.set_leader(p.leadership.is_leader());
    // Streamed as encoded, a chunk of grants at a time: a scrape never holds every series at once.
    let chunks = p.metrics.encode_chunks().map(Ok::<_, std::convert::Infallible>);
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], Body::from_stream(futures::stream::iter(chunks)))
}

async fn readyz(State(p): State<Probes>) -> impl IntoResponse {
    if p.synced.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "grant watch not synced yet\n")
    }
}
