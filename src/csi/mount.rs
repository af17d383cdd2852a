//! The mount operations behind NodePublishVolume, NodeUnpublishVolume and
//! NodeGetVolumeStats. All blocking; callers run them on the blocking pool.
//!
//! Every operation starts from an `O_PATH` descriptor of the target's parent and works
//! relative to it (`mkdirat`, `openat`, `statx`, and `/proc/self/fd/N` for mount/umount), so
//! the directory whose real path we checked is the directory we act on: swapping a path
//! component for a symlink between the check and the mount leads nowhere.
//!
//! Mount points are recognised with `statx` (`STATX_ATTR_MOUNT_ROOT`, a few µs whatever the
//! mount count) instead of scanning `/proc/self/mountinfo` (tens of ms at 10,000 mounts,
//! M-5); mountinfo is only the fallback for kernels older than 5.8.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, Mode, OFlags, Statx, StatxAttributes, StatxFlags};
use rustix::io::Errno;
use rustix::mount::UnmountFlags;

use super::mountinfo;
use super::target::Target;

/// Upper bound on unmounts in one NodeUnpublishVolume. Nodes hit by
/// spiffe/spiffe-csi#331 carried 16,384 stacked mounts on one target (rossoctl/rossoctl#2288);
/// this clears such a stack in one call, and a kubelet retry continues a bigger one.
pub const MAX_UNMOUNTS: usize = 65_536;

/// Mode of a target directory we create (P-10), whatever the process umask.
const TARGET_MODE: u32 = 0o750;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    #[error(
        "target path {target} resolves to {real:?}, outside the kubelet pods directory {pods_dir:?}"
    )]
    Escapes {
        target: String,
        real: PathBuf,
        pods_dir: PathBuf,
    },
    #[error("target path {target} exists and is not a directory")]
    NotADirectory { target: String },
    #[error("unable to create target path {target}: {source}")]
    CreateTarget { target: String, source: io::Error },
    #[error("unable to verify mount point {target}: {source}")]
    Verify { target: String, source: io::Error },
    #[error("unable to mount {target}: socket directory {dir:?}: {source}")]
    SourceUnavailable {
        target: String,
        dir: PathBuf,
        source: io::Error,
    },
    #[error("unable to mount {target}: {source}")]
    Mount { target: String, source: io::Error },
    #[error(
        "target path {target} is already mounted from another source, not the socket \
         directory {dir:?}"
    )]
    MountedElsewhere { target: String, dir: PathBuf },
    #[error("unable to unmount {target}: {source}")]
    Unmount { target: String, source: io::Error },
    #[error(
        "unable to unmount {target}: still a mount point after {count} unmounts; retry to continue"
    )]
    StillMounted { target: String, count: usize },
    #[error("unable to remove target path {target}: {source}")]
    RemoveTarget { target: String, source: io::Error },
    #[error("volume path {target} is not a published volume: {reason}")]
    NotPublished { target: String, reason: String },
    #[error("unable to read volume statistics of {target}: {source}")]
    Stats { target: String, source: io::Error },
}

impl MountError {
    /// The gRPC code the CSI spec asks for.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            MountError::Escapes { .. } | MountError::NotADirectory { .. } => Code::InvalidArgument,
            MountError::MountedElsewhere { .. } => Code::AlreadyExists,
            MountError::NotPublished { .. } => Code::NotFound,
            _ => Code::Internal,
        }
    }
}

/// What NodePublishVolume did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    Mounted,
    /// The target was already a bind of the socket directory: nothing new mounted (P-11).
    AlreadyMounted,
}

/// What NodeUnpublishVolume did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpublished {
    /// Mounts peeled off the target (more than one for a stack, R-1).
    pub unmounted: usize,
    /// Whether a target directory was there to remove (false: nothing to do, U-6).
    pub removed: bool,
}

/// NodeGetVolumeStats' answer for a published volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStatus {
    pub bytes: Usage,
    pub inodes: Usage,
    pub abnormal: bool,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub total: i64,
    pub used: i64,
    pub available: i64,
}

/// A directory's identity: a bind mount's root is the source directory itself, so the
/// target's (device, inode) equals the source's exactly when it is our mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirId {
    dev_major: u32,
    dev_minor: u32,
    ino: u64,
}

impl From<&Statx> for DirId {
    fn from(stx: &Statx) -> Self {
        DirId {
            dev_major: stx.stx_dev_major,
            dev_minor: stx.stx_dev_minor,
            ino: stx.stx_ino,
        }
    }
}

/// Bind-mounts `source` on the target, creating the target directory (P-10, P-12).
///
/// The mount is a plain `MS_BIND`: read-write on the host like spiffe-csi-driver, because
/// the container runtime relabels the volume for SELinux (`lsetxattr`), which fails on a
/// read-only mount (spiffe/spiffe-csi#42); the pod gets a read-only view because P-8
/// requires `readOnly: true`. Not recursive, so mounts below the socket directory stay
/// private to the host. We add no nosuid/nodev/noexec remount: flags changed by a remount do
/// not propagate to the host's copy of the mount, so it would only change our namespace;
/// the mount inherits the source mount's own flags instead.
pub fn publish(source: &Path, pods_dir: &Path, target: &Target) -> Result<Published, MountError> {
    let source_id =
        dir_id(CWD, source, AtFlags::empty()).map_err(|err| MountError::SourceUnavailable {
            target: target.quoted(),
            dir: source.to_path_buf(),
            source: err,
        })?;
    let parent = open_dir(target.parent()).map_err(|source| MountError::CreateTarget {
        target: target.quoted(),
        source,
    })?;
    ensure_inside(&parent, pods_dir, target)?;
    create_target_dir(&parent, target)?;
    let dir = open_target_dir(&parent, target)?;
    let stx = statx_fd(&dir).map_err(|source| verify_error(target, source))?;
    if is_mount_root(&stx, &dir).map_err(|source| verify_error(target, source))? {
        return if DirId::from(&stx) == source_id {
            Ok(Published::AlreadyMounted)
        } else {
            Err(MountError::MountedElsewhere {
                target: target.quoted(),
                dir: source.to_path_buf(),
            })
        };
    }
    rustix::mount::mount_bind(source, proc_fd_path(&dir)).map_err(|err| MountError::Mount {
        target: target.quoted(),
        source: err.into(),
    })?;
    Ok(Published::Mounted)
}

/// Unmounts the target until it is no longer a mount point, then removes it (U-5).
/// A missing or unmounted target is fine (U-6).
pub fn unpublish(pods_dir: &Path, target: &Target) -> Result<Unpublished, MountError> {
    let parent = match open_dir(target.parent()) {
        Ok(parent) => parent,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Ok(Unpublished {
                unmounted: 0,
                removed: false,
            });
        }
        Err(source) => return Err(verify_error(target, source)),
    };
    ensure_inside(&parent, pods_dir, target)?;
    let unmounted = unmount_all(&parent, target)?;
    let removed = remove_target_dir(&parent, target)?;
    Ok(Unpublished { unmounted, removed })
}

/// Usage and condition of a published volume; NotPublished when `target` is not one.
pub fn inspect(
    source: &Path,
    pods_dir: &Path,
    target: &Target,
) -> Result<VolumeStatus, MountError> {
    let not_published = |reason: &str| MountError::NotPublished {
        target: target.quoted(),
        reason: reason.to_owned(),
    };
    let parent = match open_dir(target.parent()) {
        Ok(parent) => parent,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(not_published("no such directory"));
        }
        Err(source) => return Err(verify_error(target, source)),
    };
    match ensure_inside(&parent, pods_dir, target) {
        Ok(()) => {}
        Err(MountError::Escapes { .. }) => {
            return Err(not_published("outside the kubelet pods directory"));
        }
        Err(err) => return Err(err),
    }
    match mount_state(&parent, target).map_err(|source| verify_error(target, source))? {
        None => return Err(not_published("no such directory")),
        Some(false) => return Err(not_published("not a mount point")),
        Some(true) => {}
    }
    let dir = open_target_dir(&parent, target)?;
    let stats_error = |source: io::Error| MountError::Stats {
        target: target.quoted(),
        source,
    };
    let stx = statx_fd(&dir).map_err(stats_error)?;
    let vfs = rustix::fs::statvfs(proc_fd_path(&dir)).map_err(|err| stats_error(err.into()))?;
    let (abnormal, message) = condition(source, DirId::from(&stx), &dir);
    Ok(VolumeStatus {
        bytes: usage(vfs.f_blocks, vfs.f_bfree, vfs.f_bavail, vfs.f_frsize),
        inodes: usage(vfs.f_files, vfs.f_ffree, vfs.f_favail, 1),
        abnormal,
        message,
    })
}

/// VOLUME_CONDITION: is the target still the socket directory, and does it hold a socket?
/// The kubelet turns an abnormal condition into a pod event (CSIVolumeHealth, V-3).
fn condition(source: &Path, mounted: DirId, dir: &OwnedFd) -> (bool, String) {
    match dir_id(CWD, source, AtFlags::empty()) {
        Ok(id) if id == mounted => {}
        Ok(_) => {
            return (
                true,
                format!(
                    "the volume shows a different directory than the socket directory {source:?} \
                     (was it removed and re-created?); restart the pod to mount it afresh"
                ),
            );
        }
        Err(err) => {
            return (
                true,
                format!("the socket directory {source:?} is unavailable: {err}"),
            );
        }
    }
    match count_sockets(&proc_fd_path(dir)) {
        Ok(0) => (
            true,
            format!(
                "the socket directory {source:?} holds no socket: is the server behind it running?"
            ),
        ),
        Ok(n) => (
            false,
            format!("mounted; {n} socket(s) in the socket directory"),
        ),
        Err(err) => (true, format!("unable to list the socket directory: {err}")),
    }
}

fn count_sockets(dir: &Path) -> io::Result<usize> {
    let mut sockets = 0;
    for entry in fs::read_dir(dir)? {
        if entry?.file_type()?.is_socket() {
            sockets += 1;
        }
    }
    Ok(sockets)
}

fn usage(total: u64, free: u64, available: u64, unit: u64) -> Usage {
    let scaled = |n: u64| i64::try_from(n.saturating_mul(unit)).unwrap_or(i64::MAX);
    Usage {
        total: scaled(total),
        used: scaled(total.saturating_sub(free)),
        available: scaled(available),
    }
}

fn verify_error(target: &Target, source: io::Error) -> MountError {
    MountError::Verify {
        target: target.quoted(),
        source,
    }
}

/// `O_PATH` descriptor of a directory; symlinks on the way are followed and checked after.
fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// `/proc/self/fd/N`: names exactly the directory we hold, for calls that take a path.
fn proc_fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// R-4 on the real path: the parent we hold must be inside the real pods directory, so
/// neither `..` nor a symlinked component can lead the mount elsewhere.
fn ensure_inside(parent: &OwnedFd, pods_dir: &Path, target: &Target) -> Result<(), MountError> {
    let real =
        fs::read_link(proc_fd_path(parent)).map_err(|source| verify_error(target, source))?;
    let real_pods = fs::canonicalize(pods_dir).map_err(|source| verify_error(target, source))?;
    if real.starts_with(&real_pods) {
        Ok(())
    } else {
        Err(MountError::Escapes {
            target: target.quoted(),
            real,
            pods_dir: pods_dir.to_path_buf(),
        })
    }
}

/// `mkdir(target, 0750)`; an existing entry is fine (P-10), and checked by the open after.
fn create_target_dir(parent: &OwnedFd, target: &Target) -> Result<(), MountError> {
    let create_error = |err: Errno| MountError::CreateTarget {
        target: target.quoted(),
        source: err.into(),
    };
    match rustix::fs::mkdirat(parent, target.name(), Mode::from_raw_mode(TARGET_MODE)) {
        Ok(()) => {
            // mkdir applies the umask (0077 under `svid-bridge run`); spiffe's dirs are 0750.
            rustix::fs::chmodat(
                parent,
                target.name(),
                Mode::from_raw_mode(TARGET_MODE),
                AtFlags::empty(),
            )
            .map_err(create_error)
        }
        Err(Errno::EXIST) => Ok(()),
        Err(err) => Err(create_error(err)),
    }
}

/// The target itself, never through a symlink: mount(2) would follow one anywhere.
fn open_target_dir(parent: &OwnedFd, target: &Target) -> Result<OwnedFd, MountError> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(parent, target.name(), flags, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::NOTDIR | Errno::LOOP) => Err(MountError::NotADirectory {
            target: target.quoted(),
        }),
        Err(err) => Err(verify_error(target, err.into())),
    }
}

/// Some(is a mount point) for the target, None when it does not exist. Does not follow a
/// symlink at the target (it cannot be a mount point; it is left for rmdir to refuse).
fn mount_state(parent: &OwnedFd, target: &Target) -> io::Result<Option<bool>> {
    let flags = AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT;
    match rustix::fs::statx(
        parent,
        target.name(),
        flags,
        StatxFlags::TYPE | StatxFlags::INO,
    ) {
        Ok(stx) => {
            if let Some(known) = mount_root_attribute(&stx) {
                return Ok(Some(known));
            }
            let real_parent = fs::read_link(proc_fd_path(parent))?;
            mountinfo::is_mount_point(&real_parent.join(target.name())).map(Some)
        }
        Err(Errno::NOENT) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

fn statx_fd(fd: &OwnedFd) -> io::Result<Statx> {
    let flags = AtFlags::EMPTY_PATH | AtFlags::NO_AUTOMOUNT;
    Ok(rustix::fs::statx(
        fd,
        "",
        flags,
        StatxFlags::TYPE | StatxFlags::INO,
    )?)
}

fn dir_id(dirfd: impl AsFd, path: &Path, flags: AtFlags) -> io::Result<DirId> {
    let stx = rustix::fs::statx(dirfd, path, flags, StatxFlags::TYPE | StatxFlags::INO)?;
    Ok(DirId::from(&stx))
}

/// Whether the directory `fd` names is the root of a mount: the statx attribute when the
/// kernel reports it (≥ 5.8), else a mountinfo scan of its real path.
fn is_mount_root(stx: &Statx, fd: &OwnedFd) -> io::Result<bool> {
    match mount_root_attribute(stx) {
        Some(known) => Ok(known),
        None => mountinfo::is_mount_point(&fs::read_link(proc_fd_path(fd))?),
    }
}

fn mount_root_attribute(stx: &Statx) -> Option<bool> {
    stx.stx_attributes_mask
        .contains(StatxAttributes::MOUNT_ROOT)
        .then(|| stx.stx_attributes.contains(StatxAttributes::MOUNT_ROOT))
}

/// Peels mounts off the target until it is no longer a mount point; returns how many.
/// A single umount removes only the top of a stack (U-4), hence the loop.
fn unmount_all(parent: &OwnedFd, target: &Target) -> Result<usize, MountError> {
    let path = proc_fd_path(parent).join(target.name());
    let mut unmounted = 0;
    while mount_state(parent, target).map_err(|source| verify_error(target, source))? == Some(true)
    {
        if unmounted == MAX_UNMOUNTS {
            return Err(MountError::StillMounted {
                target: target.quoted(),
                count: unmounted,
            });
        }
        rustix::mount::unmount(&path, UnmountFlags::NOFOLLOW).map_err(|err| {
            MountError::Unmount {
                target: target.quoted(),
                source: err.into(),
            }
        })?;
        unmounted += 1;
    }
    Ok(unmounted)
}

/// `rmdir(target)`; true when there was one to remove (U-5, U-6).
fn remove_target_dir(parent: &OwnedFd, target: &Target) -> Result<bool, MountError> {
    match rustix::fs::unlinkat(parent, target.name(), AtFlags::REMOVEDIR) {
        Ok(()) => Ok(true),
        Err(Errno::NOENT) => Ok(false),
        Err(err) => Err(MountError::RemoveTarget {
            target: target.quoted(),
            source: err.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_scales_blocks_and_saturates() {
        assert_eq!(
            usage(100, 40, 30, 4096),
            Usage {
                total: 409_600,
                used: 245_760,
                available: 122_880
            }
        );
        assert_eq!(usage(u64::MAX, 0, 0, 4096).total, i64::MAX);
        assert_eq!(usage(1, 2, 0, 1).used, 0);
    }

    #[test]
    fn codes_follow_the_spec() {
        let target = "\"/t\"".to_owned();
        assert_eq!(
            MountError::MountedElsewhere {
                target: target.clone(),
                dir: "/s".into()
            }
            .code(),
            tonic::Code::AlreadyExists
        );
        assert_eq!(
            MountError::NotPublished {
                target: target.clone(),
                reason: String::new()
            }
            .code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            MountError::NotADirectory {
                target: target.clone()
            }
            .code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            MountError::StillMounted { target, count: 1 }.code(),
            tonic::Code::Internal
        );
    }

    #[test]
    fn a_fresh_directory_is_not_a_mount_root_but_slash_is() {
        let dir = tempfile::tempdir().unwrap();
        let fd = open_dir(dir.path()).unwrap();
        let stx = statx_fd(&fd).unwrap();
        assert!(!is_mount_root(&stx, &fd).unwrap());
        let root = open_dir(Path::new("/")).unwrap();
        assert!(is_mount_root(&statx_fd(&root).unwrap(), &root).unwrap());
    }
}
