//! The kubelet plugin-registration service (docs/behaviours.md, "Kubelet plugin registration"), so no node-driver-registrar sidecar
//! is needed: the kubelet's plugin watcher finds `<name>-reg.sock` in `plugins_registry/`,
//! calls GetInfo, registers the CSI endpoint it returns, and reports back through
//! NotifyRegistrationStatus.

use std::path::{Path, PathBuf};

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::proto::pluginregistration::registration_server::Registration;
use crate::proto::pluginregistration::{
    InfoRequest, PluginInfo, RegistrationStatus as KubeletStatus, RegistrationStatusResponse,
};

/// What the node-driver-registrar reports (docs/behaviours.md, "Kubelet plugin registration").
pub const PLUGIN_TYPE: &str = "CSIPlugin";
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0"];

/// Where kubelet registration stands; read it from the [`watch::Receiver`] given to
/// [`super::serve_with_registration`] for health and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationStatus {
    /// The registration socket is not up yet.
    NotStarted,
    /// The socket serves; the kubelet has not reported a result yet.
    AwaitingKubelet,
    /// The kubelet registered the plugin.
    Registered,
    /// The kubelet refused the registration (NotifyRegistrationStatus false). The kubelet
    /// retries by itself; node-driver-registrar exits here, we keep serving and say so.
    Rejected { error: String },
    /// We could not serve the registration socket (e.g. `plugins_registry` not mounted).
    Unavailable { reason: String },
}

impl RegistrationStatus {
    /// Every value of [`RegistrationStatus::state`], for the metric's label.
    pub const STATES: &'static [&'static str] = &[
        "not_started",
        "awaiting_kubelet",
        "registered",
        "rejected",
        "unavailable",
    ];

    /// A short name for metrics and health.
    pub fn state(&self) -> &'static str {
        match self {
            RegistrationStatus::NotStarted => "not_started",
            RegistrationStatus::AwaitingKubelet => "awaiting_kubelet",
            RegistrationStatus::Registered => "registered",
            RegistrationStatus::Rejected { .. } => "rejected",
            RegistrationStatus::Unavailable { .. } => "unavailable",
        }
    }

    /// True only when the kubelet confirmed the registration.
    pub fn is_registered(&self) -> bool {
        matches!(self, RegistrationStatus::Registered)
    }

    /// True when registration failed (rejected by the kubelet or no socket): unhealthy.
    pub fn is_failed(&self) -> bool {
        matches!(
            self,
            RegistrationStatus::Rejected { .. } | RegistrationStatus::Unavailable { .. }
        )
    }
}

pub struct RegistrationService {
    info: PluginInfo,
    status: watch::Sender<RegistrationStatus>,
}

impl RegistrationService {
    /// `endpoint` is the CSI socket as the kubelet (in the host's mount namespace) sees it.
    pub fn new(
        plugin_name: &str,
        endpoint: &Path,
        status: watch::Sender<RegistrationStatus>,
    ) -> Self {
        RegistrationService {
            info: PluginInfo {
                r#type: PLUGIN_TYPE.to_owned(),
                name: plugin_name.to_owned(),
                endpoint: endpoint.to_string_lossy().into_owned(),
                supported_versions: SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
            },
            status,
        }
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    /// Called at discovery and, by newer kubelets, periodically as a health check.
    async fn get_info(
        &self,
        _request: Request<InfoRequest>,
    ) -> Result<Response<PluginInfo>, Status> {
        tracing::debug!(
            name = %self.info.name,
            endpoint = %self.info.endpoint,
            "kubelet asked for plugin info"
        );
        Ok(Response::new(self.info.clone()))
    }

    async fn notify_registration_status(
        &self,
        request: Request<KubeletStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let report = request.into_inner();
        let status = if report.plugin_registered {
            tracing::info!(name = %self.info.name, "registered with the kubelet");
            RegistrationStatus::Registered
        } else {
            tracing::error!(
                name = %self.info.name,
                error = %report.error,
                "the kubelet refused to register the CSI plugin; pods using it cannot start"
            );
            RegistrationStatus::Rejected {
                error: report.error,
            }
        };
        self.status.send_replace(status);
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

/// Creates `plugins_registry` when missing (0750, root-only like the kubelet's own).
pub fn ensure_registry_dir(socket: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    const MODE: u32 = 0o750;
    let dir = socket
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    match std::fs::DirBuilder::new().mode(MODE).create(&dir) {
        // mkdir applies the umask (0077 under `svid-bridge run`): set the mode explicitly.
        Ok(()) => {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(MODE)).map(|()| dir)
        }
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(dir),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn info_and_status_reports() {
        let (tx, rx) = watch::channel(RegistrationStatus::AwaitingKubelet);
        let service = RegistrationService::new("csi.spiffe.io", Path::new("/p/csi.sock"), tx);
        let info = service
            .get_info(Request::new(InfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, "csi.spiffe.io");
        assert_eq!(info.endpoint, "/p/csi.sock");
        assert_eq!(info.supported_versions, ["1.0.0"]);

        let report = |ok: bool, error: &str| {
            Request::new(KubeletStatus {
                plugin_registered: ok,
                error: error.to_owned(),
            })
        };
        service
            .notify_registration_status(report(false, "version"))
            .await
            .unwrap();
        assert_eq!(
            *rx.borrow(),
            RegistrationStatus::Rejected {
                error: "version".into()
            }
        );
        assert!(rx.borrow().is_failed());
        service
            .notify_registration_status(report(true, ""))
            .await
            .unwrap();
        assert!(rx.borrow().is_registered());
    }

    #[test]
    fn registry_dir_is_created_once() {
        let root = tempfile::tempdir().unwrap();
        let socket = root.path().join("plugins_registry/x-reg.sock");
        let dir = ensure_registry_dir(&socket).unwrap();
        assert!(dir.is_dir());
        ensure_registry_dir(&socket).unwrap();
    }
}
