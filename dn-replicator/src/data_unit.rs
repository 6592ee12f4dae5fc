//! The build channel's wire format: length-prefixed frames carrying 8 KiB data units, WAL
//! chunks and the few control messages around them, encoded and decoded by pure functions.
//!
//! A frame is `length: u32 LE` (of everything after it) | `tag: u8` | body. Integers are
//! little-endian; strings are `u32 length | UTF-8`. Every data unit carries its own
//! monotonic offset and a crc32c over offset, file, block, kind and payload, so a unit
//! corrupted on the way (or put in the wrong place) is detected by the receiver and sent
//! again. The decoder never panics and never allocates more than [`MAX_FRAME`] for one
//! frame, whatever the bytes: it answers "need more" or one error naming the problem.

use std::fmt;

/// PostgreSQL's page size: one data unit carries at most one block.
pub const BLOCK_SIZE: usize = 8192;
/// Largest WAL chunk in one frame.
pub const MAX_WAL_CHUNK: usize = 128 * 1024;
/// Largest frame body accepted (a `Sums` frame of 64 Ki checksums, a WAL chunk, a label).
pub const MAX_FRAME: usize = 512 * 1024;
/// First bytes of a `Hello`: anything else on the port is not a build sink.
pub const MAGIC: [u8; 4] = *b"MPPB";
/// Protocol version spoken by this build.
pub const VERSION: u16 = 1;
/// Most checksums in one `Sums` frame.
pub const MAX_SUMS: usize = 65536;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("frame length {0} exceeds the limit of {MAX_FRAME} bytes")]
    TooLong(usize),
    #[error("empty frame (no message tag)")]
    Empty,
    #[error("unknown message tag {0:#04x}")]
    UnknownTag(u8),
    #[error("{what}: message ends early (needs {need} more bytes)")]
    Short { what: &'static str, need: usize },
    #[error("{what}: {extra} unexpected bytes after the message")]
    Trailing { what: &'static str, extra: usize },
    #[error("hello: wrong magic {0:02x?} (not a build sink)")]
    BadMagic([u8; 4]),
    #[error("hello: protocol version {0} (this build speaks {VERSION})")]
    BadVersion(u16),
    #[error("{what}: invalid value {value} for {field}")]
    BadValue {
        what: &'static str,
        field: &'static str,
        value: u64,
    },
    #[error("{what}: text is not UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("entry: unsafe path {0:?} (must be relative, without '..' or empty parts)")]
    UnsafePath(String),
}

/// What a manifest entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Dir = 0,
    File = 1,
}

/// What a data unit says about its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitKind {
    /// The block's bytes follow.
    Data = 0,
    /// Incremental build: the receiver's block is already identical (no bytes follow).
    Same = 1,
    /// The file shrank or vanished on the source since the manifest: the block is gone.
    Missing = 2,
}

/// One 8 KiB block of one file, at one offset of the build's unit sequence.
#[derive(Clone, PartialEq, Eq)]
pub struct DataUnit {
    pub offset: u64,
    pub file: u32,
    pub block: u32,
    pub kind: UnitKind,
    pub crc: u32,
    pub data: Vec<u8>,
}

impl fmt::Debug for DataUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DataUnit {{ offset: {}, file: {}, block: {}, kind: {:?}, crc: {:#010x}, {} bytes }}",
            self.offset,
            self.file,
            self.block,
            self.kind,
            self.crc,
            self.data.len()
        )
    }
}

impl DataUnit {
    /// A unit with its checksum computed.
    pub fn new(offset: u64, file: u32, block: u32, kind: UnitKind, data: Vec<u8>) -> DataUnit {
        let crc = unit_crc(offset, file, block, kind, &data);
        DataUnit {
            offset,
            file,
            block,
            kind,
            crc,
            data,
        }
    }

    /// Whether the checksum matches what the unit carries.
    pub fn verify(&self) -> bool {
        self.crc == unit_crc(self.offset, self.file, self.block, self.kind, &self.data)
    }
}

fn unit_crc(offset: u64, file: u32, block: u32, kind: UnitKind, data: &[u8]) -> u32 {
    let mut head = [0u8; 17];
    head[..8].copy_from_slice(&offset.to_le_bytes());
    head[8..12].copy_from_slice(&file.to_le_bytes());
    head[12..16].copy_from_slice(&block.to_le_bytes());
    head[16] = kind as u8;
    crc32c::crc32c_append(crc32c::crc32c(&head), data)
}

/// A piece of WAL at its LSN (the LSN is the WAL's monotonic offset).
#[derive(Clone, PartialEq, Eq)]
pub struct WalChunk {
    pub lsn: u64,
    pub timeline: u32,
    pub crc: u32,
    pub data: Vec<u8>,
}

impl fmt::Debug for WalChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WalChunk {{ lsn: {:#x}, timeline: {}, {} bytes }}",
            self.lsn,
            self.timeline,
            self.data.len()
        )
    }
}

impl WalChunk {
    pub fn new(lsn: u64, timeline: u32, data: Vec<u8>) -> WalChunk {
        let crc = wal_crc(lsn, timeline, &data);
        WalChunk {
            lsn,
            timeline,
            crc,
            data,
        }
    }

    pub fn verify(&self) -> bool {
        self.crc == wal_crc(self.lsn, self.timeline, &self.data)
    }
}

fn wal_crc(lsn: u64, timeline: u32, data: &[u8]) -> u32 {
    let mut head = [0u8; 12];
    head[..8].copy_from_slice(&lsn.to_le_bytes());
    head[8..].copy_from_slice(&timeline.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&head), data)
}

/// Every message of the build channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    // Sink -> source.
    /// Opens (session 0) or resumes a build: the sink has everything below `data_from`
    /// and `wal_from` durably.
    Hello {
        session: u64,
        data_from: u64,
        wal_from: u64,
        incremental: bool,
    },
    /// Incremental build: crc32c of the sink's blocks `first_block..` of manifest file `file`.
    Sums {
        file: u32,
        first_block: u32,
        crcs: Vec<u32>,
    },
    /// No more `Sums`.
    SumsDone,
    /// Durable below these offsets (highest contiguous data offset + 1, WAL LSN).
    Ack {
        data: u64,
        wal: u64,
    },
    /// The unit at `offset` was refused (bad checksum): send again from there.
    Resend {
        offset: u64,
    },

    // Source -> sink.
    /// The session and where it continues; the manifest follows on a new session.
    Welcome {
        session: u64,
        data_from: u64,
        wal_from: u64,
        start_lsn: u64,
        timeline: u32,
        segment_size: u32,
        units: u64,
    },
    /// One manifest entry (files are numbered by `index`).
    Entry {
        index: u32,
        kind: EntryKind,
        size: u64,
        path: String,
    },
    ManifestDone,
    Unit(DataUnit),
    Wal(WalChunk),
    /// All units and all WAL up to `stop_lsn` were sent; the backup's label files.
    Finish {
        stop_lsn: u64,
        backup_label: String,
        tablespace_map: String,
    },
    /// The source gives up (one line saying why).
    Failed {
        message: String,
    },
}

mod tag {
    pub const HELLO: u8 = 1;
    pub const SUMS: u8 = 2;
    pub const SUMS_DONE: u8 = 3;
    pub const ACK: u8 = 4;
    pub const RESEND: u8 = 5;
    pub const WELCOME: u8 = 16;
    pub const ENTRY: u8 = 17;
    pub const MANIFEST_DONE: u8 = 18;
    pub const UNIT: u8 = 19;
    pub const WAL: u8 = 20;
    pub const FINISH: u8 = 21;
    pub const FAILED: u8 = 22;
}

/// Appends `msg` as one frame to `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let put_str = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    match msg {
        Message::Hello {
            session,
            data_from,
            wal_from,
            incremental,
        } => {
            out.push(tag::HELLO);
            out.extend_from_slice(&MAGIC);
            out.extend_from_slice(&VERSION.to_le_bytes());
            out.extend_from_slice(&session.to_le_bytes());
            out.extend_from_slice(&data_from.to_le_bytes());
            out.extend_from_slice(&wal_from.to_le_bytes());
            out.push(u8::from(*incremental));
        }
        Message::Sums {
            file,
            first_block,
            crcs,
        } => {
            out.push(tag::SUMS);
            out.extend_from_slice(&file.to_le_bytes());
            out.extend_from_slice(&first_block.to_le_bytes());
            out.extend_from_slice(&(crcs.len() as u32).to_le_bytes());
            for c in crcs {
                out.extend_from_slice(&c.to_le_bytes());
            }
        }
        Message::SumsDone => out.push(tag::SUMS_DONE),
        Message::Ack { data, wal } => {
            out.push(tag::ACK);
            out.extend_from_slice(&data.to_le_bytes());
            out.extend_from_slice(&wal.to_le_bytes());
        }
        Message::Resend { offset } => {
            out.push(tag::RESEND);
            out.extend_from_slice(&offset.to_le_bytes());
        }
        Message::Welcome {
            session,
            data_from,
            wal_from,
            start_lsn,
            timeline,
            segment_size,
            units,
        } => {
            out.push(tag::WELCOME);
            for v in [session, data_from, wal_from, start_lsn] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&timeline.to_le_bytes());
            out.extend_from_slice(&segment_size.to_le_bytes());
            out.extend_from_slice(&units.to_le_bytes());
        }
        Message::Entry {
            index,
            kind,
            size,
            path,
        } => {
            out.push(tag::ENTRY);
            out.extend_from_slice(&index.to_le_bytes());
            out.push(*kind as u8);
            out.extend_from_slice(&size.to_le_bytes());
            put_str(out, path);
        }
        Message::ManifestDone => out.push(tag::MANIFEST_DONE),
        Message::Unit(u) => {
            out.push(tag::UNIT);
            out.extend_from_slice(&u.offset.to_le_bytes());
            out.extend_from_slice(&u.file.to_le_bytes());
            out.extend_from_slice(&u.block.to_le_bytes());
            out.push(u.kind as u8);
            out.extend_from_slice(&u.crc.to_le_bytes());
            out.extend_from_slice(&(u.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&u.data);
        }
        Message::Wal(w) => {
            out.push(tag::WAL);
            out.extend_from_slice(&w.lsn.to_le_bytes());
            out.extend_from_slice(&w.timeline.to_le_bytes());
            out.extend_from_slice(&w.crc.to_le_bytes());
            out.extend_from_slice(&(w.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&w.data);
        }
        Message::Finish {
            stop_lsn,
            backup_label,
            tablespace_map,
        } => {
            out.push(tag::FINISH);
            out.extend_from_slice(&stop_lsn.to_le_bytes());
            put_str(out, backup_label);
            put_str(out, tablespace_map);
        }
        Message::Failed { message } => {
            out.push(tag::FAILED);
            put_str(out, message);
        }
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Decodes the first frame of `buf`: `Ok(None)` when more bytes are needed, else the
/// message and how many bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, CodecError> {
    let Some(len_bytes) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(CodecError::TooLong(len));
    }
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let msg = decode_body(body)?;
    Ok(Some((msg, 4 + len)))
}

/// A cursor over one frame body.
struct Reader<'a> {
    what: &'static str,
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.bytes.len() < n {
            return Err(CodecError::Short {
                what: self.what,
                need: n - self.bytes.len(),
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn bytes(&mut self, limit: usize, field: &'static str) -> Result<&'a [u8], CodecError> {
        let n = self.u32()? as usize;
        if n > limit {
            return Err(CodecError::BadValue {
                what: self.what,
                field,
                value: n as u64,
            });
        }
        self.take(n)
    }
    fn string(&mut self, field: &'static str) -> Result<String, CodecError> {
        let b = self.bytes(MAX_FRAME, field)?;
        String::from_utf8(b.to_vec()).map_err(|_| CodecError::NotUtf8 { what: self.what })
    }
    fn bool(&mut self, field: &'static str) -> Result<bool, CodecError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.bad(field, v.into())),
        }
    }
    fn bad(&self, field: &'static str, value: u64) -> CodecError {
        CodecError::BadValue {
            what: self.what,
            field,
            value,
        }
    }
    fn end(self) -> Result<(), CodecError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Trailing {
                what: self.what,
                extra: self.bytes.len(),
            })
        }
    }
}

fn decode_body(body: &[u8]) -> Result<Message, CodecError> {
    let (&t, rest) = body.split_first().ok_or(CodecError::Empty)?;
    let what = match t {
        tag::HELLO => "hello",
        tag::SUMS => "sums",
        tag::SUMS_DONE => "sums-done",
        tag::ACK => "ack",
        tag::RESEND => "resend",
        tag::WELCOME => "welcome",
        tag::ENTRY => "entry",
        tag::MANIFEST_DONE => "manifest-done",
        tag::UNIT => "unit",
        tag::WAL => "wal",
        tag::FINISH => "finish",
        tag::FAILED => "failed",
        other => return Err(CodecError::UnknownTag(other)),
    };
    let mut r = Reader { what, bytes: rest };
    let msg = match t {
        tag::HELLO => {
            let magic: [u8; 4] = r.take(4)?.try_into().expect("4");
            if magic != MAGIC {
                return Err(CodecError::BadMagic(magic));
            }
            let version = r.u16()?;
            if version != VERSION {
                return Err(CodecError::BadVersion(version));
            }
            Message::Hello {
                session: r.u64()?,
                data_from: r.u64()?,
                wal_from: r.u64()?,
                incremental: r.bool("incremental")?,
            }
        }
        tag::SUMS => {
            let file = r.u32()?;
            let first_block = r.u32()?;
            let n = r.u32()? as usize;
            if n > MAX_SUMS {
                return Err(r.bad("count", n as u64));
            }
            let raw = r.take(n * 4)?;
            let crcs = raw
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
                .collect();
            Message::Sums {
                file,
                first_block,
                crcs,
            }
        }
        tag::SUMS_DONE => Message::SumsDone,
        tag::ACK => Message::Ack {
            data: r.u64()?,
            wal: r.u64()?,
        },
        tag::RESEND => Message::Resend { offset: r.u64()? },
        tag::WELCOME => {
            let session = r.u64()?;
            let data_from = r.u64()?;
            let wal_from = r.u64()?;
            let start_lsn = r.u64()?;
            let timeline = r.u32()?;
            let segment_size = r.u32()?;
            if !segment_size.is_power_of_two() || segment_size < (1 << 20) {
                return Err(r.bad("segment_size", segment_size.into()));
            }
            Message::Welcome {
                session,
                data_from,
                wal_from,
                start_lsn,
                timeline,
                segment_size,
                units: r.u64()?,
            }
        }
        tag::ENTRY => {
            let index = r.u32()?;
            let kind = match r.u8()? {
                0 => EntryKind::Dir,
                1 => EntryKind::File,
                v => return Err(r.bad("kind", v.into())),
            };
            let size = r.u64()?;
            let path = r.string("path")?;
            check_path(&path)?;
            Message::Entry {
                index,
                kind,
                size,
                path,
            }
        }
        tag::MANIFEST_DONE => Message::ManifestDone,
        tag::UNIT => {
            let offset = r.u64()?;
            let file = r.u32()?;
            let block = r.u32()?;
            let kind = match r.u8()? {
                0 => UnitKind::Data,
                1 => UnitKind::Same,
                2 => UnitKind::Missing,
                v => return Err(r.bad("kind", v.into())),
            };
            let crc = r.u32()?;
            let data = r.bytes(BLOCK_SIZE, "length")?.to_vec();
            if kind != UnitKind::Data && !data.is_empty() {
                return Err(r.bad("length", data.len() as u64));
            }
            Message::Unit(DataUnit {
                offset,
                file,
                block,
                kind,
                crc,
                data,
            })
        }
        tag::WAL => {
            let lsn = r.u64()?;
            let timeline = r.u32()?;
            let crc = r.u32()?;
            let data = r.bytes(MAX_WAL_CHUNK, "length")?.to_vec();
            Message::Wal(WalChunk {
                lsn,
                timeline,
                crc,
                data,
            })
        }
        tag::FINISH => Message::Finish {
            stop_lsn: r.u64()?,
            backup_label: r.string("backup_label")?,
            tablespace_map: r.string("tablespace_map")?,
        },
        tag::FAILED => Message::Failed {
            message: r.string("message")?,
        },
        _ => unreachable!("tag checked above"),
    };
    r.end()?;
    Ok(msg)
}

/// A manifest path must stay inside the data dir it is written to.
pub fn check_path(path: &str) -> Result<(), CodecError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path.contains('\\')
        || path
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        Err(CodecError::UnsafePath(path.to_owned()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round(msg: &Message) {
        let mut buf = Vec::new();
        encode(msg, &mut buf);
        let (back, used) = decode(&buf).unwrap().unwrap();
        assert_eq!(&back, msg);
        assert_eq!(used, buf.len());
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut]), Ok(None), "prefix of {cut} bytes");
        }
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                session: 7,
                data_from: 100,
                wal_from: 0x3000000,
                incremental: true,
            },
            Message::Sums {
                file: 3,
                first_block: 10,
                crcs: vec![1, 2, 0xdead_beef],
            },
            Message::SumsDone,
            Message::Ack { data: 5, wal: 9 },
            Message::Resend { offset: 42 },
            Message::Welcome {
                session: 1,
                data_from: 2,
                wal_from: 3,
                start_lsn: 4,
                timeline: 5,
                segment_size: 16 << 20,
                units: 6,
            },
            Message::Entry {
                index: 1,
                kind: EntryKind::File,
                size: 8192,
                path: "base/5/1259".into(),
            },
            Message::ManifestDone,
            Message::Unit(DataUnit::new(9, 1, 0, UnitKind::Data, vec![7; BLOCK_SIZE])),
            Message::Unit(DataUnit::new(10, 1, 1, UnitKind::Same, vec![])),
            Message::Wal(WalChunk::new(0x1000, 1, vec![1, 2, 3])),
            Message::Finish {
                stop_lsn: 77,
                backup_label: "START WAL LOCATION: 0/2000028".into(),
                tablespace_map: String::new(),
            },
            Message::Failed {
                message: "no".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_and_every_prefix_asks_for_more() {
        for m in samples() {
            round(&m);
        }
    }

    #[test]
    fn a_flipped_bit_in_a_unit_fails_its_checksum() {
        let u = DataUnit::new(9, 1, 4, UnitKind::Data, vec![3; BLOCK_SIZE]);
        assert!(u.verify());
        let mut bad = u.clone();
        bad.data[100] ^= 0x10;
        assert!(!bad.verify());
        let mut moved = u.clone();
        moved.block = 5;
        assert!(!moved.verify(), "a unit put at another block is detected");
        let mut w = WalChunk::new(0x2000, 1, vec![9; 100]);
        assert!(w.verify());
        w.data[0] = 0;
        assert!(!w.verify());
    }

    #[test]
    fn bad_frames_are_named() {
        let mut buf = Vec::new();
        encode(
            &Message::Hello {
                session: 0,
                data_from: 0,
                wal_from: 0,
                incremental: false,
            },
            &mut buf,
        );
        let mut wrong = buf.clone();
        wrong[5] = b'X';
        assert!(matches!(decode(&wrong), Err(CodecError::BadMagic(_))));
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0x7f, 1]),
            Err(CodecError::TooLong(0x7fff_ffff))
        );
        assert_eq!(
            decode(&[1, 0, 0, 0, 0x99]),
            Err(CodecError::UnknownTag(0x99))
        );
        assert_eq!(decode(&[0, 0, 0, 0]), Err(CodecError::Empty));
        let e = decode(b"GET / HTTP/1.1\r\n\r\n").unwrap_err();
        assert!(matches!(e, CodecError::TooLong(_)), "{e}");
    }

    #[test]
    fn paths_cannot_leave_the_data_dir() {
        for p in [
            "",
            "/etc/passwd",
            "../x",
            "base/../../x",
            "a//b",
            "./a",
            "a/\0",
        ] {
            assert!(check_path(p).is_err(), "{p:?} accepted");
        }
        for p in ["PG_VERSION", "base/1/1259", "pg_wal/00000002.history"] {
            assert!(check_path(p).is_ok(), "{p:?} refused");
        }
        let mut buf = Vec::new();
        encode(
            &Message::Entry {
                index: 0,
                kind: EntryKind::File,
                size: 0,
                path: "../../etc/passwd".into(),
            },
            &mut buf,
        );
        assert!(matches!(decode(&buf), Err(CodecError::UnsafePath(_))));
    }

    fn any_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
                |(session, data_from, wal_from, incremental)| Message::Hello {
                    session,
                    data_from,
                    wal_from,
                    incremental
                }
            ),
            (
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..=BLOCK_SIZE)
            )
                .prop_map(|(o, f, b, d)| Message::Unit(DataUnit::new(
                    o,
                    f,
                    b,
                    UnitKind::Data,
                    d
                ))),
            (
                any::<u64>(),
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..2000)
            )
                .prop_map(|(l, t, d)| Message::Wal(WalChunk::new(l, t, d))),
            (
                any::<u32>(),
                any::<u32>(),
                proptest::collection::vec(any::<u32>(), 0..300)
            )
                .prop_map(|(file, first_block, crcs)| Message::Sums {
                    file,
                    first_block,
                    crcs
                }),
            (any::<u64>(), ".{0,40}").prop_map(|(stop_lsn, backup_label)| Message::Finish {
                stop_lsn,
                backup_label,
                tablespace_map: String::new(),
            }),
            (
                any::<u32>(),
                any::<u64>(),
                "[a-z_]{1,8}(/[a-z0-9_]{1,8}){0,3}"
            )
                .prop_map(|(index, size, path)| Message::Entry {
                    index,
                    kind: EntryKind::File,
                    size,
                    path
                }),
        ]
    }

    proptest! {
        #[test]
        fn encoded_messages_decode_to_themselves(m in any_message()) {
            let mut buf = Vec::new();
            encode(&m, &mut buf);
            let (back, used) = decode(&buf).unwrap().unwrap();
            prop_assert_eq!(back, m);
            prop_assert_eq!(used, buf.len());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            // Any answer is fine except a panic or a claim to use more than it has.
            if let Ok(Some((_, used))) = decode(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }

        #[test]
        fn mutated_frames_never_panic_and_corrupt_units_fail_verification(
            m in any_message(), pos in any::<usize>(), bit in 0u8..8
        ) {
            let mut buf = Vec::new();
            encode(&m, &mut buf);
            let i = pos % buf.len();
            buf[i] ^= 1 << bit;
            if let Ok(Some((back, _))) = decode(&buf) {
                // A flip inside a unit's header or payload is caught by its checksum.
                if let (Message::Unit(orig), Message::Unit(got)) = (&m, &back) {
                    if got != orig {
                        prop_assert!(!got.verify());
                    }
                }
                if let (Message::Wal(orig), Message::Wal(got)) = (&m, &back) {
                    if got != orig {
                        prop_assert!(!got.verify());
                    }
                }
            }
        }
    }
}
