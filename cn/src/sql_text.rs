//! Text-level helpers on SQL: binding `$n` parameters as literals (outside quotes and
//! comments), so that the router sees the values and the DNs get plain SQL.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
