//! What the bridge knows of Kubernetes on its own node: which pod and container a caller's
//! process runs in, from its cgroup ([`cgroup`]) and a watch of this node's pods
//! ([`watch`], [`pods`]), so that logs and `inspect` can name pods. A label only, never an
//! identity: identities come from the SPIRE agent.

pub mod cgroup;
pub mod events;
pub mod expiry;
pub mod pods;
pub mod watch;

pub use pods::{PodRef, Pods};
pub use watch::PodViewConfig;

/// `--kubernetes`: whether the bridge may use the Kubernetes API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KubernetesMode {
    /// Use the in-cluster service account when the bridge runs in a pod; otherwise say so
    /// once and run without it.
    #[default]
    Auto,
    /// Never use it.
    Off,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum K8sError {
    #[error("in-cluster Kubernetes configuration: {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}
