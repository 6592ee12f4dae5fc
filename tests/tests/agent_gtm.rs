//! The agent's `gtm_instance` module against the real `gtm` binary: start detached,
//! probe over the Status RPC, refuse a second copy, adopt through the pid file, stop;
//! and a gtm that exits at once is reported as such.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cm_agent::gtm_instance::{describe, GtmInstance};
use ha_common::proto::gtm::Role;
use ha_common::ClusterConfig;
use mpp_ha_tests::{bin, local_config_text, wait_for, with_bin_dir, write_config, TestDir};

const PORT_BASE: u16 = 27000;

fn config(dir: &TestDir) -> Result<(ClusterConfig, std::path::PathBuf)> {
    bin("gtm"); // built?
    let text = with_bin_dir(&local_config_text(PORT_BASE, dir.path()));
    let path = write_config(dir, &text);
    Ok((ClusterConfig::load(&path)?, path))
}

/// Stops (SIGKILL) a gtm the test started if an assertion failed half way.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            if cm_agent::process::runs(pid, "gtm", None) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_gtm_start_probe_adopt_stop() -> Result<()> {
    let dir = TestDir::new("agent-gtm");
    let (cfg, path) = config(&dir)?;
    let mut gtm = GtmInstance::from_config(&cfg, "gtm1", &path)?;
    gtm.start().await?;
    let pid = gtm.pid().context("pid after start")?;
    let mut guard = KillOnDrop(Some(pid));
    assert_eq!(
        std::fs::read_to_string(&gtm.pid_file)?.trim(),
        pid.to_string()
    );
    let status = wait_for("gtm1 to answer Status", Duration::from_secs(30), || async {
        Ok(gtm.probe(Duration::from_secs(2)).await.ok())
    })
    .await?;
    assert_eq!(status.role, Role::Primary as i32, "{status:?}");
    assert!(
        describe(&status).starts_with("term "),
        "{}",
        describe(&status)
    );
    let e = gtm
        .start()
        .await
        .expect_err("a second gtm must be refused")
        .to_string();
    assert!(e.contains("already runs"), "{e}");

    // A new agent (no child handle) finds it through the pid file and /proc.
    let mut adopted = GtmInstance::from_config(&cfg, "gtm1", &path)?;
    assert_eq!(adopted.pid(), Some(pid));
    adopted.stop(Duration::from_secs(10)).await?;
    assert_eq!(adopted.pid(), None);
    assert_eq!(gtm.pid(), None, "the starter sees it gone (and reaps it)");
    assert!(!gtm.pid_file.exists());
    guard.0 = None;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_gtm_that_exits_at_once_is_reported() -> Result<()> {
    let dir = TestDir::new("agent-gtm-exit");
    let (cfg, _) = config(&dir)?;
    let mut gtm = GtmInstance::from_config(&cfg, "gtm1", Path::new("/nonexistent/cluster.toml"))?;
    match gtm.start().await {
        Ok(()) => {
            let _guard = KillOnDrop(gtm.pid());
            bail!("gtm with a missing config kept running")
        }
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("exited at once"), "{e}");
        }
    }
    assert_eq!(gtm.pid(), None);
    Ok(())
}
