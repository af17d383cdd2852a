//! `/healthz`, `/readyz` and `/metrics` over HTTP, and the client `svid-bridge healthcheck`
//! uses.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;

/// One part of the bridge that can say whether it is ready to serve. The domains
/// implement it; the health endpoint only asks.
pub trait Ready: Send + Sync + 'static {
    /// `Ok` when ready, else the reason, short enough for a probe's output.
    fn check(&self) -> Result<(), String>;
}

impl<T: Ready + ?Sized> Ready for Arc<T> {
    fn check(&self) -> Result<(), String> {
        (**self).check()
    }
}

/// Every part readiness asks, in order: the first that is not ready gives the reason.
#[derive(Default)]
pub struct Readiness {
    parts: Vec<Box<dyn Ready>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, part: impl Ready) -> Self {
        self.parts.push(Box::new(part));
        self
    }

    pub fn check(&self) -> Result<(), String> {
        self.parts.iter().try_for_each(|part| part.check())
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match state.readiness.check() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// Serves `/metrics`, `/healthz` and `/readyz` on each address until `shutdown`.
pub async fn serve(
    addresses: Vec<SocketAddr>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, readiness });
    let mut servers = tokio::task::JoinSet::new();
    for address in addresses {
        let listener = tokio::net::TcpListener::bind(address).await?;
        tracing::info!(%address, "metrics and health endpoints listening");
        let app = app.clone();
        let shutdown = shutdown.clone();
        servers.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        });
    }
    while let Some(result) = servers.join_next().await {
        result.map_err(std::io::Error::other)??;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HealthcheckError {
    #[error("cannot reach svid-bridge's health endpoint at {addr}: {source}")]
    Unreachable {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    NotReady(String),
}

/// `svid-bridge healthcheck`: asks `/readyz` (or `/healthz` with `live_only`) on `addr`.
pub fn healthcheck(addr: &str, live_only: bool) -> Result<String, HealthcheckError> {
    let unreachable = |source| HealthcheckError::Unreachable {
        addr: addr.to_owned(),
        source,
    };
    let path = if live_only { "/healthz" } else { "/readyz" };
    let socket: SocketAddr = addr.parse().map_err(|_| {
        unreachable(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a host:port address",
        ))
    })?;
    let mut stream =
        TcpStream::connect_timeout(&socket, Duration::from_secs(2)).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(unreachable)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(unreachable)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(unreachable)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let ok = head.split_whitespace().nth(1) == Some("200");
    let body = body.trim().to_owned();
    if ok {
        Ok(body)
    } else {
        Err(HealthcheckError::NotReady(body))
    }
}
