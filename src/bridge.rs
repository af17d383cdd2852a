//! `svid-bridge run`: wires the identity source, the cache, the SDS server and the CSI
//! plugin together, and shuts them down in order on SIGTERM or SIGINT.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, IdentitySourceKind};
use crate::identity::{Cache, CacheOptions, DelegatedSource, ProcRoot, Source, WorkloadApiSource};
use crate::sds::{CallerIdentity, SdsError, SdsServer, StreamSettings};
use crate::sds::names::SpecialNames;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    #[error(transparent)]
    Sds(#[from] SdsError),
    #[error(transparent)]
    Csi(#[from] crate::csi::CsiError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs until SIGTERM/SIGINT, or until a server fails.
pub async fn run(config: Config) -> Result<(), BridgeError> {
    // Sockets are chmod'ed explicitly after bind; a tight umask keeps the gap closed.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone()).map_err(BridgeError::Signals)?;
    let (source, caller_identity): (Arc<dyn Source>, _) = match config.identity_source {
        IdentitySourceKind::Delegated => (Arc::new(DelegatedSource::new(config.admin_socket.clone())), CallerIdentity::Process),
        IdentitySourceKind::WorkloadApi => (Arc::new(WorkloadApiSource::new(config.agent_socket.clone())), CallerIdentity::Bridge),
    };
    tracing::info!(
        version = crate::VERSION,
        identity_source = source.api(),
        sds_socket = %config.sds.socket.display(),
        csi = config.csi.is_some(),
        "starting svid-bridge"
    );
    let proc_root = ProcRoot::default();
    let cache = Cache::new(source, CacheOptions { proc_root: proc_root.clone(), ..CacheOptions::default() }, shutdown.clone());
    let settings = StreamSettings {
        special: SpecialNames {
            default_svid: config.sds.default_svid_name.clone(),
            default_bundle: config.sds.default_bundle_name.clone(),
            all_bundles: config.sds.default_all_bundles_name.clone(),
        },
        validation_disabled: config.sds.disable_spiffe_cert_validation,
        extra_trust_anchors: config.sds.extra_trust_anchors.clone(),
        ..StreamSettings::default()
    };
    let (serving_tx, serving_rx) = watch::channel(false);
    let sds = SdsServer::new(config.sds.socket.clone(), cache, settings, caller_identity, proc_root, shutdown.clone());
    let sds_task = tokio::spawn(sds.serve(serving_tx, shutdown.clone()));
    let (registration_tx, _registration) = watch::channel(crate::csi::RegistrationStatus::NotStarted);
    let csi_task = config.csi.clone().map(|csi| tokio::spawn(start_csi(csi, serving_rx, shutdown.clone(), registration_tx)));
    let result = wait_for_servers(sds_task, csi_task, &shutdown).await;
    tracing::info!("svid-bridge stopped");
    result
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
    registration: watch::Sender<crate::csi::RegistrationStatus>,
) -> Result<(), BridgeError> {
    crate::csi::serve_with_registration(config, sds_serving, shutdown, registration).await?;
    Ok(())
}
