//! What survives a bridge restart (#15 item 4): one record per published pod-mode volume
//! beside its tmpfs, under the state directory, which the chart keeps on the host
//! (hostPath, Bidirectional) so the tmpfs mounts outlive the bridge's container.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use super::attributes::{PodFields, VolumeOptions};
use crate::identity::{Selector, SelectorSet};

/// A published pod-mode volume, as written at publish and read back at start.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeRecord {
    pub volume_id: String,
    pub target_path: PathBuf,
    pub pod: PodFields,
    pub options: VolumeOptions,
    /// Fixed at publish (PI-22: a selector subscription does not follow label changes).
    pub selectors: Vec<(String, String)>,
}

impl VolumeRecord {
    pub fn selector_set(&self) -> SelectorSet {
        SelectorSet::new(
            self.selectors
                .iter()
                .map(|(kind, value)| Selector::new(kind.clone(), value.clone()))
                .collect(),
        )
    }
}

/// Each volume's tmpfs is this big: an SVID chain, a key, bundles and a few JWTs are a few
/// KiB; a large federation's bundles fit many times over.
pub const TMPFS_SIZE: &str = "size=4m,nr_inodes=1024";

/// Kubelet volume IDs are `csi-<sha256 hex>`; anything that is not a plain file name is refused.
pub fn valid_volume_id(volume_id: &str) -> bool {
    !volume_id.is_empty()
        && volume_id.len() <= 128
        && !volume_id.starts_with('.')
        && volume_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the root, 0700: nothing else on the node may reach the volumes through it.
    pub fn create(&self) -> io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)?;
        std::fs::set_permissions(
            &self.root,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
    }

    pub fn volume_dir(&self, volume_id: &str) -> PathBuf {
        self.root.join(volume_id)
    }

    fn record_path(&self, volume_id: &str) -> PathBuf {
        self.root.join(format!("{volume_id}.json"))
    }

    /// Written whole and renamed into place: a crash leaves the old record or the new one.
    pub fn save(&self, record: &VolumeRecord) -> io::Result<()> {
        let path = self.record_path(&record.volume_id);
        let tmp = self.root.join(format!(".{}.json.tmp", record.volume_id));
        let json = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&json)?;
        file.sync_all()?;
        std::fs::rename(tmp, path)
    }

    pub fn remove_record(&self, volume_id: &str) {
        let _ = std::fs::remove_file(self.record_path(volume_id));
    }

    /// Every record; unreadable ones are logged and skipped (and their volumes cleaned up
    /// by the caller through `orphans`).
    pub fn records(&self) -> Vec<VolumeRecord> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&path).map(|b| serde_json::from_slice::<VolumeRecord>(&b)) {
                Ok(Ok(record)) if valid_volume_id(&record.volume_id) => records.push(record),
                Ok(Ok(_)) | Ok(Err(_)) | Err(_) => {
                    tracing::warn!(record = %path.display(), "unreadable pod-mode volume record; removing it");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        records
    }

    /// Volume directories that have no record (a crash between mount and save).
    pub fn orphans(&self, known: &[String]) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| valid_volume_id(name) && !known.contains(name))
            .collect()
    }

    /// A private, size-limited tmpfs for the volume: its key never touches a disk, and a
    /// pod cannot fill the node's memory through it.
    pub fn mount_tmpfs(&self, volume_id: &str, group: Option<u32>) -> io::Result<PathBuf> {
        let dir = self.volume_dir(volume_id);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
        if is_mount_point(&dir) {
            return Ok(dir);
        }
        let options = match group {
            Some(gid) => format!("{TMPFS_SIZE},mode=0750,uid=0,gid={gid}"),
            None => format!("{TMPFS_SIZE},mode=0755,uid=0,gid=0"),
        };
        nix::mount::mount(
            Some("svid-bridge"),
            &dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(options.as_str()),
        )
        .map_err(io::Error::from)?;
        Ok(dir)
    }

    /// Unmounts (detached: a pod may still hold it open) and removes the volume's tmpfs.
    pub fn remove_volume(&self, volume_id: &str) {
        let dir = self.volume_dir(volume_id);
        while is_mount_point(&dir) {
            if let Err(err) = nix::mount::umount2(&dir, MntFlags::MNT_DETACH) {
                tracing::warn!(dir = %dir.display(), %err, "cannot unmount a pod-mode volume's tmpfs");
                break;
            }
        }
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(dir = %dir.display(), %err, "cannot remove a pod-mode volume's directory")
            }
        }
        self.remove_record(volume_id);
    }
}

/// Whether `path` is the root of a mount: its device differs from its parent's, or (bind
/// mounts of the same device) mountinfo lists it.
pub fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(own), Some(parent)) = (std::fs::symlink_metadata(path), path.parent()) else {
        return false;
    };
    if let Ok(parent) = std::fs::metadata(parent)
        && parent.dev() != own.dev()
    {
        return true;
    }
    crate::csi::mountinfo::read_own()
        .map(|mounts| mounts.iter().any(|m| m.mount_point == path))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_are_plain_file_names() {
        assert!(valid_volume_id(
            "csi-8e5d5f6f0e2a4c5b9c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b"
        ));
        for bad in ["", "..", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(!valid_volume_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("pods"));
        state.create().unwrap();
        let record = VolumeRecord {
            volume_id: "csi-abc".into(),
            target_path: "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/spiffe/mount".into(),
            pod: PodFields {
                namespace: "apps".into(),
                name: "db-0".into(),
                uid: "u".into(),
                service_account: "db".into(),
            },
            options: VolumeOptions {
                files: true,
                jwt_audiences: vec!["vault".into()],
                layout: super::super::files::Layout::SpiffeHelper,
                group: Some(70),
            },
            selectors: vec![("k8s".into(), "ns:apps".into())],
        };
        state.save(&record).unwrap();
        std::fs::write(state.root().join("junk.json"), b"{").unwrap();
        assert_eq!(state.records(), vec![record.clone()]);
        assert!(!state.root().join("junk.json").exists());
        let mode = std::fs::metadata(state.root().join("csi-abc.json")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        assert_eq!(record.selector_set().to_string(), "k8s:ns:apps");
    }
}
