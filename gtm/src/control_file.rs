//! The GTM control file (`gtm.control`): term, persisted GXID boundary, role and the
//! run-alone order, sealed
//! with the ha-common envelope and replaced atomically, so that a restart never counts
//! from a boundary lower than one that was ever acknowledged.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ha_common::durable::{fsync_dir, write_atomic, Envelope, EnvelopeError};

/// File name inside the instance's data dir.
pub const CONTROL_FILE_NAME: &str = "gtm.control";

/// The first GXID ever handed out; 0 stays invalid so that "no GXID" is representable.
pub const FIRST_GXID: u64 = 1;

const ENVELOPE: Envelope = Envelope {
    magic: *b"GTMC",
    version: 1,
    what: "GTM control",
};

/// term | boundary | role | flags. Files written before the flags byte existed (17
/// bytes) read as flags 0.
const PAYLOAD_LEN: usize = 8 + 8 + 1 + 1;
const OLD_PAYLOAD_LEN: usize = 8 + 8 + 1;
/// Flags bit: the primary was ordered to run alone.
const FLAG_RUN_ALONE: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{path}: control file is missing but the data dir {dir} exists; refusing to start (restarting from GXID 0 could reuse GXIDs). Restore the file or rebuild this instance from its peer")]
    Missing { path: PathBuf, dir: PathBuf },
    #[error("{0}; refusing to start")]
    Sealed(#[from] EnvelopeError),
    #[error("{path}: bad control payload ({problem}); refusing to start")]
    BadPayload { path: PathBuf, problem: String },
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
}

/// The role last persisted: it wins over the config's initial role on restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersistedRole {
    Primary,
    Standby,
}

/// What the control file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlData {
    pub term: u64,
    /// No GXID at or above this was ever handed out (by this node, or by a primary
    /// that synced it here).
    pub boundary: u64,
    pub role: Option<PersistedRole>,
    /// The last run-alone order (a restarted primary keeps obeying it, so that the
    /// CMServer's record of it stays true).
    pub run_alone: bool,
}

impl ControlData {
    pub fn fresh(role: Option<PersistedRole>) -> ControlData {
        ControlData {
            term: 0,
            boundary: FIRST_GXID,
            role,
            run_alone: false,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(PAYLOAD_LEN);
        out.extend_from_slice(&self.term.to_le_bytes());
        out.extend_from_slice(&self.boundary.to_le_bytes());
        out.push(match self.role {
            None => 0,
            Some(PersistedRole::Primary) => 1,
            Some(PersistedRole::Standby) => 2,
        });
        out.push(if self.run_alone { FLAG_RUN_ALONE } else { 0 });
        out
    }

    fn decode(path: &Path, payload: &[u8]) -> Result<ControlData, ControlError> {
        let bad = |problem: String| ControlError::BadPayload {
            path: path.to_path_buf(),
            problem,
        };
        if payload.len() != PAYLOAD_LEN && payload.len() != OLD_PAYLOAD_LEN {
            return Err(bad(format!(
                "{} bytes, expected {PAYLOAD_LEN}",
                payload.len()
            )));
        }
        let flags = payload.get(17).copied().unwrap_or(0);
        if flags & !FLAG_RUN_ALONE != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let term = u64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
        let boundary = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
        let role = match payload[16] {
            0 => None,
            1 => Some(PersistedRole::Primary),
            2 => Some(PersistedRole::Standby),
            other => return Err(bad(format!("unknown role code {other}"))),
        };
        if boundary < FIRST_GXID {
            return Err(bad(format!("boundary {boundary} below {FIRST_GXID}")));
        }
        Ok(ControlData {
            term,
            boundary,
            role,
            run_alone: flags & FLAG_RUN_ALONE != 0,
        })
    }
}

/// The control file of one data dir; every `persist` is durable when it returns.
#[derive(Debug)]
pub struct ControlFile {
    path: PathBuf,
    data: ControlData,
}

impl ControlFile {
    /// Opens the control file in `dir`. A brand-new node (no data dir) gets a fresh
    /// file; an existing dir without a readable, intact file is an error.
    pub fn open_or_create(
        dir: &Path,
        role: Option<PersistedRole>,
    ) -> Result<ControlFile, ControlError> {
        let path = dir.join(CONTROL_FILE_NAME);
        if !dir.exists() {
            return Self::create(dir, ControlData::fresh(role));
        }
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ControlError::Missing {
                    path,
                    dir: dir.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(ControlError::Io {
                    path,
                    op: "read",
                    source,
                })
            }
        };
        let payload = ENVELOPE.open(&path, &bytes)?;
        let data = ControlData::decode(&path, payload)?;
        Ok(ControlFile { path, data })
    }

    /// Creates the data dir with its control file in place: built under a temporary
    /// name and renamed, so that a crash never leaves a data dir without control file
    /// (which would make the node refuse to start).
    fn create(dir: &Path, data: ControlData) -> Result<ControlFile, ControlError> {
        let io_err = |path: &Path, op| {
            let path = path.to_path_buf();
            move |source| ControlError::Io { path, op, source }
        };
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        fs::create_dir_all(parent).map_err(io_err(parent, "create parent dir"))?;
        let mut tmp_name = dir.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".init");
        let tmp = parent.join(tmp_name);
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp).map_err(io_err(&tmp, "create dir"))?;
        let tmp_file = tmp.join(CONTROL_FILE_NAME);
        write_atomic(&tmp_file, &ENVELOPE.seal(&data.encode()))
            .map_err(io_err(&tmp_file, "write"))?;
        fs::rename(&tmp, dir).map_err(io_err(dir, "rename new data dir into place"))?;
        fsync_dir(parent).map_err(io_err(parent, "fsync"))?;
        Ok(ControlFile {
            path: dir.join(CONTROL_FILE_NAME),
            data,
        })
    }

    pub fn data(&self) -> ControlData {
        self.data
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Durably replaces the file's content; the in-memory copy changes only on success.
    pub fn persist(&mut self, data: ControlData) -> Result<(), ControlError> {
        write_atomic(&self.path, &ENVELOPE.seal(&data.encode())).map_err(|source| {
            ControlError::Io {
                path: self.path.clone(),
                op: "write",
                source,
            }
        })?;
        self.data = data;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_node_creates_and_round_trips() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("gtm1");
        let mut cf = ControlFile::open_or_create(&dir, Some(PersistedRole::Primary)).unwrap();
        assert_eq!(cf.data(), ControlData::fresh(Some(PersistedRole::Primary)));
        let d = ControlData {
            term: 7,
            boundary: 123_456,
            role: Some(PersistedRole::Standby),
            run_alone: true,
        };
        cf.persist(d).unwrap();
        let again = ControlFile::open_or_create(&dir, Some(PersistedRole::Primary)).unwrap();
        assert_eq!(again.data(), d);
        assert!(!base.path().join("gtm1.init").exists());
    }

    #[test]
    fn a_file_without_the_flags_byte_reads_as_not_alone() {
        let d = ControlData {
            term: 3,
            boundary: 4001,
            role: Some(PersistedRole::Primary),
            run_alone: true,
        };
        let old = &d.encode()[..OLD_PAYLOAD_LEN];
        let read = ControlData::decode(Path::new("x"), old).unwrap();
        assert_eq!(
            read,
            ControlData {
                run_alone: false,
                ..d
            }
        );
        let mut bad = d.encode();
        bad[17] = 0x80;
        let e = ControlData::decode(Path::new("x"), &bad).unwrap_err();
        assert!(e.to_string().contains("unknown flags"), "{e}");
    }

    #[test]
    fn flipped_byte_is_a_checksum_error() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("g");
        ControlFile::open_or_create(&dir, None).unwrap();
        let path = dir.join(CONTROL_FILE_NAME);
        let mut bytes = fs::read(&path).unwrap();
        bytes[20] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let e = ControlFile::open_or_create(&dir, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        assert!(e.contains("gtm.control"), "{e}");
    }

    #[test]
    fn truncated_file_is_an_error() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("g");
        ControlFile::open_or_create(&dir, None).unwrap();
        let path = dir.join(CONTROL_FILE_NAME);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let e = ControlFile::open_or_create(&dir, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gtm.control"), "{e}");
        fs::write(&path, &bytes[..5]).unwrap();
        let e = ControlFile::open_or_create(&dir, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn missing_file_in_existing_dir_refuses() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("g");
        fs::create_dir(&dir).unwrap();
        let e = ControlFile::open_or_create(&dir, None).unwrap_err();
        assert!(matches!(e, ControlError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("refusing to start"));
    }
}
