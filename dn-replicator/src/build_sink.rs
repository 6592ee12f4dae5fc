//! The receiving side of a build: writes data units and WAL into the new data dir,
//! fsyncs in batches, keeps its progress durably (a sealed state file beside the data
//! dir) and acknowledges the highest contiguous offset. Interrupted, it comes back with
//! that progress and the source continues from there. A unit whose checksum fails is
//! refused and sent again; garbage from the source ends the build with one error.
//!
//! Until the build is complete the data dir has no `global/pg_control` (it is written as
//! `pg_control.mpp_build` and renamed last, after `backup_label`), so nothing ever takes a
//! half-built dir for a usable one.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ha_common::durable::{write_atomic, Envelope};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::data_unit::{
    encode, DataUnit, EntryKind, Message, UnitKind, WalChunk, BLOCK_SIZE, MAX_SUMS,
};
use crate::framing::{FrameError, FrameReader};
use crate::manifest::{Manifest, PG_CONTROL};

const PROGRESS: Envelope = Envelope {
    magic: *b"MPBP",
    version: 1,
    what: "build progress",
};
const MANIFEST: Envelope = Envelope {
    magic: *b"MPBM",
    version: 1,
    what: "build manifest",
};
/// pg_control is written under this name until the build is complete.
const PG_CONTROL_PARTIAL: &str = "global/pg_control.mpp_build";

#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// The build source (host:port).
    pub source: String,
    pub data_dir: PathBuf,
    /// Where the progress and manifest state files live (not inside the data dir).
    pub state_dir: PathBuf,
    /// Keep the data dir's files and ship only blocks that differ.
    pub incremental: bool,
    /// uid/gid every created file and directory gets (PostgreSQL's OS user).
    pub owner: Option<(u32, u32)>,
    /// fsync, persist progress and acknowledge at least every this many bytes.
    pub batch_bytes: u64,
    /// How long to keep reconnecting after a lost connection.
    pub retry_for: Duration,
}

impl SinkConfig {
    pub fn progress_path(&self) -> PathBuf {
        self.state_dir.join("build.progress")
    }
    pub fn manifest_path(&self) -> PathBuf {
        self.state_dir.join("build.manifest")
    }
    /// Removes any saved progress (a `--full` build starts over).
    pub fn forget_progress(&self) -> std::io::Result<()> {
        for p in [self.progress_path(), self.manifest_path()] {
            match fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("build source {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("build source: {0}")]
    Frame(#[from] FrameError),
    #[error("build source failed: {0}")]
    SourceFailed(String),
    #[error("build source broke the protocol: {0}")]
    Protocol(String),
    #[error("WAL chunk at {0:#x} failed its checksum")]
    BadWal(u64),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{0}; remove it (or build with --full) to start over")]
    State(String),
    #[error("{0}")]
    Refused(String),
}

impl SinkError {
    /// Whether reconnecting (and resuming) may help.
    fn retryable(&self) -> bool {
        matches!(
            self,
            SinkError::Connect(..)
                | SinkError::BadWal(_)
                | SinkError::Frame(FrameError::Io(_) | FrameError::Truncated(_))
        )
    }
}

fn io<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> SinkError + 'p {
    move |source| SinkError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// What one build did.
#[derive(Debug, Clone, Default)]
pub struct SinkReport {
    pub session: u64,
    /// The data offset the first connection resumed from (0 = from the start).
    pub resumed_from: u64,
    pub units: u64,
    pub units_written: u64,
    pub units_same: u64,
    pub bytes_written: u64,
    pub wal_bytes: u64,
    pub refused: u64,
    pub connections: u32,
}

/// Durable progress of one build session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Progress {
    session: u64,
    data_acked: u64,
    wal_acked: u64,
    segment_size: u32,
}

impl Progress {
    fn to_bytes(self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&self.session.to_le_bytes());
        b.extend_from_slice(&self.data_acked.to_le_bytes());
        b.extend_from_slice(&self.wal_acked.to_le_bytes());
        b.extend_from_slice(&self.segment_size.to_le_bytes());
        b
    }
    fn from_bytes(b: &[u8]) -> Option<Progress> {
        if b.len() != 28 {
            return None;
        }
        Some(Progress {
            session: u64::from_le_bytes(b[0..8].try_into().ok()?),
            data_acked: u64::from_le_bytes(b[8..16].try_into().ok()?),
            wal_acked: u64::from_le_bytes(b[16..24].try_into().ok()?),
            segment_size: u32::from_le_bytes(b[24..28].try_into().ok()?),
        })
    }
}

/// Progress and manifest of a build that was interrupted.
fn load_state(cfg: &SinkConfig) -> Result<Option<(Progress, Manifest)>, SinkError> {
    let pp = cfg.progress_path();
    let bytes = match fs::read(&pp) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", &pp)(e)),
    };
    let payload = PROGRESS
        .open(&pp, &bytes)
        .map_err(|e| SinkError::State(e.to_string()))?;
    let progress = Progress::from_bytes(payload)
        .ok_or_else(|| SinkError::State(format!("{}: malformed progress", pp.display())))?;
    let mp = cfg.manifest_path();
    let bytes = fs::read(&mp).map_err(io("read", &mp))?;
    let payload = MANIFEST
        .open(&mp, &bytes)
        .map_err(|e| SinkError::State(e.to_string()))?;
    let manifest = Manifest::from_bytes(payload)
        .ok_or_else(|| SinkError::State(format!("{}: malformed manifest", mp.display())))?;
    Ok(Some((progress, manifest)))
}

fn save_progress(cfg: &SinkConfig, p: Progress) -> Result<(), SinkError> {
    let path = cfg.progress_path();
    write_atomic(&path, &PROGRESS.seal(&p.to_bytes())).map_err(io("write", &path))
}

/// The saved progress of an interrupted build in `state_dir`: (session, data units
/// durable, WAL durable up to). None when there is none or it cannot be read.
pub fn saved_progress(state_dir: &Path) -> Option<(u64, u64, u64)> {
    let path = state_dir.join("build.progress");
    let bytes = fs::read(&path).ok()?;
    let p = Progress::from_bytes(PROGRESS.open(&path, &bytes).ok()?)?;
    Some((p.session, p.data_acked, p.wal_acked))
}

/// Runs a build into `cfg.data_dir`, resuming saved progress, reconnecting after lost
/// connections for up to `retry_for`.
pub async fn run(cfg: &SinkConfig) -> Result<SinkReport, SinkError> {
    fs::create_dir_all(&cfg.state_dir).map_err(io("create", &cfg.state_dir))?;
    let mut state = load_state(cfg)?;
    let mut report = SinkReport {
        resumed_from: state.as_ref().map_or(0, |(p, _)| p.data_acked),
        ..SinkReport::default()
    };
    if let Some((p, _)) = &state {
        tracing::info!(session = p.session, data = p.data_acked, wal = %ha_common::lsn::format_lsn(p.wal_acked), "resuming a build");
    }
    let mut deadline = Instant::now() + cfg.retry_for;
    loop {
        match connection(cfg, &mut state, &mut report).await {
            Ok(()) => return Ok(report),
            Err(e) if e.retryable() && Instant::now() < deadline => {
                tracing::warn!("build connection lost ({e}); resuming");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
        if report.connections > 0 {
            // Progress was made on that connection: a fresh window for the next.
            deadline = deadline.max(Instant::now() + cfg.retry_for / 2);
        }
    }
}

fn frame(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode(msg, &mut out);
    out
}

async fn connection(
    cfg: &SinkConfig,
    state: &mut Option<(Progress, Manifest)>,
    report: &mut SinkReport,
) -> Result<(), SinkError> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&cfg.source))
        .await
        .map_err(|_| {
            SinkError::Connect(
                cfg.source.clone(),
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            )
        })?
        .map_err(|e| SinkError::Connect(cfg.source.clone(), e))?;
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut frames = FrameReader::new(rd);
    let (session, data_from, wal_from) = state
        .as_ref()
        .map_or((0, 0, 0), |(p, _)| (p.session, p.data_acked, p.wal_acked));
    wr.write_all(&frame(&Message::Hello {
        session,
        data_from,
        wal_from,
        incremental: cfg.incremental,
    }))
    .await
    .map_err(FrameError::Io)?;
    let welcome = tokio::time::timeout(Duration::from_secs(60), frames.next())
        .await
        .map_err(|_| SinkError::Protocol("no welcome within 60 s".into()))??;
    let (w_session, w_data, w_wal, segment_size, units) = match welcome {
        Some(Message::Welcome {
            session,
            data_from,
            wal_from,
            segment_size,
            units,
            ..
        }) => (session, data_from, wal_from, segment_size, units),
        Some(Message::Failed { message }) => return Err(SinkError::SourceFailed(message)),
        Some(other) => {
            return Err(SinkError::Protocol(format!(
                "expected welcome, got {other:?}"
            )))
        }
        None => return Err(FrameError::Truncated(0).into()),
    };
    report.connections += 1;
    let resumed = matches!(state, Some((p, _)) if p.session == w_session);
    if resumed {
        if w_data > data_from {
            return Err(SinkError::Protocol(format!(
                "source resumes at unit {w_data}, past this sink's {data_from}"
            )));
        }
    } else {
        if state.is_some() {
            tracing::warn!(
                old = session,
                new = w_session,
                "the source no longer holds this build's backup: starting over"
            );
            report.resumed_from = 0;
        }
        let manifest = receive_manifest(cfg, &mut frames).await?;
        if manifest.units() != units {
            return Err(SinkError::Protocol(format!(
                "manifest has {} units, welcome said {units}",
                manifest.units()
            )));
        }
        prepare_dir(cfg, &manifest)?;
        let mp = cfg.manifest_path();
        write_atomic(&mp, &MANIFEST.seal(&manifest.to_bytes())).map_err(io("write", &mp))?;
        let p = Progress {
            session: w_session,
            data_acked: 0,
            wal_acked: w_wal,
            segment_size,
        };
        save_progress(cfg, p)?;
        if cfg.incremental {
            send_sums(cfg, &manifest, &mut wr).await?;
        }
        *state = Some((p, manifest));
    }
    let (progress, manifest) = state.as_mut().expect("set above");
    progress.data_acked = if resumed { w_data } else { 0 };
    progress.wal_acked = w_wal;
    report.session = w_session;
    report.units = units;
    receive(cfg, progress, manifest, &mut frames, &mut wr, report).await
}

async fn receive_manifest(
    cfg: &SinkConfig,
    frames: &mut FrameReader<tokio::net::tcp::OwnedReadHalf>,
) -> Result<Manifest, SinkError> {
    let _ = cfg;
    let mut m = Manifest::default();
    loop {
        match frames.next().await? {
            Some(Message::Entry {
                index,
                kind,
                size,
                path,
            }) => {
                if index as usize != m.entries.len() {
                    return Err(SinkError::Protocol(format!(
                        "manifest entry {index} out of order"
                    )));
                }
                m.push(kind, path, size);
            }
            Some(Message::ManifestDone) => return Ok(m),
            Some(Message::Failed { message }) => return Err(SinkError::SourceFailed(message)),
            Some(other) => {
                return Err(SinkError::Protocol(format!(
                    "expected a manifest entry, got {other:?}"
                )))
            }
            None => return Err(FrameError::Truncated(0).into()),
        }
    }
}

fn chown(cfg: &SinkConfig, path: &Path) -> Result<(), SinkError> {
    if let Some((uid, gid)) = cfg.owner {
        nix::unistd::chown(path, Some(uid.into()), Some(gid.into())).map_err(|e| {
            SinkError::Io {
                what: "chown",
                path: path.display().to_string(),
                source: e.into(),
            }
        })?;
    }
    Ok(())
}

fn create_dir(cfg: &SinkConfig, path: &Path) -> Result<(), SinkError> {
    use std::os::unix::fs::DirBuilderExt;
    if !path.is_dir() {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(path)
            .map_err(io("create directory", path))?;
    }
    chown(cfg, path)
}

/// A new session: a full build starts from an empty dir; an incremental one keeps the
/// files (the blocks that match are not sent) but drops pg_control, the old WAL and
/// labels, so the dir is not a usable cluster until the build completes.
fn prepare_dir(cfg: &SinkConfig, manifest: &Manifest) -> Result<(), SinkError> {
    let d = &cfg.data_dir;
    if d.join("postmaster.pid").exists() {
        let pid = ha_common::process::read_pid_file(&d.join("postmaster.pid"));
        if pid.is_some_and(ha_common::process::alive) {
            return Err(SinkError::Refused(format!(
                "{}: a postmaster (pid {}) runs on this data dir: stop it first",
                d.display(),
                pid.unwrap_or(0)
            )));
        }
    }
    if d.exists() && !cfg.incremental {
        for item in fs::read_dir(d).map_err(io("read", d))? {
            let p = item.map_err(io("read", d))?.path();
            remove_any(&p)?;
        }
    }
    if let Some(parent) = d.parent() {
        fs::create_dir_all(parent).map_err(io("create directory", parent))?;
    }
    create_dir(cfg, d)?;
    if cfg.incremental {
        for f in [PG_CONTROL, "backup_label", "tablespace_map"] {
            let p = d.join(f);
            if p.exists() {
                fs::remove_file(&p).map_err(io("remove", &p))?;
            }
        }
        let wal = d.join("pg_wal");
        if wal.is_dir() {
            for item in fs::read_dir(&wal).map_err(io("read", &wal))? {
                let p = item.map_err(io("read", &wal))?.path();
                if p.is_file() {
                    remove_any(&p)?;
                }
            }
        }
        ha_common::durable::fsync_dir(d).map_err(io("fsync", d))?;
    }
    for e in &manifest.entries {
        if e.kind == EntryKind::Dir {
            create_dir(cfg, &d.join(&e.path))?;
        }
    }
    Ok(())
}

fn remove_any(p: &Path) -> Result<(), SinkError> {
    let meta = fs::symlink_metadata(p).map_err(io("stat", p))?;
    if meta.is_dir() {
        fs::remove_dir_all(p).map_err(io("remove", p))
    } else {
        fs::remove_file(p).map_err(io("remove", p))
    }
}

/// The local path a manifest file is written to.
fn local_path(data_dir: &Path, rel: &str) -> PathBuf {
    if rel == PG_CONTROL {
        data_dir.join(PG_CONTROL_PARTIAL)
    } else {
        data_dir.join(rel)
    }
}

/// Incremental: the crc32c of every block this sink already has, file by file.
async fn send_sums(
    cfg: &SinkConfig,
    manifest: &Manifest,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
) -> Result<(), SinkError> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; BLOCK_SIZE];
    for (i, e) in manifest.entries.iter().enumerate() {
        if e.kind != EntryKind::File || e.path == PG_CONTROL {
            continue;
        }
        let path = cfg.data_dir.join(&e.path);
        let Ok(f) = File::open(&path) else { continue };
        let mut crcs = Vec::new();
        let mut first = 0u32;
        let mut block = 0u64;
        loop {
            let n = read_at_most(&f, &mut buf, block * BLOCK_SIZE as u64);
            if n == 0 {
                break;
            }
            crcs.push(crc32c::crc32c(&buf[..n]));
            block += 1;
            if crcs.len() == MAX_SUMS {
                let n = crcs.len() as u32;
                encode(
                    &Message::Sums {
                        file: i as u32,
                        first_block: first,
                        crcs: std::mem::take(&mut crcs),
                    },
                    &mut out,
                );
                first += n;
            }
            if n < BLOCK_SIZE {
                break;
            }
        }
        if !crcs.is_empty() {
            encode(
                &Message::Sums {
                    file: i as u32,
                    first_block: first,
                    crcs,
                },
                &mut out,
            );
        }
        if out.len() > 1 << 20 {
            wr.write_all(&out).await.map_err(FrameError::Io)?;
            out.clear();
        }
    }
    encode(&Message::SumsDone, &mut out);
    wr.write_all(&out).await.map_err(FrameError::Io)?;
    Ok(())
}

fn read_at_most(f: &File, buf: &mut [u8], at: u64) -> usize {
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

type SyncJob = tokio::task::JoinHandle<Result<(), SinkError>>;

/// Open files and what must be fsynced before the next acknowledgement.
struct Writer<'a> {
    cfg: &'a SinkConfig,
    files: HashMap<u32, File>,
    dirty: HashSet<u32>,
    dirty_dirs: HashSet<PathBuf>,
    wal: Option<(String, File)>,
    wal_dirty: bool,
    /// Files written since the last fsync that were closed (handle cache full).
    closed_dirty: Vec<File>,
}

impl<'a> Writer<'a> {
    fn new(cfg: &'a SinkConfig) -> Self {
        Writer {
            cfg,
            files: HashMap::new(),
            dirty: HashSet::new(),
            dirty_dirs: HashSet::new(),
            wal: None,
            wal_dirty: false,
            closed_dirty: Vec::new(),
        }
    }

    fn open(
        &mut self,
        manifest: &Manifest,
        file: u32,
        create: bool,
    ) -> Result<Option<&File>, SinkError> {
        if !self.files.contains_key(&file) {
            let e = &manifest.entries[file as usize];
            let path = local_path(&self.cfg.data_dir, &e.path);
            let existed = path.exists();
            if !existed && !create {
                return Ok(None);
            }
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(io("open", &path))?;
            if !existed {
                chown(self.cfg, &path)?;
                if let Some(parent) = path.parent() {
                    self.dirty_dirs.insert(parent.to_path_buf());
                }
            }
            if self.files.len() >= 64 {
                // Keep unsynced handles for the next fsync; drop clean ones.
                let keys: Vec<u32> = self.files.keys().copied().collect();
                for k in keys {
                    if let Some(f) = self.files.remove(&k) {
                        if self.dirty.remove(&k) {
                            self.closed_dirty.push(f);
                        }
                    }
                }
            }
            self.files.insert(file, f);
        }
        Ok(self.files.get(&file))
    }

    fn unit(&mut self, manifest: &Manifest, u: &DataUnit) -> Result<u64, SinkError> {
        let at = u.block as u64 * BLOCK_SIZE as u64;
        match u.kind {
            UnitKind::Same => Ok(0),
            UnitKind::Data => {
                let f = self.open(manifest, u.file, true)?.expect("created");
                f.write_all_at(&u.data, at).map_err(|e| SinkError::Io {
                    what: "write",
                    path: manifest.entries[u.file as usize].path.clone(),
                    source: e,
                })?;
                self.dirty.insert(u.file);
                Ok(u.data.len() as u64)
            }
            UnitKind::Missing => {
                if let Some(f) = self.open(manifest, u.file, false)? {
                    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    if len > at {
                        f.set_len(at).map_err(|e| SinkError::Io {
                            what: "truncate",
                            path: manifest.entries[u.file as usize].path.clone(),
                            source: e,
                        })?;
                        self.dirty.insert(u.file);
                    }
                }
                Ok(0)
            }
        }
    }

    fn wal(&mut self, w: &WalChunk, segment_size: u32) -> Result<(), SinkError> {
        let name = crate::build_source::wal_file_name(w.timeline, w.lsn, segment_size);
        if self.wal.as_ref().map(|(n, _)| n != &name).unwrap_or(true) {
            self.sync_wal()?;
            let dir = self.cfg.data_dir.join("pg_wal");
            let path = dir.join(&name);
            let existed = path.exists();
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(io("open", &path))?;
            if !existed {
                // PostgreSQL reads whole segments: the rest stays zeros (= end of WAL).
                f.set_len(segment_size as u64)
                    .map_err(io("extend", &path))?;
                chown(self.cfg, &path)?;
                self.dirty_dirs.insert(dir);
            }
            self.wal = Some((name, f));
        }
        let (name, f) = self.wal.as_ref().expect("opened");
        f.write_all_at(&w.data, w.lsn % segment_size as u64)
            .map_err(|e| SinkError::Io {
                what: "write",
                path: format!("pg_wal/{name}"),
                source: e,
            })?;
        self.wal_dirty = true;
        Ok(())
    }

    fn sync_wal(&mut self) -> Result<(), SinkError> {
        if let (Some((name, f)), true) = (&self.wal, self.wal_dirty) {
            f.sync_data().map_err(|e| SinkError::Io {
                what: "fsync",
                path: format!("pg_wal/{name}"),
                source: e,
            })?;
        }
        self.wal_dirty = false;
        Ok(())
    }

    /// Hands everything written so far to a blocking fsync job, so that receiving goes
    /// on while the disk flushes (the acknowledgement waits for the job).
    fn begin_sync(&mut self) -> Result<SyncJob, SinkError> {
        let dup = |f: &File| f.try_clone().map_err(io("dup", &self.cfg.data_dir));
        let mut files = Vec::new();
        for k in std::mem::take(&mut self.dirty) {
            if let Some(f) = self.files.get(&k) {
                files.push(dup(f)?);
            }
        }
        files.append(&mut self.closed_dirty);
        if self.wal_dirty {
            if let Some((_, f)) = &self.wal {
                files.push(dup(f)?);
            }
            self.wal_dirty = false;
        }
        let dirs: Vec<PathBuf> = self.dirty_dirs.drain().collect();
        let data_dir = self.cfg.data_dir.clone();
        Ok(tokio::task::spawn_blocking(move || {
            for f in files {
                f.sync_data().map_err(io("fsync", &data_dir))?;
            }
            for d in dirs {
                ha_common::durable::fsync_dir(&d).map_err(io("fsync", &d))?;
            }
            Ok(())
        }))
    }

    /// Makes everything written so far durable.
    fn sync(&mut self) -> Result<(), SinkError> {
        for k in std::mem::take(&mut self.dirty) {
            if let Some(f) = self.files.get(&k) {
                f.sync_data().map_err(io("fsync", &self.cfg.data_dir))?;
            }
        }
        for f in std::mem::take(&mut self.closed_dirty) {
            f.sync_data().map_err(io("fsync", &self.cfg.data_dir))?;
        }
        self.sync_wal()?;
        for d in std::mem::take(&mut self.dirty_dirs) {
            ha_common::durable::fsync_dir(&d).map_err(io("fsync", &d))?;
        }
        Ok(())
    }
}

async fn receive(
    cfg: &SinkConfig,
    progress: &mut Progress,
    manifest: &Manifest,
    frames: &mut FrameReader<tokio::net::tcp::OwnedReadHalf>,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    report: &mut SinkReport,
) -> Result<(), SinkError> {
    let units = manifest.units();
    let mut w = Writer::new(cfg);
    let mut next_data = progress.data_acked;
    let mut next_wal = progress.wal_acked;
    let mut waiting_resend = false;
    let mut unsynced = 0u64;
    let mut last_sync = Instant::now();
    // The fsync in flight and the offsets it makes durable.
    let mut inflight: Option<(SyncJob, u64, u64)> = None;
    loop {
        let msg = tokio::select! {
            m = frames.next() => m?,
            r = async { (&mut inflight.as_mut().expect("guarded").0).await }, if inflight.is_some() => {
                let (_, data, wal) = inflight.take().expect("guarded");
                r.map_err(|e| SinkError::Refused(format!("fsync job: {e}")))??;
                progress.data_acked = data;
                progress.wal_acked = wal;
                save_progress(cfg, *progress)?;
                wr.write_all(&frame(&Message::Ack { data, wal }))
                    .await
                    .map_err(FrameError::Io)?;
                if next_data == units && next_data != progress.data_acked {
                    // Everything is here: the source waits for this to end the backup.
                    inflight = Some((w.begin_sync()?, next_data, next_wal));
                }
                continue;
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                let behind = next_data != progress.data_acked || next_wal != progress.wal_acked;
                if inflight.is_none() && behind {
                    inflight = Some((w.begin_sync()?, next_data, next_wal));
                    unsynced = 0;
                    last_sync = Instant::now();
                }
                continue;
            }
        };
        match msg {
            Some(Message::Unit(u)) => {
                if u.offset != next_data {
                    if waiting_resend {
                        continue; // sent before our refusal arrived
                    }
                    return Err(SinkError::Protocol(format!(
                        "unit at offset {}, expected {next_data}",
                        u.offset
                    )));
                }
                if !u.verify() {
                    report.refused += 1;
                    tracing::warn!(
                        offset = u.offset,
                        "unit failed its checksum: refused, asking again"
                    );
                    wr.write_all(&frame(&Message::Resend { offset: next_data }))
                        .await
                        .map_err(FrameError::Io)?;
                    waiting_resend = true;
                    continue;
                }
                if manifest.locate(u.offset) != Some((u.file, u.block)) {
                    return Err(SinkError::Protocol(format!(
                        "unit {} names file {} block {}, the manifest says {:?}",
                        u.offset,
                        u.file,
                        u.block,
                        manifest.locate(u.offset)
                    )));
                }
                waiting_resend = false;
                let n = w.unit(manifest, &u)?;
                if u.kind == UnitKind::Same {
                    report.units_same += 1;
                } else if u.kind == UnitKind::Data {
                    report.units_written += 1;
                }
                report.bytes_written += n;
                unsynced += n.max(1);
                next_data += 1;
            }
            Some(Message::Wal(c)) => {
                if !c.verify() {
                    return Err(SinkError::BadWal(c.lsn));
                }
                if c.lsn != next_wal {
                    return Err(SinkError::Protocol(format!(
                        "WAL at {:#x}, expected {next_wal:#x}",
                        c.lsn
                    )));
                }
                w.wal(&c, progress.segment_size)?;
                next_wal += c.data.len() as u64;
                report.wal_bytes += c.data.len() as u64;
                unsynced += c.data.len() as u64;
            }
            Some(Message::Finish {
                stop_lsn,
                backup_label,
                tablespace_map,
            }) => {
                if next_data != units || next_wal < stop_lsn {
                    return Err(SinkError::Protocol(format!(
                        "finish before everything arrived (unit {next_data} of {units}, WAL {next_wal:#x} of {stop_lsn:#x})"
                    )));
                }
                if let Some((job, _, _)) = inflight.take() {
                    job.await
                        .map_err(|e| SinkError::Refused(format!("fsync job: {e}")))??;
                }
                ack(cfg, &mut w, progress, next_data, next_wal, wr).await?;
                finish(cfg, manifest, &backup_label, &tablespace_map)?;
                wr.write_all(&frame(&Message::Ack {
                    data: next_data,
                    wal: next_wal,
                }))
                .await
                .map_err(FrameError::Io)?;
                let _ = wr.shutdown().await;
                return Ok(());
            }
            Some(Message::Failed { message }) => return Err(SinkError::SourceFailed(message)),
            Some(other) => {
                return Err(SinkError::Protocol(format!("unexpected {other:?}")));
            }
            None => return Err(FrameError::Truncated(0).into()),
        }
        if inflight.is_none()
            && (unsynced >= cfg.batch_bytes
                || (next_data == units && next_data != progress.data_acked)
                || last_sync.elapsed() > Duration::from_millis(500))
        {
            inflight = Some((w.begin_sync()?, next_data, next_wal));
            unsynced = 0;
            last_sync = Instant::now();
        }
    }
}

/// fsync, persist, then acknowledge: the source never hears of anything not durable.
async fn ack(
    cfg: &SinkConfig,
    w: &mut Writer<'_>,
    progress: &mut Progress,
    data: u64,
    wal: u64,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
) -> Result<(), SinkError> {
    w.sync()?;
    progress.data_acked = data;
    progress.wal_acked = wal;
    save_progress(cfg, *progress)?;
    wr.write_all(&frame(&Message::Ack { data, wal }))
        .await
        .map_err(FrameError::Io)?;
    Ok(())
}

/// The last steps: sizes as listed, leftovers removed, labels written, pg_control in
/// place, state files gone.
fn finish(cfg: &SinkConfig, manifest: &Manifest, label: &str, map: &str) -> Result<(), SinkError> {
    let d = &cfg.data_dir;
    let mut keep: HashSet<PathBuf> = HashSet::new();
    for e in &manifest.entries {
        let p = local_path(d, &e.path);
        keep.insert(p.clone());
        if e.kind == EntryKind::File {
            match fs::metadata(&p) {
                Ok(m) if m.len() > e.size => {
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .map_err(io("open", &p))?;
                    f.set_len(e.size).map_err(io("truncate", &p))?;
                    f.sync_all().map_err(io("fsync", &p))?;
                }
                Err(_) if e.size == 0 => {
                    File::create(&p).map_err(io("create", &p))?;
                    chown(cfg, &p)?;
                }
                _ => {}
            }
        }
    }
    remove_leftovers(d, d, &keep)?;
    let label_path = d.join("backup_label");
    write_owned(cfg, &label_path, label.as_bytes())?;
    if !map.is_empty() {
        write_owned(cfg, &d.join("tablespace_map"), map.as_bytes())?;
    }
    let partial = d.join(PG_CONTROL_PARTIAL);
    let control = d.join(PG_CONTROL);
    fs::rename(&partial, &control).map_err(io("rename", &partial))?;
    ha_common::durable::fsync_dir(&d.join("global")).map_err(io("fsync", d))?;
    ha_common::durable::fsync_dir(d).map_err(io("fsync", d))?;
    cfg.forget_progress()
        .map_err(io("remove", &cfg.state_dir))?;
    Ok(())
}

fn write_owned(cfg: &SinkConfig, path: &Path, bytes: &[u8]) -> Result<(), SinkError> {
    write_atomic(path, bytes).map_err(io("write", path))?;
    chown(cfg, path)
}

/// Removes what the primary does not have (WAL we wrote and pg_control's partial stay).
fn remove_leftovers(root: &Path, dir: &Path, keep: &HashSet<PathBuf>) -> Result<(), SinkError> {
    for item in fs::read_dir(dir).map_err(io("read", dir))? {
        let p = item.map_err(io("read", dir))?.path();
        let rel = p.strip_prefix(root).unwrap_or(&p);
        let is_wal = rel.parent() == Some(Path::new("pg_wal"))
            && rel
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()));
        if is_wal {
            continue;
        }
        if !keep.contains(&p) {
            remove_any(&p)?;
        } else if p.is_dir() {
            remove_leftovers(root, &p, keep)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_round_trips_and_a_corrupt_state_file_is_named() {
        let d = tempfile::tempdir().unwrap();
        let cfg = SinkConfig {
            source: "127.0.0.1:1".into(),
            data_dir: d.path().join("data"),
            state_dir: d.path().to_path_buf(),
            incremental: false,
            owner: None,
            batch_bytes: 1 << 20,
            retry_for: Duration::from_secs(1),
        };
        assert!(load_state(&cfg).unwrap().is_none());
        let p = Progress {
            session: 5,
            data_acked: 77,
            wal_acked: 0x3000000,
            segment_size: 16 << 20,
        };
        let m = Manifest::from_listing(vec![(EntryKind::File, "PG_VERSION".into(), 3)]);
        write_atomic(&cfg.manifest_path(), &MANIFEST.seal(&m.to_bytes())).unwrap();
        save_progress(&cfg, p).unwrap();
        assert_eq!(load_state(&cfg).unwrap(), Some((p, m)));
        let mut b = fs::read(cfg.progress_path()).unwrap();
        b[20] ^= 1;
        fs::write(cfg.progress_path(), b).unwrap();
        let e = load_state(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("build.progress") && e.contains("checksum"),
            "{e}"
        );
        cfg.forget_progress().unwrap();
        assert!(load_state(&cfg).unwrap().is_none());
    }

    #[test]
    fn leftovers_go_but_wal_and_listed_files_stay() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("pg_wal")).unwrap();
        fs::create_dir_all(root.join("base/1")).unwrap();
        fs::create_dir_all(root.join("pg_replslot/old_slot")).unwrap();
        fs::write(root.join("base/1/100"), b"x").unwrap();
        fs::write(root.join("base/1/200"), b"gone on the primary").unwrap();
        fs::write(root.join("pg_wal/000000010000000000000003"), b"w").unwrap();
        fs::write(root.join("standby.signal"), b"").unwrap();
        let keep: HashSet<PathBuf> = ["pg_wal", "base", "base/1", "base/1/100", "pg_replslot"]
            .iter()
            .map(|p| root.join(p))
            .collect();
        remove_leftovers(root, root, &keep).unwrap();
        assert!(root.join("base/1/100").exists());
        assert!(!root.join("base/1/200").exists());
        assert!(!root.join("pg_replslot/old_slot").exists());
        assert!(!root.join("standby.signal").exists());
        assert!(root.join("pg_wal/000000010000000000000003").exists());
    }
}
