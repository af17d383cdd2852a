//! The per-pod Workload API (`svid_bridge::workload`) against a client nobody here wrote:
//! the real `spire-agent api` CLI (go-spiffe's Workload API client), served by the service
//! with a fake workload identity (test CA certificates, JWTs signed by the test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use svid_bridge::proto::workload::X509svidRequest;
use svid_bridge::testing as common;
use svid_bridge::testing::workload::{
    FakeWorkloadIdentity, TestCa, client, client_without_header, serve,
};

const WORKLOAD: &str = "spiffe://example.org/ns/apps/sa/db";

/// `spire-agent api <args> -socketPath <socket>`, off the runtime's threads.
async fn spire_agent_api(socket: &Path, args: &[&str]) -> Output {
    let bin = common::peer("spire-agent");
    let mut command = Command::new(bin);
    command.arg("api").args(args).arg("-socketPath").arg(socket);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "{}", text(output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The first PEM certificate of `path`, DER.
fn first_pem_der(path: &Path) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    pem::parse_many(pem).unwrap().remove(0).into_contents()
}

async fn fetch_x509(socket: &Path, out: &Path) -> Output {
    let out = out.to_str().unwrap();
    spire_agent_api(socket, &["fetch", "x509", "-timeout", "5s", "-write", out]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_agent_cli_fetches_and_validates_through_the_workload_api() {
    let own = TestCa::new("example.org");
    let federated = TestCa::new("fed.test");
    let unrelated = TestCa::new("unrelated.test");
    let fake = FakeWorkloadIdentity::ready(&own, "/ns/apps/sa/db", &[&federated], &[&unrelated]);
    let dir = common::temp_dir("workload-api");
    let sockets = common::SocketDir::new(dir.path(), "workload.sock");
    let socket: PathBuf = sockets.path().join("workload.sock");
    let stop = serve(Arc::clone(&fake) as _, &socket).await;

    // X.509: the SVID, its trust domain's bundle, and only the federated trust domain.
    let out = dir.path().join("x509");
    std::fs::create_dir_all(&out).unwrap();
    let fetched = fetch_x509(&socket, &out).await;
    let printed = stdout(&fetched);
    assert!(printed.contains(WORKLOAD), "{}", text(&fetched));
    assert!(
        printed.contains("for trust domain spiffe://fed.test"),
        "{}",
        text(&fetched)
    );
    assert!(!printed.contains("unrelated.test"), "{}", text(&fetched));
    assert_eq!(
        common::spire::leaf_spiffe_id(&out.join("svid.0.pem")),
        WORKLOAD
    );
    assert_eq!(first_pem_der(&out.join("bundle.0.pem")), own.der());

    // JWT: a token for the audience, and the JWT bundles the workload may see.
    let fetched = spire_agent_api(&socket, &["fetch", "jwt", "-audience", "a"]).await;
    let printed = stdout(&fetched);
    assert!(
        printed.contains(&format!("token({WORKLOAD})")),
        "{}",
        text(&fetched)
    );
    assert!(
        printed.contains("bundle(spiffe://example.org)"),
        "{}",
        text(&fetched)
    );
    assert!(
        printed.contains("bundle(spiffe://fed.test)"),
        "{}",
        text(&fetched)
    );
    assert!(!printed.contains("unrelated.test"), "{}", text(&fetched));
    assert_eq!(*fake.jwt_requests.lock().unwrap(), [vec!["a".to_owned()]]);
    let token = printed
        .lines()
        .skip_while(|line| !line.starts_with("token("))
        .nth(1)
        .map(str::trim)
        .filter(|t| t.split('.').count() == 3)
        .unwrap_or_else(|| panic!("no token after token(...): {}", text(&fetched)))
        .to_owned();

    // Validation: the CLI asks the server; it says whom the token names.
    let validated = spire_agent_api(
        &socket,
        &["validate", "jwt", "-audience", "a", "-svid", &token],
    )
    .await;
    let printed = stdout(&validated);
    assert!(printed.contains("SVID is valid"), "{}", text(&validated));
    assert!(printed.contains(WORKLOAD), "{}", text(&validated));
    let refused = spire_agent_api(
        &socket,
        &["validate", "jwt", "-audience", "b", "-svid", &token],
    )
    .await;
    assert!(!refused.status.success(), "{}", text(&refused));

    // PI-54: a request without `workload.spiffe.io: true` is refused, and nothing else broke.
    let err = client_without_header(&socket)
        .await
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let mut good = client(&socket).await;
    let mut stream = good
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.svids[0].spiffe_id, WORKLOAD);
    let again = dir.path().join("x509-again");
    std::fs::create_dir_all(&again).unwrap();
    let fetched = fetch_x509(&socket, &again).await;
    assert!(stdout(&fetched).contains(WORKLOAD), "{}", text(&fetched));

    stop.cancel();
}

/// The agent side of the JWT profile, against a real SPIRE agent's Delegated Identity API:
/// JWT-SVIDs by selectors (PI-9), the JWT bundle stream (PI-10), and a SPIRE-signed token
/// checked by the service's own validator with the JWKS the agent streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_jwt_svids_and_bundles_through_the_delegated_identity_api() {
    use spire_api::pb::spire::api::types::Selector;
    use svid_bridge::identity::DelegatedSource;
    use svid_bridge::identity::IdentityError;
    use svid_bridge::identity::jwt::{fetch_jwt_svids, follow_jwt_bundles};
    use svid_bridge::identity::supervisor::ExponentialBackoff;
    use svid_bridge::workload::jwt_validate::validate_jwt_svid;

    let td = "example.org";
    let delegate = format!("spiffe://{td}/delegate-tester");
    let spire = common::Spire::start(common::SpireOptions {
        authorized_delegates: vec![delegate],
        ..common::SpireOptions::trust_domain(td)
    });
    spire.register_test_binary("delegate-tester");
    let pod = spire.id("ns/apps/sa/db");
    spire.create_entry(&common::EntrySpec {
        spiffe_id: pod.clone(),
        selectors: vec!["k8s:ns:apps".into(), "k8s:sa:db".into()],
        ..common::EntrySpec::default()
    });
    let agent = DelegatedSource::new(spire.admin_socket_path().to_path_buf());
    let selectors = [
        ("k8s", "ns:apps"),
        ("k8s", "sa:db"),
        ("k8s", "pod-uid:1234"),
    ]
    .map(|(t, v)| Selector {
        r#type: t.into(),
        value: v.into(),
    });
    let audience = vec!["db-clients".to_owned()];

    // The entries reach the agent within a sync or two; until then: PermissionDenied.
    let svids = common::wait_until_async(
        Duration::from_secs(30),
        "the agent mints a JWT-SVID for the pod's selectors",
        || async {
            match fetch_jwt_svids(&agent, &selectors, &audience).await {
                Ok(svids) if !svids.is_empty() => Some(svids),
                _ => None,
            }
        },
    )
    .await;
    assert_eq!(svids.len(), 1, "{svids:?}");
    assert_eq!(svids[0].spiffe_id, pod);
    assert!(svids[0].expires_at > svids[0].issued_at, "{svids:?}");
    assert!(
        !format!("{svids:?}").contains(&svids[0].token),
        "Debug redacts"
    );

    let nobody = [Selector {
        r#type: "k8s".into(),
        value: "ns:nobody".into(),
    }];
    match fetch_jwt_svids(&agent, &nobody, &audience).await {
        Err(IdentityError::Agent { code, message }) => {
            assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
            assert!(message.contains("no identity issued"), "{message}");
        }
        other => panic!("expected PermissionDenied, got {other:?}"),
    }

    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut bundles = follow_jwt_bundles(
        &agent,
        Arc::new(ExponentialBackoff::default()),
        shutdown.clone(),
    );
    let bundles = tokio::time::timeout(Duration::from_secs(10), bundles.wait_for(Option::is_some))
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(bundles.keys().collect::<Vec<_>>(), [td], "keyed by name");

    let validated = validate_jwt_svid(&svids[0].token, "db-clients", &bundles).unwrap();
    assert_eq!(validated.spiffe_id, pod);
    assert!(validate_jwt_svid(&svids[0].token, "someone-else", &bundles).is_err());
    shutdown.cancel();
}
