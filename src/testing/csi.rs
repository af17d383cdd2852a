//! For the CSI suites and benchmarks: an in-process CSI plugin on temporary sockets,
//! kubelet-shaped requests and mount counting (private mount namespaces: [`super::mount_ns`]).

use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::CsiConfig;
use crate::csi::{self, CsiError, RegistrationStatus};
use crate::proto::csi::identity_client::IdentityClient;
use crate::proto::csi::node_client::NodeClient;
use crate::proto::csi::volume_capability::access_mode::Mode;
use crate::proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use crate::proto::csi::{NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability};
use tempfile::TempDir;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub const PLUGIN_NAME: &str = "csi.spiffe.io";
pub const NODE_ID: &str = "node-a";
/// The socket file inside the socket directory (the bridge's SDS socket in production).
pub const SOCKET_NAME: &str = "socket";
const STARTUP_DEADLINE: Duration = Duration::from_secs(20);

/// An in-process `csi::serve` on a temporary node layout:
/// `<root>/kubelet/{pods,plugins_registry}`, `<root>/plugins/csi.sock`, and the socket
/// directory `<root>/sockets` holding a listening socket.
pub struct Plugin {
    _root: TempDir,
    pub root: PathBuf,
    pub kubelet_root: PathBuf,
    pub pods_dir: PathBuf,
    pub mount_dir: PathBuf,
    pub csi_socket: PathBuf,
    pub config: CsiConfig,
    /// Listening in `mount_dir`, so tests can connect() through a published volume.
    pub listener: Option<StdUnixListener>,
    pub sds_serving: watch::Sender<bool>,
    pub registration: watch::Receiver<RegistrationStatus>,
    pub shutdown: CancellationToken,
    server: Option<JoinHandle<Result<(), CsiError>>>,
}

impl Plugin {
    /// Serving, with SDS reported ready and a socket in the socket directory.
    pub async fn start() -> Plugin {
        Self::start_with(true).await
    }

    pub async fn start_with(socket_in_mount_dir: bool) -> Plugin {
        let dir = tempfile::tempdir().expect("tempdir");
        // Real path: mountinfo shows real paths, and the bridge confines by real path.
        let root = dir.path().canonicalize().expect("canonical tempdir");
        let kubelet_root = root.join("kubelet");
        let pods_dir = kubelet_root.join("pods");
        let mount_dir = root.join("sockets");
        let plugins = root.join("plugins");
        for d in [&pods_dir, &mount_dir, &plugins] {
            std::fs::create_dir_all(d).expect("layout");
        }
        let listener = socket_in_mount_dir.then(|| {
            StdUnixListener::bind(mount_dir.join(SOCKET_NAME)).expect("socket in mount dir")
        });
        let config = CsiConfig {
            socket: plugins.join("csi.sock"),
            plugin_name: PLUGIN_NAME.to_owned(),
            mount_dir: mount_dir.clone(),
            node_id: NODE_ID.to_owned(),
            kubelet_root: kubelet_root.clone(),
            registration_endpoint: plugins.join("csi.sock"),
            register_with_kubelet: true,
        };
        let (sds_serving, sds_rx) = watch::channel(true);
        let (status_tx, mut registration) = watch::channel(RegistrationStatus::NotStarted);
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(csi::serve_with_registration(
            config.clone(),
            sds_rx,
            shutdown.clone(),
            status_tx,
            std::sync::Arc::new(crate::telemetry::metrics::Metrics::new()),
        ));
        // The registration step starts only once the CSI socket answered: no polling needed.
        tokio::time::timeout(
            STARTUP_DEADLINE,
            registration.wait_for(|s| *s != RegistrationStatus::NotStarted),
        )
        .await
        .expect("CSI plugin did not start in time")
        .expect("CSI plugin stopped during startup");
        Plugin {
            _root: dir,
            root,
            kubelet_root,
            pods_dir,
            mount_dir,
            csi_socket: config.socket.clone(),
            config,
            listener,
            sds_serving,
            registration,
            shutdown,
            server: Some(server),
        }
    }

    pub async fn channel(&self) -> Channel {
        csi::connect_uds(&self.csi_socket)
            .await
            .expect("connect to CSI socket")
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }

    /// The kubelet's target for an inline volume, with the parent the kubelet creates.
    pub fn target(&self, pod_uid: &str, volume: &str) -> PathBuf {
        let parent = self
            .pods_dir
            .join(pod_uid)
            .join("volumes/kubernetes.io~csi")
            .join(volume);
        std::fs::create_dir_all(&parent).expect("target parent");
        parent.join("mount")
    }

    /// Stops the server and returns its result.
    pub async fn stop(mut self) -> Result<(), CsiError> {
        self.shutdown.cancel();
        let server = self.server.take().expect("server running");
        tokio::time::timeout(STARTUP_DEADLINE, server)
            .await
            .expect("CSI plugin did not stop in time")
            .expect("CSI plugin task panicked")
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What the kubelet sends for `csi: {driver: csi.spiffe.io, readOnly: true}` with
/// `podInfoOnMount: true` (docs/behaviours.md, "Kubelet volume context").
pub fn publish_request(volume_id: &str, target: &Path) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }),
        readonly: true,
        volume_context: [
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("csi.storage.k8s.io/pod.name", "web-0"),
            ("csi.storage.k8s.io/pod.namespace", "default"),
            ("csi.storage.k8s.io/pod.uid", "c3a32fc0"),
            ("csi.storage.k8s.io/serviceAccount.name", "web"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        secrets: [("token".to_owned(), "never-logged".to_owned())].into(),
        ..Default::default()
    }
}

/// The pod whose `mode: pod` volume the kubelet publishes: what `podInfoOnMount` passes (PI-39).
pub struct PodInfo<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub service_account: &'a str,
}

/// NodePublishVolume of a `mode: pod` volume for `pod`, with the pod author's `attributes`.
pub fn pod_mode_request(
    volume_id: &str,
    target: &Path,
    pod: &PodInfo<'_>,
    attributes: &[(&str, &str)],
) -> NodePublishVolumeRequest {
    let mut request = publish_request(volume_id, target);
    request.secrets.clear();
    request.volume_context = [
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("csi.storage.k8s.io/pod.name", pod.name),
        ("csi.storage.k8s.io/pod.namespace", pod.namespace),
        ("csi.storage.k8s.io/pod.uid", pod.uid),
        (
            "csi.storage.k8s.io/serviceAccount.name",
            pod.service_account,
        ),
        ("mode", "pod"),
    ]
    .into_iter()
    .chain(attributes.iter().copied())
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    request
}

pub fn unpublish_request(volume_id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        target_path: target.to_string_lossy().into_owned(),
    }
}

/// Mounts stacked exactly at `path` in this namespace.
pub fn mounts_at(path: &Path) -> usize {
    let table = csi::mountinfo::read_own().expect("mountinfo");
    csi::mountinfo::mounts_at(&table, path)
}

/// Every mount point in this namespace at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let table = csi::mountinfo::read_own().expect("mountinfo");
    table
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect()
}

pub fn total_mounts() -> usize {
    csi::mountinfo::read_own().expect("mountinfo").len()
}

/// csi-sanity, built by `make peers` / `tests/peers/install.sh` into `target/peers/bin`.
pub fn csi_sanity_path() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers/bin/csi-sanity");
    assert!(
        path.is_file(),
        "{} is missing: run `make peers` (or `bash tests/peers/install.sh`)",
        path.display()
    );
    path
}

/// Log lines the plugin writes while a test runs (install once per process; the
/// mount-namespace tests run alone in theirs).
#[derive(Clone, Default)]
pub struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    pub fn install() -> LogCapture {
        let capture = LogCapture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(capture.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
        capture
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// `count` bind mounts of one directory onto as many directories below `dir`: a busy node.
pub fn add_mounts(dir: &Path, count: usize) {
    let source = dir.join("source");
    std::fs::create_dir_all(&source).unwrap();
    for i in 0..count {
        let target = dir.join(i.to_string());
        std::fs::create_dir(&target).unwrap();
        rustix::mount::mount_bind(&source, &target).unwrap();
    }
}

/// Undoes `add_mounts`, so the temporary directory can be deleted.
pub fn remove_mounts(dir: &Path, count: usize) {
    for i in 0..count {
        rustix::mount::unmount(dir.join(i.to_string()), rustix::mount::UnmountFlags::DETACH)
            .unwrap();
    }
}

/// Plays the kubelet's side of plugin registration on `registration_socket`: GetInfo, then
/// NotifyRegistrationStatus(registered); the plugin's answer to GetInfo.
pub async fn register_as_kubelet(
    registration_socket: &Path,
) -> crate::proto::pluginregistration::PluginInfo {
    use crate::proto::pluginregistration::registration_client::RegistrationClient;
    use crate::proto::pluginregistration::{InfoRequest, RegistrationStatus};

    let channel = csi::connect_uds(registration_socket)
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", registration_socket.display()));
    let mut kubelet = RegistrationClient::new(channel);
    let info = kubelet
        .get_info(InfoRequest {})
        .await
        .expect("GetInfo")
        .into_inner();
    kubelet
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .expect("NotifyRegistrationStatus");
    info
}
/// A simulated node: a kubelet root with `pods/` under /tmp (short paths: the socket is
/// reached as `<root>/pods/<uid>/volumes/kubernetes.io~csi/<vol>/mount/socket`).
pub struct NodeDirs {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
}

impl NodeDirs {
    #[allow(clippy::new_without_default)]
    pub fn new() -> NodeDirs {
        let tmp = tempfile::Builder::new()
            .prefix("sbk-")
            .tempdir_in("/tmp")
            .unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("pods")).unwrap();
        NodeDirs { _tmp: tmp, root }
    }

    pub fn csi_socket(&self) -> PathBuf {
        self.root.join("csi.sock")
    }

    pub fn pods(&self) -> PathBuf {
        self.root.join("pods")
    }

    /// The CSI flags for `svid-bridge run`.
    pub fn args(&self) -> Vec<String> {
        vec![
            format!("--csi-socket={}", self.csi_socket().display()),
            format!("--kubelet-root={}", self.root.display()),
            "--node-id=node-1".to_owned(),
        ]
    }

    /// The kubelet's target for pod `uid`'s inline volume, with the parent it creates.
    pub fn target(&self, uid: &str) -> PathBuf {
        let parent = self
            .pods()
            .join(uid)
            .join("volumes/kubernetes.io~csi/spiffe");
        std::fs::create_dir_all(&parent).unwrap();
        parent.join("mount")
    }
}

pub async fn node_client(socket: &Path) -> NodeClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match crate::csi::connect_uds(socket).await {
            Ok(channel) => return NodeClient::new(channel),
            Err(err) if Instant::now() > deadline => {
                panic!("CSI socket {}: {err}", socket.display())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// FetchSecrets `default` through `socket`: the leaf's description (`cert@<id>@…`).
pub async fn fetch_default(socket: &Path) -> Result<String, tonic::Status> {
    use crate::testing::bridge::{request, sds_client, secrets_of};
    let response = sds_client(socket)
        .fetch_secrets(request(&["default"]))
        .await?
        .into_inner();
    Ok(crate::testing::load::describe(&secrets_of(&response)[0]))
}
