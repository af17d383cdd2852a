//! PostgreSQL on pod-mode volume files (issue #15), end to end: the bridge publishes a
//! `mode: pod, files: "true"` volume per pod as the kubelet asks (pod fields, the pod's
//! fsGroup as volume_mount_group, PI-39/45); a real PostgreSQL server takes
//! `ssl_cert_file`/`ssl_key_file`/`ssl_ca_file` from its pod's volume, psql clients
//! authenticate with their own volume's files (`cert`, `clientcert=verify-full`, no
//! password), and the bridge's rewrite on rotation is picked up by a reload while an open
//! session goes on. Each test in a private mount namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::mount_ns_test;
use svid_bridge::testing as common;
use svid_bridge::testing::csi as csi_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::bridge::{Bridge, spire_options_for_bridge};
use common::postgres::{ClientTls, Postgres, PostgresOptions};
use common::{EntrySpec, Spire};
use csi_support::{NodeDirs, PodInfo, node_client, pod_mode_request};
use svid_bridge::proto::csi::volume_capability::AccessType;

/// The pods' fsGroup: the kubelet passes it as volume_mount_group (PI-45); PostgreSQL runs
/// with it as a supplementary group, as in a pod with `fsGroup` set.
const FS_GROUP: u32 = 24242;
/// Short enough that the agent rotates within the test (it renews at about half the TTL).
const X509_TTL_SECS: u32 = 30;
const ROTATION_TIMEOUT: Duration = Duration::from_secs(120);

fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A pod's `mode: pod, files: "true"` volume, published as the kubelet would.
async fn publish_files_volume(node: &NodeDirs, ns: &str, sa: &str, bridge: &Bridge) -> PathBuf {
    let uid = format!("{sa}-6f0c1b7e-0000-4000-8000");
    let target = node.target(&uid);
    let name = format!("{sa}-0");
    let pod = PodInfo {
        namespace: ns,
        name: &name,
        uid: &uid,
        service_account: sa,
    };
    let mut request = pod_mode_request(&format!("csi-{uid}"), &target, &pod, &[("files", "true")]);
    if let Some(AccessType::Mount(mount)) = request
        .volume_capability
        .as_mut()
        .and_then(|c| c.access_type.as_mut())
    {
        mount.volume_mount_group = FS_GROUP.to_string();
    }
    node_client(&node.csi_socket())
        .await
        .node_publish_volume(request)
        .await
        .unwrap_or_else(|e| panic!("publish {ns}/{sa}: {e:?}\n{}", bridge.logs()));
    target
}

fn leaf_of(dir: &Path) -> Vec<u8> {
    let pems = pem::parse_many(std::fs::read(dir.join("svid.pem")).unwrap()).unwrap();
    pems[0].contents().to_vec()
}

fn serial(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.tbs_certificate.serial.to_string()
}

/// The certificate the server presents, through `openssl s_client -starttls postgres`.
fn server_leaf(port: u16) -> Vec<u8> {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-starttls",
            "postgres",
            "-showcerts",
            "-connect",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    let pems = pem::parse_many(text.as_bytes()).expect("PEM in s_client output");
    pems.into_iter()
        .next()
        .unwrap_or_else(|| {
            panic!(
                "no certificate from s_client: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .into_contents()
}

mount_ns_test! {
    /// #15: PostgreSQL and psql on pod-mode volume files; a client identity mapped to no
    /// role is refused; rotation is rewritten by the bridge and picked up on reload, and an
    /// open session survives it. The key is root-owned 0440 with the pod's fsGroup, which
    /// PostgreSQL accepts (PI-38).
    async fn postgres_uses_pod_volume_files_and_survives_a_rotation() {
        let spire = block(|| Spire::start(spire_options_for_bridge("example.org")));
        // Server (DNS SAN `localhost`, so psql's verify-full passes on host=localhost), a
        // client mapped to role `app`, and an identity mapped to no role.
        for (ns, sa, dns) in [("db", "postgres", "localhost"), ("apps", "app", "app"), ("apps", "intruder", "intruder")] {
            spire.create_entry(&EntrySpec {
                spiffe_id: spire.id(&format!("ns/{ns}/sa/{sa}")),
                selectors: vec![format!("k8s:ns:{ns}"), format!("k8s:sa:{sa}")],
                dns_names: vec![dns.to_owned()],
                x509_svid_ttl: Some(X509_TTL_SECS),
                ..EntrySpec::default()
            });
        }
        let node = NodeDirs::new();
        // PostgreSQL (not root) reaches its volume through the kubelet's pod directories.
        std::fs::set_permissions(&node.root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut args = node.args();
        args.extend([
            "--disable-kubelet-registration".to_owned(),
            format!("--pod-state-dir={}", node.root.join("state").display()),
            "--pod-fields=trust-kubelet".to_owned(),
            "--kubernetes=off".to_owned(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let bridge = block(|| Bridge::start_with(&spire, &args));
        let db = publish_files_volume(&node, "db", "postgres", &bridge).await;
        let app = publish_files_volume(&node, "apps", "app", &bridge).await;
        let intruder = publish_files_volume(&node, "apps", "intruder", &bridge).await;

        // SPIRE 1.13 puts the entry's first DNS name in the subject: exactly
        // `C=US, O=SPIRE, CN=<first DNS name>`, so PostgreSQL's default `clientname=CN`
        // maps on it.
        let app_leaf = leaf_of(&app);
        let (_, leaf) = x509_parser::parse_x509_certificate(&app_leaf).unwrap();
        assert_eq!(leaf.subject().to_string(), "C=US, O=SPIRE, CN=app");

        let pg = block(|| Postgres::start(&PostgresOptions {
            cert_file: db.join("svid.pem"),
            key_file: db.join("svid_key.pem"),
            ca_file: db.join("svid_bundle.pem"),
            ident: vec![("app".to_owned(), "app".to_owned())],
            clientname: "CN".to_owned(),
            groups: vec![FS_GROUP],
            roles: vec!["app".to_owned()],
        }));
        assert_eq!(serial(&block(|| server_leaf(pg.port()))), serial(&leaf_of(&db)));

        // The mapped identity gets in with its certificate alone.
        let out = block(|| pg.psql(&ClientTls::spiffe_helper(&app), "app", WHOAMI)).unwrap();
        let (user, client_serial, client_dn) = whoami(&out);
        assert_eq!(user, "app");
        assert_eq!(client_serial, serial(&app_leaf));

        // A valid SVID of the same trust domain whose CN maps to no role is refused.
        let refused = block(|| pg.psql(&ClientTls::spiffe_helper(&intruder), "app", "SELECT 1")).unwrap_err();
        assert!(refused.contains("certificate authentication failed for user \"app\""), "{refused}");
        block(|| common::wait_until(Duration::from_secs(10), "the server logs the missing mapping", || {
            pg.log()
                .contains("no match in usermap \"spiffe\" for user \"app\" authenticated as \"intruder\"")
                .then_some(())
        }));

        // A session opened before the rotation.
        let mut session = block(|| pg.session(&ClientTls::spiffe_helper(&app), "app"));
        let old_app_serial = serial(&app_leaf);
        assert_eq!(whoami(&block(|| session.query(WHOAMI)).unwrap()).1, old_app_serial);

        // Rotation: the agent renews both SVIDs and the bridge rewrites both volumes' files
        // (nobody else touches them); PostgreSQL reloads.
        let old_db = leaf_of(&db);
        block(|| common::wait_until(ROTATION_TIMEOUT, "the bridge rewrites both volumes after a rotation", || {
            (leaf_of(&db) != old_db && serial(&leaf_of(&app)) != old_app_serial).then_some(())
        }));
        block(|| pg.reload());
        let new_db_serial = serial(&leaf_of(&db));
        block(|| common::wait_until(Duration::from_secs(10), "the server presents its rotated certificate", || {
            (serial(&server_leaf(pg.port())) == new_db_serial).then_some(())
        }));
        let out = block(|| pg.psql(&ClientTls::spiffe_helper(&app), "app", WHOAMI)).unwrap();
        assert_eq!(whoami(&out), ("app".to_owned(), serial(&leaf_of(&app)), client_dn));
        // The session from before still answers, on its old certificate.
        assert_eq!(whoami(&block(|| session.query(WHOAMI)).unwrap()).1, old_app_serial);
        assert!(block(|| pg.psql(&ClientTls::spiffe_helper(&intruder), "app", "SELECT 1")).is_err());
        for dir in [&db, &app] {
            assert_only_one_set(dir);
        }
    }
}

/// Who the server says the connection is: role, client certificate serial and subject.
const WHOAMI: &str = "SELECT current_user, s.client_serial, s.client_dn \
                      FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()";

fn whoami(out: &str) -> (String, String, String) {
    let fields: Vec<&str> = out.trim().splitn(3, '|').collect();
    assert_eq!(fields.len(), 3, "psql printed {out:?}");
    (
        fields[0].to_owned(),
        fields[1].to_owned(),
        fields[2].to_owned(),
    )
}

/// After rewrites, one `..<timestamp>` set is left beside `..data`.
fn assert_only_one_set(dir: &Path) {
    let sets: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with("..") && name != "..data"
        })
        .collect();
    assert_eq!(sets.len(), 1, "{sets:?}");
}
