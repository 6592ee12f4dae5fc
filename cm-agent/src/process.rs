//! Looking at processes by pid: alive (and not a zombie), and what they run. Used to
//! adopt instances that outlived an agent restart instead of starting a second copy.

use std::path::Path;

use nix::sys::signal::kill;
use nix::unistd::Pid;

/// Whether `pid` names a live process: `kill(pid, 0)` succeeds and it is not a zombie
/// (a dead child nobody reaped yet still answers `kill`).
pub fn alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    match kill(Pid::from_raw(raw), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => {}
        Err(_) => return false,
    }
    !matches!(state(pid), Some('Z') | Some('X'))
}

/// The one-letter state from `/proc/<pid>/stat` (R, S, D, Z, ...).
pub fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": comm may contain spaces and parentheses; the state follows
    // the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// The arguments of a running process, from `/proc/<pid>/cmdline`.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// Whether `pid` is alive and its program's file name is `program`
/// (e.g. "postgres", "gtm") and, when given, one of its arguments equals `arg`.
pub fn runs(pid: u32, program: &str, arg: Option<&str>) -> bool {
    if !alive(pid) {
        return false;
    }
    let Some(args) = cmdline(pid) else {
        return false;
    };
    let Some(first) = args.first() else {
        return false;
    };
    // A postmaster may rewrite its title ("postgres: ..."): accept the name as a prefix.
    let exe = Path::new(first.split_whitespace().next().unwrap_or(first));
    let name_ok = exe
        .file_name()
        .is_some_and(|n| n.to_string_lossy().trim_end_matches(':') == program);
    name_ok && arg.is_none_or(|a| args.iter().any(|x| x == a))
}

/// Reads a pid file's first line.
pub fn read_pid_file(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_made_up_pid_is_not() {
        assert!(alive(std::process::id()));
        assert!(!alive(0));
        assert!(!alive(u32::MAX));
        assert!(matches!(state(std::process::id()), Some('R') | Some('S')));
    }

    #[test]
    fn zombie_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie once it exits.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while state(pid) != Some('Z') && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(!alive(pid));
        child.wait().unwrap();
    }

    #[test]
    fn pid_file_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("postmaster.pid");
        std::fs::write(&p, "4242\n/data\n").unwrap();
        assert_eq!(read_pid_file(&p), Some(4242));
        std::fs::write(&p, "garbage\n").unwrap();
        assert_eq!(read_pid_file(&p), None);
    }
}
