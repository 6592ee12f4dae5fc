//! One running secondary: its durable state (highest term, state), its WAL store, and
//! the receiver task. Orders go through [`crate::secondary::transition`]; the new
//! state is persisted, then the effects run (the old upstream is cut — its task
//! aborted and awaited, its socket closed — before anything else), then the answer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ha_common::durable::{write_atomic, Envelope};
use ha_common::proto::replicator::{ReplicatorState, ReplicatorStatus};
use tokio::task::JoinHandle;

use crate::receiver::{self, Live};
use crate::secondary::{transition, Durable, Order, Refused, SecondaryState};
use crate::wal_store::{StoreError, WalStore};

const STATE_ENVELOPE: Envelope = Envelope {
    magic: *b"DNRS",
    version: 1,
    what: "dn_replicator state",
};
const STATE_FILE: &str = "replicator.state";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
}

struct Inner {
    durable: Durable,
    receiver: Option<JoinHandle<()>>,
}

pub struct Node {
    name: String,
    /// The replication role's password file (read at each connection), if any.
    password_file: Option<PathBuf>,
    state_path: PathBuf,
    inner: tokio::sync::Mutex<Inner>,
    store: Arc<Mutex<WalStore>>,
    live: Arc<Mutex<Live>>,
}

impl Node {
    /// Opens the secondary `name` in `dir` (created if missing).
    pub fn open(name: &str, dir: &Path) -> Result<Node, NodeError> {
        std::fs::create_dir_all(dir).map_err(|e| NodeError::State {
            path: dir.to_owned(),
            message: e.to_string(),
        })?;
        let state_path = dir.join(STATE_FILE);
        let durable = match std::fs::read(&state_path) {
            Ok(bytes) => {
                let payload =
                    STATE_ENVELOPE
                        .open(&state_path, &bytes)
                        .map_err(|e| NodeError::State {
                            path: state_path.clone(),
                            message: e.to_string(),
                        })?;
                serde_json::from_slice(payload).map_err(|e| NodeError::State {
                    path: state_path.clone(),
                    message: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Durable::default(),
            Err(e) => {
                return Err(NodeError::State {
                    path: state_path,
                    message: e.to_string(),
                })
            }
        };
        let store = WalStore::open(&dir.join("wal"))?;
        Ok(Node {
            name: name.to_owned(),
            password_file: None,
            state_path,
            inner: tokio::sync::Mutex::new(Inner {
                durable,
                receiver: None,
            }),
            store: Arc::new(Mutex::new(store)),
            live: Arc::new(Mutex::new(Live::default())),
        })
    }

    /// Logs in to upstreams with the password in `file` (the config's
    /// `[dn_auth] replication_password_file`).
    pub fn with_password_file(mut self, file: PathBuf) -> Node {
        self.password_file = Some(file);
        self
    }

    /// After a restart: streams again if it was streaming.
    pub async fn resume(&self) {
        let mut inner = self.inner.lock().await;
        if let SecondaryState::Streaming { start_lsn, .. } = inner.durable.state {
            self.start_receiver(&mut inner, start_lsn);
        }
    }

    fn start_receiver(&self, inner: &mut Inner, start_lsn: u64) {
        let Some(up) = inner.durable.state.upstream() else {
            return;
        };
        *self.live.lock().expect("live lock") = Live::default();
        inner.receiver = Some(tokio::spawn(receiver::run(
            up,
            start_lsn,
            self.name.clone(),
            self.password_file.clone(),
            self.store.clone(),
            self.live.clone(),
        )));
    }

    fn persist(&self, d: &Durable) -> Result<(), NodeError> {
        let payload = serde_json::to_vec(d).expect("state serialises");
        write_atomic(&self.state_path, &STATE_ENVELOPE.seal(&payload)).map_err(|e| {
            NodeError::State {
                path: self.state_path.clone(),
                message: e.to_string(),
            }
        })
    }

    /// Carries out one order; answers the resulting status.
    pub async fn apply(&self, order: Order) -> Result<ReplicatorStatus, NodeError> {
        let mut inner = self.inner.lock().await;
        let (next, fx) = transition(&inner.durable, &order)?;
        if next != inner.durable {
            self.persist(&next)?;
        }
        if fx.cut_upstream {
            if let Some(h) = inner.receiver.take() {
                h.abort();
                let _ = h.await;
            }
            self.live.lock().expect("live lock").connected = false;
        }
        if fx.cut_upstream || fx.start_upstream || fx.discard {
            tracing::info!(
                from = inner.durable.state.name(), to = next.state.name(), term = next.term,
                upstream = ?next.state.upstream().map(|u| u.name), "order applied"
            );
        }
        if fx.discard {
            self.store.lock().expect("store lock").clear()?;
        }
        inner.durable = next;
        if fx.start_upstream {
            let start = match order {
                Order::Stream { start_lsn, .. } => start_lsn,
                Order::Stop { .. } => 0,
            };
            self.start_receiver(&mut inner, start);
        }
        Ok(self.status_of(&inner))
    }

    fn status_of(&self, inner: &Inner) -> ReplicatorStatus {
        let (state, upstream) = match &inner.durable.state {
            SecondaryState::Idle => (ReplicatorState::Idle, String::new()),
            SecondaryState::Streaming { upstream, .. } => {
                (ReplicatorState::Streaming, upstream.clone())
            }
            SecondaryState::Holding { .. } => (ReplicatorState::Holding, String::new()),
        };
        let live = self.live.lock().expect("live lock").clone();
        let store = self.store.lock().expect("store lock");
        let streaming = state == ReplicatorState::Streaming;
        ReplicatorStatus {
            state: state as i32,
            term: inner.durable.term,
            upstream,
            connected: streaming && live.connected,
            timeline: store.timeline(),
            start_lsn: store.start_lsn(),
            flush_lsn: store.flushed(),
            bytes_kept: store.bytes_kept().unwrap_or(0),
            last_error: if streaming {
                live.last_error
            } else {
                String::new()
            },
        }
    }

    pub async fn status(&self) -> ReplicatorStatus {
        let inner = self.inner.lock().await;
        self.status_of(&inner)
    }

    /// A WAL file for a catching-up standby (None: not kept).
    pub fn read_wal(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.lock().expect("store lock").read_file(name)
    }
}
