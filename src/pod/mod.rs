//! Pod-scoped identity delivery: what a pod gets besides its SDS socket.
//!
//! - [`files`]: a workload's SVIDs, bundles and JWT-SVIDs as files in the pod's directory
//!   (spiffe-helper's names or the draft SPIFFE filesystem layout), replaced atomically
//!   (PI-31, PI-34/35, PI-53), for programs that read files: databases, Vault, proxies.

pub mod files;
