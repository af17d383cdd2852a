//! CSI NodePublishVolume input: the validator and target-path confinement with arbitrary
//! (protobuf-decoded) requests. Never a panic; never a path accepted outside pods/.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use svid_bridge::csi::target::Target;
use svid_bridge::csi::validate;
use svid_bridge::proto::csi::NodePublishVolumeRequest;

const PODS: &str = "/var/lib/kubelet/pods";

fuzz_target!(|data: &[u8]| {
    let Ok(mut req) = NodePublishVolumeRequest::decode(data) else {
        return;
    };
    let _ = validate::publish(&req);
    // Half the time, put the fuzzed path under the pods directory so acceptance is reached.
    if data.first().is_some_and(|b| b & 1 == 1) {
        req.target_path = format!("{PODS}/{}", req.target_path);
    }
    let pods = Path::new(PODS);
    if let Ok(target) = Target::confine(&req.target_path, pods, "target path") {
        let path = Path::new(&req.target_path);
        assert!(
            path.is_absolute() && path.starts_with(pods) && path != pods,
            "{:?}",
            req.target_path
        );
        assert!(
            path.components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        );
        assert!(
            !req.target_path.contains("//")
                && !req.target_path.ends_with('/')
                && !req.target_path.contains('\0')
        );
        assert!(target.parent().starts_with(pods));
    }
});
