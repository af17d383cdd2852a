//! Shared by the SDS fuzz targets: splitting the input into messages, and identity
//! snapshots chosen by the input (certificate bytes are opaque to the code under test).
#![allow(dead_code)]

use svid_bridge::identity::types::PrivateKey;
use svid_bridge::identity::{BundleSet, Svid, WorkloadSvids};
use svid_bridge::sds::stream::{Limits, StreamSettings};

/// `[u16 length][bytes]…`: the messages in `data`.
pub fn chunks(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
        data = &data[2..];
        let take = len.min(data.len());
        out.push(&data[..take]);
        data = &data[take..];
    }
    out
}

const IDS: [&str; 3] = [
    "spiffe://example.org/a",
    "spiffe://example.org/b",
    "spiffe://other.org/c",
];
const TDS: [&str; 3] = ["example.org", "other.org", "third.org"];

/// A snapshot picked by the bits of `selector`.
pub fn snapshot(selector: u8) -> (WorkloadSvids, BundleSet) {
    let svids = IDS
        .iter()
        .enumerate()
        .filter(|(i, _)| selector & (1 << i) != 0)
        .map(|(i, id)| Svid {
            spiffe_id: (*id).to_owned(),
            trust_domain: id
                .trim_start_matches("spiffe://")
                .split('/')
                .next()
                .unwrap_or_default()
                .to_owned(),
            chain: vec![vec![0x30, 0x03, 0x02, 0x01, i as u8]],
            key: PrivateKey::from_pkcs8_der(vec![0x30, 0x00]),
            expires_at: i64::MAX / 2,
        })
        .collect();
    let federates_with = if selector & 0x08 != 0 {
        vec!["other.org".to_owned()]
    } else {
        vec![]
    };
    let bundles = TDS
        .iter()
        .enumerate()
        .filter(|(i, _)| selector & (0x10 << i) != 0)
        .map(|(i, td)| ((*td).to_owned(), vec![vec![0x30, 0x01, i as u8]]))
        .collect();
    (
        WorkloadSvids {
            svids,
            federates_with,
        },
        BundleSet { bundles },
    )
}

/// Settings picked by `selector`: defaults, or small limits.
pub fn settings(selector: u8) -> StreamSettings {
    let mut settings = StreamSettings {
        validation_disabled: selector & 1 != 0,
        ..StreamSettings::default()
    };
    if selector & 2 != 0 {
        settings.limits = Limits {
            max_names_per_request: usize::from(selector >> 4) + 1,
            max_name_bytes: usize::from(selector) + 1,
        };
    }
    settings
}

/// The only codes a refused request may carry.
pub fn allowed(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
    )
}
