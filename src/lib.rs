//! svid-bridge: an Envoy SDS server and Kubernetes CSI node plugin backed by a SPIRE agent.
//!
//! Modules are cut by domain, each with its own error type: [`identity`] (where SVIDs come
//! from and the per-workload cache), [`sds`] (Envoy's Secret Discovery Service), [`csi`] (the
//! node plugin and kubelet registration), [`workload`] (a SPIFFE Workload API for one
//! workload), [`uds`] (Unix listeners) and [`telemetry`].

pub mod bridge;
pub mod clock;
pub mod config;
pub mod csi;
pub mod identity;
pub mod inspect;
pub mod k8s;
pub mod memory;
pub mod pod;
pub mod proto;
pub mod sds;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod uds;
pub mod workload;

/// The crate version, reported by `svid-bridge version` and CSI `GetPluginInfo`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
