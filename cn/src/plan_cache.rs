//! Plan templates by statement shape (see [`router::Template`]): the hot path of a point
//! query plans without sqlparser. Keyed by the statement's text with `$n` for its
//! parameters: an extended-protocol statement's own text, or a simple query's text with
//! its literals lifted out ([`sql_text::lift_literals`]). Shapes without a template are
//! remembered too, so they cost one lookup more than before, not a second parse.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::catalog::Catalog;
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
}

impl PlanCache {
    /// Forgets every template (the catalog changed; the version check alone would also
    /// catch it, this frees the memory).
    pub fn clear(&self) {
        self.lock().clear();
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

    /// The plans of one simple-query statement (no `;` outside quotes).
    pub fn plan_simple(&self, sql: &str, catalog: &Catalog, in_txn: bool) -> Vec<Plan> {
        if let Some((shape, values)) = sql_text::lift_literals(sql) {
            if let Some(t) = self.template(&shape, catalog) {
                let value = |n: usize| {
                    n.checked_sub(1)
                        .and_then(|k| values.get(k))
                        .map(|v| v.as_str())
                };
                if let Some(p) = t.plan(sql, value, catalog) {
                    return vec![p];
                }
            }
        }
        router::plan_query(sql, catalog, in_txn)
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
                    cache.plan_simple(sql, &c, false),
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
    fn a_catalog_change_replans() {
        let mut c = catalog();
        let cache = PlanCache::default();
        let sql = "select v from t where id = 1";
        let before = cache.plan_simple(sql, &c, false);
        let Some(Plan::Read { groups, .. }) = before.first() else {
            panic!("{before:?}")
        };
        // Every bucket moves to the other group: the template made before must not
        // route to the old one.
        let other = 1 - groups[0] as u16;
        c.buckets.iter_mut().for_each(|b| *b = other);
        c.version += 1;
        let after = cache.plan_simple(sql, &c, false);
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
