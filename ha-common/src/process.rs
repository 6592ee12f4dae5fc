//! Looking at processes by pid: alive (and not a zombie), and what they run, from
//! `/proc`. The agent uses it to adopt instances that outlived it, `cm_ctl local` to
//! find and stop what it started, the test harness to check that nothing is left.

use std::path::{Path, PathBuf};

use nix::sys::signal::kill;
use nix::unistd::Pid;

/// Whether `pid` names a live process: `kill(pid, 0)` succeeds (or is refused for
/// permission, which means it exists) and it is not a zombie (a dead child that nobody
/// reaped yet still answers `kill`; pid 1 in a container may never reap).
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

/// The one-letter state from `/proc/<pid>/stat` (R, S, D, T, Z, ...).
pub fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": comm may contain spaces and parentheses; the state follows
    // the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// The parent pid from `/proc/<pid>/stat` (the field after the state).
pub fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every live process whose parent is `pid` (one level), from `/proc`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| parent(p) == Some(pid))
        .collect()
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

/// A process's working directory.
pub fn cwd(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// The file name of a process's program (argv[0]); a postmaster that rewrote its title
/// ("postgres: dn1_h1: checkpointer") still answers "postgres".
pub fn program_name(args: &[String]) -> Option<String> {
    let first = args.first()?;
    let exe = first.split_whitespace().next().unwrap_or(first);
    Path::new(exe)
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(':').to_owned())
}

/// Reads a pid file's first line (`postmaster.pid`, `<gtm>.gtm.pid`).
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
        assert_eq!(
            parent(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
        let me = cmdline(std::process::id()).unwrap();
        assert!(program_name(&me).is_some());
    }

    #[test]
    fn a_spawned_child_is_among_our_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(children(std::process::id()).contains(&child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn zombie_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie once it exits (bounded wait).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while state(pid) != Some('Z') && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(!alive(pid));
        child.wait().unwrap();
    }

    #[test]
    fn program_names() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            program_name(&v(&["/usr/bin/gtm", "serve"])).as_deref(),
            Some("gtm")
        );
        assert_eq!(
            program_name(&v(&["postgres: dn1_h1: checkpointer"])).as_deref(),
            Some("postgres")
        );
        assert_eq!(program_name(&[]), None);
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
