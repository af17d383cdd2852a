//! svid-bridge against the SPIRE agent's own SDS server, side by side, on one node made of
//! real processes: a SPIRE server and agent (tests/common), svid-bridge, and N "sidecars".
//!
//! A sidecar is this very binary re-executed in child mode (`SB_FANOUT_CHILD_SOCKET`), hard
//! linked under N different paths and registered as N entries (`unix:path:<link>`), so the
//! PID each SDS server sees on its socket (SO_PEERCRED of the connecting process) is a
//! distinct workload. Each child opens one HTTP/2 connection and on it the two streams an
//! Istio sidecar opens, `default` then `ROOTCA` (the second once the first was answered),
//! ACKs every response like Envoy, and prints one line per event with wall-clock stamps:
//!
//! ```text
//! F <stream> <start_ns> <first_response_ns>     time to first secret
//! U <stream> <t_ns> <content fingerprint>       every response
//! E <stream> <message>                          the stream failed
//! ```
//!
//! Every run (one system, one N) restarts the SPIRE agent so both systems start from the
//! same agent state, waits until the agent has cached the SVIDs, starts svid-bridge when it
//! is its turn, starts the N children, and then measures:
//! - time to first secret on each workload's first and second stream;
//! - one SVID rotation wave (entries have a short X.509 TTL, so the agent renews every SVID
//!   at half of it): the time from the first stream holding a new certificate to the last;
//! - steady state: RSS and CPU of the agent (and the bridge) with N workloads connected;
//! - a bundle change (`spire-server localauthority x509 prepare` adds a root to the trust
//!   bundle): the time from the agent delivering it on its own Workload API (this process
//!   watches `FetchX509Bundles` as a workload of its own) to each `ROOTCA` stream holding it,
//!   and the CPU spent per pushed response;
//! - start-up of both servers: process start → socket accepting → first secret served.
//!
//! Runs alternate the two systems (A/B, then B/A) and each cell reports the median over
//! runs with the min–max spread. `make bench` runs this; knobs (environment):
//! `SB_BENCH_N` (default `100,500,1000`), `SB_BENCH_REPS` (2), `SB_BENCH_SVID_TTL` (30 s),
//! `SB_BENCH_PACE_US` (child start interval, 5000), `SB_BENCH_RESULTS` (benches/results).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::too_many_lines)]

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Proc, Spire, SpireOptions};
use support::plot::{self, AGENT, AGENT_LIGHT, BRIDGE, BRIDGE_LIGHT, Bar, BarPanel, CdfPanel, Series};
use support::{Cell, ProcSample, Summary, ms, now_ns};

const CHILD_ENV: &str = "SB_FANOUT_CHILD_SOCKET";
const TRUST_DOMAIN: &str = "example.org";

fn main() {
    if let Some(socket) = std::env::var_os(CHILD_ENV) {
        child::main(PathBuf::from(socket));
        return;
    }
    orchestrator::main();
}

// =============================================================================== child ====

mod child {
    use std::path::PathBuf;

    use envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType;
    use envoy_types::pb::envoy::config::core::v3::{BuildVersion, Node};
    use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    use hyper_util::rt::TokioIo;
    use sha2::Digest;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::transport::{Channel, Endpoint, Uri};

    use super::support::now_ns;

    pub const SECRET_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

    pub fn main(socket: PathBuf) {
        // Die with the parent, whatever happens to it.
        let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        if let Err(e) = rt.block_on(run(socket)) {
            println!("E 0 {}", e.to_string().replace('\n', " "));
        }
    }

    /// What Envoy 1.40 sends on a stream's first request (E10): node with its version, so
    /// both servers pick the SPIFFE validator.
    fn request(name: &str, first: bool) -> DiscoveryRequest {
        let node = first.then(|| Node {
            id: format!("sidecar~{}", std::process::id()),
            cluster: "bench".into(),
            user_agent_name: "envoy".into(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
                version: Some(SemanticVersion { major_number: 1, minor_number: 40, patch: 0 }),
                metadata: None,
            })),
            ..Default::default()
        });
        DiscoveryRequest { node, resource_names: vec![name.to_owned()], type_url: SECRET_TYPE_URL.into(), ..Default::default() }
    }

    pub fn fingerprint(response: &DiscoveryResponse) -> String {
        let mut h = sha2::Sha256::new();
        for any in &response.resources {
            h.update(&any.value);
        }
        h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    struct Stream {
        name: &'static str,
        tx: mpsc::Sender<DiscoveryRequest>,
        rx: tonic::Streaming<DiscoveryResponse>,
    }

    impl Stream {
        async fn open(client: &mut SecretDiscoveryServiceClient<Channel>, name: &'static str) -> Result<(Stream, DiscoveryResponse), tonic::Status> {
            let (tx, rx) = mpsc::channel(8);
            tx.send(request(name, true)).await.map_err(|_| tonic::Status::internal("send"))?;
            let mut rx = client.stream_secrets(ReceiverStream::new(rx)).await?.into_inner();
            let first = rx.message().await?.ok_or_else(|| tonic::Status::unavailable("stream ended before the first response"))?;
            let stream = Stream { name, tx, rx };
            stream.ack(&first).await;
            Ok((stream, first))
        }

        /// E12: same names, the response's version and nonce.
        async fn ack(&self, response: &DiscoveryResponse) {
            let mut ack = request(self.name, false);
            ack.version_info = response.version_info.clone();
            ack.response_nonce = response.nonce.clone();
            let _ = self.tx.send(ack).await;
        }
    }

    async fn run(socket: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
        let t_connect = now_ns();
        let path = socket.clone();
        let channel = Endpoint::from_static("http://sds")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
            }))
            .await?;
        let mut client = SecretDiscoveryServiceClient::new(channel);
        let (mut s1, r1) = Stream::open(&mut client, "default").await?;
        let t1 = now_ns();
        println!("F 1 {t_connect} {t1}");
        println!("U 1 {t1} {}", fingerprint(&r1));
        let t_open2 = now_ns();
        let (mut s2, r2) = Stream::open(&mut client, "ROOTCA").await?;
        let t2 = now_ns();
        println!("F 2 {t_open2} {t2}");
        println!("U 2 {t2} {}", fingerprint(&r2));
        loop {
            let (n, stream, message) = tokio::select! {
                m = s1.rx.message() => (1, &s1, m),
                m = s2.rx.message() => (2, &s2, m),
            };
            match message {
                Ok(Some(response)) => {
                    println!("U {n} {} {}", now_ns(), fingerprint(&response));
                    stream.ack(&response).await;
                }
                Ok(None) => {
                    println!("E {n} stream ended");
                    return Ok(());
                }
                Err(status) => {
                    println!("E {n} {:?} {}", status.code(), status.message().replace('\n', " "));
                    return Ok(());
                }
            }
        }
    }
}

// ======================================================================== orchestrator ====

mod orchestrator {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    pub enum System {
        /// Sidecars connect to the SPIRE agent's public socket (its SDS v3 server).
        Agent,
        /// Sidecars connect to svid-bridge, which subscribes by PID at the agent's admin socket.
        Bridge,
    }

    impl System {
        pub fn label(self) -> &'static str {
            match self {
                System::Agent => "SPIRE agent SDS",
                System::Bridge => "svid-bridge",
            }
        }
    }

    /// What each child reported.
    #[derive(Default, Clone, Debug)]
    pub struct ChildState {
        pub first: [Option<(u64, u64)>; 2],
        /// Per stream: (time, fingerprint) of every response.
        pub updates: [Vec<(u64, String)>; 2],
        pub error: Option<String>,
        pub exited: bool,
    }

    pub type Children = Arc<Mutex<Vec<ChildState>>>;

    /// Everything one run measured. Times in ms unless named otherwise.
    #[derive(Default, Debug)]
    pub struct RunResult {
        pub system: Option<System>,
        pub n: usize,
        pub metrics: BTreeMap<String, f64>,
        pub ttfs: [Vec<f64>; 2],
        pub wave_lags: Vec<f64>,
        pub bundle_lags: Vec<f64>,
        pub samples: BTreeMap<String, Vec<ProcSample>>,
        pub notes: Vec<String>,
    }

    impl RunResult {
        fn set(&mut self, k: &str, v: Option<f64>) {
            if let Some(v) = v {
                self.metrics.insert(k.to_owned(), v);
            }
        }
    }

    pub struct Bench {
        pub rt: tokio::runtime::Runtime,
        pub spire: std::cell::RefCell<Spire>,
        #[allow(dead_code)]
        pub me: PathBuf,
        pub workloads: Vec<PathBuf>,
        pub bridge_binary: PathBuf,
        pub dir: tempfile::TempDir,
        pub sockets: common::SocketDir,
        pub reference: Arc<Mutex<Vec<(u64, String)>>>,
        pub ttl: u32,
        pub pace: Duration,
    }

    pub fn main() {
        let sizes = support::env_list("SB_BENCH_N", &[100, 500, 1000]);
        let reps = support::env_num("SB_BENCH_REPS", 2);
        let ttl = support::env_num("SB_BENCH_SVID_TTL", 30) as u32;
        let pace = Duration::from_micros(support::env_num("SB_BENCH_PACE_US", 5000) as u64);
        let max_n = sizes.iter().copied().max().unwrap_or(0);
        let started = Instant::now();
        println!("sds_fanout: N = {sizes:?}, {reps} run(s) per system and N, SVID TTL {ttl}s, one child every {pace:?}");
        println!("machine: {}", support::machine_description());

        let bench = Bench::setup(max_n, ttl, pace);
        let mut results: Vec<RunResult> = Vec::new();
        for &n in &sizes {
            for rep in 0..reps {
                let order = if rep % 2 == 0 { [System::Bridge, System::Agent] } else { [System::Agent, System::Bridge] };
                for system in order {
                    let t = Instant::now();
                    println!("\n=== {} N={n} run {}/{reps} ===", system.label(), rep + 1);
                    let r = bench.run(system, n);
                    print_run(&r);
                    println!("(run took {:.0}s; {:.0}s so far)", t.elapsed().as_secs_f64(), started.elapsed().as_secs_f64());
                    results.push(r);
                }
            }
        }
        super::report::write(&results, &sizes, reps, ttl, pace, started.elapsed());
        drop(bench);
    }

    fn print_run(r: &RunResult) {
        for (k, v) in &r.metrics {
            println!("  {k:<32} {v:>12.3}");
        }
        for note in &r.notes {
            println!("  note: {note}");
        }
    }

    impl Bench {
        fn setup(max_n: usize, ttl: u32, pace: Duration) -> Bench {
            let t = Instant::now();
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            let spire = Spire::start(SpireOptions {
                authorized_delegates: vec![common::bridge::bridge_spiffe_id(TRUST_DOMAIN)],
                // DEBUG logs a line per attestation: not what a node runs.
                log_level: "INFO".into(),
                ..SpireOptions::trust_domain(TRUST_DOMAIN)
            });
            let me = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
            let bridge_binary = common::workload_binary("svid-bridge", &release_bridge_binary());
            let workloads: Vec<PathBuf> = (0..max_n).map(|i| common::workload_binary(&format!("w{i:04}"), &me)).collect();

            // One batch for everything: the bridge, this process (the reference Workload API
            // client and start-up probe) and the N sidecars with a short SVID TTL.
            let node = spire.node_id();
            let mut entries = vec![
                entry_json(&common::bridge::bridge_spiffe_id(TRUST_DOMAIN), &node, &bridge_binary, None),
                entry_json(&spire.id("bench"), &node, &me, None),
            ];
            for (i, w) in workloads.iter().enumerate() {
                entries.push(entry_json(&spire.id(&format!("sidecar/{i:04}")), &node, w, Some(ttl)));
            }
            let dir = common::temp_dir("bench-sds");
            let data = dir.path().join("entries.json");
            std::fs::write(&data, serde_json::json!({ "entries": entries }).to_string()).unwrap();
            let out = spire.server_cli(&["entry", "create"], &["-data", data.to_str().unwrap(), "-output", "json"]);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let failed: Vec<_> = v["results"].as_array().unwrap().iter().filter(|r| r["status"]["code"].as_i64() != Some(0)).collect();
            assert!(failed.is_empty(), "entry create failed: {failed:?}");
            let sockets = common::SocketDir::new(dir.path(), "sds/socket");
            std::fs::create_dir_all(sockets.path().join("sds")).unwrap();

            let reference: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
            rt.spawn(watch_bundles(spire.socket_path().to_path_buf(), reference.clone()));
            let bench = Bench { rt, spire: std::cell::RefCell::new(spire), me, workloads, bridge_binary, dir, sockets, reference, ttl, pace };
            bench.wait_agent_warm(max_n + 2, Duration::from_secs(120));
            println!("setup: SPIRE with {} entries in {:.1}s", max_n + 2, t.elapsed().as_secs_f64());
            bench
        }

        fn sds_socket(&self) -> PathBuf {
            self.sockets.path().join("sds/socket")
        }

        /// Waits until the agent has cached SVIDs for `entries` entries (its LRU cache keeps
        /// at most 1,000 unless subscribed) and the count stopped growing.
        fn wait_agent_warm(&self, entries: usize, timeout: Duration) -> f64 {
            let target = entries.min(1000) as i32;
            let admin = self.spire.borrow().admin_socket_path().to_path_buf();
            let start = Instant::now();
            let mut last = (-1, Instant::now());
            loop {
                let count = self.rt.block_on(agent_cached_svids(&admin)).unwrap_or(-1);
                if count != last.0 {
                    last = (count, Instant::now());
                }
                if count >= target || (count > 0 && last.1.elapsed() > Duration::from_secs(5)) || start.elapsed() > timeout {
                    if count < target {
                        println!("warning: the agent cached {count} SVIDs, expected {target}");
                    }
                    return start.elapsed().as_secs_f64();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        pub fn run(&self, system: System, n: usize) -> RunResult {
            let mut r = RunResult { system: Some(system), n, ..Default::default() };
            // 1. A fresh agent: both systems start from the same agent state.
            self.spire.borrow_mut().stop_agent();
            let agent_socket = self.spire.borrow().socket_path().to_path_buf();
            let t_agent = now_ns();
            let listen = poll_listening(agent_socket.clone());
            let probe = self.rt.spawn(probe_first_secret(agent_socket.clone()));
            self.spire.borrow_mut().start_agent();
            let agent_pid = self.spire.borrow_mut().agent_pid().expect("agent running");
            r.set("agent_start_socket_ms", listen.join().unwrap().map(|t| ms(t - t_agent)));
            r.set("agent_start_first_secret_ms", self.rt.block_on(probe).unwrap().map(|t| ms(t - t_agent)));
            r.set("agent_warm_s", Some(self.wait_agent_warm(self.workloads.len() + 2, Duration::from_secs(120))));
            let mut pids = vec![("agent".to_owned(), agent_pid)];
            r.set("agent_rss_idle_mib", support::sample(agent_pid).map(|s| s.rss_kib as f64 / 1024.0));

            // 2. svid-bridge, when it is its turn.
            let mut bridge: Option<Proc> = None;
            let socket = match system {
                System::Agent => agent_socket,
                System::Bridge => {
                    let socket = self.sds_socket();
                    let t0 = now_ns();
                    let listen = poll_listening(socket.clone());
                    let probe = self.rt.spawn(probe_first_secret(socket.clone()));
                    let p = self.start_bridge(&socket);
                    let t_listen = listen.join().unwrap();
                    r.set("bridge_start_socket_ms", t_listen.map(|t| ms(t - t0)));
                    // Idle: serving, bundle subscription open, no stream yet.
                    std::thread::sleep(Duration::from_millis(20));
                    r.set("bridge_rss_start_mib", support::sample(p.pid()).map(|s| s.rss_kib as f64 / 1024.0));
                    r.set("bridge_start_first_secret_ms", self.rt.block_on(probe).unwrap().map(|t| ms(t - t0)));
                    // Let the probe's workload subscription linger out (10 s) is too long to
                    // wait for; the idle figure is taken after the probe closed its stream.
                    std::thread::sleep(Duration::from_millis(500));
                    r.set("bridge_rss_idle_mib", support::sample(p.pid()).map(|s| s.rss_kib as f64 / 1024.0));
                    pids.push(("bridge".to_owned(), p.pid()));
                    bridge = Some(p);
                    socket
                }
            };

            let sampler = support::Sampler::start(pids.clone(), Duration::from_millis(200));
            let before = now_ns();
            sampler.mark(&pids);

            // 3. N sidecars, one every `pace`.
            let children: Children = Arc::new(Mutex::new(vec![ChildState::default(); n]));
            let handles = self.spawn_children(n, &socket, &children);
            let t_spawned = now_ns();
            let all_connected = wait_for(Duration::from_secs(120 + n as u64 / 10), || {
                let c = children.lock().unwrap();
                let failed = c.iter().filter(|s| s.error.is_some()).count();
                (c.iter().filter(|s| s.first[1].is_some()).count() + failed == n).then_some(failed)
            });
            let t_connected = now_ns();
            {
                let c = children.lock().unwrap();
                let errors: Vec<_> = c.iter().filter_map(|s| s.error.clone()).collect();
                if !errors.is_empty() {
                    r.notes.push(format!("{} of {n} sidecars failed, e.g. {}", errors.len(), errors[0]));
                }
                if all_connected.is_none() {
                    r.notes.push("not every sidecar got its first secrets in time".into());
                }
                for (k, s) in [(0, "ttfs1"), (1, "ttfs2")] {
                    let v: Vec<f64> = c.iter().filter_map(|x| x.first[k]).map(|(a, b)| ms(b - a)).collect();
                    r.set(&format!("{s}_p50_ms"), support::percentile(&v, 50.0));
                    r.set(&format!("{s}_p99_ms"), support::percentile(&v, 99.0));
                    r.set(&format!("{s}_max_ms"), support::max(&v));
                    r.ttfs[k] = v;
                }
            }
            r.set("spawn_s", Some((t_spawned - before) as f64 / 1e9));
            r.set("connect_all_s", Some((t_connected - before) as f64 / 1e9));
            sampler.mark(&pids);
            r.set("rss_connected_agent_mib", support::sample(agent_pid).map(|s| s.rss_kib as f64 / 1024.0));

            // 4. One SVID rotation wave, wholly after everyone connected.
            let wave = self.wait_svid_wave(&children, n);
            match &wave {
                Some(w) => {
                    r.set("wave_p50_ms", support::percentile(&w.lags, 50.0));
                    r.set("wave_p99_ms", support::percentile(&w.lags, 99.0));
                    r.set("wave_max_ms", support::max(&w.lags));
                    r.set("wave_streams", Some(w.lags.len() as f64));
                    r.set("wave_pushes", Some(w.pushes as f64));
                    r.wave_lags = w.lags.clone();
                }
                None => r.notes.push("no complete SVID rotation wave observed".into()),
            }

            // 5. Steady state: N workloads connected, nothing rotating.
            let steady_from = now_ns().max(wave.as_ref().map_or(0, |w| w.last + 1_000_000_000));
            while now_ns() < steady_from {
                std::thread::sleep(Duration::from_millis(20));
            }
            sampler.mark(&pids);
            std::thread::sleep(Duration::from_secs(4));
            let steady_to = now_ns();
            sampler.mark(&pids);

            // 6. A trust bundle change, pushed to every ROOTCA stream.
            let bundle = self.bundle_change(&children, n);
            std::thread::sleep(Duration::from_millis(600));
            sampler.mark(&pids);

            {
                let c = children.lock().unwrap();
                let per: Vec<usize> = (0..2).map(|k| c.iter().map(|s| s.updates[k].len()).sum()).collect();
                let distinct: Vec<usize> = (0..2)
                    .map(|k| c.iter().map(|s| s.updates[k].iter().map(|u| &u.1).collect::<std::collections::BTreeSet<_>>().len()).sum())
                    .collect();
                r.notes.push(format!("responses received: default {} ({} distinct), ROOTCA {} ({} distinct)", per[0], distinct[0], per[1], distinct[1]));
            }
            // 7. Done: stop everyone.
            stop_children(handles);
            if let Some(mut p) = bridge.take() {
                p.stop();
            }
            let samples = sampler.finish();

            // CPU and memory from the samples.
            let secs = |ns: f64| ns / 1e9;
            let steady_dur = secs((steady_to - steady_from) as f64);
            let mut steady_rate = BTreeMap::new();
            for (name, s) in &samples {
                let rss = support::rss_at(s, steady_to).map(|k| k as f64 / 1024.0);
                r.set(&format!("rss_steady_{name}_mib"), rss);
                let rate = support::cpu_between(s, steady_from, steady_to).map(|c| c / steady_dur);
                if let Some(rate) = rate {
                    steady_rate.insert(name.clone(), rate);
                }
                r.set(&format!("cpu_steady_{name}_ms_per_s"), rate.map(|c| c / 1e6));
                r.set(&format!("rss_before_{name}_mib"), support::rss_at(s, before).map(|k| k as f64 / 1024.0));
                if let Some(w) = &wave {
                    let (from, to) = (w.first - 500_000_000, w.last + 500_000_000);
                    r.set(&format!("cpu_wave_{name}_ms"), support::cpu_between(s, from, to).map(|c| c / 1e6));
                }
                if let Some(b) = &bundle {
                    let (from, to) = (b.t0.min(b.first) - 200_000_000, b.last + 200_000_000);
                    let cpu = support::cpu_between(s, from, to);
                    let idle = steady_rate.get(name).copied().unwrap_or(0.0) * secs((to - from) as f64);
                    r.set(&format!("cpu_bundle_{name}_ms"), cpu.map(|c| c / 1e6));
                    if b.pushes > 0 {
                        r.set(&format!("cpu_per_push_{name}_us"), cpu.map(|c| (c - idle).max(0.0) / b.pushes as f64 / 1e3));
                    }
                }
            }
            r.samples = samples;
            if let Some(b) = &bundle {
                r.set("bundle_p50_ms", support::percentile(&b.lags, 50.0));
                r.set("bundle_p99_ms", support::percentile(&b.lags, 99.0));
                r.set("bundle_max_ms", support::max(&b.lags));
                r.set("bundle_spread_ms", Some(ms(b.last - b.first)));
                r.set("bundle_streams", Some(b.lags.len() as f64));
                r.set("bundle_pushes", Some(b.pushes as f64));
                r.set("bundle_agent_delay_ms", Some(ms(b.t0.saturating_sub(b.t_cmd))));
                r.bundle_lags = b.lags.clone();
            } else {
                r.notes.push("the bundle change did not reach every stream".into());
            }
            let total = |m: &BTreeMap<String, f64>, k: &str| -> Option<f64> {
                let a = m.get(&format!("{k}_agent{}", "_mib")).copied();
                let b = m.get(&format!("{k}_bridge_mib")).copied().unwrap_or(0.0);
                a.map(|a| a + b)
            };
            let steady_total = total(&r.metrics, "rss_steady");
            r.set("rss_steady_total_mib", steady_total);
            let cpu_total = r.metrics.get("cpu_steady_agent_ms_per_s").map(|a| a + r.metrics.get("cpu_steady_bridge_ms_per_s").copied().unwrap_or(0.0));
            r.set("cpu_steady_total_ms_per_s", cpu_total);
            let wave_total = r.metrics.get("cpu_wave_agent_ms").map(|a| a + r.metrics.get("cpu_wave_bridge_ms").copied().unwrap_or(0.0));
            r.set("cpu_wave_total_ms", wave_total);
            let bundle_total = r.metrics.get("cpu_bundle_agent_ms").map(|a| a + r.metrics.get("cpu_bundle_bridge_ms").copied().unwrap_or(0.0));
            r.set("cpu_bundle_total_ms", bundle_total);
            // Memory per stream: the growth from "no sidecar" to "N sidecars, 2 streams each".
            for name in ["agent", "bridge"] {
                let steady = r.metrics.get(&format!("rss_steady_{name}_mib")).copied();
                let base = r.metrics.get(&format!("rss_before_{name}_mib")).copied();
                if let (Some(s), Some(b)) = (steady, base) {
                    r.set(&format!("kib_per_stream_{name}"), Some((s - b) * 1024.0 / (2 * n) as f64));
                }
            }
            r
        }

        fn start_bridge(&self, socket: &Path) -> Proc {
            let mut cmd = std::process::Command::new(&self.bridge_binary);
            cmd.args([
                "run".to_owned(),
                format!("--admin-socket={}", self.spire.borrow().admin_socket_path().display()),
                format!("--agent-socket={}", self.spire.borrow().socket_path().display()),
                format!("--sds-socket={}", socket.display()),
                "--csi-socket=".to_owned(),
                "--metrics-addr=".to_owned(),
                "--health-addr=".to_owned(),
                "--log-level=info".to_owned(),
            ])
            .env_remove("RUST_LOG")
            .env_remove("SPIFFE_ENDPOINT_SOCKET");
            Proc::spawn("svid-bridge", cmd, self.dir.path())
        }

        fn spawn_children(&self, n: usize, socket: &Path, children: &Children) -> Vec<std::process::Child> {
            let _guard = self.rt.enter();
            let mut handles = Vec::with_capacity(n);
            let start = Instant::now();
            for (i, path) in self.workloads.iter().take(n).enumerate() {
                let due = start + self.pace * i as u32;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let mut child = std::process::Command::new(path)
                    .env(CHILD_ENV, socket)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("spawn sidecar {}: {e}", path.display()));
                let stdout = std::os::fd::OwnedFd::from(child.stdout.take().unwrap());
                let stdout = tokio::net::unix::pipe::Receiver::from_owned_fd(stdout).unwrap();
                self.rt.spawn(read_child(i, stdout, children.clone()));
                handles.push(child);
            }
            handles
        }

        /// Waits for a rotation wave that starts after every sidecar connected; returns
        /// each `default` stream's delay behind the first stream to hold its new SVID.
        fn wait_svid_wave(&self, children: &Children, n: usize) -> Option<Wave> {
            let deadline = Instant::now() + Duration::from_secs(u64::from(self.ttl) + 20);
            loop {
                // Arm: remember every stream's current content.
                let armed = now_ns();
                let baseline: Vec<Option<String>> = children.lock().unwrap().iter().map(|c| c.updates[0].last().map(|u| u.1.clone())).collect();
                let changed_at = |c: &[ChildState]| -> Vec<Option<u64>> {
                    c.iter().zip(&baseline).map(|(c, base)| c.updates[0].iter().find(|u| u.0 > armed && Some(&u.1) != base.as_ref()).map(|u| u.0)).collect()
                };
                // A wave already under way when armed would be cut in two: wait for a quiet
                // second first.
                let restarted;
                loop {
                    if Instant::now() > deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    let c = children.lock().unwrap();
                    let at = changed_at(&c);
                    let done = at.iter().filter(|t| t.is_some()).count();
                    let first = at.iter().flatten().min().copied();
                    if let Some(first) = first
                        && first < armed + 1_000_000_000
                        && done < n
                    {
                        restarted = true;
                        break;
                    }
                    let live = c.iter().filter(|s| s.error.is_none()).count();
                    if done >= live && done > 0 {
                        let first = first.unwrap();
                        let last = at.iter().flatten().max().copied().unwrap();
                        let lags = at.iter().flatten().map(|t| ms(t - first)).collect();
                        let pushes = c.iter().map(|s| s.updates.iter().flatten().filter(|u| u.0 >= first && u.0 <= last).count()).sum();
                        return Some(Wave { first, last, lags, pushes });
                    }
                }
                if restarted {
                    // Let the running wave finish: no change for 2 s.
                    let mut quiet_since = Instant::now();
                    let mut seen = 0;
                    while quiet_since.elapsed() < Duration::from_secs(2) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(100));
                        let total: usize = children.lock().unwrap().iter().map(|c| c.updates[0].len()).sum();
                        if total != seen {
                            seen = total;
                            quiet_since = Instant::now();
                        }
                    }
                }
            }
        }

        /// Adds a root to the trust bundle and waits for every ROOTCA stream to hold it.
        fn bundle_change(&self, children: &Children, n: usize) -> Option<BundleChange> {
            let baseline: Vec<Option<String>> = children.lock().unwrap().iter().map(|c| c.updates[1].last().map(|u| u.1.clone())).collect();
            let reference_before = self.reference.lock().unwrap().last().map(|u| u.1.clone());
            let t_cmd = now_ns();
            self.change_bundle();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                std::thread::sleep(Duration::from_millis(50));
                let c = children.lock().unwrap();
                let at: Vec<Option<u64>> =
                    c.iter().zip(&baseline).map(|(c, base)| c.updates[1].iter().find(|u| u.0 > t_cmd && Some(&u.1) != base.as_ref()).map(|u| u.0)).collect();
                let done = at.iter().flatten().count();
                let live = c.iter().filter(|s| s.error.is_none()).count();
                let t0 = self.reference.lock().unwrap().iter().find(|u| u.0 > t_cmd && Some(&u.1) != reference_before.as_ref()).map(|u| u.0);
                if (done >= live && done > 0 && t0.is_some()) || Instant::now() > deadline {
                    let (Some(t0), true) = (t0, done >= live) else { return None };
                    let first = at.iter().flatten().min().copied()?;
                    let last = at.iter().flatten().max().copied()?;
                    let lags = at.iter().flatten().map(|t| (*t as f64 - t0 as f64) / 1e6).collect();
                    let pushes = c.iter().map(|s| s.updates.iter().flatten().filter(|u| u.0 > t_cmd && u.0 <= last + 200_000_000).count()).sum();
                    let _ = n;
                    return Some(BundleChange { t_cmd, t0, first, last, lags, pushes });
                }
            }
        }

        /// `localauthority x509 prepare` adds the next CA's root to the bundle. Only one
        /// authority can be prepared at a time, so activate the previous one first.
        fn change_bundle(&self) {
            let spire = self.spire.borrow();
            let show = spire.server_cli(&["localauthority", "x509", "show"], &["-output", "json"]);
            let v: serde_json::Value = serde_json::from_str(&show).unwrap_or_default();
            if let Some(id) = v["prepared"]["authority_id"].as_str().filter(|s| !s.is_empty()) {
                spire.server_cli(&["localauthority", "x509", "activate"], &["-authorityID", id, "-output", "json"]);
            }
            spire.server_cli(&["localauthority", "x509", "prepare"], &["-output", "json"]);
        }
    }

    pub struct Wave {
        pub first: u64,
        pub last: u64,
        pub lags: Vec<f64>,
        pub pushes: usize,
    }

    pub struct BundleChange {
        pub t_cmd: u64,
        pub t0: u64,
        pub first: u64,
        pub last: u64,
        pub lags: Vec<f64>,
        pub pushes: usize,
    }

    fn entry_json(spiffe_id: &str, parent: &str, binary: &Path, ttl: Option<u32>) -> serde_json::Value {
        let mut e = serde_json::json!({
            "spiffe_id": spiffe_id,
            "parent_id": parent,
            "selectors": [{ "type": "unix", "value": format!("path:{}", binary.display()) }],
        });
        if let Some(ttl) = ttl {
            e["x509_svid_ttl"] = ttl.into();
        }
        e
    }

    /// `target/release/svid-bridge`: the binary cargo built for this benchmark (the bench
    /// profile is the release profile).
    fn release_bridge_binary() -> PathBuf {
        let built = common::bridge_binary();
        assert!(built.exists(), "{} is missing: cargo build --release", built.display());
        built
    }

    /// Polls `socket` until it accepts a connection; the time it first did.
    fn poll_listening(socket: PathBuf) -> std::thread::JoinHandle<Option<u64>> {
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(60) {
                if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                    return Some(now_ns());
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            None
        })
    }

    /// This process as a workload: keeps asking `socket` for `default` until it is answered.
    async fn probe_first_secret(socket: PathBuf) -> Option<u64> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                let attempt = tokio::time::timeout(Duration::from_secs(10), async {
                    let mut s = common::bridge::SdsStream::open(&socket, common::bridge::request(&["default"])).await.ok()?;
                    s.rx.message().await.ok().flatten().map(|_| now_ns())
                });
                if let Ok(Some(t)) = attempt.await {
                    return Some(t);
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        None
    }

    async fn read_child(i: usize, stdout: tokio::net::unix::pipe::Receiver, children: Children) {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut f = line.splitn(4, ' ');
            let (kind, stream) = (f.next().unwrap_or(""), f.next().and_then(|s| s.parse::<usize>().ok()).unwrap_or(0));
            let mut c = children.lock().unwrap();
            let state = &mut c[i];
            match kind {
                "F" => {
                    let a = f.next().and_then(|s| s.parse().ok());
                    let b = f.next().and_then(|s| s.parse().ok());
                    if let (Some(a), Some(b), 1..=2) = (a, b, stream) {
                        state.first[stream - 1] = Some((a, b));
                    }
                }
                "U" => {
                    let t = f.next().and_then(|s| s.parse().ok());
                    if let (Some(t), Some(fp), 1..=2) = (t, f.next(), stream) {
                        state.updates[stream - 1].push((t, fp.to_owned()));
                    }
                }
                "E" => state.error = Some(line[2..].to_owned()),
                _ => {}
            }
        }
        let mut c = children.lock().unwrap();
        c[i].exited = true;
        if c[i].first[1].is_none() && c[i].error.is_none() {
            c[i].error = Some("exited before its second stream was answered".into());
        }
    }

    fn stop_children(handles: Vec<std::process::Child>) {
        let mut handles = handles;
        for h in &mut handles {
            let _ = h.kill();
        }
        for h in &mut handles {
            let _ = h.wait();
        }
    }

    /// Follows this process's own Workload API bundle stream at the agent: when the agent
    /// hands out a new bundle (the reference for fan-out), across agent restarts.
    async fn watch_bundles(agent_socket: PathBuf, out: Arc<Mutex<Vec<(u64, String)>>>) {
        use futures::StreamExt;
        use sha2::Digest;
        let endpoint = format!("unix://{}", agent_socket.display());
        loop {
            if let Ok(client) = spiffe::WorkloadApiClient::connect_to(&endpoint).await
                && let Ok(mut stream) = client.stream_x509_bundles().await
            {
                while let Some(Ok(set)) = stream.next().await {
                    let t = now_ns();
                    let mut h = sha2::Sha256::new();
                    for (_, bundle) in set.iter() {
                        for c in bundle.authorities() {
                            h.update(c.as_bytes());
                        }
                    }
                    let fp: String = h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect();
                    out.lock().unwrap().push((t, fp));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `spire.agent.debug.v1.Debug/GetInfo` on the admin socket: how many X509-SVIDs
    /// the agent holds in its cache.
    async fn agent_cached_svids(admin: &Path) -> Option<i32> {
        #[derive(Clone, PartialEq, prost::Message)]
        struct GetInfoRequest {}
        #[derive(Clone, PartialEq, prost::Message)]
        struct GetInfoResponse {
            #[prost(int32, tag = "3")]
            svids_count: i32,
            #[prost(int64, tag = "4")]
            last_sync_success: i64,
            #[prost(int32, tag = "5")]
            cached_x509_svids_count: i32,
        }
        let channel = svid_bridge::identity::source::unix_channel(admin.to_path_buf());
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.ok()?;
        let codec = tonic_prost::ProstCodec::<GetInfoRequest, GetInfoResponse>::default();
        let path = http::uri::PathAndQuery::from_static("/spire.agent.debug.v1.Debug/GetInfo");
        let info = tokio::time::timeout(Duration::from_secs(5), grpc.unary(tonic::Request::new(GetInfoRequest {}), path, codec)).await.ok()?;
        match info {
            Ok(info) => {
                let info = info.into_inner();
                if std::env::var_os("SB_BENCH_DEBUG").is_some() {
                    println!("agent debug: {info:?}");
                }
                Some(info.cached_x509_svids_count)
            }
            Err(status) => {
                println!("agent debug API: {status:?}");
                None
            }
        }
    }

    /// Polls `f` every 50 ms until `Some` or the timeout.
    pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(v) = f() {
                return Some(v);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

}

// ============================================================================== report ====

mod report {
    use super::orchestrator::{RunResult, System};
    use super::*;

    fn cells(results: &[RunResult]) -> BTreeMap<(System, usize), Cell> {
        let mut cells: BTreeMap<(System, usize), Cell> = BTreeMap::new();
        for r in results {
            let cell = cells.entry((r.system.unwrap(), r.n)).or_default();
            for (k, v) in &r.metrics {
                cell.push(k, Some(*v));
            }
        }
        cells
    }

    struct Table {
        text: String,
    }

    impl Table {
        fn new(header: &[&str]) -> Table {
            let mut text = format!("| {} |\n", header.join(" | "));
            text.push_str(&format!("|{}\n", header.iter().map(|_| "---|").collect::<String>()));
            Table { text }
        }
        fn row(&mut self, cols: &[String]) {
            self.text.push_str(&format!("| {} |\n", cols.join(" | ")));
        }
    }

    /// One row: metric for agent, for bridge, and bridge/agent.
    fn row(t: &mut Table, cells: &BTreeMap<(System, usize), Cell>, n: usize, label: &str, agent_key: &str, bridge_key: &str, digits: usize) {
        let a = cells.get(&(System::Agent, n)).and_then(|c| c.summary(agent_key));
        let b = cells.get(&(System::Bridge, n)).and_then(|c| c.summary(bridge_key));
        t.row(&[n.to_string(), label.to_owned(), support::show(a, digits), support::show(b, digits), support::ratio(a.map(|s| s.median), b.map(|s| s.median))]);
    }

    pub fn write(results: &[RunResult], sizes: &[usize], reps: usize, ttl: u32, pace: Duration, took: Duration) {
        let dir = support::results_dir();
        let cells = cells(results);
        let header = ["N", "metric", "SPIRE agent SDS", "svid-bridge", "bridge / agent"];
        let mut md = String::new();
        md.push_str(&format!(
            "<!-- generated by `cargo bench --bench sds_fanout` ({}); medians of {reps} run(s) per cell, (min–max) over runs -->\n\n",
            support::machine_description()
        ));
        md.push_str(&format!("Runs: N = {sizes:?}, {reps} per system and N, alternated; X.509-SVID TTL {ttl} s; one sidecar started every {} ms; whole benchmark {:.0} s.\n\n", pace.as_secs_f64() * 1e3, took.as_secs_f64()));

        md.push_str("### Time to first secret (ms)\n\n");
        let mut t = Table::new(&header);
        for &n in sizes {
            row(&mut t, &cells, n, "1st stream (`default`): connect → response, p50", "ttfs1_p50_ms", "ttfs1_p50_ms", 2);
            row(&mut t, &cells, n, "1st stream p99", "ttfs1_p99_ms", "ttfs1_p99_ms", 2);
            row(&mut t, &cells, n, "2nd stream (`ROOTCA`): open → response, p50", "ttfs2_p50_ms", "ttfs2_p50_ms", 3);
            row(&mut t, &cells, n, "2nd stream p99", "ttfs2_p99_ms", "ttfs2_p99_ms", 3);
        }
        md.push_str(&t.text);

        md.push_str("\n### Rotation fan-out (ms)\n\n");
        let mut t = Table::new(&header);
        for &n in sizes {
            row(&mut t, &cells, n, "bundle change → each `ROOTCA` stream, p50", "bundle_p50_ms", "bundle_p50_ms", 1);
            row(&mut t, &cells, n, "bundle change, p99", "bundle_p99_ms", "bundle_p99_ms", 1);
            row(&mut t, &cells, n, "bundle change, last stream (max)", "bundle_max_ms", "bundle_max_ms", 1);
            row(&mut t, &cells, n, "SVID wave: first → each `default` stream, p50", "wave_p50_ms", "wave_p50_ms", 0);
            row(&mut t, &cells, n, "SVID wave, p99", "wave_p99_ms", "wave_p99_ms", 0);
            row(&mut t, &cells, n, "SVID wave, last stream (max)", "wave_max_ms", "wave_max_ms", 0);
            row(&mut t, &cells, n, "responses pushed for the bundle change", "bundle_pushes", "bundle_pushes", 0);
        }
        md.push_str(&t.text);

        md.push_str("\n### Node cost: SPIRE agent alone vs. SPIRE agent + svid-bridge\n\n");
        let header2 = ["N", "metric", "agent alone", "agent + svid-bridge", "ratio"];
        let mut t = Table::new(&header2);
        for &n in sizes {
            row(&mut t, &cells, n, "RSS at steady state (MiB)", "rss_steady_total_mib", "rss_steady_total_mib", 1);
            row(&mut t, &cells, n, "… of which svid-bridge (MiB)", "rss_steady_bridge_mib", "rss_steady_bridge_mib", 1);
            row(&mut t, &cells, n, "CPU at steady state (ms/s)", "cpu_steady_total_ms_per_s", "cpu_steady_total_ms_per_s", 2);
            row(&mut t, &cells, n, "CPU over one SVID rotation wave (ms)", "cpu_wave_total_ms", "cpu_wave_total_ms", 0);
            row(&mut t, &cells, n, "… of which svid-bridge (ms)", "cpu_wave_bridge_ms", "cpu_wave_bridge_ms", 0);
            row(&mut t, &cells, n, "CPU over one bundle change (ms)", "cpu_bundle_total_ms", "cpu_bundle_total_ms", 0);
            row(&mut t, &cells, n, "server CPU per pushed response (µs)", "cpu_per_push_agent_us", "cpu_per_push_bridge_us", 1);
            row(&mut t, &cells, n, "server memory per stream (KiB, RSS growth / 2N)", "kib_per_stream_agent", "kib_per_stream_bridge", 1);
        }
        md.push_str(&t.text);

        md.push_str("\n### Start-up\n\n");
        let mut t = Table::new(&header);
        let all: Vec<usize> = sizes.to_vec();
        let pool = |system: System, key: &str| -> Option<Summary> {
            let v: Vec<f64> = all.iter().filter_map(|n| cells.get(&(system, *n))).flat_map(|c| c.values.get(key).cloned().unwrap_or_default()).collect();
            Summary::of(&v)
        };
        for (label, ak, bk, d) in [
            ("process start → SDS socket accepts (ms)", "agent_start_socket_ms", "bridge_start_socket_ms", 1),
            ("process start → first secret served (ms)", "agent_start_first_secret_ms", "bridge_start_first_secret_ms", 1),
            ("idle RSS (MiB)", "agent_rss_idle_mib", "bridge_rss_idle_mib", 1),
        ] {
            let a = pool(System::Agent, ak);
            let b = pool(System::Bridge, bk);
            t.row(&["all".into(), label.into(), support::show(a, d), support::show(b, d), support::ratio(a.map(|s| s.median), b.map(|s| s.median))]);
        }
        md.push_str(&t.text);
        md.push_str("\nThe agent's idle RSS holds the SVIDs of every entry on the node; svid-bridge's holds nothing yet.\n");

        let notes: Vec<String> = results.iter().flat_map(|r| r.notes.iter().map(move |n| format!("- {} N={}: {n}", r.system.unwrap().label(), r.n))).collect();
        if !notes.is_empty() {
            md.push_str("\nNotes from the runs:\n\n");
            md.push_str(&notes.join("\n"));
            md.push('\n');
        }
        support::write_result(&dir, "sds.md", &md);
        println!("\n{md}");

        // Raw numbers, one JSON object per run.
        let raw: Vec<serde_json::Value> = results
            .iter()
            .map(|r| serde_json::json!({ "system": r.system.unwrap().label(), "n": r.n, "metrics": r.metrics, "notes": r.notes }))
            .collect();
        support::write_result(&dir, "sds-runs.json", &serde_json::to_string_pretty(&raw).unwrap());
        plots(&dir, results, &cells, sizes);
    }

    fn bar(cells: &BTreeMap<(System, usize), Cell>, s: System, n: usize, k: &str) -> Option<Bar> {
        cells.get(&(s, n)).and_then(|c| c.summary(k)).map(Bar::from)
    }

    fn plots(dir: &Path, results: &[RunResult], cells: &BTreeMap<(System, usize), Cell>, sizes: &[usize]) {
        let groups: Vec<String> = sizes.iter().map(|n| format!("N = {n}")).collect();
        let series = |key: &str, pct: &str| -> Vec<Series> {
            vec![
                Series { name: format!("SPIRE agent {pct}"), color: if pct == "p50" { AGENT_LIGHT } else { AGENT }, values: sizes.iter().map(|&n| bar(cells, System::Agent, n, key)).collect() },
                Series { name: format!("svid-bridge {pct}"), color: if pct == "p50" { BRIDGE_LIGHT } else { BRIDGE }, values: sizes.iter().map(|&n| bar(cells, System::Bridge, n, key)).collect() },
            ]
        };
        let ttfs = |stream: &str, title: &str, refs: Vec<(f64, String)>| BarPanel {
            title: title.into(),
            y_label: "ms (log)".into(),
            log_y: true,
            groups: groups.clone(),
            series: [series(&format!("{stream}_p50_ms"), "p50"), series(&format!("{stream}_p99_ms"), "p99")].into_iter().flatten().collect(),
            refs,
        };
        let mut p1 = ttfs("ttfs1", "1st stream: connect → first secret", vec![]);
        let mut p2 = ttfs("ttfs2", "2nd stream on the connection", vec![(1.0, "goal: p99 ≤ 1 ms".into())]);
        for p in [&mut p1, &mut p2] {
            // agent p50, agent p99, bridge p50, bridge p99
            p.series.swap(1, 2);
        }
        let _ = plot::bars(&dir.join("sds_ttfs.png"), "Time to first secret (median of runs; whiskers: min–max)", &[p1, p2], (1500, 560)).map_err(|e| println!("plot sds_ttfs: {e}"));

        let two = |key_a: &str, key_b: &str, label_b: &str| -> Vec<Series> {
            vec![
                Series { name: "SPIRE agent alone".into(), color: AGENT, values: sizes.iter().map(|&n| bar(cells, System::Agent, n, key_a)).collect() },
                Series { name: label_b.into(), color: BRIDGE, values: sizes.iter().map(|&n| bar(cells, System::Bridge, n, key_b)).collect() },
            ]
        };
        let rss = BarPanel {
            title: "RSS at steady state".into(),
            y_label: "MiB".into(),
            log_y: false,
            groups: groups.clone(),
            series: {
                let mut s = two("rss_steady_total_mib", "rss_steady_total_mib", "agent + svid-bridge");
                s.push(Series { name: "… svid-bridge part".into(), color: BRIDGE_LIGHT, values: sizes.iter().map(|&n| bar(cells, System::Bridge, n, "rss_steady_bridge_mib")).collect() });
                s
            },
            refs: vec![],
        };
        let wave = BarPanel {
            title: "CPU over one SVID rotation wave".into(),
            y_label: "CPU ms".into(),
            log_y: false,
            groups: groups.clone(),
            series: {
                let mut s = two("cpu_wave_total_ms", "cpu_wave_total_ms", "agent + svid-bridge");
                s.push(Series { name: "… svid-bridge part".into(), color: BRIDGE_LIGHT, values: sizes.iter().map(|&n| bar(cells, System::Bridge, n, "cpu_wave_bridge_ms")).collect() });
                s
            },
            refs: vec![],
        };
        let bundle = BarPanel {
            title: "CPU over one bundle change".into(),
            y_label: "CPU ms".into(),
            log_y: false,
            groups: groups.clone(),
            series: {
                let mut s = two("cpu_bundle_total_ms", "cpu_bundle_total_ms", "agent + svid-bridge");
                s.push(Series { name: "… svid-bridge part".into(), color: BRIDGE_LIGHT, values: sizes.iter().map(|&n| bar(cells, System::Bridge, n, "cpu_bundle_bridge_ms")).collect() });
                s
            },
            refs: vec![],
        };
        let _ = plot::bars(&dir.join("sds_node_cost.png"), "Node cost: SPIRE agent alone vs. agent + svid-bridge", &[rss, wave, bundle], (1800, 560)).map_err(|e| println!("plot sds_node_cost: {e}"));

        // Fan-out CDFs for the largest N, every run of each system pooled.
        let n = sizes.iter().copied().max().unwrap_or(0);
        let pooled = |s: System, f: fn(&RunResult) -> &Vec<f64>| -> Vec<f64> { results.iter().filter(|r| r.system == Some(s) && r.n == n).flat_map(|r| f(r).iter().copied()).collect() };
        let panels = [
            CdfPanel {
                title: format!("Bundle change: agent delivery → ROOTCA stream (N = {n})"),
                x_label: "ms after the agent's Workload API delivered it".into(),
                log_x: false,
                series: vec![("SPIRE agent SDS".into(), AGENT, pooled(System::Agent, |r| &r.bundle_lags)), ("svid-bridge".into(), BRIDGE, pooled(System::Bridge, |r| &r.bundle_lags))],
            },
            CdfPanel {
                title: format!("SVID rotation wave: first → each default stream (N = {n})"),
                x_label: "ms after the first stream of the wave".into(),
                log_x: false,
                series: vec![("SPIRE agent SDS".into(), AGENT, pooled(System::Agent, |r| &r.wave_lags)), ("svid-bridge".into(), BRIDGE, pooled(System::Bridge, |r| &r.wave_lags))],
            },
        ];
        let _ = plot::cdfs(&dir.join("sds_fanout.png"), "Rotation fan-out (all runs pooled)", &panels, (1600, 560)).map_err(|e| println!("plot sds_fanout: {e}"));
    }
}
