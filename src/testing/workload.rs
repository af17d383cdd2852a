//! A fake workload for the per-pod Workload API (`crate::workload`): a test CA issuing real
//! X.509-SVIDs, a JWT signer with its JWKS, a scripted [`FakeWorkloadIdentity`], and helpers
//! to serve it on a Unix socket and to call it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::identity::jwt::{JwtBundles, JwtSvid};
use crate::identity::types::{BundleSet, PrivateKey, SharedBundles, Svid, WorkloadSvids};
use crate::identity::{IdentityError, SvidState};
use crate::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use crate::workload::{SECURITY_HEADER, WorkloadApiService, WorkloadIdentity};

/// A trust domain's CA: self-signed, issuing SPIFFE leaf certificates.
pub struct TestCa {
    trust_domain: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(trust_domain: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}").try_into().unwrap(),
        )];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        TestCa {
            trust_domain: trust_domain.to_owned(),
            issuer,
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate, DER.
    pub fn der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    /// A leaf X.509-SVID for `spiffe://<td><path>`, as the agent would hand it over.
    pub fn svid(&self, path: &str) -> Svid {
        let spiffe_id = format!("spiffe://{}{path}", self.trust_domain);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.clone().try_into().unwrap())];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        let leaf = params.signed_by(&key, &self.issuer).unwrap().der().to_vec();
        Svid {
            spiffe_id,
            trust_domain: self.trust_domain.clone(),
            expires_at: crate::identity::source::leaf_not_after(&leaf).unwrap(),
            hint: String::new(),
            chain: vec![leaf],
            key: PrivateKey::from_pkcs8_der(key.serialize_der()),
        }
    }
}

/// An X.509 bundle set holding the given CAs.
pub fn bundle_set(cas: &[&TestCa]) -> SharedBundles {
    Arc::new(BundleSet {
        bundles: cas
            .iter()
            .map(|ca| (ca.trust_domain.clone(), vec![ca.der()]))
            .collect(),
    })
}

/// An ES256 JWT-SVID signer (SPIRE's default key type) with its key ID.
pub struct JwtSigner {
    kid: String,
    key: KeyPair,
}

impl JwtSigner {
    pub fn new(kid: &str) -> JwtSigner {
        JwtSigner {
            kid: kid.to_owned(),
            key: KeyPair::generate().unwrap(),
        }
    }

    fn encoding_key(&self) -> EncodingKey {
        EncodingKey::from_ec_der(&self.key.serialize_der())
    }

    /// The public key as a standard JWKS document, as SPIRE sends JWT bundles (PI-10).
    pub fn jwks(&self) -> Vec<u8> {
        let mut jwk = Jwk::from_encoding_key(&self.encoding_key(), Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(self.kid.clone());
        jwk.common.key_algorithm = None;
        serde_json::to_vec(&JwkSet { keys: vec![jwk] }).unwrap()
    }

    /// A JWT-SVID for `spiffe_id` and `audience`, expiring at `expires_at` (Unix seconds).
    pub fn sign(&self, spiffe_id: &str, audience: &[String], expires_at: i64) -> String {
        self.sign_claims(serde_json::json!({
            "sub": spiffe_id,
            "aud": audience,
            "exp": expires_at,
            "iat": unix_now(),
        }))
    }

    /// A JWT with arbitrary claims, signed with this key.
    pub fn sign_claims(&self, claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, &claims, &self.encoding_key()).unwrap()
    }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A workload whose data the test scripts: send on its channels to change what it has.
/// Its JWT-SVIDs are signed on each fetch, one per `(SPIFFE ID, hint)` in `jwt_identities`.
pub struct FakeWorkloadIdentity {
    pub svids: watch::Sender<SvidState>,
    pub bundles: watch::Sender<Option<SharedBundles>>,
    pub jwt_bundles: watch::Sender<Option<JwtBundles>>,
    pub signer: JwtSigner,
    pub jwt_identities: Mutex<Vec<(String, String)>>,
    /// Audiences of every FetchJWTSVIDs the fake "agent" got.
    pub jwt_requests: Mutex<Vec<Vec<String>>>,
}

impl FakeWorkloadIdentity {
    /// Nothing known yet: SVIDs `Pending`, no bundles.
    pub fn new(signer: JwtSigner) -> Arc<FakeWorkloadIdentity> {
        Arc::new(FakeWorkloadIdentity {
            svids: watch::channel(SvidState::Pending).0,
            bundles: watch::channel(None).0,
            jwt_bundles: watch::channel(None).0,
            signer,
            jwt_identities: Mutex::new(Vec::new()),
            jwt_requests: Mutex::new(Vec::new()),
        })
    }

    /// A workload `spiffe://<ca td>/<path>` federating with `federated`, with the X.509 and
    /// JWT bundles of `ca`, every CA in `federated` and `unrelated` (a trust domain the agent
    /// knows but this workload does not federate with).
    pub fn ready(
        ca: &TestCa,
        path: &str,
        federated: &[&TestCa],
        unrelated: &[&TestCa],
    ) -> Arc<Self> {
        let fake = Self::new(JwtSigner::new("test-key-1"));
        let svid = ca.svid(path);
        fake.jwt_identities
            .lock()
            .unwrap()
            .push((svid.spiffe_id.clone(), String::new()));
        fake.set_svids(WorkloadSvids {
            svids: vec![svid],
            federates_with: federated.iter().map(|c| c.trust_domain.clone()).collect(),
        });
        let all: Vec<&TestCa> = [ca]
            .into_iter()
            .chain(federated.iter().copied())
            .chain(unrelated.iter().copied())
            .collect();
        fake.bundles.send_replace(Some(bundle_set(&all)));
        let jwks = fake.signer.jwks();
        fake.jwt_bundles.send_replace(Some(Arc::new(
            all.iter()
                .map(|c| (c.trust_domain.clone(), jwks.clone()))
                .collect(),
        )));
        fake
    }

    pub fn set_svids(&self, svids: WorkloadSvids) {
        self.svids.send_replace(SvidState::Ready(Arc::new(svids)));
    }
}

impl WorkloadIdentity for FakeWorkloadIdentity {
    fn svids(&self) -> watch::Receiver<SvidState> {
        self.svids.subscribe()
    }

    fn bundles(&self) -> watch::Receiver<Option<SharedBundles>> {
        self.bundles.subscribe()
    }

    fn jwt_bundles(&self) -> watch::Receiver<Option<JwtBundles>> {
        self.jwt_bundles.subscribe()
    }

    fn fetch_jwt_svids(
        &self,
        audience: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<JwtSvid>, IdentityError>> {
        self.jwt_requests.lock().unwrap().push(audience.clone());
        let identities = self.jwt_identities.lock().unwrap().clone();
        let expires_at = unix_now() + 300;
        let svids: Vec<JwtSvid> = identities
            .into_iter()
            .map(|(spiffe_id, hint)| JwtSvid {
                token: self.signer.sign(&spiffe_id, &audience, expires_at),
                spiffe_id,
                expires_at,
                issued_at: unix_now(),
                hint,
            })
            .collect();
        Box::pin(async move {
            // The agent's answers (PI-9).
            if audience.is_empty() {
                return Err(IdentityError::Agent {
                    code: tonic::Code::InvalidArgument,
                    message: "audience must be specified".into(),
                });
            }
            if svids.is_empty() {
                return Err(IdentityError::Agent {
                    code: tonic::Code::PermissionDenied,
                    message: "no identity issued".into(),
                });
            }
            Ok(svids)
        })
    }

    fn describe(&self) -> String {
        "selectors k8s:ns:fake, k8s:sa:fake".into()
    }
}

/// Serves `identity`'s Workload API on a new socket at `socket` until the returned token
/// is cancelled.
pub async fn serve(identity: Arc<dyn WorkloadIdentity>, socket: &Path) -> CancellationToken {
    let shutdown = CancellationToken::new();
    let listener = crate::uds::bind(socket, crate::uds::SocketAccess::Owner).unwrap();
    let service = WorkloadApiService::new(identity, shutdown.clone()).into_server();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(crate::uds::incoming(listener), stop.cancelled())
            .await
            .unwrap();
    });
    shutdown
}

pub type HeaderFn = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;
pub type WorkloadClient = SpiffeWorkloadApiClient<InterceptedService<Channel, HeaderFn>>;

/// A Workload API client that sends the `workload.spiffe.io` header, as every client must.
pub async fn client(socket: &Path) -> WorkloadClient {
    SpiffeWorkloadApiClient::with_interceptor(
        channel(socket).await,
        add_security_header as HeaderFn,
    )
}

/// A Workload API client that does not send it.
pub async fn client_without_header(socket: &Path) -> SpiffeWorkloadApiClient<Channel> {
    SpiffeWorkloadApiClient::new(channel(socket).await)
}

async fn channel(socket: &Path) -> Channel {
    crate::uds::connect(socket).await.unwrap()
}

fn add_security_header(
    mut request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    request.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(request)
}
