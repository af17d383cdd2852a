//! Envoy's Secret Discovery Service (SDS v3): names → secrets, the state-of-the-world stream
//! state machine, incremental (delta) streams and unary fetches.

pub mod grpc;
pub mod metrics;
pub mod names;
pub mod response;
pub mod secrets;
pub mod service;
pub mod socket;
pub mod stream;
pub mod workloads;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use metrics::SdsMetrics;
pub use service::{CallerIdentity, SdsService};
pub use stream::{Limits, StreamSettings};

use crate::identity::cache::DEFAULT_MAX_STREAMS_PER_WORKLOAD;
use crate::identity::{Cache, ProcRoot};
use crate::telemetry::health::Ready;
use crate::uds::{self, UdsError};

pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Envoy opens one stream per secret name on one HTTP/2 connection (E7), so the
/// per-connection default is istio-agent's 100,000.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 100_000;
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Every SDS limit; each overflow is refused with an error that names the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdsLimits {
    pub max_names_per_request: usize,
    pub max_name_bytes: usize,
    pub max_request_bytes: usize,
    pub max_streams_per_connection: u32,
    pub max_streams_per_process: usize,
    pub max_connections: usize,
}

impl Default for SdsLimits {
    fn default() -> Self {
        let names = Limits::default();
        Self {
            max_names_per_request: names.max_names_per_request,
            max_name_bytes: names.max_name_bytes,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            max_streams_per_process: DEFAULT_MAX_STREAMS_PER_WORKLOAD,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl SdsLimits {
    /// The limits each stream checks its requests against.
    pub fn per_request(&self) -> Limits {
        Limits {
            max_names_per_request: self.max_names_per_request,
            max_name_bytes: self.max_name_bytes,
        }
    }
}

/// Everything the SDS server is configured with.
#[derive(Debug, Clone)]
pub struct SdsConfig {
    pub socket: PathBuf,
    /// What every stream answers with.
    pub stream: StreamSettings,
    pub limits: SdsLimits,
}

/// Readiness: the SDS socket serves.
pub struct Serving(pub watch::Receiver<bool>);

impl Ready for Serving {
    fn check(&self) -> Result<(), String> {
        if *self.0.borrow() {
            Ok(())
        } else {
            Err("the SDS socket is not serving".into())
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SdsError {
    #[error("SDS socket: {0}")]
    Socket(#[from] UdsError),
    #[error("SDS server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Builds the SDS half of a pod-mode volume's socket (#15): the node server's settings,
/// with every caller on that socket being the pod.
#[derive(Clone)]
pub struct PodSds {
    cache: Arc<Cache>,
    settings: StreamSettings,
    limits: SdsLimits,
    metrics: Arc<SdsMetrics>,
    proc_root: ProcRoot,
    service: service::SharedParts,
}

impl PodSds {
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The SDS gRPC service for the pod `pod` with `selectors`.
    pub fn service_for(
        &self,
        selectors: crate::identity::SelectorSet,
        pod: crate::k8s::PodRef,
        shutdown: CancellationToken,
    ) -> grpc::SdsGrpc {
        let service = SdsService::new(
            Arc::clone(&self.cache),
            self.settings.clone(),
            CallerIdentity::Pod { selectors, pod },
            Arc::clone(&self.metrics),
            shutdown,
        )
        .sharing(&self.service);
        grpc::SdsGrpc::new(service, self.limits.max_request_bytes)
    }

    /// Binds `path` (re-bound if removed, as the node socket is) and yields its connections.
    pub fn listen(
        &self,
        path: std::path::PathBuf,
        shutdown: CancellationToken,
    ) -> Result<tokio_stream::wrappers::ReceiverStream<std::io::Result<socket::Connection>>, UdsError>
    {
        let limit = socket::ConnectionLimit {
            max: self.limits.max_connections,
            metrics: Arc::clone(&self.metrics),
        };
        // The volume holds the pod's subscription already: nothing to warm.
        socket::serve(path, self.proc_root.clone(), None, limit, shutdown)
    }

    pub fn max_streams_per_connection(&self) -> u32 {
        self.limits.max_streams_per_connection
    }
}

pub struct SdsServer {
    pub socket: PathBuf,
    pub service: SdsService,
    /// Transport limits.
    pub limits: SdsLimits,
    metrics: Arc<SdsMetrics>,
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
        let metrics = Arc::new(SdsMetrics::register(cache.metrics()));
        let service = SdsService::new(
            cache,
            settings,
            caller_identity,
            Arc::clone(&metrics),
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

    /// Names callers' pods in stream logs (see [`crate::k8s::Pods`]).
    pub fn with_pods(mut self, pods: crate::k8s::Pods) -> Self {
        self.service.set_pods(pods);
        self
    }

    /// What a pod-mode volume's socket needs to serve SDS as this server does: the same
    /// cache, stream settings, limits, metrics and per-workload report.
    pub fn pod_sds(&self) -> PodSds {
        PodSds {
            cache: self.service.cache(),
            settings: self.service.settings(),
            limits: self.limits,
            metrics: Arc::clone(&self.metrics),
            proc_root: self.proc_root.clone(),
            service: self.service.shared_parts(),
        }
    }

    /// What `/debug/workloads` reports: this server's streams and the cache's SVIDs.
    pub fn workloads_reporter(&self) -> workloads::WorkloadsReporter {
        self.service.workloads_reporter()
    }

    /// The server `config` describes.
    pub fn from_config(
        config: SdsConfig,
        cache: Arc<Cache>,
        caller_identity: CallerIdentity,
        proc_root: ProcRoot,
        shutdown: CancellationToken,
    ) -> Self {
        Self::new(
            config.socket,
            cache,
            config.stream,
            caller_identity,
            proc_root,
            shutdown,
            config.limits,
        )
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
        let warm = self
            .service
            .subscribes_by_process()
            .then(|| self.service.cache());
        let incoming = socket::serve(
            self.socket.clone(),
            self.proc_root.clone(),
            warm,
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
