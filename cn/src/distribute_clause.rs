//! `DISTRIBUTE BY HASH(col)` / `DISTRIBUTE BY REPLICATION`: found and removed from
//! CREATE TABLE text before sqlparser (which rejects it) and before the DNs see it.

/// The clause as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clause {
    Hash(String),
    Replication,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("syntax error in DISTRIBUTE BY: {0}")]
pub struct ClauseError(pub String);

/// Splits `sql` into the statement without the clause and the clause, if any. Quoted
/// strings and identifiers are skipped, so a literal "distribute by" is left alone.
pub fn strip(sql: &str) -> Result<(String, Option<Clause>), ClauseError> {
    let Some(start) = find_keyword_pair(sql) else {
        return Ok((sql.to_owned(), None));
    };
    let rest = &sql[start..];
    // Skip "DISTRIBUTE", whitespace, "BY".
    let after_distribute = &rest["distribute".len()..];
    let after_by = after_distribute.trim_start()["by".len()..].trim_start();
    let consumed_before = rest.len() - after_by.len();
    let lower = after_by.to_ascii_lowercase();
    let (clause, used) = if lower.starts_with("replication") {
        (Clause::Replication, "replication".len())
    } else if lower.starts_with("hash") {
        let open = after_by["hash".len()..].trim_start();
        let Some(inner) = open.strip_prefix('(') else {
            return Err(ClauseError("expected ( after HASH".into()));
        };
        let Some(close) = inner.find(')') else {
            return Err(ClauseError("expected ) after the column".into()));
        };
        let col = inner[..close].trim();
        if col.is_empty() || col.contains(',') {
            return Err(ClauseError("HASH takes exactly one column".into()));
        }
        let col = match col.strip_prefix('"').and_then(|c| c.strip_suffix('"')) {
            Some(quoted) => quoted.to_owned(),
            None => col.to_ascii_lowercase(),
        };
        let used = after_by.len() - inner[close + 1..].len();
        (Clause::Hash(col), used)
    } else {
        return Err(ClauseError("expected HASH(column) or REPLICATION".into()));
    };
    let end = start + consumed_before + used;
    let mut out = String::with_capacity(sql.len());
    out.push_str(sql[..start].trim_end());
    out.push(' ');
    out.push_str(sql[end..].trim_start());
    Ok((out.trim_end().to_owned(), Some(clause)))
}

/// Byte offset of an unquoted `DISTRIBUTE <ws> BY` (case-insensitive).
fn find_keyword_pair(sql: &str) -> Option<usize> {
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < bytes.len() && bytes[i] != q {
                    i += 1;
                }
                i += 1;
            }
            _ => {
                let word_start = i == 0 || !is_ident(bytes[i - 1]);
                if word_start
                    && sql[i..].len() >= 10
                    && sql[i..i + 10].eq_ignore_ascii_case("distribute")
                {
                    let after = &sql[i + 10..];
                    let trimmed = after.trim_start();
                    if trimmed.len() < after.len()
                        && trimmed.len() >= 2
                        && trimmed[..2].eq_ignore_ascii_case("by")
                        && !trimmed[2..]
                            .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Some(i);
                    }
                }
                i += 1;
            }
        }
    }
    None
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_clause_is_removed_and_recorded() {
        let (sql, c) = strip("CREATE TABLE t (id int, v text) DISTRIBUTE BY HASH (ID);").unwrap();
        assert_eq!(sql, "CREATE TABLE t (id int, v text) ;");
        assert_eq!(c, Some(Clause::Hash("id".into())));
    }

    #[test]
    fn replication_clause_and_with_options_after_it() {
        let (sql, c) =
            strip("create table r (k int) distribute by replication with (fillfactor=100)")
                .unwrap();
        assert_eq!(sql, "create table r (k int) with (fillfactor=100)");
        assert_eq!(c, Some(Clause::Replication));
    }

    #[test]
    fn no_clause_and_quoted_text_untouched() {
        let q = "insert into t values ('distribute by hash(x)')";
        assert_eq!(strip(q).unwrap(), (q.to_owned(), None));
    }

    #[test]
    fn malformed_clause_is_an_error() {
        assert!(strip("create table t (a int) distribute by hash a").is_err());
        assert!(strip("create table t (a int) distribute by range(a)").is_err());
        assert!(strip("create table t (a int, b int) distribute by hash(a, b)").is_err());
    }
}
