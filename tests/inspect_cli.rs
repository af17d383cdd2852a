//! `svid-bridge inspect` as an operator uses it against a running bridge: what it prints for
//! names that are served, refused or still waiting, how it says the bridge is not there, and
//! that its serials and expiry read as Envoy's `/certs` and `openssl x509` show them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::testing as common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::bridge::{Bridge, Sidecar, SidecarSpec, bridge_spiffe_id, spire_options_for_bridge};
use common::{Spire, wait_until_with};

/// Runs `inspect` with the bridge's own binary copy: the agent attests it as the bridge, so
/// `default` is the bridge's own SVID (as in the chart's NOTES.txt check).
fn inspect(bridge: &Bridge, socket: &Path, args: &[&str]) -> Output {
    Command::new(bridge.binary())
        .arg("inspect")
        .arg(format!("--sds-socket={}", socket.display()))
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One name the server refuses and one it is still waiting for do not hide the name that
/// was served: each gets its line, the refused one quotes the server's reason, and the
/// command fails saying how many were not served.
#[test]
fn every_name_gets_its_own_answer_and_a_refusal_is_not_called_unreachable() {
    let spire = Spire::start(spire_options_for_bridge("example.org"));
    let bridge = Bridge::start(&spire);
    // The agent hands out the bridge's own SVID a moment after its entry exists.
    wait_until_with(
        Duration::from_secs(30),
        "inspect gets the bridge's own SVID",
        &[&bridge],
        || {
            inspect(&bridge, &bridge.sds_socket(), &["--timeout=2s", "default"])
                .status
                .success()
                .then_some(())
        },
    );
    let out = inspect(
        &bridge,
        &bridge.sds_socket(),
        &[
            "--timeout=2s",
            "default",
            "file-cert:/x",
            "spiffe://example.org/not-this-workload",
        ],
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("default  (tls_certificate")
            && stdout.contains(&bridge_spiffe_id("example.org")),
        "the served name is described: {stdout}"
    );
    let refused = stdout
        .lines()
        .find(|l| l.starts_with("file-cert:/x  NOT SERVED: the server refused it: "))
        .unwrap_or_else(|| panic!("the refusal is reported as one: {stdout}"));
    assert!(refused.contains("file-cert"), "{refused}");
    assert!(
        stdout.contains("spiffe://example.org/not-this-workload  NOT SERVED: no answer within 2s"),
        "{stdout}"
    );
    assert!(!stdout.contains("cannot reach") && !stderr.contains("cannot reach"));
    assert!(
        stderr.contains("2 of the names asked for were not served"),
        "{stderr}"
    );
}

/// No socket at the path: one sentence that names the path, not tonic's error chain.
#[test]
fn a_missing_socket_is_named_plainly() {
    let dir = common::temp_dir("inspect-missing");
    let socket = dir.path().join("socket");
    let out = Command::new(common::bridge_binary())
        .arg("inspect")
        .arg(format!("--sds-socket={}", socket.display()))
        .arg("default")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        stderr.trim(),
        format!(
            "svid-bridge: no SDS socket at {}: is the bridge running, and is this its \
             --sds-socket?",
            socket.display()
        )
    );
    assert!(out.stdout.is_empty());
}

/// Serials print as Envoy's `/certs` and `openssl x509 -serial` print them (no DER padding
/// byte for a serial whose top bit is set, which is about half of SPIRE's random serials),
/// and expiry is a date with a human duration.
#[test]
fn serials_and_expiry_read_as_envoy_and_openssl_show_them() {
    let spire = Spire::start(spire_options_for_bridge("example.org"));
    let bridge = Bridge::start(&spire);
    let sidecar = Sidecar::start(&spire, &SidecarSpec::new("server", &bridge.sds_socket()));

    let out = inspect(&bridge, &bridge.sds_socket(), &["ROOTCA"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let line = stdout
        .lines()
        .find(|l| l.contains("trust domain example.org: CA"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let serial = line
        .split("serial ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap();

    // openssl, a reader nobody here wrote, on the same CA certificate.
    let bundle = common::temp_dir("inspect-bundle");
    let pem = bundle.path().join("bundle.pem");
    std::fs::write(&pem, spire.bundle_pem()).unwrap();
    let openssl = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(&pem)
        .output()
        .unwrap();
    let openssl_serial = text(&openssl.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_ascii_lowercase();
    assert_eq!(serial, openssl_serial, "{line}");

    // Envoy's own view of the CA it validates with.
    let envoy_ca_serials = wait_until_with(
        Duration::from_secs(30),
        "Envoy lists its CA under /certs",
        &[&bridge, &sidecar.envoy],
        || {
            let certs: serde_json::Value =
                serde_json::from_str(&sidecar.envoy.admin_get("/certs")).ok()?;
            let serials: Vec<String> = certs["certificates"]
                .as_array()?
                .iter()
                .flat_map(|c| c["ca_cert"].as_array().cloned().unwrap_or_default())
                .filter_map(|c| c["serial_number"].as_str().map(str::to_owned))
                .collect();
            (!serials.is_empty()).then_some(serials)
        },
    );
    assert!(
        envoy_ca_serials.iter().any(|s| s == serial),
        "inspect {serial} vs Envoy {envoy_ca_serials:?}"
    );

    // "expires 2026-12-05T17:27:09Z (in 23h 59m)"
    let expires = line.split("expires ").nth(1).unwrap();
    let (date, remaining) = expires.split_once(' ').unwrap();
    assert!(
        date.len() == 20 && date.ends_with('Z') && date.as_bytes()[10] == b'T',
        "{date}"
    );
    assert!(
        remaining.starts_with("(in ") && remaining.ends_with(')'),
        "{remaining}"
    );
}
