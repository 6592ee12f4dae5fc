//! Text-level helpers on SQL: binding `$n` parameters as literals (outside quotes and
//! comments), so that the router sees the values and the DNs get plain SQL; splitting a
//! query string into its statements. Both walk the text with one scanner of what is not
//! code ([`skip_non_code`]), so they agree on PostgreSQL's lexical rules.

/// What [`skip_non_code`] skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NonCode {
    /// `-- ...` to the end of the line, or `/* ... */` (nested, as PostgreSQL nests them).
    Comment,
    /// A string literal (`'..'`, `E'..'` with backslash escapes), a quoted identifier
    /// (`".."`) or a dollar-quoted string (`$tag$ .. $tag$`).
    Quoted,
}

fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// If a comment, string literal, quoted identifier or dollar-quoted string starts at
/// byte `i` of `sql`: the offset just past its end (the end of `sql` when it is not
/// closed) and what it was. None when `i` is code.
fn skip_non_code(sql: &str, i: usize) -> Option<(usize, NonCode)> {
    let b = sql.as_bytes();
    let mut j = i;
    match *b.get(i)? {
        b'\'' => {
            // E'..' strings take backslash escapes; '' is a quote in either kind.
            let escapes =
                i > 0 && matches!(b[i - 1], b'e' | b'E') && !(i > 1 && is_ident_byte(b[i - 2]));
            j += 1;
            while j < b.len() {
                if escapes && b[j] == b'\\' {
                    j += 2;
                    continue;
                }
                if b[j] == b'\'' {
                    if b.get(j + 1) == Some(&b'\'') {
                        j += 2;
                        continue;
                    }
                    break;
                }
                j += 1;
            }
            Some(((j + 1).min(b.len()), NonCode::Quoted))
        }
        b'"' => {
            // "a""b" is one identifier; scanning it as two changes nothing here.
            j += 1;
            while j < b.len() && b[j] != b'"' {
                j += 1;
            }
            Some(((j + 1).min(b.len()), NonCode::Quoted))
        }
        b'-' if b.get(i + 1) == Some(&b'-') => {
            while j < b.len() && b[j] != b'\n' {
                j += 1;
            }
            Some((j, NonCode::Comment))
        }
        b'/' if b.get(i + 1) == Some(&b'*') => {
            // PostgreSQL's block comments nest.
            let mut depth = 1;
            j += 2;
            while j < b.len() && depth > 0 {
                if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                    depth += 1;
                    j += 2;
                } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            Some((j.min(b.len()), NonCode::Comment))
        }
        b'$' if !(i > 0 && is_ident_byte(b[i - 1])) => {
            // $tag$ ... $tag$; a `$1` parameter is not one (a tag never starts with a
            // digit).
            let e = i + 1 + b[i + 1..].iter().position(|c| !is_ident_byte(*c))?;
            if b[e] != b'$' || b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                return None;
            }
            let tag = &sql[i..=e];
            let end = match sql[e + 1..].find(tag) {
                Some(p) => e + 1 + p + tag.len(),
                None => b.len(),
            };
            Some((end, NonCode::Quoted))
        }
        _ => None,
    }
}

/// Replaces every `$n` outside string literals, quoted identifiers, dollar quotes and
/// comments by `literals[n-1]`.
pub fn bind_parameters(sql: &str, literals: &[String]) -> Result<String, String> {
    if literals.is_empty() {
        return Ok(sql.to_owned());
    }
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() + 16 * literals.len());
    let mut i = 0;
    let mut last = 0;
    while i < b.len() {
        if let Some((end, _)) = skip_non_code(sql, i) {
            i = end;
            continue;
        }
        if b[i] == b'$'
            && b.get(i + 1).is_some_and(u8::is_ascii_digit)
            && !(i > 0 && is_ident_byte(b[i - 1]))
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
        } else {
            i += 1;
        }
    }
    out.push_str(&sql[last.min(sql.len())..]);
    Ok(out)
}

/// A literal lifted out of a simple query's text by [`lift_literals`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Literal {
    /// Its value: the digits of an integer, a string unquoted.
    pub text: String,
    /// A standard string literal (`'..'`), else an unsigned integer.
    pub quoted: bool,
}

impl Literal {
    /// The type OID PostgreSQL's parser gives this literal, for running the shape as a
    /// statement with the literal as its parameter with the same meaning: an integer is
    /// int4 when it fits, else int8, else numeric (as `make_const` decides); a string
    /// is of unknown type (0: the DN infers it from where it stands, as for the
    /// literal).
    pub fn type_oid(&self) -> u32 {
        use pgwire::api::Type;
        if self.quoted {
            0
        } else if self.text.parse::<i32>().is_ok() {
            Type::INT4.oid()
        } else if self.text.parse::<i64>().is_ok() {
            Type::INT8.oid()
        } else {
            Type::NUMERIC.oid()
        }
    }
}

/// A simple-query statement's shape: its text with each integer and standard string
/// literal replaced by `$1`, `$2`, ... in order, and the literals (strings unquoted).
/// Numbers with a fraction, exponent or sign, and E'', B'', X'', U&'' and
/// dollar-quoted strings stay in the text. None when the text has `$n` placeholders of
/// its own (a simple query cannot bind them; PostgreSQL gives the error).
pub fn lift_literals(sql: &str) -> Option<(String, Vec<Literal>)> {
    let b = sql.as_bytes();
    let mut shape = String::with_capacity(sql.len() + 8);
    let mut values: Vec<Literal> = Vec::new();
    let mut last = 0;
    let mut i = 0;
    let lift = |shape: &mut String, values: &mut Vec<Literal>, text: String, quoted: bool| {
        values.push(Literal { text, quoted });
        shape.push('$');
        shape.push_str(&values.len().to_string());
    };
    while i < b.len() {
        if let Some((end, _)) = skip_non_code(sql, i) {
            let plain_string = b[i] == b'\''
                && end >= i + 2
                && b[end - 1] == b'\''
                && !(i > 0 && (is_ident_byte(b[i - 1]) || b[i - 1] == b'&'));
            if plain_string {
                shape.push_str(&sql[last..i]);
                lift(
                    &mut shape,
                    &mut values,
                    sql[i + 1..end - 1].replace("''", "'"),
                    true,
                );
                last = end;
            }
            i = end;
            continue;
        }
        if b[i] == b'$' && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            return None;
        }
        if b[i].is_ascii_digit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let glued_before = start > 0 && (is_ident_byte(b[start - 1]) || b[start - 1] == b'.');
            let glued_after = i < b.len() && (is_ident_byte(b[i]) || b[i] == b'.');
            if !glued_before && !glued_after {
                shape.push_str(&sql[last..start]);
                lift(&mut shape, &mut values, sql[start..i].to_owned(), false);
                last = i;
            }
            // A number glued to letters (t1, 1e5, 0x1f) is left whole.
            while i < b.len() && (is_ident_byte(b[i]) || b[i] == b'.') {
                i += 1;
            }
            continue;
        }
        i += 1;
    }
    shape.push_str(&sql[last..]);
    Some((shape, values))
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
        if let Some((end, _)) = skip_non_code(sql, i) {
            i = end;
            continue;
        }
        if b[i] == b';' {
            out.push(&sql[start..i]);
            start = i + 1;
        }
        i += 1;
    }
    out.push(&sql[start.min(sql.len())..]);
    out.retain(|s| !is_blank(s));
    out
}

/// Only whitespace and comments.
fn is_blank(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        match skip_non_code(s, i) {
            Some((end, NonCode::Comment)) => i = end,
            _ => return false,
        }
    }
    true
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
    fn binds_nothing_inside_dollar_quotes_or_nested_comments() {
        let lits = vec!["42".to_owned()];
        assert_eq!(
            bind_parameters("select $$a $1 b$$, $f$ $1 $f$, $1", &lits).unwrap(),
            "select $$a $1 b$$, $f$ $1 $f$, 42"
        );
        // The first */ closes only the inner comment: $1 after it is still commented.
        assert_eq!(
            bind_parameters("select /* a /* b */ $1 */ $1", &lits).unwrap(),
            "select /* a /* b */ $1 */ 42"
        );
        assert_eq!(
            bind_parameters("select E'it\\'s $1', $1", &lits).unwrap(),
            "select E'it\\'s $1', 42"
        );
        // Unclosed quotes and comments run to the end: nothing to bind, no panic.
        for open in ["select '$1", "select /* $1", "select $q$ $1", "select \"$1"] {
            assert_eq!(bind_parameters(open, &lits).unwrap(), open);
        }
    }

    fn texts(values: &[Literal]) -> Vec<&str> {
        values.iter().map(|l| l.text.as_str()).collect()
    }

    #[test]
    fn lifted_literals_have_the_types_the_parser_gives_them() {
        let (_, values) =
            lift_literals("select 2147483647, 2147483648, 99999999999999999999, '5'").unwrap();
        let oids: Vec<u32> = values.iter().map(Literal::type_oid).collect();
        assert_eq!(oids, [23, 20, 1700, 0]);
    }

    #[test]
    fn lifts_plain_literals_only() {
        let (shape, values) =
            lift_literals("SELECT abalance FROM pgbench_accounts WHERE aid = 1234;").unwrap();
        assert_eq!(
            shape,
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
        );
        assert_eq!(texts(&values), ["1234"]);
        assert_eq!(values[0].type_oid(), 23);
        let (shape, values) = lift_literals(
            "update t1 set v = 'it''s', w = 1.5, x = -3, y = E'a\\'b', z = 1e5 where id = 7 -- 8",
        )
        .unwrap();
        assert_eq!(
            shape,
            "update t1 set v = $1, w = 1.5, x = -$2, y = E'a\\'b', z = 1e5 where id = $3 -- 8"
        );
        assert_eq!(texts(&values), ["it's", "3", "7"]);
        assert_eq!(
            values.iter().map(|l| l.quoted).collect::<Vec<_>>(),
            [true, false, false]
        );
        let (shape, values) =
            lift_literals("select $q$ 5 $q$, /* 6 /* 7 */ 8 */ \"9\", 10").unwrap();
        assert_eq!(shape, "select $q$ 5 $q$, /* 6 /* 7 */ 8 */ \"9\", $1");
        assert_eq!(texts(&values), ["10"]);
        assert_eq!(lift_literals("select $1"), None);
        // Unclosed: left as it is (the DN gives the error).
        assert_eq!(lift_literals("select 'ab").unwrap().0, "select 'ab");
    }

    #[test]
    fn blank_statements_are_whitespace_and_comments() {
        assert!(is_blank(" -- x\n /* a /* b */ c */ \n"));
        assert!(!is_blank("/* a */ select 1"));
        assert!(!is_blank("''"));
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
