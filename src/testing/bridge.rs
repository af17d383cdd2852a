//! svid-bridge as a child process, the Envoy sidecar config users copy (`envoy/sidecar.yaml`)
//! rendered for a test, an in-process SDS client that asks like Envoy, and a tiny HTTP
//! client that returns headers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Message;

use super::proc::{LogFiles, LogSource, Proc};
use super::{
    EntrySpec, Envoy, EnvoyOptions, SocketDir, Spire, SpireOptions, bridge_binary, manifest_dir,
    peer, temp_dir, wait_until, workload_binary,
};

pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The SPIFFE ID the bridge runs as in tests; the agent lists it in `authorized_delegates`.
pub fn bridge_spiffe_id(td: &str) -> String {
    format!("spiffe://{td}/svid-bridge")
}

/// SPIRE for `example.org` with the bridge as an authorized delegate, an entry for this
/// test binary (`spiffe://example.org/tester`), and the bridge serving.
pub fn start_bridge_for_tester() -> (Spire, Bridge) {
    let spire = Spire::start(spire_options_for_bridge("example.org"));
    spire.register_test_binary("tester");
    let bridge = Bridge::start(&spire);
    (spire, bridge)
}

/// SPIRE options with the bridge as an authorized delegate.
pub fn spire_options_for_bridge(td: &str) -> SpireOptions {
    SpireOptions {
        authorized_delegates: vec![bridge_spiffe_id(td)],
        ..SpireOptions::trust_domain(td)
    }
}

pub struct Bridge {
    proc: Proc,
    binary: PathBuf,
    args: Vec<String>,
    soft_open_files: Option<u64>,
    dir: tempfile::TempDir,
    sockets: SocketDir,
}

impl Bridge {
    /// Registers a private copy of the bridge binary as `spiffe://<td>/svid-bridge` and
    /// starts it in delegated mode against `spire`'s admin socket, SDS only.
    pub fn start(spire: &Spire) -> Bridge {
        Bridge::start_with(spire, &[])
    }

    pub fn start_with(spire: &Spire, extra_args: &[&str]) -> Bridge {
        Bridge::start_limited(spire, extra_args, None)
    }

    /// As `start_with`, with the soft RLIMIT_NOFILE lowered to `soft` before exec, as a
    /// container runtime may leave it.
    pub fn start_with_soft_open_file_limit(spire: &Spire, soft: u64) -> Bridge {
        Bridge::start_limited(spire, &[], Some(soft))
    }

    fn start_limited(spire: &Spire, extra_args: &[&str], soft_open_files: Option<u64>) -> Bridge {
        let binary = workload_binary("svid-bridge", &bridge_binary());
        spire.create_entry(&EntrySpec::for_path(
            &bridge_spiffe_id(spire.trust_domain()),
            &binary,
        ));
        let dir = temp_dir("bridge");
        let sockets = SocketDir::new(dir.path(), "sds/socket");
        std::fs::create_dir_all(sockets.path().join("sds")).unwrap();
        let sds_socket = sockets.path().join("sds/socket");
        let mut args = vec![
            "run".to_owned(),
            format!("--admin-socket={}", spire.admin_socket_path().display()),
            format!("--agent-socket={}", spire.socket_path().display()),
            format!("--sds-socket={}", sds_socket.display()),
            "--csi-socket=".to_owned(),
            "--metrics-addr=".to_owned(),
            "--health-addr=".to_owned(),
            "--log-level=svid_bridge=debug,info".to_owned(),
        ];
        args.extend(extra_args.iter().map(|a| (*a).to_owned()));
        let proc = spawn(&binary, &args, dir.path(), soft_open_files);
        let bridge = Bridge {
            proc,
            binary,
            args,
            soft_open_files,
            dir,
            sockets,
        };
        bridge.wait_serving();
        bridge
    }

    fn wait_serving(&self) {
        let socket = self.sds_socket();
        wait_until(
            Duration::from_secs(10),
            "svid-bridge serves its SDS socket",
            || {
                std::os::unix::net::UnixStream::connect(&socket)
                    .ok()
                    .map(|_| ())
            },
        );
    }

    pub fn sds_socket(&self) -> PathBuf {
        self.sockets.path().join("sds/socket")
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }

    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.stop()
    }

    /// Starts the same binary with the same flags again (after `kill` or `stop`).
    pub fn restart(&mut self) {
        self.proc.stop();
        self.proc = spawn(
            &self.binary,
            &self.args,
            self.dir.path(),
            self.soft_open_files,
        );
        self.wait_serving();
    }
}

fn spawn(binary: &Path, args: &[String], dir: &Path, soft_open_files: Option<u64>) -> Proc {
    let mut cmd = match soft_open_files {
        // The shell lowers the limit and execs the bridge: same PID, same binary.
        Some(soft) => {
            let mut sh = Command::new("sh");
            sh.arg("-c")
                .arg(format!("ulimit -Sn {soft} && exec \"$0\" \"$@\""))
                .arg(binary);
            sh
        }
        None => Command::new(binary),
    };
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("SPIFFE_ENDPOINT_SOCKET");
    Proc::spawn("svid-bridge", cmd, dir)
}

impl LogSource for Bridge {
    fn log_files(&self) -> Vec<Arc<LogFiles>> {
        self.proc.log_files()
    }
}

/// One Envoy sidecar from `envoy/sidecar.yaml`, with its own binary path (so its own
/// SPIFFE ID) registered as `spiffe://<td>/<name>`.
pub struct SidecarSpec {
    pub name: String,
    pub sds_socket: PathBuf,
    /// Who may call this sidecar's inbound listener.
    pub inbound_allowed: String,
    /// Where its outbound listener goes, and who must answer there.
    pub upstream_port: u16,
    pub upstream_spiffe_id: String,
    /// `GRPC` (StreamSecrets) or `DELTA_GRPC` (DeltaSecrets).
    pub api_type: &'static str,
}

/// Two sidecars on one SDS socket: `server` admits only `client`, `client` dials `server`
/// and accepts only `server`'s SPIFFE ID. `api_type` as in [`SidecarSpec::api_type`].
pub fn start_mtls_pair(spire: &Spire, socket: &Path, api_type: &'static str) -> (Sidecar, Sidecar) {
    let mut server_spec = SidecarSpec::new("server", socket);
    server_spec.inbound_allowed = spire.id("client");
    server_spec.api_type = api_type;
    let server = Sidecar::start(spire, &server_spec);
    let mut client_spec = SidecarSpec::new("client", socket);
    client_spec.upstream_port = server.inbound().port();
    client_spec.upstream_spiffe_id = server.spiffe_id.clone();
    client_spec.api_type = api_type;
    let client = Sidecar::start(spire, &client_spec);
    (server, client)
}

impl SidecarSpec {
    pub fn new(name: &str, sds_socket: &Path) -> SidecarSpec {
        SidecarSpec {
            name: name.to_owned(),
            sds_socket: sds_socket.to_path_buf(),
            inbound_allowed: "spiffe://nobody.invalid/none".to_owned(),
            upstream_port: 9,
            upstream_spiffe_id: "spiffe://nobody.invalid/none".to_owned(),
            api_type: "GRPC",
        }
    }

    /// `envoy/sidecar.yaml` with every placeholder filled (ports 0: read them back from
    /// Envoy's admin API).
    pub fn render(&self) -> String {
        let template = std::fs::read_to_string(manifest_dir().join("envoy/sidecar.yaml")).unwrap();
        let values = [
            ("NODE_ID", self.name.clone()),
            ("ADMIN_PORT", "0".into()),
            ("SDS_SOCKET", self.sds_socket.display().to_string()),
            ("UPSTREAM_ADDRESS", "127.0.0.1".into()),
            ("UPSTREAM_PORT", self.upstream_port.to_string()),
            ("UPSTREAM_SPIFFE_ID", self.upstream_spiffe_id.clone()),
            ("INBOUND_PORT", "0".into()),
            ("INBOUND_ALLOWED_SPIFFE_ID", self.inbound_allowed.clone()),
            ("OUTBOUND_PORT", "0".into()),
        ];
        let mut config = template;
        for (key, value) in values {
            config = config.replace(&format!("${{{key}}}"), &value);
        }
        let unfilled = config
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .any(|l| l.contains("${"));
        assert!(!unfilled, "unfilled placeholder in sidecar config");
        config.replace("api_type: GRPC", &format!("api_type: {}", self.api_type))
    }
}

pub struct Sidecar {
    pub envoy: Envoy,
    pub spiffe_id: String,
    pub binary: PathBuf,
}

impl Sidecar {
    /// Registers the sidecar's binary copy and starts Envoy; waits until it is ready, which
    /// with `initial_fetch_timeout: 0s` means its secrets arrived over SDS.
    pub fn start(spire: &Spire, spec: &SidecarSpec) -> Sidecar {
        Sidecar::start_with_config(spire, &spec.name, &spec.render())
    }

    pub fn start_with_config(spire: &Spire, name: &str, config: &str) -> Sidecar {
        let binary = workload_binary(name, &peer("envoy"));
        let spiffe_id = spire.id(&format!("/{name}"));
        spire.create_entry(&EntrySpec::for_path(&spiffe_id, &binary));
        let envoy = Envoy::start_with(
            config,
            EnvoyOptions {
                binary: Some(binary.clone()),
                ..EnvoyOptions::default()
            },
        );
        Sidecar {
            envoy,
            spiffe_id,
            binary,
        }
    }

    pub fn inbound(&self) -> SocketAddr {
        SocketAddr::from((
            [127, 0, 0, 1],
            self.envoy
                .listener_port("inbound")
                .expect("inbound listener"),
        ))
    }

    pub fn outbound(&self) -> SocketAddr {
        SocketAddr::from((
            [127, 0, 0, 1],
            self.envoy
                .listener_port("outbound")
                .expect("outbound listener"),
        ))
    }

    /// Serial numbers (hex) of the certificate chains Envoy holds (`/certs`, E45).
    pub fn cert_serials(&self) -> Vec<String> {
        let certs: serde_json::Value =
            serde_json::from_str(&self.envoy.admin_get("/certs")).unwrap();
        certs["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["cert_chain"].as_array().cloned().unwrap_or_default())
            .filter_map(|c| c["serial_number"].as_str().map(str::to_owned))
            .collect()
    }

    pub fn stat(&self, name: &str) -> u64 {
        self.envoy.stat(name).unwrap_or(0)
    }
}

impl LogSource for Sidecar {
    fn log_files(&self) -> Vec<Arc<LogFiles>> {
        self.envoy.log_files()
    }
}

/// A tonic SDS client on the bridge's socket, from this (test) process.
pub fn sds_client(socket: &Path) -> SecretDiscoveryServiceClient<tonic::transport::Channel> {
    SecretDiscoveryServiceClient::new(crate::identity::source::unix_channel(socket.to_path_buf()))
}

pub fn request(names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: "test".into(),
            cluster: "test".into(),
            ..Default::default()
        }),
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        type_url: SECRET_TYPE_URL.into(),
        ..Default::default()
    }
}

/// An open StreamSecrets stream: send requests, receive responses.
pub struct SdsStream {
    pub tx: tokio::sync::mpsc::Sender<DiscoveryRequest>,
    pub rx: tonic::Streaming<DiscoveryResponse>,
}

impl SdsStream {
    pub async fn open(socket: &Path, first: DiscoveryRequest) -> Result<SdsStream, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(first).await.unwrap();
        let responses = sds_client(socket)
            .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?;
        Ok(SdsStream {
            tx,
            rx: responses.into_inner(),
        })
    }

    /// The next response, or the stream's error; panics after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<DiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(timeout, self.rx.message()).await {
            Ok(Ok(Some(response))) => Ok(response),
            Ok(Ok(None)) => Err(tonic::Status::ok("stream ended")),
            Ok(Err(status)) => Err(status),
            Err(_) => panic!("no SDS response within {timeout:?}"),
        }
    }

    pub async fn ack(&self, names: &[&str], response: &DiscoveryResponse) {
        let mut ack = request(names);
        ack.node = None;
        ack.version_info = response.version_info.clone();
        ack.response_nonce = response.nonce.clone();
        self.tx.send(ack).await.unwrap();
    }
}

pub fn secrets_of(response: &DiscoveryResponse) -> Vec<Secret> {
    response
        .resources
        .iter()
        .map(|any| Secret::decode(any.value.as_slice()).unwrap())
        .collect()
}
