//! Streams WAL from one upstream PostgreSQL into the [`WalStore`] and acknowledges it:
//! every batch of XLogData is written, fsynced, and only then reported as written and
//! flushed ('r'), so the primary counts a commit as having two copies only once the
//! secondary holds it durably. Reconnects after any error until cancelled (the task is
//! aborted: its socket closes and nothing more is acknowledged).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::pgproto::{self, Connection, ProtoError, ReplicationMessage};
use crate::wal_store::{segment_start, StoreError, WalStore};

/// The role the replication connection logs in as (SCRAM; see `ha_common::dn_auth`).
pub const REPLICATION_USER: &str = "mpp_replication";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between reconnect attempts: short, the first two-copy commit after a failover waits on it.
const RETRY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    pub host: String,
    pub port: u16,
}

/// What the control service shows of a running receiver.
#[derive(Debug, Default, Clone)]
pub struct Live {
    pub connected: bool,
    pub last_error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("upstream {0}")]
    Upstream(String),
    #[error(transparent)]
    Decode(#[from] pgproto::DecodeError),
}

/// One timeline switch in a history file: `tli` ended at `switch`.
pub fn parse_history(text: &str) -> Vec<(u32, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let tli = f.next()?.parse().ok()?;
            let lsn = ha_common::lsn::parse_lsn(f.next()?)?;
            Some((tli, lsn))
        })
        .collect()
}

/// The timeline holding `lsn`, given the upstream's history and current timeline.
pub fn timeline_of(lsn: u64, history: &[(u32, u64)], current: u32) -> u32 {
    history
        .iter()
        .find(|(_, switch)| lsn < *switch)
        .map_or(current, |(tli, _)| *tli)
}

/// "16MB" → bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().ok()?;
    let mult = match s[digits..].trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    Some(n * mult)
}

/// Streams from `up` until aborted, keeping WAL from no later than `start_lsn`.
pub async fn run(
    up: Upstream,
    start_lsn: u64,
    application_name: String,
    password_file: Option<PathBuf>,
    store: Arc<Mutex<WalStore>>,
    live: Arc<Mutex<Live>>,
) {
    loop {
        let r = session(
            &up,
            start_lsn,
            &application_name,
            password_file.as_deref(),
            &store,
            &live,
        )
        .await;
        let msg = match r {
            Ok(()) => "upstream closed the stream".to_owned(),
            Err(e) => e.to_string(),
        };
        {
            let mut l = live.lock().expect("live lock");
            if l.last_error != msg {
                tracing::warn!(upstream = %up.name, "replication: {msg}");
            }
            l.connected = false;
            l.last_error = msg;
        }
        tokio::time::sleep(RETRY).await;
    }
}

fn lock(store: &Mutex<WalStore>) -> std::sync::MutexGuard<'_, WalStore> {
    store.lock().expect("store lock")
}

async fn fetch_history(
    conn: &mut Connection,
    tli: u32,
    store: &Mutex<WalStore>,
) -> Result<Vec<(u32, u64)>, ReceiveError> {
    if tli <= 1 {
        return Ok(Vec::new());
    }
    let rows = conn.query(&format!("TIMELINE_HISTORY {tli}")).await?;
    let row = rows
        .first()
        .ok_or_else(|| ReceiveError::Upstream("TIMELINE_HISTORY returned no row".into()))?;
    let (Some(Some(name)), Some(Some(content))) = (row.first(), row.get(1)) else {
        return Err(ReceiveError::Upstream("TIMELINE_HISTORY: bad row".into()));
    };
    lock(store).put_history(name, content.as_bytes())?;
    Ok(parse_history(content))
}

/// Where to resume: prepares the store (keeps what the upstream's history agrees
/// with, truncates past a fork point, starts afresh otherwise) and returns (lsn, tli).
fn prepare(
    store: &mut WalStore,
    start_lsn: u64,
    seg_size: u64,
    up_tli: u32,
    history: &[(u32, u64)],
) -> Result<(u64, u32), StoreError> {
    let keep = !store.is_empty()
        && store.seg_size() == seg_size
        && store.start_lsn() <= start_lsn
        && start_lsn <= store.end()
        && (store.timeline() == up_tli || history.iter().any(|(t, _)| *t == store.timeline()));
    if keep {
        if let Some((_, fork)) = history.iter().find(|(t, _)| *t == store.timeline()) {
            if store.end() > *fork {
                store.truncate(*fork)?;
            }
        }
    } else {
        let tli = timeline_of(start_lsn, history, up_tli);
        store.begin(tli, start_lsn, seg_size)?;
    }
    let from = segment_start(store.end(), seg_size).max(store.start_lsn());
    Ok((from, store.timeline()))
}

async fn session(
    up: &Upstream,
    start_lsn: u64,
    application_name: &str,
    password_file: Option<&Path>,
    store: &Arc<Mutex<WalStore>>,
    live: &Arc<Mutex<Live>>,
) -> Result<(), ReceiveError> {
    // Read at each connection: a file made or changed since is used at once.
    let password = match password_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| {
                    ReceiveError::Upstream(format!(
                        "replication password file {}: {e}",
                        p.display()
                    ))
                })?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let mut conn = Connection::connect(
        &up.host,
        up.port,
        REPLICATION_USER,
        application_name,
        password.as_deref(),
        CONNECT_TIMEOUT,
    )
    .await?;
    let ident = conn.query("IDENTIFY_SYSTEM").await?;
    let up_tli: u32 = ident
        .first()
        .and_then(|r| r.get(1).cloned().flatten())
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| ReceiveError::Upstream("IDENTIFY_SYSTEM: no timeline".into()))?;
    let seg_size = conn
        .query("SHOW wal_segment_size")
        .await?
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|s| parse_size(&s))
        .ok_or_else(|| ReceiveError::Upstream("SHOW wal_segment_size: no size".into()))?;
    let history = fetch_history(&mut conn, up_tli, store).await?;
    let (mut from, mut tli) = prepare(&mut lock(store), start_lsn, seg_size, up_tli, &history)?;
    loop {
        conn.start_replication(from, tli).await?;
        {
            let mut l = live.lock().expect("live lock");
            l.connected = true;
            l.last_error.clear();
        }
        tracing::info!(upstream = %up.name, from = %ha_common::lsn::format_lsn(from), tli, "streaming");
        match stream(&mut conn, tli, store).await? {
            Some((next_tli, next_start)) => {
                tracing::info!(upstream = %up.name, next_tli, fork = %ha_common::lsn::format_lsn(next_start), "timeline switch");
                fetch_history(&mut conn, next_tli, store).await?;
                let mut s = lock(store);
                s.switch_timeline(next_tli, next_start)?;
                from = segment_start(next_start, seg_size).max(s.start_lsn());
                tli = next_tli;
            }
            None => return Ok(()),
        }
    }
}

/// Flushes and reports the durable position.
async fn acknowledge(
    conn: &mut Connection,
    store: &Mutex<WalStore>,
    reply: bool,
) -> Result<(), ReceiveError> {
    let flushed = lock(store).flush()?;
    conn.copy_data(&pgproto::encode_status(flushed, flushed, 0, reply))
        .await?;
    Ok(())
}

/// Receives one timeline's stream; Some(next timeline, its start) at its end.
async fn stream(
    conn: &mut Connection,
    tli: u32,
    store: &Mutex<WalStore>,
) -> Result<Option<(u32, u64)>, ReceiveError> {
    let mut pending = false;
    loop {
        let m = conn.read().await?;
        match m.tag {
            b'd' => match pgproto::decode_replication(m.body)? {
                ReplicationMessage::XLogData { start, data, .. } => {
                    lock(store).write(tli, start, &data)?;
                    pending = true;
                }
                ReplicationMessage::Keepalive {
                    reply_requested, ..
                } => {
                    if reply_requested || pending {
                        acknowledge(conn, store, false).await?;
                        pending = false;
                    }
                }
            },
            b'c' => {
                if pending {
                    lock(store).flush()?;
                }
                conn.copy_done().await?;
                return end_of_timeline(conn).await.map(Some);
            }
            b'E' => {
                let (code, message) = pgproto::decode_error_fields(m.body)?;
                return Err(ReceiveError::Upstream(format!("error {code}: {message}")));
            }
            b'N' | b'S' => {}
            t => {
                return Err(ReceiveError::Upstream(format!(
                    "unexpected message {:?} while streaming",
                    t as char
                )))
            }
        }
        // Group commit: one fsync and one acknowledgement per burst of messages.
        if pending && !conn.has_buffered() {
            acknowledge(conn, store, false).await?;
            pending = false;
        }
    }
}

/// After CopyDone both ways: the next timeline's row, then ReadyForQuery.
async fn end_of_timeline(conn: &mut Connection) -> Result<(u32, u64), ReceiveError> {
    let mut next = None;
    loop {
        let m = conn.read().await?;
        match m.tag {
            b'D' => {
                let row = pgproto::decode_data_row(m.body)?;
                let tli = row.first().cloned().flatten().and_then(|t| t.parse().ok());
                let lsn = row
                    .get(1)
                    .cloned()
                    .flatten()
                    .and_then(|l| ha_common::lsn::parse_lsn(&l));
                if let (Some(t), Some(l)) = (tli, lsn) {
                    next = Some((t, l));
                }
            }
            b'T' | b'C' | b'N' | b'S' | b'd' => {}
            b'E' => {
                let (code, message) = pgproto::decode_error_fields(m.body)?;
                return Err(ReceiveError::Upstream(format!("error {code}: {message}")));
            }
            b'Z' => {
                return next.ok_or_else(|| {
                    ReceiveError::Upstream("stream ended without a next timeline".into())
                })
            }
            t => {
                return Err(ReceiveError::Upstream(format!(
                    "unexpected message {:?} at end of timeline",
                    t as char
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_and_sizes_parse() {
        let h = parse_history("1\t0/3000148\tno recovery target specified\n\n2\t0/5000000\tx\n");
        assert_eq!(h, vec![(1, 0x3000148), (2, 0x5000000)]);
        assert_eq!(timeline_of(0x100, &h, 3), 1);
        assert_eq!(timeline_of(0x3000148, &h, 3), 2);
        assert_eq!(timeline_of(0x6000000, &h, 3), 3);
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("lots"), None);
    }

    const SEG: u64 = 1 << 20;

    #[test]
    fn resume_keeps_agreeing_wal_and_truncates_past_a_fork() {
        let d = tempfile::tempdir().unwrap();
        let mut s = WalStore::open(d.path()).unwrap();
        // Empty: begins at the segment of the start LSN.
        assert_eq!(prepare(&mut s, SEG + 5, SEG, 1, &[]).unwrap(), (SEG, 1));
        s.write(1, SEG, &vec![1u8; (SEG + 100) as usize]).unwrap();
        s.flush().unwrap();
        // Same timeline: resume at the last segment's start.
        assert_eq!(prepare(&mut s, SEG, SEG, 1, &[]).unwrap(), (2 * SEG, 1));
        // The upstream is on timeline 2, forked at 2*SEG+40: truncate, resume on 1.
        assert_eq!(
            prepare(&mut s, SEG, SEG, 2, &[(1, 2 * SEG + 40)]).unwrap(),
            (2 * SEG, 1)
        );
        assert_eq!(s.end(), 2 * SEG + 40);
        // An upstream whose history does not know our timeline: start afresh.
        assert_eq!(
            prepare(&mut s, 3 * SEG, SEG, 5, &[(4, SEG)]).unwrap(),
            (3 * SEG, 5)
        );
        assert_eq!(s.end(), 3 * SEG);
        // A start before what is kept: start afresh there.
        assert_eq!(prepare(&mut s, 0, SEG, 5, &[(4, SEG)]).unwrap(), (0, 4));
    }
}
