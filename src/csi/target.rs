//! Lexical confinement of `target_path` / `volume_path` to `<kubelet-root>/pods/`.
//!
//! spiffe-csi-driver bind-mounts wherever it is told (P-14). Anyone who reaches the CSI socket
//! could then place the socket directory over any directory on the host, so we accept only
//! absolute, already-normalised paths strictly below the kubelet's pods directory. This is the
//! cheap, string-only half of the check; [`super::mount`] repeats it on the *real* path of the
//! target's parent, so symlinks cannot lead out either.

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

/// `PATH_MAX` (4096) includes the terminating NUL.
const PATH_MAX: usize = 4095;
/// `NAME_MAX`: longest file name component.
const NAME_MAX: usize = 255;
/// Longest prefix of a client-supplied path quoted in a message or log line. A 64 KiB path
/// echoed whole would overflow the client's trailer limit, and the client would see a
/// dropped connection instead of our status.
const QUOTE_MAX: usize = 160;

/// Why a path was refused before touching the filesystem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("{what} {path} must be absolute")]
    Relative { what: &'static str, path: String },
    #[error("{what} {path} must be normalised (no '.', '..', '//' or trailing '/')")]
    NotNormalised { what: &'static str, path: String },
    #[error("{what} {path} contains a NUL byte")]
    Nul { what: &'static str, path: String },
    #[error("{what} {path} is too long ({len} bytes; at most {PATH_MAX}, {NAME_MAX} per name)")]
    TooLong {
        what: &'static str,
        path: String,
        len: usize,
    },
    #[error("{what} {path} is not under the kubelet pods directory {pods_dir:?}")]
    OutsidePodsDir {
        what: &'static str,
        path: String,
        pods_dir: PathBuf,
    },
}

/// A target path that passed the lexical checks: absolute, normalised, strictly below the
/// pods directory. `parent` and `name` are what the fd-relative mount code works from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    path: PathBuf,
}

impl Target {
    /// Checks `raw` (as it came in the request); `what` names the field in messages.
    pub fn confine(raw: &str, pods_dir: &Path, what: &'static str) -> Result<Self, PathError> {
        let quoted = || quote(raw);
        if raw.contains('\0') {
            return Err(PathError::Nul {
                what,
                path: quoted(),
            });
        }
        let path = Path::new(raw);
        if !path.is_absolute() {
            return Err(PathError::Relative {
                what,
                path: quoted(),
            });
        }
        if raw.len() > PATH_MAX || path.components().any(|c| c.as_os_str().len() > NAME_MAX) {
            return Err(PathError::TooLong {
                what,
                path: quoted(),
                len: raw.len(),
            });
        }
        if !is_normalised(raw) {
            return Err(PathError::NotNormalised {
                what,
                path: quoted(),
            });
        }
        if path == pods_dir || !path.starts_with(pods_dir) {
            return Err(PathError::OutsidePodsDir {
                what,
                path: quoted(),
                pods_dir: pods_dir.to_path_buf(),
            });
        }
        Ok(Target {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory the kubelet created for us (P-10: the CO guarantees it exists).
    pub fn parent(&self) -> &Path {
        // Infallible: confine() accepted only paths strictly below an absolute directory.
        self.path.parent().unwrap_or(Path::new("/"))
    }

    /// The last component, created and mounted on relative to the parent's fd.
    pub fn name(&self) -> &OsStr {
        self.path.file_name().unwrap_or(OsStr::new("."))
    }

    /// The path for messages and logs, shortened like any client-supplied path.
    pub fn quoted(&self) -> String {
        quote(&self.path.to_string_lossy())
    }
}

/// True when `raw` is exactly its own clean form: `Path::components` silently drops `.`,
/// repeated and trailing slashes, so compare the string with the re-joined components.
fn is_normalised(raw: &str) -> bool {
    let path = Path::new(raw);
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return false;
    }
    let rejoined: PathBuf = path.components().collect();
    rejoined.as_os_str() == raw
}

/// `"path"`, or its first [`QUOTE_MAX`] bytes and the full length when it is longer.
pub fn quote(raw: &str) -> String {
    match prefix(raw) {
        None => format!("{raw:?}"),
        Some(start) => format!("{start:?}… ({} bytes)", raw.len()),
    }
}

/// `raw` as a log field value: unchanged, or shortened like [`quote`] (unquoted, since the
/// log formatter quotes string fields itself).
pub fn shorten(raw: &str) -> String {
    match prefix(raw) {
        None => raw.to_owned(),
        Some(start) => format!("{start}… ({} bytes)", raw.len()),
    }
}

/// The first [`QUOTE_MAX`] bytes (on a char boundary) when `raw` is longer than that.
fn prefix(raw: &str) -> Option<&str> {
    if raw.len() <= QUOTE_MAX {
        return None;
    }
    let mut end = QUOTE_MAX;
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    Some(&raw[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const PODS: &str = "/var/lib/kubelet/pods";
    const GOOD: &str = "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/spiffe/mount";

    fn confine(raw: &str) -> Result<Target, PathError> {
        Target::confine(raw, Path::new(PODS), "target path")
    }

    #[test]
    fn kubelet_target_is_accepted_and_split() {
        let target = confine(GOOD).unwrap();
        assert_eq!(target.path(), Path::new(GOOD));
        assert_eq!(
            target.parent(),
            Path::new("/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/spiffe")
        );
        assert_eq!(target.name(), "mount");
    }

    #[test]
    fn relative_paths_are_refused() {
        // csi-sanity's NodeGetVolumeStats probe uses "some/path".
        assert!(matches!(
            confine("some/path"),
            Err(PathError::Relative { .. })
        ));
        assert!(matches!(confine(""), Err(PathError::Relative { .. })));
    }

    #[test]
    fn dot_dot_and_unclean_forms_are_refused_even_when_they_stay_inside() {
        for raw in [
            "/var/lib/kubelet/pods/uid/../../../../etc",
            "/var/lib/kubelet/pods/uid/../uid2/mount",
            "/var/lib/kubelet/pods/uid/./mount",
            "/var/lib/kubelet/pods//uid/mount",
            "/var/lib/kubelet/pods/uid/mount/",
        ] {
            assert!(
                matches!(confine(raw), Err(PathError::NotNormalised { .. })),
                "{raw} should be refused"
            );
        }
    }

    #[test]
    fn paths_outside_or_equal_to_the_pods_dir_are_refused() {
        for raw in [
            "/etc",
            "/var/lib/kubelet",
            PODS,
            "/var/lib/kubelet/podsX/uid/mount",
        ] {
            assert!(
                matches!(confine(raw), Err(PathError::OutsidePodsDir { .. })),
                "{raw} should be refused"
            );
        }
    }

    #[test]
    fn over_long_paths_and_names_are_refused_with_a_short_message() {
        let long = format!("{PODS}/{}", "a/".repeat(32 * 1024));
        let err = confine(&long).unwrap_err();
        assert!(matches!(err, PathError::TooLong { .. }));
        assert!(
            err.to_string().len() < 400,
            "message must not echo 64 KiB: {err}"
        );
        let long_name = format!("{PODS}/uid/{}", "n".repeat(256));
        assert!(matches!(
            confine(&long_name),
            Err(PathError::TooLong { .. })
        ));
    }

    #[test]
    fn nul_bytes_are_refused() {
        assert!(matches!(
            confine(&format!("{GOOD}\0x")),
            Err(PathError::Nul { .. })
        ));
    }

    #[test]
    fn quote_keeps_short_paths_and_shortens_long_ones_on_char_boundaries() {
        assert_eq!(quote("/a b"), "\"/a b\"");
        let long = "é".repeat(200);
        let quoted = quote(&long);
        assert!(quoted.ends_with("(400 bytes)"), "{quoted}");
        assert!(quoted.len() < 200);
        assert_eq!(shorten("web-0"), "web-0");
        assert!(shorten(&long).ends_with("(400 bytes)"));
    }
}
