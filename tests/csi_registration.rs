//! Kubelet plugin registration (docs/behaviours.md, "Kubelet plugin registration"): this test
//! plays the kubelet's plugin watcher against the registration socket, and checks socket
//! permissions and clean-up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::testing::csi as csi_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use csi_support::{NODE_ID, PLUGIN_NAME, Plugin};
use svid_bridge::csi::{self, RegistrationStatus};
use svid_bridge::proto::csi::identity_client::IdentityClient;
use svid_bridge::proto::csi::node_client::NodeClient;
use svid_bridge::proto::csi::{GetPluginInfoRequest, NodeGetInfoRequest};
use svid_bridge::proto::pluginregistration::registration_client::RegistrationClient;
use svid_bridge::proto::pluginregistration::{InfoRequest, RegistrationStatus as KubeletReport};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn the_kubelet_registers_the_plugin_through_the_registration_socket() {
    let mut plugin = Plugin::start().await;
    let registry = plugin.kubelet_root.join("plugins_registry");
    let reg_socket = registry.join(format!("{PLUGIN_NAME}-reg.sock"));
    assert_eq!(
        *plugin.registration.borrow(),
        RegistrationStatus::AwaitingKubelet
    );
    assert!(
        registry.is_dir(),
        "plugins_registry is created when missing"
    );
    assert_eq!(
        mode(&reg_socket),
        0o600,
        "R-5: root-only, like the registrar's umask 0077"
    );
    assert_eq!(mode(&plugin.csi_socket), 0o600);

    // (1) The plugin watcher found the socket: GetInfo.
    let mut kubelet = RegistrationClient::new(csi::connect_uds(&reg_socket).await.unwrap());
    let info = kubelet.get_info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, PLUGIN_NAME);
    assert_eq!(Path::new(&info.endpoint), plugin.csi_socket);
    assert_eq!(info.supported_versions, ["1.0.0"]);

    // (3) The kubelet dials the endpoint it was given and asks for the node ID.
    let endpoint = csi::connect_uds(Path::new(&info.endpoint)).await.unwrap();
    let node_info = NodeClient::new(endpoint.clone())
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap();
    assert_eq!(node_info.into_inner().node_id, NODE_ID);
    let name = IdentityClient::new(endpoint)
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap();
    assert_eq!(
        name.into_inner().name,
        info.name,
        "CSIDriver name must match GetPluginInfo"
    );

    // (4) A failed registration is an error state the lead's health check can read.
    kubelet
        .notify_registration_status(KubeletReport {
            plugin_registered: false,
            error: "plugin csi.spiffe.io already registered with a higher version".into(),
        })
        .await
        .unwrap();
    let status = plugin.registration.borrow_and_update().clone();
    assert!(status.is_failed(), "{status:?}");
    assert_eq!(
        status,
        RegistrationStatus::Rejected {
            error: "plugin csi.spiffe.io already registered with a higher version".into()
        }
    );
    // The kubelet retries on its own; success clears the failure.
    kubelet
        .notify_registration_status(KubeletReport {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    assert!(plugin.registration.borrow().is_registered());

    // (6) Newer kubelets keep calling GetInfo as a health check.
    assert_eq!(
        kubelet
            .get_info(InfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .name,
        PLUGIN_NAME
    );

    let csi_socket = plugin.csi_socket.clone();
    plugin.stop().await.unwrap();
    assert!(
        !reg_socket.exists(),
        "removing it is how the kubelet learns we are gone"
    );
    assert!(!csi_socket.exists());
}

/// Drop-in with spiffe-csi-driver's chart: `plugins_registry` is not mounted into our
/// container (node-driver-registrar registers instead). CSI keeps serving; the state says why
/// we could not register.
#[tokio::test]
async fn without_a_usable_registry_csi_still_serves_and_the_state_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let kubelet_root = root.join("kubelet");
    std::fs::create_dir_all(kubelet_root.join("pods")).unwrap();
    std::fs::write(kubelet_root.join("plugins_registry"), b"not a directory").unwrap();
    let config = svid_bridge::config::CsiConfig {
        socket: root.join("csi.sock"),
        plugin_name: PLUGIN_NAME.into(),
        mount_dir: root.clone(),
        node_id: NODE_ID.into(),
        kubelet_root,
        registration_endpoint: root.join("csi.sock"),
        register_with_kubelet: true,
    };
    let (_sds, sds_rx) = tokio::sync::watch::channel(true);
    let (status_tx, mut status) = tokio::sync::watch::channel(RegistrationStatus::NotStarted);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(csi::serve_with_registration(
        config.clone(),
        sds_rx,
        shutdown.clone(),
        status_tx,
        std::sync::Arc::new(svid_bridge::telemetry::metrics::Metrics::new()),
    ));

    let deadline = std::time::Duration::from_secs(20);
    let reached = tokio::time::timeout(
        deadline,
        status.wait_for(|s| *s != RegistrationStatus::NotStarted),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    match &reached {
        RegistrationStatus::Unavailable { reason } => {
            assert!(reason.contains("plugin registry"), "{reason}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(reached.is_failed());
    let info = IdentityClient::new(csi::connect_uds(&config.socket).await.unwrap())
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap();
    assert_eq!(info.into_inner().name, PLUGIN_NAME);

    shutdown.cancel();
    tokio::time::timeout(deadline, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!config.socket.exists());
}

/// S-6 for a stale socket is uds.rs's; a user's file at the CSI socket path is never
/// replaced, and serve says so instead of starting.
#[tokio::test]
async fn a_regular_file_at_the_csi_socket_path_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    std::fs::write(&socket, b"precious").unwrap();
    std::fs::create_dir(dir.path().join("pods")).unwrap();
    let config = svid_bridge::config::CsiConfig {
        socket: socket.clone(),
        plugin_name: PLUGIN_NAME.into(),
        mount_dir: dir.path().to_path_buf(),
        node_id: NODE_ID.into(),
        kubelet_root: dir.path().to_path_buf(),
        registration_endpoint: socket.clone(),
        register_with_kubelet: true,
    };
    let (_sds, sds_rx) = tokio::sync::watch::channel(true);
    let err = csi::serve(config, sds_rx, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, csi::CsiError::Socket(_)), "{err}");
    assert_eq!(std::fs::read(&socket).unwrap(), b"precious");
}
