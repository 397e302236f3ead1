//! Routing of CancelRequests. Each session hands its client a key pair of the gateway's own
//! making; a cancel carrying that pair is forwarded to the target with the target's real key.
//! The target's key never reaches the client.

use super::backend::Target;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct CancelEntry {
    pub target: Arc<Target>,
    /// The target's own BackendKeyData.
    pub backend_pid: i32,
    pub backend_secret: i32,
    pub session: String,
}

/// The (pid, secret) pair a client holds.
type Key = (i32, i32);

#[derive(Clone, Default)]
pub struct CancelRegistry {
    inner: Arc<Mutex<HashMap<Key, Arc<CancelEntry>>>>,
}

/// Removes its key from the registry when the session ends.
pub struct CancelGuard {
    registry: CancelRegistry,
    key: (i32, i32),
}

impl CancelGuard {
    /// The key pair the client holds.
    pub fn key(&self) -> (i32, i32) {
        self.key
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.registry
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

impl CancelRegistry {
    /// Registers a session and returns the key pair to give its client.
    pub fn register(&self, entry: CancelEntry) -> ((i32, i32), CancelGuard) {
        let entry = Arc::new(entry);
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // Positive pids look like real ones to clients that print them.
            let key = (rand::random::<i32>() & i32::MAX, rand::random::<i32>());
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry(key) {
                v.insert(entry);
                return (
                    key,
                    CancelGuard {
                        registry: self.clone(),
                        key,
                    },
                );
            }
        }
    }

    pub fn lookup(&self, pid: i32, secret: i32) -> Option<Arc<CancelEntry>> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pid, secret))
            .cloned()
    }
}
