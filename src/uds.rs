//! Unix-domain listeners: stale-socket replacement, explicit permissions, peer credentials.
//!
//! Every socket the bridge serves (SDS, CSI, kubelet registration) is created here, so the
//! rules live in one place: a leftover socket from a previous run is replaced, anything else
//! at the path is refused (never delete a user's file), and the mode is set explicitly
//! rather than inherited from the umask.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

mod codec;
mod h2_authority;
mod inbound;

pub use codec::SmallBufferCodec;
pub use h2_authority::AuthorityFixingStream;
pub use inbound::InboundMessages;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UdsError {
    #[error("{path:?} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("removing stale socket {path:?}: {source}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("binding {path:?}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("setting mode {mode:o} on {path:?}: {source}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        #[source]
        source: io::Error,
    },
}

/// Who may connect to a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketAccess {
    /// Any local user (pods run Envoy under arbitrary UIDs, e.g. Istio's 1337). The socket
    /// file is 0666 but the directory stays non-writable for others, so pods can connect but
    /// not replace it; in a pod the CSI mount is read-only on top.
    World,
    /// Only the owner (root): the CSI and registration sockets, which the kubelet dials as
    /// root. Mirrors node-driver-registrar's umask 0077.
    Owner,
}

impl SocketAccess {
    fn mode(self) -> u32 {
        match self {
            SocketAccess::World => 0o666,
            SocketAccess::Owner => 0o600,
        }
    }
}

/// Binds `path`, replacing a stale socket left by a previous run, and sets its mode.
///
/// `run` sets the process umask to 0077 before binding anything, so between `bind` and
/// `chmod` the socket is never looser than its final mode.
pub fn bind(path: &Path, access: SocketAccess) -> Result<UnixListener, UdsError> {
    remove_stale_socket(path)?;
    let listener = bind_long(path).map_err(|source| UdsError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = access.mode();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        UdsError::Chmod {
            path: path.to_path_buf(),
            mode,
            source,
        }
    })?;
    Ok(listener)
}

/// `sun_path` holds 107 bytes; a longer path (a pod-mode volume under
/// `/var/lib/kubelet/plugins/csi.spiffe.io/pod-volumes/csi-<64 hex>/socket` is 127) is bound
/// through its directory's `/proc/self/fd/<n>` link, which is short whatever the depth.
fn bind_long(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::io::AsRawFd;
    const SUN_PATH_MAX: usize = 107;
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return UnixListener::bind(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return UnixListener::bind(path);
    };
    let dir = std::fs::File::open(dir)?;
    let short = Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    UnixListener::bind(short)
}

/// The connections a gRPC server built with `serve_with_incoming` accepts on `listener`.
/// Each carries the peer's credentials (`tonic::transport::server::UdsConnectInfo`) and
/// accepts requests whose `:authority` hyper would refuse, as gRPC C-core clients send
/// (see [`AuthorityFixingStream`]).
pub fn incoming(
    listener: UnixListener,
) -> impl futures::Stream<Item = io::Result<AuthorityFixingStream<UnixStream>>> + Send + Unpin + 'static
{
    use futures::StreamExt as _;
    tokio_stream::wrappers::UnixListenerStream::new(listener)
        .map(|conn| conn.map(AuthorityFixingStream::new))
}

/// A lazy gRPC channel to the server on the Unix socket at `path`: it connects on first use
/// and reconnects after a failure, so the server may start later. The URI is a
/// placeholder; the connector dials the socket.
pub fn channel(path: PathBuf) -> tonic::transport::Channel {
    endpoint().connect_with_connector_lazy(connector(path))
}

/// A gRPC channel connected now to the server on the Unix socket at `path`.
pub async fn connect(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    endpoint()
        .connect_with_connector(connector(path.to_path_buf()))
        .await
}

fn endpoint() -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::from_static("http://localhost")
}

fn connector(
    path: PathBuf,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<UnixStream>,
    Error = io::Error,
    Future = impl Future<Output = io::Result<hyper_util::rt::TokioIo<UnixStream>>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            UnixStream::connect(path)
                .await
                .map(hyper_util::rt::TokioIo::new)
        }
    })
}

/// Removes `path` if it is a socket; fine if absent; refuses any other kind of file.
pub fn remove_stale_socket(path: &Path) -> Result<(), UdsError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| UdsError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(UdsError::NotASocket {
            path: path.to_path_buf(),
        }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(UdsError::RemoveStale {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Removes our socket at shutdown; errors are only worth a log line.
pub fn remove_socket_on_shutdown(path: &Path) {
    if let Err(err) = remove_stale_socket(path) {
        tracing::warn!(path = %path.display(), %err, "could not remove socket at shutdown");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[tokio::test]
    async fn stale_socket_is_replaced_and_mode_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let first = bind(&path, SocketAccess::World).unwrap();
        drop(first); // leaves the file behind, as a crashed process would
        assert!(path.exists());
        let _second = bind(&path, SocketAccess::Owner).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        tokio::net::UnixStream::connect(&path).await.unwrap();
    }

    #[tokio::test]
    async fn a_regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("important");
        std::fs::write(&path, b"user data").unwrap();
        let err = bind(&path, SocketAccess::World).unwrap_err();
        assert!(matches!(err, UdsError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"user data");
    }

    #[tokio::test]
    async fn world_sockets_are_connectable_by_anyone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sds.sock");
        let _l = bind(&path, SocketAccess::World).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666);
    }

    /// A pod-mode volume's socket under the kubelet's plugin directory is longer than
    /// `sun_path`: it is bound anyway, where it was asked for.
    #[tokio::test]
    async fn paths_longer_than_sun_path_are_bound_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir
            .path()
            .join("plugins/csi.spiffe.io/pod-volumes")
            .join(format!("csi-{}", "a".repeat(64)));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("socket");
        assert!(path.as_os_str().len() > 107);
        let listener = bind(&path, SocketAccess::World).unwrap();
        assert!(
            std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_socket()
        );
        let addr = listener.local_addr().unwrap();
        assert!(addr.as_pathname().is_some());
    }
}
