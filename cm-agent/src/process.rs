//! Which running process is one of our instances: pid files checked against `/proc`
//! (helpers in `ha_common::process`). Used to adopt instances that outlived an agent
//! restart instead of starting a second copy.

use ha_common::process::program_name;
pub use ha_common::process::{alive, cmdline, read_pid_file, state};

/// Whether `pid` is alive and its program's file name is `program`
/// (e.g. "postgres", "gtm") and, when given, one of its arguments equals `arg`.
pub fn runs(pid: u32, program: &str, arg: Option<&str>) -> bool {
    if !alive(pid) {
        return false;
    }
    let Some(args) = cmdline(pid) else {
        return false;
    };
    program_name(&args).as_deref() == Some(program)
        && arg.is_none_or(|a| args.iter().any(|x| x == a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_runs_under_its_own_name_only() {
        let me = std::process::id();
        let args = cmdline(me).unwrap();
        let name = program_name(&args).unwrap();
        assert!(runs(me, &name, None));
        assert!(!runs(me, "postgres", None));
        assert!(!runs(me, &name, Some("--no-such-argument")));
        assert!(!runs(u32::MAX, &name, None));
    }
}
