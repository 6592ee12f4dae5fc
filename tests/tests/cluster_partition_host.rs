//! A real partition (issue 9 §3 a and b): the host of the primary CMServer, which
//! also runs a DN primary, is cut off from every other host while clients write,
//! one of them inside that host writing to its local DN primary.
//! - CMServers: the cut-off one stops answering as primary, and only then the other
//!   answers as primary in a higher term, within `cm_lease` plus a heartbeat (plus
//!   the polling's own resolution);
//! - DN: the synchronous standby is promoted; the cut-off primary acknowledges no
//!   commit after that; after healing it rejoins as a standby;
//! - after healing the old CMServer follows as standby with the newer state: when
//!   the other is killed it takes over and keeps the failover made without it;
//! - every acknowledged commit, from either side, is on the new primary;
//! - sampled from both sides throughout: never two writable members of the group,
//!   no GXID handed out twice (rounds where both GTMs hand out GXIDs are printed:
//!   a known violation, see below).

#[path = "failover_support.rs"]
mod failover_support;
#[path = "partition_support.rs"]
mod partition_support;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use failover_support::{role_of, wait_layout};
use mpp_ha_tests::netns::{spawn_in_host, Faults};
use mpp_ha_tests::{kill9, wait_for, LocalCluster};
use partition_support::*;

const PORT_BASE: u16 = 31000;

/// How finely the CMServers' answers are sampled.
const POLL: Duration = Duration::from_millis(100);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_host_loses_its_primaries_and_rejoins_without_losing_commits() -> Result<()> {
    let c = LocalCluster::netns("partition-host", PORT_BASE, |t| t);
    c.up(120)?;
    let net = c.net.clone().expect("netns cluster");
    let lease = c.cfg.timing.cm_lease();
    let heartbeat = c.cfg.timing.heartbeat_interval();

    // The primary CMServer, its host, and the DN group whose primary runs there (as
    // status says once everything is normal: a busy machine may have moved roles).
    c.wait_states(
        &["dn1_h1", "dn1_h2", "dn2_h2", "dn2_h3", "gtm1", "gtm2"],
        "normal",
        Duration::from_secs(60),
    )
    .await?;
    let s = c.status()?;
    let term = s["term"].as_u64().context("term")?;
    let cms = ["cms1", "cms2"]
        .into_iter()
        .find(|n| role_of(&s, n) == "primary")
        .context("no primary CMServer")?;
    let other = if cms == "cms1" { "cms2" } else { "cms1" };
    let host = c.cfg.find(cms).context("cms")?.instance.host.clone();
    let on_host = |n: &str| c.cfg.find(n).is_some_and(|r| r.instance.host == host);
    let (group, old, new) = [
        ("dn1", "dn1_h1", "dn1_h2"),
        ("dn1", "dn1_h2", "dn1_h1"),
        ("dn2", "dn2_h2", "dn2_h3"),
        ("dn2", "dn2_h3", "dn2_h2"),
    ]
    .into_iter()
    .find(|(_, p, _)| on_host(p) && role_of(&s, p) == "primary")
    .with_context(|| format!("no DN primary on {host} (status {s})"))?;
    let watcher = if host == "h3" { "h1" } else { "h3" };
    eprintln!("cutting off {host}: {cms} primary in term {term}, {old} primary of {group}");
    let (m_old, m_new) = (Member::of(&c, old), Member::of(&c, new));
    create_table(&Reach::host(&net, Some(watcher)), &m_old).await?;
    // A client on the cut-off host itself (it keeps reaching its local primary) and
    // one elsewhere following whichever member is primary.
    let local = Writer::start(
        &Reach::host(&net, Some(&host)),
        vec![m_old.clone()],
        1,
        Duration::from_secs(3),
    )?;
    let remote = Writer::start(
        &Reach::host(&net, Some(watcher)),
        vec![m_old.clone(), m_new.clone()],
        10_000_000,
        Duration::from_secs(3),
    )?;
    // GXIDs and probe commits sampled from both sides of the cut.
    let gtms = gtm_members(&c);
    let group_members = vec![(group.to_string(), vec![m_old.clone(), m_new.clone()])];
    let outside = Sampler::start(&net, watcher, group_members, gtms.clone(), 50_000_000)?;
    let inside = Sampler::start(&net, &host, Vec::new(), gtms, 60_000_000)?;
    local.wait_more(30, Duration::from_secs(30)).await?;
    remote.wait_more(30, Duration::from_secs(30)).await?;

    // From inside the cut-off host: when does its CMServer stop acting as primary?
    let (addr, port) = (c.address_of(cms), c.port(cms));
    let cut_side = spawn_in_host(&net, Some(&host), move || async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match ask_cms(&addr, port).await {
                CmsAnswer::Primary(_) => {}
                answer => return Ok((Instant::now(), answer)),
            }
            if Instant::now() > deadline {
                bail!("still primary 30 s after the cut");
            }
            tokio::time::sleep(POLL).await;
        }
    })?;
    c.isolate(&host)?;
    let cut = Instant::now();
    let (addr2, port2) = (c.address_of(other), c.port(other));
    let (took_over, new_term) = wait_for(
        "the other CMServer to answer as primary",
        Duration::from_secs(30),
        || async {
            match ask_cms(&addr2, port2).await {
                CmsAnswer::Primary(t) if t > term => Ok(Some((Instant::now(), t))),
                answer => bail!("{answer:?}"),
            }
        },
    )
    .await?;
    let (stepped_down, answer) = cut_side
        .join()
        .map_err(|_| anyhow::anyhow!("watcher panicked"))??;
    eprintln!(
        "{cms} stopped acting as primary {:.2} s after the cut ({answer:?}); \
         {other} primary in term {new_term} after {:.2} s",
        (stepped_down - cut).as_secs_f64(),
        (took_over - cut).as_secs_f64()
    );
    assert!(
        matches!(&answer, CmsAnswer::Refused(m) if m.contains("not primary")),
        "the cut-off CMServer answers \"not primary\": {answer:?}"
    );
    assert!(
        stepped_down < took_over,
        "{cms} still acted as primary when {other} took over"
    );
    let bound = lease + heartbeat + POLL * 5;
    assert!(
        took_over - cut <= bound,
        "takeover took {:.2} s, more than cm_lease + a heartbeat (+ polling) = {:.2} s",
        (took_over - cut).as_secs_f64(),
        bound.as_secs_f64()
    );

    wait_layout(&c, &[(new, "primary", "normal")], Duration::from_secs(60)).await?;
    let promoted = Instant::now();
    eprintln!(
        "{host} cut off -> {new} primary seen: {:.1} s",
        (promoted - cut).as_secs_f64()
    );

    c.heal()?;
    let healed = Instant::now();
    wait_layout(
        &c,
        &[
            (old, "standby", "normal"),
            (new, "primary", "normal"),
            (cms, "standby", "normal"),
        ],
        Duration::from_secs(120),
    )
    .await?;
    eprintln!(
        "healed -> {old} standby again: {:.1} s",
        healed.elapsed().as_secs_f64()
    );
    // The new primary has a synchronous standby again: its commits are acknowledged.
    remote.wait_more(20, Duration::from_secs(30)).await?;

    // The healed CMServer took the newer state: alone, it keeps the failover.
    let other_pid = c
        .recorded_pid(&format!("cm_server-{other}"))
        .context("pid recorded")?;
    kill9(other_pid);
    let s = wait_for(
        &format!("{cms} to take over again"),
        Duration::from_secs(30),
        || async {
            let s = c.status()?;
            if role_of(&s, cms) == "primary" && s["term"].as_u64().unwrap_or(0) > new_term {
                Ok(Some(s))
            } else {
                bail!("{cms} is {} in term {}", role_of(&s, cms), s["term"])
            }
        },
    )
    .await?;
    assert_eq!(role_of(&s, new), "primary", "{s}");
    assert_eq!(role_of(&s, old), "standby", "{s}");
    remote.wait_more(20, Duration::from_secs(30)).await?;

    let (local, remote) = (local.stop(), remote.stop());
    let (outside, inside) = (outside.stop(), inside.stop());
    eprintln!(
        "sampled {} rounds outside and {} inside {host}: {} GXIDs, {} probe commits",
        outside.rounds,
        inside.rounds,
        outside.gxids.len() + inside.gxids.len(),
        outside.acks.len()
    );
    for (side, s) in [("outside", &outside), ("inside", &inside)] {
        assert!(
            s.dual_dn.is_empty(),
            "two writable DN primaries: {:?}",
            s.dual_dn
        );
        // KNOWN VIOLATION, not asserted until fixed (issue 9 §1, invariant 3): a
        // cut-off GTM primary keeps handing out GXIDs from its reserved block (no
        // lease fences it) until the promoted standby's first ReserveBlock reaches it
        // after the heal; the outside sampler sees both serving then. GXIDs stay
        // unique (asserted below) because the promoted one starts above that block.
        for (round, at, gtms) in &s.dual_gtm {
            let since = |t: Instant| at.saturating_duration_since(t).as_secs_f64();
            eprintln!(
                "two GTM primaries ({side}, round {round}): {gtms:?}, {:.1} s after the cut, {:.1} s after the heal",
                since(cut),
                since(healed)
            );
        }
    }
    let gxids: Vec<u64> = outside.gxids.iter().chain(&inside.gxids).copied().collect();
    let dup = duplicates(&gxids);
    assert!(dup.is_empty(), "GXIDs handed out twice: {dup:?}");
    assert!(
        remote.iter().any(|a| a.member == new),
        "commits went to the new primary"
    );
    // The local client only writes to the old primary: once the other member was
    // promoted, the old one never acknowledged a commit again (cut off, then a
    // standby).
    let late: Vec<&Ack> = local.iter().filter(|a| a.at > promoted).collect();
    assert!(
        late.is_empty(),
        "the cut-off primary acknowledged {} commits after the promotion: {:?}",
        late.len(),
        &late[..late.len().min(10)]
    );
    let all: Vec<Ack> = local
        .iter()
        .chain(&remote)
        .chain(&outside.acks)
        .cloned()
        .collect();
    let rows = assert_all_present(&Reach::host(&net, Some(watcher)), &m_new, &all).await?;
    eprintln!(
        "{} acknowledged commits ({} by the client on {host}, {} on {watcher}), all on {new} ({rows} rows)",
        all.len(),
        local.len(),
        remote.len()
    );
    Ok(())
}
