//! Pod-scoped identity through the CSI volume (#15): a volume with `mode: pod` gets its own
//! tmpfs with a socket that serves the SPIFFE Workload API and SDS for that pod only (the
//! mount is the identity, no PID attestation), and with `files: "true"` the SVID, key,
//! bundles and JWT-SVIDs as files, rotated atomically. The pod's identity comes from the
//! kubelet's pod fields, verified against the API server ([`verify`]), as the selectors
//! SPIRE's k8s attestor would emit; the agent matches entries by them through the
//! Delegated Identity API (PI-4, PI-5).

pub mod attributes;
pub mod files;
pub mod metrics;
pub mod state;
pub mod verify;
pub mod volume;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use std::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::csi::pod_mode::{PodPublish, PodVolumeHandler};
use crate::identity::DelegatedSource;
use crate::identity::supervisor::Backoff;
use crate::k8s::events::{ACTION_PUBLISH_VOLUME, POD_VOLUME_REFUSED, PodEvents};
use crate::k8s::{PodRef, Pods};
use crate::sds::PodSds;
use crate::telemetry::metrics::Metrics;

pub use metrics::PodMetrics;
pub use state::{StateDir, VolumeRecord};
pub use verify::PodFieldCheck;
use volume::{FilesState, RunningVolume, Shared};

/// The default state directory: on the host (the chart mounts it Bidirectional), so the
/// volumes' tmpfs mounts outlive a bridge restart.
pub const DEFAULT_STATE_DIR: &str = "/run/svid-bridge/pods";
/// How long a files volume's first publish waits for its first SVID: below the kubelet's
/// 2-minute call timeout (PI-44), as csi-lib's 60 s (PI-32).
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct PodConfig {
    pub state_dir: PathBuf,
    pub field_check: PodFieldCheck,
    pub publish_timeout: Duration,
    /// This node's name (the CSI node ID): `k8s:node-name`, and where the pod must run.
    pub node: String,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PodError {
    #[error("pod-mode state directory {path:?}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the volumes use of the node's bridge: its SDS settings and cache, the agent, the
/// pod view and its Event poster (shared, so refusals count in the node's Event bound).
pub struct NodeParts {
    pub sds: PodSds,
    pub agent: Arc<DelegatedSource>,
    pub backoff: Arc<dyn Backoff>,
    pub pods: Pods,
    pub events: Option<PodEvents>,
}

/// The pod-mode volumes of this node.
pub struct PodVolumes {
    config: PodConfig,
    state: StateDir,
    shared: Shared,
    pods: Pods,
    volumes: Mutex<HashMap<String, RunningVolume>>,
    /// Refused publishes become an Event on the pod (besides the kubelet's FailedMount).
    events: Option<PodEvents>,
    shutdown: CancellationToken,
}

impl PodVolumes {
    /// Creates the state directory and starts following the node's JWT bundles.
    pub fn new(
        config: PodConfig,
        node: NodeParts,
        registry: &Metrics,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, PodError> {
        let NodeParts {
            sds,
            agent,
            backoff,
            pods,
            events,
        } = node;
        let state = StateDir::new(config.state_dir.clone());
        state.create().map_err(|source| PodError::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
        let jwt_bundles =
            crate::identity::jwt::follow_jwt_bundles(&agent, backoff, shutdown.clone());
        let shared = Shared {
            sds,
            agent,
            jwt_bundles,
            metrics: PodMetrics::register(registry),
        };
        Ok(Arc::new(Self {
            config,
            state,
            shared,
            events,
            pods,
            volumes: Mutex::default(),
            shutdown,
        }))
    }

    /// After a restart: serves again every volume whose pod still has it mounted (same
    /// tmpfs, so the same socket path and files inside the pod, unlike csi-lib#74), and
    /// cleans up the others. Runs before the CSI socket opens, so no call races it.
    pub async fn recover(&self) -> usize {
        let records = self.state.records();
        let known: Vec<String> = records.iter().map(|r| r.volume_id.clone()).collect();
        for orphan in self.state.orphans(&known) {
            tracing::info!(volume_id = %orphan, "removing a pod-mode volume without a record");
            self.state.remove_volume(&orphan);
        }
        let mut volumes = self.lock();
        for record in records {
            let dir = self.state.volume_dir(&record.volume_id);
            let still_published =
                state::is_mount_point(&dir) && state::is_mount_point(&record.target_path);
            if !still_published {
                tracing::info!(volume_id = %record.volume_id, pod = %record.pod.name, "pod-mode volume no longer mounted; cleaning up");
                self.state.remove_volume(&record.volume_id);
                continue;
            }
            let volume_id = record.volume_id.clone();
            match RunningVolume::start(&self.shared, record, dir, &self.shutdown) {
                Ok(running) => {
                    self.shared.metrics.volumes.inc();
                    volumes.insert(volume_id, running);
                }
                Err(err) => {
                    tracing::error!(%volume_id, %err, "cannot serve a recovered pod-mode volume again")
                }
            }
        }
        tracing::info!(volumes = volumes.len(), "pod-mode volumes recovered");
        volumes.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningVolume>> {
        // Every update is one insert or remove: a poisoned map is still consistent.
        self.volumes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }

    async fn publish_volume(&self, request: PodPublish) -> Result<PathBuf, Status> {
        if !state::valid_volume_id(&request.volume_id) {
            return Err(Status::invalid_argument(format!(
                "volume ID {:?} is not a plain file name",
                request.volume_id
            )));
        }
        // A republish (requiresRepublish, a kubelet restart) of a volume we serve: never an
        // error (PI-43).
        if let Some(running) = self.lock().get(&request.volume_id) {
            return Ok(running.dir().to_path_buf());
        }
        let pod = named_pod(&request);
        let result = self.first_publish(request).await;
        if let Err(status) = &result {
            self.shared.metrics.refused.inc();
            tracing::warn!(error = %status.message(), "pod-mode volume refused");
            if let (Some(pod), Some(events)) = (pod, &self.events) {
                let note = format!(
                    "svid-bridge refused the pod-mode CSI volume: {}",
                    status.message()
                );
                // The pod view's UID for that name: a forged UID gets no Event of its own.
                events
                    .clone()
                    .warn(&pod, None, POD_VOLUME_REFUSED, ACTION_PUBLISH_VOLUME, note)
                    .await;
            }
        }
        result
    }

    async fn first_publish(&self, request: PodPublish) -> Result<PathBuf, Status> {
        let (fields, options) = attributes::parse(
            &request.volume_context,
            request.volume_mount_group.as_deref(),
        )
        .map_err(|err| Status::invalid_argument(err.to_string()))?;
        let pod = verify::verify(
            fields,
            self.config.field_check,
            &self.pods,
            &self.config.node,
        )
        .await
        .map_err(|err| Status::permission_denied(err.to_string()))?;
        let record = VolumeRecord {
            volume_id: request.volume_id.clone(),
            target_path: request.target_path,
            pod: pod.fields,
            options,
            selectors: pod
                .selectors
                .iter()
                .map(|s| (s.kind.clone(), s.value.clone()))
                .collect(),
        };
        let dir = self
            .state
            .mount_tmpfs(&record.volume_id, record.options.group)
            .map_err(|err| Status::internal(format!("cannot mount the volume's tmpfs: {err}")))?;
        if let Err(err) = self.state.save(&record) {
            self.state.remove_volume(&record.volume_id);
            return Err(Status::internal(format!("cannot record the volume: {err}")));
        }
        let running =
            match RunningVolume::start(&self.shared, record.clone(), dir.clone(), &self.shutdown) {
                Ok(running) => running,
                Err(err) => {
                    self.state.remove_volume(&record.volume_id);
                    return Err(Status::unavailable(format!(
                        "cannot serve the volume: {err}"
                    )));
                }
            };
        if record.options.files
            && let Err(status) = self.wait_for_files(&running).await
        {
            running.stop().await;
            self.state.remove_volume(&record.volume_id);
            return Err(status);
        }
        self.shared.metrics.volumes.inc();
        tracing::info!(
            pod = %format!("{}/{}", record.pod.namespace, record.pod.name),
            selectors = %record.selector_set(),
            files = record.options.files,
            "pod-mode volume serving"
        );
        self.lock().insert(record.volume_id, running);
        Ok(dir)
    }

    /// A files volume is mounted only once its files exist: an application that reads
    /// them at start must not find an empty directory (D1).
    async fn wait_for_files(&self, running: &RunningVolume) -> Result<(), Status> {
        let mut files = running.files.clone();
        let timeout = self.config.publish_timeout;
        let written = tokio::time::timeout(timeout, files.wait_for(|s| *s == FilesState::Written))
            .await
            .is_ok_and(|r| r.is_ok());
        if written {
            return Ok(());
        }
        let selectors = running.record.selector_set();
        let why = match &*files.borrow() {
            FilesState::NoEntry => format!(
                "the SPIRE agent has no registration entry matching the selectors {selectors} \
                 (entries with container-level selectors cannot match a volume)"
            ),
            FilesState::Failed(err) => format!("the files could not be written: {err}"),
            FilesState::Pending | FilesState::Written => format!(
                "the SPIRE agent has not answered for the selectors {selectors} (is it running, \
                 and is svid-bridge an authorized delegate?)"
            ),
        };
        Err(Status::unavailable(format!(
            "waited {}s for the pod's first SVID files: {why}; the kubelet will retry",
            timeout.as_secs()
        )))
    }

    async fn unpublish_volume(&self, volume_id: String) {
        if !state::valid_volume_id(&volume_id) {
            return;
        }
        let running = self.lock().remove(&volume_id);
        if let Some(running) = running {
            running.stop().await;
            self.shared.metrics.volumes.dec();
            tracing::info!(%volume_id, "pod-mode volume stopped and removed");
        }
        self.state.remove_volume(&volume_id);
    }
}

/// The pod a publish names (not yet verified): where an Event about it goes.
fn named_pod(request: &PodPublish) -> Option<PodRef> {
    let context = &request.volume_context;
    Some(PodRef {
        namespace: context.get(attributes::POD_NAMESPACE)?.clone(),
        name: context.get(attributes::POD_NAME)?.clone(),
        container: None,
    })
}

impl PodVolumeHandler for PodVolumes {
    fn publish(&self, request: PodPublish) -> BoxFuture<'_, Result<PathBuf, Status>> {
        Box::pin(self.publish_volume(request))
    }

    fn unpublish(&self, volume_id: String) -> BoxFuture<'_, ()> {
        Box::pin(self.unpublish_volume(volume_id))
    }

    fn source_of(&self, volume_id: &str) -> Option<PathBuf> {
        self.lock().get(volume_id).map(|v| v.dir().to_path_buf())
    }
}
