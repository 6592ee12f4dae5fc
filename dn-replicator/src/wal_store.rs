//! WAL kept on disk: segment files named as PostgreSQL names them (timeline + segment
//! number, so the LSN is the monotonic offset), written as they arrive, fsynced before
//! any position is acknowledged, following timeline switches (what lay past a new
//! timeline's fork point is truncated). No network here: the receiver feeds it.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ha_common::durable::{fsync_dir, write_atomic, Envelope};
use serde::{Deserialize, Serialize};

const META_ENVELOPE: Envelope = Envelope {
    magic: *b"DNWM",
    version: 1,
    what: "dn_replicator WAL store",
};
const META_FILE: &str = "wal.meta";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("WAL store {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("WAL store: {0}")]
    Corrupt(String),
    #[error("WAL store: write at {at:X} on timeline {tli} leaves a gap after {end:X}")]
    Gap { tli: u32, at: u64, end: u64 },
    #[error("WAL store: write on timeline {tli} older than the kept timeline {kept}")]
    OldTimeline { tli: u32, kept: u32 },
    #[error("WAL store: no segment size set (store not started)")]
    NotStarted,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// What survives a restart besides the segment files themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    seg_size: u64,
    timeline: u32,
    /// First LSN kept.
    start_lsn: u64,
    /// Earlier timelines: (timeline, LSN where the next one forked off).
    history: Vec<(u32, u64)>,
}

/// PostgreSQL's file name of segment `segno` of timeline `tli`.
pub fn segment_name(tli: u32, segno: u64, seg_size: u64) -> String {
    let per_id = 0x1_0000_0000u64 / seg_size;
    format!("{tli:08X}{:08X}{:08X}", segno / per_id, segno % per_id)
}

/// Parses a segment file name into (timeline, segment number).
pub fn parse_segment_name(name: &str, seg_size: u64) -> Option<(u32, u64)> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
    let hi = u64::from_str_radix(&name[8..16], 16).ok()?;
    let lo = u64::from_str_radix(&name[16..24], 16).ok()?;
    let per_id = 0x1_0000_0000u64 / seg_size;
    (lo < per_id)
        .then_some(hi * per_id + lo)
        .map(|segno| (tli, segno))
}

/// The start of the segment holding `lsn`.
pub fn segment_start(lsn: u64, seg_size: u64) -> u64 {
    lsn - lsn % seg_size
}

pub struct WalStore {
    dir: PathBuf,
    meta: Meta,
    /// Contiguous end of what was written on `meta.timeline`.
    end: u64,
    /// Durable end (fsynced): what may be acknowledged.
    flushed: u64,
    open: BTreeMap<(u32, u64), File>,
    dirty: Vec<(u32, u64)>,
    dir_dirty: bool,
}

impl WalStore {
    /// Opens (or creates) the store in `dir`, recovering its end from the files.
    pub fn open(dir: &Path) -> Result<WalStore, StoreError> {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let meta_path = dir.join(META_FILE);
        let meta = match fs::read(&meta_path) {
            Ok(bytes) => {
                let payload = META_ENVELOPE
                    .open(&meta_path, &bytes)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                serde_json::from_slice(payload)
                    .map_err(|e| StoreError::Corrupt(format!("{}: {e}", meta_path.display())))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Meta::default(),
            Err(e) => return Err(io_err("read", &meta_path)(e)),
        };
        let mut s = WalStore {
            dir: dir.to_owned(),
            meta,
            end: 0,
            flushed: 0,
            open: BTreeMap::new(),
            dirty: Vec::new(),
            dir_dirty: false,
        };
        if s.meta.seg_size != 0 {
            let mut end = s.meta.start_lsn;
            if let Some((_, fork)) = s.meta.history.last() {
                end = end.max(segment_start(*fork, s.meta.seg_size));
            }
            for (tli, segno, len) in s.segments()? {
                if tli == s.meta.timeline {
                    end = end.max(segno * s.meta.seg_size + len);
                }
            }
            s.end = end;
            s.flushed = end;
        }
        Ok(s)
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.meta.seg_size == 0
    }
    pub fn timeline(&self) -> u32 {
        self.meta.timeline
    }
    pub fn start_lsn(&self) -> u64 {
        self.meta.start_lsn
    }
    pub fn seg_size(&self) -> u64 {
        self.meta.seg_size
    }
    /// End of the WAL written (not necessarily durable).
    pub fn end(&self) -> u64 {
        self.end
    }
    /// End of the durable WAL: the only position ever acknowledged.
    pub fn flushed(&self) -> u64 {
        self.flushed
    }
    /// Timelines before the current one, with their fork points.
    pub fn history(&self) -> &[(u32, u64)] {
        &self.meta.history
    }

    /// (timeline, segno, length) of every segment file, in order.
    fn segments(&self) -> Result<Vec<(u32, u64, u64)>, StoreError> {
        let mut out = Vec::new();
        if self.meta.seg_size == 0 {
            return Ok(out);
        }
        for e in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))? {
            let e = e.map_err(io_err("list", &self.dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((tli, segno)) = parse_segment_name(&name, self.meta.seg_size) {
                let len = e.metadata().map_err(io_err("stat", &e.path()))?.len();
                out.push((tli, segno, len));
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Bytes of WAL kept on disk.
    pub fn bytes_kept(&self) -> Result<u64, StoreError> {
        Ok(self.segments()?.iter().map(|s| s.2).sum())
    }

    fn save_meta(&self) -> Result<(), StoreError> {
        let path = self.dir.join(META_FILE);
        let payload = serde_json::to_vec(&self.meta).expect("meta serialises");
        write_atomic(&path, &META_ENVELOPE.seal(&payload)).map_err(io_err("write", &path))
    }

    /// Deletes everything kept (going idle).
    pub fn clear(&mut self) -> Result<(), StoreError> {
        self.open.clear();
        self.dirty.clear();
        for e in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))? {
            let e = e.map_err(io_err("list", &self.dir))?;
            fs::remove_file(e.path()).map_err(io_err("remove", &e.path()))?;
        }
        fsync_dir(&self.dir).map_err(io_err("fsync", &self.dir))?;
        self.meta = Meta::default();
        self.end = 0;
        self.flushed = 0;
        Ok(())
    }

    /// Starts an empty store at `lsn` (a segment start) on timeline `tli`.
    pub fn begin(&mut self, tli: u32, lsn: u64, seg_size: u64) -> Result<(), StoreError> {
        if !seg_size.is_power_of_two() || seg_size < 1 << 20 {
            return Err(StoreError::Corrupt(format!("bad segment size {seg_size}")));
        }
        self.clear()?;
        self.meta = Meta {
            seg_size,
            timeline: tli,
            start_lsn: segment_start(lsn, seg_size),
            history: Vec::new(),
        };
        self.end = self.meta.start_lsn;
        self.flushed = self.end;
        self.save_meta()
    }

    /// Switches to timeline `tli`, which forked off the current one at `fork`:
    /// everything kept past `fork` on the old timeline is truncated.
    pub fn switch_timeline(&mut self, tli: u32, fork: u64) -> Result<(), StoreError> {
        if tli <= self.meta.timeline {
            return Err(StoreError::OldTimeline {
                tli,
                kept: self.meta.timeline,
            });
        }
        self.flush()?;
        self.truncate(fork)?;
        self.meta.history.push((self.meta.timeline, fork));
        self.meta.timeline = tli;
        self.save_meta()?;
        // The new timeline's first segment is re-sent from its start.
        self.end = segment_start(fork, self.meta.seg_size).max(self.meta.start_lsn);
        self.flushed = self.end.min(fork);
        Ok(())
    }

    /// Drops what lies past `lsn` on the current timeline.
    pub fn truncate(&mut self, lsn: u64) -> Result<(), StoreError> {
        if lsn >= self.end {
            return Ok(());
        }
        let seg = self.meta.seg_size;
        let tli = self.meta.timeline;
        self.open.clear();
        self.dirty.clear();
        for (t, segno, _) in self.segments()? {
            if t != tli {
                continue;
            }
            let path = self.dir.join(segment_name(t, segno, seg));
            let start = segno * seg;
            if start >= lsn {
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
            } else if start + seg > lsn {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err("open", &path))?;
                f.set_len(lsn - start).map_err(io_err("truncate", &path))?;
                f.sync_all().map_err(io_err("fsync", &path))?;
            }
        }
        fsync_dir(&self.dir).map_err(io_err("fsync", &self.dir))?;
        self.end = lsn.max(self.meta.start_lsn);
        self.flushed = self.flushed.min(self.end);
        Ok(())
    }

    fn file(&mut self, tli: u32, segno: u64) -> Result<&File, StoreError> {
        if !self.open.contains_key(&(tli, segno)) {
            let path = self.dir.join(segment_name(tli, segno, self.meta.seg_size));
            let existed = path.exists();
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .read(true)
                .truncate(false)
                .open(&path)
                .map_err(io_err("open", &path))?;
            if !existed {
                self.dir_dirty = true;
            }
            // Only the segments being written stay open.
            if self.open.len() >= 4 {
                let first = *self.open.keys().next().expect("non-empty");
                self.open.remove(&first);
            }
            self.open.insert((tli, segno), f);
        }
        Ok(&self.open[&(tli, segno)])
    }

    /// Writes WAL `data` starting at `lsn` on timeline `tli` (the current one). A
    /// write may overlap what is kept (re-sent after a reconnect) but not leave a gap.
    pub fn write(&mut self, tli: u32, lsn: u64, data: &[u8]) -> Result<(), StoreError> {
        if self.is_empty() {
            return Err(StoreError::NotStarted);
        }
        if tli != self.meta.timeline {
            return Err(StoreError::OldTimeline {
                tli,
                kept: self.meta.timeline,
            });
        }
        if lsn > self.end {
            return Err(StoreError::Gap {
                tli,
                at: lsn,
                end: self.end,
            });
        }
        let seg = self.meta.seg_size;
        let mut pos = lsn;
        let mut rest = data;
        while !rest.is_empty() {
            let segno = pos / seg;
            let off = pos % seg;
            let n = rest.len().min((seg - off) as usize);
            let path_for_err = self.dir.join(segment_name(tli, segno, seg));
            let f = self.file(tli, segno)?;
            f.write_all_at(&rest[..n], off)
                .map_err(io_err("write", &path_for_err))?;
            if !self.dirty.contains(&(tli, segno)) {
                self.dirty.push((tli, segno));
            }
            pos += n as u64;
            rest = &rest[n..];
        }
        self.end = self.end.max(pos);
        Ok(())
    }

    /// Makes everything written durable; returns the new durable end.
    pub fn flush(&mut self) -> Result<u64, StoreError> {
        for key in std::mem::take(&mut self.dirty) {
            let path = self
                .dir
                .join(segment_name(key.0, key.1, self.meta.seg_size));
            let f = self.file(key.0, key.1)?;
            f.sync_data().map_err(io_err("fsync", &path))?;
        }
        if self.dir_dirty {
            fsync_dir(&self.dir).map_err(io_err("fsync", &self.dir))?;
            self.dir_dirty = false;
        }
        self.flushed = self.end;
        Ok(self.flushed)
    }

    /// Keeps a timeline history file as the upstream sent it.
    pub fn put_history(&mut self, name: &str, content: &[u8]) -> Result<(), StoreError> {
        if !valid_history_name(name) {
            return Err(StoreError::Corrupt(format!(
                "bad history file name {name:?}"
            )));
        }
        let path = self.dir.join(name);
        write_atomic(&path, content).map_err(io_err("write", &path))
    }

    /// The content of WAL file `name` as PostgreSQL's restore_command wants it: a
    /// segment padded with zeros to the segment size, or a history file. None when
    /// not kept.
    pub fn read_file(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let is_segment = !self.is_empty() && parse_segment_name(name, self.meta.seg_size).is_some();
        if !is_segment && !valid_history_name(name) {
            return Ok(None);
        }
        let path = self.dir.join(name);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        // A partial last segment is served as far as written, never padded: the
        // restoring standby overlays it on its own copy of that segment, which may
        // hold more of it (`cli::restored_segment`).
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(io_err("read", &path))?;
        buf.truncate(self.meta.seg_size as usize);
        Ok(Some(buf))
    }
}

fn valid_history_name(name: &str) -> bool {
    name.len() == 16
        && name.ends_with(".history")
        && name[..8].bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 1 << 20;

    #[test]
    fn names_round_trip() {
        let n = segment_name(1, 3, 16 << 20);
        assert_eq!(n, "000000010000000000000003");
        assert_eq!(parse_segment_name(&n, 16 << 20), Some((1, 3)));
        assert_eq!(segment_name(2, 256, 16 << 20), "000000020000000100000000");
        assert_eq!(parse_segment_name("00000002.history", 16 << 20), None);
        assert_eq!(
            parse_segment_name("zz0000010000000000000003", 16 << 20),
            None
        );
    }

    #[test]
    fn written_wal_is_durable_after_flush_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let mut s = WalStore::open(d.path()).unwrap();
        assert!(s.is_empty());
        s.begin(1, SEG + 100, SEG).unwrap();
        assert_eq!(s.start_lsn(), SEG);
        s.write(1, SEG, &[7u8; 300]).unwrap();
        assert_eq!(s.flushed(), SEG, "nothing durable before flush");
        assert_eq!(s.flush().unwrap(), SEG + 300);
        // Across a segment boundary.
        s.write(1, SEG + 300, &vec![9u8; SEG as usize]).unwrap();
        s.flush().unwrap();
        drop(s);
        let s = WalStore::open(d.path()).unwrap();
        assert_eq!(s.end(), 2 * SEG + 300);
        assert_eq!(s.timeline(), 1);
        assert_eq!(s.bytes_kept().unwrap(), SEG + 300);
        let first = s.read_file(&segment_name(1, 1, SEG)).unwrap().unwrap();
        assert_eq!(first.len(), SEG as usize);
        assert_eq!(&first[..300], &[7u8; 300]);
        assert_eq!(first[300], 9);
        // The partial last segment is served as far as written (not padded).
        let last = s.read_file(&segment_name(1, 2, SEG)).unwrap().unwrap();
        assert_eq!(last.len(), 300);
        assert_eq!(last[299], 9);
        assert!(s.read_file(&segment_name(1, 3, SEG)).unwrap().is_none());
        assert!(s.read_file("../../etc/passwd").unwrap().is_none());
    }

    #[test]
    fn a_gap_and_an_old_timeline_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut s = WalStore::open(d.path()).unwrap();
        assert!(matches!(s.write(1, 0, b"x"), Err(StoreError::NotStarted)));
        s.begin(2, 0, SEG).unwrap();
        assert!(matches!(s.write(2, 10, b"x"), Err(StoreError::Gap { .. })));
        assert!(matches!(
            s.write(1, 0, b"x"),
            Err(StoreError::OldTimeline { .. })
        ));
        // Overlap (re-sent after a reconnect) is fine.
        s.write(2, 0, b"abcdef").unwrap();
        s.write(2, 3, b"def").unwrap();
        assert_eq!(s.end(), 6);
    }

    #[test]
    fn a_timeline_switch_truncates_past_the_fork_point() {
        let d = tempfile::tempdir().unwrap();
        let mut s = WalStore::open(d.path()).unwrap();
        s.begin(1, 0, SEG).unwrap();
        s.write(1, 0, &vec![1u8; (SEG + 500) as usize]).unwrap();
        s.flush().unwrap();
        // Timeline 2 forked at SEG + 200: the 300 bytes after it never happened there.
        s.switch_timeline(2, SEG + 200).unwrap();
        let old = s.read_file(&segment_name(1, 1, SEG)).unwrap().unwrap();
        assert_eq!(old[199], 1);
        assert_eq!(old.len(), 200, "truncated past the fork point");
        assert_eq!(
            s.end(),
            SEG,
            "the new timeline's segment is re-sent from its start"
        );
        s.write(2, SEG, &vec![2u8; 400]).unwrap();
        assert_eq!(s.flush().unwrap(), SEG + 400);
        assert_eq!(s.history(), &[(1, SEG + 200)]);
        assert!(s.switch_timeline(2, SEG).is_err());
        drop(s);
        let s = WalStore::open(d.path()).unwrap();
        assert_eq!((s.timeline(), s.end()), (2, SEG + 400));
    }

    #[test]
    fn clear_deletes_everything() {
        let d = tempfile::tempdir().unwrap();
        let mut s = WalStore::open(d.path()).unwrap();
        s.begin(1, 0, SEG).unwrap();
        s.write(1, 0, b"hello").unwrap();
        s.put_history("00000002.history", b"1\t0/5\tno reason\n")
            .unwrap();
        assert_eq!(
            s.read_file("00000002.history").unwrap().unwrap(),
            b"1\t0/5\tno reason\n"
        );
        s.flush().unwrap();
        s.clear().unwrap();
        assert!(s.is_empty());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
        assert!(WalStore::open(d.path()).unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_meta_file_is_one_clear_error() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(META_FILE), b"garbage").unwrap();
        let e = WalStore::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("wal.meta"), "{e}");
    }
}
