//! One published pod-mode volume at run time: its socket (SPIFFE Workload API + SDS, for
//! this pod only), its files, and its hold on the pod's subscription.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::files::{self, AtomicDir, JwtFile};
use super::metrics::PodMetrics;
use super::state::VolumeRecord;
use crate::identity::jwt::{self, JwtBundles, JwtSvid};
use crate::identity::types::SharedBundles;
use crate::identity::{
    DelegatedSource, IdentityError, SelectorSet, Subscription, SvidState, Workload,
};
use crate::k8s::PodRef;
use crate::sds::PodSds;
use crate::workload::{WorkloadApiService, WorkloadIdentity};

/// The per-pod socket's name inside the volume: what Istio's `workload-spiffe-uds/socket`
/// and a SPIFFE client's `unix:///…/socket` name.
pub const SOCKET_NAME: &str = "socket";

/// What the files of a volume have come to, for a publish that waits for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilesState {
    Pending,
    Written,
    /// The agent answered, with no SVID for these selectors (PI-5, PI-7).
    NoEntry,
    Failed(String),
}

/// The pod's identity as the Workload API server sees it.
pub struct PodIdentity {
    svids: watch::Receiver<SvidState>,
    bundles: watch::Receiver<Option<SharedBundles>>,
    jwt_bundles: watch::Receiver<Option<JwtBundles>>,
    agent: Arc<DelegatedSource>,
    selectors: SelectorSet,
    pod: PodRef,
}

impl WorkloadIdentity for PodIdentity {
    fn svids(&self) -> watch::Receiver<SvidState> {
        self.svids.clone()
    }

    fn bundles(&self) -> watch::Receiver<Option<SharedBundles>> {
        self.bundles.clone()
    }

    fn jwt_bundles(&self) -> watch::Receiver<Option<JwtBundles>> {
        self.jwt_bundles.clone()
    }

    fn fetch_jwt_svids(
        &self,
        audience: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<JwtSvid>, IdentityError>> {
        let agent = Arc::clone(&self.agent);
        let selectors = self.selectors.to_proto();
        Box::pin(async move { jwt::fetch_jwt_svids(&agent, &selectors, &audience).await })
    }

    fn describe(&self) -> String {
        format!("pod {} (selectors {})", self.pod, self.selectors)
    }
}

/// What every volume shares: the node's cache and agent, the node's SDS settings.
pub struct Shared {
    pub sds: PodSds,
    pub agent: Arc<DelegatedSource>,
    pub jwt_bundles: watch::Receiver<Option<JwtBundles>>,
    pub metrics: PodMetrics,
}

pub struct RunningVolume {
    pub record: VolumeRecord,
    pub dir: PathBuf,
    pub files: watch::Receiver<FilesState>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningVolume {
    /// Starts serving `record`'s pod from `dir` (its mounted tmpfs).
    pub fn start(
        shared: &Shared,
        record: VolumeRecord,
        dir: PathBuf,
        shutdown: &CancellationToken,
    ) -> Result<Self, String> {
        let selectors = record.selector_set();
        let pod = PodRef {
            namespace: record.pod.namespace.clone(),
            name: record.pod.name.clone(),
            container: None,
        };
        let stop = shutdown.child_token();
        let mut subscription = shared
            .sds
            .cache()
            .subscribe(Workload::Selectors(selectors.clone()))
            .map_err(|limit| limit.to_string())?;
        let identity = Arc::new(PodIdentity {
            svids: subscription.svids().clone(),
            bundles: shared.sds.cache().bundles(),
            jwt_bundles: shared.jwt_bundles.clone(),
            agent: Arc::clone(&shared.agent),
            selectors: selectors.clone(),
            pod: pod.clone(),
        });
        let socket = dir.join(SOCKET_NAME);
        let incoming = shared
            .sds
            .listen(socket.clone(), stop.clone())
            .map_err(|err| err.to_string())?;
        let sds = shared
            .sds
            .service_for(selectors.clone(), pod.clone(), stop.clone());
        let workload_api = WorkloadApiService::new(
            Arc::clone(&identity) as Arc<dyn WorkloadIdentity>,
            stop.clone(),
        )
        .into_server();
        let max_streams = shared.sds.max_streams_per_connection();
        let server_stop = stop.clone();
        let span = tracing::info_span!("pod_volume", pod = %pod, volume_id = %record.volume_id);
        let server = tokio::spawn(tracing::Instrument::instrument(
            async move {
                let served = tonic::transport::Server::builder()
                    .max_concurrent_streams(max_streams)
                    .add_service(sds)
                    .add_service(workload_api)
                    .serve_with_incoming_shutdown(incoming, server_stop.cancelled())
                    .await;
                if let Err(err) = served {
                    tracing::error!(%err, "pod socket server failed");
                }
                crate::uds::remove_socket_on_shutdown(&socket);
            },
            span.clone(),
        ));
        let mut tasks = vec![server];
        tasks.push(tokio::spawn(tracing::Instrument::instrument(
            watch_identity(
                subscription.svids().clone(),
                selectors,
                shared.metrics.clone(),
                stop.clone(),
            ),
            span.clone(),
        )));
        let (files_tx, files) = watch::channel(FilesState::Pending);
        if record.options.files {
            let writer = FileWriter {
                dir: AtomicDir::new(dir.clone(), record.options.group),
                record: record.clone(),
                identity,
                metrics: shared.metrics.clone(),
                state: files_tx,
            };
            tasks.push(tokio::spawn(tracing::Instrument::instrument(
                writer.run(subscription, stop.clone()),
                span,
            )));
        } else {
            // The socket's streams hold their own subscriptions; this one keeps the pod's
            // upstream open while no client is connected, so a first call is answered at once.
            let hold = stop.clone();
            tasks.push(tokio::spawn(async move {
                hold.cancelled().await;
                drop(subscription);
            }));
        }
        Ok(Self {
            record,
            dir,
            files,
            stop,
            tasks,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the server and the writer and releases the subscription.
    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                tracing::warn!(volume_id = %self.record.volume_id, "a pod volume task did not stop in 5 s");
            }
        }
    }
}

/// Tells an operator (log, metric) when the agent has no entry for the pod's selectors:
/// entries that need container-level selectors can never match here (PI-22, PI-26).
async fn watch_identity(
    mut svids: watch::Receiver<SvidState>,
    selectors: SelectorSet,
    metrics: PodMetrics,
    stop: CancellationToken,
) {
    let mut without = false;
    loop {
        let empty =
            matches!(&*svids.borrow_and_update(), SvidState::Ready(s) if s.svids.is_empty());
        if empty != without {
            without = empty;
            if empty {
                metrics.without_identity.inc();
                tracing::warn!(
                    %selectors,
                    "no SPIRE registration entry matches this pod-mode volume's selectors; \
                     entries with container-level selectors (k8s:container-name, \
                     k8s:container-image) cannot match a volume"
                );
            } else {
                metrics.without_identity.dec();
                tracing::info!("the agent now issues SVIDs for this pod-mode volume");
            }
        }
        tokio::select! {
            changed = svids.changed() => if changed.is_err() { break },
            () = stop.cancelled() => break,
        }
    }
    if without {
        metrics.without_identity.dec();
    }
}

/// Keeps a volume's files current: on every SVID or bundle change, and each JWT-SVID at
/// half its lifetime (spiffe-helper's rule, PI-36, PI-56).
struct FileWriter {
    dir: AtomicDir,
    record: VolumeRecord,
    identity: Arc<PodIdentity>,
    metrics: PodMetrics,
    state: watch::Sender<FilesState>,
}

/// A fetched JWT-SVID and when to fetch the next.
struct HeldJwt {
    audience: String,
    token: Option<String>,
    refresh_at: tokio::time::Instant,
}

/// Retry a failed JWT fetch after this long.
const JWT_RETRY: Duration = Duration::from_secs(5);

impl FileWriter {
    async fn run(self, mut subscription: Subscription, stop: CancellationToken) {
        let mut bundles = self.identity.bundles.clone();
        let mut jwt_bundles = self.identity.jwt_bundles.clone();
        let now = tokio::time::Instant::now();
        let mut jwts: Vec<HeldJwt> = (self.record.options.jwt_audiences.iter())
            .map(|audience| HeldJwt {
                audience: audience.clone(),
                token: None,
                refresh_at: now,
            })
            .collect();
        loop {
            let svids = match &*subscription.svids().borrow_and_update() {
                SvidState::Ready(svids) => Some(Arc::clone(svids)),
                SvidState::Pending => None,
                SvidState::Gone => return,
            };
            if let Some(svids) = svids {
                if svids.svids.is_empty() {
                    self.state.send_replace(FilesState::NoEntry);
                } else {
                    self.refresh_due_jwts(&mut jwts).await;
                    let set = bundles.borrow_and_update().clone();
                    if let Some(set) = set {
                        self.write(&svids, &set, &jwts, &jwt_bundles.borrow_and_update());
                    }
                }
            }
            let next_jwt = jwts.iter().map(|j| j.refresh_at).min();
            let jwt_due = async {
                match next_jwt {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = subscription.svids().changed() => if changed.is_err() { return },
                changed = bundles.changed() => if changed.is_err() { return },
                changed = jwt_bundles.changed(), if !jwts.is_empty() => if changed.is_err() { return },
                () = jwt_due => {}
                () = stop.cancelled() => return,
            }
        }
    }

    async fn refresh_due_jwts(&self, jwts: &mut [HeldJwt]) {
        let now = tokio::time::Instant::now();
        for held in jwts.iter_mut().filter(|j| j.refresh_at <= now) {
            match self
                .identity
                .fetch_jwt_svids(vec![held.audience.clone()])
                .await
            {
                Ok(svids) => {
                    self.metrics.jwt_refreshes.inc();
                    // The default identity: the first, as for X.509 (B-7).
                    let Some(svid) = svids.into_iter().next() else {
                        held.refresh_at = now + JWT_RETRY;
                        continue;
                    };
                    held.refresh_at = now + half_life(&svid);
                    held.token = Some(svid.token);
                }
                Err(err) => {
                    self.metrics.jwt_failures.inc();
                    tracing::warn!(audience = %held.audience, %err, "cannot fetch a JWT-SVID for the pod's files; retrying");
                    held.refresh_at = now + JWT_RETRY;
                }
            }
        }
    }

    fn write(
        &self,
        svids: &crate::identity::WorkloadSvids,
        bundles: &crate::identity::BundleSet,
        jwts: &[HeldJwt],
        jwt_bundles: &Option<JwtBundles>,
    ) {
        let jwt_files: Vec<JwtFile> = jwts
            .iter()
            .filter_map(|held| {
                Some(JwtFile {
                    audience: held.audience.clone(),
                    token: held.token.clone()?,
                })
            })
            .collect();
        let jwt_bundles = jwt_bundles.as_deref().filter(|_| !jwts.is_empty());
        let written = files::render(
            self.record.options.layout,
            svids,
            bundles,
            &jwt_files,
            jwt_bundles,
        )
        .and_then(|rendered| self.dir.write(&rendered));
        match written {
            Ok(count) => {
                self.metrics.file_sets_written.inc();
                self.metrics.files_written.inc_by(count as u64);
                tracing::debug!(files = count, "pod volume files written");
                self.state.send_replace(FilesState::Written);
            }
            Err(err) => {
                tracing::error!(%err, "cannot write the pod volume's files");
                if *self.state.borrow() != FilesState::Written {
                    self.state.send_replace(FilesState::Failed(err.to_string()));
                }
            }
        }
    }
}

/// Half the token's remaining lifetime, at least a second (PI-36).
fn half_life(svid: &JwtSvid) -> Duration {
    let now = crate::clock::unix_now();
    let left = (svid.expires_at - now).max(2);
    Duration::from_secs(u64::try_from(left / 2).unwrap_or(1).max(1))
}
