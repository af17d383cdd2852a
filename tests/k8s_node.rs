//! End to end on a real single-node Kubernetes (issue #19, docs/testing.md): etcd,
//! kube-apiserver, containerd and the kubelet (src/testing/cluster.rs), the chart installed
//! as users install it, SPIRE server and agent as pods, Envoy sidecars in workload pods.
//!
//! One node per run: the crate has one `#[test]`, `k8s_node_scenarios`, which starts the node
//! once, sets up the product, then runs the scenarios below in order, each printing
//! `test NAME ... ok` (or FAILED with its panic), and a cargo-style summary (shown with
//! `--nocapture`, or when it fails); the node is torn down at the end, also after a failure.
//! Scenarios build on each other's state (the kubelet restart keeps the pods of the mTLS
//! scenario), which is why they are not separate `#[test]`s. `SVID_BRIDGE_K8S_ONLY=a,b` runs
//! the scenarios whose names contain `a` or `b` (the setup always runs).
//! (Not a `harness = false` target: a `[[test]]` entry in Cargo.toml would make the
//! Dockerfile's build context, which has no tests/, unloadable.)
//!
//! What differs from a production node: no scheduler or controller-manager (pods are bound
//! with `nodeName`; the DaemonSet's pod is created by this test from the DaemonSet's own
//! template, as its controller would), no CNI (every pod is `hostNetwork`), the chart is
//! installed and uninstalled with Helm's action package (`chart-check install|uninstall`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use svid_bridge::testing as common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{BUSYBOX_IMAGE, Cluster, NODE_NAME, events_for, pod_json};
use common::http;
use common::k8s_deploy::{
    self, APPS_NS, BRIDGE_IMAGE, BRIDGE_NS, DRIVER, ENVOY_IMAGE, SPIRE_AGENT_IMAGE, SPIRE_NS,
    TIMEOUT, config_map, id,
};
use common::{free_port, wait_until_with};

const P1_MESSAGE: &str = "pod.spec.volumes[].csi.readOnly must be set to 'true'";

/// One Envoy sidecar pod: its ports on the host network.
#[derive(Clone, Debug)]
struct Workload {
    name: String,
    sa: String,
    admin: u16,
    inbound: u16,
    outbound: u16,
}

impl Workload {
    fn new(name: &str, sa: &str) -> Workload {
        Workload {
            name: name.to_string(),
            sa: sa.to_string(),
            admin: free_port(),
            inbound: free_port(),
            outbound: free_port(),
        }
    }

    fn outbound_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.outbound))
    }

    fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin))
    }
}

struct Env {
    cluster: Cluster,
    spire_server_socket: PathBuf,
    agent_sockets: PathBuf,
    /// The DaemonSet's pod template.
    bridge_pod_template: serde_json::Value,
    bridge_pod_seq: AtomicU64,
    a: Workload,
    b: Workload,
    c: Workload,
    /// The bridge's health port (host network): `/debug/workloads`, `inspect --pod`.
    health_port: u16,
}

type Scenario = fn(&Env);

#[test]
fn k8s_node_scenarios() {
    if std::env::var("SVID_BRIDGE_K8S_HOLD").is_ok_and(|v| v == "1") {
        hold();
        return;
    }
    let filter: Vec<String> = std::env::var("SVID_BRIDGE_K8S_ONLY")
        .unwrap_or_default()
        .split(',')
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect();
    let scenarios: Vec<(&str, Scenario)> = vec![
        (
            "kubelet_registers_the_plugin_without_a_registrar",
            plugin_registered,
        ),
        ("chart_probes_pass_on_the_real_kubelet", chart_probes_pass),
        ("pods_do_mtls_with_each_others_spiffe_ids", pods_do_mtls),
        (
            "third_service_account_is_refused",
            third_service_account_refused,
        ),
        (
            "pod_view_sees_this_node_and_names_envoy_pods",
            pod_view_names_pods,
        ),
        (
            "pod_mode_volumes_do_mtls_write_files_and_refuse_forged_pods",
            pod_mode_volumes,
        ),
        (
            "volume_without_read_only_gets_the_p1_event",
            volume_without_read_only,
        ),
        (
            "kubelet_restart_keeps_mounts_and_identities",
            kubelet_restart,
        ),
        (
            "apiserver_restart_keeps_serving_and_the_pod_view",
            apiserver_restart,
        ),
        (
            "bridge_pod_replaced_under_traffic",
            bridge_pod_replaced_under_traffic,
        ),
        (
            "pod_deletion_unpublishes_everything",
            pod_deletion_unpublishes,
        ),
        ("uninstall_leaves_nothing_behind", uninstall_leaves_nothing),
    ];
    let selected: Vec<_> = scenarios
        .into_iter()
        .filter(|(name, _)| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests (one Kubernetes node)", selected.len());
    let started = Instant::now();
    // A failed setup panics here; the node is torn down by its Drop.
    let env = setup();
    println!(
        "setup (node, images, SPIRE, chart) took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let mut failed = Vec::new();
    let mut passed = 0;
    for (name, scenario) in selected {
        let t = Instant::now();
        let ok = std::panic::catch_unwind(AssertUnwindSafe(|| scenario(&env))).is_ok();
        let secs = t.elapsed().as_secs_f64();
        if ok {
            passed += 1;
            println!("test {name} ... ok ({secs:.1}s)");
        } else {
            println!("test {name} ... FAILED ({secs:.1}s)");
            failed.push(name);
            // Later scenarios build on the earlier ones' state.
            break;
        }
    }
    let t = Instant::now();
    drop(env);
    println!("teardown took {:.1}s", t.elapsed().as_secs_f64());
    if failed.is_empty() {
        println!(
            "\ntest result: ok. {passed} passed; 0 failed; finished in {:.1}s\n",
            started.elapsed().as_secs_f64()
        );
    } else {
        println!("\nfailures:\n    {}", failed.join("\n    "));
        println!(
            "\ntest result: FAILED. {passed} passed; {} failed; finished in {:.1}s\n",
            failed.len(),
            started.elapsed().as_secs_f64()
        );
        panic!("scenario failed: {}", failed.join(", "));
    }
}

/// `make cluster`: the node with SPIRE and the chart installed, kept until Ctrl-C (SIGINT)
/// or SIGTERM, then torn down like after the tests.
fn hold() {
    use tokio::signal::unix::{SignalKind, signal};
    // Handlers first, so that a Ctrl-C during the setup also ends in the teardown rather
    // than the default action (which would skip it).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (mut interrupt, mut terminate) = rt.block_on(async {
        (
            signal(SignalKind::interrupt()).expect("SIGINT handler"),
            signal(SignalKind::terminate()).expect("SIGTERM handler"),
        )
    });
    let env = setup();
    let kubeconfig = env.cluster.kubeconfig().display().to_string();
    println!(
        "\nThe test node is up: etcd, kube-apiserver (https://127.0.0.1:{port}), containerd, the kubelet,
SPIRE server and agent (namespace {SPIRE_NS}), svid-bridge from charts/svid-bridge (namespace {BRIDGE_NS}).

    export KUBECONFIG={kubeconfig}
    kubectl get nodes,csinode
    kubectl get pods -A

Pods must set nodeName: {NODE_NAME}, hostNetwork: true and imagePullPolicy: Never (images:
{BRIDGE_IMAGE}, {ENVOY_IMAGE}, {SPIRE_AGENT_IMAGE}, {BUSYBOX_IMAGE}).
Workload entries: SPIFFE IDs {a}, {b}, {c} for service accounts a, b, c in namespace {APPS_NS}.
Logs: {logs}
Press Ctrl-C to stop the node and remove everything.",
        port = env.cluster.api_port(),
        a = id(APPS_NS, "a"),
        b = id(APPS_NS, "b"),
        c = id(APPS_NS, "c"),
        logs = env.cluster.root().join("logs").display(),
    );
    let got = rt.block_on(async {
        tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        }
    });
    println!("{got}: tearing the node down");
    drop(env);
    println!("done");
}

fn wait<T>(env: &Env, what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_until_with(TIMEOUT, what, &[&env.cluster], f)
}

// ------------------------------------------------------------------------- setup ----

fn setup() -> Env {
    let cluster = Cluster::start();
    let t = Instant::now();
    k8s_deploy::import_images(&cluster, &common::bridge_binary());
    eprintln!(
        "images built and imported in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    for ns in [SPIRE_NS, BRIDGE_NS, APPS_NS] {
        cluster.ensure_namespace(ns);
    }
    let spire = k8s_deploy::SpireDirs::create(&cluster);

    let t = Instant::now();
    let server_port = free_port();
    k8s_deploy::start_spire_server(&cluster, &spire.dir, server_port);
    let mut env = Env {
        spire_server_socket: spire.server_socket.clone(),
        agent_sockets: spire.agent_sockets.clone(),
        bridge_pod_template: serde_json::Value::Null,
        bridge_pod_seq: AtomicU64::new(0),
        a: Workload::new("envoy-a", "a"),
        b: Workload::new("envoy-b", "b"),
        c: Workload::new("envoy-c", "c"),
        health_port: free_port(),
        cluster,
    };
    wait(&env, "spire-server is healthy", || {
        spire_server_ok(&env, &["healthcheck"]).then_some(())
    });
    let token = k8s_deploy::join_token(&env.spire_server_socket);
    k8s_deploy::start_spire_agent(&env.cluster, &spire.dir, server_port, &token);
    k8s_deploy::wait_agent_healthy(&env.cluster, &env.agent_sockets);
    eprintln!(
        "SPIRE server and agent pods healthy in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // Entries: the bridge (an authorized delegate) and three workloads, by namespace and
    // service account, as users write them.
    let server = &env.spire_server_socket;
    k8s_deploy::create_entry(
        server,
        &id(BRIDGE_NS, "svid-bridge"),
        BRIDGE_NS,
        "svid-bridge",
    );
    for sa in ["a", "b", "c"] {
        k8s_deploy::create_entry(server, &id(APPS_NS, sa), APPS_NS, sa);
    }

    let t = Instant::now();
    install_chart(&mut env);
    start_bridge_pod(&env);
    eprintln!(
        "chart installed, bridge pod ready in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    env
}

fn spire_server_ok(env: &Env, args: &[&str]) -> bool {
    k8s_deploy::spire_server(&env.spire_server_socket, args)
        .status
        .success()
}

fn install_chart(env: &mut Env) {
    // Events on a waiting pod after 5 s instead of 30 s (pod_view_names_pods).
    env.bridge_pod_template = k8s_deploy::install_chart(
        &env.cluster,
        env.health_port,
        &["--set-string", "extraArgs[0]=--wait-event-seconds=5"],
    );
}

/// What the DaemonSet controller would create on this node: a pod from the DaemonSet's
/// template, bound to the node. Waits until it is Ready (its readiness probe passes).
fn start_bridge_pod(env: &Env) -> String {
    let n = env.bridge_pod_seq.fetch_add(1, Ordering::SeqCst);
    let name = format!("svid-bridge-{n}");
    k8s_deploy::start_bridge_pod(&env.cluster, &env.bridge_pod_template, &name);
    name
}

fn pod_ready(env: &Env, ns: &str, name: &str) -> bool {
    k8s_deploy::pod_ready(&env.cluster, ns, name)
}

fn current_bridge_pod(env: &Env) -> String {
    format!(
        "svid-bridge-{}",
        env.bridge_pod_seq.load(Ordering::SeqCst) - 1
    )
}

/// An Envoy pod from envoy/sidecar.yaml: outbound to `upstream` (expecting its SPIFFE ID),
/// inbound accepting `allowed`.
fn envoy_pod(env: &Env, w: &Workload, upstream: &Workload, allowed: &str, read_only: bool) {
    let mut csi = serde_json::json!({"driver": DRIVER});
    if read_only {
        csi["readOnly"] = serde_json::json!(true);
    }
    envoy_pod_with_volume(env, w, upstream, allowed, csi);
}

/// As [`envoy_pod`], with the CSI volume source `csi`.
fn envoy_pod_with_volume(
    env: &Env,
    w: &Workload,
    upstream: &Workload,
    allowed: &str,
    csi: serde_json::Value,
) {
    let vars: BTreeMap<&str, String> = [
        ("NODE_ID", w.name.clone()),
        ("ADMIN_PORT", w.admin.to_string()),
        ("SDS_SOCKET", "/spiffe-workload-api/socket".to_string()),
        ("UPSTREAM_ADDRESS", "127.0.0.1".to_string()),
        ("UPSTREAM_PORT", upstream.inbound.to_string()),
        ("UPSTREAM_SPIFFE_ID", id(APPS_NS, &upstream.sa)),
        ("INBOUND_PORT", w.inbound.to_string()),
        ("INBOUND_ALLOWED_SPIFFE_ID", allowed.to_string()),
        ("OUTBOUND_PORT", w.outbound.to_string()),
    ]
    .into_iter()
    .collect();
    let config = k8s_deploy::envoy_sidecar_config(&vars);
    let sa = serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": w.sa, "namespace": APPS_NS}});
    let pod = k8s_deploy::envoy_pod(&w.name, &w.sa, &w.name, &w.name, csi);
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        sa, config_map(APPS_NS, &w.name, "envoy.yaml", &config), pod,
    ]});
    env.cluster.apply(&list.to_string());
}

/// An Envoy's admin /certs body (empty when the admin interface does not answer).
fn envoy_certs_body(w: &Workload) -> String {
    match http::get(w.admin_addr(), "/certs") {
        Ok(http::HttpResponse {
            status: 200, body, ..
        }) => body,
        _ => String::new(),
    }
}

/// The serial numbers of the certificates an Envoy holds.
fn envoy_cert_serials(w: &Workload) -> Vec<String> {
    let mut serials: Vec<String> = common::envoy::cert_chain_entries(&envoy_certs_body(w))
        .iter()
        .filter_map(|c| c["serial_number"].as_str().map(str::to_owned))
        .collect();
    serials.sort();
    serials.dedup();
    serials
}

/// GET through `w`'s outbound listener: (status, what the server saw as caller, what `w`
/// verified as server).
fn call_through(w: &Workload) -> Option<(u16, String, String)> {
    let r = http::get(w.outbound_addr(), "/").ok()?;
    Some((
        r.status,
        r.headers
            .get("x-peer-spiffe-id")
            .cloned()
            .unwrap_or_default(),
        r.headers
            .get("x-upstream-verified-spiffe-id")
            .cloned()
            .unwrap_or_default(),
    ))
}

fn pod_uid(env: &Env, ns: &str, name: &str) -> String {
    pod_json(&env.cluster, ns, name).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Mount points of pod `uid`'s volumes in the host mount table.
fn pod_mounts(env: &Env, uid: &str) -> Vec<PathBuf> {
    Cluster::mounts_under(&env.cluster.kubelet_root().join("pods").join(uid))
}

fn csi_target(env: &Env, uid: &str) -> PathBuf {
    env.cluster
        .kubelet_root()
        .join("pods")
        .join(uid)
        .join("volumes/kubernetes.io~csi/spiffe/mount")
}

// --------------------------------------------------------------------- scenarios ----

fn csinode_drivers(env: &Env) -> Vec<String> {
    k8s_deploy::csinode_drivers(&env.cluster)
}

/// The kubelet registered our plugin through plugins_registry: CSINode lists it, and the
/// bridge pod has a single container (no node-driver-registrar).
fn plugin_registered(env: &Env) {
    wait(env, "CSINode lists csi.spiffe.io", || {
        csinode_drivers(env)
            .contains(&DRIVER.to_string())
            .then_some(())
    });
    let pod = pod_json(&env.cluster, BRIDGE_NS, &current_bridge_pod(env)).unwrap();
    let containers: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(containers, ["svid-bridge"], "no registrar sidecar");
    let node = env.cluster.kubectl(&[
        "get",
        "node",
        NODE_NAME,
        "-o",
        "jsonpath={.metadata.annotations}",
    ]);
    assert!(
        node.contains("csi.volume.kubernetes.io/nodeid") && node.contains(NODE_NAME),
        "node annotation with our node ID: {node}"
    );
}

/// `prober_probe_total` of `pod`'s container from the kubelet's /metrics/probes (read-only
/// port): (probe type, result) → count.
fn probe_counts(env: &Env, pod: &str) -> BTreeMap<(String, String), f64> {
    let addr = SocketAddr::from(([127, 0, 0, 1], env.cluster.kubelet_read_only_port()));
    let Ok(http::HttpResponse {
        status: 200,
        body: text,
        ..
    }) = http::get(addr, "/metrics/probes")
    else {
        return BTreeMap::new();
    };
    let mut counts = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("prober_probe_total{"))
    {
        if !line.contains(&format!("pod=\"{pod}\"")) {
            continue;
        }
        let label = |name: &str| {
            line.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
        };
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(t), Some(r), Some(v)) = (label("probe_type"), label("result"), value) {
            *counts.entry((t.to_string(), r.to_string())).or_insert(0.0) += v;
        }
    }
    counts
}

/// The chart's exec probes (`svid-bridge healthcheck [--live]`), run by the real kubelet:
/// both have succeeded, none has failed, the container never restarted.
fn chart_probes_pass(env: &Env) {
    let name = current_bridge_pod(env);
    let key = |t: &str, r: &str| (t.to_string(), r.to_string());
    let count = |c: &BTreeMap<(String, String), f64>, t: &str, r: &str| {
        c.get(&key(t, r)).copied().unwrap_or(0.0)
    };
    // The pod is Ready (setup waited for it). A readiness probe may have failed before that:
    // the first one runs 1 s after the start, possibly before the bridge had its own SVID
    // and the agent's bundle; that is what readiness is for. From now on none may fail.
    assert!(pod_ready(env, BRIDGE_NS, &name));
    let before = probe_counts(env, &name);
    for (_, m) in events_for(&env.cluster, BRIDGE_NS, &name)
        .iter()
        .filter(|(r, _)| r == "Unhealthy")
    {
        eprintln!("before Ready: {m}");
    }
    // The liveness probe first runs after its initialDelaySeconds (5 s).
    let after = wait(env, "the kubelet ran both probes successfully", || {
        let c = probe_counts(env, &name);
        (count(&c, "Liveness", "successful") >= 1.0
            && count(&c, "Readiness", "successful") > count(&before, "Readiness", "successful"))
        .then_some(c)
    });
    for r in ["failed", "unknown"] {
        assert_eq!(count(&after, "Liveness", r), 0.0, "{after:?}");
        assert_eq!(
            count(&after, "Readiness", r),
            count(&before, "Readiness", r),
            "no readiness failure once Ready: {before:?} then {after:?}"
        );
    }
    assert!(pod_ready(env, BRIDGE_NS, &name));
    let pod = pod_json(&env.cluster, BRIDGE_NS, &name).unwrap();
    let status = &pod["status"]["containerStatuses"][0];
    assert_eq!(status["restartCount"], 0, "{status}");
    let liveness_failures: Vec<_> = events_for(&env.cluster, BRIDGE_NS, &name)
        .into_iter()
        .filter(|(reason, m)| reason == "BackOff" || m.contains("Liveness probe failed"))
        .collect();
    assert!(liveness_failures.is_empty(), "{liveness_failures:?}");
}

fn pods_do_mtls(env: &Env) {
    envoy_pod(env, &env.a, &env.b, &id(APPS_NS, "b"), true);
    envoy_pod(env, &env.b, &env.a, &id(APPS_NS, "a"), true);
    wait(env, "a → b over mTLS answers 200", || {
        call_through(&env.a).filter(|r| r.0 == 200)
    });
    let (status, peer_seen_by_b, verified_by_a) = call_through(&env.a).unwrap();
    assert_eq!(status, 200);
    assert_eq!(peer_seen_by_b, id(APPS_NS, "a"), "b saw a's SPIFFE ID");
    assert_eq!(verified_by_a, id(APPS_NS, "b"), "a verified b's SPIFFE ID");
    let (status, peer_seen_by_a, verified_by_b) =
        wait(env, "b → a over mTLS answers 200", || {
            call_through(&env.b).filter(|r| r.0 == 200)
        });
    assert_eq!(status, 200);
    assert_eq!(peer_seen_by_a, id(APPS_NS, "b"));
    assert_eq!(verified_by_b, id(APPS_NS, "a"));
    // One bind mount of the socket directory per pod, made by the bridge in its own pod and
    // propagated to the host (Bidirectional).
    for w in [&env.a, &env.b] {
        let uid = pod_uid(env, APPS_NS, &w.name);
        assert_eq!(
            mount_count(env, &uid),
            1,
            "{} has its volume mounted once",
            w.name
        );
    }
}

/// c has its own SVID (so its Envoy starts and connects) but a accepts only b.
fn third_service_account_refused(env: &Env) {
    envoy_pod(env, &env.c, &env.a, &id(APPS_NS, "b"), true);
    wait(env, "c's Envoy holds its SVID", || {
        (!envoy_cert_serials(&env.c).is_empty()).then_some(())
    });
    assert!(
        envoy_cert_uris(&env.c).contains(&id(APPS_NS, "c")),
        "c holds its own SPIFFE ID: {:?}",
        envoy_cert_uris(&env.c)
    );
    let refused_before = envoy_counter(&env.a, "ssl.fail_verify_san");
    let r = call_through(&env.c);
    assert!(
        r.as_ref().is_some_and(|r| r.0 == 503),
        "a must refuse c: {r:?}"
    );
    wait(env, "a's Envoy counts the refused SAN", || {
        (envoy_counter(&env.a, "ssl.fail_verify_san") > refused_before).then_some(())
    });
    // ... while b still gets through.
    assert_eq!(call_through(&env.b).map(|r| r.0), Some(200));
}

/// The bridge's per-workload report, read as `inspect --pod` reads it (host network: the
/// bridge's loopback is the host's).
fn workloads_report(env: &Env) -> Option<serde_json::Value> {
    let addr = format!("127.0.0.1:{}", env.health_port);
    let body = svid_bridge::telemetry::health::get_body(&addr, "/debug/workloads").ok()?;
    serde_json::from_str(&body).ok()
}

/// `svid-bridge inspect ARGS` against the bridge pod's health address, as
/// `kubectl exec <bridge pod> -- /svid-bridge inspect ARGS` runs it (exec does not work on
/// the test node, docs/testing.md).
fn inspect_bridge(env: &Env, args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::bridge_binary())
        .arg("inspect")
        .arg(format!("--health-addr=127.0.0.1:{}", env.health_port))
        .args(args)
        .output()
        .unwrap()
}

/// Names of the pods the API server has, optionally only those bound to `node`.
fn pod_names(env: &Env, node: Option<&str>) -> Vec<String> {
    let mut args = vec!["get", "pods", "-A", "-o", "json"];
    let selector = node.map(|n| format!("spec.nodeName={n}"));
    if let Some(selector) = &selector {
        args.extend(["--field-selector", selector.as_str()]);
    }
    let v: serde_json::Value = serde_json::from_str(&env.cluster.kubectl(&args)).unwrap();
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{}/{}",
                p["metadata"]["namespace"].as_str().unwrap_or_default(),
                p["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

/// The host PID of the process named `comm` in pod `uid`, found by its cgroup.
fn host_pid_in_pod(uid: &str, comm: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cgroup = std::fs::read_to_string(e.path().join("cgroup")).ok()?;
        let name = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (cgroup.contains(uid) && name.trim() == comm).then_some(pid)
    })
}

/// Everything the current bridge pod's container logged (the kubelet's pod log files).
fn bridge_pod_logs(env: &Env) -> String {
    pod_logs(env, BRIDGE_NS, &current_bridge_pod(env))
}

/// The bridge, with the chart's RBAC and nothing else, watches exactly this node's pods and
/// names the pod and container of a real Envoy's PID: in `inspect --pod` (with the SVID
/// Envoy holds) and on the log line of a stream that waits for an identity.
fn pod_view_names_pods(env: &Env) {
    // A pod bound to another node (no kubelet runs it): the API has it, the view must not.
    let elsewhere = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "elsewhere", "namespace": APPS_NS},
        "spec": {"nodeName": "sb-elsewhere", "automountServiceAccountToken": false,
                 "containers": [{"name": "c", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never"}]},
    });
    env.cluster.apply(&elsewhere.to_string());
    let held = wait(env, "the pod view holds exactly this node's pods", || {
        let report = workloads_report(env)?;
        let held = report["pods_on_node"].as_u64()?;
        (held == pod_names(env, Some(NODE_NAME)).len() as u64).then_some(held)
    });
    let all = pod_names(env, None);
    assert!(
        all.contains(&format!("{APPS_NS}/elsewhere")) && (held as usize) < all.len(),
        "the view holds {held} of {all:?}"
    );
    assert!(
        bridge_pod_logs(env).contains("watching this node's pods"),
        "the bridge says it watches"
    );

    // Envoy a: its PID on the host maps to its pod and container.
    let uid = pod_uid(env, APPS_NS, &env.a.name);
    let pid = wait(env, "Envoy a's host PID", || host_pid_in_pod(&uid, "envoy"));
    let pod = format!("{APPS_NS}/{}", env.a.name);
    let stdout = wait(env, "inspect --pod names Envoy a's container", || {
        let out = inspect_bridge(env, &["--pod", &pod]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        stdout
            .starts_with(&format!("pod {pod}  container envoy  pid {pid}\n"))
            .then_some(stdout)
    });
    let serial = stdout
        .split(&format!("svid {}  serial ", id(APPS_NS, "a")))
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("a's SVID: {stdout}"));
    assert!(
        envoy_cert_serials(&env.a).iter().any(|s| s == serial),
        "inspect {serial} vs Envoy /certs {:?}",
        envoy_cert_serials(&env.a)
    );
    assert!(stdout.contains("  stream sotw: default\n"), "{stdout}");

    // An Envoy whose service account has no entry waits; the wait's log line names its pod.
    let w = Workload::new("envoy-waits", "no-entry");
    envoy_pod(env, &w, &env.a, &id(APPS_NS, "a"), true);
    let line = wait(env, "the bridge logs the wait with the pod", || {
        bridge_pod_logs(env)
            .lines()
            .find(|l| {
                l.contains("waiting for a secret that cannot be served yet")
                    && l.contains(&format!("namespace={APPS_NS}"))
                    && l.contains(&format!("pod={}", w.name))
            })
            .map(str::to_string)
    });
    assert!(line.contains("pid="), "{line}");
    let waits = format!("{APPS_NS}/{}", w.name);
    wait(env, "inspect --pod lists what it waits for", || {
        let out = inspect_bridge(env, &["--pod", &waits]);
        String::from_utf8_lossy(&out.stdout)
            .contains("    waiting for default for ")
            .then_some(())
    });
    // ... and so does `kubectl describe pod`: one Event series, with the bridge's RBAC.
    let message = wait(env, "a WaitingForIdentity Event on the pod", || {
        events_for(&env.cluster, APPS_NS, &w.name)
            .into_iter()
            .find(|(reason, _)| reason == "WaitingForIdentity")
            .map(|(_, message)| message)
    });
    assert!(
        message.contains("the SDS secrets ")
            && message.contains("default")
            && message.contains("container envoy (PID "),
        "{message}"
    );
    assert!(
        message.contains("no SPIRE registration entry matches this pod"),
        "{message}"
    );
    std::thread::sleep(Duration::from_secs(6));
    let series = events_for(&env.cluster, APPS_NS, &w.name)
        .into_iter()
        .filter(|(reason, _)| reason == "WaitingForIdentity")
        .count();
    assert_eq!(series, 1, "one Event series per pod");

    env.cluster.kubectl(&[
        "delete",
        "pod",
        "-n",
        APPS_NS,
        "elsewhere",
        "--grace-period=0",
        "--force",
    ]);
    env.cluster
        .kubectl(&["delete", "pod", "-n", APPS_NS, &w.name, "--wait=true"]);
}

/// The URI SANs of the certificates an Envoy holds.
fn envoy_cert_uris(w: &Workload) -> Vec<String> {
    common::envoy::cert_uris(&envoy_certs_body(w))
}

/// The sum of an Envoy's counters whose name ends with `suffix` (admin /stats).
fn envoy_counter(w: &Workload, suffix: &str) -> u64 {
    let Ok(http::HttpResponse {
        status: 200, body, ..
    }) = http::get(w.admin_addr(), "/stats")
    else {
        return 0;
    };
    body.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(name, _)| name.ends_with(suffix))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

fn volume_without_read_only(env: &Env) {
    let w = Workload::new("not-read-only", "a");
    envoy_pod(env, &w, &env.b, &id(APPS_NS, "b"), false);
    let msg = wait(env, "the kubelet reports our P-1 message", || {
        events_for(&env.cluster, APPS_NS, &w.name)
            .into_iter()
            .find(|(_, m)| m.contains(P1_MESSAGE))
    });
    assert_eq!(msg.0, "FailedMount", "{msg:?}");
    let pod = pod_json(&env.cluster, APPS_NS, &w.name).unwrap();
    assert_eq!(pod["status"]["phase"], "Pending");
    env.cluster
        .kubectl(&["delete", "pod", "-n", APPS_NS, &w.name, "--wait=true"]);
}

fn mount_count(env: &Env, uid: &str) -> usize {
    let target = csi_target(env, uid);
    Cluster::mounts_under(&target)
        .iter()
        .filter(|m| **m == target)
        .count()
}

/// #15 on the real kubelet: two Envoy pods whose volumes say `mode: pod` each get their own
/// socket (verified against the API server: `--pod-fields api`, the chart's default) and do
/// mTLS with each other's SPIFFE IDs; a non-root pod with `files: "true"` and an fsGroup
/// reads its key; a NodePublishVolume with a forged service account is refused, mounts
/// nothing, and leaves a PodVolumeRefused Event on the pod it named; deleting the pods
/// removes every pod-mode volume.
fn pod_mode_volumes(env: &Env) {
    let server = &env.spire_server_socket;
    for sa in ["d", "e", "files"] {
        k8s_deploy::create_entry(server, &id(APPS_NS, sa), APPS_NS, sa);
    }
    let d = Workload::new("envoy-d", "d");
    let e = Workload::new("envoy-e", "e");
    let pod_mode = serde_json::json!({"driver": DRIVER, "readOnly": true,
        "volumeAttributes": {"mode": "pod"}});
    envoy_pod_with_volume(env, &d, &e, &id(APPS_NS, "e"), pod_mode.clone());
    envoy_pod_with_volume(env, &e, &d, &id(APPS_NS, "d"), pod_mode);
    let (status, peer_seen_by_e, verified_by_d) =
        wait(env, "d → e over mTLS (pod-mode volumes)", || {
            call_through(&d).filter(|r| r.0 == 200)
        });
    assert_eq!(status, 200);
    assert_eq!(peer_seen_by_e, id(APPS_NS, "d"));
    assert_eq!(verified_by_d, id(APPS_NS, "e"));
    let state = env
        .cluster
        .kubelet_root()
        .join("plugins")
        .join(DRIVER)
        .join("pod-volumes");
    for w in [&d, &e] {
        let uid = pod_uid(env, APPS_NS, &w.name);
        assert_eq!(mount_count(env, &uid), 1, "{} mounted once", w.name);
        // Its own tmpfs, not the shared socket directory.
        assert!(csi_target(env, &uid).join("socket").exists());
        assert!(!csi_target(env, &uid).join("spire-agent.sock").exists());
    }
    let records = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .count();
    assert_eq!(
        records,
        2,
        "one record per pod-mode volume in {}",
        state.display()
    );

    // Files for a non-root application: its fsGroup reads the key (PI-38, PI-45).
    let files_pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "files-reader", "namespace": APPS_NS},
        "spec": {
            "nodeName": NODE_NAME, "hostNetwork": true, "serviceAccountName": "files",
            "automountServiceAccountToken": false, "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 4242},
            "containers": [{"name": "reader", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                "command": ["sh", "-c", "head -c 27 /spiffe/svid_key.pem && echo && head -c 27 /spiffe/svid.pem && echo && sleep 3600"],
                "volumeMounts": [{"name": "spiffe", "mountPath": "/spiffe", "readOnly": true}]}],
            "volumes": [{"name": "spiffe", "csi": {"driver": DRIVER, "readOnly": true,
                "volumeAttributes": {"mode": "pod", "files": "true"}}}],
        },
    });
    let files_sa = serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "files", "namespace": APPS_NS}});
    env.cluster.apply(&files_sa.to_string());
    env.cluster.apply(&files_pod.to_string());
    wait(
        env,
        "the non-root reader prints its key's and certificate's first lines",
        || {
            let logs = pod_logs(env, APPS_NS, "files-reader");
            (logs.contains("-----BEGIN PRIVATE KEY-----")
                && logs.contains("-----BEGIN CERTIFICATE-----"))
            .then_some(())
        },
    );
    let files_uid = pod_uid(env, APPS_NS, "files-reader");
    let svid = csi_target(env, &files_uid).join("svid.pem");
    assert_eq!(common::spire::leaf_spiffe_id(&svid), id(APPS_NS, "files"));

    // A forging kubelet: d's UID with e's service account.
    let d_uid = pod_uid(env, APPS_NS, &d.name);
    let forged_parent = env
        .cluster
        .kubelet_root()
        .join("pods")
        .join(&d_uid)
        .join("volumes/kubernetes.io~csi/forged");
    std::fs::create_dir_all(&forged_parent).unwrap();
    let forged_target = forged_parent.join("mount");
    let forged = common::csi::PodInfo {
        namespace: APPS_NS,
        name: &d.name,
        uid: &d_uid,
        service_account: "e",
    };
    let request = common::csi::pod_mode_request("csi-forged", &forged_target, &forged, &[]);
    let csi_socket = env
        .cluster
        .kubelet_root()
        .join("plugins")
        .join(DRIVER)
        .join("csi.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(async {
            common::csi::node_client(&csi_socket)
                .await
                .node_publish_volume(request)
                .await
        })
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("serviceAccount e") && err.message().contains("serviceAccount d"),
        "{}",
        err.message()
    );
    assert!(
        Cluster::mounts_under(&forged_parent).is_empty(),
        "nothing mounted for a forged pod"
    );
    wait(
        env,
        "a PodVolumeRefused Event on the pod the forgery named",
        || {
            events_for(&env.cluster, APPS_NS, &d.name)
                .into_iter()
                .find(|(reason, _)| reason == "PodVolumeRefused")
        },
    );

    for name in [d.name.as_str(), e.name.as_str(), "files-reader"] {
        env.cluster
            .kubectl(&["delete", "pod", "-n", APPS_NS, name, "--wait=true"]);
    }
    wait(
        env,
        "every pod-mode volume removed (records, tmpfs mounts)",
        || {
            let left = std::fs::read_dir(&state).ok()?.flatten().count();
            (left == 0 && Cluster::mounts_under(&state).is_empty()).then_some(())
        },
    );
}

/// What container logs the kubelet wrote for pod `ns/name`.
fn pod_logs(env: &Env, ns: &str, name: &str) -> String {
    let prefix = format!("{ns}_{name}_");
    let mut text = String::new();
    for dir in std::fs::read_dir(env.cluster.root().join("pod-logs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if !dir.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        for container in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            for file in std::fs::read_dir(container.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                text.push_str(&std::fs::read_to_string(file.path()).unwrap_or_default());
            }
        }
    }
    text
}

fn kubelet_restart(env: &Env) {
    let uids: Vec<String> = [&env.a, &env.b]
        .iter()
        .map(|w| pod_uid(env, APPS_NS, &w.name))
        .collect();
    let serials_before: Vec<Vec<String>> = [&env.a, &env.b]
        .iter()
        .map(|w| envoy_cert_serials(w))
        .collect();
    for uid in &uids {
        assert_eq!(mount_count(env, uid), 1, "one mount before the restart");
    }
    env.cluster.restart_kubelet();
    for w in [&env.a, &env.b] {
        wait(env, "the restarted kubelet reports the pod Ready", || {
            pod_ready(env, APPS_NS, &w.name).then_some(())
        });
    }
    for (i, w) in [&env.a, &env.b].iter().enumerate() {
        assert_eq!(
            mount_count(env, &uids[i]),
            1,
            "still one mount after the restart"
        );
        assert_eq!(
            envoy_cert_serials(w),
            serials_before[i],
            "same certificates"
        );
        assert_eq!(call_through(w).map(|r| r.0), Some(200));
    }
    // The restarted kubelet found the plugin again: a new pod gets its volume and SVID.
    let e = Workload::new("envoy-e", "b");
    envoy_pod(env, &e, &env.a, &id(APPS_NS, "b"), true);
    wait(
        env,
        "a pod created after the restart holds its SVID",
        || {
            envoy_cert_uris(&e)
                .contains(&id(APPS_NS, "b"))
                .then_some(())
        },
    );
    env.cluster
        .kubectl(&["delete", "pod", "-n", APPS_NS, &e.name, "--wait=true"]);
}

/// kube-apiserver stopped: the bridge keeps serving (readyz ok, a → b over mTLS with the
/// same certificates, `/debug/workloads` answers) and says its pod watch failed. Started
/// again with the same arguments: the watch recovers, and a pod created afterwards is named
/// in `/debug/workloads`, so the view follows the new API server.
fn apiserver_restart(env: &Env) {
    let health = format!("127.0.0.1:{}", env.health_port);
    let serials_before = envoy_cert_serials(&env.a);
    let held_before = workloads_report(env).unwrap()["pods_on_node"].as_u64();
    let failed_before = bridge_pod_logs(env).matches("the pod watch failed").count();
    env.cluster.stop_apiserver();
    wait(env, "the bridge logs that its pod watch failed", || {
        (bridge_pod_logs(env).matches("the pod watch failed").count() > failed_before).then_some(())
    });
    // Still serving, with the API unreachable.
    let ready = svid_bridge::telemetry::health::get_body(&health, "/readyz");
    assert!(ready.is_ok(), "readyz with the API down: {ready:?}");
    for _ in 0..3 {
        assert_eq!(
            call_through(&env.a).map(|r| r.0),
            Some(200),
            "a → b, API down"
        );
    }
    assert_eq!(envoy_cert_serials(&env.a), serials_before);
    let report = workloads_report(env).expect("/debug/workloads with the API down");
    assert_eq!(
        report["pods_on_node"].as_u64(),
        held_before,
        "the view keeps what it had"
    );
    let recovered_before = bridge_pod_logs(env)
        .matches("the pod watch recovered")
        .count();
    env.cluster.start_apiserver();
    // A pod created after the restart: its stream is named by the view. (A resumed watch
    // says nothing until a pod of the node changes; this one is the first change.)
    let g = Workload::new("envoy-g", "b");
    envoy_pod(env, &g, &env.a, &id(APPS_NS, "b"), true);
    wait(env, "/debug/workloads names the new pod", || {
        let report = workloads_report(env)?;
        report["workloads"]
            .as_array()?
            .iter()
            .any(|w| w["pod"]["name"] == g.name.as_str() && w["pod"]["container"] == "envoy")
            .then_some(())
    });
    assert!(
        bridge_pod_logs(env)
            .matches("the pod watch recovered")
            .count()
            > recovered_before,
        "the bridge says its pod watch recovered"
    );
    env.cluster
        .kubectl(&["delete", "pod", "-n", APPS_NS, &g.name, "--wait=true"]);
}

fn bridge_pod_replaced_under_traffic(env: &Env) {
    let serials_before: Vec<Vec<String>> = [&env.a, &env.b]
        .iter()
        .map(|w| envoy_cert_serials(w))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (stop, failures, count) = (stop.clone(), failures.clone(), count.clone());
        let a = env.a.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match call_through(&a) {
                    Some((200, _, _)) => {}
                    other => failures.lock().unwrap().push(format!("{other:?}")),
                }
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let old = current_bridge_pod(env);
    env.cluster
        .kubectl(&["delete", "pod", "-n", BRIDGE_NS, &old, "--wait=true"]);
    wait(env, "the old bridge deregistered", || {
        (!csinode_drivers(env).contains(&DRIVER.to_string())).then_some(())
    });
    start_bridge_pod(env);
    wait(env, "CSINode lists csi.spiffe.io again", || {
        csinode_drivers(env)
            .contains(&DRIVER.to_string())
            .then_some(())
    });
    // A new pod starts with the new bridge.
    let d = Workload::new("envoy-d", "b");
    envoy_pod(env, &d, &env.a, &id(APPS_NS, "b"), true);
    wait(env, "the new pod's Envoy holds its SVID", || {
        (!envoy_cert_serials(&d).is_empty()).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    traffic.join().unwrap();
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:?}",
        failures.len(),
        count.load(Ordering::SeqCst)
    );
    assert!(count.load(Ordering::SeqCst) > 10);
    for (i, w) in [&env.a, &env.b].iter().enumerate() {
        assert_eq!(
            envoy_cert_serials(w),
            serials_before[i],
            "{} kept its certificates",
            w.name
        );
    }
    env.cluster
        .kubectl(&["delete", "pod", "-n", APPS_NS, &d.name, "--wait=true"]);
}

fn pod_deletion_unpublishes(env: &Env) {
    let uid = pod_uid(env, APPS_NS, &env.c.name);
    assert_eq!(mount_count(env, &uid), 1);
    env.cluster
        .kubectl(&["delete", "pod", "-n", APPS_NS, &env.c.name, "--wait=true"]);
    let pod_dir = env.cluster.kubelet_root().join("pods").join(&uid);
    wait(env, "the pod's directory and mounts are gone", || {
        (pod_mounts(env, &uid).is_empty() && !pod_dir.exists()).then_some(())
    });
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(&uid),
        "nothing of pod {uid} left in mountinfo"
    );
}

fn uninstall_leaves_nothing(env: &Env) {
    for w in [&env.a, &env.b] {
        env.cluster
            .kubectl(&["delete", "pod", "-n", APPS_NS, &w.name, "--wait=true"]);
    }
    let bridge = current_bridge_pod(env);
    env.cluster
        .kubectl(&["delete", "pod", "-n", BRIDGE_NS, &bridge, "--wait=true"]);
    // `helm uninstall`, through Helm's action package.
    let out = k8s_deploy::uninstall_chart(&env.cluster);
    assert!(out.status.success(), "chart-check uninstall: {out:?}");
    wait(env, "CSINode no longer lists csi.spiffe.io", || {
        (!csinode_drivers(env).contains(&DRIVER.to_string())).then_some(())
    });
    let kubelet = env.cluster.kubelet_root();
    let registry: Vec<_> = std::fs::read_dir(kubelet.join("plugins_registry"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(registry.is_empty(), "plugins_registry: {registry:?}");
    assert!(
        !env.agent_sockets.join("socket").exists(),
        "the SDS socket is removed"
    );
    let csi_dir = kubelet.join("plugins").join(DRIVER);
    // The pod-mode state directory (a hostPath the kubelet created) stays, empty, with
    // nothing mounted under it: every volume was unpublished with its pod.
    let pod_volumes = csi_dir.join("pod-volumes");
    let in_pod_volumes: Vec<_> = std::fs::read_dir(&pod_volumes)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        in_pod_volumes.is_empty(),
        "{}: {in_pod_volumes:?}",
        pod_volumes.display()
    );
    assert!(Cluster::mounts_under(&pod_volumes).is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(&csi_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name())
                .filter(|name| name != "pod-volumes")
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{}: {leftovers:?}", csi_dir.display());
    let pod_mounts: Vec<_> = Cluster::mounts_under(&kubelet.join("pods"))
        .into_iter()
        .filter(|m| m.to_string_lossy().contains("kubernetes.io~csi"))
        .collect();
    assert!(pod_mounts.is_empty(), "CSI mounts left: {pod_mounts:?}");
    for kind in [
        "csidriver/csi.spiffe.io",
        "daemonset/svid-bridge",
        "serviceaccount/svid-bridge",
        // Helm's release record.
        "secret/sh.helm.release.v1.svid-bridge.v1",
    ] {
        let out = env.cluster.kubectl_output(&[
            "get",
            "-n",
            BRIDGE_NS,
            kind,
            "--ignore-not-found",
            "-o",
            "name",
        ]);
        assert!(
            String::from_utf8_lossy(&out.stdout).trim().is_empty(),
            "{kind} is gone"
        );
    }
}
