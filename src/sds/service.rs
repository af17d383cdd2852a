//! The tonic `SecretDiscoveryService`: who is calling, and the per-stream event loop.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use futures::Stream;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::metrics::{SdsMetrics, StreamGauges};
use super::response::{DeltaResponse, SotwResponse};
use super::secrets::{BundleMemo, MemoRef, View, Waiting};
use super::socket::PeerInfo;
use super::stream::{DeltaStream, Protocol, Reaction, SotwStream, StreamSettings};
use super::workloads::{StreamEntry, StreamOwner, StreamRegistry, WorkloadsReporter};
use crate::identity::types::{SharedBundles, SharedSvids};
use crate::identity::{Cache, PinnedProcess, SelectorSet, Subscription, SvidState, Workload};
use crate::k8s::{PodRef, Pods};
use crate::uds::InboundMessages;

/// How a caller is mapped to a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallerIdentity {
    /// By the connecting process (Delegated Identity API).
    Process,
    /// Everyone gets the bridge's own identity (Workload API mode).
    Bridge,
    /// Everyone on this socket is the pod whose pod-mode volume holds it: the mount is the
    /// identity, no PID attestation (#15).
    Pod { selectors: SelectorSet, pod: PodRef },
}

pub struct SdsService {
    cache: Arc<Cache>,
    settings: Arc<StreamSettings>,
    caller_identity: CallerIdentity,
    metrics: Arc<SdsMetrics>,
    shutdown: CancellationToken,
    fetch_timeout: Duration,
    bundle_memo: Arc<BundleMemo>,
    /// Names callers' pods in logs; off outside Kubernetes.
    pods: Pods,
    /// Open streams, for the per-workload report.
    registry: Arc<StreamRegistry>,
}

/// See [`SdsService::shared_parts`].
#[derive(Clone)]
pub struct SharedParts {
    bundle_memo: Arc<BundleMemo>,
    pods: Pods,
    registry: Arc<StreamRegistry>,
}

/// Whom a request is answered for.
enum Caller {
    /// The process that opened the connection, pinned at accept.
    Process(Arc<PinnedProcess>),
    /// Served the bridge's own identity (Workload API mode); the peer's PID, when the socket
    /// gave one, is still what an operator needs to find the caller in the logs.
    Bridge { peer_pid: Option<i32> },
    /// A pod, on its own volume's socket.
    Pod {
        selectors: SelectorSet,
        pod: PodRef,
        peer_pid: Option<i32>,
    },
}

impl Caller {
    /// The caller's PID; `None` (never a made-up 0) when the socket did not give one.
    fn pid(&self) -> Option<i32> {
        match self {
            Caller::Process(process) => Some(process.key().pid),
            Caller::Bridge { peer_pid } | Caller::Pod { peer_pid, .. } => *peer_pid,
        }
    }

    /// A span for the caller's stream, with `pid` only when it is known, and its pod
    /// (namespace, pod, container) when the pod view knows it.
    fn stream_span(&self, api: &'static str, pod: Option<&PodRef>) -> tracing::Span {
        let span = tracing::info_span!(
            "sds_stream",
            pid = tracing::field::Empty,
            namespace = tracing::field::Empty,
            pod = tracing::field::Empty,
            container = tracing::field::Empty,
            api
        );
        if let Some(pid) = self.pid() {
            span.record("pid", pid);
        }
        // Display, not the quoted Debug form of a string: `pod=envoy-a` reads (and greps)
        // like `pid=42` beside it.
        if let Some(pod) = pod {
            span.record("namespace", tracing::field::display(&pod.namespace));
            span.record("pod", tracing::field::display(&pod.name));
            if let Some(container) = &pod.container {
                span.record("container", tracing::field::display(container));
            }
        }
        span
    }
}

impl SdsService {
    pub fn new(
        cache: Arc<Cache>,
        settings: StreamSettings,
        caller_identity: CallerIdentity,
        metrics: Arc<SdsMetrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            cache,
            settings: Arc::new(settings),
            caller_identity,
            metrics,
            shutdown,
            fetch_timeout: Duration::from_secs(5),
            bundle_memo: Arc::default(),
            pods: Pods::off(),
            registry: Arc::default(),
        }
    }

    /// Whether callers are attested by their process (so a connection names its workload).
    pub fn subscribes_by_process(&self) -> bool {
        self.caller_identity == CallerIdentity::Process
    }

    pub fn cache(&self) -> Arc<Cache> {
        Arc::clone(&self.cache)
    }

    pub fn settings(&self) -> StreamSettings {
        (*self.settings).clone()
    }

    /// What pod sockets' services share with this one: the bundle memo, the pod view and
    /// the stream registry (so `/debug/workloads` lists pod-mode streams too).
    pub fn shared_parts(&self) -> SharedParts {
        SharedParts {
            bundle_memo: Arc::clone(&self.bundle_memo),
            pods: self.pods.clone(),
            registry: Arc::clone(&self.registry),
        }
    }

    pub fn sharing(mut self, parts: &SharedParts) -> Self {
        self.bundle_memo = Arc::clone(&parts.bundle_memo);
        self.pods = parts.pods.clone();
        self.registry = Arc::clone(&parts.registry);
        self
    }

    /// The per-workload report over this service's streams.
    pub fn workloads_reporter(&self) -> WorkloadsReporter {
        WorkloadsReporter {
            registry: Arc::clone(&self.registry),
            cache: Arc::clone(&self.cache),
            pods: self.pods.clone(),
        }
    }

    /// Names callers' pods (from their cgroup and the pod view) in stream logs.
    pub fn set_pods(&mut self, pods: Pods) {
        self.pods = pods;
    }

    /// The caller's pod, looked up once per stream (a cgroup read and a scan of the node's
    /// pods), never per response.
    fn pod_of(&self, caller: &Caller) -> Option<PodRef> {
        if let Caller::Pod { pod, .. } = caller {
            return Some(pod.clone());
        }
        self.pods.of_pid(caller.pid()?)
    }

    /// The workload behind a request: the process that opened the connection, pinned
    /// when the connection was accepted (A-2, A-4, DI-4).
    fn caller_of<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let peer = request.extensions().get::<PeerInfo>();
        let peer_pid = || {
            peer.and_then(|p| p.uds.peer_cred)
                .and_then(|cred| cred.pid())
                .filter(|pid| *pid > 0)
        };
        match &self.caller_identity {
            CallerIdentity::Process => {}
            CallerIdentity::Bridge => {
                return Ok(Caller::Bridge {
                    peer_pid: peer_pid(),
                });
            }
            CallerIdentity::Pod { selectors, pod } => {
                return Ok(Caller::Pod {
                    selectors: selectors.clone(),
                    pod: pod.clone(),
                    peer_pid: peer_pid(),
                });
            }
        }
        let peer =
            peer.ok_or_else(|| Status::internal("no peer information on this connection"))?;
        let Some(process) = &peer.process else {
            return Err(Status::unavailable(
                "cannot identify the caller: its PID is not visible in svid-bridge's PID \
                 namespace (run svid-bridge with hostPID, beside the SPIRE agent)",
            ));
        };
        if !process.is_alive() {
            return Err(Status::unavailable(format!(
                "the process that opened this connection (PID {}) has exited; reconnect",
                process.key().pid
            )));
        }
        Ok(Caller::Process(Arc::clone(process)))
    }

    fn context(
        &self,
        caller: &Caller,
        api: &'static str,
        pod: Option<&PodRef>,
    ) -> Result<StreamContext, Status> {
        let subscription = match caller {
            Caller::Process(process) => self.cache.subscribe_process(process),
            Caller::Bridge { .. } => self.cache.subscribe(Workload::Bridge),
            Caller::Pod { selectors, .. } => {
                self.cache.subscribe(Workload::Selectors(selectors.clone()))
            }
        };
        let subscription = subscription.map_err(|limit| {
            self.metrics.streams_refused.inc();
            caller.stream_span(api, pod).in_scope(|| {
                tracing::warn!(%limit, "refused an SDS stream");
            });
            Status::resource_exhausted(limit.to_string())
        })?;
        Ok(StreamContext {
            subscription,
            bundles: self.cache.bundles(),
            extra_anchors: Arc::clone(&self.settings),
            bundle_memo: Arc::clone(&self.bundle_memo),
            shutdown: self.shutdown.clone(),
            gauges: StreamGauges::new(Arc::clone(&self.metrics)),
        })
    }
}

pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl SdsService {
    /// A state-of-the-world stream. Driven by polling its response body: hyper already
    /// runs every HTTP/2 stream as a task, so a task and a channel of our own per stream
    /// would only add memory and a wake-up per push (BENCHMARKS.md §4.1).
    pub fn stream_secrets(
        &self,
        request: Request<InboundMessages<DiscoveryRequest>>,
    ) -> Result<ResponseStream<SotwResponse>, Status> {
        self.open_stream::<SotwStream>(request)
    }

    pub fn delta_secrets(
        &self,
        request: Request<InboundMessages<DeltaDiscoveryRequest>>,
    ) -> Result<ResponseStream<DeltaResponse>, Status> {
        self.open_stream::<DeltaStream>(request)
    }

    fn open_stream<P: Protocol>(
        &self,
        request: Request<InboundMessages<P::Request>>,
    ) -> Result<ResponseStream<P::Response>, Status> {
        let caller = self.caller_of(&request)?;
        let pod = self.pod_of(&caller);
        let context = self.context(&caller, P::API, pod.as_ref())?;
        let span = caller.stream_span(P::API, pod.as_ref());
        let record = self.registry.open(StreamOwner {
            workload: context.subscription.workload().clone(),
            pid: caller.pid(),
            pod,
            api: P::API,
        });
        let state = StreamState {
            record,
            context,
            inbound: request.into_inner(),
            protocol: P::new(Arc::clone(&self.settings)),
            waits: WaitLog::default(),
            span,
            ended: false,
            responses: self.metrics.responses_of(P::API),
        };
        Ok(Box::pin(futures::stream::unfold(state, next_response)))
    }

    /// Unary, for tools: waits briefly for the names to resolve (a first call creates the
    /// workload's subscription), then answers with all of them or says what is missing.
    pub async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<SotwResponse>, Status> {
        let caller = self.caller_of(&request)?;
        let pod = self.pod_of(&caller);
        let mut context = self.context(&caller, "fetch", pod.as_ref())?;
        let mut stream = SotwStream::new(Arc::clone(&self.settings));
        if let Err(status) = stream.on_request(request.get_ref()) {
            self.metrics.refused.inc();
            return Err(status);
        }
        let wanted = stream.requested().map_or(0, BTreeMap::len);
        let deadline = tokio::time::sleep(self.fetch_timeout);
        tokio::pin!(deadline);
        let mut last_waiting = BTreeMap::new();
        loop {
            if let Some(snapshot) = context.snapshot()? {
                let (response, waiting) = stream.respond(&context.view(&snapshot));
                match response {
                    Some(response) if waiting.is_empty() || wanted == 0 => {
                        self.metrics.responses_of("fetch").inc();
                        return Ok(Response::new(response));
                    }
                    _ => last_waiting = waiting,
                }
            }
            tokio::select! {
                () = &mut deadline => return Err(still_waiting(&last_waiting)),
                changed = context.changed() => changed?,
            }
        }
    }
}

fn still_waiting(waiting: &BTreeMap<String, Waiting>) -> Status {
    if waiting.is_empty() {
        return Status::unavailable("no answer from the SPIRE agent yet");
    }
    let reasons: Vec<String> = waiting
        .iter()
        .map(|(name, why)| format!("{}: {}", super::names::Quoted::new(name), why.0))
        .collect();
    Status::unavailable(format!("still waiting for {}", reasons.join("; ")))
}

/// What one stream reads: its workload's SVIDs and the node's bundles.
struct StreamContext {
    subscription: Subscription,
    bundles: watch::Receiver<Option<SharedBundles>>,
    /// The settings, for their extra trust anchors (the state machine has the rest).
    extra_anchors: Arc<StreamSettings>,
    bundle_memo: Arc<BundleMemo>,
    shutdown: CancellationToken,
    gauges: StreamGauges,
}

struct Snapshot {
    svids: SharedSvids,
    bundles: SharedBundles,
}

impl StreamContext {
    /// What the workload may see in `snapshot`, with the node's memo of validation secrets.
    fn view<'a>(&'a self, snapshot: &'a Snapshot) -> View<'a> {
        View {
            svids: &snapshot.svids,
            bundles: &snapshot.bundles,
            extra_anchors: &self.extra_anchors.extra_trust_anchors,
            memo: Some(MemoRef {
                memo: &self.bundle_memo,
                snapshot: &snapshot.bundles,
            }),
        }
    }

    /// The current SVIDs and bundles, once both have arrived.
    fn snapshot(&mut self) -> Result<Option<Snapshot>, Status> {
        let svids = match &*self.subscription.svids().borrow_and_update() {
            SvidState::Pending => return Ok(None),
            SvidState::Gone => return Err(Status::unavailable("the calling process exited")),
            SvidState::Ready(svids) => Arc::clone(svids),
        };
        let Some(bundles) = self.bundles.borrow_and_update().clone() else {
            return Ok(None);
        };
        Ok(Some(Snapshot { svids, bundles }))
    }

    /// Waits for the next identity change.
    async fn changed(&mut self) -> Result<(), Status> {
        let svids = self.subscription.svids();
        tokio::select! {
            r = svids.changed() => r.map_err(|_| Status::unavailable("svid-bridge is shutting down")),
            r = self.bundles.changed() => r.map_err(|_| Status::unavailable("svid-bridge is shutting down")),
        }
    }
}

/// Logs each name once when it starts waiting and once when it resolves, never per retry.
#[derive(Default)]
struct WaitLog {
    waiting: BTreeMap<String, Waiting>,
}

impl WaitLog {
    fn update(&mut self, now: BTreeMap<String, Waiting>) {
        for (name, why) in &now {
            if !self.waiting.contains_key(name) {
                tracing::warn!(secret = %name, reason = why.0, "waiting for a secret that cannot be served yet");
            }
        }
        for name in self.waiting.keys() {
            if !now.contains_key(name) {
                tracing::info!(secret = %name, "secret resolved; pushed");
            }
        }
        self.waiting = now;
    }
}

impl WaitLog {
    fn report_abandoned(&mut self) {
        if !self.waiting.is_empty() {
            let names: Vec<&str> = self.waiting.keys().map(String::as_str).collect();
            tracing::info!(secrets = ?names, "stream closed while still waiting for secrets");
        }
    }
}

enum Event<R> {
    Request(R),
    /// A request the bridge could not take (too large, compressed, not decodable).
    Unreadable(Status),
    IdentityChanged,
    Closed,
}

async fn next_event<R: prost::Message + Default>(
    context: &mut StreamContext,
    inbound: &mut InboundMessages<R>,
) -> Result<Event<R>, Status> {
    let shutdown = context.shutdown.clone();
    tokio::select! {
        request = inbound.next() => match request {
            Some(Ok(request)) => Ok(Event::Request(request)),
            // The client is told why (tonic's decoder errors used to end the stream as if
            // the client had closed it).
            Some(Err(status)) => Ok(Event::Unreadable(status)),
            // Client closed or cancelled (E15): a clean end, not an error (D-11).
            None => Ok(Event::Closed),
        },
        changed = context.changed() => changed.map(|()| Event::IdentityChanged),
        () = shutdown.cancelled() => Err(Status::unavailable("svid-bridge is shutting down")),
    }
}

/// Everything one stream owns; dropped when the client goes away (hyper drops the body).
struct StreamState<P: Protocol> {
    /// This stream in the per-workload report.
    record: StreamEntry,
    context: StreamContext,
    inbound: InboundMessages<P::Request>,
    protocol: P,
    waits: WaitLog,
    span: tracing::Span,
    /// An error was yielded: the stream ends with it.
    ended: bool,
    /// This stream's API's response counter.
    responses: Counter,
}

enum Step<R> {
    Push(R),
    Fail(Status),
    End,
}

async fn next_response<P: Protocol>(
    mut state: StreamState<P>,
) -> Option<(Result<P::Response, Status>, StreamState<P>)> {
    if state.ended {
        return None;
    }
    let span = state.span.clone();
    match state.advance().instrument(span).await {
        Step::Push(response) => Some((Ok(response), state)),
        Step::Fail(status) => {
            state.ended = true;
            Some((Err(status), state))
        }
        Step::End => None,
    }
}

impl<P: Protocol> StreamState<P> {
    /// Reads requests and identity changes until there is something to send.
    async fn advance(&mut self) -> Step<P::Response> {
        loop {
            let event = match next_event(&mut self.context, &mut self.inbound).await {
                Ok(event) => event,
                Err(status) => return Step::Fail(status),
            };
            match event {
                Event::Closed => return Step::End,
                Event::IdentityChanged => {}
                Event::Unreadable(status) => return Step::Fail(self.refuse(status)),
                Event::Request(request) => {
                    if let Err(status) = self.on_request(&request) {
                        return Step::Fail(self.refuse(status));
                    }
                }
            }
            let snapshot = match self.context.snapshot() {
                Ok(Some(snapshot)) => snapshot,
                Ok(None) => continue,
                Err(status) => return Step::Fail(status),
            };
            let (response, waiting) = self.protocol.respond(&self.context.view(&snapshot));
            self.context.gauges.set_waiting(!waiting.is_empty());
            if waiting != self.waits.waiting {
                self.record.set_waiting(&waiting);
            }
            self.waits.update(waiting);
            if let Some(response) = response {
                P::log_push(&response);
                self.responses.inc();
                return Step::Push(response);
            }
        }
    }

    fn on_request(&mut self, request: &P::Request) -> Result<(), Status> {
        let reaction = self.protocol.on_request(request)?;
        let metrics = self.context.gauges.metrics();
        count_reaction(metrics, &reaction, P::requested_in(request));
        if let Reaction::Nacked(message) = &reaction {
            self.record.set_nack(message);
        }
        if let Some(names) = self.protocol.names() {
            self.context.gauges.set_names(names.values());
            self.record.set_names(names.keys());
        }
        Ok(())
    }

    fn refuse(&self, status: Status) -> Status {
        self.context.gauges.metrics().refused.inc();
        tracing::warn!(error = %status.message(), "refused SDS request");
        status
    }
}

impl<P: Protocol> Drop for StreamState<P> {
    fn drop(&mut self) {
        let _in_stream = self.span.enter();
        self.waits.report_abandoned();
    }
}

fn count_reaction(metrics: &SdsMetrics, reaction: &Reaction, names: &[String]) {
    match reaction {
        Reaction::Nacked(message) => {
            metrics.nacks.inc();
            // WARN, not ERROR: the bridge did its part; Envoy's reason (a config that does
            // not fit the certificate, an old Envoy) is the workload owner's to act on.
            tracing::warn!(secrets = ?names, envoy_error = %message, "Envoy rejected the secrets we sent (NACK); not resending until they change");
        }
        Reaction::Acked => {
            metrics.acks.inc();
        }
        Reaction::Stale => tracing::debug!("ignoring a request with a stale nonce"),
        Reaction::Answer => {}
    }
}
