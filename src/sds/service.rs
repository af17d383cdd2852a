//! The tonic `SecretDiscoveryService`: who is calling, and the per-stream event loop.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::secrets::{BundleMemo, MemoRef, View, Waiting};
use super::socket::PeerInfo;
use super::stream::{DeltaStream, Protocol, Reaction, SotwStream, StreamSettings};
use crate::identity::types::SharedBundles;
use crate::identity::{Cache, ProcRoot, Subscription, SvidState, Workload};
use crate::telemetry::metrics::{ApiLabel, Metrics, StreamGauges};

/// How a caller is mapped to a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallerIdentity {
    /// By the connecting process (Delegated Identity API).
    Process,
    /// Everyone gets the bridge's own identity (Workload API mode).
    Bridge,
}

pub struct SdsService {
    cache: Arc<Cache>,
    settings: Arc<StreamSettings>,
    caller_identity: CallerIdentity,
    proc_root: ProcRoot,
    shutdown: CancellationToken,
    fetch_timeout: Duration,
    bundle_memo: Arc<BundleMemo>,
}

impl SdsService {
    pub fn new(
        cache: Arc<Cache>,
        settings: StreamSettings,
        caller_identity: CallerIdentity,
        proc_root: ProcRoot,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            cache,
            settings: Arc::new(settings),
            caller_identity,
            proc_root,
            shutdown,
            fetch_timeout: Duration::from_secs(5),
            bundle_memo: Arc::default(),
        }
    }

    /// The workload behind a request: the process that opened the connection, pinned by
    /// its start time when the connection was accepted (spire-sds.md, DI-4).
    fn workload_of<T>(&self, request: &Request<T>) -> Result<Workload, Status> {
        if self.caller_identity == CallerIdentity::Bridge {
            return Ok(Workload::Bridge);
        }
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .ok_or_else(|| Status::internal("no peer information on this connection"))?;
        let Some(process) = peer.process else {
            return Err(Status::unavailable(
                "cannot identify the caller: its PID is not visible in svid-bridge's PID \
                 namespace (run svid-bridge with hostPID, beside the SPIRE agent)",
            ));
        };
        if !self.proc_root.is_alive(process) {
            return Err(Status::unavailable(format!(
                "the process that opened this connection (PID {}) has exited; reconnect",
                process.pid
            )));
        }
        Ok(Workload::Process(process))
    }

    fn context(&self, workload: Workload) -> Result<StreamContext, Status> {
        let subscription = self.cache.subscribe(workload).map_err(|limit| {
            self.cache.metrics().sds.streams_refused.inc();
            tracing::warn!(pid = pid_of(workload), %limit, "refused an SDS stream");
            Status::resource_exhausted(limit.to_string())
        })?;
        Ok(StreamContext {
            subscription,
            bundles: self.cache.bundles(),
            settings: Arc::clone(&self.settings),
            bundle_memo: Arc::clone(&self.bundle_memo),
            shutdown: self.shutdown.clone(),
            gauges: StreamGauges::new(Arc::clone(self.cache.metrics())),
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
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream<DiscoveryResponse>>, Status> {
        self.open_stream::<SotwStream>(request)
    }

    pub fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream<DeltaDiscoveryResponse>>, Status> {
        self.open_stream::<DeltaStream>(request)
    }

    fn open_stream<P: Protocol>(
        &self,
        request: Request<Streaming<P::Request>>,
    ) -> Result<Response<ResponseStream<P::Response>>, Status> {
        let workload = self.workload_of(&request)?;
        let context = self.context(workload)?;
        let span = tracing::info_span!("sds_stream", pid = pid_of(workload), api = P::API);
        let state = StreamState {
            context,
            inbound: request.into_inner(),
            protocol: P::new(Arc::clone(&self.settings)),
            waits: WaitLog::default(),
            span,
            ended: false,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(
            state,
            next_response,
        ))))
    }

    /// Unary, for tools: waits briefly for the names to resolve (a first call creates the
    /// workload's subscription), then answers with all of them or says what is missing.
    pub async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let workload = self.workload_of(&request)?;
        let mut context = self.context(workload)?;
        let mut stream = SotwStream::new(Arc::clone(&self.settings));
        if let Err(status) = stream.on_request(request.get_ref()) {
            context.gauges.metrics().sds.refused.inc();
            return Err(status);
        }
        let wanted = stream.requested().map_or(0, BTreeMap::len);
        let deadline = tokio::time::sleep(self.fetch_timeout);
        tokio::pin!(deadline);
        let mut last_waiting = BTreeMap::new();
        loop {
            if let Some(snapshot) = context.snapshot()? {
                let (response, waiting) =
                    stream.respond(&snapshot.view(&self.settings, &context.bundle_memo));
                match response {
                    Some(response) if waiting.is_empty() || wanted == 0 => {
                        context
                            .gauges
                            .metrics()
                            .sds
                            .responses
                            .get_or_create(&ApiLabel { api: "fetch" })
                            .inc();
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

fn pid_of(workload: Workload) -> i32 {
    match workload {
        Workload::Process(p) => p.pid,
        Workload::Bridge => 0,
    }
}

/// What one stream reads: its workload's SVIDs and the node's bundles.
struct StreamContext {
    subscription: Subscription,
    bundles: watch::Receiver<Option<SharedBundles>>,
    settings: Arc<StreamSettings>,
    bundle_memo: Arc<BundleMemo>,
    shutdown: CancellationToken,
    gauges: StreamGauges,
}

struct Snapshot {
    svids: crate::identity::types::SharedSvids,
    bundles: SharedBundles,
}

impl Snapshot {
    fn view<'a>(&'a self, settings: &'a StreamSettings, memo: &'a BundleMemo) -> View<'a> {
        View {
            svids: &self.svids,
            bundles: &self.bundles,
            extra_anchors: &settings.extra_trust_anchors,
            memo: Some(MemoRef {
                memo,
                snapshot: &self.bundles,
            }),
        }
    }
}

impl StreamContext {
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
    IdentityChanged,
    Closed,
}

async fn next_event<R>(
    context: &mut StreamContext,
    inbound: &mut Streaming<R>,
) -> Result<Event<R>, Status> {
    let shutdown = context.shutdown.clone();
    tokio::select! {
        request = inbound.next() => match request {
            Some(Ok(request)) => Ok(Event::Request(request)),
            // Client closed or cancelled (E15): a clean end, not an error (D-11).
            Some(Err(_)) | None => Ok(Event::Closed),
        },
        changed = context.changed() => changed.map(|()| Event::IdentityChanged),
        () = shutdown.cancelled() => Err(Status::unavailable("svid-bridge is shutting down")),
    }
}

/// Everything one stream owns; dropped when the client goes away (hyper drops the body).
struct StreamState<P: Protocol> {
    context: StreamContext,
    inbound: Streaming<P::Request>,
    protocol: P,
    waits: WaitLog,
    span: tracing::Span,
    /// An error was yielded: the stream ends with it.
    ended: bool,
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
                Event::Request(request) => {
                    if let Err(status) = self.on_request(&request) {
                        return Step::Fail(status);
                    }
                }
            }
            let snapshot = match self.context.snapshot() {
                Ok(Some(snapshot)) => snapshot,
                Ok(None) => continue,
                Err(status) => return Step::Fail(status),
            };
            let settings = &self.context.settings;
            let view = snapshot.view(settings, &self.context.bundle_memo);
            let (response, waiting) = self.protocol.respond(&view);
            self.context.gauges.set_waiting(!waiting.is_empty());
            self.waits.update(waiting);
            if let Some(response) = response {
                P::log_push(&response);
                self.context
                    .gauges
                    .metrics()
                    .sds
                    .responses
                    .get_or_create(&ApiLabel { api: P::API })
                    .inc();
                return Step::Push(response);
            }
        }
    }

    fn on_request(&mut self, request: &P::Request) -> Result<(), Status> {
        let metrics = self.context.gauges.metrics();
        match self.protocol.on_request(request) {
            Ok(reaction) => {
                count_reaction(metrics, &reaction, P::requested_in(request));
                if let Some(names) = self.protocol.names() {
                    self.context.gauges.set_names(names.values());
                }
                Ok(())
            }
            Err(status) => {
                metrics.sds.refused.inc();
                tracing::warn!(error = %status.message(), "refused SDS request");
                Err(status)
            }
        }
    }
}

impl<P: Protocol> Drop for StreamState<P> {
    fn drop(&mut self) {
        let _in_stream = self.span.enter();
        self.waits.report_abandoned();
    }
}

fn count_reaction(metrics: &Metrics, reaction: &Reaction, names: &[String]) {
    match reaction {
        Reaction::Nacked(message) => {
            metrics.sds.nacks.inc();
            tracing::error!(secrets = ?names, envoy_error = %message, "Envoy rejected the secrets we sent (NACK); not resending until they change");
        }
        Reaction::Acked => {
            metrics.sds.acks.inc();
        }
        Reaction::Stale => tracing::debug!("ignoring a request with a stale nonce"),
        Reaction::Answer => {}
    }
}
