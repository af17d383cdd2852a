//! Builds Envoy `Secret`s from a workload's SVIDs and the node's bundles.

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, Node, TypedExtensionConfig, data_source, node,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config::TrustDomain,
};
use envoy_types::pb::google::protobuf::value::Kind;
use prost::Message;
use sha2::{Digest, Sha256};

use super::names::Resource;
use crate::identity::{BundleSet, Svid, WorkloadSvids};

/// The one resource type SDS serves (spire-sds.md §1, envoy-and-istio.md E9, E16).
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";

/// How bundles are expressed in validation contexts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValidationMode {
    /// Envoy's SPIFFE certificate validator, one trust domain per bundle (C-3, C-4).
    Spiffe,
    /// Plain `trusted_ca` (C-2): Envoy ≤ 1.17, or validation disabled.
    TrustedCa,
}

/// The mode for one Envoy: C-6 for the version, B-14 for the per-node override, which wins
/// over the flag in both directions as in SPIRE.
pub fn validation_mode(node: Option<&Node>, disabled_by_flag: bool) -> ValidationMode {
    if node.is_some_and(envoy_too_old_for_spiffe_validator) {
        return ValidationMode::TrustedCa;
    }
    let disabled = node
        .and_then(disable_flag_from_metadata)
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
}

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
            Resource::OwnBundle => {
                let td = self.own_trust_domain()?;
                let bundle = self.bundles.get(td).ok_or(Waiting(
                    "the agent holds no bundle for the own trust domain yet",
                ))?;
                let own = self.with_extra_anchors(bundle);
                Ok(validation_secret(name, &[(td, &own)], mode))
            }
            Resource::AllBundles => {
                let own_td = self.own_trust_domain()?;
                let own = self.bundles.get(own_td).map(|b| self.with_extra_anchors(b));
                let bundles: Vec<(&str, &[Vec<u8>])> = self
                    .visible_bundles()
                    .into_iter()
                    .map(|(td, b)| match (&own, td == own_td) {
                        (Some(own), true) => (td, own.as_slice()),
                        _ => (td, b),
                    })
                    .collect();
                Ok(validation_secret(name, &bundles, mode))
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
                Ok(validation_secret(name, &[(td.as_str(), bundle)], mode))
            }
        }
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
pub fn content_version<'a>(secrets: impl IntoIterator<Item = &'a Secret>) -> String {
    let mut hasher = Sha256::new();
    for secret in secrets {
        hasher.update(public_part(secret).encode_to_vec());
        hasher.update([0xff]);
    }
    let digest = hasher.finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn public_part(secret: &Secret) -> Secret {
    let mut public = secret.clone();
    if let Some(secret::Type::TlsCertificate(tls)) = &mut public.r#type {
        tls.private_key = None;
    }
    public
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
        assert_eq!(
            validation_mode(None, false),
            Spiffe,
            "no node: SPIFFE (C-6)"
        );
        assert_eq!(
            validation_mode(Some(&node(Some((1, 17)), None)), false),
            TrustedCa,
            "1.17 is old (C-6)"
        );
        assert_eq!(
            validation_mode(Some(&node(Some((1, 18)), None)), false),
            Spiffe
        );
        assert_eq!(validation_mode(None, true), TrustedCa);
        // B-14: metadata overrides the flag both ways; strings as Go's ParseBool.
        assert_eq!(
            validation_mode(Some(&node(None, Some(Kind::BoolValue(false)))), true),
            Spiffe
        );
        assert_eq!(
            validation_mode(
                Some(&node(None, Some(Kind::StringValue("T".into())))),
                false
            ),
            TrustedCa
        );
        assert_eq!(
            validation_mode(
                Some(&node(None, Some(Kind::StringValue("yes".into())))),
                true
            ),
            TrustedCa,
            "unparseable: ignored"
        );
        assert_eq!(
            validation_mode(Some(&node(None, Some(Kind::NumberValue(1.0)))), false),
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
        }
        .everything(ValidationMode::Spiffe)
        .into_iter()
        .map(|s| s.name)
        .collect();
        assert_eq!(names, ["spiffe://example.org", "spiffe://example.org/a"]);
    }

    #[test]
    fn version_is_a_content_hash_blind_to_the_key() {
        let a = certificate_secret("default", &svid("spiffe://example.org/a"));
        let mut other_key = svid("spiffe://example.org/a");
        other_key.key = PrivateKey::from_pkcs8_der(b"another key".to_vec());
        let b = certificate_secret("default", &other_key);
        assert_eq!(
            content_version([&a]),
            content_version([&a.clone()]),
            "deterministic"
        );
        assert_eq!(
            content_version([&a]),
            content_version([&b]),
            "key not hashed"
        );
        let c = certificate_secret("default", &svid("spiffe://example.org/c"));
        assert_ne!(content_version([&a]), content_version([&c]));
        assert_eq!(content_version([&a]).len(), 16);
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
