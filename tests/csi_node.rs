//! CSI Node service with real bind mounts, each test in a private mount namespace (the
//! host's mount table is never touched). Behaviour ids (P-1, R-4 …) are explained in
//! docs/behaviours.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::mount_ns_test;
use svid_bridge::testing::csi as csi_support;

use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use csi_support::{
    Plugin, SOCKET_NAME, mounts_at, mounts_under, publish_request, total_mounts, unpublish_request,
};
use svid_bridge::proto::csi::volume_capability::access_mode::Mode;
use svid_bridge::proto::csi::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume,
};
use svid_bridge::proto::csi::volume_usage::Unit;
use svid_bridge::proto::csi::{
    NodeGetVolumeStatsRequest, NodePublishVolumeRequest, VolumeCapability,
};
use tonic::Code;

fn bind(source: &Path, target: &Path) {
    rustix::mount::mount_bind(source, target).expect("test bind mount");
}

async fn stats(
    plugin: &Plugin,
    volume_id: &str,
    path: &str,
) -> Result<svid_bridge::proto::csi::NodeGetVolumeStatsResponse, tonic::Status> {
    let req = NodeGetVolumeStatsRequest {
        volume_id: volume_id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    plugin
        .node()
        .await
        .node_get_volume_stats(req)
        .await
        .map(tonic::Response::into_inner)
}

mount_ns_test! {
    /// P-10, P-12, P-13, U-5: publish makes the socket directory reachable at the target,
    /// unpublish takes it away again.
    async fn publish_exposes_the_socket_directory_and_unpublish_removes_it() {
        let plugin = Plugin::start().await;
        let mut node = plugin.node().await;
        // A mount below the socket directory must not follow it into pods (no MS_REC).
        let submount = plugin.mount_dir.join("sub");
        std::fs::create_dir(&submount).unwrap();
        rustix::mount::mount("tmpfs", &submount, "tmpfs", rustix::mount::MountFlags::empty(), None).unwrap();
        std::fs::write(submount.join("hidden"), b"x").unwrap();
        std::fs::write(plugin.mount_dir.join("marker"), b"from the host").unwrap();

        let target = plugin.target("pod-1", "spiffe");
        node.node_publish_volume(publish_request("csi-1", &target)).await.unwrap();

        assert_eq!(mounts_at(&target), 1);
        assert_eq!(std::fs::read(target.join("marker")).unwrap(), b"from the host");
        assert!(!target.join("sub/hidden").exists(), "bind must not be recursive");
        // A real connect() through the mounted path reaches the listener in the socket dir.
        let mut client = UnixStream::connect(target.join(SOCKET_NAME)).unwrap();
        let (mut accepted, _) = plugin.listener.as_ref().unwrap().accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");

        // Decided mount flags: a plain bind, read-write on the host (SELinux relabel needs
        // it, spiffe/spiffe-csi#42); the pod's view is read-only because P-8 demands
        // readOnly: true and the kubelet/runtime mount it so.
        let vfs = rustix::fs::statvfs(&target).unwrap();
        assert!(!vfs.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY));
        let table = svid_bridge::csi::mountinfo::read_own().unwrap();
        let entry = table.iter().find(|m| m.mount_point == target).unwrap();
        assert!(entry.options.starts_with("rw"), "{}", entry.options);
        assert_eq!(entry.root, plugin.mount_dir, "bind of the socket directory itself");

        // stats the kubelet accepts (usage present) and a healthy condition.
        let response = stats(&plugin, "csi-1", target.to_str().unwrap()).await.unwrap();
        let units: Vec<i32> = response.usage.iter().map(|u| u.unit).collect();
        assert_eq!(units, [Unit::Bytes as i32, Unit::Inodes as i32]);
        assert!(response.usage[0].total > 0);
        let condition = response.volume_condition.unwrap();
        assert!(!condition.abnormal, "{}", condition.message);
        assert!(condition.message.contains("1 socket"), "{}", condition.message);

        node.node_unpublish_volume(unpublish_request("csi-1", &target)).await.unwrap();
        assert_eq!(mounts_at(&target), 0);
        assert!(!target.exists(), "U-5: the target directory is removed");
        assert!(target.parent().unwrap().is_dir(), "the kubelet's parent directory stays");
        // U-6: unpublishing again (kubelet retry, node reboot) is fine.
        node.node_unpublish_volume(unpublish_request("csi-1", &target)).await.unwrap();
        let err = stats(&plugin, "csi-1", target.to_str().unwrap()).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{}", err.message());

        rustix::mount::unmount(&submount, rustix::mount::UnmountFlags::empty()).unwrap();
        plugin.stop().await.unwrap();
    }
}

mount_ns_test! {
    /// P-11, K-3: a kubelet restart republishes every volume; 1,000 republishes of one
    /// volume leave exactly one mount (spiffe-csi-driver < 0.2.12 stacked one per call).
    async fn a_thousand_republishes_leave_exactly_one_mount() {
        let plugin = Plugin::start().await;
        let mut node = plugin.node().await;
        let target = plugin.target("pod-1", "spiffe");
        for _ in 0..1000 {
            node.node_publish_volume(publish_request("csi-1", &target)).await.unwrap();
        }
        assert_eq!(mounts_at(&target), 1);
        node.node_unpublish_volume(unpublish_request("csi-1", &target)).await.unwrap();
        assert_eq!(mounts_at(&target), 0);
        assert!(!target.exists());
        plugin.stop().await.unwrap();
    }
}

mount_ns_test! {
    /// a target carrying a stack left by an older driver is cleared by one unpublish.
    /// Fixes U-4: spiffe-csi-driver unmounts once and then fails rmdir with EBUSY.
    async fn one_unpublish_clears_three_stacked_mounts() {
        let plugin = Plugin::start().await;
        let mut node = plugin.node().await;
        let target = plugin.target("pod-1", "spiffe");
        node.node_publish_volume(publish_request("csi-1", &target)).await.unwrap();
        bind(&plugin.mount_dir, &target);
        bind(&plugin.mount_dir, &target);
        assert_eq!(mounts_at(&target), 3);
        // Republishing a stacked target is still "already published" (P-11).
        node.node_publish_volume(publish_request("csi-1", &target)).await.unwrap();
        assert_eq!(mounts_at(&target), 3);

        node.node_unpublish_volume(unpublish_request("csi-1", &target)).await.unwrap();
        assert_eq!(mounts_at(&target), 0);
        assert!(!target.exists());
        plugin.stop().await.unwrap();
    }
}

mount_ns_test! {
    /// Publish and unpublish of 100 volumes at once: nothing left behind, and per-target
    /// serialisation keeps racing publish/unpublish of one target consistent.
    async fn a_hundred_concurrent_volumes_leave_no_mount_and_no_directory() {
        let plugin = Plugin::start().await;
        let targets: Vec<PathBuf> = (0..100).map(|i| plugin.target(&format!("pod-{i}"), "spiffe")).collect();
        let publishes = targets.iter().enumerate().map(|(i, target)| {
            let plugin = &plugin;
            async move {
                let mut node = plugin.node().await;
                node.node_publish_volume(publish_request(&format!("csi-{i}"), target)).await
            }
        });
        for result in futures::future::join_all(publishes).await {
            result.unwrap();
        }
        assert!(targets.iter().all(|t| mounts_at(t) == 1));

        let unpublishes = targets.iter().enumerate().map(|(i, target)| {
            let plugin = &plugin;
            async move {
                let mut node = plugin.node().await;
                node.node_unpublish_volume(unpublish_request(&format!("csi-{i}"), target)).await
            }
        });
        for result in futures::future::join_all(unpublishes).await {
            result.unwrap();
        }
        assert_eq!(mounts_under(&plugin.pods_dir), Vec::<PathBuf>::new());
        assert!(targets.iter().all(|t| !t.exists()));

        // Same target, publish and unpublish racing: never more than one mount.
        let target = plugin.target("pod-race", "spiffe");
        let races = (0..50).map(|i| {
            let (plugin, target) = (&plugin, &target);
            async move {
                let mut node = plugin.node().await;
                if i % 2 == 0 {
                    node.node_publish_volume(publish_request("csi-race", target)).await.map(drop)
                } else {
                    node.node_unpublish_volume(unpublish_request("csi-race", target)).await.map(drop)
                }
            }
        });
        for result in futures::future::join_all(races).await {
            result.unwrap();
        }
        assert!(mounts_at(&target) <= 1);
        plugin.node().await.node_unpublish_volume(unpublish_request("csi-race", &target)).await.unwrap();
        assert_eq!(mounts_under(&plugin.pods_dir), Vec::<PathBuf>::new());
        plugin.stop().await.unwrap();
    }
}

mount_ns_test! {
    /// R-3 (spiffe-csi-driver does not check, P-14): a target mounted from another source
    /// is ALREADY_EXISTS, and nothing is stacked on it.
    async fn a_target_mounted_from_another_source_is_already_exists() {
        let plugin = Plugin::start().await;
        let mut node = plugin.node().await;
        let other = plugin.root.join("other");
        std::fs::create_dir(&other).unwrap();
        let target = plugin.target("pod-1", "spiffe");
        std::fs::create_dir(&target).unwrap();
        bind(&other, &target);

        let err = node.node_publish_volume(publish_request("csi-1", &target)).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
        assert!(err.message().contains("already mounted from another source"), "{}", err.message());
        assert_eq!(mounts_at(&target), 1);

        // Unpublish still cleans the target up (the kubelet asks after a final error).
        node.node_unpublish_volume(unpublish_request("csi-1", &target)).await.unwrap();
        assert_eq!(mounts_at(&target), 0);
        plugin.stop().await.unwrap();
    }
}

mount_ns_test! {
    /// V-2/V-3 fixed: the condition says when the socket directory holds no socket, and
    /// NodeGetVolumeStats validates its input.
    async fn volume_stats_report_a_missing_socket_and_validate_input() {
        let plugin = Plugin::start_with(false).await;
        let mut node = plugin.node().await;
        let target = plugin.target("pod-1", "spiffe");
        node.node_publish_volume(publish_request("csi-1", &target)).await.unwrap();
        let condition = stats(&plugin, "csi-1", target.to_str().unwrap()).await.unwrap().volume_condition.unwrap();
        assert!(condition.abnormal);
        assert!(condition.message.contains("holds no socket"), "{}", condition.message);

        let cases = [
            ("", target.to_str().unwrap().to_owned(), Code::InvalidArgument, "request missing required volume id"),
            ("csi-1", String::new(), Code::InvalidArgument, "request missing required volume path"),
            ("csi-1", "some/path".into(), Code::NotFound, "not a published volume"),
            ("csi-1", "/etc".into(), Code::NotFound, "not a published volume"),
        ];
        for (id, path, code, message) in cases {
            let err = stats(&plugin, id, &path).await.unwrap_err();
            assert_eq!((err.code(), path.as_str()), (code, path.as_str()), "{}", err.message());
            assert!(err.message().contains(message), "{path}: {}", err.message());
        }
        // An existing directory that is not mounted is not a volume either.
        let unmounted = plugin.target("pod-2", "spiffe");
        std::fs::create_dir(&unmounted).unwrap();
        let err = stats(&plugin, "csi-2", unmounted.to_str().unwrap()).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{}", err.message());

        node.node_unpublish_volume(unpublish_request("csi-1", &target)).await.unwrap();
        plugin.stop().await.unwrap();
    }
}

/// One bad request, what it must get, and where nothing may appear.
struct BadInput {
    name: &'static str,
    request: NodePublishVolumeRequest,
    code: Code,
    message: String,
}

fn with(
    target: &Path,
    edit: impl FnOnce(&mut NodePublishVolumeRequest),
) -> NodePublishVolumeRequest {
    let mut req = publish_request("csi-bad", target);
    edit(&mut req);
    req
}

fn capability(req: &mut NodePublishVolumeRequest) -> &mut VolumeCapability {
    req.volume_capability
        .get_or_insert_with(VolumeCapability::default)
}

fn mount_with(fs_type: &str, flags: &[&str]) -> Option<AccessType> {
    Some(AccessType::Mount(MountVolume {
        fs_type: fs_type.into(),
        mount_flags: flags.iter().map(|f| (*f).to_owned()).collect(),
        ..Default::default()
    }))
}

/// The reference's error table (P-1…P-9, messages verbatim, R-6) and hostile target paths
/// (R-4, a spiffe-csi-driver gap, P-14).
fn bad_inputs(plugin: &Plugin, target: &Path, outside: &Path) -> Vec<BadInput> {
    let invalid = |name, request, message: &str| BadInput {
        name,
        request,
        code: Code::InvalidArgument,
        message: message.to_owned(),
    };
    let pods = plugin.pods_dir.to_str().unwrap();
    let outside_target = outside.join("mount");
    // pods/evil -> outside: lexically inside, really outside.
    let through_symlink = plugin.pods_dir.join("evil/mount");
    let dot_dot = format!("{pods}/pod-1/../../../outside/mount");
    let long = format!("{pods}/{}", "d/".repeat(32 * 1024));
    vec![
        invalid(
            "P-1",
            with(target, |r| r.volume_id.clear()),
            "request missing required volume id",
        ),
        invalid(
            "P-2",
            with(target, |r| r.target_path.clear()),
            "request missing required target path",
        ),
        invalid(
            "P-3",
            with(target, |r| r.volume_capability = None),
            "request missing required volume capability",
        ),
        invalid(
            "P-4",
            with(target, |r| capability(r).access_type = None),
            "request missing required volume capability access type",
        ),
        invalid(
            "P-5 block",
            with(target, |r| {
                capability(r).access_type = Some(AccessType::Block(BlockVolume {}))
            }),
            "request volume capability access type must be a simple mount",
        ),
        invalid(
            "P-5 fs_type",
            with(target, |r| {
                capability(r).access_type = mount_with("ext4", &[])
            }),
            "request volume capability access type must be a simple mount",
        ),
        invalid(
            "P-5 mount_flags",
            with(target, |r| {
                capability(r).access_type = mount_with("", &["ro"])
            }),
            "request volume capability access type must be a simple mount",
        ),
        invalid(
            "P-6",
            with(target, |r| capability(r).access_mode = None),
            "request missing required volume capability access mode",
        ),
        invalid(
            "P-7",
            with(target, |r| {
                capability(r).access_mode = Some(AccessMode {
                    mode: Mode::SingleNodeReaderOnly as i32,
                })
            }),
            "request volume capability access mode is not valid",
        ),
        invalid(
            "P-8",
            with(target, |r| r.readonly = false),
            "pod.spec.volumes[].csi.readOnly must be set to 'true'",
        ),
        invalid(
            "P-9 absent",
            with(target, |r| r.volume_context.clear()),
            "only ephemeral volumes are supported",
        ),
        invalid(
            "P-9 false",
            with(target, |r| {
                r.volume_context
                    .insert("csi.storage.k8s.io/ephemeral".into(), "false".into());
            }),
            "only ephemeral volumes are supported",
        ),
        invalid(
            "outside the kubelet root",
            with(&outside_target, |_| {}),
            "is not under the kubelet pods directory",
        ),
        invalid(
            "dot-dot",
            with(Path::new(&dot_dot), |_| {}),
            "must be normalised",
        ),
        invalid(
            "through a symlink",
            with(&through_symlink, |_| {}),
            "outside the kubelet pods directory",
        ),
        invalid(
            "relative",
            with(Path::new("pods/pod-1/mount"), |_| {}),
            "must be absolute",
        ),
        invalid("64 KiB", with(Path::new(&long), |_| {}), "is too long"),
        invalid(
            "symlink at the target",
            with(&plugin.pods_dir.join("pod-1/link"), |_| {}),
            "exists and is not a directory",
        ),
    ]
}

mount_ns_test! {
    /// Every bad input gets its code and message, mounts and creates nothing, and the plugin
    /// keeps serving: a valid publish afterwards works.
    async fn bad_inputs_are_refused_and_the_plugin_keeps_serving() {
        let plugin = Plugin::start().await;
        let mut node = plugin.node().await;
        let outside = plugin.root.join("outside");
        std::fs::create_dir(&outside).unwrap();
        symlink(&outside, plugin.pods_dir.join("evil")).unwrap();
        std::fs::create_dir(plugin.pods_dir.join("pod-1")).unwrap();
        symlink(&outside, plugin.pods_dir.join("pod-1/link")).unwrap();
        let target = plugin.target("pod-1", "spiffe");
        let mounts_before = total_mounts();

        for case in bad_inputs(&plugin, &target, &outside) {
            let err = node.node_publish_volume(case.request).await.unwrap_err();
            assert_eq!(err.code(), case.code, "{}: {}", case.name, err.message());
            assert!(err.message().contains(&case.message), "{}: {}", case.name, err.message());
            assert!(err.message().len() < 1024, "{}: message must stay short", case.name);
            assert_eq!(total_mounts(), mounts_before, "{}: nothing mounted", case.name);
            assert!(std::fs::read_dir(&outside).unwrap().next().is_none(), "{}: nothing created outside", case.name);
            assert!(!target.exists(), "{}: no target created", case.name);
        }
        // Unpublish refuses the same escapes (it would unmount and rmdir there).
        for path in [outside.join("mount"), plugin.pods_dir.join("evil/mount")] {
            std::fs::create_dir_all(outside.join("mount")).unwrap();
            let err = node.node_unpublish_volume(unpublish_request("csi-bad", &path)).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
            assert!(outside.join("mount").is_dir(), "nothing removed outside");
        }
        let err = node.node_unpublish_volume(unpublish_request("", &target)).await.unwrap_err();
        assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "request missing required volume id"));
        let err = node.node_unpublish_volume(unpublish_request("csi-1", Path::new(""))).await.unwrap_err();
        assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "request missing required target path"));

        // Still serving, on the same connection.
        node.node_publish_volume(publish_request("csi-1", &target)).await.unwrap();
        assert_eq!(mounts_at(&target), 1);
        node.node_unpublish_volume(unpublish_request("csi-1", &target)).await.unwrap();
        assert_eq!(total_mounts(), mounts_before);
        plugin.stop().await.unwrap();
    }
}

mount_ns_test! {
    /// P-10: a missing parent is Internal with spiffe's message (users search for it:
    /// spiffe/spiffe-csi#196, microk8s without kubeletPath).
    async fn a_missing_parent_is_internal_with_spiffes_message() {
        let plugin = Plugin::start().await;
        let target = plugin.pods_dir.join("no-such-pod/volumes/kubernetes.io~csi/spiffe/mount");
        let err = plugin.node().await.node_publish_volume(publish_request("csi-1", &target)).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.message().starts_with("unable to create target path"), "{}", err.message());
        assert!(err.message().contains("No such file or directory"), "{}", err.message());

        // P-12: a socket directory that is gone is Internal "unable to mount", and is
        // checked before anything is created.
        let target = plugin.target("pod-1", "spiffe");
        let moved = plugin.root.join("sockets-moved");
        std::fs::rename(&plugin.mount_dir, &moved).unwrap();
        let err = plugin.node().await.node_publish_volume(publish_request("csi-1", &target)).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.message().starts_with("unable to mount"), "{}", err.message());
        assert!(err.message().contains("socket directory"), "{}", err.message());
        assert!(!target.exists());
        std::fs::rename(&moved, &plugin.mount_dir).unwrap();
        plugin.stop().await.unwrap();
    }
}

mount_ns_test! {
    /// Logs name the volume, target and pod (from podInfoOnMount's volume_context), say
    /// why a call failed, and never contain `secrets`.
    async fn logs_carry_the_pod_and_never_the_secrets() {
        let logs = csi_support::LogCapture::install();
        let plugin = Plugin::start().await;
        let mut node = plugin.node().await;
        let target = plugin.target("pod-1", "spiffe");
        node.node_publish_volume(publish_request("csi-1", &target)).await.unwrap();
        node.node_publish_volume(publish_request("csi-1", &target)).await.unwrap();
        let mut writable = publish_request("csi-2", &target);
        writable.readonly = false;
        node.node_publish_volume(writable).await.unwrap_err();
        node.node_unpublish_volume(unpublish_request("csi-1", &target)).await.unwrap();
        plugin.stop().await.unwrap();

        let text = logs.text();
        for expected in [
            "volume published",
            "volume already published",
            "volume unpublished",
            "volume_id=\"csi-1\"",
            "pod.name=\"web-0\"",
            "pod.namespace=\"default\"",
            "pod.uid=\"c3a32fc0\"",
            "pod.spec.volumes[].csi.readOnly must be set to 'true'",
            &format!("target_path={:?}", target.to_str().unwrap()),
        ] {
            assert!(text.contains(expected), "missing {expected:?} in logs:\n{text}");
        }
        assert!(!text.contains("never-logged"), "secrets leaked into logs:\n{text}");
    }
}
