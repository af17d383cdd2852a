//! The Workload API service over a real Unix socket, with a fake workload identity
//! (`testing::workload`): real certificates from a test CA, JWTs signed in the test.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::identity::SvidState;
use crate::identity::types::WorkloadSvids;
use crate::proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use crate::testing::workload::{
    FakeWorkloadIdentity, JwtSigner, TestCa, WorkloadClient, client, client_without_header, serve,
    unix_now,
};

const STEP: Duration = Duration::from_secs(10);

struct Served {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    stop: CancellationToken,
}

impl Served {
    async fn client(&self) -> WorkloadClient {
        client(&self.socket).await
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(fake: &Arc<FakeWorkloadIdentity>) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workload.sock");
    let stop = serve(Arc::clone(fake) as _, &socket).await;
    Served {
        _dir: dir,
        socket,
        stop,
    }
}

/// The next message of a stream, failing the test if it takes longer than [`STEP`].
async fn next<T>(stream: &mut tonic::Streaming<T>) -> Result<T, tonic::Status> {
    tokio::time::timeout(STEP, stream.next())
        .await
        .expect("a message within 10 s")
        .expect("the stream did not end")
}

fn sorted<'a>(keys: impl Iterator<Item = &'a String>) -> Vec<&'a str> {
    let mut keys: Vec<&str> = keys.map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

fn cas() -> (TestCa, TestCa, TestCa) {
    (
        TestCa::new("example.org"),
        TestCa::new("fed.test"),
        TestCa::new("unrelated.test"),
    )
}

#[tokio::test]
async fn every_rpc_requires_the_security_header() {
    // PI-54: `workload.spiffe.io: true` or InvalidArgument, on unary and streaming RPCs.
    let (own, fed, other) = cas();
    let fake = FakeWorkloadIdentity::ready(&own, "/db", &[&fed], &[&other]);
    let served = start(&fake).await;
    let mut bare = client_without_header(&served.socket).await;
    let codes = [
        bare.fetch_x509svid(X509svidRequest {})
            .await
            .err()
            .map(|s| s.code()),
        bare.fetch_x509_bundles(X509BundlesRequest {})
            .await
            .err()
            .map(|s| s.code()),
        bare.fetch_jwt_bundles(JwtBundlesRequest {})
            .await
            .err()
            .map(|s| s.code()),
        bare.fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .err()
        .map(|s| s.code()),
        bare.validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "x.y.z".into(),
        })
        .await
        .err()
        .map(|s| s.code()),
    ];
    assert_eq!(codes, [Some(Code::InvalidArgument); 5]);
    assert!(
        fake.jwt_requests.lock().unwrap().is_empty(),
        "refused before reaching the agent"
    );

    let mut with_header = served.client().await;
    let mut stream = with_header
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut stream).await.unwrap().svids.len(), 1);
}

#[tokio::test]
async fn x509_svids_wait_while_pending_then_follow_every_change() {
    let (own, fed, other) = cas();
    let fake = FakeWorkloadIdentity::new(JwtSigner::new("k"));
    let served = start(&fake).await;
    let mut client = served.client().await;
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();

    // Still pending when the stream opened: the first message is the first real answer.
    let default = own.svid("/db");
    let second = own.svid("/db-admin");
    fake.bundles
        .send_replace(Some(crate::testing::workload::bundle_set(&[
            &own, &fed, &other,
        ])));
    fake.set_svids(WorkloadSvids {
        svids: vec![default.clone(), second.clone()],
        federates_with: vec!["fed.test".into()],
    });
    let first = next(&mut stream).await.unwrap();
    let ids: Vec<&str> = first.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/db", "spiffe://example.org/db-admin"],
        "default first"
    );
    let svid = &first.svids[0];
    assert_eq!(svid.x509_svid, default.chain.concat());
    assert_eq!(svid.x509_svid_key, default.key.pkcs8_der(), "PKCS#8 DER");
    assert_eq!(svid.bundle, own.der(), "the SVID's own trust domain's CA");
    assert_eq!(
        first.federated_bundles.keys().collect::<Vec<_>>(),
        ["spiffe://fed.test"],
        "only the trust domains the workload federates with (PI-8, D5)"
    );
    assert_eq!(first.federated_bundles["spiffe://fed.test"], fed.der());

    // A change in an unrelated trust domain reaches nobody; the next message is the rotation.
    let other2 = TestCa::new("unrelated.test");
    fake.bundles
        .send_replace(Some(crate::testing::workload::bundle_set(&[
            &own, &fed, &other2,
        ])));
    let rotated = own.svid("/db");
    fake.set_svids(WorkloadSvids {
        svids: vec![rotated.clone()],
        federates_with: vec!["fed.test".into()],
    });
    let update = next(&mut stream).await.unwrap();
    assert_eq!(update.svids.len(), 1);
    assert_eq!(update.svids[0].x509_svid, rotated.chain.concat());

    // Hints pass through; of two SVIDs with one hint the first is kept (PI-6: the Delegated
    // Identity API does not filter them, the Workload API must).
    let hinted = |path: &str, hint: &str| {
        let mut svid = own.svid(path);
        svid.hint = hint.into();
        svid
    };
    fake.set_svids(WorkloadSvids {
        svids: vec![
            hinted("/db", "internal"),
            hinted("/db-2", "internal"),
            hinted("/db-ext", "external"),
        ],
        federates_with: vec!["fed.test".into()],
    });
    let hinted_update = next(&mut stream).await.unwrap();
    let seen: Vec<(&str, &str)> = hinted_update
        .svids
        .iter()
        .map(|s| (s.spiffe_id.as_str(), s.hint.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("spiffe://example.org/db", "internal"),
            ("spiffe://example.org/db-ext", "external")
        ]
    );

    // No SVIDs any more: SPIRE's PermissionDenied, with who the workload is.
    fake.set_svids(WorkloadSvids::default());
    let err = next(&mut stream).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().starts_with("no identity issued"), "{err:?}");
    assert!(err.message().contains("k8s:ns:fake"), "{err:?}");
    assert!(stream.next().await.is_none(), "the stream ended");
}

#[tokio::test]
async fn a_gone_workload_and_shutdown_end_the_streams_unavailable() {
    let (own, fed, other) = cas();
    let fake = FakeWorkloadIdentity::ready(&own, "/db", &[&fed], &[&other]);
    let served = start(&fake).await;
    let mut client = served.client().await;
    let mut svids = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    next(&mut svids).await.unwrap();
    let mut bundles = client
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    next(&mut bundles).await.unwrap();

    fake.svids.send_replace(SvidState::Gone);
    assert_eq!(
        next(&mut svids).await.unwrap_err().code(),
        Code::Unavailable
    );
    assert_eq!(
        next(&mut bundles).await.unwrap_err().code(),
        Code::Unavailable
    );

    let fake = FakeWorkloadIdentity::ready(&own, "/db", &[], &[]);
    let served = start(&fake).await;
    let mut client = served.client().await;
    let mut svids = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    next(&mut svids).await.unwrap();
    served.stop.cancel();
    let err = next(&mut svids).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

#[tokio::test]
async fn bundles_are_own_and_federated_only_and_follow_changes() {
    let (own, fed, other) = cas();
    let fake = FakeWorkloadIdentity::ready(&own, "/db", &[&fed], &[&other]);
    let served = start(&fake).await;
    let mut client = served.client().await;

    let mut x509 = client
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut x509).await.unwrap();
    assert_eq!(
        sorted(first.bundles.keys()),
        ["spiffe://example.org", "spiffe://fed.test"]
    );
    assert_eq!(first.bundles["spiffe://example.org"], own.der());

    let mut jwt = client
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut jwt).await.unwrap();
    assert_eq!(
        sorted(first.bundles.keys()),
        ["spiffe://example.org", "spiffe://fed.test"]
    );
    assert_eq!(first.bundles["spiffe://fed.test"], fake.signer.jwks());

    // The own trust domain's CA rotates: both streams get it.
    let own2 = TestCa::new("example.org");
    fake.bundles
        .send_replace(Some(crate::testing::workload::bundle_set(&[
            &own2, &fed, &other,
        ])));
    let update = next(&mut x509).await.unwrap();
    assert_eq!(update.bundles["spiffe://example.org"], own2.der());
    let rotated = JwtSigner::new("k2").jwks();
    fake.jwt_bundles.send_modify(|b| {
        let mut map = (**b.as_ref().unwrap()).clone();
        map.insert("example.org".into(), rotated.clone());
        *b = Some(Arc::new(map));
    });
    let update = next(&mut jwt).await.unwrap();
    assert_eq!(update.bundles["spiffe://example.org"], rotated);
}

#[tokio::test]
async fn jwt_svids_need_an_audience_and_honour_the_spiffe_id_filter() {
    let (own, fed, other) = cas();
    let fake = FakeWorkloadIdentity::ready(&own, "/db", &[&fed], &[&other]);
    fake.jwt_identities.lock().unwrap().extend([
        (
            "spiffe://example.org/db-admin".to_owned(),
            "internal".to_owned(),
        ),
        (
            "spiffe://example.org/db-other".to_owned(),
            "internal".to_owned(),
        ),
    ]);
    let served = start(&fake).await;
    let mut client = served.client().await;

    let err = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let all = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = all.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/db", "spiffe://example.org/db-admin"],
        "a repeated hint is dropped (PI-6, D5)"
    );
    assert_eq!(*fake.jwt_requests.lock().unwrap(), [vec!["db".to_owned()]]);

    // PI-9: the agent has no filter; the service applies it.
    let one = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: "spiffe://example.org/db-admin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.svids.len(), 1);
    assert_eq!(one.svids[0].spiffe_id, "spiffe://example.org/db-admin");
    assert_eq!(one.svids[0].hint, "internal");

    let none = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: "spiffe://example.org/somebody-else".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::PermissionDenied);
    assert!(none.message().contains("no identity issued"), "{none:?}");

    fake.jwt_identities.lock().unwrap().clear();
    let agent_says_none = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(agent_says_none.code(), Code::PermissionDenied);
    assert!(
        agent_says_none.message().contains("k8s:sa:fake"),
        "{agent_says_none:?}"
    );
}

#[tokio::test]
async fn validate_checks_signature_audience_expiry_and_trust_domain() {
    let (own, fed, other) = cas();
    let fake = FakeWorkloadIdentity::ready(&own, "/db", &[&fed], &[&other]);
    let served = start(&fake).await;
    let mut client = served.client().await;
    let validate = |audience: &str, svid: String| ValidateJwtsvidRequest {
        audience: audience.into(),
        svid,
    };
    let aud = vec!["db".to_owned()];
    let hour = unix_now() + 3600;

    let token = fake.signer.sign("spiffe://fed.test/client", &aud, hour);
    let ok = client
        .validate_jwtsvid(validate("db", token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://fed.test/client");
    let claims = ok.claims.unwrap().fields;
    assert_eq!(
        claims["sub"].kind,
        Some(prost_types::value::Kind::StringValue(
            "spiffe://fed.test/client".into()
        ))
    );
    assert!(
        claims.contains_key("exp") && claims.contains_key("aud"),
        "{claims:?}"
    );

    let invalid = |label: &'static str, request: ValidateJwtsvidRequest| {
        let mut client = client.clone();
        async move {
            let err = client.validate_jwtsvid(request).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{label}: {err:?}");
            err.message().to_owned()
        }
    };
    invalid("no audience", validate("", token.clone())).await;
    invalid("no token", validate("db", String::new())).await;
    invalid("another audience", validate("web", token.clone())).await;
    invalid(
        "expired",
        validate(
            "db",
            fake.signer
                .sign("spiffe://example.org/x", &aud, unix_now() - 3600),
        ),
    )
    .await;
    let msg = invalid(
        "a trust domain this workload does not federate with",
        validate(
            "db",
            fake.signer.sign("spiffe://unrelated.test/x", &aud, hour),
        ),
    )
    .await;
    assert!(msg.contains("unrelated.test"), "{msg}");
    // Same key ID, another key: the signature does not verify.
    let forger = JwtSigner::new("test-key-1");
    invalid(
        "forged",
        validate("db", forger.sign("spiffe://example.org/db", &aud, hour)),
    )
    .await;
    invalid(
        "not a SPIFFE ID",
        validate(
            "db",
            fake.signer.sign_claims(serde_json::json!({
                "sub": "https://example.org/x", "aud": aud, "exp": hour
            })),
        ),
    )
    .await;
    let msg = invalid("garbage", validate("db", "not-a-jwt".into())).await;
    assert!(
        !msg.contains("not-a-jwt"),
        "the token is never echoed: {msg}"
    );
}
