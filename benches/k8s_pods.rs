//! Pods on a real Kubernetes node (issue #19, item 5): svid-bridge against what it replaces,
//! spiffe-csi-driver + the SPIRE agent's own SDS server, on the single-node cluster of
//! src/testing/cluster.rs (etcd, kube-apiserver, containerd, the kubelet) with SPIRE server
//! and agent as pods, exactly as tests/k8s_node.rs deploys them (src/testing/k8s_deploy.rs).
//!
//! Two setups, in one run on one node (same etcd, apiserver, kubelet, containerd and SPIRE
//! server), one after the other (`SB_K8S_SETUPS`, default `bridge,csi`):
//!
//! - `bridge`: charts/svid-bridge (the DaemonSet's pod from its template); the Envoy sidecar's
//!   SDS cluster is `/spiffe-workload-api/socket`, the bridge's socket.
//! - `csi`: spiffe-csi-driver v0.2.6 in a pod shaped like its upstream DaemonSet, with a
//!   *stand-in* registrar container beside it (node-driver-registrar cannot be built here: the
//!   Go module proxy answers "not available" for it); the sidecar's SDS cluster is
//!   `/spiffe-workload-api/spire-agent.sock`, the agent's Workload API socket, on which the
//!   agent serves SDS.
//!
//! Everything else is the same: the workload pods (Envoy from envoy/sidecar.yaml, one service
//! account and one registration entry per pod, `k8s:ns`/`k8s:sa` selectors, the CSI volume of
//! `csi.spiffe.io`), the entries (created before either setup runs), and a fresh SPIRE agent
//! per setup (new join token, empty data dir), so neither setup inherits the other's agent
//! state.
//!
//! Per setup:
//! 1. a warm-up pod (not counted): containerd unpacks the Envoy image for the first pod only,
//!    and the agent's first attestation through a new path warms its caches;
//! 2. *latency*: `SB_K8S_LATENCY_PODS` (50) pods created one at a time, each after the
//!    previous one's Envoy holds its SVID: from just before the create call (a `curl` POST to
//!    the apiserver) until the Envoy's admin `/certs` lists a certificate with the pod's
//!    SPIFFE ID (polled every 20 ms);
//! 3. *node memory and CPU*: RSS (`VmRSS`) and PSS (`smaps_rollup`) of the SPIFFE components' processes,
//!    sampled 10 times over 5 s (median) once 10, 50 and 110 Envoy pods hold their SVIDs
//!    (`SB_K8S_RSS_AT`); pods beyond the latency ones are created 10 at a time; with them the
//!    CPU each process has used since the run started it, and its CPU rate over those 5 s
//!    (`SB_K8S_BRIDGE_LOG_LEVEL` sets the bridge's chart `logLevel`, default debug as the tests;
//!    `SB_K8S_BRIDGE_SET` adds chart values, e.g. `kubernetes.enabled=false`);
//! 4. everything of the setup removed (pods, plugin, agent), the node left as before.
//!
//! Results: benches/results/k8s.md and k8s-runs.json (`SB_BENCH_RESULTS` moves them). Runs as
//! root; takes the node lock like the tests (a `make test` in progress makes it wait).
//!
//! The stand-in registrar is this binary in another mode (`SB_K8S_STAND_IN_REGISTRAR`), run
//! as a container: it asks the CSI socket for the plugin's name (GetPluginInfo), then serves
//! the kubelet's plugin-registration service (GetInfo, NotifyRegistrationStatus) on
//! `plugins_registry/csi.spiffe.io-reg.sock`, and removes that socket on SIGTERM, which is
//! what node-driver-registrar does for the kubelet; its memory is reported in a column of its
//! own because it is not node-driver-registrar's.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::too_many_lines
)]

mod support;
use svid_bridge::testing as common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, NODE_NAME};
use common::http;
use common::k8s_deploy::{
    self, APPS_NS, BRIDGE_NS, DRIVER, SPIRE_NS, SpireDirs, config_map, id, wait,
};
use support::{Summary, env_list, env_num, percentile};

const REGISTRAR_ENV: &str = "SB_K8S_STAND_IN_REGISTRAR";
const CSI_DRIVER_IMAGE: &str = "local.test/spiffe-csi-driver:0.2.6";
const REGISTRAR_IMAGE: &str = "local.test/stand-in-registrar:bench";
/// 110 Envoys, SPIRE server and agent, the plugin's pod and the warm-up pod, with room; more
/// when `SB_K8S_RSS_AT` asks for more Envoys (beyond Kubernetes' default of 110 per node).
const MAX_PODS: u32 = 130;
const PODS_BESIDE_ENVOYS: u32 = 20;
/// A pod that does not hold its SVID by then fails the run (2 cores, busy: generous).
const POD_DEADLINE: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(20);
const RSS_SAMPLES: usize = 10;
const FIRST_POD_PORT: u16 = 20_000;
const EPHEMERAL_PORTS_START: u16 = 32_768;
const RSS_INTERVAL: Duration = Duration::from_millis(500);
const BATCH: usize = 10;

fn main() {
    if let Ok(socket) = std::env::var(REGISTRAR_ENV) {
        registrar::main(PathBuf::from(socket));
        return;
    }
    let setups: Vec<String> = std::env::var("SB_K8S_SETUPS")
        .unwrap_or_else(|_| "bridge,csi".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    for s in &setups {
        assert!(
            s == "bridge" || s == "csi",
            "SB_K8S_SETUPS: {s}: want bridge or csi"
        );
    }
    let latency_pods = env_num("SB_K8S_LATENCY_PODS", 50);
    let rss_at = env_list("SB_K8S_RSS_AT", &[10, 50, 110]);
    let total = rss_at.iter().copied().max().unwrap_or(0).max(latency_pods);

    let started_at = support::utc_now();
    let load_before = loadavg();
    println!("k8s_pods: setups {setups:?}, {latency_pods} latency pods, RSS at {rss_at:?}");
    println!("k8s_pods: load average before: {load_before}");

    let node = Node::start(total);
    let mut runs = Vec::new();
    for setup in &setups {
        let t = Instant::now();
        let run = node.run_setup(setup, latency_pods, &rss_at, total);
        println!(
            "k8s_pods: setup {setup} done in {:.0}s",
            t.elapsed().as_secs_f64()
        );
        runs.push(run);
    }
    let load_after = loadavg();
    println!("k8s_pods: load average after: {load_after}");
    drop(node);

    let facts = Facts {
        started_at,
        machine: support::machine_description(),
        cgroup: cgroup_version(),
        commit: git_commit(),
        load_before,
        load_after,
    };
    report(&facts, &runs, latency_pods);
}

// ------------------------------------------------------------------------ the node ----

struct Node {
    cluster: Cluster,
    spire: SpireDirs,
    server_port: u16,
    /// Per workload pod: its name, admin port and config (per setup: the SDS socket differs).
    workloads: Vec<Workload>,
}

struct Workload {
    name: String,
    admin: u16,
    inbound: u16,
    outbound: u16,
}

impl Workload {
    fn spiffe_id(&self) -> String {
        id(APPS_NS, &self.name)
    }
}

impl Node {
    fn start(total: usize) -> Node {
        let t = Instant::now();
        let cluster = Cluster::start_with_max_pods(
            MAX_PODS.max(
                u32::try_from(total)
                    .unwrap_or(u32::MAX)
                    .saturating_add(PODS_BESIDE_ENVOYS),
            ),
        );
        k8s_deploy::import_images(&cluster, &common::bridge_binary());
        cluster.import_image(
            CSI_DRIVER_IMAGE,
            &[(common::peer("spiffe-csi-driver"), "/spiffe-csi-driver")],
            &["--entrypoint", "/spiffe-csi-driver"],
        );
        cluster.import_image(
            REGISTRAR_IMAGE,
            &[(common::this_test_binary(), "/stand-in-registrar")],
            &["--entrypoint", "/stand-in-registrar"],
        );
        for ns in [SPIRE_NS, BRIDGE_NS, APPS_NS] {
            cluster.ensure_namespace(ns);
        }
        let spire = SpireDirs::create(&cluster);
        let server_port = common::free_port();
        k8s_deploy::start_spire_server(&cluster, &spire.dir, server_port);
        wait(&cluster, "spire-server is healthy", || {
            k8s_deploy::spire_server(&spire.server_socket, &["healthcheck"])
                .status
                .success()
                .then_some(())
        });

        // One service account and entry per workload pod (plus the warm-up pod's), in one
        // `entry create -data` call: both setups find every entry in place.
        let mut ports = HashSet::new();
        let workloads: Vec<Workload> = (0..=total)
            .map(|i| Workload {
                // w000 is the warm-up pod.
                name: format!("w{i:03}"),
                admin: unique_port(&mut ports),
                inbound: unique_port(&mut ports),
                outbound: unique_port(&mut ports),
            })
            .collect();
        let mut entries: Vec<serde_json::Value> = workloads
            .iter()
            .map(|w| entry_json(&w.spiffe_id(), APPS_NS, &w.name))
            .collect();
        entries.push(entry_json(
            &id(BRIDGE_NS, "svid-bridge"),
            BRIDGE_NS,
            "svid-bridge",
        ));
        let data = cluster.root().join("entries.json");
        std::fs::write(&data, serde_json::json!({ "entries": entries }).to_string()).unwrap();
        let out = k8s_deploy::spire_server(
            &spire.server_socket,
            &["entry", "create", "-data", data.to_str().unwrap()],
        );
        assert!(
            out.status.success(),
            "entry create -data: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let sas: Vec<serde_json::Value> = workloads
            .iter()
            .map(|w| {
                serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": w.name, "namespace": APPS_NS}})
            })
            .collect();
        cluster.apply(
            &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": sas}).to_string(),
        );
        println!(
            "k8s_pods: node, images, SPIRE server and {} entries ready in {:.0}s",
            entries.len(),
            t.elapsed().as_secs_f64()
        );
        Node {
            cluster,
            spire,
            server_port,
            workloads,
        }
    }

    fn run_setup(&self, setup: &str, latency_pods: usize, rss_at: &[usize], total: usize) -> Run {
        let c = &self.cluster;
        println!("k8s_pods: [{setup}] starting a fresh SPIRE agent");
        self.start_agent();
        let sds_socket = match setup {
            "bridge" => {
                // The tests' chart values run the bridge at debug level; a user's default is info.
                let level =
                    std::env::var("SB_K8S_BRIDGE_LOG_LEVEL").unwrap_or_else(|_| "debug".into());
                let set_level = format!("logLevel={level}");
                let mut sets = vec!["--set", &set_level];
                // More chart values, e.g. `kubernetes.enabled=false` (the pod view off).
                let extra = std::env::var("SB_K8S_BRIDGE_SET").unwrap_or_default();
                if !extra.is_empty() {
                    sets.extend(["--set", extra.as_str()]);
                }
                let template = k8s_deploy::install_chart(c, common::free_port(), &sets);
                k8s_deploy::start_bridge_pod(c, &template, "svid-bridge-0");
                "/spiffe-workload-api/socket"
            }
            _ => {
                self.start_csi_driver();
                "/spiffe-workload-api/spire-agent.sock"
            }
        };
        wait(c, "CSINode lists csi.spiffe.io", || {
            k8s_deploy::csinode_drivers(c)
                .contains(&DRIVER.to_string())
                .then_some(())
        });
        let components = match setup {
            "bridge" => vec!["/spire-agent", "/svid-bridge"],
            _ => vec!["/spire-agent", "/spiffe-csi-driver", "/stand-in-registrar"],
        };
        // The Envoy configs of this setup: only the SDS socket differs between setups.
        let maps: Vec<serde_json::Value> = self
            .workloads
            .iter()
            .map(|w| {
                config_map(
                    APPS_NS,
                    &format!("envoy-{}", w.name),
                    "envoy.yaml",
                    &envoy_config(w, sds_socket),
                )
            })
            .collect();
        c.apply(
            &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": maps}).to_string(),
        );

        let mut run = Run {
            setup: setup.to_string(),
            idle: self.memory(&components),
            ..Run::default()
        };
        println!("k8s_pods: [{setup}] plugin up; warm-up pod");
        let warm = &self.workloads[0];
        let t = self.start_and_wait(&[warm]);
        run.warmup_ms = t[0];
        self.delete_pods(std::slice::from_ref(&warm.name));

        let mut running = 0;
        let mut targets: Vec<usize> = rss_at.to_vec();
        targets.sort_unstable();
        let mut checkpoint = |running: usize, run: &mut Run| {
            if targets.first() == Some(&running) {
                targets.remove(0);
                let m = self.memory(&components);
                println!(
                    "k8s_pods: [{setup}] {running} pods: {}",
                    m.iter()
                        .map(|(k, v)| format!("{k} {:.1} MiB", v.rss_kib as f64 / 1024.0))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                run.memory.insert(running, m);
            }
        };
        for w in &self.workloads[1..=latency_pods] {
            let t = self.start_and_wait(&[w]);
            run.latency_ms.push(t[0]);
            running += 1;
            if running % 10 == 0 {
                println!("k8s_pods: [{setup}] {running} pods, last {:.0} ms", t[0]);
            }
            checkpoint(running, &mut run);
        }
        for batch in self.workloads[latency_pods + 1..=total].chunks(BATCH) {
            let refs: Vec<&Workload> = batch.iter().collect();
            run.batch_ms.extend(self.start_and_wait(&refs));
            running += batch.len();
            println!("k8s_pods: [{setup}] {running} pods");
            checkpoint(running, &mut run);
        }
        run.load = loadavg();

        println!("k8s_pods: [{setup}] removing the workloads, the plugin and the agent");
        let names: Vec<String> = self.workloads[1..=total]
            .iter()
            .map(|w| w.name.clone())
            .collect();
        self.delete_pods(&names);
        match setup {
            "bridge" => {
                c.kubectl(&[
                    "delete",
                    "pod",
                    "-n",
                    BRIDGE_NS,
                    "svid-bridge-0",
                    "--wait=true",
                ]);
                let out = k8s_deploy::uninstall_chart(c);
                assert!(out.status.success(), "chart-check uninstall: {out:?}");
            }
            _ => {
                c.kubectl(&[
                    "delete",
                    "pod",
                    "-n",
                    SPIRE_NS,
                    "spiffe-csi-driver",
                    "--wait=true",
                ]);
                c.kubectl(&["delete", "csidriver", DRIVER, "--wait=true"]);
            }
        }
        wait(c, "CSINode no longer lists csi.spiffe.io", || {
            (!k8s_deploy::csinode_drivers(c).contains(&DRIVER.to_string())).then_some(())
        });
        c.kubectl(&[
            "delete",
            "pod",
            "-n",
            SPIRE_NS,
            "spire-agent",
            "--wait=true",
        ]);
        run
    }

    /// A new agent pod with an empty data dir and a new join token (a join token attests
    /// once, and the memory key manager keeps nothing across restarts).
    fn start_agent(&self) {
        let data = self.spire.dir.join("agent-data");
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).unwrap();
        let token = k8s_deploy::join_token(&self.spire.server_socket);
        k8s_deploy::start_spire_agent(&self.cluster, &self.spire.dir, self.server_port, &token);
        k8s_deploy::wait_agent_healthy(&self.cluster, &self.spire.agent_sockets);
    }

    /// spiffe-csi-driver as its upstream DaemonSet runs it (example/config in spiffe-csi
    /// v0.2.6), the stand-in registrar where node-driver-registrar would be, and the
    /// CSIDriver object; the pod is created directly, as the tests do for the bridge.
    fn start_csi_driver(&self) {
        let kubelet = self.cluster.kubelet_root();
        let plugin_dir = kubelet.join("plugins").join(DRIVER);
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "spiffe-csi-driver", "namespace": SPIRE_NS,
                         "labels": {"app": "spiffe-csi-driver"}},
            "spec": {
                "nodeName": NODE_NAME, "hostNetwork": true, "automountServiceAccountToken": false,
                "containers": [
                    {
                        "name": "spiffe-csi-driver", "image": CSI_DRIVER_IMAGE,
                        "imagePullPolicy": "Never",
                        "args": ["-workload-api-socket-dir", "/spire-agent-socket",
                                 "-csi-socket-path", "/spiffe-csi/csi.sock"],
                        "env": [{"name": "MY_NODE_NAME",
                                 "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                        "volumeMounts": [
                            {"name": "agent-sockets", "mountPath": "/spire-agent-socket", "readOnly": true},
                            {"name": "plugin-dir", "mountPath": "/spiffe-csi"},
                            {"name": "pods", "mountPath": kubelet.join("pods"),
                             "mountPropagation": "Bidirectional"},
                        ],
                        "securityContext": {"privileged": true, "readOnlyRootFilesystem": true},
                    },
                    {
                        "name": "stand-in-registrar", "image": REGISTRAR_IMAGE,
                        "imagePullPolicy": "Never",
                        "env": [
                            {"name": REGISTRAR_ENV, "value": format!("/registration/{DRIVER}-reg.sock")},
                            {"name": "SB_K8S_REGISTRAR_CSI_ADDRESS", "value": "/spiffe-csi/csi.sock"},
                            {"name": "SB_K8S_REGISTRAR_ENDPOINT", "value": plugin_dir.join("csi.sock")},
                        ],
                        "volumeMounts": [
                            {"name": "plugin-dir", "mountPath": "/spiffe-csi"},
                            {"name": "registry", "mountPath": "/registration"},
                        ],
                    },
                ],
                "volumes": [
                    k8s_deploy::host_dir("agent-sockets", &self.spire.agent_sockets),
                    {"name": "plugin-dir", "hostPath": {"path": plugin_dir, "type": "DirectoryOrCreate"}},
                    k8s_deploy::host_dir("pods", &kubelet.join("pods")),
                    k8s_deploy::host_dir("registry", &kubelet.join("plugins_registry")),
                ],
            },
        });
        let driver = serde_json::json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver",
            "metadata": {"name": DRIVER},
            "spec": {"attachRequired": false, "podInfoOnMount": true, "fsGroupPolicy": "None",
                     "volumeLifecycleModes": ["Ephemeral"]},
        });
        self.cluster.apply(
            &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [driver, pod]})
                .to_string(),
        );
        wait(&self.cluster, "the spiffe-csi-driver pod is Ready", || {
            k8s_deploy::pod_ready(&self.cluster, SPIRE_NS, "spiffe-csi-driver").then_some(())
        });
    }

    /// Creates the pods of `ws` (one POST each) and waits until every Envoy holds its SVID;
    /// returns each one's time from just before its create call, in ms.
    fn start_and_wait(&self, ws: &[&Workload]) -> Vec<f64> {
        let starts: Vec<Instant> = ws
            .iter()
            .map(|w| {
                let t = Instant::now();
                self.create_pod(w);
                t
            })
            .collect();
        let mut done: Vec<Option<f64>> = vec![None; ws.len()];
        while done.iter().any(Option::is_none) {
            for (i, w) in ws.iter().enumerate() {
                if done[i].is_none() && envoy_holds(w.admin, &w.spiffe_id()) {
                    done[i] = Some(starts[i].elapsed().as_secs_f64() * 1e3);
                } else if done[i].is_none() && starts[i].elapsed() > POD_DEADLINE {
                    common::proc::fail_with_logs(
                        &format!(
                            "pod {} did not hold its SVID within {POD_DEADLINE:?}; pod: {}",
                            w.name,
                            common::cluster::pod_json(&self.cluster, APPS_NS, &w.name)
                                .map(|p| p["status"].to_string())
                                .unwrap_or_default()
                        ),
                        &[&self.cluster],
                    );
                }
            }
            std::thread::sleep(POLL);
        }
        done.into_iter().map(|d| d.unwrap_or_default()).collect()
    }

    /// POST of the pod to the apiserver with curl (its start-up is a few ms, where kubectl's
    /// is hundreds on this machine); the ServiceAccount and ConfigMap exist already.
    fn create_pod(&self, w: &Workload) {
        let pod = k8s_deploy::envoy_pod(
            &w.name,
            &w.name,
            "k8s-bench",
            &format!("envoy-{}", w.name),
            serde_json::json!({"driver": DRIVER, "readOnly": true}),
        );
        let pki = self.cluster.root().join("pki");
        let mut child = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ])
            .arg("--cacert")
            .arg(pki.join("ca.crt"))
            .arg("--cert")
            .arg(pki.join("admin.crt"))
            .arg("--key")
            .arg(pki.join("admin.key"))
            .arg(format!(
                "https://127.0.0.1:{}/api/v1/namespaces/{APPS_NS}/pods",
                self.cluster.api_port()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run curl");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(pod.to_string().as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let code = String::from_utf8_lossy(&out.stdout);
        assert!(
            code.trim() == "201",
            "create pod {}: HTTP {code} {}",
            w.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Deletes pods and waits until they are gone and their CSI volumes unmounted.
    fn delete_pods(&self, names: &[String]) {
        let mut args = vec!["delete", "pod", "-n", APPS_NS, "--wait=false"];
        args.extend(names.iter().map(String::as_str));
        self.cluster.kubectl(&args);
        let pods_dir = self.cluster.kubelet_root().join("pods");
        common::wait_until_with(
            Duration::from_secs(600),
            "the deleted pods are gone and unmounted",
            &[&self.cluster],
            || {
                let out = self
                    .cluster
                    .kubectl_output(&["get", "pods", "-n", APPS_NS, "-o", "name"]);
                let left = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| names.iter().any(|n| l.trim() == format!("pod/{n}")))
                    .count();
                let mounts = Cluster::mounts_under(&pods_dir)
                    .iter()
                    .filter(|m| m.to_string_lossy().contains("kubernetes.io~csi"))
                    .count();
                (out.status.success() && left == 0 && mounts == 0).then_some(())
            },
        );
    }

    /// Median RSS and PSS over [`RSS_SAMPLES`] samples of each component process (by its
    /// image's entrypoint, in the node's `kubepods` cgroups).
    fn memory(&self, components: &[&str]) -> BTreeMap<String, Mem> {
        let pids: Vec<(String, u32)> = components
            .iter()
            .map(|c| {
                let pid = wait(&self.cluster, &format!("process {c} runs"), || {
                    find_pod_process(c)
                });
                (c.trim_start_matches('/').to_string(), pid)
            })
            .collect();
        let mut samples: BTreeMap<String, Vec<Mem>> = BTreeMap::new();
        for i in 0..RSS_SAMPLES {
            if i > 0 {
                std::thread::sleep(RSS_INTERVAL);
            }
            for (name, pid) in &pids {
                let m = read_mem(*pid).unwrap_or_else(|| panic!("{name} ({pid}) exited"));
                samples.entry(name.clone()).or_default().push(m);
            }
        }
        let window_s = (RSS_INTERVAL * (RSS_SAMPLES as u32 - 1)).as_secs_f64();
        samples
            .into_iter()
            .map(|(k, v)| {
                let med = |f: fn(&Mem) -> u64| {
                    let vals: Vec<f64> = v.iter().map(|m| f(m) as f64).collect();
                    percentile(&vals, 50.0).unwrap_or(0.0) as u64
                };
                let (first, last) = (v[0], v[v.len() - 1]);
                (
                    k,
                    Mem {
                        rss_kib: med(|m| m.rss_kib),
                        pss_kib: med(|m| m.pss_kib),
                        cpu_ms: last.cpu_ms,
                        cpu_ms_per_s: last.cpu_ms.saturating_sub(first.cpu_ms) as f64 / window_s,
                    },
                )
            })
            .collect()
    }
}

fn entry_json(spiffe_id: &str, ns: &str, sa: &str) -> serde_json::Value {
    serde_json::json!({
        "spiffe_id": spiffe_id,
        "parent_id": format!("spiffe://{}/node", k8s_deploy::TD),
        "selectors": [
            {"type": "k8s", "value": format!("ns:{ns}")},
            {"type": "k8s", "value": format!("sa:{sa}")},
        ],
    })
}

/// A port for a pod's Envoy, chosen when the node starts and bound minutes later: from below
/// the kernel's ephemeral range (32768–60999), where a port free now cannot be taken in the
/// meantime by an outgoing connection of the kubelet, containerd or the apiserver's clients (a
/// run with 250 pods lost one that way).
fn unique_port(taken: &mut HashSet<u16>) -> u16 {
    let port = (FIRST_POD_PORT..EPHEMERAL_PORTS_START)
        .find(|p| !taken.contains(p) && std::net::TcpListener::bind(("0.0.0.0", *p)).is_ok())
        .expect("a free port below the ephemeral range");
    taken.insert(port);
    port
}

fn envoy_config(w: &Workload, sds_socket: &str) -> String {
    let vars: BTreeMap<&str, String> = [
        ("NODE_ID", w.name.clone()),
        ("ADMIN_PORT", w.admin.to_string()),
        ("SDS_SOCKET", sds_socket.to_string()),
        ("UPSTREAM_ADDRESS", "127.0.0.1".to_string()),
        // No traffic flows: the upstream is the pod's own inbound listener.
        ("UPSTREAM_PORT", w.inbound.to_string()),
        ("UPSTREAM_SPIFFE_ID", w.spiffe_id()),
        ("INBOUND_PORT", w.inbound.to_string()),
        ("INBOUND_ALLOWED_SPIFFE_ID", w.spiffe_id()),
        ("OUTBOUND_PORT", w.outbound.to_string()),
    ]
    .into_iter()
    .collect();
    k8s_deploy::envoy_sidecar_config(&vars)
}

/// The Envoy on `admin` lists a certificate whose URI SAN is `spiffe_id` (admin /certs).
fn envoy_holds(admin: u16, spiffe_id: &str) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let Ok(http::HttpResponse {
        status: 200, body, ..
    }) = http::get(addr, "/certs")
    else {
        return false;
    };
    // Cheap test first: /certs is polled every 20 ms per pending pod.
    if !body.contains(spiffe_id) {
        return false;
    }
    common::envoy::cert_uris(&body)
        .iter()
        .any(|uri| uri == spiffe_id)
}

// ----------------------------------------------------------------------- /proc ----

#[derive(Clone, Copy, Debug, Default)]
struct Mem {
    rss_kib: u64,
    pss_kib: u64,
    /// CPU (user + system) the process has used since it started: each run starts its own
    /// agent and plugin, so this is what bringing the run's pods up cost them.
    cpu_ms: u64,
    /// CPU over the sampling window (5 s, the pods up and idle).
    cpu_ms_per_s: f64,
}

fn mem_json(m: &BTreeMap<String, Mem>) -> serde_json::Value {
    m.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::json!({
                    "rss_kib": v.rss_kib, "pss_kib": v.pss_kib,
                    "cpu_ms": v.cpu_ms, "cpu_ms_per_s": v.cpu_ms_per_s,
                }),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The PID of the container process whose argv[0] is `argv0` (the image's entrypoint), in
/// the `kubepods` cgroups: host processes of other tests run the same programs by other paths.
/// The oldest such process: the chart's exec probes run `/svid-bridge healthcheck` in the
/// same container for a moment now and then.
fn find_pod_process(argv0: &str) -> Option<u32> {
    let mut found: Vec<(u64, u32)> = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|b| *b == 0).next() != Some(argv0.as_bytes()) {
            continue;
        }
        let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if !cgroup.contains("/kubepods") {
            continue;
        }
        // Field 22 of /proc/<pid>/stat, counted after the command's closing parenthesis.
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let start = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(19))
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(start) = start {
            found.push((start, pid));
        }
    }
    found.into_iter().min().map(|(_, pid)| pid)
}

fn read_mem(pid: u32) -> Option<Mem> {
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    // VmRSS and CPU from the shared sampler; PSS only smaps_rollup has.
    let sample = support::sample(pid)?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(Mem {
        rss_kib: sample.rss_kib,
        pss_kib: field(&rollup, "Pss:")?,
        cpu_ms: sample.stat_cpu_ns / 1_000_000,
        cpu_ms_per_s: 0.0,
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cgroup_version() -> String {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "cgroup v2".into()
    } else if Path::new("/sys/fs/cgroup/unified").exists() {
        "cgroup v1 (hybrid: v2 mounted at /sys/fs/cgroup/unified, no controllers)".into()
    } else {
        "cgroup v1".into()
    }
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(common::manifest_dir())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

// --------------------------------------------------------------------- results ----

#[derive(Default)]
struct Run {
    setup: String,
    warmup_ms: f64,
    /// Pods created one at a time.
    latency_ms: Vec<f64>,
    /// Pods created [`BATCH`] at a time (after the latency ones), for the memory figures.
    batch_ms: Vec<f64>,
    /// Components' memory with no workload pod (the plugin and agent up).
    idle: BTreeMap<String, Mem>,
    /// Running Envoy pods → component → memory.
    memory: BTreeMap<usize, BTreeMap<String, Mem>>,
    /// /proc/loadavg once the last pod held its SVID.
    load: String,
}

impl Run {
    /// The measurements in order: with no Envoy pod (0), then at each count.
    fn rows(&self) -> impl Iterator<Item = (usize, &BTreeMap<String, Mem>)> {
        std::iter::once((0, &self.idle)).chain(self.memory.iter().map(|(n, m)| (*n, m)))
    }

    fn to_json(&self) -> serde_json::Value {
        let memory: serde_json::Map<_, _> = self
            .memory
            .iter()
            .map(|(n, m)| (n.to_string(), mem_json(m)))
            .collect();
        serde_json::json!({
            "setup": self.setup, "warmup_ms": self.warmup_ms, "latency_ms": self.latency_ms,
            "batch_ms": self.batch_ms, "idle": mem_json(&self.idle), "memory": memory,
            "load": self.load,
        })
    }
}

struct Facts {
    started_at: String,
    machine: String,
    cgroup: String,
    commit: String,
    load_before: String,
    load_after: String,
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn report(facts: &Facts, runs: &[Run], latency_pods: usize) {
    let dir = support::results_dir();
    let mut md = String::new();
    md.push_str(&format!(
        "<!-- written by benches/k8s_pods.rs (make bench-k8s); do not edit -->\n\
         Run of {} at commit `{}`: {}, {}. Load average (1, 5, 15 min) {} before, {} after.\n\n",
        facts.started_at,
        facts.commit,
        facts.machine,
        facts.cgroup,
        facts.load_before,
        facts.load_after
    ));
    if let Some(binary) = std::env::var_os("SVID_BRIDGE_BIN").filter(|p| !p.is_empty()) {
        // The commit above is the bench's; the bridge measured is another build.
        md.push_str(&format!(
            "svid-bridge binary: `{}` (SVID_BRIDGE_BIN).\n\n",
            binary.to_string_lossy()
        ));
    }
    md.push_str(&format!(
        "**Pod created → its Envoy holds its SVID** ({latency_pods} pods, created one at a time, \
         each once the previous one held its SVID; ms)\n\n\
         | run | setup | p50 | p90 | p99 | min | max | warm-up pod (not counted) | {BATCH} at a time: p50 / p99 |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|\n"
    ));
    for (i, r) in runs.iter().enumerate() {
        let s = Summary::of(&r.latency_ms);
        let p = |q: f64| percentile(&r.latency_ms, q).map_or("–".into(), |v| format!("{v:.0}"));
        let b = |q: f64| percentile(&r.batch_ms, q).map_or("–".into(), |v| format!("{v:.0}"));
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {} / {} |\n",
            i + 1,
            label(&r.setup),
            p(50.0),
            p(90.0),
            p(99.0),
            s.as_ref().map_or("–".into(), |s| format!("{:.0}", s.min)),
            s.as_ref().map_or("–".into(), |s| format!("{:.0}", s.max)),
            r.warmup_ms,
            b(50.0),
            b(99.0),
        ));
    }
    md.push_str(
        "\n**Node memory of the SPIFFE components** (MiB, RSS from `VmRSS`; median of 10 samples \
         over 5 s; PSS in k8s-runs.json)\n\n\
         | run | setup | Envoy pods | spire-agent | svid-bridge / spiffe-csi-driver | stand-in registrar | total | total without the stand-in |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (i, r) in runs.iter().enumerate() {
        for (n, m) in r.rows() {
            let (agent, plugin, reg) = components(m);
            let (agent, plugin, reg) = (agent.rss_kib, plugin.rss_kib, reg.map(|m| m.rss_kib));
            md.push_str(&format!(
                "| {} | {} | {n} | {} | {} | {} | {} | {} |\n",
                i + 1,
                label(&r.setup),
                mib(agent),
                mib(plugin),
                reg.map_or("–".into(), mib),
                mib(agent + plugin + reg.unwrap_or(0)),
                mib(agent + plugin),
            ));
        }
    }
    md.push_str(
        "\n**CPU of the SPIFFE components** (user + system, from `/proc/<pid>/stat`: seconds used \
         since the run started its agent and plugin, i.e. bringing the pods up; and ms per s over \
         the 5 s of memory samples, the pods up and idle)\n\n\
         | run | setup | Envoy pods | spire-agent (s) | svid-bridge / spiffe-csi-driver (s) | stand-in registrar (s) | total without the stand-in (s) | at rest, total without the stand-in (ms/s) |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (i, r) in runs.iter().enumerate() {
        for (n, m) in r.rows() {
            let (agent, plugin, reg) = components(m);
            let secs = |ms: u64| format!("{:.2}", ms as f64 / 1e3);
            md.push_str(&format!(
                "| {} | {} | {n} | {} | {} | {} | {} | {:.1} |\n",
                i + 1,
                label(&r.setup),
                secs(agent.cpu_ms),
                secs(plugin.cpu_ms),
                reg.map_or("–".into(), |m| secs(m.cpu_ms)),
                secs(agent.cpu_ms + plugin.cpu_ms),
                agent.cpu_ms_per_s + plugin.cpu_ms_per_s,
            ));
        }
    }
    support::write_result(&dir, "k8s.md", &md);
    let json = serde_json::json!({
        "started_at": facts.started_at, "commit": facts.commit, "machine": facts.machine,
        "cgroup": facts.cgroup, "load_before": facts.load_before, "load_after": facts.load_after,
        "runs": runs.iter().map(Run::to_json).collect::<Vec<_>>(),
    });
    support::write_result(
        &dir,
        "k8s-runs.json",
        &serde_json::to_string_pretty(&json).unwrap(),
    );
    print!("{md}");
}

/// The agent, the CSI plugin (svid-bridge or spiffe-csi-driver) and the stand-in registrar
/// (csi setup only) of one measurement.
fn components(m: &BTreeMap<String, Mem>) -> (Mem, Mem, Option<Mem>) {
    let get = |k: &str| m.get(k).copied();
    let agent = get("spire-agent").unwrap_or_default();
    let plugin = get("svid-bridge")
        .or(get("spiffe-csi-driver"))
        .unwrap_or_default();
    (agent, plugin, get("stand-in-registrar"))
}

fn label(setup: &str) -> &'static str {
    match setup {
        "bridge" => "agent + svid-bridge",
        _ => "agent SDS + spiffe-csi-driver",
    }
}

// ------------------------------------------------------------ stand-in registrar ----

/// A stand-in for node-driver-registrar (which the Go module proxy here does not serve):
/// the kubelet side of its job, nothing more. Bench-only; not a product feature.
mod registrar {
    use std::path::{Path, PathBuf};

    use svid_bridge::proto::csi::GetPluginInfoRequest;
    use svid_bridge::proto::csi::identity_client::IdentityClient;
    use svid_bridge::proto::pluginregistration::registration_server::{
        Registration, RegistrationServer,
    };
    use svid_bridge::proto::pluginregistration::{
        InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
    };
    use tonic::{Request, Response, Status};

    struct Registrar {
        info: PluginInfo,
    }

    #[tonic::async_trait]
    impl Registration for Registrar {
        async fn get_info(
            &self,
            _request: Request<InfoRequest>,
        ) -> Result<Response<PluginInfo>, Status> {
            Ok(Response::new(self.info.clone()))
        }

        async fn notify_registration_status(
            &self,
            request: Request<RegistrationStatus>,
        ) -> Result<Response<RegistrationStatusResponse>, Status> {
            let status = request.into_inner();
            eprintln!(
                "stand-in registrar: kubelet says registered={} {}",
                status.plugin_registered, status.error
            );
            Ok(Response::new(RegistrationStatusResponse {}))
        }
    }

    pub fn main(socket: PathBuf) {
        let csi = std::env::var("SB_K8S_REGISTRAR_CSI_ADDRESS").expect("CSI address");
        let endpoint = std::env::var("SB_K8S_REGISTRAR_ENDPOINT").expect("kubelet endpoint");
        // One thread: node-driver-registrar's job is a couple of RPCs at start-up.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(serve(&socket, Path::new(&csi), endpoint));
    }

    async fn plugin_name(csi: &Path) -> String {
        // As node-driver-registrar does: the driver's own name, from its Identity service,
        // retried until the driver serves.
        loop {
            if let Ok(channel) = svid_bridge::uds::connect(csi).await
                && let Ok(info) = IdentityClient::new(channel)
                    .get_plugin_info(GetPluginInfoRequest {})
                    .await
            {
                return info.into_inner().name;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    async fn serve(socket: &Path, csi: &Path, endpoint: String) {
        let name = plugin_name(csi).await;
        eprintln!("stand-in registrar: {name} at {endpoint}");
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket).expect("bind registration socket");
        let service = RegistrationServer::new(Registrar {
            info: PluginInfo {
                r#type: "CSIPlugin".into(),
                name,
                endpoint,
                supported_versions: vec!["1.0.0".into()],
            },
        });
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        let result = tonic::transport::Server::builder()
            .add_service(service)
            // The crate's accept loop: the kubelet's gRPC client sends the socket path as
            // `:authority`, which h2 alone refuses (src/uds/h2_authority.rs).
            .serve_with_incoming_shutdown(svid_bridge::uds::incoming(listener), async move {
                term.recv().await;
            })
            .await;
        // The kubelet deregisters the plugin when this socket goes away.
        let _ = std::fs::remove_file(socket);
        if let Err(e) = result {
            eprintln!("stand-in registrar: {e}");
        }
    }
}
