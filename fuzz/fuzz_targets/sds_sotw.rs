//! StreamSecrets state machine: arbitrary DiscoveryRequests (protobuf-decoded from the
//! input) interleaved with identity snapshots. Never a panic; errors only with the defined
//! codes; responses only with the exact type URL and requested names.
#![no_main]

#[path = "common.rs"]
mod common;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use svid_bridge::sds::secrets::{SECRET_TYPE_URL, View};
use svid_bridge::sds::stream::{Protocol, SotwStream};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let settings = common::settings(selector);
    let mut stream = SotwStream::new(std::sync::Arc::new(settings));
    for (i, chunk) in common::chunks(rest).into_iter().enumerate() {
        let Ok(request) = DiscoveryRequest::decode(chunk) else {
            continue;
        };
        if let Err(status) = stream.on_request(&request) {
            assert!(common::allowed(status.code()), "{status:?}");
            assert!(status.message().len() < 1024);
            return;
        }
        let (svids, bundles) = common::snapshot(selector.rotate_left(i as u32));
        let view = View {
            svids: &svids,
            bundles: &bundles,
            extra_anchors: &[],
            memo: None,
        };
        if let (Some(response), _) = stream.respond(&view) {
            assert_eq!(response.type_url, SECRET_TYPE_URL);
            let requested = stream.requested().cloned().unwrap_or_default();
            for any in &response.resources {
                let secret = Secret::decode(any.value.as_slice()).expect("we encoded it");
                assert!(requested.is_empty() || requested.contains_key(&secret.name));
            }
        }
    }
});
