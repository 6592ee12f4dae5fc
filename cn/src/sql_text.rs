//! Text-level helpers on SQL: binding `$n` parameters as literals (outside quotes and
//! comments), so that the router sees the values and the DNs get plain SQL; splitting a
//! query string into its statements.

/// Replaces every `$n` outside string literals, quoted identifiers and comments by
/// `literals[n-1]`.
pub fn bind_parameters(sql: &str, literals: &[String]) -> Result<String, String> {
    if literals.is_empty() {
        return Ok(sql.to_owned());
    }
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() + 16 * literals.len());
    let mut i = 0;
    let mut last = 0;
    while i < b.len() {
        match b[i] {
            b'\'' | b'"' => {
                let q = b[i];
                i += 1;
                while i < b.len() && b[i] != q {
                    i += 1;
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'$' if b.get(i + 1).is_some_and(|c| c.is_ascii_digit())
                && !(i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let start = i;
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                let n: usize = sql[start + 1..i]
                    .parse()
                    .map_err(|_| "bad parameter number")?;
                let Some(lit) = n.checked_sub(1).and_then(|k| literals.get(k)) else {
                    return Err(format!("there is no parameter ${n}"));
                };
                out.push_str(&sql[last..start]);
                out.push_str(lit);
                last = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&sql[last.min(sql.len())..]);
    Ok(out)
}

/// The statements of a simple-query string, each with its own text (without the `;`),
/// split at top-level semicolons: not inside string literals (also `E'..\''`), quoted
/// identifiers, dollar quotes or comments. Empty statements are dropped, as PostgreSQL
/// drops them. Each is planned only when the ones before it have run, because an
/// earlier one may create the table a later one names.
pub fn split_statements(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => {
                // E'..' strings take backslash escapes; '' is a quote in either kind.
                let escapes = i > 0
                    && matches!(b[i - 1], b'e' | b'E')
                    && !(i > 1 && (b[i - 2].is_ascii_alphanumeric() || b[i - 2] == b'_'));
                i += 1;
                while i < b.len() {
                    if escapes && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b[i] == b'\'' {
                        if b.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += 1;
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // PostgreSQL's block comments nest.
                let mut depth = 1;
                i += 2;
                while i < b.len() && depth > 0 {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
            }
            b'$' if !(i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) => {
                // $tag$ ... $tag$ (a `$1` parameter has no closing `$` right after digits).
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
                    .map(|p| i + 1 + p);
                match tag_end {
                    Some(e)
                        if b[e] == b'$' && !b[i + 1..e].first().is_some_and(u8::is_ascii_digit) =>
                    {
                        let tag = &sql[i..=e];
                        match sql[e + 1..].find(tag) {
                            Some(p) => i = e + 1 + p + tag.len(),
                            None => i = b.len(),
                        }
                    }
                    _ => i += 1,
                }
            }
            b';' => {
                out.push(&sql[start..i]);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    out.push(&sql[start.min(sql.len())..]);
    out.retain(|s| !is_blank(s));
    out
}

/// Only whitespace and comments.
fn is_blank(s: &str) -> bool {
    let mut rest = s.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map(|x| x.1).unwrap_or("").trim_start();
        } else if rest.starts_with("/*") {
            // split_statements closed the comment (nesting included) or ran to the end.
            let mut depth = 0;
            let b = rest.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            rest = rest[i.min(rest.len())..].trim_start();
        } else {
            return rest.is_empty();
        }
    }
}

/// A name as a quoted identifier (`a"b` -> `"a""b"`), for names PostgreSQL already
/// folded.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Settings PostgreSQL reports to the client by ParameterStatus when they change
/// (GUC_REPORT), by their canonical spelling.
const REPORTED: [&str; 8] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
    "default_transaction_read_only",
    "session_authorization",
];

/// The reported setting a `SET`/`RESET` statement changes for the session, if any
/// (`SET LOCAL` changes it for the transaction only and is not followed).
pub fn reported_setting(sql: &str) -> Option<&'static str> {
    let lower = sql.trim().to_ascii_lowercase();
    let mut words = lower.split(|c: char| c.is_whitespace() || c == '=' || c == ';');
    let words: Vec<&str> = std::iter::from_fn(|| words.next())
        .filter(|w| !w.is_empty())
        .take(4)
        .collect();
    let name = match words.as_slice() {
        ["set", "local", ..] => return None,
        ["set", "session", "time", "zone", ..] | ["set", "time", "zone", ..] => "timezone",
        ["set", "session", "authorization", ..] => "session_authorization",
        ["set", "names", ..] => "client_encoding",
        ["set", "session", name, ..] | ["set", name, ..] | ["reset", name, ..] => name,
        _ => return None,
    };
    let name = name.trim_matches('"');
    REPORTED
        .iter()
        .copied()
        .find(|r| r.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_top_level_semicolons_only() {
        assert_eq!(
            split_statements("create table t (a int); insert into t values (1);"),
            vec!["create table t (a int)", " insert into t values (1)"]
        );
        assert_eq!(split_statements("select 1"), vec!["select 1"]);
        assert_eq!(split_statements(" ; ;-- nothing\n"), Vec::<&str>::new());
        let quoted = "select 'a;b', \"c;d\", E'x\\';y' -- e;f\n; select /* g; /* h; */ i; */ 2";
        assert_eq!(
            split_statements(quoted),
            vec![
                "select 'a;b', \"c;d\", E'x\\';y' -- e;f\n",
                " select /* g; /* h; */ i; */ 2"
            ]
        );
        let dollar = "do $body$ begin perform 1; end $body$; select $1, $$;$$";
        assert_eq!(
            split_statements(dollar),
            vec!["do $body$ begin perform 1; end $body$", " select $1, $$;$$"]
        );
        assert_eq!(split_statements("select 'it''s; fine'; select 2").len(), 2);
    }

    #[test]
    fn binds_outside_quotes_only() {
        let lits = vec!["42".to_owned(), "'x'".to_owned()];
        assert_eq!(
            bind_parameters(
                "select '$1', \"$2\" from t where a = $1 and b = $2 -- $1",
                &lits
            )
            .unwrap(),
            "select '$1', \"$2\" from t where a = 42 and b = 'x' -- $1"
        );
        assert!(bind_parameters("select $3", &lits).is_err());
        assert_eq!(bind_parameters("select a$1", &lits).unwrap(), "select a$1");
    }

    #[test]
    fn reported_settings_by_statement() {
        for (sql, want) in [
            ("SET application_name = 'x'", Some("application_name")),
            ("set session datestyle to 'ISO, DMY'", Some("DateStyle")),
            ("SET TIME ZONE 'UTC'", Some("TimeZone")),
            ("set timezone='UTC'", Some("TimeZone")),
            ("RESET IntervalStyle", Some("IntervalStyle")),
            ("SET NAMES 'UTF8'", Some("client_encoding")),
            ("SET LOCAL application_name = 'x'", None),
            ("SET work_mem = '8MB'", None),
            ("SET search_path TO public", None),
        ] {
            assert_eq!(reported_setting(sql), want, "{sql}");
        }
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
