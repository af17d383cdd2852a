//! Pod-mode CSI volumes (issue #15, docs/pod-mode.md): what a `mode: pod` volume costs,
//! measured on the release binary with real SPIRE 1.13.3 (the test kit). The benchmark plays
//! the kubelet as tests/pod_identity.rs does: NodePublishVolume / NodeUnpublishVolume on the
//! bridge's CSI socket with the pod fields `podInfoOnMount` passes (`--pod-fields
//! trust-kubelet`, no API server). It re-executes itself under `unshare --mount
//! --propagation private` (root), so the tmpfs and bind mounts never reach the host.
//!
//! Entries (`k8s:ns:bench` + `k8s:sa:<sa>`) are created first and each bridge publishes,
//! serves and unpublishes three warm-up volumes of each kind before anything is timed. Three bridge processes, one per
//! mode, each with the same warm-up and a baseline taken just before its N volumes
//! (`SB_PODS_N`, default 200):
//!
//! 1. *shared* volumes (no `mode`): NodePublishVolume, RSS with N published, unpublish;
//! 2. *socket-only* `mode: pod` volumes: NodePublishVolume, and from the call to the first
//!    `FetchX509SVID` answer on `<target>/socket` (a new Workload API client per volume,
//!    `workload.spiffe.io: true`, retried every millisecond until the stream answers); RSS
//!    with N idle volumes, then with one `FetchX509SVID` stream open on each; unpublish;
//! 3. `files: "true"` volumes: NodePublishVolume (it returns once the files exist; svid.pem
//!    is checked right after), RSS with N published, the tmpfs each uses, unpublish; then N
//!    files volumes of an entry with a 30 s X.509 TTL (`SB_PODS_TTL`): over each of
//!    `SB_PODS_ROTATIONS` (2) renewals of that SVID by the agent,
//!    the `svid_bridge_pod_file_sets_written_total` / `_files_written_total` increments and
//!    the delay from the agent handing out the new SVID (a Delegated Identity subscription
//!    of this benchmark with the pods' selectors) to each volume's svid.pem holding it
//!    (every volume's svid.pem polled in a loop).
//!
//! 4. The nearest runnable reference for "a pod gets its SVID as files": spiffe-helper cannot
//!    be built here (the Go module proxy answers "not available"), so the SPIRE agent's own
//!    CLI as an init container would run it, `spire-agent api fetch x509 -socketPath <agent>
//!    -write <dir>` (a copy of spire-agent registered by `unix:path`), run N times: wall time
//!    per run, and its peak RSS (`/usr/bin/time -f %M`, `SB_PODS_CLI_RSS_RUNS` runs); the
//!    floor, `spire-agent --version` (the same binary started and stopped, no API call).
//!
//! No assertion is timed. Results: stdout and benches/results/pods.md (`SB_BENCH_RESULTS`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::too_many_lines
)]

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use svid_bridge::identity::{DelegatedSource, Selector, SelectorSet, Source, Workload};
use svid_bridge::proto::csi::NodePublishVolumeRequest;
use svid_bridge::proto::csi::node_client::NodeClient;
use svid_bridge::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use svid_bridge::proto::workload::{X509svidRequest, X509svidResponse};
use svid_bridge::testing::bridge::{Bridge, spire_options_for_bridge};
use svid_bridge::testing::csi::{NodeDirs, node_client, publish_request, unpublish_request};
use svid_bridge::testing::{EntrySpec, Spire, metrics, mount_ns};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const NS: &str = "bench";
/// Service account of the latency and memory pods (SPIRE's default 1 h X.509 TTL).
const SA: &str = "app";
/// Service account of the rotation pods (short TTL).
const SA_ROT: &str = "rot";
const WAIT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    if !mount_ns::in_private_mount_ns() {
        return mount_ns::reexec_in_private_mount_ns();
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "the pod-volume benchmark mounts (tmpfs, bind): run it as root"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
    ExitCode::SUCCESS
}

fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ------------------------------------------------------------------------ pods ----

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Shared,
    Socket,
    Files,
}

/// One pod's CSI volume, as the kubelet asks for it.
struct Volume {
    id: String,
    target: PathBuf,
    request: NodePublishVolumeRequest,
}

impl Volume {
    fn new(node: &NodeDirs, kind: Kind, sa: &str, name: &str) -> Volume {
        // Short UIDs: `<target>/socket` must fit in sun_path.
        let uid = format!("{name}-4e55");
        let target = node.target(&uid);
        let id = format!("csi-{uid}");
        let mut request = publish_request(&id, &target);
        if kind != Kind::Shared {
            request.secrets.clear();
            let mut context: Vec<(&str, &str)> = vec![
                ("csi.storage.k8s.io/ephemeral", "true"),
                ("csi.storage.k8s.io/pod.name", name),
                ("csi.storage.k8s.io/pod.namespace", NS),
                ("csi.storage.k8s.io/pod.uid", uid.as_str()),
                ("csi.storage.k8s.io/serviceAccount.name", sa),
                ("mode", "pod"),
            ];
            if kind == Kind::Files {
                context.push(("files", "true"));
            }
            request.volume_context = context
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect::<HashMap<_, _>>();
        }
        Volume {
            id,
            target,
            request,
        }
    }

    async fn publish(&self, csi: &mut NodeClient<Channel>) -> Duration {
        let t = Instant::now();
        csi.node_publish_volume(self.request.clone())
            .await
            .unwrap_or_else(|e| panic!("publish {}: {e:?}", self.target.display()));
        t.elapsed()
    }

    async fn unpublish(&self, csi: &mut NodeClient<Channel>) -> Duration {
        let t = Instant::now();
        csi.node_unpublish_volume(unpublish_request(&self.id, &self.target))
            .await
            .unwrap_or_else(|e| panic!("unpublish {}: {e:?}", self.target.display()));
        let took = t.elapsed();
        assert!(!self.target.join("socket").exists(), "unpublished");
        took
    }

    fn socket(&self) -> PathBuf {
        self.target.join("socket")
    }
}

// ----------------------------------------------------------- Workload API client ----

type HeaderFn = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

fn security_header(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    request.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(request)
}

/// An open `FetchX509SVID` stream with its client (kept together so the connection lives).
struct Fetch {
    _client: SpiffeWorkloadApiClient<InterceptedService<Channel, HeaderFn>>,
    _stream: tonic::Streaming<X509svidResponse>,
}

/// A new client on `socket`, `FetchX509SVID`, its first answer.
async fn try_fetch(socket: &Path) -> Result<(Fetch, X509svidResponse), String> {
    let channel = svid_bridge::uds::connect(socket)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client =
        SpiffeWorkloadApiClient::with_interceptor(channel, security_header as HeaderFn);
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(|e| format!("{e:?}"))?
        .into_inner();
    match stream.message().await {
        Ok(Some(response)) if !response.svids.is_empty() => Ok((
            Fetch {
                _client: client,
                _stream: stream,
            },
            response,
        )),
        Ok(other) => Err(format!("no SVID in the first answer: {other:?}")),
        Err(e) => Err(format!("{e:?}")),
    }
}

/// Retries every millisecond until the socket answers `FetchX509SVID` with an SVID.
async fn first_answer(socket: &Path) -> (Fetch, X509svidResponse) {
    let deadline = Instant::now() + WAIT;
    loop {
        match try_fetch(socket).await {
            Ok(answer) => return answer,
            Err(e) if Instant::now() > deadline => {
                panic!("no FetchX509SVID answer on {}: {e}", socket.display())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

// ----------------------------------------------------------------------- /proc ----

/// One reading of the bridge process (KiB, counts).
#[derive(Clone, Copy, Default, Debug)]
struct Mem {
    rss: f64,
    anon: f64,
    pss: f64,
    fds: f64,
    threads: f64,
}

fn status_field(text: &str, field: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn read_mem(pid: u32) -> Mem {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Mem {
        rss: status_field(&status, "VmRSS:"),
        anon: status_field(&status, "RssAnon:"),
        pss: status_field(&rollup, "Pss:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(f64::NAN, |d| d.count() as f64),
        threads: status_field(&status, "Threads:"),
    }
}

/// After 2 s of quiet, the median of 5 readings 200 ms apart.
async fn settled_mem(pid: u32) -> Mem {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut readings = Vec::new();
    for _ in 0..5 {
        readings.push(read_mem(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let median = |f: fn(&Mem) -> f64| {
        let v: Vec<f64> = readings.iter().map(f).collect();
        support::Summary::of(&v).map_or(f64::NAN, |s| s.median)
    };
    Mem {
        rss: median(|m| m.rss),
        anon: median(|m| m.anon),
        pss: median(|m| m.pss),
        fds: median(|m| m.fds),
        threads: median(|m| m.threads),
    }
}

/// KiB a tmpfs uses (statvfs: blocks in use × block size).
fn tmpfs_used_kib(path: &Path) -> f64 {
    let s = rustix::fs::statvfs(path).unwrap();
    ((s.f_blocks - s.f_bfree) * s.f_frsize) as f64 / 1024.0
}

// ----------------------------------------------------------------------- bridge ----

struct Node {
    dirs: NodeDirs,
    bridge: Bridge,
    metrics_port: u16,
    csi: NodeClient<Channel>,
}

impl Node {
    async fn start(spire: &Spire) -> Node {
        let dirs = NodeDirs::new();
        let metrics_port = svid_bridge::testing::free_port();
        let mut args = dirs.args();
        args.extend([
            "--disable-kubelet-registration".to_owned(),
            format!("--pod-state-dir={}", dirs.root.join("state").display()),
            "--pod-fields=trust-kubelet".to_owned(),
            "--kubernetes=off".to_owned(),
            format!("--metrics-addr=127.0.0.1:{metrics_port}"),
            "--log-level=warn".to_owned(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let bridge = block(|| Bridge::start_with(spire, &args));
        let csi = node_client(&dirs.csi_socket()).await;
        let mut node = Node {
            dirs,
            bridge,
            metrics_port,
            csi,
        };
        node.warm_up().await;
        node
    }

    /// One volume of each kind published, served and unpublished: the bridge's delegate
    /// SVID, the entries, code pages and allocator arenas are all in place before timing.
    async fn warm_up(&mut self) {
        for round in 0..3 {
            let shared = Volume::new(&self.dirs, Kind::Shared, SA, &format!("wsh{round}"));
            let socket = Volume::new(&self.dirs, Kind::Socket, SA, &format!("wso{round}"));
            let files = Volume::new(&self.dirs, Kind::Files, SA, &format!("wfi{round}"));
            shared.publish(&mut self.csi).await;
            socket.publish(&mut self.csi).await;
            drop(first_answer(&socket.socket()).await);
            files.publish(&mut self.csi).await;
            for v in [&shared, &socket, &files] {
                v.unpublish(&mut self.csi).await;
            }
        }
    }

    fn pid(&self) -> u32 {
        self.bridge.pid()
    }

    fn metric(&self, name: &str) -> f64 {
        metrics::sample(&metrics::scrape(self.metrics_port), name).unwrap_or(f64::NAN)
    }
}

// ---------------------------------------------------------------------- results ----

#[derive(Default)]
struct Lat {
    values_ms: Vec<f64>,
}

impl Lat {
    fn push(&mut self, d: Duration) {
        self.values_ms.push(ms(d));
    }
    fn pct(&self, p: f64) -> f64 {
        support::percentile(&self.values_ms, p).unwrap_or(f64::NAN)
    }
    fn max(&self) -> f64 {
        support::max(&self.values_ms).unwrap_or(f64::NAN)
    }
    fn line(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            self.pct(50.0),
            self.pct(99.0),
            self.max(),
            self.values_ms.len()
        )
    }
    fn cells(&self, digits: usize) -> String {
        format!(
            "{:.d$} | {:.d$} | {:.d$}",
            self.pct(50.0),
            self.pct(99.0),
            self.max(),
            d = digits
        )
    }
}

struct MemRow {
    what: String,
    before: Mem,
    after: Mem,
}

#[derive(Default)]
struct Results {
    n: usize,
    shared_publish: Lat,
    shared_unpublish: Lat,
    socket_publish: Lat,
    socket_first_answer: Lat,
    socket_unpublish: Lat,
    files_publish: Lat,
    files_unpublish: Lat,
    mem: Vec<MemRow>,
    tmpfs_kib: Vec<f64>,
    rotation: Option<Rotation>,
    cli_wall: Lat,
    cli_rss_kib: Vec<f64>,
    cli_runs_failed: usize,
    /// `spire-agent --version`: process start and exit without an API call.
    cli_floor_wall: Lat,
    cli_floor_rss_kib: Vec<f64>,
    /// Load average (1/5/15 min) at the start and at the end.
    load: (String, String),
}

struct Rotation {
    ttl: u32,
    volumes: usize,
    rounds: Vec<RotationRound>,
}

/// One renewal of the rotation pods' SVID.
struct RotationRound {
    file_sets: f64,
    files: f64,
    /// Per volume: svid.pem holds the new SVID, minus when the agent handed it to this
    /// benchmark's own subscription (ms; negative when the volume was first).
    delays_ms: Vec<f64>,
    /// First → last volume holding the new SVID (ms).
    spread_ms: f64,
    /// Mean time of one pass over every volume's svid.pem (ms): the polling resolution.
    poll_pass_ms: f64,
    /// Volumes whose svid.pem holds the leaf the agent handed out.
    matching: usize,
    /// Another renewal reached the reference subscription within the counting window.
    another_renewal: bool,
    /// Seconds since the previous renewal the reference subscription saw, if it saw one.
    since_previous_s: Option<f64>,
}

// ------------------------------------------------------------------------ phases ----

async fn shared_phase(spire: &Spire, n: usize, r: &mut Results) {
    let mut node = Node::start(spire).await;
    let before = settled_mem(node.pid()).await;
    let vols: Vec<Volume> = (0..n)
        .map(|i| Volume::new(&node.dirs, Kind::Shared, SA, &format!("sh{i}")))
        .collect();
    for v in &vols {
        let took = v.publish(&mut node.csi).await;
        r.shared_publish.push(took);
    }
    let after = settled_mem(node.pid()).await;
    r.mem.push(MemRow {
        what: "shared (no `mode`)".into(),
        before,
        after,
    });
    for v in &vols {
        let took = v.unpublish(&mut node.csi).await;
        r.shared_unpublish.push(took);
    }
    println!("shared: publish {}", r.shared_publish.line());
}

async fn socket_phase(spire: &Spire, n: usize, r: &mut Results) {
    let mut node = Node::start(spire).await;
    let before = settled_mem(node.pid()).await;
    let vols: Vec<Volume> = (0..n)
        .map(|i| Volume::new(&node.dirs, Kind::Socket, SA, &format!("so{i}")))
        .collect();
    let expected = spire.id(&format!("ns/{NS}/sa/{SA}"));
    for v in &vols {
        let t = Instant::now();
        v.publish(&mut node.csi).await;
        r.socket_publish.push(t.elapsed());
        let (fetch, answer) = first_answer(&v.socket()).await;
        r.socket_first_answer.push(t.elapsed());
        assert_eq!(answer.svids[0].spiffe_id, expected);
        drop(fetch);
    }
    let idle = settled_mem(node.pid()).await;
    r.mem.push(MemRow {
        what: "`mode: pod`, socket only, idle".into(),
        before,
        after: idle,
    });
    let mut open = Vec::new();
    for v in &vols {
        open.push(first_answer(&v.socket()).await.0);
    }
    let streaming = settled_mem(node.pid()).await;
    r.mem.push(MemRow {
        what: "`mode: pod`, socket only, one `FetchX509SVID` stream open on each".into(),
        before,
        after: streaming,
    });
    drop(open);
    for v in &vols {
        let took = v.unpublish(&mut node.csi).await;
        r.socket_unpublish.push(took);
    }
    println!("socket-only: publish {}", r.socket_publish.line());
    println!(
        "socket-only: publish → first FetchX509SVID answer {}",
        r.socket_first_answer.line()
    );
}

async fn files_phase(spire: &Spire, n: usize, ttl: u32, rotations: usize, r: &mut Results) {
    let mut node = Node::start(spire).await;
    let before = settled_mem(node.pid()).await;
    let vols: Vec<Volume> = (0..n)
        .map(|i| Volume::new(&node.dirs, Kind::Files, SA, &format!("fi{i}")))
        .collect();
    for v in &vols {
        let took = v.publish(&mut node.csi).await;
        assert!(
            v.target.join("svid.pem").exists(),
            "files when publish returns"
        );
        r.files_publish.push(took);
    }
    let after = settled_mem(node.pid()).await;
    r.mem.push(MemRow {
        what: "`mode: pod`, `files: \"true\"`".into(),
        before,
        after,
    });
    r.tmpfs_kib = vols.iter().map(|v| tmpfs_used_kib(&v.target)).collect();
    for v in &vols {
        let took = v.unpublish(&mut node.csi).await;
        r.files_unpublish.push(took);
    }
    println!("files: publish {}", r.files_publish.line());
    r.rotation = Some(rotation(spire, &mut node, n, ttl, rotations).await);
}

/// The leaf certificate (DER) of the first PEM block of `path`.
fn leaf(path: &Path) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).ok()?;
    pem::parse_many(bytes)
        .ok()?
        .into_iter()
        .next()
        .map(pem::Pem::into_contents)
}

async fn rotation(
    spire: &Spire,
    node: &mut Node,
    n: usize,
    ttl: u32,
    rotations: usize,
) -> Rotation {
    // This benchmark's own view of the agent: a Delegated Identity subscription with the
    // rotation pods' selectors (it is an authorized delegate too).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let admin = spire.admin_socket_path().to_path_buf();
    let reference = tokio::spawn(async move {
        let source = DelegatedSource::new(admin);
        let selectors =
            SelectorSet::new(vec![Selector::k8s("ns", NS), Selector::k8s("sa", SA_ROT)]);
        let deadline = Instant::now() + WAIT;
        loop {
            match source
                .subscribe_svids(Workload::Selectors(selectors.clone()))
                .await
            {
                Ok(mut stream) => {
                    while let Some(item) = stream.next().await {
                        match item {
                            Ok(svids) if !svids.svids.is_empty() => {
                                let leaf = svids.svids[0].chain[0].clone();
                                if tx.send((Instant::now(), leaf)).is_err() {
                                    return;
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Err(e) if Instant::now() > deadline => panic!("delegated subscription: {e:?}"),
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    let vols: Vec<Volume> = (0..n)
        .map(|i| Volume::new(&node.dirs, Kind::Files, SA_ROT, &format!("ro{i}")))
        .collect();
    for v in &vols {
        v.publish(&mut node.csi).await;
    }
    let pems: Vec<PathBuf> = vols.iter().map(|v| v.target.join("svid.pem")).collect();

    let mut rounds = Vec::new();
    // The SVID every volume holds, when the reference subscription received it, and whether
    // that was a renewal (the first SVID it receives is the one current when it subscribed).
    let mut current: Option<(Instant, Vec<u8>)> = None;
    let mut received = 0usize;
    for round in 0..rotations {
        // Every volume holds the SVID the agent hands out now.
        let deadline = Instant::now() + WAIT;
        loop {
            while let Ok(m) = rx.try_recv() {
                current = Some(m);
                received += 1;
            }
            if let Some((_, leaf_now)) = &current
                && pems.iter().all(|p| leaf(p).as_ref() == Some(leaf_now))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "volumes never held the agent's SVID"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (previous_at, _) = current.clone().unwrap();
        let previous_was_renewal = received > 1;
        let sets_before = node.metric("svid_bridge_pod_file_sets_written_total");
        let files_before = node.metric("svid_bridge_pod_files_written_total");

        // Poll every volume's svid.pem until it changes, on a thread of its own.
        let old: Vec<Vec<u8>> = pems.iter().map(|p| std::fs::read(p).unwrap()).collect();
        let poll_pems = pems.clone();
        let poller = std::thread::spawn(move || {
            let mut seen: Vec<Option<Instant>> = vec![None; poll_pems.len()];
            let started = Instant::now();
            let mut passes = 0u64;
            while seen.iter().any(Option::is_none) && started.elapsed() < Duration::from_secs(120) {
                for (i, p) in poll_pems.iter().enumerate() {
                    if seen[i].is_none()
                        && let Ok(bytes) = std::fs::read(p)
                        && bytes != old[i]
                    {
                        seen[i] = Some(Instant::now());
                    }
                }
                passes += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            (seen, started.elapsed(), passes)
        });
        println!(
            "rotation {}: {n} files volumes hold the current SVID; waiting for the agent's next renewal",
            round + 1
        );
        let (rotated_at, new_leaf) =
            tokio::time::timeout(Duration::from_secs(u64::from(ttl) * 2), rx.recv())
                .await
                .expect("the agent renews within 2 TTLs")
                .expect("reference subscription alive");
        received += 1;
        current = Some((rotated_at, new_leaf.clone()));
        let (seen, polled_for, passes) = block(|| poller.join().unwrap());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sets_after = node.metric("svid_bridge_pod_file_sets_written_total");
        let files_after = node.metric("svid_bridge_pod_files_written_total");
        let mut another_renewal = false;
        while let Ok(m) = rx.try_recv() {
            another_renewal = true;
            current = Some(m);
            received += 1;
        }

        let matching = pems
            .iter()
            .filter(|p| leaf(p).as_ref() == Some(&new_leaf))
            .count();
        let signed = |t: Instant| {
            if t >= rotated_at {
                ms(t - rotated_at)
            } else {
                -ms(rotated_at - t)
            }
        };
        let times: Vec<Instant> = seen.iter().flatten().copied().collect();
        let delays_ms: Vec<f64> = times.iter().map(|t| signed(*t)).collect();
        let spread_ms = match (times.iter().min(), times.iter().max()) {
            (Some(a), Some(b)) => ms(*b - *a),
            _ => f64::NAN,
        };
        let rot = RotationRound {
            file_sets: sets_after - sets_before,
            files: files_after - files_before,
            delays_ms,
            spread_ms,
            poll_pass_ms: ms(polled_for) / passes.max(1) as f64,
            matching,
            another_renewal,
            since_previous_s: previous_was_renewal
                .then(|| (rotated_at - previous_at).as_secs_f64()),
        };
        println!(
            "rotation {}: {} file sets, {} files written; agent → svid.pem p50 {:.1} ms p99 {:.1} ms; first → last volume {:.1} ms",
            round + 1,
            rot.file_sets,
            rot.files,
            support::percentile(&rot.delays_ms, 50.0).unwrap_or(f64::NAN),
            support::percentile(&rot.delays_ms, 99.0).unwrap_or(f64::NAN),
            rot.spread_ms
        );
        rounds.push(rot);
    }
    reference.abort();
    for v in &vols {
        v.unpublish(&mut node.csi).await;
    }
    Rotation {
        ttl,
        volumes: n,
        rounds,
    }
}

/// `spire-agent api fetch x509 -write`, once per pod, as an init container would run it.
fn cli_phase(spire: &Spire, n: usize, rss_runs: usize, r: &mut Results) {
    let binary = spire.workload_binary("pod-init");
    let id = spire.id("pod-init");
    spire.create_entry(&EntrySpec::for_path(&id, &binary));
    let _ = spire.wait_for_svid(&binary, &id);
    let out = tempfile::Builder::new()
        .prefix("sb-pods-cli-")
        .tempdir_in("/tmp")
        .unwrap();
    let command = |dir: &Path| {
        let mut c = Command::new(&binary);
        c.args(["api", "fetch", "x509", "-socketPath"])
            .arg(spire.socket_path())
            .arg("-write")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    // Warm-up: page cache, the agent's attestation path.
    for i in 0..5 {
        let dir = out.path().join(format!("warm{i}"));
        std::fs::create_dir(&dir).unwrap();
        let _ = command(&dir).status();
    }
    for i in 0..n {
        let dir = out.path().join(format!("pod{i}"));
        std::fs::create_dir(&dir).unwrap();
        let t = Instant::now();
        let status = command(&dir).status().unwrap();
        let took = t.elapsed();
        if status.success() && dir.join("svid.0.pem").exists() {
            r.cli_wall.push(took);
        } else {
            r.cli_runs_failed += 1;
        }
    }
    for i in 0..rss_runs {
        let dir = out.path().join(format!("rss{i}"));
        std::fs::create_dir(&dir).unwrap();
        if let Some(kib) = peak_rss_kib(&command(&dir), &out.path().join(format!("rss{i}.time"))) {
            r.cli_rss_kib.push(kib);
        }
    }
    // The floor: the same binary started and stopped without any API call.
    let mut version = Command::new(&binary);
    version
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for i in 0..n {
        let t = Instant::now();
        let ok = version.status().unwrap().success();
        if ok {
            r.cli_floor_wall.push(t.elapsed());
        }
        if i < rss_runs
            && let Some(kib) = peak_rss_kib(&version, &out.path().join(format!("floor{i}.time")))
        {
            r.cli_floor_rss_kib.push(kib);
        }
    }
    println!("spire-agent api fetch x509 -write: {}", r.cli_wall.line());
}

/// `command` run under `/usr/bin/time -f %M`: the peak RSS of its process (KiB).
fn peak_rss_kib(command: &Command, report: &Path) -> Option<f64> {
    let status = Command::new("/usr/bin/time")
        .args(["-f", "%M", "-o"])
        .arg(report)
        .arg(command.get_program())
        .args(command.get_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("/usr/bin/time");
    if !status.success() {
        return None;
    }
    std::fs::read_to_string(report)
        .ok()?
        .lines()
        .last()?
        .trim()
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------- run ----

async fn run() {
    let n = support::env_num("SB_PODS_N", 200);
    let ttl = u32::try_from(support::env_num("SB_PODS_TTL", 30)).unwrap();
    let rotations = support::env_num("SB_PODS_ROTATIONS", 2);
    let cli_rss_runs = support::env_num("SB_PODS_CLI_RSS_RUNS", 50);
    let started = Instant::now();
    let load_before = loadavg();
    println!(
        "pod_volumes: {n} volumes per mode; machine: {}; load average {load_before}",
        support::machine_description()
    );

    // The benchmark subscribes to the agent like the bridge does (the rotation's reference
    // time), so it is an authorized delegate too.
    let observer = "pod-bench-observer";
    let mut options = spire_options_for_bridge("example.org");
    options.log_level = "INFO".into();
    options
        .authorized_delegates
        .push(format!("spiffe://example.org/{observer}"));
    let spire = block(|| Spire::start(options));
    block(|| {
        spire.register_test_binary(observer);
        for (sa, ttl) in [(SA, None), (SA_ROT, Some(ttl))] {
            spire.create_entry(&EntrySpec {
                spiffe_id: spire.id(&format!("ns/{NS}/sa/{sa}")),
                selectors: vec![format!("k8s:ns:{NS}"), format!("k8s:sa:{sa}")],
                x509_svid_ttl: ttl,
                ..EntrySpec::default()
            });
        }
    });

    let mut r = Results {
        n,
        ..Results::default()
    };
    shared_phase(&spire, n, &mut r).await;
    socket_phase(&spire, n, &mut r).await;
    files_phase(&spire, n, ttl, rotations, &mut r).await;
    block(|| cli_phase(&spire, n, cli_rss_runs, &mut r));
    r.load = (load_before, loadavg());
    report(&r, started.elapsed());
}

/// `/proc/loadavg`'s 1, 5 and 15 min averages: other builds share this machine.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn report(r: &Results, took: Duration) {
    let n = r.n;
    let mut md = format!(
        "<!-- generated by `cargo bench --bench pod_volumes` ({}) in {:.0} s -->\n\n\
         {n} volumes per mode, published one after another over the bridge's CSI socket (release \
         build) as the kubelet would, SPIRE 1.13.3 server and agent, entries synced and one volume \
         of each kind served before timing. One bridge process per mode. Load average \
         (1/5/15 min): {} at the start, {} at the end.\n\n",
        support::machine_description(),
        took.as_secs_f64(),
        r.load.0,
        r.load.1
    );

    md.push_str("### Publish → first SVID, and unpublish (ms)\n\n");
    md.push_str("| volume | what is timed | p50 | p99 | max |\n|---|---|---|---|---|\n");
    let rows: [(&str, &str, &Lat); 7] = [
        (
            "`mode: pod`, `files: \"true\"`",
            "NodePublishVolume (returns once the files exist; svid.pem checked right after)",
            &r.files_publish,
        ),
        (
            "`mode: pod`, socket only",
            "NodePublishVolume call → first `FetchX509SVID` answer on `<target>/socket` (new client, retried every 1 ms)",
            &r.socket_first_answer,
        ),
        (
            "`mode: pod`, socket only",
            "NodePublishVolume alone",
            &r.socket_publish,
        ),
        (
            "shared (no `mode`)",
            "NodePublishVolume (bind mount)",
            &r.shared_publish,
        ),
        (
            "`mode: pod`, `files: \"true\"`",
            "NodeUnpublishVolume",
            &r.files_unpublish,
        ),
        (
            "`mode: pod`, socket only",
            "NodeUnpublishVolume",
            &r.socket_unpublish,
        ),
        (
            "shared (no `mode`)",
            "NodeUnpublishVolume",
            &r.shared_unpublish,
        ),
    ];
    for (volume, what, lat) in rows {
        md.push_str(&format!("| {volume} | {what} | {} |\n", lat.cells(2)));
    }

    md.push_str(&format!(
        "\n### Memory of the bridge process per volume ({n} volumes; KiB)\n\n\
         Each mode in its own bridge process: reading before (after the warm-up) and with the \
         {n} volumes published, each the median of 5 readings over 1 s after 2 s of quiet. \
         Δ/volume = (with − before) / {n}; *beyond shared* = Δ/volume − the shared mode's \
         Δ/volume (RSS).\n\n\
         | volumes | RSS before | RSS with {n} | RSS Δ/volume | beyond shared | RssAnon Δ/volume | PSS Δ/volume | fds Δ/volume | threads before → with |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    ));
    let per = |row: &MemRow, f: fn(&Mem) -> f64| (f(&row.after) - f(&row.before)) / n as f64;
    let shared_per = r.mem.first().map_or(f64::NAN, |row| per(row, |m| m.rss));
    for row in &r.mem {
        let rss_per = per(row, |m| m.rss);
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} → {:.0} |\n",
            row.what,
            row.before.rss,
            row.after.rss,
            rss_per,
            rss_per - shared_per,
            per(row, |m| m.anon),
            per(row, |m| m.pss),
            per(row, |m| m.fds),
            row.before.threads,
            row.after.threads,
        ));
    }
    if !r.tmpfs_kib.is_empty() {
        md.push_str(&format!(
            "\nBesides the process: each files volume's tmpfs holds its files in kernel memory \
             (shmem, not in the bridge's RSS): {:.0} KiB per volume (median over {n}, statvfs).\n",
            support::Summary::of(&r.tmpfs_kib).map_or(f64::NAN, |s| s.median)
        ));
    }

    if let Some(rot) = &r.rotation {
        let cols = rot.rounds.len();
        md.push_str(&format!(
            "\n### Rotation: {} files volumes (entry `x509_svid_ttl` {} s), {cols} renewal(s)\n\n\
             All {} volumes belong to one entry (`k8s:ns` + `k8s:sa`), so the agent renews one \
             SVID and tells every subscriber at once (no spread of its own: one renewal). The \
             reference time is when this benchmark's own Delegated Identity subscription with \
             the same selectors received the new SVID; each volume's time is when a loop \
             reading every volume's svid.pem first saw it change. Counters: increase from \
             before the renewal to 1 s after the last volume changed.\n\n\
             | metric | {} |\n|---|{}\n",
            rot.volumes,
            rot.ttl,
            rot.volumes,
            (1..=cols)
                .map(|i| format!("renewal {i}"))
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(cols),
        ));
        type Cell = fn(&RotationRound, usize) -> String;
        let lines: [(&str, Cell); 11] = [
            (
                "file sets written (`svid_bridge_pod_file_sets_written_total` increase)",
                |rr, _| format!("{:.0}", rr.file_sets),
            ),
            (
                "files written (`svid_bridge_pod_files_written_total` increase)",
                |rr, _| format!("{:.0}", rr.files),
            ),
            ("files per set", |rr, _| {
                format!("{:.1}", rr.files / rr.file_sets)
            }),
            (
                "volumes whose svid.pem holds the agent's new SVID afterwards",
                |rr, n| format!("{} of {n}", rr.matching),
            ),
            (
                "agent hands out the new SVID → the volume's svid.pem holds it, p50 (ms)",
                |rr, _| {
                    format!(
                        "{:.1}",
                        support::percentile(&rr.delays_ms, 50.0).unwrap_or(f64::NAN)
                    )
                },
            ),
            ("… p99 (ms)", |rr, _| {
                format!(
                    "{:.1}",
                    support::percentile(&rr.delays_ms, 99.0).unwrap_or(f64::NAN)
                )
            }),
            ("… max (ms)", |rr, _| {
                format!("{:.1}", support::max(&rr.delays_ms).unwrap_or(f64::NAN))
            }),
            ("first → last volume rewritten (ms)", |rr, _| {
                format!("{:.1}", rr.spread_ms)
            }),
            (
                "polling resolution: one pass over every svid.pem (ms)",
                |rr, _| format!("{:.2}", rr.poll_pass_ms),
            ),
            ("time since the agent's previous renewal (s)", |rr, _| {
                rr.since_previous_s
                    .map_or("–".into(), |s| format!("{s:.1}"))
            }),
            ("another renewal inside the counting window", |rr, _| {
                if rr.another_renewal {
                    "yes (counts include it)".into()
                } else {
                    "no".into()
                }
            }),
        ];
        for (metric, cell) in lines {
            let cells: Vec<String> = rot.rounds.iter().map(|rr| cell(rr, rot.volumes)).collect();
            md.push_str(&format!("| {metric} | {} |\n", cells.join(" | ")));
        }
    }

    md.push_str(&format!(
        "\n### The nearest runnable reference: `spire-agent api fetch x509 -write`, once per pod\n\n\
         What an init container does (SPIRE 1.13.3's CLI, a copy registered by `unix:path`, on the \
         agent's Workload API socket): connect, attest, fetch, write `svid.0.pem`, `svid.0.key`, \
         `bundle.0.pem`, exit. Not spiffe-helper (which cannot be built here), and unlike a \
         files volume it never rewrites on rotation.\n\n\
         | metric | value |\n|---|---|\n\
         | runs (successful) | {} ({} failed) |\n\
         | wall time, process start → exit with files written, p50 | {:.2} ms |\n\
         | … p99 | {:.2} ms |\n\
         | … max | {:.2} ms |\n\
         | peak RSS of one run (`/usr/bin/time -f %M`, {} runs), median | {:.0} KiB |\n\
         | … max | {:.0} KiB |\n\
         | floor: `spire-agent --version` (start and exit, no API call), wall time p50 / p99 | {:.2} / {:.2} ms |\n\
         | floor: its peak RSS, median of {} runs | {:.0} KiB |\n",
        r.cli_wall.values_ms.len(),
        r.cli_runs_failed,
        r.cli_wall.pct(50.0),
        r.cli_wall.pct(99.0),
        r.cli_wall.max(),
        r.cli_rss_kib.len(),
        support::Summary::of(&r.cli_rss_kib).map_or(f64::NAN, |s| s.median),
        support::max(&r.cli_rss_kib).unwrap_or(f64::NAN),
        r.cli_floor_wall.pct(50.0),
        r.cli_floor_wall.pct(99.0),
        r.cli_floor_rss_kib.len(),
        support::Summary::of(&r.cli_floor_rss_kib).map_or(f64::NAN, |s| s.median),
    ));

    let dir = support::results_dir();
    support::write_result(&dir, "pods.md", &md);
    println!("\n{md}");
}
