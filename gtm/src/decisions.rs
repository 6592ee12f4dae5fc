//! 2PC decisions (commit/abort per GXID): an in-memory map backed by `decisions.log`,
//! an append-only file of checksummed records written by one thread that batches
//! concurrent writers into one fsync (group commit).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc as std_mpsc, Mutex};

use ha_common::durable::fsync_dir;
use tokio::sync::oneshot;

pub const DECISION_LOG_NAME: &str = "decisions.log";

const MAGIC: &[u8; 4] = b"GTMD";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8;
/// gxid (u64 LE) | decision (u8) | crc32c of the 9 bytes before it (u32 LE).
const RECORD_LEN: usize = 13;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    Commit,
    Abort,
}

impl Decision {
    fn code(self) -> u8 {
        match self {
            Decision::Commit => 1,
            Decision::Abort => 2,
        }
    }
    fn from_code(c: u8) -> Option<Decision> {
        match c {
            1 => Some(Decision::Commit),
            2 => Some(Decision::Abort),
            _ => None,
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decision::Commit => "commit",
            Decision::Abort => "abort",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecisionError {
    #[error("{path}: {problem}; refusing to start")]
    Corrupt { path: PathBuf, problem: String },
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("GXID {gxid} is already decided {existing}, cannot record {requested}")]
    Conflict {
        gxid: u64,
        existing: Decision,
        requested: Decision,
    },
    #[error("decision log writer failed: {0}")]
    Writer(String),
}

type Job = (Vec<u8>, oneshot::Sender<Result<(), String>>);

/// Decisions in memory plus their durable log.
pub struct DecisionStore {
    map: Mutex<HashMap<u64, Decision>>,
    /// Claimed by a RecordDecision that has not finished making them durable (on
    /// both members): in `map` so that a conflicting decision is refused, but not
    /// answered by `get` (a failover could still forget them).
    pending: Mutex<std::collections::HashSet<u64>>,
    writer: Mutex<std_mpsc::Sender<Job>>,
}

fn encode(records: &[(u64, Decision)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.len() * RECORD_LEN);
    for (gxid, d) in records {
        let start = out.len();
        out.extend_from_slice(&gxid.to_le_bytes());
        out.push(d.code());
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }
    out
}

/// Parses a whole log file; any damage is an error naming the offset.
pub fn parse_log(path: &Path, bytes: &[u8]) -> Result<Vec<(u64, Decision)>, DecisionError> {
    let corrupt = |problem: String| DecisionError::Corrupt {
        path: path.to_path_buf(),
        problem,
    };
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(format!("truncated header ({} bytes)", bytes.len())));
    }
    if &bytes[0..4] != MAGIC {
        return Err(corrupt("wrong magic number: not a GTM decision log".into()));
    }
    let version = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(corrupt(format!("unsupported format version {version}")));
    }
    let body = &bytes[HEADER_LEN..];
    let mut out = Vec::with_capacity(body.len() / RECORD_LEN);
    for (i, rec) in body.chunks(RECORD_LEN).enumerate() {
        let offset = HEADER_LEN + i * RECORD_LEN;
        if rec.len() < RECORD_LEN {
            return Err(corrupt(format!(
                "truncated record at offset {offset} ({} of {RECORD_LEN} bytes)",
                rec.len()
            )));
        }
        let stored = u32::from_le_bytes(rec[9..13].try_into().expect("4 bytes"));
        if crc32c::crc32c(&rec[..9]) != stored {
            return Err(corrupt(format!(
                "checksum mismatch in record at offset {offset}"
            )));
        }
        let gxid = u64::from_le_bytes(rec[0..8].try_into().expect("8 bytes"));
        let d = Decision::from_code(rec[8]).ok_or_else(|| {
            corrupt(format!(
                "unknown decision code {} at offset {offset}",
                rec[8]
            ))
        })?;
        out.push((gxid, d));
    }
    Ok(out)
}

impl DecisionStore {
    /// Opens (or creates) `decisions.log` in `dir` and loads every decision.
    pub fn open(dir: &Path) -> Result<DecisionStore, DecisionError> {
        let path = dir.join(DECISION_LOG_NAME);
        let io_err = |op| {
            let path = path.clone();
            move |source| DecisionError::Io { path, op, source }
        };
        let mut map = HashMap::new();
        match fs::read(&path) {
            Ok(bytes) => {
                for (gxid, d) in parse_log(&path, &bytes)? {
                    if let Some(old) = map.insert(gxid, d) {
                        if old != d {
                            return Err(DecisionError::Corrupt {
                                path: path.clone(),
                                problem: format!("GXID {gxid} recorded both {old} and {d}"),
                            });
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut header = Vec::from(&MAGIC[..]);
                header.extend_from_slice(&VERSION.to_le_bytes());
                let mut f = File::create(&path).map_err(io_err("create"))?;
                f.write_all(&header).map_err(io_err("write"))?;
                f.sync_all().map_err(io_err("fsync"))?;
                fsync_dir(dir).map_err(io_err("fsync dir"))?;
            }
            Err(e) => return Err(io_err("read")(e)),
        }
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err("open"))?;
        let (tx, rx) = std_mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || writer_loop(file, rx))
            .map_err(io_err("spawn writer thread"))?;
        Ok(DecisionStore {
            map: Mutex::new(map),
            pending: Mutex::new(Default::default()),
            writer: Mutex::new(tx),
        })
    }

    /// The durable decision for `gxid` (one still being recorded is not answered).
    pub fn get(&self, gxid: u64) -> Option<Decision> {
        if self.pending_lock().contains(&gxid) {
            return None;
        }
        self.lock().get(&gxid).copied()
    }

    /// `gxid`'s claimed decision is durable (on both members): answer it from now on.
    pub fn confirm(&self, gxid: u64) {
        self.pending_lock().remove(&gxid);
    }

    fn pending_lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u64>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> Vec<(u64, Decision)> {
        self.lock().iter().map(|(g, d)| (*g, *d)).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Decision>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `gxid` for `d` in memory so that a concurrent conflicting decision is
    /// refused; the caller then makes it durable (again, if it was already there: a
    /// retried request may have failed before its record reached every copy).
    pub fn claim(&self, gxid: u64, d: Decision) -> Result<(), DecisionError> {
        let mut map = self.lock();
        match map.get(&gxid) {
            Some(&existing) if existing != d => Err(DecisionError::Conflict {
                gxid,
                existing,
                requested: d,
            }),
            Some(_) => Ok(()),
            None => {
                // Lock order: map, then pending (as in `merge`).
                self.pending_lock().insert(gxid);
                map.insert(gxid, d);
                Ok(())
            }
        }
    }

    /// Merges decisions from the peer (push or snapshot); returns the ones that were
    /// new here and must be logged. Merging is commutative: order does not matter.
    pub fn merge(
        &self,
        records: &[(u64, Decision)],
    ) -> Result<Vec<(u64, Decision)>, DecisionError> {
        let mut map = self.lock();
        for &(gxid, d) in records {
            if let Some(&existing) = map.get(&gxid) {
                if existing != d {
                    return Err(DecisionError::Conflict {
                        gxid,
                        existing,
                        requested: d,
                    });
                }
            }
        }
        let mut fresh = Vec::new();
        for &(gxid, d) in records {
            if map.insert(gxid, d).is_none() {
                fresh.push((gxid, d));
            }
        }
        // The peer made them durable (a snapshot's or push's records are on its disk,
        // and the caller logs them here before acknowledging).
        let mut pending = self.pending_lock();
        for (gxid, _) in records {
            pending.remove(gxid);
        }
        Ok(fresh)
    }

    /// Appends records durably (returns after their fsync).
    pub async fn append(&self, records: &[(u64, Decision)]) -> Result<(), DecisionError> {
        if records.is_empty() {
            return Ok(());
        }
        let (done_tx, done_rx) = oneshot::channel();
        {
            let tx = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            tx.send((encode(records), done_tx))
                .map_err(|_| DecisionError::Writer("writer thread is gone".into()))?;
        }
        match done_rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(DecisionError::Writer(e)),
            Err(_) => Err(DecisionError::Writer("writer thread is gone".into())),
        }
    }
}

/// Group commit: takes every job queued so far, writes them in one go, fsyncs once,
/// then answers them all.
fn writer_loop(mut file: File, rx: std_mpsc::Receiver<Job>) {
    // After a failed write or fsync the file's state is unknown (fsync errors are not
    // retryable on Linux): refuse everything from then on.
    let mut broken: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while let Ok(more) = rx.try_recv() {
            jobs.push(more);
        }
        let result = match &broken {
            Some(e) => Err(e.clone()),
            None => {
                let mut buf = Vec::new();
                for (bytes, _) in &jobs {
                    buf.extend_from_slice(bytes);
                }
                let r = file
                    .write_all(&buf)
                    .and_then(|_| file.sync_data())
                    .map_err(|e| format!("decision log write/fsync failed: {e}"));
                if let Err(e) = &r {
                    tracing::error!("{e}");
                    broken = Some(e.clone());
                }
                r
            }
        };
        for (_, done) in jobs {
            let _ = done.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = DecisionStore::open(dir.path()).unwrap();
            s.claim(10, Decision::Commit).unwrap();
            s.append(&[(10, Decision::Commit)]).await.unwrap();
            s.claim(10, Decision::Commit).unwrap();
            assert!(matches!(
                s.claim(10, Decision::Abort),
                Err(DecisionError::Conflict { .. })
            ));
            let fresh = s
                .merge(&[(10, Decision::Commit), (11, Decision::Abort)])
                .unwrap();
            assert_eq!(fresh, vec![(11, Decision::Abort)]);
            s.append(&fresh).await.unwrap();
        }
        let s = DecisionStore::open(dir.path()).unwrap();
        // Claimed but not confirmed durable: not answered, yet a conflict is refused.
        s.claim(20, Decision::Commit).unwrap();
        assert_eq!(s.get(20), None);
        assert!(s.claim(20, Decision::Abort).is_err());
        s.confirm(20);
        assert_eq!(s.get(20), Some(Decision::Commit));
        assert_eq!(s.get(10), Some(Decision::Commit));
        assert_eq!(s.get(11), Some(Decision::Abort));
        assert_eq!(s.get(12), None);
    }

    #[tokio::test]
    async fn concurrent_appends_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(DecisionStore::open(dir.path()).unwrap());
        let mut tasks = Vec::new();
        for g in 0..50u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.append(&[(g, Decision::Abort)]).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        drop(s);
        let bytes = fs::read(dir.path().join(DECISION_LOG_NAME)).unwrap();
        assert_eq!(parse_log(Path::new("x"), &bytes).unwrap().len(), 50);
    }

    #[tokio::test]
    async fn corrupt_tail_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = DecisionStore::open(dir.path()).unwrap();
            s.append(&[(1, Decision::Commit), (2, Decision::Abort)])
                .await
                .unwrap();
        }
        let path = dir.path().join(DECISION_LOG_NAME);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let e = DecisionStore::open(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("truncated record") && e.contains("decisions.log"),
            "{e}"
        );
        let mut flipped = bytes.clone();
        flipped[HEADER_LEN + RECORD_LEN + 3] ^= 1;
        fs::write(&path, &flipped).unwrap();
        let e = DecisionStore::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
    }
}
