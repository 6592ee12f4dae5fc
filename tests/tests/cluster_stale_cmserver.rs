//! Issue 9 §2, with real processes: a CMServer that was unreachable while the primary
//! decided must never act on its older state. The standby CMServer is down (kill -9:
//! a SIGSTOPped one would read the primary's pushes queued in its sockets when
//! resumed), the primary stops dn2_h3 (`cm_ctl stop`), then the primary freezes and
//! the stale one is started again from its older state file. It must not lead with
//! that state (which would start dn2_h3 again): the agents refuse it their lease (it
//! is older than what a primary showed them) until it has fetched the newer state.
//! Once the other resumes, a primary is elected and dn2_h3 is still stopped.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mpp_ha_tests::{bin, kill9, member_state, pid_alive, wait_for, LocalCluster, Proc};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const PORT_BASE: u16 = 20000;

fn signal(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

/// Resumes the frozen processes when dropped (also when the test fails).
struct Frozen(Vec<u32>);

impl Frozen {
    fn stop(&mut self, pid: u32) {
        signal(pid, Signal::SIGSTOP);
        self.0.push(pid);
    }
    fn resume(&mut self, pid: u32) {
        signal(pid, Signal::SIGCONT);
        self.0.retain(|p| *p != pid);
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for p in &self.0 {
            signal(*p, Signal::SIGCONT);
        }
    }
}

/// The primary CMServer's name, from status.
fn primary_cms(s: &serde_json::Value) -> Result<String> {
    s["cm_servers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["role"] == "primary")
        .and_then(|r| r["name"].as_str())
        .map(str::to_owned)
        .context("no primary CMServer in status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cmserver_that_missed_a_decision_never_acts_on_its_older_state() -> Result<()> {
    let c = LocalCluster::new("cluster-stale-cms", PORT_BASE);
    c.up(120)?;
    let mut frozen = Frozen(Vec::new());
    let primary = primary_cms(&c.status()?)?;
    let stale = if primary == "cms1" { "cms2" } else { "cms1" };
    let pid_of = |n: &str| {
        c.recorded_pid(&format!("cm_server-{n}"))
            .with_context(|| format!("{n} pid"))
    };
    let (p_pid, s_pid) = (pid_of(&primary)?, pid_of(stale)?);

    // The standby CMServer is down while the primary decides.
    kill9(s_pid);
    wait_for(
        "the standby CMServer to die",
        Duration::from_secs(10),
        || async { Ok((!pid_alive(s_pid)).then_some(())) },
    )
    .await?;
    let out = c.cm_ctl(&["stop", "--instance", "dn2_h3"]);
    ensure!(out.success, "cm_ctl stop failed: {}", out.stderr);
    ensure!(
        c.postmaster_pid("dn2_h3").is_none(),
        "dn2_h3 still runs after stop"
    );
    // Let every agent see the new state in a primary's reply.
    let heartbeat = c.cfg.timing.heartbeat_interval();
    tokio::time::sleep(heartbeat * 3).await;

    // The primary freezes; the stale one is back, from its older state file.
    frozen.stop(p_pid);
    let config = c.config.display().to_string();
    let base = c.base_dir().display().to_string();
    let _stale = Proc::spawn(
        &format!("{stale}-again"),
        &bin("cm_server"),
        &["--config", &config, "--node", stale, "--base-dir", &base],
        c.dir.path(),
    )?;
    let watch = c.cfg.timing.cm_lease() * 4 + heartbeat * 4;
    let t0 = Instant::now();
    while t0.elapsed() < watch {
        ensure!(
            c.postmaster_pid("dn2_h3").is_none(),
            "{stale} acted on its older state: dn2_h3 was started again after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The other resumes: a primary is elected, with the newer state.
    frozen.resume(p_pid);
    let s = wait_for("a primary CMServer", Duration::from_secs(40), || async {
        let s = c.status()?;
        primary_cms(&s)?;
        if member_state(&s, "dn2_h3") != "stopped" {
            bail!("dn2_h3 is {}", member_state(&s, "dn2_h3"));
        }
        Ok(Some(s))
    })
    .await?;
    eprintln!("primary after the freeze: {}", primary_cms(&s)?);
    ensure!(
        c.postmaster_pid("dn2_h3").is_none(),
        "dn2_h3 was started again"
    );
    // Both CMServers normal again (the stale one took the newer state).
    wait_for("both CMServers normal", Duration::from_secs(40), || async {
        let s = c.status()?;
        let rows = s["cm_servers"].as_array().cloned().unwrap_or_default();
        Ok(rows.iter().all(|r| r["state"] == "normal").then_some(()))
    })
    .await?;
    ensure!(
        c.postmaster_pid("dn2_h3").is_none(),
        "dn2_h3 was started again"
    );
    Ok(())
}
