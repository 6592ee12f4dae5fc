//! Merging rows from several DN groups into one answer: concatenation, ORDER BY with
//! LIMIT/OFFSET, and partial aggregates (count/sum/min/max/avg, GROUP BY, HAVING).
//! Values travel as PostgreSQL text; numbers are combined exactly (decimal), not as
//! floats, unless they are floats already.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::dn_wire::Column;
use crate::router::{AggPlan, CmpOp, Merge, OutCol, SortKey};

pub use crate::dn_wire::Row;

/// Merges the rows each group returned (`parts`, one Vec per group).
pub fn merge(plan: &Merge, parts: Vec<Vec<Row>>) -> Vec<Row> {
    match plan {
        Merge::Concat => parts.into_iter().flatten().collect(),
        Merge::Sorted {
            keys,
            limit,
            offset,
        } => {
            let mut rows: Vec<Row> = parts.into_iter().flatten().collect();
            sort_rows(&mut rows, keys);
            window(rows, *limit, *offset)
        }
        Merge::Aggregate(a) => aggregate(a, parts),
    }
}

fn window(rows: Vec<Row>, limit: Option<u64>, offset: u64) -> Vec<Row> {
    let it = rows.into_iter().skip(offset as usize);
    match limit {
        Some(l) => it.take(l as usize).collect(),
        None => it.collect(),
    }
}

pub fn sort_rows(rows: &mut [Row], keys: &[SortKey]) {
    rows.sort_by(|a, b| {
        for k in keys {
            let o = compare_nullable(
                a.get(k.column).and_then(|v| v.as_deref()),
                b.get(k.column).and_then(|v| v.as_deref()),
                k.desc,
                k.nulls_first,
            );
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    });
}

fn compare_nullable(a: Option<&str>, b: Option<&str>, desc: bool, nulls_first: bool) -> Ordering {
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => {
            if nulls_first {
                Ordering::Less
            } else {
                Ordering::Greater
            }
        }
        (Some(_), None) => {
            if nulls_first {
                Ordering::Greater
            } else {
                Ordering::Less
            }
        }
        (Some(x), Some(y)) => {
            let o = compare_values(x, y);
            if desc {
                o.reverse()
            } else {
                o
            }
        }
    }
}

/// Numbers compare as numbers, everything else byte-wise (the DNs use the C collation
/// order for the merge to agree with them: see docs/architecture.md).
pub fn compare_values(a: &str, b: &str) -> Ordering {
    match (Decimal::parse(a), Decimal::parse(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        _ => match (a.parse::<f64>(), b.parse::<f64>()) {
            (Ok(x), Ok(y)) if looks_numeric(a) && looks_numeric(b) => {
                x.partial_cmp(&y).unwrap_or(Ordering::Equal)
            }
            _ => a.as_bytes().cmp(b.as_bytes()),
        },
    }
}

fn looks_numeric(s: &str) -> bool {
    let s = s.trim();
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'))
}

/// An exact decimal: mantissa * 10^-scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    mantissa: i128,
    scale: u32,
}

impl Decimal {
    pub fn parse(s: &str) -> Option<Decimal> {
        let s = s.trim();
        let (neg, digits) = match s.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.chars().all(|c| c.is_ascii_digit()) || !frac.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        if int.len() + frac.len() > 36 {
            return None;
        }
        let m: i128 = format!("{int}{frac}").parse().ok()?;
        Some(Decimal {
            mantissa: if neg { -m } else { m },
            scale: frac.len() as u32,
        })
    }

    fn rescale(self, scale: u32) -> Option<i128> {
        self.mantissa
            .checked_mul(10i128.checked_pow(scale.checked_sub(self.scale)?)?)
    }

    pub fn plus(self, other: Decimal) -> Option<Decimal> {
        let scale = self.scale.max(other.scale);
        Some(Decimal {
            mantissa: self.rescale(scale)?.checked_add(other.rescale(scale)?)?,
            scale,
        })
    }

    /// `self / count` with `digits` fractional digits (rounded half away from zero).
    pub fn div_int(self, count: i128, digits: u32) -> Option<Decimal> {
        if count == 0 {
            return None;
        }
        let scale = digits.max(self.scale);
        let num = self.rescale(scale + 1)?;
        let q = num / count;
        let rounded = if q % 10 >= 5 {
            q / 10 + 1
        } else if q % 10 <= -5 {
            q / 10 - 1
        } else {
            q / 10
        };
        Some(Decimal {
            mantissa: rounded,
            scale,
        })
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        let scale = self.scale.max(other.scale);
        match (self.rescale(scale), other.rescale(scale)) {
            (Some(a), Some(b)) => a.cmp(&b),
            _ => (self.mantissa as f64 / 10f64.powi(self.scale as i32))
                .partial_cmp(&(other.mantissa as f64 / 10f64.powi(other.scale as i32)))
                .unwrap_or(Ordering::Equal),
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for Decimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let neg = self.mantissa < 0;
        let digits = self.mantissa.unsigned_abs().to_string();
        let scale = self.scale as usize;
        let padded = if digits.len() <= scale {
            format!("{}{}", "0".repeat(scale + 1 - digits.len()), digits)
        } else {
            digits
        };
        let (int, frac) = padded.split_at(padded.len() - scale);
        if neg {
            f.write_str("-")?;
        }
        f.write_str(int)?;
        if scale > 0 {
            write!(f, ".{frac}")?;
        }
        Ok(())
    }
}

/// Sum of two partial sums (text); None stays None (SQL: sum of no rows is NULL).
fn add_text(a: Option<String>, b: Option<&str>) -> Option<String> {
    match (a, b) {
        (None, None) => None,
        (Some(x), None) => Some(x),
        (None, Some(y)) => Some(y.to_owned()),
        (Some(x), Some(y)) => match (Decimal::parse(&x), Decimal::parse(y)) {
            (Some(p), Some(q)) => p.plus(q).map(|d| d.to_string()),
            _ => match (x.parse::<f64>(), y.parse::<f64>()) {
                (Ok(p), Ok(q)) => Some(format_float(p + q)),
                _ => Some(x),
            },
        },
    }
}

fn format_float(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else if v.is_nan() {
        "NaN".into()
    } else if v > 0.0 {
        "Infinity".into()
    } else {
        "-Infinity".into()
    }
}

#[derive(Debug, Clone, Default)]
struct Acc {
    values: Vec<Option<String>>,
}

/// The result columns of a merged aggregate: the names PostgreSQL would give them, and
/// the types of the DN's partial columns (a count's int8, a sum's type as the DN typed
/// it, min/max and group keys as the column), except avg: the DN ran sum and count for
/// it, and PostgreSQL's avg is float8 over floats, interval over intervals, else numeric.
pub fn aggregate_columns(plan: &AggPlan, dn: &[Column]) -> Vec<Column> {
    const FLOAT4: u32 = 700;
    const FLOAT8: u32 = 701;
    const INTERVAL: u32 = 1186;
    const NUMERIC: u32 = 1700;
    const TEXT: u32 = 25;
    plan.outputs
        .iter()
        .take(plan.visible)
        .zip(&plan.names)
        .map(|(out, name)| match *out {
            OutCol::Key(i)
            | OutCol::Count(i)
            | OutCol::Sum(i)
            | OutCol::Min(i)
            | OutCol::Max(i) => match dn.get(i) {
                Some(c) => Column {
                    name: name.clone(),
                    ..c.clone()
                },
                None => Column::computed(name, TEXT),
            },
            OutCol::Avg { sum, .. } => {
                let oid = match dn.get(sum).map(|c| c.type_oid) {
                    Some(FLOAT4 | FLOAT8) => FLOAT8,
                    Some(INTERVAL) => INTERVAL,
                    _ => NUMERIC,
                };
                Column::computed(name, oid)
            }
        })
        .collect()
}

fn aggregate(plan: &AggPlan, parts: Vec<Vec<Row>>) -> Vec<Row> {
    // Group key -> accumulated partial row (same layout as the DN rows).
    let mut groups: BTreeMap<Vec<Option<String>>, Acc> = BTreeMap::new();
    let mut order: Vec<Vec<Option<String>>> = Vec::new();
    for row in parts.into_iter().flatten() {
        let key: Vec<Option<String>> = row[..plan.key_columns.min(row.len())].to_vec();
        let acc = groups.entry(key.clone()).or_insert_with(|| {
            order.push(key.clone());
            Acc {
                values: vec![None; row.len()],
            }
        });
        for out in &plan.outputs {
            match *out {
                OutCol::Key(i) => acc.values[i] = row[i].clone(),
                OutCol::Count(i) => {
                    acc.values[i] = add_text(acc.values[i].take(), row[i].as_deref())
                }
                OutCol::Sum(i) => acc.values[i] = add_text(acc.values[i].take(), row[i].as_deref()),
                OutCol::Avg { sum, count } => {
                    acc.values[sum] = add_text(acc.values[sum].take(), row[sum].as_deref());
                    acc.values[count] = add_text(acc.values[count].take(), row[count].as_deref());
                }
                OutCol::Min(i) | OutCol::Max(i) => {
                    let want = if matches!(out, OutCol::Min(_)) {
                        Ordering::Less
                    } else {
                        Ordering::Greater
                    };
                    let replace = match (&acc.values[i], &row[i]) {
                        (_, None) => false,
                        (None, Some(_)) => true,
                        (Some(cur), Some(new)) => compare_values(new, cur) == want,
                    };
                    if replace {
                        acc.values[i] = row[i].clone();
                    }
                }
            }
        }
    }
    let mut out_rows: Vec<Row> = Vec::new();
    if groups.is_empty() && plan.scalar {
        // No input at all: count = 0, everything else NULL.
        let row: Row = plan
            .outputs
            .iter()
            .map(|o| match o {
                OutCol::Count(_) => Some("0".to_owned()),
                _ => None,
            })
            .collect();
        out_rows.push(row);
    }
    for key in order {
        let Some(acc) = groups.get(&key) else {
            continue;
        };
        let row: Row = plan
            .outputs
            .iter()
            .map(|o| match *o {
                OutCol::Key(i)
                | OutCol::Count(i)
                | OutCol::Sum(i)
                | OutCol::Min(i)
                | OutCol::Max(i) => acc.values[i].clone(),
                OutCol::Avg { sum, count } => {
                    avg(acc.values[sum].as_deref(), acc.values[count].as_deref())
                }
            })
            .collect();
        out_rows.push(row);
    }
    out_rows.retain(|row| {
        plan.having
            .iter()
            .all(|h| having_holds(row, h.output, h.op, &h.value))
    });
    sort_rows(&mut out_rows, &plan.order);
    let mut rows = window(out_rows, plan.limit, plan.offset);
    for r in rows.iter_mut() {
        r.truncate(plan.visible);
    }
    rows
}

fn avg(sum: Option<&str>, count: Option<&str>) -> Option<String> {
    let count: i128 = count?.parse().ok()?;
    if count == 0 {
        return None;
    }
    let sum = sum?;
    match Decimal::parse(sum) {
        // PostgreSQL shows avg of integers with 16 fractional digits for small values.
        Some(d) => d.div_int(count, 16).map(|d| d.to_string()),
        None => sum
            .parse::<f64>()
            .ok()
            .map(|s| format_float(s / count as f64)),
    }
}

fn having_holds(row: &Row, output: usize, op: CmpOp, value: &str) -> bool {
    let Some(Some(v)) = row.get(output) else {
        return false; // NULL compared is not true
    };
    let o = compare_values(v, value);
    match op {
        CmpOp::Eq => o == Ordering::Equal,
        CmpOp::NotEq => o != Ordering::Equal,
        CmpOp::Lt => o == Ordering::Less,
        CmpOp::LtEq => o != Ordering::Greater,
        CmpOp::Gt => o == Ordering::Greater,
        CmpOp::GtEq => o != Ordering::Less,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::HavingCond;

    fn r(v: &[Option<&str>]) -> Row {
        v.iter().map(|x| x.map(|s| s.to_owned())).collect()
    }

    #[test]
    fn decimal_add_and_avg_are_exact() {
        let a = Decimal::parse("12.50").unwrap();
        let b = Decimal::parse("-3.1").unwrap();
        assert_eq!(a.plus(b).unwrap().to_string(), "9.40");
        assert_eq!(
            Decimal::parse("5")
                .unwrap()
                .div_int(2, 16)
                .unwrap()
                .to_string(),
            "2.5000000000000000"
        );
        assert_eq!(Decimal::parse("-0.5").unwrap().to_string(), "-0.5");
    }

    #[test]
    fn sorted_merge_with_nulls_limit_offset() {
        let keys = vec![SortKey {
            column: 0,
            desc: false,
            nulls_first: false,
        }];
        let m = Merge::Sorted {
            keys,
            limit: Some(3),
            offset: 1,
        };
        let out = merge(
            &m,
            vec![
                vec![r(&[Some("1")]), r(&[Some("10")]), r(&[None])],
                vec![r(&[Some("2")]), r(&[Some("9")])],
            ],
        );
        assert_eq!(
            out,
            vec![r(&[Some("2")]), r(&[Some("9")]), r(&[Some("10")])]
        );
    }

    #[test]
    fn partial_aggregates_combine_per_group_key() {
        // DN rows: g, count(*), sum(x), count(x), min(x), max(x)
        let plan = AggPlan {
            key_columns: 1,
            outputs: vec![
                OutCol::Key(0),
                OutCol::Count(1),
                OutCol::Avg { sum: 2, count: 3 },
                OutCol::Min(4),
                OutCol::Max(5),
            ],
            visible: 5,
            having: vec![HavingCond {
                output: 1,
                op: CmpOp::Gt,
                value: "2".into(),
            }],
            order: vec![SortKey {
                column: 0,
                desc: false,
                nulls_first: false,
            }],
            limit: None,
            offset: 0,
            scalar: false,
            names: vec![],
        };
        let out = merge(
            &Merge::Aggregate(plan),
            vec![
                vec![
                    r(&[
                        Some("a"),
                        Some("2"),
                        Some("3"),
                        Some("2"),
                        Some("1"),
                        Some("2"),
                    ]),
                    r(&[
                        Some("b"),
                        Some("1"),
                        Some("5"),
                        Some("1"),
                        Some("5"),
                        Some("5"),
                    ]),
                ],
                vec![r(&[
                    Some("a"),
                    Some("1"),
                    Some("10"),
                    Some("1"),
                    Some("10"),
                    Some("10"),
                ])],
            ],
        );
        assert_eq!(
            out,
            vec![r(&[
                Some("a"),
                Some("3"),
                Some("4.3333333333333333"),
                Some("1"),
                Some("10")
            ])]
        );
    }

    #[test]
    fn scalar_aggregate_of_nothing_is_one_row() {
        let plan = AggPlan {
            key_columns: 0,
            outputs: vec![OutCol::Count(0), OutCol::Sum(1)],
            visible: 2,
            having: vec![],
            order: vec![],
            limit: None,
            offset: 0,
            scalar: true,
            names: vec![],
        };
        let out = merge(&Merge::Aggregate(plan), vec![vec![], vec![]]);
        assert_eq!(out, vec![r(&[Some("0"), None])]);
    }
}
