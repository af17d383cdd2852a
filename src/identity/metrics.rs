//! Metrics of the upstream subscriptions to the SPIRE agent, registered into the bridge's
//! one registry.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};

use super::supervisor::SupervisorMetrics;
use crate::clock::SharedClock;
use crate::telemetry::metrics::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    /// delegated or workload_api.
    pub api: &'static str,
    /// svids or bundles.
    pub subscription: &'static str,
}

#[derive(Debug, Default)]
pub struct UpstreamMetrics {
    pub connected: Family<UpstreamLabel, Gauge>,
    pub reconnects: Family<UpstreamLabel, Counter>,
    pub workloads: Gauge,
}

impl UpstreamMetrics {
    /// Creates the upstream metrics and adds them to `registry`.
    pub fn register(registry: &Metrics) -> Self {
        let upstream = Self::default();
        registry.register("upstream_connected", "1 while the subscription to the SPIRE agent delivers (bundles), or the number of workload subscriptions connected (svids)", upstream.connected.clone());
        registry.register(
            "upstream_reconnects",
            "Reconnects to the SPIRE agent after a failed or closed subscription",
            upstream.reconnects.clone(),
        );
        registry.register(
            "workload_subscriptions",
            "Workloads with an upstream SVID subscription (shared by all their streams)",
            upstream.workloads.clone(),
        );
        upstream
    }

    /// The connected gauge and reconnect counter of one kind of subscription, looked up
    /// once.
    pub fn of(&self, api: &'static str, subscription: &'static str) -> SupervisorMetrics {
        let label = UpstreamLabel { api, subscription };
        SupervisorMetrics {
            connected: self.connected.get_or_create(&label).clone(),
            reconnects: self.reconnects.get_or_create(&label).clone(),
        }
    }
}

/// Adds a gauge computed at scrape time: seconds until the earliest expiry among the SVIDs
/// the bridge currently serves (absent when it serves none).
pub fn register_earliest_expiry(
    registry: &Metrics,
    clock: SharedClock,
    earliest: impl Fn() -> Option<i64> + Send + Sync + 'static,
) {
    registry.register_collector(Box::new(ExpiryCollector {
        earliest: Arc::new(earliest),
        clock,
    }));
}

struct ExpiryCollector {
    earliest: Arc<dyn Fn() -> Option<i64> + Send + Sync>,
    clock: SharedClock,
}

impl std::fmt::Debug for ExpiryCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExpiryCollector")
    }
}

impl Collector for ExpiryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(expires_at) = (self.earliest)() else {
            return Ok(());
        };
        let gauge = ConstGauge::new(expires_at.saturating_sub(self.clock.unix_now()));
        let metric = encoder.encode_descriptor(
            "svid_earliest_expiry_seconds",
            "Seconds until the earliest expiry among the SVIDs served.",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{SystemClock, unix_now};

    #[test]
    fn expiry_is_computed_at_scrape_time() {
        let metrics = Metrics::new();
        assert!(
            !metrics.encode().contains("earliest_expiry"),
            "absent when nothing is served"
        );
        let at = unix_now() + 600;
        register_earliest_expiry(&metrics, Arc::new(SystemClock), move || Some(at));
        let text = metrics.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("svid_bridge_svid_earliest_expiry_seconds "))
            .unwrap();
        let seconds: i64 = line.split(' ').nth(1).unwrap().parse().unwrap();
        assert!((598..=600).contains(&seconds), "{line}");
    }
}
