//! The CN's own connection to a DN backend: PostgreSQL protocol v3 spoken directly on a
//! socket owned by the session that holds the connection.
//!
//! Why not tokio-postgres: it runs each connection in a task of its own and hands every
//! request and reply across channels (two task wake-ups and often a thread hop per
//! statement, which on the CN's hot path cost about as much CPU as the DN's work), and
//! its simple-query API drops the type OIDs of a RowDescription, which the CN must pass
//! on to its clients. Here a statement is one `write` and reads until ReadyForQuery, on
//! the caller's task.
//!
//! A request whose reply was not read to its end (its future was dropped, e.g. by a
//! client's cancel) leaves the connection `busy`: it is never used again.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// A DN's socket: TCP, or its Unix-domain socket when the DN runs on this host (no
/// loopback TCP stack on either side of each statement).
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// The Unix socket `socket` if one is given and accepts, else TCP.
    async fn connect(host: &str, port: u16, socket: Option<&Path>) -> io::Result<Stream> {
        if let Some(path) = socket {
            if let Ok(s) = UnixStream::connect(path).await {
                return Ok(Stream::Unix(s));
            }
        }
        let s = TcpStream::connect((host, port)).await?;
        // Requests are whole messages written at once: never delay them.
        s.set_nodelay(true)?;
        Ok(Stream::Tcp(s))
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_read(buf),
            Stream::Unix(s) => s.try_read(buf),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// What went wrong on a DN connection.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The DN's own error: SQLSTATE, message and detail, unchanged. `fatal`: the DN
    /// ended the backend with it (severity FATAL or PANIC).
    #[error("{message} ({code})")]
    Server {
        code: String,
        message: String,
        detail: Option<String>,
        fatal: bool,
    },
    /// The connection broke, or the DN spoke what we do not understand.
    #[error("{0}")]
    Lost(String),
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> WireError {
        WireError::Lost(e.to_string())
    }
}

/// A result column as the DN described it (RowDescription).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub type_size: i16,
    pub type_modifier: i32,
}

impl Column {
    /// A column the CN computes itself (no modifier, size unknown).
    pub fn computed(name: &str, type_oid: u32) -> Column {
        Column {
            name: name.to_owned(),
            type_oid,
            type_size: 0,
            type_modifier: -1,
        }
    }
}

/// A row in PostgreSQL text format (None: NULL).
pub type Row = Vec<Option<String>>;

/// What a simple query returned; with several statements in the string, the last
/// result that had rows (or the last command) wins.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub columns: Option<Vec<Column>>,
    pub rows: Vec<Row>,
    /// The row count of the last command tag (0 if it has none).
    pub count: u64,
}

/// Parameter types and result columns of a statement (extended-protocol Describe).
#[derive(Debug, Clone, Default)]
pub struct Description {
    pub params: Vec<u32>,
    pub columns: Vec<Column>,
}

/// Where and how to send a CancelRequest for one DN backend.
#[derive(Debug, Clone)]
pub struct CancelKey {
    pub host: String,
    pub port: u16,
    /// The DN's Unix socket, when the connection went through it.
    pub socket: Option<PathBuf>,
    pub pid: i32,
    pub secret: i32,
}

impl CancelKey {
    /// Asks the DN to cancel what the backend runs now: a CancelRequest on a new
    /// connection, which the DN closes when it has acted on it.
    pub async fn cancel(&self) -> Result<(), WireError> {
        let mut sock = Stream::connect(&self.host, self.port, self.socket.as_deref()).await?;
        let mut buf = BytesMut::new();
        frontend::cancel_request(self.pid, self.secret, &mut buf);
        sock.write_all(&buf).await?;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut sink)).await;
        Ok(())
    }
}

/// Login of the CN to a DN.
pub struct Login<'a> {
    pub host: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub database: &'a str,
    pub application_name: &'a str,
    pub password: Option<&'a str>,
    /// The DN's Unix-domain socket if it runs on this host (tried first).
    pub socket: Option<&'a Path>,
}

pub struct WireConn {
    stream: Stream,
    read: BytesMut,
    write: BytesMut,
    /// A request is out whose reply was not read to ReadyForQuery.
    busy: bool,
    /// COPY FROM STDIN is open (CopyInResponse read, CopyDone/CopyFail not yet sent).
    copying: bool,
    /// The connection broke or the DN ended the backend.
    closed: bool,
    cancel: Arc<CancelKey>,
    /// Named statements prepared on this backend: text → name. The DN parses and
    /// plans each once per connection instead of once per run.
    prepared: HashMap<String, String>,
    /// The catalog version the statements were prepared under (a DDL may change what
    /// a text means, and the DN refuses a cached plan whose result type changed).
    prepared_epoch: u64,
    next_statement: u64,
    /// The last reply had a ParseComplete.
    parsed: bool,
}

/// Named statements kept per connection; past it they are deallocated and made anew.
const MAX_PREPARED: usize = 256;

impl WireConn {
    /// Connects, logs in (trust, cleartext, md5 or SCRAM-SHA-256) and waits for the
    /// first ReadyForQuery.
    pub async fn connect(login: &Login<'_>) -> Result<WireConn, WireError> {
        let stream = Stream::connect(login.host, login.port, login.socket).await?;
        let socket = match stream {
            Stream::Unix(_) => login.socket.map(Path::to_path_buf),
            Stream::Tcp(_) => None,
        };
        let mut conn = WireConn {
            stream,
            read: BytesMut::with_capacity(8192),
            write: BytesMut::with_capacity(1024),
            busy: true,
            copying: false,
            closed: false,
            cancel: Arc::new(CancelKey {
                host: login.host.to_owned(),
                port: login.port,
                socket: socket.clone(),
                pid: 0,
                secret: 0,
            }),
            prepared: HashMap::new(),
            prepared_epoch: 0,
            next_statement: 0,
            parsed: false,
        };
        frontend::startup_message(
            [
                ("user", login.user),
                ("database", login.database),
                ("application_name", login.application_name),
                ("client_encoding", "UTF8"),
            ],
            &mut conn.write,
        )?;
        conn.flush().await?;
        let password = || {
            login.password.ok_or_else(|| {
                WireError::Lost("the DN asks for a password and none is configured".into())
            })
        };
        let mut scram: Option<ScramSha256> = None;
        let (mut pid, mut secret) = (0, 0);
        loop {
            match conn.next().await? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut conn.write)?;
                    conn.flush().await?;
                }
                backend::Message::AuthenticationMd5Password(b) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        login.user.as_bytes(),
                        password()?.as_bytes(),
                        b.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut conn.write)?;
                    conn.flush().await?;
                }
                backend::Message::AuthenticationSasl(b) => {
                    let mut mechanisms = b.mechanisms();
                    let mut offered = false;
                    while let Some(m) = mechanisms.next()? {
                        offered |= m == SCRAM_SHA_256;
                    }
                    if !offered {
                        return Err(WireError::Lost(
                            "the DN offers no SASL mechanism the CN speaks (SCRAM-SHA-256)".into(),
                        ));
                    }
                    let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut conn.write)?;
                    scram = Some(s);
                    conn.flush().await?;
                }
                backend::Message::AuthenticationSaslContinue(b) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| WireError::Lost("SASL continue before SASL start".into()))?;
                    s.update(b.data())?;
                    frontend::sasl_response(s.message(), &mut conn.write)?;
                    conn.flush().await?;
                }
                backend::Message::AuthenticationSaslFinal(b) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| WireError::Lost("SASL final before SASL start".into()))?;
                    s.finish(b.data())?;
                }
                backend::Message::BackendKeyData(k) => {
                    pid = k.process_id();
                    secret = k.secret_key();
                }
                backend::Message::ReadyForQuery(_) => break,
                backend::Message::ErrorResponse(e) => return Err(server_error(&e)),
                backend::Message::ParameterStatus(_) | backend::Message::NoticeResponse(_) => {}
                _ => {
                    return Err(WireError::Lost(
                        "unexpected message from the DN during login".into(),
                    ))
                }
            }
        }
        conn.cancel = Arc::new(CancelKey {
            host: login.host.to_owned(),
            port: login.port,
            socket,
            pid,
            secret,
        });
        conn.busy = false;
        Ok(conn)
    }

    pub fn cancel_key(&self) -> Arc<CancelKey> {
        self.cancel.clone()
    }

    /// False once the connection broke, the DN ended it, or a reply was abandoned.
    pub fn is_usable(&self) -> bool {
        !self.closed && !self.busy
    }

    /// For an idle connection: did the DN close it or send something (its FATAL at
    /// shutdown) since its last reply? Costs no syscall unless the socket is readable.
    pub fn is_idle_and_open(&mut self) -> bool {
        if !self.is_usable() || self.copying {
            return false;
        }
        let mut probe = [0u8; 1];
        match self.stream.try_read(&mut probe) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            _ => {
                self.closed = true;
                false
            }
        }
    }

    async fn flush(&mut self) -> Result<(), WireError> {
        let r = self.stream.write_all(&self.write).await;
        self.write.clear();
        if r.is_err() {
            self.closed = true;
        }
        Ok(r?)
    }

    /// The next message from the DN; end of stream is an error.
    async fn next(&mut self) -> Result<backend::Message, WireError> {
        loop {
            match backend::Message::parse(&mut self.read) {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => {
                    self.closed = true;
                    return Err(e.into());
                }
            }
            match self.stream.read_buf(&mut self.read).await {
                Ok(0) => {
                    self.closed = true;
                    return Err(WireError::Lost("the DN closed the connection".into()));
                }
                Ok(_) => {}
                Err(e) => {
                    self.closed = true;
                    return Err(e.into());
                }
            }
        }
    }

    fn check_usable(&self) -> Result<(), WireError> {
        if self.closed {
            Err(WireError::Lost("the connection is closed".into()))
        } else if self.busy {
            Err(WireError::Lost(
                "the connection was left in the middle of a reply".into(),
            ))
        } else {
            Ok(())
        }
    }

    /// Ends an open COPY FROM STDIN that nobody finished (its COPY failed on the CN's
    /// side): CopyFail, and the DN's error for it is read and dropped.
    async fn abort_copy(&mut self) -> Result<(), WireError> {
        if !self.copying {
            return Ok(());
        }
        frontend::copy_fail(
            "COPY from stdin aborted by the coordinator",
            &mut self.write,
        )?;
        self.copying = false;
        self.busy = true;
        self.flush().await?;
        let _ = self.read_reply(false).await?;
        Ok(())
    }

    /// Runs a query string (simple protocol).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Reply, WireError> {
        self.check_usable()?;
        self.abort_copy().await?;
        frontend::query(sql, &mut self.write)?;
        self.busy = true;
        self.flush().await?;
        match self.read_reply(false).await? {
            ReplyEnd::Ready(r) => Ok(r),
            ReplyEnd::CopyIn => Err(self.unexpected("CopyInResponse")),
        }
    }

    /// Runs `sql` (`$n` parameters, types `types`, 0: the DN infers) with `values` in
    /// text format as a named statement of this connection: Parse the first time (under
    /// catalog version `epoch`), then only Bind/Describe/Execute/Sync — one write and
    /// one reply either way.
    pub async fn execute_prepared(
        &mut self,
        sql: &str,
        types: &[u32],
        values: &[Option<String>],
        epoch: u64,
    ) -> Result<Reply, WireError> {
        self.check_usable()?;
        self.abort_copy().await?;
        if !self.prepared.is_empty()
            && (self.prepared_epoch != epoch
                || self.prepared.len() >= MAX_PREPARED && !self.prepared.contains_key(sql))
        {
            self.simple_query("DEALLOCATE ALL").await?;
            self.prepared.clear();
        }
        self.prepared_epoch = epoch;
        let (name, new) = match self.prepared.get(sql) {
            Some(n) => (n.clone(), false),
            None => {
                self.next_statement += 1;
                (format!("mpp_cn_{}", self.next_statement), true)
            }
        };
        if new {
            frontend::parse(&name, sql, types.iter().copied(), &mut self.write)?;
        }
        frontend::bind(
            "",
            &name,
            std::iter::empty(),
            values,
            |v, buf| match v {
                Some(text) => {
                    buf.extend_from_slice(text.as_bytes());
                    Ok(postgres_protocol::IsNull::No)
                }
                None => Ok(postgres_protocol::IsNull::Yes),
            },
            std::iter::empty(),
            &mut self.write,
        )
        .map_err(|_| WireError::Lost("a parameter value too long for a Bind message".into()))?;
        frontend::describe(b'P', "", &mut self.write)?;
        frontend::execute("", 0, &mut self.write)?;
        frontend::sync(&mut self.write);
        self.busy = true;
        self.flush().await?;
        let reply = self.read_reply(false).await;
        if new && self.parsed {
            self.prepared.insert(sql.to_owned(), name);
        }
        match reply {
            Ok(ReplyEnd::Ready(r)) => Ok(r),
            Ok(ReplyEnd::CopyIn) => Err(self.unexpected("CopyInResponse")),
            Err(e) => {
                // Our statements are gone from the backend (the CN answers a client's
                // DEALLOCATE itself, so nothing of ours should do this): make them anew
                // next time.
                if matches!(&e, WireError::Server { code, .. } if code == "26000") {
                    self.prepared.clear();
                }
                Err(e)
            }
        }
    }

    /// Starts COPY … FROM STDIN; then [`Self::copy_data`] and [`Self::copy_finish`].
    pub async fn copy_in(&mut self, sql: &str) -> Result<(), WireError> {
        self.check_usable()?;
        self.abort_copy().await?;
        frontend::query(sql, &mut self.write)?;
        self.busy = true;
        self.flush().await?;
        match self.read_reply(true).await? {
            ReplyEnd::CopyIn => {
                self.copying = true;
                Ok(())
            }
            ReplyEnd::Ready(_) => Err(self.unexpected("a reply without CopyInResponse")),
        }
    }

    /// Sends rows of an open COPY (the DN reports bad rows at the finish).
    pub async fn copy_data(&mut self, data: &[u8]) -> Result<(), WireError> {
        if !self.copying || self.closed {
            return Err(WireError::Lost("no COPY is open on the connection".into()));
        }
        frontend::CopyData::new(data)?.write(&mut self.write);
        self.flush().await
    }

    /// Ends an open COPY; returns the number of rows the DN copied.
    pub async fn copy_finish(&mut self) -> Result<u64, WireError> {
        if !self.copying || self.closed {
            return Err(WireError::Lost("no COPY is open on the connection".into()));
        }
        frontend::copy_done(&mut self.write);
        self.copying = false;
        self.flush().await?;
        match self.read_reply(false).await? {
            ReplyEnd::Ready(r) => Ok(r.count),
            ReplyEnd::CopyIn => Err(self.unexpected("CopyInResponse")),
        }
    }

    /// Parameter types and result columns of `sql` (an unnamed statement, Parse and
    /// Describe; nothing runs).
    pub async fn describe(&mut self, sql: &str, params: &[u32]) -> Result<Description, WireError> {
        self.check_usable()?;
        self.abort_copy().await?;
        frontend::parse("", sql, params.iter().copied(), &mut self.write)?;
        frontend::describe(b'S', "", &mut self.write)?;
        frontend::sync(&mut self.write);
        self.busy = true;
        self.flush().await?;
        let mut d = Description::default();
        let mut error = None;
        while let Some(m) = self.next_own(&mut error).await? {
            match m {
                backend::Message::ParseComplete | backend::Message::NoData => {}
                backend::Message::ParameterDescription(p) => {
                    d.params = p.parameters().collect()?;
                }
                backend::Message::RowDescription(r) => d.columns = columns(&r)?,
                _ => return Err(self.unexpected("a message outside Describe's reply")),
            }
        }
        self.busy = false;
        match error {
            Some(e) => Err(e),
            None => Ok(d),
        }
    }

    /// Reads a simple query's reply up to ReadyForQuery (or, `copy`, to CopyInResponse).
    /// The first error is returned after ReadyForQuery; a FATAL one at once.
    async fn read_reply(&mut self, copy: bool) -> Result<ReplyEnd, WireError> {
        let mut r = Reply::default();
        let mut error = None;
        self.parsed = false;
        while let Some(m) = self.next_own(&mut error).await? {
            match m {
                backend::Message::ParseComplete => self.parsed = true,
                backend::Message::BindComplete | backend::Message::NoData => {}
                backend::Message::RowDescription(d) => {
                    r.columns = Some(columns(&d)?);
                    r.rows.clear();
                }
                backend::Message::DataRow(row) => {
                    let buf = row.buffer();
                    let mut out = Vec::with_capacity(r.columns.as_ref().map_or(1, Vec::len));
                    let mut ranges = row.ranges();
                    while let Some(range) = ranges.next()? {
                        out.push(range.map(|rg| text(&buf[rg])));
                    }
                    r.rows.push(out);
                }
                backend::Message::CommandComplete(c) => {
                    let tag = c.tag()?;
                    r.count = tag
                        .rsplit(' ')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                }
                backend::Message::EmptyQueryResponse => {}
                backend::Message::CopyInResponse(_) => {
                    if copy && error.is_none() {
                        self.busy = false;
                        return Ok(ReplyEnd::CopyIn);
                    }
                    // A COPY nobody asked for: refuse it; the DN then answers an
                    // error and ReadyForQuery.
                    frontend::copy_fail("unexpected COPY FROM STDIN", &mut self.write)?;
                    self.flush().await?;
                }
                _ => return Err(self.unexpected("a message outside a simple query's reply")),
            }
        }
        self.busy = false;
        match error {
            Some(e) => Err(e),
            None => Ok(ReplyEnd::Ready(r)),
        }
    }

    /// The next message of a reply that is the reader's own, after those every reply
    /// may carry ([`Self::on_any_reply`]); None once ReadyForQuery ends the reply.
    async fn next_own(
        &mut self,
        error: &mut Option<WireError>,
    ) -> Result<Option<backend::Message>, WireError> {
        loop {
            let m = self.next().await?;
            match self.on_any_reply(&m, error)? {
                Reading::Done => return Ok(None),
                Reading::Taken => {}
                Reading::Yours => return Ok(Some(m)),
            }
        }
    }

    /// What every reply may carry, the same in each reader: the first error is kept for
    /// the end of the reply (a FATAL one ends the connection at once), notices and
    /// parameter changes are skipped, ReadyForQuery ends the reply.
    fn on_any_reply(
        &mut self,
        m: &backend::Message,
        error: &mut Option<WireError>,
    ) -> Result<Reading, WireError> {
        match m {
            backend::Message::ErrorResponse(e) => {
                let e = server_error(e);
                if self.is_fatal(&e) {
                    return Err(e);
                }
                error.get_or_insert(e);
                Ok(Reading::Taken)
            }
            backend::Message::ReadyForQuery(_) => Ok(Reading::Done),
            backend::Message::NoticeResponse(_)
            | backend::Message::ParameterStatus(_)
            | backend::Message::NotificationResponse(_) => Ok(Reading::Taken),
            _ => Ok(Reading::Yours),
        }
    }

    /// A FATAL error ends the DN backend: the connection is done.
    fn is_fatal(&mut self, e: &WireError) -> bool {
        let fatal = matches!(e, WireError::Server { fatal: true, .. });
        if fatal {
            self.closed = true;
        }
        fatal
    }

    fn unexpected(&mut self, what: &str) -> WireError {
        self.closed = true;
        WireError::Lost(format!("protocol error: the DN sent {what}"))
    }

    /// Says goodbye (Terminate) so the DN backend ends at once, not at its next read.
    pub async fn close(mut self) {
        if self.closed {
            return;
        }
        frontend::terminate(&mut self.write);
        let _ = self.stream.write_all(&self.write).await;
    }
}

/// What [`WireConn::on_any_reply`] made of a message.
enum Reading {
    /// ReadyForQuery: the reply is over.
    Done,
    /// Handled (an error kept, a notice skipped).
    Taken,
    /// The reader's own message.
    Yours,
}

enum ReplyEnd {
    Ready(Reply),
    CopyIn,
}

fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

fn columns(d: &backend::RowDescriptionBody) -> Result<Vec<Column>, WireError> {
    let mut out = Vec::new();
    let mut fields = d.fields();
    while let Some(f) = fields.next()? {
        out.push(Column {
            name: f.name().to_owned(),
            type_oid: f.type_oid(),
            type_size: f.type_size(),
            type_modifier: f.type_modifier(),
        });
    }
    Ok(out)
}

fn server_error(body: &backend::ErrorResponseBody) -> WireError {
    let mut code = String::new();
    let mut message = String::new();
    let mut detail = None;
    let mut severity = String::new();
    let mut localized_severity = String::new();
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        let value = text(f.value_bytes());
        match f.type_() {
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = Some(value),
            b'V' => severity = value,
            b'S' => localized_severity = value,
            _ => {}
        }
    }
    if severity.is_empty() {
        severity = localized_severity;
    }
    WireError::Server {
        code,
        message,
        detail,
        fatal: severity == "FATAL" || severity == "PANIC",
    }
}
