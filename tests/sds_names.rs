//! SDS names and bad input, asked from this test process, which is itself a registered
//! workload (selector `unix:path:<this test binary>`), against a real SPIRE agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::testing as common;

use common::this_test_binary;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use common::bridge::{
    Bridge, SdsStream, request, sds_client, secrets_of, spire_options_for_bridge,
    start_bridge_for_tester,
};
use common::{EntrySpec, Spire, SpireOptions};
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    Secret, SpiffeCertValidatorConfig, secret,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;

const WAIT: Duration = Duration::from_secs(30);

fn trust_domains(secret: &Secret) -> Vec<String> {
    let Some(secret::Type::ValidationContext(ctx)) = &secret.r#type else {
        panic!("{} is not a validation context", secret.name)
    };
    let typed = ctx
        .custom_validator_config
        .as_ref()
        .expect("SPIFFE validator")
        .typed_config
        .as_ref()
        .unwrap();
    SpiffeCertValidatorConfig::decode(typed.value.as_slice())
        .unwrap()
        .trust_domains
        .into_iter()
        .map(|t| t.name)
        .collect()
}

fn leaf_spiffe_id(secret: &Secret) -> String {
    let Some(secret::Type::TlsCertificate(tls)) = &secret.r#type else {
        panic!("{} is not a certificate", secret.name)
    };
    let Some(Specifier::InlineBytes(pem)) = &tls.certificate_chain.as_ref().unwrap().specifier
    else {
        panic!()
    };
    let Some(Specifier::InlineBytes(key)) = &tls.private_key.as_ref().unwrap().specifier else {
        panic!()
    };
    assert!(
        String::from_utf8_lossy(key).starts_with("-----BEGIN PRIVATE KEY-----"),
        "C-1: PKCS#8 PEM key"
    );
    let first = pem::parse_many(pem).unwrap().remove(0);
    common::spire::spiffe_id_of_der(first.contents())
}

/// Reads responses (ACKing each, as Envoy does) until one satisfies `done`.
async fn until(
    stream: &mut SdsStream,
    names: &[&str],
    done: impl Fn(&BTreeMap<String, Secret>) -> bool,
) -> BTreeMap<String, Secret> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let response = stream.next(left).await.unwrap();
        assert_eq!(response.type_url, common::bridge::SECRET_TYPE_URL, "E16");
        stream.ack(names, &response).await;
        let secrets: BTreeMap<String, Secret> = secrets_of(&response)
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        if done(&secrets) {
            return secrets;
        }
    }
}

struct Federated {
    a: Spire,
    _b: Spire,
    bridge: Bridge,
}

/// example.org with the bridge, federated with other.org; this process registered twice
/// in example.org (two SVIDs), federating with other.org.
fn federated_setup() -> Federated {
    let a = Spire::start(spire_options_for_bridge("example.org"));
    let b = Spire::start(SpireOptions {
        start_agent: false,
        ..SpireOptions::trust_domain("other.org")
    });
    a.federate_with(&b);
    let me = this_test_binary();
    for name in ["tester", "tester-2"] {
        a.create_entry(&EntrySpec {
            federates_with: vec!["other.org".into()],
            ..EntrySpec::for_path(&a.id(name), &me)
        });
    }
    let bridge = Bridge::start(&a);
    Federated { a, _b: b, bridge }
}

/// `default`, SPIFFE IDs, `ROOTCA`, `ALL`, `spiffe://<td>` for the own and a federated
/// trust domain, all on ONE stream (B-9 and B-10 fixed: SPIRE fails such requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_name_form_resolves_on_one_stream() {
    let setup = federated_setup();
    let (tester, tester2) = (setup.a.id("tester"), setup.a.id("tester-2"));
    let names = [
        "default",
        tester.as_str(),
        tester2.as_str(),
        "ROOTCA",
        "ALL",
        "spiffe://example.org",
        "spiffe://other.org",
    ];
    let mut stream = SdsStream::open(&setup.bridge.sds_socket(), request(&names))
        .await
        .unwrap();
    let secrets = until(&mut stream, &names, |s| s.len() == names.len()).await;

    for name in names {
        assert_eq!(
            secrets[name].name, name,
            "E19: Secret.name is the requested name"
        );
    }
    assert_eq!(leaf_spiffe_id(&secrets[tester.as_str()]), tester);
    assert_eq!(leaf_spiffe_id(&secrets[tester2.as_str()]), tester2);
    let default_id = leaf_spiffe_id(&secrets["default"]);
    assert!(
        default_id == tester || default_id == tester2,
        "default is one of the workload's SVIDs: {default_id}"
    );
    assert_eq!(
        trust_domains(&secrets["ROOTCA"]),
        ["example.org"],
        "B-3: own trust domain only"
    );
    assert_eq!(
        trust_domains(&secrets["ALL"]),
        ["example.org", "other.org"],
        "B-4: sorted and complete"
    );
    assert_eq!(
        trust_domains(&secrets["spiffe://example.org"]),
        ["example.org"]
    );
    assert_eq!(
        trust_domains(&secrets["spiffe://other.org"]),
        ["other.org"],
        "B-5: federated bundle"
    );
}

/// No names: everything under canonical names (B-1), each once (B-12 fixed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_and_fetch_and_trusted_ca_mode() {
    let setup = federated_setup();
    let (tester, tester2) = (setup.a.id("tester"), setup.a.id("tester-2"));
    let socket = setup.bridge.sds_socket();
    let mut stream = SdsStream::open(&socket, request(&[])).await.unwrap();
    let all = until(&mut stream, &[], |s| s.len() == 4).await;
    let names: Vec<&str> = all.keys().map(String::as_str).collect();
    let mut expected = vec![
        "spiffe://example.org",
        "spiffe://other.org",
        tester.as_str(),
        tester2.as_str(),
    ];
    expected.sort_unstable();
    assert_eq!(names, expected);

    // FetchSecrets (unary), for tools.
    let fetched = sds_client(&socket)
        .fetch_secrets(request(&["default", "ROOTCA"]))
        .await
        .unwrap()
        .into_inner();
    let fetched: Vec<String> = secrets_of(&fetched).into_iter().map(|s| s.name).collect();
    assert_eq!(fetched, ["ROOTCA", "default"]);

    // B-14: node metadata turns the SPIFFE validator off for this Envoy → trusted_ca.
    let mut first = request(&["ALL"]);
    let fields = [(
        "disable_spiffe_cert_validation".to_owned(),
        Value {
            kind: Some(Kind::StringValue("true".into())),
        },
    )];
    first.node.as_mut().unwrap().metadata = Some(Struct {
        fields: fields.into_iter().collect(),
    });
    let mut legacy = SdsStream::open(&socket, first).await.unwrap();
    let response = legacy.next(WAIT).await.unwrap();
    let secret = secrets_of(&response).remove(0);
    let Some(secret::Type::ValidationContext(ctx)) = secret.r#type else {
        panic!()
    };
    let Some(Specifier::InlineBytes(pem)) = ctx.trusted_ca.unwrap().specifier else {
        panic!("trusted_ca expected")
    };
    // C-5 fixed: SPIRE answers ALL without the validator with Internal; we send all roots.
    assert_eq!(
        pem::parse_many(&pem).unwrap().len(),
        2,
        "own and federated roots"
    );
}

/// Names that can never resolve fail at once with InvalidArgument and say why; the server
/// keeps serving everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_breaks_nothing() {
    let (spire, bridge) = start_bridge_for_tester();
    let socket = bridge.sds_socket();

    let huge = "x".repeat(64 * 1024);
    let many: Vec<String> = (0..10_000)
        .map(|i| format!("spiffe://example.org/w{i}"))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "Istio file cert",
            vec!["file-cert:/etc/certs/cert.pem~/etc/certs/key.pem"],
            "Istio 1.26",
        ),
        ("Istio system roots", vec!["file-root:system"], "Istio 1.26"),
        (
            "external SDS",
            vec!["sds://gateway"],
            "external SDS provider",
        ),
        (
            "malformed SPIFFE ID",
            vec!["spiffe://Example.org/a"],
            "malformed SPIFFE ID",
        ),
        ("64 KiB name", vec![huge.as_str()], "longer than the limit"),
        ("10,000 names", many, "the limit is 100"),
    ];
    for (what, names, expected) in cases {
        let mut stream = SdsStream::open(&socket, request(&names)).await.unwrap();
        let status = stream.next(WAIT).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
        assert!(
            status.message().contains(expected),
            "{what}: {}",
            status.message()
        );
        assert!(
            status.message().len() < 1024,
            "{what}: the error quotes a prefix only ({} bytes)",
            status.message().len()
        );
    }

    let mut wrong_type = request(&["default"]);
    wrong_type.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
    let status = SdsStream::open(&socket, wrong_type)
        .await
        .unwrap()
        .next(WAIT)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("unsupported type_url"));

    // An HTTP/1.1 client on the socket (an Envoy cluster without http2_protocol_options,
    // E3): refused, and nothing else is disturbed.
    let mut h1 = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    h1.set_read_timeout(Some(WAIT)).unwrap();
    h1.write_all(b"POST /envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = h1.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "HTTP/1.1 must not be served"
    );

    // After all that, a well-formed stream is served.
    let mut good = SdsStream::open(&socket, request(&["default"]))
        .await
        .unwrap();
    let response = good.next(WAIT).await.unwrap();
    assert_eq!(
        leaf_spiffe_id(&secrets_of(&response)[0]),
        spire.id("tester")
    );
}

/// E13: a client that NACKs every response gets no resend loop: the next message after a
/// NACK is the answer to its next real request, not the rejected content again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_is_never_answered_with_the_same_content() {
    let (_spire, bridge) = start_bridge_for_tester();
    let mut stream = SdsStream::open(&bridge.sds_socket(), request(&["default"]))
        .await
        .unwrap();
    let mut previous_nonce = String::new();
    for round in 0..5 {
        let names: &[&str] = if round % 2 == 0 {
            &["default"]
        } else {
            &["default", "ROOTCA"]
        };
        let response = stream.next(WAIT).await.unwrap();
        assert_ne!(response.nonce, previous_nonce);
        let got: Vec<String> = secrets_of(&response).into_iter().map(|s| s.name).collect();
        assert_eq!(
            got.len(),
            names.len(),
            "round {round}: the answer to the request, not a resend: {got:?}"
        );
        previous_nonce = response.nonce.clone();
        let mut nack = request(names);
        nack.node = None;
        nack.response_nonce = response.nonce.clone();
        nack.error_detail = Some(RpcStatus {
            code: 13,
            message: format!("rejected round {round}"),
            details: vec![],
        });
        stream.tx.send(nack).await.unwrap();
        // The next real request: switch names, which must be answered.
        let next_names: &[&str] = if round % 2 == 0 {
            &["default", "ROOTCA"]
        } else {
            &["default"]
        };
        let mut change = request(next_names);
        change.node = None;
        change.response_nonce = response.nonce.clone();
        stream.tx.send(change).await.unwrap();
    }
    // A WARN with Envoy's text, not an ERROR: the rejection is the workload's to act on.
    let logs = bridge.logs();
    let nack = logs
        .lines()
        .find(|l| l.contains("NACK") && l.contains("rejected round 0"))
        .unwrap_or_else(|| panic!("the NACK is logged with Envoy's error text:\n{logs}"));
    assert!(nack.contains(" WARN "), "{nack}");
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("NACK") && l.contains("ERROR")),
        "{logs}"
    );
}

/// SIGTERM: open streams end (Envoy reconnects to the next instance), the process exits 0,
/// and every socket it created is gone, registration first (R-5, and "Kubelet plugin
/// registration" in docs/behaviours.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_and_removes_every_socket() {
    let spire = Spire::start(spire_options_for_bridge("example.org"));
    spire.register_test_binary("tester");
    let kubelet = common::temp_dir("kubelet");
    std::fs::create_dir_all(kubelet.path().join("pods")).unwrap();
    let csi = common::SocketDir::new(kubelet.path(), "plugins_registry/csi.spiffe.io-reg.sock");
    let csi_socket = csi.path().join("csi.sock");
    let registration = kubelet
        .path()
        .join("plugins_registry/csi.spiffe.io-reg.sock");
    let mut bridge = Bridge::start_with(
        &spire,
        &[
            &format!("--csi-socket={}", csi_socket.display()),
            &format!("--kubelet-root={}", kubelet.path().display()),
            "--node-id=node-1",
        ],
    );
    let sds_socket = bridge.sds_socket();
    let mut stream = SdsStream::open(&sds_socket, request(&["default"]))
        .await
        .unwrap();
    stream.next(WAIT).await.unwrap();
    tokio::task::block_in_place(|| {
        common::wait_until(WAIT, "the registration socket appears", || {
            registration.exists().then_some(())
        })
    });

    let status = tokio::task::block_in_place(|| bridge.stop()).expect("the bridge exited");
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    let ended = stream.next(WAIT).await.unwrap_err();
    assert!(
        matches!(ended.code(), tonic::Code::Unavailable | tonic::Code::Ok),
        "the stream ends cleanly: {ended:?}"
    );
    for socket in [&sds_socket, &csi_socket, &registration] {
        assert!(!socket.exists(), "{} is left behind", socket.display());
    }
}

/// Workload API mode (a sidecar or VM next to one Envoy): every caller gets the bridge's
/// own SVID, fetched from the agent's public Workload API socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_mode_serves_the_bridges_own_identity() {
    let spire = Spire::start(spire_options_for_bridge("example.org"));
    let bridge = Bridge::start_with(&spire, &["--identity-source=workload-api"]);
    let names = ["default", "ROOTCA"];
    let mut stream = SdsStream::open(&bridge.sds_socket(), request(&names))
        .await
        .unwrap();
    let secrets = until(&mut stream, &names, |s| s.len() == 2).await;
    assert_eq!(
        leaf_spiffe_id(&secrets["default"]),
        common::bridge::bridge_spiffe_id("example.org"),
        "this unregistered test process gets the bridge's identity"
    );
    assert_eq!(trust_domains(&secrets["ROOTCA"]), ["example.org"]);
    // The caller is still named by its PID in the logs (it used to be pid=0 for everyone).
    let logs = bridge.logs();
    assert!(
        logs.contains(&format!("pid={}", std::process::id())),
        "{logs}"
    );
    assert!(!logs.contains("pid=0"), "{logs}");
}
