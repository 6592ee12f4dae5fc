//! The router/planner: one SQL statement + the catalog -> which DN groups, which SQL,
//! and how the CN merges the answers. Pure: no I/O, no clock; tested without a cluster.
//!
//! The rule is "correct or 0A000": a shape whose merged answer the CN cannot prove
//! equal to a single PostgreSQL's is refused with a clear message, never answered.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

use sqlparser::ast::{
    self, BinaryOperator, CopySource, CopyTarget, DataType, Expr, FunctionArg, FunctionArgExpr,
    FunctionArguments, GroupByExpr, JoinConstraint, JoinOperator, ObjectType, OrderByKind,
    SelectItem, SetExpr, Statement, TableFactor, TableWithJoins, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::catalog::{Catalog, Change, Distribution, KeyKind, TableDef};
use crate::distribute_clause::{self, Clause};

/// How the CN answers one statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    Begin,
    Commit,
    Rollback,
    /// SET/RESET: remembered for the session and run on every DN connection it holds.
    Set {
        sql: String,
    },
    /// DEALLOCATE name (None: ALL): the client's prepared statements live in the CN's
    /// session (the DNs never see them), so the CN forgets them itself.
    Deallocate {
        name: Option<String>,
    },
    /// DISCARD ALL / PLANS / TEMP / SEQUENCES: the session's state lives in the CN
    /// (its settings, prepared statements, portals); see the session for what each does.
    Discard {
        all: bool,
        tag: String,
    },
    /// SAVEPOINT / RELEASE / ROLLBACK TO inside a transaction: run on every DN group
    /// the transaction holds (a group enlisted later replays the open savepoints).
    Savepoint {
        sql: String,
        op: SavepointOp,
    },
    /// SHOW and reads touching no distributed table (pg_catalog, `select 1`): any group.
    AnyGroup {
        sql: String,
        tag: &'static str,
    },
    /// A read on `groups`, merged.
    Read {
        groups: Vec<usize>,
        sql: String,
        merge: Merge,
    },
    /// UPDATE/DELETE/INSERT run as is on `groups`.
    Write {
        groups: Vec<usize>,
        sql: String,
        tag: &'static str,
        /// Replicated tables: every group changes the same rows; report one group's count.
        replicated: bool,
    },
    /// A multi-row INSERT split per group.
    InsertSplit {
        parts: Vec<(usize, String)>,
    },
    /// DDL: two-phase commit on every DN primary and every CN of the DDL set.
    Ddl {
        sql: String,
        change: Change,
        tag: String,
    },
    /// VACUUM & co.: cannot run in a transaction block, run on every DN primary alone.
    EveryGroupAlone {
        sql: String,
        tag: String,
    },
    /// COPY t FROM STDIN (text format): rows split per group by the distribution field.
    CopyIn {
        sql: String,
        ncolumns: usize,
        /// Index of the distribution field in each line; None = replicated (every group).
        dist: Option<(usize, KeyKind)>,
    },
    Unsupported(String),
}

/// What a savepoint statement does to the transaction's stack of savepoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SavepointOp {
    Create(String),
    Release(String),
    RollbackTo(String),
}

/// How rows from several groups become one answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Merge {
    Concat,
    Sorted {
        keys: Vec<SortKey>,
        limit: Option<u64>,
        offset: u64,
    },
    Aggregate(AggPlan),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortKey {
    pub column: usize,
    pub desc: bool,
    pub nulls_first: bool,
}

/// Partial aggregation: each group returns `[group columns.., partials..]` per group key.
#[derive(Debug, Clone, PartialEq)]
pub struct AggPlan {
    /// Leading DN columns that form the group key.
    pub key_columns: usize,
    /// Output columns (visible first, then hidden ones HAVING needs).
    pub outputs: Vec<OutCol>,
    pub visible: usize,
    pub having: Vec<HavingCond>,
    pub order: Vec<SortKey>,
    pub limit: Option<u64>,
    pub offset: u64,
    /// No GROUP BY: exactly one output row even with no input rows.
    pub scalar: bool,
    /// Names of the visible output columns, as PostgreSQL would name them.
    pub names: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutCol {
    Key(usize),
    Count(usize),
    Sum(usize),
    Min(usize),
    Max(usize),
    Avg { sum: usize, count: usize },
}

#[derive(Debug, Clone, PartialEq)]
pub struct HavingCond {
    /// Index into `outputs`.
    pub output: usize,
    pub op: CmpOp,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

fn unsupported(msg: impl Into<String>) -> Plan {
    Plan::Unsupported(msg.into())
}

/// Plans every statement of a query string. A string of one statement keeps its text
/// (what the DN runs is what the client sent); several are re-printed one by one.
pub fn plan_query(sql: &str, catalog: &Catalog, in_txn: bool) -> Vec<Plan> {
    let (text, clause) = match distribute_clause::strip(sql) {
        Ok(x) => x,
        Err(e) => return vec![unsupported(e.to_string())],
    };
    if let Some(p) = plan_by_keyword(&text, catalog) {
        return vec![p];
    }
    let statements = match Parser::parse_sql(&PostgreSqlDialect {}, &text) {
        Ok(s) => s,
        Err(e) => return vec![unparsed(sql, catalog, &e.to_string())],
    };
    if statements.len() == 1 {
        return vec![plan_statement(
            &statements[0],
            &text,
            clause,
            catalog,
            in_txn,
            Params::Bound,
        )];
    }
    if clause.is_some() {
        return vec![unsupported(
            "DISTRIBUTE BY in a query string of several statements; send the CREATE TABLE alone",
        )];
    }
    statements
        .iter()
        .map(|s| plan_statement(s, &s.to_string(), None, catalog, in_txn, Params::Bound))
        .collect()
}

/// How `$n` placeholders are read while planning.
#[derive(Debug, Clone, Copy)]
enum Params<'a> {
    /// There are none: the parameters of an extended-protocol statement are bound as
    /// literals before it is planned.
    Bound,
    /// Making a [`Template`]: `dist = $n` pins the statement to "the group of parameter
    /// n", recorded here.
    Template(&'a Cell<Option<(usize, KeyKind)>>),
}

/// A statement's text as it is sent to the DNs: without surrounding space and `;`.
pub(crate) fn statement_text(sql: &str) -> &str {
    sql.trim().trim_end_matches(';').trim()
}

/// The plan of a statement shape, made once from its text with `$n` placeholders and
/// reused for every run of that shape with the values of its parameters: a point read
/// or write pinned to one group (by a literal, or by the parameter that is compared to
/// the distribution column), or BEGIN/COMMIT/ROLLBACK. Planning a statement with
/// sqlparser costs more CPU than the CN's whole rest of a point query; a template saves
/// it. Other shapes (scatters, merges, INSERT, DDL, ...) have none and are planned
/// every time: their plan may depend on the values (LIMIT, literals in HAVING, NULL).
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    plan: Plan,
    /// The parameter (1-based) whose value picks the group, and how it hashes.
    routed_by: Option<(usize, KeyKind)>,
}

impl Template {
    /// A template for `sql` (a single statement, `$n` for its parameters), if its shape
    /// has one.
    pub fn make(sql: &str, catalog: &Catalog) -> Option<Template> {
        let (text, clause) = distribute_clause::strip(sql).ok()?;
        if clause.is_some() || plan_by_keyword(&text, catalog).is_some() {
            return None;
        }
        let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, &text).ok()?;
        if statements.len() != 1 {
            return None;
        }
        let stmt = statements.pop()?;
        let pin = Cell::new(None);
        // in_txn only changes DDL and TRUNCATE plans, which have no template.
        let plan = plan_statement(&stmt, &text, None, catalog, false, Params::Template(&pin));
        let routed_by = pin.get();
        let fits = match &plan {
            Plan::Begin | Plan::Commit | Plan::Rollback => routed_by.is_none(),
            Plan::Read { groups, merge, .. } => groups.len() == 1 && *merge == Merge::Concat,
            Plan::Write {
                groups, replicated, ..
            } => groups.len() == 1 && !*replicated,
            _ => false,
        };
        fits.then_some(Template { plan, routed_by })
    }

    /// The plan of one run: `sql` is the text the DNs get (its parameters bound) and
    /// `param(n)` the text of parameter n's value (None: NULL or absent, for which the
    /// statement is planned from scratch).
    pub fn plan<'p>(
        &self,
        sql: &str,
        param: impl Fn(usize) -> Option<&'p str>,
        catalog: &Catalog,
    ) -> Option<Plan> {
        let group = match self.routed_by {
            Some((n, kind)) => Some(catalog.group_of(kind, param(n)?)),
            None => None,
        };
        let mut plan = self.plan.clone();
        match &mut plan {
            Plan::Read { groups, sql: s, .. } | Plan::Write { groups, sql: s, .. } => {
                *s = statement_text(sql).to_owned();
                if let Some(g) = group {
                    *groups = vec![g];
                }
            }
            _ => {}
        }
        Some(plan)
    }
}

/// Statements sqlparser reads differently from PostgreSQL, recognised by keyword:
/// VACUUM & co. (no transaction block) and COPY (PostgreSQL's option syntax).
fn plan_by_keyword(sql: &str, catalog: &Catalog) -> Option<Plan> {
    let trimmed = sql.trim().trim_end_matches(';').trim();
    if trimmed.contains(';') {
        return None;
    }
    let lower = trimmed.to_ascii_lowercase();
    let first = lower.split_whitespace().next()?;
    match first {
        "vacuum" | "analyze" | "analyse" | "checkpoint" => Some(Plan::EveryGroupAlone {
            sql: trimmed.to_owned(),
            tag: if first == "analyse" {
                "ANALYZE".into()
            } else {
                first.to_ascii_uppercase()
            },
        }),
        "copy" => Some(plan_copy_text(trimmed, catalog)),
        _ => None,
    }
}

/// `COPY table [(columns)] FROM STDIN [[WITH] (options)]`, text format.
fn plan_copy_text(sql: &str, catalog: &Catalog) -> Plan {
    let lower = sql.to_ascii_lowercase();
    let Some(from_at) = lower.find(" from ") else {
        return unsupported("only COPY ... FROM STDIN is supported by the coordinator");
    };
    let head = sql["copy".len()..from_at].trim();
    let tail = lower[from_at + " from ".len()..].trim();
    let Some(opts) = tail.strip_prefix("stdin") else {
        return unsupported("only COPY ... FROM STDIN is supported by the coordinator");
    };
    let opts = opts.trim().trim_start_matches("with").trim();
    let opts = opts.trim_start_matches('(').trim_end_matches(')');
    for opt in opts.split(',').map(|o| o.trim()).filter(|o| !o.is_empty()) {
        let mut words = opt.split_whitespace();
        let key = words.next().unwrap_or_default();
        let value = words.next().unwrap_or("").trim_matches('\'');
        match key {
            // FREEZE is legal only where the table was created or truncated in the same
            // DN transaction; dropping it changes no result.
            "freeze" => {}
            "format" if value == "text" => {}
            _ => {
                return unsupported(format!(
                    "COPY option {opt} is not supported by the coordinator (text format only)"
                ))
            }
        }
    }
    let (name, cols) = match head.find('(') {
        Some(i) => (head[..i].trim(), Some(head[i + 1..].trim_end_matches(')'))),
        None => (head, None),
    };
    if name.starts_with('(') || name.is_empty() {
        return unsupported("COPY (query) is not supported by the coordinator");
    }
    let name = name.rsplit('.').next().unwrap_or(name);
    let unquote = |s: &str| match s.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
        Some(q) => q.to_owned(),
        None => s.to_ascii_lowercase(),
    };
    let name = unquote(name.trim());
    let columns: Vec<ast::Ident> = cols
        .map(|c| {
            c.split(',')
                .map(|x| ast::Ident::new(unquote(x.trim())))
                .collect()
        })
        .unwrap_or_default();
    plan_copy(
        &CopySource::Table {
            table_name: ast::ObjectName::from(vec![ast::Ident::new(name)]),
            columns,
        },
        false,
        &CopyTarget::Stdin,
        &[],
        &[],
        catalog,
    )
}

/// sqlparser cannot read every PostgreSQL statement (psql's `\d` queries use
/// `OPERATOR(pg_catalog.~)`): a read that names no distributed table goes to one group.
fn unparsed(sql: &str, catalog: &Catalog, err: &str) -> Plan {
    let lower = sql.trim_start().to_ascii_lowercase();
    let is_read = ["select", "with", "show", "table "]
        .iter()
        .any(|k| lower.starts_with(k));
    let names_table = catalog.tables.keys().any(|t| mentions_word(&lower, t));
    if is_read && !names_table && !lower.contains("for update") {
        return Plan::AnyGroup {
            sql: sql.to_owned(),
            tag: "SELECT",
        };
    }
    unsupported(format!(
        "the coordinator cannot parse this statement ({err})"
    ))
}

fn mentions_word(haystack: &str, word: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    haystack.match_indices(word).any(|(i, _)| {
        let before = haystack[..i].chars().next_back();
        let after = haystack[i + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

fn plan_statement(
    stmt: &Statement,
    sql: &str,
    clause: Option<Clause>,
    catalog: &Catalog,
    in_txn: bool,
    params: Params<'_>,
) -> Plan {
    let sql = statement_text(sql).to_owned();
    match stmt {
        Statement::StartTransaction { .. } => Plan::Begin,
        Statement::Commit { chain: false, .. } => Plan::Commit,
        Statement::Rollback {
            chain: false,
            savepoint: None,
        } => Plan::Rollback,
        Statement::Rollback {
            chain: false,
            savepoint: Some(name),
        } => Plan::Savepoint {
            sql,
            op: SavepointOp::RollbackTo(ident_name(name)),
        },
        Statement::Savepoint { name } => Plan::Savepoint {
            sql,
            op: SavepointOp::Create(ident_name(name)),
        },
        Statement::ReleaseSavepoint { name } => Plan::Savepoint {
            sql,
            op: SavepointOp::Release(ident_name(name)),
        },
        Statement::Set(_) => Plan::Set { sql },
        Statement::Deallocate { name, .. } => Plan::Deallocate {
            name: (name.quote_style.is_some() || !name.value.eq_ignore_ascii_case("all"))
                .then(|| ident_name(name)),
        },
        Statement::Discard { object_type } => Plan::Discard {
            all: matches!(object_type, ast::DiscardObject::ALL),
            tag: format!("DISCARD {object_type}"),
        },
        Statement::ShowVariable { .. } | Statement::ShowVariables { .. } => {
            Plan::AnyGroup { sql, tag: "SHOW" }
        }
        Statement::Query(q) => plan_select(q, sql, catalog, params),
        Statement::Insert(ins) => plan_insert(ins, sql, catalog),
        Statement::Update(u) => plan_update(u, sql, catalog, params),
        Statement::Delete(d) => plan_delete(d, sql, catalog, params),
        Statement::CreateTable(ct) => plan_create_table(ct, sql, clause, catalog, in_txn),
        Statement::Drop {
            object_type,
            names,
            if_exists,
            ..
        } => match object_type {
            ObjectType::Table => {
                let names: Vec<String> = names.iter().map(object_name).collect();
                if !*if_exists {
                    if let Some(n) = names.iter().find(|n| catalog.table(n).is_none()) {
                        return unsupported(format!(
                            "table {n} is not a distributed table of this cluster"
                        ));
                    }
                }
                ddl(sql, Change::Drop(names), "DROP TABLE", in_txn)
            }
            ObjectType::Index => ddl(sql, Change::Nothing, "DROP INDEX", in_txn),
            other => unsupported(format!("DROP {other} is not supported by the coordinator")),
        },
        Statement::CreateIndex(ci) => {
            if ci.concurrently {
                return Plan::EveryGroupAlone {
                    sql,
                    tag: "CREATE INDEX".into(),
                };
            }
            ddl(sql, Change::Nothing, "CREATE INDEX", in_txn)
        }
        Statement::Truncate(t) => {
            for target in &t.table_names {
                let n = object_name(&target.name);
                if catalog.table(&n).is_none() {
                    return unsupported(format!(
                        "table {n} is not a distributed table of this cluster"
                    ));
                }
            }
            if in_txn {
                // Inside a transaction block TRUNCATE is a write of that transaction on
                // every group (pgbench -i: truncate, insert, copy, commit).
                return Plan::Write {
                    groups: all_groups(catalog),
                    sql,
                    tag: "TRUNCATE TABLE",
                    replicated: true,
                };
            }
            ddl(sql, Change::Nothing, "TRUNCATE TABLE", in_txn)
        }
        Statement::AlterTable(at) => plan_alter(at, sql, catalog, in_txn),
        Statement::Vacuum(_) => Plan::EveryGroupAlone {
            sql,
            tag: "VACUUM".into(),
        },
        Statement::Analyze(_) => Plan::EveryGroupAlone {
            sql,
            tag: "ANALYZE".into(),
        },
        Statement::Copy {
            source,
            to,
            target,
            options,
            legacy_options,
            ..
        } => plan_copy(source, *to, target, options, legacy_options, catalog),
        _ => unsupported(format!(
            "this kind of statement is not supported by the coordinator: {}",
            first_words(&sql)
        )),
    }
}

fn first_words(sql: &str) -> String {
    sql.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_uppercase()
}

fn ddl(sql: String, change: Change, tag: &str, in_txn: bool) -> Plan {
    if in_txn {
        return unsupported(format!(
            "{tag} inside a transaction block is not supported by the coordinator (DDL commits on its own by two-phase commit)"
        ));
    }
    Plan::Ddl {
        sql,
        change,
        tag: tag.to_owned(),
    }
}

pub fn all_groups(catalog: &Catalog) -> Vec<usize> {
    (0..catalog.groups.len().max(1)).collect()
}

/// Lower-case unqualified name (`public.t` -> `t`); quoted names keep their case.
pub fn object_name(name: &ast::ObjectName) -> String {
    name.0
        .last()
        .and_then(|p| p.as_ident())
        .map(ident_name)
        .unwrap_or_default()
}

fn ident_name(i: &ast::Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_ascii_lowercase()
    }
}

fn key_kind(dt: &DataType) -> KeyKind {
    match dt {
        DataType::Int(_)
        | DataType::Integer(_)
        | DataType::SmallInt(_)
        | DataType::BigInt(_)
        | DataType::Int2(_)
        | DataType::Int4(_)
        | DataType::Int8(_) => KeyKind::Integer,
        DataType::Text
        | DataType::Varchar(_)
        | DataType::CharacterVarying(_)
        | DataType::String(_) => KeyKind::Text,
        // char(n) pads: 'a' and 'a ' are equal, their text is not.
        _ => KeyKind::Other,
    }
}

fn plan_create_table(
    ct: &ast::CreateTable,
    sql: String,
    clause: Option<Clause>,
    catalog: &Catalog,
    in_txn: bool,
) -> Plan {
    if ct.temporary {
        return unsupported("temporary tables are not supported by the coordinator");
    }
    if ct.query.is_some() || ct.like.is_some() || ct.columns.is_empty() {
        return unsupported(
            "CREATE TABLE must list its columns (AS SELECT and LIKE are not supported)",
        );
    }
    let name = object_name(&ct.name);
    if catalog.table(&name).is_some() {
        if ct.if_not_exists {
            return ddl(sql, Change::Nothing, "CREATE TABLE", in_txn);
        }
        return Plan::Unsupported(format!("relation \"{name}\" already exists"));
    }
    let columns: Vec<String> = ct.columns.iter().map(|c| ident_name(&c.name)).collect();
    let mut pk_first: Option<String> = None;
    for c in &ct.columns {
        if c.options
            .iter()
            .any(|o| matches!(o.option, ast::ColumnOption::PrimaryKey(_)))
        {
            pk_first = Some(ident_name(&c.name));
        }
    }
    for con in &ct.constraints {
        if let ast::TableConstraint::PrimaryKey(pk) = con {
            if let Some(first) = pk.columns.first() {
                if let Expr::Identifier(i) = &first.column.expr {
                    pk_first = Some(ident_name(i));
                }
            }
        }
    }
    let distribution = match clause {
        Some(Clause::Replication) => Distribution::Replication,
        Some(Clause::Hash(col)) => {
            let Some(i) = columns.iter().position(|c| *c == col) else {
                return unsupported(format!(
                    "DISTRIBUTE BY HASH({col}): table {name} has no column {col}"
                ));
            };
            Distribution::Hash {
                column: i,
                kind: key_kind(&ct.columns[i].data_type),
            }
        }
        None => {
            let i = pk_first
                .and_then(|p| columns.iter().position(|c| *c == p))
                .unwrap_or(0);
            Distribution::Hash {
                column: i,
                kind: key_kind(&ct.columns[i].data_type),
            }
        }
    };
    let def = TableDef {
        name,
        columns,
        distribution,
    };
    ddl(sql, Change::Create(def), "CREATE TABLE", in_txn)
}

fn plan_alter(at: &ast::AlterTable, sql: String, catalog: &Catalog, in_txn: bool) -> Plan {
    use ast::AlterTableOperation as Op;
    let name = object_name(&at.name);
    let Some(table) = catalog.table(&name) else {
        if at.if_exists {
            return ddl(sql, Change::Nothing, "ALTER TABLE", in_txn);
        }
        return unsupported(format!(
            "table {name} is not a distributed table of this cluster"
        ));
    };
    let mut columns = table.columns.clone();
    let dist = table.hash_column().map(|(i, _)| table.columns[i].clone());
    for op in &at.operations {
        match op {
            Op::AddColumn { column_def, .. } => {
                let c = ident_name(&column_def.name);
                if !columns.contains(&c) {
                    columns.push(c);
                }
            }
            Op::DropColumn { column_names, .. } => {
                for c in column_names {
                    let c = ident_name(c);
                    if dist.as_deref() == Some(c.as_str()) {
                        return unsupported(format!(
                            "cannot drop the distribution column {c} of {name}"
                        ));
                    }
                    columns.retain(|x| *x != c);
                }
            }
            Op::RenameColumn {
                old_column_name,
                new_column_name,
            } => {
                let old = ident_name(old_column_name);
                for c in columns.iter_mut() {
                    if *c == old {
                        *c = ident_name(new_column_name);
                    }
                }
            }
            Op::AddConstraint { .. } | Op::DropConstraint { .. } | Op::AlterColumn { .. } => {}
            other => {
                return unsupported(format!(
                    "ALTER TABLE ... {} is not supported by the coordinator",
                    first_words(&other.to_string())
                ))
            }
        }
    }
    let change = if columns == table.columns {
        Change::Nothing
    } else {
        Change::SetColumns {
            table: name,
            columns,
        }
    };
    ddl(sql, change, "ALTER TABLE", in_txn)
}

fn plan_copy(
    source: &CopySource,
    to: bool,
    target: &CopyTarget,
    options: &[ast::CopyOption],
    legacy: &[ast::CopyLegacyOption],
    catalog: &Catalog,
) -> Plan {
    let CopySource::Table {
        table_name,
        columns,
    } = source
    else {
        return unsupported("COPY (query) is not supported by the coordinator");
    };
    if to || !matches!(target, CopyTarget::Stdin) {
        return unsupported("only COPY ... FROM STDIN is supported by the coordinator");
    }
    if !legacy.is_empty() {
        return unsupported("COPY legacy options are not supported by the coordinator");
    }
    for o in options {
        match o {
            // FREEZE is legal only where the table was created or truncated in the same
            // DN transaction; dropping it changes no result.
            ast::CopyOption::Freeze(_) => {}
            ast::CopyOption::Format(f) if f.value.eq_ignore_ascii_case("text") => {}
            other => {
                return unsupported(format!(
                    "COPY option {other} is not supported by the coordinator (text format only)"
                ))
            }
        }
    }
    let name = object_name(table_name);
    let Some(table) = catalog.table(&name) else {
        return unsupported(format!(
            "table {name} is not a distributed table of this cluster"
        ));
    };
    let cols: Vec<String> = if columns.is_empty() {
        table.columns.clone()
    } else {
        columns.iter().map(ident_name).collect()
    };
    let dist = match table.hash_column() {
        None => None,
        Some((i, kind)) => {
            let dist_name = &table.columns[i];
            let Some(pos) = cols.iter().position(|c| c == dist_name) else {
                return unsupported(format!(
                    "COPY into {name} must include the distribution column {dist_name}"
                ));
            };
            Some((pos, kind))
        }
    };
    let sql = format!(
        "COPY {} ({}) FROM STDIN",
        quote_ident(&name),
        cols.iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Plan::CopyIn {
        sql,
        ncolumns: cols.len(),
        dist,
    }
}

fn quote_ident(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        s.to_owned()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

// ---------- tables of a statement ----------

/// A table of the FROM clause: catalog entry and the names it is referred to by.
struct FromTable<'a> {
    def: &'a TableDef,
    refs: Vec<String>,
}

/// Every relation the statement names anywhere (subqueries included).
fn all_relations(stmt_part: &impl Visit) -> Vec<String> {
    struct V(Vec<String>);
    impl Visitor for V {
        type Break = ();
        fn pre_visit_relation(&mut self, r: &ast::ObjectName) -> std::ops::ControlFlow<()> {
            self.0.push(object_name(r));
            std::ops::ControlFlow::Continue(())
        }
    }
    let mut v = V(Vec::new());
    let _ = stmt_part.visit(&mut v);
    v.0
}

fn top_level_tables<'a>(
    from: &[TableWithJoins],
    catalog: &'a Catalog,
) -> Result<(Vec<FromTable<'a>>, bool), String> {
    let mut out = Vec::new();
    let mut outer_join = false;
    let add = |f: &TableFactor, out: &mut Vec<FromTable<'a>>| -> Result<(), String> {
        match f {
            TableFactor::Table { name, alias, .. } => {
                let n = object_name(name);
                if let Some(def) = catalog.table(&n) {
                    let mut refs = vec![n.clone()];
                    if let Some(a) = alias {
                        refs = vec![ident_name(&a.name)];
                    }
                    out.push(FromTable { def, refs });
                }
                Ok(())
            }
            _ => Err("subqueries and functions in FROM".into()),
        }
    };
    for twj in from {
        add(&twj.relation, &mut out)?;
        for j in &twj.joins {
            add(&j.relation, &mut out)?;
            match &j.join_operator {
                JoinOperator::Join(_) | JoinOperator::Inner(_) | JoinOperator::CrossJoin(_) => {}
                _ => outer_join = true,
            }
        }
    }
    Ok((out, outer_join))
}

fn join_conditions(from: &[TableWithJoins]) -> Vec<&Expr> {
    let mut out = Vec::new();
    for twj in from {
        for j in &twj.joins {
            let c = match &j.join_operator {
                JoinOperator::Join(c)
                | JoinOperator::Inner(c)
                | JoinOperator::Left(c)
                | JoinOperator::LeftOuter(c)
                | JoinOperator::Right(c)
                | JoinOperator::RightOuter(c)
                | JoinOperator::FullOuter(c) => c,
                _ => continue,
            };
            if let JoinConstraint::On(e) = c {
                out.push(e);
            }
        }
    }
    out
}

fn conjuncts<'e>(e: &'e Expr, out: &mut Vec<&'e Expr>) {
    match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            conjuncts(left, out);
            conjuncts(right, out);
        }
        Expr::Nested(inner) => conjuncts(inner, out),
        other => out.push(other),
    }
}

/// Resolves a column reference to (table index, column name) among the FROM tables.
fn resolve_column(e: &Expr, tables: &[FromTable]) -> Option<(usize, String)> {
    match e {
        Expr::Identifier(i) => {
            let c = ident_name(i);
            let owners: Vec<usize> = tables
                .iter()
                .enumerate()
                .filter(|(_, t)| t.def.column_index(&c).is_some())
                .map(|(k, _)| k)
                .collect();
            (owners.len() == 1).then(|| (owners[0], c))
        }
        Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
            let t = ident_name(&parts[parts.len() - 2]);
            let c = ident_name(&parts[parts.len() - 1]);
            let k = tables.iter().position(|x| x.refs.contains(&t))?;
            tables[k].def.column_index(&c).map(|_| (k, c))
        }
        Expr::Nested(inner) => resolve_column(inner, tables),
        _ => None,
    }
}

/// The text of a literal usable as a routing key (numbers, strings, -numbers).
fn literal_text(e: &Expr) -> Option<String> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => Some(n.clone()),
            Value::SingleQuotedString(s) => Some(s.clone()),
            _ => None,
        },
        Expr::UnaryOp {
            op: ast::UnaryOperator::Minus,
            expr,
        } => match &**expr {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => Some(format!("-{n}")),
                _ => None,
            },
            _ => None,
        },
        Expr::Nested(inner) => literal_text(inner),
        Expr::Cast { expr, .. } => literal_text(expr),
        _ => None,
    }
}

/// `$n` (also in parentheses or cast): n.
fn placeholder_number(e: &Expr) -> Option<usize> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => p.strip_prefix('$')?.parse().ok(),
            _ => None,
        },
        Expr::Nested(inner) => placeholder_number(inner),
        Expr::Cast { expr, .. } => placeholder_number(expr),
        _ => None,
    }
}

/// The group a WHERE clause pins the query to: `dist = literal` on a hash table (or,
/// for a plan template, `dist = $n`: recorded, and group 0 stands in for the group).
fn pinned_group(
    selection: Option<&Expr>,
    tables: &[FromTable],
    catalog: &Catalog,
    params: Params<'_>,
) -> Option<usize> {
    let mut cs = Vec::new();
    conjuncts(selection?, &mut cs);
    for c in cs {
        let Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } = c
        else {
            continue;
        };
        for (col, lit) in [(left, right), (right, left)] {
            if let (Params::Template(pin), Some(n)) = (params, placeholder_number(lit)) {
                let Some((k, name)) = resolve_column(col, tables) else {
                    continue;
                };
                let def = tables[k].def;
                if let Some((i, kind)) = def.hash_column() {
                    if def.columns[i] == name && kind != KeyKind::Other {
                        pin.set(Some((n, kind)));
                        return Some(0);
                    }
                }
                continue;
            }
            let (Some((k, name)), Some(value)) = (resolve_column(col, tables), literal_text(lit))
            else {
                continue;
            };
            let def = tables[k].def;
            if let Some((i, kind)) = def.hash_column() {
                if def.columns[i] == name && kind != KeyKind::Other {
                    return Some(catalog.group_of(kind, &value));
                }
            }
        }
    }
    None
}

/// Whether all hash tables are joined on their distribution columns (co-located).
fn colocated(tables: &[FromTable], conditions: &[&Expr]) -> bool {
    let hashed: Vec<usize> = (0..tables.len())
        .filter(|k| tables[*k].def.hash_column().is_some())
        .collect();
    if hashed.len() <= 1 {
        return true;
    }
    // Union-find over hash tables linked by dist = dist equalities.
    let mut parent: Vec<usize> = (0..tables.len()).collect();
    fn find(p: &mut Vec<usize>, x: usize) -> usize {
        if p[x] != x {
            let r = find(p, p[x]);
            p[x] = r;
        }
        p[x]
    }
    let is_dist = |k: usize, c: &str| {
        tables[k]
            .def
            .hash_column()
            .is_some_and(|(i, _)| tables[k].def.columns[i] == c)
    };
    for cond in conditions {
        let mut cs = Vec::new();
        conjuncts(cond, &mut cs);
        for c in cs {
            if let Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } = c
            {
                if let (Some((a, ca)), Some((b, cb))) =
                    (resolve_column(left, tables), resolve_column(right, tables))
                {
                    let same_kind = tables[a].def.hash_column().map(|x| x.1)
                        == tables[b].def.hash_column().map(|x| x.1);
                    if is_dist(a, &ca) && is_dist(b, &cb) && same_kind {
                        let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
                        parent[ra] = rb;
                    }
                }
            }
        }
    }
    let root = find(&mut parent, hashed[0]);
    hashed.iter().all(|k| find(&mut parent, *k) == root)
}

// ---------- SELECT ----------

fn plan_select(q: &ast::Query, sql: String, catalog: &Catalog, params: Params<'_>) -> Plan {
    let names = all_relations(q);
    let distributed: BTreeSet<&String> = names
        .iter()
        .filter(|n| catalog.table(n).is_some())
        .collect();
    if distributed.is_empty() {
        return Plan::AnyGroup { sql, tag: "SELECT" };
    }
    if q.with.is_some() {
        return unsupported("WITH queries over distributed tables are not supported");
    }
    let SetExpr::Select(sel) = &*q.body else {
        return unsupported("UNION/INTERSECT/EXCEPT over distributed tables are not supported");
    };
    if !q.locks.is_empty() && names.len() > 1 {
        return unsupported("FOR UPDATE/SHARE over a join is not supported");
    }
    let (tables, outer) = match top_level_tables(&sel.from, catalog) {
        Ok(t) => t,
        Err(what) => {
            return unsupported(format!("{what} over distributed tables are not supported"))
        }
    };
    let top: BTreeSet<&String> = tables.iter().map(|t| &t.def.name).collect();
    let subquery_tables =
        names.iter().filter(|n| catalog.table(n).is_some()).count() != tables.len();
    if subquery_tables || distributed != top {
        return unsupported(
            "subqueries over distributed tables are not supported (only joins in FROM)",
        );
    }
    let mut conds = join_conditions(&sel.from);
    if let Some(w) = &sel.selection {
        conds.push(w);
    }
    let any_hash = tables.iter().any(|t| t.def.hash_column().is_some());
    if any_hash && !colocated(&tables, &conds) {
        return unsupported(
            "a join of distributed tables must join them on their distribution columns (not co-located)",
        );
    }
    if !any_hash {
        // Only replicated tables: any one group holds every row.
        return Plan::Read {
            groups: vec![0],
            sql,
            merge: Merge::Concat,
        };
    }
    let has_repl = tables.iter().any(|t| t.def.hash_column().is_none());
    if has_repl && outer {
        let first_is_hash = sel
            .from
            .first()
            .and_then(|twj| match &twj.relation {
                TableFactor::Table { name, .. } => catalog.table(&object_name(name)),
                _ => None,
            })
            .is_some_and(|t| t.hash_column().is_some());
        let only_left = sel.from.iter().all(|twj| {
            twj.joins.iter().all(|j| {
                matches!(
                    j.join_operator,
                    JoinOperator::Join(_)
                        | JoinOperator::Inner(_)
                        | JoinOperator::Left(_)
                        | JoinOperator::LeftOuter(_)
                )
            })
        });
        if !(first_is_hash && only_left && sel.from.len() == 1) {
            return unsupported(
                "an outer join that preserves a replicated table's rows is not supported",
            );
        }
    }
    if let Some(g) = pinned_group(sel.selection.as_ref(), &tables, catalog, params) {
        return Plan::Read {
            groups: vec![g],
            sql,
            merge: Merge::Concat,
        };
    }
    let groups = all_groups(catalog);
    if groups.len() == 1 {
        return Plan::Read {
            groups,
            sql,
            merge: Merge::Concat,
        };
    }
    plan_scatter_select(q, sel, &tables, sql, groups)
}

fn limit_offset(q: &ast::Query) -> Result<(Option<u64>, u64), String> {
    let Some(lc) = &q.limit_clause else {
        return Ok((None, 0));
    };
    let num = |e: &Expr| -> Result<u64, String> {
        literal_text(e)
            .and_then(|t| t.parse::<u64>().ok())
            .ok_or_else(|| "LIMIT/OFFSET must be constant numbers".to_string())
    };
    match lc {
        ast::LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        } => {
            if !limit_by.is_empty() {
                return Err("LIMIT BY".into());
            }
            let limit = match limit {
                Some(Expr::Value(v)) if matches!(v.value, Value::Null) => None,
                Some(e) => Some(num(e)?),
                None => None,
            };
            let offset = match offset {
                Some(o) => num(&o.value)?,
                None => 0,
            };
            Ok((limit, offset))
        }
        ast::LimitClause::OffsetCommaLimit { offset, limit } => {
            Ok((Some(num(limit)?), num(offset)?))
        }
    }
}

fn is_aggregate_name(n: &str) -> bool {
    matches!(
        n,
        "count"
            | "sum"
            | "min"
            | "max"
            | "avg"
            | "array_agg"
            | "string_agg"
            | "bool_and"
            | "bool_or"
            | "every"
            | "stddev"
            | "variance"
            | "json_agg"
            | "jsonb_agg"
    )
}

fn contains_aggregate_or_window(e: &impl Visit) -> (bool, bool) {
    struct V(bool, bool);
    impl Visitor for V {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> std::ops::ControlFlow<()> {
            if let Expr::Function(f) = e {
                if f.over.is_some() {
                    self.1 = true;
                } else if is_aggregate_name(&object_name(&f.name)) {
                    self.0 = true;
                }
            }
            std::ops::ControlFlow::Continue(())
        }
    }
    let mut v = V(false, false);
    let _ = e.visit(&mut v);
    (v.0, v.1)
}

/// A simple aggregate call: (name, argument text or None for `*`).
fn simple_aggregate(e: &Expr) -> Option<(String, Option<String>)> {
    let Expr::Function(f) = e else { return None };
    let name = object_name(&f.name);
    if !matches!(name.as_str(), "count" | "sum" | "min" | "max" | "avg") {
        return None;
    }
    if f.over.is_some() || f.filter.is_some() || !f.within_group.is_empty() {
        return None;
    }
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    if list.duplicate_treatment.is_some() || !list.clauses.is_empty() || list.args.len() != 1 {
        return None;
    }
    match &list.args[0] {
        FunctionArg::Unnamed(FunctionArgExpr::Wildcard) if name == "count" => Some((name, None)),
        FunctionArg::Unnamed(FunctionArgExpr::Expr(a)) => {
            let (agg, win) = contains_aggregate_or_window(a);
            (!agg && !win).then(|| (name, Some(a.to_string())))
        }
        _ => None,
    }
}

fn sort_options(o: &ast::OrderByExpr) -> Result<(bool, bool), String> {
    let desc = match &o.options.sort {
        None | Some(ast::OrderBySort::Asc) => false,
        Some(ast::OrderBySort::Desc) => true,
        Some(ast::OrderBySort::Using(_)) => return Err("ORDER BY ... USING".into()),
    };
    // PostgreSQL: NULLs sort as larger than any value unless told otherwise.
    let nulls_first = o.options.nulls_first.unwrap_or(desc);
    Ok((desc, nulls_first))
}

/// Finds which output column an ORDER BY expression names: position, alias or the
/// same expression as a select item.
fn order_column(e: &Expr, items: &[(Option<String>, Expr)]) -> Option<usize> {
    if let Some(t) = literal_text(e) {
        if let Ok(pos) = t.parse::<usize>() {
            return (pos >= 1 && pos <= items.len()).then(|| pos - 1);
        }
    }
    if let Expr::Identifier(i) = e {
        let n = ident_name(i);
        if let Some(k) = items
            .iter()
            .position(|(a, _)| a.as_deref() == Some(n.as_str()))
        {
            return Some(k);
        }
    }
    let text = e.to_string().to_ascii_lowercase();
    items.iter().position(|(_, x)| {
        x.to_string().to_ascii_lowercase() == text
            || matches!((x, e), (Expr::CompoundIdentifier(p), Expr::Identifier(i)) if p.last().map(ident_name) == Some(ident_name(i)))
            || matches!((x, e), (Expr::Identifier(i), Expr::CompoundIdentifier(p)) if p.last().map(ident_name) == Some(ident_name(i)))
    })
}

/// Select items as (alias, expression); `*` expands to the FROM tables' columns.
fn select_items(
    sel: &ast::Select,
    tables: &[FromTable],
) -> Result<Vec<(Option<String>, Expr)>, String> {
    let mut out = Vec::new();
    for item in &sel.projection {
        match item {
            SelectItem::UnnamedExpr(e) => out.push((None, e.clone())),
            SelectItem::ExprWithAlias { expr, alias } => {
                out.push((Some(ident_name(alias)), expr.clone()))
            }
            SelectItem::Wildcard(_) if tables.len() == 1 => {
                for c in &tables[0].def.columns {
                    out.push((None, Expr::Identifier(ast::Ident::new(c.clone()))));
                }
            }
            _ => return Err("qualified or multi-table * with ORDER BY or aggregates".into()),
        }
    }
    Ok(out)
}

fn plan_scatter_select(
    q: &ast::Query,
    sel: &ast::Select,
    tables: &[FromTable],
    sql: String,
    groups: Vec<usize>,
) -> Plan {
    if sel.distinct.is_some() {
        return unsupported("SELECT DISTINCT across DN groups is not supported");
    }
    if q.fetch.is_some() {
        return unsupported("FETCH FIRST across DN groups is not supported (use LIMIT)");
    }
    let (has_agg, has_window) = contains_aggregate_or_window(&sel.projection);
    let (having_agg, _) = match &sel.having {
        Some(h) => contains_aggregate_or_window(h),
        None => (false, false),
    };
    if has_window {
        return unsupported("window functions across DN groups are not supported");
    }
    let (limit, offset) = match limit_offset(q) {
        Ok(x) => x,
        Err(e) => return unsupported(format!("{e} across DN groups is not supported")),
    };
    let group_by: Vec<Expr> = match &sel.group_by {
        GroupByExpr::Expressions(exprs, mods) if mods.is_empty() => exprs.clone(),
        _ => return unsupported("GROUP BY ALL/ROLLUP/CUBE across DN groups is not supported"),
    };
    let order: Vec<ast::OrderByExpr> = match &q.order_by {
        None => vec![],
        Some(ob) => match &ob.kind {
            OrderByKind::Expressions(e) => e.clone(),
            OrderByKind::All(_) => return unsupported("ORDER BY ALL is not supported"),
        },
    };
    if !has_agg && !having_agg && group_by.is_empty() {
        if order.is_empty() {
            if limit.is_some() || offset > 0 {
                return unsupported(
                    "LIMIT/OFFSET without ORDER BY across DN groups is not supported (the answer would depend on the groups' timing)",
                );
            }
            return Plan::Read {
                groups,
                sql,
                merge: Merge::Concat,
            };
        }
        let items = match select_items(sel, tables) {
            Ok(i) => i,
            Err(e) => return unsupported(format!("{e} across DN groups is not supported")),
        };
        let mut keys = Vec::new();
        for o in &order {
            let Some(column) = order_column(&o.expr, &items) else {
                return unsupported(format!(
                    "ORDER BY {} across DN groups must name a selected column",
                    o.expr
                ));
            };
            let (desc, nulls_first) = match sort_options(o) {
                Ok(x) => x,
                Err(e) => return unsupported(format!("{e} is not supported")),
            };
            keys.push(SortKey {
                column,
                desc,
                nulls_first,
            });
        }
        // Each group returns its first offset+limit rows in order; the CN merges.
        let mut dn = q.clone();
        dn.limit_clause = limit.map(|l| ast::LimitClause::LimitOffset {
            limit: Some(Expr::value(Value::Number((l + offset).to_string(), false))),
            offset: None,
            limit_by: vec![],
        });
        return Plan::Read {
            groups,
            sql: dn.to_string(),
            merge: Merge::Sorted {
                keys,
                limit,
                offset,
            },
        };
    }
    plan_aggregate(q, sel, tables, group_by, order, limit, offset, groups)
}

#[allow(clippy::too_many_arguments)]
fn plan_aggregate(
    q: &ast::Query,
    sel: &ast::Select,
    tables: &[FromTable],
    group_by: Vec<Expr>,
    order: Vec<ast::OrderByExpr>,
    limit: Option<u64>,
    offset: u64,
    groups: Vec<usize>,
) -> Plan {
    let _ = q;
    let items = match select_items(sel, tables) {
        Ok(i) => i,
        Err(e) => return unsupported(format!("{e} across DN groups is not supported")),
    };
    let key_texts: Vec<String> = group_by
        .iter()
        .map(|e| e.to_string().to_ascii_lowercase())
        .collect();
    let mut dn_cols: Vec<String> = group_by.iter().map(|e| e.to_string()).collect();
    let mut outputs = Vec::new();
    let add_agg = |name: &str, arg: Option<String>, dn_cols: &mut Vec<String>| -> OutCol {
        let a = arg.clone().unwrap_or_else(|| "*".into());
        let mut push = |s: String| {
            dn_cols.push(s);
            dn_cols.len() - 1
        };
        match name {
            "count" => OutCol::Count(push(format!("count({a})"))),
            "sum" => OutCol::Sum(push(format!("sum({a})"))),
            "min" => OutCol::Min(push(format!("min({a})"))),
            "max" => OutCol::Max(push(format!("max({a})"))),
            _ => {
                let sum = push(format!("sum({a})"));
                let count = push(format!("count({a})"));
                OutCol::Avg { sum, count }
            }
        }
    };
    for (_, e) in &items {
        if let Some((name, arg)) = simple_aggregate(e) {
            outputs.push(add_agg(&name, arg, &mut dn_cols));
            continue;
        }
        let text = e.to_string().to_ascii_lowercase();
        let k = key_texts.iter().position(|k| *k == text).or_else(|| {
            // `t.a` selected, `a` grouped (or the other way round).
            let col = |x: &Expr| match x {
                Expr::Identifier(i) => Some(ident_name(i)),
                Expr::CompoundIdentifier(p) => p.last().map(ident_name),
                _ => None,
            };
            let c = col(e)?;
            group_by
                .iter()
                .position(|g| col(g).as_deref() == Some(c.as_str()))
        });
        match k {
            Some(k) => outputs.push(OutCol::Key(k)),
            None => {
                return unsupported(format!(
                    "select item {e} across DN groups must be a GROUP BY expression or count/sum/min/max/avg of a plain argument"
                ))
            }
        }
    }
    let visible = outputs.len();
    let names: Vec<String> = items
        .iter()
        .map(|(alias, e)| match (alias, e) {
            (Some(a), _) => a.clone(),
            (None, Expr::Identifier(i)) => ident_name(i),
            (None, Expr::CompoundIdentifier(p)) => p.last().map(ident_name).unwrap_or_default(),
            (None, Expr::Function(f)) => object_name(&f.name),
            _ => "?column?".to_owned(),
        })
        .collect();
    let mut having = Vec::new();
    if let Some(h) = &sel.having {
        let mut cs = Vec::new();
        conjuncts(h, &mut cs);
        for c in cs {
            let Expr::BinaryOp { left, op, right } = c else {
                return unsupported("HAVING across DN groups supports only `aggregate <op> number` conditions joined by AND");
            };
            let op = match op {
                BinaryOperator::Eq => CmpOp::Eq,
                BinaryOperator::NotEq => CmpOp::NotEq,
                BinaryOperator::Lt => CmpOp::Lt,
                BinaryOperator::LtEq => CmpOp::LtEq,
                BinaryOperator::Gt => CmpOp::Gt,
                BinaryOperator::GtEq => CmpOp::GtEq,
                _ => return unsupported("HAVING across DN groups supports only comparisons"),
            };
            let (Some((name, arg)), Some(value)) = (simple_aggregate(left), literal_text(right))
            else {
                return unsupported("HAVING across DN groups supports only `aggregate <op> number` conditions joined by AND");
            };
            if value.parse::<f64>().is_err() {
                return unsupported(
                    "HAVING across DN groups compares aggregates with numbers only",
                );
            }
            outputs.push(add_agg(&name, arg, &mut dn_cols));
            having.push(HavingCond {
                output: outputs.len() - 1,
                op,
                value,
            });
        }
    }
    let out_items: Vec<(Option<String>, Expr)> = items.clone();
    let mut keys = Vec::new();
    for o in &order {
        let Some(column) = order_column(&o.expr, &out_items) else {
            return unsupported(format!(
                "ORDER BY {} across DN groups must name a selected column",
                o.expr
            ));
        };
        let (desc, nulls_first) = match sort_options(o) {
            Ok(x) => x,
            Err(e) => return unsupported(format!("{e} is not supported")),
        };
        keys.push(SortKey {
            column,
            desc,
            nulls_first,
        });
    }
    let from = sel
        .from
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut sql = format!("SELECT {} FROM {from}", dn_cols.join(", "));
    if let Some(w) = &sel.selection {
        sql.push_str(&format!(" WHERE {w}"));
    }
    if !group_by.is_empty() {
        sql.push_str(&format!(
            " GROUP BY {}",
            group_by
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Plan::Read {
        groups,
        sql,
        merge: Merge::Aggregate(AggPlan {
            key_columns: group_by.len(),
            outputs,
            visible,
            having,
            order: keys,
            limit,
            offset,
            scalar: group_by.is_empty(),
            names,
        }),
    }
}

// ---------- INSERT / UPDATE / DELETE ----------

fn dml_table<'a>(name: &ast::ObjectName, catalog: &'a Catalog) -> Result<&'a TableDef, String> {
    let n = object_name(name);
    catalog.table(&n).ok_or_else(|| {
        format!("table {n} is not a distributed table of this cluster (create it through a CN)")
    })
}

fn plan_insert(ins: &ast::Insert, sql: String, catalog: &Catalog) -> Plan {
    let ast::TableObject::TableName(name) = &ins.table else {
        return unsupported("INSERT INTO a table function is not supported");
    };
    let table = match dml_table(name, catalog) {
        Ok(t) => t,
        Err(msg) => return unsupported(msg),
    };
    let groups = all_groups(catalog);
    let Some((dist, kind)) = table.hash_column() else {
        return Plan::Write {
            groups,
            sql,
            tag: "INSERT",
            replicated: true,
        };
    };
    let Some(source) = &ins.source else {
        return unsupported("INSERT without VALUES is not supported for distributed tables");
    };
    let SetExpr::Values(values) = &*source.body else {
        return unsupported("INSERT ... SELECT into a hash-distributed table is not supported");
    };
    if source.order_by.is_some() || source.limit_clause.is_some() || source.with.is_some() {
        return unsupported("INSERT ... VALUES with ORDER BY/LIMIT/WITH is not supported");
    }
    let columns: Vec<String> = if ins.columns.is_empty() {
        table.columns.clone()
    } else {
        ins.columns.iter().map(object_name).collect()
    };
    let dist_name = &table.columns[dist];
    let Some(pos) = columns.iter().position(|c| c == dist_name) else {
        return unsupported(format!(
            "INSERT into {} must give the distribution column {dist_name}",
            table.name
        ));
    };
    let mut per_group: BTreeMap<usize, Vec<_>> = BTreeMap::new();
    for row in &values.rows {
        let Some(e) = row.get(pos) else {
            return unsupported("INSERT row has fewer values than columns");
        };
        let key = match e {
            Expr::Value(v) if matches!(v.value, Value::Null) => String::new(),
            other => match literal_text(other) {
                Some(t) => t,
                None => {
                    return unsupported(format!(
                        "INSERT into {}: the distribution column {dist_name} must be a constant (got {other})",
                        table.name
                    ))
                }
            },
        };
        per_group
            .entry(catalog.group_of(kind, &key))
            .or_default()
            .push(row.clone());
    }
    if per_group.len() == 1 {
        let g = *per_group.keys().next().unwrap_or(&0);
        return Plan::InsertSplit {
            parts: vec![(g, sql)],
        };
    }
    let parts = per_group
        .into_iter()
        .map(|(g, rows)| {
            let mut part = ins.clone();
            let mut src = (**source).clone();
            let mut v = values.clone();
            v.rows = rows;
            src.body = Box::new(SetExpr::Values(v));
            part.source = Some(Box::new(src));
            (g, Statement::Insert(part).to_string())
        })
        .collect();
    Plan::InsertSplit { parts }
}

fn plan_update(u: &ast::Update, sql: String, catalog: &Catalog, params: Params<'_>) -> Plan {
    if u.from.is_some() || !u.table.joins.is_empty() {
        return unsupported("UPDATE ... FROM is not supported by the coordinator");
    }
    let TableFactor::Table { name, alias, .. } = &u.table.relation else {
        return unsupported("UPDATE of this target is not supported");
    };
    let table = match dml_table(name, catalog) {
        Ok(t) => t,
        Err(msg) => return unsupported(msg),
    };
    if let Some((dist, _)) = table.hash_column() {
        for a in &u.assignments {
            let target = a.target.to_string().to_ascii_lowercase();
            if target == table.columns[dist] {
                return unsupported(format!(
                    "UPDATE of the distribution column {target} is not supported (the row would have to move between groups)"
                ));
            }
        }
    }
    plan_filtered_write(
        table,
        alias.as_ref(),
        u.selection.as_ref(),
        &u.assignments,
        (sql, "UPDATE"),
        catalog,
        params,
    )
}

fn plan_delete(d: &ast::Delete, sql: String, catalog: &Catalog, params: Params<'_>) -> Plan {
    if d.using.is_some() || !d.tables.is_empty() {
        return unsupported("DELETE ... USING is not supported by the coordinator");
    }
    let from = match &d.from {
        ast::FromTable::WithFromKeyword(f) | ast::FromTable::WithoutKeyword(f) => f,
    };
    if from.len() != 1 || !from[0].joins.is_empty() {
        return unsupported("DELETE from several tables is not supported");
    }
    let TableFactor::Table { name, alias, .. } = &from[0].relation else {
        return unsupported("DELETE of this target is not supported");
    };
    let table = match dml_table(name, catalog) {
        Ok(t) => t,
        Err(msg) => return unsupported(msg),
    };
    plan_filtered_write(
        table,
        alias.as_ref(),
        d.selection.as_ref(),
        &[],
        (sql, "DELETE"),
        catalog,
        params,
    )
}

fn plan_filtered_write(
    table: &TableDef,
    alias: Option<&ast::TableAlias>,
    selection: Option<&Expr>,
    assignments: &[ast::Assignment],
    (sql, tag): (String, &'static str),
    catalog: &Catalog,
    params: Params<'_>,
) -> Plan {
    // Other distributed tables in subqueries would be read partially on each group.
    let mut names = Vec::new();
    if let Some(s) = selection {
        names.extend(all_relations(s));
    }
    for a in assignments {
        names.extend(all_relations(&a.value));
    }
    if names.iter().any(|n| catalog.table(n).is_some()) {
        return unsupported(format!(
            "{tag} with a subquery over a distributed table is not supported"
        ));
    }
    let groups = all_groups(catalog);
    if table.hash_column().is_none() {
        return Plan::Write {
            groups,
            sql,
            tag,
            replicated: true,
        };
    }
    let refs = vec![alias
        .map(|a| ident_name(&a.name))
        .unwrap_or_else(|| table.name.clone())];
    let tables = [FromTable { def: table, refs }];
    let groups = match pinned_group(selection, &tables, catalog, params) {
        Some(g) => vec![g],
        None => groups,
    };
    Plan::Write {
        groups,
        sql,
        tag,
        replicated: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        let mut c = Catalog::new(vec!["dn1".into(), "dn2".into()]);
        for p in plan_query(
            "create table t (id int primary key, g int, v text)",
            &c,
            false,
        ) {
            let Plan::Ddl { change, .. } = p else {
                panic!("{p:?}")
            };
            c.apply(&change);
        }
        for sql in [
            "create table u (uid int, id int, w int) distribute by hash(id)",
            "create table r (k int, name text) distribute by replication",
            "create table s (a int, b int)",
        ] {
            for p in plan_query(sql, &c, false) {
                let Plan::Ddl { change, .. } = p else {
                    panic!("{p:?}")
                };
                c.apply(&change);
            }
        }
        c
    }

    /// A template's plan for every value equals planning the bound text from scratch;
    /// shapes whose plan depends on more than the routing value have no template.
    #[test]
    fn templates_plan_as_the_router_does() {
        let c = catalog();
        let with_template = [
            "SELECT v FROM t WHERE id = $1",
            "select v from t where id = $1::int4 and g > $2",
            "SELECT * FROM t WHERE ($1) = id",
            "select u.w from u join t on u.id = t.id where t.id = $1",
            "UPDATE t SET g = g + $1 WHERE id = $2",
            "DELETE FROM u WHERE id = $1 RETURNING w",
            "select v from t where id = 7 and g = $1",
            "BEGIN",
            "END",
            "ROLLBACK",
        ];
        let values: [&[&str]; 4] = [&["1", "2"], &["42", "0"], &["-5", "9"], &["007", "x"]];
        for shape in with_template {
            let t = Template::make(shape, &c).unwrap_or_else(|| panic!("{shape}: no template"));
            for vals in values {
                let lits: Vec<String> = vals.iter().map(|v| format!("'{v}'")).collect();
                let bound = crate::sql_text::bind_parameters(shape, &lits).unwrap();
                let value = |n: usize| n.checked_sub(1).and_then(|k| vals.get(k)).copied();
                let from_template = t.plan(&bound, value, &c);
                let planned = plan_query(&bound, &c, false);
                assert_eq!(from_template.as_ref(), planned.first(), "{bound}");
            }
            // A NULL routing value: planned from scratch, not by the template.
            if t.routed_by.is_some() {
                assert_eq!(t.plan("x", |_| None, &c), None, "{shape}");
            }
        }
        for shape in [
            "select v from t where g = $1",
            "select v from t order by id limit $1",
            "select count(*) from t where id = $1 or id = $2",
            "select v from t where id = -$1",
            "insert into t values ($1, $2, $3)",
            "update r set name = $1 where k = $2",
            "create table x (a int)",
            "copy t from stdin",
            "select 1; select 2",
            "select v from t where id = $1 and g in (select w from u)",
        ] {
            assert_eq!(Template::make(shape, &c), None, "{shape}");
        }
    }

    fn one(sql: &str) -> Plan {
        let mut v = plan_query(sql, &catalog(), false);
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    fn assert_unsupported(sql: &str) {
        match one(sql) {
            Plan::Unsupported(_) => {}
            p => panic!("{sql}: expected 0A000, got {p:?}"),
        }
    }

    #[test]
    fn default_distribution_is_primary_key_then_first_column() {
        let c = catalog();
        assert_eq!(
            c.table("t").unwrap().hash_column(),
            Some((0, KeyKind::Integer))
        );
        assert_eq!(
            c.table("u").unwrap().hash_column(),
            Some((1, KeyKind::Integer))
        );
        assert_eq!(
            c.table("r").unwrap().distribution,
            Distribution::Replication
        );
        assert_eq!(
            c.table("s").unwrap().hash_column(),
            Some((0, KeyKind::Integer))
        );
    }

    #[test]
    fn point_select_goes_to_the_group_of_its_key() {
        let c = catalog();
        let g = c.group_of(KeyKind::Integer, "7");
        assert_eq!(
            one("select v from t where id = 7"),
            Plan::Read {
                groups: vec![g],
                sql: "select v from t where id = 7".into(),
                merge: Merge::Concat
            }
        );
        match one("select v from t where 7 = t.id and v = 'x'") {
            Plan::Read { groups, .. } => assert_eq!(groups, vec![g]),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn multi_row_insert_is_split_per_group() {
        let c = catalog();
        let mut want: BTreeMap<usize, usize> = BTreeMap::new();
        for k in 1..=10 {
            *want
                .entry(c.group_of(KeyKind::Integer, &k.to_string()))
                .or_default() += 1;
        }
        let values: Vec<String> = (1..=10).map(|k| format!("({k}, 1, 'x')")).collect();
        let Plan::InsertSplit { parts } =
            one(&format!("insert into t values {}", values.join(", ")))
        else {
            panic!()
        };
        assert_eq!(parts.len(), want.len());
        for (g, sql) in parts {
            assert_eq!(sql.matches("'x'").count(), want[&g], "{sql}");
        }
    }

    #[test]
    fn insert_without_the_distribution_column_is_refused() {
        assert_unsupported("insert into t (g, v) values (1, 'a')");
        assert_unsupported("insert into t select * from s");
    }

    #[test]
    fn replicated_writes_everywhere_reads_one_group() {
        assert_eq!(
            one("insert into r values (1, 'a')"),
            Plan::Write {
                groups: vec![0, 1],
                sql: "insert into r values (1, 'a')".into(),
                tag: "INSERT",
                replicated: true
            }
        );
        match one("select * from r") {
            Plan::Read { groups, .. } => assert_eq!(groups.len(), 1),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn update_and_delete_route_by_key_or_scatter() {
        let c = catalog();
        let g = c.group_of(KeyKind::Integer, "3");
        match one("update t set v = 'b' where id = 3") {
            Plan::Write { groups, .. } => assert_eq!(groups, vec![g]),
            p => panic!("{p:?}"),
        }
        match one("delete from t where v = 'b'") {
            Plan::Write { groups, .. } => assert_eq!(groups, vec![0, 1]),
            p => panic!("{p:?}"),
        }
        assert_unsupported("update t set id = 4 where id = 3");
    }

    #[test]
    fn order_by_limit_is_merged_with_limit_plus_offset_pushed() {
        match one("select id, v from t order by v desc, id limit 5 offset 2") {
            Plan::Read {
                sql,
                merge:
                    Merge::Sorted {
                        keys,
                        limit,
                        offset,
                    },
                ..
            } => {
                assert!(sql.contains("LIMIT 7") && !sql.contains("OFFSET"), "{sql}");
                assert_eq!(
                    keys[0],
                    SortKey {
                        column: 1,
                        desc: true,
                        nulls_first: true
                    }
                );
                assert_eq!(
                    keys[1],
                    SortKey {
                        column: 0,
                        desc: false,
                        nulls_first: false
                    }
                );
                assert_eq!((limit, offset), (Some(5), 2));
            }
            p => panic!("{p:?}"),
        }
        assert_unsupported("select id from t limit 3");
        assert_unsupported("select id from t order by v");
    }

    #[test]
    fn aggregates_are_planned_as_partials() {
        match one(
            "select g, count(*), avg(id) from t group by g having sum(id) > 10 order by 2 desc",
        ) {
            Plan::Read {
                sql,
                merge: Merge::Aggregate(a),
                ..
            } => {
                assert_eq!(
                    sql,
                    "SELECT g, count(*), sum(id), count(id), sum(id) FROM t GROUP BY g"
                );
                assert_eq!(a.outputs[0], OutCol::Key(0));
                assert_eq!(a.outputs[1], OutCol::Count(1));
                assert_eq!(a.outputs[2], OutCol::Avg { sum: 2, count: 3 });
                assert_eq!(a.visible, 3);
                assert_eq!(a.having[0].output, 3);
                assert_eq!(
                    a.order[0],
                    SortKey {
                        column: 1,
                        desc: true,
                        nulls_first: true
                    }
                );
            }
            p => panic!("{p:?}"),
        }
        assert_unsupported("select count(distinct g) from t");
        assert_unsupported("select sum(id) / count(*) from t");
        assert_unsupported("select row_number() over () from t");
    }

    #[test]
    fn joins_must_be_co_located_or_with_replicated_tables() {
        match one("select t.v, u.w from t join u on t.id = u.id") {
            Plan::Read { groups, .. } => assert_eq!(groups, vec![0, 1]),
            p => panic!("{p:?}"),
        }
        match one("select t.v, r.name from t join r on t.g = r.k") {
            Plan::Read { groups, .. } => assert_eq!(groups, vec![0, 1]),
            p => panic!("{p:?}"),
        }
        assert_unsupported("select * from t join u on t.id = u.uid");
        assert_unsupported("select * from t, s where t.g = s.a");
        assert_unsupported("select * from r left join t on r.k = t.id");
        assert_unsupported("select * from t where id in (select id from u)");
    }

    #[test]
    fn catalog_reads_go_to_any_group() {
        assert_eq!(
            one("select relname from pg_class"),
            Plan::AnyGroup {
                sql: "select relname from pg_class".into(),
                tag: "SELECT"
            }
        );
        match one("SELECT c.relname FROM pg_catalog.pg_class c WHERE c.relname OPERATOR(pg_catalog.~) '^(t)$'") {
            Plan::AnyGroup { .. } => {}
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn ddl_vacuum_and_transactions() {
        assert!(matches!(
            one("vacuum analyze t"),
            Plan::EveryGroupAlone { .. }
        ));
        assert!(matches!(one("begin"), Plan::Begin));
        assert!(matches!(one("end"), Plan::Commit));
        assert!(matches!(one("truncate t"), Plan::Ddl { .. }));
        let in_txn = plan_query("truncate t", &catalog(), true);
        assert!(matches!(in_txn[0], Plan::Write { .. }), "{in_txn:?}");
        assert!(matches!(
            plan_query("create table z (a int)", &catalog(), true)[0],
            Plan::Unsupported(_)
        ));
        match one("alter table t add column extra int") {
            Plan::Ddl {
                change: Change::SetColumns { columns, .. },
                ..
            } => assert_eq!(columns.last().map(|s| s.as_str()), Some("extra")),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn copy_plan_finds_the_distribution_field() {
        match one("copy u (w, id, uid) from stdin with (freeze on)") {
            Plan::CopyIn {
                sql,
                ncolumns,
                dist,
            } => {
                assert_eq!(sql, "COPY u (w, id, uid) FROM STDIN");
                assert_eq!(ncolumns, 3);
                assert_eq!(dist, Some((1, KeyKind::Integer)));
            }
            p => panic!("{p:?}"),
        }
        assert_unsupported("copy t from stdin with (format csv)");
        assert_unsupported("copy t to stdout");
    }

    #[test]
    fn savepoints_keep_their_names() {
        for (sql, op) in [
            ("savepoint a", SavepointOp::Create("a".into())),
            ("release savepoint a", SavepointOp::Release("a".into())),
            ("release a", SavepointOp::Release("a".into())),
            (
                "rollback to savepoint a",
                SavepointOp::RollbackTo("a".into()),
            ),
            ("rollback to a", SavepointOp::RollbackTo("a".into())),
        ] {
            match one(sql) {
                Plan::Savepoint { sql: s, op: o } => {
                    assert_eq!(o, op, "{sql}");
                    assert_eq!(s, sql);
                }
                p => panic!("{sql}: {p:?}"),
            }
        }
    }
}
