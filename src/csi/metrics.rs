//! CSI metrics, registered into the bridge's one registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::watch;

use super::RegistrationStatus;
use crate::telemetry::metrics::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CsiCallLabel {
    pub method: String,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Debug)]
pub struct CsiMetrics {
    pub calls: Family<CsiCallLabel, Counter>,
    pub duration: Family<MethodLabel, Histogram>,
    pub published_volumes: Gauge,
    pub registration: Family<StateLabel, Gauge>,
}

fn latency_histogram() -> Histogram {
    // 100 µs … ~50 s.
    Histogram::new(exponential_buckets(0.0001, 4.0, 10))
}

impl CsiMetrics {
    /// Creates the CSI metrics and adds them to `registry`.
    pub fn register(registry: &Metrics) -> Self {
        let csi = Self {
            calls: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            published_volumes: Gauge::default(),
            registration: Family::default(),
        };
        registry.register(
            "csi_calls",
            "CSI calls by method and gRPC code",
            csi.calls.clone(),
        );
        registry.register(
            "csi_call_duration_seconds",
            "CSI call latency",
            csi.duration.clone(),
        );
        registry.register(
            "csi_volumes_published",
            "Volumes currently bind-mounted into pods",
            csi.published_volumes.clone(),
        );
        registry.register(
            "kubelet_registration",
            "1 for the current kubelet registration state",
            csi.registration.clone(),
        );
        csi
    }

    pub fn set_registration_state(&self, state: &'static str) {
        for known in RegistrationStatus::STATES {
            self.registration
                .get_or_create(&StateLabel { state: known })
                .set(i64::from(*known == state));
        }
    }

    /// Keeps `kubelet_registration` on the state `registration` reports, until its sender
    /// is dropped.
    pub fn follow_registration(
        self: &std::sync::Arc<Self>,
        mut registration: watch::Receiver<RegistrationStatus>,
    ) {
        let metrics = std::sync::Arc::clone(self);
        tokio::spawn(async move {
            loop {
                metrics.set_registration_state(registration.borrow_and_update().state());
                if registration.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}
