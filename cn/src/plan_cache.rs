//! Plan templates by statement shape (see [`router::Template`]): the hot path of a point
//! query plans without sqlparser. Keyed by the statement's text with `$n` for its
//! parameters: an extended-protocol statement's own text, or a simple query's text with
//! its literals lifted out ([`sql_text::lift_literals`]). Shapes without a template are
//! remembered too, so they cost one lookup more than before, not a second parse.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::catalog::Catalog;
use crate::dn::Prepared;
use crate::router::{self, Plan, Template};
use crate::sql_text;

/// Distinct shapes kept; past it the cache starts over (a client that sends ever new
/// shapes, e.g. IN lists of every length, must not grow the CN without bound).
const MAX_SHAPES: usize = 4096;

/// Shape text -> (catalog version it was made at, its template if it has one).
type Shapes = HashMap<String, (u64, Option<Arc<Template>>)>;

#[derive(Default)]
pub struct PlanCache {
    shapes: Mutex<Shapes>,
    /// Simple-query shapes (statement text) the DN refused to prepare.
    refused: Mutex<HashSet<String>>,
}

impl PlanCache {
    /// Forgets every template (the catalog changed; the version check alone would also
    /// catch it, this frees the memory).
    pub fn clear(&self) {
        self.lock().clear();
        self.refused().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shapes> {
        self.shapes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The template of `shape` at `catalog`'s version. The caller holds the catalog's
    /// read lock, so no catalog change lands between making and keeping it.
    fn template(&self, shape: &str, catalog: &Catalog) -> Option<Arc<Template>> {
        if let Some((version, t)) = self.lock().get(shape) {
            if *version == catalog.version {
                return t.clone();
            }
        }
        let t = Template::make(shape, catalog).map(Arc::new);
        let mut shapes = self.lock();
        if shapes.len() >= MAX_SHAPES {
            shapes.clear();
        }
        shapes.insert(shape.to_owned(), (catalog.version, t.clone()));
        t
    }

    /// The plans of one simple-query statement (no `;` outside quotes), and, when its
    /// shape has a one-group template the DN can run as a named statement, that
    /// statement with the literals as its parameters (see [`preparable`]).
    pub fn plan_simple(
        &self,
        sql: &str,
        catalog: &Catalog,
        in_txn: bool,
    ) -> (Vec<Plan>, Option<Prepared>) {
        if let Some((shape, literals)) = sql_text::lift_literals(sql) {
            if let Some(t) = self.template(&shape, catalog) {
                let value = |n: usize| {
                    n.checked_sub(1)
                        .and_then(|k| literals.get(k))
                        .map(|l| l.text.as_str())
                };
                if let Some(p) = t.plan(sql, value, catalog) {
                    let text = router::statement_text(&shape);
                    let prepared =
                        (!in_txn && preparable(text, &literals) && !self.refused().contains(text))
                            .then(|| Prepared {
                                sql: text.to_owned(),
                                types: literals.iter().map(sql_text::Literal::type_oid).collect(),
                                values: literals.into_iter().map(|l| Some(l.text)).collect(),
                            });
                    return (vec![p], prepared);
                }
            }
        }
        (router::plan_query(sql, catalog, in_txn), None)
    }

    fn refused(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The DN would not prepare this simple query's shape (e.g. a literal where
    /// PostgreSQL's grammar takes no parameter, `interval '1 day'`): the shape runs as
    /// text from now on.
    pub fn refuse_shape(&self, prepared_sql: &str) {
        let mut refused = self.refused();
        if refused.len() >= MAX_SHAPES {
            refused.clear();
        }
        // Kept by the shape's statement text, as [`Self::plan_simple`] looks it up.
        refused.insert(prepared_sql.to_owned());
    }

    /// The plans of an extended-protocol statement: `shape` is its text (`$n` for its
    /// parameters), `bound` the same with the parameters bound as literals, `values`
    /// the parameters' texts (None: NULL).
    /// The plan of a bound statement, and whether it came from the shape's template
    /// (then the DNs may run the shape itself with the values as parameters).
    pub fn plan_bound(
        &self,
        shape: &str,
        bound: &str,
        values: &[Option<String>],
        catalog: &Catalog,
        in_txn: bool,
    ) -> (Vec<Plan>, bool) {
        if let Some(t) = self.template(shape, catalog) {
            let value = |n: usize| {
                n.checked_sub(1)
                    .and_then(|k| values.get(k))
                    .and_then(|v| v.as_deref())
            };
            if let Some(p) = t.plan(bound, value, catalog) {
                return (vec![p], true);
            }
        }
        (router::plan_query(bound, catalog, in_txn), false)
    }
}

/// Whether a simple query's shape means the same run as a named statement with its
/// literals as parameters (typed as the parser types them, [`sql_text::Literal`]).
/// Not where a literal is more than a value: `ORDER BY 1` and `GROUP BY 1` name a
/// column, a parameter there would be a constant. Not with a backslash in a string: its
/// meaning as a literal depends on `standard_conforming_strings`. A literal where the
/// grammar takes no parameter (`interval '1 day'`, `varchar(10)`) makes the DN refuse
/// the Parse; the caller then runs the text ([`PlanCache::refuse_shape`]).
fn preparable(shape: &str, literals: &[sql_text::Literal]) -> bool {
    let lower = shape.to_ascii_lowercase();
    !lower.contains("order")
        && !lower.contains("group")
        && !literals.iter().any(|l| l.text.contains('\\'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;

    fn catalog() -> Catalog {
        let mut c = Catalog::new(vec!["dn1".into(), "dn2".into()]);
        for p in router::plan_query("create table t (id int primary key, v text)", &c, false) {
            let Plan::Ddl { change, .. } = p else {
                panic!("{p:?}")
            };
            c.apply(&change);
        }
        c
    }

    #[test]
    fn simple_queries_plan_as_the_router_does_and_shapes_are_kept() {
        let c = catalog();
        let cache = PlanCache::default();
        for sql in [
            "SELECT v FROM t WHERE id = 1;",
            "SELECT v FROM t WHERE id = 2",
            "select v from t where id = '3'",
            "select v from t where id = 4 and v = 'it''s'",
            "update t set v = 'x' where id = 5",
            "select v from t where v = 'a'",
            "select count(*) from t",
            "begin",
            "commit",
        ] {
            for _ in 0..2 {
                assert_eq!(
                    cache.plan_simple(sql, &c, false).0,
                    router::plan_query(sql, &c, false),
                    "{sql}"
                );
            }
        }
        // One entry per shape (the first two differ by their `;`), with or without a
        // template.
        assert_eq!(cache.lock().len(), 9);
    }

    #[test]
    fn one_group_simple_queries_run_as_named_statements_where_the_meaning_is_the_same() {
        let c = catalog();
        let cache = PlanCache::default();
        let prepared = |sql: &str, in_txn: bool| cache.plan_simple(sql, &c, in_txn).1;
        let p = prepared("SELECT v FROM t WHERE id = 7;", false).expect("a point read");
        assert_eq!(p.sql, "SELECT v FROM t WHERE id = $1");
        assert_eq!(p.types, [23]);
        assert_eq!(p.values, [Some("7".to_owned())]);
        let p = prepared("update t set v = 'x' where id = 5", false).expect("a point write");
        assert_eq!(
            (p.types, p.values),
            (vec![0, 23], vec![Some("x".into()), Some("5".into())])
        );
        // Inside BEGIN, a refused Parse would end the DN transaction: text only.
        assert!(prepared("select v from t where id = 7", true).is_none());
        // A literal that names a column, or whose meaning depends on a setting.
        assert!(prepared("select v, id from t where id = 7 order by 2", false).is_none());
        assert!(prepared("select v from t where id = 7 group by 1", false).is_none());
        assert!(prepared("select v from t where id = 7 and v = 'a\\b'", false).is_none());
        // Scatters have no template.
        assert!(prepared("select v from t where v = 'a'", false).is_none());
        // A shape the DN refused runs as text from then on.
        // (PostgreSQL cannot tell the type of a parameter that stands alone.)
        let sql = "select 'a', v from t where id = 7";
        let shape = prepared(sql, false)
            .expect("not known to be refused yet")
            .sql;
        cache.refuse_shape(&shape);
        assert!(prepared(sql, false).is_none());
        assert!(prepared("select v from t where id = 8", false).is_some());
        cache.clear();
        assert!(prepared(sql, false).is_some());
    }

    #[test]
    fn a_catalog_change_replans() {
        let mut c = catalog();
        let cache = PlanCache::default();
        let sql = "select v from t where id = 1";
        let before = cache.plan_simple(sql, &c, false).0;
        let Some(Plan::Read { groups, .. }) = before.first() else {
            panic!("{before:?}")
        };
        // Every bucket moves to the other group: the template made before must not
        // route to the old one.
        let other = 1 - groups[0] as u16;
        c.buckets.iter_mut().for_each(|b| *b = other);
        c.version += 1;
        let after = cache.plan_simple(sql, &c, false).0;
        assert_eq!(after, router::plan_query(sql, &c, false));
        assert_ne!(before, after);
    }

    #[test]
    fn bound_statements_plan_as_the_router_does() {
        let c = catalog();
        let cache = PlanCache::default();
        let shape = "SELECT v FROM t WHERE id = $1";
        for v in [Some("10"), Some("11"), None] {
            let lit = v.map(|v| format!("'{v}'::int4")).unwrap_or("NULL".into());
            let bound = crate::sql_text::bind_parameters(shape, &[lit]).unwrap();
            let values = [v.map(str::to_owned)];
            assert_eq!(
                cache.plan_bound(shape, &bound, &values, &c, false).0,
                router::plan_query(&bound, &c, false),
                "{bound}"
            );
        }
    }
}
