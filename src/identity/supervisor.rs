//! One upstream stream turned into one `watch` channel, for as long as anybody reads it.
//!
//! The agent's subscriptions (a workload's SVIDs, the node's bundles; later, SVIDs by
//! selectors) all want the same care: open the stream, hand each item to its owner to
//! publish, and when the stream fails or ends, say so once, count the reconnect, wait with
//! capped backoff and open it again, while readers keep what was last published. That loop
//! lives here once; an [`Upstream`] says only how to connect and what an item means.

use std::fmt;
use std::ops::ControlFlow;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::IdentityError;

/// How long to wait before reconnect attempt `attempt` (0 for the first after a failure).
pub trait Backoff: fmt::Debug + Send + Sync + 'static {
    fn delay(&self, attempt: u32) -> Duration;
}

/// Exponential, capped, with jitter.
#[derive(Clone, Copy, Debug)]
pub struct ExponentialBackoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for ExponentialBackoff {
    /// Capped low enough that streams resume within about two seconds of the agent's
    /// return; the agent is a local socket, so a fast retry costs little.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1500),
        }
    }
}

impl Backoff for ExponentialBackoff {
    /// Jitter in [50 %, 100 %] of the delay, so that many workloads reconnecting after an
    /// agent restart do not arrive in lockstep.
    fn delay(&self, attempt: u32) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << attempt.min(16));
        let capped = exp.min(self.max);
        capped.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

pub type UpstreamStream<T> = BoxStream<'static, Result<T, IdentityError>>;

/// One kind of upstream subscription and the state it feeds.
pub trait Upstream: Send + 'static {
    type Item: Send;
    type State: Send + Sync;

    /// For log lines: "SVID", "bundle".
    const WHAT: &'static str;

    /// Opens one subscription.
    fn connect(&mut self) -> BoxFuture<'static, Result<UpstreamStream<Self::Item>, IdentityError>>;

    /// Before each (re)connect; `Break` ends the supervision for good.
    fn before_connect(&mut self, _state: &watch::Sender<Self::State>) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }

    /// Judges one item before it counts: `Continue(Some(_))` is good data (the
    /// subscription delivers: the backoff resets, it counts as connected),
    /// `Continue(None)` is ignored, `Break` ends the supervision for good.
    fn check(
        &mut self,
        item: Self::Item,
        state: &watch::Sender<Self::State>,
    ) -> ControlFlow<(), Option<Self::Item>>;

    /// Publishes a good item to the readers.
    fn publish(&mut self, item: Self::Item, state: &watch::Sender<Self::State>);

    /// The subscription failed or ended; readers keep what was published, unless this
    /// says otherwise.
    fn on_disconnect(&mut self, _state: &watch::Sender<Self::State>) {}
}

/// The handles one kind of subscription updates: connected subscriptions, reconnects.
#[derive(Clone, Debug, Default)]
pub struct SupervisorMetrics {
    pub connected: Gauge,
    pub reconnects: Counter,
}

/// Follows `upstream` into `state` until it ends for good or `shutdown`. `api` and the
/// current span (the workload, say) go into the log lines.
pub async fn supervise<U: Upstream>(
    mut upstream: U,
    state: &watch::Sender<U::State>,
    backoff: &dyn Backoff,
    metrics: &SupervisorMetrics,
    api: &'static str,
    shutdown: &CancellationToken,
) {
    let mut attempt = 0u32;
    let mut failing = false;
    loop {
        if upstream.before_connect(state).is_break() {
            return;
        }
        let outcome = follow(&mut upstream, state, metrics, &mut attempt, &mut failing).await;
        match outcome {
            Ok(ControlFlow::Break(())) => return,
            Ok(ControlFlow::Continue(())) if !failing => tracing::warn!(
                api,
                "agent closed the {} subscription; reconnecting",
                U::WHAT
            ),
            Err(err) if !failing => tracing::warn!(
                api,
                %err,
                "{} subscription failed; retrying with backoff, serving the last good {}s meanwhile",
                U::WHAT,
                U::WHAT
            ),
            _ => {}
        }
        failing = true;
        upstream.on_disconnect(state);
        metrics.reconnects.inc();
        let delay = backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Follows one subscription until it ends (`Continue`) or the upstream ends supervision
/// (`Break`). Resets `attempt` once data flows, so the backoff grows only while the agent
/// keeps failing.
async fn follow<U: Upstream>(
    upstream: &mut U,
    state: &watch::Sender<U::State>,
    metrics: &SupervisorMetrics,
    attempt: &mut u32,
    failing: &mut bool,
) -> Result<ControlFlow<()>, IdentityError> {
    let mut stream = upstream.connect().await?;
    let mut connected = None;
    while let Some(item) = stream.next().await {
        let item = match upstream.check(item?, state) {
            ControlFlow::Break(()) => return Ok(ControlFlow::Break(())),
            ControlFlow::Continue(None) => continue,
            ControlFlow::Continue(Some(item)) => item,
        };
        *attempt = 0;
        connected.get_or_insert_with(|| Connected::new(&metrics.connected));
        if std::mem::take(failing) {
            tracing::info!("{} subscription recovered", U::WHAT);
        }
        upstream.publish(item, state);
    }
    Ok(ControlFlow::Continue(()))
}

/// Counts a subscription as connected while it lives.
struct Connected(Gauge);

impl Connected {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Resolves once nobody has read `state` for `linger`. When its last receiver is dropped,
/// `mark` notes the moment; after `linger`, `still_idle` gets that mark back and decides,
/// under the owner's lock, whether nobody subscribed meanwhile (the owner hands out new
/// receivers under the same lock). If somebody did, wait for the readers again.
pub async fn until_unread<S, M>(
    state: &watch::Sender<S>,
    linger: Duration,
    mut mark: impl FnMut() -> M,
    mut still_idle: impl FnMut(M) -> bool,
) {
    loop {
        state.closed().await;
        let marked = mark();
        tokio::time::sleep(linger).await;
        if still_idle(marked) {
            return;
        }
    }
}
