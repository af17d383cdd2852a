//! One upstream subscription per workload, shared by all of its SDS streams.
//!
//! Envoy opens one SDS stream per secret name (E6, E7), so an Istio sidecar holds at least
//! two; SPIRE attests and subscribes once per stream (H-4). Here every stream of a workload reads the same `watch` channel, fed by one
//! supervisor task (`identity::supervisor`) that reconnects with capped, jittered backoff,
//! keeps the last good SVIDs while the agent is away (until they expire), and publishes
//! only real changes. The channel's receivers are the workload's streams: when the last
//! one is dropped, the subscription lingers, then ends.

use std::collections::HashMap;
use std::collections::hash_map;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::IdentityError;
use super::metrics::{UpstreamMetrics, register_earliest_expiry};
use super::process::{PinnedProcess, ProcRoot};
use super::source::{Source, Workload};
use super::supervisor::{
    self, Backoff, ExponentialBackoff, SupervisorMetrics, Upstream, UpstreamStream,
};
use super::types::{BundleSet, SharedBundles, SharedSvids, WorkloadSvids};
use crate::clock::{SharedClock, SystemClock};
use crate::telemetry::health::Ready;
use crate::telemetry::metrics::Metrics;

/// How long a workload's subscription outlives its last stream by default.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(10);
/// Streams one workload may hold at once by default (`--max-streams-per-process`).
pub const DEFAULT_MAX_STREAMS_PER_WORKLOAD: usize = 1000;

/// What a workload's streams see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SvidState {
    /// No answer from the agent yet.
    Pending,
    /// The agent's latest answer (possibly no SVIDs at all: not registered yet).
    Ready(SharedSvids),
    /// The process behind this key exited or its PID now belongs to another process:
    /// nothing may be served for it any more.
    Gone,
}

#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// How long a workload's subscription outlives its last stream (Envoy reconnects,
    /// listener churn).
    pub linger: Duration,
    pub backoff: Arc<dyn Backoff>,
    pub proc_root: ProcRoot,
    /// The registry the cache adds its metrics to.
    pub metrics: Arc<Metrics>,
    /// Streams one workload may hold at once (`--max-streams-per-process`).
    pub max_streams_per_workload: usize,
    /// What expiry is judged against.
    pub clock: SharedClock,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            linger: DEFAULT_LINGER,
            backoff: Arc::new(ExponentialBackoff::default()),
            proc_root: ProcRoot::default(),
            metrics: Arc::new(Metrics::new()),
            max_streams_per_workload: DEFAULT_MAX_STREAMS_PER_WORKLOAD,
            clock: Arc::new(SystemClock),
        }
    }
}

/// A workload already holds as many streams as it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "{open} SDS streams are already open for this workload; the limit is {limit} (--max-streams-per-process)"
)]
pub struct TooManyStreams {
    pub open: usize,
    pub limit: usize,
}

/// What health checks need to know about the identities the bridge holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheHealth {
    /// The node-wide bundle subscription currently delivers.
    pub agent_reachable: bool,
    /// Earliest leaf expiry among the SVIDs currently served, Unix seconds.
    pub earliest_expiry: Option<i64>,
}

impl CacheHealth {
    /// Serving is healthy while the agent answers, or while what it gave us last is valid.
    pub fn serving_valid_identities(&self, unix_now: i64) -> bool {
        self.agent_reachable || self.earliest_expiry.is_some_and(|at| at > unix_now)
    }
}

pub struct Cache {
    source: Arc<dyn Source>,
    options: CacheOptions,
    upstream: UpstreamMetrics,
    svid_metrics: SupervisorMetrics,
    workloads: Mutex<HashMap<Workload, Entry>>,
    bundles: watch::Receiver<Option<SharedBundles>>,
    agent_reachable: Arc<AtomicBool>,
    shutdown: CancellationToken,
}

struct Entry {
    /// Its receivers are the workload's streams.
    state: watch::Sender<SvidState>,
    /// Bumped on each subscribe, so the linger can tell whether a stream came and went.
    generation: u64,
}

/// A stream's hold on its workload's SVIDs; dropping it releases the subscription.
pub struct Subscription {
    workload: Workload,
    svids: watch::Receiver<SvidState>,
}

impl Subscription {
    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    pub fn svids(&mut self) -> &mut watch::Receiver<SvidState> {
        &mut self.svids
    }
}

impl Cache {
    /// Starts the bundle subscription at once: bundles are node-wide, needed by every
    /// stream. Registers the upstream metrics into `options.metrics`.
    pub fn new(
        source: Arc<dyn Source>,
        options: CacheOptions,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let upstream = UpstreamMetrics::register(&options.metrics);
        let (bundles_tx, bundles) = watch::channel(None);
        let agent_reachable = Arc::new(AtomicBool::new(false));
        let follow_bundles = Bundles {
            source: Arc::clone(&source),
            agent_reachable: Arc::clone(&agent_reachable),
        };
        let bundle_metrics = upstream.of(source.api(), "bundles");
        let backoff = Arc::clone(&options.backoff);
        let api = source.api();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            supervisor::supervise(
                follow_bundles,
                &bundles_tx,
                &*backoff,
                &bundle_metrics,
                api,
                &stop,
            )
            .await;
        });
        let svid_metrics = upstream.of(source.api(), "svids");
        let cache = Arc::new(Self {
            source,
            options,
            upstream,
            svid_metrics,
            workloads: Mutex::new(HashMap::new()),
            bundles,
            agent_reachable,
            shutdown,
        });
        let weak = Arc::downgrade(&cache);
        register_earliest_expiry(
            &cache.options.metrics,
            Arc::clone(&cache.options.clock),
            move || weak.upgrade().and_then(|c| c.health().earliest_expiry),
        );
        cache
    }

    /// The registry the bridge's metrics go into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.options.metrics
    }

    pub fn health(&self) -> CacheHealth {
        let earliest_expiry = self
            .lock()
            .values()
            .filter_map(|entry| match &*entry.state.borrow() {
                SvidState::Ready(svids) => svids.earliest_expiry(),
                _ => None,
            })
            .min();
        CacheHealth {
            agent_reachable: self.agent_reachable.load(Ordering::Relaxed),
            earliest_expiry,
        }
    }

    pub fn bundles(&self) -> watch::Receiver<Option<SharedBundles>> {
        self.bundles.clone()
    }

    pub fn api(&self) -> &'static str {
        self.source.api()
    }

    /// Joins (or starts) the upstream subscription for `workload`, pinning its process
    /// through `proc_root` if it must start one.
    pub fn subscribe(self: &Arc<Self>, workload: Workload) -> Result<Subscription, TooManyStreams> {
        let liveness = Liveness::of(&self.options.proc_root, &workload);
        self.join(workload, || liveness)
    }

    /// Joins (or starts) the subscription of a process already pinned (at accept).
    pub fn subscribe_process(
        self: &Arc<Self>,
        process: &Arc<PinnedProcess>,
    ) -> Result<Subscription, TooManyStreams> {
        self.join(Workload::Process(process.key()), || {
            Liveness::Process(Arc::clone(process))
        })
    }

    fn join(
        self: &Arc<Self>,
        workload: Workload,
        liveness: impl FnOnce() -> Liveness,
    ) -> Result<Subscription, TooManyStreams> {
        let mut workloads = self.lock();
        let svids = match workloads.entry(workload.clone()) {
            hash_map::Entry::Occupied(mut occupied) => {
                let entry = occupied.get_mut();
                let open = entry.state.receiver_count();
                let limit = self.options.max_streams_per_workload;
                if open >= limit {
                    return Err(TooManyStreams { open, limit });
                }
                entry.generation += 1;
                entry.state.subscribe()
            }
            hash_map::Entry::Vacant(vacant) => {
                self.upstream.workloads.inc();
                let (state, svids) = watch::channel(SvidState::Pending);
                self.start_supervisor(workload.clone(), liveness(), state.clone());
                vacant.insert(Entry {
                    state,
                    generation: 0,
                });
                svids
            }
        };
        Ok(Subscription { workload, svids })
    }

    /// What `workload`'s streams currently see; `None` when it has no subscription.
    pub fn svids_of(&self, workload: &Workload) -> Option<SvidState> {
        self.lock()
            .get(workload)
            .map(|entry| entry.state.borrow().clone())
    }

    /// Number of workloads with a live upstream subscription (for metrics and tests).
    pub fn workload_count(&self) -> usize {
        self.lock().len()
    }

    /// One task per workload: follows the agent until the process is gone, and ends the
    /// subscription once it has had no stream for the linger.
    fn start_supervisor(
        self: &Arc<Self>,
        workload: Workload,
        process: Liveness,
        state: watch::Sender<SvidState>,
    ) {
        let upstream = Svids {
            source: Arc::clone(&self.source),
            workload: workload.clone(),
            process,
            clock: Arc::clone(&self.options.clock),
        };
        let cache = Arc::downgrade(self);
        let backoff = Arc::clone(&self.options.backoff);
        let metrics = self.svid_metrics.clone();
        let linger = self.options.linger;
        let shutdown = self.shutdown.clone();
        let api = self.source.api();
        let span = tracing::info_span!("upstream", ?workload);
        tokio::spawn(
            async move {
                let supervised =
                    supervisor::supervise(upstream, &state, &*backoff, &metrics, api, &shutdown);
                let unread = supervisor::until_unread(
                    &state,
                    linger,
                    || generation_of(&cache, &workload),
                    |generation| forget_if_idle(&cache, &workload, generation),
                );
                tokio::pin!(supervised, unread);
                tokio::select! {
                    // Ended for good (process gone, shutdown): streams still read `Gone`.
                    () = &mut supervised => unread.await,
                    () = &mut unread => {}
                }
            }
            .instrument(span),
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Workload, Entry>> {
        // A panic while holding this lock leaves the map consistent (every update is a
        // single insert/remove/counter change), so a poisoned lock is safe to reuse.
        self.workloads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn generation_of(cache: &Weak<Cache>, workload: &Workload) -> Option<u64> {
    let cache = cache.upgrade()?;
    let workloads = cache.lock();
    workloads.get(workload).map(|entry| entry.generation)
}

/// Removes `workload` if no stream joined since `generation` was noted and none is open.
/// True when the subscription is over (also when the cache itself is gone).
fn forget_if_idle(cache: &Weak<Cache>, workload: &Workload, generation: Option<u64>) -> bool {
    let Some(cache) = cache.upgrade() else {
        return true;
    };
    let mut workloads = cache.lock();
    let Some(entry) = workloads.get(workload) else {
        return true;
    };
    if entry.state.receiver_count() > 0 || Some(entry.generation) != generation {
        return false;
    }
    workloads.remove(workload);
    cache.upstream.workloads.dec();
    tracing::debug!(?workload, "dropped idle workload subscription");
    true
}

impl Ready for Cache {
    fn check(&self) -> Result<(), String> {
        if self
            .health()
            .serving_valid_identities(self.options.clock.unix_now())
        {
            Ok(())
        } else {
            Err("the SPIRE agent is unreachable and no valid cached SVID is left to serve".into())
        }
    }
}

/// Replaces the state only when the content changed: an agent update that changes nothing
/// (another entry rotated, D-9, DI-5) reaches no stream.
fn publish_svids(state: &watch::Sender<SvidState>, svids: WorkloadSvids) -> bool {
    state.send_if_modified(|current| {
        if matches!(current, SvidState::Ready(old) if **old == svids) {
            return false;
        }
        *current = SvidState::Ready(Arc::new(svids));
        true
    })
}

/// While the agent is away, stop serving what expired meanwhile.
fn drop_expired(state: &watch::Sender<SvidState>, now: i64) {
    state.send_if_modified(|current| {
        let SvidState::Ready(svids) = current else {
            return false;
        };
        if svids.svids.iter().all(|s| !s.is_expired_at(now)) {
            return false;
        }
        tracing::warn!("the agent is unreachable and cached SVIDs expired; no longer serving them");
        *current = SvidState::Ready(Arc::new(svids.without_expired(now)));
        true
    });
}

/// One workload's SVID subscription.
struct Svids {
    source: Arc<dyn Source>,
    workload: Workload,
    process: Liveness,
    clock: SharedClock,
}

impl Upstream for Svids {
    type Item = WorkloadSvids;
    type State = SvidState;
    const WHAT: &'static str = "SVID";

    fn connect(
        &mut self,
    ) -> BoxFuture<'static, Result<UpstreamStream<WorkloadSvids>, IdentityError>> {
        self.source.subscribe_svids(self.workload.clone())
    }

    fn before_connect(&mut self, state: &watch::Sender<SvidState>) -> ControlFlow<()> {
        if self.process.is_alive() {
            return ControlFlow::Continue(());
        }
        tracing::info!(
            workload = ?self.workload,
            "workload process exited; ending its subscription"
        );
        state.send_replace(SvidState::Gone);
        ControlFlow::Break(())
    }

    fn check(
        &mut self,
        svids: WorkloadSvids,
        state: &watch::Sender<SvidState>,
    ) -> ControlFlow<(), Option<WorkloadSvids>> {
        // The agent attests whatever holds the PID *now* (DI-4): an update
        // that arrives after the process was replaced may describe the new process.
        if !self.process.is_alive() {
            tracing::info!(
                workload = ?self.workload,
                "workload process was replaced; ending its subscription"
            );
            state.send_replace(SvidState::Gone);
            return ControlFlow::Break(());
        }
        let now = self.clock.unix_now();
        if svids.svids.iter().any(|s| s.is_expired_at(now)) {
            tracing::warn!(workload = ?self.workload, "agent sent an expired SVID; ignoring the update");
            return ControlFlow::Continue(None);
        }
        ControlFlow::Continue(Some(svids))
    }

    fn publish(&mut self, svids: WorkloadSvids, state: &watch::Sender<SvidState>) {
        if publish_svids(state, svids) {
            tracing::debug!(workload = ?self.workload, "SVIDs updated");
        }
    }

    fn on_disconnect(&mut self, state: &watch::Sender<SvidState>) {
        drop_expired(state, self.clock.unix_now());
    }
}

/// Whether the workload behind a subscription still runs.
enum Liveness {
    Process(Arc<PinnedProcess>),
    /// The bridge's own identity (Workload API mode) lives as long as we do; a pod's
    /// (selectors) as long as its volume holds the subscription.
    Bridge,
}

impl Liveness {
    fn of(proc_root: &ProcRoot, workload: &Workload) -> Self {
        match workload {
            Workload::Process(key) => Liveness::Process(Arc::new(proc_root.pin(*key))),
            Workload::Bridge | Workload::Selectors(_) => Liveness::Bridge,
        }
    }

    fn is_alive(&self) -> bool {
        match self {
            Liveness::Process(process) => process.is_alive(),
            Liveness::Bridge => true,
        }
    }
}

/// The node's bundle subscription.
struct Bundles {
    source: Arc<dyn Source>,
    agent_reachable: Arc<AtomicBool>,
}

impl Upstream for Bundles {
    type Item = BundleSet;
    type State = Option<SharedBundles>;
    const WHAT: &'static str = "bundle";

    fn connect(&mut self) -> BoxFuture<'static, Result<UpstreamStream<BundleSet>, IdentityError>> {
        self.source.subscribe_bundles()
    }

    fn check(
        &mut self,
        bundles: BundleSet,
        _state: &watch::Sender<Option<SharedBundles>>,
    ) -> ControlFlow<(), Option<BundleSet>> {
        self.agent_reachable.store(true, Ordering::Relaxed);
        ControlFlow::Continue(Some(bundles))
    }

    fn publish(&mut self, bundles: BundleSet, state: &watch::Sender<Option<SharedBundles>>) {
        state.send_if_modified(|current| {
            if current.as_deref() == Some(&bundles) {
                return false;
            }
            *current = Some(Arc::new(bundles));
            true
        });
    }

    fn on_disconnect(&mut self, _state: &watch::Sender<Option<SharedBundles>>) {
        self.agent_reachable.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    //! The cache on tokio's virtual time, against a fake agent.

    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicUsize;

    use futures::StreamExt;
    use tokio::time::Instant;

    use super::*;
    use crate::clock::{Clock, TokioClock};
    use crate::identity::ProcessKey;
    use crate::identity::source::{BundleStream, SvidStream};
    use crate::identity::types::{PrivateKey, Svid};

    /// A fake SPIRE agent, scripted by the test: each subscription delivers the current
    /// SVIDs and every change, until the agent drops its streams (`drop_streams`); while
    /// `down`, subscribing fails as on an unreachable socket.
    struct FakeAgent {
        svids: watch::Sender<Option<WorkloadSvids>>,
        /// Bumped to end every open stream.
        flap: watch::Sender<u64>,
        down: AtomicBool,
        connects: Mutex<Vec<Instant>>,
        open_streams: Arc<AtomicUsize>,
    }

    impl FakeAgent {
        fn new(svids: WorkloadSvids) -> Arc<Self> {
            Arc::new(Self {
                svids: watch::channel(Some(svids)).0,
                flap: watch::channel(0).0,
                down: AtomicBool::new(false),
                connects: Mutex::new(Vec::new()),
                open_streams: Arc::new(AtomicUsize::new(0)),
            })
        }

        fn send(&self, svids: WorkloadSvids) {
            self.svids.send_replace(Some(svids));
        }

        /// The agent goes away: open streams end, new ones fail.
        fn go_down(&self) {
            self.down.store(true, Ordering::SeqCst);
            self.flap.send_modify(|n| *n += 1);
        }

        fn come_back(&self) {
            self.down.store(false, Ordering::SeqCst);
        }

        fn connects(&self) -> Vec<Instant> {
            self.connects.lock().unwrap().clone()
        }

        fn open_streams(&self) -> usize {
            self.open_streams.load(Ordering::SeqCst)
        }
    }

    /// Counts a stream as open until it is dropped.
    struct Open(Arc<AtomicUsize>);

    impl Drop for Open {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Source for Arc<FakeAgent> {
        fn subscribe_svids(
            &self,
            _workload: Workload,
        ) -> BoxFuture<'static, Result<SvidStream, IdentityError>> {
            let agent = Arc::clone(self);
            Box::pin(async move {
                agent.connects.lock().unwrap().push(Instant::now());
                if agent.down.load(Ordering::SeqCst) {
                    return Err(IdentityError::Agent {
                        code: tonic::Code::Unavailable,
                        message: "fake agent is down".into(),
                    });
                }
                agent.open_streams.fetch_add(1, Ordering::SeqCst);
                let open = Open(Arc::clone(&agent.open_streams));
                let mut svids = agent.svids.subscribe();
                svids.mark_changed();
                let mut flap = agent.flap.subscribe();
                flap.borrow_and_update();
                let stream = futures::stream::unfold(
                    (svids, flap, open),
                    |(mut svids, mut flap, open)| async move {
                        loop {
                            tokio::select! {
                                changed = svids.changed() => {
                                    changed.ok()?;
                                    let current = svids.borrow_and_update().clone();
                                    if let Some(current) = current {
                                        return Some((Ok(current), (svids, flap, open)));
                                    }
                                }
                                _ = flap.changed() => return None,
                            }
                        }
                    },
                );
                Ok(stream.boxed())
            })
        }

        fn subscribe_bundles(&self) -> BoxFuture<'static, Result<BundleStream, IdentityError>> {
            Box::pin(async move {
                let set = BundleSet {
                    bundles: BTreeMap::from([("example.org".to_owned(), vec![b"ca".to_vec()])]),
                };
                Ok(futures::stream::once(async move { Ok(set) })
                    .chain(futures::stream::pending())
                    .boxed())
            })
        }

        fn api(&self) -> &'static str {
            "fake"
        }
    }

    /// Reconnect delays the test can predict: `steps[attempt]`, the last one repeated.
    #[derive(Debug)]
    struct Steps(Vec<Duration>);

    impl Backoff for Steps {
        fn delay(&self, attempt: u32) -> Duration {
            let i = usize::try_from(attempt).unwrap().min(self.0.len() - 1);
            self.0[i]
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn svids(id: &str, expires_at: i64) -> WorkloadSvids {
        WorkloadSvids {
            svids: vec![Svid {
                spiffe_id: format!("spiffe://example.org/{id}"),
                trust_domain: "example.org".into(),
                chain: vec![id.as_bytes().to_vec()],
                key: PrivateKey::from_pkcs8_der(b"fake key".to_vec()),
                expires_at,
                hint: String::new(),
            }],
            federates_with: vec![],
        }
    }

    fn options(clock: TokioClock, backoff: Vec<Duration>) -> CacheOptions {
        CacheOptions {
            backoff: Arc::new(Steps(backoff)),
            clock: Arc::new(clock),
            ..CacheOptions::default()
        }
    }

    /// The next state the subscription sees that is not `Pending`.
    async fn settled(sub: &mut Subscription) -> SvidState {
        let rx = sub.svids();
        let state = rx
            .wait_for(|state| *state != SvidState::Pending)
            .await
            .unwrap()
            .clone();
        rx.borrow_and_update();
        state
    }

    fn ids(state: &SvidState) -> Vec<String> {
        match state {
            SvidState::Ready(svids) => svids.svids.iter().map(|s| s.spiffe_id.clone()).collect(),
            other => vec![format!("{other:?}")],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn agent_flaps_reconnect_with_backoff_and_the_last_good_svids_stay() {
        let clock = TokioClock::new();
        let hour = clock.unix_now() + 3600;
        let agent = FakeAgent::new(svids("a", hour));
        let shutdown = CancellationToken::new();
        let cache = Cache::new(
            Arc::new(Arc::clone(&agent)),
            options(clock, vec![ms(100), ms(200), ms(400)]),
            shutdown.clone(),
        );
        let mut sub = cache.subscribe(Workload::Bridge).unwrap();
        assert_eq!(ids(&settled(&mut sub).await), ["spiffe://example.org/a"]);
        assert_eq!(agent.connects().len(), 1);

        let went_down = Instant::now();
        agent.go_down();
        tokio::time::sleep(ms(1000)).await;
        let retries: Vec<Duration> = agent.connects()[1..]
            .iter()
            .map(|at| *at - went_down)
            .collect();
        assert_eq!(
            retries,
            [ms(100), ms(300), ms(700)],
            "backoff 100, 200, then 400 ms capped"
        );
        assert!(
            !sub.svids().has_changed().unwrap(),
            "the streams saw nothing while the agent was away"
        );
        assert_eq!(ids(&sub.svids().borrow()), ["spiffe://example.org/a"]);
        assert!(
            cache.check().is_ok(),
            "valid cached SVIDs keep the bridge ready"
        );

        agent.send(svids("b", hour));
        agent.come_back();
        sub.svids().changed().await.unwrap();
        assert_eq!(
            *agent.connects().last().unwrap() - went_down,
            ms(1100),
            "the next attempt after 400 ms reconnects"
        );
        assert_eq!(
            ids(&sub.svids().borrow_and_update()),
            ["spiffe://example.org/b"]
        );
        let text = cache.metrics().encode();
        assert!(
            text.contains(
                "svid_bridge_upstream_reconnects_total{api=\"fake\",subscription=\"svids\"} 4"
            ),
            "{text}"
        );
        assert!(
            text.contains("svid_bridge_upstream_connected{api=\"fake\",subscription=\"svids\"} 1"),
            "{text}"
        );
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscription_lingers_after_its_last_stream_then_ends() {
        let clock = TokioClock::new();
        let agent = FakeAgent::new(svids("a", clock.unix_now() + 3600));
        let cache = Cache::new(
            Arc::new(Arc::clone(&agent)),
            CacheOptions {
                max_streams_per_workload: 2,
                ..options(clock, vec![ms(100)])
            },
            CancellationToken::new(),
        );
        let mut first = cache.subscribe(Workload::Bridge).unwrap();
        let second = cache.subscribe(Workload::Bridge).unwrap();
        settled(&mut first).await;
        assert_eq!(
            cache.subscribe(Workload::Bridge).err(),
            Some(TooManyStreams { open: 2, limit: 2 }),
            "the channel's receivers are the workload's streams"
        );
        drop(second);
        drop(first);

        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(cache.workload_count(), 1, "lingering");
        let mut again = cache.subscribe(Workload::Bridge).unwrap();
        assert_eq!(
            ids(&settled(&mut again).await),
            ["spiffe://example.org/a"],
            "a returning stream is served at once from the lingering subscription"
        );
        assert_eq!(agent.connects().len(), 1, "no second upstream subscription");
        drop(again);

        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(
            cache.workload_count(),
            1,
            "the linger counts from the last stream"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(cache.workload_count(), 0);
        assert_eq!(agent.open_streams(), 0, "the upstream stream was closed");
        let text = cache.metrics().encode();
        assert!(
            text.contains("svid_bridge_workload_subscriptions 0"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cached_svids_expire_while_the_agent_is_away() {
        let clock = TokioClock::new();
        let expires_at = clock.unix_now() + 30;
        let agent = FakeAgent::new(svids("a", expires_at));
        let cache = Cache::new(
            Arc::new(Arc::clone(&agent)),
            options(clock, vec![Duration::from_secs(1)]),
            CancellationToken::new(),
        );
        let mut sub = cache.subscribe(Workload::Bridge).unwrap();
        settled(&mut sub).await;
        assert_eq!(cache.health().earliest_expiry, Some(expires_at));
        agent.go_down();

        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(ids(&sub.svids().borrow()), ["spiffe://example.org/a"]);
        sub.svids().changed().await.unwrap();
        assert!(
            clock.unix_now() >= expires_at,
            "dropped at expiry, not before"
        );
        assert_eq!(ids(&sub.svids().borrow_and_update()), Vec::<String>::new());
        assert_eq!(cache.health().earliest_expiry, None);
        // The bundle subscription (another fake stream) still delivers, so the agent
        // counts as reachable; what is checked here is the expired SVIDs' absence.
        assert!(cache.health().agent_reachable);

        // An update that is already expired is ignored, not served.
        agent.send(svids("stale", clock.unix_now() - 1));
        agent.come_back();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!sub.svids().has_changed().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_process_gone_ends_its_subscription() {
        let dir = tempfile::tempdir().unwrap();
        let write_stat = |start: u64| {
            std::fs::create_dir_all(dir.path().join("4242")).unwrap();
            let stat = format!("4242 (envoy) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0");
            std::fs::write(dir.path().join("4242/stat"), stat).unwrap();
        };
        write_stat(1000);
        let clock = TokioClock::new();
        let hour = clock.unix_now() + 3600;
        let agent = FakeAgent::new(svids("a", hour));
        let cache = Cache::new(
            Arc::new(Arc::clone(&agent)),
            CacheOptions {
                proc_root: ProcRoot::new(dir.path()),
                ..options(clock, vec![ms(100)])
            },
            CancellationToken::new(),
        );
        let workload = Workload::Process(ProcessKey {
            pid: 4242,
            start_time: 1000,
        });
        let mut sub = cache.subscribe(workload).unwrap();
        assert_eq!(ids(&settled(&mut sub).await), ["spiffe://example.org/a"]);

        // Another process takes the PID; the agent, attesting by PID, sends its SVIDs.
        write_stat(2000);
        agent.send(svids("successor", hour));
        sub.svids().changed().await.unwrap();
        assert_eq!(*sub.svids().borrow_and_update(), SvidState::Gone);

        // A process that exits while the agent is away: no reconnect for it at all.
        std::fs::remove_dir_all(dir.path().join("4242")).unwrap();
        write_stat(3000);
        let third = Workload::Process(ProcessKey {
            pid: 4242,
            start_time: 3000,
        });
        let mut other = cache.subscribe(third).unwrap();
        settled(&mut other).await;
        let connects = agent.connects().len();
        agent.go_down();
        std::fs::remove_dir_all(dir.path().join("4242")).unwrap();
        other.svids().changed().await.unwrap();
        assert_eq!(*other.svids().borrow(), SvidState::Gone);
        assert_eq!(
            agent.connects().len(),
            connects,
            "the exit is noticed before reconnecting"
        );

        drop(sub);
        drop(other);
        tokio::time::sleep(DEFAULT_LINGER + ms(1)).await;
        assert_eq!(cache.workload_count(), 0);
    }
}
