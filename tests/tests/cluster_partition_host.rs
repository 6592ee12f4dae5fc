//! A real partition (issue 9 §3 a): the host of dn1's primary (h1) is cut off from
//! every other host while clients write, one of them inside h1 writing to dn1_h1.
//! dn1's synchronous standby on h2 is promoted; the cut-off primary acknowledges no
//! commit the new primary lacks; after healing dn1_h1 rejoins as a standby and every
//! acknowledged commit, from either side, is on the new primary.

#[path = "failover_support.rs"]
mod failover_support;
#[path = "partition_support.rs"]
mod partition_support;

use std::time::{Duration, Instant};

use anyhow::Result;
use failover_support::wait_layout;
use mpp_ha_tests::netns::Faults;
use mpp_ha_tests::LocalCluster;
use partition_support::*;

const PORT_BASE: u16 = 31000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_primary_host_is_replaced_and_rejoins_without_losing_commits() -> Result<()> {
    let c = LocalCluster::netns("partition-dn", PORT_BASE, |t| t);
    c.up(120)?;
    let net = c.net.clone().expect("netns cluster");
    let (m1, m2) = (Member::of(&c, "dn1_h1"), Member::of(&c, "dn1_h2"));
    create_table(&net, "h3", &m1).await?;
    // A client on h1 itself (it keeps reaching dn1_h1 through the partition) and
    // one on h3 following whichever member is primary.
    let local = Writer::start(
        &net,
        Some("h1"),
        vec![m1.clone()],
        1,
        Duration::from_secs(3),
    )?;
    let remote = Writer::start(
        &net,
        Some("h3"),
        vec![m1.clone(), m2.clone()],
        10_000_000,
        Duration::from_secs(3),
    )?;
    local.wait_more(30, Duration::from_secs(30)).await?;
    remote.wait_more(30, Duration::from_secs(30)).await?;

    c.isolate("h1")?;
    let cut = Instant::now();
    wait_layout(
        &c,
        &[("dn1_h2", "primary", "normal")],
        Duration::from_secs(60),
    )
    .await?;
    let promoted = Instant::now();
    eprintln!(
        "h1 cut off -> dn1_h2 primary seen: {:.1} s",
        (promoted - cut).as_secs_f64()
    );
    c.heal()?;
    let healed = Instant::now();
    wait_layout(
        &c,
        &[
            ("dn1_h1", "standby", "normal"),
            ("dn1_h2", "primary", "normal"),
        ],
        Duration::from_secs(120),
    )
    .await?;
    eprintln!(
        "healed -> dn1_h1 standby again: {:.1} s",
        healed.elapsed().as_secs_f64()
    );
    // dn1_h2 has a synchronous standby again: its commits are acknowledged.
    remote.wait_more(20, Duration::from_secs(30)).await?;
    let (local, remote) = (local.stop(), remote.stop());
    assert!(
        remote.iter().any(|a| a.member == "dn1_h2"),
        "commits went to the new primary"
    );
    // h1's client only writes to dn1_h1: once dn1_h2 was promoted, dn1_h1 never
    // acknowledged a commit again (cut off, then a standby).
    let late: Vec<&Ack> = local.iter().filter(|a| a.at > promoted).collect();
    assert!(
        late.is_empty(),
        "the cut-off primary acknowledged {} commits after the promotion: {:?}",
        late.len(),
        &late[..late.len().min(10)]
    );
    let all: Vec<Ack> = local.iter().chain(&remote).cloned().collect();
    let rows = assert_all_present(&net, "h3", &m2, &all).await?;
    eprintln!(
        "{} acknowledged commits ({} on h1's local client, {} on h3's), all on dn1_h2 ({rows} rows)",
        all.len(),
        local.len(),
        remote.len()
    );
    let after_cut = local.iter().filter(|a| a.at > cut).count();
    eprintln!("h1's client had {after_cut} commits acknowledged after the cut");
    Ok(())
}
