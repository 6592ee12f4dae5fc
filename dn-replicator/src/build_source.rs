//! The sending side of a build: runs on the primary's host, holds a non-exclusive backup
//! (`pg_backup_start`/`pg_backup_stop` on one session, a temporary physical slot keeping
//! the WAL from the backup's start) and ships the data dir as 8 KiB units in parallel
//! with that WAL. A sink that loses its connection comes back with its session id and
//! its durable acknowledgements, and the session continues from there, not from zero.
//!
//! The backup lives in this process: if the source itself dies, PostgreSQL ends the
//! backup with its session and the next build starts a new one (from zero, or from what
//! the sink already has in incremental mode).

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::data_unit::{encode, DataUnit, Message, UnitKind, WalChunk, BLOCK_SIZE, MAX_WAL_CHUNK};
use crate::framing::{FrameError, FrameReader};
use crate::manifest::{Manifest, ManifestError};

/// Where the source's PostgreSQL is (the primary whose data dir it ships).
#[derive(Debug, Clone)]
pub struct PgTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The role's SCRAM password (pg_hba asks every TCP login for one).
    pub password: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub data_dir: PathBuf,
    pub pg: PgTarget,
    /// How long a session waits for its sink to come back before the backup is ended.
    pub resume_window: Duration,
    /// How long the source waits for the first sink.
    pub first_wait: Duration,
    /// Bytes per second of data units at most (None: as fast as it can), like
    /// pg_basebackup's --max-rate: spares a busy primary's disks.
    pub max_rate: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("PostgreSQL {0}: {1}")]
    Pg(String, tokio_postgres::Error),
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("network: {0}")]
    Net(#[from] std::io::Error),
    #[error("sink: {0}")]
    Frame(#[from] FrameError),
    #[error("sink: {0}")]
    Protocol(String),
    #[error("{0}")]
    Timeout(String),
}

/// What one served build did.
#[derive(Debug, Clone, Default)]
pub struct SourceReport {
    pub session: u64,
    pub units: u64,
    pub units_sent: u64,
    pub same_units: u64,
    pub wal_bytes_sent: u64,
    pub connections: u32,
    pub stop_lsn: u64,
}

/// One backup in progress.
struct Session {
    id: u64,
    data_dir: PathBuf,
    client: Arc<tokio_postgres::Client>,
    manifest: Arc<Manifest>,
    start_lsn: u64,
    timeline: u32,
    segment_size: u32,
    sums: Arc<HashMap<u32, Vec<u32>>>,
    stop: Option<(u64, String, String)>,
    report: SourceReport,
    max_rate: Option<u64>,
}

/// Binds the source's listener (port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, SourceError> {
    Ok(TcpListener::bind(addr).await?)
}

/// Serves builds until one completes; connections that are not a build sink (garbage,
/// a wrong version) get an error frame or are dropped, and the source keeps serving.
pub async fn serve_one(
    listener: &TcpListener,
    cfg: &SourceConfig,
) -> Result<SourceReport, SourceError> {
    let mut session: Option<Session> = None;
    let mut deadline = Instant::now() + cfg.first_wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let accepted = tokio::time::timeout(left, listener.accept()).await;
        let Ok(accepted) = accepted else {
            return Err(SourceError::Timeout(match &session {
                Some(s) => format!(
                    "build session {} lost its sink for {:?}: backup ended",
                    s.id, cfg.resume_window
                ),
                None => format!("no build sink connected within {:?}", cfg.first_wait),
            }));
        };
        let (stream, peer) = accepted?;
        let _ = stream.set_nodelay(true);
        match serve_connection(stream, cfg, &mut session).await {
            Ok(true) => {
                let s = session.take().expect("a completed build has a session");
                tracing::info!(session = s.id, "build complete");
                return Ok(s.report);
            }
            Ok(false) => {}
            Err(SourceError::Pg(what, e)) => {
                return Err(SourceError::Pg(what, e));
            }
            Err(e) => tracing::warn!(%peer, "build connection ended: {e}"),
        }
        deadline = Instant::now() + cfg.resume_window;
    }
}

fn frame(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode(msg, &mut out);
    out
}

/// Serves one connection; `Ok(true)` when the build completed on it.
async fn serve_connection(
    stream: TcpStream,
    cfg: &SourceConfig,
    session: &mut Option<Session>,
) -> Result<bool, SourceError> {
    let (rd, mut wr) = stream.into_split();
    let mut frames = FrameReader::new(rd);
    let hello = tokio::time::timeout(Duration::from_secs(10), frames.next())
        .await
        .map_err(|_| SourceError::Timeout("no hello within 10 s".into()));
    let hello = match hello {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => return Ok(false),
        Ok(Err(e)) => {
            let e = SourceError::from(e);
            let _ = wr
                .write_all(&frame(&Message::Failed {
                    message: e.to_string(),
                }))
                .await;
            return Err(e);
        }
        Err(e) => {
            let _ = wr
                .write_all(&frame(&Message::Failed {
                    message: e.to_string(),
                }))
                .await;
            return Err(e);
        }
    };
    let Message::Hello {
        session: want,
        data_from,
        wal_from,
        incremental,
    } = hello
    else {
        return Err(SourceError::Protocol(format!(
            "expected hello, got {hello:?}"
        )));
    };
    let resuming = matches!(session, Some(s) if s.id == want && want != 0);
    if !resuming {
        if let Some(old) = session.take() {
            tracing::warn!(
                old = old.id,
                "a sink started a new build: the old backup ends"
            );
        }
        *session = Some(start_session(cfg).await?);
    }
    let s = session.as_mut().expect("set above");
    s.report.connections += 1;
    let units = s.manifest.units();
    let (data_from, wal_from) = if resuming {
        (
            data_from.min(units),
            wal_from.max(s.start_lsn - s.start_lsn % s.segment_size as u64),
        )
    } else {
        (0, s.start_lsn - s.start_lsn % s.segment_size as u64)
    };
    tracing::info!(
        session = s.id,
        resuming,
        data_from,
        wal_from = %ha_common::lsn::format_lsn(wal_from),
        units,
        "build connection"
    );
    let mut out = frame(&Message::Welcome {
        session: s.id,
        data_from,
        wal_from,
        start_lsn: s.start_lsn,
        timeline: s.timeline,
        segment_size: s.segment_size,
        units,
    });
    if !resuming {
        for (i, e) in s.manifest.entries.iter().enumerate() {
            encode(
                &Message::Entry {
                    index: i as u32,
                    kind: e.kind,
                    size: e.size,
                    path: e.path.clone(),
                },
                &mut out,
            );
        }
        encode(&Message::ManifestDone, &mut out);
    }
    wr.write_all(&out).await?;
    if !resuming && incremental {
        let mut sums: HashMap<u32, Vec<u32>> = HashMap::new();
        loop {
            match frames.next().await.map_err(SourceError::from)? {
                Some(Message::Sums {
                    file,
                    first_block,
                    crcs,
                }) => {
                    let v = sums.entry(file).or_default();
                    if v.len() != first_block as usize {
                        return Err(SourceError::Protocol(format!(
                            "sums of file {file} out of order (block {first_block})"
                        )));
                    }
                    v.extend(crcs);
                }
                Some(Message::SumsDone) => break,
                other => {
                    return Err(SourceError::Protocol(format!(
                        "expected sums, got {other:?}"
                    )))
                }
            }
        }
        s.sums = Arc::new(sums);
    }
    stream_session(s, frames, wr, data_from, wal_from).await
}

/// Connects, pins WAL with a temporary slot and starts the backup; lists the data dir.
async fn start_session(cfg: &SourceConfig) -> Result<Session, SourceError> {
    let mut pgc = tokio_postgres::Config::new();
    pgc.host(&cfg.pg.host)
        .port(cfg.pg.port)
        .user(&cfg.pg.user)
        .dbname("postgres")
        .application_name("dn_replicator build-source")
        .connect_timeout(Duration::from_secs(10));
    if let Some(pw) = &cfg.pg.password {
        pgc.password(pw);
    }
    let (client, conn) = pgc
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| SourceError::Pg("connect".into(), e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let id = session_id();
    let pg = |what: &str| {
        let what = what.to_owned();
        move |e| SourceError::Pg(what, e)
    };
    // The slot keeps every WAL segment from here on until this session ends.
    client
        .execute(
            "SELECT pg_create_physical_replication_slot($1, true, true)",
            &[&format!("mpp_build_{id:x}")],
        )
        .await
        .map_err(pg("create temporary slot"))?;
    let row = client
        .query_one(
            "SELECT pg_backup_start($1, true)::text, \
             (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_segment_size')",
            &[&format!("mpp_build_{id:x}")],
        )
        .await
        .map_err(pg("pg_backup_start"))?;
    let start: String = row.get(0);
    let segment_size: i64 = row.get(1);
    let start_lsn = ha_common::lsn::parse_lsn(&start)
        .ok_or_else(|| SourceError::Protocol(format!("bad start LSN {start:?}")))?;
    let row = client
        .query_one("SELECT pg_walfile_name($1::text::pg_lsn)", &[&start])
        .await
        .map_err(pg("pg_walfile_name"))?;
    let walfile: String = row.get(0);
    let timeline = u32::from_str_radix(walfile.get(..8).unwrap_or(""), 16)
        .map_err(|_| SourceError::Protocol(format!("bad WAL file name {walfile:?}")))?;
    let manifest = Manifest::scan(&cfg.data_dir)?;
    tracing::info!(
        session = id,
        start = %start,
        timeline,
        units = manifest.units(),
        entries = manifest.entries.len(),
        "backup started"
    );
    Ok(Session {
        id,
        data_dir: cfg.data_dir.clone(),
        client: Arc::new(client),
        report: SourceReport {
            session: id,
            units: manifest.units(),
            ..SourceReport::default()
        },
        manifest: Arc::new(manifest),
        start_lsn,
        timeline,
        segment_size: segment_size as u32,
        sums: Arc::new(HashMap::new()),
        stop: None,
        max_rate: cfg.max_rate,
    })
}

fn session_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 48) | 1
}

/// Produces encoded data units from `from` in a blocking thread, in batches.
fn spawn_data_producer(
    data_dir: PathBuf,
    manifest: Arc<Manifest>,
    sums: Arc<HashMap<u32, Vec<u32>>>,
    from: u64,
    tx: mpsc::Sender<(Vec<u8>, u64, u64)>,
    stop: Arc<AtomicBool>,
    max_rate: Option<u64>,
) {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut shipped = 0u64;
        let mut open: Option<(u32, Option<File>)> = None;
        let mut offset = from;
        let units = manifest.units();
        let mut buf = vec![0u8; BLOCK_SIZE];
        while offset < units && !stop.load(Ordering::Relaxed) {
            let mut batch = Vec::with_capacity(64 * (BLOCK_SIZE + 40));
            let (mut sent, mut same) = (0u64, 0u64);
            while offset < units && batch.len() < 60 * BLOCK_SIZE {
                let (file, block) = manifest.locate(offset).expect("offset < units");
                let e = &manifest.entries[file as usize];
                if open.as_ref().map(|(i, _)| *i) != Some(file) {
                    open = Some((file, File::open(data_dir.join(&e.path)).ok()));
                }
                let want = ((e.size - block as u64 * BLOCK_SIZE as u64) as usize).min(BLOCK_SIZE);
                let n = match &open {
                    Some((_, Some(f))) => {
                        read_full(f, &mut buf[..want], block as u64 * BLOCK_SIZE as u64)
                    }
                    _ => 0,
                };
                let unit = if n == 0 {
                    DataUnit::new(offset, file, block, UnitKind::Missing, Vec::new())
                } else {
                    let data = &buf[..n];
                    let theirs = sums.get(&file).and_then(|v| v.get(block as usize));
                    if theirs == Some(&crc32c::crc32c(data)) {
                        same += 1;
                        DataUnit::new(offset, file, block, UnitKind::Same, Vec::new())
                    } else {
                        DataUnit::new(offset, file, block, UnitKind::Data, data.to_vec())
                    }
                };
                encode(&Message::Unit(unit), &mut batch);
                sent += 1;
                offset += 1;
            }
            shipped += batch.len() as u64;
            if let Some(rate) = max_rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(shipped as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            if tx.blocking_send((batch, sent, same)).is_err() {
                return;
            }
        }
    });
}

/// Reads up to `buf.len()` bytes at `at`; a short count means the file ends there.
fn read_full(f: &File, buf: &mut [u8], at: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], at + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    done
}

/// The WAL file name of `lsn` on `timeline`.
pub fn wal_file_name(timeline: u32, lsn: u64, segment_size: u32) -> String {
    let segno = lsn / segment_size as u64;
    let per_id = 0x1_0000_0000u64 / segment_size as u64;
    format!("{timeline:08X}{:08X}{:08X}", segno / per_id, segno % per_id)
}

/// Ships WAL from `from` up to what the primary has flushed, then up to the stop LSN.
fn spawn_wal_producer(
    data_dir: PathBuf,
    client: Arc<tokio_postgres::Client>,
    timeline: u32,
    segment_size: u32,
    from: u64,
    mut stop_lsn: tokio::sync::watch::Receiver<Option<u64>>,
    tx: mpsc::Sender<Result<(Vec<u8>, u64), String>>,
) {
    tokio::spawn(async move {
        let mut pos = from;
        loop {
            let stop = *stop_lsn.borrow_and_update();
            let limit = match stop {
                Some(l) => l,
                None => match client
                    .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
                    .await
                {
                    Ok(row) => ha_common::lsn::parse_lsn(&row.get::<_, String>(0)).unwrap_or(pos),
                    Err(e) => {
                        let _ = tx.send(Err(format!("pg_current_wal_flush_lsn: {e}"))).await;
                        return;
                    }
                },
            };
            if pos >= limit {
                if stop.is_some() {
                    return; // everything up to the stop LSN went out
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop_lsn.changed() => {}
                }
                continue;
            }
            let mut batch = Vec::new();
            let mut bytes = 0u64;
            while pos < limit && batch.len() < 4 * MAX_WAL_CHUNK {
                let seg_end = pos - pos % segment_size as u64 + segment_size as u64;
                let n = (limit.min(seg_end) - pos).min(MAX_WAL_CHUNK as u64) as usize;
                let path = data_dir
                    .join("pg_wal")
                    .join(wal_file_name(timeline, pos, segment_size));
                let mut data = vec![0u8; n];
                let got = match File::open(&path) {
                    Ok(f) => read_full(&f, &mut data, pos % segment_size as u64),
                    Err(e) => {
                        let _ = tx.send(Err(format!("{}: {e}", path.display()))).await;
                        return;
                    }
                };
                if got < n {
                    let _ = tx
                        .send(Err(format!("{}: short read at {pos:#x}", path.display())))
                        .await;
                    return;
                }
                encode(
                    &Message::Wal(WalChunk::new(pos, timeline, data)),
                    &mut batch,
                );
                pos += n as u64;
                bytes += n as u64;
            }
            if tx.send(Ok((batch, bytes))).await.is_err() {
                return;
            }
        }
    });
}

/// Streams units and WAL on one connection until the build completes (true) or the
/// connection ends (false / error).
async fn stream_session(
    s: &mut Session,
    mut frames: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    data_from: u64,
    wal_from: u64,
) -> Result<bool, SourceError> {
    let units = s.manifest.units();
    let data_dir = s.data_dir.clone();
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Result<Option<Message>, FrameError>>(64);
    let reader = tokio::spawn(async move {
        loop {
            let m = frames.next().await;
            let end = !matches!(m, Ok(Some(_)));
            if ctl_tx.send(m).await.is_err() || end {
                return;
            }
        }
    });
    let _reader_guard = AbortOnDrop(reader);
    let max_rate = s.max_rate;
    let start_data = |from: u64| {
        let (tx, rx) = mpsc::channel(8);
        let stop = Arc::new(AtomicBool::new(false));
        spawn_data_producer(
            data_dir.clone(),
            s.manifest.clone(),
            s.sums.clone(),
            from,
            tx,
            stop.clone(),
            max_rate,
        );
        (rx, StopOnDrop(stop))
    };
    let (mut data_rx, mut _data_stop) = start_data(data_from);
    let mut data_open = data_from < units;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(s.stop.as_ref().map(|x| x.0));
    let (wal_tx, mut wal_rx) = mpsc::channel(8);
    spawn_wal_producer(
        data_dir.clone(),
        s.client.clone(),
        s.timeline,
        s.segment_size,
        wal_from,
        stop_rx,
        wal_tx,
    );
    let mut wal_open = true;
    let mut acked = (data_from, wal_from);
    let mut finish_sent = false;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            m = ctl_rx.recv() => match m {
                Some(Ok(Some(Message::Ack { data, wal }))) => acked = (data, wal),
                Some(Ok(Some(Message::Resend { offset }))) => {
                    if offset >= units || s.stop.is_some() {
                        return Err(SourceError::Protocol(format!("resend of unit {offset} out of range")));
                    }
                    tracing::warn!(session = s.id, offset, "sink refused a unit: sending again from there");
                    let (rx, stop) = start_data(offset);
                    data_rx = rx;
                    _data_stop = stop;
                    data_open = true;
                }
                Some(Ok(Some(other))) => {
                    return Err(SourceError::Protocol(format!("unexpected {other:?}")));
                }
                Some(Ok(None)) | None => {
                    return Ok(finish_sent && acked.0 >= units && acked.1 >= s.stop.as_ref().map_or(u64::MAX, |x| x.0));
                }
                Some(Err(e)) => return Err(e.into()),
            },
            b = data_rx.recv(), if data_open => match b {
                Some((bytes, n, same)) => {
                    wr.write_all(&bytes).await?;
                    s.report.units_sent += n;
                    s.report.same_units += same;
                }
                None => data_open = false,
            },
            b = wal_rx.recv(), if wal_open => match b {
                Some(Ok((bytes, n))) => {
                    wr.write_all(&bytes).await?;
                    s.report.wal_bytes_sent += n;
                }
                Some(Err(e)) => {
                    let _ = wr.write_all(&frame(&Message::Failed { message: e.clone() })).await;
                    return Err(SourceError::Protocol(format!("WAL: {e}")));
                }
                None => wal_open = false,
            },
            _ = tick.tick() => {
                // Every unit durable on the sink: the copy is complete, end the backup.
                if s.stop.is_none() && acked.0 >= units {
                    let row = s
                        .client
                        .query_one("SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)", &[])
                        .await
                        .map_err(|e| SourceError::Pg("pg_backup_stop".into(), e))?;
                    let lsn: String = row.get(0);
                    let stop_lsn = ha_common::lsn::parse_lsn(&lsn)
                        .ok_or_else(|| SourceError::Protocol(format!("bad stop LSN {lsn:?}")))?;
                    tracing::info!(session = s.id, stop = %lsn, "backup stopped");
                    s.report.stop_lsn = stop_lsn;
                    s.stop = Some((stop_lsn, row.get(1), row.get::<_, Option<String>>(2).unwrap_or_default()));
                    let _ = stop_tx.send(Some(stop_lsn));
                }
                if let Some((stop_lsn, label, map)) = &s.stop {
                    if !wal_open && !finish_sent {
                        wr.write_all(&frame(&Message::Finish {
                            stop_lsn: *stop_lsn,
                            backup_label: label.clone(),
                            tablespace_map: map.clone(),
                        }))
                        .await?;
                        finish_sent = true;
                    }
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct StopOnDrop(Arc<AtomicBool>);
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_file_names_follow_postgres() {
        assert_eq!(
            wal_file_name(1, 0x3000028, 16 << 20),
            "000000010000000000000003"
        );
        assert_eq!(
            wal_file_name(2, 0x1_0200_0000, 16 << 20),
            "000000020000000100000002"
        );
        assert_eq!(
            wal_file_name(1, 0x1_0000_0000 + (64 << 20), 64 << 20),
            "000000010000000100000001"
        );
    }
}
