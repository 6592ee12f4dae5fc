//! One of our own server binaries (`gtm serve`, `cn serve`, `dn_replicator serve`) run
//! as a detached process: its own session (so it outlives the agent), its pid in a pid file (so a restarted
//! agent adopts it instead of starting a second copy), its output appended to a log.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ha_common::config::ClusterConfig;

use crate::error::{AgentError, Result};
use crate::process;

/// How long a freshly started process must stay up to count as started.
const STARTUP_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct Detached {
    /// The instance name (also an argument of the process: `--node NAME`).
    pub name: String,
    /// The program's file name ("gtm", "cn"): what a pid must run to be ours.
    pub program: String,
    pub binary: PathBuf,
    pub pid_file: PathBuf,
    pub log_file: PathBuf,
    pub config_path: PathBuf,
    pub base_dir: PathBuf,
    /// Set when this agent started it: reaped here so that it never lingers as a zombie.
    child: Option<Child>,
    /// Appended to the `serve` command line (e.g. the GTM's `--require-lease`).
    pub extra_args: Vec<String>,
}

impl Detached {
    /// `<bin_dir>/<program> serve --config <config_path> --node <name> --base-dir
    /// <base_dir>`, with `<base_dir>/<name>.<program>.pid` and `.log` beside the
    /// instance's dir (not in it: a server may create its dir itself, atomically).
    pub fn serve(cfg: &ClusterConfig, program: &str, name: &str, config_path: &Path) -> Detached {
        let base_dir = cfg.cluster.base_dir.clone();
        Detached {
            name: name.to_owned(),
            program: program.to_owned(),
            binary: cfg.bin_dir().join(program),
            pid_file: base_dir.join(format!("{name}.{program}.pid")),
            log_file: base_dir.join(format!("{name}.{program}.log")),
            config_path: config_path.to_owned(),
            base_dir,
            child: None,
            extra_args: Vec::new(),
        }
    }

    /// The pid of the running process of this instance, if any.
    pub fn pid(&mut self) -> Option<u32> {
        if let Some(child) = self.child.as_mut() {
            match child.try_wait() {
                Ok(None) => return Some(child.id()),
                _ => self.child = None,
            }
        }
        let pid = process::read_pid_file(&self.pid_file)?;
        process::runs(pid, &self.program, Some(&self.name)).then_some(pid)
    }

    /// Starts it detached. Fails if it already runs, the binary is missing or it
    /// exits at once (with the tail of its log).
    pub async fn start(&mut self) -> Result<()> {
        let program = self.program.clone();
        if let Some(pid) = self.pid() {
            return Err(AgentError::Instance(format!(
                "{}: {program} already runs (pid {pid})",
                self.name
            )));
        }
        if !self.binary.exists() {
            return Err(AgentError::Instance(format!(
                "{program} binary not found at {}",
                self.binary.display()
            )));
        }
        std::fs::create_dir_all(&self.base_dir)
            .map_err(|e| AgentError::io("create directory", &self.base_dir, e))?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .map_err(|e| AgentError::io("open", &self.log_file, e))?;
        let err = log
            .try_clone()
            .map_err(|e| AgentError::io("open", &self.log_file, e))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--node")
            .arg(&self.name)
            .arg("--base-dir")
            .arg(&self.base_dir)
            .args(&self.extra_args)
            .current_dir(&self.base_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().map_err(|source| AgentError::Spawn {
            program: self.binary.display().to_string(),
            source,
        })?;
        let pid = child.id();
        std::fs::write(&self.pid_file, format!("{pid}\n"))
            .map_err(|e| AgentError::io("write", &self.pid_file, e))?;
        let deadline = Instant::now() + STARTUP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                let _ = std::fs::remove_file(&self.pid_file);
                return Err(AgentError::Instance(format!(
                    "{program} exited at once ({status}): {}",
                    self.log_tail(3)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.child = Some(child);
        Ok(())
    }

    /// Stops it (SIGTERM, then SIGKILL after `grace`).
    pub async fn stop(&mut self, grace: Duration) -> Result<()> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let target = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while self.pid().is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.pid().is_some() {
            let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.pid().is_some() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if self.pid().is_some() {
            return Err(AgentError::Instance(format!(
                "{}: {} (pid {pid}) does not stop",
                self.name, self.program
            )));
        }
        let _ = std::fs::remove_file(&self.pid_file);
        Ok(())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        all[all.len().saturating_sub(lines)..].join(" | ")
    }
}

/// Test support: the shipped local config with `base_dir` = `dir` and a `bin_dir`
/// below it that holds no binaries.
#[cfg(test)]
pub(crate) fn config_without_binaries(dir: &Path) -> ClusterConfig {
    let text = include_str!("../../configs/local.toml")
        .replace(
            "base_dir = \"/tmp/mpp-ha\"",
            &format!("base_dir = {:?}", dir.display().to_string()),
        )
        .replace(
            "# bin_dir = \"/usr/local/bin\"",
            &format!("bin_dir = {:?}", dir.join("nobin").display().to_string()),
        );
    ClusterConfig::parse(&text, Path::new("t.toml")).expect("the local config parses")
}
