//! Error text for operators: every binary prints one line per error.

/// Folds a multi-line message (e.g. TOML's parse error with its source excerpt) into
/// one line, dropping the lines that only hold `|` and `^` markers.
pub fn one_line(msg: &str) -> String {
    msg.lines()
        .map(str::trim)
        .filter(|l| !l.chars().all(|c| c == '|' || c == '^' || c.is_whitespace()))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_errors_fold_into_one_line() {
        let msg = "config x.toml: TOML parse error at line 9, column 1\n  |\n9 | [cluster]\n  | ^^^^^^^^^\nmissing field `os_user`\n";
        assert_eq!(
            one_line(msg),
            "config x.toml: TOML parse error at line 9, column 1; 9 | [cluster]; missing field `os_user`"
        );
    }
}
