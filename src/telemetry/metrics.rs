//! Prometheus metrics (OpenMetrics text). Label sets are bounded by construction: no PID,
//! pod, SPIFFE ID or secret-name labels, only small enums.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::sds::names::Resource;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    /// default, spiffe_id, rootca, all, trust_domain, wildcard.
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabel {
    /// sotw, delta or fetch.
    pub api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    /// delegated or workload_api.
    pub api: &'static str,
    /// svids or bundles.
    pub subscription: &'static str,
}

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: &'static str,
}

/// The class of a requested name, for the `class` label.
pub fn name_class(resource: &Resource) -> &'static str {
    match resource {
        Resource::DefaultSvid => "default",
        Resource::Svid(_) => "spiffe_id",
        Resource::OwnBundle => "rootca",
        Resource::AllBundles => "all",
        Resource::TrustDomainBundle(_) => "trust_domain",
    }
}

#[derive(Debug)]
pub struct SdsMetrics {
    pub streams: Family<ClassLabel, Gauge>,
    pub responses: Family<ApiLabel, Counter>,
    pub acks: Counter,
    pub nacks: Counter,
    pub refused: Counter,
    pub waiting_streams: Gauge,
    pub wait_seconds: Histogram,
    pub connections: Gauge,
    pub connections_refused: Counter,
    pub streams_refused: Counter,
}

#[derive(Debug, Default)]
pub struct UpstreamMetrics {
    pub connected: Family<UpstreamLabel, Gauge>,
    pub reconnects: Family<UpstreamLabel, Counter>,
    pub workloads: Gauge,
}

#[derive(Debug)]
pub struct CsiMetrics {
    pub calls: Family<CsiCallLabel, Counter>,
    pub duration: Family<MethodLabel, Histogram>,
    pub published_volumes: Gauge,
    pub registration: Family<StateLabel, Gauge>,
}

/// Every metric the bridge exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    pub sds: SdsMetrics,
    pub upstream: UpstreamMetrics,
    pub csi: CsiMetrics,
}

fn latency_histogram() -> Histogram {
    // 100 µs … ~50 s.
    Histogram::new(exponential_buckets(0.0001, 4.0, 10))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let sds = SdsMetrics {
            streams: Family::default(),
            responses: Family::default(),
            acks: Counter::default(),
            nacks: Counter::default(),
            refused: Counter::default(),
            waiting_streams: Gauge::default(),
            wait_seconds: Histogram::new(exponential_buckets(0.01, 4.0, 10)),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            streams_refused: Counter::default(),
        };
        let upstream = UpstreamMetrics::default();
        let csi = CsiMetrics {
            calls: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            published_volumes: Gauge::default(),
            registration: Family::default(),
        };
        let mut registry = Registry::with_prefix("svid_bridge");
        registry.register(
            "sds_streams",
            "SDS streams open, by the class of the names they ask for",
            sds.streams.clone(),
        );
        registry.register(
            "sds_responses",
            "SDS responses pushed",
            sds.responses.clone(),
        );
        registry.register(
            "sds_acks",
            "SDS responses Envoy accepted (ACK)",
            sds.acks.clone(),
        );
        registry.register(
            "sds_nacks",
            "SDS responses Envoy rejected (NACK); the reason is logged",
            sds.nacks.clone(),
        );
        registry.register(
            "sds_requests_refused",
            "SDS requests refused with InvalidArgument (names that can never resolve, limits)",
            sds.refused.clone(),
        );
        registry.register(
            "sds_waiting_streams",
            "SDS streams waiting for a secret that cannot be served yet",
            sds.waiting_streams.clone(),
        );
        registry.register(
            "sds_wait_seconds",
            "How long SDS streams waited before their secrets resolved",
            sds.wait_seconds.clone(),
        );
        registry.register(
            "sds_connections",
            "Open connections to the SDS socket",
            sds.connections.clone(),
        );
        registry.register(
            "sds_connections_refused",
            "SDS connections closed at once because --max-connections was reached",
            sds.connections_refused.clone(),
        );
        registry.register(
            "sds_streams_refused",
            "SDS streams refused because their process reached --max-streams-per-process",
            sds.streams_refused.clone(),
        );
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
        let build_info: Family<VersionLabel, Gauge> = Family::default();
        build_info
            .get_or_create(&VersionLabel {
                version: crate::VERSION,
            })
            .set(1);
        registry.register("build_info", "svid-bridge version", build_info);
        Self {
            registry: Mutex::new(registry),
            sds,
            upstream,
            csi,
        }
    }

    /// Adds a gauge computed at scrape time: seconds until the earliest expiry among the
    /// SVIDs the bridge currently serves (absent when it serves none).
    pub fn register_earliest_expiry(
        &self,
        earliest: impl Fn() -> Option<i64> + Send + Sync + 'static,
    ) {
        self.lock()
            .register_collector(Box::new(ExpiryCollector(Arc::new(earliest))));
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.lock());
        out
    }

    pub fn set_registration_state(&self, state: &'static str) {
        for known in crate::csi::RegistrationStatus::STATES {
            self.csi
                .registration
                .get_or_create(&StateLabel { state: known })
                .set(i64::from(*known == state));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct ExpiryCollector(Arc<dyn Fn() -> Option<i64> + Send + Sync>);

impl std::fmt::Debug for ExpiryCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExpiryCollector")
    }
}

impl Collector for ExpiryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(expires_at) = (self.0)() else {
            return Ok(());
        };
        let gauge = ConstGauge::new(expires_at.saturating_sub(crate::clock::unix_now()));
        let metric = encoder.encode_descriptor(
            "svid_earliest_expiry_seconds",
            "Seconds until the earliest expiry among the SVIDs served.",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// Counts one SDS stream under the classes of the names it currently asks for, and keeps
/// the waiting gauge and histogram right, whatever way the stream ends.
pub struct StreamGauges {
    metrics: Arc<Metrics>,
    classes: Vec<&'static str>,
    waiting_since: Option<Instant>,
}

impl StreamGauges {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            classes: Vec::new(),
            waiting_since: None,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The stream now asks for names of these classes (empty set of names = wildcard).
    pub fn set_names<'a>(&mut self, resources: impl Iterator<Item = &'a Resource>) {
        let mut classes: Vec<&'static str> = resources.map(name_class).collect();
        if classes.is_empty() {
            classes.push("wildcard");
        }
        classes.sort_unstable();
        classes.dedup();
        if classes == self.classes {
            return;
        }
        for class in &self.classes {
            self.metrics
                .sds
                .streams
                .get_or_create(&ClassLabel { class })
                .dec();
        }
        for class in &classes {
            self.metrics
                .sds
                .streams
                .get_or_create(&ClassLabel { class })
                .inc();
        }
        self.classes = classes;
    }

    /// Whether some requested name is waiting right now.
    pub fn set_waiting(&mut self, waiting: bool) {
        match (waiting, self.waiting_since) {
            (true, None) => {
                self.waiting_since = Some(Instant::now());
                self.metrics.sds.waiting_streams.inc();
            }
            (false, Some(since)) => {
                self.waiting_since = None;
                self.metrics.sds.waiting_streams.dec();
                self.metrics
                    .sds
                    .wait_seconds
                    .observe(since.elapsed().as_secs_f64());
            }
            _ => {}
        }
    }

    /// How long the stream has been waiting, if it is.
    pub fn waiting_for(&self) -> Option<std::time::Duration> {
        self.waiting_since.map(|since| since.elapsed())
    }
}

impl Drop for StreamGauges {
    fn drop(&mut self) {
        for class in &self.classes {
            self.metrics
                .sds
                .streams
                .get_or_create(&ClassLabel { class })
                .dec();
        }
        if self.waiting_since.take().is_some() {
            self.metrics.sds.waiting_streams.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_gauges_follow_names_and_end_at_zero() {
        let metrics = Arc::new(Metrics::new());
        {
            let mut gauges = StreamGauges::new(Arc::clone(&metrics));
            gauges.set_names([Resource::DefaultSvid, Resource::OwnBundle].iter());
            gauges.set_names([Resource::DefaultSvid, Resource::OwnBundle].iter());
            gauges.set_waiting(true);
            let text = metrics.encode();
            assert!(
                text.contains("svid_bridge_sds_streams{class=\"default\"} 1"),
                "{text}"
            );
            assert!(text.contains("svid_bridge_sds_waiting_streams 1"), "{text}");
            gauges.set_names([].iter());
            assert!(
                metrics
                    .encode()
                    .contains("svid_bridge_sds_streams{class=\"wildcard\"} 1")
            );
        }
        let text = metrics.encode();
        assert!(
            text.contains("svid_bridge_sds_streams{class=\"default\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("svid_bridge_sds_streams{class=\"wildcard\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("svid_bridge_sds_waiting_streams 0"),
            "gave up waiting: {text}"
        );
        assert!(text.contains("svid_bridge_build_info{version="), "{text}");
    }

    #[test]
    fn expiry_is_computed_at_scrape_time() {
        let metrics = Metrics::new();
        assert!(
            !metrics.encode().contains("earliest_expiry"),
            "absent when nothing is served"
        );
        let at = crate::clock::unix_now() + 600;
        metrics.register_earliest_expiry(move || Some(at));
        let text = metrics.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("svid_bridge_svid_earliest_expiry_seconds "))
            .unwrap();
        let seconds: i64 = line.split(' ').nth(1).unwrap().parse().unwrap();
        assert!((598..=600).contains(&seconds), "{line}");
    }
}
