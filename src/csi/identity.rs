//! CSI Identity service (I-1…I-3; docs/behaviours.md, "CSI spec for a node-only plugin").

use std::path::PathBuf;

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::proto::csi::identity_server::Identity;
use crate::proto::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, ProbeRequest, ProbeResponse,
};

pub struct IdentityService {
    plugin_name: String,
    mount_dir: PathBuf,
    sds_serving: watch::Receiver<bool>,
}

impl IdentityService {
    pub fn new(
        plugin_name: String,
        mount_dir: PathBuf,
        sds_serving: watch::Receiver<bool>,
    ) -> Self {
        IdentityService {
            plugin_name,
            mount_dir,
            sds_serving,
        }
    }

    /// Probe's verdict: Ok(true) ready, Ok(false) still starting, Err(reason) cannot serve.
    fn readiness(&self) -> Result<bool, String> {
        match std::fs::metadata(&self.mount_dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "socket directory {:?} is not a directory",
                    self.mount_dir
                ));
            }
            Err(err) => {
                return Err(format!(
                    "socket directory {:?} is unavailable: {err}",
                    self.mount_dir
                ));
            }
        }
        if self.sds_serving.has_changed().is_err() {
            // The sender is gone: the SDS server stopped and will not come back.
            return Err("the SDS server is not running".to_owned());
        }
        Ok(*self.sds_serving.borrow())
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    /// I-1: the configured name (it must equal the CSIDriver object's name).
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.plugin_name.clone(),
            vendor_version: crate::VERSION.to_owned(),
            manifest: Default::default(),
        }))
    }

    /// I-2: no CONTROLLER_SERVICE; a node-only plugin.
    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    /// Unlike spiffe-csi-driver (I-3, always ready), ready means what a pod needs: the SDS
    /// socket serves and the socket directory exists. Starting → `ready=false`; cannot
    /// serve → FAILED_PRECONDITION with the reason (CSI spec, Probe).
    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        match self.readiness() {
            Ok(ready) => Ok(Response::new(ProbeResponse { ready: Some(ready) })),
            Err(reason) => {
                tracing::warn!(%reason, "CSI probe: not ready");
                Err(Status::failed_precondition(reason))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(dir: PathBuf, serving: watch::Receiver<bool>) -> IdentityService {
        IdentityService::new("csi.spiffe.io".into(), dir, serving)
    }

    async fn probe(service: &IdentityService) -> Result<Option<bool>, Status> {
        service
            .probe(Request::new(ProbeRequest {}))
            .await
            .map(|r| r.into_inner().ready)
    }

    #[tokio::test]
    async fn probe_follows_the_sds_server() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = watch::channel(false);
        let service = service(dir.path().to_path_buf(), rx);
        assert_eq!(probe(&service).await.unwrap(), Some(false), "starting");
        tx.send(true).unwrap();
        assert_eq!(probe(&service).await.unwrap(), Some(true));
        tx.send(false).unwrap();
        drop(tx);
        let err = probe(&service).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message().contains("SDS server is not running"),
            "{}",
            err.message()
        );
    }

    #[tokio::test]
    async fn probe_fails_without_the_socket_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (_tx, rx) = watch::channel(true);
        let service = service(dir.path().join("missing"), rx);
        let err = probe(&service).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message().contains("socket directory"),
            "{}",
            err.message()
        );
    }

    #[tokio::test]
    async fn plugin_info_and_no_capabilities() {
        let dir = tempfile::tempdir().unwrap();
        let (_tx, rx) = watch::channel(true);
        let service = service(dir.path().to_path_buf(), rx);
        let info = service
            .get_plugin_info(Request::new(GetPluginInfoRequest {}))
            .await
            .unwrap();
        assert_eq!(info.get_ref().name, "csi.spiffe.io");
        assert_eq!(info.get_ref().vendor_version, crate::VERSION);
        let caps = service
            .get_plugin_capabilities(Request::new(GetPluginCapabilitiesRequest {}))
            .await
            .unwrap();
        assert!(caps.get_ref().capabilities.is_empty());
    }
}
