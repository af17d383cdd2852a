//! The CSI node plugin: Identity and Node services for ephemeral inline volumes that
//! bind-mount the socket directory into pods, and kubelet plugin registration.
//!
//! Behaviour follows spiffe-csi-driver (the P-, U-, N-, V- ids of docs/behaviours.md) so the
//! bridge is a drop-in, with the fixes listed there as R-1…R-6: confined and idempotent
//! publish, unpublish that clears stacked mounts, volume stats the kubelet accepts, tight
//! socket permissions, and built-in registration.

pub mod calls;
pub mod identity;
pub mod locks;
pub mod metrics;
pub mod mount;
pub mod mountinfo;
pub mod node;
pub mod pod_mode;
pub mod registration;
pub mod target;
pub mod validate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::proto::csi::GetPluginInfoRequest;
use crate::proto::csi::identity_client::IdentityClient;
use crate::proto::csi::identity_server::IdentityServer;
use crate::proto::csi::node_server::NodeServer;
use crate::proto::pluginregistration::registration_server::RegistrationServer;
use crate::telemetry::health::Ready;
use crate::telemetry::metrics::Metrics;
use crate::uds::{self, SocketAccess, UdsError};

pub use metrics::CsiMetrics;
pub use registration::RegistrationStatus;

use calls::CsiCallsLayer;

#[derive(Debug, Clone)]
pub struct CsiConfig {
    pub socket: PathBuf,
    pub plugin_name: String,
    pub mount_dir: PathBuf,
    pub node_id: String,
    /// Must equal the kubelet's `--root-dir` as a string: targets are confined under it.
    pub kubelet_root: PathBuf,
    /// The CSI socket as the kubelet dials it, reported in registration GetInfo.
    pub registration_endpoint: PathBuf,
    pub register_with_kubelet: bool,
}

impl CsiConfig {
    /// `<kubelet-root>/plugins_registry/<plugin-name>-reg.sock`, where the kubelet's plugin
    /// watcher looks (docs/behaviours.md, "Kubelet plugin registration").
    pub fn registration_socket(&self) -> PathBuf {
        self.kubelet_root
            .join("plugins_registry")
            .join(format!("{}-reg.sock", self.plugin_name))
    }

    /// Publish targets must live under here.
    pub fn pods_dir(&self) -> PathBuf {
        self.kubelet_root.join("pods")
    }
}

/// Readiness while the bridge registers itself: ready once the kubelet accepted it.
pub struct RegistrationReadiness(pub watch::Receiver<RegistrationStatus>);

impl Ready for RegistrationReadiness {
    fn check(&self) -> Result<(), String> {
        let status = self.0.borrow();
        if status.is_registered() {
            return Ok(());
        }
        let detail = match &*status {
            RegistrationStatus::Rejected { error } => format!(": {error}"),
            RegistrationStatus::Unavailable { reason } => format!(": {reason}"),
            _ => String::new(),
        };
        Err(format!(
            "the CSI plugin is not registered with the kubelet ({}){detail}",
            status.state()
        ))
    }
}

/// How long the bridge waits for its own CSI socket to answer before registering.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight calls may take to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CsiError {
    #[error("CSI socket: {0}")]
    Socket(#[source] UdsError),
    #[error("CSI server on {path:?} failed: {source}")]
    Serve {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("CSI server on {path:?} stopped unexpectedly")]
    Stopped { path: PathBuf },
    #[error("CSI server on {path:?} does not answer: {reason}")]
    NotAnswering { path: PathBuf, reason: String },
    #[error("CSI server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Serves CSI Identity + Node on `config.socket` and, once that answers, kubelet
/// registration on `config.registration_socket()`, until `shutdown` is cancelled; then
/// removes the registration socket, lets in-flight calls finish and removes the CSI socket.
///
/// `sds_serving` drives Probe: `true` ready, `false` still starting, sender dropped = the SDS
/// server stopped (FAILED_PRECONDITION). Registration state is not observable here; see
/// [`serve_with_registration`].
pub async fn serve(
    config: CsiConfig,
    sds_serving: watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> Result<(), CsiError> {
    let (status, _) = watch::channel(RegistrationStatus::NotStarted);
    serve_with_registration(
        config,
        sds_serving,
        shutdown,
        status,
        Arc::new(Metrics::new()),
    )
    .await
}

/// Where the CSI metrics go: a registry to add them to, or metrics already registered (the
/// bridge registers them at start, so they are exported even with CSI off).
pub enum CsiTelemetry {
    Registry(Arc<Metrics>),
    Registered(Arc<CsiMetrics>),
}

impl From<Arc<Metrics>> for CsiTelemetry {
    fn from(registry: Arc<Metrics>) -> Self {
        Self::Registry(registry)
    }
}

impl From<Arc<CsiMetrics>> for CsiTelemetry {
    fn from(metrics: Arc<CsiMetrics>) -> Self {
        Self::Registered(metrics)
    }
}

/// [`serve`], publishing the kubelet registration state on `registration` (for /healthz and
/// metrics: [`RegistrationStatus::is_failed`] means pods cannot use the plugin). Given a
/// registry, registers the CSI metrics there and keeps `kubelet_registration` current.
pub async fn serve_with_registration(
    config: CsiConfig,
    sds_serving: watch::Receiver<bool>,
    shutdown: CancellationToken,
    registration: watch::Sender<RegistrationStatus>,
    telemetry: impl Into<CsiTelemetry>,
) -> Result<(), CsiError> {
    serve_with_pod_volumes(config, sds_serving, shutdown, registration, telemetry, None).await
}

/// As [`serve_with_registration`], serving pod-mode volumes through `pod_volumes` (#15).
pub async fn serve_with_pod_volumes(
    config: CsiConfig,
    sds_serving: watch::Receiver<bool>,
    shutdown: CancellationToken,
    registration: watch::Sender<RegistrationStatus>,
    telemetry: impl Into<CsiTelemetry>,
    pod_volumes: Option<Arc<dyn pod_mode::PodVolumeHandler>>,
) -> Result<(), CsiError> {
    let metrics = match telemetry.into() {
        CsiTelemetry::Registered(metrics) => metrics,
        CsiTelemetry::Registry(registry) => {
            let metrics = Arc::new(CsiMetrics::register(&registry));
            metrics.follow_registration(registration.subscribe());
            metrics
        }
    };
    // 0600, like node-driver-registrar's umask 0077; only the kubelet (root) dials it.
    let listener = uds::bind(&config.socket, SocketAccess::Owner).map_err(CsiError::Socket)?;
    tracing::info!(
        version = crate::VERSION,
        csi_socket = %config.socket.display(),
        plugin_name = %config.plugin_name,
        node_id = %config.node_id,
        mount_dir = %config.mount_dir.display(),
        kubelet_root = %config.kubelet_root.display(),
        "CSI node plugin listening"
    );
    let csi_stop = CancellationToken::new();
    let mut csi = tokio::spawn(serve_csi(
        &config,
        sds_serving,
        listener,
        csi_stop.clone(),
        metrics,
        pod_volumes,
    ));
    let result = tokio::select! {
        ended = &mut csi => Err(server_ended(&config.socket, ended)),
        registered = register_until_shutdown(&config, registration, &shutdown) => {
            csi_stop.cancel();
            registered.and(drain(&config.socket, csi).await)
        }
    };
    uds::remove_socket_on_shutdown(&config.socket);
    result
}

fn serve_csi(
    config: &CsiConfig,
    sds_serving: watch::Receiver<bool>,
    listener: UnixListener,
    stop: CancellationToken,
    metrics: Arc<CsiMetrics>,
    pod_volumes: Option<Arc<dyn pod_mode::PodVolumeHandler>>,
) -> impl Future<Output = Result<(), tonic::transport::Error>> + Send + 'static {
    let identity = identity::IdentityService::new(
        config.plugin_name.clone(),
        config.mount_dir.clone(),
        sds_serving,
    );
    let node = match pod_volumes {
        Some(handler) => node::NodeService::with_pod_volumes(config, Arc::clone(&metrics), handler),
        None => node::NodeService::new(config, Arc::clone(&metrics)),
    };
    // Undeclared methods (NodeStage/Unstage/Expand, the Controller service) are answered
    // UNIMPLEMENTED by tonic, as the spec asks (N-3).
    Server::builder()
        .layer(CsiCallsLayer::new(metrics))
        .add_service(IdentityServer::new(identity))
        .add_service(NodeServer::new(node))
        .serve_with_incoming_shutdown(uds::incoming(listener), stop.cancelled_owned())
}

fn server_ended(
    path: &Path,
    ended: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> CsiError {
    match ended {
        Ok(Ok(())) => CsiError::Stopped {
            path: path.to_path_buf(),
        },
        Ok(Err(source)) => CsiError::Serve {
            path: path.to_path_buf(),
            source,
        },
        Err(join) => CsiError::Task(join),
    }
}

/// Waits for the CSI server to finish in-flight calls (a publish mid-mount completes).
async fn drain(
    path: &Path,
    csi: JoinHandle<Result<(), tonic::transport::Error>>,
) -> Result<(), CsiError> {
    let abort = csi.abort_handle();
    match tokio::time::timeout(DRAIN_TIMEOUT, csi).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(ended) => Err(server_ended(path, ended)),
        Err(_) => {
            tracing::warn!(
                csi_socket = %path.display(),
                "CSI calls still running at shutdown; abandoning them"
            );
            abort.abort();
            Ok(())
        }
    }
}

/// Registration order (docs/behaviours.md, "Kubelet plugin registration"): the registration
/// socket appears only once the CSI socket answers (the kubelet calls NodeGetInfo right
/// after GetInfo) and disappears first at shutdown (the kubelet reads its removal as
/// deregistration).
async fn register_until_shutdown(
    config: &CsiConfig,
    status: watch::Sender<RegistrationStatus>,
    shutdown: &CancellationToken,
) -> Result<(), CsiError> {
    tokio::select! {
        answered = wait_until_answering(&config.socket) => answered?,
        () = shutdown.cancelled() => return Ok(()),
    }
    if !config.register_with_kubelet {
        tracing::info!("kubelet registration disabled (--disable-kubelet-registration)");
        shutdown.cancelled().await;
        return Ok(());
    }
    let registration = RunningRegistration::start(config, status);
    shutdown.cancelled().await;
    if let Some(registration) = registration {
        registration.stop().await;
    }
    Ok(())
}

async fn wait_until_answering(socket: &Path) -> Result<(), CsiError> {
    let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    loop {
        let attempt = async {
            let channel = connect_uds(socket).await.map_err(|err| err.to_string())?;
            IdentityClient::new(channel)
                .get_plugin_info(GetPluginInfoRequest {})
                .await
                .map_err(|status| status.to_string())
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(reason)) if tokio::time::Instant::now() >= deadline => {
                return Err(CsiError::NotAnswering {
                    path: socket.to_path_buf(),
                    reason,
                });
            }
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => {
                return Err(CsiError::NotAnswering {
                    path: socket.to_path_buf(),
                    reason: format!("no answer within {ANSWER_TIMEOUT:?}"),
                });
            }
        }
    }
}

/// The registration server while it runs. Dropping it (the CSI server died first) still
/// removes the socket, so the kubelet never keeps dialling a dead plugin.
struct RunningRegistration {
    socket: PathBuf,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl RunningRegistration {
    /// Serves the registration socket. Failing to is logged and reported as
    /// [`RegistrationStatus::Unavailable`], not fatal: with spiffe-csi-driver's chart the
    /// node-driver-registrar sidecar registers the plugin and `plugins_registry` is not
    /// mounted into our container, yet the CSI socket must keep working (drop-in).
    fn start(config: &CsiConfig, status: watch::Sender<RegistrationStatus>) -> Option<Self> {
        let socket = config.registration_socket();
        let listener = match bind_registration_socket(&socket) {
            Ok(listener) => listener,
            Err(reason) => {
                tracing::error!(registration_socket = %socket.display(), %reason,
                    "cannot serve kubelet registration; the kubelet will not find this plugin \
                     unless node-driver-registrar registers it");
                status.send_replace(RegistrationStatus::Unavailable { reason });
                return None;
            }
        };
        status.send_replace(RegistrationStatus::AwaitingKubelet);
        let service = registration::RegistrationService::new(
            &config.plugin_name,
            &config.registration_endpoint,
            status,
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            Server::builder()
                .add_service(RegistrationServer::new(service))
                .serve_with_incoming_shutdown(
                    uds::incoming(listener),
                    stop.clone().cancelled_owned(),
                ),
        );
        tracing::info!(
            registration_socket = %socket.display(),
            "kubelet registration socket serving"
        );
        Some(RunningRegistration {
            socket,
            stop,
            task: Some(task),
        })
    }

    /// Removes the socket first (deregistration), then stops the server.
    async fn stop(mut self) {
        uds::remove_socket_on_shutdown(&self.socket);
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(DRAIN_TIMEOUT, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for RunningRegistration {
    fn drop(&mut self) {
        if self.task.is_some() {
            uds::remove_socket_on_shutdown(&self.socket);
            self.stop.cancel();
        }
    }
}

fn bind_registration_socket(socket: &Path) -> Result<UnixListener, String> {
    registration::ensure_registry_dir(socket)
        .map_err(|err| format!("creating the plugin registry directory: {err}"))?;
    uds::bind(socket, SocketAccess::Owner).map_err(|err| err.to_string())
}

pub use crate::uds::connect as connect_uds;
