//! One async lock per target path: calls for the same target run one after another (a
//! kubelet retry racing the original publish, or an unpublish racing a publish), calls for
//! different targets run in parallel. Entries are dropped with their last user, so the map
//! holds only targets with a call in flight.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OwnedMutexGuard;

type Entry = Arc<tokio::sync::Mutex<()>>;
type Map = Arc<Mutex<HashMap<PathBuf, Entry>>>;

#[derive(Debug, Default, Clone)]
pub struct TargetLocks {
    map: Map,
}

/// Holds the lock for one target until dropped. It is moved into the blocking mount task,
/// so a cancelled gRPC call (the client went away) cannot release the lock while that
/// task is still mounting.
#[derive(Debug)]
pub struct TargetGuard {
    map: Map,
    key: PathBuf,
    entry: Entry,
    guard: Option<OwnedMutexGuard<()>>,
}

impl TargetLocks {
    pub async fn lock(&self, target: &Path) -> TargetGuard {
        let entry = {
            let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(map.entry(target.to_path_buf()).or_default())
        };
        let guard = Arc::clone(&entry).lock_owned().await;
        TargetGuard {
            map: Arc::clone(&self.map),
            key: target.to_path_buf(),
            entry,
            guard: Some(guard),
        }
    }

    /// Targets with a call in flight or waiting (for tests).
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for TargetGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        // Under the map lock nobody can pick up a new clone; two references (the map's and
        // ours) mean no other call holds or waits for this target.
        if Arc::strong_count(&self.entry) == 2 {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn same_target_is_serialised_and_entry_is_dropped_after() {
        let locks = TargetLocks::default();
        let first = locks.lock(Path::new("/t")).await;
        let blocked = tokio::time::timeout(Duration::from_millis(50), locks.lock(Path::new("/t")));
        assert!(
            blocked.await.is_err(),
            "a second call for the same target must wait"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), locks.lock(Path::new("/t")))
            .await
            .unwrap();
        assert_eq!(locks.len(), 1);
        drop(second);
        assert!(locks.is_empty());
    }

    #[tokio::test]
    async fn different_targets_do_not_wait_for_each_other() {
        let locks = TargetLocks::default();
        let _a = locks.lock(Path::new("/a")).await;
        let _b = tokio::time::timeout(Duration::from_secs(5), locks.lock(Path::new("/b")))
            .await
            .unwrap();
        assert_eq!(locks.len(), 2);
    }

    #[tokio::test]
    async fn a_guard_dropped_on_another_thread_releases() {
        let locks = TargetLocks::default();
        let guard = locks.lock(Path::new("/t")).await;
        tokio::task::spawn_blocking(move || drop(guard))
            .await
            .unwrap();
        assert!(locks.is_empty());
        let _again = locks.lock(Path::new("/t")).await;
    }
}
