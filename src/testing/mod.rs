//! The harness every integration test uses: the real peers (SPIRE server + agent, Envoy,
//! csi-sanity) as child processes, on loopback and in private temp directories, so tests can
//! run in parallel (docs/behaviours.md, "Real peers in tests").
//!
//! - Peers live in `<CARGO_MANIFEST_DIR>/target/peers/bin` (`make peers`), or in
//!   `$SVID_BRIDGE_PEERS_DIR`. A missing peer panics: tests never skip.
//! - Every process's stdout/stderr go to files in its temp dir. On drop a process gets SIGTERM,
//!   then SIGKILL after a deadline; when the test is panicking the logs' tails are printed.
//! - Synchronise with [`wait_until`] / [`wait_until_async`], never with fixed sleeps.
//! - Temp dirs are under `<CARGO_MANIFEST_DIR>/target/test-tmp/` (same filesystem as the
//!   peers, so [`workload_binary`] can hard-link them). They are removed on drop, except when
//!   the test panics (the path is printed) or with `SVID_BRIDGE_KEEP_TMP=1`.
//! - Everything is blocking std code (`std::process`), usable from sync and async tests; in
//!   an async test that must keep its runtime going while it waits, use
//!   [`wait_until_async`].
//!
//!
//! Compiled once, into the library, behind the `testing` feature: the crate's own
//! dev-dependency on itself turns the feature on for `tests/` and `benches/`, which use it as
//! `use crate::testing as common;`. A release build never contains it.
// A test kit fails loudly: a panic with the reason is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

pub mod bridge;
pub mod cluster;
pub mod csi;
pub mod envoy;
pub mod http;
pub mod k8s_deploy;
pub mod load;
pub mod metrics;
pub mod mount_ns;
pub mod oidc;
pub mod postgres;
pub mod proc;
pub mod spire;
pub mod workload;

pub use envoy::{Envoy, EnvoyOptions};
pub use proc::{LogSource, Proc, wait_until, wait_until_async, wait_until_with};
pub use spire::{EntrySpec, Spire, SpireOptions, X509Fetch};

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

/// The crate root (where Cargo.toml is).
pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the peers are installed: `$SVID_BRIDGE_PEERS_DIR` or `target/peers/bin`.
pub fn peers_dir() -> PathBuf {
    match std::env::var_os("SVID_BRIDGE_PEERS_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => manifest_dir().join("target/peers/bin"),
    }
}

/// The path of an installed peer (`spire-server`, `spire-agent`, `envoy`, `csi-sanity`,
/// `python`). Panics when it is missing: run `make peers`.
pub fn peer(name: &str) -> PathBuf {
    let path = peers_dir().join(name);
    if !path.exists() {
        panic!(
            "peer {name} is missing at {}: run `make peers`",
            path.display()
        );
    }
    path
}

/// The running test binary, by its real path (what the unix attestor sees).
pub fn this_test_binary() -> PathBuf {
    std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap()
}

/// The svid-bridge binary Cargo built beside this test or bench binary:
/// `target/<profile>/deps/<test>-<hash>` runs, `target/<profile>/svid-bridge` is the binary
/// (Cargo builds a package's binaries before its integration tests and benches).
/// `$SVID_BRIDGE_BIN` overrides it.
pub fn bridge_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SVID_BRIDGE_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test binary lives in target/<profile>/deps");
    let path = profile_dir.join("svid-bridge");
    assert!(
        path.exists(),
        "svid-bridge is missing at {}: run the tests with `cargo test`",
        path.display()
    );
    path
}

/// `<CARGO_MANIFEST_DIR>/target/test-tmp`, created on first use.
pub fn test_tmp_root() -> PathBuf {
    let root = manifest_dir().join("target/test-tmp");
    std::fs::create_dir_all(&root)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
    root
}

/// A fresh, uniquely named directory under [`test_tmp_root`], removed on drop (unless
/// `SVID_BRIDGE_KEEP_TMP=1`).
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new()
        .prefix(&format!("{prefix}-"))
        .tempdir_in(test_tmp_root())
        .expect("create a temp dir under target/test-tmp");
    if keep_tmp() {
        dir.disable_cleanup(true);
    }
    dir
}

pub(crate) fn keep_tmp() -> bool {
    std::env::var("SVID_BRIDGE_KEEP_TMP").is_ok_and(|v| v == "1")
}

/// Longest socket path we create; sun_path holds 108 bytes including the NUL.
pub const MAX_SOCKET_PATH: usize = 100;

/// A directory for Unix sockets: `preferred` when `<preferred>/<longest_suffix>` fits in
/// [`MAX_SOCKET_PATH`], else a fresh short directory under /tmp (removed on drop).
pub struct SocketDir {
    path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl SocketDir {
    pub fn new(preferred: &Path, longest_suffix: &str) -> SocketDir {
        let fits = preferred.join(longest_suffix).as_os_str().len() <= MAX_SOCKET_PATH;
        if fits {
            return SocketDir {
                path: preferred.to_path_buf(),
                _tmp: None,
            };
        }
        let mut tmp = tempfile::Builder::new()
            .prefix("sb-")
            .tempdir_in("/tmp")
            .expect("create a socket dir under /tmp");
        if keep_tmp() {
            tmp.disable_cleanup(true);
        }
        SocketDir {
            path: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
/// Prefer port 0 in configs where the peer can report what it bound.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A distinct path for the same program: `<dir>/<name>`, a hard link to `source` (a copy if
/// linking fails), so a `unix:path:<returned path>` selector tells workloads apart. Each call
/// gets a new directory; directories left by dead test processes are swept. The returned
/// path is canonical (what `/proc/<pid>/exe` shows).
pub fn workload_binary(name: &str, source: &Path) -> PathBuf {
    assert!(
        !name.is_empty() && !name.contains('/'),
        "workload binary name {name:?} must be a plain file name"
    );
    static SWEEP: Once = Once::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let root = test_tmp_root().join("bin");
    SWEEP.call_once(|| sweep_dead_bin_dirs(&root));

    let source = std::fs::canonicalize(source)
        .unwrap_or_else(|e| panic!("workload binary source {}: {e}", source.display()));
    let dir = root.join(format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let dest = dir.join(name);
    if std::fs::hard_link(&source, &dest).is_err() {
        std::fs::copy(&source, &dest)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", source.display(), dest.display()));
    }
    std::fs::canonicalize(&dest).expect("canonicalize workload binary")
}

/// Removes `bin/<pid>-<n>` directories whose test process is gone.
fn sweep_dead_bin_dirs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
