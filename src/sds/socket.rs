//! The SDS socket, kept in place: if the file (or its directory) is deleted or replaced
//! underneath the running bridge — an operator's `rm`, a chart's init container linking its
//! own socket there — the bridge notices within a second and re-creates it, so Envoys that
//! reconnect find it again. Pods whose CSI mount shows a *deleted* directory keep seeing
//! the old, empty one (a bind mount pins the inode); they need a restart, which the CSI
//! volume stats report as abnormal.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::uds::{self, AuthorityFixingStream, SocketAccess, UdsError};

/// How often the socket's presence is checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Which file the socket is: (device, inode).
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Binds `path` and yields its connections until `shutdown`, re-binding whenever the file
/// at `path` stops being the socket we bound.
pub fn serve(
    path: PathBuf,
    shutdown: CancellationToken,
) -> Result<ReceiverStream<io::Result<AuthorityFixingStream<UnixStream>>>, UdsError> {
    let listener = uds::bind(&path, SocketAccess::World)?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(path, listener, tx, shutdown));
    Ok(ReceiverStream::new(rx))
}

async fn accept_loop(
    path: PathBuf,
    mut listener: UnixListener,
    tx: mpsc::Sender<io::Result<AuthorityFixingStream<UnixStream>>>,
    shutdown: CancellationToken,
) {
    let mut bound = file_identity(&path);
    let mut check = tokio::time::interval(CHECK_EVERY);
    let mut rebind_failing = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if tx.send(Ok(AuthorityFixingStream::new(stream))).await.is_err() {
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
        // Readable by all (pods' Envoys connect under any UID), writable by us only.
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir);
    }
    uds::bind(path, SocketAccess::World)
}
