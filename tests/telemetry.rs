//! What an operator sees: /metrics during a real SDS and CSI scenario (checked by
//! Prometheus' own promtool), /readyz and `svid-bridge healthcheck` through an agent
//! outage, JSON logs, and no key material in any log line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use common::metrics::sample;
use svid_bridge::testing as common;

use common::this_test_binary;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::bridge::{
    Bridge, SdsStream, Sidecar, SidecarSpec, request, secrets_of, spire_options_for_bridge,
};
use common::{EntrySpec, Spire, free_port, peer, temp_dir, wait_until, wait_until_with};
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret;
use svid_bridge::proto::csi::identity_client::IdentityClient;
use svid_bridge::proto::csi::node_client::NodeClient;
use svid_bridge::proto::csi::{
    GetPluginInfoRequest, NodeGetCapabilitiesRequest, NodePublishVolumeRequest,
};

const WAIT: Duration = Duration::from_secs(60);

fn http_get(port: u16, path: &str) -> (u16, String) {
    let response = common::http::get_local(port, path);
    (response.status, response.body)
}

/// `svid-bridge healthcheck`: (exit success, stdout + stderr).
fn healthcheck(port: u16) -> (bool, String) {
    let out = Command::new(common::bridge_binary())
        .args(["healthcheck", &format!("--health-addr=127.0.0.1:{port}")])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn promtool(exposition: &str, lint: &str) -> (bool, String) {
    let mut child = Command::new(peer("promtool"))
        .args(["check", "metrics", &format!("--lint={lint}")])
        // With no linting, promtool insists on --extended (a cardinality report).
        .args((lint == "none").then_some("--extended"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Prometheus' promtool parses the exposition; its linter then finds nothing wrong except
/// one artefact of reading OpenMetrics as the older text format: a counter's `_total`
/// samples look like a family of their own without HELP (the HELP belongs to the family
/// name, as OpenMetrics prescribes).
fn promtool_accepts(exposition: &str) {
    let (parsed, out) = promtool(exposition, "none");
    assert!(parsed, "promtool cannot parse the exposition:\n{out}");
    let (_, out) = promtool(exposition, "all");
    for problem in out.lines().filter(|l| !l.trim().is_empty()) {
        let family = problem
            .strip_suffix(" no help text")
            .and_then(|n| n.strip_suffix("_total"));
        let explained = family.is_some_and(|f| {
            exposition.contains(&format!("# HELP {f} "))
                && exposition.contains(&format!("# TYPE {f} counter"))
        });
        assert!(explained, "promtool lint: {problem}\n{out}");
    }
}

async fn play_kubelet(registration_socket: &Path) {
    let info = common::csi::register_as_kubelet(registration_socket).await;
    assert_eq!(info.name, "csi.spiffe.io");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_logs_through_an_sds_and_csi_scenario() {
    let spire = Spire::start(spire_options_for_bridge("example.org"));
    spire.register_test_binary("tester");
    let kubelet = temp_dir("kubelet");
    std::fs::create_dir_all(kubelet.path().join("pods")).unwrap();
    let csi_dir = common::SocketDir::new(kubelet.path(), "plugins_registry/csi.spiffe.io-reg.sock");
    let (metrics_port, health_port) = (free_port(), free_port());
    let bridge = Bridge::start_with(
        &spire,
        &[
            &format!("--csi-socket={}", csi_dir.path().join("csi.sock").display()),
            &format!("--kubelet-root={}", kubelet.path().display()),
            "--node-id=node-1",
            &format!("--metrics-addr=127.0.0.1:{metrics_port}"),
            &format!("--health-addr=127.0.0.1:{health_port}"),
            "--log-format=json",
            // Everything, dependencies included: no level may print key material.
            "--log-level=trace",
        ],
    );

    // Not ready until the kubelet registered the plugin; the reason says so.
    let (ok, why) = wait_until_with(WAIT, "the health endpoint answers", &[&bridge], || {
        let (ok, out) = healthcheck(health_port);
        (!out.contains("cannot reach")).then_some((ok, out))
    });
    assert!(
        !ok && why.contains("not registered with the kubelet"),
        "{why}"
    );
    assert_eq!(
        http_get(health_port, "/healthz").0,
        200,
        "alive all the same"
    );
    let registration_socket = kubelet
        .path()
        .join("plugins_registry/csi.spiffe.io-reg.sock");
    tokio::task::block_in_place(|| {
        wait_until_with(WAIT, "the registration socket appears", &[&bridge], || {
            registration_socket.exists().then_some(())
        })
    });
    play_kubelet(&registration_socket).await;

    // An Envoy with two SDS streams, and this process fetching its own SVID.
    let mut spec = SidecarSpec::new("server", &bridge.sds_socket());
    spec.inbound_allowed = spire.id("client");
    let server = tokio::task::block_in_place(|| Sidecar::start(&spire, &spec));
    let mut mine = SdsStream::open(&bridge.sds_socket(), request(&["default"]))
        .await
        .unwrap();
    let my_secret = secrets_of(&mine.next(WAIT).await.unwrap()).remove(0);

    tokio::task::block_in_place(|| {
        wait_until_with(WAIT, "/readyz is 200", &[&bridge], || {
            (http_get(health_port, "/readyz").0 == 200).then_some(())
        })
    });
    let (ok, out) = healthcheck(health_port);
    assert!(ok, "healthcheck: {out}");

    // CSI calls: two that succeed, one refused.
    let channel = svid_bridge::csi::connect_uds(&csi_dir.path().join("csi.sock"))
        .await
        .unwrap();
    IdentityClient::new(channel.clone())
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap();
    NodeClient::new(channel.clone())
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap();
    let refused = NodeClient::new(channel)
        .node_publish_volume(NodePublishVolumeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let (status, metrics) = http_get(metrics_port, "/metrics");
    assert_eq!(status, 200);
    let expect = |series: &str, check: &dyn Fn(f64) -> bool| {
        let value = sample(&metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"));
        assert!(check(value), "{series} = {value}\n{metrics}");
    };
    expect("svid_bridge_sds_streams{class=\"default\"}", &|v| v == 2.0);
    expect("svid_bridge_sds_streams{class=\"rootca\"}", &|v| v == 1.0);
    expect("svid_bridge_sds_responses_total{api=\"sotw\"}", &|v| {
        v >= 3.0
    });
    expect("svid_bridge_sds_acks_total", &|v| v >= 2.0);
    expect("svid_bridge_sds_waiting_streams", &|v| v == 0.0);
    expect("svid_bridge_workload_subscriptions", &|v| v == 2.0);
    expect(
        "svid_bridge_upstream_connected{api=\"delegated\",subscription=\"bundles\"}",
        &|v| v == 1.0,
    );
    expect(
        "svid_bridge_upstream_connected{api=\"delegated\",subscription=\"svids\"}",
        &|v| v == 2.0,
    );
    expect("svid_bridge_svid_earliest_expiry_seconds", &|v| {
        v > 3000.0 && v <= 3600.0
    });
    expect(
        "svid_bridge_csi_calls_total{method=\"NodePublishVolume\",code=\"InvalidArgument\"}",
        &|v| v == 1.0,
    );
    expect(
        "svid_bridge_csi_calls_total{method=\"GetPluginInfo\",code=\"OK\"}",
        &|v| v >= 1.0,
    );
    expect(
        "svid_bridge_csi_call_duration_seconds_count{method=\"NodeGetCapabilities\"}",
        &|v| v >= 1.0,
    );
    expect("svid_bridge_csi_volumes_published", &|v| v == 0.0);
    expect(
        "svid_bridge_kubelet_registration{state=\"registered\"}",
        &|v| v == 1.0,
    );
    expect(
        "svid_bridge_kubelet_registration{state=\"awaiting_kubelet\"}",
        &|v| v == 0.0,
    );
    expect(
        &format!(
            "svid_bridge_build_info{{version=\"{}\"}}",
            svid_bridge::VERSION
        ),
        &|v| v == 1.0,
    );
    assert!(!metrics.contains("spiffe://"), "no SPIFFE ID in a label");
    tokio::task::block_in_place(|| promtool_accepts(&metrics));

    // Envoy goes away: its streams leave the gauges.
    drop(server);
    tokio::task::block_in_place(|| {
        wait_until(WAIT, "the Envoy's streams are no longer counted", || {
            let metrics = http_get(metrics_port, "/metrics").1;
            (sample(&metrics, "svid_bridge_sds_streams{class=\"rootca\"}") == Some(0.0))
                .then_some(())
        })
    });
    drop(mine);

    // Logs: every line is JSON; none carries key material, at any level.
    let logs = bridge.logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| !l.starts_with("===== harness"))
        .collect();
    assert!(
        lines.len() > 20,
        "expected a trace-level log, got {} lines",
        lines.len()
    );
    for line in &lines {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            parsed.get("level").is_some() && parsed.get("timestamp").is_some(),
            "{line}"
        );
    }
    let Some(secret::Type::TlsCertificate(tls)) = my_secret.r#type else {
        panic!()
    };
    let Some(Specifier::InlineBytes(key_pem)) = tls.private_key.unwrap().specifier else {
        panic!()
    };
    let key_pem = String::from_utf8(key_pem).unwrap();
    assert!(
        !logs.contains("PRIVATE KEY"),
        "a PEM key header is in the logs"
    );
    for chunk in key_pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(
            !logs.contains(&chunk[..chunk.len().min(24)]),
            "key material is in the logs"
        );
    }
}

/// /readyz stays ready while the agent is away and the cached SVIDs are valid, goes
/// not-ready once they expire, and is ready again when the agent returns;
/// `svid-bridge healthcheck` mirrors it, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_agent_and_the_cached_svids() {
    let mut spire = Spire::start(spire_options_for_bridge("example.org"));
    spire.create_entry(&EntrySpec {
        x509_svid_ttl: Some(20),
        ..EntrySpec::for_path(&spire.id("tester"), &this_test_binary())
    });
    let health_port = free_port();
    let bridge = Bridge::start_with(&spire, &[&format!("--health-addr=127.0.0.1:{health_port}")]);
    let mut stream = SdsStream::open(&bridge.sds_socket(), request(&["default"]))
        .await
        .unwrap();
    stream.next(WAIT).await.unwrap();
    let ready = || http_get(health_port, "/readyz");
    tokio::task::block_in_place(|| {
        wait_until_with(WAIT, "ready", &[&bridge], || {
            (ready().0 == 200).then_some(())
        })
    });

    tokio::task::block_in_place(|| spire.stop_agent());
    let (status, body) = ready();
    assert_eq!(status, 200, "cached SVIDs still valid: {body}");
    let body = tokio::task::block_in_place(|| {
        wait_until_with(
            WAIT,
            "not ready once the cached SVIDs expired",
            &[&bridge],
            || {
                let (status, body) = ready();
                (status == 503).then_some(body)
            },
        )
    });
    assert!(body.contains("SPIRE agent is unreachable"), "{body}");
    let (ok, out) = healthcheck(health_port);
    assert!(
        !ok && out.contains("SPIRE agent is unreachable"),
        "healthcheck mirrors /readyz: {out}"
    );

    tokio::task::block_in_place(|| spire.start_agent());
    tokio::task::block_in_place(|| {
        wait_until_with(
            WAIT,
            "ready again after the agent returned",
            &[&bridge],
            || (ready().0 == 200).then_some(()),
        )
    });
    let (ok, out) = healthcheck(health_port);
    assert!(ok, "{out}");
}
