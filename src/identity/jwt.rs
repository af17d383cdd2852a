//! JWT-SVIDs and JWT bundles from the agent's Delegated Identity API (PI-1, PI-9, PI-10).
//!
//! JWT-SVIDs are minted per request (the agent caches them by SPIFFE ID and audience, PI-9),
//! so they are a unary call, not a subscription. JWT bundles are node-wide and followed like
//! the X.509 bundles: one supervised stream, the last good set kept across reconnects.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::ControlFlow;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use spire_api::pb::spire::api::agent::delegatedidentity::v1::{
    FetchJwtsviDsRequest, FetchJwtsviDsResponse, SubscribeToJwtBundlesRequest,
    SubscribeToJwtBundlesResponse,
};
use spire_api::pb::spire::api::types::{Jwtsvid, Selector};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use super::IdentityError;
use super::source::DelegatedSource;
use super::supervisor::{self, Backoff, SupervisorMetrics, Upstream, UpstreamStream};
use super::types::trust_domain_name;

/// One JWT-SVID as the agent minted it. Its `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSvid {
    /// `spiffe://<trust-domain>/<path>`.
    pub spiffe_id: String,
    /// The JWS compact serialization.
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds.
    pub issued_at: i64,
    pub hint: String,
}

impl fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("token", &"redacted")
            .field("expires_at", &self.expires_at)
            .field("issued_at", &self.issued_at)
            .field("hint", &self.hint)
            .finish()
    }
}

/// Trust domain name (no `spiffe://`) → that trust domain's JWKS JSON, bytes as the agent
/// sent them (PI-10: standard JWKS, JWT-SVID keys only).
pub type JwtBundles = Arc<BTreeMap<String, Vec<u8>>>;

const FETCH_JWT_SVIDS: &str =
    "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/FetchJWTSVIDs";
const SUBSCRIBE_TO_JWT_BUNDLES: &str =
    "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/SubscribeToJWTBundles";

async fn ready(agent: &mut Grpc<Channel>) -> Result<(), IdentityError> {
    agent.ready().await.map_err(|err| IdentityError::Agent {
        code: tonic::Code::Unavailable,
        message: format!("agent connection not ready: {err}"),
    })
}

/// JWT-SVIDs for `audience`, one per registration entry matching `selectors` (PI-9). The
/// agent answers `PermissionDenied` "no identity issued" when none matches and
/// `InvalidArgument` for an empty audience; both come back as [`IdentityError::Agent`].
pub async fn fetch_jwt_svids(
    agent: &DelegatedSource,
    selectors: &[Selector],
    audience: &[String],
) -> Result<Vec<JwtSvid>, IdentityError> {
    let mut grpc = agent.agent();
    ready(&mut grpc).await?;
    let request = FetchJwtsviDsRequest {
        audience: audience.to_vec(),
        selectors: selectors.to_vec(),
        pid: 0,
    };
    let response: FetchJwtsviDsResponse = grpc
        .unary(
            Request::new(request),
            PathAndQuery::from_static(FETCH_JWT_SVIDS),
            crate::uds::SmallBufferCodec::new(),
        )
        .await
        .map_err(IdentityError::from_status)?
        .into_inner();
    response.svids.into_iter().map(jwt_svid_from).collect()
}

fn jwt_svid_from(svid: Jwtsvid) -> Result<JwtSvid, IdentityError> {
    let id = svid
        .id
        .ok_or(IdentityError::Malformed("JWTSVID without id"))?;
    if svid.token.is_empty() {
        return Err(IdentityError::Malformed("JWTSVID without token"));
    }
    Ok(JwtSvid {
        spiffe_id: format!("spiffe://{}{}", id.trust_domain, id.path),
        token: svid.token,
        expires_at: svid.expires_at,
        issued_at: svid.issued_at,
        hint: svid.hint,
    })
}

/// Follows the agent's `SubscribeToJWTBundles` (PI-10) until `shutdown`: `None` until the
/// first answer, then the latest set; while the agent is away, the last good set stays.
/// Spawns the follower on the current tokio runtime.
pub fn follow_jwt_bundles(
    agent: &DelegatedSource,
    backoff: Arc<dyn Backoff>,
    shutdown: CancellationToken,
) -> watch::Receiver<Option<JwtBundles>> {
    let (state, bundles) = watch::channel(None);
    let upstream = FollowJwtBundles {
        agent: agent.agent(),
    };
    tokio::spawn(async move {
        supervisor::supervise(
            upstream,
            &state,
            &*backoff,
            &SupervisorMetrics::default(),
            "delegated",
            &shutdown,
        )
        .await;
    });
    bundles
}

struct FollowJwtBundles {
    agent: Grpc<Channel>,
}

impl Upstream for FollowJwtBundles {
    type Item = BTreeMap<String, Vec<u8>>;
    type State = Option<JwtBundles>;
    const WHAT: &'static str = "JWT bundle";

    fn connect(&mut self) -> BoxFuture<'static, Result<UpstreamStream<Self::Item>, IdentityError>> {
        let mut agent = self.agent.clone();
        Box::pin(async move {
            ready(&mut agent).await?;
            let stream = agent
                .server_streaming(
                    Request::new(SubscribeToJwtBundlesRequest {}),
                    PathAndQuery::from_static(SUBSCRIBE_TO_JWT_BUNDLES),
                    crate::uds::SmallBufferCodec::<
                        SubscribeToJwtBundlesRequest,
                        SubscribeToJwtBundlesResponse,
                    >::new(),
                )
                .await
                .map_err(IdentityError::from_status)?
                .into_inner();
            Ok(stream
                .map_err(IdentityError::from_status)
                .map_ok(|response| jwt_bundles_from(response.bundles))
                .boxed())
        })
    }

    fn check(
        &mut self,
        item: Self::Item,
        _state: &watch::Sender<Self::State>,
    ) -> ControlFlow<(), Option<Self::Item>> {
        ControlFlow::Continue(Some(item))
    }

    fn publish(&mut self, bundles: Self::Item, state: &watch::Sender<Self::State>) {
        state.send_if_modified(|current| {
            if current.as_deref() == Some(&bundles) {
                return false;
            }
            *current = Some(Arc::new(bundles));
            true
        });
    }
}

/// Keys by trust domain name: the agent keys by trust domain ID (PI-10).
fn jwt_bundles_from(
    bundles: impl IntoIterator<Item = (String, impl AsRef<[u8]>)>,
) -> BTreeMap<String, Vec<u8>> {
    bundles
        .into_iter()
        .map(|(td, jwks)| (trust_domain_name(&td).to_owned(), jwks.as_ref().to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use spire_api::pb::spire::api::types::Spiffeid;

    #[test]
    fn jwt_svid_debug_redacts_the_token() {
        let svid = JwtSvid {
            spiffe_id: "spiffe://example.org/a".into(),
            token: "eyJhbGciOiJFUzI1NiJ9.secret.sig".into(),
            expires_at: 2,
            issued_at: 1,
            hint: String::new(),
        };
        let shown = format!("{svid:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("spiffe://example.org/a"), "{shown}");
    }

    #[test]
    fn agent_jwt_svids_and_bundles_convert() {
        let svid = jwt_svid_from(Jwtsvid {
            token: "t.o.k".into(),
            id: Some(Spiffeid {
                trust_domain: "example.org".into(),
                path: "/ns/a".into(),
            }),
            expires_at: 20,
            issued_at: 10,
            hint: "internal".into(),
        })
        .unwrap();
        assert_eq!(svid.spiffe_id, "spiffe://example.org/ns/a");
        assert_eq!((svid.issued_at, svid.expires_at), (10, 20));
        assert!(jwt_svid_from(Jwtsvid::default()).is_err());

        let bundles = jwt_bundles_from([
            ("spiffe://example.org".to_owned(), b"{\"keys\":[]}".to_vec()),
            ("other.org".to_owned(), b"{}".to_vec()),
        ]);
        assert_eq!(
            bundles.keys().collect::<Vec<_>>(),
            ["example.org", "other.org"]
        );
    }
}
