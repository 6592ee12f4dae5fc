//! Connections to DN primaries: a pool per group (keyed by the primary's address, so a
//! failover drops the old primary's connections), and running text-protocol statements
//! that come back as rows of PostgreSQL text with the DN's column types.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgwire::api::results::{FieldFormat, FieldInfo};
use pgwire::api::Type;

use crate::cancel::InFlight;
use crate::dn_wire::{CancelKey, Login, WireConn, WireError};
use crate::merge::Row;

pub use crate::dn_wire::{Column, Description};

/// Where a group's primary is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub group: String,
    pub host: String,
    pub port: u16,
    /// False while the group has no writable primary (failover in progress).
    pub available: bool,
}

/// An error from a DN or from reaching it, with the SQLSTATE the client should see.
#[derive(Debug, Clone)]
pub struct DnError {
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
}

impl DnError {
    pub fn new(code: &str, message: impl Into<String>) -> DnError {
        DnError {
            code: code.to_owned(),
            message: message.into(),
            detail: None,
        }
    }

    pub fn from_wire(group: &str, e: WireError) -> DnError {
        match e {
            // The DN's own SQLSTATE and message, unchanged.
            WireError::Server {
                code,
                message,
                detail,
                ..
            } => DnError {
                code,
                message,
                detail,
            },
            WireError::Lost(e) => DnError {
                // connection_failure: the client may retry the transaction.
                code: "08006".into(),
                message: format!("lost the connection to DN group {group}: {e}"),
                detail: None,
            },
        }
    }
}

/// SQLSTATE of "no connection to the DN could be made": nothing was sent, so the
/// transaction asking for it surely did not commit there.
pub const UNREACHABLE: &str = "08001";

/// SQLSTATEs of a DN connection ended under the statement: lost (08006, our own), or
/// ended by the DN itself: admin_shutdown (57P01, also "terminating connection due to
/// unexpected postmaster exit" when a DN's postmaster dies) and crash_shutdown (57P02).
/// The DN backend is gone, and its open transaction with it.
pub const CONNECTION_ENDED: [&str; 3] = ["08006", "57P01", "57P02"];

impl DnError {
    /// The error of a transaction that surely did not commit: a connection to a DN could
    /// not be had (nothing was sent), or, `before_commit`, one ended (lost, or ended by
    /// the DN: [`CONNECTION_ENDED`]) before the transaction's commit point. Reported as
    /// 40001 (serialization_failure) so that clients retry it, as pgbench `--max-tries`
    /// does; every other error is unchanged (a connection ended at a commit point keeps
    /// its code: outcome unknown).
    pub fn not_committed(self, before_commit: bool) -> DnError {
        let cut = self.code == UNREACHABLE
            || before_commit && CONNECTION_ENDED.contains(&self.code.as_str());
        if !cut {
            return self;
        }
        DnError {
            code: "40001".into(),
            message: format!(
                "the transaction was cut by a DN failover before its commit and did not commit; retry it ({})",
                self.message
            ),
            detail: self.detail,
        }
    }
}

impl std::fmt::Display for DnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

/// What a statement returned: its columns (if it returned rows), rows, and the row
/// count of its command tag.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub columns: Option<Vec<Column>>,
    pub rows: Vec<Row>,
    pub count: u64,
}

/// A one-group statement of the extended protocol as the client sent it: its text with
/// `$n`, the parameters' type OIDs (0: the DN infers) and values in text format.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub sql: String,
    pub types: Vec<u32>,
    pub values: Vec<Option<String>>,
}

/// A DN connection checked out of the pool.
pub struct DnConn {
    pub group: usize,
    conn: WireConn,
    endpoint: (String, u16),
    /// Session settings were applied: RESET ALL before it goes back to the pool.
    pub dirty: bool,
    pub broken: bool,
    /// Names this connection's DN backend in a cancel request.
    cancel: Arc<CancelKey>,
    /// The statements of the session holding this connection, which a client's cancel
    /// request reaches (None in the pool and during commit).
    pub watch: Option<Arc<InFlight>>,
}

impl DnConn {
    pub async fn run(&mut self, group_name: &str, sql: &str) -> Result<Answer, DnError> {
        let _running = self.watch.as_ref().map(|w| w.enter(self.cancel.clone()));
        let r = self.conn.simple_query(sql).await;
        self.check(group_name, r).map(|r| Answer {
            columns: r.columns,
            rows: r.rows,
            count: r.count,
        })
    }

    /// Runs a statement with `$n` parameters as a named statement of the connection
    /// (prepared on the DN once per connection and catalog version).
    pub async fn run_prepared(
        &mut self,
        group_name: &str,
        p: &Prepared,
        epoch: u64,
    ) -> Result<Answer, DnError> {
        let _running = self.watch.as_ref().map(|w| w.enter(self.cancel.clone()));
        let r = self
            .conn
            .execute_prepared(&p.sql, &p.types, &p.values, epoch)
            .await;
        self.check(group_name, r).map(|r| Answer {
            columns: r.columns,
            rows: r.rows,
            count: r.count,
        })
    }

    /// Starts COPY … FROM STDIN on the connection.
    pub async fn copy_in(&mut self, group_name: &str, sql: &str) -> Result<(), DnError> {
        let _running = self.watch.as_ref().map(|w| w.enter(self.cancel.clone()));
        let r = self.conn.copy_in(sql).await;
        self.check(group_name, r)
    }

    pub async fn copy_data(&mut self, group_name: &str, data: &[u8]) -> Result<(), DnError> {
        let r = self.conn.copy_data(data).await;
        self.check(group_name, r)
    }

    /// Ends the COPY; the number of rows the DN copied.
    pub async fn copy_finish(&mut self, group_name: &str) -> Result<u64, DnError> {
        let _running = self.watch.as_ref().map(|w| w.enter(self.cancel.clone()));
        let r = self.conn.copy_finish().await;
        self.check(group_name, r)
    }

    /// Parameter types and result columns of a statement (nothing runs).
    pub async fn describe(
        &mut self,
        group_name: &str,
        sql: &str,
        params: &[u32],
    ) -> Result<Description, DnError> {
        let r = self.conn.describe(sql, params).await;
        self.check(group_name, r)
    }

    /// A FATAL from the DN (57P01/57P02) or a lost connection ends its backend: never
    /// pool it.
    fn check<T>(&mut self, group_name: &str, r: Result<T, WireError>) -> Result<T, DnError> {
        r.map_err(|e| {
            if !self.conn.is_usable() || matches!(e, WireError::Lost(_)) {
                self.broken = true;
            }
            let e = DnError::from_wire(group_name, e);
            if e.code.starts_with("57P0") {
                self.broken = true;
            }
            e
        })
    }
}

/// The type a DN names by `oid`: a built-in one, else one of the DN's own types (an
/// enum, a domain …) that clients look up by its OID.
pub fn pg_type(oid: u32) -> Type {
    Type::from_oid(oid).unwrap_or_else(|| {
        Type::new(
            format!("oid{oid}"),
            oid,
            postgres_types::Kind::Simple,
            "public".into(),
        )
    })
}

/// A result column for the client, as the DN described it.
pub fn field_info(c: &Column, format: FieldFormat) -> FieldInfo {
    FieldInfo::new(c.name.clone(), None, None, pg_type(c.type_oid), format)
        .with_type_size(c.type_size)
        .with_type_modifier(c.type_modifier)
}

/// Pools of idle connections per group.
pub struct Pool {
    user: String,
    /// The role's password file, read at each new connection (None: no password).
    password_file: Option<std::path::PathBuf>,
    connect_timeout: Duration,
    idle: Mutex<HashMap<usize, Vec<DnConn>>>,
    max_idle: usize,
    /// Unix-domain sockets of the DNs by their TCP address, for those on this host.
    sockets: HashMap<(String, u16), PathBuf>,
}

impl Pool {
    pub fn new(
        user: &str,
        password_file: Option<std::path::PathBuf>,
        connect_timeout: Duration,
        sockets: HashMap<(String, u16), PathBuf>,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            sockets,
            user: user.to_owned(),
            password_file,
            connect_timeout,
            idle: Mutex::new(HashMap::new()),
            max_idle: 64,
        })
    }

    /// A connection to `target` (the group's primary now): an idle one to the same
    /// address, else a new one.
    pub async fn get(&self, group: usize, target: &Target) -> Result<DnConn, DnError> {
        if !target.available {
            return Err(DnError::new(
                UNREACHABLE,
                format!(
                    "DN group {} has no writable primary right now (failover in progress); retry",
                    target.group
                ),
            ));
        }
        let endpoint = (target.host.clone(), target.port);
        let mut stale = Vec::new();
        let found = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let list = idle.entry(group).or_default();
            let mut found = None;
            while let Some(mut c) = list.pop() {
                // A pooled connection the DN closed meanwhile (its shutdown's FATAL,
                // or a restart) is dropped here, not found broken by a statement; one
                // to a former primary is closed.
                if !c.conn.is_idle_and_open() {
                    continue;
                }
                if c.endpoint == endpoint {
                    found = Some(c);
                    break;
                }
                stale.push(c);
            }
            found
        };
        stale.into_iter().for_each(discard);
        if let Some(c) = found {
            return Ok(c);
        }
        let password = match &self.password_file {
            Some(file) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    DnError::new(
                        UNREACHABLE,
                        format!("DN password file {}: {e}", file.display()),
                    )
                })?;
                Some(text.lines().next().unwrap_or("").trim().to_owned())
            }
            None => None,
        };
        let login = Login {
            host: &target.host,
            port: target.port,
            user: &self.user,
            database: "postgres",
            application_name: "mpp-ha-cn",
            password: password.as_deref(),
            socket: self
                .sockets
                .get(&endpoint)
                .map(PathBuf::as_path)
                .filter(|p| p.exists()),
        };
        // The DN's Unix socket when it is on this host; TCP if that socket refuses us
        // (a DN whose pg_hba predates socket logins for the CN's role).
        let connect = async {
            if login.socket.is_some() {
                if let Ok(c) = WireConn::connect(&login).await {
                    return Ok(c);
                }
            }
            WireConn::connect(&Login {
                socket: None,
                ..login
            })
            .await
        };
        let connected = tokio::time::timeout(self.connect_timeout, connect).await;
        let conn = match connected {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                return Err(DnError::new(
                    UNREACHABLE,
                    format!(
                        "cannot connect to DN group {} at {}:{}: {e}",
                        target.group, target.host, target.port
                    ),
                ))
            }
            Err(_) => {
                return Err(DnError::new(
                    UNREACHABLE,
                    format!(
                        "connecting to DN group {} at {}:{} timed out",
                        target.group, target.host, target.port
                    ),
                ))
            }
        };
        Ok(DnConn {
            group,
            cancel: conn.cancel_key(),
            conn,
            endpoint,
            dirty: false,
            broken: false,
            watch: None,
        })
    }

    /// Returns a connection that is outside any transaction.
    pub async fn put(&self, mut c: DnConn) {
        c.watch = None;
        if c.broken || !c.conn.is_usable() {
            return;
        }
        if c.dirty {
            if c.conn.simple_query("RESET ALL").await.is_err() {
                return;
            }
            c.dirty = false;
        }
        let full = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let list = idle.entry(c.group).or_default();
            if list.len() < self.max_idle {
                list.push(c);
                None
            } else {
                Some(c)
            }
        };
        if let Some(c) = full {
            discard(c);
        }
    }
}

/// Ends a connection the pool does not keep with Terminate, so its DN backend ends at
/// once instead of when it next reads (the CN's log and the DN's then agree: no
/// "unexpected EOF on client connection"). In a task of its own, bounded: a former
/// primary may not answer.
fn discard(c: DnConn) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(1), c.conn.close()).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_ended_before_the_commit_point_is_retryable() {
        for code in ["08006", "57P01", "57P02"] {
            let e = DnError::new(
                code,
                "terminating connection due to unexpected postmaster exit",
            )
            .not_committed(true);
            assert_eq!(e.code, "40001", "{code} before the commit point");
            assert!(e.message.contains("did not commit"), "{}", e.message);
            assert!(
                e.message.contains("unexpected postmaster exit"),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn a_connection_ended_at_the_commit_point_keeps_its_code() {
        for code in ["08006", "57P01", "57P02"] {
            let e = DnError::new(code, "gone").not_committed(false);
            assert_eq!(e.code, code, "outcome unknown: never 40001");
        }
    }

    #[test]
    fn unreachable_is_retryable_anywhere_and_other_errors_pass_through() {
        assert_eq!(
            DnError::new(UNREACHABLE, "no primary")
                .not_committed(false)
                .code,
            "40001"
        );
        for code in ["23505", "42P01", "57014", "57P03"] {
            assert_eq!(DnError::new(code, "x").not_committed(true).code, code);
        }
    }
}
