//! The Helm chart (charts/svid-bridge) rendered by Helm's own libraries with its schema, and
//! every object decoded strictly against the Kubernetes API types (`chart-check`, built from
//! tests/chart/ by `make peers`); then the DaemonSet's command line run for real against
//! SPIRE, with its container paths mapped into a temp directory, so chart and CLI never drift.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::testing as common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use common::bridge::{Sidecar, SidecarSpec, spire_options_for_bridge};
use common::{
    EntrySpec, Proc, SocketDir, Spire, manifest_dir, wait_until, wait_until_with, workload_binary,
};

fn chart_dir() -> PathBuf {
    manifest_dir().join("charts/svid-bridge")
}

/// Runs `chart-check render <args> charts/svid-bridge`: the rendered objects and NOTES, or
/// chart-check's error text.
fn render(args: &[&str]) -> Result<Rendered, String> {
    let out = Command::new(common::peer("chart-check"))
        .arg("render")
        .args(args)
        .arg(chart_dir())
        .output()
        .expect("run chart-check");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("chart-check prints JSON");
    Ok(Rendered {
        objects: v["objects"].as_array().unwrap().clone(),
        notes: v["notes"].as_str().unwrap().to_owned(),
    })
}

fn render_ok(args: &[&str]) -> Rendered {
    render(args).unwrap_or_else(|e| panic!("chart-check render {args:?} failed:\n{e}"))
}

struct Rendered {
    objects: Vec<Value>,
    notes: String,
}

impl Rendered {
    fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self
            .objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap().to_owned())
            .collect();
        kinds.sort();
        kinds
    }

    fn one(&self, kind: &str) -> &Value {
        let found: Vec<&Value> = self.objects.iter().filter(|o| o["kind"] == kind).collect();
        assert_eq!(
            found.len(),
            1,
            "exactly one {kind} expected, kinds: {:?}",
            self.kinds()
        );
        found[0]
    }

    fn pod_spec(&self) -> &Value {
        &self.one("DaemonSet")["spec"]["template"]["spec"]
    }

    fn container(&self) -> &Value {
        let containers = self.pod_spec()["containers"].as_array().unwrap();
        assert_eq!(
            containers.len(),
            1,
            "one container: the bridge registers itself, no node-driver-registrar"
        );
        &containers[0]
    }

    fn args(&self) -> Vec<String> {
        strings(&self.container()["args"])
    }

    fn mount(&self, name: &str) -> &Value {
        self.container()["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no volumeMount {name}"))
    }

    fn volume(&self, name: &str) -> &Value {
        self.pod_spec()["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    }

    fn env(&self, name: &str) -> &Value {
        self.container()["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no env {name}"))
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

fn has_arg(args: &[String], arg: &str) -> bool {
    args.iter().any(|a| a == arg)
}

#[test]
fn chart_renders_with_defaults_and_every_object_decodes_strictly() {
    let r = render_ok(&[]);
    assert_eq!(
        r.kinds(),
        [
            "CSIDriver",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "ServiceAccount"
        ]
    );

    // The pod view's least RBAC: read pods, create and patch Events; bound to the bridge's
    // service account, whose token the pod mounts for it.
    let role = r.one("ClusterRole");
    assert_eq!(
        role["rules"],
        serde_json::json!([
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        ])
    );
    let binding = r.one("ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": "svid-bridge", "namespace": "spire-system"}])
    );
    assert_eq!(r.pod_spec()["automountServiceAccountToken"], true);
    assert!(has_arg(&r.args(), "--kubernetes=auto"));

    let csi = &r.one("CSIDriver");
    assert_eq!(csi["metadata"]["name"], "csi.spiffe.io");
    assert_eq!(csi["spec"]["attachRequired"], false);
    assert_eq!(csi["spec"]["podInfoOnMount"], true);
    assert_eq!(
        csi["spec"]["volumeLifecycleModes"],
        serde_json::json!(["Ephemeral"])
    );
    assert_eq!(csi["spec"]["fsGroupPolicy"], "None");

    let ds = r.one("DaemonSet");
    assert_eq!(ds["metadata"]["namespace"], "spire-system");
    let strategy = &ds["spec"]["updateStrategy"];
    assert_eq!(strategy["type"], "RollingUpdate");
    assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], 1);
    assert_eq!(
        strategy["rollingUpdate"]["maxSurge"], 0,
        "no surge: two bridges on a node fight over the sockets"
    );

    let pod = r.pod_spec();
    assert_eq!(
        pod["hostPID"], true,
        "the agent must see Envoy PIDs as the bridge does"
    );
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    assert_eq!(pod["serviceAccountName"], "svid-bridge");
    assert!(
        pod.get("initContainers").is_none(),
        "no SELinux relabel by default"
    );

    let c = r.container();
    assert_eq!(
        c["securityContext"]["privileged"], true,
        "Bidirectional propagation needs privileged"
    );
    assert_eq!(
        strings(&c["livenessProbe"]["exec"]["command"]),
        ["/svid-bridge", "healthcheck", "--live"]
    );
    assert_eq!(
        strings(&c["readinessProbe"]["exec"]["command"]),
        ["/svid-bridge", "healthcheck"]
    );
    assert_eq!(
        r.env("MY_NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(r.env("SVID_BRIDGE_HEALTH_ADDR")["value"], "127.0.0.1:9989");
    assert_eq!(
        r.env("SVID_BRIDGE_SDS_SOCKET")["value"],
        "/run/spire/agent-sockets/socket"
    );
    assert_eq!(c["ports"][0]["containerPort"], 9988);

    // Kubelet pods directory: same path, Bidirectional.
    assert_eq!(
        r.mount("kubelet-pods")["mountPath"],
        "/var/lib/kubelet/pods"
    );
    assert_eq!(r.mount("kubelet-pods")["mountPropagation"], "Bidirectional");
    assert_eq!(
        r.volume("kubelet-pods")["hostPath"]["path"],
        "/var/lib/kubelet/pods"
    );
    // The socket directory shared with the agent, created when missing.
    assert_eq!(
        r.volume("agent-sockets")["hostPath"],
        serde_json::json!({"path": "/run/spire/agent-sockets", "type": "DirectoryOrCreate"})
    );
    assert_eq!(
        r.volume("admin-socket")["hostPath"]["path"],
        "/run/spire/admin-sockets"
    );
    assert_eq!(r.mount("admin-socket")["readOnly"], true);
    assert_eq!(
        r.volume("csi-socket-dir")["hostPath"]["path"],
        "/var/lib/kubelet/plugins/csi.spiffe.io"
    );
    assert_eq!(
        r.mount("csi-socket-dir")["mountPath"],
        "/var/lib/kubelet/plugins/csi.spiffe.io"
    );
    assert_eq!(
        r.volume("plugins-registry")["hostPath"]["path"],
        "/var/lib/kubelet/plugins_registry"
    );

    let args = r.args();
    assert_eq!(args[0], "run");
    for expected in [
        "--identity-source=delegated",
        "--admin-socket=/run/spire/admin-sockets/admin.sock",
        "--agent-socket=/run/spire/agent-sockets/spire-agent.sock",
        "--sds-socket=/run/spire/agent-sockets/socket",
        "--csi-socket=/var/lib/kubelet/plugins/csi.spiffe.io/csi.sock",
        "--csi-plugin-name=csi.spiffe.io",
        "--kubelet-root=/var/lib/kubelet",
        "--default-bundle-name=ROOTCA",
        "--metrics-addr=0.0.0.0:9988",
    ] {
        assert!(has_arg(&args, expected), "{expected} missing from {args:?}");
    }

    // What the operator must do on the SPIRE side is spelled out, with the actual ID.
    let id = "spiffe://example.org/ns/spire-system/sa/svid-bridge";
    assert!(
        r.notes
            .contains(&format!("authorized_delegates = [\"{id}\"]")),
        "{}",
        r.notes
    );
    assert!(
        r.notes
            .contains(&format!("authorizedDelegates: [\"{id}\"]")),
        "{}",
        r.notes
    );
    assert!(
        r.notes
            .contains("admin: {enabled: true, mountOnHost: true}")
    );
    assert!(
        r.notes.contains("names: [spire-agent.sock, api.sock]"),
        "keeps `socket` out of the agent's alternate names"
    );
}

#[test]
fn chart_renders_with_every_toggle_on_and_moved_paths() {
    let values = manifest_dir().join("tests/chart/values/non-default.yaml");
    let r = render_ok(&[
        "-f",
        values.to_str().unwrap(),
        "--namespace",
        "spire-nodes",
        "--kube-version",
        "v1.30.4",
    ]);
    assert_eq!(
        r.kinds(),
        [
            "CSIDriver",
            "ClusterRole",
            "ClusterSPIFFEID",
            "DaemonSet",
            "RoleBinding",
            "SecurityContextConstraints",
            "Service",
            "ServiceAccount"
        ]
    );
    let id = "spiffe://prod.example.com/ns/spire-nodes/sa/bridge";
    // The pod view off: no token, and the bridge told so.
    assert_eq!(r.pod_spec()["automountServiceAccountToken"], false);
    assert!(has_arg(&r.args(), "--kubernetes=off"));

    // OpenShift: a dedicated SCC, the right to use it, and the CSIDriver profile label.
    let scc = r.one("SecurityContextConstraints");
    assert_eq!(scc["allowPrivilegedContainer"], true);
    assert_eq!(scc["allowHostPID"], true);
    assert_eq!(scc["allowHostDirVolumePlugin"], true);
    let role = r.one("ClusterRole");
    assert_eq!(role["rules"][0]["verbs"], serde_json::json!(["use"]));
    assert_eq!(
        role["rules"][0]["resourceNames"],
        serde_json::json!(["node-sds"])
    );
    assert_eq!(r.one("RoleBinding")["subjects"][0]["name"], "bridge");
    let csi = r.one("CSIDriver");
    assert_eq!(csi["metadata"]["name"], "upstream.csi.spiffe.io");
    assert_eq!(
        csi["metadata"]["labels"]["security.openshift.io/csi-ephemeral-volume-profile"],
        "restricted"
    );
    assert_eq!(csi["metadata"]["labels"]["team"], "platform");

    // SELinux: spc_t for the bridge, a relabel init container for the socket directory.
    let c = r.container();
    assert_eq!(c["securityContext"]["seLinuxOptions"]["type"], "spc_t");
    let init = &r.pod_spec()["initContainers"][0];
    assert_eq!(init["name"], "selinux-relabel");
    assert_eq!(
        strings(&init["command"]),
        [
            "chcon",
            "-R",
            "-v",
            "-t",
            "container_file_t",
            "/run/spire/agent-sockets"
        ]
    );

    // Metrics: the port moves, a headless Service targets it by name.
    assert_eq!(c["ports"][0]["containerPort"], 19988);
    let svc = r.one("Service");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["spec"]["ports"][0]["port"], 9090);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
    assert_eq!(
        svc["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert_eq!(r.env("SVID_BRIDGE_HEALTH_ADDR")["value"], "127.0.0.1:19989");

    // The bridge's own identity for spire-controller-manager, from global.spire.trustDomain.
    let cid = r.one("ClusterSPIFFEID");
    assert_eq!(cid["spec"]["spiffeIDTemplate"], id);
    assert_eq!(cid["spec"]["className"], "spire-server-spire");
    assert_eq!(
        cid["spec"]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "spire-nodes"
    );
    assert_eq!(
        cid["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "svid-bridge"
    );
    assert!(r.notes.contains(id));

    // Paths and names moved.
    assert_eq!(
        r.mount("kubelet-pods")["mountPath"],
        "/var/snap/microk8s/common/var/lib/kubelet/pods"
    );
    assert_eq!(
        r.volume("agent-sockets")["hostPath"]["path"],
        "/run/spire/sockets"
    );
    assert_eq!(
        r.volume("admin-socket")["hostPath"]["path"],
        "/run/spire/agent/sockets/csi.spiffe.io/admin"
    );
    assert_eq!(
        r.volume("extra-trust-anchors")["configMap"]["name"],
        "istio-ca-root-cert"
    );
    assert_eq!(
        c["image"],
        "registry.example.com/platform/svid-bridge@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );
    let args = r.args();
    for expected in [
        "--agent-socket=/run/spire/agent-sockets/agent.sock",
        "--csi-socket=/var/snap/microk8s/common/var/lib/kubelet/plugins/upstream.csi.spiffe.io/csi.sock",
        "--csi-plugin-name=upstream.csi.spiffe.io",
        "--kubelet-root=/var/snap/microk8s/common/var/lib/kubelet",
        "--default-bundle-name=null",
        "--default-all-bundles-name=ROOTCA",
        "--disable-spiffe-cert-validation",
        "--extra-trust-anchors=/run/svid-bridge/extra-trust-anchors/root-cert.pem",
        "--log-format=json",
    ] {
        assert!(has_arg(&args, expected), "{expected} missing from {args:?}");
    }
}

#[test]
fn chart_with_csi_off_serves_sds_only() {
    let r = render_ok(&[
        "--set",
        "csiDriver.enabled=false",
        "--set",
        "metrics.enabled=false",
    ]);
    assert_eq!(
        r.kinds(),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "ServiceAccount"
        ]
    );
    let args = r.args();
    assert!(has_arg(&args, "--csi-socket="), "{args:?}");
    assert!(has_arg(&args, "--metrics-addr="), "{args:?}");
    assert!(!args.iter().any(|a| a.starts_with("--kubelet-root")));
    let mounts: Vec<String> = r.container()["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        mounts,
        ["agent-sockets", "admin-socket"],
        "no kubelet directories without CSI"
    );
    assert!(r.container().get("ports").is_none());
}

#[test]
fn misspelt_or_mistyped_values_fail_schema_validation() {
    for (set, complaint) in [
        (
            "csiDriver.nmae=x",
            "additional properties 'nmae' not allowed",
        ),
        (
            "metrcs.enabled=true",
            "additional properties 'metrcs' not allowed",
        ),
        (
            "openshift.scc.nmae=x",
            "additional properties 'nmae' not allowed",
        ),
        ("metrics.port=not-a-port", "/metrics/port"),
        ("kubeletPath=var/lib/kubelet", "/kubeletPath"),
        ("csiDriver.name=csi.spiffe.io/x", "/csiDriver/name"),
        ("logFormat=xml", "/logFormat"),
        // helm --set turns null into "delete the key": the schema says which one went.
        (
            "sds.defaultBundleName=null",
            "missing property 'defaultBundleName'",
        ),
    ] {
        let err = match render(&["--set", set]) {
            Ok(_) => panic!("--set {set} rendered, expected a schema error"),
            Err(e) => e,
        };
        assert!(
            err.contains("values don't meet the specifications of the schema"),
            "--set {set}: {err}"
        );
        assert!(
            err.contains(complaint),
            "--set {set}: expected {complaint:?} in {err}"
        );
    }
    // A key of another chart under global is fine (Helm shares globals between charts).
    render_ok(&[
        "--set",
        "global.spire.clusterName=x",
        "--set",
        "global.someOtherChart.flag=true",
    ]);
}

/// Chart.yaml's kubeVersion: inline CSI ephemeral volumes are GA from 1.25.
#[test]
fn chart_installs_on_kubernetes_1_25_and_later_only() {
    render_ok(&["--kube-version", "v1.25.0"]);
    let err = match render(&["--kube-version", "v1.24.9"]) {
        Ok(_) => panic!("rendered for Kubernetes 1.24"),
        Err(e) => e,
    };
    assert!(err.contains("chart requires kubeVersion"), "{err}");
}

#[test]
fn misspelt_kubernetes_fields_fail_strict_decoding() {
    for (set, field) in [
        ("resources.limts.cpu=1", "resources.limts"),
        (
            "securityContext.seLinuxOption.type=spc_t",
            "securityContext.seLinuxOption",
        ),
        (
            "updateStrategy.rollingUpdate.maxSurg=0",
            "rollingUpdate.maxSurg",
        ),
    ] {
        let err = match render(&["--set", set]) {
            Ok(_) => panic!("--set {set} rendered, expected a strict decoding error"),
            Err(e) => e,
        };
        assert!(
            err.contains("strict decoding error") && err.contains(field),
            "--set {set}: {err}"
        );
    }
}

/// The DaemonSet's exact command line and environment, run on this machine: every volume
/// mount becomes a directory under a private root, every path argument is moved under it,
/// and the SPIRE sockets the pod would find on the node are links to a real SPIRE agent's.
struct ChartNode {
    rendered: Rendered,
    env: Vec<(String, String)>,
    binary: PathBuf,
    bridge: Proc,
    root: SocketDir,
    spire: Spire,
    _tmp: tempfile::TempDir,
}

impl ChartNode {
    fn start() -> ChartNode {
        let ns = "spire-system";
        let bridge_id = format!("spiffe://example.org/ns/{ns}/sa/svid-bridge");
        let rendered = render_ok(&[
            "--namespace",
            ns,
            "--set",
            &format!("metrics.port={}", common::free_port()),
            "--set",
            &format!("health.port={}", common::free_port()),
        ]);
        assert!(rendered.notes.contains(&bridge_id));
        let mut opts = spire_options_for_bridge("example.org");
        opts.authorized_delegates = vec![bridge_id.clone()];
        let spire = Spire::start(opts);

        let tmp = common::temp_dir("chart-node");
        let root = SocketDir::new(
            tmp.path(),
            "var/lib/kubelet/plugins_registry/csi.spiffe.io-reg.sock",
        );
        let under = |p: &str| root.path().join(p.trim_start_matches('/'));
        for m in rendered.container()["volumeMounts"].as_array().unwrap() {
            std::fs::create_dir_all(under(m["mountPath"].as_str().unwrap())).unwrap();
        }
        std::os::unix::fs::symlink(
            spire.admin_socket_path(),
            under("/run/spire/admin-sockets/admin.sock"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            spire.socket_path(),
            under("/run/spire/agent-sockets/spire-agent.sock"),
        )
        .unwrap();

        let args: Vec<String> = rendered
            .args()
            .iter()
            .map(|a| relocate(a, root.path()))
            .collect();
        let env: Vec<(String, String)> = rendered.container()["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let name = e["name"].as_str().unwrap().to_owned();
                let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("spec.nodeName") => "node-a".to_owned(),
                    Some(other) => panic!("unexpected fieldRef {other}"),
                    // Paths in values are container paths: move them like the arguments.
                    None => relocate_path(e["value"].as_str().unwrap(), root.path()),
                };
                (name, value)
            })
            .collect();

        // The bridge binary registered under the chart's SPIFFE ID, as its ClusterSPIFFEID
        // would be.
        let binary = workload_binary("svid-bridge", &common::bridge_binary());
        spire.create_entry(&EntrySpec::for_path(&bridge_id, &binary));
        let mut cmd = Command::new(&binary);
        cmd.args(&args)
            .env_remove("RUST_LOG")
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .envs(env.iter().cloned());
        let bridge = Proc::spawn("svid-bridge", cmd, tmp.path());
        let node = ChartNode {
            rendered,
            env,
            binary,
            bridge,
            root,
            spire,
            _tmp: tmp,
        };
        let sds_socket = node.path("/run/spire/agent-sockets/socket");
        wait_until(
            Duration::from_secs(20),
            "the chart-configured bridge serves SDS",
            || {
                std::os::unix::net::UnixStream::connect(&sds_socket)
                    .ok()
                    .map(|_| ())
            },
        );
        node
    }

    /// A path of the pod's filesystem, on this machine.
    fn path(&self, in_pod: &str) -> PathBuf {
        self.root.path().join(in_pod.trim_start_matches('/'))
    }
}

/// The chart's command line accepts every flag and serves a real Envoy its SVID from SPIRE.
#[test]
fn chart_command_line_serves_a_real_envoy_from_real_spire() {
    let node = ChartNode::start();
    let mut spec = SidecarSpec::new("server", &node.path("/run/spire/agent-sockets/socket"));
    spec.inbound_allowed = node.spire.id("client");
    let server = Sidecar::start(&node.spire, &spec);
    assert!(server.stat("sds.default.update_success") >= 1);
    assert!(server.stat("sds.ROOTCA.update_success") >= 1);
    assert_eq!(server.stat("sds.default.update_rejected"), 0);

    // The check NOTES.txt suggests: `inspect` in the bridge's container, with its
    // environment, shows the bridge's own SVID.
    let out = Command::new(&node.binary)
        .args(["inspect", "default", "ROOTCA"])
        .envs(node.env.iter().cloned())
        .output()
        .unwrap();
    let text = common::proc::success_stdout("inspect", &out);
    assert!(
        text.contains("spiffe://example.org/ns/spire-system/sa/svid-bridge"),
        "{text}"
    );
}

/// The chart-configured bridge, with this test playing the kubelet: its registration socket is
/// where the kubelet's plugin watcher looks, it names the CSI endpoint at the path the chart
/// mounts at the host's path, answers with the CSIDriver's name and the node name from the
/// downward API, and once registered both probe commands (with the container's environment)
/// pass.
#[test]
fn chart_command_line_registers_with_the_kubelet_and_passes_its_probes() {
    use svid_bridge::csi::connect_uds;
    use svid_bridge::proto::csi::identity_client::IdentityClient;
    use svid_bridge::proto::csi::node_client::NodeClient;
    use svid_bridge::proto::csi::{GetPluginInfoRequest, NodeGetInfoRequest};

    let node = ChartNode::start();
    let driver = node.rendered.one("CSIDriver")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let reg_socket = node.path(&format!(
        "/var/lib/kubelet/plugins_registry/{driver}-reg.sock"
    ));
    wait_until_with(
        Duration::from_secs(20),
        "the registration socket exists",
        &[&node.bridge],
        || reg_socket.exists().then_some(()),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let info = common::csi::register_as_kubelet(&reg_socket).await;
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, driver);
        assert_eq!(
            PathBuf::from(&info.endpoint),
            node.path(&format!("/var/lib/kubelet/plugins/{driver}/csi.sock")),
            "the endpoint is the --csi-socket path, which the chart mounts at the host's path"
        );
        let endpoint = connect_uds(Path::new(&info.endpoint)).await.unwrap();
        let plugin = IdentityClient::new(endpoint.clone())
            .get_plugin_info(GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            plugin.name, driver,
            "GetPluginInfo must match the CSIDriver object"
        );
        let node_info = NodeClient::new(endpoint)
            .node_get_info(NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            node_info.node_id, "node-a",
            "node ID from MY_NODE_NAME (spec.nodeName)"
        );
    });
    for kind in ["livenessProbe", "readinessProbe"] {
        let probe = strings(&node.rendered.container()[kind]["exec"]["command"]);
        assert_eq!(probe[0], "/svid-bridge", "the image's binary");
        wait_until_with(
            Duration::from_secs(20),
            &format!("the {kind} command passes"),
            &[&node.bridge, &node.spire],
            || {
                let status = Command::new(&node.binary)
                    .args(&probe[1..])
                    .envs(node.env.iter().cloned())
                    .status()
                    .unwrap();
                status.success().then_some(())
            },
        );
    }
}

/// `--flag=/abs/path` → `--flag=<root>/abs/path`; anything else unchanged.
fn relocate(arg: &str, root: &Path) -> String {
    match arg.split_once('=') {
        Some((flag, value)) => format!("{flag}={}", relocate_path(value, root)),
        None => arg.to_owned(),
    }
}

/// `/abs/path` → `<root>/abs/path`; anything else unchanged.
fn relocate_path(value: &str, root: &Path) -> String {
    match value.strip_prefix('/') {
        Some(rest) => root.join(rest).display().to_string(),
        None => value.to_owned(),
    }
}
