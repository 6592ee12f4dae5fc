//! Issue 9 §3 d, the stale-CMServer scenario of §2 under a real partition (instead of
//! kill -9 and SIGSTOP): the standby CMServer's host is cut off while the primary
//! decides (`cm_ctl stop dn2_h3`); then the primary's host is cut off and the stale
//! one's host heals at the same moment, so the stale CMServer faces agents that saw
//! the newer state while it cannot fetch it from its peer. It must never act on its
//! older state (which would start dn2_h3 again); once the partition heals a primary
//! leads with the newer state (dn2_h3 still stopped) and both CMServers are normal.

#[path = "failover_support.rs"]
mod failover_support;
#[path = "partition_support.rs"]
mod partition_support;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use failover_support::role_of;
use mpp_ha_tests::netns::Faults;
use mpp_ha_tests::{member_state, wait_for, LocalCluster};
use partition_support::{ask_cms, CmsAnswer};

const PORT_BASE: u16 = 37000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cmserver_cut_off_while_the_primary_decided_never_acts_on_its_older_state() -> Result<()>
{
    let c = LocalCluster::netns("partition-stale-cms", PORT_BASE, |t| t);
    c.up(120)?;
    c.wait_states(
        &["cms1", "cms2", "dn2_h2", "dn2_h3"],
        "normal",
        Duration::from_secs(60),
    )
    .await?;
    let s = c.status()?;
    let primary = ["cms1", "cms2"]
        .into_iter()
        .find(|n| role_of(&s, n) == "primary")
        .context("no primary CMServer")?;
    let stale = if primary == "cms1" { "cms2" } else { "cms1" };
    let host_of = |n: &str| {
        c.cfg
            .find(n)
            .map(|r| r.instance.host.clone())
            .with_context(|| format!("{n} not in config"))
    };
    let (p_host, s_host) = (host_of(primary)?, host_of(stale)?);
    ensure!(host_of("dn2_h3")? == "h3", "the test expects dn2_h3 on h3");

    // The standby CMServer's host is cut off while the primary decides.
    c.isolate(&s_host)?;
    let out = c.cm_ctl(&["stop", "--instance", "dn2_h3"]);
    ensure!(out.success, "cm_ctl stop failed: {}", out.stderr);
    ensure!(
        c.postmaster_pid("dn2_h3").is_none(),
        "dn2_h3 still runs after stop"
    );
    // Let every agent that can reach the primary see the new state in its replies.
    let heartbeat = c.cfg.timing.heartbeat_interval();
    tokio::time::sleep(heartbeat * 3).await;

    // Swap: the primary's host is cut off, the stale one's host heals.
    c.heal()?;
    c.isolate(&p_host)?;
    let swapped = Instant::now();
    eprintln!("{p_host} ({primary}) cut off, {s_host} ({stale}) back");
    let (addr, port) = (c.address_of(stale), c.port(stale));
    let watch = c.cfg.timing.cm_lease() * 4 + heartbeat * 4;
    let mut answers = Vec::new();
    // Bounded by `watch`.
    while swapped.elapsed() < watch {
        ensure!(
            c.postmaster_pid("dn2_h3").is_none(),
            "{stale} acted on its older state: dn2_h3 was started again after {:.1} s",
            swapped.elapsed().as_secs_f64()
        );
        let a = ask_cms(&addr, port).await;
        if let CmsAnswer::Primary(_) = a {
            // Primary only with the newer state: then it keeps dn2_h3 stopped.
            let s = c.status()?;
            ensure!(
                member_state(&s, "dn2_h3") == "stopped",
                "{stale} leads with dn2_h3 {}",
                member_state(&s, "dn2_h3")
            );
        }
        if answers.last() != Some(&a) {
            answers.push(a);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("{stale} answered, in turn: {answers:?}");

    c.heal()?;
    let s = wait_for("a primary CMServer", Duration::from_secs(40), || async {
        let s = c.status()?;
        if member_state(&s, "dn2_h3") != "stopped" {
            bail!("dn2_h3 is {}", member_state(&s, "dn2_h3"));
        }
        Ok(Some(s))
    })
    .await?;
    let now_primary = ["cms1", "cms2"]
        .into_iter()
        .find(|n| role_of(&s, n) == "primary")
        .unwrap_or("none");
    eprintln!("primary after the heal: {now_primary}");
    c.wait_states(&["cms1", "cms2"], "normal", Duration::from_secs(40))
        .await?;
    ensure!(
        c.postmaster_pid("dn2_h3").is_none(),
        "dn2_h3 was started again"
    );
    Ok(())
}
