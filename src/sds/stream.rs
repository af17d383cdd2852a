//! Per-stream protocol state for state-of-the-world (`StreamSecrets`) and incremental
//! (`DeltaSecrets`) SDS. Pure: requests and identity snapshots in, responses out; the tonic
//! glue in `service.rs` feeds it through [`Protocol`], and the property tests below drive
//! it directly. Each stream holds the node's settings from its construction.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tonic::Status;

use super::names::{self, Quoted, Resource, SpecialNames};
use super::response::{DeltaResource, DeltaResponse, SharedAny, SotwResponse};
use super::secrets::{self, Encoded, NodeTraits, SECRET_TYPE_URL, ValidationMode, View, Waiting};

/// Envoy sends one name per stream (E7); gRPC xDS clients batch a few.
pub const DEFAULT_MAX_NAMES_PER_REQUEST: usize = 100;
/// A SPIFFE ID is at most 2048 bytes, so longer names cannot be anything we serve.
pub const DEFAULT_MAX_NAME_BYTES: usize = 4096;

/// Request limits; each overflow is an `InvalidArgument` that says which limit.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_names_per_request: usize,
    pub max_name_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_names_per_request: DEFAULT_MAX_NAMES_PER_REQUEST,
            max_name_bytes: DEFAULT_MAX_NAME_BYTES,
        }
    }
}

/// Settings every stream shares.
#[derive(Clone, Debug, Default)]
pub struct StreamSettings {
    pub special: SpecialNames,
    pub limits: Limits,
    pub validation_disabled: bool,
    /// DER roots added to the own trust domain in ROOTCA and ALL.
    pub extra_trust_anchors: Vec<Vec<u8>>,
}

/// What the caller should do after a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Reaction {
    /// Build and send a response now (or as soon as something resolves).
    Answer,
    /// ACK of the current response: nothing to send.
    Acked,
    /// NACK (E13): log it, never resend the same content.
    Nacked(String),
    /// A nonce older than our last response (E14, D-6): ignored entirely.
    Stale,
}

/// What the SotW and the delta state machines have in common, for one stream loop.
pub trait Protocol: Send + 'static {
    type Request: prost::Message + Default + Send + 'static;
    type Response: Send + 'static;
    /// For the `api` label and log lines: `sotw` or `delta`.
    const API: &'static str;

    /// A stream that answers with these settings.
    fn new(settings: Arc<StreamSettings>) -> Self;
    fn on_request(&mut self, request: &Self::Request) -> Result<Reaction, Status>;
    /// The names a request adds, for the NACK log.
    fn requested_in(request: &Self::Request) -> &[String];
    /// The names the stream currently wants, once it has asked.
    fn names(&self) -> Option<&BTreeMap<String, Resource>>;
    /// The response to send for this snapshot, if any, and the names still waiting.
    fn respond(&mut self, view: &View<'_>) -> (Option<Self::Response>, BTreeMap<String, Waiting>);
    fn log_push(response: &Self::Response);
}

/// A request on the current nonce: Envoy accepted the last response, or says why not
/// (E12, E13).
fn ack_or_nack(error_detail: Option<&RpcStatus>) -> Reaction {
    match error_detail {
        Some(status) => Reaction::Nacked(status.message.clone()),
        None => Reaction::Acked,
    }
}

fn check_type_url(type_url: &str) -> Result<(), Status> {
    if type_url == SECRET_TYPE_URL {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "unsupported type_url {}: this server serves only {SECRET_TYPE_URL}",
            Quoted::new(type_url)
        )))
    }
}

/// Parses and checks every requested name; the first that can never resolve fails the
/// whole request.
fn parse_names<'a>(
    names: impl ExactSizeIterator<Item = &'a String>,
    settings: &StreamSettings,
) -> Result<BTreeMap<String, Resource>, Status> {
    let limits = settings.limits;
    if names.len() > limits.max_names_per_request {
        return Err(Status::invalid_argument(format!(
            "{} resource names in one request; the limit is {}",
            names.len(),
            limits.max_names_per_request
        )));
    }
    let mut parsed = BTreeMap::new();
    for name in names {
        if name.len() > limits.max_name_bytes {
            return Err(Status::invalid_argument(format!(
                "resource name {} is longer than the limit of {} bytes",
                Quoted::new(name),
                limits.max_name_bytes
            )));
        }
        // An empty name means "wildcard" in SotW (B-1); treat it as no name.
        if name.is_empty() {
            continue;
        }
        let resource = names::parse(name, &settings.special)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        parsed.insert(name.clone(), resource);
    }
    Ok(parsed)
}

fn new_nonce() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Secrets resolved for the requested names, plus the names still waiting and why.
pub struct Resolution {
    pub secrets: Vec<Arc<Encoded>>,
    pub waiting: BTreeMap<String, Waiting>,
}

fn resolve_all(
    requested: &BTreeMap<String, Resource>,
    view: &View<'_>,
    mode: ValidationMode,
) -> Resolution {
    let mut secrets = Vec::new();
    let mut waiting = BTreeMap::new();
    for (name, resource) in requested {
        match view.resolve_encoded(name, resource, mode) {
            Ok(secret) => secrets.push(secret),
            Err(why) => {
                waiting.insert(name.clone(), why);
            }
        }
    }
    Resolution { secrets, waiting }
}

/// What both kinds of stream keep: the node's settings, what matters of the Envoy, and the
/// nonce of the last response.
#[derive(Debug)]
struct Core {
    settings: Arc<StreamSettings>,
    /// What matters of the node from the first request that carried one (E10, D-10).
    node: Option<NodeTraits>,
    last_nonce: Option<String>,
}

impl Core {
    fn new(settings: Arc<StreamSettings>) -> Self {
        Self {
            settings,
            node: None,
            last_nonce: None,
        }
    }

    /// Checks a request's type URL and keeps the node from the first that carries one.
    fn accept(&mut self, type_url: &str, node: Option<&Node>) -> Result<(), Status> {
        check_type_url(type_url)?;
        if let Some(node) = node {
            self.node.get_or_insert_with(|| NodeTraits::of(node));
        }
        Ok(())
    }

    fn parse<'a>(
        &self,
        names: impl ExactSizeIterator<Item = &'a String>,
    ) -> Result<BTreeMap<String, Resource>, Status> {
        parse_names(names, &self.settings)
    }

    fn mode(&self) -> ValidationMode {
        secrets::validation_mode(self.node, self.settings.validation_disabled)
    }

    /// A fresh nonce, remembered as the last response's.
    fn next_nonce(&mut self) -> String {
        let nonce = new_nonce();
        self.last_nonce = Some(nonce.clone());
        nonce
    }
}

// === impl SotwStream ===

/// State of one `StreamSecrets` stream.
#[derive(Debug)]
pub struct SotwStream {
    core: Core,
    /// Names of the last accepted request; `None` until the first request.
    names: Option<BTreeMap<String, Resource>>,
    last_version: Option<String>,
    /// A request that must be answered even if the content did not change (E11).
    answer_due: bool,
}

impl Default for SotwStream {
    /// A stream with the default settings.
    fn default() -> Self {
        Self::new(Arc::default())
    }
}

impl SotwStream {
    pub fn node(&self) -> Option<NodeTraits> {
        self.core.node
    }

    pub fn requested(&self) -> Option<&BTreeMap<String, Resource>> {
        self.names.as_ref()
    }
}

impl Protocol for SotwStream {
    type Request = DiscoveryRequest;
    type Response = SotwResponse;
    const API: &'static str = "sotw";

    fn new(settings: Arc<StreamSettings>) -> Self {
        Self {
            core: Core::new(settings),
            names: None,
            last_version: None,
            answer_due: false,
        }
    }

    fn on_request(&mut self, request: &DiscoveryRequest) -> Result<Reaction, Status> {
        self.core.accept(&request.type_url, request.node.as_ref())?;
        let nonce = request.response_nonce.as_str();
        let first_on_stream = nonce.is_empty();
        if !first_on_stream
            && self
                .core
                .last_nonce
                .as_deref()
                .is_some_and(|last| last != nonce)
        {
            return Ok(Reaction::Stale);
        }
        let names = self.core.parse(request.resource_names.iter())?;
        let names_changed = self.names.as_ref() != Some(&names);
        self.names = Some(names);
        if first_on_stream || names_changed {
            self.answer_due = true;
            return Ok(Reaction::Answer);
        }
        Ok(ack_or_nack(request.error_detail.as_ref()))
    }

    fn requested_in(request: &DiscoveryRequest) -> &[String] {
        &request.resource_names
    }

    fn names(&self) -> Option<&BTreeMap<String, Resource>> {
        self.names.as_ref()
    }

    /// The response to send for the current snapshot, if any: when an answer is due and
    /// something resolved, or when the content differs from what was last sent.
    fn respond(&mut self, view: &View<'_>) -> (Option<SotwResponse>, BTreeMap<String, Waiting>) {
        let Some(names) = &self.names else {
            return (None, BTreeMap::new());
        };
        let mode = self.core.mode();
        let resolution = if names.is_empty() {
            Resolution {
                secrets: view
                    .everything(mode)
                    .into_iter()
                    .map(|secret| Arc::new(Encoded::new(secret)))
                    .collect(),
                waiting: BTreeMap::new(),
            }
        } else {
            resolve_all(names, view, mode)
        };
        if resolution.secrets.is_empty() {
            return (None, resolution.waiting);
        }
        let version = secrets::content_version(resolution.secrets.iter().map(|e| &**e));
        let changed = self.last_version.as_deref() != Some(version.as_str());
        if !(changed || self.answer_due) {
            return (None, resolution.waiting);
        }
        let nonce = self.core.next_nonce();
        self.answer_due = false;
        self.last_version = Some(version.clone());
        let response = SotwResponse {
            version_info: version,
            resources: resolution.secrets.into_iter().map(SharedAny).collect(),
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce,
        };
        (Some(response), resolution.waiting)
    }

    fn log_push(response: &SotwResponse) {
        tracing::debug!(version = %response.version_info, resources = response.resources.len(), "pushing secrets");
    }
}

// === impl DeltaStream ===

/// State of one `DeltaSecrets` stream.
#[derive(Debug)]
pub struct DeltaStream {
    core: Core,
    subscribed: BTreeMap<String, Resource>,
    /// Version last sent per name.
    sent: BTreeMap<String, String>,
    /// Newly subscribed names: sent even if the client claims to have them (E23).
    due: BTreeSet<String>,
}

impl Default for DeltaStream {
    /// A stream with the default settings.
    fn default() -> Self {
        Self::new(Arc::default())
    }
}

impl DeltaStream {
    pub fn node(&self) -> Option<NodeTraits> {
        self.core.node
    }

    pub fn subscribed(&self) -> &BTreeMap<String, Resource> {
        &self.subscribed
    }
}

impl Protocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaResponse;
    const API: &'static str = "delta";

    fn new(settings: Arc<StreamSettings>) -> Self {
        Self {
            core: Core::new(settings),
            subscribed: BTreeMap::new(),
            sent: BTreeMap::new(),
            due: BTreeSet::new(),
        }
    }

    fn on_request(&mut self, request: &DeltaDiscoveryRequest) -> Result<Reaction, Status> {
        self.core.accept(&request.type_url, request.node.as_ref())?;
        // Subscription changes count whatever the nonce says; only ACK/NACK reading depends
        // on it.
        let added = self.core.parse(request.resource_names_subscribe.iter())?;
        for name in &request.resource_names_unsubscribe {
            self.subscribed.remove(name);
            self.sent.remove(name);
            self.due.remove(name);
        }
        let subscribed_now = !added.is_empty();
        for (name, resource) in added {
            self.due.insert(name.clone());
            self.subscribed.insert(name, resource);
        }
        if subscribed_now {
            return Ok(Reaction::Answer);
        }
        let nonce = request.response_nonce.as_str();
        if nonce.is_empty() {
            return Ok(Reaction::Acked);
        }
        if self.core.last_nonce.as_deref() != Some(nonce) {
            return Ok(Reaction::Stale);
        }
        Ok(ack_or_nack(request.error_detail.as_ref()))
    }

    fn requested_in(request: &DeltaDiscoveryRequest) -> &[String] {
        &request.resource_names_subscribe
    }

    fn names(&self) -> Option<&BTreeMap<String, Resource>> {
        Some(&self.subscribed)
    }

    fn respond(&mut self, view: &View<'_>) -> (Option<DeltaResponse>, BTreeMap<String, Waiting>) {
        let mode = self.core.mode();
        let resolution = resolve_all(&self.subscribed, view, mode);
        let mut resources = Vec::new();
        for secret in resolution.secrets {
            let unchanged = self.sent.get(&secret.name) == Some(&secret.version);
            if unchanged && !self.due.contains(&secret.name) {
                continue;
            }
            self.due.remove(&secret.name);
            self.sent
                .insert(secret.name.clone(), secret.version.clone());
            resources.push(DeltaResource {
                name: secret.name.clone(),
                version: secret.version.clone(),
                resource: Some(SharedAny(secret)),
            });
        }
        if resources.is_empty() {
            return (None, resolution.waiting);
        }
        let nonce = self.core.next_nonce();
        let response = DeltaResponse {
            resources,
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce,
        };
        (Some(response), resolution.waiting)
    }

    fn log_push(response: &DeltaResponse) {
        let names: Vec<&str> = response.resources.iter().map(|r| r.name.as_str()).collect();
        tracing::debug!(secrets = ?names, "pushing secrets");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{BundleSet, WorkloadSvids};
    use crate::sds::secrets::tests::{bundles, svid};
    use envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType;
    use envoy_types::pb::envoy::config::core::v3::{BuildVersion, Node};
    use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    use proptest::prelude::*;

    fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn snapshot(ids: &[&str]) -> (WorkloadSvids, BundleSet) {
        (
            WorkloadSvids {
                svids: ids.iter().map(|id| svid(id)).collect(),
                federates_with: vec![],
            },
            bundles(&["example.org"]),
        )
    }

    fn respond(stream: &mut SotwStream, snap: &(WorkloadSvids, BundleSet)) -> Option<SotwResponse> {
        stream
            .respond(&View {
                svids: &snap.0,
                bundles: &snap.1,
                extra_anchors: &[],
                memo: None,
            })
            .0
    }

    #[test]
    fn ack_nack_and_stale_nonces() {
        let snap = snapshot(&["spiffe://example.org/a"]);
        let mut s = SotwStream::default();
        assert_eq!(
            s.on_request(&request(&["default"], "", "")).unwrap(),
            Reaction::Answer
        );
        let first = respond(&mut s, &snap).unwrap();
        assert_eq!(first.type_url, SECRET_TYPE_URL, "E16: exact type_url");
        // E12: ACK → nothing.
        assert_eq!(
            s.on_request(&request(&["default"], &first.version_info, &first.nonce))
                .unwrap(),
            Reaction::Acked
        );
        assert!(
            respond(&mut s, &snap).is_none(),
            "nothing changed, nothing sent"
        );
        // E14: a stale nonce is ignored, even with other names.
        assert_eq!(
            s.on_request(&request(&["ROOTCA"], "", "0000")).unwrap(),
            Reaction::Stale
        );
        // E13: NACK → no resend of the same content (D-7 "does not spin").
        let mut nack = request(&["default"], "", &first.nonce);
        nack.error_detail = Some(RpcStatus {
            code: 13,
            message: "bad cert".into(),
            details: vec![],
        });
        assert_eq!(
            s.on_request(&nack).unwrap(),
            Reaction::Nacked("bad cert".into())
        );
        assert!(respond(&mut s, &snap).is_none());
        // A rotation after the NACK is pushed.
        let rotated = snapshot(&["spiffe://example.org/b"]);
        let second = respond(&mut s, &rotated).unwrap();
        assert_ne!(second.version_info, first.version_info);
        assert_ne!(second.nonce, first.nonce);
    }

    #[test]
    fn reconnect_with_old_version_is_answered_with_the_same_version() {
        // E11: first request of a new stream carries the last accepted version; answer it.
        let snap = snapshot(&["spiffe://example.org/a"]);
        let mut old = SotwStream::default();
        old.on_request(&request(&["default"], "", "")).unwrap();
        let sent = respond(&mut old, &snap).unwrap();
        let mut new = SotwStream::default();
        assert_eq!(
            new.on_request(&request(&["default"], &sent.version_info, ""))
                .unwrap(),
            Reaction::Answer
        );
        let again = respond(&mut new, &snap).unwrap();
        assert_eq!(
            again.version_info, sent.version_info,
            "content hash: stable across streams and restarts"
        );
    }

    #[test]
    fn many_names_on_one_stream_all_resolve() {
        // B-9 and B-10 fixed: any combination of names works on one request.
        let snap = snapshot(&["spiffe://example.org/a"]);
        let mut s = SotwStream::default();
        s.on_request(&request(
            &[
                "default",
                "spiffe://example.org/a",
                "ROOTCA",
                "ALL",
                "spiffe://example.org",
            ],
            "",
            "",
        ))
        .unwrap();
        let response = respond(&mut s, &snap).unwrap();
        assert_eq!(response.resources.len(), 5);
    }

    #[test]
    fn unresolvable_names_wait_and_bad_ones_fail() {
        let mut s = SotwStream::default();
        s.on_request(&request(&["default"], "", "")).unwrap();
        let empty = snapshot(&[]);
        let (response, waiting) = s.respond(&View {
            svids: &empty.0,
            bundles: &empty.1,
            extra_anchors: &[],
            memo: None,
        });
        assert!(response.is_none());
        assert!(waiting.contains_key("default"));
        let later = snapshot(&["spiffe://example.org/a"]);
        assert!(
            respond(&mut s, &later).is_some(),
            "pushed the moment it resolves"
        );

        let err = SotwStream::default()
            .on_request(&request(&["file-root:system"], "", ""))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let mut wrong_type = request(&["default"], "", "");
        wrong_type.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert_eq!(
            SotwStream::default()
                .on_request(&wrong_type)
                .unwrap_err()
                .code(),
            tonic::Code::InvalidArgument
        );
        let many: Vec<String> = (0..10_000)
            .map(|i| format!("spiffe://example.org/{i}"))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let err = SotwStream::default()
            .on_request(&request(&refs, "", ""))
            .unwrap_err();
        assert!(err.message().contains("limit is 100"), "{}", err.message());
    }

    #[test]
    fn node_from_the_first_request_is_kept() {
        // D-10 / E10: later requests omit the node (set_node_on_first_message_only).
        let mut s = SotwStream::default();
        let old_envoy = Node {
            id: "sidecar~1".into(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentBuildVersion(
                BuildVersion {
                    version: Some(SemanticVersion {
                        major_number: 1,
                        minor_number: 17,
                        patch: 0,
                    }),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        let mut first = request(&["ROOTCA"], "", "");
        first.node = Some(old_envoy.clone());
        s.on_request(&first).unwrap();
        let mut later = request(&["ROOTCA", "default"], "", "");
        later.node = Some(Node::default());
        s.on_request(&later).unwrap();
        s.on_request(&request(&["default"], "", "")).unwrap();
        assert_eq!(s.node(), Some(NodeTraits::of(&old_envoy)));
        assert_ne!(s.node(), Some(NodeTraits::of(&Node::default())));
    }

    #[test]
    fn delta_sends_subscribed_names_and_only_changes() {
        let snap = snapshot(&["spiffe://example.org/a"]);
        let view = View {
            svids: &snap.0,
            bundles: &snap.1,
            extra_anchors: &[],
            memo: None,
        };
        let mut d = DeltaStream::default();
        let subscribe = DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: vec!["default".into()],
            ..Default::default()
        };
        assert_eq!(d.on_request(&subscribe).unwrap(), Reaction::Answer);
        let first = d.respond(&view).0.unwrap();
        assert_eq!(first.resources.len(), 1);
        assert_eq!(first.resources[0].name, "default");
        assert!(d.respond(&view).0.is_none(), "unchanged: nothing");
        let ack = DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: first.nonce.clone(),
            ..Default::default()
        };
        assert_eq!(d.on_request(&ack).unwrap(), Reaction::Acked);
        let rotated = snapshot(&["spiffe://example.org/b"]);
        let second = d
            .respond(&View {
                svids: &rotated.0,
                bundles: &rotated.1,
                extra_anchors: &[],
                memo: None,
            })
            .0
            .unwrap();
        assert_ne!(second.resources[0].version, first.resources[0].version);
    }

    proptest! {
        /// Whatever Envoy-like sequence of requests and snapshots arrives: every response has
        /// the exact type URL, a fresh nonce, Secret names equal to requested names, and no
        /// two consecutive responses carry the same version unless an answer was due.
        #[test]
        fn sotw_invariants(steps in proptest::collection::vec((0u8..5, 0usize..3, any::<bool>()), 1..40)) {
            let snaps = [snapshot(&["spiffe://example.org/a"]), snapshot(&["spiffe://example.org/b"]), snapshot(&[])];
            let name_sets: [&[&str]; 3] = [&["default"], &["ROOTCA", "default"], &["spiffe://example.org/a"]];
            let mut s = SotwStream::default();
            let mut nonces = BTreeSet::new();
            let mut last: Option<SotwResponse> = None;
            let mut names: &[&str] = name_sets[0];
            let mut answer_pending = false;
            for (action, pick, flag) in steps {
                let due = match action {
                    0 => { names = name_sets[pick]; s.on_request(&request(names, "", "")).unwrap() == Reaction::Answer }
                    1 => match &last { Some(r) => { s.on_request(&request(names, &r.version_info, &r.nonce)).unwrap(); false } None => false },
                    2 => { s.on_request(&request(names, "", "stale")).unwrap(); false }
                    _ => false,
                };
                answer_pending |= due;
                let snap = &snaps[if flag { pick } else { 0 }];
                let before = last.as_ref().map(|r| r.version_info.clone());
                if let Some(response) = respond(&mut s, snap) {
                    prop_assert_eq!(&response.type_url, SECRET_TYPE_URL);
                    prop_assert!(nonces.insert(response.nonce.clone()), "nonce reused");
                    for any in &response.resources {
                        let secret = <envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret as prost::Message>::decode(any.value.as_slice()).unwrap();
                        prop_assert!(s.requested().unwrap().contains_key(&secret.name));
                    }
                    if before.as_deref() == Some(response.version_info.as_str()) {
                        prop_assert!(answer_pending, "same content resent without a request that needed it");
                    }
                    answer_pending = false;
                    last = Some(response);
                }
            }
        }
    }
}
