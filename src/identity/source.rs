//! Upstream subscriptions to the SPIRE agent, one trait over its two APIs.
//!
//! A [`Source`] opens one subscription and yields what the agent sends; it neither retries
//! nor remembers. Reconnects, backoff, deduplication and last-good retention are the
//! cache's (`identity::cache`), so both sources get the same behaviour.

use std::path::PathBuf;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use spire_api::pb::spire::api::agent::delegatedidentity::v1::{
    SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse, SubscribeToX509sviDsRequest,
    SubscribeToX509sviDsResponse,
};
use tonic::client::Grpc;
use tonic::codec::Streaming;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::IdentityError;
use super::process::ProcessKey;
use super::selectors::SelectorSet;
use super::types::{
    BundleSet, PrivateKey, Svid, WorkloadSvids, split_der_certificates, trust_domain_name,
    trust_domain_of,
};

/// Who an upstream subscription is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// A workload process on this node, attested by the agent from its PID.
    Process(ProcessKey),
    /// The bridge itself (Workload API mode): every caller gets the bridge's identity.
    Bridge,
    /// A pod, by the selectors of its pod-mode CSI volume (PI-4: the agent takes them as
    /// attested; the bridge verified them, `pod::verify`).
    Selectors(SelectorSet),
}

pub type SvidStream = BoxStream<'static, Result<WorkloadSvids, IdentityError>>;
pub type BundleStream = BoxStream<'static, Result<BundleSet, IdentityError>>;

/// One upstream subscription per call; the stream ends or errs when the agent goes away.
pub trait Source: Send + Sync + 'static {
    fn subscribe_svids(
        &self,
        workload: Workload,
    ) -> BoxFuture<'static, Result<SvidStream, IdentityError>>;
    fn subscribe_bundles(&self) -> BoxFuture<'static, Result<BundleStream, IdentityError>>;
    /// For logs and metrics: `delegated` or `workload_api`.
    fn api(&self) -> &'static str;
}

/// SPIRE has been seen to need more than gRPC's 4 MiB default for big bundle sets
/// (Cilium raised its limit to 20 MB, docs/behaviours.md, "Delegated Identity message size").
const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

pub use crate::uds::channel as unix_channel;

// === impl DelegatedSource ===

/// The agent's Delegated Identity API on its admin socket: per-workload SVIDs by PID.
/// The bridge must be among the agent's `authorized_delegates`.
///
/// Calls are made with spire-api's message types but not its generated client, which
/// hard-wires tonic's default codec: 8 KiB of decode buffer per subscription, and there is
/// one subscription per workload (`uds::SmallBufferCodec` starts at 1 KiB).
pub struct DelegatedSource {
    agent: Grpc<Channel>,
}

const SUBSCRIBE_TO_X509_SVIDS: &str =
    "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/SubscribeToX509SVIDs";
const SUBSCRIBE_TO_X509_BUNDLES: &str =
    "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/SubscribeToX509Bundles";

impl DelegatedSource {
    pub fn new(admin_socket: PathBuf) -> Self {
        let agent =
            Grpc::new(unix_channel(admin_socket)).max_decoding_message_size(MAX_MESSAGE_BYTES);
        Self { agent }
    }

    /// The agent's connection, for calls beyond the X.509 subscriptions
    /// (`identity::jwt`); clones share it.
    pub(crate) fn agent(&self) -> Grpc<Channel> {
        self.agent.clone()
    }
}

/// One server-streaming call on the agent's connection (shared by every subscription).
async fn subscribe<Req, Resp>(
    mut agent: Grpc<Channel>,
    path: &'static str,
    request: Req,
) -> Result<Streaming<Resp>, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    agent
        .ready()
        .await
        .map_err(|err| Status::unknown(format!("agent connection not ready: {err}")))?;
    agent
        .server_streaming(
            Request::new(request),
            PathAndQuery::from_static(path),
            crate::uds::SmallBufferCodec::new(),
        )
        .await
        .map(Response::into_inner)
}

impl Source for DelegatedSource {
    fn subscribe_svids(
        &self,
        workload: Workload,
    ) -> BoxFuture<'static, Result<SvidStream, IdentityError>> {
        let agent = self.agent.clone();
        Box::pin(async move {
            // PI-2/PI-3: selectors or a PID, never both.
            let request = match workload {
                Workload::Process(process) => SubscribeToX509sviDsRequest {
                    selectors: Vec::new(),
                    pid: process.pid,
                },
                Workload::Selectors(selectors) => SubscribeToX509sviDsRequest {
                    selectors: selectors.to_proto(),
                    pid: 0,
                },
                Workload::Bridge => return Err(IdentityError::NotAProcess),
            };
            let stream: Streaming<SubscribeToX509sviDsResponse> =
                subscribe(agent, SUBSCRIBE_TO_X509_SVIDS, request)
                    .await
                    .map_err(IdentityError::from_status)?;
            let svids = stream
                .map_err(IdentityError::from_status)
                .and_then(|response| async move { svids_from_delegated(response) });
            Ok(svids.boxed())
        })
    }

    fn subscribe_bundles(&self) -> BoxFuture<'static, Result<BundleStream, IdentityError>> {
        let agent = self.agent.clone();
        Box::pin(async move {
            let stream: Streaming<SubscribeToX509BundlesResponse> = subscribe(
                agent,
                SUBSCRIBE_TO_X509_BUNDLES,
                SubscribeToX509BundlesRequest {},
            )
            .await
            .map_err(IdentityError::from_status)?;
            let bundles =
                stream
                    .map_err(IdentityError::from_status)
                    .and_then(|response| async move {
                        bundles_from_der_map(
                            response
                                .ca_certificates
                                .iter()
                                .map(|(k, v)| (k.as_str(), v.as_ref())),
                        )
                    });
            Ok(bundles.boxed())
        })
    }

    fn api(&self) -> &'static str {
        "delegated"
    }
}

/// Keeps **every** SVID of the response, in the agent's order. (spire-api's convenience
/// client keeps only the first.)
fn svids_from_delegated(
    response: SubscribeToX509sviDsResponse,
) -> Result<WorkloadSvids, IdentityError> {
    let mut svids = Vec::with_capacity(response.x509_svids.len());
    for item in response.x509_svids {
        let svid = item.x509_svid.ok_or(IdentityError::Malformed(
            "X509SVIDWithKey without x509_svid",
        ))?;
        let id = svid
            .id
            .ok_or(IdentityError::Malformed("X509SVID without id"))?;
        let spiffe_id = format!("spiffe://{}{}", id.trust_domain, id.path);
        let chain: Vec<Vec<u8>> = svid.cert_chain.iter().map(|c| c.to_vec()).collect();
        svids.push(svid_from_parts(
            spiffe_id,
            chain,
            item.x509_svid_key.to_vec(),
            svid.hint,
        )?);
    }
    let federates_with = response
        .federates_with
        .iter()
        .map(|td| trust_domain_name(td).to_owned())
        .collect();
    Ok(WorkloadSvids {
        svids,
        federates_with,
    })
}

fn svid_from_parts(
    spiffe_id: String,
    chain: Vec<Vec<u8>>,
    key_der: Vec<u8>,
    hint: String,
) -> Result<Svid, IdentityError> {
    let trust_domain = trust_domain_of(&spiffe_id)?.to_owned();
    let leaf = chain.first().ok_or(IdentityError::Malformed(
        "SVID with an empty certificate chain",
    ))?;
    let expires_at = leaf_not_after(leaf)?;
    Ok(Svid {
        spiffe_id,
        trust_domain,
        chain,
        key: PrivateKey::from_pkcs8_der(key_der),
        expires_at,
        hint,
    })
}

/// The leaf's `notAfter`, in Unix seconds.
pub fn leaf_not_after(der: &[u8]) -> Result<i64, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::BadDer)?;
    Ok(cert.validity().not_after.timestamp())
}

fn bundles_from_der_map<'a>(
    entries: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Result<BundleSet, IdentityError> {
    let mut set = BundleSet::default();
    for (key, der) in entries {
        set.bundles.insert(
            trust_domain_name(key).to_owned(),
            split_der_certificates(der)?,
        );
    }
    Ok(set)
}

// === impl WorkloadApiSource ===

/// The agent's Workload API: the bridge's own SVIDs, served to every caller.
pub struct WorkloadApiSource {
    socket: PathBuf,
}

impl WorkloadApiSource {
    pub fn new(agent_socket: PathBuf) -> Self {
        Self {
            socket: agent_socket,
        }
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

/// One `FetchX509SVID` stream of X.509 contexts (SVIDs and bundles together).
async fn x509_contexts(
    endpoint: String,
) -> Result<BoxStream<'static, Result<spiffe::X509Context, IdentityError>>, IdentityError> {
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .map_err(IdentityError::workload_api)?;
    let stream = client
        .stream_x509_contexts()
        .await
        .map_err(IdentityError::workload_api)?;
    Ok(stream.map_err(IdentityError::workload_api).boxed())
}

impl Source for WorkloadApiSource {
    fn subscribe_svids(
        &self,
        _workload: Workload,
    ) -> BoxFuture<'static, Result<SvidStream, IdentityError>> {
        let contexts = x509_contexts(self.endpoint());
        Box::pin(async move {
            let svids = contexts
                .await?
                .and_then(|context| async move { svids_from_context(&context) });
            Ok(svids.boxed())
        })
    }

    fn subscribe_bundles(&self) -> BoxFuture<'static, Result<BundleStream, IdentityError>> {
        let contexts = x509_contexts(self.endpoint());
        Box::pin(async move {
            let bundles = contexts
                .await?
                .map_ok(|context| bundles_from_context(&context));
            Ok(bundles.boxed())
        })
    }

    fn api(&self) -> &'static str {
        "workload_api"
    }
}

fn bundles_from_context(context: &spiffe::X509Context) -> BundleSet {
    let mut set = BundleSet::default();
    for (td, bundle) in context.bundle_set().iter() {
        let authorities = bundle
            .authorities()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect();
        set.bundles.insert(td.to_string(), authorities);
    }
    set
}

fn svids_from_context(context: &spiffe::X509Context) -> Result<WorkloadSvids, IdentityError> {
    let svids = context
        .svids()
        .iter()
        .map(|svid| {
            let chain = svid
                .cert_chain()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect();
            svid_from_parts(
                svid.spiffe_id().to_string(),
                chain,
                svid.private_key().as_bytes().to_vec(),
                svid.hint().unwrap_or_default().to_owned(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let own = svids.first().map(|s: &Svid| s.trust_domain.clone());
    // The Workload API returns exactly the federated bundles the caller may see.
    let federates_with = context
        .bundle_set()
        .iter()
        .map(|(td, _)| td.to_string())
        .filter(|td| Some(td) != own.as_ref())
        .collect();
    Ok(WorkloadSvids {
        svids,
        federates_with,
    })
}
