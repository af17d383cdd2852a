//! No identity leaks between workloads.
//!
//! - Against real peers: two workload processes with different binaries (so different
//!   `unix:path` selectors and SPIFFE IDs). The hostile one asks for the other's SPIFFE ID,
//!   for a federated bundle its entries do not federate with, for `default` while claiming
//!   the other's PID in its node, and for everything (wildcard, `ALL`): it gets its own
//!   identity or nothing.
//! - In process, with a fake `/proc` and a fake identity source (the agent): PID reuse.
//!   An identity subscribed for a PID is never served to a later process on that PID.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::testing as common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::bridge::{Bridge, request, secrets_of, spire_options_for_bridge};
use common::load::{
    ChildEvent, ChildSpec, LogDir, cert_parts, child_binary, child_events, describe, responses,
    spawn_child,
};
use common::{EntrySpec, Spire, SpireOptions, wait_until_with};
use futures::StreamExt;
use futures::future::BoxFuture;
use svid_bridge::identity::source::{BundleStream, SvidStream};
use svid_bridge::identity::types::PrivateKey;
use svid_bridge::identity::{
    BundleSet, Cache, CacheOptions, IdentityError, ProcRoot, ProcessKey, Source, Svid, SvidState,
    Workload, WorkloadSvids,
};
use svid_bridge::sds::{CallerIdentity, SdsServer, StreamSettings};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The workload child (see `common::load`); returns at once in a normal run.
#[test]
fn sds_child() {
    common::load::child_main();
}

const WAIT: Duration = Duration::from_secs(60);

fn fetch_result(child: &common::Proc) -> Option<Result<BTreeMap<String, String>, (i32, String)>> {
    child_events(child).into_iter().find_map(|e| match e {
        ChildEvent::Fetch(r) => Some(r),
        _ => None,
    })
}

/// Alice (federates with other.org) and Mallory (does not) are registered workloads, each
/// its own binary. Mallory tries every way to get something of Alice's.
#[test]
fn a_workload_gets_nothing_of_another_workloads() {
    let spire = Spire::start(spire_options_for_bridge("example.org"));
    let other = Spire::start(SpireOptions {
        start_agent: false,
        ..SpireOptions::trust_domain("other.org")
    });
    spire.federate_with(&other);
    let (alice_bin, mallory_bin) = (child_binary("alice"), child_binary("mallory"));
    let (alice_id, mallory_id) = (spire.id("alice"), spire.id("mallory"));
    spire.create_entry(&EntrySpec {
        federates_with: vec!["other.org".into()],
        ..EntrySpec::for_path(&alice_id, &alice_bin)
    });
    spire.create_entry(&EntrySpec::for_path(&mallory_id, &mallory_bin));
    let bridge = Bridge::start(&spire);
    let socket = bridge.sds_socket();
    let logs = LogDir::new("isolation");

    // Mallory's hostile stream opens first, for names that are Alice's: it must stay silent
    // (they might resolve later, so the bridge keeps the stream waiting).
    let hostile_names = [alice_id.as_str(), "spiffe://other.org"];
    let hostile = spawn_child(
        "mallory-stream",
        &mallory_bin,
        &ChildSpec::stream(&socket, &hostile_names),
        logs.path(),
    );
    // Alice gets exactly those names.
    let alice = spawn_child(
        "alice",
        &alice_bin,
        &ChildSpec::stream(
            &socket,
            &[alice_id.as_str(), "spiffe://other.org", "default"],
        ),
        logs.path(),
    );
    let alice_secrets = wait_until_with(
        WAIT,
        "Alice is served her SVID and the federated bundle",
        &[&bridge, &spire],
        || {
            responses(&alice)
                .into_iter()
                .map(|(_, s)| s)
                .find(|s| s.len() == 3)
        },
    );
    let alice_cert = cert_parts(&alice_secrets[&alice_id]).unwrap();
    assert_eq!(alice_cert.0, alice_id);
    assert_eq!(alice_secrets["spiffe://other.org"], "ca@other.org");
    let alice_pid = alice.pid();

    // Unary probes from fresh Mallory processes (FetchSecrets waits ≤ 5 s, then says what is
    // still missing: a deterministic "nothing").
    let probes: Vec<(&str, ChildSpec)> = vec![
        ("alice-id", ChildSpec::fetch(&socket, &[alice_id.as_str()])),
        (
            "other-td",
            ChildSpec::fetch(&socket, &["spiffe://other.org"]),
        ),
        (
            "claims-alice-pid",
            ChildSpec {
                claim_pid: Some(alice_pid),
                ..ChildSpec::fetch(&socket, &["default"])
            },
        ),
        ("all", ChildSpec::fetch(&socket, &["ALL"])),
        ("wildcard", ChildSpec::fetch(&socket, &[])),
    ];
    let probes: Vec<(&str, common::Proc)> = probes
        .into_iter()
        .map(|(what, spec)| {
            (
                what,
                spawn_child(&format!("mallory-{what}"), &mallory_bin, &spec, logs.path()),
            )
        })
        .collect();
    let results: BTreeMap<&str, _> = probes
        .iter()
        .map(|(what, child)| {
            let r = wait_until_with(
                WAIT,
                &format!("Mallory's {what} fetch answers"),
                &[&bridge],
                || fetch_result(child),
            );
            (*what, r)
        })
        .collect();
    for what in ["alice-id", "other-td"] {
        let (code, message) = results[what].clone().expect_err(what);
        assert_eq!(code, tonic::Code::Unavailable as i32, "{what}: {message}");
        assert!(message.contains("still waiting for"), "{what}: {message}");
    }
    assert!(
        results["alice-id"]
            .as_ref()
            .unwrap_err()
            .1
            .contains("no SVID with this SPIFFE ID")
    );
    assert!(
        results["other-td"]
            .as_ref()
            .unwrap_err()
            .1
            .contains("do not federate")
    );
    let claimed = results["claims-alice-pid"]
        .clone()
        .expect("Mallory's own default");
    assert_eq!(
        cert_parts(&claimed["default"]).unwrap().0,
        mallory_id,
        "a PID claimed in the node is ignored: SO_PEERCRED decides"
    );
    let all = results["all"].clone().expect("ALL");
    assert_eq!(
        all["ALL"], "ca@example.org",
        "ALL holds only what Mallory may see"
    );
    let wildcard = results["wildcard"].clone().expect("wildcard");
    let names: Vec<&str> = wildcard.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["spiffe://example.org", mallory_id.as_str()],
        "wildcard: Mallory's own things only"
    );

    // The hostile stream, open since before Alice was answered and for longer than the
    // fetch timeout since: not one response.
    assert_eq!(
        responses(&hostile),
        vec![],
        "Mallory's stream for Alice's names stays silent"
    );
    assert!(
        child_events(&hostile).is_empty(),
        "and open: {:?}",
        child_events(&hostile)
    );
    let everything: String = probes
        .iter()
        .map(|(_, c)| std::fs::read_to_string(c.log_paths().0).unwrap())
        .collect::<String>()
        + &std::fs::read_to_string(hostile.log_paths().0).unwrap();
    assert!(
        !everything.contains(&alice_cert.1),
        "Alice's certificate serial reached Mallory"
    );
    assert!(
        !everything.contains(&format!("cert@{alice_id}")),
        "Alice's certificate reached Mallory"
    );
}

// ------------------------------------------------------------------ PID reuse (fake) ----

/// A fake `/proc`: `<dir>/<pid>/stat` with a chosen start time.
struct FakeProc {
    dir: tempfile::TempDir,
}

impl FakeProc {
    fn new() -> FakeProc {
        FakeProc {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn root(&self) -> ProcRoot {
        ProcRoot::new(self.dir.path())
    }

    /// Process `pid` now is the one started at `start_time` (`None`: no process).
    fn set(&self, pid: u32, start_time: Option<u64>) {
        let dir = self.dir.path().join(pid.to_string());
        match start_time {
            Some(start) => {
                std::fs::create_dir_all(&dir).unwrap();
                let stat = format!(
                    "{pid} (envoy) S 1 {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0"
                );
                std::fs::write(dir.join("stat.tmp"), stat).unwrap();
                std::fs::rename(dir.join("stat.tmp"), dir.join("stat")).unwrap();
            }
            None => {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// A self-signed certificate with the URI SAN `id`, and its PKCS#8 key.
fn svid(id: &str) -> Svid {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.to_owned().try_into().unwrap())];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Svid {
        spiffe_id: id.to_owned(),
        trust_domain: "example.org".to_owned(),
        chain: vec![cert.der().to_vec()],
        key: PrivateKey::from_pkcs8_der(key.serialize_der()),
        expires_at: i64::MAX / 2,
        hint: String::new(),
    }
}

/// A fake SPIRE agent for the Delegated Identity API, as DI-4 describes the real one: a
/// subscription by PID is answered, now and at every `tick`, with the SVIDs of whatever
/// process holds the PID at that moment (it does no liveness or reuse check).
struct FakeAgent {
    proc: ProcRoot,
    identities: Mutex<HashMap<u64, WorkloadSvids>>,
    tick: watch::Sender<u64>,
    subscriptions: Mutex<Vec<ProcessKey>>,
}

impl FakeAgent {
    fn new(proc: ProcRoot) -> Arc<FakeAgent> {
        Arc::new(FakeAgent {
            proc,
            identities: Mutex::new(HashMap::new()),
            tick: watch::channel(0).0,
            subscriptions: Mutex::new(Vec::new()),
        })
    }

    /// The process started at `start_time` is the workload `id`.
    fn register(&self, start_time: u64, id: &str) {
        let svids = WorkloadSvids {
            svids: vec![svid(id)],
            federates_with: vec![],
        };
        self.identities.lock().unwrap().insert(start_time, svids);
    }

    /// The agent sends an update on every subscription (a rotation, say).
    fn push(&self) {
        self.tick.send_modify(|t| *t += 1);
    }

    fn attest(&self, pid: i32) -> WorkloadSvids {
        let Some(now) = self.proc.process(pid) else {
            return WorkloadSvids::default();
        };
        self.identities
            .lock()
            .unwrap()
            .get(&now.start_time)
            .cloned()
            .unwrap_or_default()
    }
}

/// The fake agent as the cache's `Source`.
struct Agent(Arc<FakeAgent>);

impl Source for Agent {
    fn subscribe_svids(
        &self,
        workload: Workload,
    ) -> BoxFuture<'static, Result<SvidStream, IdentityError>> {
        let agent = Arc::clone(&self.0);
        Box::pin(async move {
            let Workload::Process(key) = workload else {
                return Err(IdentityError::NotAProcess);
            };
            agent.subscriptions.lock().unwrap().push(key);
            let ticks = tokio_stream::wrappers::WatchStream::new(agent.tick.subscribe());
            let stream = ticks.map(move |_| Ok(agent.attest(key.pid)));
            Ok(stream.boxed())
        })
    }

    fn subscribe_bundles(&self) -> BoxFuture<'static, Result<BundleStream, IdentityError>> {
        Box::pin(async move {
            let ca = svid("spiffe://example.org").chain.remove(0);
            let set = BundleSet {
                bundles: [("example.org".to_owned(), vec![ca])].into(),
            };
            Ok(futures::stream::once(async move { Ok(set) })
                .chain(futures::stream::pending())
                .boxed())
        })
    }

    fn api(&self) -> &'static str {
        "delegated"
    }
}

fn options(proc: &FakeProc) -> CacheOptions {
    CacheOptions {
        proc_root: proc.root(),
        linger: Duration::from_millis(200),
        ..CacheOptions::default()
    }
}

async fn state_after_change(rx: &mut watch::Receiver<SvidState>) -> SvidState {
    tokio::time::timeout(WAIT, rx.changed())
        .await
        .expect("a state change")
        .expect("cache alive");
    rx.borrow_and_update().clone()
}

/// The first state that is not `Pending`.
async fn settled(rx: &mut watch::Receiver<SvidState>) -> SvidState {
    let state = rx.borrow_and_update().clone();
    if state != SvidState::Pending {
        return state;
    }
    state_after_change(rx).await
}

fn ids(state: &SvidState) -> Vec<String> {
    match state {
        SvidState::Ready(svids) => svids.svids.iter().map(|s| s.spiffe_id.clone()).collect(),
        other => vec![format!("{other:?}")],
    }
}

/// Cache level: Alice's process (PID 4242, started at 1000) is subscribed; it exits and
/// Mallory's process gets PID 4242 (started at 2000); the agent, attesting by PID, now
/// sends Mallory's SVIDs on Alice's subscription. Alice's subscribers must see `Gone`,
/// never Mallory's SVIDs; a subscription for the new process is a different one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid_reuse_never_serves_the_new_process_on_the_old_subscription() {
    let proc = FakeProc::new();
    let agent = FakeAgent::new(proc.root());
    agent.register(1000, "spiffe://example.org/alice");
    agent.register(2000, "spiffe://example.org/mallory");
    proc.set(4242, Some(1000));
    let shutdown = CancellationToken::new();
    let cache = Cache::new(
        Arc::new(Agent(Arc::clone(&agent))),
        options(&proc),
        shutdown.clone(),
    );
    let alice_key = ProcessKey {
        pid: 4242,
        start_time: 1000,
    };
    let mut alice = cache.subscribe(Workload::Process(alice_key)).unwrap();
    let first = settled(alice.svids()).await;
    assert_eq!(ids(&first), ["spiffe://example.org/alice"]);

    // PID reuse, then the agent's next update (by PID: Mallory's SVIDs).
    proc.set(4242, Some(2000));
    agent.push();
    let after = state_after_change(alice.svids()).await;
    assert_eq!(
        after,
        SvidState::Gone,
        "Alice's subscription ends; Mallory's SVIDs are never published on it"
    );
    assert!(matches!(&*alice.svids().borrow(), SvidState::Gone));

    // Mallory's own process gets its own subscription and its own identity.
    let mut mallory = cache
        .subscribe(Workload::Process(ProcessKey {
            pid: 4242,
            start_time: 2000,
        }))
        .unwrap();
    let state = settled(mallory.svids()).await;
    assert_eq!(ids(&state), ["spiffe://example.org/mallory"]);
    // And a late subscriber on Alice's old key learns nothing either.
    let mut late = cache.subscribe(Workload::Process(alice_key)).unwrap();
    let seen = late.svids().borrow().clone();
    assert!(
        matches!(seen, SvidState::Gone | SvidState::Pending),
        "{seen:?}"
    );
    shutdown.cancel();
}

/// The same while the process is gone (no `/proc/<pid>` at all): nothing served, and the
/// subscription ends without waiting for an update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exited_process_gets_nothing() {
    let proc = FakeProc::new();
    let agent = FakeAgent::new(proc.root());
    agent.register(1000, "spiffe://example.org/alice");
    let shutdown = CancellationToken::new();
    let cache = Cache::new(
        Arc::new(Agent(Arc::clone(&agent))),
        options(&proc),
        shutdown.clone(),
    );
    // The process exited before its subscription started.
    let mut sub = cache
        .subscribe(Workload::Process(ProcessKey {
            pid: 5151,
            start_time: 1000,
        }))
        .unwrap();
    let state = settled(sub.svids()).await;
    assert_eq!(state, SvidState::Gone);
    assert!(
        agent.subscriptions.lock().unwrap().is_empty(),
        "no upstream subscription for a dead process"
    );
    shutdown.cancel();
}

fn default_limits() -> svid_bridge::config::SdsLimits {
    svid_bridge::config::SdsLimits {
        max_names_per_request: 100,
        max_name_bytes: 4096,
        max_request_bytes: 1024 * 1024,
        max_streams_per_connection: 100_000,
        max_streams_per_process: 1000,
        max_connections: 10_000,
    }
}

/// An in-process SDS server (the real server and Unix listener) on a fake `/proc`.
struct InProcess {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    shutdown: CancellationToken,
}

async fn serve_in_process(proc: &FakeProc, agent: &Arc<FakeAgent>) -> InProcess {
    let dir = tempfile::Builder::new()
        .prefix("sbs-")
        .tempdir_in("/tmp")
        .unwrap();
    let socket = dir.path().join("socket");
    let shutdown = CancellationToken::new();
    let cache = Cache::new(
        Arc::new(Agent(Arc::clone(agent))),
        options(proc),
        shutdown.clone(),
    );
    // The production server: its accept loop pins each connection's process.
    let server = SdsServer::new(
        socket.clone(),
        cache,
        StreamSettings::default(),
        CallerIdentity::Process,
        proc.root(),
        shutdown.clone(),
        default_limits(),
    );
    let (serving, mut is_serving) = tokio::sync::watch::channel(false);
    tokio::spawn(server.serve(serving, shutdown.clone()));
    is_serving.wait_for(|up| *up).await.unwrap();
    InProcess {
        _dir: dir,
        socket,
        shutdown,
    }
}

fn leaf_id(response: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse) -> String {
    cert_parts(&describe(&secrets_of(response)[0])).unwrap().0
}

/// Service level, per connection (A-2 in docs/behaviours.md: the PID belongs to the
/// connection, its start time is recorded at accept). A connection opened by Alice's process
/// (this test process, as seen in the fake /proc: start time 1000). Alice's process "exits"
/// while a descendant keeps the connection, and Mallory's process gets the PID (start time
/// 2000). A new RPC on the old connection must not be answered with Mallory's identity: the
/// process that opened the connection is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid_reuse_is_not_served_on_a_connection_opened_by_the_old_process() {
    let proc = FakeProc::new();
    let agent = FakeAgent::new(proc.root());
    agent.register(1000, "spiffe://example.org/alice");
    agent.register(2000, "spiffe://example.org/mallory");
    let me = std::process::id();
    proc.set(me, Some(1000));
    let server = serve_in_process(&proc, &agent).await;

    // One HTTP/2 connection, several RPCs on it.
    let channel = svid_bridge::identity::source::unix_channel(server.socket.clone());
    let mut client = envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient::new(channel);
    let alice = client
        .fetch_secrets(request(&["default"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(leaf_id(&alice), "spiffe://example.org/alice");
    let mut stream = {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(request(&["default"])).await.unwrap();
        let rx = client
            .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, rx)
    };
    let first = stream.1.message().await.unwrap().unwrap();
    assert_eq!(leaf_id(&first), "spiffe://example.org/alice");

    // PID reuse underneath the open connection.
    proc.set(me, Some(2000));
    agent.push();
    // The open stream ends (its process is gone) and never carries Mallory's SVID.
    let ended = tokio::time::timeout(WAIT, stream.1.message())
        .await
        .expect("the stream reacts");
    match ended {
        Ok(Some(response)) => panic!(
            "Alice's stream got another response after PID reuse: {}",
            leaf_id(&response)
        ),
        Ok(None) => {}
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
    }
    // A new RPC on the connection Alice's process opened.
    let result = client.fetch_secrets(request(&["default"])).await;
    match result {
        Ok(response) => {
            let id = leaf_id(response.get_ref());
            assert_ne!(
                id, "spiffe://example.org/mallory",
                "Mallory's identity was served on a connection opened by Alice's process"
            );
        }
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
    }
    // A connection Mallory's process opens itself is Mallory's (here: a new connection from
    // this process, which the fake /proc now shows as Mallory).
    let fresh = common::bridge::sds_client(&server.socket)
        .fetch_secrets(request(&["default"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(leaf_id(&fresh), "spiffe://example.org/mallory");
    server.shutdown.cancel();
}
