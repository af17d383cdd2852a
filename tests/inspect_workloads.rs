//! The per-workload report (issue #16, item 4): `/debug/workloads` on the bridge's health
//! address and `svid-bridge inspect --pid/--pod`, against a real SPIRE agent and a real
//! Envoy, plus this test process as a second workload that waits for a name and NACKs.
//! The report's serials must be Envoy's `/certs` serials, and no key may appear in it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::testing as common;

use std::process::Command;
use std::time::Duration;

use common::bridge::{
    Bridge, SdsStream, Sidecar, SidecarSpec, request, secrets_of, spire_options_for_bridge,
};
use common::{EntrySpec, Spire, free_port, this_test_binary, wait_until_with};
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn report(health: &str) -> Option<Value> {
    let body = svid_bridge::telemetry::health::get_body(health, "/debug/workloads").ok()?;
    serde_json::from_str(&body).ok()
}

fn workload_of(report: &Value, pid: u32) -> Option<Value> {
    report["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["pid"] == pid)
        .cloned()
}

fn inspect(health: &str, args: &[&str]) -> std::process::Output {
    Command::new(common::bridge_binary())
        .arg("inspect")
        .arg(format!("--health-addr={health}"))
        .args(args)
        .env_remove("SVID_BRIDGE_HEALTH_ADDR")
        .output()
        .unwrap()
}

/// The PEM private key of the `default` SVID this process gets, to look for in the report.
fn private_key_pem(
    response: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> String {
    let secret = secrets_of(response)
        .into_iter()
        .find(|s| s.name == "default")
        .expect("default served");
    let Some(secret::Type::TlsCertificate(tls)) = secret.r#type else {
        panic!("default is a certificate")
    };
    let Some(Specifier::InlineBytes(key)) = tls.private_key.unwrap().specifier else {
        panic!("inline key")
    };
    String::from_utf8(key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_shows_each_workloads_svids_streams_waits_and_nacks_and_never_a_key() {
    let spire = Spire::start(spire_options_for_bridge("example.org"));
    let me = this_test_binary();
    let tester = spire.id("tester");
    spire.create_entry(&EntrySpec::for_path(&tester, &me));
    let health = format!("127.0.0.1:{}", free_port());
    let bridge = Bridge::start_with(&spire, &[&format!("--health-addr={health}")]);
    let sidecar = Sidecar::start(&spire, &SidecarSpec::new("server", &bridge.sds_socket()));

    // This process: one stream that gets `default` and then NACKs it, one that waits for
    // an SVID the agent will never issue it.
    let socket = bridge.sds_socket();
    let mut served = SdsStream::open(&socket, request(&["default"]))
        .await
        .unwrap();
    let response = served.next(WAIT).await.unwrap();
    let key_pem = private_key_pem(&response);
    let mut nack = request(&["default"]);
    nack.node = None;
    nack.response_nonce = response.nonce.clone();
    nack.error_detail = Some(RpcStatus {
        code: 13,
        message: "test rejection: certificate does not fit".into(),
        details: vec![],
    });
    served.tx.send(nack).await.unwrap();
    let never = spire.id("never-issued");
    let _waiting = SdsStream::open(&socket, request(&[never.as_str()]))
        .await
        .unwrap();

    let me_pid = std::process::id();
    let envoy_pid = sidecar.envoy.pid();
    let report = tokio::task::block_in_place(|| {
        wait_until_with(
            WAIT,
            "the report lists both workloads as they are",
            &[&bridge, &sidecar],
            || {
                let r = report(&health)?;
                let mine = workload_of(&r, me_pid)?;
                let streams = mine["streams"].as_array()?;
                let waits = streams
                    .iter()
                    .any(|s| s["waiting"][0]["name"] == never.as_str());
                let nacked = streams
                    .iter()
                    .any(|s| s["last_nack"] == "test rejection: certificate does not fit");
                let envoy = workload_of(&r, envoy_pid)?;
                let envoy_streams = envoy["streams"].as_array()?.len();
                (waits && nacked && envoy_streams >= 2).then_some(r)
            },
        )
    });
    let text = report.to_string();

    // Outside Kubernetes (`--kubernetes auto`, the default): said once, at INFO, and
    // everything else works in PIDs.
    assert_eq!(report["pod_view"], false);
    assert_eq!(report["pods_on_node"], Value::Null);
    let logs = bridge.logs();
    let said: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("no in-cluster Kubernetes configuration"))
        .collect();
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("INFO"), "{}", said[0]);

    // Never a key: neither the PEM label nor any part of the key's encoding.
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    let key_body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for chunk in key_body.as_bytes().chunks(24) {
        let chunk = std::str::from_utf8(chunk).unwrap();
        assert!(
            !text.contains(chunk),
            "key material {chunk:?} in the report"
        );
    }

    // The Envoy: its SVID as Envoy itself holds it, its streams by name.
    let envoy = workload_of(&report, envoy_pid).unwrap();
    assert_eq!(envoy["state"], "ready");
    assert_eq!(envoy["pod"], Value::Null, "no pod view outside Kubernetes");
    assert_eq!(envoy["svids"][0]["spiffe_id"], sidecar.spiffe_id.as_str());
    assert_eq!(envoy["trust_domains"], serde_json::json!(["example.org"]));
    let serial = envoy["svids"][0]["serial"].as_str().unwrap().to_owned();
    assert!(!serial.starts_with("00"), "{serial}");
    let envoy_serials = sidecar.cert_serials();
    assert!(
        envoy_serials.contains(&serial),
        "report {serial} vs Envoy /certs {envoy_serials:?}"
    );
    let expires = envoy["svids"][0]["expires"].as_str().unwrap();
    assert!(expires.len() == 20 && expires.ends_with('Z'), "{expires}");
    assert!(
        envoy["svids"][0]["expires_in"]
            .as_str()
            .unwrap()
            .starts_with("in ")
    );
    let mut names: Vec<String> = envoy["streams"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["names"].as_array().cloned().unwrap_or_default())
        .map(|n| n.as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(
        names,
        ["ROOTCA", "default"],
        "Envoy asks one stream per name"
    );

    // This process: the wait names what it waits for and why.
    let mine = workload_of(&report, me_pid).unwrap();
    let wait = mine["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|s| s["waiting"].as_array().and_then(|w| w.first().cloned()))
        .unwrap();
    assert_eq!(
        wait["reason"],
        "the workload holds no SVID with this SPIFFE ID"
    );
    assert!(wait["since"].as_str().unwrap().ends_with('Z'));

    // The CLI prints the same, found by PID; by pod it says why it cannot.
    let out = tokio::task::block_in_place(|| inspect(&health, &["--pid", &envoy_pid.to_string()]));
    let stdout = common::proc::success_stdout("inspect --pid", &out);
    assert!(
        stdout.starts_with(&format!("pid {envoy_pid}  (pod unknown)\n")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "  svid {}  serial {serial}  expires {expires} (in ",
            sidecar.spiffe_id
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("  stream sotw: default\n") && stdout.contains("  stream sotw: ROOTCA\n"),
        "{stdout}"
    );
    assert!(!stdout.contains("PRIVATE KEY"));

    let out = tokio::task::block_in_place(|| inspect(&health, &["--pid", &me_pid.to_string()]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("    waiting for {never} for ")),
        "{stdout}"
    );
    assert!(
        stdout.contains("    last NACK: test rejection: certificate does not fit"),
        "{stdout}"
    );

    let out = tokio::task::block_in_place(|| inspect(&health, &["--pod", "apps/envoy-a"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no pod view") && stderr.contains("--pid"),
        "{stderr}"
    );

    // A wrong address is named plainly. (That the report is served on loopback addresses
    // only is a unit test of the router, src/telemetry/health.rs.)
    let out = tokio::task::block_in_place(|| inspect("127.0.0.1:1", &["--pid", "1"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read the bridge's workload report at 127.0.0.1:1/debug/workloads"),
        "{stderr}"
    );
}
