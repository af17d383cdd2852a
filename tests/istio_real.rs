//! Real Istio with SPIRE through svid-bridge (issue 18, docs/testing.md "Real Istio"):
//! istiod (pilot-discovery) and pilot-agent built from Istio's own module
//! (tests/peers/istio.sh), istiod installed from Istio's own chart with
//! deploy/istio/istiod-values.yaml against the test bed's real kube-apiserver, pilot-agent
//! running the test bed's Envoy.
//!
//! `make peers` builds Istio with the other peers; `make test` runs these tests with the rest
//! and `make test-istio` runs only them. Without the build they fail saying what to run.
//!
//! What differs from a cluster: istiod and pilot-agent run as processes of this host, not in
//! pods (the control plane has no kubelet); istiod serves on loopback with a serving
//! certificate from the test node's CA, and the chart's injection webhook points at it by URL
//! (`istiodRemote.injectionURL`). pilot-agent runs in a directory laid out like the proxy
//! image (its paths are relative: `./var/run/secrets/...`), its service-account token comes
//! from the TokenRequest API, and svid-bridge's SDS socket is linked where the CSI volume
//! would be mounted. The test bed's Envoy is upstream Envoy, not Istio's build: istiod runs
//! without the Istio-only filters (`PILOT_ENABLE_METADATA_EXCHANGE=false`,
//! `PILOT_ENABLE_ALPN_FILTER=false`, no default metrics provider). Several sidecars at once
//! run without iptables (`ISTIO_META_INTERCEPTION_MODE=NONE`), each on its own loopback
//! address and ports, their listeners from `Sidecar` resources. Injected pods themselves
//! cannot run here: Istio does not inject host-network pods, and the test node has no CNI
//! for any other kind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::testing as common;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::bridge::{Bridge, spire_options_for_bridge};
use common::cluster::Cluster;
use common::proc::LogFiles;
use common::{
    EntrySpec, LogSource, Proc, Spire, free_port, manifest_dir, peer, peers_dir, temp_dir,
    wait_until_with, workload_binary,
};

const TIMEOUT: Duration = Duration::from_secs(90);
/// deploy/istio/istiod-values.yaml's `meshConfig.trustDomain`: SPIRE's (I4).
const TRUST_DOMAIN: &str = "example.org";
const ISTIO_NS: &str = "istio-system";
/// Where istio-agent looks for the workload socket, and where the `spire` template mounts
/// the CSI volume (I1).
const WORKLOAD_SOCKET_DIR: &str = "/var/run/secrets/workload-spiffe-uds";

/// `target/peers/istio/<name>` (next to `target/peers/bin`, or `$SVID_BRIDGE_PEERS_DIR/..`).
fn istio_file(name: &str) -> PathBuf {
    let dir = peers_dir()
        .parent()
        .map(|p| p.join("istio"))
        .unwrap_or_else(|| manifest_dir().join("target/peers/istio"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{name} is missing at {}: run `make peers` (or `make test-istio`, which builds the \
         peers and runs these tests)",
        path.display()
    );
    path
}

fn istio_id(ns: &str, sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

fn write_private(path: &Path, data: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn base64_encode(data: &[u8]) -> String {
    BASE64.encode(data)
}

fn base64_decode(text: &str) -> Vec<u8> {
    BASE64
        .decode(text.trim())
        .unwrap_or_else(|e| panic!("not base64 ({e}): {text}"))
}

/// The DER certificates of a PEM bundle.
fn pem_ders(pem_text: &str) -> Vec<Vec<u8>> {
    pem::parse_many(pem_text.as_bytes())
        .expect("parse PEM")
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect()
}

/// `openssl verify` of the leaf of `chain_pem` (intermediates from the chain itself) against
/// `roots_pem` only: Ok(()) or openssl's complaint.
fn verify_chain(chain_pem: &str, roots_pem: &str, dir: &Path) -> Result<(), String> {
    let blocks: Vec<pem::Pem> = pem::parse_many(chain_pem.as_bytes()).expect("parse chain");
    assert!(!blocks.is_empty(), "empty certificate chain");
    let leaf = dir.join("verify-leaf.pem");
    let untrusted = dir.join("verify-untrusted.pem");
    let roots = dir.join("verify-roots.pem");
    std::fs::write(&leaf, pem::encode(&blocks[0])).unwrap();
    std::fs::write(&untrusted, pem::encode_many(&blocks[1..])).unwrap();
    std::fs::write(&roots, roots_pem).unwrap();
    let mut cmd = Command::new("openssl");
    cmd.args(["verify", "-x509_strict", "-purpose", "any", "-CAfile"])
        .arg(&roots);
    if blocks.len() > 1 {
        cmd.arg("-untrusted").arg(&untrusted);
    }
    let out = cmd.arg(&leaf).output().expect("run openssl verify");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Every `inline_bytes` under `v` (Envoy's JSON for a DataSource).
fn collect_inline_bytes(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v.as_str()) {
                    ("inline_bytes", Some(b)) => out.push(b.to_owned()),
                    _ => collect_inline_bytes(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_inline_bytes(v, out)),
        _ => {}
    }
}

/// `helm install RELEASE CHART -n istio-system [-f values] --set ...` through Helm's action
/// package (`chart-check install`).
fn chart_install(cluster: &Cluster, release: &str, chart: &Path, sets: &[&str], values: &[&Path]) {
    let mut cmd = Command::new(peer("chart-check"));
    cmd.arg("install")
        .arg(format!("--kubeconfig={}", cluster.kubeconfig().display()))
        .args(["--namespace", ISTIO_NS, "--release", release]);
    for values in values {
        cmd.arg("-f").arg(values);
    }
    for set in sets {
        cmd.args(["--set", set]);
    }
    let out = cmd.arg(chart).output().expect("run chart-check install");
    if !out.status.success() {
        common::proc::fail_with_logs(
            &format!(
                "chart-check install of Istio's {} chart failed ({}):\n{}{}",
                chart.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            &[cluster],
        );
    }
}

// ------------------------------------------------------------------------------ istiod ----

/// istiod installed from Istio's chart with deploy/istio/istiod-values.yaml into a fresh
/// control plane (etcd + kube-apiserver), running as a process of this host.
struct Istiod {
    proc: Proc,
    xds_port: u16,
    monitoring_port: u16,
    _dir: tempfile::TempDir,
    // Last: the control plane outlives istiod.
    cluster: Cluster,
}

impl LogSource for Istiod {
    fn log_files(&self) -> Vec<Arc<LogFiles>> {
        let mut files = self.proc.log_files();
        files.extend(self.cluster.log_files());
        files
    }
}

impl Istiod {
    fn start() -> Istiod {
        Istiod::start_with(false, serde_json::Value::Null)
    }

    /// `crds`: Istio's CRDs first, from Istio's `base` chart (for Sidecar, ServiceEntry,
    /// PeerAuthentication, AuthorizationPolicy, ...). `mesh`: more `meshConfig` (JSON); with
    /// `caCertificates` (PEM roots istiod hands its own sidecars besides its CA's), istiod
    /// runs with `ISTIO_MULTIROOT_MESH=true`: Istio's way to trust a second CA.
    fn start_with(crds: bool, mesh: serde_json::Value) -> Istiod {
        let multi_root = !mesh["caCertificates"].is_null();
        // Before anything starts: a missing build fails here, saying what to run.
        let discovery = istio_file("pilot-discovery");
        let chart = istio_file("charts/istio-control/istio-discovery");
        let cluster = Cluster::start_control_plane(&[]);
        cluster.ensure_namespace(ISTIO_NS);
        if crds {
            // No default-revision validation webhook (nothing validates here).
            chart_install(
                &cluster,
                "istio-base",
                &istio_file("charts/base"),
                &["defaultRevision=", "global.configValidation=false"],
                &[],
            );
        }
        let (crt, key) = cluster.issue_serving_cert(
            "istiod",
            "/CN=istiod.istio-system.svc",
            "IP:127.0.0.1,DNS:istiod.istio-system.svc",
        );
        let ca = cluster.ca_cert_path();
        let ca_bundle = base64_encode(&std::fs::read(&ca).unwrap());
        let (http_port, https_port, grpc_port, xds_port, monitoring_port) = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        );

        // `helm install istiod istio/istiod -n istio-system -f deploy/istio/istiod-values.yaml`
        // through Helm's action package, plus what this test bed needs: the webhook by URL
        // (istiod is not behind a Service here), no validation webhook, no metrics provider
        // (Istio's stats filter is not in upstream Envoy).
        let injection_url = format!("https://127.0.0.1:{https_port}/inject");

        let dir = temp_dir("istiod");
        let mut values = vec![manifest_dir().join("deploy/istio/istiod-values.yaml")];
        if !mesh.is_null() {
            let file = dir.path().join("mesh-values.yaml");
            let values_json = serde_json::json!({ "meshConfig": mesh });
            std::fs::write(&file, values_json.to_string()).unwrap();
            values.push(file);
        }
        let values: Vec<&Path> = values.iter().map(PathBuf::as_path).collect();
        chart_install(
            &cluster,
            "istiod",
            &chart,
            &[
                &format!("istiodRemote.injectionURL={injection_url}"),
                &format!("istiodRemote.injectionCABundle={ca_bundle}"),
                "global.configValidation=false",
                "meshConfig.defaultProviders.metrics={}",
            ],
            &values,
        );
        let mut cmd = Command::new(&discovery);
        cmd.current_dir(dir.path())
            .arg("discovery")
            .arg(format!("--kubeconfig={}", cluster.kubeconfig().display()))
            .arg(format!("--httpAddr=127.0.0.1:{http_port}"))
            .arg(format!("--httpsAddr=127.0.0.1:{https_port}"))
            .arg(format!("--grpcAddr=127.0.0.1:{grpc_port}"))
            .arg(format!("--secureGRPCAddr=127.0.0.1:{xds_port}"))
            .arg(format!("--monitoringAddr=127.0.0.1:{monitoring_port}"))
            .arg(format!("--tlsCertFile={}", crt.display()))
            .arg(format!("--tlsKeyFile={}", key.display()))
            .arg(format!("--caCertFile={}", ca.display()))
            .arg("--shutdownDuration=1s")
            .arg("--log_output_level=default:info")
            .env("POD_NAMESPACE", ISTIO_NS)
            .env("POD_NAME", "istiod-test")
            .env("REVISION", "default")
            .env("CLUSTER_ID", "Kubernetes")
            // The settings the spire template is written for (I8): native sidecars.
            .env("ENABLE_NATIVE_SIDECARS", "true")
            // Istio-only Envoy filters that upstream Envoy lacks.
            .env("PILOT_ENABLE_METADATA_EXCHANGE", "false")
            .env("PILOT_ENABLE_ALPN_FILTER", "false")
            // The chart's webhook already carries the CA bundle; nothing to patch.
            .env("INJECTION_WEBHOOK_CONFIG_NAME", "")
            .env("VALIDATION_WEBHOOK_CONFIG_NAME", "")
            .env("ISTIO_MULTIROOT_MESH", multi_root.to_string());
        let proc = Proc::spawn("istiod", cmd, dir.path());
        let istiod = Istiod {
            proc,
            xds_port,
            monitoring_port,
            _dir: dir,
            cluster,
        };
        let ready = std::net::SocketAddr::from(([127, 0, 0, 1], http_port));
        istiod.wait("istiod answers /ready", || {
            common::http::get(ready, "/ready")
                .ok()
                .filter(|r| r.status == 200)
        });
        istiod
    }

    fn wait<T>(&self, what: &str, f: impl FnMut() -> Option<T>) -> T {
        wait_until_with(TIMEOUT, what, &[self], f)
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.cluster.kubectl(args)
    }

    /// A namespace labelled for injection, with service account `sa`.
    fn mesh_namespace(&self, ns: &str, sa: &str) {
        self.cluster.ensure_namespace(ns);
        self.kubectl(&[
            "label",
            "namespace",
            ns,
            "istio-injection=enabled",
            "--overwrite",
        ]);
        self.cluster.apply(&format!(
            r#"{{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {{"name": "{sa}", "namespace": "{ns}"}}}}"#
        ));
    }

    /// The root of istiod's own CA (the self-signed one it signs workload certificates
    /// with, Secret `istio-ca-secret`, key `ca-cert.pem`). Here the ConfigMap
    /// `istio-ca-root-cert` carries the test node's CA instead: istiod publishes the CA of its
    /// serving certificate, which this test bed gives it from files.
    fn ca_root(&self) -> String {
        let b64 = self.wait("istiod has created its CA (Secret istio-ca-secret)", || {
            let out = self.cluster.kubectl_output(&[
                "get",
                "secret",
                "istio-ca-secret",
                "-n",
                ISTIO_NS,
                "-o",
                "jsonpath={.data.ca-cert\\.pem}",
            ]);
            let b64 = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            (out.status.success() && !b64.is_empty()).then_some(b64)
        });
        let pem = String::from_utf8(base64_decode(&b64)).unwrap();
        assert!(
            pem.contains("BEGIN CERTIFICATE"),
            "istio-ca-secret: no certificate"
        );
        pem
    }

    /// istiod's certificate-signing counter (`citadel_server_csr_count`, /metrics on the
    /// monitoring port): how many CSRs its CA received.
    fn csr_count(&self) -> u64 {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.monitoring_port));
        let body = common::http::get(addr, "/metrics")
            .expect("istiod /metrics")
            .body;
        body.lines()
            .filter(|l| l.starts_with("citadel_server_csr_count"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }
}

// ------------------------------------------------------------------------- sidecar ----

/// pilot-agent (`proxy sidecar`) with the test bed's Envoy, as istio-proxy runs in a pod of
/// `ns` with service account `sa`.
struct IstioProxy {
    agent: Proc,
    root: tempfile::TempDir,
    admin_port: u16,
}

/// How one istio-proxy runs besides its namespace and service account.
struct ProxyOptions<'a> {
    /// The private Envoy copy (SPIRE's unix attestor selects on its path).
    envoy_binary: PathBuf,
    /// The directory holding svid-bridge's SDS socket `socket`, where the CSI volume would be
    /// mounted; `None`: istio-agent uses istiod's CA.
    workload_socket: Option<&'a Path>,
    /// Envoy admin, pilot-agent status, Envoy's readiness and Prometheus listeners. Istio's
    /// defaults (15000, 15020, 15021, 15090) for one proxy at a time (the tests serialise on
    /// the node lock); free ones when several run.
    ports: [u16; 4],
    /// `ISTIO_META_INTERCEPTION_MODE`: `REDIRECT` (the default; nothing redirects here, the
    /// listeners just exist) or `NONE` (no iptables: listeners from Sidecar resources).
    interception: &'a str,
    instance_ip: &'a str,
    /// `PROXY_CONFIG_XDS_AGENT`: istio-agent takes extra roots from istiod (multi-root mesh).
    proxy_config_xds: bool,
}

impl<'a> ProxyOptions<'a> {
    fn new(envoy_binary: PathBuf, workload_socket: Option<&'a Path>) -> Self {
        ProxyOptions {
            envoy_binary,
            workload_socket,
            ports: [15000, 15020, 15021, 15090],
            interception: "REDIRECT",
            instance_ip: "127.0.0.1",
            proxy_config_xds: false,
        }
    }

    /// A proxy without iptables beside others: free ports, its own loopback address.
    fn without_interception(mut self, instance_ip: &'a str) -> Self {
        self.ports = [free_port(), free_port(), free_port(), free_port()];
        self.interception = "NONE";
        self.instance_ip = instance_ip;
        self
    }
}

impl LogSource for IstioProxy {
    fn log_files(&self) -> Vec<Arc<LogFiles>> {
        self.agent.log_files()
    }
}

impl IstioProxy {
    /// Starts pilot-agent in a directory laid out as the proxy image and pod would be. With
    /// `workload_socket`, the directory holding svid-bridge's SDS socket `socket` stands where
    /// the CSI volume is mounted.
    fn start(istiod: &Istiod, ns: &str, sa: &str, opts: ProxyOptions<'_>) -> IstioProxy {
        let [admin_port, status_port, ready_port, prometheus_port] = opts.ports;
        let agent_bin = istio_file("pilot-agent");
        let template = istio_file("envoy_bootstrap.json");
        let root = temp_dir(&format!("istio-proxy-{ns}-{sa}"));
        let r = root.path();
        let bootstrap = r.join("var/lib/istio/envoy/envoy_bootstrap_tmpl.json");
        std::fs::create_dir_all(bootstrap.parent().unwrap()).unwrap();
        std::fs::copy(&template, &bootstrap).unwrap();
        std::fs::create_dir_all(r.join("etc/istio/proxy")).unwrap();
        // The projected token istio-proxy gets (audience istio-ca), from the TokenRequest API.
        let token = istiod.kubectl(&["create", "token", sa, "-n", ns, "--audience", "istio-ca"]);
        write_private(&r.join("var/run/secrets/tokens/istio-token"), token.trim());
        if let Some(dir) = opts.workload_socket {
            let link = r.join(WORKLOAD_SOCKET_DIR.trim_start_matches('/'));
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(dir, &link).unwrap();
        }
        let proxy_config = serde_json::json!({
            "discoveryAddress": format!("127.0.0.1:{}", istiod.xds_port),
            "binaryPath": opts.envoy_binary,
            "configPath": "./etc/istio/proxy",
            "proxyAdminPort": admin_port,
            "statusPort": status_port,
            "drainDuration": "1s",
            "terminationDrainDuration": "0s",
            // Istio keeps only a few of Envoy's stats; the tests read the SDS and TLS ones
            // (the pod annotation sidecar.istio.io/statsInclusionRegexps does the same).
            "proxyStatsMatcher": {"inclusionRegexps": ["sds\\..*", ".*\\.ssl\\..*"]},
        });
        let pod = format!("{sa}-0");
        let mut cmd = Command::new(&agent_bin);
        cmd.current_dir(r)
            .args(["proxy", "sidecar", "--domain"])
            .arg(format!("{ns}.svc.cluster.local"))
            .arg("--proxyLogLevel=warning")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("PROXY_CONFIG", proxy_config.to_string())
            .env("POD_NAME", &pod)
            .env("POD_NAMESPACE", ns)
            .env("SERVICE_ACCOUNT", sa)
            .env("INSTANCE_IP", opts.instance_ip)
            .env("HOST_IP", "127.0.0.1")
            .env("ISTIO_META_INTERCEPTION_MODE", opts.interception)
            .env("ENVOY_STATUS_PORT", ready_port.to_string())
            .env("ENVOY_PROMETHEUS_PORT", prometheus_port.to_string())
            .env("PROXY_CONFIG_XDS_AGENT", opts.proxy_config_xds.to_string())
            .env("ISTIO_META_CLUSTER_ID", "Kubernetes")
            .env("ISTIO_META_WORKLOAD_NAME", sa)
            .env("ISTIO_META_MESH_ID", "cluster.local")
            .env("TRUST_DOMAIN", TRUST_DOMAIN)
            .env("PILOT_CERT_PROVIDER", "istiod")
            .env("CA_ADDR", format!("127.0.0.1:{}", istiod.xds_port))
            // istiod's serving certificate comes from the node's CA; its DNS name is the
            // one istio-agent checks by default.
            .env("XDS_ROOT_CA", istiod.cluster.ca_cert_path())
            .env("CA_ROOT_CA", istiod.cluster.ca_cert_path())
            .env("ISTIOD_SAN", "istiod.istio-system.svc");
        let agent = Proc::spawn("pilot-agent", cmd, r);
        let proxy = IstioProxy {
            agent,
            root,
            admin_port,
        };
        // What the kubelet's readiness probe asks: Envoy has its listeners and clusters
        // from istiod.
        let ready = std::net::SocketAddr::from(([127, 0, 0, 1], ready_port));
        wait_until_with(
            TIMEOUT,
            &format!("istio-proxy {ns}/{sa} is ready (/healthz/ready on {ready_port})"),
            &[&proxy, istiod],
            || {
                common::http::get(ready, "/healthz/ready")
                    .ok()
                    .filter(|r| r.status == 200)
            },
        );
        proxy
    }

    fn admin(&self, path: &str) -> String {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.admin_port));
        let r = common::http::get(addr, path).unwrap_or_else(|e| panic!("Envoy admin {path}: {e}"));
        assert_eq!(r.status, 200, "Envoy admin {path}: {}", r.body);
        r.body
    }

    /// A counter Envoy keeps; fails when Envoy has no such stat (Istio's stats matcher drops
    /// most of them: see `proxyStatsMatcher` in [`IstioProxy::start`]).
    fn stat(&self, name: &str) -> u64 {
        let body = self.admin(&format!("/stats?filter=^{}$", name.replace('.', "\\.")));
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("Envoy has no stat {name}"))
    }

    /// The sum of every stat whose name ends with `suffix` (e.g. per-listener SSL stats);
    /// fails when there is none.
    fn stat_sum(&self, suffix: &str) -> u64 {
        let values: Vec<u64> = self
            .admin("/stats")
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(name, _)| name.ends_with(suffix))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .collect();
        assert!(!values.is_empty(), "Envoy has no stat *{suffix}");
        values.iter().sum()
    }

    /// The PEM of Envoy's active SDS secret `name` from /config_dump (private keys are
    /// redacted there): `default`'s certificate chain; for `ROOTCA` every CA it holds,
    /// whether as a plain `trusted_ca` or per trust domain in Envoy's SPIFFE validator.
    fn secret_pem(&self, name: &str) -> Option<String> {
        let dump: serde_json::Value =
            serde_json::from_str(&self.admin("/config_dump?resource=dynamic_active_secrets"))
                .unwrap();
        let secret = dump["configs"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == name)?
            .get("secret")?
            .clone();
        let mut inline = Vec::new();
        if name == "ROOTCA" {
            collect_inline_bytes(&secret["validation_context"], &mut inline);
        } else {
            collect_inline_bytes(&secret["tls_certificate"]["certificate_chain"], &mut inline);
        }
        if inline.is_empty() {
            return None;
        }
        Some(
            inline
                .iter()
                .map(|b| String::from_utf8(base64_decode(b)).unwrap())
                .collect(),
        )
    }

    fn agent_log(&self) -> String {
        self.agent.logs()
    }

    /// Envoy's PID: pilot-agent's child running our Envoy copy.
    fn envoy_pids(&self) -> Vec<i32> {
        let agent = self.agent.pid();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(agent) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for IstioProxy {
    fn drop(&mut self) {
        // pilot-agent does not take its Envoy down when it is killed: stop Envoy first.
        for pid in self.envoy_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.agent.stop();
    }
}

// --------------------------------------------------------------------------- tests ----

/// The pod a user sees after creating it in a namespace labelled for injection, with the
/// annotation `inject.istio.io/templates: "sidecar,spire"`.
fn create_pod(istiod: &Istiod, ns: &str, name: &str, sa: &str, native: Option<bool>) {
    let mut annotations = serde_json::json!({"inject.istio.io/templates": "sidecar,spire"});
    if let Some(native) = native {
        annotations["sidecar.istio.io/nativeSidecar"] = serde_json::json!(native.to_string());
    }
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations,
                     "labels": {"app": name}},
        "spec": {
            "serviceAccountName": sa,
            "containers": [{"name": "app", "image": "local.test/busybox:1",
                            "command": ["sleep", "3600"]}],
        },
    });
    istiod.cluster.apply(&pod.to_string());
}

fn pod_json(istiod: &Istiod, ns: &str, name: &str) -> serde_json::Value {
    serde_json::from_str(&istiod.kubectl(&["get", "pod", name, "-n", ns, "-o", "json"])).unwrap()
}

/// Asserts the injected istio-proxy of `pod` reads svid-bridge's socket from the read-only
/// CSI volume (I1, I2, I8); `native`: istio-proxy is an init container (a native sidecar).
fn assert_spire_sidecar(pod: &serde_json::Value, native: bool) {
    let name = pod["metadata"]["name"].as_str().unwrap();
    let status = pod["metadata"]["annotations"]["sidecar.istio.io/status"]
        .as_str()
        .unwrap_or_else(|| panic!("{name}: not injected (no sidecar.istio.io/status): {pod:#}"));
    let status: serde_json::Value = serde_json::from_str(status).unwrap();
    assert!(
        status["volumes"]
            .as_array()
            .is_some_and(|v| v.iter().any(|v| v == "workload-socket")),
        "{name}: istiod's injection status lists no workload-socket volume: {status}"
    );
    assert_eq!(
        pod["metadata"]["labels"]["spiffe.io/spire-managed-identity"], "true",
        "{name}: the spire template's label"
    );

    let (list, other) = if native {
        ("initContainers", "containers")
    } else {
        ("containers", "initContainers")
    };
    let find = |list: &str| {
        pod["spec"][list]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == "istio-proxy")
            .cloned()
    };
    let proxy = find(list)
        .unwrap_or_else(|| panic!("{name}: no istio-proxy in spec.{list}: {:#}", pod["spec"]));
    assert!(
        find(other).is_none(),
        "{name}: istio-proxy is in spec.{other} too"
    );
    if native {
        assert_eq!(proxy["restartPolicy"], "Always", "{name}: a native sidecar");
    }
    assert_eq!(
        proxy["args"][0], "proxy",
        "{name}: istio-proxy runs pilot-agent"
    );
    assert_eq!(proxy["args"][1], "sidecar");
    let mounts: Vec<&serde_json::Value> = proxy["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["mountPath"] == WORKLOAD_SOCKET_DIR)
        .collect();
    assert_eq!(
        mounts.len(),
        1,
        "{name}: one mount at {WORKLOAD_SOCKET_DIR}: {:#}",
        proxy["volumeMounts"]
    );
    assert_eq!(mounts[0]["readOnly"], true, "{name}: {:#}", mounts[0]);
    let volume_name = mounts[0]["name"].as_str().unwrap();
    let volume = pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == volume_name)
        .unwrap_or_else(|| panic!("{name}: no volume {volume_name}"));
    // The CSI volume replaces the sidecar template's emptyDir: nothing else is left in it.
    assert_eq!(
        *volume,
        serde_json::json!({"name": volume_name, "csi": {"driver": "csi.spiffe.io", "readOnly": true}}),
        "{name}: the workload socket volume"
    );
    // istio-agent looks for the default socket name (I1).
    let socket_file = proxy["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "WORKLOAD_IDENTITY_SOCKET_FILE");
    assert!(
        socket_file.is_none_or(|e| e["value"] == "socket"),
        "{name}: {socket_file:?}"
    );
}

#[test]
fn istiod_injects_the_spire_sidecar_in_two_namespaces() {
    let istiod = Istiod::start();
    istiod.mesh_namespace("shop", "httpbin");
    istiod.mesh_namespace("billing", "ledger");

    // Native sidecars (istiod's ENABLE_NATIVE_SIDECARS) in one namespace; the pod annotation
    // turning them off in the other: the template patches wherever istio-proxy is (I8).
    create_pod(&istiod, "shop", "httpbin", "httpbin", None);
    create_pod(&istiod, "billing", "ledger", "ledger", Some(false));

    assert_spire_sidecar(&pod_json(&istiod, "shop", "httpbin"), true);
    assert_spire_sidecar(&pod_json(&istiod, "billing", "ledger"), false);

    // A namespace without the label gets nothing.
    istiod.cluster.ensure_namespace("outside");
    istiod.cluster.apply(
        r#"{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "plain", "namespace": "outside"}}"#,
    );
    create_pod(&istiod, "outside", "plain", "plain", None);
    let plain = pod_json(&istiod, "outside", "plain");
    assert!(
        plain["metadata"]["annotations"]["sidecar.istio.io/status"].is_null(),
        "a pod outside the mesh was injected: {plain:#}"
    );
}

#[test]
fn istiod_configures_a_real_pilot_agent_and_envoy() {
    let istiod = Istiod::start();
    istiod.mesh_namespace("shop", "httpbin");
    let istiod_root = istiod.ca_root();
    let envoy = workload_binary("envoy-shop-httpbin", &peer("envoy"));
    let proxy = IstioProxy::start(&istiod, "shop", "httpbin", ProxyOptions::new(envoy, None));

    // Listeners and clusters from istiod, none rejected by upstream Envoy.
    for stat in [
        "listener_manager.lds.update_success",
        "cluster_manager.cds.update_success",
    ] {
        assert!(proxy.stat(stat) >= 1, "{stat} is 0");
    }
    for stat in [
        "listener_manager.lds.update_rejected",
        "cluster_manager.cds.update_rejected",
    ] {
        assert_eq!(proxy.stat(stat), 0, "{stat}:\n{}", proxy.agent_log());
    }
    let listeners = proxy.admin("/listeners");
    for name in ["virtualOutbound", "virtualInbound"] {
        assert!(
            listeners
                .lines()
                .any(|l| l.starts_with(&format!("{name}::"))),
            "no {name} listener from istiod:\n{listeners}"
        );
    }

    // Without a workload socket, istio-agent gets its certificate from istiod's CA: the
    // baseline the SPIRE test below differs from.
    let chain = proxy
        .secret_pem("default")
        .expect("Envoy has a `default` secret");
    verify_chain(&chain, &istiod_root, proxy.root.path())
        .unwrap_or_else(|e| panic!("the default certificate is not istiod's: {e}"));
    assert_eq!(
        common::spire::spiffe_id_of_der(&pem_ders(&chain)[0]),
        istio_id("shop", "httpbin")
    );
    assert!(istiod.csr_count() >= 1, "istiod signed no CSR");
}

#[test]
fn istio_agent_takes_spire_certificates_from_svid_bridge() {
    let spire = Spire::start(spire_options_for_bridge(TRUST_DOMAIN));
    let bridge = Bridge::start(&spire);
    let istiod = Istiod::start();
    istiod.mesh_namespace("shop", "httpbin");
    let istiod_root = istiod.ca_root();

    // SPIRE's entry in Istio's identity format (I4), for this proxy's Envoy (a private copy:
    // its path is what SPIRE's unix attestor selects on). Envoy waits for its certificate
    // (Istio sets no initial fetch timeout, I3), so istio-proxy turns ready only once
    // svid-bridge has delivered it.
    let spiffe_id = istio_id("shop", "httpbin");
    let envoy = workload_binary("envoy-shop-httpbin", &peer("envoy"));
    spire.create_entry(&EntrySpec::for_path(&spiffe_id, &envoy));
    assert_eq!(bridge.sds_socket().file_name().unwrap(), "socket");
    let socket_dir = bridge.sds_socket().parent().unwrap().to_path_buf();
    let csrs_before = istiod.csr_count();
    let proxy = IstioProxy::start(
        &istiod,
        "shop",
        "httpbin",
        ProxyOptions::new(envoy, Some(&socket_dir)),
    );

    // istio-agent found the socket and left `default` and ROOTCA to it (I1, I2).
    let log = proxy.agent_log();
    assert!(
        log.contains("Existing workload SDS socket found"),
        "pilot-agent did not find the workload socket:\n{log}"
    );

    // Envoy's certificate: SPIRE's, in Istio's format, not istiod's.
    let spire_roots = spire.bundle_pem();
    let chain = proxy
        .secret_pem("default")
        .expect("Envoy has a `default` secret");
    let ders = pem_ders(&chain);
    assert_eq!(common::spire::spiffe_id_of_der(&ders[0]), spiffe_id);
    verify_chain(&chain, &spire_roots, proxy.root.path()).unwrap_or_else(|e| {
        panic!("the default certificate does not verify against SPIRE's bundle: {e}")
    });
    assert!(
        verify_chain(&chain, &istiod_root, proxy.root.path()).is_err(),
        "the default certificate verifies against istiod's root"
    );
    // ROOTCA is SPIRE's bundle, nothing of istiod's.
    let rootca = proxy
        .secret_pem("ROOTCA")
        .expect("Envoy has a `ROOTCA` secret");
    let rootca: BTreeSet<Vec<u8>> = pem_ders(&rootca).into_iter().collect();
    let spire_set: BTreeSet<Vec<u8>> = pem_ders(&spire_roots).into_iter().collect();
    assert_eq!(rootca, spire_set, "ROOTCA is not SPIRE's bundle");

    // istio-agent asked istiod's CA for nothing.
    assert_eq!(
        istiod.csr_count(),
        csrs_before,
        "istiod signed a CSR for the proxy"
    );
    // Everything else still comes from istiod: listeners, none rejected.
    assert!(proxy.stat("listener_manager.lds.update_success") >= 1);
    assert_eq!(proxy.stat("listener_manager.lds.update_rejected"), 0);
    drop(proxy);
    drop(bridge);
}

/// The application behind the server's sidecar: plain HTTP/1.1 on 127.0.0.1, answering
/// every request 200 with the `x-forwarded-client-cert` header its Envoy added (who the
/// mTLS peer was) as the body. Returns its port.
fn start_app() -> u16 {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut xfcc = String::new();
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("x-forwarded-client-cert")
                {
                    xfcc = value.trim().to_owned();
                }
                line.clear();
            }
            let mut stream = reader.into_inner();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{xfcc}",
                xfcc.len()
            );
        }
    });
    port
}

/// The server's loopback address (its Sidecar ingress binds there; the ServiceEntry's
/// endpoint) and the clients' (their Sidecar egress listener).
const SERVER_IP: &str = "127.0.0.2";
const CLIENT_IP: &str = "127.0.0.3";

/// Istio's own configuration for the mTLS test: service `server.shop.mesh` (a ServiceEntry
/// whose endpoint is the server's sidecar: the apiserver refuses loopback addresses in
/// EndpointSlices), STRICT mTLS and an allow-list of one principal in `shop`, and the
/// Sidecar resources sidecars without iptables need.
fn mesh_config(app_port: u16) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: server, namespace: shop}}
spec:
  hosts: [server.shop.mesh]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints:
  - address: {SERVER_IP}
    serviceAccount: server
    labels: {{security.istio.io/tlsMode: istio}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: server, namespace: shop}}
spec:
  host: server.shop.mesh
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: shop}}
spec:
  mtls: {{mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: only-allowed, namespace: shop}}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{TRUST_DOMAIN}/ns/front/sa/allowed", "{PARTNER_TD}/ns/front/sa/allowed"]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: shop}}
spec:
  ingress:
  - port: {{number: 8080, protocol: HTTP, name: http}}
    bind: {SERVER_IP}
    defaultEndpoint: 127.0.0.1:{app_port}
  egress:
  - hosts: ["~/*"]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: front}}
spec:
  egress:
  - port: {{number: 8080, protocol: HTTP, name: http}}
    bind: {CLIENT_IP}
    hosts: ["shop/*"]
"#
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum MeshMode {
    Plain,
    /// istiod's sidecars also trust SPIRE's bundle (`meshConfig.caCertificates`,
    /// multi-root), and svid-bridge adds istiod's root to the trust domain's bundle
    /// (`--extra-trust-anchors`, docs/deploying.md "Migrating from istiod's CA").
    Migration,
    /// A second SPIRE for [`PARTNER_TD`], federated with ours, with its own svid-bridge
    /// ([`FEDERATION_FLAGS`]); ours federates with it; the mesh aliases its trust domain.
    Federation,
}

const PARTNER_TD: &str = "partner.test";
/// SPIRE's Istio recipe: ROOTCA carries every trust domain the workload federates with (I5).
const FEDERATION_FLAGS: [&str; 2] = [
    "--default-bundle-name=null",
    "--default-all-bundles-name=ROOTCA",
];

/// SPIRE server + agent, svid-bridge (delegated mode), istiod with Istio's CRDs and
/// [`mesh_config`] applied, the app behind `shop/server`'s sidecar.
struct SpireMesh {
    // Dropped in this order: istiod and its control plane, the bridge, SPIRE.
    istiod: Istiod,
    bridge: Bridge,
    /// Another trust domain's SPIRE, federated with ours, and its own svid-bridge.
    partner: Option<(Bridge, Spire)>,
    /// `<dir>/uds`: a link to the directory of the current bridge's socket; every sidecar's
    /// `workload-spiffe-uds` points here, so the bridge can be replaced under them.
    socket_dir: PathBuf,
    dir: tempfile::TempDir,
    spire: Spire,
}

impl SpireMesh {
    fn start() -> SpireMesh {
        SpireMesh::start_with(MeshMode::Plain)
    }

    fn start_with(mode: MeshMode) -> SpireMesh {
        let migration = mode == MeshMode::Migration;
        let spire = Spire::start(spire_options_for_bridge(TRUST_DOMAIN));
        let mut partner = None;
        let mesh = match mode {
            MeshMode::Plain => serde_json::Value::Null,
            MeshMode::Migration => {
                serde_json::json!({"caCertificates": [{"pem": spire.bundle_pem()}]})
            }
            MeshMode::Federation => {
                let other = Spire::start(spire_options_for_bridge(PARTNER_TD));
                spire.federate_with(&other);
                // The partner's sidecars see both trust domains in ROOTCA (I5).
                let bridge = Bridge::start_with(&other, &FEDERATION_FLAGS);
                partner = Some((bridge, other));
                // Istio checks peers' trust domains against the mesh's and its aliases (I4).
                serde_json::json!({"trustDomainAliases": [PARTNER_TD]})
            }
        };
        let istiod = Istiod::start_with(true, mesh);
        let dir = temp_dir("spire-mesh");
        let bridge = if migration {
            let anchors = dir.path().join("istiod-root.pem");
            std::fs::write(&anchors, istiod.ca_root()).unwrap();
            Bridge::start_with(
                &spire,
                &[&format!("--extra-trust-anchors={}", anchors.display())],
            )
        } else {
            Bridge::start(&spire)
        };
        istiod.mesh_namespace("shop", "server");
        istiod.mesh_namespace("front", "allowed");
        istiod.cluster.apply(
            r#"{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "denied", "namespace": "front"}}"#,
        );
        istiod.cluster.apply(&mesh_config(start_app()));
        let socket_dir = dir.path().join("uds");
        std::os::unix::fs::symlink(bridge.sds_socket().parent().unwrap(), &socket_dir).unwrap();
        SpireMesh {
            istiod,
            bridge,
            partner,
            socket_dir,
            dir,
            spire,
        }
    }

    /// A new svid-bridge started with `args` takes the old one's place under the sidecars.
    fn replace_bridge(&mut self, args: &[&str]) {
        let new = Bridge::start_with(&self.spire, args);
        let next = self.dir.path().join("uds.next");
        std::os::unix::fs::symlink(new.sds_socket().parent().unwrap(), &next).unwrap();
        std::fs::rename(&next, &self.socket_dir).unwrap();
        self.bridge = new;
    }

    /// A sidecar without iptables for `ns/sa` at `ip` in the partner trust domain
    /// (`spiffe://partner.test/ns/<ns>/sa/<sa>`), through the partner's svid-bridge.
    fn partner_sidecar(&self, ns: &str, sa: &str, ip: &'static str) -> IstioProxy {
        let (bridge, other) = self.partner.as_ref().expect("a federation mesh");
        let envoy = workload_binary(&format!("envoy-{ns}-{sa}-partner"), &peer("envoy"));
        other.create_entry(&EntrySpec {
            federates_with: vec![TRUST_DOMAIN.to_owned()],
            ..EntrySpec::for_path(&format!("spiffe://{PARTNER_TD}/ns/{ns}/sa/{sa}"), &envoy)
        });
        let socket_dir = bridge.sds_socket().parent().unwrap().to_path_buf();
        IstioProxy::start(
            &self.istiod,
            ns,
            sa,
            ProxyOptions::new(envoy, Some(&socket_dir)).without_interception(ip),
        )
    }

    /// A sidecar without iptables for `ns/sa` at `ip` that is not migrated: no workload
    /// socket, its certificate from istiod's CA, extra roots from istiod.
    fn istiod_sidecar(&self, ns: &str, sa: &str, ip: &'static str) -> IstioProxy {
        let envoy = workload_binary(&format!("envoy-{ns}-{sa}-istiod"), &peer("envoy"));
        let mut opts = ProxyOptions::new(envoy, None).without_interception(ip);
        opts.proxy_config_xds = true;
        IstioProxy::start(&self.istiod, ns, sa, opts)
    }

    /// A sidecar without iptables for `ns/sa` at `ip`, its identity from SPIRE through
    /// svid-bridge (I4); `ttl`: its X509-SVID's lifetime in seconds.
    fn sidecar(&self, ns: &str, sa: &str, ip: &'static str, ttl: Option<u32>) -> IstioProxy {
        let envoy = workload_binary(&format!("envoy-{ns}-{sa}"), &peer("envoy"));
        let federates_with = match &self.partner {
            Some((_, other)) => vec![other.trust_domain().to_owned()],
            None => Vec::new(),
        };
        self.spire.create_entry(&EntrySpec {
            x509_svid_ttl: ttl,
            federates_with,
            ..EntrySpec::for_path(&istio_id(ns, sa), &envoy)
        });
        IstioProxy::start(
            &self.istiod,
            ns,
            sa,
            ProxyOptions::new(envoy, Some(&self.socket_dir)).without_interception(ip),
        )
    }
}

#[test]
fn strict_mtls_and_authorization_by_principal_between_spire_sidecars() {
    let mesh = SpireMesh::start();
    let server = mesh.sidecar("shop", "server", SERVER_IP, None);
    let client_addr: std::net::SocketAddr = format!("{CLIENT_IP}:8080").parse().unwrap();
    let server_addr: std::net::SocketAddr = format!("{SERVER_IP}:8080").parse().unwrap();
    let call = || common::http::get_with_host(client_addr, "/", "server.shop.mesh");
    let istiod = &mesh.istiod;

    // The admitted service account: through both sidecars over mTLS, each side holding its
    // SPIRE identity (the server's Envoy tells the app who called: XFCC).
    let allowed = mesh.sidecar("front", "allowed", CLIENT_IP, None);
    let body = wait_until_with(
        TIMEOUT,
        "front/allowed gets 200 from server.shop.mesh",
        &[&allowed, &server, istiod],
        || call().ok().filter(|r| r.status == 200).map(|r| r.body),
    );
    assert!(
        body.contains(&format!("By={}", istio_id("shop", "server")))
            && body.contains(&format!("URI={}", istio_id("front", "allowed"))),
        "the server's Envoy did not see front/allowed over mTLS: {body}"
    );
    // STRICT: the server's sidecar takes no plaintext.
    let plain = common::http::get_with_host(server_addr, "/", "server.shop.mesh");
    assert!(
        plain.as_ref().map_or(true, |r| r.status != 200),
        "plaintext reached the app through a STRICT sidecar: {:?}",
        plain.map(|r| r.status)
    );
    drop(allowed);

    // Another service account of the same namespace, same listener, same SPIRE: refused by
    // the policy (403 from the server's sidecar, not a TLS failure).
    let denied = mesh.sidecar("front", "denied", CLIENT_IP, None);
    let refused = wait_until_with(
        TIMEOUT,
        "front/denied gets an answer from server.shop.mesh's sidecar",
        &[&denied, &server, istiod],
        || call().ok().filter(|r| r.status == 200 || r.status == 403),
    );
    assert_eq!(
        refused.status, 403,
        "front/denied was not refused: {}",
        refused.body
    );
    assert!(
        refused.body.contains("RBAC"),
        "refused by something else than the AuthorizationPolicy: {}",
        refused.body
    );
    drop(denied);
    drop(server);
}

/// The leaf certificate (DER) of Envoy's `default` secret.
fn default_leaf(proxy: &IstioProxy) -> Vec<u8> {
    let chain = proxy
        .secret_pem("default")
        .expect("Envoy has a `default` secret");
    pem_ders(&chain).swap_remove(0)
}

#[test]
fn rotation_and_a_bridge_restart_fail_no_request_between_istio_sidecars() {
    let mut mesh = SpireMesh::start();
    // Short-lived SVIDs: the agent rotates them at half-life, svid-bridge pushes them.
    let server = mesh.sidecar("shop", "server", SERVER_IP, Some(20));
    let client = mesh.sidecar("front", "allowed", CLIENT_IP, Some(20));
    let client_addr: std::net::SocketAddr = format!("{CLIENT_IP}:8080").parse().unwrap();
    let call = move || common::http::get_with_host(client_addr, "/", "server.shop.mesh");
    wait_until_with(
        TIMEOUT,
        "front/allowed gets 200 from server.shop.mesh",
        &[&client, &server, &mesh.istiod],
        || call().ok().filter(|r| r.status == 200),
    );

    // Requests every 20 ms through both sidecars while certificates rotate and the bridge
    // restarts; every failure is kept.
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
    let stop = AtomicBool::new(false);
    let sent = AtomicU32::new(0);
    let (failures, sent_before_restart) = std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            let mut failures = Vec::new();
            while !stop.load(SeqCst) {
                sent.fetch_add(1, SeqCst);
                match call() {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => failures.push(format!("{} {}", r.status, r.body)),
                    Err(e) => failures.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            failures
        });
        let logs: [&dyn LogSource; 4] = [&client, &server, &mesh.bridge, &mesh.istiod];
        let rotated = |proxy: &IstioProxy, from: &Vec<u8>, what: &str| {
            wait_until_with(TIMEOUT, what, &logs, || {
                let now = default_leaf(proxy);
                (now != *from).then_some(now)
            })
        };
        let (server_first, client_first) = (default_leaf(&server), default_leaf(&client));
        let server_second = rotated(
            &server,
            &server_first,
            "the server's Envoy holds a rotated SVID",
        );
        rotated(
            &client,
            &client_first,
            "the client's Envoy holds a rotated SVID",
        );

        // svid-bridge goes away and comes back on the same socket: Envoys keep their
        // certificates meanwhile and reconnect; rotation goes on through the new process.
        let sent_before_restart = sent.load(SeqCst);
        mesh.bridge.restart();
        let logs: [&dyn LogSource; 4] = [&client, &server, &mesh.bridge, &mesh.istiod];
        wait_until_with(
            TIMEOUT,
            "the server's Envoy gets a rotated SVID from the restarted bridge",
            &logs,
            || (default_leaf(&server) != server_second).then_some(()),
        );
        stop.store(true, SeqCst);
        (traffic.join().unwrap(), sent_before_restart)
    });
    let sent = sent.into_inner();
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {failures:?}",
        failures.len()
    );
    assert!(
        sent > sent_before_restart && sent_before_restart > 0,
        "traffic did not span the restart ({sent_before_restart} before, {sent} in all)"
    );
    // Still SPIRE's, in Istio's format.
    assert_eq!(
        common::spire::spiffe_id_of_der(&default_leaf(&server)),
        istio_id("shop", "server")
    );
    assert_eq!(server.stat("sds.default.update_rejected"), 0);
    assert_eq!(client.stat("sds.default.update_rejected"), 0);
}

/// Calls through `client` until `server`'s Envoy has refused a handshake more than before
/// (`ssl.fail_verify_error`: the client's chain does not verify against its ROOTCA); no call
/// may get through meanwhile. Returns the last answer's status (503 from the client's Envoy).
fn refused_by_tls(
    call: impl Fn() -> std::io::Result<common::http::HttpResponse>,
    client: &IstioProxy,
    server: &IstioProxy,
    istiod: &Istiod,
    what: &str,
) -> u16 {
    let before = server.stat_sum("ssl.fail_verify_error");
    wait_until_with(TIMEOUT, what, &[client, server, istiod], || {
        let answer = call().ok();
        if let Some(r) = &answer {
            assert_ne!(r.status, 200, "{what}: got through: {}", r.body);
        }
        let status = answer.map_or(0, |r| r.status);
        (server.stat_sum("ssl.fail_verify_error") > before).then_some(status)
    })
}

/// Whether `proxy`'s `default` certificate chains to `roots` (PEM).
fn default_verifies_against(proxy: &IstioProxy, roots: &str) -> bool {
    let chain = proxy
        .secret_pem("default")
        .expect("Envoy has a `default` secret");
    verify_chain(&chain, roots, proxy.root.path()).is_ok()
}

#[test]
fn migration_from_istiods_ca_to_spire_without_downtime() {
    let mut mesh = SpireMesh::start_with(MeshMode::Migration);
    let spire_roots = mesh.spire.bundle_pem();
    let istiod_root = mesh.istiod.ca_root();
    let client_addr: std::net::SocketAddr = format!("{CLIENT_IP}:8080").parse().unwrap();
    let call = move || common::http::get_with_host(client_addr, "/", "server.shop.mesh");
    let allowed_id = istio_id("front", "allowed");
    let server_id = istio_id("shop", "server");
    let mtls_ok = |client: &IstioProxy, server: &IstioProxy, istiod: &Istiod, what: &str| {
        let body = wait_until_with(TIMEOUT, what, &[client, server, istiod], || {
            call().ok().filter(|r| r.status == 200).map(|r| r.body)
        });
        assert!(
            body.contains(&format!("By={server_id}"))
                && body.contains(&format!("URI={allowed_id}")),
            "{what}: the server's Envoy did not see the client over mTLS: {body}"
        );
    };

    // Mid-migration: the server already on SPIRE (svid-bridge adds istiod's root to its
    // trust domain), the client still on istiod's CA (istiod hands it SPIRE's root too).
    let server = mesh.sidecar("shop", "server", SERVER_IP, None);
    let client = mesh.istiod_sidecar("front", "allowed", CLIENT_IP);
    assert!(default_verifies_against(&server, &spire_roots));
    assert!(default_verifies_against(&client, &istiod_root));
    assert!(!default_verifies_against(&client, &spire_roots));
    mtls_ok(
        &client,
        &server,
        &mesh.istiod,
        "an istiod-CA client reaches a SPIRE server",
    );
    drop(client);

    // The client moves to SPIRE.
    let client = mesh.sidecar("front", "allowed", CLIENT_IP, None);
    assert!(default_verifies_against(&client, &spire_roots));
    mtls_ok(
        &client,
        &server,
        &mesh.istiod,
        "a SPIRE client reaches a SPIRE server",
    );
    drop(client);

    // Everyone is on SPIRE: istiod's root leaves svid-bridge. A sidecar still holding an
    // istiod certificate is now refused by the server's Envoy; SPIRE sidecars go on.
    mesh.replace_bridge(&[]);
    wait_until_with(
        TIMEOUT,
        "the server's ROOTCA no longer holds istiod's root",
        &[&server, &mesh.bridge],
        || {
            let rootca: BTreeSet<Vec<u8>> = pem_ders(&server.secret_pem("ROOTCA")?)
                .into_iter()
                .collect();
            let spire: BTreeSet<Vec<u8>> = pem_ders(&spire_roots).into_iter().collect();
            (rootca == spire).then_some(())
        },
    );
    let late = mesh.istiod_sidecar("front", "allowed", CLIENT_IP);
    refused_by_tls(
        call,
        &late,
        &server,
        &mesh.istiod,
        "the server's Envoy refuses an istiod certificate after the root's removal",
    );
    drop(late);
    let client = mesh.sidecar("front", "allowed", CLIENT_IP, None);
    mtls_ok(
        &client,
        &server,
        &mesh.istiod,
        "a SPIRE client reaches a SPIRE server after the root's removal",
    );
}

#[test]
fn federation_admits_another_trust_domain_only_through_rootca() {
    let mut mesh = SpireMesh::start_with(MeshMode::Federation);
    let client_addr: std::net::SocketAddr = format!("{CLIENT_IP}:8080").parse().unwrap();
    let call = move || common::http::get_with_host(client_addr, "/", "server.shop.mesh");
    let server = mesh.sidecar("shop", "server", SERVER_IP, None);
    // A sidecar of the partner trust domain, allowed by the policy, whose own ROOTCA holds
    // both trust domains.
    let client = mesh.partner_sidecar("front", "allowed", CLIENT_IP);

    // With svid-bridge's default names, the server's ROOTCA is its own trust domain only:
    // the partner's certificate does not verify.
    refused_by_tls(
        call,
        &client,
        &server,
        &mesh.istiod,
        "the server's Envoy refuses the partner's certificate",
    );

    // SPIRE's Istio recipe on the server's svid-bridge: ROOTCA carries every trust domain
    // the server's entry federates with, and the partner gets through.
    mesh.replace_bridge(&FEDERATION_FLAGS);
    let (_, other) = mesh.partner.as_ref().unwrap();
    let both: BTreeSet<Vec<u8>> = pem_ders(&mesh.spire.bundle_pem())
        .into_iter()
        .chain(pem_ders(&other.bundle_pem()))
        .collect();
    wait_until_with(
        TIMEOUT,
        "the server's ROOTCA holds both trust domains",
        &[&server, &mesh.bridge],
        || {
            let rootca: BTreeSet<Vec<u8>> = pem_ders(&server.secret_pem("ROOTCA")?)
                .into_iter()
                .collect();
            (rootca == both).then_some(())
        },
    );
    let body = wait_until_with(
        TIMEOUT,
        "the partner's sidecar gets 200 from server.shop.mesh",
        &[&client, &server, &mesh.istiod],
        || call().ok().filter(|r| r.status == 200).map(|r| r.body),
    );
    assert!(
        body.contains(&format!("By={}", istio_id("shop", "server")))
            && body.contains(&format!("URI=spiffe://{PARTNER_TD}/ns/front/sa/allowed")),
        "the server's Envoy did not see the partner over mTLS: {body}"
    );
}
