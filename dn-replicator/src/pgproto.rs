//! The client side of PostgreSQL's wire protocol as far as a physical replication
//! connection needs it: startup with `replication=true`, authentication (trust,
//! cleartext, md5, SCRAM-SHA-256), simple queries (IDENTIFY_SYSTEM, SHOW,
//! TIMELINE_HISTORY), START_REPLICATION's CopyBoth stream and the replication
//! sub-messages inside it ('w' XLogData, 'k' keepalive, 'r' standby status).
//! Decoders never panic on bad bytes: they return an error naming the problem.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Largest backend message accepted (XLogData carries at most a few MB).
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connect {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connection to {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr}: server error {code}: {message}")]
    Server {
        addr: String,
        code: String,
        message: String,
    },
    #[error("{addr}: protocol violation: {what}")]
    Protocol { addr: String, what: String },
    #[error("{0}")]
    Decode(#[from] DecodeError),
}

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {problem}")]
pub struct DecodeError {
    pub what: &'static str,
    pub problem: String,
}

fn short(what: &'static str, need: usize, have: usize) -> DecodeError {
    DecodeError {
        what,
        problem: format!("{have} bytes, need {need}"),
    }
}

/// A message from the upstream inside the CopyBoth stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// 'w': WAL starting at `start`; `end` is the server's WAL end.
    XLogData { start: u64, end: u64, data: Bytes },
    /// 'k': the server's WAL end, and whether it wants a status update now.
    Keepalive { end: u64, reply_requested: bool },
}

/// Decodes one CopyData payload of the replication stream.
pub fn decode_replication(mut b: Bytes) -> Result<ReplicationMessage, DecodeError> {
    if b.is_empty() {
        return Err(short("replication message", 1, 0));
    }
    match b.get_u8() {
        b'w' => {
            if b.len() < 24 {
                return Err(short("XLogData", 25, b.len() + 1));
            }
            let start = b.get_u64();
            let end = b.get_u64();
            let _ts = b.get_i64();
            Ok(ReplicationMessage::XLogData {
                start,
                end,
                data: b,
            })
        }
        b'k' => {
            if b.len() < 17 {
                return Err(short("keepalive", 18, b.len() + 1));
            }
            let end = b.get_u64();
            let _ts = b.get_i64();
            Ok(ReplicationMessage::Keepalive {
                end,
                reply_requested: b.get_u8() != 0,
            })
        }
        t => Err(DecodeError {
            what: "replication message",
            problem: format!("unknown type byte 0x{t:02x}"),
        }),
    }
}

/// Microseconds since 2000-01-01 (PostgreSQL's epoch).
fn pg_now() -> i64 {
    const PG_EPOCH_UNIX_S: u64 = 946_684_800;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    (now.as_micros() as i64) - (PG_EPOCH_UNIX_S as i64) * 1_000_000
}

/// 'r': standby status update. `write`/`flush` must be durable positions.
pub fn encode_status(write: u64, flush: u64, apply: u64, reply: bool) -> Bytes {
    let mut b = BytesMut::with_capacity(34);
    b.put_u8(b'r');
    b.put_u64(write);
    b.put_u64(flush);
    b.put_u64(apply);
    b.put_i64(pg_now());
    b.put_u8(u8::from(reply));
    b.freeze()
}

/// One backend message: type byte and body.
#[derive(Debug)]
pub struct BackendMessage {
    pub tag: u8,
    pub body: Bytes,
}

/// Reads cstrings out of a message body.
fn cstr(b: &mut Bytes, what: &'static str) -> Result<String, DecodeError> {
    let pos = b.iter().position(|c| *c == 0).ok_or(DecodeError {
        what,
        problem: "unterminated string".into(),
    })?;
    let s = String::from_utf8_lossy(&b[..pos]).into_owned();
    b.advance(pos + 1);
    Ok(s)
}

/// ErrorResponse / NoticeResponse fields: (SQLSTATE, message).
pub fn decode_error_fields(mut b: Bytes) -> Result<(String, String), DecodeError> {
    let (mut code, mut message) = (String::new(), String::new());
    while !b.is_empty() {
        let t = b.get_u8();
        if t == 0 {
            break;
        }
        let v = cstr(&mut b, "error response")?;
        match t {
            b'C' => code = v,
            b'M' => message = v,
            _ => {}
        }
    }
    Ok((code, message))
}

/// DataRow: its columns (None = NULL).
pub fn decode_data_row(mut b: Bytes) -> Result<Vec<Option<String>>, DecodeError> {
    if b.len() < 2 {
        return Err(short("data row", 2, b.len()));
    }
    let n = b.get_i16();
    let mut cols = Vec::new();
    for _ in 0..n.max(0) {
        if b.len() < 4 {
            return Err(short("data row column", 4, b.len()));
        }
        let len = b.get_i32();
        if len < 0 {
            cols.push(None);
            continue;
        }
        let len = len as usize;
        if b.len() < len {
            return Err(short("data row column", len, b.len()));
        }
        cols.push(Some(String::from_utf8_lossy(&b.split_to(len)).into_owned()));
    }
    Ok(cols)
}

/// A replication connection to one PostgreSQL server.
pub struct Connection {
    addr: String,
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

/// The rows of a simple query's result.
pub type Rows = Vec<Vec<Option<String>>>;

impl Connection {
    /// Connects with `replication=true` (physical) as `user`, naming itself
    /// `application_name` (what `synchronous_standby_names` lists).
    pub async fn connect(
        host: &str,
        port: u16,
        user: &str,
        application_name: &str,
        password: Option<&str>,
        timeout: Duration,
    ) -> Result<Connection, ProtoError> {
        let addr = format!("{host}:{port}");
        let stream = tokio::time::timeout(timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| ProtoError::Connect {
                addr: addr.clone(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
            })?
            .map_err(|source| ProtoError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let mut c = Connection {
            addr,
            rd: BufReader::with_capacity(256 << 10, rd),
            wr,
        };
        let mut body = BytesMut::new();
        body.put_i32(196_608); // protocol 3.0
        for (k, v) in [
            ("user", user),
            ("replication", "true"),
            ("application_name", application_name),
        ] {
            body.put_slice(k.as_bytes());
            body.put_u8(0);
            body.put_slice(v.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        let mut msg = BytesMut::new();
        msg.put_i32(body.len() as i32 + 4);
        msg.put_slice(&body);
        tokio::time::timeout(timeout, c.startup(msg.freeze(), user, password))
            .await
            .map_err(|_| c.violation("startup timed out"))??;
        Ok(c)
    }

    fn violation(&self, what: impl Into<String>) -> ProtoError {
        ProtoError::Protocol {
            addr: self.addr.clone(),
            what: what.into(),
        }
    }

    fn io(&self, source: std::io::Error) -> ProtoError {
        ProtoError::Io {
            addr: self.addr.clone(),
            source,
        }
    }

    async fn startup(
        &mut self,
        msg: Bytes,
        user: &str,
        password: Option<&str>,
    ) -> Result<(), ProtoError> {
        self.write_raw(&msg).await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let m = self.read().await?;
            match m.tag {
                b'R' => {
                    let mut b = m.body;
                    if b.len() < 4 {
                        return Err(short("authentication", 4, b.len()).into());
                    }
                    match b.get_i32() {
                        0 => {}
                        3 => {
                            let pw = self.password(password)?;
                            let mut p = pw.into_bytes();
                            p.push(0);
                            self.send(b'p', &p).await?;
                        }
                        5 => {
                            if b.len() < 4 {
                                return Err(short("md5 salt", 4, b.len()).into());
                            }
                            let salt: [u8; 4] = [b[0], b[1], b[2], b[3]];
                            let pw = self.password(password)?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                user.as_bytes(),
                                pw.as_bytes(),
                                salt,
                            );
                            let mut p = hash.into_bytes();
                            p.push(0);
                            self.send(b'p', &p).await?;
                        }
                        10 => {
                            let pw = self.password(password)?;
                            let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                            let first = s.message().to_vec();
                            let mut p = BytesMut::new();
                            p.put_slice(b"SCRAM-SHA-256\0");
                            p.put_i32(first.len() as i32);
                            p.put_slice(&first);
                            self.send(b'p', &p).await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| self.violation("SASL continue without start"))?;
                            s.update(&b)
                                .map_err(|e| self.violation(format!("SCRAM: {e}")))?;
                            let next = s.message().to_vec();
                            self.send(b'p', &next).await?;
                        }
                        12 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| self.violation("SASL final without start"))?;
                            s.finish(&b)
                                .map_err(|e| self.violation(format!("SCRAM: {e}")))?;
                        }
                        other => {
                            return Err(self
                                .violation(format!("unsupported authentication method {other}")))
                        }
                    }
                }
                b'Z' => return Ok(()),
                b'S' | b'K' | b'N' => {}
                b'E' => return Err(self.server_error(m.body)),
                t => {
                    return Err(
                        self.violation(format!("unexpected message {:?} at startup", t as char))
                    )
                }
            }
        }
    }

    fn password(&self, password: Option<&str>) -> Result<String, ProtoError> {
        password
            .map(str::to_owned)
            .ok_or_else(|| self.violation("the server asks for a password and none is configured"))
    }

    fn server_error(&self, body: Bytes) -> ProtoError {
        match decode_error_fields(body) {
            Ok((code, message)) => ProtoError::Server {
                addr: self.addr.clone(),
                code,
                message,
            },
            Err(e) => e.into(),
        }
    }

    async fn write_raw(&mut self, b: &[u8]) -> Result<(), ProtoError> {
        let r = self.wr.write_all(b).await;
        r.map_err(|e| self.io(e))
    }

    /// Sends one frontend message.
    pub async fn send(&mut self, tag: u8, body: &[u8]) -> Result<(), ProtoError> {
        let mut m = BytesMut::with_capacity(body.len() + 5);
        m.put_u8(tag);
        m.put_i32(body.len() as i32 + 4);
        m.put_slice(body);
        self.write_raw(&m).await
    }

    /// Reads one backend message.
    pub async fn read(&mut self) -> Result<BackendMessage, ProtoError> {
        let tag = self.rd.read_u8().await.map_err(|e| self.io(e))?;
        let len = self.rd.read_i32().await.map_err(|e| self.io(e))?;
        if len < 4 || len as usize - 4 > MAX_MESSAGE {
            return Err(self.violation(format!("message {:?} with length {len}", tag as char)));
        }
        let mut body = vec![0u8; len as usize - 4];
        self.rd
            .read_exact(&mut body)
            .await
            .map_err(|e| self.io(e))?;
        Ok(BackendMessage {
            tag,
            body: Bytes::from(body),
        })
    }

    /// Whether a whole message is probably buffered already (no syscall needed).
    pub fn has_buffered(&self) -> bool {
        let b = self.rd.buffer();
        b.len() >= 5 && {
            let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]);
            len >= 4 && b.len() > len as usize
        }
    }

    /// Runs a simple query; returns its rows.
    pub async fn query(&mut self, sql: &str) -> Result<Rows, ProtoError> {
        let mut q = sql.as_bytes().to_vec();
        q.push(0);
        self.send(b'Q', &q).await?;
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            let m = self.read().await?;
            match m.tag {
                b'T' | b'C' | b'N' | b'S' | b'I' => {}
                b'D' => rows.push(decode_data_row(m.body)?),
                b'E' => err = Some(self.server_error(m.body)),
                b'Z' => break,
                t => {
                    return Err(
                        self.violation(format!("unexpected message {:?} in a query", t as char))
                    )
                }
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Sends START_REPLICATION and waits for CopyBothResponse.
    pub async fn start_replication(&mut self, lsn: u64, tli: u32) -> Result<(), ProtoError> {
        let sql = format!(
            "START_REPLICATION PHYSICAL {} TIMELINE {tli}\0",
            ha_common::lsn::format_lsn(lsn)
        );
        self.send(b'Q', sql.as_bytes()).await?;
        loop {
            let m = self.read().await?;
            match m.tag {
                b'W' => return Ok(()),
                b'N' | b'S' => {}
                b'E' => {
                    let e = self.server_error(m.body);
                    // Drain to ReadyForQuery so that the error is the whole story.
                    return Err(e);
                }
                t => {
                    return Err(self.violation(format!(
                        "unexpected message {:?} after START_REPLICATION",
                        t as char
                    )))
                }
            }
        }
    }

    /// Sends a CopyData message (a standby status update inside CopyBoth).
    pub async fn copy_data(&mut self, payload: &[u8]) -> Result<(), ProtoError> {
        self.send(b'd', payload).await
    }

    pub async fn copy_done(&mut self) -> Result<(), ProtoError> {
        self.send(b'c', &[]).await
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xlogdata_and_keepalive_decode() {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(0x100);
        b.put_u64(0x200);
        b.put_i64(0);
        b.put_slice(b"wal!");
        assert_eq!(
            decode_replication(b.freeze()).unwrap(),
            ReplicationMessage::XLogData {
                start: 0x100,
                end: 0x200,
                data: Bytes::from_static(b"wal!")
            }
        );
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(0x300);
        k.put_i64(0);
        k.put_u8(1);
        assert_eq!(
            decode_replication(k.freeze()).unwrap(),
            ReplicationMessage::Keepalive {
                end: 0x300,
                reply_requested: true
            }
        );
    }

    #[test]
    fn status_update_layout() {
        let s = encode_status(1, 2, 3, true);
        assert_eq!(s.len(), 34);
        assert_eq!(s[0], b'r');
        assert_eq!(&s[1..9], &1u64.to_be_bytes());
        assert_eq!(&s[9..17], &2u64.to_be_bytes());
        assert_eq!(s[33], 1);
    }

    #[test]
    fn garbage_and_truncation_are_errors_never_panics() {
        // Every prefix of valid messages, and pseudo-random bytes.
        let mut w = BytesMut::new();
        w.put_u8(b'w');
        w.put_slice(&[0u8; 24]);
        let w = w.freeze();
        for n in 0..w.len() {
            assert!(decode_replication(w.slice(..n)).is_err(), "prefix {n}");
        }
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let b = Bytes::from(bytes);
            let _ = decode_replication(b.clone());
            let _ = decode_data_row(b.clone());
            let _ = decode_error_fields(b);
        }
        assert!(decode_data_row(Bytes::from_static(&[0, 1, 0, 0, 0, 9, b'a'])).is_err());
        assert_eq!(
            decode_data_row(Bytes::from_static(&[
                0, 2, 255, 255, 255, 255, 0, 0, 0, 1, b'x'
            ]))
            .unwrap(),
            vec![None, Some("x".to_owned())]
        );
    }
}
