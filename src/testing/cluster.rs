//! A real single-node Kubernetes, thrown away after use (docs/testing.md): etcd,
//! kube-apiserver, containerd + runc and the kubelet as child processes, everything under one
//! temporary root (certificates, kubeconfigs, etcd data, containerd root/state/config,
//! kubelet root dir, logs), on loopback only.
//!
//! What it is not: no scheduler, no controller-manager, no kube-proxy, no DNS, no CNI. Pods
//! are bound with `nodeName` and use `hostNetwork: true`; service accounts and the
//! `kube-root-ca.crt` ConfigMap are created by [`Cluster::ensure_namespace`].
//!
//! The kubelet and containerd use a few fixed host paths that no flag moves
//! (`/var/lib/kubelet/device-plugins`, `/run/containerd/{s,fifo,runc}`, the `kubepods` cgroups,
//! `/var/log/containers`), so only one node runs on a machine at a time: [`Cluster::start`]
//! takes an exclusive lock on `/run/svid-bridge-test-node.lock` first (other tests use their
//! own temporary kubelet roots and none of these paths). On drop (also when a test panics)
//! every process is stopped, every container process killed, every mount under the root
//! unmounted, the `kubepods` cgroups and the fixed paths the node created removed, then the
//! root itself.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::proc::{LogFiles, LogSource, Proc, fail_with_logs, wait_until_with};
use super::{free_port, manifest_dir, peer};

/// The node's name (also its CSI node ID: the bridge reads `spec.nodeName`).
pub const NODE_NAME: &str = "sb-node";
/// The local "registry" every test image is named under (nothing is ever pulled).
pub const IMAGE_REGISTRY: &str = "local.test";
/// containerd's sandbox image, built from target/peers/bin/pause.
pub const PAUSE_IMAGE: &str = "local.test/pause:1";
/// A busybox image (Debian's busybox-static): `sh`, `cat`, `wget`, `sleep`, ...
pub const BUSYBOX_IMAGE: &str = "local.test/busybox:1";

const START_TIMEOUT: Duration = Duration::from_secs(120);
const LOCK_PATH: &str = "/run/svid-bridge-test-node.lock";
/// Host paths the kubelet and containerd create whatever their configuration says.
const FIXED_PATHS: [&str; 4] = [
    "/var/lib/kubelet",
    "/run/containerd",
    "/var/log/containers",
    "/var/log/pods",
];

pub struct Cluster {
    root: PathBuf,
    kubeconfig: PathBuf,
    containerd_socket: PathBuf,
    api_port: u16,
    kubelet_read_only_port: u16,
    // Stopped in reverse order of start by Drop.
    /// Behind a lock so that [`Cluster::restart_kubelet`] works on a shared node.
    kubelet: Mutex<Option<Proc>>,
    containerd: Option<Proc>,
    /// Behind a lock so that [`Cluster::stop_apiserver`] and [`Cluster::start_apiserver`]
    /// work on a shared node.
    apiserver: Mutex<Option<Proc>>,
    /// kube-apiserver's arguments, kept from the boot to start it again the same way.
    apiserver_args: Vec<String>,
    etcd: Option<Proc>,
    /// Fixed host paths that did not exist before the node started (removed at teardown).
    created_fixed_paths: Vec<PathBuf>,
    kubepods_existed: bool,
    max_pods: u32,
    _lock: Flock<File>,
    keep: bool,
}

impl LogSource for Cluster {
    fn log_files(&self) -> Vec<Arc<LogFiles>> {
        let mut files: Vec<Arc<LogFiles>> = [&self.etcd, &self.containerd]
            .into_iter()
            .flatten()
            .flat_map(LogSource::log_files)
            .collect();
        if let Ok(a) = self.apiserver.try_lock()
            && let Some(a) = a.as_ref()
        {
            files.extend(a.log_files());
        }
        if let Ok(k) = self.kubelet.try_lock()
            && let Some(k) = k.as_ref()
        {
            files.extend(k.log_files());
        }
        files
    }
}

fn run(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({cmd:?}): {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}): {cmd:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn write_file(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn private(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 600 {}: {e}", path.display()));
}

/// Certificates signed by one throw-away CA (openssl CLI; keys are written 0600, inside a
/// 0700 root, and never printed).
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: PathBuf) -> Pki {
        std::fs::create_dir_all(&dir).expect("mkdir pki");
        let pki = Pki { dir };
        pki.key("ca");
        run(
            "openssl (CA)",
            Command::new("openssl")
                .args(["req", "-x509", "-new", "-sha256", "-days", "3"])
                .args(["-subj", "/CN=svid-bridge test node CA"])
                .arg("-key")
                .arg(pki.path("ca.key"))
                .arg("-out")
                .arg(pki.path("ca.crt")),
        );
        pki.key("sa");
        run(
            "openssl (service account public key)",
            Command::new("openssl")
                .args(["pkey", "-pubout"])
                .arg("-in")
                .arg(pki.path("sa.key"))
                .arg("-out")
                .arg(pki.path("sa.pub")),
        );
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn key(&self, name: &str) {
        let key = self.path(&format!("{name}.key"));
        run(
            "openssl genpkey",
            Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ])
                .arg("-out")
                .arg(&key),
        );
        private(&key);
    }

    /// `<name>.crt` / `<name>.key` for `subject`, with `san` (e.g. `IP:127.0.0.1`) if given.
    fn leaf(&self, name: &str, subject: &str, san: Option<&str>, usage: &str) {
        self.key(name);
        let csr = self.path(&format!("{name}.csr"));
        run(
            "openssl req",
            Command::new("openssl")
                .args(["req", "-new", "-subj", subject])
                .arg("-key")
                .arg(self.path(&format!("{name}.key")))
                .arg("-out")
                .arg(&csr),
        );
        let ext = self.path(&format!("{name}.ext"));
        let mut text = format!("keyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n");
        if let Some(san) = san {
            text.push_str(&format!("subjectAltName={san}\n"));
        }
        write_file(&ext, &text);
        run(
            "openssl x509 -req",
            Command::new("openssl")
                .args(["x509", "-req", "-sha256", "-days", "3", "-set_serial"])
                .arg(format!("0x{:x}", rand_serial()))
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(self.path("ca.crt"))
                .arg("-CAkey")
                .arg(self.path("ca.key"))
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(self.path(&format!("{name}.crt"))),
        );
    }
}

fn rand_serial() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    (nanos as u64) ^ (u64::from(std::process::id()) << 32) | 1
}

fn kubeconfig(pki: &Pki, api_port: u16, user: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: node
  cluster:
    server: https://127.0.0.1:{api_port}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    client-certificate: {crt}
    client-key: {key}
contexts:
- name: node
  context: {{cluster: node, user: {user}}}
current-context: node
",
        ca = pki.path("ca.crt").display(),
        crt = pki.path(&format!("{user}.crt")).display(),
        key = pki.path(&format!("{user}.key")).display(),
    )
}

impl Cluster {
    /// Starts a node under a fresh temporary root (see the module docs) and waits until the
    /// Node object exists and the `default` namespace has its service account. Takes about
    /// 5-10 s once the binaries are built (`make peers`).
    pub fn start() -> Cluster {
        // The kubelet's own default.
        Cluster::start_with_max_pods(110)
    }

    /// [`Cluster::start`] with the kubelet's `maxPods` set: benches/k8s_pods.rs runs 110
    /// workload pods beside the SPIFFE components' own pods.
    pub fn start_with_max_pods(max_pods: u32) -> Cluster {
        let started = Instant::now();
        let mut cluster = Cluster::unbooted(max_pods);
        cluster.boot_control_plane(&[]);
        cluster.boot_node();
        eprintln!(
            "cluster: node {NODE_NAME} up in {:.1}s under {} (KUBECONFIG={})",
            started.elapsed().as_secs_f64(),
            cluster.root.display(),
            cluster.kubeconfig.display()
        );
        cluster
    }

    /// etcd and kube-apiserver only, with `extra_apiserver_args` (e.g. an audit log): no
    /// containerd, no kubelet, so pods bound to [`NODE_NAME`] are API objects that nothing
    /// runs (benches/k8s_pod_view.rs). Takes the node lock like [`Cluster::start`].
    pub fn start_control_plane(extra_apiserver_args: &[String]) -> Cluster {
        let started = Instant::now();
        let mut cluster = Cluster::unbooted(110);
        cluster.boot_control_plane(extra_apiserver_args);
        eprintln!(
            "cluster: etcd and kube-apiserver up in {:.1}s under {} (KUBECONFIG={})",
            started.elapsed().as_secs_f64(),
            cluster.root.display(),
            cluster.kubeconfig.display()
        );
        cluster
    }

    /// The lock taken, the root created, nothing started.
    fn unbooted(max_pods: u32) -> Cluster {
        let lock_file =
            File::create(LOCK_PATH).unwrap_or_else(|e| panic!("create {LOCK_PATH}: {e}"));
        let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((file, _)) => {
                eprintln!("cluster: another test node runs on this machine; waiting for it");
                Flock::lock(file, FlockArg::LockExclusive)
                    .unwrap_or_else(|(_, e)| panic!("lock {LOCK_PATH}: {e}"))
            }
        };
        // Short: socket paths under the kubelet root must fit in sun_path.
        let root = tempfile::Builder::new()
            .prefix("sb-k8s-")
            .tempdir_in("/tmp")
            .expect("create the node root under /tmp")
            .keep();
        let keep = std::env::var("SVID_BRIDGE_KEEP_TMP").is_ok_and(|v| v == "1");
        let created_fixed_paths = FIXED_PATHS
            .iter()
            .map(PathBuf::from)
            .filter(|p| !p.exists())
            .collect();
        let kubepods_existed = Path::new("/sys/fs/cgroup/memory/kubepods").exists();
        for sub in [
            "logs",
            "etcd",
            "containerd",
            "kubelet",
            "images",
            "pod-logs",
        ] {
            std::fs::create_dir_all(root.join(sub)).expect("mkdir node dir");
        }
        Cluster {
            kubeconfig: root.join("admin.kubeconfig"),
            containerd_socket: root.join("containerd/containerd.sock"),
            api_port: free_port(),
            kubelet_read_only_port: free_port(),
            root,
            kubelet: Mutex::new(None),
            containerd: None,
            apiserver: Mutex::new(None),
            apiserver_args: Vec::new(),
            etcd: None,
            created_fixed_paths,
            kubepods_existed,
            max_pods,
            _lock: lock,
            keep,
        }
    }

    /// Certificates, kubeconfigs, etcd and kube-apiserver (with `extra_apiserver_args`).
    fn boot_control_plane(&mut self, extra_apiserver_args: &[String]) {
        let root = self.root.clone();
        let logs = root.join("logs");
        let pki = Pki::new(root.join("pki"));
        pki.leaf(
            "apiserver",
            "/CN=kube-apiserver",
            Some("IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc"),
            "serverAuth",
        );
        pki.leaf("admin", "/O=system:masters/CN=admin", None, "clientAuth");
        pki.leaf(
            "kubelet",
            &format!("/O=system:nodes/CN=system:node:{NODE_NAME}"),
            None,
            "clientAuth",
        );
        pki.leaf(
            "apiserver-kubelet-client",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            None,
            "clientAuth",
        );
        write_file(&self.kubeconfig, &kubeconfig(&pki, self.api_port, "admin"));
        let kubelet_kubeconfig = root.join("kubelet.kubeconfig");
        write_file(
            &kubelet_kubeconfig,
            &kubeconfig(&pki, self.api_port, "kubelet"),
        );

        // etcd (Debian's), plain HTTP on loopback.
        let etcd_port = free_port();
        let etcd_peer = free_port();
        let mut cmd = Command::new("etcd");
        cmd.arg("--name=node")
            .arg(format!("--data-dir={}", root.join("etcd/data").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{etcd_port}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"
            ))
            .arg(format!(
                "--initial-cluster=node=http://127.0.0.1:{etcd_peer}"
            ))
            .arg("--listen-metrics-urls=")
            .arg("--log-level=warn");
        self.etcd = Some(Proc::spawn("etcd", cmd, &logs));
        let etcd_addr = std::net::SocketAddr::from(([127, 0, 0, 1], etcd_port));
        self.wait("etcd answers /health", || {
            super::http::get(etcd_addr, "/health")
                .ok()
                .filter(|r| r.status == 200 && r.body.contains("true"))
        });

        self.apiserver_args = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={}", self.api_port),
            format!(
                "--cert-dir={}",
                root.join("pki/apiserver-generated").display()
            ),
            format!("--tls-cert-file={}", pki.path("apiserver.crt").display()),
            format!(
                "--tls-private-key-file={}",
                pki.path("apiserver.key").display()
            ),
            format!("--client-ca-file={}", pki.path("ca.crt").display()),
            format!(
                "--kubelet-client-certificate={}",
                pki.path("apiserver-kubelet-client.crt").display()
            ),
            format!(
                "--kubelet-client-key={}",
                pki.path("apiserver-kubelet-client.key").display()
            ),
            "--kubelet-preferred-address-types=InternalIP".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!(
                "--service-account-key-file={}",
                pki.path("sa.pub").display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                pki.path("sa.key").display()
            ),
            "--service-cluster-ip-range=10.96.0.0/24".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            "--allow-privileged=true".into(),
            // The advertise address is loopback: no `kubernetes` Service endpoints.
            "--endpoint-reconciler-type=none".into(),
            "--profiling=false".into(),
            "-v=1".into(),
        ];
        self.apiserver_args
            .extend(extra_apiserver_args.iter().cloned());
        self.start_apiserver();
    }

    /// etcd and kube-apiserver are up: the rest of the node.
    fn boot_node(&mut self) {
        let root = self.root.clone();
        let logs = root.join("logs");
        let pki = Pki {
            dir: root.join("pki"),
        };
        let kubelet_kubeconfig = root.join("kubelet.kubeconfig");

        // containerd, with its own root, state and socket.
        let c = root.join("containerd");
        let config = c.join("config.toml");
        write_file(
            &config,
            &format!(
                r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # root here lacks CAP_SYS_RESOURCE: the sandbox's oom_score_adj -998 would fail runc.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}/bin"
    conf_dir = "{cni}/conf"
"#,
                root = c.join("root").display(),
                state = c.join("state").display(),
                sock = self.containerd_socket.display(),
                opt = c.join("opt").display(),
                cni = c.join("cni").display(),
            ),
        );
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        self.containerd = Some(Proc::spawn("containerd", cmd, &logs));
        self.wait("containerd serves its socket", || {
            let out = self.ctr_output(&["version"]);
            out.status.success().then_some(())
        });
        self.import_image(
            PAUSE_IMAGE,
            &[(peer("pause"), "/pause")],
            &["--entrypoint", "/pause"],
        );
        let mut busybox_args = vec!["--entrypoint".to_string(), "/bin/sh".to_string()];
        for applet in [
            "sh", "cat", "ls", "sleep", "wget", "grep", "test", "stat", "echo",
        ] {
            busybox_args.push("--link".to_string());
            busybox_args.push(format!("/bin/{applet}=busybox"));
        }
        let busybox_refs: Vec<&str> = busybox_args.iter().map(String::as_str).collect();
        self.import_image(
            BUSYBOX_IMAGE,
            &[(PathBuf::from("/bin/busybox"), "/bin/busybox")],
            &busybox_refs,
        );

        // The kubelet.
        let config = root.join("kubelet.yaml");
        write_file(
            &config,
            &format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: {port}
readOnlyPort: {ro}
healthzBindAddress: 127.0.0.1
healthzPort: 0
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://{containerd}
volumePluginDir: {plugins}
podLogsDir: {pod_logs}
staticPodPath: ""
evictionHard: {{memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
syncFrequency: 5s
fileCheckFrequency: 5s
nodeStatusUpdateFrequency: 5s
maxPods: {max_pods}
"#,
                port = free_port(),
                ro = self.kubelet_read_only_port,
                ca = pki.path("ca.crt").display(),
                containerd = self.containerd_socket.display(),
                plugins = root.join("volume-plugins").display(),
                pod_logs = root.join("pod-logs").display(),
                max_pods = self.max_pods,
            ),
        );
        self.start_kubelet_with(&config, &kubelet_kubeconfig);
        self.wait("the kubelet registers Node sb-node", || {
            self.kubectl_output(&["get", "node", NODE_NAME])
                .status
                .success()
                .then_some(())
        });
        self.ensure_namespace("default");
    }

    fn start_kubelet_with(&self, config: &Path, kubeconfig: &Path) {
        let mut cmd = Command::new(peer("kubelet"));
        cmd.arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", self.kubelet_root().display()))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg("-v=2");
        *self.kubelet.lock().expect("kubelet lock") =
            Some(Proc::spawn("kubelet", cmd, &self.root.join("logs")));
    }

    /// Starts kube-apiserver with the arguments of the boot (it must not be running) and
    /// waits until it answers `/readyz`.
    pub fn start_apiserver(&self) {
        {
            let mut apiserver = self.apiserver.lock().expect("apiserver lock");
            assert!(apiserver.is_none(), "kube-apiserver already runs");
            let mut cmd = Command::new(peer("kube-apiserver"));
            cmd.args(&self.apiserver_args);
            *apiserver = Some(Proc::spawn("kube-apiserver", cmd, &self.root.join("logs")));
        }
        self.wait("kube-apiserver answers /readyz", || {
            let out = self.kubectl_output(&["get", "--raw", "/readyz"]);
            (out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok")
                .then_some(())
        });
    }

    /// The node's CA certificate (PEM): it signs the apiserver's serving certificate and every
    /// certificate of [`Cluster::issue_serving_cert`].
    pub fn ca_cert_path(&self) -> PathBuf {
        self.root.join("pki/ca.crt")
    }

    /// A serving certificate for a component running beside the node (istiod in
    /// tests/istio_real.rs), signed by the node's CA: `<root>/pki/<name>.crt` and `.key`
    /// (0600), with `san` (e.g. `IP:127.0.0.1,DNS:istiod.istio-system.svc`).
    pub fn issue_serving_cert(&self, name: &str, subject: &str, san: &str) -> (PathBuf, PathBuf) {
        let pki = Pki {
            dir: self.root.join("pki"),
        };
        pki.leaf(name, subject, Some(san), "serverAuth");
        (
            pki.path(&format!("{name}.crt")),
            pki.path(&format!("{name}.key")),
        )
    }

    /// Stops kube-apiserver (SIGTERM, then SIGKILL after 5 s): every client of the API,
    /// the kubelet too, finds it unreachable until [`Cluster::start_apiserver`].
    pub fn stop_apiserver(&self) {
        if let Some(mut a) = self.apiserver.lock().expect("apiserver lock").take() {
            a.stop_within(Duration::from_secs(5));
        }
    }

    /// Stops the kubelet (SIGTERM) and starts it again with the same configuration; waits
    /// until it has reported the node's status again.
    pub fn restart_kubelet(&self) {
        let before = self.node_heartbeat();
        if let Some(mut k) = self.kubelet.lock().expect("kubelet lock").take() {
            k.stop();
        }
        let config = self.root.join("kubelet.yaml");
        let kubeconfig = self.root.join("kubelet.kubeconfig");
        self.start_kubelet_with(&config, &kubeconfig);
        self.wait(
            "the restarted kubelet updates the node's Ready heartbeat",
            || {
                let now = self.node_heartbeat();
                (!now.is_empty() && now != before).then_some(())
            },
        );
    }

    fn node_heartbeat(&self) -> String {
        let out = self.kubectl_output(&[
            "get",
            "node",
            NODE_NAME,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].lastHeartbeatTime}",
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn wait<T>(&self, what: &str, f: impl FnMut() -> Option<T>) -> T {
        wait_until_with(START_TIMEOUT, what, &[self], f)
    }

    /// The temporary root everything lives under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The kubelet's `--root-dir` (the chart's `kubeletPath`).
    pub fn kubelet_root(&self) -> PathBuf {
        self.root.join("kubelet")
    }

    /// The admin kubeconfig (`system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// The kubelet's unauthenticated read-only port (for SPIRE's `k8s` workload attestor).
    pub fn kubelet_read_only_port(&self) -> u16 {
        self.kubelet_read_only_port
    }

    /// `kubectl --kubeconfig <admin> ARGS`, whatever its exit status.
    pub fn kubectl_output(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }

    /// `kubectl ARGS`, its stdout; fails the test (with the node's logs) when it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        if !out.status.success() {
            fail_with_logs(
                &format!(
                    "kubectl {args:?} failed ({}):\n{}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                &[self],
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl ARGS` with `stdin` (e.g. `apply -f -`), whatever its exit status.
    pub fn kubectl_stdin_output(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new("kubectl")
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write kubectl stdin");
        child.wait_with_output().expect("wait for kubectl")
    }

    /// `kubectl apply -f -` of `manifest` (YAML or JSON); fails the test when it fails.
    pub fn apply(&self, manifest: &str) -> String {
        let out = self.kubectl_stdin_output(&["apply", "-f", "-"], manifest);
        if !out.status.success() {
            fail_with_logs(
                &format!(
                    "kubectl apply failed ({}):\n{}{}\n--- manifest ---\n{manifest}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                &[self],
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates `ns` if needed, with what the controller-manager would give it: the `default`
    /// ServiceAccount and the `kube-root-ca.crt` ConfigMap (projected token volumes need it).
    pub fn ensure_namespace(&self, ns: &str) {
        let ca = std::fs::read_to_string(self.root.join("pki/ca.crt")).expect("read ca.crt");
        let ca_json = serde_json::to_string(&ca).expect("json");
        self.apply(&format!(
            r#"{{"apiVersion": "v1", "kind": "List", "items": [
  {{"apiVersion": "v1", "kind": "Namespace", "metadata": {{"name": "{ns}"}}}},
  {{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {{"name": "default", "namespace": "{ns}"}}}},
  {{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {{"name": "kube-root-ca.crt", "namespace": "{ns}"}},
   "data": {{"ca.crt": {ca_json}}}}}
]}}"#
        ));
    }

    /// `ctr --address <our containerd> -n k8s.io ARGS`.
    pub fn ctr_output(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.containerd_socket)
            .args(["-n", "k8s.io"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// Builds an image with deploy/image/oci-image.py (`files`: host path → image path, with
    /// the shared libraries they link; `extra`: more oci-image.py arguments) and imports it
    /// into the node's containerd under `name`.
    pub fn import_image(&self, name: &str, files: &[(PathBuf, &str)], extra: &[&str]) {
        let tar = self
            .root
            .join("images")
            .join(format!("{}.tar", name.replace(['/', ':'], "_")));
        let mut cmd = Command::new("python3");
        cmd.arg(manifest_dir().join("deploy/image/oci-image.py"))
            .arg("--name")
            .arg(name)
            .arg("--out")
            .arg(&tar)
            .arg("--libs")
            .args(extra);
        for (src, dest) in files {
            cmd.arg(format!("{}={dest}", src.display()));
        }
        run(&format!("oci-image.py {name}"), &mut cmd);
        let tar_str = tar.to_str().expect("utf-8 path");
        let out = self.ctr_output(&["images", "import", tar_str]);
        if !out.status.success() {
            fail_with_logs(
                &format!(
                    "ctr images import {name} failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                &[self],
            );
        }
        let _ = std::fs::remove_file(&tar);
    }

    /// Mount points under `dir` in the host's mount table (/proc/self/mountinfo, unescaped).
    pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| PathBuf::from(unescape_mount_path(p)))
            .filter(|p| p.starts_with(dir))
            .collect()
    }

    fn teardown(&mut self) {
        // The kubelet first (it would restart what we kill), then the containers: every
        // process in the kubepods cgroups, then their shims through containerd.
        let kubelet = self.kubelet.get_mut().map(Option::take);
        if let Ok(Some(mut k)) = kubelet {
            k.stop_within(Duration::from_secs(5));
        }
        for _ in 0..3 {
            kill_cgroup_tree(Path::new("/sys/fs/cgroup/pids/kubepods"));
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(mut c) = self.containerd.take() {
            c.stop_within(Duration::from_secs(5));
        }
        if let Ok(Some(mut a)) = self.apiserver.get_mut().map(Option::take) {
            a.stop_within(Duration::from_secs(5));
        }
        if let Some(mut e) = self.etcd.take() {
            e.stop_within(Duration::from_secs(5));
        }
        // containerd shims outlive containerd; ours name our socket on their command line.
        kill_processes_mentioning(&self.containerd_socket);
        // Deepest first; lazily, so a busy mount cannot stop the cleanup.
        let mut mounts = Cluster::mounts_under(&self.root);
        mounts.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for m in mounts {
            if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
                eprintln!("cluster: umount {}: {e}", m.display());
            }
        }
        if !self.kubepods_existed {
            for ctrl in cgroup_v1_controllers() {
                remove_cgroup_tree(&ctrl.join("kubepods"));
            }
            remove_cgroup_tree(Path::new("/sys/fs/cgroup/unified/kubepods"));
        }
        for p in &self.created_fixed_paths {
            let _ = std::fs::remove_dir_all(p);
        }
        if self.keep {
            eprintln!(
                "cluster: keeping {} (SVID_BRIDGE_KEEP_TMP=1)",
                self.root.display()
            );
        } else if let Err(e) = std::fs::remove_dir_all(&self.root) {
            eprintln!("cluster: cannot remove {}: {e}", self.root.display());
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "cluster: a test failed; node logs under {} (kept when SVID_BRIDGE_KEEP_TMP=1)",
                self.root.join("logs").display()
            );
        }
        self.teardown();
    }
}

/// `\040` and friends in mountinfo paths.
fn unescape_mount_path(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&p[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cgroup_v1_controllers() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n != "unified"))
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILL to every process in `dir` and its sub-cgroups.
fn kill_cgroup_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            kill_cgroup_tree(&e.path());
        }
    }
}

/// rmdir of a cgroup, children first.
fn remove_cgroup_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// SIGKILL to every process whose command line contains `needle` (the node's containerd
/// socket: only the shims of this node have it).
fn kill_processes_mentioning(needle: &Path) {
    let needle = needle.as_os_str().as_encoded_bytes();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    let me = std::process::id();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// A pod's status phase and condition, from `kubectl get pod -o json`.
pub fn pod_json(cluster: &Cluster, ns: &str, name: &str) -> Option<serde_json::Value> {
    let out = cluster.kubectl_output(&["get", "pod", "-n", ns, name, "-o", "json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Events in `ns` about object `name`: (reason, message).
pub fn events_for(cluster: &Cluster, ns: &str, name: &str) -> Vec<(String, String)> {
    let out = cluster.kubectl_output(&[
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        &format!("involvedObject.name={name}"),
        "-o",
        "json",
    ]);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return Vec::new();
    };
    v["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|e| {
                    (
                        e["reason"].as_str().unwrap_or_default().to_string(),
                        e["message"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Labels → a `key=value,...` selector.
pub fn selector(labels: &BTreeMap<&str, &str>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
