//! The pod view's cost (issue #16, "Figures"): the memory of svid-bridge's watch of its
//! node's pods at 0, 110 and 1,000 pods, and the requests it makes to the API server per
//! minute at steady state.
//!
//! Only etcd and kube-apiserver of the test node run (`Cluster::start_control_plane`): pods
//! bound to the node with `spec.nodeName` are API objects that nothing runs, which is all a
//! watch sees. Each pod is shaped like a meshed workload's (labels, an owner, annotations,
//! an app container and an Envoy with mounts, env and resources, the CSI volume, a projected
//! token added by admission) and gets a Running status with two container statuses and
//! conditions, written through the status subresource as a kubelet would.
//!
//! The bridge is the release binary (`svid-bridge run`), started in a private mount
//! namespace (`unshare -m`) whose `/run` is a tmpfs holding a service account token at the
//! in-cluster path, so `--kubernetes auto` finds it exactly as in a pod; the token is the
//! `svid-bridge` service account's, bound to the chart's ClusterRole rules (pods
//! get/list/watch, events create/patch). No SPIRE agent runs (the agent socket does not
//! exist): the bridge retries the agent and serves nothing, which is the same for both
//! modes.
//!
//! Memory: per pod count, a fresh bridge with `--kubernetes auto`, once `/debug/workloads`
//! says its view holds every pod, `VmRSS` sampled 10 times over 5 s (median) and `VmHWM`;
//! the baseline is the same bridge with `--kubernetes off`. Requests: the API server's audit
//! log (level Metadata, only the bridge's service account) counts the requests the bridge
//! starts (distinct audit IDs), during its start-up until the view is synced, then over
//! `SB_POD_VIEW_WINDOW` seconds (default 300: kube's watch asks the server to end a watch
//! after 290 s, so a shorter window can miss the one re-watch).
//!
//! Knobs: `SB_POD_VIEW_AT` (default `0,110,1000`), `SB_POD_VIEW_WINDOW`. Results:
//! benches/results/k8s-pod-view.md. Runs as root; takes the node lock like the tests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::too_many_lines
)]

mod support;
use svid_bridge::testing as common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, NODE_NAME};
use common::proc::Proc;
use common::{free_port, wait_until};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use support::{env_list, env_num};

const SA_NS: &str = "svid-bridge";
const SA: &str = "svid-bridge";
const PODS_NS: &str = "bench";
const SAMPLES: usize = 10;
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

fn main() {
    let counts = env_list("SB_POD_VIEW_AT", &[0, 110, 1000]);
    let window = Duration::from_secs(env_num("SB_POD_VIEW_WINDOW", 300) as u64);
    let started_at = support::utc_now();
    let work = common::temp_dir("pod-view-bench");
    let policy = work.path().join("audit-policy.yaml");
    let audit_log = work.path().join("audit.log");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  users: [\"system:serviceaccount:{SA_NS}:{SA}\"]
- level: None
"
        ),
    )
    .unwrap();
    let cluster = Cluster::start_control_plane(&[
        format!("--audit-policy-file={}", policy.display()),
        format!("--audit-log-path={}", audit_log.display()),
    ]);
    let sa_dir = service_account(&cluster, work.path());
    cluster.ensure_namespace(PODS_NS);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(admin_client(&cluster));
    let binary = common::bridge_binary();
    println!(
        "k8s_pod_view: bridge {}, pods at {counts:?}, steady window {}s",
        binary.display(),
        window.as_secs()
    );

    let mut rows = Vec::new();
    let off = measure(&cluster, &binary, &sa_dir, work.path(), false, 0);
    println!("k8s_pod_view: --kubernetes off: {off:?}");
    let mut created = 0;
    let mut requests = None;
    for &n in &counts {
        let t = Instant::now();
        rt.block_on(create_pods(&client, created, n));
        created = created.max(n);
        println!(
            "k8s_pod_view: {n} pods on {NODE_NAME} ({:.1}s to create)",
            t.elapsed().as_secs_f64()
        );
        let last = Some(&n) == counts.iter().max();
        let audit_before = audit_ids(&audit_log);
        let mut on = start_bridge(&binary, cluster.api_port(), &sa_dir, work.path(), true);
        let sync_started = Instant::now();
        wait_synced(&on, n);
        let sync = sync_started.elapsed();
        let startup_ids = audit_ids(&audit_log);
        let memory = sample_memory(on.proc.pid());
        println!(
            "k8s_pod_view: auto, {n} pods: synced in {:.1}s, {memory:?}",
            sync.as_secs_f64()
        );
        if last {
            let startup = new_requests(&audit_before, &startup_ids);
            println!(
                "k8s_pod_view: counting requests for {}s at steady state",
                window.as_secs()
            );
            std::thread::sleep(window);
            let steady = new_requests(&startup_ids, &audit_ids(&audit_log));
            requests = Some(Requests {
                pods: n,
                startup,
                steady,
                window,
                rss_after_kib: status_kib(on.proc.pid(), "VmRSS:"),
            });
        }
        on.proc.stop();
        rows.push(Row {
            pods: n,
            sync,
            memory,
        });
    }
    drop(cluster);
    report(&started_at, &binary, &off, &rows, requests.as_ref());
}

#[derive(Debug, Clone, Copy)]
struct Memory {
    /// Median VmRSS, KiB.
    rss_kib: u64,
    /// VmHWM (peak RSS) at the end of the sampling, KiB.
    hwm_kib: u64,
}

struct Row {
    pods: usize,
    sync: Duration,
    memory: Memory,
}

struct Requests {
    pods: usize,
    /// Verb and resource → requests.
    startup: BTreeMap<String, usize>,
    steady: BTreeMap<String, usize>,
    window: Duration,
    /// VmRSS at the end of the window, KiB.
    rss_after_kib: u64,
}

struct Bridge {
    proc: Proc,
    health: String,
}

/// The `svid-bridge` service account with the chart's ClusterRole rules, and a directory
/// laid out as the kubelet mounts a token: `token`, `ca.crt`, `namespace`.
fn service_account(cluster: &Cluster, work: &Path) -> PathBuf {
    cluster.ensure_namespace(SA_NS);
    let rbac = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": SA, "namespace": SA_NS}},
        // The rules of charts/svid-bridge/templates/rbac.yaml.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "svid-bridge-pods"},
         "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "svid-bridge-pods"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "svid-bridge-pods"},
         "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": SA_NS}]},
    ]});
    cluster.apply(&rbac.to_string());
    let token = cluster.kubectl(&["create", "token", SA, "-n", SA_NS, "--duration=6h"]);
    let dir = work.join("serviceaccount");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), token.trim()).unwrap();
    std::fs::copy(cluster.root().join("pki/ca.crt"), dir.join("ca.crt")).unwrap();
    std::fs::write(dir.join("namespace"), SA_NS).unwrap();
    dir
}

async fn admin_client(cluster: &Cluster) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(cluster.kubeconfig()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// Pods `from..to` in the bench namespace, bound to the node, then their Running status.
async fn create_pods(client: &kube::Client, from: usize, to: usize) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), PODS_NS);
    futures::stream::iter(from..to)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let pod: Pod = serde_json::from_value(pod_spec(i)).unwrap();
                pods.create(&PostParams::default(), &pod).await.unwrap();
                let status = serde_json::json!({"status": pod_status(i)});
                pods.patch_status(
                    &pod_name(i),
                    &PatchParams::default(),
                    &Patch::Merge(&status),
                )
                .await
                .unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

fn pod_name(i: usize) -> String {
    format!("app-{:04}-7d9f8c6b5-x{i:04}", i / 10)
}

fn pod_spec(i: usize) -> serde_json::Value {
    let app = format!("app-{:04}", i / 10);
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod_name(i), "namespace": PODS_NS,
            "labels": {"app": app, "pod-template-hash": "7d9f8c6b5", "version": "v1",
                       "spiffe.io/spire-managed-identity": "true"},
            "annotations": {"kubectl.kubernetes.io/default-container": "app",
                            "prometheus.io/scrape": "true", "prometheus.io/port": "9901"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{app}-7d9f8c6b5"), "uid": format!("00000000-0000-4000-8000-{i:012}"),
                "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "nodeName": NODE_NAME,
            "containers": [
                {"name": "app", "image": "registry.example/app:1.2.3",
                 "ports": [{"containerPort": 8080, "name": "http"}],
                 "env": [{"name": "MODE", "value": "prod"}, {"name": "LOG", "value": "info"}],
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                               "limits": {"memory": "256Mi"}},
                 "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}},
                {"name": "envoy", "image": "envoyproxy/envoy:v1.40.0",
                 "args": ["-c", "/etc/envoy/envoy.yaml", "--service-node", app],
                 "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                 "volumeMounts": [{"name": "spiffe", "mountPath": "/spiffe-workload-api", "readOnly": true},
                                  {"name": "envoy-config", "mountPath": "/etc/envoy"}]},
            ],
            "volumes": [
                {"name": "spiffe", "csi": {"driver": "csi.spiffe.io", "readOnly": true}},
                {"name": "envoy-config", "configMap": {"name": format!("{app}-envoy")}},
            ],
        },
    })
}

fn pod_status(i: usize) -> serde_json::Value {
    let cid = |c: &str| format!("containerd://{:0>64}", format!("{c}{i}"));
    let status = |name: &str, image: &str| {
        serde_json::json!({
            "name": name, "image": image, "imageID": format!("{image}@sha256:{:0>64}", i),
            "containerID": cid(name), "ready": true, "restartCount": 0, "started": true,
            "state": {"running": {"startedAt": "2026-12-06T03:00:00Z"}},
        })
    };
    let conditions: Vec<serde_json::Value> = [
        "PodReadyToStartContainers",
        "Initialized",
        "ContainersReady",
        "Ready",
        "PodScheduled",
    ]
    .iter()
    .map(|t| {
        serde_json::json!({"type": t, "status": "True",
                           "lastTransitionTime": "2026-12-06T03:00:01Z"})
    })
    .collect();
    serde_json::json!({
        "phase": "Running",
        "hostIP": "10.0.0.10", "hostIPs": [{"ip": "10.0.0.10"}],
        "podIP": format!("10.244.{}.{}", i / 250, i % 250 + 2),
        "podIPs": [{"ip": format!("10.244.{}.{}", i / 250, i % 250 + 2)}],
        "startTime": "2026-12-06T03:00:00Z",
        "conditions": conditions,
        "containerStatuses": [status("app", "registry.example/app:1.2.3"),
                              status("envoy", "envoyproxy/envoy:v1.40.0")],
    })
}

/// `svid-bridge run` in a private mount namespace whose `/run` holds `sa_dir` at the
/// in-cluster path; `kube`: `--kubernetes auto`, else `off`.
fn start_bridge(binary: &Path, api_port: u16, sa_dir: &Path, work: &Path, kube: bool) -> Bridge {
    let mode = if kube { "auto" } else { "off" };
    let dir = work.join(format!("bridge-{mode}-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let health = format!("127.0.0.1:{}", free_port());
    let args = [
        "run".to_owned(),
        format!("--kubernetes={mode}"),
        format!("--node-id={NODE_NAME}"),
        format!("--admin-socket={}", dir.join("no-agent.sock").display()),
        format!("--sds-socket={}", dir.join("sds.sock").display()),
        "--csi-socket=".to_owned(),
        "--metrics-addr=".to_owned(),
        format!("--health-addr={health}"),
        "--log-level=info".to_owned(),
    ];
    let script = format!(
        "set -e; mount -t tmpfs sa /run; d=/run/secrets/kubernetes.io/serviceaccount; \
         mkdir -p $d; cp {sa}/token {sa}/ca.crt {sa}/namespace $d/; exec \"$@\"",
        sa = sa_dir.display()
    );
    let mut cmd = Command::new("unshare");
    // No --fork: unshare and sh exec, so the PID is the bridge's.
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &script, "sh"])
        .arg(binary)
        .args(args)
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", api_port.to_string());
    let proc = Proc::spawn(&format!("svid-bridge-{mode}"), cmd, &dir);
    let bridge = Bridge { proc, health };
    wait_until(
        Duration::from_secs(30),
        "the bridge answers /healthz",
        || svid_bridge::telemetry::health::get_body(&bridge.health, "/healthz").ok(),
    );
    bridge
}

fn wait_synced(bridge: &Bridge, pods: usize) {
    wait_until(
        Duration::from_secs(120),
        &format!("the pod view holds {pods} pods"),
        || {
            let body = svid_bridge::telemetry::health::get_body(&bridge.health, "/debug/workloads")
                .ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (v["pods_on_node"].as_u64()? == pods as u64).then_some(())
        },
    );
}

fn measure(
    cluster: &Cluster,
    binary: &Path,
    sa_dir: &Path,
    work: &Path,
    kube: bool,
    pods: usize,
) -> Memory {
    let mut bridge = start_bridge(binary, cluster.api_port(), sa_dir, work, kube);
    if kube {
        wait_synced(&bridge, pods);
    }
    let memory = sample_memory(bridge.proc.pid());
    bridge.proc.stop();
    memory
}

fn sample_memory(pid: u32) -> Memory {
    // Let start-up allocations settle.
    std::thread::sleep(Duration::from_secs(3));
    let mut rss = Vec::new();
    for _ in 0..SAMPLES {
        rss.push(status_kib(pid, "VmRSS:"));
        std::thread::sleep(SAMPLE_EVERY);
    }
    rss.sort_unstable();
    Memory {
        rss_kib: rss[rss.len() / 2],
        hwm_kib: status_kib(pid, "VmHWM:"),
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} of {pid}"))
}

/// Audit ID → verb of every request the audit log holds (the policy logs only the bridge's).
fn audit_ids(log: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|e| {
            Some((
                e["auditID"].as_str()?.to_owned(),
                format!(
                    "{} {}",
                    e["verb"].as_str()?,
                    e["objectRef"]["resource"].as_str().unwrap_or("-")
                ),
            ))
        })
        .collect()
}

/// The requests in `after` that `before` does not hold, by verb and resource.
fn new_requests(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, verb) in after.iter().filter(|(id, _)| !before.contains_key(*id)) {
        *counts.entry(verb.clone()).or_default() += 1;
    }
    counts
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn report(
    started_at: &str,
    binary: &Path,
    off: &Memory,
    rows: &[Row],
    requests: Option<&Requests>,
) {
    let mut text = format!(
        "# The pod view's cost ({started_at})\n\n{}\n\nBridge: {}. Memory: MiB, median \
         `VmRSS` of 10 samples over 5 s once the view holds every pod; peak is `VmHWM`.\n\n\
         | pods on the node | view synced after (s) | RSS | peak RSS | RSS − `--kubernetes off` |\n\
         |---:|---:|---:|---:|---:|\n\
         | `--kubernetes off` | – | {} | {} | – |\n",
        support::machine_description(),
        match std::env::var("_RJEM_MALLOC_CONF") {
            Ok(conf) => format!(
                "`{}` (jemalloc: `_RJEM_MALLOC_CONF={conf}`)",
                binary.display()
            ),
            Err(_) => format!("`{}`", binary.display()),
        },
        mib(off.rss_kib),
        mib(off.hwm_kib),
    );
    for r in rows {
        text.push_str(&format!(
            "| {} | {:.1} | {} | {} | {} |\n",
            r.pods,
            r.sync.as_secs_f64(),
            mib(r.memory.rss_kib),
            mib(r.memory.hwm_kib),
            mib(r.memory.rss_kib.saturating_sub(off.rss_kib)),
        ));
    }
    if let Some(q) = requests {
        let verbs = |m: &BTreeMap<String, usize>| {
            if m.is_empty() {
                "none".to_owned()
            } else {
                m.iter()
                    .map(|(v, n)| format!("{n} × {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let total: usize = q.steady.values().sum();
        text.push_str(&format!(
            "\nRequests to the API server (audit log, the bridge's service account), {} pods: \
             {} from start until synced ({}); then {} in {} s at steady state ({}), {:.2} per \
             minute.\n",
            q.pods,
            q.startup.values().sum::<usize>(),
            verbs(&q.startup),
            total,
            q.window.as_secs(),
            verbs(&q.steady),
            total as f64 * 60.0 / q.window.as_secs_f64(),
        ));
        text.push_str(&format!(
            "RSS of that bridge at the end of the window: {} MiB.\n",
            mib(q.rss_after_kib)
        ));
    }
    println!("\n{text}");
    support::write_result(&support::results_dir(), "k8s-pod-view.md", &text);
}
