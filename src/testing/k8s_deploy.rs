//! What runs on the test node (src/testing/cluster.rs) besides the workloads: the local
//! images, SPIRE server and agent as pods (join token, the agent's `k8s` workload attestor on
//! the kubelet's read-only port, svid-bridge in `authorized_delegates`), registration entries
//! by namespace and service account, charts/svid-bridge installed through Helm's action
//! package, and the DaemonSet's pod created from its template. Shared by tests/k8s_node.rs
//! and benches/k8s_pods.rs, so that the benchmark measures the node the tests prove.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::cluster::{Cluster, NODE_NAME, pod_json};
use super::{free_port, manifest_dir, peer, wait_until_with};

pub const TD: &str = "example.org";
pub const APPS_NS: &str = "apps";
pub const BRIDGE_NS: &str = "svid-bridge";
pub const SPIRE_NS: &str = "spire";
pub const BRIDGE_IMAGE: &str = "local.test/svid-bridge:dev";
pub const SPIRE_SERVER_IMAGE: &str = "local.test/spire-server:1.13.3";
pub const SPIRE_AGENT_IMAGE: &str = "local.test/spire-agent:1.13.3";
pub const ENVOY_IMAGE: &str = "local.test/envoy:1.40";
pub const DRIVER: &str = "csi.spiffe.io";
/// Waits on the node (pods Ready, the agent healthy, ...).
pub const TIMEOUT: Duration = Duration::from_secs(90);

/// `spiffe://example.org/ns/<ns>/sa/<sa>`.
pub fn id(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

pub fn wait<T>(cluster: &Cluster, what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_until_with(TIMEOUT, what, &[cluster], f)
}

/// The bridge (`bridge_binary`: the debug binary in tests, the release one in benchmarks),
/// SPIRE server and agent, and Envoy, as local images.
pub fn import_images(cluster: &Cluster, bridge_binary: &Path) {
    cluster.import_image(
        BRIDGE_IMAGE,
        &[(bridge_binary.to_path_buf(), "/svid-bridge")],
        &["--entrypoint", "/svid-bridge", "--cmd", "run"],
    );
    cluster.import_image(
        SPIRE_SERVER_IMAGE,
        &[(peer("spire-server"), "/spire-server")],
        &["--entrypoint", "/spire-server", "--dir", "/tmp"],
    );
    cluster.import_image(
        SPIRE_AGENT_IMAGE,
        &[(peer("spire-agent"), "/spire-agent")],
        &["--entrypoint", "/spire-agent", "--dir", "/tmp"],
    );
    let envoy = std::fs::canonicalize(peer("envoy")).expect("canonicalize envoy");
    cluster.import_image(
        ENVOY_IMAGE,
        &[(envoy, "/usr/local/bin/envoy")],
        &["--entrypoint", "/usr/local/bin/envoy", "--dir", "/tmp"],
    );
}

pub fn config_map(ns: &str, name: &str, key: &str, value: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns},
        "data": {key: value},
    })
}

pub fn host_dir(name: &str, path: &Path) -> serde_json::Value {
    serde_json::json!({"name": name, "hostPath": {"path": path, "type": "Directory"}})
}

/// A SPIRE server or agent pod: `run -config /run/spire/config/<config_file>` from the
/// ConfigMap named like the pod, and each `(volume, mount path, host directory)`.
fn spire_pod(
    name: &str,
    image: &str,
    config_file: &str,
    host_pid: bool,
    host_dirs: &[(&str, &str, PathBuf)],
) -> serde_json::Value {
    let mut mounts = vec![
        serde_json::json!({"name": "config", "mountPath": "/run/spire/config", "readOnly": true}),
    ];
    let mut volumes = vec![serde_json::json!({"name": "config", "configMap": {"name": name}})];
    for (volume, mount_path, host_path) in host_dirs {
        mounts.push(serde_json::json!({"name": volume, "mountPath": mount_path}));
        volumes.push(host_dir(volume, host_path));
    }
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": SPIRE_NS, "labels": {"app": name}},
        "spec": {
            "nodeName": NODE_NAME, "hostNetwork": true, "hostPID": host_pid,
            "automountServiceAccountToken": false,
            "containers": [{
                "name": name, "image": image, "imagePullPolicy": "Never",
                "args": ["run", "-config", format!("/run/spire/config/{config_file}")],
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        },
    })
}

/// The host directories SPIRE's pods use, under `<node root>/spire`.
pub struct SpireDirs {
    pub dir: PathBuf,
    /// The server's API socket, on the host.
    pub server_socket: PathBuf,
    /// The agent's Workload API socket directory (`spire-agent.sock`; the bridge's SDS
    /// `socket` goes beside it).
    pub agent_sockets: PathBuf,
}

impl SpireDirs {
    pub fn create(cluster: &Cluster) -> SpireDirs {
        let dir = cluster.root().join("spire");
        for d in [
            "server-socket",
            "server-data",
            "agent-data",
            "agent-sockets",
            "admin-sockets",
        ] {
            std::fs::create_dir_all(dir.join(d)).expect("mkdir spire dir");
        }
        SpireDirs {
            server_socket: dir.join("server-socket/api.sock"),
            agent_sockets: dir.join("agent-sockets"),
            dir,
        }
    }
}

pub fn start_spire_server(cluster: &Cluster, dir: &Path, port: u16) {
    let conf = format!(
        r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "/run/spire/server-socket/api.sock"
    trust_domain = "{TD}"
    data_dir = "/run/spire/data"
    log_level = "DEBUG"
    ca_key_type = "ec-p256"
    experimental {{
        cache_reload_interval = "1s"
    }}
}}
plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "/run/spire/data/datastore.sqlite3"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
}}
"#
    );
    let pod = spire_pod(
        "spire-server",
        SPIRE_SERVER_IMAGE,
        "server.conf",
        false,
        &[
            (
                "socket",
                "/run/spire/server-socket",
                dir.join("server-socket"),
            ),
            ("data", "/run/spire/data", dir.join("server-data")),
        ],
    );
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        config_map(SPIRE_NS, "spire-server", "server.conf", &conf), pod,
    ]});
    cluster.apply(&list.to_string());
}

/// The agent pod `spire-agent` (`hostPID`, its data in `<dir>/agent-data`), attesting with
/// `token`.
pub fn start_spire_agent(cluster: &Cluster, dir: &Path, port: u16, token: &str) {
    let bridge = id(BRIDGE_NS, "svid-bridge");
    let conf = format!(
        r#"agent {{
    data_dir = "/run/spire/data"
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "/run/spire/agent-sockets/spire-agent.sock"
    admin_socket_path = "/run/spire/admin-sockets/admin.sock"
    trust_domain = "{TD}"
    insecure_bootstrap = true
    join_token = "{token}"
    authorized_delegates = ["{bridge}"]
    experimental {{
        sync_interval = "1s"
    }}
}}
plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
    WorkloadAttestor "k8s" {{
        plugin_data {{
            kubelet_read_only_port = {ro}
            node_name = "{NODE_NAME}"
        }}
    }}
}}
"#,
        ro = cluster.kubelet_read_only_port(),
    );
    let pod = spire_pod(
        "spire-agent",
        SPIRE_AGENT_IMAGE,
        "agent.conf",
        true,
        &[
            ("data", "/run/spire/data", dir.join("agent-data")),
            (
                "agent-sockets",
                "/run/spire/agent-sockets",
                dir.join("agent-sockets"),
            ),
            (
                "admin-sockets",
                "/run/spire/admin-sockets",
                dir.join("admin-sockets"),
            ),
        ],
    );
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        config_map(SPIRE_NS, "spire-agent", "agent.conf", &conf), pod,
    ]});
    cluster.apply(&list.to_string());
}

/// Waits until the agent answers its health check on the Workload API socket.
pub fn wait_agent_healthy(cluster: &Cluster, agent_sockets: &Path) {
    wait(cluster, "spire-agent is healthy", || {
        Command::new(peer("spire-agent"))
            .args(["healthcheck", "-socketPath"])
            .arg(agent_sockets.join("spire-agent.sock"))
            .output()
            .ok()
            .filter(|o| o.status.success())
    });
}

/// `spire-server ARGS -socketPath <the server pod's socket, on the host>`.
pub fn spire_server(server_socket: &Path, args: &[&str]) -> Output {
    Command::new(peer("spire-server"))
        .args(args)
        .arg("-socketPath")
        .arg(server_socket)
        .output()
        .expect("run spire-server")
}

/// A join token whose agent gets the alias `spiffe://example.org/node` (the entries' parent).
pub fn join_token(server_socket: &Path) -> String {
    let out = spire_server(
        server_socket,
        &[
            "token",
            "generate",
            "-spiffeID",
            &format!("spiffe://{TD}/node"),
            "-output",
            "json",
        ],
    );
    assert!(out.status.success(), "token generate: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("token json");
    v["value"].as_str().expect("token value").to_string()
}

/// An entry for service account `sa` in namespace `ns`, as users write them.
pub fn create_entry(server_socket: &Path, spiffe_id: &str, ns: &str, sa: &str) {
    let out = spire_server(
        server_socket,
        &[
            "entry",
            "create",
            "-parentID",
            &format!("spiffe://{TD}/node"),
            "-spiffeID",
            spiffe_id,
            "-selector",
            &format!("k8s:ns:{ns}"),
            "-selector",
            &format!("k8s:sa:{sa}"),
        ],
    );
    assert!(out.status.success(), "entry create {spiffe_id}: {out:?}");
}

/// `helm install` of charts/svid-bridge through Helm's action package (chart-check install);
/// returns the DaemonSet's pod template.
pub fn install_chart(cluster: &Cluster, health_port: u16, extra: &[&str]) -> serde_json::Value {
    let root = cluster.root().to_path_buf();
    let kubelet = cluster.kubelet_root();
    let kubeconfig = cluster.kubeconfig().display().to_string();
    let out = Command::new(peer("chart-check"))
        .arg("install")
        .args(["--kubeconfig", &kubeconfig])
        .args(["--namespace", BRIDGE_NS, "--release", "svid-bridge"])
        .args([
            "--set",
            "image.registry=local.test",
            "--set",
            "image.repository=svid-bridge",
        ])
        .args(["--set", "image.tag=dev", "--set", "image.pullPolicy=Never"])
        .args(["--set", &format!("kubeletPath={}", kubelet.display())])
        .args([
            "--set",
            &format!(
                "agentSockets.hostPath={}",
                root.join("spire/agent-sockets").display()
            ),
        ])
        .args([
            "--set",
            &format!(
                "adminSocket.hostDir={}",
                root.join("spire/admin-sockets").display()
            ),
        ])
        .args(["--set", "logLevel=debug"])
        // Host network (see start_bridge_pod): ports no other test uses.
        .args(["--set", &format!("metrics.port={}", free_port())])
        .args(["--set", &format!("health.port={health_port}")])
        // The pod view: the chart's in-cluster access, with the API server's loopback address
        // instead of the `kubernetes` Service's, which nothing routes here (no kube-proxy).
        .args(["--set-string", "extraEnv[0].name=KUBERNETES_SERVICE_HOST"])
        .args(["--set-string", "extraEnv[0].value=127.0.0.1"])
        .args(["--set-string", "extraEnv[1].name=KUBERNETES_SERVICE_PORT"])
        .args([
            "--set-string",
            &format!("extraEnv[1].value={}", cluster.api_port()),
        ])
        .args(extra)
        .arg(manifest_dir().join("charts/svid-bridge"))
        .output()
        .expect("run chart-check");
    assert!(
        out.status.success(),
        "chart-check install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ds: serde_json::Value = serde_json::from_str(&cluster.kubectl(&[
        "get",
        "daemonset",
        "-n",
        BRIDGE_NS,
        "svid-bridge",
        "-o",
        "json",
    ]))
    .expect("daemonset json");
    cluster.kubectl(&[
        "get",
        "-n",
        BRIDGE_NS,
        "secret/sh.helm.release.v1.svid-bridge.v1",
    ]);
    ds["spec"]["template"].clone()
}

/// `helm uninstall` of the release [`install_chart`] made.
pub fn uninstall_chart(cluster: &Cluster) -> Output {
    let kubeconfig = cluster.kubeconfig().display().to_string();
    Command::new(peer("chart-check"))
        .args(["uninstall", "--kubeconfig", &kubeconfig])
        .args(["--namespace", BRIDGE_NS, "--release", "svid-bridge"])
        .output()
        .expect("run chart-check")
}

/// What the DaemonSet controller would create on this node: pod `name` from the DaemonSet's
/// `template`, bound to the node. Waits until it is Ready (its readiness probe passes).
pub fn start_bridge_pod(cluster: &Cluster, template: &serde_json::Value, name: &str) {
    let mut template = template.clone();
    let mut spec = template["spec"].take();
    spec["nodeName"] = serde_json::json!(NODE_NAME);
    // The test node has no CNI: only host-network pods start (docs/testing.md).
    spec["hostNetwork"] = serde_json::json!(true);
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": BRIDGE_NS, "labels": template["metadata"]["labels"].clone()},
        "spec": spec,
    });
    cluster.apply(&pod.to_string());
    wait(cluster, &format!("bridge pod {name} is Ready"), || {
        pod_ready(cluster, BRIDGE_NS, name).then_some(())
    });
}

pub fn pod_ready(cluster: &Cluster, ns: &str, name: &str) -> bool {
    pod_json(cluster, ns, name).is_some_and(|p| {
        p["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
    })
}

/// envoy/sidecar.yaml with every `${VAR}` replaced from `vars`; panics if one is left.
pub fn envoy_sidecar_config(vars: &BTreeMap<&str, String>) -> String {
    let mut config = std::fs::read_to_string(manifest_dir().join("envoy/sidecar.yaml"))
        .expect("read envoy/sidecar.yaml");
    for (k, v) in vars {
        config = config.replace(&format!("${{{k}}}"), v);
    }
    let unreplaced: Vec<&str> = config
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains("${"))
        .collect();
    assert!(
        unreplaced.is_empty(),
        "unreplaced variables: {unreplaced:?}"
    );
    config
}

/// The drivers the node's CSINode object lists.
pub fn csinode_drivers(cluster: &Cluster) -> Vec<String> {
    let out = cluster.kubectl_output(&["get", "csinode", NODE_NAME, "-o", "json"]);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return Vec::new();
    };
    v["spec"]["drivers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["name"].as_str().map(str::to_string))
        .collect()
}

/// A workload pod: Envoy from `config_map`'s `envoy.yaml` with the SPIFFE CSI volume
/// (`csi`, e.g. `{"driver": DRIVER, "readOnly": true}`) at `/spiffe-workload-api`, bound to
/// the node, on the host network, as service account `sa`.
pub fn envoy_pod(
    name: &str,
    sa: &str,
    app: &str,
    config_map: &str,
    csi: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": APPS_NS, "labels": {"app": app}},
        "spec": {
            "nodeName": NODE_NAME, "hostNetwork": true, "serviceAccountName": sa,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "envoy", "image": ENVOY_IMAGE, "imagePullPolicy": "Never",
                "args": ["-c", "/etc/envoy/envoy.yaml", "--disable-hot-restart",
                         "--concurrency", "1", "-l", "info"],
                "volumeMounts": [
                    {"name": "config", "mountPath": "/etc/envoy", "readOnly": true},
                    {"name": "spiffe", "mountPath": "/spiffe-workload-api", "readOnly": true},
                ],
            }],
            "volumes": [
                {"name": "config", "configMap": {"name": config_map}},
                {"name": "spiffe", "csi": csi},
            ],
        },
    })
}
