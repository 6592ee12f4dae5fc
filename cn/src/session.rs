//! One client session: the pgwire handlers (simple and extended query, COPY) on top of
//! the router, the DN pool and the transaction rules.
//!
//! A session holds DN connections only inside a transaction (explicit, or the implicit
//! one of a statement that writes on several groups); a transaction that wrote on
//! several groups commits by two-phase commit with a GTM GXID.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use futures::{Sink, SinkExt, StreamExt};
use pgwire::api::auth::sasl::scram::ScramAuth;
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::{DefaultServerParameterProvider, StartupHandler};
use pgwire::api::cancel::CancelHandler;
use pgwire::api::copy::CopyHandler;
use pgwire::api::portal::{Format, Portal, PortalExecutionState};
use pgwire::api::query::{send_execution_response, ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    CopyResponse, DataRowEncoder, DescribeResponse, FieldFormat, FieldInfo, QueryResponse,
    Response, Tag,
};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::{Entry, PortalStore};
use pgwire::api::{
    ClientInfo, ClientPortalStore, PgWireConnectionState, PgWireServerHandlers, Type, DEFAULT_NAME,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::data::{DataRow, NoData, ParameterDescription, RowDescription};
use pgwire::messages::extendedquery::{
    Bind, BindComplete, Close, CloseComplete, Describe, Execute, Parse, ParseComplete,
    PortalSuspended, TARGET_TYPE_BYTE_PORTAL, TARGET_TYPE_BYTE_STATEMENT,
};
use pgwire::messages::response::CommandComplete;
use pgwire::messages::response::EmptyQueryResponse;
use pgwire::messages::startup::{ParameterStatus, SecretKey};
use pgwire::messages::PgWireBackendMessage;
use tokio::sync::Mutex;

use crate::cancel::{Canceller, InFlight};
use crate::dn::{Column, DnConn, DnError, Prepared};
use crate::merge::{self, Row};
use crate::node::Node;
use crate::router::{self, Merge, Plan, SavepointOp};
use crate::sql_text;

/// What one statement produced.
enum Outcome {
    Rows {
        columns: Vec<Column>,
        rows: Vec<Row>,
        tag: String,
    },
    Command(String),
    Begin,
    End(String),
    CopyIn {
        ncolumns: usize,
    },
}

struct Txn {
    /// BEGIN was sent by the client (else: the implicit transaction of one statement).
    explicit: bool,
    conns: BTreeMap<usize, DnConn>,
    wrote: BTreeSet<usize>,
    /// An error happened: only ROLLBACK/COMMIT (and ROLLBACK TO a savepoint) are
    /// accepted. Without savepoints everything is rolled back at once.
    failed: bool,
    /// Open savepoints, oldest first (PostgreSQL's folded names): a group enlisted
    /// later replays them after BEGIN, so that ROLLBACK TO works on every group.
    savepoints: Vec<String>,
}

impl Txn {
    fn new(explicit: bool) -> Txn {
        Txn {
            explicit,
            conns: BTreeMap::new(),
            wrote: BTreeSet::new(),
            failed: false,
            savepoints: Vec::new(),
        }
    }
}

/// A COPY FROM STDIN in progress: it is open on the transaction's connection of each
/// group in `groups`.
struct CopyState {
    buffers: BTreeMap<usize, Vec<u8>>,
    partial: Vec<u8>,
    dist: Option<(usize, crate::catalog::KeyKind)>,
    groups: Vec<usize>,
}

#[derive(Default)]
struct State {
    txn: Option<Txn>,
    /// SET statements of the session, replayed on every DN connection it takes.
    settings: Vec<String>,
    copy: Option<CopyState>,
    /// The statement being executed as the client sent it (extended protocol, one
    /// group by its template): the DN runs it as a named statement of the connection.
    prepared: Option<Prepared>,
    /// What the statements so far leave for the handler to deliver ([`deliver`]).
    owed: Owed,
}

/// What statements leave for the client's side of the session, delivered by the
/// handler once they ran: ParameterStatus messages (a SET of a reported setting), and
/// the prepared statements (with DISCARD ALL also the portals) that DEALLOCATE or
/// DISCARD ALL removed, to drop from pgwire's store.
#[derive(Default)]
struct Owed {
    reports: Vec<(String, String)>,
    forget_statements: Vec<String>,
    forget_portals: bool,
}

pub struct Session {
    node: Arc<Node>,
    state: Mutex<State>,
    parser: Arc<CnParser>,
    /// The DN statements running for this session (what a cancel request reaches).
    inflight: Arc<InFlight>,
    /// This session's BackendKeyData, registered with the node at its first query.
    cancel_key: OnceLock<(i32, SecretKey)>,
    /// Names of the client's named prepared statements (Parse), for DEALLOCATE ALL.
    statements: std::sync::Mutex<BTreeSet<String>>,
}

impl Session {
    pub fn new(node: Arc<Node>) -> Arc<Session> {
        Arc::new(Session {
            parser: Arc::new(CnParser { node: node.clone() }),
            node,
            state: Mutex::new(State::default()),
            inflight: Arc::default(),
            cancel_key: OnceLock::new(),
            statements: Default::default(),
        })
    }

    /// Makes the session reachable by a cancel request naming its BackendKeyData.
    fn register_cancel<C: ClientInfo>(&self, client: &C) {
        if self.cancel_key.get().is_none() {
            let (pid, secret) = client.pid_and_secret_key();
            self.node.cancels.register(pid, &secret, &self.inflight);
            let _ = self.cancel_key.set((pid, secret));
        }
    }
}

/// The pgwire handler set of one connection.
pub struct Handlers {
    pub session: Arc<Session>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.session.clone()
    }
    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.session.clone()
    }
    fn copy_handler(&self) -> Arc<impl CopyHandler> {
        self.session.clone()
    }
    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        Arc::new(Canceller {
            registry: self.session.node.cancels.clone(),
        })
    }
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        let mut params = DefaultServerParameterProvider::default();
        params.server_version = "15.0 (mpp-ha cn)".into();
        params.date_style = "ISO, MDY".into();
        let mut scram = ScramAuth::new(self.session.node.auth.clone());
        scram.set_iterations(crate::node::SCRAM_ITERATIONS);
        Arc::new(
            SASLAuthStartupHandler::new(Arc::new(params))
                .with_scram(scram)
                .with_pid_secret_key_generator(self.session.node.cancels.clone()),
        )
    }
}

pub fn user_error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message.into(),
    )))
}

fn dn_error(e: DnError) -> PgWireError {
    let mut info = ErrorInfo::new("ERROR".into(), e.code, e.message);
    info.detail = e.detail;
    PgWireError::UserError(Box::new(info))
}

fn error_response(e: DnError) -> Response {
    let mut info = ErrorInfo::new("ERROR".into(), e.code, e.message);
    info.detail = e.detail;
    Response::Error(Box::new(info))
}

impl Session {
    fn group_name(&self, g: usize) -> String {
        self.node
            .catalog_read()
            .groups
            .get(g)
            .cloned()
            .unwrap_or_else(|| format!("#{g}"))
    }

    /// A DN connection for group `g` with the session's settings applied.
    async fn checkout(&self, st: &State, g: usize) -> Result<DnConn, DnError> {
        let target = self.node.target(g)?;
        let mut c = self.node.pool.get(g, &target).await?;
        c.watch = Some(self.inflight.clone());
        if !st.settings.is_empty() {
            c.run(&target.group, &st.settings.join("; ")).await?;
            c.dirty = true;
        }
        Ok(c)
    }

    /// Makes sure the transaction holds a connection (with BEGIN sent) on each group.
    async fn enlist(&self, st: &mut State, groups: &[usize]) -> Result<(), DnError> {
        for &g in groups {
            let has = st.txn.as_ref().is_some_and(|t| t.conns.contains_key(&g));
            if has {
                continue;
            }
            let mut c = self.checkout(st, g).await?;
            let mut begin = String::from("BEGIN");
            for sp in st.txn.iter().flat_map(|t| t.savepoints.iter()) {
                begin.push_str("; SAVEPOINT ");
                begin.push_str(&sql_text::quote_ident(sp));
            }
            c.run(&self.group_name(g), &begin).await?;
            if let Some(t) = st.txn.as_mut() {
                t.conns.insert(g, c);
            }
        }
        Ok(())
    }

    /// Runs `sql_per_group` inside the session's transaction, in parallel.
    async fn run_in_txn(
        &self,
        st: &mut State,
        work: Vec<(usize, String)>,
        write: bool,
    ) -> Result<Vec<crate::dn::Answer>, DnError> {
        let prepared = st.prepared.take().filter(|_| work.len() == 1);
        let epoch = self.node.catalog_read().version;
        let groups: Vec<usize> = work.iter().map(|(g, _)| *g).collect();
        self.enlist(st, &groups).await?;
        let Some(txn) = st.txn.as_mut() else {
            return Err(DnError::new("XX000", "no transaction"));
        };
        if write {
            txn.wrote.extend(groups.iter().copied());
        }
        let mut taken: Vec<(DnConn, String, String)> = Vec::new();
        for (g, sql) in work {
            if let Some(c) = txn.conns.remove(&g) {
                taken.push((c, sql, self.group_name(g)));
            }
        }
        let prepared = prepared.as_ref();
        let results =
            futures::future::join_all(taken.into_iter().map(|(mut c, sql, name)| async move {
                let r = match prepared {
                    Some(p) => c.run_prepared(&name, p, epoch).await,
                    None => c.run(&name, &sql).await,
                };
                (c, r)
            }))
            .await;
        let mut answers = Vec::new();
        let mut first_err = None;
        for (c, r) in results {
            txn.conns.insert(c.group, c);
            match r {
                Ok(a) => answers.push(a),
                Err(e) => {
                    if first_err.is_none() {
                        first_err = Some(e)
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(answers),
        }
    }

    /// Autocommit read: pooled connections, no BEGIN, in parallel.
    async fn run_autocommit(
        &self,
        st: &State,
        work: Vec<(usize, String)>,
        prepared: Option<&Prepared>,
    ) -> Result<Vec<crate::dn::Answer>, DnError> {
        let prepared = prepared.filter(|_| work.len() == 1);
        let epoch = self.node.catalog_read().version;
        let futs = work.into_iter().map(|(g, sql)| async move {
            let mut c = self.checkout(st, g).await?;
            let r = match prepared {
                Some(p) => c.run_prepared(&self.group_name(g), p, epoch).await,
                None => c.run(&self.group_name(g), &sql).await,
            };
            self.node.pool.put(c).await;
            r
        });
        futures::future::join_all(futs).await.into_iter().collect()
    }

    async fn run_work(
        &self,
        st: &mut State,
        work: Vec<(usize, String)>,
        write: bool,
    ) -> Result<Vec<crate::dn::Answer>, DnError> {
        if st.txn.is_some() {
            return self.run_in_txn(st, work, write).await;
        }
        if !write || work.len() == 1 {
            let prepared = st.prepared.take();
            return self.run_autocommit(st, work, prepared.as_ref()).await;
        }
        st.prepared = None;
        // A write on several groups outside BEGIN: its own transaction, 2PC at the end.
        st.txn = Some(Txn::new(false));
        let r = self.run_in_txn(st, work, write).await;
        match r {
            Ok(a) => {
                self.finish_txn(st, true).await?;
                Ok(a)
            }
            Err(e) => {
                let _ = self.finish_txn(st, false).await;
                Err(cut_before_commit(e, true).await)
            }
        }
    }

    /// Ends the transaction: commit (plainly on one written group, by 2PC on several)
    /// or roll back.
    async fn finish_txn(&self, st: &mut State, commit: bool) -> Result<(), DnError> {
        let Some(txn) = st.txn.take() else {
            return Ok(());
        };
        let commit = commit && !txn.failed;
        let mut conns = txn.conns;
        // A cancel request reaches the client's statements, never a commit's steps.
        for c in conns.values_mut() {
            c.watch = None;
        }
        if !commit {
            for (_, mut c) in conns {
                let name = self.group_name(c.group);
                if c.run(&name, "ROLLBACK").await.is_ok() {
                    self.node.pool.put(c).await;
                }
            }
            return Ok(());
        }
        if txn.wrote.len() <= 1 {
            let mut result = Ok(());
            // Readers first, the writer last: its COMMIT is the commit point.
            let writer = txn.wrote.iter().next().copied();
            let mut order: Vec<usize> = conns
                .keys()
                .copied()
                .filter(|g| Some(*g) != writer)
                .collect();
            order.extend(writer);
            for g in order {
                if let Some(mut c) = conns.remove(&g) {
                    let name = self.group_name(g);
                    match c.run(&name, "COMMIT").await {
                        Ok(_) => self.node.pool.put(c).await,
                        Err(e) => result = Err(e),
                    }
                }
            }
            return result;
        }
        // Read-only participants commit plainly; writers by two-phase commit.
        let readers: Vec<usize> = conns
            .keys()
            .copied()
            .filter(|g| !txn.wrote.contains(g))
            .collect();
        for g in readers {
            if let Some(mut c) = conns.remove(&g) {
                let name = self.group_name(g);
                if c.run(&name, "COMMIT").await.is_ok() {
                    self.node.pool.put(c).await;
                }
            }
        }
        let participants: Vec<DnConn> = conns.into_values().collect();
        crate::two_phase::commit_prepared_txn(&self.node, participants).await
    }

    async fn fail_txn(&self, st: &mut State) {
        if let Some(t) = st.txn.as_mut() {
            if t.explicit && !t.savepoints.is_empty() {
                // ROLLBACK TO a savepoint may still rescue the block: keep the DN
                // transactions (the failed ones wait, aborted, for that ROLLBACK TO).
                t.failed = true;
                return;
            }
            if t.explicit {
                // Keep the block open (client must ROLLBACK) but release the DNs now.
                let conns = std::mem::take(&mut t.conns);
                t.failed = true;
                t.wrote.clear();
                for (_, mut c) in conns {
                    let name = self.group_name(c.group);
                    if c.run(&name, "ROLLBACK").await.is_ok() {
                        self.node.pool.put(c).await;
                    }
                }
                return;
            }
        }
        let _ = self.finish_txn(st, false).await;
    }

    /// Runs one planned statement. A DN connection lost (or not to be had) before the
    /// transaction's commit point becomes SQLSTATE 40001: the transaction surely did not
    /// commit, so a client may retry it (pgbench `--max-tries` does); a connection lost
    /// at a commit point keeps 08006 (outcome unknown, never 40001).
    async fn execute(&self, st: &mut State, plan: Plan) -> Result<Outcome, DnError> {
        let before_commit = match &plan {
            Plan::Read { .. }
            | Plan::AnyGroup { .. }
            | Plan::Set { .. }
            | Plan::Deallocate { .. }
            | Plan::Discard { .. }
            | Plan::Savepoint { .. }
            | Plan::CopyIn { .. } => true,
            // Inside a transaction a write is no commit point; in autocommit on one
            // group it is (run_work tells the several-group case itself).
            Plan::Write { .. } | Plan::InsertSplit { .. } => st.txn.is_some(),
            _ => false,
        };
        match self.execute_plan(st, plan).await {
            Ok(o) => Ok(o),
            Err(e) => Err(cut_before_commit(e, before_commit).await),
        }
    }

    async fn execute_plan(&self, st: &mut State, plan: Plan) -> Result<Outcome, DnError> {
        if let Some(t) = &st.txn {
            let rescue = matches!(
                plan,
                Plan::Savepoint {
                    op: SavepointOp::RollbackTo(_),
                    ..
                }
            );
            if t.failed && !rescue && !matches!(plan, Plan::Commit | Plan::Rollback) {
                return Err(DnError::new(
                    "25P02",
                    "current transaction is aborted, commands ignored until end of transaction block",
                ));
            }
        }
        match plan {
            Plan::Begin => {
                // BEGIN inside a query string's implicit transaction makes it a block
                // (PostgreSQL does the same: the statements before it belong to it).
                match st.txn.as_mut() {
                    Some(t) => t.explicit = true,
                    None => st.txn = Some(Txn::new(true)),
                }
                Ok(Outcome::Begin)
            }
            Plan::Commit => {
                let failed = st.txn.as_ref().is_some_and(|t| t.failed);
                self.finish_txn(st, true).await?;
                Ok(Outcome::End(
                    if failed { "ROLLBACK" } else { "COMMIT" }.into(),
                ))
            }
            Plan::Rollback => {
                self.finish_txn(st, false).await?;
                Ok(Outcome::End("ROLLBACK".into()))
            }
            Plan::Savepoint { sql, op } => self.savepoint(st, sql, op).await,
            Plan::Set { sql } => {
                // Check it on one DN first (a bad setting is the DN's error), then keep it.
                let mut c = self.checkout(st, 0).await?;
                let mut r = c.run(&self.group_name(0), &sql).await.map(|_| ());
                if r.is_ok() {
                    if let Some(name) = sql_text::reported_setting(&sql) {
                        // The client is told the new value, as PostgreSQL tells it.
                        r = c
                            .run(&self.group_name(0), &format!("SHOW {name}"))
                            .await
                            .map(|a| {
                                let v = a.rows.first().and_then(|r| r.first().cloned());
                                if let Some(Some(v)) = v {
                                    st.owed.reports.push((name.to_owned(), v));
                                }
                            });
                    }
                }
                c.dirty = true;
                self.node.pool.put(c).await;
                r?;
                if let Some(t) = st.txn.as_mut() {
                    for (g, c) in t.conns.iter_mut() {
                        let name = self
                            .node
                            .catalog_read()
                            .groups
                            .get(*g)
                            .cloned()
                            .unwrap_or_default();
                        c.run(&name, &sql).await?;
                        c.dirty = true;
                    }
                }
                let lower = sql.to_ascii_lowercase();
                if !lower.contains(" local ") && !lower.starts_with("set transaction") {
                    st.settings.push(sql);
                }
                Ok(Outcome::Command("SET".into()))
            }
            Plan::Deallocate { name } => self.deallocate(st, name),
            Plan::Discard { all, tag } => {
                if all {
                    self.discard_all(st).await?;
                }
                // DISCARD PLANS / TEMP / SEQUENCES: the session has no such state of its
                // own (no temporary tables; the DN connections' caches are the CN's).
                Ok(Outcome::Command(tag))
            }
            Plan::AnyGroup { sql, tag } => {
                let g = st
                    .txn
                    .as_ref()
                    .and_then(|t| t.conns.keys().next().copied())
                    .unwrap_or(0);
                let mut answers = self.run_work(st, vec![(g, sql)], false).await?;
                let a = answers.pop().unwrap_or_default();
                Ok(rows_outcome(a.columns, a.rows, tag))
            }
            Plan::Read { groups, sql, merge } => {
                let work = groups.iter().map(|g| (*g, sql.clone())).collect();
                let answers = self.run_work(st, work, false).await?;
                let mut columns = answers
                    .iter()
                    .find_map(|a| a.columns.clone())
                    .unwrap_or_default();
                let parts: Vec<Vec<Row>> = answers.into_iter().map(|a| a.rows).collect();
                if let Merge::Aggregate(a) = &merge {
                    columns = merge::aggregate_columns(a, &columns);
                }
                let rows = merge::merge(&merge, parts);
                Ok(rows_outcome(Some(columns), rows, "SELECT"))
            }
            Plan::Write {
                groups,
                sql,
                tag,
                replicated,
            } => {
                let work = groups.iter().map(|g| (*g, sql.clone())).collect();
                let answers = self.run_work(st, work, true).await?;
                let count = if replicated {
                    answers.first().map(|a| a.count).unwrap_or(0)
                } else {
                    answers.iter().map(|a| a.count).sum()
                };
                let returning: Vec<Row> = if replicated {
                    answers.first().map(|a| a.rows.clone()).unwrap_or_default()
                } else {
                    answers.iter().flat_map(|a| a.rows.clone()).collect()
                };
                let columns = answers.iter().find_map(|a| a.columns.clone());
                Ok(write_outcome(tag, count, columns, returning))
            }
            Plan::InsertSplit { parts } => {
                let answers = self.run_work(st, parts, true).await?;
                let count = answers.iter().map(|a| a.count).sum();
                let columns = answers.iter().find_map(|a| a.columns.clone());
                let returning = answers.iter().flat_map(|a| a.rows.clone()).collect();
                Ok(write_outcome("INSERT", count, columns, returning))
            }
            Plan::Ddl { sql, change, tag } => {
                crate::two_phase::run_ddl(&self.node, &sql, change).await?;
                Ok(Outcome::Command(tag))
            }
            Plan::EveryGroupAlone { sql, tag } => {
                if st.txn.is_some() {
                    return Err(DnError::new(
                        "25001",
                        format!("{tag} cannot run inside a transaction block"),
                    ));
                }
                let groups = router::all_groups(&self.node.catalog_read());
                let work = groups.into_iter().map(|g| (g, sql.clone())).collect();
                self.run_autocommit(st, work, None).await?;
                Ok(Outcome::Command(tag))
            }
            Plan::CopyIn {
                sql,
                ncolumns,
                dist,
            } => {
                if st.txn.is_none() {
                    st.txn = Some(Txn::new(false));
                }
                let groups = router::all_groups(&self.node.catalog_read());
                let r = self.start_copy(st, &sql, dist, groups).await;
                if let Err(e) = r {
                    self.fail_txn(st).await;
                    return Err(e);
                }
                Ok(Outcome::CopyIn { ncolumns })
            }
            Plan::Unsupported(msg) => Err(DnError::new("0A000", msg)),
        }
    }

    /// DEALLOCATE: the client's prepared statements are the CN's (pgwire's store).
    fn deallocate(&self, st: &mut State, name: Option<String>) -> Result<Outcome, DnError> {
        let mut statements = self.statements.lock().unwrap_or_else(|p| p.into_inner());
        match name {
            None => {
                st.owed
                    .forget_statements
                    .extend(std::mem::take(&mut *statements));
                Ok(Outcome::Command("DEALLOCATE ALL".into()))
            }
            Some(name) => {
                if !statements.remove(&name) {
                    return Err(DnError::new(
                        "26000",
                        format!("prepared statement \"{name}\" does not exist"),
                    ));
                }
                st.owed.forget_statements.push(name);
                Ok(Outcome::Command("DEALLOCATE".into()))
            }
        }
    }

    /// DISCARD ALL, as PostgreSQL does it for a session: its settings back to the
    /// defaults (the client is told the reported ones' values again), every prepared
    /// statement and portal gone. A pooler's reset query (PgBouncer's
    /// `server_reset_query`, Npgsql's reset on close) sends it.
    async fn discard_all(&self, st: &mut State) -> Result<(), DnError> {
        if st.txn.is_some() {
            return Err(DnError::new(
                "25001",
                "DISCARD ALL cannot run inside a transaction block",
            ));
        }
        let reported: BTreeSet<&'static str> = st
            .settings
            .iter()
            .filter_map(|s| sql_text::reported_setting(s))
            .collect();
        st.settings.clear();
        if !reported.is_empty() {
            let mut c = self.checkout(st, 0).await?;
            let name = self.group_name(0);
            for setting in reported {
                let r = c.run(&name, &format!("SHOW {setting}")).await;
                let v = r.map(|a| a.rows.into_iter().next().and_then(|r| r.into_iter().next()));
                if let Ok(Some(Some(v))) = v {
                    st.owed.reports.push((setting.to_owned(), v));
                }
            }
            self.node.pool.put(c).await;
        }
        self.deallocate(st, None)?;
        st.owed.forget_portals = true;
        Ok(())
    }

    /// SAVEPOINT / RELEASE / ROLLBACK TO on every group the transaction holds, in
    /// parallel; the stack of names is kept for groups enlisted later.
    async fn savepoint(
        &self,
        st: &mut State,
        sql: String,
        op: SavepointOp,
    ) -> Result<Outcome, DnError> {
        let (what, tag) = match &op {
            SavepointOp::Create(_) => ("SAVEPOINT", "SAVEPOINT"),
            SavepointOp::Release(_) => ("RELEASE SAVEPOINT", "RELEASE"),
            SavepointOp::RollbackTo(_) => ("ROLLBACK TO SAVEPOINT", "ROLLBACK"),
        };
        let Some(txn) = st.txn.as_mut().filter(|t| t.explicit) else {
            return Err(DnError::new(
                "25P01",
                format!("{what} can only be used in transaction blocks"),
            ));
        };
        let at = match &op {
            SavepointOp::Create(_) => 0,
            SavepointOp::Release(n) | SavepointOp::RollbackTo(n) => {
                match txn.savepoints.iter().rposition(|s| s == n) {
                    Some(i) => i,
                    None => {
                        return Err(DnError::new(
                            "3B001",
                            format!("savepoint \"{n}\" does not exist"),
                        ))
                    }
                }
            }
        };
        let held: Vec<DnConn> = std::mem::take(&mut txn.conns).into_values().collect();
        let sql = &sql;
        let results = futures::future::join_all(held.into_iter().map(|mut c| async move {
            let name = self.group_name(c.group);
            let r = c.run(&name, sql).await;
            (c, r)
        }))
        .await;
        let mut first_err = None;
        for (c, r) in results {
            txn.conns.insert(c.group, c);
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        match op {
            SavepointOp::Create(n) => txn.savepoints.push(n),
            // RELEASE destroys the savepoint and every later one.
            SavepointOp::Release(_) => txn.savepoints.truncate(at),
            // ROLLBACK TO keeps the savepoint itself, and ends the failed state.
            SavepointOp::RollbackTo(_) => {
                txn.savepoints.truncate(at + 1);
                txn.failed = false;
            }
        }
        Ok(Outcome::Command(tag.into()))
    }

    async fn start_copy(
        &self,
        st: &mut State,
        sql: &str,
        dist: Option<(usize, crate::catalog::KeyKind)>,
        groups: Vec<usize>,
    ) -> Result<(), DnError> {
        self.enlist(st, &groups).await?;
        let Some(txn) = st.txn.as_mut() else {
            return Err(DnError::new("XX000", "no transaction"));
        };
        for &g in &groups {
            txn.wrote.insert(g);
            let Some(c) = txn.conns.get_mut(&g) else {
                continue;
            };
            c.copy_in(&self.group_name(g), sql).await?;
        }
        st.copy = Some(CopyState {
            buffers: BTreeMap::new(),
            partial: Vec::new(),
            dist,
            groups,
        });
        Ok(())
    }

    /// Plans and runs a query string; returns one response per statement and what the
    /// statements left for the handler to deliver.
    async fn run_query(&self, sql: &str) -> (Vec<Response>, Owed) {
        let mut st = self.state.lock().await;
        let statements = sql_text::split_statements(sql);
        if statements.len() > 1 {
            let out = self.run_statements(&mut st, &statements).await;
            return (out, std::mem::take(&mut st.owed));
        }
        let in_txn = st.txn.as_ref().is_some_and(|t| t.explicit);
        let (plans, prepared) = {
            let catalog = self.node.catalog_read();
            self.node.plans.plan_simple(sql, &catalog, in_txn)
        };
        let mut out = Vec::new();
        for plan in plans {
            let r = match prepared.as_ref().filter(|_| st.txn.is_none()) {
                Some(p) => self.execute_simple_prepared(&mut st, plan, p).await,
                None => self.execute(&mut st, plan).await,
            };
            match r {
                Ok(o) => {
                    let stop = matches!(o, Outcome::CopyIn { .. });
                    out.push(to_response(o, None));
                    if stop {
                        break;
                    }
                }
                Err(e) => {
                    self.fail_txn(&mut st).await;
                    out.push(error_response(e));
                    break;
                }
            }
        }
        (out, std::mem::take(&mut st.owed))
    }

    /// A one-group autocommit statement of the simple protocol, run on the DN as a named
    /// statement of its shape with the literals as parameters: the DN parses and plans
    /// the shape once per connection instead of at every run (what makes `pgbench -S`
    /// through a CN cheaper on the DN than on a plain PostgreSQL). If the DN refuses to
    /// prepare the shape (class 42: a literal where its grammar takes no parameter, a
    /// parameter whose type it cannot tell), nothing ran: the text runs instead, and
    /// the shape is not tried again.
    async fn execute_simple_prepared(
        &self,
        st: &mut State,
        plan: Plan,
        prepared: &Prepared,
    ) -> Result<Outcome, DnError> {
        st.prepared = Some(prepared.clone());
        let r = self.execute(st, plan.clone()).await;
        st.prepared = None;
        match r {
            Err(e) if e.code.starts_with("42") => {
                self.node.plans.refuse_shape(&prepared.sql);
                self.execute(st, plan).await
            }
            r => r,
        }
    }

    /// A query string of several statements, as PostgreSQL runs one: each statement is
    /// planned just before it runs (an earlier one may create what a later one names);
    /// all of them run in one implicit transaction unless the string has its own
    /// BEGIN/COMMIT; the first error rolls the implicit transaction back and skips the
    /// rest. DDL cannot join a DN transaction (it commits by its own two-phase commit),
    /// so the implicit transaction so far commits before a DDL statement and a new one
    /// starts after it.
    async fn run_statements(&self, st: &mut State, statements: &[&str]) -> Vec<Response> {
        let mut out = Vec::new();
        for text in statements {
            if st.txn.is_none() {
                st.txn = Some(Txn::new(false));
            }
            let in_txn = st.txn.as_ref().is_some_and(|t| t.explicit);
            let plans = {
                let catalog = self.node.catalog_read();
                self.node.plans.plan_simple(text, &catalog, in_txn).0
            };
            for plan in plans {
                let implicit = st.txn.as_ref().is_some_and(|t| !t.explicit);
                let r = if implicit && matches!(plan, Plan::Ddl { .. }) {
                    match self.finish_txn(st, true).await {
                        Ok(()) => self.execute(st, plan).await,
                        Err(e) => Err(e),
                    }
                } else {
                    self.execute(st, plan).await
                };
                match r {
                    Ok(o) => {
                        let copy = matches!(o, Outcome::CopyIn { .. });
                        out.push(to_response(o, None));
                        if copy {
                            // COPY ends the string (as in PostgreSQL, the client's data
                            // follows); its implicit transaction ends with the COPY.
                            return out;
                        }
                    }
                    Err(e) => {
                        self.fail_txn(st).await;
                        out.push(error_response(e));
                        return out;
                    }
                }
            }
        }
        if st.txn.as_ref().is_some_and(|t| !t.explicit) {
            if let Err(e) = self.finish_txn(st, true).await {
                out.push(error_response(e));
            }
        }
        out
    }
}

/// [`DnError::not_committed`], after a short pause when the DN was unreachable: a
/// failover takes seconds, and a client retrying at once would only spin.
async fn cut_before_commit(e: DnError, before_commit: bool) -> DnError {
    if e.code == crate::dn::UNREACHABLE {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    e.not_committed(before_commit)
}

fn rows_outcome(columns: Option<Vec<Column>>, rows: Vec<Row>, tag: &str) -> Outcome {
    match columns {
        Some(columns) => Outcome::Rows {
            tag: if tag == "SELECT" {
                format!("SELECT {}", rows.len())
            } else {
                tag.to_owned()
            },
            columns,
            rows,
        },
        None => Outcome::Command(tag.to_owned()),
    }
}

fn write_outcome(tag: &str, count: u64, columns: Option<Vec<Column>>, rows: Vec<Row>) -> Outcome {
    let tag = match tag {
        "INSERT" => format!("INSERT 0 {count}"),
        "TRUNCATE TABLE" => "TRUNCATE TABLE".into(),
        t => format!("{t} {count}"),
    };
    match columns {
        Some(columns) if !columns.is_empty() => Outcome::Rows { columns, rows, tag },
        _ => Outcome::Command(tag),
    }
}

/// Encodes text values for the client: text as is; binary for the common types.
fn encode_rows(fields: Arc<Vec<FieldInfo>>, rows: Vec<Row>) -> Vec<PgWireResult<DataRow>> {
    let mut enc = DataRowEncoder::new(fields.clone());
    rows.into_iter()
        .map(|row| {
            for (i, v) in row.iter().enumerate() {
                let Some(f) = fields.get(i) else { break };
                if f.format() == FieldFormat::Binary {
                    encode_binary(&mut enc, f.datatype(), v.as_deref())?;
                } else {
                    enc.encode_field(v)?;
                }
            }
            Ok(enc.take_row())
        })
        .collect()
}

fn encode_binary(enc: &mut DataRowEncoder, ty: &Type, v: Option<&str>) -> PgWireResult<()> {
    fn parse<T: std::str::FromStr>(v: Option<&str>, ty: &Type) -> PgWireResult<Option<T>> {
        match v {
            None => Ok(None),
            Some(s) => s.parse::<T>().map(Some).map_err(|_| {
                user_error(
                    "22P02",
                    format!("cannot encode {s:?} as binary {}", ty.name()),
                )
            }),
        }
    }
    match *ty {
        Type::INT2 => enc.encode_field(&parse::<i16>(v, ty)?),
        Type::INT4 => enc.encode_field(&parse::<i32>(v, ty)?),
        Type::INT8 => enc.encode_field(&parse::<i64>(v, ty)?),
        Type::OID => enc.encode_field(&parse::<u32>(v, ty)?),
        Type::FLOAT4 => enc.encode_field(&parse::<f32>(v, ty)?),
        Type::FLOAT8 => enc.encode_field(&parse::<f64>(v, ty)?),
        Type::BOOL => enc.encode_field(&v.map(|s| s == "t")),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            enc.encode_field(&v.map(|s| s.to_owned()))
        }
        _ => Err(user_error(
            "0A000",
            format!(
                "binary result format for type {} is not supported by the coordinator; ask for text",
                ty.name()
            ),
        )),
    }
}

fn to_response(o: Outcome, described: Option<(&[FieldInfo], &Format)>) -> Response {
    match o {
        Outcome::Rows { columns, rows, tag } => {
            let fields: Vec<FieldInfo> = match described {
                Some((fields, format)) if fields.len() == columns.len() => fields
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        FieldInfo::new(
                            f.name().to_owned(),
                            None,
                            None,
                            f.datatype().clone(),
                            format.format_for(i),
                        )
                    })
                    .collect(),
                // The simple protocol: the DN's own column types (text format).
                _ => columns
                    .iter()
                    .map(|c| crate::dn::field_info(c, FieldFormat::Text))
                    .collect(),
            };
            let fields = Arc::new(fields);
            let data = encode_rows(fields.clone(), rows);
            let mut qr = QueryResponse::new(fields, futures::stream::iter(data));
            // pgwire appends the number of rows it sent.
            let head = match tag.rsplit_once(' ') {
                Some((h, n)) if n.chars().all(|c| c.is_ascii_digit()) => h.to_owned(),
                _ => tag.clone(),
            };
            qr.set_command_tag(&head);
            Response::Query(qr)
        }
        Outcome::Command(tag) => Response::Execution(tag_of(&tag)),
        Outcome::Begin => Response::TransactionStart(Tag::new("BEGIN")),
        Outcome::End(tag) => Response::TransactionEnd(Tag::new(&tag)),
        Outcome::CopyIn { ncolumns } => {
            Response::CopyIn(CopyResponse::new(0, ncolumns, futures::stream::empty()))
        }
    }
}

/// A command tag, with its row count split off so pgwire prints it as PostgreSQL does.
fn tag_of(tag: &str) -> Tag {
    match tag.rsplit_once(' ') {
        Some((head, n)) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => {
            let rows = n.parse().unwrap_or(0);
            if let Some(cmd) = head.strip_suffix(" 0").filter(|h| *h == "INSERT") {
                Tag::new(cmd).with_oid(0).with_rows(rows)
            } else {
                Tag::new(head).with_rows(rows)
            }
        }
        _ => Tag::new(tag),
    }
}

#[async_trait]
impl SimpleQueryHandler for Session {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if !self.node.is_accepting() {
            return Err(user_error(
                "57P03",
                "the coordinator is not accepting clients yet (catalog not up to date)",
            ));
        }
        self.register_cancel(client);
        let (responses, owed) = self.run_query(query).await;
        deliver(client, owed).await?;
        Ok(responses)
    }
}

/// A statement of the extended protocol: its text and what a DN says about it.
#[derive(Debug, Clone)]
pub struct CnStatement {
    pub sql: String,
    pub param_types: Vec<Type>,
    pub fields: Vec<FieldInfo>,
}

pub struct CnParser {
    node: Arc<Node>,
}

#[async_trait]
impl QueryParser for CnParser {
    type Statement = CnStatement;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Option<CnStatement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let given: Vec<Type> = types
            .iter()
            .map(|t| t.clone().unwrap_or(Type::UNKNOWN))
            .collect();
        let (param_types, fields) = self.node.describe(sql, &given).await;
        Ok(Some(CnStatement {
            sql: sql.to_owned(),
            param_types,
            fields,
        }))
    }

    fn get_parameter_types(&self, stmt: &CnStatement) -> PgWireResult<Vec<Type>> {
        Ok(stmt.param_types.clone())
    }

    fn get_result_schema(
        &self,
        stmt: &CnStatement,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(stmt
            .fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                FieldInfo::new(
                    f.name().to_owned(),
                    None,
                    None,
                    f.datatype().clone(),
                    format.map(|x| x.format_for(i)).unwrap_or(FieldFormat::Text),
                )
            })
            .collect())
    }
}

/// A bound parameter's text (None: NULL) and the SQL literal that stands for it.
fn param_literal(
    portal: &Portal<CnStatement>,
    i: usize,
    ty: &Type,
) -> PgWireResult<(Option<String>, String)> {
    macro_rules! get {
        ($t:ty) => {
            portal.parameter::<$t>(i, ty)?.map(|v| v.to_string())
        };
    }
    let text: Option<String> = match *ty {
        Type::INT2 => get!(i16),
        Type::INT4 => get!(i32),
        Type::INT8 => get!(i64),
        Type::FLOAT4 => get!(f32),
        Type::FLOAT8 => get!(f64),
        Type::BOOL => get!(bool),
        Type::OID => get!(u32),
        _ => {
            if portal.parameter_format.is_binary(i) {
                match portal.parameter::<String>(i, &Type::TEXT) {
                    Ok(v) => v,
                    Err(_) => {
                        return Err(user_error(
                            "0A000",
                            format!(
                                "binary parameter of type {} is not supported by the coordinator; send it as text",
                                ty.name()
                            ),
                        ))
                    }
                }
            } else {
                portal
                    .parameters
                    .get(i)
                    .and_then(|p| p.as_ref())
                    .map(|b| String::from_utf8_lossy(b).into_owned())
            }
        }
    };
    let literal = match &text {
        None => "NULL".to_owned(),
        Some(t) => {
            let quoted = format!("'{}'", t.replace('\'', "''"));
            if *ty == Type::UNKNOWN || *ty == Type::TEXT || *ty == Type::VARCHAR {
                quoted
            } else {
                format!("{quoted}::{}", ty.name())
            }
        }
    };
    Ok((text, literal))
}

#[async_trait]
impl ExtendedQueryHandler for Session {
    type Statement = CnStatement;
    type QueryParser = CnParser;

    fn query_parser(&self) -> Arc<CnParser> {
        self.parser.clone()
    }

    // The handlers below are pgwire's defaults with `feed` where those `send`: like a
    // PostgreSQL backend, the CN writes the replies of an extended-protocol round trip
    // once, at Sync (or Flush), instead of one `sendto` per ParseComplete, BindComplete,
    // RowDescription and CommandComplete (each also woke the client for a partial read).

    async fn on_parse<C>(&self, client: &mut C, message: Parse) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = CnStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if let Some(name) = message.name.as_deref().filter(|n| !n.is_empty()) {
            let mut statements = self.statements.lock().unwrap_or_else(|p| p.into_inner());
            statements.insert(name.to_owned());
        }
        match StoredStatement::parse(client, &message, self.parser.clone()).await? {
            Some(stmt) => client.portal_store().put_statement(Arc::new(stmt)),
            None => {
                let name = message.name.as_deref().unwrap_or(DEFAULT_NAME);
                client.portal_store().put_empty_statement(name)
            }
        }
        client
            .feed(PgWireBackendMessage::ParseComplete(ParseComplete::new()))
            .await?;
        Ok(())
    }

    async fn on_bind<C>(&self, client: &mut C, message: Bind) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = CnStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statement_name = message.statement_name.as_deref().unwrap_or(DEFAULT_NAME);
        match client.portal_store().get_statement(statement_name) {
            Some(Entry::Value(statement)) => {
                let portal = Portal::try_new(&message, statement)?;
                client.portal_store().put_portal(Arc::new(portal));
            }
            Some(Entry::Empty) => {
                if !message.parameters.is_empty() {
                    return Err(user_error(
                        "08P01",
                        format!(
                            "bind message supplies {} parameters, but prepared statement {:?} requires 0",
                            message.parameters.len(),
                            statement_name
                        ),
                    ));
                }
                let portal_name = message.portal_name.as_deref().unwrap_or(DEFAULT_NAME);
                client.portal_store().put_empty_portal(portal_name);
            }
            None => return Err(PgWireError::StatementNotFound(statement_name.to_owned())),
        }
        client
            .feed(PgWireBackendMessage::BindComplete(BindComplete::new()))
            .await?;
        Ok(())
    }

    async fn on_describe<C>(&self, client: &mut C, message: Describe) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = CnStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let name = message.name.as_deref().unwrap_or(DEFAULT_NAME);
        let (params, fields): (Option<Vec<Type>>, Option<Vec<FieldInfo>>) =
            match message.target_type {
                TARGET_TYPE_BYTE_STATEMENT => match client.portal_store().get_statement(name) {
                    Some(Entry::Value(stmt)) => {
                        let d = self.do_describe_statement(client, &stmt).await?;
                        let params = d.parameters().map(|p| p.to_vec());
                        (params, (!d.is_no_data()).then(|| d.fields().to_vec()))
                    }
                    Some(Entry::Empty) => (Some(Vec::new()), None),
                    None => return Err(PgWireError::StatementNotFound(name.to_owned())),
                },
                TARGET_TYPE_BYTE_PORTAL => match client.portal_store().get_portal(name) {
                    Some(Entry::Value(portal)) => {
                        let d = self.do_describe_portal(client, &portal).await?;
                        (None, (!d.is_no_data()).then(|| d.fields().to_vec()))
                    }
                    Some(Entry::Empty) => (None, None),
                    None => return Err(PgWireError::PortalNotFound(name.to_owned())),
                },
                other => return Err(PgWireError::InvalidTargetType(other)),
            };
        if let Some(params) = params {
            client
                .feed(PgWireBackendMessage::ParameterDescription(
                    ParameterDescription::new(params.iter().map(|t| t.oid()).collect()),
                ))
                .await?;
        }
        match fields {
            Some(fields) => {
                client
                    .feed(PgWireBackendMessage::RowDescription(RowDescription::new(
                        fields.iter().map(Into::into).collect(),
                    )))
                    .await?
            }
            None => {
                client
                    .feed(PgWireBackendMessage::NoData(NoData::new()))
                    .await?
            }
        }
        Ok(())
    }

    async fn on_execute<C>(&self, client: &mut C, message: Execute) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = CnStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if !matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
            return Err(PgWireError::NotReadyForQuery);
        }
        let mut transaction_status = client.transaction_status();
        client.set_state(PgWireConnectionState::QueryInProgress);
        let portal_name = message.name.as_deref().unwrap_or(DEFAULT_NAME);
        let max_rows = usize::try_from(message.max_rows.max(0)).unwrap_or(0);
        let portal = match client.portal_store().get_portal(portal_name) {
            Some(Entry::Value(portal)) => portal,
            Some(Entry::Empty) => {
                client
                    .feed(PgWireBackendMessage::EmptyQueryResponse(
                        EmptyQueryResponse::new(),
                    ))
                    .await?;
                client.set_state(PgWireConnectionState::ReadyForQuery);
                return Ok(());
            }
            None => return Err(PgWireError::PortalNotFound(portal_name.to_owned())),
        };
        let initial = matches!(*portal.state().lock().await, PortalExecutionState::Initial);
        let needs_fetch = if initial {
            let handle = client
                .session_extensions()
                .get::<Arc<pgwire::api::ConnectionHandle>>();
            let resp = match handle {
                Some(h) => {
                    let cancel_rx = h.start_query().await;
                    let query =
                        ExtendedQueryHandler::do_query(self, client, portal.as_ref(), max_rows);
                    match futures::future::select(query, cancel_rx).await {
                        futures::future::Either::Left((r, _)) => r,
                        futures::future::Either::Right(_) => Err(PgWireError::QueryCanceled),
                    }
                }
                None => {
                    ExtendedQueryHandler::do_query(self, client, portal.as_ref(), max_rows).await
                }
            }?;
            match resp {
                Response::Query(results) => {
                    portal.start(results).await;
                    true
                }
                Response::EmptyQuery => {
                    client
                        .feed(PgWireBackendMessage::EmptyQueryResponse(
                            EmptyQueryResponse::new(),
                        ))
                        .await?;
                    false
                }
                Response::Execution(tag) => {
                    send_execution_response(client, tag).await?;
                    false
                }
                Response::TransactionStart(tag) => {
                    send_execution_response(client, tag).await?;
                    transaction_status = transaction_status.to_in_transaction_state();
                    false
                }
                Response::TransactionEnd(tag) => {
                    send_execution_response(client, tag).await?;
                    transaction_status = transaction_status.to_idle_state();
                    client.portal_store().rm_portal(DEFAULT_NAME);
                    false
                }
                Response::Error(err) => {
                    client
                        .feed(PgWireBackendMessage::ErrorResponse((*err).into()))
                        .await?;
                    transaction_status = transaction_status.to_error_state();
                    false
                }
                Response::CopyIn(result) => {
                    client.set_state(PgWireConnectionState::CopyInProgress(true));
                    pgwire::api::copy::send_copy_in_response(client, result).await?;
                    false
                }
                Response::CopyOut(result) => {
                    pgwire::api::copy::send_copy_out_response(client, result).await?;
                    false
                }
                Response::CopyBoth(result) => {
                    client.set_state(PgWireConnectionState::CopyInProgress(true));
                    pgwire::api::copy::send_copy_both_response(client, result).await?;
                    false
                }
            }
        } else {
            // Suspended or finished: the rest of the rows.
            true
        };
        if needs_fetch {
            let fetched = portal.fetch(max_rows).await?;
            let mut response = fetched.response;
            let command_tag = response.command_tag().to_owned();
            let mut row_count = 0;
            while let Some(row) = response.data_rows().next().await {
                client.feed(PgWireBackendMessage::DataRow(row?)).await?;
                row_count += 1;
            }
            if fetched.suspended {
                client
                    .feed(PgWireBackendMessage::PortalSuspended(PortalSuspended::new()))
                    .await?;
            } else {
                let tag = Tag::new(&command_tag).with_rows(row_count);
                client
                    .feed(PgWireBackendMessage::CommandComplete(tag.into()))
                    .await?;
            }
        }
        if !matches!(client.state(), PgWireConnectionState::CopyInProgress(_)) {
            client.set_state(PgWireConnectionState::ReadyForQuery);
            client.set_transaction_status(transaction_status);
        }
        Ok(())
    }

    async fn on_close<C>(&self, client: &mut C, message: Close) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = CnStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let name = message.name.as_deref().unwrap_or(DEFAULT_NAME);
        match message.target_type {
            TARGET_TYPE_BYTE_STATEMENT => {
                let mut statements = self.statements.lock().unwrap_or_else(|p| p.into_inner());
                statements.remove(name);
                client.portal_store().rm_statement(name)
            }
            TARGET_TYPE_BYTE_PORTAL => client.portal_store().rm_portal(name),
            _ => {}
        }
        client
            .feed(PgWireBackendMessage::CloseComplete(CloseComplete::new()))
            .await?;
        Ok(())
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<CnStatement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = CnStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if !self.node.is_accepting() {
            return Err(user_error(
                "57P03",
                "the coordinator is not accepting clients yet (catalog not up to date)",
            ));
        }
        let stmt = &portal.statement.statement;
        let mut literals = Vec::with_capacity(portal.parameter_len());
        let mut values = Vec::with_capacity(portal.parameter_len());
        let mut types = Vec::with_capacity(portal.parameter_len());
        for i in 0..portal.parameter_len() {
            let ty = portal
                .statement
                .parameter_types
                .get(i)
                .cloned()
                .flatten()
                .or_else(|| stmt.param_types.get(i).cloned())
                .unwrap_or(Type::UNKNOWN);
            let (value, literal) = param_literal(portal, i, &ty)?;
            // As for the literal: text and unknown values take the type the DN infers.
            types.push(match ty {
                Type::UNKNOWN | Type::TEXT | Type::VARCHAR => 0,
                _ => ty.oid(),
            });
            values.push(value);
            literals.push(literal);
        }
        let sql =
            sql_text::bind_parameters(&stmt.sql, &literals).map_err(|e| user_error("08P01", e))?;
        let mut st = self.state.lock().await;
        let in_txn = st.txn.as_ref().is_some_and(|t| t.explicit);
        let (mut plans, templated) = {
            let catalog = self.node.catalog_read();
            self.node
                .plans
                .plan_bound(&stmt.sql, &sql, &values, &catalog, in_txn)
        };
        if plans.len() != 1 {
            return Err(user_error(
                "42601",
                "cannot insert multiple commands into a prepared statement",
            ));
        }
        let plan = plans.remove(0);
        self.register_cancel(client);
        // A one-group statement planned by its template runs on the DN as the client
        // sent it, a named statement parsed and planned once per DN connection, instead
        // of its text with the values bound in (parsed and planned at every run).
        let one_group = match &plan {
            Plan::Read { groups, .. } | Plan::Write { groups, .. } => groups.len() == 1,
            _ => false,
        };
        st.prepared = (templated && one_group).then(|| Prepared {
            sql: router::statement_text(&stmt.sql).to_owned(),
            types,
            values: values.clone(),
        });
        let r = self.execute(&mut st, plan).await;
        st.prepared = None;
        deliver(client, std::mem::take(&mut st.owed)).await?;
        match r {
            Ok(o) => Ok(to_response(
                o,
                Some((&stmt.fields, &portal.result_column_format)),
            )),
            Err(e) => {
                self.fail_txn(&mut st).await;
                Err(dn_error(e))
            }
        }
    }
}

impl Session {
    /// Sends each group's buffered rows once there are at least `min` bytes of them.
    async fn flush_copy(
        &self,
        copy: &mut CopyState,
        txn: Option<&mut Txn>,
        min: usize,
    ) -> Result<(), DnError> {
        let Some(txn) = txn else {
            return Err(DnError::new("XX000", "COPY outside a transaction"));
        };
        for (g, buf) in copy.buffers.iter_mut() {
            if buf.len() >= min && !buf.is_empty() {
                if let Some(c) = txn.conns.get_mut(g) {
                    c.copy_data(&self.group_name(*g), buf).await?;
                    buf.clear();
                }
            }
        }
        Ok(())
    }

    fn route_lines(catalog: &crate::catalog::Catalog, copy: &mut CopyState, data: &[u8]) {
        copy.partial.extend_from_slice(data);
        let Some(last_nl) = copy.partial.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = copy.partial.drain(..=last_nl).collect();
        for line in complete.split_inclusive(|b| *b == b'\n') {
            if line == b"\\.\n" {
                continue;
            }
            match copy.dist {
                None => {
                    for g in &copy.groups {
                        copy.buffers.entry(*g).or_default().extend_from_slice(line);
                    }
                }
                Some((pos, kind)) => {
                    let body = line.strip_suffix(b"\n").unwrap_or(line);
                    let field = body.split(|b| *b == b'\t').nth(pos).unwrap_or(b"");
                    let text = String::from_utf8_lossy(field);
                    let key = if text == "\\N" { "" } else { text.as_ref() };
                    let g = catalog.group_of(kind, key);
                    copy.buffers.entry(g).or_default().extend_from_slice(line);
                }
            }
        }
    }
}

#[async_trait]
impl CopyHandler for Session {
    async fn on_copy_data<C>(
        &self,
        _client: &mut C,
        copy_data: pgwire::messages::copy::CopyData,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        let Some(copy) = st.copy.as_mut() else {
            return Err(user_error("08P01", "CopyData outside COPY"));
        };
        {
            let catalog = self.node.catalog_read();
            Self::route_lines(&catalog, copy, &copy_data.data);
        }
        if let Err(e) = self.flush_copy(copy, st.txn.as_mut(), 64 * 1024).await {
            st.copy = None;
            self.fail_txn(st).await;
            return Err(dn_error(e));
        }
        Ok(())
    }

    async fn on_copy_done<C>(
        &self,
        client: &mut C,
        _done: pgwire::messages::copy::CopyDone,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let mut st = self.state.lock().await;
        let Some(mut copy) = st.copy.take() else {
            return Err(user_error("08P01", "CopyDone outside COPY"));
        };
        let mut result: Result<u64, DnError> = async {
            if !copy.partial.is_empty() {
                let mut rest = std::mem::take(&mut copy.partial);
                rest.push(b'\n');
                let catalog = self.node.catalog_read().clone();
                Self::route_lines(&catalog, &mut copy, &rest);
            }
            self.flush_copy(&mut copy, st.txn.as_mut(), 0).await?;
            let mut counts = Vec::new();
            let Some(txn) = st.txn.as_mut() else {
                return Err(DnError::new("XX000", "COPY outside a transaction"));
            };
            for g in &copy.groups {
                if let Some(c) = txn.conns.get_mut(g) {
                    counts.push(c.copy_finish(&self.group_name(*g)).await?);
                }
            }
            Ok(if copy.dist.is_none() {
                counts.first().copied().unwrap_or(0)
            } else {
                counts.iter().sum()
            })
        }
        .await;
        let implicit = st.txn.as_ref().is_some_and(|t| !t.explicit);
        if result.is_ok() && implicit {
            if let Err(e) = self.finish_txn(&mut st, true).await {
                result = Err(e);
            }
        }
        match result {
            Ok(n) => {
                client
                    .send(PgWireBackendMessage::CommandComplete(CommandComplete::new(
                        format!("COPY {n}"),
                    )))
                    .await?;
                Ok(())
            }
            Err(e) => {
                self.fail_txn(&mut st).await;
                Err(dn_error(e))
            }
        }
    }

    async fn on_copy_fail<C>(
        &self,
        _client: &mut C,
        fail: pgwire::messages::copy::CopyFail,
    ) -> PgWireError
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let mut st = self.state.lock().await;
        // The DN COPYs are ended by CopyFail before the ROLLBACK (DnConn::run).
        st.copy = None;
        self.fail_txn(&mut st).await;
        user_error("57014", format!("COPY from stdin failed: {}", fail.message))
    }
}

/// Delivers what statements left ([`Owed`]): the statements and portals they removed go
/// from pgwire's store; ParameterStatus messages go before the responses of the
/// statement that changed them (where PostgreSQL sends them).
async fn deliver<C>(client: &mut C, owed: Owed) -> PgWireResult<()>
where
    C: ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send,
    C::PortalStore: PortalStore,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    let store = client.portal_store();
    for name in &owed.forget_statements {
        store.rm_statement(name);
    }
    if owed.forget_portals {
        store.clear_portals();
    }
    for (name, value) in owed.reports {
        client
            .feed(PgWireBackendMessage::ParameterStatus(ParameterStatus::new(
                name, value,
            )))
            .await?;
    }
    Ok(())
}

impl Drop for Session {
    fn drop(&mut self) {
        // Connections of an unfinished transaction are dropped (closed): each DN rolls
        // back what they did. The session no longer takes cancel requests.
        if let Some((pid, secret)) = self.cancel_key.get() {
            self.node.cancels.unregister(*pid, secret);
        }
    }
}
