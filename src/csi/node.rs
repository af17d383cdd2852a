//! CSI Node service for ephemeral inline volumes (the P-, U-, N-, V- and R- ids of docs/behaviours.md).
//!
//! Handlers validate, confine the path, take the per-target lock and run the blocking mount
//! work on tokio's blocking pool; [`super::mount`] holds the syscalls.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::CsiConfig;
use super::locks::{TargetGuard, TargetLocks};
use super::metrics::CsiMetrics;
use super::mount::{self, MountError, Published};
use super::pod_mode::{self, PodPublish, PodVolumeHandler};
use super::target::{Target, shorten};
use super::validate;
use crate::proto::csi::node_server::Node;
use crate::proto::csi::node_service_capability::{
    Rpc, Type as CapabilityType, rpc::Type as RpcType,
};
use crate::proto::csi::volume_capability::AccessType;
use crate::proto::csi::volume_usage::Unit;
use crate::proto::csi::{
    NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest,
    NodeGetInfoResponse, NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse,
    NodePublishVolumeRequest, NodePublishVolumeResponse, NodeServiceCapability,
    NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse, VolumeCondition, VolumeUsage,
};

/// `volume_context` keys the kubelet adds with `podInfoOnMount: true` (docs/behaviours.md, "Kubelet volume context").
/// Volumes already published when the plugin starts (a restart must not reset the gauge):
/// mounts under `pods_dir` whose device and root are those of `mount_dir`. Read once, so
/// the mountinfo scan's cost on busy nodes does not matter.
fn count_published(mount_dir: &Path, pods_dir: &Path) -> usize {
    let Ok(mounts) = super::mountinfo::read_own() else {
        return 0;
    };
    let Some(holder) = mounts
        .iter()
        .filter(|m| mount_dir.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
    else {
        return 0;
    };
    let Ok(relative) = mount_dir.strip_prefix(&holder.mount_point) else {
        return 0;
    };
    let root = holder.root.join(relative);
    mounts
        .iter()
        .filter(|m| {
            m.mount_point.starts_with(pods_dir) && m.device == holder.device && m.root == root
        })
        .count()
}

const POD_NAME_KEY: &str = "csi.storage.k8s.io/pod.name";
const POD_NAMESPACE_KEY: &str = "csi.storage.k8s.io/pod.namespace";
const POD_UID_KEY: &str = "csi.storage.k8s.io/pod.uid";

#[derive(Clone)]
pub struct NodeService {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: String,
    /// The socket directory bind-mounted into pods.
    mount_dir: PathBuf,
    /// `<kubelet-root>/pods`: every target must be below it.
    pods_dir: PathBuf,
    locks: TargetLocks,
    metrics: Arc<CsiMetrics>,
    /// Pod-mode volumes (#15); `None` when pod mode is off.
    pod_volumes: Option<Arc<dyn PodVolumeHandler>>,
}

impl NodeService {
    pub fn new(config: &CsiConfig, metrics: Arc<CsiMetrics>) -> Self {
        let published = count_published(&config.mount_dir, &config.pods_dir());
        metrics
            .published_volumes
            .set(i64::try_from(published).unwrap_or(i64::MAX));
        NodeService {
            inner: Arc::new(Inner {
                node_id: config.node_id.clone(),
                mount_dir: config.mount_dir.clone(),
                pods_dir: config.pods_dir(),
                locks: TargetLocks::default(),
                metrics,
                pod_volumes: None,
            }),
        }
    }

    /// Serves pod-mode volumes through `handler` (and advertises VOLUME_MOUNT_GROUP, so the
    /// kubelet passes the pod's fsGroup).
    pub fn with_pod_volumes(
        config: &CsiConfig,
        metrics: Arc<CsiMetrics>,
        handler: Arc<dyn PodVolumeHandler>,
    ) -> Self {
        let mut service = Self::new(config, metrics);
        if let Some(inner) = Arc::get_mut(&mut service.inner) {
            inner.pod_volumes = Some(handler);
        }
        service
    }

    async fn publish(
        &self,
        req: NodePublishVolumeRequest,
    ) -> Result<NodePublishVolumeResponse, Status> {
        validate::publish(&req).map_err(Status::invalid_argument)?;
        // R-4 after P-1…P-9, so spiffe's messages keep their precedence.
        let target = Target::confine(&req.target_path, &self.inner.pods_dir, "target path")
            .map_err(|err| Status::invalid_argument(err.to_string()))?;
        let guard = self.inner.locks.lock(target.path()).await;
        if pod_mode::is_pod_mode(&req.volume_context) {
            return self.publish_pod_volume(req, target, guard).await;
        }
        let (source, pods_dir) = (&self.inner.mount_dir, &self.inner.pods_dir);
        match locked(guard, || mount::publish(source, pods_dir, &target))? {
            Published::Mounted => {
                self.inner.metrics.published_volumes.inc();
                tracing::info!("volume published");
            }
            // P-11: a kubelet restart republishes every volume; mounting again is what
            // multiplied mounts on spiffe-csi-driver < 0.2.12 (K-3).
            Published::AlreadyMounted => tracing::info!("volume already published"),
        }
        Ok(NodePublishVolumeResponse {})
    }

    /// A pod-mode volume: the handler prepares its own directory (socket, files), which is
    /// bind-mounted like the shared one. A failed first mount undoes the handler's work.
    async fn publish_pod_volume(
        &self,
        req: NodePublishVolumeRequest,
        target: Target,
        guard: TargetGuard,
    ) -> Result<NodePublishVolumeResponse, Status> {
        let Some(handler) = &self.inner.pod_volumes else {
            return Err(Status::failed_precondition(
                "this volume asks for mode: pod, but svid-bridge runs without pod-scoped \
                 identity (--pod-mode off, or not the Delegated Identity API)",
            ));
        };
        let volume_mount_group =
            req.volume_capability
                .as_ref()
                .and_then(|c| match &c.access_type {
                    Some(AccessType::Mount(m)) if !m.volume_mount_group.is_empty() => {
                        Some(m.volume_mount_group.clone())
                    }
                    _ => None,
                });
        let volume_id = req.volume_id.clone();
        let source = handler
            .publish(PodPublish {
                volume_id: req.volume_id,
                target_path: target.path().to_path_buf(),
                volume_context: req.volume_context,
                volume_mount_group,
            })
            .await?;
        let pods_dir = &self.inner.pods_dir;
        match locked(guard, || mount::publish(&source, pods_dir, &target)) {
            Ok(Published::Mounted) => {
                self.inner.metrics.published_volumes.inc();
                tracing::info!(source = %source.display(), "pod-mode volume published");
            }
            Ok(Published::AlreadyMounted) => tracing::debug!("pod-mode volume already published"),
            Err(status) => {
                handler.unpublish(volume_id).await;
                return Err(status);
            }
        }
        Ok(NodePublishVolumeResponse {})
    }

    async fn unpublish(
        &self,
        req: NodeUnpublishVolumeRequest,
    ) -> Result<NodeUnpublishVolumeResponse, Status> {
        validate::unpublish(&req).map_err(Status::invalid_argument)?;
        let target = Target::confine(&req.target_path, &self.inner.pods_dir, "target path")
            .map_err(|err| Status::invalid_argument(err.to_string()))?;
        let guard = self.inner.locks.lock(target.path()).await;
        let pods_dir = &self.inner.pods_dir;
        let done = locked(guard, || mount::unpublish(pods_dir, &target))?;
        if done.unmounted > 0 {
            self.inner.metrics.published_volumes.dec();
        }
        if let Some(handler) = &self.inner.pod_volumes {
            handler.unpublish(req.volume_id.clone()).await;
        }
        match (done.unmounted, done.removed) {
            (0, false) => tracing::info!("volume already unpublished"), // U-6
            (0 | 1, _) => tracing::info!("volume unpublished"),
            (stacked, _) => {
                tracing::warn!(stacked, "volume unpublished; removed stacked mounts (R-1)")
            }
        }
        Ok(NodeUnpublishVolumeResponse {})
    }

    async fn volume_stats(
        &self,
        req: NodeGetVolumeStatsRequest,
    ) -> Result<NodeGetVolumeStatsResponse, Status> {
        validate::volume_stats(&req).map_err(Status::invalid_argument)?;
        // Anything that is not a confined path cannot be one of our volumes: NotFound, which
        // is also what csi-sanity expects for "some/path".
        let target = Target::confine(&req.volume_path, &self.inner.pods_dir, "volume path")
            .map_err(|err| Status::not_found(format!("not a published volume: {err}")))?;
        let pod_source =
            (self.inner.pod_volumes.as_ref()).and_then(|handler| handler.source_of(&req.volume_id));
        let source = pod_source.as_ref().unwrap_or(&self.inner.mount_dir);
        let pods_dir = &self.inner.pods_dir;
        let status = in_place(|| mount::inspect(source, pods_dir, &target)).map_err(to_status)?;
        if status.abnormal {
            tracing::warn!(condition = %status.message, "volume abnormal");
        }
        let entry = |usage: mount::Usage, unit: Unit| VolumeUsage {
            available: usage.available,
            total: usage.total,
            used: usage.used,
            unit: unit as i32,
        };
        // V-3: the kubelet drops a response without usage before it reads the condition.
        Ok(NodeGetVolumeStatsResponse {
            usage: vec![
                entry(status.bytes, Unit::Bytes),
                entry(status.inodes, Unit::Inodes),
            ],
            volume_condition: Some(VolumeCondition {
                abnormal: status.abnormal,
                message: status.message,
            }),
        })
    }
}

/// Runs `op` while holding the target's lock. It runs to completion once started: a
/// cancelled request cannot leave a mount half done or release the lock early.
fn locked<T>(guard: TargetGuard, op: impl FnOnce() -> Result<T, MountError>) -> Result<T, Status> {
    let result = in_place(op);
    drop(guard);
    result.map_err(to_status)
}

/// Runs filesystem syscalls on this thread. A mount or umount takes ~0.3 ms on a node with
/// 10,000 mounts: sending it to the blocking pool and back cost two cross-thread wake-ups
/// per call, which at the p99 doubled the call (BENCHMARKS.md §4.4). `block_in_place` moves
/// this worker's other tasks (SDS streams) to another thread meanwhile.
fn in_place<T>(op: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(op),
        _ => op(),
    }
}

fn to_status(err: MountError) -> Status {
    Status::new(err.code(), err.to_string())
}

/// Logs a failed call in its span: client mistakes at warn, our failures at error (G-2).
fn log_failure(status: &Status) {
    match status.code() {
        tonic::Code::Internal | tonic::Code::Unknown => {
            tracing::error!(code = ?status.code(), error = status.message(), "CSI call failed");
        }
        _ => tracing::warn!(code = ?status.code(), error = status.message(), "CSI call refused"),
    }
}

/// The span every volume call runs in. `secrets` is never recorded.
fn volume_span(
    method: &'static str,
    volume_id: &str,
    path: &str,
    context: Option<&std::collections::HashMap<String, String>>,
) -> tracing::Span {
    let field = |key: &str| context.and_then(|c| c.get(key)).map(|v| shorten(v));
    tracing::info_span!(
        "csi",
        method,
        volume_id = shorten(volume_id).as_str(),
        target_path = shorten(path).as_str(),
        pod.name = field(POD_NAME_KEY).as_deref(),
        pod.namespace = field(POD_NAMESPACE_KEY).as_deref(),
        pod.uid = field(POD_UID_KEY).as_deref(),
    )
}

async fn logged<T>(
    span: tracing::Span,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<Response<T>, Status> {
    async move {
        let result = call.await;
        if let Err(status) = &result {
            log_failure(status);
        }
        result.map(Response::new)
    }
    .instrument(span)
    .await
}

fn capability(rpc: RpcType) -> NodeServiceCapability {
    NodeServiceCapability {
        r#type: Some(CapabilityType::Rpc(Rpc { r#type: rpc as i32 })),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = volume_span(
            "NodePublishVolume",
            &req.volume_id,
            &req.target_path,
            Some(&req.volume_context),
        );
        logged(span, self.publish(req)).await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = volume_span(
            "NodeUnpublishVolume",
            &req.volume_id,
            &req.target_path,
            None,
        );
        logged(span, self.unpublish(req)).await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let span = volume_span("NodeGetVolumeStats", &req.volume_id, &req.volume_path, None);
        logged(span, self.volume_stats(req)).await
    }

    /// N-1: exactly spiffe-csi-driver's list and order. No STAGE_UNSTAGE_VOLUME, so the
    /// kubelet never calls NodeStageVolume.
    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let mut capabilities = vec![
            capability(RpcType::VolumeCondition),
            capability(RpcType::GetVolumeStats),
        ];
        // Only with pod mode on, so the shared mode's list stays spiffe's (N-1).
        if self.inner.pod_volumes.is_some() {
            capabilities.push(capability(RpcType::VolumeMountGroup));
        }
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    /// N-2: no volume limit, no topology.
    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.inner.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}
