//! Flags and environment → one validated [`Config`].
//!
//! Every flag also reads `SVID_BRIDGE_<FLAG>`; the defaults fit a DaemonSet installed beside
//! the SPIRE Helm chart. Validation is pure (it only looks at the filesystem), so tests build
//! a [`RunArgs`] by hand and never touch the process environment.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};

use clap::{Args, ValueEnum};

use crate::identity::cache::DEFAULT_MAX_STREAMS_PER_WORKLOAD;
use crate::sds::names::{
    DEFAULT_ALL_BUNDLES_NAME, DEFAULT_BUNDLE_NAME, DEFAULT_SVID_NAME, SpecialNames,
};
use crate::sds::stream::{DEFAULT_MAX_NAME_BYTES, DEFAULT_MAX_NAMES_PER_REQUEST};
use crate::sds::{
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_STREAMS_PER_CONNECTION,
    StreamSettings,
};

/// The SPIRE agent socket the SPIRE Helm chart shares with workloads.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/spire/agent-sockets/spire-agent.sock";
/// Where the SPIRE agent's admin API (Delegated Identity) listens.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/spire/admin-sockets/admin.sock";
/// The bridge's SDS socket: file name `socket` so an Istio sidecar finds it in the mounted
/// `workload-spiffe-uds` directory (I1).
pub const DEFAULT_SDS_SOCKET: &str = "/run/spire/agent-sockets/socket";
pub const DEFAULT_CSI_SOCKET: &str = "/var/lib/kubelet/plugins/csi.spiffe.io/csi.sock";
pub const DEFAULT_KUBELET_ROOT: &str = "/var/lib/kubelet";
pub const DEFAULT_PLUGIN_NAME: &str = "csi.spiffe.io";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{flag} must be an absolute path, got {path:?}")]
    RelativePath { flag: &'static str, path: PathBuf },
    #[error("{flag}: directory {dir:?} does not exist")]
    MissingDirectory { flag: &'static str, dir: PathBuf },
    #[error("{flag}: {path:?} exists but is not a directory")]
    NotADirectory { flag: &'static str, path: PathBuf },
    #[error(
        "node ID is required when the CSI plugin is on: set --node-id, or the environment \
         variable named by --node-id-env ({env_var}), or turn CSI off with --csi-socket ''"
    )]
    MissingNodeId { env_var: String },
    #[error("{flag} must not be empty")]
    EmptyName { flag: &'static str },
    #[error(
        "--csi-plugin-name {0:?} is not a valid CSI driver name (at most 63 characters of \
         letters, digits, '-', '.' and '_', starting and ending with a letter)"
    )]
    BadPluginName(String),
    #[error(
        "{flag} {value:?} is not a listen address (host:port, e.g. 0.0.0.0:9988); empty turns it off"
    )]
    BadAddress { flag: &'static str, value: String },
    #[error("{flag} must be at least 1")]
    ZeroLimit { flag: &'static str },
    #[error("--extra-trust-anchors {path:?}: {reason}")]
    TrustAnchors { path: PathBuf, reason: String },
    #[error("secret names must differ: {first} and {second} are both {name:?}")]
    DuplicateSecretName {
        first: &'static str,
        second: &'static str,
        name: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum IdentitySourceKind {
    /// Each Envoy gets its own workload's SVIDs through the agent's Delegated Identity API.
    #[default]
    Delegated,
    /// The bridge serves its own SVIDs from the Workload API (sidecar or VM deployment).
    WorkloadApi,
}

pub use crate::csi::CsiConfig;
pub use crate::k8s::{KubernetesMode, PodViewConfig};
pub use crate::sds::{SdsConfig, SdsLimits};
pub use crate::telemetry::LogFormat;

/// `svid-bridge run` flags. Field docs are the `--help` text.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Where SVIDs come from.
    #[arg(long, value_enum, default_value_t, env = "SVID_BRIDGE_IDENTITY_SOURCE")]
    pub identity_source: IdentitySourceKind,

    /// SPIRE agent admin socket (Delegated Identity API).
    #[arg(long, default_value = DEFAULT_ADMIN_SOCKET, env = "SVID_BRIDGE_ADMIN_SOCKET")]
    pub admin_socket: PathBuf,

    /// SPIRE agent Workload API socket; also read from SPIFFE_ENDPOINT_SOCKET (unix:// form).
    #[arg(long, env = "SVID_BRIDGE_AGENT_SOCKET")]
    pub agent_socket: Option<PathBuf>,

    /// Where Envoy connects for SDS [default: `socket` in --csi-mount-dir when that is given,
    /// else /run/spire/agent-sockets/socket].
    #[arg(long, env = "SVID_BRIDGE_SDS_SOCKET")]
    pub sds_socket: Option<PathBuf>,

    /// CSI endpoint; an empty value turns the CSI plugin off.
    #[arg(
        long,
        alias = "csi-socket-path",
        default_value = DEFAULT_CSI_SOCKET,
        env = "SVID_BRIDGE_CSI_SOCKET"
    )]
    pub csi_socket: String,

    /// CSI driver name, as in the pod spec's `csi.driver`.
    #[arg(
        long,
        alias = "plugin-name",
        default_value = DEFAULT_PLUGIN_NAME,
        env = "SVID_BRIDGE_CSI_PLUGIN_NAME"
    )]
    pub csi_plugin_name: String,

    /// The CSI socket's path as the kubelet sees it (host mount namespace), reported at
    /// registration; default: --csi-socket (the DaemonSet mounts it at the same path).
    #[arg(
        long,
        alias = "kubelet-registration-path",
        env = "SVID_BRIDGE_CSI_REGISTRATION_PATH"
    )]
    pub csi_registration_path: Option<PathBuf>,

    /// Do not register with the kubelet (when a node-driver-registrar sidecar does it).
    #[arg(long, env = "SVID_BRIDGE_DISABLE_KUBELET_REGISTRATION")]
    pub disable_kubelet_registration: bool,

    /// Directory bind-mounted into pods; default: the directory of --sds-socket.
    #[arg(
        long,
        alias = "workload-api-socket-dir",
        env = "SVID_BRIDGE_CSI_MOUNT_DIR"
    )]
    pub csi_mount_dir: Option<PathBuf>,

    /// CSI node ID; default: the value of the variable named by --node-id-env.
    #[arg(long, env = "SVID_BRIDGE_NODE_ID")]
    pub node_id: Option<String>,

    /// Environment variable holding the node ID.
    #[arg(long, default_value = "MY_NODE_NAME", env = "SVID_BRIDGE_NODE_ID_ENV")]
    pub node_id_env: String,

    /// Kubelet root directory (registration under plugins_registry/, targets under pods/).
    #[arg(long, default_value = DEFAULT_KUBELET_ROOT, env = "SVID_BRIDGE_KUBELET_ROOT")]
    pub kubelet_root: PathBuf,

    /// SDS name of the workload's default X.509-SVID.
    #[arg(long, default_value = DEFAULT_SVID_NAME, env = "SVID_BRIDGE_DEFAULT_SVID_NAME")]
    pub default_svid_name: String,

    /// SDS name of the workload's own trust domain bundle.
    #[arg(
        long,
        default_value = DEFAULT_BUNDLE_NAME,
        env = "SVID_BRIDGE_DEFAULT_BUNDLE_NAME"
    )]
    pub default_bundle_name: String,

    /// SDS name of all bundles the workload may see.
    #[arg(
        long,
        default_value = DEFAULT_ALL_BUNDLES_NAME,
        env = "SVID_BRIDGE_DEFAULT_ALL_BUNDLES_NAME"
    )]
    pub default_all_bundles_name: String,

    /// PEM file of extra root certificates added to the own trust domain in ROOTCA and ALL,
    /// e.g. istiod's root while a mesh migrates from istiod's CA to SPIRE (istio/istio#50783).
    #[arg(long, env = "SVID_BRIDGE_EXTRA_TRUST_ANCHORS")]
    pub extra_trust_anchors: Option<PathBuf>,

    /// Serve `trusted_ca` instead of Envoy's SPIFFE certificate validator.
    #[arg(long, env = "SVID_BRIDGE_DISABLE_SPIFFE_CERT_VALIDATION")]
    pub disable_spiffe_cert_validation: bool,

    /// Most resource names in one SDS request.
    #[arg(
        long,
        default_value_t = DEFAULT_MAX_NAMES_PER_REQUEST,
        env = "SVID_BRIDGE_MAX_NAMES_PER_REQUEST"
    )]
    pub max_names_per_request: usize,

    /// Longest resource name, in bytes (a SPIFFE ID is at most 2048).
    #[arg(long, default_value_t = DEFAULT_MAX_NAME_BYTES, env = "SVID_BRIDGE_MAX_NAME_BYTES")]
    pub max_name_bytes: usize,

    /// Largest SDS request message, in bytes.
    #[arg(
        long,
        default_value_t = DEFAULT_MAX_REQUEST_BYTES,
        env = "SVID_BRIDGE_MAX_REQUEST_BYTES"
    )]
    pub max_request_bytes: usize,

    /// Concurrent SDS streams on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(
        long,
        default_value_t = DEFAULT_MAX_STREAMS_PER_CONNECTION,
        env = "SVID_BRIDGE_MAX_STREAMS_PER_CONNECTION"
    )]
    pub max_streams_per_connection: u32,

    /// Concurrent SDS streams of one process (in Workload API mode: of all callers).
    #[arg(
        long,
        default_value_t = DEFAULT_MAX_STREAMS_PER_WORKLOAD,
        env = "SVID_BRIDGE_MAX_STREAMS_PER_PROCESS"
    )]
    pub max_streams_per_process: usize,

    /// Concurrent connections to the SDS socket; further ones are closed at once.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, env = "SVID_BRIDGE_MAX_CONNECTIONS")]
    pub max_connections: usize,

    /// Prometheus metrics listen address; empty turns it off.
    #[arg(long, default_value = "0.0.0.0:9988", env = "SVID_BRIDGE_METRICS_ADDR")]
    pub metrics_addr: String,

    /// Kubernetes API access, to name pods in logs and inspection: `auto` uses the in-cluster
    /// service account when the bridge runs in a pod (watching this node's pods only),
    /// `off` never does.
    #[arg(long, value_enum, default_value_t, env = "SVID_BRIDGE_KUBERNETES")]
    pub kubernetes: KubernetesMode,

    /// With the pod view: post a Kubernetes Event (WaitingForIdentity) on a pod whose
    /// Envoy has waited this many seconds for a secret; 0: never.
    #[arg(
        long,
        default_value_t = crate::k8s::events::DEFAULT_WAIT_EVENT_AFTER.as_secs(),
        env = "SVID_BRIDGE_WAIT_EVENT_SECONDS"
    )]
    pub wait_event_seconds: u64,

    /// Pod-scoped identity: CSI volumes with `volumeAttributes: {mode: pod}` get their own
    /// socket (SPIFFE Workload API + SDS) and, with `files: "true"`, SVID files
    /// (docs/pod-mode.md). Needs the CSI plugin and the Delegated Identity API.
    #[arg(long, value_enum, default_value_t, env = "SVID_BRIDGE_POD_MODE")]
    pub pod_mode: PodModeSwitch,

    /// Where pod-mode volumes' tmpfs mounts and records live; must be on the host
    /// (Bidirectional in a pod) for volumes to survive a restart.
    #[arg(long, default_value = crate::pod::DEFAULT_STATE_DIR, env = "SVID_BRIDGE_POD_STATE_DIR")]
    pub pod_state_dir: PathBuf,

    /// How a pod-mode volume's pod fields are checked: `api` against the pod view (needs
    /// Kubernetes access), `trust-kubelet` as the kubelet passes them (only with a CSIDriver
    /// that has podInfoOnMount: true and that nobody else may edit).
    #[arg(long, value_enum, default_value_t, env = "SVID_BRIDGE_POD_FIELDS")]
    pub pod_fields: crate::pod::PodFieldCheck,

    /// How long a files volume's first publish waits for its first SVID before failing (the
    /// kubelet retries).
    #[arg(
        long,
        default_value_t = crate::pod::DEFAULT_PUBLISH_TIMEOUT.as_secs(),
        env = "SVID_BRIDGE_POD_PUBLISH_TIMEOUT_SECONDS"
    )]
    pub pod_publish_timeout_seconds: u64,

    /// Health endpoints (/healthz, /readyz, /debug/workloads) listen address; empty turns it
    /// off.
    #[arg(
        long,
        default_value = "127.0.0.1:9989",
        env = "SVID_BRIDGE_HEALTH_ADDR"
    )]
    pub health_addr: String,

    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(
        long,
        value_enum,
        default_value_t,
        env = "SVID_BRIDGE_LOG_FORMAT",
        global = true
    )]
    pub log_format: LogFormat,

    /// Log filter (a level, or RUST_LOG-style directives); RUST_LOG wins when set.
    #[arg(
        long,
        default_value = "info",
        env = "SVID_BRIDGE_LOG_LEVEL",
        global = true
    )]
    pub log_level: String,
}

/// The validated configuration `svid-bridge run` works from.
/// `--pod-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PodModeSwitch {
    /// On whenever the CSI plugin runs with the Delegated Identity API.
    #[default]
    On,
    Off,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub identity_source: IdentitySourceKind,
    pub admin_socket: PathBuf,
    pub agent_socket: PathBuf,
    pub sds: SdsConfig,
    pub csi: Option<CsiConfig>,
    pub metrics_addr: Option<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
    pub kubernetes: PodViewConfig,
    /// Pod-scoped identity; `None` without CSI, with the Workload API source, or when off.
    pub pod: Option<crate::pod::PodConfig>,
}

/// What validation needs from the process environment, so tests can supply their own.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl RunArgs {
    pub fn validate(&self, env: &dyn Env) -> Result<Config, ConfigError> {
        let sds_socket = absolute_socket("--sds-socket", &self.sds_socket_path())?;
        let agent_socket = self.resolve_agent_socket(env)?;
        let admin_socket = absolute("--admin-socket", &self.admin_socket)?;
        let special = SpecialNames {
            default_svid: non_empty("--default-svid-name", &self.default_svid_name)?,
            default_bundle: non_empty("--default-bundle-name", &self.default_bundle_name)?,
            all_bundles: non_empty("--default-all-bundles-name", &self.default_all_bundles_name)?,
        };
        distinct_names(&special)?;
        let limits = self.limits()?;
        let sds = SdsConfig {
            socket: sds_socket,
            stream: StreamSettings {
                special,
                limits: limits.per_request(),
                validation_disabled: self.disable_spiffe_cert_validation,
                extra_trust_anchors: match &self.extra_trust_anchors {
                    Some(path) => load_trust_anchors(path)?,
                    None => Vec::new(),
                },
            },
            limits,
        };
        let csi = self.validate_csi(&sds.socket, env)?;
        let kubernetes = PodViewConfig {
            mode: self.kubernetes,
            node_name: match &csi {
                Some(csi) => Some(csi.node_id.clone()),
                None => self.node_name(env),
            },
            wait_event_after: (self.wait_event_seconds > 0)
                .then(|| std::time::Duration::from_secs(self.wait_event_seconds)),
        };
        let pod = match (&csi, self.identity_source, self.pod_mode) {
            (Some(csi), IdentitySourceKind::Delegated, PodModeSwitch::On) => {
                Some(crate::pod::PodConfig {
                    state_dir: absolute("--pod-state-dir", &self.pod_state_dir)?,
                    field_check: self.pod_fields,
                    publish_timeout: std::time::Duration::from_secs(
                        self.pod_publish_timeout_seconds.max(1),
                    ),
                    node: csi.node_id.clone(),
                })
            }
            _ => None,
        };
        Ok(Config {
            pod,
            identity_source: self.identity_source,
            admin_socket,
            agent_socket,
            sds,
            csi,
            metrics_addr: optional_addr("--metrics-addr", &self.metrics_addr)?,
            health_addr: optional_addr("--health-addr", &self.health_addr)?,
            kubernetes,
        })
    }

    /// `--node-id`, else the variable `--node-id-env` names; `None` when both are empty.
    fn node_name(&self, env: &dyn Env) -> Option<String> {
        self.node_id
            .clone()
            .filter(|id| !id.is_empty())
            .or_else(|| env.var(&self.node_id_env).filter(|id| !id.is_empty()))
    }

    fn limits(&self) -> Result<SdsLimits, ConfigError> {
        let positive = |flag: &'static str, value: usize| {
            if value == 0 {
                Err(ConfigError::ZeroLimit { flag })
            } else {
                Ok(value)
            }
        };
        Ok(SdsLimits {
            max_names_per_request: positive("--max-names-per-request", self.max_names_per_request)?,
            max_name_bytes: positive("--max-name-bytes", self.max_name_bytes)?,
            max_request_bytes: positive("--max-request-bytes", self.max_request_bytes)?,
            max_streams_per_connection: u32::try_from(positive(
                "--max-streams-per-connection",
                self.max_streams_per_connection as usize,
            )?)
            .unwrap_or(u32::MAX),
            max_streams_per_process: positive(
                "--max-streams-per-process",
                self.max_streams_per_process,
            )?,
            max_connections: positive("--max-connections", self.max_connections)?,
        })
    }

    /// spiffe-csi-driver's flags name only the directory it mounts into pods; a drop-in
    /// serves SDS in that directory, as `socket` (the name Istio looks for, I1).
    fn sds_socket_path(&self) -> PathBuf {
        match (&self.sds_socket, &self.csi_mount_dir) {
            (Some(path), _) => path.clone(),
            (None, Some(dir)) => dir.join("socket"),
            (None, None) => PathBuf::from(DEFAULT_SDS_SOCKET),
        }
    }

    fn resolve_agent_socket(&self, env: &dyn Env) -> Result<PathBuf, ConfigError> {
        let from_env = env
            .var("SPIFFE_ENDPOINT_SOCKET")
            .map(|v| PathBuf::from(v.strip_prefix("unix://").unwrap_or(&v)));
        let path = self
            .agent_socket
            .clone()
            .or(from_env)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET));
        absolute("--agent-socket", &path)
    }

    fn validate_csi(
        &self,
        sds_socket: &Path,
        env: &dyn Env,
    ) -> Result<Option<CsiConfig>, ConfigError> {
        if self.csi_socket.is_empty() {
            return Ok(None);
        }
        let socket = absolute_socket("--csi-socket", Path::new(&self.csi_socket))?;
        let plugin_name = self.csi_plugin_name.clone();
        if !is_valid_plugin_name(&plugin_name) {
            return Err(ConfigError::BadPluginName(plugin_name));
        }
        let mount_dir = match &self.csi_mount_dir {
            Some(dir) => existing_dir("--csi-mount-dir", &absolute("--csi-mount-dir", dir)?)?,
            None => parent_dir(sds_socket),
        };
        let kubelet_root = existing_dir(
            "--kubelet-root",
            &absolute("--kubelet-root", &self.kubelet_root)?,
        )?;
        let node_id = self
            .node_name(env)
            .ok_or_else(|| ConfigError::MissingNodeId {
                env_var: self.node_id_env.clone(),
            })?;
        let registration_endpoint = match &self.csi_registration_path {
            Some(path) => absolute("--csi-registration-path", path)?,
            None => socket.clone(),
        };
        Ok(Some(CsiConfig {
            socket,
            plugin_name,
            mount_dir,
            node_id,
            kubelet_root,
            registration_endpoint,
            register_with_kubelet: !self.disable_kubelet_registration,
        }))
    }
}

/// GetPluginInfo's name rule as csi-sanity checks it (docs/behaviours.md, "csi-sanity"): starts and ends with a
/// letter, at most 63 characters.
pub fn is_valid_plugin_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    bytes.len() <= 63
        && first.is_ascii_alphabetic()
        && last.is_ascii_alphabetic()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

fn absolute(flag: &'static str, path: &Path) -> Result<PathBuf, ConfigError> {
    if path.is_absolute() {
        Ok(normalize(path))
    } else {
        Err(ConfigError::RelativePath {
            flag,
            path: path.to_path_buf(),
        })
    }
}

/// An absolute socket path whose directory exists; the socket file itself is (re)created.
fn absolute_socket(flag: &'static str, path: &Path) -> Result<PathBuf, ConfigError> {
    let path = absolute(flag, path)?;
    existing_dir(flag, &parent_dir(&path))?;
    Ok(path)
}

/// Reads a PEM file of CA certificates; at least one, and each must parse.
fn load_trust_anchors(path: &Path) -> Result<Vec<Vec<u8>>, ConfigError> {
    let fail = |reason: String| ConfigError::TrustAnchors {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let blocks = pem::parse_many(&text).map_err(|e| fail(format!("not PEM: {e}")))?;
    let certs: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect();
    if certs.is_empty() {
        return Err(fail("no CERTIFICATE block".into()));
    }
    for (i, der) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(der)
            .map_err(|e| fail(format!("certificate {} does not parse: {e}", i + 1)))?;
    }
    Ok(certs)
}

fn existing_dir(flag: &'static str, dir: &Path) -> Result<PathBuf, ConfigError> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(dir.to_path_buf()),
        Ok(_) => Err(ConfigError::NotADirectory {
            flag,
            path: dir.to_path_buf(),
        }),
        Err(_) => Err(ConfigError::MissingDirectory {
            flag,
            dir: dir.to_path_buf(),
        }),
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    path.parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
}

/// Lexical normalisation (`.` and `..`), without touching the filesystem.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn non_empty(flag: &'static str, value: &str) -> Result<String, ConfigError> {
    if value.is_empty() {
        Err(ConfigError::EmptyName { flag })
    } else {
        Ok(value.to_owned())
    }
}

/// SPIRE only warns when the bundle names collide (B-11); a collision makes one
/// of the two names unreachable, so we refuse it.
fn distinct_names(special: &SpecialNames) -> Result<(), ConfigError> {
    let names = [
        ("--default-svid-name", &special.default_svid),
        ("--default-bundle-name", &special.default_bundle),
        ("--default-all-bundles-name", &special.all_bundles),
    ];
    for (i, (first, a)) in names.iter().enumerate() {
        for (second, b) in &names[i + 1..] {
            if a == b {
                return Err(ConfigError::DuplicateSecretName {
                    first,
                    second,
                    name: (*a).clone(),
                });
            }
        }
    }
    Ok(())
}

fn optional_addr(flag: &'static str, value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| ConfigError::BadAddress {
            flag,
            value: value.to_owned(),
        })
}

/// spiffe-csi-driver is configured with Go-style single-dash flags (S-8) and no
/// subcommand; rewrite such an argument list into ours so the bridge is a drop-in.
pub fn normalize_args<I: IntoIterator<Item = String>>(args: I) -> Vec<String> {
    const SINGLE_DASH: &[&str] = &[
        "workload-api-socket-dir",
        "plugin-name",
        "csi-socket-path",
        "node-id",
        "node-id-env",
    ];
    let mut args: Vec<String> = args.into_iter().collect();
    for arg in args.iter_mut().skip(1) {
        let Some(rest) = arg.strip_prefix('-') else {
            continue;
        };
        if rest.starts_with('-') {
            continue;
        }
        let name = rest.split('=').next().unwrap_or(rest);
        if SINGLE_DASH.contains(&name) {
            *arg = format!("-{arg}");
        }
    }
    let first_is_flag = args
        .get(1)
        .is_some_and(|a| a.starts_with("--") && !matches!(a.as_str(), "--help" | "--version"));
    if first_is_flag {
        args.insert(1, "run".to_owned());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::collections::HashMap;

    #[derive(Parser)]
    #[command(args_override_self = true)]
    struct TestCli {
        #[command(flatten)]
        run: RunArgs,
    }

    struct MapEnv(HashMap<&'static str, &'static str>);
    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| (*v).to_owned())
        }
    }

    fn args(dir: &Path, extra: &[&str]) -> RunArgs {
        let csi = dir.join("csi.sock");
        let mut argv = vec![
            "t".to_owned(),
            format!("--sds-socket={}", dir.join("socket").display()),
            format!("--csi-socket={}", csi.display()),
            format!("--kubelet-root={}", dir.display()),
        ];
        argv.extend(extra.iter().map(|s| (*s).to_owned()));
        TestCli::parse_from(argv).run
    }

    fn no_env() -> MapEnv {
        MapEnv(HashMap::new())
    }

    #[test]
    fn defaults_validate_with_node_id_from_env() {
        let dir = tempfile::tempdir().unwrap();
        let env = MapEnv(HashMap::from([("MY_NODE_NAME", "node-a")]));
        let config = args(dir.path(), &[]).validate(&env).unwrap();
        let csi = config.csi.unwrap();
        assert_eq!(csi.node_id, "node-a");
        assert_eq!(
            csi.mount_dir,
            dir.path(),
            "mount dir defaults to the SDS socket's directory"
        );
        assert_eq!(csi.plugin_name, "csi.spiffe.io");
        assert_eq!(
            csi.registration_socket(),
            dir.path().join("plugins_registry/csi.spiffe.io-reg.sock")
        );
        assert_eq!(config.identity_source, IdentitySourceKind::Delegated);
    }

    #[test]
    fn spiffe_csi_driver_flags_alone_serve_sds_in_the_mounted_directory() {
        let dir = tempfile::tempdir().unwrap();
        let argv = normalize_args([
            "svid-bridge".to_owned(),
            format!("-workload-api-socket-dir={}", dir.path().display()),
            format!("-csi-socket-path={}", dir.path().join("csi.sock").display()),
            "-node-id=n1".to_owned(),
            format!("--kubelet-root={}", dir.path().display()),
        ]);
        let cli = TestCli::parse_from(argv.iter().filter(|a| *a != "run"));
        let config = cli.run.validate(&no_env()).unwrap();
        assert_eq!(config.sds.socket, dir.path().join("socket"));
        let csi = config.csi.unwrap();
        assert_eq!(csi.mount_dir, dir.path());
        assert_eq!(csi.registration_endpoint, dir.path().join("csi.sock"));
        assert!(csi.register_with_kubelet);
    }

    #[test]
    fn relative_socket_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = args(dir.path(), &["--sds-socket=run/socket", "--node-id=n"])
            .validate(&no_env())
            .unwrap_err();
        assert_eq!(
            err,
            ConfigError::RelativePath {
                flag: "--sds-socket",
                path: "run/socket".into()
            }
        );
        assert!(err.to_string().contains("must be an absolute path"));
    }

    #[test]
    fn missing_socket_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope/socket");
        let err = args(
            dir.path(),
            &[
                &format!("--sds-socket={}", missing.display()),
                "--node-id=n",
            ],
        )
        .validate(&no_env())
        .unwrap_err();
        assert!(matches!(
            err,
            ConfigError::MissingDirectory {
                flag: "--sds-socket",
                ..
            }
        ));
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn empty_node_id_with_csi_on_is_refused_and_names_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let env = MapEnv(HashMap::from([("MY_NODE_NAME", "")]));
        let err = args(dir.path(), &[]).validate(&env).unwrap_err();
        assert_eq!(
            err,
            ConfigError::MissingNodeId {
                env_var: "MY_NODE_NAME".into()
            }
        );
        assert!(err.to_string().contains("MY_NODE_NAME"));
    }

    #[test]
    fn kubernetes_is_auto_by_default_and_knows_the_node_with_or_without_csi() {
        let dir = tempfile::tempdir().unwrap();
        let env = MapEnv(HashMap::from([("MY_NODE_NAME", "node-a")]));
        let config = args(dir.path(), &[]).validate(&env).unwrap();
        assert_eq!(
            config.kubernetes,
            PodViewConfig {
                mode: KubernetesMode::Auto,
                node_name: Some("node-a".into()),
                wait_event_after: Some(std::time::Duration::from_secs(30)),
            }
        );
        let sds_only = args(
            dir.path(),
            &[
                "--csi-socket=",
                "--kubernetes=off",
                "--wait-event-seconds=0",
            ],
        )
        .validate(&env)
        .unwrap();
        assert_eq!(sds_only.kubernetes.mode, KubernetesMode::Off);
        assert_eq!(sds_only.kubernetes.node_name.as_deref(), Some("node-a"));
        assert_eq!(sds_only.kubernetes.wait_event_after, None);
        let nowhere = args(dir.path(), &["--csi-socket="])
            .validate(&no_env())
            .unwrap();
        assert_eq!(
            nowhere.kubernetes.node_name, None,
            "no node name is no error"
        );
    }

    #[test]
    fn empty_csi_socket_turns_csi_off_and_needs_no_node_id() {
        let dir = tempfile::tempdir().unwrap();
        let config = args(dir.path(), &["--csi-socket="])
            .validate(&no_env())
            .unwrap();
        assert!(config.csi.is_none());
    }

    #[test]
    fn agent_socket_falls_back_to_spiffe_endpoint_socket() {
        let dir = tempfile::tempdir().unwrap();
        let env = MapEnv(HashMap::from([(
            "SPIFFE_ENDPOINT_SOCKET",
            "unix:///run/agent.sock",
        )]));
        let config = args(dir.path(), &["--csi-socket="]).validate(&env).unwrap();
        assert_eq!(config.agent_socket, PathBuf::from("/run/agent.sock"));
    }

    #[test]
    fn colliding_secret_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = args(
            dir.path(),
            &["--csi-socket=", "--default-all-bundles-name=ROOTCA"],
        )
        .validate(&no_env())
        .unwrap_err();
        assert!(
            matches!(err, ConfigError::DuplicateSecretName { .. }),
            "{err}"
        );
    }

    #[test]
    fn plugin_names_follow_csi_sanity_rule() {
        assert!(is_valid_plugin_name("csi.spiffe.io"));
        assert!(is_valid_plugin_name("upstream.csi.spiffe.io"));
        assert!(!is_valid_plugin_name("csi.spiffe.io1"));
        assert!(!is_valid_plugin_name(""));
        assert!(!is_valid_plugin_name(&"a".repeat(64)));
        assert!(!is_valid_plugin_name("a/b"));
    }

    #[test]
    fn extra_trust_anchors_must_be_pem_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("roots.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["istiod".into()])
            .unwrap()
            .cert;
        std::fs::write(&good, cert.pem()).unwrap();
        let flag = format!("--extra-trust-anchors={}", good.display());
        let config = args(dir.path(), &["--csi-socket=", &flag])
            .validate(&no_env())
            .unwrap();
        assert_eq!(
            config.sds.stream.extra_trust_anchors,
            vec![cert.der().to_vec()]
        );

        let bad = dir.path().join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let flag = format!("--extra-trust-anchors={}", bad.display());
        let err = args(dir.path(), &["--csi-socket=", &flag])
            .validate(&no_env())
            .unwrap_err();
        assert!(err.to_string().contains("no CERTIFICATE block"), "{err}");
        let missing = format!(
            "--extra-trust-anchors={}",
            dir.path().join("nope").display()
        );
        assert!(
            args(dir.path(), &["--csi-socket=", &missing])
                .validate(&no_env())
                .is_err()
        );
    }

    #[test]
    fn limits_are_configurable_and_never_zero() {
        let dir = tempfile::tempdir().unwrap();
        let config = args(
            dir.path(),
            &[
                "--csi-socket=",
                "--max-names-per-request=7",
                "--max-connections=3",
            ],
        )
        .validate(&no_env())
        .unwrap();
        assert_eq!(config.sds.limits.max_names_per_request, 7);
        assert_eq!(config.sds.limits.max_connections, 3);
        assert_eq!(config.sds.limits.max_streams_per_process, 1000);
        let err = args(
            dir.path(),
            &["--csi-socket=", "--max-streams-per-process=0"],
        )
        .validate(&no_env())
        .unwrap_err();
        assert_eq!(
            err,
            ConfigError::ZeroLimit {
                flag: "--max-streams-per-process"
            }
        );
    }

    #[test]
    fn bad_listen_address_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = args(dir.path(), &["--csi-socket=", "--metrics-addr=nonsense"])
            .validate(&no_env())
            .unwrap_err();
        assert!(err.to_string().contains("listen address"));
    }

    #[test]
    fn an_unparseable_listen_address_is_named_not_called_empty() {
        let dir = tempfile::tempdir().unwrap();
        let err = args(dir.path(), &["--csi-socket=", "--metrics-addr=nonsense"])
            .validate(&no_env())
            .unwrap_err();
        assert_eq!(
            err,
            ConfigError::BadAddress {
                flag: "--metrics-addr",
                value: "nonsense".into()
            }
        );
        let message = err.to_string();
        assert!(
            message.starts_with("--metrics-addr \"nonsense\""),
            "{message}"
        );
        assert!(!message.contains("must not be empty"), "{message}");
        let err = args(dir.path(), &["--csi-socket=", "--health-addr=:x"])
            .validate(&no_env())
            .unwrap_err();
        assert!(err.to_string().starts_with("--health-addr"), "{err}");
    }

    #[test]
    fn flag_defaults_are_the_domains_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let config = args(dir.path(), &["--csi-socket="])
            .validate(&no_env())
            .unwrap();
        assert_eq!(config.sds.limits, SdsLimits::default());
        assert_eq!(config.sds.stream.special, SpecialNames::default());
        let stream = StreamSettings::default();
        assert_eq!(
            config.sds.stream.limits.max_names_per_request,
            stream.limits.max_names_per_request
        );
        assert_eq!(
            config.sds.stream.limits.max_name_bytes,
            stream.limits.max_name_bytes
        );
    }

    #[test]
    fn spiffe_csi_driver_flags_become_ours() {
        let argv = normalize_args(
            [
                "svid-bridge",
                "-workload-api-socket-dir",
                "/run/spire",
                "-plugin-name=x.spiffe.io",
                "--csi-socket-path",
                "/p/csi.sock",
                "-node-id-env",
                "NODE",
            ]
            .map(String::from),
        );
        assert_eq!(
            argv,
            [
                "svid-bridge",
                "run",
                "--workload-api-socket-dir",
                "/run/spire",
                "--plugin-name=x.spiffe.io",
                "--csi-socket-path",
                "/p/csi.sock",
                "--node-id-env",
                "NODE"
            ]
        );
        let untouched = normalize_args(["svid-bridge", "run", "-h"].map(String::from));
        assert_eq!(untouched, ["svid-bridge", "run", "-h"]);
    }

    #[test]
    fn normalize_resolves_dot_dot_lexically() {
        assert_eq!(
            normalize(Path::new("/a/b/../c/./d")),
            PathBuf::from("/a/c/d")
        );
        assert_eq!(normalize(Path::new("/../../x")), PathBuf::from("/x"));
    }
}
