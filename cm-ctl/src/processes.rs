//! The processes `cm_ctl local` starts and stops: identifying them by pid (alive, not
//! a zombie, and really ours according to /proc), starting them detached, recording
//! their pids, and stopping them with a bounded grace period.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub use ha_common::process::{alive, cmdline, cwd, program_name};

use crate::error::CtlError;
use crate::netns::Namespace;

/// One of our daemons as `cm_ctl local` starts it: `<bin> --config C --node N --base-dir B`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Daemon {
    /// `cm_server` or `cm_agent`.
    pub program: &'static str,
    /// CMServer name or host name.
    pub node: String,
    /// The host it runs on (for an agent, `node` itself).
    pub host: String,
}

impl Daemon {
    /// Whether `pid` is alive and runs this daemon for this base dir.
    pub fn is(&self, pid: u32, base_dir: &Path) -> bool {
        if !alive(pid) {
            return false;
        }
        let Some(args) = cmdline(pid) else {
            return false;
        };
        program_name(&args).as_deref() == Some(self.program)
            && arg_value(&args, "--node") == Some(self.node.as_str())
            && arg_value(&args, "--base-dir").map(Path::new) == Some(base_dir)
    }

    /// Every live process that runs this daemon for this base dir (found in /proc).
    pub fn find_running(&self, base_dir: &Path) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| self.is(*pid, base_dir))
            .collect()
    }

    /// Its arguments as `local up` starts it: `--config C --node N --base-dir B`
    /// (`is` recognises it by them).
    pub fn args(&self, config: &Path, base_dir: &Path) -> Vec<String> {
        vec![
            "--config".to_owned(),
            config.display().to_string(),
            "--node".to_owned(),
            self.node.clone(),
            "--base-dir".to_owned(),
            base_dir.display().to_string(),
        ]
    }

    /// `cm_server-cms1`, `cm_agent-h1`: the key in the pid file.
    pub fn key(&self) -> String {
        format!("{}-{}", self.program, self.node)
    }
}

fn arg_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
}

/// Starts `bin args` in its own session (setsid), stdin from /dev/null, stdout and
/// stderr appended to `log`, inside network namespace `netns` if given; returns its
/// pid without waiting for it.
pub fn spawn_detached(
    bin: &Path,
    args: &[String],
    log: &Path,
    netns: Option<&Namespace>,
) -> Result<u32, CtlError> {
    let io = |e| CtlError::io("open log", log, e);
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| CtlError::io("create directory", dir, e))?;
    }
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io)?;
    let err = out.try_clone().map_err(io)?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // The output goes to a log file: no terminal colour codes in it.
        .env("NO_COLOR", "1");
    // SAFETY: setsid and setns are async-signal-safe system calls and touch no
    // memory of the parent (the namespace file was opened before the fork).
    let ns_fd = netns.map(Namespace::raw_fd);
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = ns_fd {
                crate::netns::enter_fd(fd)?;
            }
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().map_err(|e| CtlError::io("start", bin, e))?;
    Ok(child.id())
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(raw), sig);
    }
}

/// Waits until none of `pids` is alive, for at most `timeout`; returns the survivors.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops `pids`: `first` signal, up to `grace` to exit, then SIGKILL and a short wait.
/// Returns the pids that survived even SIGKILL (should be none).
pub fn stop_all(pids: &[u32], first: Signal, grace: Duration) -> Vec<u32> {
    for pid in pids {
        signal(*pid, first);
    }
    let left = wait_gone(pids, grace);
    for pid in &left {
        signal(*pid, Signal::SIGKILL);
    }
    wait_gone(&left, Duration::from_secs(5))
}

/// The pids `cm_ctl local up` recorded: `<base_dir>/local/pids`, lines `key pid`.
#[derive(Debug, Clone)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    pub fn in_base_dir(base_dir: &Path) -> PidFile {
        PidFile {
            path: base_dir.join("local").join("pids"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `(key, pid)` pairs; a missing file is an empty list, bad lines are skipped.
    pub fn read(&self) -> Vec<(String, u32)> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (k, p) = l.trim().split_once(' ')?;
                Some((k.to_owned(), p.trim().parse().ok()?))
            })
            .collect()
    }

    pub fn lookup(&self, key: &str) -> Option<u32> {
        self.read()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, p)| p)
    }

    pub fn write(&self, entries: &[(String, u32)]) -> Result<(), CtlError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| CtlError::io("create directory", dir, e))?;
        }
        let text: String = entries.iter().map(|(k, p)| format!("{k} {p}\n")).collect();
        let tmp = self.path.with_extension("partial");
        std::fs::write(&tmp, text).map_err(|e| CtlError::io("write", &tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| CtlError::io("rename", &self.path, e))
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The pid in the first line of a pid file (PostgreSQL's `postmaster.pid`, `gtm.pid`).
pub fn read_pid_file(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Processes started from under `base_dir` that outlived their agent, found by the
/// pid files below it (at most three levels deep): postmasters (`postmaster.pid`,
/// checked by program name and by their working directory, which a postmaster sets
/// to its data dir, or their command line naming the data dir) and
/// our servers (`*.pid`, checked by program name and by their working directory or
/// arguments pointing into the base dir). Returns `(description, pid)`.
pub fn leftover_instances(base_dir: &Path) -> Vec<(String, u32)> {
    let mut pid_files = Vec::new();
    collect_pid_files(base_dir, 3, &mut pid_files);
    let base_s = base_dir.display().to_string();
    let mut out = Vec::new();
    for path in pid_files {
        let Some(pid) = read_pid_file(&path) else {
            continue;
        };
        if !alive(pid) || out.iter().any(|(_, p)| *p == pid) {
            continue;
        }
        let dir = path.parent().unwrap_or(base_dir);
        let args = cmdline(pid).unwrap_or_default();
        let program = program_name(&args).unwrap_or_default();
        if path.file_name().and_then(|n| n.to_str()) == Some("postmaster.pid") {
            let dir_s = dir.display().to_string();
            let from_here =
                same_dir(cwd(pid).as_deref(), dir) || args.iter().any(|a| a.contains(&dir_s));
            if program.starts_with("postgres") && from_here {
                out.push((format!("postmaster of {}", dir.display()), pid));
            }
            continue;
        }
        let ours = matches!(program.as_str(), "gtm" | "cn" | "dn_replicator");
        let inside = cwd(pid).is_some_and(|c| c.starts_with(base_dir))
            || args.iter().any(|a| a.starts_with(&base_s));
        if ours && inside {
            out.push((format!("{program} of {}", path.display()), pid));
        }
    }
    out
}

fn collect_pid_files(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() && depth > 0 {
            collect_pid_files(&path, depth - 1, out);
        } else if ft.is_file() && path.extension().and_then(|x| x.to_str()) == Some("pid") {
            out.push(path);
        }
    }
}

fn same_dir(a: Option<&Path>, b: &Path) -> bool {
    let Some(a) = a else { return false };
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canon(a) == canon(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_round_trip_skips_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = PidFile::in_base_dir(dir.path());
        assert!(f.read().is_empty());
        f.write(&[("cm_server-cms1".into(), 12), ("cm_agent-h1".into(), 34)])
            .unwrap();
        let mut text = std::fs::read_to_string(f.path()).unwrap();
        text.push_str("garbage\nx notanumber\n");
        std::fs::write(f.path(), text).unwrap();
        assert_eq!(f.lookup("cm_agent-h1"), Some(34));
        assert_eq!(f.read().len(), 2);
    }

    #[test]
    fn our_own_process_is_alive_and_a_foreign_daemon_is_not_ours() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(!alive(0));
        let d = Daemon {
            program: "cm_agent",
            node: "h1".into(),
            host: "h1".into(),
        };
        assert!(
            !d.is(me, Path::new("/tmp/x")),
            "the test binary is no agent"
        );
        assert_eq!(d.key(), "cm_agent-h1");
    }

    /// Runs a copy of `sleep` named `name` with `args`; killed and reaped on drop.
    struct Sleeper(std::process::Child);
    impl Sleeper {
        fn start(bin: &Path, name: &str, cwd: &Path) -> Sleeper {
            let exe = bin.join(name);
            std::fs::copy("/bin/sleep", &exe).unwrap();
            let child = Command::new(&exe)
                .arg("30")
                .current_dir(cwd)
                .spawn()
                .unwrap();
            // Until it has exec'd, /proc shows the test binary: wait for that.
            let pid = child.id();
            let deadline = Instant::now() + Duration::from_secs(10);
            while program_name(&cmdline(pid).unwrap_or_default()).as_deref() != Some(name) {
                assert!(Instant::now() < deadline, "{name} did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
            Sleeper(child)
        }
        fn pid(&self) -> u32 {
            self.0.id()
        }
    }
    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn leftovers_are_only_our_programs_from_under_the_base_dir() {
        let base = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(base.path()).unwrap();
        let bin = tempfile::tempdir().unwrap();
        // A "gtm" running from inside the base dir, with its pid file.
        let gtm = Sleeper::start(bin.path(), "gtm", &base);
        std::fs::write(base.join("gtm1.gtm.pid"), format!("{}\n", gtm.pid())).unwrap();
        // A foreign program behind a pid file (e.g. a reused pid): left alone.
        let other = Sleeper::start(bin.path(), "sleep", &base);
        let dn = base.join("dn1_h1").join("data");
        std::fs::create_dir_all(&dn).unwrap();
        std::fs::write(dn.join("postmaster.pid"), format!("{}\n/x\n", other.pid())).unwrap();
        std::fs::write(base.join("x.pid"), format!("{}\n", other.pid())).unwrap();
        // A "postgres" running from the data dir: a postmaster.
        let pm = Sleeper::start(bin.path(), "postgres", &dn);
        std::fs::write(dn.join("postmaster.pid"), format!("{}\n/x\n", pm.pid())).unwrap();

        let mut found: Vec<u32> = leftover_instances(&base)
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        found.sort_unstable();
        let mut want = vec![gtm.pid(), pm.pid()];
        want.sort_unstable();
        assert_eq!(found, want);
    }

    #[test]
    fn arg_values() {
        let args: Vec<String> = ["cm_agent", "--node", "h1", "--base-dir"]
            .map(String::from)
            .to_vec();
        assert_eq!(arg_value(&args, "--node"), Some("h1"));
        assert_eq!(arg_value(&args, "--base-dir"), None);
        assert_eq!(program_name(&args).as_deref(), Some("cm_agent"));
    }
}
