//! `svid-bridge run`: wires the identity source, the cache, the SDS server and the CSI
//! plugin together, and shuts them down in order on SIGTERM or SIGINT.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, IdentitySourceKind};
use crate::csi::pod_mode::PodVolumeHandler;
use crate::csi::{CsiMetrics, RegistrationReadiness, RegistrationStatus};
use crate::identity::{Cache, CacheOptions, DelegatedSource, ProcRoot, Source, WorkloadApiSource};
use crate::sds::{CallerIdentity, SdsError, SdsServer, Serving};
use crate::telemetry::health::{self, Readiness};
use crate::telemetry::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    #[error(transparent)]
    Sds(#[from] SdsError),
    #[error(transparent)]
    Csi(#[from] crate::csi::CsiError),
    #[error(transparent)]
    Pod(#[from] crate::pod::PodError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs until SIGTERM/SIGINT, or until a server fails.
pub async fn run(config: Config) -> Result<(), BridgeError> {
    // Sockets are chmod'ed explicitly after bind; a tight umask keeps the gap closed.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone()).map_err(BridgeError::Signals)?;
    let (source, caller_identity) = identity_source(&config);
    let open_files = raise_open_file_limit();
    tracing::info!(
        version = crate::VERSION,
        open_files,
        identity_source = source.api(),
        sds_socket = %config.sds.socket.display(),
        csi = config.csi.is_some(),
        "starting svid-bridge"
    );
    let metrics = Arc::new(Metrics::new());
    let proc_root = ProcRoot::default();
    let pods = crate::k8s::watch::start(&config.kubernetes, proc_root.path(), &shutdown);
    let cache_options = CacheOptions {
        proc_root: proc_root.clone(),
        metrics: Arc::clone(&metrics),
        max_streams_per_workload: config.sds.limits.max_streams_per_process,
        ..CacheOptions::default()
    };
    let cache = Cache::new(source, cache_options, shutdown.clone());

    let (serving_tx, serving_rx) = watch::channel(false);
    let sds = SdsServer::from_config(
        config.sds.clone(),
        Arc::clone(&cache),
        caller_identity,
        proc_root,
        shutdown.clone(),
    )
    .with_pods(pods.clone());
    // One poster of Events (clones share its limits), so that every reason shares the
    // per-node bound.
    let events = crate::k8s::events::PodEvents::new(&pods);
    if let Some(events) = events.clone() {
        tokio::spawn(post_pod_events(
            sds.workloads_reporter(),
            events,
            config.kubernetes.wait_event_after,
            agent_socket(&config).to_path_buf(),
            shutdown.clone(),
        ));
    }
    let pod_volumes = match &config.pod {
        Some(pod_config) => {
            let parts = PodParts {
                sds: &sds,
                pods: &pods,
                events,
                metrics: &metrics,
            };
            Some(start_pod_volumes(pod_config, &config, parts, &shutdown).await?)
        }
        None => None,
    };
    let workloads: Arc<dyn health::DebugReport> = Arc::new(sds.workloads_reporter());
    let workloads = Some(workloads);
    let sds_task = tokio::spawn(sds.serve(serving_tx, shutdown.clone()));

    let (registration_tx, registration_rx) = watch::channel(RegistrationStatus::NotStarted);
    let csi_metrics = Arc::new(CsiMetrics::register(&metrics));
    csi_metrics.follow_registration(registration_rx.clone());
    let registers = config.csi.as_ref().is_some_and(|c| c.register_with_kubelet);
    let csi_task = config.csi.clone().map(|csi| {
        tokio::spawn(start_csi(
            csi,
            serving_rx.clone(),
            shutdown.clone(),
            registration_tx,
            csi_metrics,
            pod_volumes,
        ))
    });

    tokio::spawn(release_startup_code_once_serving(
        serving_rx.clone(),
        shutdown.clone(),
    ));
    let mut readiness = Readiness::new().with(Serving(serving_rx));
    if registers {
        readiness = readiness.with(RegistrationReadiness(registration_rx));
    }
    let readiness = Arc::new(readiness.with(cache));
    let endpoints: Vec<_> = [config.health_addr, config.metrics_addr]
        .into_iter()
        .flatten()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if !endpoints.is_empty() {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(err) =
                health::serve(endpoints, metrics, readiness, workloads, shutdown.clone()).await
            {
                tracing::error!(%err, "metrics and health endpoints failed; stopping");
                shutdown.cancel();
            }
        });
    }
    let result = wait_for_servers(sds_task, csi_task, &shutdown).await;
    tracing::info!("svid-bridge stopped");
    result
}

fn identity_source(config: &Config) -> (Arc<dyn Source>, CallerIdentity) {
    match config.identity_source {
        IdentitySourceKind::Delegated => (
            Arc::new(DelegatedSource::new(config.admin_socket.clone())),
            CallerIdentity::Process,
        ),
        IdentitySourceKind::WorkloadApi => (
            Arc::new(WorkloadApiSource::new(config.agent_socket.clone())),
            CallerIdentity::Bridge,
        ),
    }
}

/// The socket of the agent API the identity source uses (named in Events).
fn agent_socket(config: &Config) -> &std::path::Path {
    match config.identity_source {
        IdentitySourceKind::Delegated => &config.admin_socket,
        IdentitySourceKind::WorkloadApi => &config.agent_socket,
    }
}

/// Posts Events on pods: every few seconds for streams that have waited longer than
/// `wait_after` (`WaitingForIdentity`), every [`crate::k8s::expiry::CHECK_EVERY`] for served
/// SVIDs near expiry while the agent is unreachable (`SVIDNearExpiry`). The limits are
/// `PodEvents`'s.
async fn post_pod_events(
    reporter: crate::sds::workloads::WorkloadsReporter,
    mut events: crate::k8s::events::PodEvents,
    wait_after: Option<std::time::Duration>,
    agent_socket: std::path::PathBuf,
    shutdown: CancellationToken,
) {
    use crate::k8s::{events, expiry};
    let mut waits = tokio::time::interval(std::time::Duration::from_secs(5));
    let mut expiries = tokio::time::interval(expiry::CHECK_EVERY);
    loop {
        tokio::select! {
            _ = waits.tick(), if wait_after.is_some() => {
                if let Some(after) = wait_after {
                    events.publish_waits(reporter.waits_over(after)).await;
                }
            }
            _ = expiries.tick() => {
                let health = reporter.cache.health();
                if health.agent_reachable {
                    continue;
                }
                let now = crate::clock::unix_now();
                let near = expiry::near_expiry(&reporter.served_svids(), false, &agent_socket, now);
                for n in near {
                    let posted = events
                        .warn(&n.pod, None, events::SVID_NEAR_EXPIRY, events::ACTION_RENEW_SVID, n.note.clone())
                        .await;
                    if posted == events::Posted::Posted {
                        tracing::warn!(pod = %n.pod, note = %n.note, "posted an SVIDNearExpiry Event");
                    }
                }
            }
            () = shutdown.cancelled() => return,
        }
    }
}

/// How long after the SDS socket first serves start-up is taken to be over: the agent's
/// first answers, the kubelet's registration call and the pod view's first list have come
/// in by then on a healthy node (a page released too early only comes back as a minor fault).
const STARTUP_SETTLES_AFTER: Duration = Duration::from_secs(10);

/// Gives back the executable's start-up-only code pages once, after serving has settled
/// (`crate::memory`; BENCHMARKS.md §4.5).
async fn release_startup_code_once_serving(
    mut serving: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = shutdown.cancelled() => return,
        served = serving.wait_for(|serving| *serving) => if served.is_err() { return },
    }
    tokio::select! {
        _ = shutdown.cancelled() => {}
        () = tokio::time::sleep(STARTUP_SETTLES_AFTER) => {
            match crate::memory::release_startup_code() {
                Ok(bytes) => tracing::debug!(kib = bytes / 1024, "released start-up code pages"),
                Err(err) => tracing::info!(%err, "could not release start-up code pages; serving as before"),
            }
        }
    }
}

async fn wait_for_servers(
    sds: tokio::task::JoinHandle<Result<(), SdsError>>,
    csi: Option<tokio::task::JoinHandle<Result<(), BridgeError>>>,
    shutdown: &CancellationToken,
) -> Result<(), BridgeError> {
    // Whichever server ends first (error or not) stops the other.
    let sds_result = async {
        let r = sds.await.unwrap_or(Ok(()));
        shutdown.cancel();
        r.map_err(BridgeError::from)
    };
    let csi_result = async {
        let r = match csi {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        };
        if r.is_err() {
            shutdown.cancel();
        }
        r
    };
    let (sds_result, csi_result) = tokio::join!(sds_result, csi_result);
    sds_result.and(csi_result)
}

fn spawn_signal_handler(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
            () = shutdown.cancelled() => return,
        }
        shutdown.cancel();
    });
    Ok(())
}

async fn start_csi(
    config: crate::config::CsiConfig,
    sds_serving: watch::Receiver<bool>,
    shutdown: CancellationToken,
    registration: watch::Sender<RegistrationStatus>,
    metrics: Arc<CsiMetrics>,
    pod_volumes: Option<Arc<dyn PodVolumeHandler>>,
) -> Result<(), BridgeError> {
    crate::csi::serve_with_pod_volumes(
        config,
        sds_serving,
        shutdown,
        registration,
        metrics,
        pod_volumes,
    )
    .await?;
    Ok(())
}

/// What pod-mode volumes share with the rest of the bridge.
struct PodParts<'a> {
    sds: &'a SdsServer,
    pods: &'a crate::k8s::Pods,
    events: Option<crate::k8s::events::PodEvents>,
    metrics: &'a Arc<crate::telemetry::metrics::Metrics>,
}

/// Pod-scoped identity (#15): recovers the volumes published before a restart before the
/// CSI socket opens, so the kubelet's calls never race the recovery.
async fn start_pod_volumes(
    pod_config: &crate::pod::PodConfig,
    config: &Config,
    parts: PodParts<'_>,
    shutdown: &CancellationToken,
) -> Result<Arc<dyn PodVolumeHandler>, BridgeError> {
    let agent = Arc::new(DelegatedSource::new(config.admin_socket.clone()));
    let volumes = crate::pod::PodVolumes::new(
        pod_config.clone(),
        crate::pod::NodeParts {
            sds: parts.sds.pod_sds(),
            agent,
            backoff: CacheOptions::default().backoff,
            pods: parts.pods.clone(),
            events: parts.events,
        },
        parts.metrics,
        shutdown.clone(),
    )?;
    volumes.recover().await;
    Ok(volumes)
}

/// Every SDS connection and every workload's process handle is a file descriptor, and the
/// defaults allow 10,000 connections; a container's soft limit is often 1,024. Raise it to
/// the hard limit, as the Go runtime does for the SPIRE agent. Returns the limit in force.
fn raise_open_file_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        ..limit
    };
    // `None` is unlimited.
    let below_hard = match (limit.current, limit.maximum) {
        (Some(current), Some(maximum)) => current < maximum,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if below_hard && setrlimit(Resource::Nofile, raised).is_ok() {
        return raised.current.unwrap_or(u64::MAX);
    }
    limit.current.unwrap_or(u64::MAX)
}
