//! The CN's durable, versioned catalog of distributed tables and its bucket map.
//!
//! Every CN of the DDL set holds the same catalog at the same version: a change is
//! prepared (durably, under the DDL's gid) in phase one and applied in phase two.
//! The file is sealed by `ha_common::durable` (magic, version, crc32c) and replaced
//! atomically, so a crash leaves either the old or the new catalog, never a mix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ha_common::durable::{self, Envelope};
use serde::{Deserialize, Serialize};

/// Rows hash to this many buckets; the bucket map assigns each bucket to a DN group,
/// so that adding a group later moves buckets instead of rehashing every row.
pub const BUCKETS: usize = 1024;

const ENVELOPE: Envelope = Envelope {
    magic: *b"MCAT",
    version: 1,
    what: "CN catalog",
};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{0}")]
    Envelope(#[from] durable::EnvelopeError),
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: cannot decode the catalog: {problem}")]
    Decode { path: PathBuf, problem: String },
    #[error("catalog change {gid}: based on version {base} but the catalog is at {current}")]
    VersionMismatch {
        gid: String,
        base: u64,
        current: u64,
    },
    #[error("cannot decode a catalog change: {0}")]
    BadChange(String),
}

/// How values of a distribution column are compared when routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyKind {
    /// Integer types: `42`, `042` and `'42'` are the same key.
    Integer,
    /// Text types: the exact characters.
    Text,
    /// Any other type: values are hashed by their text for INSERT/COPY, but an equality
    /// lookup cannot be routed (`1.0` = `1.00`), so it is scattered.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Distribution {
    /// Rows hashed on the column at this index of `columns`.
    Hash { column: usize, kind: KeyKind },
    /// Every group holds every row.
    Replication,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDef {
    /// Lower-case, unqualified name (one schema: public).
    pub name: String,
    /// Lower-case column names in table order.
    pub columns: Vec<String>,
    pub distribution: Distribution,
}

impl TableDef {
    pub fn hash_column(&self) -> Option<(usize, KeyKind)> {
        match self.distribution {
            Distribution::Hash { column, kind } => Some((column, kind)),
            Distribution::Replication => None,
        }
    }
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }
}

/// A change made by one DDL statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Create(TableDef),
    Drop(Vec<String>),
    /// ALTER TABLE that adds/drops/renames columns: the new column list.
    SetColumns {
        table: String,
        columns: Vec<String>,
    },
    /// A DDL that changes no distribution fact (CREATE INDEX, TRUNCATE, ...): the
    /// version still moves so that every CN agrees on the DDL history.
    Nothing,
}

impl Change {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    pub fn decode(bytes: &[u8]) -> Result<Change, CatalogError> {
        serde_json::from_slice(bytes).map_err(|e| CatalogError::BadChange(e.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedChange {
    pub base_version: u64,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub version: u64,
    /// DN group names, in config order.
    pub groups: Vec<String>,
    /// bucket -> index into `groups`.
    pub buckets: Vec<u16>,
    pub tables: BTreeMap<String, TableDef>,
    /// Changes prepared in phase one and not finished yet, by gid.
    pub prepared: BTreeMap<String, PreparedChange>,
}

impl Catalog {
    /// An empty catalog with buckets spread round-robin over `groups`.
    pub fn new(groups: Vec<String>) -> Catalog {
        let n = groups.len().max(1);
        Catalog {
            version: 0,
            buckets: (0..BUCKETS).map(|b| (b % n) as u16).collect(),
            groups,
            tables: BTreeMap::new(),
            prepared: BTreeMap::new(),
        }
    }

    pub fn table(&self, name: &str) -> Option<&TableDef> {
        self.tables.get(name)
    }

    /// The group index a distribution value belongs to.
    pub fn group_of(&self, kind: KeyKind, value: &str) -> usize {
        let b = bucket_of(kind, value);
        self.buckets.get(b).copied().unwrap_or(0) as usize
    }

    /// Applies a change (phase two, or directly on the coordinating CN).
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Create(t) => {
                self.tables.insert(t.name.clone(), t.clone());
            }
            Change::Drop(names) => {
                for n in names {
                    self.tables.remove(n);
                }
            }
            Change::SetColumns { table, columns } => {
                if let Some(t) = self.tables.get_mut(table) {
                    // Keep the distribution column by name.
                    if let Distribution::Hash { column, kind } = t.distribution {
                        let name = t.columns.get(column).cloned().unwrap_or_default();
                        if let Some(i) = columns.iter().position(|c| *c == name) {
                            t.distribution = Distribution::Hash { column: i, kind };
                        }
                    }
                    t.columns = columns.clone();
                }
            }
            Change::Nothing => {}
        }
        self.version += 1;
    }

    /// Phase one: remember the change under `gid` (refused if based on another version).
    pub fn prepare(&mut self, gid: &str, base: u64, change: Change) -> Result<(), CatalogError> {
        if let Some(p) = self.prepared.get(gid) {
            if p.change == change {
                return Ok(());
            }
        }
        if base != self.version {
            return Err(CatalogError::VersionMismatch {
                gid: gid.to_owned(),
                base,
                current: self.version,
            });
        }
        self.prepared.insert(
            gid.to_owned(),
            PreparedChange {
                base_version: base,
                change,
            },
        );
        Ok(())
    }

    /// Phase two: apply (commit) or forget (rollback) the change `gid`; idempotent.
    /// Returns whether anything changed.
    pub fn finish(&mut self, gid: &str, commit: bool) -> bool {
        let Some(p) = self.prepared.remove(gid) else {
            return false;
        };
        if commit {
            self.apply(&p.change);
        }
        true
    }
}

/// Canonical bytes of a distribution value, so that equal values hash alike.
pub fn canonical_key(kind: KeyKind, value: &str) -> String {
    match kind {
        KeyKind::Integer => match value.trim().parse::<i128>() {
            Ok(v) => v.to_string(),
            Err(_) => value.trim().to_owned(),
        },
        KeyKind::Text => value.to_owned(),
        KeyKind::Other => value.trim().to_owned(),
    }
}

pub fn bucket_of(kind: KeyKind, value: &str) -> usize {
    (crc32c::crc32c(canonical_key(kind, value).as_bytes()) as usize) % BUCKETS
}

/// Where a CN keeps its catalog: `<state_dir>/catalog`.
#[derive(Debug, Clone)]
pub struct CatalogStore {
    path: PathBuf,
}

impl CatalogStore {
    pub fn new(state_dir: &Path) -> CatalogStore {
        CatalogStore {
            path: state_dir.join("catalog"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored catalog, or None if there is none yet.
    pub fn load(&self) -> Result<Option<Catalog>, CatalogError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CatalogError::Io {
                    path: self.path.clone(),
                    op: "read",
                    source,
                })
            }
        };
        let payload = ENVELOPE.open(&self.path, &bytes)?;
        serde_json::from_slice(payload)
            .map(Some)
            .map_err(|e| CatalogError::Decode {
                path: self.path.clone(),
                problem: e.to_string(),
            })
    }

    pub fn save(&self, catalog: &Catalog) -> Result<(), CatalogError> {
        let payload = encode(catalog);
        durable::write_atomic(&self.path, &ENVELOPE.seal(&payload)).map_err(|source| {
            CatalogError::Io {
                path: self.path.clone(),
                op: "write",
                source,
            }
        })
    }
}

/// The catalog as GetCatalog sends it.
pub fn encode(catalog: &Catalog) -> Vec<u8> {
    serde_json::to_vec(catalog).unwrap_or_default()
}

pub fn decode(bytes: &[u8]) -> Result<Catalog, CatalogError> {
    serde_json::from_slice(bytes).map_err(|e| CatalogError::BadChange(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str) -> TableDef {
        TableDef {
            name: name.into(),
            columns: vec!["id".into(), "v".into()],
            distribution: Distribution::Hash {
                column: 0,
                kind: KeyKind::Integer,
            },
        }
    }

    #[test]
    fn integer_keys_are_canonical() {
        assert_eq!(
            bucket_of(KeyKind::Integer, "042"),
            bucket_of(KeyKind::Integer, "42")
        );
        assert_eq!(
            bucket_of(KeyKind::Integer, " 42"),
            bucket_of(KeyKind::Integer, "42")
        );
    }

    #[test]
    fn buckets_spread_over_groups() {
        let c = Catalog::new(vec!["dn1".into(), "dn2".into()]);
        let mut seen = [0usize; 2];
        for i in 0..1000 {
            seen[c.group_of(KeyKind::Integer, &i.to_string())] += 1;
        }
        assert!(seen[0] > 300 && seen[1] > 300, "{seen:?}");
    }

    #[test]
    fn prepare_then_commit_applies_and_bumps_version() {
        let mut c = Catalog::new(vec!["dn1".into()]);
        c.prepare("g1", 0, Change::Create(table("t"))).unwrap();
        assert!(c.table("t").is_none());
        assert!(c.finish("g1", true));
        assert_eq!(c.version, 1);
        assert!(c.table("t").is_some());
        assert!(!c.finish("g1", true), "finishing twice changes nothing");
        assert_eq!(c.version, 1);
    }

    #[test]
    fn rollback_forgets_and_stale_base_is_refused() {
        let mut c = Catalog::new(vec!["dn1".into()]);
        c.prepare("g1", 0, Change::Create(table("t"))).unwrap();
        c.finish("g1", false);
        assert_eq!(c.version, 0);
        assert!(c.table("t").is_none());
        let e = c.prepare("g2", 5, Change::Nothing).unwrap_err();
        assert!(e.to_string().contains("version 5"), "{e}");
    }

    #[test]
    fn store_round_trip_and_corruption_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = CatalogStore::new(dir.path());
        assert!(store.load().unwrap().is_none());
        let mut c = Catalog::new(vec!["dn1".into(), "dn2".into()]);
        c.apply(&Change::Create(table("t")));
        store.save(&c).unwrap();
        assert_eq!(store.load().unwrap(), Some(c));
        let mut bytes = std::fs::read(store.path()).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(store.path(), bytes).unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
    }

    #[test]
    fn set_columns_keeps_the_distribution_column_by_name() {
        let mut c = Catalog::new(vec!["dn1".into()]);
        c.apply(&Change::Create(table("t")));
        c.apply(&Change::SetColumns {
            table: "t".into(),
            columns: vec!["x".into(), "id".into(), "v".into()],
        });
        assert_eq!(
            c.table("t").unwrap().hash_column(),
            Some((1, KeyKind::Integer))
        );
    }
}
