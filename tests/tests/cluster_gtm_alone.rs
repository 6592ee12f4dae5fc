//! Issue 9 §1, as an operator would meet it, with real processes: the GTM standby is
//! frozen, the CMServer orders the primary to run alone, the primary hands out GXIDs
//! far beyond the standby's boundary, then the primary freezes and the standby
//! resumes. The standby (which still says `ready`) must never be promoted: the pair
//! stays down and status says why; `cm_ctl failover --instance gtm2` refuses and
//! names the risk. Once gtm1 resumes, the pair heals, and a switchover through the
//! CMServer (old primary fenced first) continues above every GXID handed out.

#[path = "failover_support.rs"]
mod failover_support;

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use failover_support::{next_gxid, role_of, wait_layout};
use mpp_ha_tests::{run_bin, status_member, wait_for, LocalCluster};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const PORT_BASE: u16 = 19000;

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

/// `gtm next --count n`: the highest GXID handed out.
fn take(c: &LocalCluster, n: u64) -> Result<u64> {
    let config = c.config.display().to_string();
    let out = run_bin(
        "gtm",
        &["next", "--config", &config, "--count", &n.to_string()],
    );
    if !out.success {
        bail!("gtm next failed: {}", out.stderr.trim());
    }
    out.stdout
        .lines()
        .last()
        .context("gtm next printed nothing")?
        .trim()
        .parse()
        .context("gtm next output")
}

/// The GTM rows' details, joined.
fn gtm_details(s: &serde_json::Value) -> String {
    s["gtm"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            format!(
                "{} {} {}: {}",
                r["name"], r["role"], r["state"], r["detail"]
            )
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_missed_run_alone_boundaries_is_never_promoted() -> Result<()> {
    let c = LocalCluster::new("cluster-gtm-alone", PORT_BASE);
    c.up(120)?;
    let mut frozen = Frozen(Vec::new());
    let gtm1 = c.gtm_pid("gtm1").context("gtm1 pid")?;
    let gtm2 = c.gtm_pid("gtm2").context("gtm2 pid")?;
    let mut max = next_gxid(&c)?;

    // 1. The standby freezes: the primary is ordered to run alone.
    frozen.stop(gtm2);
    wait_for("gtm1 to run alone", Duration::from_secs(40), || async {
        let s = c.status()?;
        let d = gtm_details(&s);
        Ok(d.contains("runs alone").then_some(()))
    })
    .await?;
    // 2. It hands out GXIDs far beyond the frozen standby's boundary.
    for _ in 0..20 {
        let top = wait_for("a block of GXIDs", Duration::from_secs(20), || async {
            Ok(take(&c, 2000).ok())
        })
        .await?;
        ensure!(top > max, "GXIDs went backwards: {max} then {top}");
        max = top;
    }
    ensure!(max > 30_000, "only {max} GXIDs handed out");

    // 3. The primary freezes, the standby resumes (it still says `ready`).
    frozen.stop(gtm1);
    frozen.resume(gtm2);

    // 4. No promotion of gtm2, whatever it says; status says why.
    let why = wait_for(
        "the pair to stay down with a reason",
        Duration::from_secs(40),
        || async {
            let s = c.status()?;
            if role_of(&s, "gtm2") == "primary" {
                let next = next_gxid(&c)?;
                bail!("gtm2 was promoted; it hands out {next} after {max} was handed out");
            }
            let d = gtm_details(&s);
            Ok(d.contains("no failover").then_some(d))
        },
    )
    .await?;
    eprintln!("status: {why}");
    ensure!(
        why.contains("ran alone") && why.contains("--force"),
        "the reason does not say why or what to do: {why}"
    );
    // It stays that way (several failover timeouts).
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = c.status()?;
        ensure!(
            role_of(&s, "gtm2") != "primary",
            "gtm2 promoted late: {}",
            gtm_details(&s)
        );
    }
    // The operator's failover without --force refuses and says what it risks.
    let out = c.cm_ctl(&["failover", "--instance", "gtm2"]);
    ensure!(!out.success, "failover to gtm2 accepted: {}", out.stdout);
    ensure!(
        out.stderr.contains("GXID") && out.stderr.contains("--force"),
        "unclear refusal: {}",
        out.stderr
    );

    // gtm1 resumes: the pair heals (gtm2 resyncs, run-alone off) and GXIDs continue
    // above everything handed out.
    frozen.resume(gtm1);
    wait_layout(
        &c,
        &[("gtm1", "primary", "normal"), ("gtm2", "standby", "normal")],
        Duration::from_secs(60),
    )
    .await?;
    let after = wait_for(
        "a GXID from the healed pair",
        Duration::from_secs(30),
        || async { Ok(next_gxid(&c).ok()) },
    )
    .await?;
    ensure!(after > max, "GXID {after} reused (handed out up to {max})");
    wait_for("run-alone off", Duration::from_secs(30), || async {
        let s = c.status()?;
        let g1 = status_member(&s, "gtm1").cloned().unwrap_or_default();
        Ok((g1["state"] == "normal" && !gtm_details(&s).contains("alone")).then_some(()))
    })
    .await?;

    // A manual promotion goes through the CMServer: the old primary is fenced first.
    // (Refused, saying to wait, until the CMServer has seen the pair whole again.)
    let out = wait_for("a GTM switchover", Duration::from_secs(30), || async {
        let out = c.cm_ctl(&["switchover", "--instance", "gtm2"]);
        if out.success {
            return Ok(Some(out));
        }
        ensure!(
            out.stderr.contains("wait until"),
            "GTM switchover failed: {}",
            out.stderr
        );
        bail!("{}", out.stderr.trim())
    })
    .await?;
    eprintln!("switchover: {}", out.stdout.trim());
    let s = c.status()?;
    ensure!(
        role_of(&s, "gtm2") == "primary" && role_of(&s, "gtm1") == "standby",
        "after switchover: {}",
        gtm_details(&s)
    );
    let last = wait_for("a GXID from gtm2", Duration::from_secs(30), || async {
        Ok(next_gxid(&c).ok())
    })
    .await?;
    ensure!(
        last > after,
        "GXID {last} reused (handed out up to {after})"
    );
    wait_layout(
        &c,
        &[("gtm1", "standby", "normal"), ("gtm2", "primary", "normal")],
        Duration::from_secs(60),
    )
    .await?;
    Ok(())
}
