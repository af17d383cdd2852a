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
