//! The hook through which pod-mode volumes (`volumeAttributes: {mode: pod}`, #15) reach the
//! pod-scoped identity service (`crate::pod`), which this module does not depend on: the
//! node plugin mounts whatever directory the handler hands it, and asks it to clean up.

use std::collections::HashMap;
use std::path::PathBuf;

use futures::future::BoxFuture;
use tonic::Status;

/// The volume attribute that selects the mode; absent (or `shared`) is the node's shared
/// socket directory, unchanged.
pub const MODE_KEY: &str = "mode";
pub const POD_MODE: &str = "pod";

/// Whether a NodePublishVolume asks for a pod-mode volume.
pub fn is_pod_mode(volume_context: &HashMap<String, String>) -> bool {
    volume_context.get(MODE_KEY).map(String::as_str) == Some(POD_MODE)
}

/// A validated NodePublishVolume of a pod-mode volume.
#[derive(Clone, Debug)]
pub struct PodPublish {
    pub volume_id: String,
    pub target_path: PathBuf,
    /// The pod's `volumeAttributes` merged with the kubelet's `podInfoOnMount` keys.
    pub volume_context: HashMap<String, String>,
    /// The pod's `fsGroup`, passed by the kubelet because the plugin advertises
    /// VOLUME_MOUNT_GROUP (PI-45).
    pub volume_mount_group: Option<String>,
}

pub trait PodVolumeHandler: Send + Sync + 'static {
    /// Prepares (or, on a republish, finds) the volume's directory; the node plugin then
    /// bind-mounts it on the target. A volume served once must never fail a republish (PI-43).
    fn publish(&self, request: PodPublish) -> BoxFuture<'_, Result<PathBuf, Status>>;
    /// The node plugin unmounted the target (or a publish failed after `publish`): stop
    /// serving and remove everything. Unknown volume IDs are fine (not ours, or gone).
    fn unpublish(&self, volume_id: String) -> BoxFuture<'_, ()>;
    /// The directory a published pod-mode volume mounts, for volume stats.
    fn source_of(&self, volume_id: &str) -> Option<PathBuf>;
}
