//! What a build copies: the files and directories of a primary's data dir, in a fixed
//! order that numbers every 8 KiB block with its unit offset (so either side can turn an
//! offset back into file + block), with PostgreSQL's base-backup exclusions applied.

use std::path::Path;

use crate::data_unit::{EntryKind, BLOCK_SIZE};

/// Directories whose contents are never copied (the directory itself is: PostgreSQL
/// needs it to exist). Same list as PostgreSQL's own base backup.
const CONTENTS_EXCLUDED: &[&str] = &[
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
];

/// Files never copied, wherever they are (or at the top only, for the postmaster's).
const FILES_EXCLUDED: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "pg_internal.init",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "postgresql.auto.conf.tmp",
    "current_logfiles",
    "current_logfiles.tmp",
    "standby.signal",
    "recovery.signal",
];

/// The name under which the sink writes `global/pg_control` until the build is complete:
/// a data dir without pg_control is never taken for a usable one.
pub const PG_CONTROL: &str = "global/pg_control";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    pub path: String,
    pub size: u64,
    /// Offset of this file's first unit.
    pub first_unit: u64,
}

impl Entry {
    pub fn units(&self) -> u64 {
        match self.kind {
            EntryKind::Dir => 0,
            EntryKind::File => self.size.div_ceil(BLOCK_SIZE as u64),
        }
    }
}

/// The ordered entries of one build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    pub entries: Vec<Entry>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: tablespaces (links in pg_tblspc) are not supported by the build channel")]
    Tablespace(String),
    #[error("{0}: symbolic links are not supported in a data dir copied by the build channel")]
    Symlink(String),
    #[error("{0}: path is not UTF-8")]
    NotUtf8(String),
}

impl Manifest {
    /// Walks `data_dir` (a running primary's) and lists what a build copies.
    pub fn scan(data_dir: &Path) -> Result<Manifest, ManifestError> {
        let mut raw = Vec::new();
        walk(data_dir, data_dir, &mut raw)?;
        Ok(Manifest::from_listing(raw))
    }

    /// Orders a listing (path sorted, pg_control last: it says the copy is whole) and
    /// numbers the units.
    pub fn from_listing(mut raw: Vec<(EntryKind, String, u64)>) -> Manifest {
        raw.sort_by(|a, b| {
            let last = |p: &str| p == PG_CONTROL;
            (last(&a.1), &a.1).cmp(&(last(&b.1), &b.1))
        });
        let mut next = 0;
        let entries = raw
            .into_iter()
            .map(|(kind, path, size)| {
                let e = Entry {
                    kind,
                    path,
                    size,
                    first_unit: next,
                };
                next += e.units();
                e
            })
            .collect();
        Manifest { entries }
    }

    /// Appends an entry received over the wire (in order).
    pub fn push(&mut self, kind: EntryKind, path: String, size: u64) {
        let first_unit = self.units();
        self.entries.push(Entry {
            kind,
            path,
            size,
            first_unit,
        });
    }

    /// How many units the build ships.
    pub fn units(&self) -> u64 {
        self.entries
            .last()
            .map(|e| e.first_unit + e.units())
            .unwrap_or(0)
    }

    /// The file index and block of unit `offset` (None past the end).
    pub fn locate(&self, offset: u64) -> Option<(u32, u32)> {
        if offset >= self.units() {
            return None;
        }
        // The last entry whose first unit is <= offset and that has units.
        let i = self
            .entries
            .partition_point(|e| e.first_unit <= offset)
            .checked_sub(1)?;
        let mut i = i;
        // Entries with no units share a first_unit with the next file: step back to a file.
        while self.entries[i].units() == 0 || self.entries[i].first_unit > offset {
            i = i.checked_sub(1)?;
        }
        let e = &self.entries[i];
        Some((i as u32, (offset - e.first_unit) as u32))
    }

    /// Serialised for the sink's state file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for e in &self.entries {
            out.push(e.kind as u8);
            out.extend_from_slice(&e.size.to_le_bytes());
            out.extend_from_slice(&(e.path.len() as u32).to_le_bytes());
            out.extend_from_slice(e.path.as_bytes());
        }
        out
    }

    /// Reads [`Manifest::to_bytes`]' output back (None if malformed).
    pub fn from_bytes(mut b: &[u8]) -> Option<Manifest> {
        let mut m = Manifest::default();
        while !b.is_empty() {
            let kind = match *b.first()? {
                0 => EntryKind::Dir,
                1 => EntryKind::File,
                _ => return None,
            };
            let size = u64::from_le_bytes(b.get(1..9)?.try_into().ok()?);
            let len = u32::from_le_bytes(b.get(9..13)?.try_into().ok()?) as usize;
            let path = std::str::from_utf8(b.get(13..13 + len)?).ok()?.to_owned();
            crate::data_unit::check_path(&path).ok()?;
            m.push(kind, path, size);
            b = &b[13 + len..];
        }
        Some(m)
    }
}

/// Whether `rel` (relative to the data dir) is copied.
fn excluded(rel: &str, is_dir: bool) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if name.starts_with("pgsql_tmp") || name.ends_with(".mpp_ha_tmp") {
        return true;
    }
    if !is_dir && FILES_EXCLUDED.contains(&name) {
        return true;
    }
    if let Some((parent, _)) = rel.rsplit_once('/') {
        if CONTENTS_EXCLUDED.contains(&parent) {
            return true;
        }
        // WAL travels as WAL chunks; only timeline history files go as files.
        let history = !is_dir && name.ends_with(".history");
        if parent == "pg_wal" && !history && name != "archive_status" {
            return true;
        }
        if parent == "pg_wal/archive_status" {
            return true;
        }
    }
    false
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(EntryKind, String, u64)>,
) -> Result<(), ManifestError> {
    let io = |p: &Path, source| ManifestError::Io {
        path: p.display().to_string(),
        source,
    };
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        // Dropped while we looked (a database being dropped): WAL replay agrees.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dir, e)),
    };
    for item in rd {
        let item = item.map_err(|e| io(dir, e))?;
        let path = item.path();
        let rel = path
            .strip_prefix(root)
            .expect("below root")
            .to_str()
            .ok_or_else(|| ManifestError::NotUtf8(path.display().to_string()))?
            .to_owned();
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&path, e)),
        };
        let (is_dir, meta) = if meta.file_type().is_symlink() {
            if rel.starts_with("pg_tblspc/") {
                return Err(ManifestError::Tablespace(rel));
            }
            if rel != "pg_wal" {
                return Err(ManifestError::Symlink(rel));
            }
            let m = std::fs::metadata(&path).map_err(|e| io(&path, e))?;
            (m.is_dir(), m)
        } else {
            (meta.is_dir(), meta)
        };
        if excluded(&rel, is_dir) {
            continue;
        }
        if is_dir {
            out.push((EntryKind::Dir, rel, 0));
            walk(root, &path, out)?;
        } else if meta.is_file() {
            out.push((EntryKind::File, rel, meta.len()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing() -> Manifest {
        Manifest::from_listing(vec![
            (EntryKind::File, PG_CONTROL.into(), 8192),
            (EntryKind::Dir, "base".into(), 0),
            (EntryKind::File, "base/1/1259".into(), 3 * 8192),
            (EntryKind::File, "PG_VERSION".into(), 3),
            (EntryKind::File, "base/1/empty".into(), 0),
            (EntryKind::File, "base/1/2600".into(), 8193),
        ])
    }

    #[test]
    fn pg_control_comes_last_and_units_are_numbered_in_order() {
        let m = listing();
        let paths: Vec<&str> = m.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "PG_VERSION",
                "base",
                "base/1/1259",
                "base/1/2600",
                "base/1/empty",
                PG_CONTROL
            ]
        );
        assert_eq!(m.units(), 1 + 3 + 2 + 1);
        assert_eq!(m.locate(0), Some((0, 0)));
        assert_eq!(m.locate(1), Some((2, 0)));
        assert_eq!(m.locate(3), Some((2, 2)));
        assert_eq!(m.locate(4), Some((3, 0)));
        assert_eq!(m.locate(5), Some((3, 1)));
        assert_eq!(m.locate(6), Some((5, 0)));
        assert_eq!(m.locate(7), None);
    }

    #[test]
    fn manifest_bytes_round_trip_and_garbage_is_refused() {
        let m = listing();
        assert_eq!(Manifest::from_bytes(&m.to_bytes()), Some(m.clone()));
        let b = m.to_bytes();
        assert_eq!(Manifest::from_bytes(&b[..b.len() - 1]), None);
        assert_eq!(Manifest::from_bytes(&[9]), None);
    }

    #[test]
    fn base_backup_exclusions() {
        assert!(excluded("postmaster.pid", false));
        assert!(excluded("pg_replslot/slot1", true));
        assert!(excluded("pg_wal/000000010000000000000001", false));
        assert!(!excluded("pg_wal/00000002.history", false));
        assert!(!excluded("pg_wal/archive_status", true));
        assert!(excluded("pg_wal/archive_status/x.done", false));
        assert!(!excluded("pg_replslot", true));
        assert!(excluded("base/pgsql_tmp", true));
        assert!(excluded("global/pg_internal.init", false));
        assert!(!excluded("pg_xact/0000", false));
        assert!(!excluded("base/1/1259_vm", false));
    }

    #[test]
    fn scan_lists_a_data_dir() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("global")).unwrap();
        std::fs::create_dir_all(p.join("pg_wal/archive_status")).unwrap();
        std::fs::create_dir_all(p.join("pg_replslot/s")).unwrap();
        std::fs::write(p.join("global/pg_control"), [0u8; 8192]).unwrap();
        std::fs::write(p.join("PG_VERSION"), "15\n").unwrap();
        std::fs::write(p.join("postmaster.pid"), "1").unwrap();
        std::fs::write(p.join("pg_wal/000000010000000000000001"), [0u8; 100]).unwrap();
        let m = Manifest::scan(p).unwrap();
        let paths: Vec<&str> = m.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "PG_VERSION",
                "global",
                "pg_replslot",
                "pg_wal",
                "pg_wal/archive_status",
                PG_CONTROL
            ]
        );
        std::fs::create_dir_all(p.join("pg_tblspc")).unwrap();
        std::os::unix::fs::symlink("/tmp", p.join("pg_tblspc/16400")).unwrap();
        let e = Manifest::scan(p).unwrap_err().to_string();
        assert!(e.contains("tablespaces"), "{e}");
    }
}
