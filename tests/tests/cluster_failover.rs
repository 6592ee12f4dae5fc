//! Host loss with real processes: under a loop of single-row commits through dn1's
//! primary, h1's agent, postmasters and GTM are SIGKILLed (its CMServer stays: CMServer
//! loss is the pair's test). dn1's synchronous standby is promoted with every
//! acknowledged commit, gtm2 takes over; restarting h1's agent brings dn1_h1 back as
//! a (rewound) standby and gtm1 as GTM standby, and commits resume.

#[path = "failover_support.rs"]
mod failover_support;

use std::time::{Duration, Instant};

use anyhow::Result;
use failover_support::*;
use mpp_ha_tests::{kill9, pid_alive, wait_for, LocalCluster};

const PORT_BASE: u16 = 26000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_loss_promotes_the_sync_standby_without_losing_commits() -> Result<()> {
    let c = LocalCluster::new("cluster-failover", PORT_BASE);
    c.up(120)?;
    let (p1, p2) = (c.port("dn1_h1"), c.port("dn1_h2"));
    create_table(p1).await?;
    let writer = Writer::start(vec![p1, p2], Duration::from_secs(3));
    writer.wait_more(50, Duration::from_secs(30)).await?;

    // h1 is lost: its agent first (so nothing restarts), then its instances.
    let agent = c.recorded_pid("cm_agent-h1").expect("agent h1 recorded");
    let pm = c.postmaster_pid("dn1_h1").expect("dn1_h1 runs");
    let gtm1 = c.gtm_pid("gtm1").expect("gtm1 runs");
    let gxid_before = next_gxid(&c)?;
    kill9(agent);
    kill9(pm);
    kill9(gtm1);
    let killed = Instant::now();
    wait_for("h1's processes to die", Duration::from_secs(10), || async {
        Ok([agent, pm, gtm1]
            .iter()
            .all(|p| !pid_alive(*p))
            .then_some(()))
    })
    .await?;

    let s = wait_layout(
        &c,
        // gtm2 runs alone (degraded) until gtm1 is back.
        &[("dn1_h2", "primary", "normal"), ("gtm2", "primary", "")],
        Duration::from_secs(30),
    )
    .await?;
    let promoted = killed.elapsed();
    eprintln!(
        "kill -> dn1_h2 and gtm2 primary: {:.1} s",
        promoted.as_secs_f64()
    );
    assert_eq!(role_of(&s, "dn1_h1"), "standby", "{s}");
    assert_eq!(role_of(&s, "gtm1"), "standby", "{s}");
    let acked_at_kill: Vec<Ack> = writer
        .acks()
        .into_iter()
        .filter(|a| a.at <= killed)
        .collect();
    let n = assert_all_present(p2, &acked_at_kill).await?;
    eprintln!(
        "{} acknowledged commits before the kill, all on dn1_h2 ({n} rows)",
        acked_at_kill.len()
    );
    let gxid_after = next_gxid(&c)?;
    assert!(
        gxid_after > gxid_before,
        "GXIDs go on increasing: {gxid_before} then {gxid_after}"
    );

    // h1 comes back: `local up` restarts its agent, which rewinds dn1_h1 and starts
    // it as dn1_h2's standby; gtm1 finds gtm2 promoted and follows it.
    let rejoin = Instant::now();
    c.up(120)?;
    let s = wait_layout(
        &c,
        &[
            ("dn1_h1", "standby", "normal"),
            ("dn1_h2", "primary", "normal"),
            ("gtm1", "standby", "normal"),
            ("gtm2", "primary", "normal"),
        ],
        Duration::from_secs(60),
    )
    .await?;
    wait_for(
        "dn1 to be normal (dn1_h1 synchronous)",
        Duration::from_secs(30),
        || async {
            let s = c.status()?;
            Ok((group_of(&s, "dn1").0 == "normal").then_some(()))
        },
    )
    .await?;
    let _ = s;
    writer.wait_more(20, Duration::from_secs(30)).await?;
    let first = writer
        .first_after(rejoin)
        .expect("commits after the rejoin");
    eprintln!(
        "kill -> first commit after the rejoin: {:.1} s (restart -> commit {:.1} s)",
        first.at.duration_since(killed).as_secs_f64(),
        first.at.duration_since(rejoin).as_secs_f64()
    );
    wait_for(
        "gtm2 to stop running alone",
        Duration::from_secs(30),
        || async {
            let s = c.status()?;
            let m = mpp_ha_tests::status_member(&s, "gtm2")
                .cloned()
                .unwrap_or_default();
            Ok((!m["detail"].as_str().unwrap_or("").contains("running alone")).then_some(()))
        },
    )
    .await?;
    let acks = writer.stop().await;
    assert!(
        acks.iter().any(|a| a.port == p2),
        "commits went to the new primary"
    );
    assert_all_present(p2, &acks).await?;
    Ok(())
}
