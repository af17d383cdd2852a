//! CSI NodePublishVolume + NodeUnpublishVolume, svid-bridge against spiffe-csi-driver, with
//! the same client, the same requests and the same private mount namespace.
//!
//! Both plugins run as the binaries a node runs: `svid-bridge run --csi-socket …` (release
//! build) and `spiffe-csi-driver` (built from the Go module proxy by
//! benches/peers/install.sh into target/peers/bin). The benchmark re-executes itself under
//! `unshare --mount --propagation private` (root needed), so no mount reaches the host, and
//! starts both plugins in there. A cycle is what the kubelet does for one pod: publish a
//! volume at `<kubelet-root>/pods/<uid>/volumes/kubernetes.io~csi/spiffe/mount` (its parent
//! prepared beforehand, as the kubelet does), then unpublish it. Blocks of 100 cycles
//! alternate between the two plugins; 1,000 cycles each (`SB_CSI_CYCLES`), first with the
//! namespace's own mounts, then with 10,000 more (`SB_CSI_EXTRA_MOUNTS`). The floor is the
//! same mkdir + bind mount and umount + rmdir done directly, without gRPC.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};
use svid_bridge::testing::mount_ns;

use support::plot::{self, AGENT, AGENT_LIGHT, BRIDGE, BRIDGE_LIGHT, Bar, BarPanel, Series};
use svid_bridge::proto::csi::NodeGetCapabilitiesRequest;
use svid_bridge::proto::csi::node_client::NodeClient;
use svid_bridge::testing::csi::{add_mounts, publish_request, remove_mounts, unpublish_request};
use tonic::transport::Channel;

const BLOCK: usize = 100;

fn main() -> ExitCode {
    if !mount_ns::in_private_mount_ns() {
        return mount_ns::reexec_in_private_mount_ns();
    }
    // One thread for the client: its own cross-thread wake-ups would otherwise add to
    // either plugin's latency (both plugins see the same client).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
    ExitCode::SUCCESS
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Plugin {
    Driver,
    Bridge,
}

impl Plugin {
    fn label(self) -> &'static str {
        match self {
            Plugin::Driver => "spiffe-csi-driver",
            Plugin::Bridge => "svid-bridge",
        }
    }
}

struct Server {
    child: Child,
    socket: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_socket(socket: &Path, child: &mut Child, what: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) before serving {}",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{what} did not serve {} within 30 s", socket.display());
}

struct Layout {
    root: tempfile::TempDir,
    kubelet: PathBuf,
    sockets: PathBuf,
}

fn start_bridge(layout: &Layout) -> Server {
    let plugin_dir = layout.root.path().join("plugins/bridge");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    let socket = plugin_dir.join("csi.sock");
    let log = std::fs::File::create(layout.root.path().join("svid-bridge.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_svid-bridge"))
        .args([
            "run".to_owned(),
            format!(
                "--admin-socket={}",
                layout.root.path().join("no-agent/admin.sock").display()
            ),
            format!("--sds-socket={}", layout.sockets.join("socket").display()),
            format!("--csi-socket={}", socket.display()),
            format!("--kubelet-root={}", layout.kubelet.display()),
            "--node-id=node-a".to_owned(),
            "--metrics-addr=".to_owned(),
            "--health-addr=".to_owned(),
            "--log-level=warn".to_owned(),
        ])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start svid-bridge");
    wait_socket(&socket, &mut child, "svid-bridge");
    Server { child, socket }
}

fn start_driver(layout: &Layout) -> Server {
    let binary = svid_bridge::testing::manifest_dir().join("target/peers/bin/spiffe-csi-driver");
    assert!(
        binary.exists(),
        "{} is missing: run benches/peers/install.sh (make bench does)",
        binary.display()
    );
    let plugin_dir = layout.root.path().join("plugins/spiffe");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    let socket = plugin_dir.join("csi.sock");
    let log = std::fs::File::create(layout.root.path().join("spiffe-csi-driver.log")).unwrap();
    let mut child = Command::new(binary)
        .arg("-workload-api-socket-dir")
        .arg(&layout.sockets)
        .arg("-csi-socket-path")
        .arg(&socket)
        .args(["-node-id", "node-a"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start spiffe-csi-driver");
    wait_socket(&socket, &mut child, "spiffe-csi-driver");
    Server { child, socket }
}

#[derive(Default)]
struct Times {
    publish: Vec<f64>,
    unpublish: Vec<f64>,
    both: Vec<f64>,
    /// NodeGetCapabilities: a call without filesystem work, i.e. the gRPC round trip.
    rpc: Vec<f64>,
}

/// One call that touches no filesystem: what the gRPC round trip itself costs (µs).
async fn round_trip(node: &mut NodeClient<Channel>, times: &mut Times) {
    let t = Instant::now();
    node.node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap_or_else(|e| panic!("NodeGetCapabilities: {e:?}"));
    times.rpc.push(t.elapsed().as_secs_f64() * 1e6);
}

/// One pod's volume, published and unpublished; times in µs.
async fn cycle(node: &mut NodeClient<Channel>, layout: &Layout, id: &str, times: &mut Times) {
    let pod = layout
        .kubelet
        .join("pods")
        .join(id)
        .join("volumes/kubernetes.io~csi/spiffe");
    std::fs::create_dir_all(&pod).unwrap();
    let target = pod.join("mount");
    let t = Instant::now();
    node.node_publish_volume(publish_request(id, &target))
        .await
        .unwrap_or_else(|e| panic!("publish {}: {e:?}", target.display()));
    let p = t.elapsed();
    let t = Instant::now();
    node.node_unpublish_volume(unpublish_request(id, &target))
        .await
        .unwrap_or_else(|e| panic!("unpublish {}: {e:?}", target.display()));
    let u = t.elapsed();
    assert!(
        !target.exists(),
        "unpublish must remove {}",
        target.display()
    );
    let _ = std::fs::remove_dir_all(layout.kubelet.join("pods").join(id));
    times.publish.push(p.as_secs_f64() * 1e6);
    times.unpublish.push(u.as_secs_f64() * 1e6);
    times.both.push((p + u).as_secs_f64() * 1e6);
}

/// The same mount work without gRPC or checks: mkdir + bind mount, umount + rmdir.
fn floor(layout: &Layout, n: usize, times: &mut Times) {
    for i in 0..n {
        let target = layout.root.path().join(format!("floor-{i}"));
        let t = Instant::now();
        std::fs::create_dir(&target).unwrap();
        rustix::mount::mount_bind(&layout.sockets, &target).unwrap();
        let p = t.elapsed();
        let t = Instant::now();
        rustix::mount::unmount(&target, rustix::mount::UnmountFlags::empty()).unwrap();
        std::fs::remove_dir(&target).unwrap();
        let u = t.elapsed();
        times.publish.push(p.as_secs_f64() * 1e6);
        times.unpublish.push(u.as_secs_f64() * 1e6);
        times.both.push((p + u).as_secs_f64() * 1e6);
    }
}

fn mounts_in_namespace() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo").map_or(0, |s| s.lines().count())
}

async fn run() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the CSI benchmark bind-mounts: run it as root"
    );
    let cycles = support::env_num("SB_CSI_CYCLES", 1000);
    let extra = support::env_num("SB_CSI_EXTRA_MOUNTS", 10_000);
    let started = Instant::now();
    let root = tempfile::Builder::new()
        .prefix("sb-csi-")
        .tempdir_in(svid_bridge::testing::manifest_dir().join("target"))
        .unwrap();
    let kubelet = root.path().join("kubelet");
    let sockets = root.path().join("sockets");
    for d in [
        kubelet.join("pods"),
        kubelet.join("plugins_registry"),
        sockets.clone(),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    let layout = Layout {
        root,
        kubelet,
        sockets,
    };
    // Something to connect to through a published volume, as the SDS socket would be.
    let _listener =
        std::os::unix::net::UnixListener::bind(layout.sockets.join("agent.sock")).unwrap();

    let bridge = start_bridge(&layout);
    let driver = start_driver(&layout);
    let mut clients = BTreeMap::new();
    for (p, s) in [(Plugin::Bridge, &bridge), (Plugin::Driver, &driver)] {
        clients.insert(
            p,
            NodeClient::new(svid_bridge::csi::connect_uds(&s.socket).await.unwrap()),
        );
    }
    println!(
        "csi_compare: {cycles} publish+unpublish cycles per plugin and mount count, blocks of {BLOCK}, alternated"
    );
    println!("machine: {}", support::machine_description());

    // (plugin or floor, extra mounts) -> times
    let mut results: BTreeMap<(String, usize), Times> = BTreeMap::new();
    let filler = layout.root.path().join("filler");
    for extra_mounts in [0, extra] {
        if extra_mounts > 0 {
            let t = Instant::now();
            add_mounts(&filler, extra_mounts);
            println!(
                "added {extra_mounts} bind mounts in {:.1}s",
                t.elapsed().as_secs_f64()
            );
        }
        let mounts = mounts_in_namespace();
        println!("\n{mounts} mounts in the namespace");
        // Warm-up: connections, page cache, allocator.
        let mut scratch = Times::default();
        for p in [Plugin::Bridge, Plugin::Driver] {
            for i in 0..20 {
                cycle(
                    clients.get_mut(&p).unwrap(),
                    &layout,
                    &format!("warm-{extra_mounts}-{}-{i}", p.label()),
                    &mut scratch,
                )
                .await;
            }
        }
        let blocks = cycles.div_ceil(BLOCK);
        for b in 0..blocks {
            let order = if b % 2 == 0 {
                [Plugin::Bridge, Plugin::Driver]
            } else {
                [Plugin::Driver, Plugin::Bridge]
            };
            for p in order {
                let times = results
                    .entry((p.label().to_owned(), extra_mounts))
                    .or_default();
                for i in 0..BLOCK.min(cycles - b * BLOCK) {
                    let id = format!("pod-{extra_mounts}-{}-{b}-{i}", p.label());
                    cycle(clients.get_mut(&p).unwrap(), &layout, &id, times).await;
                    round_trip(clients.get_mut(&p).unwrap(), times).await;
                }
            }
            floor(
                &layout,
                BLOCK.min(cycles - b * BLOCK),
                results
                    .entry(("floor".to_owned(), extra_mounts))
                    .or_default(),
            );
        }
        for who in ["svid-bridge", "spiffe-csi-driver", "floor"] {
            let t = &results[&(who.to_owned(), extra_mounts)];
            println!(
                "  {who:<18} publish p50 {:>8.1} µs p99 {:>8.1} µs | unpublish p50 {:>8.1} µs p99 {:>8.1} µs | both p50 {:>8.1} µs p99 {:>8.1} µs",
                support::percentile(&t.publish, 50.0).unwrap(),
                support::percentile(&t.publish, 99.0).unwrap(),
                support::percentile(&t.unpublish, 50.0).unwrap(),
                support::percentile(&t.unpublish, 99.0).unwrap(),
                support::percentile(&t.both, 50.0).unwrap(),
                support::percentile(&t.both, 99.0).unwrap(),
            );
        }
    }
    remove_mounts(&filler, extra);
    drop(clients);
    drop(bridge);
    drop(driver);
    report(&results, cycles, extra, started.elapsed());
}

fn report(results: &BTreeMap<(String, usize), Times>, cycles: usize, extra: usize, took: Duration) {
    let dir = support::results_dir();
    let p = |who: &str, m: usize, f: fn(&Times) -> &Vec<f64>, pct: f64| {
        results
            .get(&(who.to_owned(), m))
            .and_then(|t| support::percentile(f(t), pct))
    };
    let mut md = format!(
        "<!-- generated by `cargo bench --bench csi_compare` ({}) in {:.0} s -->\n\n{cycles} publish + unpublish cycles per plugin and mount count, over gRPC on a Unix socket, \
         blocks of {BLOCK} alternated between the plugins, in one private mount namespace. Times in µs.\n\n",
        support::machine_description(),
        took.as_secs_f64()
    );
    md.push_str("| other mounts | call | percentile | spiffe-csi-driver | svid-bridge | driver / bridge | floor (syscalls only) |\n|---|---|---|---|---|---|---|\n");
    type Pick = fn(&Times) -> &Vec<f64>;
    let calls: [(&str, Pick); 4] = [
        ("publish", |t| &t.publish),
        ("unpublish", |t| &t.unpublish),
        ("publish + unpublish", |t| &t.both),
        ("no filesystem work (NodeGetCapabilities)", |t| &t.rpc),
    ];
    for m in [0, extra] {
        for (name, f) in calls {
            for pct in [50.0, 99.0] {
                let d = p("spiffe-csi-driver", m, f, pct);
                let b = p("svid-bridge", m, f, pct);
                let fl = p("floor", m, f, pct);
                let speedup = match (d, b) {
                    (Some(d), Some(b)) if b > 0.0 => format!("{:.1}×", d / b),
                    _ => "–".into(),
                };
                let show = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.0}"));
                md.push_str(&format!(
                    "| {m} | {name} | p{pct:.0} | {} | {} | {speedup} | {} |\n",
                    show(d),
                    show(b),
                    show(fl)
                ));
            }
        }
    }
    support::write_result(&dir, "csi.md", &md);
    println!("\n{md}");

    let groups: Vec<String> = [0, extra]
        .iter()
        .map(|m| format!("{m} other mounts"))
        .collect();
    let bar = |who: &str, m: usize, pct: f64| {
        p(who, m, |t| &t.both, pct).map(|v| Bar {
            median: v / 1e3,
            min: v / 1e3,
            max: v / 1e3,
        })
    };
    let series = |who: &str, label: &str, c50, c99| {
        vec![
            Series {
                name: format!("{label} p50"),
                color: c50,
                values: [0, extra].iter().map(|&m| bar(who, m, 50.0)).collect(),
            },
            Series {
                name: format!("{label} p99"),
                color: c99,
                values: [0, extra].iter().map(|&m| bar(who, m, 99.0)).collect(),
            },
        ]
    };
    let mut s = series("spiffe-csi-driver", "spiffe-csi-driver", AGENT_LIGHT, AGENT);
    s.extend(series("svid-bridge", "svid-bridge", BRIDGE_LIGHT, BRIDGE));
    s.push(Series {
        name: "syscalls only, p50".into(),
        color: plot::GREY,
        values: [0, extra].iter().map(|&m| bar("floor", m, 50.0)).collect(),
    });
    let panel = BarPanel {
        title: format!("NodePublishVolume + NodeUnpublishVolume, {cycles} cycles each"),
        y_label: "ms (log)".into(),
        log_y: true,
        groups,
        series: s,
        refs: vec![(1.0, "goal: svid-bridge p99 ≤ 1 ms".into())],
    };
    let _ = plot::bars(
        &dir.join("csi.png"),
        "CSI publish + unpublish latency",
        &[panel],
        (1100, 600),
    )
    .map_err(|e| println!("plot csi: {e}"));
}
