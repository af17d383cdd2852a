//! SDS metrics, registered into the bridge's one registry.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use super::names::Resource;
use crate::telemetry::metrics::Metrics;

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

impl SdsMetrics {
    /// Creates the SDS metrics and adds them to `registry`.
    pub fn register(registry: &Metrics) -> Self {
        let sds = Self {
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
        sds
    }

    /// The response counter of one API, looked up once per stream rather than per push.
    pub fn responses_of(&self, api: &'static str) -> Counter {
        self.responses.get_or_create(&ApiLabel { api }).clone()
    }
}

/// Counts one SDS stream under the classes of the names it currently asks for, and keeps
/// the waiting gauge and histogram right, whatever way the stream ends.
pub struct StreamGauges {
    metrics: Arc<SdsMetrics>,
    classes: Vec<&'static str>,
    waiting_since: Option<Instant>,
}

impl StreamGauges {
    pub fn new(metrics: Arc<SdsMetrics>) -> Self {
        Self {
            metrics,
            classes: Vec::new(),
            waiting_since: None,
        }
    }

    pub fn metrics(&self) -> &SdsMetrics {
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
                .streams
                .get_or_create(&ClassLabel { class })
                .dec();
        }
        for class in &classes {
            self.metrics
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
                self.metrics.waiting_streams.inc();
            }
            (false, Some(since)) => {
                self.waiting_since = None;
                self.metrics.waiting_streams.dec();
                self.metrics
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
                .streams
                .get_or_create(&ClassLabel { class })
                .dec();
        }
        if self.waiting_since.take().is_some() {
            self.metrics.waiting_streams.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_gauges_follow_names_and_end_at_zero() {
        let metrics = Metrics::new();
        let sds = Arc::new(SdsMetrics::register(&metrics));
        {
            let mut gauges = StreamGauges::new(Arc::clone(&sds));
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
}
