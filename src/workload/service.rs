//! The `SpiffeWorkloadAPI` gRPC service for one workload.
//!
//! Streams are built from `watch` channels: each RPC composes a response from the current
//! SVID state and bundles, sends it when it differs from the last one sent, and waits for the
//! next change. Trust domains are keyed by trust domain ID (`spiffe://td`) on the wire, as the
//! spec says, and by name inside the bridge.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use super::WorkloadIdentity;
use super::jwt_validate::{claims_to_struct, validate_jwt_svid};
use crate::identity::jwt::JwtBundles;
use crate::identity::types::{SharedBundles, WorkloadSvids, trust_domain_of};
use crate::identity::{IdentityError, SvidState};
use crate::proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use crate::proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};

/// The metadata every Workload API request must carry, with value `true` (PI-54): it tells a
/// browser-forged or proxied request from a real workload's.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// The header check every RPC goes through.
pub type HeaderCheck = fn(Request<()>) -> Result<Request<()>, Status>;

/// What [`WorkloadApiService::into_server`] returns: the generated server behind the header
/// check, ready for `tonic::transport::Server::add_service`.
pub type WorkloadApiServer =
    InterceptedService<SpiffeWorkloadApiServer<WorkloadApiService>, HeaderCheck>;

type ResponseStream<R> = BoxStream<'static, Result<R, Status>>;

/// The Workload API of one workload.
#[derive(Clone)]
pub struct WorkloadApiService {
    identity: Arc<dyn WorkloadIdentity>,
    shutdown: CancellationToken,
}

impl WorkloadApiService {
    /// Streams end with `Unavailable` when `shutdown` is cancelled (clients retry, PI-54).
    pub fn new(identity: Arc<dyn WorkloadIdentity>, shutdown: CancellationToken) -> Self {
        Self { identity, shutdown }
    }

    /// The tonic service to add to a Router (with the header check applied to every RPC).
    pub fn into_server(self) -> WorkloadApiServer {
        SpiffeWorkloadApiServer::with_interceptor(self, require_security_header as HeaderCheck)
    }

    /// SPIRE's wording and code for a workload no entry matches (PI-9, PI-11), with what the
    /// operator needs to find out why.
    fn no_identity(&self) -> Status {
        no_identity(&*self.identity)
    }

    /// The workload's SVIDs once the agent answered: `Gone` and "no SVIDs" are errors.
    async fn ready_svids(&self) -> Result<Arc<WorkloadSvids>, Status> {
        let mut svids = self.identity.svids();
        let state = wait_for(&mut svids, &self.shutdown, |s| *s != SvidState::Pending).await?;
        match state {
            SvidState::Ready(svids) if !svids.svids.is_empty() => Ok(svids),
            SvidState::Ready(_) => Err(self.no_identity()),
            SvidState::Gone | SvidState::Pending => Err(gone()),
        }
    }
}

/// PI-54: `InvalidArgument` without `workload.spiffe.io: true` (SPIRE's message).
fn require_security_header(request: Request<()>) -> Result<Request<()>, Status> {
    match request.metadata().get(SECURITY_HEADER) {
        Some(value) if value == "true" => Ok(request),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

fn no_identity(identity: &dyn WorkloadIdentity) -> Status {
    Status::permission_denied(format!(
        "no identity issued: no registration entry matches {}",
        identity.describe()
    ))
}

fn gone() -> Status {
    Status::unavailable("the workload is gone; no identity is served for it any more")
}

fn shutting_down() -> Status {
    Status::unavailable("svid-bridge is shutting down")
}

/// Waits until `rx` holds a value `ready` accepts, or shutdown.
async fn wait_for<T: Clone>(
    rx: &mut watch::Receiver<T>,
    shutdown: &CancellationToken,
    ready: impl FnMut(&T) -> bool,
) -> Result<T, Status> {
    tokio::select! {
        value = rx.wait_for(ready) => value
            .map(|v| v.clone())
            .map_err(|_| Status::unavailable("the workload's identity source ended")),
        () = shutdown.cancelled() => Err(shutting_down()),
    }
}

/// What a stream does with the current state.
enum Step<R> {
    /// Nothing to send yet.
    Wait,
    /// The response for this state (sent only if it differs from the last one).
    Send(R),
    /// End the stream with this status.
    End(Status),
}

/// A response stream following `svids` and `other`: `compose` turns each state into a
/// [`Step`]; a response equal to the last one sent is not sent again.
fn follow<B, R, F>(
    svids: watch::Receiver<SvidState>,
    other: watch::Receiver<B>,
    shutdown: CancellationToken,
    compose: F,
) -> ResponseStream<R>
where
    B: Send + Sync + 'static,
    R: PartialEq + Clone + Send + 'static,
    F: FnMut(&SvidState, &B) -> Step<R> + Send + 'static,
{
    struct Follow<B, R, F> {
        svids: watch::Receiver<SvidState>,
        other: watch::Receiver<B>,
        shutdown: CancellationToken,
        compose: F,
        last: Option<R>,
        done: bool,
    }
    let start = Follow {
        svids,
        other,
        shutdown,
        compose,
        last: None,
        done: false,
    };
    futures::stream::unfold(start, |mut f| async move {
        if f.done {
            return None;
        }
        loop {
            let step = {
                let svids = f.svids.borrow_and_update();
                let other = f.other.borrow_and_update();
                (f.compose)(&svids, &other)
            };
            match step {
                Step::Send(response) if f.last.as_ref() != Some(&response) => {
                    f.last = Some(response.clone());
                    return Some((Ok(response), f));
                }
                Step::Send(_) | Step::Wait => {}
                Step::End(status) => {
                    f.done = true;
                    return Some((Err(status), f));
                }
            }
            let ended = tokio::select! {
                changed = f.svids.changed() => changed.is_err(),
                changed = f.other.changed() => changed.is_err(),
                () = f.shutdown.cancelled() => {
                    f.done = true;
                    return Some((Err(shutting_down()), f));
                }
            };
            if ended {
                f.done = true;
                return Some((
                    Err(Status::unavailable("the workload's identity source ended")),
                    f,
                ));
            }
        }
    })
    .boxed()
}

/// The SVIDs of a workload that has some; otherwise how its stream ends or waits.
fn issued<R>(
    state: &SvidState,
    identity: &dyn WorkloadIdentity,
) -> Result<Arc<WorkloadSvids>, Step<R>> {
    match state {
        SvidState::Pending => Err(Step::Wait),
        SvidState::Gone => Err(Step::End(gone())),
        SvidState::Ready(svids) if svids.svids.is_empty() => Err(Step::End(no_identity(identity))),
        SvidState::Ready(svids) => Ok(Arc::clone(svids)),
    }
}

/// The trust domains a workload may see bundles of: those of its SVIDs and those its entries
/// federate with (PI-8; D5).
fn visible_trust_domains(svids: &WorkloadSvids) -> BTreeSet<&str> {
    svids
        .svids
        .iter()
        .map(|s| s.trust_domain.as_str())
        .chain(svids.federates_with.iter().map(String::as_str))
        .collect()
}

fn trust_domain_id(name: &str) -> String {
    format!("spiffe://{name}")
}

/// PI-54/FetchX509SVID: every SVID, default first; each with its own trust domain's bundle;
/// federated bundles only of `federates_with` (PI-8, D5). `None` while a needed bundle is
/// not known yet.
fn x509_svid_response(svids: &WorkloadSvids, bundles: &SharedBundles) -> Option<X509svidResponse> {
    let mut out = Vec::with_capacity(svids.svids.len());
    let mut hints = BTreeSet::new();
    for svid in &svids.svids {
        // The first SVID of each non-empty hint (PI-6: the Delegated Identity API does not
        // filter them; the Workload API does).
        if !svid.hint.is_empty() && !hints.insert(svid.hint.as_str()) {
            continue;
        }
        let bundle = bundles.get(&svid.trust_domain)?;
        out.push(X509svid {
            spiffe_id: svid.spiffe_id.clone(),
            x509_svid: svid.chain.concat(),
            x509_svid_key: svid.key.pkcs8_der().to_vec(),
            bundle: bundle.concat(),
            hint: svid.hint.clone(),
        });
    }
    let own: BTreeSet<&str> = svids
        .svids
        .iter()
        .map(|s| s.trust_domain.as_str())
        .collect();
    let federated_bundles = svids
        .federates_with
        .iter()
        .filter(|td| !own.contains(td.as_str()))
        .filter_map(|td| Some((trust_domain_id(td), bundles.get(td)?.concat())))
        .collect();
    Some(X509svidResponse {
        svids: out,
        crl: Vec::new(),
        federated_bundles,
    })
}

/// The bundles of the trust domains the workload may see, by trust domain ID; `None` while
/// one of its own trust domains' is not known yet.
fn visible_bundles<V>(
    svids: &WorkloadSvids,
    get: impl Fn(&str) -> Option<V>,
) -> Option<BTreeMap<String, V>> {
    let own: BTreeSet<&str> = svids
        .svids
        .iter()
        .map(|s| s.trust_domain.as_str())
        .collect();
    let mut out = BTreeMap::new();
    for td in visible_trust_domains(svids) {
        match get(td) {
            Some(bundle) => {
                out.insert(trust_domain_id(td), bundle);
            }
            None if own.contains(td) => return None,
            None => {}
        }
    }
    Some(out)
}

/// Keeps the first of each non-empty hint, as the Workload API does (PI-6, D5).
fn unique_hints(svids: Vec<Jwtsvid>) -> Vec<Jwtsvid> {
    let mut seen = BTreeSet::new();
    svids
        .into_iter()
        .filter(|svid| svid.hint.is_empty() || seen.insert(svid.hint.clone()))
        .collect()
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApiService {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let identity = Arc::clone(&self.identity);
        let stream = follow(
            self.identity.svids(),
            self.identity.bundles(),
            self.shutdown.clone(),
            move |state, bundles: &Option<SharedBundles>| {
                let svids = match issued(state, &*identity) {
                    Ok(svids) => svids,
                    Err(step) => return step,
                };
                match bundles
                    .as_ref()
                    .and_then(|bundles| x509_svid_response(&svids, bundles))
                {
                    Some(response) => Step::Send(response),
                    None => Step::Wait,
                }
            },
        );
        Ok(Response::new(stream))
    }

    async fn fetch_x509_bundles(
        &self,
        _request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let stream = self.follow_bundles(
            self.identity.bundles(),
            |bundles: &SharedBundles, td: &str| bundles.get(td).map(<[Vec<u8>]>::concat),
            |bundles| X509BundlesResponse {
                crl: Vec::new(),
                bundles: bundles.into_iter().collect(),
            },
        );
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let request = request.into_inner();
        if request.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if !request.spiffe_id.is_empty() && trust_domain_of(&request.spiffe_id).is_err() {
            return Err(Status::invalid_argument(format!(
                "invalid requested SPIFFE ID {:?}",
                request.spiffe_id.chars().take(200).collect::<String>()
            )));
        }
        if *self.identity.svids().borrow() == SvidState::Gone {
            return Err(gone());
        }
        let svids = self
            .identity
            .fetch_jwt_svids(request.audience)
            .await
            .map_err(|err| self.agent_error(err))?;
        let svids: Vec<Jwtsvid> = svids
            .into_iter()
            // The Delegated Identity API has no SPIFFE ID filter (PI-9): apply it here.
            .filter(|svid| request.spiffe_id.is_empty() || svid.spiffe_id == request.spiffe_id)
            .map(|svid| Jwtsvid {
                spiffe_id: svid.spiffe_id,
                svid: svid.token,
                hint: svid.hint,
            })
            .collect();
        let svids = unique_hints(svids);
        if svids.is_empty() {
            return Err(self.no_identity());
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        _request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let stream = self.follow_bundles(
            self.identity.jwt_bundles(),
            |bundles: &JwtBundles, td: &str| bundles.get(td).cloned(),
            |bundles| JwtBundlesResponse {
                bundles: bundles.into_iter().collect(),
            },
        );
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let request = request.into_inner();
        if request.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if request.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let svids = self.ready_svids().await?;
        let mut jwt_bundles = self.identity.jwt_bundles();
        let all = wait_for(&mut jwt_bundles, &self.shutdown, Option::is_some)
            .await?
            .unwrap_or_default();
        // Only the keys of trust domains this workload may trust (as FetchJWTBundles).
        let visible: BTreeMap<String, Vec<u8>> = visible_trust_domains(&svids)
            .into_iter()
            .filter_map(|td| Some((td.to_owned(), all.get(td)?.clone())))
            .collect();
        let validated = validate_jwt_svid(&request.svid, &request.audience, &visible)
            .map_err(|err| Status::invalid_argument(err.to_string()))?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: validated.spiffe_id,
            claims: Some(claims_to_struct(validated.claims)),
        }))
    }
}

impl WorkloadApiService {
    /// FetchX509Bundles and FetchJWTBundles: the bundles of the workload's own and federated
    /// trust domains from `bundles` (the node's, PI-8), sent again whenever they or the
    /// workload's SVIDs change what it may see.
    fn follow_bundles<B, V, R>(
        &self,
        bundles: watch::Receiver<Option<B>>,
        lookup: fn(&B, &str) -> Option<V>,
        respond: fn(BTreeMap<String, V>) -> R,
    ) -> ResponseStream<R>
    where
        B: Send + Sync + 'static,
        V: 'static,
        R: PartialEq + Clone + Send + 'static,
    {
        let identity = Arc::clone(&self.identity);
        follow(
            self.identity.svids(),
            bundles,
            self.shutdown.clone(),
            move |state, bundles: &Option<B>| {
                let svids = match issued(state, &*identity) {
                    Ok(svids) => svids,
                    Err(step) => return step,
                };
                let Some(bundles) = bundles else {
                    return Step::Wait;
                };
                match visible_bundles(&svids, |td| lookup(bundles, td)) {
                    Some(visible) => Step::Send(respond(visible)),
                    None => Step::Wait,
                }
            },
        )
    }

    /// The agent's answer to FetchJWTSVIDs, as the workload should see it: "no identity" as
    /// the Workload API words it; anything else is the agent's trouble, so `Unavailable`
    /// (clients retry, PI-54).
    fn agent_error(&self, err: IdentityError) -> Status {
        match err {
            IdentityError::Agent {
                code: tonic::Code::PermissionDenied,
                ref message,
            } if message.contains("no identity issued") => self.no_identity(),
            other => {
                tracing::warn!(err = %other, "FetchJWTSVID: the SPIRE agent did not mint JWT-SVIDs");
                Status::unavailable(format!("could not fetch JWT-SVIDs: {other}"))
            }
        }
    }
}
