//! A frozen DN primary and a lost GTM primary, with real processes:
//! - dn1's primary postmaster and all its children are SIGSTOPped under a loop of
//!   single-row commits: dn1_h2 is promoted with every acknowledged commit; the
//!   frozen primary, resumed (SIGCONT), acknowledges no write (a commit attempted on it
//!   fails or never answers), is demoted (rewound) and rejoins as dn1_h2's standby.
//! - gtm1 is lost (its agent and gtm process SIGKILLed, so nothing restarts it within
//!   the failover timeout): gtm2 becomes primary and GXIDs keep increasing; the agent
//!   restarted, gtm1 rejoins as standby and gtm2 stops running alone.

#[path = "failover_support.rs"]
mod failover_support;

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use failover_support::*;
use mpp_ha_tests::{connect, kill9, pid_alive, status_member, wait_for, LocalCluster};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

// (27000 is agent_gtm's.)
const PORT_BASE: u16 = 29000;

fn signal_all(pids: &[u32], sig: Signal) {
    for p in pids {
        let _ = kill(Pid::from_raw(*p as i32), sig);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_never_acknowledges_and_a_lost_gtm_is_replaced() -> Result<()> {
    let c = LocalCluster::new("cluster-failover-freeze", PORT_BASE);
    c.up(120)?;
    let (p1, p2) = (c.port("dn1_h1"), c.port("dn1_h2"));
    create_table(p1).await?;
    let writer = Writer::start(vec![p1, p2], Duration::from_secs(3));
    writer.wait_more(50, Duration::from_secs(30)).await?;
    // A session on the primary opened before the freeze.
    let old_session = connect(p1, Duration::from_secs(5)).await?;

    // Freeze the postmaster first (no new children), then every child.
    let pm = c.postmaster_pid("dn1_h1").expect("dn1_h1 runs");
    signal_all(&[pm], Signal::SIGSTOP);
    let mut frozen = vec![pm];
    for _ in 0..3 {
        let kids: Vec<u32> = ha_common::process::children(pm)
            .into_iter()
            .filter(|k| !frozen.contains(k))
            .collect();
        signal_all(&kids, Signal::SIGSTOP);
        frozen.extend(kids);
    }
    let froze = Instant::now();

    let result = async {
        wait_layout(
            &c,
            &[("dn1_h2", "primary", "normal"), ("dn1_h1", "standby", "")],
            Duration::from_secs(30),
        )
        .await?;
        eprintln!(
            "SIGSTOP -> dn1_h2 primary: {:.1} s",
            froze.elapsed().as_secs_f64()
        );
        let before: Vec<Ack> = writer
            .acks()
            .into_iter()
            .filter(|a| a.at <= froze)
            .collect();
        assert_all_present(p2, &before).await?;
        anyhow::Ok(())
    }
    .await;
    // Resume it whatever happened above (never leave stopped processes behind).
    signal_all(&frozen, Signal::SIGCONT);
    result?;

    // Resumed, it must not acknowledge a single write.
    let attempt = tokio::time::timeout(
        Duration::from_secs(10),
        old_session.execute("INSERT INTO t (id) VALUES (-1)", &[]),
    )
    .await;
    ensure!(
        !matches!(attempt, Ok(Ok(_))),
        "the resumed former primary acknowledged a commit"
    );
    eprintln!(
        "commit on the resumed former primary: {:?}",
        attempt.map(|r| r.map_err(|e| e.to_string()))
    );

    // It is demoted, rewound and rejoins; commits continue on dn1_h2.
    wait_layout(
        &c,
        &[
            ("dn1_h1", "standby", "normal"),
            ("dn1_h2", "primary", "normal"),
        ],
        Duration::from_secs(60),
    )
    .await?;
    wait_for("dn1 normal", Duration::from_secs(30), || async {
        Ok((group_of(&c.status()?, "dn1").0 == "normal").then_some(()))
    })
    .await?;
    eprintln!(
        "SIGSTOP -> dn1_h1 rejoined as standby: {:.1} s",
        froze.elapsed().as_secs_f64()
    );
    writer.wait_more(20, Duration::from_secs(30)).await?;
    let acks = writer.stop().await;
    assert_all_present(p2, &acks).await?;
    let probe = connect(p2, Duration::from_secs(5)).await?;
    let n: i64 = probe
        .query_one("SELECT count(*) FROM t WHERE id = -1", &[])
        .await?
        .get(0);
    ensure!(
        n == 0,
        "the write attempted on the resumed former primary survived"
    );

    // The GTM primary is lost: its agent first (so it is not restarted), then gtm1.
    let before = next_gxid(&c)?;
    let agent = c.recorded_pid("cm_agent-h1").expect("agent h1");
    let gtm1 = c.gtm_pid("gtm1").expect("gtm1 runs");
    kill9(agent);
    kill9(gtm1);
    let killed = Instant::now();
    wait_for(
        "agent h1 and gtm1 to die",
        Duration::from_secs(10),
        || async { Ok((!pid_alive(agent) && !pid_alive(gtm1)).then_some(())) },
    )
    .await?;
    wait_layout(&c, &[("gtm2", "primary", "")], Duration::from_secs(30)).await?;
    eprintln!(
        "kill gtm1 -> gtm2 primary: {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    let after = wait_for("a GXID from gtm2", Duration::from_secs(15), || async {
        Ok(next_gxid(&c).ok())
    })
    .await?;
    ensure!(
        after > before,
        "GXIDs must keep increasing: {before} then {after}"
    );
    c.up(120)?;
    wait_layout(
        &c,
        &[("gtm1", "standby", "normal"), ("gtm2", "primary", "normal")],
        Duration::from_secs(60),
    )
    .await?;
    let s = c.status()?;
    let gtm2 = status_member(&s, "gtm2").cloned().unwrap_or_default();
    ensure!(
        !gtm2["detail"]
            .as_str()
            .unwrap_or("")
            .contains("running alone"),
        "gtm2 still runs alone: {gtm2}"
    );
    let last = next_gxid(&c)?;
    ensure!(
        last > after,
        "GXIDs must keep increasing: {after} then {last}"
    );
    Ok(())
}
