//! A real gRPC C-core client (Python grpcio, tests/grpcio_client.py) against a tonic server on
//! a Unix socket. C-core clients send the percent-encoded socket path as `:authority`, which
//! hyper/h2 refuses (docs/behaviours.md, "gRPC C-core clients and :authority");
//! `uds::incoming` must get them served, with the caller's credentials intact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use futures::Stream;
use prost::Message;
use svid_bridge::uds::{self, SocketAccess};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status, Streaming};

const FETCH_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets";
const TEST_DEADLINE: Duration = Duration::from_secs(60);

/// Stands in for the bridge's SDS service: FetchSecrets answers with the PID the server saw
/// through SO_PEERCRED (in `version_info`) and the requested names (in `nonce`).
struct FakeSds;

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for FakeSds {
    type DeltaSecretsStream = Responses<DeltaDiscoveryResponse>;
    type StreamSecretsStream = Responses<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("fake SDS: FetchSecrets only"))
    }

    async fn stream_secrets(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        Err(Status::unimplemented("fake SDS: FetchSecrets only"))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let pid = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .and_then(|cred| cred.pid())
            .ok_or_else(|| Status::internal("no peer credentials"))?;
        Ok(Response::new(DiscoveryResponse {
            version_info: format!("pid={pid}"),
            nonce: request.get_ref().resource_names.join(","),
            ..Default::default()
        }))
    }
}

struct Server {
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Serves the fake on a fresh socket, through `uds::incoming` or, to show the bug, on
    /// plain accepted streams.
    fn start(with_adapter: bool) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sds.sock");
        let listener = uds::bind(&socket, SocketAccess::Owner).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .add_service(SecretDiscoveryServiceServer::new(FakeSds));
        let signal = async {
            let _ = stopped.await;
        };
        let task = if with_adapter {
            tokio::spawn(router.serve_with_incoming_shutdown(uds::incoming(listener), signal))
        } else {
            let plain = tokio_stream::wrappers::UnixListenerStream::new(listener);
            tokio::spawn(router.serve_with_incoming_shutdown(plain, signal))
        };
        Server {
            socket,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap().unwrap();
    }
}

fn peer_python() -> PathBuf {
    let dir = match std::env::var_os("SVID_BRIDGE_PEERS_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers/bin"),
    };
    let python = dir.join("python");
    if !python.exists() {
        panic!(
            "peer python (grpcio) is missing: run make peers (looked for {})",
            python.display()
        );
    }
    python
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd hex {hex:?}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[derive(Debug)]
enum Outcome {
    Ok(DiscoveryResponse),
    Error(String),
}

/// Runs tests/grpcio_client.py: `calls` FetchSecrets calls on one channel to `target`.
/// Returns the client's PID and each call's outcome.
async fn grpcio_fetch(target: String, calls: usize) -> (u32, Vec<Outcome>) {
    let request = DiscoveryRequest {
        resource_names: vec!["default".into()],
        ..Default::default()
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpcio_client.py");
    let mut command = std::process::Command::new(peer_python());
    command
        .arg(script)
        .arg(&target)
        .arg(FETCH_SECRETS)
        .arg(to_hex(&request.encode_to_vec()))
        .arg(calls.to_string());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "grpcio_client.py {target}: {}\n{stdout}\n{stderr}",
        output.status
    );

    let mut lines = stdout.lines();
    let pid = lines
        .next()
        .and_then(|l| l.strip_prefix("pid "))
        .and_then(|p| p.parse().ok());
    let pid =
        pid.unwrap_or_else(|| panic!("no pid line from grpcio_client.py:\n{stdout}\n{stderr}"));
    let outcomes: Vec<_> = lines
        .map(|line| match line.split_once(' ') {
            Some(("ok", hex)) => {
                Outcome::Ok(DiscoveryResponse::decode(&from_hex(hex)[..]).unwrap())
            }
            Some(("error", status)) => Outcome::Error(status.to_string()),
            _ => panic!("unexpected line {line:?} from grpcio_client.py\n{stderr}"),
        })
        .collect();
    assert_eq!(outcomes.len(), calls, "{stdout}\n{stderr}");
    (pid, outcomes)
}

async fn with_deadline<F: std::future::Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_DEADLINE, test)
        .await
        .expect("test deadline")
}

#[tokio::test]
async fn grpcio_is_refused_without_the_adapter() {
    with_deadline(async {
        let server = Server::start(false);
        let (_, outcomes) = grpcio_fetch(format!("unix:{}", server.socket.display()), 1).await;
        // h2 resets the stream (PROTOCOL_ERROR, code 1) for its :authority before tonic sees
        // it; grpcio 1.85 reports "INTERNAL Stream removed (RST_STREAM (Received RST_STREAM
        // with error code 1))".
        match &outcomes[0] {
            Outcome::Error(status) => {
                assert!(
                    status.starts_with("INTERNAL") && status.contains("RST_STREAM"),
                    "{status}"
                );
            }
            Outcome::Ok(response) => {
                panic!("the bug is gone? grpcio got {response:?} without the adapter")
            }
        }
        server.stop().await;
    })
    .await;
}

async fn grpcio_is_served_through_the_adapter(target_of: fn(&Path) -> String) {
    let server = Server::start(true);
    // Two calls on one connection: the second refers to the first's HPACK table entries.
    let (pid, outcomes) = grpcio_fetch(target_of(&server.socket), 2).await;
    for outcome in &outcomes {
        match outcome {
            Outcome::Ok(response) => {
                assert_eq!(
                    response.version_info,
                    format!("pid={pid}"),
                    "the PID SO_PEERCRED gave the server"
                );
                assert_eq!(response.nonce, "default");
            }
            Outcome::Error(status) => panic!("grpcio call failed through the adapter: {status}"),
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn grpcio_is_served_through_the_adapter_with_a_unix_path_target() {
    with_deadline(grpcio_is_served_through_the_adapter(|socket| {
        format!("unix:{}", socket.display())
    }))
    .await;
}

#[tokio::test]
async fn grpcio_is_served_through_the_adapter_with_a_unix_url_target() {
    with_deadline(grpcio_is_served_through_the_adapter(|socket| {
        format!("unix://{}", socket.display())
    }))
    .await;
}

#[tokio::test]
async fn tonic_clients_are_still_served_through_the_adapter() {
    with_deadline(async {
        let server = Server::start(true);
        let socket = server.socket.clone();
        let channel = tonic::transport::Endpoint::from_static("http://sds-grpc")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .unwrap();
        let mut client = SecretDiscoveryServiceClient::new(channel);
        for _ in 0..2 {
            let request = DiscoveryRequest {
                resource_names: vec!["ROOTCA".into()],
                ..Default::default()
            };
            let response = client.fetch_secrets(request).await.unwrap().into_inner();
            assert_eq!(response.version_info, format!("pid={}", std::process::id()));
            assert_eq!(response.nonce, "ROOTCA");
        }
        drop(client);
        server.stop().await;
    })
    .await;
}
