//! What the bridge knows of Kubernetes on its own node. Today: which pod and container a
//! caller's process runs in, read from its cgroup ([`cgroup`]), so that logs and `inspect`
//! can name pods. A label only, never an identity: identities come from the SPIRE agent.

pub mod cgroup;
