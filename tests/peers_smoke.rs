//! Smoke tests of the real-peer test bed (src/testing): SPIRE issues SVIDs to workloads
//! told apart by binary path, two SPIRE deployments federate, and Envoy 1.40 runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::testing as common;

use std::time::Duration;

use common::{EntrySpec, Envoy, EnvoyOptions, Spire, SpireOptions, peer, workload_binary};

#[test]
fn spire_issues_svids_by_workload_path_and_survives_restarts() {
    let mut spire = Spire::start(SpireOptions::default());
    assert_eq!(spire.trust_domain(), "example.org");

    let workload_a = spire.workload_binary("workload-a");
    let workload_b = spire.workload_binary("workload-b");
    let id_a = spire.id("workload-a");
    assert_eq!(id_a, "spiffe://example.org/workload-a");
    let entry = spire.create_entry(&EntrySpec {
        x509_svid_ttl: Some(600),
        hint: Some("smoke".to_string()),
        ..EntrySpec::for_path(&id_a, &workload_a)
    });
    assert!(!entry.is_empty());

    let fetched = spire.wait_for_svid(&workload_a, &id_a);
    assert_eq!(fetched.spiffe_ids, vec![id_a.clone()]);
    assert_eq!(
        fetched.ttl(0),
        Duration::from_secs(600),
        "the entry's x509SVIDTTL"
    );
    assert!(fetched.dir.join("svid.0.key").exists());
    assert!(fetched.stdout.contains(&id_a), "stdout: {}", fetched.stdout);
    // The same program under another path is another workload: no entry, no SVID.
    let denied = spire.fetch_x509(&workload_b);
    assert!(denied.is_err(), "workload-b got {denied:?}");

    // The agent restarts from its data dir (stored SVID, no new join token)...
    spire.stop_agent();
    spire.start_agent();
    spire.wait_for_svid(&workload_a, &id_a);
    spire.kill_agent();
    spire.start_agent();
    spire.wait_for_svid(&workload_a, &id_a);
    // ...and the server from its datastore and keys.
    spire.stop_server();
    spire.start_server();
    spire.wait_for_svid(&workload_a, &id_a);

    // A deleted entry stops being served.
    spire.delete_entry(&entry);
    common::wait_until(
        common::spire::SYNC_TIMEOUT,
        "workload-a loses its SVID after the entry is deleted",
        || spire.fetch_x509(&workload_a).is_err().then_some(()),
    );
}

#[test]
fn federated_entry_gets_the_other_trust_domains_bundle() {
    // Also exercises the server TTL options and the agent's authorized_delegates.
    let a = Spire::start(SpireOptions {
        default_x509_svid_ttl: Some(Duration::from_secs(300)),
        ca_ttl: Some(Duration::from_secs(3600)),
        authorized_delegates: vec!["spiffe://example.org/bridge".to_string()],
        ..SpireOptions::default()
    });
    let b = Spire::start(SpireOptions::trust_domain("other.org"));
    a.federate_with(&b);
    let workload = a.workload_binary("workload-fed");
    let id = a.id("workload-fed");
    a.create_entry(&EntrySpec {
        federates_with: vec![b.trust_domain_id()],
        ..EntrySpec::for_path(&id, &workload)
    });

    let fetched = a.wait_for_svid(&workload, &id);
    assert_eq!(
        fetched.ttl(0),
        Duration::from_secs(300),
        "default_x509_svid_ttl"
    );
    assert_eq!(
        fetched.federated_trust_domains,
        vec!["other.org".to_string()]
    );
    let federated = std::fs::read(fetched.dir.join("federated_bundle.0.0.pem")).unwrap();
    let federated: Vec<Vec<u8>> = pem::parse_many(federated)
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect();
    let b_roots: Vec<Vec<u8>> = pem::parse_many(b.bundle_pem())
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect();
    assert!(!b_roots.is_empty());
    assert_eq!(
        federated, b_roots,
        "the federated bundle is other.org's roots"
    );
}

#[test]
fn envoy_1_40_starts_and_answers_on_its_admin_port() {
    // A distinct path for the Envoy binary, as tests that give Envoys identities use.
    let binary = workload_binary("envoy-smoke", &peer("envoy"));
    let envoy = Envoy::start_with(
        "node: {id: smoke, cluster: smoke}\nstatic_resources: {}\n",
        EnvoyOptions {
            binary: Some(binary.clone()),
            ..EnvoyOptions::default()
        },
    );
    assert_eq!(envoy.admin_get("/ready").trim(), "LIVE");
    let info: serde_json::Value = serde_json::from_str(&envoy.admin_get("/server_info")).unwrap();
    let version = info["version"].as_str().unwrap();
    assert!(version.contains("/1.40."), "version {version}");
    assert_eq!(info["state"].as_str(), Some("LIVE"));
    assert_eq!(envoy.stat("server.live"), Some(1));
    assert_eq!(envoy.stat("no.such.stat"), None);
    let exe = std::fs::read_link(format!("/proc/{}/exe", envoy.pid())).unwrap();
    assert_eq!(exe, binary, "/proc/<pid>/exe is the hard-linked ELF binary");
}

#[test]
fn harness_keeps_socket_paths_short_and_names_missing_peers() {
    let short = common::temp_dir("sock");
    let dir = common::SocketDir::new(short.path(), "public/api.sock");
    assert_eq!(dir.path(), short.path());

    let long = short.path().join("x".repeat(120));
    let dir = common::SocketDir::new(&long, "public/api.sock");
    assert!(dir.path().starts_with("/tmp"), "{}", dir.path().display());
    assert!(dir.path().join("public/api.sock").as_os_str().len() <= common::MAX_SOCKET_PATH);

    let missing = std::panic::catch_unwind(|| common::peer("no-such-peer")).unwrap_err();
    let msg = missing.downcast_ref::<String>().unwrap();
    assert!(msg.starts_with("peer no-such-peer is missing at "), "{msg}");
    assert!(msg.ends_with(": run `make peers`"), "{msg}");
}
