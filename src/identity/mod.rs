//! Where identities come from: the SPIRE agent, per workload (Delegated Identity API) or for
//! the bridge itself (Workload API), and the cache that shares one upstream subscription per
//! workload among all of that workload's SDS streams.

pub mod cache;
pub mod describe;
pub mod jwt;
pub mod metrics;
pub mod process;
pub mod source;
pub mod supervisor;
pub mod types;

pub use cache::{Cache, CacheOptions, Subscription, SvidState};
pub use process::{PinnedProcess, ProcRoot, ProcessKey};
pub use source::{DelegatedSource, Source, Workload, WorkloadApiSource};
pub use types::{BundleSet, Svid, WorkloadSvids};

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The agent answered with a gRPC error (unreachable, not an authorized delegate, …).
    #[error("SPIRE agent: {code:?}: {message}")]
    Agent { code: tonic::Code, message: String },
    #[error("SPIRE Workload API: {0}")]
    WorkloadApi(String),
    #[error("malformed agent response: {0}")]
    Malformed(&'static str),
    #[error("malformed DER certificate data from the agent")]
    BadDer,
    #[error("not a SPIFFE ID: {0:?}")]
    BadSpiffeId(String),
    #[error("the Delegated Identity API subscribes by process; no process given")]
    NotAProcess,
}

impl IdentityError {
    pub fn from_status(status: tonic::Status) -> Self {
        Self::Agent {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }

    fn workload_api(err: impl std::fmt::Display) -> Self {
        Self::WorkloadApi(err.to_string())
    }
}
