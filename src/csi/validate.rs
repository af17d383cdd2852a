//! Request validation, in spiffe-csi-driver's order and with its messages (P-1…P-9,
//! U-1, U-2). The messages are kept verbatim: users search for them, and the kubelet
//! shows them in pod events (K-2).

use crate::proto::csi::volume_capability::AccessType;
use crate::proto::csi::volume_capability::access_mode::Mode;
use crate::proto::csi::{
    NodeGetVolumeStatsRequest, NodePublishVolumeRequest, NodeUnpublishVolumeRequest,
};

/// The `volume_context` key the kubelet sets to `"true"` for inline volumes (docs/behaviours.md, "Kubelet volume context").
pub const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";

pub const MISSING_VOLUME_ID: &str = "request missing required volume id";
pub const MISSING_TARGET_PATH: &str = "request missing required target path";
pub const MISSING_CAPABILITY: &str = "request missing required volume capability";
pub const MISSING_ACCESS_TYPE: &str = "request missing required volume capability access type";
pub const NOT_SIMPLE_MOUNT: &str = "request volume capability access type must be a simple mount";
pub const MISSING_ACCESS_MODE: &str = "request missing required volume capability access mode";
pub const BAD_ACCESS_MODE: &str = "request volume capability access mode is not valid";
pub const NOT_READ_ONLY: &str = "pod.spec.volumes[].csi.readOnly must be set to 'true'";
pub const NOT_EPHEMERAL: &str = "only ephemeral volumes are supported";
/// NodeGetVolumeStats has no spiffe message (it validates nothing, V-1); this follows the
/// same wording.
pub const MISSING_VOLUME_PATH: &str = "request missing required volume path";

/// The first failed check of a NodePublishVolume request, as an InvalidArgument message.
/// First failure wins, in this order (P-1…P-9).
pub fn publish(req: &NodePublishVolumeRequest) -> Result<(), &'static str> {
    if req.volume_id.is_empty() {
        return Err(MISSING_VOLUME_ID); // P-1
    }
    if req.target_path.is_empty() {
        return Err(MISSING_TARGET_PATH); // P-2
    }
    let Some(capability) = &req.volume_capability else {
        return Err(MISSING_CAPABILITY); // P-3
    };
    match &capability.access_type {
        None => return Err(MISSING_ACCESS_TYPE), // P-4
        Some(AccessType::Block(_)) => return Err(NOT_SIMPLE_MOUNT), // P-5
        Some(AccessType::Mount(mount)) => {
            if !mount.fs_type.is_empty() || !mount.mount_flags.is_empty() {
                return Err(NOT_SIMPLE_MOUNT); // P-5
            }
        }
    }
    let Some(access_mode) = &capability.access_mode else {
        return Err(MISSING_ACCESS_MODE); // P-6
    };
    // P-7: spiffe rejects exactly this one mode; UNKNOWN, SINGLE_NODE_WRITER (what the kubelet
    // sends for inline volumes) and the MULTI_* modes pass. Kept as is for drop-in behaviour.
    if access_mode.mode == Mode::SingleNodeReaderOnly as i32 {
        return Err(BAD_ACCESS_MODE);
    }
    // P-8: the host-side bind is read-write (SELinux relabelling, spiffe/spiffe-csi#42), so
    // the pod must ask for a read-only volume to get a read-only view.
    if !req.readonly {
        return Err(NOT_READ_ONLY);
    }
    if req.volume_context.get(EPHEMERAL_KEY).map(String::as_str) != Some("true") {
        return Err(NOT_EPHEMERAL); // P-9
    }
    Ok(())
}

/// U-1, U-2.
pub fn unpublish(req: &NodeUnpublishVolumeRequest) -> Result<(), &'static str> {
    if req.volume_id.is_empty() {
        return Err(MISSING_VOLUME_ID);
    }
    if req.target_path.is_empty() {
        return Err(MISSING_TARGET_PATH);
    }
    Ok(())
}

/// spiffe accepts anything here (V-1); csi-sanity and the spec want InvalidArgument.
pub fn volume_stats(req: &NodeGetVolumeStatsRequest) -> Result<(), &'static str> {
    if req.volume_id.is_empty() {
        return Err(MISSING_VOLUME_ID);
    }
    if req.volume_path.is_empty() {
        return Err(MISSING_VOLUME_PATH);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::csi::VolumeCapability;
    use crate::proto::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};

    /// spiffe-csi-driver's unit-test base request (docs/behaviours.md, "spiffe-csi-driver's unit-test base request").
    fn base() -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: "volumeID".into(),
            target_path: "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/v/mount".into(),
            volume_capability: Some(VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume::default())),
                access_mode: Some(AccessMode::default()),
            }),
            readonly: true,
            volume_context: [(EPHEMERAL_KEY.to_owned(), "true".to_owned())].into(),
            ..Default::default()
        }
    }

    fn with(edit: impl FnOnce(&mut NodePublishVolumeRequest)) -> NodePublishVolumeRequest {
        let mut req = base();
        edit(&mut req);
        req
    }

    fn capability(req: &mut NodePublishVolumeRequest) -> &mut VolumeCapability {
        req.volume_capability
            .get_or_insert_with(VolumeCapability::default)
    }

    #[test]
    fn base_request_is_valid() {
        assert_eq!(publish(&base()), Ok(()));
    }

    #[test]
    fn each_check_fires_with_its_message() {
        let cases: Vec<(&str, NodePublishVolumeRequest, &str)> = vec![
            ("P-1", with(|r| r.volume_id.clear()), MISSING_VOLUME_ID),
            ("P-2", with(|r| r.target_path.clear()), MISSING_TARGET_PATH),
            (
                "P-3",
                with(|r| r.volume_capability = None),
                MISSING_CAPABILITY,
            ),
            (
                "P-4",
                with(|r| capability(r).access_type = None),
                MISSING_ACCESS_TYPE,
            ),
            (
                "P-5 block",
                with(|r| capability(r).access_type = Some(AccessType::Block(BlockVolume {}))),
                NOT_SIMPLE_MOUNT,
            ),
            (
                "P-5 fs_type",
                with(|r| {
                    capability(r).access_type = Some(AccessType::Mount(MountVolume {
                        fs_type: "ext4".into(),
                        ..Default::default()
                    }))
                }),
                NOT_SIMPLE_MOUNT,
            ),
            (
                "P-5 mount_flags",
                with(|r| {
                    capability(r).access_type = Some(AccessType::Mount(MountVolume {
                        mount_flags: vec!["ro".into()],
                        ..Default::default()
                    }))
                }),
                NOT_SIMPLE_MOUNT,
            ),
            (
                "P-6",
                with(|r| capability(r).access_mode = None),
                MISSING_ACCESS_MODE,
            ),
            (
                "P-7",
                with(|r| {
                    capability(r).access_mode = Some(AccessMode {
                        mode: Mode::SingleNodeReaderOnly as i32,
                    })
                }),
                BAD_ACCESS_MODE,
            ),
            ("P-8", with(|r| r.readonly = false), NOT_READ_ONLY),
            (
                "P-9 absent",
                with(|r| r.volume_context.clear()),
                NOT_EPHEMERAL,
            ),
            (
                "P-9 false",
                with(|r| {
                    r.volume_context
                        .insert(EPHEMERAL_KEY.into(), "false".into());
                }),
                NOT_EPHEMERAL,
            ),
        ];
        for (id, req, message) in cases {
            assert_eq!(publish(&req), Err(message), "{id}");
        }
    }

    #[test]
    fn first_failure_wins() {
        // Everything wrong at once reports P-1; then peel one fault at a time.
        let mut req = NodePublishVolumeRequest::default();
        assert_eq!(publish(&req), Err(MISSING_VOLUME_ID));
        req.volume_id = "v".into();
        assert_eq!(publish(&req), Err(MISSING_TARGET_PATH));
        req.target_path = "relative".into(); // confinement comes after P-9
        assert_eq!(publish(&req), Err(MISSING_CAPABILITY));
        req.volume_capability = Some(VolumeCapability::default());
        assert_eq!(publish(&req), Err(MISSING_ACCESS_TYPE));
        capability(&mut req).access_type = Some(AccessType::Block(BlockVolume {}));
        assert_eq!(publish(&req), Err(NOT_SIMPLE_MOUNT));
        capability(&mut req).access_type = Some(AccessType::Mount(MountVolume::default()));
        assert_eq!(publish(&req), Err(MISSING_ACCESS_MODE));
        capability(&mut req).access_mode = Some(AccessMode {
            mode: Mode::SingleNodeReaderOnly as i32,
        });
        assert_eq!(publish(&req), Err(BAD_ACCESS_MODE));
        capability(&mut req).access_mode = Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        });
        assert_eq!(publish(&req), Err(NOT_READ_ONLY));
        req.readonly = true;
        assert_eq!(publish(&req), Err(NOT_EPHEMERAL));
        req.volume_context
            .insert(EPHEMERAL_KEY.into(), "true".into());
        assert_eq!(publish(&req), Ok(()));
    }

    #[test]
    fn every_access_mode_but_single_node_reader_only_is_accepted() {
        for mode in [
            Mode::Unknown,
            Mode::SingleNodeWriter,
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            let req = with(|r| capability(r).access_mode = Some(AccessMode { mode: mode as i32 }));
            assert_eq!(publish(&req), Ok(()), "{mode:?}");
        }
    }

    #[test]
    fn unpublish_and_stats_require_id_then_path() {
        let req = NodeUnpublishVolumeRequest::default();
        assert_eq!(unpublish(&req), Err(MISSING_VOLUME_ID));
        let req = NodeUnpublishVolumeRequest {
            volume_id: "v".into(),
            ..Default::default()
        };
        assert_eq!(unpublish(&req), Err(MISSING_TARGET_PATH));
        let req = NodeGetVolumeStatsRequest {
            volume_path: "some/path".into(),
            ..Default::default()
        };
        assert_eq!(volume_stats(&req), Err(MISSING_VOLUME_ID));
        let req = NodeGetVolumeStatsRequest {
            volume_id: "v".into(),
            ..Default::default()
        };
        assert_eq!(volume_stats(&req), Err(MISSING_VOLUME_PATH));
    }
}
