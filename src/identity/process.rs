//! The caller's process, as seen through `/proc`, to guard against PID reuse.
//!
//! SPIRE's Delegated Identity API attests whatever process holds a PID when it looks, with no
//! liveness or reuse check (DI-4): the delegate must pin the process. We pin it
//! by its start time (field 22 of `/proc/<pid>/stat`), as SPIRE's own peer tracker does for
//! its public socket.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags};

/// A process: its PID plus start time, so a later process on the same PID differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProcessKey {
    pub pid: i32,
    pub start_time: u64,
}

/// Where to read process information; tests point it at a fake tree.
#[derive(Clone, Debug)]
pub struct ProcRoot(PathBuf);

impl Default for ProcRoot {
    fn default() -> Self {
        Self(PathBuf::from("/proc"))
    }
}

impl ProcRoot {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The process now on `pid`, or `None` if there is none.
    pub fn process(&self, pid: i32) -> Option<ProcessKey> {
        let stat = std::fs::read_to_string(self.0.join(pid.to_string()).join("stat")).ok()?;
        let start_time = start_time_from_stat(&stat)?;
        Some(ProcessKey { pid, start_time })
    }

    /// True while the very process `key` names still runs.
    pub fn is_alive(&self, key: ProcessKey) -> bool {
        self.process(key.pid) == Some(key)
    }

    /// A handle that stays with the process `key` names, for checking on it repeatedly.
    pub fn pin(&self, key: ProcessKey) -> PinnedProcess {
        let how = match self.open_pidfd(key.pid) {
            // The PID may have been reused before the pidfd was opened: the start time,
            // read after opening, says whether the pidfd holds the process we pinned.
            Some(fd) if self.is_alive(key) => Watch::Pidfd(fd),
            Some(_) => Watch::Exited,
            None => Watch::StartTime(self.clone()),
        };
        PinnedProcess { key, how }
    }

    /// The process now on `pid`, pinned, with one read of its `stat`; `None` if there is
    /// none. Its pidfd is opened before the start time is read: if the process has not
    /// exited by the time the pidfd is checked, the PID still named it when it was read.
    pub fn pin_pid(&self, pid: i32) -> Option<PinnedProcess> {
        let pidfd = self.open_pidfd(pid);
        let key = self.process(pid)?;
        let how = match pidfd {
            Some(fd) if !pidfd_signals_exit(&fd) => Watch::Pidfd(fd),
            Some(_) => Watch::Exited,
            None => Watch::StartTime(self.clone()),
        };
        Some(PinnedProcess { key, how })
    }

    /// Only for the real `/proc`: a fake tree's PIDs are not this kernel's.
    fn open_pidfd(&self, pid: i32) -> Option<OwnedFd> {
        (self.0 == Path::new("/proc"))
            .then(|| Pid::from_raw(pid))
            .flatten()
            .and_then(|pid| rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok())
    }
}

/// One process, followed across PID reuse. With a pidfd (Linux ≥ 5.3) a check is one
/// `poll`, where the start-time comparison reads and parses `/proc/<pid>/stat`; that read
/// was 13 % of svid-bridge's CPU during an SVID renewal wave (BENCHMARKS.md §4.3).
#[derive(Debug)]
pub struct PinnedProcess {
    key: ProcessKey,
    how: Watch,
}

#[derive(Debug)]
enum Watch {
    Pidfd(OwnedFd),
    StartTime(ProcRoot),
    Exited,
}

impl PinnedProcess {
    pub fn key(&self) -> ProcessKey {
        self.key
    }

    /// True while the pinned process runs. A zombie counts as exited.
    pub fn is_alive(&self) -> bool {
        match &self.how {
            Watch::Pidfd(fd) => !pidfd_signals_exit(fd),
            Watch::StartTime(root) => root.is_alive(self.key),
            Watch::Exited => false,
        }
    }
}

/// A pidfd polls readable once its process has exited.
fn pidfd_signals_exit(fd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    match rustix::event::poll(&mut fds, Some(&Timespec::default())) {
        Ok(ready) => ready > 0,
        // Cannot happen for a valid pidfd; assume the worst for an identity decision.
        Err(_) => true,
    }
}

/// Field 22 of `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may
/// itself contain spaces and parentheses, so count fields after the last `)`.
fn start_time_from_stat(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // after_comm starts with field 3 (state); field 22 is the 20th from there.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_hostile_command_names() {
        let stat =
            "42 (a) b) (c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200";
        assert_eq!(start_time_from_stat(stat), Some(987_654));
        assert_eq!(start_time_from_stat("42 (x) S 1"), None);
    }

    #[test]
    fn our_own_process_is_alive_and_a_changed_start_time_is_not() {
        let proc = ProcRoot::default();
        let me = proc.process(std::process::id() as i32).unwrap();
        assert!(proc.is_alive(me));
        let reused = ProcessKey {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !proc.is_alive(reused),
            "same PID, other start time: another process"
        );
    }

    #[test]
    fn a_pinned_process_is_followed_until_it_exits() {
        let proc = ProcRoot::default();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let key = proc.process(child.id() as i32).unwrap();
        let pinned = proc.pin(key);
        assert!(
            matches!(pinned.how, Watch::Pidfd(_)),
            "this kernel has pidfds"
        );
        assert!(pinned.is_alive());
        child.kill().unwrap();
        // Not reaped yet: a zombie still has /proc/<pid>/stat, but has exited.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pinned.is_alive() {
            assert!(std::time::Instant::now() < deadline, "exit never seen");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.wait().unwrap();
        assert!(!pinned.is_alive(), "and stays exited once reaped");
    }

    #[test]
    fn pinning_by_pid_takes_a_pidfd_and_the_start_time_once() {
        // Following the process to its exit is the pidfd's job, tested above.
        let proc = ProcRoot::default();
        let me = std::process::id() as i32;
        let pinned = proc.pin_pid(me).unwrap();
        assert_eq!(Some(pinned.key()), proc.process(me));
        assert!(matches!(pinned.how, Watch::Pidfd(_)) && pinned.is_alive());
        assert!(proc.pin_pid(i32::MAX).is_none(), "no such process");
    }

    #[test]
    fn pinning_a_process_that_already_changed_hands_pins_nothing() {
        let proc = ProcRoot::default();
        let me = proc.process(std::process::id() as i32).unwrap();
        let predecessor = ProcessKey {
            start_time: me.start_time.saturating_sub(1),
            ..me
        };
        assert!(
            !proc.pin(predecessor).is_alive(),
            "the PID now holds another process"
        );
        assert!(proc.pin(me).is_alive());
    }

    #[test]
    fn fake_proc_root_models_pid_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let write = |start: u64| {
            std::fs::create_dir_all(dir.path().join("77")).unwrap();
            let stat = format!("77 (envoy) S 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0");
            std::fs::write(dir.path().join("77/stat"), stat).unwrap();
        };
        let proc = ProcRoot::new(dir.path());
        write(1000);
        let first = proc.process(77).unwrap();
        let pinned = proc.pin(first);
        assert!(pinned.is_alive());
        write(2000); // the first process exited; another now holds PID 77
        assert!(!proc.is_alive(first));
        assert!(!pinned.is_alive(), "a fake root is followed by start time");
        std::fs::remove_dir_all(dir.path().join("77")).unwrap();
        assert_eq!(proc.process(77), None);
    }
}
