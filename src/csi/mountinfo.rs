//! `/proc/self/mountinfo` parsing: the fallback mount-point check on kernels without
//! `STATX_ATTR_MOUNT_ROOT` (< 5.8), and what tests use to count mounts.
//!
//! Scanning the table costs ~45 µs at 20 mounts but tens of milliseconds at 10,000, so the
//! hot path uses `statx` instead (see [`super::mount`]).

use std::ffi::OsString;
use std::io::{self, BufRead};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One line of mountinfo (proc(5)): only the fields we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_id: u64,
    pub parent_id: u64,
    /// `major:minor` of the filesystem.
    pub device: String,
    /// The directory of the filesystem that forms this mount's root (field 4).
    pub root: PathBuf,
    /// Where it is mounted (field 5).
    pub mount_point: PathBuf,
    /// Per-mount options, e.g. `rw,nosuid,relatime`.
    pub options: String,
}

impl MountInfo {
    /// Parses one line; `None` for a line with fewer than six fields (M-3 skips those).
    pub fn parse(line: &str) -> Option<Self> {
        let mut fields = line.split(' ');
        let mount_id = fields.next()?.parse().ok()?;
        let parent_id = fields.next()?.parse().ok()?;
        let device = fields.next()?.to_owned();
        let root = decode_path(fields.next()?);
        let mount_point = decode_path(fields.next()?);
        let options = fields.next()?.to_owned();
        Some(MountInfo {
            mount_id,
            parent_id,
            device,
            root,
            mount_point,
            options,
        })
    }
}

/// Decodes the kernel's `\NNN` octal escapes (space, tab, newline, backslash) in a
/// mountinfo path field (M-2). Anything that is not a valid escape is kept as is.
pub fn decode_octal_escapes(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if let Some(byte) = octal_escape_at(bytes, i) {
            out.push(byte);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The byte that `\NNN` starting at `i` stands for, if it is an escape.
fn octal_escape_at(bytes: &[u8], i: usize) -> Option<u8> {
    let escape = bytes.get(i..i + 4)?;
    if escape[0] != b'\\' || !escape[1..].iter().all(|b| (b'0'..=b'7').contains(b)) {
        return None;
    }
    let value = escape[1..]
        .iter()
        .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
    u8::try_from(value).ok()
}

fn decode_path(field: &str) -> PathBuf {
    PathBuf::from(OsString::from_vec(decode_octal_escapes(field)))
}

/// Every mount in `reader` (a mountinfo table).
pub fn parse(reader: impl BufRead) -> io::Result<Vec<MountInfo>> {
    let mut mounts = Vec::new();
    for line in reader.lines() {
        if let Some(mount) = MountInfo::parse(&line?) {
            mounts.push(mount);
        }
    }
    Ok(mounts)
}

/// This process's mount table.
pub fn read_own() -> io::Result<Vec<MountInfo>> {
    let file = std::fs::File::open("/proc/self/mountinfo")?;
    parse(io::BufReader::with_capacity(64 * 1024, file))
}

/// How many mounts sit exactly at `path` (stacked mounts count once each). Compares the
/// decoded mount point by exact equality, like spiffe-csi-driver (M-1): pass a real path.
pub fn mounts_at(mounts: &[MountInfo], path: &Path) -> usize {
    mounts.iter().filter(|m| m.mount_point == path).count()
}

/// Whether `path` (a real, canonical path) is a mount point, by scanning the table.
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    Ok(mounts_at(&read_own()?, path) > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From spiffe-csi-driver's kind-node fixture shape (M-4), written for this test.
    const TABLE: &str = "\
22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw
30 22 0:25 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw
612 22 254:1 /run/spire/agent-sockets /var/lib/kubelet/pods/c3a3/volumes/kubernetes.io~csi/spire-agent-socket/mount rw,relatime shared:1 - ext4 /dev/vda1 rw
613 22 254:1 /data /mnt/has\\040space rw,relatime - ext4 /dev/vda1 rw
614 22 254:1 /data /mnt/two\\040\\040spaces\\011tab rw,relatime - ext4 /dev/vda1 rw
short line
";

    fn table() -> Vec<MountInfo> {
        parse(TABLE.as_bytes()).unwrap()
    }

    #[test]
    fn octal_escapes_are_decoded() {
        assert_eq!(decode_octal_escapes(r"/a\040b"), b"/a b");
        assert_eq!(
            decode_octal_escapes(r"/a\040\040b\011c\012d\134e"),
            b"/a  b\tc\nd\\e"
        );
        // Not escapes: too short, non-octal digit, out of a byte's range.
        assert_eq!(decode_octal_escapes(r"/a\04"), br"/a\04");
        assert_eq!(decode_octal_escapes(r"/a\089"), br"/a\089");
        assert_eq!(decode_octal_escapes(r"/a\777"), br"/a\777");
    }

    #[test]
    fn lines_with_too_few_fields_are_skipped() {
        assert_eq!(table().len(), 5);
    }

    #[test]
    fn fields_are_parsed() {
        let mounts = table();
        let csi = &mounts[2];
        assert_eq!(csi.mount_id, 612);
        assert_eq!(csi.parent_id, 22);
        assert_eq!(csi.device, "254:1");
        assert_eq!(csi.root, Path::new("/run/spire/agent-sockets"));
        assert_eq!(csi.options, "rw,relatime");
    }

    #[test]
    fn mount_points_match_exactly_after_decoding() {
        let mounts = table();
        let target = Path::new(
            "/var/lib/kubelet/pods/c3a3/volumes/kubernetes.io~csi/spire-agent-socket/mount",
        );
        assert_eq!(mounts_at(&mounts, target), 1);
        assert_eq!(mounts_at(&mounts, &target.join("other")), 0); // M-4
        assert_eq!(mounts_at(&mounts, Path::new("/mnt/has space")), 1); // M-2
        assert_eq!(mounts_at(&mounts, Path::new(r"/mnt/has\040space")), 0); // M-2
        assert_eq!(mounts_at(&mounts, Path::new("/mnt/two  spaces\ttab")), 1);
    }

    #[test]
    fn own_table_has_a_root_mount() {
        assert!(is_mount_point(Path::new("/")).unwrap());
    }
}
