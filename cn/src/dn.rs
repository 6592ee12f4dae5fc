//! Connections to DN primaries: a pool per group (keyed by the primary's address, so a
//! failover drops the old primary's connections), and running text-protocol statements
//! that come back as rows of PostgreSQL text.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::{CancelToken, Client, NoTls, SimpleQueryMessage};

use crate::cancel::InFlight;
use crate::merge::Row;

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

    pub fn from_pg(group: &str, e: &tokio_postgres::Error) -> DnError {
        match e.as_db_error() {
            // The DN's own SQLSTATE and message, unchanged.
            Some(db) => DnError {
                code: db.code().code().to_owned(),
                message: db.message().to_owned(),
                detail: db.detail().map(|d| d.to_owned()),
            },
            None => DnError {
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

/// What a statement returned: column names (if it returned rows), rows, and the row
/// count of its command tag.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub columns: Option<Vec<String>>,
    pub rows: Vec<Row>,
    pub count: u64,
}

/// A DN connection checked out of the pool.
pub struct DnConn {
    pub group: usize,
    pub client: Client,
    endpoint: (String, u16),
    /// Session settings were applied: RESET ALL before it goes back to the pool.
    pub dirty: bool,
    pub broken: bool,
    /// Names this connection's DN backend in a cancel request.
    token: Arc<CancelToken>,
    /// The statements of the session holding this connection, which a client's cancel
    /// request reaches (None in the pool and during commit).
    pub watch: Option<Arc<InFlight>>,
}

impl DnConn {
    pub async fn run(&mut self, group_name: &str, sql: &str) -> Result<Answer, DnError> {
        let _running = self.watch.as_ref().map(|w| w.enter(self.token.clone()));
        match self.client.simple_query(sql).await {
            Ok(msgs) => Ok(answer(msgs)),
            Err(e) => {
                // A FATAL from the DN (57P01/57P02) ends its backend: never pool it.
                if e.as_db_error().is_none()
                    || self.client.is_closed()
                    || e.code().is_some_and(|c| c.code().starts_with("57P0"))
                {
                    self.broken = true;
                }
                Err(DnError::from_pg(group_name, &e))
            }
        }
    }
}

/// Collects a simple-query reply; with several statements the last result wins.
fn answer(msgs: Vec<SimpleQueryMessage>) -> Answer {
    let mut a = Answer::default();
    for m in msgs {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                a.columns = Some(cols.iter().map(|c| c.name().to_owned()).collect());
                a.rows.clear();
            }
            SimpleQueryMessage::Row(r) => {
                if a.columns.is_none() {
                    a.columns = Some(r.columns().iter().map(|c| c.name().to_owned()).collect());
                }
                a.rows.push(
                    (0..r.len())
                        .map(|i| r.get(i).map(|s| s.to_owned()))
                        .collect(),
                );
            }
            SimpleQueryMessage::CommandComplete(n) => a.count = n,
            _ => {}
        }
    }
    a
}

/// Pools of idle connections per group.
pub struct Pool {
    user: String,
    /// The role's password file, read at each new connection (None: no password).
    password_file: Option<std::path::PathBuf>,
    connect_timeout: Duration,
    idle: Mutex<HashMap<usize, Vec<DnConn>>>,
    max_idle: usize,
}

impl Pool {
    pub fn new(
        user: &str,
        password_file: Option<std::path::PathBuf>,
        connect_timeout: Duration,
    ) -> Arc<Pool> {
        Arc::new(Pool {
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
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let list = idle.entry(group).or_default();
            while let Some(c) = list.pop() {
                if c.endpoint == endpoint && !c.client.is_closed() {
                    return Ok(c);
                }
            }
        }
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&target.host)
            .port(target.port)
            .user(&self.user)
            .dbname("postgres")
            .application_name("mpp-ha-cn")
            .connect_timeout(self.connect_timeout);
        if let Some(file) = &self.password_file {
            let password = std::fs::read_to_string(file).map_err(|e| {
                DnError::new(
                    UNREACHABLE,
                    format!("DN password file {}: {e}", file.display()),
                )
            })?;
            cfg.password(password.lines().next().unwrap_or("").trim());
        }
        let connected = tokio::time::timeout(self.connect_timeout, cfg.connect(NoTls)).await;
        let (client, conn) = match connected {
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
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(DnConn {
            group,
            token: Arc::new(client.cancel_token()),
            client,
            endpoint,
            dirty: false,
            broken: false,
            watch: None,
        })
    }

    /// Returns a connection that is outside any transaction.
    pub async fn put(&self, mut c: DnConn) {
        c.watch = None;
        if c.broken || c.client.is_closed() {
            return;
        }
        if c.dirty {
            if c.client.simple_query("RESET ALL").await.is_err() {
                return;
            }
            c.dirty = false;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(c.group).or_default();
        if list.len() < self.max_idle {
            list.push(c);
        }
    }
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
