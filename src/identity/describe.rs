//! How certificates read to an operator: serials as Envoy's `/certs` and `openssl x509
//! -serial` print them, expiry as an RFC 3339 date and a human duration. Shared by
//! `inspect` and the per-workload report, so the two always agree.

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::time::ASN1Time;

/// The public facts of one certificate. Built from the DER certificate alone: a key is
/// never an input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFacts {
    /// Its SPIFFE ID (URI SANs, comma-joined), or its subject when it has none (a CA).
    pub id: String,
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

impl CertFacts {
    pub fn of_der(der: &[u8]) -> Option<CertFacts> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let uris: Vec<String> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some((*u).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let id = if uris.is_empty() {
            cert.subject().to_string()
        } else {
            uris.join(",")
        };
        Some(CertFacts {
            id,
            serial: serial_hex(cert.raw_serial()),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// `in 23h 59m` or `expired 5m 2s ago`, from `unix_now`.
pub fn remaining(not_after: i64, unix_now: i64) -> String {
    let left = not_after - unix_now;
    if left < 0 {
        format!("expired {} ago", human_duration(-left))
    } else {
        format!("in {}", human_duration(left))
    }
}

/// Lowercase hex without separators or leading zero bytes: the form Envoy's `/certs` and
/// `openssl x509 -serial` show, so the two compare. DER pads a serial whose top bit is set
/// with a 0x00 byte (a positive INTEGER); that byte is encoding, not part of the number.
pub fn serial_hex(raw: &[u8]) -> String {
    let first = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[first..].iter().map(|b| format!("{b:02x}")).collect()
}

/// Certificate times are UTC (RFC 5280 §4.1.2.5), so no offset conversion is needed.
pub fn rfc3339(unix: i64) -> String {
    let Ok(t) = ASN1Time::from_timestamp(unix) else {
        return format!("@{unix}");
    };
    let t = t.to_datetime();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `1d 3h`, `59m 50s`, `42s`: the two largest units, as an operator reads an expiry.
pub fn human_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    let (d, h, m, sec) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// A self-signed certificate whose URI SAN is `spiffe_id` (and serial `serial`, else a random
/// one), DER, with its PKCS#8 key: unit-test fixtures of the modules that read SVIDs.
#[cfg(test)]
pub(crate) fn self_signed_spiffe_cert(
    spiffe_id: &str,
    serial: Option<&[u8]>,
) -> (Vec<u8>, Vec<u8>) {
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
    params.subject_alt_names = vec![rcgen::SanType::URI(
        spiffe_id.try_into().unwrap_or_else(|e| panic!("{e:?}")),
    )];
    params.serial_number = serial.map(rcgen::SerialNumber::from_slice);
    let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
    (cert.der().to_vec(), key.serialize_der())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serial_with_its_top_bit_set_prints_without_the_der_padding_byte() {
        // DER content of the INTEGER 0xc644bce8: a 0x00 byte keeps it positive.
        assert_eq!(serial_hex(&[0x00, 0xc6, 0x44, 0xbc, 0xe8]), "c644bce8");
        assert_eq!(serial_hex(&[0x7f, 0x01]), "7f01");
        assert_eq!(serial_hex(&[0x00]), "00");
    }

    #[test]
    fn durations_read_as_an_operator_would() {
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(3_590), "59m 50s");
        assert_eq!(human_duration(86_399), "23h 59m");
        assert_eq!(human_duration(2 * 86_400 + 3 * 3_600 + 5), "2d 3h");
        assert_eq!(remaining(100, 58), "in 42s");
        assert_eq!(remaining(100, 400), "expired 5m 0s ago");
    }

    #[test]
    fn dates_are_rfc3339_in_utc() {
        assert_eq!(rfc3339(1_796_573_229), "2026-12-06T16:07:09Z");
    }

    #[test]
    fn facts_of_a_spiffe_certificate() {
        let (cert, _key) =
            self_signed_spiffe_cert("spiffe://example.org/a", Some(&[0x00, 0xc6, 0x44]));
        let facts = CertFacts::of_der(&cert).unwrap_or_else(|| panic!("parses"));
        assert_eq!(facts.id, "spiffe://example.org/a");
        assert_eq!(facts.serial, "c644");
        assert!(CertFacts::of_der(b"not DER").is_none());
    }
}
