//! Pod files for a real consumer (issue #15): SVIDs from the SPIRE agent's Delegated
//! Identity API, rendered in spiffe-helper's layout (PI-34/35) and written by `AtomicDir`
//! (PI-31) root-owned with a group (PI-38, PI-45), used as is by a real PostgreSQL server
//! (`ssl_cert_file`, `ssl_key_file`, `ssl_ca_file`) and by psql clients authenticating with
//! their certificate (`cert` method, no password), across a certificate rotation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::testing as common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use svid_bridge::identity::source::SvidStream;
use svid_bridge::identity::{
    BundleSet, DelegatedSource, ProcRoot, Source, Workload, WorkloadSvids,
};
use svid_bridge::pod::files::{AtomicDir, Layout, render};

use common::postgres::{ClientTls, Postgres, PostgresOptions};
use common::{EntrySpec, Proc, Spire, SpireOptions};

/// The group the files are written for, as a pod's fsGroup would be (PI-45); PostgreSQL
/// runs with it as a supplementary group.
const FILES_GID: u32 = 24242;
/// Short enough that the agent rotates within the test (it renews at about half the TTL).
const X509_TTL_SECS: u32 = 30;
const ROTATION_TIMEOUT: Duration = Duration::from_secs(120);

/// One workload: a `sleep` under its own uid (selector `unix:uid:<uid>`), its upstream
/// subscription, what it holds now, and its files directory.
struct Identity {
    spiffe_id: String,
    _process: Proc,
    svids: SvidStream,
    current: WorkloadSvids,
    files: AtomicDir,
}

impl Identity {
    fn leaf(&self) -> Vec<u8> {
        self.current.svids[0].chain[0].clone()
    }

    fn tls(&self) -> ClientTls {
        ClientTls::spiffe_helper(self.files.dir())
    }

    fn write(&self, bundles: &BundleSet) {
        let files = render(Layout::SpiffeHelper, &self.current, bundles, &[], None).unwrap();
        assert_eq!(self.files.write(&files).unwrap(), 3);
    }
}

fn serial(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.tbs_certificate.serial.to_string()
}

fn validity(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let v = cert.validity();
    format!("{}..{}", v.not_before, v.not_after)
}

/// Waits on `stream` until the workload holds an SVID for `spiffe_id` whose leaf is not
/// `not_leaf` (the first SVID when `None`).
async fn next_svids(
    stream: &mut SvidStream,
    spiffe_id: &str,
    not_leaf: Option<&[u8]>,
    timeout: Duration,
) -> WorkloadSvids {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let update = tokio::time::timeout(left, stream.next())
            .await
            .unwrap_or_else(|_| panic!("no new SVID for {spiffe_id} within {timeout:?}"))
            .unwrap_or_else(|| panic!("the agent ended the stream of {spiffe_id}"))
            .unwrap_or_else(|e| panic!("the agent's stream of {spiffe_id}: {e}"));
        let Some(svid) = update.svids.first() else {
            continue; // the entry has not reached the agent yet (PI-7)
        };
        assert_eq!(svid.spiffe_id, spiffe_id);
        if not_leaf != Some(svid.chain[0].as_slice()) {
            return update;
        }
    }
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

#[test]
fn postgres_uses_pod_files_and_survives_a_rotation() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let delegate = "spiffe://example.org/pod-files-test".to_owned();
    let spire = Spire::start(SpireOptions {
        authorized_delegates: vec![delegate],
        ..SpireOptions::default()
    });
    // This test process is the delegate (the agent attests it by its binary's path).
    spire.register_test_binary("pod-files-test");

    let tmp = common::temp_dir("pod-files");
    // PostgreSQL (not root) must reach the files directories below.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let _guard = rt.enter();
    let source = DelegatedSource::new(spire.admin_socket_path().to_path_buf());

    // Server (DNS SAN `localhost`, so psql's verify-full passes on host=localhost), a
    // client mapped to role `app`, and an identity mapped to no role.
    let mut identities = Vec::new();
    for (name, uid, dns) in [
        ("db", 40101, "localhost"),
        ("app", 40102, "app"),
        ("intruder", 40103, "intruder"),
    ] {
        let spiffe_id = spire.id(name);
        spire.create_entry(&EntrySpec {
            spiffe_id: spiffe_id.clone(),
            selectors: vec![format!("unix:uid:{uid}")],
            dns_names: vec![dns.to_owned()],
            x509_svid_ttl: Some(X509_TTL_SECS),
            ..EntrySpec::default()
        });
        let mut sleep = Command::new("sleep");
        sleep.arg("600").uid(uid).gid(uid);
        let process = Proc::spawn(&format!("workload-{name}"), sleep, tmp.path());
        let key = ProcRoot::default()
            .process(i32::try_from(process.pid()).unwrap())
            .expect("the workload runs");
        // The agent refuses the delegate until the test binary's entry has synced.
        let mut svids = common::wait_until(
            common::spire::SYNC_TIMEOUT,
            "the agent accepts this test as a delegate",
            || {
                rt.block_on(source.subscribe_svids(Workload::Process(key)))
                    .ok()
            },
        );
        let current = rt.block_on(next_svids(
            &mut svids,
            &spiffe_id,
            None,
            common::spire::SYNC_TIMEOUT,
        ));
        identities.push(Identity {
            spiffe_id,
            _process: process,
            svids,
            current,
            files: AtomicDir::new(tmp.path().join(name), Some(FILES_GID)),
        });
    }
    let mut bundle_stream = rt.block_on(source.subscribe_bundles()).unwrap();
    let bundles = rt.block_on(bundle_stream.next()).unwrap().unwrap();
    for identity in &identities {
        identity.write(&bundles);
    }
    let [db, app, intruder] = &mut identities[..] else {
        unreachable!()
    };

    // SPIRE 1.13 puts the entry's first DNS name in the subject's CN: the subject is
    // exactly `C=US, O=SPIRE, CN=<first DNS name>`, so PostgreSQL's default
    // `clientname=CN` maps on the DNS name (no `clientname=DN` needed).
    let (_, leaf) = x509_parser::parse_x509_certificate(&app.current.svids[0].chain[0]).unwrap();
    let subject = leaf.subject().to_string();
    let cn: Vec<&str> = leaf
        .subject()
        .iter_common_name()
        .map(|cn| cn.as_str().unwrap())
        .collect();
    assert_eq!(subject, "C=US, O=SPIRE, CN=app");
    assert_eq!(cn, ["app"], "subject of the app's X509-SVID: {subject}");
    eprintln!("app's X509-SVID subject: {subject}");

    let pg = Postgres::start(&PostgresOptions {
        cert_file: db.files.dir().join("svid.pem"),
        key_file: db.files.dir().join("svid_key.pem"),
        ca_file: db.files.dir().join("svid_bundle.pem"),
        ident: vec![("app".to_owned(), "app".to_owned())],
        clientname: "CN".to_owned(),
        groups: vec![FILES_GID],
        roles: vec!["app".to_owned()],
    });
    assert_eq!(serial(&server_leaf(pg.port())), serial(&db.leaf()));

    // The mapped identity gets in with its certificate alone.
    let out = pg.psql(&app.tls(), "app", WHOAMI).unwrap();
    let (user, client_serial, client_dn) = whoami(&out);
    assert_eq!(user, "app");
    assert_eq!(client_serial, serial(&app.leaf()));
    eprintln!("PostgreSQL's client_dn of the app: {client_dn}");

    // A valid SVID of the same trust domain whose CN maps to no role is refused.
    let refused = pg.psql(&intruder.tls(), "app", "SELECT 1").unwrap_err();
    assert!(
        refused.contains("certificate authentication failed for user \"app\""),
        "{refused}"
    );
    common::wait_until(
        Duration::from_secs(10),
        "the server logs the missing mapping",
        || {
            pg.log()
                .contains(
                    "no match in usermap \"spiffe\" for user \"app\" authenticated as \"intruder\"",
                )
                .then_some(())
        },
    );

    // A session opened before the rotation.
    let mut session = pg.session(&app.tls(), "app");
    let old_app_serial = serial(&app.leaf());
    assert_eq!(whoami(&session.query(WHOAMI).unwrap()).1, old_app_serial);

    // Rotation: the agent renews both SVIDs; the files are rewritten and PostgreSQL reloads.
    let rotation_start = Instant::now();
    for identity in [&mut *db, &mut *app] {
        let old = identity.leaf();
        identity.current = rt.block_on(next_svids(
            &mut identity.svids,
            &identity.spiffe_id,
            Some(&old),
            ROTATION_TIMEOUT,
        ));
        assert_ne!(serial(&old), serial(&identity.leaf()));
        eprintln!(
            "{} rotated after {:?}: valid {} -> {}",
            identity.spiffe_id,
            rotation_start.elapsed(),
            validity(&old),
            validity(&identity.leaf())
        );
        identity.write(&bundles);
    }
    pg.reload();
    let new_db_serial = serial(&db.leaf());
    common::wait_until(
        Duration::from_secs(10),
        "the server presents its rotated certificate",
        || (serial(&server_leaf(pg.port())) == new_db_serial).then_some(()),
    );
    let out = pg.psql(&app.tls(), "app", WHOAMI).unwrap();
    assert_eq!(
        whoami(&out),
        ("app".to_owned(), serial(&app.leaf()), client_dn)
    );
    // The session from before still answers, on its old certificate.
    let out = session.query(WHOAMI).unwrap();
    assert_eq!(whoami(&out).1, old_app_serial);
    assert!(pg.psql(&intruder.tls(), "app", "SELECT 1").is_err());
    for identity in [&*db, &*app] {
        assert_only_one_set(identity.files.dir());
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
