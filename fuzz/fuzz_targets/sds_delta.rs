//! DeltaSecrets state machine: arbitrary DeltaDiscoveryRequests interleaved with identity
//! snapshots. Never a panic; errors only with the defined codes; only subscribed names.
#![no_main]

#[path = "common.rs"]
mod common;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use svid_bridge::sds::secrets::{SECRET_TYPE_URL, View};
use svid_bridge::sds::stream::{DeltaStream, Protocol};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let settings = common::settings(selector);
    let mut stream = DeltaStream::new(std::sync::Arc::new(settings));
    for (i, chunk) in common::chunks(rest).into_iter().enumerate() {
        let Ok(request) = DeltaDiscoveryRequest::decode(chunk) else {
            continue;
        };
        if let Err(status) = stream.on_request(&request) {
            assert!(common::allowed(status.code()), "{status:?}");
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
            for resource in &response.resources {
                assert!(stream.subscribed().contains_key(&resource.name));
            }
        }
    }
});
