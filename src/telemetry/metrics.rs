//! The one Prometheus registry the bridge exports (OpenMetrics text). Each domain defines
//! and registers its own metrics here (`sds::metrics`, `identity::metrics`,
//! `csi::metrics`); this module only holds and encodes them.
//!
//! Label sets are bounded by construction: no PID, pod, SPIFFE ID or secret-name labels,
//! only small enums.

use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// Every metric the bridge exports, under the `svid_bridge_` prefix.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with `build_info` for this crate's version.
    pub fn new() -> Self {
        Self::with_version(crate::VERSION)
    }

    pub fn with_version(version: &'static str) -> Self {
        let mut registry = Registry::with_prefix("svid_bridge");
        let build_info: Family<VersionLabel, Gauge> = Family::default();
        build_info.get_or_create(&VersionLabel { version }).set(1);
        registry.register("build_info", "svid-bridge version", build_info);
        Self {
            registry: Mutex::new(registry),
        }
    }

    /// Adds a metric; the caller keeps a clone to update it.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.lock().register(name, help, metric);
    }

    /// Adds metrics computed at scrape time.
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.lock().register_collector(collector);
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.lock());
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Registering is one insert; a panic elsewhere cannot leave the registry half done.
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn registered_metrics_and_build_info_are_exported() {
        let metrics = Metrics::with_version("1.2.3");
        let counter = Counter::<u64>::default();
        metrics.register("things", "Things", counter.clone());
        counter.inc();
        let text = metrics.encode();
        assert!(text.contains("svid_bridge_things_total 1"), "{text}");
        assert!(
            text.contains("svid_bridge_build_info{version=\"1.2.3\"} 1"),
            "{text}"
        );
    }
}
