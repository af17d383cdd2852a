//! Property tests over the entry points hostile input reaches first:
//!
//! - the SDS request state machines (`SotwStream`, `DeltaStream`) driven with arbitrary
//!   request sequences (type URLs, nonces, names, error details, nodes) and arbitrary
//!   identity snapshots: never a panic; every error is InvalidArgument or
//!   ResourceExhausted; every response has the exact type URL and only requested names;
//! - the CSI request validator and target-path confinement with arbitrary requests and
//!   paths: never a panic, never a path accepted outside `<kubelet-root>/pods/`;
//! - the `:authority`-fixing HTTP/2 reader on every accepted connection, with arbitrary
//!   bytes in arbitrary read sizes: never a panic, never unbounded output.
//!
//! The same entry points are fuzz targets under `fuzz/` (RELIABILITY.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use envoy_types::pb::envoy::config::core::v3::{BuildVersion, Node, node};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use proptest::prelude::*;
use prost::Message;
use svid_bridge::csi::target::Target;
use svid_bridge::csi::validate;
use svid_bridge::identity::types::PrivateKey;
use svid_bridge::identity::{BundleSet, Svid, WorkloadSvids};
use svid_bridge::proto::csi::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume,
};
use svid_bridge::proto::csi::{
    NodeGetVolumeStatsRequest, NodePublishVolumeRequest, NodeUnpublishVolumeRequest,
    VolumeCapability,
};
use svid_bridge::sds::names::SpecialNames;
use svid_bridge::sds::secrets::{SECRET_TYPE_URL, View};
use svid_bridge::sds::stream::{DeltaStream, Limits, Protocol, SotwStream, StreamSettings};

// ------------------------------------------------------------------------------ SDS ----

const TDS: [&str; 3] = ["example.org", "other.org", "third.org"];
const IDS: [&str; 4] = [
    "spiffe://example.org/a",
    "spiffe://example.org/b",
    "spiffe://other.org/c",
    "spiffe://example.org/a",
];

/// A few real certificates (DER + PKCS#8), made once.
fn certs() -> &'static Vec<(Vec<u8>, Vec<u8>)> {
    static CERTS: OnceLock<Vec<(Vec<u8>, Vec<u8>)>> = OnceLock::new();
    CERTS.get_or_init(|| {
        IDS.iter()
            .map(|id| {
                let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
                params.subject_alt_names =
                    vec![rcgen::SanType::URI((*id).to_owned().try_into().unwrap())];
                let key = rcgen::KeyPair::generate().unwrap();
                let cert = params.self_signed(&key).unwrap();
                (cert.der().to_vec(), key.serialize_der())
            })
            .collect()
    })
}

fn name_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "default", "ROOTCA", "ALL", "", "spiffe://example.org", "spiffe://other.org", "spiffe://third.org",
            "spiffe://example.org/a", "spiffe://example.org/b", "spiffe://other.org/c", "spiffe://nowhere.org/x",
            "file-cert:/a~/b", "file-root:system", "sds://gw", "spiffe://", "spiffe://Example.org/a", "spiffe://td/../x",
        ]).prop_map(str::to_owned),
        2 => "spiffe://[a-z0-9.-]{1,12}(/[A-Za-z0-9._-]{0,8}){0,3}",
        1 => ".{0,40}",
        1 => (0usize..6000).prop_map(|n| format!("spiffe://example.org/{}", "x".repeat(n))),
    ]
}

fn node_strategy() -> impl Strategy<Value = Option<Node>> {
    let metadata = prop_oneof![
        Just(None),
        any::<bool>().prop_map(|b| Some(Kind::BoolValue(b))),
        prop::sample::select(vec!["true", "false", "1", "0", "T", "yes", ""])
            .prop_map(|s| Some(Kind::StringValue(s.into()))),
        any::<f64>().prop_map(|n| Some(Kind::NumberValue(n))),
    ];
    let version = prop::option::of((0u32..3, 0u32..30, 0u32..5));
    prop::option::of((".{0,20}", metadata, version)).prop_map(|n| {
        n.map(|(id, kind, version)| Node {
            id,
            metadata: kind.map(|kind| Struct {
                fields: [(
                    "disable_spiffe_cert_validation".to_owned(),
                    Value { kind: Some(kind) },
                )]
                .into(),
            }),
            user_agent_version_type: version.map(|(major, minor, patch)| {
                node::UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
                    version: Some(SemanticVersion {
                        major_number: major,
                        minor_number: minor,
                        patch,
                    }),
                    metadata: None,
                })
            }),
            ..Default::default()
        })
    })
}

/// What a request's nonce refers to.
#[derive(Clone, Debug)]
enum NonceChoice {
    Empty,
    Last,
    Random(String),
}

fn nonce_strategy() -> impl Strategy<Value = NonceChoice> {
    prop_oneof![
        Just(NonceChoice::Empty),
        Just(NonceChoice::Last),
        "[0-9a-f]{0,20}".prop_map(NonceChoice::Random)
    ]
}

fn type_url_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => Just(SECRET_TYPE_URL.to_owned()),
        1 => Just("type.googleapis.com/envoy.config.cluster.v3.Cluster".to_owned()),
        1 => ".{0,80}",
    ]
}

#[derive(Clone, Debug)]
struct Req {
    type_url: String,
    names: Vec<String>,
    unsubscribe: Vec<String>,
    nonce: NonceChoice,
    version: String,
    error: Option<(i32, String)>,
    node: Option<Node>,
}

fn req_strategy() -> impl Strategy<Value = Req> {
    (
        type_url_strategy(),
        prop::collection::vec(name_strategy(), 0..8),
        prop::collection::vec(name_strategy(), 0..3),
        nonce_strategy(),
        ".{0,10}",
        prop::option::of((any::<i32>(), ".{0,30}")),
        node_strategy(),
    )
        .prop_map(
            |(type_url, names, unsubscribe, nonce, version, error, node)| Req {
                type_url,
                names,
                unsubscribe,
                nonce,
                version,
                error,
                node,
            },
        )
}

/// An identity snapshot: which SVIDs (by index in `IDS`), federations and bundles.
#[derive(Clone, Debug)]
struct Snap {
    svids: Vec<usize>,
    federates: Vec<String>,
    bundles: Vec<usize>,
    anchors: bool,
}

fn snap_strategy() -> impl Strategy<Value = Snap> {
    (
        prop::collection::vec(0usize..IDS.len(), 0..4),
        prop::collection::vec(
            prop_oneof![
                prop::sample::select(TDS.to_vec()).prop_map(str::to_owned),
                "[a-z]{1,6}"
            ],
            0..3,
        ),
        prop::collection::vec(0usize..TDS.len(), 0..4),
        any::<bool>(),
    )
        .prop_map(|(svids, federates, bundles, anchors)| Snap {
            svids,
            federates,
            bundles,
            anchors,
        })
}

fn build(snap: &Snap) -> (WorkloadSvids, BundleSet, Vec<Vec<u8>>) {
    let svids = snap
        .svids
        .iter()
        .map(|&i| {
            let (der, key) = &certs()[i];
            Svid {
                spiffe_id: IDS[i].to_owned(),
                trust_domain: IDS[i]
                    .trim_start_matches("spiffe://")
                    .split('/')
                    .next()
                    .unwrap()
                    .to_owned(),
                chain: vec![der.clone()],
                key: PrivateKey::from_pkcs8_der(key.clone()),
                expires_at: i64::MAX / 2,
                hint: String::new(),
            }
        })
        .collect();
    let bundles = BundleSet {
        bundles: snap
            .bundles
            .iter()
            .map(|&i| {
                (
                    TDS[i].to_owned(),
                    vec![certs()[i % certs().len()].0.clone()],
                )
            })
            .collect(),
    };
    let anchors = if snap.anchors {
        vec![certs()[3].0.clone()]
    } else {
        vec![]
    };
    (
        WorkloadSvids {
            svids,
            federates_with: snap.federates.clone(),
        },
        bundles,
        anchors,
    )
}

fn settings_strategy() -> impl Strategy<Value = StreamSettings> {
    (
        1usize..12,
        prop_oneof![Just(4096usize), 1usize..200],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(names, bytes, disabled, renamed)| StreamSettings {
            special: if renamed {
                SpecialNames {
                    default_svid: "default".into(),
                    default_bundle: "null".into(),
                    all_bundles: "ROOTCA".into(),
                }
            } else {
                SpecialNames::default()
            },
            limits: Limits {
                max_names_per_request: names,
                max_name_bytes: bytes,
            },
            validation_disabled: disabled,
            extra_trust_anchors: Vec::new(),
        })
}

fn allowed(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// SotW: arbitrary requests and snapshots, interleaved.
    #[test]
    fn sotw_stream_never_panics_and_refuses_only_with_defined_codes(
        settings in settings_strategy(),
        steps in prop::collection::vec((req_strategy(), snap_strategy(), any::<bool>()), 1..16),
    ) {
        let mut stream = SotwStream::new(std::sync::Arc::new(settings));
        let mut last_nonce = String::new();
        let mut nonces = BTreeSet::new();
        for (req, snap, respond_now) in steps {
            let request = DiscoveryRequest {
                version_info: req.version.clone(),
                node: req.node.clone(),
                resource_names: req.names.clone(),
                type_url: req.type_url.clone(),
                response_nonce: match &req.nonce { NonceChoice::Empty => String::new(), NonceChoice::Last => last_nonce.clone(), NonceChoice::Random(n) => n.clone() },
                error_detail: req.error.as_ref().map(|(code, message)| RpcStatus { code: *code, message: message.clone(), details: vec![] }),
                ..Default::default()
            };
            if let Err(status) = stream.on_request(&request) {
                prop_assert!(allowed(status.code()), "{:?}", status);
                prop_assert!(status.message().len() < 1024, "error message too long: {}", status.message().len());
                break; // the stream ends here, as in the service
            }
            if !respond_now { continue; }
            let (svids, bundles, anchors) = build(&snap);
            let view = View { svids: &svids, bundles: &bundles, extra_anchors: &anchors, memo: None };
            let (response, waiting) = stream.respond(&view);
            if let Some(response) = response {
                prop_assert_eq!(&response.type_url, SECRET_TYPE_URL);
                prop_assert!(nonces.insert(response.nonce.clone()), "nonce reused");
                last_nonce = response.nonce.clone();
                let requested = stream.requested().cloned().unwrap_or_default();
                let mut seen = BTreeSet::new();
                for any in &response.resources {
                    let secret = Secret::decode(any.value.as_slice()).unwrap();
                    prop_assert!(seen.insert(secret.name.clone()), "duplicate name {}", secret.name);
                    if !requested.is_empty() {
                        prop_assert!(requested.contains_key(&secret.name), "unrequested {}", secret.name);
                        prop_assert!(!waiting.contains_key(&secret.name));
                    }
                }
            }
        }
    }

    /// Delta: arbitrary subscribe/unsubscribe sequences and snapshots.
    #[test]
    fn delta_stream_never_panics_and_refuses_only_with_defined_codes(
        settings in settings_strategy(),
        steps in prop::collection::vec((req_strategy(), snap_strategy(), any::<bool>()), 1..16),
    ) {
        let mut stream = DeltaStream::new(std::sync::Arc::new(settings));
        let mut last_nonce = String::new();
        for (req, snap, respond_now) in steps {
            let request = DeltaDiscoveryRequest {
                node: req.node.clone(),
                type_url: req.type_url.clone(),
                resource_names_subscribe: req.names.clone(),
                resource_names_unsubscribe: req.unsubscribe.clone(),
                response_nonce: match &req.nonce { NonceChoice::Empty => String::new(), NonceChoice::Last => last_nonce.clone(), NonceChoice::Random(n) => n.clone() },
                error_detail: req.error.as_ref().map(|(code, message)| RpcStatus { code: *code, message: message.clone(), details: vec![] }),
                ..Default::default()
            };
            if let Err(status) = stream.on_request(&request) {
                prop_assert!(allowed(status.code()), "{:?}", status);
                prop_assert!(status.message().len() < 1024);
                break;
            }
            if !respond_now { continue; }
            let (svids, bundles, anchors) = build(&snap);
            let view = View { svids: &svids, bundles: &bundles, extra_anchors: &anchors, memo: None };
            let (response, _) = stream.respond(&view);
            if let Some(response) = response {
                prop_assert_eq!(&response.type_url, SECRET_TYPE_URL);
                last_nonce = response.nonce.clone();
                for resource in &response.resources {
                    prop_assert!(stream.subscribed().contains_key(&resource.name), "unsubscribed {}", resource.name);
                    let secret = Secret::decode(resource.resource.as_ref().unwrap().value.as_slice()).unwrap();
                    prop_assert_eq!(&secret.name, &resource.name);
                }
            }
        }
    }

    /// What a workload may see never includes a bundle of a trust domain it neither lives in
    /// nor federates with, whatever it asks for.
    #[test]
    fn no_bundle_beyond_own_and_federated(snap in snap_strategy(), names in prop::collection::vec(name_strategy(), 0..8)) {
        let (svids, bundles, anchors) = build(&snap);
        let mut may_see: BTreeSet<String> = svids.federates_with.iter().cloned().collect();
        if let Some(own) = svids.own_trust_domain() { may_see.insert(own.to_owned()); }
        let mut stream = SotwStream::default();
        let request = DiscoveryRequest { resource_names: names, type_url: SECRET_TYPE_URL.into(), ..Default::default() };
        if stream.on_request(&request).is_err() { return Ok(()); }
        let view = View { svids: &svids, bundles: &bundles, extra_anchors: &anchors, memo: None };
        if let (Some(response), _) = stream.respond(&view) {
            for any in &response.resources {
                let secret = Secret::decode(any.value.as_slice()).unwrap();
                for td in bundle_trust_domains(&secret, &bundles) {
                    prop_assert!(may_see.contains(&td), "{} carries the bundle of {}", secret.name, td);
                }
            }
        }
    }
}

/// The trust domains whose bundles a validation context carries: named in the SPIFFE
/// validator config, or (trusted_ca) found by certificate.
fn bundle_trust_domains(secret: &Secret, bundles: &BundleSet) -> Vec<String> {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        SpiffeCertValidatorConfig, secret,
    };
    let Some(secret::Type::ValidationContext(ctx)) = &secret.r#type else {
        return vec![];
    };
    if let Some(typed) = ctx
        .custom_validator_config
        .as_ref()
        .and_then(|c| c.typed_config.as_ref())
    {
        let config = SpiffeCertValidatorConfig::decode(typed.value.as_slice()).unwrap();
        return config.trust_domains.into_iter().map(|t| t.name).collect();
    }
    let Some(Specifier::InlineBytes(pem)) =
        ctx.trusted_ca.as_ref().and_then(|d| d.specifier.as_ref())
    else {
        return vec![];
    };
    let ders: Vec<Vec<u8>> = pem::parse_many(pem)
        .unwrap()
        .into_iter()
        .map(pem::Pem::into_contents)
        .collect();
    bundles
        .bundles
        .iter()
        .filter(|(_, certs)| certs.iter().any(|c| ders.contains(c)))
        .map(|(td, _)| td.clone())
        .collect()
}

// ------------------------------------------------------------------------------ CSI ----

const PODS: &str = "/var/lib/kubelet/pods";

fn path_strategy() -> impl Strategy<Value = String> {
    let component = prop_oneof![
        4 => "[a-z0-9~_-]{1,12}",
        1 => Just("..".to_owned()),
        1 => Just(".".to_owned()),
        1 => Just(String::new()),
        1 => ".{0,8}",
        1 => (250usize..260).prop_map(|n| "c".repeat(n)),
    ];
    let prefix = prop_oneof![
        4 => Just(PODS.to_owned()),
        1 => Just("/var/lib/kubelet".to_owned()),
        1 => Just("/var/lib/kubelet/pods-evil".to_owned()),
        1 => Just("/".to_owned()),
        1 => Just(String::new()),
        1 => Just("pods".to_owned()),
        1 => ".{0,20}",
    ];
    (
        prefix,
        prop::collection::vec(component, 0..8),
        any::<bool>(),
        0usize..3,
    )
        .prop_map(|(prefix, parts, trailing, nul)| {
            let mut path = prefix;
            for part in parts {
                path.push('/');
                path.push_str(&part);
            }
            if trailing {
                path.push('/');
            }
            if nul == 0 {
                path.push('\0');
            }
            path
        })
}

fn publish_strategy() -> impl Strategy<Value = NodePublishVolumeRequest> {
    let access_type = prop_oneof![
        Just(None),
        Just(Some(AccessType::Block(BlockVolume {}))),
        (".{0,6}", prop::collection::vec(".{0,6}", 0..2)).prop_map(|(fs_type, mount_flags)| Some(
            AccessType::Mount(MountVolume {
                fs_type,
                mount_flags,
                ..Default::default()
            })
        )),
    ];
    let capability =
        prop::option::of((access_type, prop::option::of(any::<i32>()))).prop_map(|c| {
            c.map(|(access_type, mode)| VolumeCapability {
                access_type,
                access_mode: mode.map(|mode| AccessMode { mode }),
            })
        });
    let context = prop::collection::btree_map(
        prop_oneof![Just("csi.storage.k8s.io/ephemeral".to_owned()), ".{0,10}"],
        prop_oneof![Just("true".to_owned()), ".{0,5}"],
        0..3,
    );
    (
        ".{0,10}",
        path_strategy(),
        capability,
        any::<bool>(),
        context,
    )
        .prop_map(
            |(volume_id, target_path, volume_capability, readonly, ctx)| NodePublishVolumeRequest {
                volume_id,
                target_path,
                volume_capability,
                readonly,
                volume_context: ctx.into_iter().collect(),
                ..Default::default()
            },
        )
}

/// Is `raw` absolute, without `.`/`..`/empty components, and strictly below `pods`?
fn really_inside(raw: &str, pods: &Path) -> bool {
    let path = Path::new(raw);
    path.is_absolute()
        && !raw.contains('\0')
        && !raw.ends_with('/')
        && !raw.contains("//")
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && raw.split('/').all(|seg| seg != "." && seg != "..")
        && path.starts_with(pods)
        && path != pods
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The validator never panics, and a request it accepts has everything P-1…P-9 check.
    #[test]
    fn csi_publish_validation_never_panics(req in publish_strategy()) {
        if validate::publish(&req).is_ok() {
            prop_assert!(!req.volume_id.is_empty() && !req.target_path.is_empty() && req.readonly);
            prop_assert_eq!(req.volume_context.get("csi.storage.k8s.io/ephemeral").map(String::as_str), Some("true"));
        }
        let _ = validate::unpublish(&NodeUnpublishVolumeRequest { volume_id: req.volume_id.clone(), target_path: req.target_path.clone() });
        let _ = validate::volume_stats(&NodeGetVolumeStatsRequest { volume_id: req.volume_id, volume_path: req.target_path, ..Default::default() });
    }

    /// Confinement never panics and never accepts a path outside `pods/` (lexically: the
    /// real-path half is the mount code's, tested in csi_node.rs).
    #[test]
    fn csi_target_confinement_never_escapes(raw in path_strategy()) {
        let pods = PathBuf::from(PODS);
        match Target::confine(&raw, &pods, "target path") {
            Ok(target) => {
                prop_assert!(really_inside(&raw, &pods), "accepted {:?}", raw);
                prop_assert_eq!(target.path(), Path::new(&raw));
                prop_assert!(target.parent().starts_with(&pods));
                prop_assert!(!target.name().is_empty());
                prop_assert!(raw.len() <= 4095);
            }
            Err(err) => {
                prop_assert!(err.to_string().len() < 1024, "message too long");
            }
        }
    }
}

// -------------------------------------------------------- the :authority-fixing reader ----

/// Reads everything `AuthorityFixingStream` makes of `input`, delivered in reads of the
/// given sizes.
async fn transcode(input: Vec<u8>, sizes: Vec<usize>) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut builder = tokio_test_reader(input, sizes);
    let mut fixed = svid_bridge::uds::AuthorityFixingStream::new(&mut builder);
    let mut out = Vec::new();
    fixed.read_to_end(&mut out).await?;
    Ok(out)
}

/// An in-memory reader that hands out `input` in chunks of the given sizes.
fn tokio_test_reader(input: Vec<u8>, sizes: Vec<usize>) -> ChunkedReader {
    ChunkedReader {
        input,
        pos: 0,
        sizes,
        next: 0,
    }
}

struct ChunkedReader {
    input: Vec<u8>,
    pos: usize,
    sizes: Vec<usize>,
    next: usize,
}

impl tokio::io::AsyncRead for ChunkedReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let size = self
            .sizes
            .get(self.next % self.sizes.len().max(1))
            .copied()
            .unwrap_or(usize::MAX)
            .clamp(1, buf.remaining().max(1));
        self.next += 1;
        let end = (self.pos + size).min(self.input.len());
        let chunk = self.input[self.pos..end].to_vec();
        buf.put_slice(&chunk);
        self.pos = end;
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for ChunkedReader {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

fn h2_input() -> impl Strategy<Value = Vec<u8>> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let frame = (
        0u8..12,
        any::<u8>(),
        0u32..8,
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(kind, flags, stream, payload)| {
            let len = payload.len() as u32;
            let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
            out.extend_from_slice(&stream.to_be_bytes());
            out.extend(payload);
            out
        });
    prop_oneof![
        3 => prop::collection::vec(frame, 0..12).prop_map(|frames| [PREFACE.to_vec(), frames.concat()].concat()),
        1 => prop::collection::vec(any::<u8>(), 0..2000),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever a client sends, in whatever read sizes: no panic, and the output is never
    /// much larger than the input (a re-encoded block is bounded).
    #[test]
    fn authority_fixing_reader_never_panics(input in h2_input(), sizes in prop::collection::vec(1usize..5000, 1..6)) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let len = input.len();
        if let Ok(out) = runtime.block_on(transcode(input, sizes)) {
            prop_assert!(out.len() <= len * 4 + 64 * 1024, "{} bytes out of {} in", out.len(), len);
        }
    }
}
