//! The SDS socket, kept in place: if the file (or its directory) is deleted or replaced
//! underneath the running bridge — an operator's `rm`, a chart's init container linking its
//! own socket there — the bridge notices within a second and re-creates it, so Envoys that
//! reconnect find it again. Pods whose CSI mount shows a *deleted* directory keep seeing
//! the old, empty one (a bind mount pins the inode); they need a restart, which the CSI
//! volume stats report as abnormal.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, UdsConnectInfo};

use super::metrics::SdsMetrics;
use crate::identity::{Cache, PinnedProcess, ProcRoot};
use crate::uds::{self, AuthorityFixingStream, SocketAccess, UdsError};

/// How often the socket's presence is checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Which file the socket is: (device, inode).
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Who is on the other end of an SDS connection, recorded when it was accepted.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub uds: UdsConnectInfo,
    /// The connecting process, pinned at accept (its start time read once, a pidfd held):
    /// a later RPC on the same connection (held by a child, or passed on) is refused once
    /// that process is gone, even if its PID was reused meanwhile (A-2, A-4,
    /// DI-4), and its workload's subscription follows the same handle. `None` when the
    /// peer's PID is not visible in our PID namespace.
    pub process: Option<Arc<PinnedProcess>>,
}

/// `--max-connections`: connections beyond the limit are closed as soon as they are
/// accepted, so a runaway client cannot exhaust the bridge's file descriptors.
pub struct ConnectionLimit {
    pub max: usize,
    pub metrics: Arc<SdsMetrics>,
}

/// Logs about refused connections at most this often.
const WARN_REFUSED_EVERY: Duration = Duration::from_secs(10);

struct Slots {
    limit: ConnectionLimit,
    open: Arc<AtomicUsize>,
    last_warning: Option<Instant>,
}

impl Slots {
    fn take(&mut self) -> Option<Slot> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.limit.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.limit.metrics.connections_refused.inc();
            if self
                .last_warning
                .is_none_or(|at| at.elapsed() >= WARN_REFUSED_EVERY)
            {
                self.last_warning = Some(Instant::now());
                tracing::warn!(
                    limit = self.limit.max,
                    "refusing SDS connections: --max-connections reached"
                );
            }
            return None;
        }
        self.limit.metrics.connections.inc();
        Some(Slot {
            open: Arc::clone(&self.open),
            metrics: Arc::clone(&self.limit.metrics),
        })
    }
}

/// A connection's place under the limit, freed when the connection closes.
struct Slot {
    open: Arc<AtomicUsize>,
    metrics: Arc<SdsMetrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connections.dec();
    }
}

/// An accepted SDS connection and its [`PeerInfo`].
pub struct Connection {
    io: AuthorityFixingStream<UnixStream>,
    peer: PeerInfo,
    _slot: Slot,
}

impl Connection {
    fn accept(
        stream: UnixStream,
        proc_root: &ProcRoot,
        warm: Option<&Arc<Cache>>,
        slot: Slot,
    ) -> Self {
        let uds = stream.connect_info();
        let process = uds
            .peer_cred
            .and_then(|cred| cred.pid())
            .filter(|pid| *pid > 0)
            .and_then(|pid| proc_root.pin_pid(pid))
            .map(Arc::new);
        // Envoy's first request arrives after the HTTP/2 handshake: start (or join) the
        // caller's upstream subscription now, so the agent's answer races the handshake
        // instead of following it. Dropped at once; the cache's linger keeps it for the
        // stream that follows (#17).
        if let (Some(cache), Some(process)) = (warm, &process) {
            drop(cache.subscribe_process(process));
        }
        Self {
            io: AuthorityFixingStream::new(stream),
            peer: PeerInfo { uds, process },
            _slot: slot,
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Binds `path` and yields its connections until `shutdown`, re-binding whenever the file
/// at `path` stops being the socket we bound.
/// With `warm`, each caller's subscription starts at accept (see [`Connection::accept`]).
pub fn serve(
    path: PathBuf,
    proc_root: ProcRoot,
    warm: Option<Arc<Cache>>,
    limit: ConnectionLimit,
    shutdown: CancellationToken,
) -> Result<ReceiverStream<io::Result<Connection>>, UdsError> {
    let listener = uds::bind(&path, SocketAccess::World)?;
    let (tx, rx) = mpsc::channel(64);
    let slots = Slots {
        limit,
        open: Arc::new(AtomicUsize::new(0)),
        last_warning: None,
    };
    tokio::spawn(accept_loop(
        path, listener, proc_root, warm, slots, tx, shutdown,
    ));
    Ok(ReceiverStream::new(rx))
}

async fn accept_loop(
    path: PathBuf,
    mut listener: UnixListener,
    proc_root: ProcRoot,
    warm: Option<Arc<Cache>>,
    mut slots: Slots,
    tx: mpsc::Sender<io::Result<Connection>>,
    shutdown: CancellationToken,
) {
    let mut bound = file_identity(&path);
    let mut check = tokio::time::interval(CHECK_EVERY);
    let mut rebind_failing = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Over the limit, the stream is dropped here: closed at once.
                    let Some(slot) = slots.take() else { continue };
                    if tx.send(Ok(Connection::accept(stream, &proc_root, warm.as_ref(), slot))).await.is_err() {
                        return;
                    }
                }
                Err(err) => {
                    // EMFILE and friends: say so and give the process a moment to recover.
                    tracing::warn!(%err, "accepting an SDS connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = check.tick() => {
                // Cancelled but not yet seen by `select!`: the owner may be removing the
                // directory (a pod-mode volume's unpublish); re-creating it would undo that.
                if shutdown.is_cancelled() {
                    return;
                }
                if file_identity(&path) == bound {
                    continue;
                }
                match rebind(&path) {
                    Ok(new) => {
                        tracing::warn!(socket = %path.display(), "the SDS socket was removed or replaced; re-created it");
                        listener = new;
                        bound = file_identity(&path);
                        rebind_failing = false;
                    }
                    Err(err) if !rebind_failing => {
                        tracing::error!(socket = %path.display(), %err, "the SDS socket was removed or replaced and cannot be re-created; retrying every second");
                        rebind_failing = true;
                    }
                    Err(_) => {}
                }
            }
            () = shutdown.cancelled() => return,
        }
    }
}

fn rebind(path: &Path) -> Result<UnixListener, UdsError> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        // Searchable by all (pods' Envoys connect under any UID), writable by us only. Set
        // explicitly: the process umask (0077) would leave it 0700.
        let created = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir);
        if created.is_ok() {
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
    }
    uds::bind(path, SocketAccess::World)
}
