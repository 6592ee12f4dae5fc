//! The operator's role changes on a running cluster, with real processes:
//! - `cm_ctl switchover` to dn1's standby and back, under a loop of single-row
//!   commits: the first layout is restored, no acknowledged commit is lost, and the
//!   write outage is measured;
//! - `cm_ctl failover` refuses (one line, non-zero exit) when it could lose data or
//!   cannot work: standby stopped, not a standby, unknown instance;
//! - `cm_ctl build` rebuilds a standby, which is normal again afterwards;
//! - `cm_ctl failover --instance gtm2`: the GTM pair swaps roles, GXIDs keep increasing.

#[path = "failover_support.rs"]
mod failover_support;

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use failover_support::*;
use mpp_ha_tests::{wait_for, LocalCluster};

const PORT_BASE: u16 = 28000;

/// The longest gap between consecutive acknowledged commits after `from`.
fn longest_gap(acks: &[Ack], from: Instant) -> Duration {
    acks.windows(2)
        .filter(|w| w[1].at > from)
        .map(|w| w[1].at.duration_since(w[0].at))
        .max()
        .unwrap_or_default()
}

fn one_line_error(out: &mpp_ha_tests::CmdOutput, needle: &str) -> Result<()> {
    ensure!(!out.success, "expected a refusal: {out:?}");
    let err = out.stderr.trim();
    ensure!(err.lines().count() == 1, "not one line: {err}");
    ensure!(err.contains(needle), "{err:?} does not say {needle:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_there_and_back_and_failover_refusals() -> Result<()> {
    let c = LocalCluster::new("cluster-failover-switchover", PORT_BASE);
    c.up(120)?;
    let (p1, p2) = (c.port("dn1_h1"), c.port("dn1_h2"));
    create_table(p1).await?;
    let writer = Writer::start(vec![p1, p2], Duration::from_secs(5));
    writer.wait_more(50, Duration::from_secs(30)).await?;
    // dn1 must be in sync before a switchover is accepted.
    wait_for("dn1 normal", Duration::from_secs(30), || async {
        Ok((group_of(&c.status()?, "dn1").0 == "normal").then_some(()))
    })
    .await?;

    for (to, from) in [("dn1_h2", "dn1_h1"), ("dn1_h1", "dn1_h2")] {
        let started = Instant::now();
        let out = c.cm_ctl(&["switchover", "--instance", to, "--timeout", "60"]);
        ensure!(
            out.success,
            "switchover to {to} failed: {}\n{}",
            out.stderr,
            c.logs()
        );
        eprintln!("{}", out.stdout.trim());
        wait_layout(
            &c,
            &[(to, "primary", "normal"), (from, "standby", "normal")],
            Duration::from_secs(30),
        )
        .await?;
        writer.wait_more(20, Duration::from_secs(30)).await?;
        let gap = longest_gap(&writer.acks(), started);
        eprintln!(
            "switchover to {to}: longest write outage {} ms",
            gap.as_millis()
        );
        let ack_port = writer.acks().last().map(|a| a.port);
        ensure!(ack_port == Some(c.port(to)), "commits go to {to} now");
    }
    let acks = writer.stop().await;
    assert_all_present(p1, &acks).await?;
    eprintln!("{} acknowledged commits, all on dn1_h1", acks.len());

    // Failover refusals.
    one_line_error(
        &c.cm_ctl(&["failover", "--instance", "dn1_h1"]),
        "dn1_h1 is the primary of dn1, not a standby",
    )?;
    one_line_error(
        &c.cm_ctl(&["failover", "--instance", "nope"]),
        "unknown instance \"nope\"",
    )?;
    let stop = c.cm_ctl(&["stop", "--instance", "dn1_h2", "--timeout", "60"]);
    ensure!(stop.success, "stop: {}", stop.stderr);
    // The primary's healthy reports now show no synchronous standby.
    wait_for(
        "dn1_h1 to show no sync standby",
        Duration::from_secs(15),
        || async {
            let out = c.cm_ctl(&["failover", "--instance", "dn1_h2"]);
            ensure!(
                out.stderr.contains("was not the synchronous standby"),
                "{}",
                out.stderr.trim()
            );
            Ok(Some(out))
        },
    )
    .await
    .and_then(|out| one_line_error(&out, "could lose acknowledged commits"))?;
    one_line_error(
        &c.cm_ctl(&["failover", "--instance", "dn1_h2", "--force"]),
        "dn1_h2 is held stopped by the operator",
    )?;
    let s = c.status()?;
    ensure!(
        role_of(&s, "dn1_h1") == "primary",
        "refusals change nothing: {s}"
    );
    let start = c.cm_ctl(&["start", "--instance", "dn1_h2", "--timeout", "60"]);
    ensure!(start.success, "start: {}", start.stderr);

    // Build: a fresh copy of the standby.
    wait_for("dn1 normal", Duration::from_secs(30), || async {
        Ok((group_of(&c.status()?, "dn1").0 == "normal").then_some(()))
    })
    .await?;
    let out = c.cm_ctl(&["build", "--instance", "dn1_h2", "--timeout", "120"]);
    ensure!(out.success, "build: {}\n{}", out.stderr, c.logs());
    eprintln!("{}", out.stdout.trim());
    ensure!(out.stdout.contains("built from"), "{}", out.stdout);
    one_line_error(
        &c.cm_ctl(&["build", "--instance", "dn1_h1"]),
        "not a standby",
    )?;
    wait_for(
        "dn1 normal after the build",
        Duration::from_secs(60),
        || async { Ok((group_of(&c.status()?, "dn1").0 == "normal").then_some(())) },
    )
    .await?;
    assert_all_present(p2, &acks).await?;

    // A manual GTM failover: gtm2 takes over, gtm1 is demoted and follows it, GXIDs
    // keep increasing.
    let before = next_gxid(&c)?;
    let out = c.cm_ctl(&["failover", "--instance", "gtm2"]);
    ensure!(out.success, "gtm failover: {}\n{}", out.stderr, c.logs());
    eprintln!("{}", out.stdout.trim());
    wait_layout(
        &c,
        &[("gtm2", "primary", "normal"), ("gtm1", "standby", "normal")],
        Duration::from_secs(30),
    )
    .await?;
    let after = next_gxid(&c)?;
    ensure!(
        after > before,
        "GXIDs keep increasing: {before} then {after}"
    );
    Ok(())
}
