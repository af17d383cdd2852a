//! Real Envoys get their TLS identities from svid-bridge, which gets them from a real SPIRE
//! agent through the Delegated Identity API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use common::http;
use svid_bridge::testing as common;

use std::time::Duration;

use common::bridge::{Bridge, Sidecar, SidecarSpec, spire_options_for_bridge, start_mtls_pair};
use common::{Spire, wait_until_with};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Two Envoys do mTLS, each verifying the other's SPIFFE ID with
/// `match_typed_subject_alt_names` under the SPIFFE validator (ROOTCA, C-3); a third
/// workload with another SPIFFE ID is refused by the server.
#[test]
fn two_envoys_do_mtls_with_each_others_spiffe_ids() {
    let spire = Spire::start(spire_options_for_bridge("example.org"));
    let bridge = Bridge::start(&spire);
    let socket = bridge.sds_socket();
    let (server, client) = start_mtls_pair(&spire, &socket, "GRPC");

    let response = wait_until_with(
        TIMEOUT,
        "a request crosses client → server over mTLS",
        &[&bridge, &server.envoy, &client.envoy],
        || {
            http::get(client.outbound(), "/")
                .ok()
                .filter(|r| r.status == 200)
        },
    );
    assert_eq!(response.body.trim(), "hello from server");
    assert_eq!(
        response.headers["x-peer-spiffe-id"], client.spiffe_id,
        "server verified the client's SVID"
    );
    assert_eq!(
        response.headers["x-server-spiffe-id"], server.spiffe_id,
        "server presented its own SVID"
    );
    assert_eq!(
        response.headers["x-upstream-verified-spiffe-id"], server.spiffe_id,
        "client verified the server's SVID"
    );

    // The same config under another identity: the server's SAN matcher refuses it.
    let mut intruder_spec = SidecarSpec::new("intruder", &socket);
    intruder_spec.upstream_port = server.inbound().port();
    intruder_spec.upstream_spiffe_id = server.spiffe_id.clone();
    let intruder = Sidecar::start(&spire, &intruder_spec);
    let refused = http::get(intruder.outbound(), "/").unwrap();
    assert_eq!(
        refused.status, 503,
        "the server must refuse spiffe://example.org/intruder: {refused:?}"
    );
    assert!(
        server.stat("listener.127.0.0.1_0.ssl.fail_verify_san") > 0
            || server
                .envoy
                .admin_get("/stats")
                .contains("fail_verify_san: 1")
    );

    // Every secret came from SDS, none was rejected.
    for sidecar in [&server, &client, &intruder] {
        assert!(sidecar.stat("sds.default.update_success") >= 1);
        assert!(sidecar.stat("sds.ROOTCA.update_success") >= 1);
        assert_eq!(sidecar.stat("sds.default.update_rejected"), 0);
        assert_eq!(sidecar.stat("sds.ROOTCA.update_rejected"), 0);
    }
}

fn server_and_client(spire: &Spire, bridge: &Bridge, api_type: &'static str) -> (Sidecar, Sidecar) {
    start_mtls_pair(spire, &bridge.sds_socket(), api_type)
}

fn assert_traffic_flows(client: &Sidecar, server: &Sidecar, sources: &[&dyn common::LogSource]) {
    let response = wait_until_with(
        TIMEOUT,
        "client → server over mTLS answers 200",
        sources,
        || {
            http::get(client.outbound(), "/")
                .ok()
                .filter(|r| r.status == 200)
        },
    );
    assert_eq!(
        response.headers["x-upstream-verified-spiffe-id"],
        server.spiffe_id
    );
}

/// The version Envoy holds for a dynamic secret (`/config_dump`, E44).
fn active_secret_version(sidecar: &Sidecar, name: &str) -> Option<String> {
    let dump: serde_json::Value = serde_json::from_str(
        &sidecar
            .envoy
            .admin_get("/config_dump?resource=dynamic_active_secrets"),
    )
    .unwrap();
    dump["configs"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)?["version_info"]
        .as_str()
        .map(str::to_owned)
}

/// DeltaSecrets (incremental xDS), which neither SPIRE nor istio-agent implements (F-1),
/// driven by a real Envoy with `api_type: DELTA_GRPC`.
#[test]
fn delta_sds_serves_a_real_envoy() {
    let spire = Spire::start(spire_options_for_bridge("example.org"));
    let bridge = Bridge::start(&spire);
    let (server, client) = server_and_client(&spire, &bridge, "DELTA_GRPC");
    assert_traffic_flows(&client, &server, &[&bridge, &server.envoy, &client.envoy]);
    assert!(server.stat("sds.default.update_success") >= 1);
    assert_eq!(server.stat("sds.default.update_rejected"), 0);
    assert!(
        bridge.logs().contains("api=\"delta\"") || bridge.logs().contains("api=delta"),
        "streams were delta streams"
    );
}

/// Rotation with a short SVID TTL reaches Envoy (new serial in /certs, update_success
/// grows, nothing rejected) while ROOTCA, whose content did not change, is never re-pushed
/// (SPIRE re-sends every name on every cache update, D-9). Then the agent goes away:
/// traffic keeps flowing on the cached SVIDs, and rotation resumes when it returns.
#[test]
fn rotation_reaches_envoy_and_survives_an_agent_restart() {
    let mut spire = Spire::start(spire_options_for_bridge("example.org"));
    let bridge = Bridge::start(&spire);
    let socket = bridge.sds_socket();
    // Short-lived SVIDs for the server: the agent rotates at half-life.
    let binary = common::workload_binary("server", &common::peer("envoy"));
    let server_id = spire.id("server");
    spire.create_entry(&common::EntrySpec {
        x509_svid_ttl: Some(20),
        ..common::EntrySpec::for_path(&server_id, &binary)
    });
    let mut spec = SidecarSpec::new("server", &socket);
    spec.inbound_allowed = spire.id("client");
    let envoy = common::Envoy::start_with(
        &spec.render(),
        common::EnvoyOptions {
            binary: Some(binary.clone()),
            ..Default::default()
        },
    );
    let server = Sidecar {
        envoy,
        spiffe_id: server_id,
        binary,
    };
    let mut client_spec = SidecarSpec::new("client", &socket);
    client_spec.upstream_port = server.inbound().port();
    client_spec.upstream_spiffe_id = server.spiffe_id.clone();
    let client = Sidecar::start(&spire, &client_spec);
    let logs: [&dyn common::LogSource; 4] = [&bridge, &server.envoy, &client.envoy, &spire];
    assert_traffic_flows(&client, &server, &logs);

    let first_serials = server.cert_serials();
    let rootca_pushes = server.stat("sds.ROOTCA.update_success");
    let rotated = |from: &Vec<String>| {
        wait_until_with(
            TIMEOUT,
            "the server's Envoy holds a rotated SVID",
            &logs,
            || {
                let now = server.cert_serials();
                (!now.is_empty() && now != *from).then_some(now)
            },
        )
    };
    let second_serials = rotated(&first_serials);
    let third_serials = rotated(&second_serials);
    assert!(
        server.stat("sds.default.update_success") >= 3,
        "initial + two rotations"
    );
    assert_eq!(server.stat("sds.default.update_rejected"), 0);
    assert_eq!(
        server.stat("sds.ROOTCA.update_success"),
        rootca_pushes,
        "an unchanged ROOTCA is never re-sent"
    );
    assert_traffic_flows(&client, &server, &logs);

    // The agent goes away: established streams keep their secrets, traffic flows.
    spire.stop_agent();
    assert_traffic_flows(&client, &server, &[&bridge, &server.envoy, &client.envoy]);
    assert_eq!(server.cert_serials(), third_serials);
    spire.start_agent();
    let logs: [&dyn common::LogSource; 4] = [&bridge, &server.envoy, &client.envoy, &spire];
    wait_until_with(
        TIMEOUT,
        "rotation resumes after the agent returns",
        &logs,
        || {
            let now = server.cert_serials();
            (!now.is_empty() && now != third_serials).then_some(())
        },
    );
    assert_traffic_flows(&client, &server, &logs);
    assert_eq!(server.stat("sds.default.update_rejected"), 0);
}

/// E11: a restarted Envoy (empty nonce, old version) gets its secret at once; a restarted
/// bridge is reconnected to, traffic keeps flowing meanwhile, and because versions are
/// content hashes Envoy ends up holding the very same version.
#[test]
fn envoy_and_bridge_restarts_are_recovered() {
    let spire = Spire::start(spire_options_for_bridge("example.org"));
    let mut bridge = Bridge::start(&spire);
    let (server, client) = server_and_client(&spire, &bridge, "GRPC");
    assert_traffic_flows(&client, &server, &[&bridge, &server.envoy, &client.envoy]);
    let version_before = active_secret_version(&server, "default").expect("server holds default");

    // The bridge dies: established TLS keeps working and new connections still handshake
    // with the secrets Envoy holds.
    bridge.kill();
    assert_traffic_flows(&client, &server, &[&server.envoy, &client.envoy]);
    let failures_before = server.stat("sds.default.update_failure");
    bridge.restart();
    wait_until_with(
        TIMEOUT,
        "the server's Envoy re-opened its SDS stream",
        &[&bridge, &server.envoy],
        || (server.stat("cluster.sds-grpc.upstream_cx_total") >= 2).then_some(()),
    );
    assert!(server.stat("sds.default.update_failure") >= failures_before);
    assert_traffic_flows(&client, &server, &[&bridge, &server.envoy, &client.envoy]);
    assert_eq!(
        active_secret_version(&server, "default").unwrap(),
        version_before,
        "content-hash version survives a bridge restart"
    );

    // A restarted Envoy with the same identity gets its secret at once.
    let binary = client.binary.clone();
    let config = std::fs::read_to_string(client.envoy.config_path()).unwrap();
    drop(client);
    let envoy = common::Envoy::start_with(
        &config,
        common::EnvoyOptions {
            binary: Some(binary.clone()),
            ..Default::default()
        },
    );
    let client = Sidecar {
        envoy,
        spiffe_id: spire.id("client"),
        binary,
    };
    assert_traffic_flows(&client, &server, &[&bridge, &server.envoy, &client.envoy]);
}

/// Envoy's `google_grpc` SDS client (gRPC C core) sends the percent-encoded socket path as
/// `:authority`, which a default tonic server resets (docs/behaviours.md, "gRPC C-core
/// clients and :authority").
#[test]
fn envoy_google_grpc_sds_client_is_served() {
    let spire = Spire::start(spire_options_for_bridge("example.org"));
    let bridge = Bridge::start(&spire);
    let mut spec = SidecarSpec::new("server", &bridge.sds_socket());
    spec.inbound_allowed = spire.id("client");
    let config = spec.render().replace(
        "envoy_grpc: { cluster_name: sds-grpc }",
        &format!(
            "google_grpc: {{ target_uri: \"unix:{}\", stat_prefix: sds }}",
            bridge.sds_socket().display()
        ),
    );
    assert!(config.contains("google_grpc"));
    let server = Sidecar::start_with_config(&spire, "server", &config);
    assert!(server.stat("sds.default.update_success") >= 1);
    assert_eq!(server.stat("sds.default.update_rejected"), 0);
}
