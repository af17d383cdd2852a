//! Envoy's Secret Discovery Service (SDS v3): names → secrets, the state-of-the-world stream
//! state machine, incremental (delta) streams and unary fetches.

pub mod grpc;
pub mod names;
pub mod secrets;
pub mod service;
pub mod socket;
pub mod stream;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use service::{CallerIdentity, SdsService};
pub use stream::{Limits, StreamSettings};

use crate::config::SdsLimits;
use crate::identity::{Cache, ProcRoot};
use crate::telemetry::metrics::Metrics;
use crate::uds::{self, UdsError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SdsError {
    #[error("SDS socket: {0}")]
    Socket(#[from] UdsError),
    #[error("SDS server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

pub struct SdsServer {
    pub socket: PathBuf,
    pub service: SdsService,
    /// Transport limits; Envoy opens one stream per secret name on one HTTP/2 connection
    /// (E7), so the per-connection default is istio-agent's 100,000.
    pub limits: SdsLimits,
    metrics: Arc<Metrics>,
    proc_root: ProcRoot,
}

impl SdsServer {
    pub fn new(
        socket: PathBuf,
        cache: Arc<Cache>,
        settings: StreamSettings,
        caller_identity: CallerIdentity,
        proc_root: ProcRoot,
        shutdown: CancellationToken,
        limits: SdsLimits,
    ) -> Self {
        let metrics = Arc::clone(cache.metrics());
        let service = SdsService::new(
            cache,
            settings,
            caller_identity,
            proc_root.clone(),
            shutdown,
        );
        Self {
            socket,
            service,
            limits,
            proc_root,
            metrics,
        }
    }

    /// Binds the socket, reports `serving`, serves until `shutdown`, ends every stream
    /// (Envoy reconnects to the next instance), and removes the socket.
    pub async fn serve(
        self,
        serving: watch::Sender<bool>,
        shutdown: CancellationToken,
    ) -> Result<(), SdsError> {
        let limit = socket::ConnectionLimit {
            max: self.limits.max_connections,
            metrics: self.metrics,
        };
        let incoming = socket::serve(
            self.socket.clone(),
            self.proc_root.clone(),
            limit,
            shutdown.clone(),
        )?;
        tracing::info!(socket = %self.socket.display(), "SDS server listening");
        serving.send_replace(true);
        let server = grpc::SdsGrpc::new(self.service, self.limits.max_request_bytes);
        let signal = async {
            shutdown.cancelled().await;
            // Streams end on the same token; give their final frames a moment to flush.
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let result = tonic::transport::Server::builder()
            .max_concurrent_streams(self.limits.max_streams_per_connection)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(server)
            .serve_with_incoming_shutdown(incoming, signal)
            .await;
        serving.send_replace(false);
        uds::remove_socket_on_shutdown(&self.socket);
        result.map_err(SdsError::from)
    }
}
