//! Builds Envoy `Secret`s from a workload's SVIDs and the node's bundles.

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, Node, TypedExtensionConfig, data_source, node,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config::TrustDomain,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::protobuf::value::Kind;
use prost::{Message, Name};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::names::Resource;
use crate::identity::types::SharedBundles;
use crate::identity::{BundleSet, Svid, WorkloadSvids};

/// The one resource type SDS serves (E9, E16; docs/behaviours.md, "SDS wire names and the Secret type URL").
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";

/// How bundles are expressed in validation contexts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValidationMode {
    /// Envoy's SPIFFE certificate validator, one trust domain per bundle (C-3, C-4).
    Spiffe,
    /// Plain `trusted_ca` (C-2): Envoy ≤ 1.17, or validation disabled.
    TrustedCa,
}

/// What answers depend on in an Envoy's node. A stream keeps this, not the node: Istio's
/// node metadata runs to kilobytes, and every stream of every sidecar would hold a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeTraits {
    too_old_for_spiffe_validator: bool,
    /// `disable_spiffe_cert_validation` from the node metadata, if set (B-14).
    disable_validation: Option<bool>,
}

impl NodeTraits {
    pub fn of(node: &Node) -> Self {
        Self {
            too_old_for_spiffe_validator: envoy_too_old_for_spiffe_validator(node),
            disable_validation: disable_flag_from_metadata(node),
        }
    }
}

/// The mode for one Envoy: C-6 for the version, B-14 for the per-node override, which wins
/// over the flag in both directions as in SPIRE.
pub fn validation_mode(node: Option<NodeTraits>, disabled_by_flag: bool) -> ValidationMode {
    if node.is_some_and(|n| n.too_old_for_spiffe_validator) {
        return ValidationMode::TrustedCa;
    }
    let disabled = node
        .and_then(|n| n.disable_validation)
        .unwrap_or(disabled_by_flag);
    if disabled {
        ValidationMode::TrustedCa
    } else {
        ValidationMode::Spiffe
    }
}

/// The SPIFFE validator arrived in Envoy 1.18; no version given means a modern Envoy (C-6).
fn envoy_too_old_for_spiffe_validator(node: &Node) -> bool {
    let Some(node::UserAgentVersionType::UserAgentBuildVersion(build)) =
        &node.user_agent_version_type
    else {
        return false;
    };
    let Some(version) = &build.version else {
        return false;
    };
    version.major_number < 1 || (version.major_number == 1 && version.minor_number <= 17)
}

/// `disable_spiffe_cert_validation` node metadata: a bool, or a string Go's
/// `strconv.ParseBool` accepts; anything else is ignored (B-14).
fn disable_flag_from_metadata(node: &Node) -> Option<bool> {
    let value = node
        .metadata
        .as_ref()?
        .fields
        .get("disable_spiffe_cert_validation")?;
    match value.kind.as_ref()? {
        Kind::BoolValue(b) => Some(*b),
        Kind::StringValue(s) => match s.as_str() {
            "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
            "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// What a workload may see right now.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub svids: &'a WorkloadSvids,
    pub bundles: &'a BundleSet,
    /// Roots added to the own trust domain in ROOTCA and ALL (--extra-trust-anchors).
    pub extra_anchors: &'a [Vec<u8>],
    /// Where validation secrets built from `bundles` are kept for other streams.
    pub memo: Option<MemoRef<'a>>,
}

/// A node-wide memo and the snapshot `View::bundles` was taken from.
#[derive(Clone, Copy)]
pub struct MemoRef<'a> {
    pub memo: &'a BundleMemo,
    pub snapshot: &'a SharedBundles,
}

/// A secret ready to send: encoded once, with the content version of its public part.
#[derive(Debug)]
pub struct Encoded {
    pub name: String,
    /// 16 hex digits of SHA-256 over the secret without its private key.
    pub version: String,
    pub any: Any,
}

impl Encoded {
    pub fn new(mut secret: Secret) -> Self {
        let key = take_private_key(&mut secret);
        let public = secret.encode_to_vec();
        let version = short_hash([public.as_slice()]);
        let value = match key {
            Some(key) => {
                restore_private_key(&mut secret, key);
                secret.encode_to_vec()
            }
            None => public,
        };
        Self {
            name: secret.name,
            version,
            any: Any {
                type_url: Secret::type_url(),
                value,
            },
        }
    }
}

/// Validation secrets built once per bundle snapshot for the whole node. Without it a
/// bundle change would PEM-encode, serialise and hash the same bundle once per `ROOTCA`
/// stream (BENCHMARKS.md §4.3). Holds only the latest snapshot it was asked about; the
/// key names every input besides the snapshot, so two streams share an entry exactly
/// when they would have built the same secret.
#[derive(Default)]
pub struct BundleMemo {
    current: Mutex<Option<MemoEntries>>,
}

struct MemoEntries {
    snapshot: SharedBundles,
    secrets: HashMap<MemoKey, Arc<Encoded>>,
}

#[derive(Hash, PartialEq, Eq)]
struct MemoKey {
    name: String,
    mode: ValidationMode,
    plan: Vec<(String, bool)>,
}

impl BundleMemo {
    fn get_or_build(
        &self,
        snapshot: &SharedBundles,
        key: MemoKey,
        build: impl FnOnce() -> Encoded,
    ) -> Arc<Encoded> {
        // Poisoning only means another stream panicked mid-build; the map is still valid.
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let entries = match &mut *current {
            Some(entries) if Arc::ptr_eq(&entries.snapshot, snapshot) => entries,
            slot => slot.insert(MemoEntries {
                snapshot: Arc::clone(snapshot),
                secrets: HashMap::new(),
            }),
        };
        Arc::clone(
            entries
                .secrets
                .entry(key)
                .or_insert_with(|| Arc::new(build())),
        )
    }
}

/// Which trust domains a validation secret holds, in order, with their bundles, and
/// whether the extra trust anchors join each: looked up once, when the name resolves.
type BundlePlan<'a> = Vec<(&'a str, &'a [Vec<u8>], bool)>;

/// A name that cannot be served yet, and why (for the "waiting" log line and metric).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting(pub &'static str);

impl View<'_> {
    /// Resolves one requested name; `Secret.name` is always the requested name (E19).
    pub fn resolve(
        &self,
        name: &str,
        resource: &Resource,
        mode: ValidationMode,
    ) -> Result<Secret, Waiting> {
        match resource {
            Resource::DefaultSvid => {
                let svid = self
                    .svids
                    .svids
                    .first()
                    .ok_or(Waiting("the agent has issued no SVID to this workload"))?;
                Ok(certificate_secret(name, svid))
            }
            Resource::Svid(id) => {
                let svid = self
                    .svids
                    .svids
                    .iter()
                    .find(|s| &s.spiffe_id == id)
                    .ok_or(Waiting("the workload holds no SVID with this SPIFFE ID"))?;
                Ok(certificate_secret(name, svid))
            }
            Resource::OwnBundle | Resource::AllBundles | Resource::TrustDomainBundle(_) => {
                let plan = self.bundle_plan(resource)?;
                Ok(self.validation_secret_for(name, &plan, mode))
            }
        }
    }

    /// As `resolve`, encoded; validation secrets come from the memo when there is one.
    pub fn resolve_encoded(
        &self,
        name: &str,
        resource: &Resource,
        mode: ValidationMode,
    ) -> Result<Arc<Encoded>, Waiting> {
        let (Some(memo), false) = (self.memo, resource.is_svid()) else {
            return self
                .resolve(name, resource, mode)
                .map(|secret| Arc::new(Encoded::new(secret)));
        };
        debug_assert!(std::ptr::eq(&**memo.snapshot, self.bundles));
        let plan = self.bundle_plan(resource)?;
        let key = MemoKey {
            name: name.to_owned(),
            mode,
            plan: plan
                .iter()
                .map(|(td, _, extras)| ((*td).to_owned(), *extras))
                .collect(),
        };
        Ok(memo.memo.get_or_build(memo.snapshot, key, || {
            Encoded::new(self.validation_secret_for(name, &plan, mode))
        }))
    }

    fn bundle_plan<'r>(&'r self, resource: &'r Resource) -> Result<BundlePlan<'r>, Waiting> {
        match resource {
            Resource::OwnBundle => {
                let td = self.own_trust_domain()?;
                let bundle = self.bundles.get(td).ok_or(Waiting(
                    "the agent holds no bundle for the own trust domain yet",
                ))?;
                Ok(vec![(td, bundle, true)])
            }
            Resource::AllBundles => {
                let own_td = self.own_trust_domain()?;
                Ok(self
                    .visible_bundles()
                    .into_iter()
                    .map(|(td, bundle)| (td, bundle, td == own_td))
                    .collect())
            }
            Resource::TrustDomainBundle(td) => {
                if !self.may_see(td) {
                    return Err(Waiting(
                        "the workload's entries do not federate with this trust domain",
                    ));
                }
                let bundle = self.bundles.get(td).ok_or(Waiting(
                    "the agent holds no bundle for this trust domain yet",
                ))?;
                Ok(vec![(td.as_str(), bundle, false)])
            }
            Resource::DefaultSvid | Resource::Svid(_) => Ok(vec![]),
        }
    }

    fn validation_secret_for(
        &self,
        name: &str,
        plan: &BundlePlan<'_>,
        mode: ValidationMode,
    ) -> Secret {
        let bundles: Vec<(&str, Cow<'_, [Vec<u8>]>)> = plan
            .iter()
            .map(|&(td, bundle, with_extras)| {
                let roots = if with_extras {
                    Cow::Owned(self.with_extra_anchors(bundle))
                } else {
                    Cow::Borrowed(bundle)
                };
                (td, roots)
            })
            .collect();
        let refs: Vec<(&str, &[Vec<u8>])> = bundles.iter().map(|(td, b)| (*td, &**b)).collect();
        validation_secret(name, &refs, mode)
    }

    /// Every resource under its canonical name, for a request that names none (B-1):
    /// visible bundles as `spiffe://<td>`, then SVIDs by SPIFFE ID, each name once (B-12).
    pub fn everything(&self, mode: ValidationMode) -> Vec<Secret> {
        let mut secrets: Vec<Secret> = self
            .visible_bundles()
            .into_iter()
            .map(|(td, bundle)| validation_secret(&format!("spiffe://{td}"), &[(td, bundle)], mode))
            .collect();
        for svid in &self.svids.svids {
            if !secrets.iter().any(|s| s.name == svid.spiffe_id) {
                secrets.push(certificate_secret(&svid.spiffe_id, svid));
            }
        }
        secrets
    }

    fn with_extra_anchors(&self, bundle: &[Vec<u8>]) -> Vec<Vec<u8>> {
        bundle.iter().chain(self.extra_anchors).cloned().collect()
    }

    fn own_trust_domain(&self) -> Result<&str, Waiting> {
        self.svids.own_trust_domain().ok_or(Waiting(
            "no SVID yet, so the workload's trust domain is unknown",
        ))
    }

    fn may_see(&self, td: &str) -> bool {
        self.svids.own_trust_domain() == Some(td)
            || self.svids.federates_with.iter().any(|f| f == td)
    }

    /// Own trust domain plus federated ones the agent holds, sorted by name (B-4, B-13 fixed).
    fn visible_bundles(&self) -> Vec<(&str, &[Vec<u8>])> {
        self.bundles
            .bundles
            .iter()
            .filter(|(td, _)| self.may_see(td))
            .map(|(td, bundle)| (td.as_str(), bundle.as_slice()))
            .collect()
    }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
        ..Default::default()
    })
}

/// Chain PEM leaf first, key PKCS#8 PEM (C-1).
fn certificate_secret(name: &str, svid: &Svid) -> Secret {
    let chain = pem_certificates(svid.chain.iter().map(Vec::as_slice));
    let key = pem::encode(&pem::Pem::new("PRIVATE KEY", svid.key.pkcs8_der().to_vec()));
    let tls = TlsCertificate {
        certificate_chain: inline(chain.into_bytes()),
        private_key: inline(key.into_bytes()),
        ..Default::default()
    };
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(tls)),
    }
}

fn validation_secret(name: &str, bundles: &[(&str, &[Vec<u8>])], mode: ValidationMode) -> Secret {
    let context = match mode {
        ValidationMode::Spiffe => spiffe_validator_context(bundles),
        // SPIRE fails ALL here (C-5); one trusted_ca with every visible bundle serves it,
        // which is what an operator who disabled the validator asked for.
        ValidationMode::TrustedCa => CertificateValidationContext {
            trusted_ca: inline(
                pem_certificates(
                    bundles
                        .iter()
                        .flat_map(|(_, b)| b.iter().map(Vec::as_slice)),
                )
                .into_bytes(),
            ),
            ..Default::default()
        },
    };
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(context)),
    }
}

fn spiffe_validator_context(bundles: &[(&str, &[Vec<u8>])]) -> CertificateValidationContext {
    let trust_domains = bundles
        .iter()
        .map(|(td, bundle)| TrustDomain {
            name: (*td).to_owned(),
            trust_bundle: inline(pem_certificates(bundle.iter().map(Vec::as_slice)).into_bytes()),
            ..Default::default()
        })
        .collect();
    let config = SpiffeCertValidatorConfig {
        trust_domains,
        ..Default::default()
    };
    CertificateValidationContext {
        custom_validator_config: Some(TypedExtensionConfig {
            name: SPIFFE_VALIDATOR.to_owned(),
            typed_config: Some(envoy_types::util::pack_any(config)),
        }),
        ..Default::default()
    }
}

fn pem_certificates<'a>(ders: impl Iterator<Item = &'a [u8]>) -> String {
    let pems: Vec<pem::Pem> = ders
        .map(|der| pem::Pem::new("CERTIFICATE", der.to_vec()))
        .collect();
    pem::encode_many(&pems)
}

/// A content hash of the secrets, used as `version_info`: the same content gives the same
/// version across reconnects and bridge restarts, so Envoy never rebuilds TLS contexts for
/// nothing (E34), and an unchanged update is recognisable and never sent. The private key
/// is left out of the hash (it is bound to the certificate anyway), so the version, which
/// appears in logs and in Envoy's stats, is derived from public material only.
pub fn content_version<'a>(secrets: impl IntoIterator<Item = &'a Encoded>) -> String {
    let mut secrets = secrets.into_iter().peekable();
    let first = secrets.next();
    match (first, secrets.peek()) {
        (Some(only), None) => only.version.clone(),
        (first, _) => short_hash(
            first
                .into_iter()
                .chain(secrets)
                .map(|e| e.version.as_bytes()),
        ),
    }
}

fn short_hash<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
        hasher.update([0xff]);
    }
    let digest = hasher.finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn take_private_key(secret: &mut Secret) -> Option<DataSource> {
    match &mut secret.r#type {
        Some(secret::Type::TlsCertificate(tls)) => tls.private_key.take(),
        _ => None,
    }
}

fn restore_private_key(secret: &mut Secret, key: DataSource) {
    if let Some(secret::Type::TlsCertificate(tls)) = &mut secret.r#type {
        tls.private_key = Some(key);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::identity::types::PrivateKey;
    use envoy_types::pb::envoy::config::core::v3::BuildVersion;
    use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
    use envoy_types::pb::google::protobuf::{Struct, Value};

    pub(crate) fn svid(id: &str) -> Svid {
        let td = id
            .trim_start_matches("spiffe://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        Svid {
            spiffe_id: id.into(),
            trust_domain: td,
            chain: vec![format!("leaf of {id}").into_bytes()],
            key: PrivateKey::from_pkcs8_der(b"secret key bytes".to_vec()),
            expires_at: i64::MAX,
            hint: String::new(),
        }
    }

    pub(crate) fn bundles(tds: &[&str]) -> BundleSet {
        let mut set = BundleSet::default();
        for td in tds {
            set.bundles
                .insert((*td).into(), vec![format!("root of {td}").into_bytes()]);
        }
        set
    }

    fn mode_for(node: Option<&Node>, disabled_by_flag: bool) -> ValidationMode {
        validation_mode(node.map(NodeTraits::of), disabled_by_flag)
    }

    fn node(version: Option<(u32, u32)>, disable: Option<Kind>) -> Node {
        let mut node = Node::default();
        if let Some((major, minor)) = version {
            node.user_agent_version_type = Some(node::UserAgentVersionType::UserAgentBuildVersion(
                BuildVersion {
                    version: Some(SemanticVersion {
                        major_number: major,
                        minor_number: minor,
                        patch: 0,
                    }),
                    ..Default::default()
                },
            ));
        }
        if let Some(kind) = disable {
            let mut fields = std::collections::HashMap::new();
            fields.insert(
                "disable_spiffe_cert_validation".to_owned(),
                Value { kind: Some(kind) },
            );
            node.metadata = Some(Struct { fields });
        }
        node
    }

    #[test]
    fn validation_mode_follows_version_flag_and_metadata() {
        use ValidationMode::*;
        assert_eq!(mode_for(None, false), Spiffe, "no node: SPIFFE (C-6)");
        assert_eq!(
            mode_for(Some(&node(Some((1, 17)), None)), false),
            TrustedCa,
            "1.17 is old (C-6)"
        );
        assert_eq!(mode_for(Some(&node(Some((1, 18)), None)), false), Spiffe);
        assert_eq!(mode_for(None, true), TrustedCa);
        // B-14: metadata overrides the flag both ways; strings as Go's ParseBool.
        assert_eq!(
            mode_for(Some(&node(None, Some(Kind::BoolValue(false)))), true),
            Spiffe
        );
        assert_eq!(
            mode_for(
                Some(&node(None, Some(Kind::StringValue("T".into())))),
                false
            ),
            TrustedCa
        );
        assert_eq!(
            mode_for(
                Some(&node(None, Some(Kind::StringValue("yes".into())))),
                true
            ),
            TrustedCa,
            "unparseable: ignored"
        );
        assert_eq!(
            mode_for(Some(&node(None, Some(Kind::NumberValue(1.0)))), false),
            Spiffe,
            "numbers ignored"
        );
    }

    #[test]
    fn names_resolve_and_secret_name_is_the_requested_name() {
        let svids = WorkloadSvids {
            svids: vec![
                svid("spiffe://example.org/a"),
                svid("spiffe://example.org/b"),
            ],
            federates_with: vec!["other.org".into()],
        };
        let bundles = bundles(&["example.org", "other.org", "stranger.org"]);
        let view = View {
            svids: &svids,
            bundles: &bundles,
            extra_anchors: &[],
            memo: None,
        };
        let mode = ValidationMode::Spiffe;

        let default = view
            .resolve("default", &Resource::DefaultSvid, mode)
            .unwrap();
        assert_eq!(default.name, "default");
        assert!(chain_pem(&default).contains("BEGIN CERTIFICATE"));

        // B-10 fixed: the default SVID also by its own ID, on the same request.
        let by_id = view
            .resolve(
                "spiffe://example.org/a",
                &Resource::Svid("spiffe://example.org/a".into()),
                mode,
            )
            .unwrap();
        assert_eq!(chain_pem(&by_id), chain_pem(&default));

        let all = view.resolve("ALL", &Resource::AllBundles, mode).unwrap();
        assert_eq!(
            spiffe_trust_domains(&all),
            ["example.org", "other.org"],
            "sorted, federated only"
        );

        let rootca = view.resolve("ROOTCA", &Resource::OwnBundle, mode).unwrap();
        assert_eq!(spiffe_trust_domains(&rootca), ["example.org"]);

        assert!(
            view.resolve(
                "spiffe://stranger.org",
                &Resource::TrustDomainBundle("stranger.org".into()),
                mode
            )
            .is_err(),
            "not federated: nothing of it"
        );
        assert!(
            view.resolve(
                "spiffe://example.org/c",
                &Resource::Svid("spiffe://example.org/c".into()),
                mode
            )
            .is_err()
        );
    }

    #[test]
    fn all_bundles_without_the_spiffe_validator_is_one_trusted_ca() {
        // C-5 fixed: SPIRE fails this request with Internal.
        let svids = WorkloadSvids {
            svids: vec![svid("spiffe://example.org/a")],
            federates_with: vec!["other.org".into()],
        };
        let bundles = bundles(&["example.org", "other.org"]);
        let all = View {
            svids: &svids,
            bundles: &bundles,
            extra_anchors: &[],
            memo: None,
        }
        .resolve("ALL", &Resource::AllBundles, ValidationMode::TrustedCa)
        .unwrap();
        let Some(secret::Type::ValidationContext(ctx)) = all.r#type else {
            panic!()
        };
        let Some(data_source::Specifier::InlineBytes(pem)) = ctx.trusted_ca.unwrap().specifier
        else {
            panic!()
        };
        assert_eq!(
            String::from_utf8(pem)
                .unwrap()
                .matches("BEGIN CERTIFICATE")
                .count(),
            2
        );
    }

    fn memo_view<'a>(
        svids: &'a WorkloadSvids,
        snapshot: &'a SharedBundles,
        memo: &'a BundleMemo,
    ) -> View<'a> {
        View {
            svids,
            bundles: snapshot,
            extra_anchors: &[],
            memo: Some(MemoRef { memo, snapshot }),
        }
    }

    #[test]
    fn bundle_secrets_are_built_once_per_snapshot_and_never_served_stale() {
        let memo = BundleMemo::default();
        let a = WorkloadSvids {
            svids: vec![svid("spiffe://example.org/a")],
            federates_with: vec![],
        };
        let b_federated = WorkloadSvids {
            svids: vec![svid("spiffe://example.org/b")],
            federates_with: vec!["other.org".into()],
        };
        let first: SharedBundles = Arc::new(bundles(&["example.org", "other.org"]));
        let (a, b_federated, first) = (&a, &b_federated, &first);
        let view = |svids, snapshot| memo_view(svids, snapshot, &memo);
        let rootca = |v: View<'_>| {
            v.resolve_encoded("ROOTCA", &Resource::OwnBundle, ValidationMode::Spiffe)
                .unwrap()
        };
        let all = |v: View<'_>| {
            v.resolve_encoded("ALL", &Resource::AllBundles, ValidationMode::Spiffe)
                .unwrap()
        };

        let shared = rootca(view(a, first));
        assert!(
            Arc::ptr_eq(&shared, &rootca(view(b_federated, first))),
            "one build serves every stream asking the same of the same snapshot"
        );
        let unshared = view(a, first)
            .resolve_encoded("ROOTCA", &Resource::OwnBundle, ValidationMode::TrustedCa)
            .unwrap();
        assert!(
            !Arc::ptr_eq(&shared, &unshared),
            "the mode is part of the key"
        );
        assert_ne!(
            all(view(a, first)).version,
            all(view(b_federated, first)).version,
            "ALL depends on what the workload federates with"
        );

        let mut rotated = bundles(&["example.org", "other.org"]);
        rotated
            .bundles
            .get_mut("example.org")
            .unwrap()
            .push(b"new root".to_vec());
        let second: &SharedBundles = &Arc::new(rotated);
        let after = rootca(view(a, second));
        assert_ne!(
            after.version, shared.version,
            "a new snapshot is never served from the old"
        );
        let unmemoized = View {
            memo: None,
            ..view(a, second)
        };
        assert_eq!(after.any, rootca(unmemoized).any, "memoized = built fresh");
        assert_eq!(
            rootca(view(a, first)).version,
            shared.version,
            "a stream still on the old snapshot gets the old content"
        );
    }

    #[test]
    fn extra_trust_anchors_join_the_own_trust_domain_in_rootca_and_all() {
        // Migration from istiod's CA (istio/istio#50783): both roots verify peers of the
        // own trust domain during the switch.
        let svids = WorkloadSvids {
            svids: vec![svid("spiffe://example.org/a")],
            federates_with: vec!["other.org".into()],
        };
        let bundles = bundles(&["example.org", "other.org"]);
        let extra = vec![b"istiod root".to_vec()];
        let view = View {
            svids: &svids,
            bundles: &bundles,
            extra_anchors: &extra,
            memo: None,
        };
        for (name, resource) in [
            ("ROOTCA", Resource::OwnBundle),
            ("ALL", Resource::AllBundles),
        ] {
            let secret = view
                .resolve(name, &resource, ValidationMode::Spiffe)
                .unwrap();
            let Some(secret::Type::ValidationContext(ctx)) = secret.r#type else {
                panic!()
            };
            let any = ctx.custom_validator_config.unwrap().typed_config.unwrap();
            let config = SpiffeCertValidatorConfig::decode(any.value.as_slice()).unwrap();
            let own = config
                .trust_domains
                .iter()
                .find(|t| t.name == "example.org")
                .unwrap();
            let Some(data_source::Specifier::InlineBytes(pem)) =
                own.trust_bundle.clone().unwrap().specifier
            else {
                panic!()
            };
            assert_eq!(
                pem::parse_many(&pem).unwrap().len(),
                2,
                "{name}: agent root + extra root"
            );
            if let Some(other) = config.trust_domains.iter().find(|t| t.name == "other.org") {
                let Some(data_source::Specifier::InlineBytes(pem)) =
                    other.trust_bundle.clone().unwrap().specifier
                else {
                    panic!()
                };
                assert_eq!(
                    pem::parse_many(&pem).unwrap().len(),
                    1,
                    "federated domains get no extra roots"
                );
            }
        }
    }

    #[test]
    fn wildcard_lists_each_name_once() {
        let svids = WorkloadSvids {
            svids: vec![
                svid("spiffe://example.org/a"),
                svid("spiffe://example.org/a"),
            ],
            federates_with: vec![],
        };
        let bundles = bundles(&["example.org"]);
        let names: Vec<String> = View {
            svids: &svids,
            bundles: &bundles,
            extra_anchors: &[],
            memo: None,
        }
        .everything(ValidationMode::Spiffe)
        .into_iter()
        .map(|s| s.name)
        .collect();
        assert_eq!(names, ["spiffe://example.org", "spiffe://example.org/a"]);
    }

    #[test]
    fn version_is_a_content_hash_blind_to_the_key() {
        let encode = |svid: &Svid| Encoded::new(certificate_secret("default", svid));
        let a = encode(&svid("spiffe://example.org/a"));
        let mut other_key = svid("spiffe://example.org/a");
        other_key.key = PrivateKey::from_pkcs8_der(b"another key".to_vec());
        let b = encode(&other_key);
        assert_eq!(
            content_version([&a]),
            content_version([&encode(&svid("spiffe://example.org/a"))]),
            "deterministic"
        );
        assert_eq!(
            content_version([&a]),
            content_version([&b]),
            "key not hashed"
        );
        assert_ne!(a.any.value, b.any.value, "but the key is sent");
        let c = encode(&svid("spiffe://example.org/c"));
        assert_ne!(content_version([&a]), content_version([&c]));
        assert_ne!(
            content_version([&a, &c]),
            content_version([&c, &a]),
            "order counts"
        );
        assert_eq!(content_version([&a]).len(), 16);
        assert_eq!(content_version([&a, &c]).len(), 16);
    }

    pub(crate) fn chain_pem(secret: &Secret) -> String {
        let Some(secret::Type::TlsCertificate(tls)) = &secret.r#type else {
            panic!("not a certificate")
        };
        let Some(data_source::Specifier::InlineBytes(b)) =
            &tls.certificate_chain.as_ref().unwrap().specifier
        else {
            panic!()
        };
        String::from_utf8(b.clone()).unwrap()
    }

    pub(crate) fn spiffe_trust_domains(secret: &Secret) -> Vec<String> {
        let Some(secret::Type::ValidationContext(ctx)) = &secret.r#type else {
            panic!("not a validation context")
        };
        let any = ctx
            .custom_validator_config
            .as_ref()
            .unwrap()
            .typed_config
            .as_ref()
            .unwrap();
        let config = SpiffeCertValidatorConfig::decode(any.value.as_slice()).unwrap();
        config.trust_domains.into_iter().map(|t| t.name).collect()
    }
}
