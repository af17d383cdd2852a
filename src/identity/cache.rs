//! One upstream subscription per workload, shared by all of its SDS streams.
//!
//! Envoy opens one SDS stream per secret name (envoy-and-istio.md E6, E7), so an Istio
//! sidecar holds at least two; SPIRE attests and subscribes once per stream (spire-sds.md
//! H-4). Here every stream of a workload reads the same `watch` channel, fed by one
//! supervisor task that reconnects with capped, jittered backoff, keeps the last good SVIDs
//! while the agent is away (until they expire), and publishes only real changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use super::IdentityError;
use super::process::{PinnedProcess, ProcRoot};
use super::source::{Source, Workload};
use super::types::{BundleSet, SharedBundles, SharedSvids, WorkloadSvids};
use crate::clock::unix_now;
use crate::telemetry::metrics::{Metrics, UpstreamLabel};

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

#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    /// Capped low enough that streams resume within about two seconds of the agent's
    /// return; the agent is a local socket, so a fast retry costs little.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1500),
        }
    }
}

impl Backoff {
    /// Exponential in `attempt`, capped, with jitter in [50 %, 100 %] of the delay so that
    /// many workloads reconnecting after an agent restart do not arrive in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << attempt.min(16));
        let capped = exp.min(self.max);
        capped.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// How long a workload's subscription outlives its last stream (Envoy reconnects,
    /// listener churn).
    pub linger: Duration,
    pub backoff: Backoff,
    pub proc_root: ProcRoot,
    pub metrics: Arc<Metrics>,
    /// Streams one workload may hold at once (`--max-streams-per-process`).
    pub max_streams_per_workload: usize,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            linger: Duration::from_secs(10),
            backoff: Backoff::default(),
            proc_root: ProcRoot::default(),
            metrics: Arc::new(Metrics::new()),
            max_streams_per_workload: 1000,
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
    workloads: Mutex<HashMap<Workload, Entry>>,
    bundles: watch::Receiver<Option<SharedBundles>>,
    agent_reachable: Arc<AtomicBool>,
    shutdown: CancellationToken,
}

struct Entry {
    state: watch::Sender<SvidState>,
    streams: usize,
    /// Bumped on each re-use so a linger timer from an earlier idle period does nothing.
    generation: u64,
    supervisor: AbortHandle,
}

/// A stream's hold on its workload's SVIDs; dropping it releases the subscription.
pub struct Subscription {
    workload: Workload,
    svids: watch::Receiver<SvidState>,
    cache: Weak<Cache>,
}

impl Subscription {
    pub fn workload(&self) -> Workload {
        self.workload
    }

    pub fn svids(&mut self) -> &mut watch::Receiver<SvidState> {
        &mut self.svids
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(cache) = self.cache.upgrade() {
            cache.release(self.workload);
        }
    }
}

impl Cache {
    /// Starts the bundle subscription at once: bundles are node-wide, needed by every stream.
    pub fn new(
        source: Arc<dyn Source>,
        options: CacheOptions,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (bundles_tx, bundles) = watch::channel(None);
        let agent_reachable = Arc::new(AtomicBool::new(false));
        let upstream = Upstream::new(&source, "bundles", &options.metrics);
        tokio::spawn(supervise_bundles(
            Arc::clone(&source),
            options.backoff,
            bundles_tx,
            Arc::clone(&agent_reachable),
            upstream,
            shutdown.clone(),
        ));
        Arc::new(Self {
            source,
            options,
            workloads: Mutex::new(HashMap::new()),
            bundles,
            agent_reachable,
            shutdown,
        })
    }

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

    /// Joins (or starts) the upstream subscription for `workload`.
    pub fn subscribe(self: &Arc<Self>, workload: Workload) -> Result<Subscription, TooManyStreams> {
        let mut workloads = self.lock();
        let limit = self.options.max_streams_per_workload;
        if let Some(entry) = workloads.get(&workload)
            && entry.streams >= limit
        {
            return Err(TooManyStreams {
                open: entry.streams,
                limit,
            });
        }
        let entry = workloads.entry(workload).or_insert_with(|| {
            self.options.metrics.upstream.workloads.inc();
            self.start_supervisor(workload)
        });
        entry.streams += 1;
        entry.generation += 1;
        Ok(Subscription {
            workload,
            svids: entry.state.subscribe(),
            cache: Arc::downgrade(self),
        })
    }

    /// Number of workloads with a live upstream subscription (for metrics and tests).
    pub fn workload_count(&self) -> usize {
        self.lock().len()
    }

    fn start_supervisor(&self, workload: Workload) -> Entry {
        let (state, _) = watch::channel(SvidState::Pending);
        let task = tokio::spawn(supervise_svids(
            Arc::clone(&self.source),
            workload,
            state.clone(),
            self.options.clone(),
            self.shutdown.clone(),
        ));
        Entry {
            state,
            streams: 0,
            generation: 0,
            supervisor: task.abort_handle(),
        }
    }

    fn release(self: Arc<Self>, workload: Workload) {
        let generation = {
            let mut workloads = self.lock();
            let Some(entry) = workloads.get_mut(&workload) else {
                return;
            };
            entry.streams = entry.streams.saturating_sub(1);
            if entry.streams > 0 {
                return;
            }
            entry.generation
        };
        let linger = self.options.linger;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.forget_if_idle(workload, generation);
            return;
        };
        runtime.spawn(async move {
            tokio::time::sleep(linger).await;
            self.forget_if_idle(workload, generation);
        });
    }

    fn forget_if_idle(&self, workload: Workload, generation: u64) {
        let mut workloads = self.lock();
        let idle = workloads
            .get(&workload)
            .is_some_and(|e| e.streams == 0 && e.generation == generation);
        if idle && let Some(entry) = workloads.remove(&workload) {
            entry.supervisor.abort();
            self.options.metrics.upstream.workloads.dec();
            tracing::debug!(?workload, "dropped idle workload subscription");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Workload, Entry>> {
        // A panic while holding this lock leaves the map consistent (every update is a
        // single insert/remove/counter change), so a poisoned lock is safe to reuse.
        self.workloads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Replaces the state only when the content changed: an agent update that changes nothing
/// (another entry rotated, spire-sds.md D-9, DI-5) reaches no stream.
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
fn drop_expired(state: &watch::Sender<SvidState>) {
    let now = unix_now();
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

/// Metrics of one kind of upstream subscription.
#[derive(Clone)]
struct Upstream {
    metrics: Arc<Metrics>,
    label: UpstreamLabel,
}

impl Upstream {
    fn new(source: &Arc<dyn Source>, subscription: &'static str, metrics: &Arc<Metrics>) -> Self {
        Self {
            metrics: Arc::clone(metrics),
            label: UpstreamLabel {
                api: source.api(),
                subscription,
            },
        }
    }

    fn reconnecting(&self) {
        self.metrics
            .upstream
            .reconnects
            .get_or_create(&self.label)
            .inc();
    }

    /// Counts this subscription as connected while the guard lives.
    fn connected(&self) -> ConnectedGuard {
        self.metrics
            .upstream
            .connected
            .get_or_create(&self.label)
            .inc();
        ConnectedGuard(self.clone())
    }
}

struct ConnectedGuard(Upstream);

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0
            .metrics
            .upstream
            .connected
            .get_or_create(&self.0.label)
            .dec();
    }
}

async fn supervise_svids(
    source: Arc<dyn Source>,
    workload: Workload,
    state: watch::Sender<SvidState>,
    options: CacheOptions,
    shutdown: CancellationToken,
) {
    let mut attempt = 0u32;
    let mut failing = false;
    let upstream = Upstream::new(&source, "svids", &options.metrics);
    let process = Liveness::of(&options.proc_root, workload);
    loop {
        if !process.is_alive() {
            tracing::info!(
                ?workload,
                "workload process exited; ending its subscription"
            );
            state.send_replace(SvidState::Gone);
            return;
        }
        let outcome = follow_svids(
            &*source,
            workload,
            &state,
            &process,
            &upstream,
            &mut attempt,
            &mut failing,
        )
        .await;
        match outcome {
            Ok(Follow::ProcessGone) => {
                tracing::info!(
                    ?workload,
                    "workload process was replaced; ending its subscription"
                );
                state.send_replace(SvidState::Gone);
                return;
            }
            Ok(Follow::Ended) => {
                if !failing {
                    tracing::warn!(
                        ?workload,
                        api = source.api(),
                        "agent closed the SVID subscription; reconnecting"
                    );
                }
                failing = true;
            }
            Err(err) => {
                if !failing {
                    tracing::warn!(?workload, api = source.api(), %err, "SVID subscription failed; retrying with backoff, serving the last good SVIDs meanwhile");
                }
                failing = true;
            }
        }
        drop_expired(&state);
        upstream.reconnecting();
        let delay = options.backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

enum Follow {
    Ended,
    ProcessGone,
}

/// Follows one upstream subscription until it ends. Resets `attempt` once data flows, so
/// the backoff only grows while the agent keeps failing.
async fn follow_svids(
    source: &dyn Source,
    workload: Workload,
    state: &watch::Sender<SvidState>,
    process: &Liveness,
    upstream: &Upstream,
    attempt: &mut u32,
    failing: &mut bool,
) -> Result<Follow, IdentityError> {
    let mut stream = source.subscribe_svids(workload).await?;
    let mut connected = None;
    while let Some(update) = stream.next().await {
        let svids = update?;
        // The agent attests whatever holds the PID *now* (spire-sds.md DI-4): an update
        // that arrives after the process was replaced may describe the new process.
        if !process.is_alive() {
            return Ok(Follow::ProcessGone);
        }
        let now = unix_now();
        if svids.svids.iter().any(|s| s.is_expired_at(now)) {
            tracing::warn!(?workload, "agent sent an expired SVID; ignoring the update");
            continue;
        }
        *attempt = 0;
        connected.get_or_insert_with(|| upstream.connected());
        if std::mem::take(failing) {
            tracing::info!(?workload, "SVID subscription recovered");
        }
        if publish_svids(state, svids) {
            tracing::debug!(?workload, "SVIDs updated");
        }
    }
    Ok(Follow::Ended)
}

/// Whether the workload behind a subscription still runs.
enum Liveness {
    Process(PinnedProcess),
    /// The bridge's own identity (Workload API mode) lives as long as we do.
    Bridge,
}

impl Liveness {
    fn of(proc_root: &ProcRoot, workload: Workload) -> Self {
        match workload {
            Workload::Process(key) => Liveness::Process(proc_root.pin(key)),
            Workload::Bridge => Liveness::Bridge,
        }
    }

    fn is_alive(&self) -> bool {
        match self {
            Liveness::Process(process) => process.is_alive(),
            Liveness::Bridge => true,
        }
    }
}

async fn supervise_bundles(
    source: Arc<dyn Source>,
    backoff: Backoff,
    state: watch::Sender<Option<SharedBundles>>,
    agent_reachable: Arc<AtomicBool>,
    upstream: Upstream,
    shutdown: CancellationToken,
) {
    let mut attempt = 0u32;
    let mut failing = false;
    loop {
        let outcome = follow_bundles(
            &*source,
            &state,
            &agent_reachable,
            &upstream,
            &mut attempt,
            &mut failing,
        )
        .await;
        agent_reachable.store(false, Ordering::Relaxed);
        upstream.reconnecting();
        match outcome {
            Ok(()) if !failing => tracing::warn!(
                api = source.api(),
                "agent closed the bundle subscription; reconnecting"
            ),
            Err(err) if !failing => {
                tracing::warn!(api = source.api(), %err, "bundle subscription failed; retrying, serving the last good bundles meanwhile")
            }
            _ => {}
        }
        failing = true;
        let delay = backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn follow_bundles(
    source: &dyn Source,
    state: &watch::Sender<Option<SharedBundles>>,
    agent_reachable: &AtomicBool,
    upstream: &Upstream,
    attempt: &mut u32,
    failing: &mut bool,
) -> Result<(), IdentityError> {
    let mut stream = source.subscribe_bundles().await?;
    let mut connected = None;
    while let Some(update) = stream.next().await {
        let bundles: BundleSet = update?;
        *attempt = 0;
        agent_reachable.store(true, Ordering::Relaxed);
        connected.get_or_insert_with(|| upstream.connected());
        if std::mem::take(failing) {
            tracing::info!("bundle subscription recovered");
        }
        state.send_if_modified(|current| {
            if current.as_deref() == Some(&bundles) {
                return false;
            }
            *current = Some(Arc::new(bundles));
            true
        });
    }
    Ok(())
}
