//! SDS resource names → what they ask for.
//!
//! A name either resolves now, can resolve later (keep the stream open and push when it
//! does), or can never resolve (fail the stream at once with `InvalidArgument` saying why).

use std::fmt;

/// The three configurable special names (SPIRE's `default_svid_name`, `default_bundle_name`,
/// `default_all_bundles_name`, docs/behaviours.md, "Agent configuration names").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialNames {
    pub default_svid: String,
    pub default_bundle: String,
    pub all_bundles: String,
}

/// `--default-svid-name`, `--default-bundle-name`, `--default-all-bundles-name`: SPIRE's
/// names, which Istio uses.
pub const DEFAULT_SVID_NAME: &str = "default";
pub const DEFAULT_BUNDLE_NAME: &str = "ROOTCA";
pub const DEFAULT_ALL_BUNDLES_NAME: &str = "ALL";

impl Default for SpecialNames {
    fn default() -> Self {
        Self {
            default_svid: DEFAULT_SVID_NAME.into(),
            default_bundle: DEFAULT_BUNDLE_NAME.into(),
            all_bundles: DEFAULT_ALL_BUNDLES_NAME.into(),
        }
    }
}

/// What one resource name asks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// The workload's default SVID: the first in the agent's order (B-7).
    DefaultSvid,
    /// The workload's SVID with this SPIFFE ID (B-6).
    Svid(String),
    /// The bundle of the workload's own trust domain (B-3).
    OwnBundle,
    /// Every bundle the workload may see, in one validation context (B-4).
    AllBundles,
    /// The bundle of this trust domain, own or federated (B-2, B-5).
    TrustDomainBundle(String),
}

impl Resource {
    /// Whether this names one of the workload's own SVIDs rather than a bundle.
    pub fn is_svid(&self) -> bool {
        matches!(self, Resource::DefaultSvid | Resource::Svid(_))
    }
}

/// A name that can never resolve.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "{0} is an Istio file-mounted credential name; svid-bridge serves SPIRE identities only. \
         Istio 1.26 and later serve file-* names from istio-agent itself"
    )]
    IstioFileName(Quoted),
    #[error(
        "{0} names an external SDS provider (Istio credentialName); svid-bridge does not serve it"
    )]
    ExternalSds(Quoted),
    #[error(
        "unknown secret name {name}: expected {default_svid:?}, {default_bundle:?}, {all_bundles:?}, \
         a SPIFFE ID or spiffe://<trust-domain>"
    )]
    Unknown {
        name: Quoted,
        default_svid: String,
        default_bundle: String,
        all_bundles: String,
    },
    #[error("malformed SPIFFE ID {0}: {1}")]
    BadSpiffeId(Quoted, &'static str),
}

/// A name as it appears in an error message: at most a short prefix, so that a 64 KiB name
/// echoed back cannot overflow the client's trailer limit (docs/behaviours.md, "Bounded error messages").
#[derive(Clone, PartialEq, Eq)]
pub struct Quoted(String);

/// Characters of a name quoted in errors.
const QUOTED_PREFIX: usize = 64;

impl Quoted {
    pub fn new(name: &str) -> Self {
        let mut chars = name.chars();
        let prefix: String = chars.by_ref().take(QUOTED_PREFIX).collect();
        if chars.next().is_some() {
            Self(format!("{prefix:?}… ({} bytes)", name.len()))
        } else {
            Self(format!("{prefix:?}"))
        }
    }
}

impl fmt::Display for Quoted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Quoted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest SPIFFE ID the SPIFFE ID spec allows.
const MAX_SPIFFE_ID_BYTES: usize = 2048;

pub fn parse(name: &str, special: &SpecialNames) -> Result<Resource, NameError> {
    if name == special.default_svid {
        return Ok(Resource::DefaultSvid);
    }
    if name == special.default_bundle {
        return Ok(Resource::OwnBundle);
    }
    if name == special.all_bundles {
        return Ok(Resource::AllBundles);
    }
    if name.starts_with("file-cert:") || name.starts_with("file-root:") {
        return Err(NameError::IstioFileName(Quoted::new(name)));
    }
    if name.starts_with("sds://") {
        return Err(NameError::ExternalSds(Quoted::new(name)));
    }
    if let Some(rest) = name.strip_prefix("spiffe://") {
        return parse_spiffe(name, rest);
    }
    Err(NameError::Unknown {
        name: Quoted::new(name),
        default_svid: special.default_svid.clone(),
        default_bundle: special.default_bundle.clone(),
        all_bundles: special.all_bundles.clone(),
    })
}

/// `spiffe://td` → that bundle; `spiffe://td/path` → that SVID. Checks the SPIFFE ID
/// character rules so a typo fails at once instead of waiting forever.
fn parse_spiffe(name: &str, rest: &str) -> Result<Resource, NameError> {
    let bad = |why| NameError::BadSpiffeId(Quoted::new(name), why);
    if name.len() > MAX_SPIFFE_ID_BYTES {
        return Err(bad("longer than 2048 bytes"));
    }
    let (td, path) = rest
        .split_once('/')
        .map_or((rest, ""), |(td, path)| (td, path));
    if td.is_empty() {
        return Err(bad("empty trust domain"));
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(bad(
            "trust domain may contain only lowercase letters, digits, '.', '-' and '_'",
        ));
    }
    if path.is_empty() {
        return if rest.ends_with('/') {
            Err(bad("trailing '/'"))
        } else {
            Ok(Resource::TrustDomainBundle(td.to_owned()))
        };
    }
    for segment in path.split('/') {
        if segment.is_empty() {
            return Err(bad("empty path segment"));
        }
        if segment == "." || segment == ".." {
            return Err(bad("'.' or '..' path segment"));
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(bad(
                "path may contain only letters, digits, '.', '-' and '_'",
            ));
        }
    }
    Ok(Resource::Svid(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(name: &str) -> Result<Resource, NameError> {
        parse(name, &SpecialNames::default())
    }

    #[test]
    fn special_and_spiffe_names() {
        assert_eq!(p("default"), Ok(Resource::DefaultSvid));
        assert_eq!(p("ROOTCA"), Ok(Resource::OwnBundle));
        assert_eq!(p("ALL"), Ok(Resource::AllBundles));
        assert_eq!(
            p("spiffe://example.org"),
            Ok(Resource::TrustDomainBundle("example.org".into()))
        );
        assert_eq!(
            p("spiffe://example.org/ns/a/sa/b"),
            Ok(Resource::Svid("spiffe://example.org/ns/a/sa/b".into()))
        );
    }

    #[test]
    fn configured_special_names_replace_the_defaults() {
        // The OpenShift/Istio federation setup (B-11, I5).
        let special = SpecialNames {
            default_svid: "default".into(),
            default_bundle: "null".into(),
            all_bundles: "ROOTCA".into(),
        };
        assert_eq!(parse("ROOTCA", &special), Ok(Resource::AllBundles));
        assert_eq!(parse("null", &special), Ok(Resource::OwnBundle));
        assert!(parse("ALL", &special).is_err());
    }

    #[test]
    fn names_that_can_never_resolve_say_why() {
        // I6: Istio < 1.26 sends these to the workload socket.
        let err = p("file-root:system").unwrap_err();
        assert!(err.to_string().contains("Istio 1.26"), "{err}");
        assert!(matches!(
            p("file-cert:/a~/b"),
            Err(NameError::IstioFileName(_))
        ));
        assert!(matches!(
            p("sds://gateway-cert"),
            Err(NameError::ExternalSds(_))
        ));
        assert!(matches!(p("nonsense"), Err(NameError::Unknown { .. })));
        for bad in [
            "spiffe://",
            "spiffe://Example.org",
            "spiffe://td/a//b",
            "spiffe://td/../x",
            "spiffe://td/",
            "spiffe://td/a b",
        ] {
            assert!(matches!(p(bad), Err(NameError::BadSpiffeId(..))), "{bad}");
        }
    }

    #[test]
    fn a_huge_name_is_quoted_by_prefix_only() {
        let name = "x".repeat(64 * 1024);
        let message = p(&name).unwrap_err().to_string();
        assert!(message.len() < 400, "message is {} bytes", message.len());
        assert!(message.contains("65536 bytes"));
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_errors_stay_short(name in ".{0,3000}") {
            if let Err(err) = p(&name) {
                prop_assert!(err.to_string().len() < 600);
            }
        }

        #[test]
        fn valid_spiffe_ids_round_trip(td in "[a-z0-9][a-z0-9.-]{0,20}", path in proptest::collection::vec("[A-Za-z0-9._-]{1,10}", 1..5)) {
            prop_assume!(path.iter().all(|s| s != "." && s != ".."));
            let id = format!("spiffe://{td}/{}", path.join("/"));
            prop_assert_eq!(p(&id), Ok(Resource::Svid(id.clone())));
        }
    }
}
