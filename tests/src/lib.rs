//! Test harness: clusters of real processes on loopback.
//!
//! Every test gets its own base dir and its own port range (so tests run side by
//! side), starts our real binaries, waits for conditions with deadlines, and on drop
//! kills exactly the pids it started and removes its directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The `configs/local.toml` shipped with the project.
pub const LOCAL_CONFIG: &str = include_str!("../../configs/local.toml");

/// Directory holding our built binaries (`target/debug`), found from the test binary's
/// own path (`target/debug/deps/<test>`). The README's test command builds the
/// binaries before running the tests.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent dir");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("target dir").to_path_buf()
    } else {
        deps.to_path_buf()
    };
    dir
}

/// Path of one of our binaries; fails clearly if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// A per-test directory, removed (with everything in it) on drop.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// `/tmp/mpp-ha-test/<name>-<pid>`, created empty and readable by the
    /// PostgreSQL OS user (PostgreSQL data dirs are created below it by the agent).
    pub fn new(name: &str) -> TestDir {
        let root = Path::new("/tmp/mpp-ha-test");
        std::fs::create_dir_all(root).expect("create /tmp/mpp-ha-test");
        set_mode(root, 0o755);
        let path = root.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test dir");
        set_mode(&path, 0o755);
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("MPP_HA_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The local.toml layout with every port moved into `[port_base, port_base + 1000)`
/// and the given base dir. Distinct tests use distinct port bases.
pub fn local_config_text(port_base: u16, base_dir: &Path) -> String {
    let mut out = String::new();
    for line in LOCAL_CONFIG.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("port = ") {
            let port: u16 = rest.trim().parse().expect("port in local.toml");
            // local.toml uses 6401..=7102; map them onto the test's range.
            out.push_str(&format!("port = {}\n", port_base + (port - 6400)));
        } else if trimmed.starts_with("base_dir = ") {
            out.push_str(&format!("base_dir = {:?}\n", base_dir.display().to_string()));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Writes a config file for a test cluster into its dir and returns its path.
pub fn write_config(dir: &TestDir, text: &str) -> PathBuf {
    let p = dir.path().join("cluster.toml");
    std::fs::write(&p, text).expect("write config");
    p
}

/// A process started by a test. Dropping it kills it (SIGKILL, by its pid) and reaps it.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin args...` with stdout and stderr appended to `<log_dir>/<name>.log`.
    pub fn spawn(name: &str, bin: &Path, args: &[&str], log_dir: &Path) -> Result<Proc> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::options().create(true).append(true).open(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The tail of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The last `lines` lines of a file (empty if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until `check` returns Ok(Some(v)), polling every 100 ms, for at most `timeout`.
/// The error names what was awaited and the last reason it was not there yet.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("condition not met");
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_config_moves_every_port_and_the_base_dir() {
        let dir = Path::new("/tmp/x");
        let text = local_config_text(20000, dir);
        let cfg = ha_common::ClusterConfig::parse(&text, Path::new("t.toml")).unwrap();
        for r in cfg.all_refs() {
            let p = r.instance.port();
            assert!((20000..21000).contains(&p), "{} kept port {p}", r.instance.name);
        }
        assert_eq!(cfg.cluster.base_dir, dir);
    }
}
