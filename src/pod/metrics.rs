//! Pod-mode metrics, registered into the bridge's one registry. No pod labels: a node's
//! pods come and go, the series must not.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::telemetry::metrics::Metrics;

#[derive(Debug, Clone, Default)]
pub struct PodMetrics {
    pub volumes: Gauge,
    pub without_identity: Gauge,
    pub refused: Counter,
    pub files_written: Counter,
    pub file_sets_written: Counter,
    pub jwt_refreshes: Counter,
    pub jwt_failures: Counter,
}

impl PodMetrics {
    pub fn register(registry: &Metrics) -> Self {
        let pod = Self::default();
        registry.register(
            "pod_volumes",
            "Pod-mode CSI volumes served (each with its own socket)",
            pod.volumes.clone(),
        );
        registry.register(
            "pod_volumes_without_identity",
            "Pod-mode volumes for which the agent has no matching registration entry",
            pod.without_identity.clone(),
        );
        registry.register(
            "pod_volumes_refused",
            "Pod-mode publishes refused (bad attributes, unverifiable pod fields, no SVID in time)",
            pod.refused.clone(),
        );
        registry.register(
            "pod_files_written",
            "SVID, key, bundle and JWT files written into pod-mode volumes",
            pod.files_written.clone(),
        );
        registry.register(
            "pod_file_sets_written",
            "Atomic swaps of a pod-mode volume's file set (one per rotation or refresh)",
            pod.file_sets_written.clone(),
        );
        registry.register(
            "pod_jwt_refreshes",
            "JWT-SVIDs fetched for pod-mode volumes' files",
            pod.jwt_refreshes.clone(),
        );
        registry.register(
            "pod_jwt_failures",
            "Failed JWT-SVID fetches for pod-mode volumes' files (retried)",
            pod.jwt_failures.clone(),
        );
        pod
    }
}
