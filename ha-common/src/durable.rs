//! Crash-safe state files: atomic replace (temp file, fsync, rename, fsync the
//! directory) and a sealed envelope (magic, format version, crc32c) so that a torn or
//! corrupted file is detected instead of silently read as zeros.
//!
//! Layout of a sealed file: magic (4 bytes) | version (u32 LE) | payload length (u64 LE)
//! | payload | crc32c of everything before it (u32 LE).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

const HEADER_LEN: usize = 4 + 4 + 8;
const TRAILER_LEN: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("{path}: file is truncated ({len} bytes, expected at least {min})")]
    Truncated {
        path: String,
        len: usize,
        min: usize,
    },
    #[error(
        "{path}: wrong magic number {found:02x?} (expected {expected:02x?}): not a {what} file"
    )]
    BadMagic {
        path: String,
        found: [u8; 4],
        expected: [u8; 4],
        what: &'static str,
    },
    #[error("{path}: unsupported format version {found} (this build reads version {supported})")]
    BadVersion {
        path: String,
        found: u32,
        supported: u32,
    },
    #[error("{path}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupt")]
    BadChecksum {
        path: String,
        stored: u32,
        computed: u32,
    },
    #[error("{path}: payload length {declared} does not match the file size")]
    BadLength { path: String, declared: u64 },
}

/// The identity of one kind of sealed file.
#[derive(Debug, Clone, Copy)]
pub struct Envelope {
    pub magic: [u8; 4],
    pub version: u32,
    /// Human name for messages, e.g. "GTM control".
    pub what: &'static str,
}

impl Envelope {
    pub fn seal(&self, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
        out.extend_from_slice(&self.magic);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(payload);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Checks magic, version, length and checksum; returns the payload.
    pub fn open<'a>(&self, path: &Path, bytes: &'a [u8]) -> Result<&'a [u8], EnvelopeError> {
        let p = || path.display().to_string();
        let min = HEADER_LEN + TRAILER_LEN;
        if bytes.len() < min {
            return Err(EnvelopeError::Truncated {
                path: p(),
                len: bytes.len(),
                min,
            });
        }
        let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
        if magic != self.magic {
            return Err(EnvelopeError::BadMagic {
                path: p(),
                found: magic,
                expected: self.magic,
                what: self.what,
            });
        }
        let body_end = bytes.len() - TRAILER_LEN;
        let stored = u32::from_le_bytes(bytes[body_end..].try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(&bytes[..body_end]);
        if stored != computed {
            return Err(EnvelopeError::BadChecksum {
                path: p(),
                stored,
                computed,
            });
        }
        let version = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        if version != self.version {
            return Err(EnvelopeError::BadVersion {
                path: p(),
                found: version,
                supported: self.version,
            });
        }
        let declared = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        if declared != (body_end - HEADER_LEN) as u64 {
            return Err(EnvelopeError::BadLength {
                path: p(),
                declared,
            });
        }
        Ok(&bytes[HEADER_LEN..body_end])
    }
}

/// Replaces `path` with `bytes` so that after a crash the file holds either the old
/// or the new content, never a mix: write `<path>.partial`, fsync it, rename it over
/// `path`, fsync the directory (so the rename itself is durable).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".partial");
    let tmp = dir.join(tmp_name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// fsyncs a directory, making renames and file creations in it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: Envelope = Envelope {
        magic: *b"TEST",
        version: 1,
        what: "test",
    };

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write_atomic(&path, &ENV.seal(b"hello")).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(ENV.open(&path, &bytes).unwrap(), b"hello");
        assert!(!dir.path().join("state.partial").exists());
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let path = Path::new("state");
        let sealed = ENV.seal(b"some payload");
        for i in 0..sealed.len() {
            let mut b = sealed.clone();
            b[i] ^= 0x01;
            assert!(ENV.open(path, &b).is_err(), "flip at {i} not detected");
        }
    }

    #[test]
    fn truncation_is_detected() {
        let path = Path::new("state");
        let sealed = ENV.seal(b"some payload");
        for len in 0..sealed.len() {
            assert!(
                ENV.open(path, &sealed[..len]).is_err(),
                "truncation to {len} not detected"
            );
        }
    }

    #[test]
    fn wrong_magic_is_named() {
        let other = Envelope {
            magic: *b"ELSE",
            ..ENV
        };
        let e = ENV
            .open(Path::new("f"), &other.seal(b"x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a test file"), "{e}");
    }

    #[test]
    fn replace_keeps_old_content_until_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write_atomic(&path, &ENV.seal(b"one")).unwrap();
        // A crash after writing the temp file but before the rename leaves the old
        // content in place; the stale temp file is simply overwritten next time.
        fs::write(dir.path().join("state.partial"), b"garbage").unwrap();
        assert_eq!(ENV.open(&path, &fs::read(&path).unwrap()).unwrap(), b"one");
        write_atomic(&path, &ENV.seal(b"two")).unwrap();
        assert_eq!(ENV.open(&path, &fs::read(&path).unwrap()).unwrap(), b"two");
    }
}
