//! A SPIFFE Workload API server for one workload (a pod), fed by what the bridge already
//! follows from the SPIRE agent: the workload's X.509-SVIDs, the node's X.509 and JWT
//! bundles, and JWT-SVIDs minted on request through the Delegated Identity API.
//!
//! The Delegated Identity API hands out node-wide data and knows nothing of the Workload
//! API's rules, so this module applies them itself (D5): only the bundles of the workload's
//! own and federated trust domains (PI-8), the `workload.spiffe.io` header (PI-54), the
//! `spiffe_id` filter of FetchJWTSVID (PI-9) and unique hints (PI-6).
//!
//! Who the workload is, and where its data comes from, is a [`WorkloadIdentity`]; serving it
//! on a socket is the caller's (`WorkloadApiService::into_server` is a plain tonic service).

use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::identity::jwt::{JwtBundles, JwtSvid};
use crate::identity::types::SharedBundles;
use crate::identity::{IdentityError, SvidState};

pub mod jwt_validate;
pub mod service;

pub use jwt_validate::JwtValidationError;
pub use service::{SECURITY_HEADER, WorkloadApiServer, WorkloadApiService};

/// One workload's identity data, as the Workload API serves it.
pub trait WorkloadIdentity: Send + Sync + 'static {
    /// This workload's X.509-SVIDs (first = default) and federates_with.
    fn svids(&self) -> watch::Receiver<SvidState>;
    /// The node's X.509 bundles, all trust domains (filter them yourself).
    fn bundles(&self) -> watch::Receiver<Option<SharedBundles>>;
    /// The node's JWT bundles, all trust domains.
    fn jwt_bundles(&self) -> watch::Receiver<Option<JwtBundles>>;
    fn fetch_jwt_svids(
        &self,
        audience: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<JwtSvid>, IdentityError>>;
    /// For error messages when no entry matches: e.g. "selectors k8s:ns:apps, k8s:sa:db, k8s:pod-uid:…".
    fn describe(&self) -> String;
}

#[cfg(test)]
mod tests;
