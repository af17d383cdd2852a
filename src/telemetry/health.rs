//! `/healthz`, `/readyz` and `/metrics` over HTTP, `/debug/workloads` on loopback
//! addresses only, and the client `svid-bridge healthcheck` and `inspect --pod` use.

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

/// A JSON document about what the bridge serves, for operators on the node (`inspect
/// --pod`): served on loopback addresses only, never on the metrics address a cluster
/// scrapes.
pub trait DebugReport: Send + Sync + 'static {
    fn json(&self) -> String;
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    workloads: Option<Arc<dyn DebugReport>>,
}

/// The path of the per-workload report.
pub const WORKLOADS_PATH: &str = "/debug/workloads";

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

async fn workloads(State(state): State<AppState>) -> impl IntoResponse {
    match &state.workloads {
        Some(report) => (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            report.json(),
        ),
        None => (
            StatusCode::NOT_FOUND,
            [(axum::http::header::CONTENT_TYPE, "text/plain")],
            "no workload report\n".to_owned(),
        ),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on each address until `shutdown`, and
/// `workloads` at [`WORKLOADS_PATH`] on the loopback ones.
pub async fn serve(
    addresses: Vec<SocketAddr>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    workloads: Option<Arc<dyn DebugReport>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = AppState {
        metrics,
        readiness,
        workloads,
    };
    let mut servers = tokio::task::JoinSet::new();
    for address in addresses {
        let listener = tokio::net::TcpListener::bind(address).await?;
        tracing::info!(%address, "metrics and health endpoints listening");
        let app = router(state.clone(), address.ip().is_loopback());
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

fn router(state: AppState, local: bool) -> Router {
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    // Which pods run where and with which SPIFFE IDs is for operators on the node, not for
    // whoever can reach the metrics port.
    let app = if local {
        app.route(WORKLOADS_PATH, get(self::workloads))
    } else {
        app
    };
    app.with_state(state)
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
    let path = if live_only { "/healthz" } else { "/readyz" };
    get_body(addr, path)
}

/// `GET path` on `addr`: the body when the status is 200, else the body as the error.
pub fn get_body(addr: &str, path: &str) -> Result<String, HealthcheckError> {
    let unreachable = |source| HealthcheckError::Unreachable {
        addr: addr.to_owned(),
        source,
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt as _;

    struct Fixed;
    impl DebugReport for Fixed {
        fn json(&self) -> String {
            "{\"workloads\":[]}".into()
        }
    }

    async fn status_of(local: bool, path: &str) -> StatusCode {
        let state = AppState {
            metrics: Arc::new(Metrics::new()),
            readiness: Arc::new(Readiness::new()),
            workloads: Some(Arc::new(Fixed)),
        };
        let request = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap_or_else(|e| panic!("{e}"));
        router(state, local)
            .oneshot(request)
            .await
            .unwrap_or_else(|e| match e {})
            .status()
    }

    #[tokio::test]
    async fn the_workload_report_is_served_on_loopback_addresses_only() {
        assert_eq!(status_of(true, WORKLOADS_PATH).await, StatusCode::OK);
        assert_eq!(
            status_of(false, WORKLOADS_PATH).await,
            StatusCode::NOT_FOUND
        );
        assert_eq!(status_of(false, "/readyz").await, StatusCode::OK);
    }
}
