//! What the agent hands us, in a form independent of the API it came through.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::IdentityError;

/// A PKCS#8 private key in DER. Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey(Vec<u8>);

impl PrivateKey {
    pub fn from_pkcs8_der(der: Vec<u8>) -> Self {
        Self(der)
    }

    pub fn pkcs8_der(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(redacted)")
    }
}

/// One X.509-SVID with its key.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Svid {
    /// `spiffe://<trust-domain>/<path>`.
    pub spiffe_id: String,
    /// The trust domain name, without `spiffe://`.
    pub trust_domain: String,
    /// DER certificates, leaf first, then intermediates.
    pub chain: Vec<Vec<u8>>,
    pub key: PrivateKey,
    /// Unix seconds after which the leaf is no longer valid.
    pub expires_at: i64,
    /// The entry's hint (often empty): the Workload API passes it on and keeps the first SVID
    /// of each (PI-6).
    pub hint: String,
}

impl Svid {
    pub fn is_expired_at(&self, unix_now: i64) -> bool {
        self.expires_at <= unix_now
    }
}

/// Everything the agent currently issues to one workload, in the agent's order: the first
/// SVID is the workload's default (B-7).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct WorkloadSvids {
    pub svids: Vec<Svid>,
    /// Trust domain names (without `spiffe://`) the workload's entries federate with.
    pub federates_with: Vec<String>,
}

impl WorkloadSvids {
    /// The trust domain the workload lives in: that of its default SVID.
    pub fn own_trust_domain(&self) -> Option<&str> {
        self.svids.first().map(|s| s.trust_domain.as_str())
    }

    /// The earliest leaf expiry, if any SVID is held.
    pub fn earliest_expiry(&self) -> Option<i64> {
        self.svids.iter().map(|s| s.expires_at).min()
    }

    /// This set without the SVIDs that expired by `unix_now`.
    pub fn without_expired(&self, unix_now: i64) -> WorkloadSvids {
        WorkloadSvids {
            svids: self
                .svids
                .iter()
                .filter(|s| !s.is_expired_at(unix_now))
                .cloned()
                .collect(),
            federates_with: self.federates_with.clone(),
        }
    }
}

/// X.509 authorities of every trust domain the agent holds, keyed by trust domain name.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct BundleSet {
    pub bundles: BTreeMap<String, Vec<Vec<u8>>>,
}

impl BundleSet {
    pub fn get(&self, trust_domain: &str) -> Option<&[Vec<u8>]> {
        self.bundles.get(trust_domain).map(Vec::as_slice)
    }
}

pub type SharedSvids = Arc<WorkloadSvids>;
pub type SharedBundles = Arc<BundleSet>;

/// `spiffe://td` or `td` → `td`. The Delegated Identity API keys bundles by trust domain ID,
/// although its proto comment says "name" (DI-6); accept both.
pub fn trust_domain_name(key: &str) -> &str {
    key.strip_prefix("spiffe://")
        .unwrap_or(key)
        .trim_end_matches('/')
}

/// Splits `spiffe://td/path` into the trust domain name, checking the shape SPIFFE IDs have.
pub fn trust_domain_of(spiffe_id: &str) -> Result<&str, IdentityError> {
    let rest = spiffe_id
        .strip_prefix("spiffe://")
        .ok_or_else(|| IdentityError::BadSpiffeId(spiffe_id.chars().take(80).collect()))?;
    let td = rest.split('/').next().unwrap_or_default();
    if td.is_empty() {
        return Err(IdentityError::BadSpiffeId(
            spiffe_id.chars().take(80).collect(),
        ));
    }
    Ok(td)
}

/// Splits concatenated DER certificates (how SPIRE sends bundles and chains) into one
/// buffer per certificate, by reading each outer SEQUENCE header.
pub fn split_der_certificates(mut der: &[u8]) -> Result<Vec<Vec<u8>>, IdentityError> {
    let mut certs = Vec::new();
    while !der.is_empty() {
        let len = der_element_len(der).ok_or(IdentityError::BadDer)?;
        let (cert, rest) = der.split_at(len);
        certs.push(cert.to_vec());
        der = rest;
    }
    Ok(certs)
}

/// Total length (header + content) of the DER SEQUENCE at the start of `der`.
fn der_element_len(der: &[u8]) -> Option<usize> {
    const SEQUENCE: u8 = 0x30;
    if *der.first()? != SEQUENCE {
        return None;
    }
    let first_len = *der.get(1)?;
    let (content_len, header_len) = if first_len < 0x80 {
        (usize::from(first_len), 2)
    } else {
        let count = usize::from(first_len & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let bytes = der.get(2..2 + count)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, 2 + count)
    };
    let total = header_len.checked_add(content_len)?;
    (total <= der.len()).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_debug_is_redacted() {
        let key = PrivateKey::from_pkcs8_der(vec![1, 2, 3]);
        assert_eq!(format!("{key:?}"), "PrivateKey(redacted)");
    }

    #[test]
    fn trust_domain_names_accept_both_key_forms() {
        assert_eq!(trust_domain_name("spiffe://example.org"), "example.org");
        assert_eq!(trust_domain_name("example.org"), "example.org");
        assert_eq!(
            trust_domain_of("spiffe://example.org/ns/a").unwrap(),
            "example.org"
        );
        assert!(trust_domain_of("http://example.org/a").is_err());
        assert!(trust_domain_of("spiffe:///a").is_err());
    }

    #[test]
    fn concatenated_der_splits_per_certificate() {
        let a = rcgen::generate_simple_self_signed(vec!["a".into()])
            .unwrap()
            .cert
            .der()
            .to_vec();
        let b = rcgen::generate_simple_self_signed(vec!["b".into()])
            .unwrap()
            .cert
            .der()
            .to_vec();
        let joined = [a.clone(), b.clone()].concat();
        assert_eq!(split_der_certificates(&joined).unwrap(), vec![a, b]);
        assert!(split_der_certificates(&joined[..joined.len() - 1]).is_err());
        assert!(split_der_certificates(&[0x02, 0x01, 0x00]).is_err());
        assert!(split_der_certificates(&[]).unwrap().is_empty());
    }
}
