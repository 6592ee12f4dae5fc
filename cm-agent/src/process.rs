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

/// The pid of the postmaster running on `data_dir`: `postmaster.pid` names a live
/// `postgres` whose working directory is that data dir (a postmaster changes to its
/// data dir at start). After a reboot or pid reuse the file may name a foreign
/// process, even another cluster's postgres: adopting it would mean never restarting
/// a dead instance, and `pg_ctl stop` would signal a stranger.
pub fn postmaster_of(data_dir: &std::path::Path) -> Option<u32> {
    let pid = read_pid_file(&data_dir.join("postmaster.pid"))?;
    if !runs(pid, "postgres", None) {
        return None;
    }
    let cwd = ha_common::process::cwd(pid)?;
    let dir = std::fs::canonicalize(data_dir).ok()?;
    (cwd == dir).then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy of `sleep` called `postgres`, started in `cwd`.
    fn fake_postgres(bin_dir: &std::path::Path, cwd: &std::path::Path) -> std::process::Child {
        let exe = bin_dir.join("postgres");
        if !exe.exists() {
            std::fs::copy("/bin/sleep", &exe).unwrap();
        }
        let child = std::process::Command::new(&exe)
            .arg("30")
            .current_dir(cwd)
            .spawn()
            .unwrap();
        // spawn may return while the exec is still setting up the new arguments.
        for _ in 0..200 {
            if cmdline(child.id()).is_some_and(|a| !a.is_empty()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child
    }

    #[test]
    fn only_the_postmaster_of_this_data_dir_is_adopted() {
        let base = tempfile::tempdir().unwrap();
        let (bin, data, other) = (
            base.path().join("bin"),
            base.path().join("data"),
            base.path().join("other"),
        );
        for d in [&bin, &data, &other] {
            std::fs::create_dir(d).unwrap();
        }
        // A reused pid: a postgres of another data dir.
        let mut foreign = fake_postgres(&bin, &other);
        std::fs::write(
            data.join("postmaster.pid"),
            format!("{}\n{}\n", foreign.id(), data.display()),
        )
        .unwrap();
        let adopted = postmaster_of(&data);
        let _ = foreign.kill();
        let _ = foreign.wait();
        assert_eq!(adopted, None, "adopted another data dir's postgres");
        // The real one (its cwd is the data dir).
        let mut ours = fake_postgres(&bin, &data);
        std::fs::write(data.join("postmaster.pid"), format!("{}\n", ours.id())).unwrap();
        let adopted = postmaster_of(&data);
        let _ = ours.kill();
        let _ = ours.wait();
        assert_eq!(adopted, Some(ours.id()));
        // Dead: nothing.
        assert_eq!(postmaster_of(&data), None);
    }

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
