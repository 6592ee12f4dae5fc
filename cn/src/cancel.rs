//! Cancel requests: a client's CancelRequest (sent on a connection of its own, naming
//! the session by the pid and secret key of its BackendKeyData) is forwarded to the DN
//! backends that are running that session's statement right now.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use pgwire::api::cancel::CancelHandler;
use pgwire::api::{ClientInfo, PidSecretKeyGenerator};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::SecretKey;

use crate::dn_wire::CancelKey;

/// The DN statements one session is running: a cancel key per running statement.
#[derive(Default)]
pub struct InFlight {
    next: AtomicU64,
    running: Mutex<HashMap<u64, Arc<CancelKey>>>,
}

/// Marks one DN statement as running until dropped.
pub struct Running {
    id: u64,
    set: Arc<InFlight>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.set.lock().remove(&self.id);
    }
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<CancelKey>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a statement that runs on the DN backend `key` names.
    pub fn enter(self: &Arc<Self>, key: Arc<CancelKey>) -> Running {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, key);
        Running {
            id,
            set: self.clone(),
        }
    }

    fn snapshot(&self) -> Vec<Arc<CancelKey>> {
        self.lock().values().cloned().collect()
    }
}

type Key = (i32, Vec<u8>);

fn key_of(pid: i32, secret: &SecretKey) -> Key {
    (pid, secret.to_bytes().to_vec())
}

/// Sessions by their (pid, secret key); one per CN process.
#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<Key, Weak<InFlight>>>,
    /// Distinct pids for the BackendKeyData of every connection of this process.
    next_pid: AtomicI32,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Weak<InFlight>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, pid: i32, secret: &SecretKey, set: &Arc<InFlight>) {
        self.lock().insert(key_of(pid, secret), Arc::downgrade(set));
    }

    pub fn unregister(&self, pid: i32, secret: &SecretKey) {
        self.lock().remove(&key_of(pid, secret));
    }

    /// Sends a cancel to every DN backend running a statement of the session; returns
    /// how many were sent. An unknown key is ignored, as PostgreSQL does.
    pub async fn cancel(&self, pid: i32, secret: &SecretKey) -> usize {
        let set = self
            .lock()
            .get(&key_of(pid, secret))
            .and_then(Weak::upgrade);
        let Some(set) = set else { return 0 };
        let tokens = set.snapshot();
        let sent = futures::future::join_all(tokens.iter().map(|k| k.cancel())).await;
        sent.into_iter().filter(|r| r.is_ok()).count()
    }
}

impl PidSecretKeyGenerator for Registry {
    fn generate(&self, _client: &dyn ClientInfo) -> (i32, SecretKey) {
        // Protocol 3.0's four-byte key; the pid only has to be distinct per process.
        let pid = 1 + self
            .next_pid
            .fetch_add(1, Ordering::Relaxed)
            .rem_euclid(i32::MAX - 1);
        (pid, SecretKey::I32(rand::random::<i32>()))
    }
}

/// The pgwire cancel handler of one connection.
pub struct Canceller {
    pub registry: Arc<Registry>,
}

#[async_trait]
impl CancelHandler for Canceller {
    async fn on_cancel_request(&self, req: CancelRequest) {
        let n = self.registry.cancel(req.pid, &req.secret_key).await;
        tracing::debug!(pid = req.pid, forwarded = n, "cancel request");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_or_ended_sessions_cancel_nothing() {
        let reg = Registry::default();
        let key = SecretKey::I32(7);
        assert_eq!(reg.cancel(1, &key).await, 0, "unknown key");
        let set = Arc::new(InFlight::default());
        reg.register(1, &key, &set);
        assert_eq!(reg.cancel(1, &key).await, 0, "nothing running");
        assert_eq!(reg.cancel(1, &SecretKey::I32(8)).await, 0, "wrong secret");
        drop(set);
        assert_eq!(reg.cancel(1, &key).await, 0, "session gone");
        reg.unregister(1, &key);
        assert!(reg.lock().is_empty());
    }
}
