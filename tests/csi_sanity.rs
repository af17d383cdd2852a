//! csi-sanity (kubernetes-csi/csi-test, built by `make peers` into target/peers/bin) against
//! the CSI plugin in its node-only, ephemeral-volume configuration, plus Rust ports of the
//! sanity checks that apply, so they also run with cargo alone (docs/behaviours.md, "csi-sanity").
//!
//! The plugin runs in-process (`csi::serve` on a temporary socket) until `svid-bridge run`
//! serves CSI; csi-sanity runs as a child in the same private mount namespace, so even a
//! stray mount could not reach the host.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::mount_ns_test;
use svid_bridge::testing::csi as csi_support;

use std::process::Command;

use csi_support::{NODE_ID, PLUGIN_NAME, Plugin, csi_sanity_path};
use svid_bridge::proto::csi::node_service_capability::Type as CapabilityType;
use svid_bridge::proto::csi::node_service_capability::rpc::Type as RpcType;
use svid_bridge::proto::csi::{
    GetPluginCapabilitiesRequest, GetPluginInfoRequest, NodeGetCapabilitiesRequest,
    NodeGetInfoRequest, NodeGetVolumeStatsRequest, NodePublishVolumeRequest,
    NodeUnpublishVolumeRequest, ProbeRequest,
};
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;

/// Specs that cannot apply to a node-only plugin and fail rather than skip themselves:
/// - `[Controller Server]`: every controller spec first calls ControllerGetCapabilities and
///   requires success; we serve no Controller service (UNIMPLEMENTED, as the spec asks).
/// - `should remove target path` (NodeUnpublishVolume) and `does not exist on the specified
///   path` (NodeGetVolumeStats): both first create a volume with Controller.CreateVolume.
///   What they check is covered with real mounts in tests/csi_node.rs.
///
/// Skipped by csi-sanity itself (listed for completeness): `should work` and `should be
/// idempotent` (need CONTROLLER_SERVICE), GroupController and SnapshotMetadata (not
/// advertised), NodeStage/Unstage/Expand and volume/storage health (capabilities not
/// advertised), and the SINGLE_NODE_MULTI_WRITER publish spec.
const SKIP: &str =
    r"\[Controller Server\]|should remove target path|does not exist on the specified path";

/// The Node and Identity specs we expect csi-sanity to run and pass: 3 Identity, 2 Node
/// capabilities/info, 3 NodePublishVolume, 2 NodeUnpublishVolume, 3 NodeGetVolumeStats.
const EXPECTED_PASSED: usize = 13;

mount_ns_test! {
    async fn csi_sanity_passes_for_the_node_only_ephemeral_configuration() {
        let plugin = Plugin::start().await;
        let mount_dir = plugin.pods_dir.join("sanity/mnt");
        let staging_dir = plugin.pods_dir.join("sanity/staging");
        // csi-sanity creates these two itself, but not their parent.
        std::fs::create_dir(plugin.pods_dir.join("sanity")).unwrap();
        let mut command = Command::new(csi_sanity_path());
        command
            .arg(format!("--csi.endpoint=unix://{}", plugin.csi_socket.display()))
            .arg(format!("--csi.mountdir={}", mount_dir.display()))
            .arg(format!("--csi.stagingdir={}", staging_dir.display()))
            .arg(format!("--ginkgo.skip={SKIP}"))
            .arg("--ginkgo.no-color")
            .arg("--ginkgo.v");
        let output = tokio::task::spawn_blocking(move || command.output()).await.unwrap().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let report = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
        assert!(output.status.success(), "csi-sanity failed: {}\n{report}", output.status);
        let passed = summary_count(&stdout, "Passed").expect("ginkgo summary");
        assert_eq!(summary_count(&stdout, "Failed"), Some(0), "{report}");
        assert_eq!(passed, EXPECTED_PASSED, "the applicable specs all ran\n{report}");
        plugin.stop().await.unwrap();
    }
}

/// `N Passed` from ginkgo's summary line `SUCCESS! -- 13 Passed | 0 Failed | …`.
fn summary_count(stdout: &str, what: &str) -> Option<usize> {
    let line = stdout.lines().rev().find(|l| l.contains(" Passed | "))?;
    line.split(" | ").find_map(|part| {
        let mut words = part.split_whitespace().rev();
        (words.next()? == what).then(|| words.next()?.parse().ok())?
    })
}

/// csi-sanity's Identity checks, ported: name rules, known capabilities, Probe.
#[tokio::test]
async fn identity_answers_like_csi_sanity_expects() {
    let plugin = Plugin::start().await;
    let mut identity = plugin.identity().await;
    let info = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, PLUGIN_NAME);
    assert!(svid_bridge::config::is_valid_plugin_name(&info.name));
    assert_eq!(info.vendor_version, svid_bridge::VERSION);
    let caps = identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap();
    assert!(
        caps.into_inner().capabilities.is_empty(),
        "I-2: no CONTROLLER_SERVICE"
    );
    let probe = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    // Not ready while the SDS server starts; FAILED_PRECONDITION once it is gone for good.
    plugin.sds_serving.send_replace(false);
    assert_eq!(
        identity
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        Some(false)
    );
    plugin.stop().await.unwrap();
}

#[tokio::test]
async fn probe_fails_when_the_sds_server_is_gone() {
    let mut plugin = Plugin::start().await;
    let (orphan, _) = tokio::sync::watch::channel(true);
    // Dropping the only sender is how the SDS side says it stopped.
    drop(std::mem::replace(&mut plugin.sds_serving, orphan));
    let err = plugin
        .identity()
        .await
        .probe(ProbeRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("SDS server is not running"),
        "{}",
        err.message()
    );
    plugin.stop().await.unwrap();
}

/// csi-sanity's Node checks, ported, plus N-1…N-3.
#[tokio::test]
async fn node_answers_like_csi_sanity_expects() {
    let plugin = Plugin::start().await;
    let mut node = plugin.node().await;
    let caps = node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let rpcs: Vec<i32> = caps
        .capabilities
        .iter()
        .map(|c| match c.r#type {
            Some(CapabilityType::Rpc(rpc)) => rpc.r#type,
            None => panic!("capability without type"),
        })
        .collect();
    assert_eq!(
        rpcs,
        [
            RpcType::VolumeCondition as i32,
            RpcType::GetVolumeStats as i32
        ],
        "N-1"
    );
    let info = node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE_ID);
    assert_eq!(info.max_volumes_per_node, 0);
    assert!(info.accessible_topology.is_none());

    let target = plugin
        .pods_dir
        .join("p/target")
        .to_string_lossy()
        .into_owned();
    let publish_errors = [
        NodePublishVolumeRequest::default(),
        NodePublishVolumeRequest {
            volume_id: "v".into(),
            ..Default::default()
        },
        NodePublishVolumeRequest {
            volume_id: "v".into(),
            target_path: target.clone(),
            ..Default::default()
        },
    ];
    for req in publish_errors {
        let err = node.node_publish_volume(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    for req in [
        NodeUnpublishVolumeRequest::default(),
        NodeUnpublishVolumeRequest {
            volume_id: "v".into(),
            ..Default::default()
        },
    ] {
        assert_eq!(
            node.node_unpublish_volume(req).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }
    // R-2: spiffe-csi-driver fails all three (V-1).
    let stats = |id: &str, path: &str| NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    for (req, code) in [
        (stats("", "some/path"), Code::InvalidArgument),
        (stats("v", ""), Code::InvalidArgument),
        (stats("v", "some/path"), Code::NotFound),
        (stats("v", &target), Code::NotFound),
    ] {
        assert_eq!(
            node.node_get_volume_stats(req).await.unwrap_err().code(),
            code
        );
    }
    plugin.stop().await.unwrap();
}

/// N-3: NodeStage/Unstage/Expand and the Controller service are UNIMPLEMENTED.
#[tokio::test]
async fn undeclared_rpcs_are_unimplemented() {
    let plugin = Plugin::start().await;
    for method in [
        "/csi.v1.Node/NodeStageVolume",
        "/csi.v1.Node/NodeUnstageVolume",
        "/csi.v1.Node/NodeExpandVolume",
        "/csi.v1.Controller/CreateVolume",
        "/csi.v1.Controller/ControllerGetCapabilities",
        "/csi.v1.GroupController/GroupControllerGetCapabilities",
    ] {
        let mut grpc = tonic::client::Grpc::new(plugin.channel().await);
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<NodeGetInfoRequest, NodeGetInfoRequest>::default();
        let err = grpc
            .unary(
                tonic::Request::new(NodeGetInfoRequest {}),
                PathAndQuery::from_static(method),
                codec,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{method}");
    }
    plugin.stop().await.unwrap();
}
