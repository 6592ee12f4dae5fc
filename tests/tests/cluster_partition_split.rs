//! A real partition (issue 9 §3 c): h1 and h2 cut from each other only, h3 sees
//! both, while clients on h3 write to both DN groups.
//! - sampled from h3 throughout: never two writable members of a DN group, never two
//!   GTMs handing out GXIDs, never two CMServers answering as primary;
//! - the CMServer that cannot reach a majority of the agents does not disturb the
//!   one that can: no CMServer term is raised in a campaign nobody can win (found:
//!   cms2 raised h2's agent's term again and again, so after the heal h2's agent
//!   refused the primary's orders and dn2 stayed degraded);
//! - after the heal every instance is normal again within a minute;
//! - every acknowledged commit is on its group's final primary.

#[path = "failover_support.rs"]
mod failover_support;
#[path = "partition_support.rs"]
mod partition_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use failover_support::role_of;
use mpp_ha_tests::netns::{spawn_in_host, Faults};
use mpp_ha_tests::LocalCluster;
use partition_support::*;

const PORT_BASE: u16 = 36000;

/// How long h1 and h2 stay cut apart: several campaign rounds (a lease plus two
/// heartbeats each, then a lease of back-off).
const CUT_FOR: Duration = Duration::from_secs(16);

/// What a watcher on h3 saw of the two CMServers.
#[derive(Debug, Default)]
struct Primacy {
    rounds: usize,
    /// Rounds in which both answered as primary: (cms1's term, cms2's term).
    both: Vec<(u64, u64)>,
    /// Every term in which some CMServer answered as primary, in order, deduplicated.
    terms: Vec<(String, u64)>,
}

/// The cluster status for a failure message, or why there is none.
fn status_or(c: &LocalCluster) -> String {
    c.status()
        .map_or_else(|e| format!("unavailable: {e:#}"), |s| s.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_cut_from_each_other_keep_one_primary_each_and_heal_without_losing_commits(
) -> Result<()> {
    let c = LocalCluster::netns("partition-split", PORT_BASE, |t| t);
    c.up(120)?;
    let net = c.net.clone().expect("netns cluster");
    let all = [
        "dn1_h1", "dn1_h2", "dn2_h2", "dn2_h3", "gtm1", "gtm2", "cms1", "cms2",
    ];
    c.wait_states(&all[..6], "normal", Duration::from_secs(60))
        .await?;
    let s = c.status()?;
    let groups: Vec<(String, Vec<Member>)> =
        [("dn1", "dn1_h1", "dn1_h2"), ("dn2", "dn2_h2", "dn2_h3")]
            .into_iter()
            .map(|(g, a, b)| {
                // The primary first: the writer tries members in order.
                let (p, q) = if role_of(&s, b) == "primary" {
                    (b, a)
                } else {
                    (a, b)
                };
                (g.to_string(), vec![Member::of(&c, p), Member::of(&c, q)])
            })
            .collect();
    for (_, members) in &groups {
        create_table(&Reach::host(&net, Some("h3")), &members[0]).await?;
    }
    let writers: Vec<Writer> = groups
        .iter()
        .enumerate()
        .map(|(i, (_, members))| {
            Writer::start(
                &Reach::host(&net, Some("h3")),
                members.clone(),
                10_000_000 * (i as i64 + 1),
                Duration::from_secs(3),
            )
        })
        .collect::<Result<_>>()?;
    let gtms = gtm_members(&c);
    let sampler = Sampler::start(&net, "h3", groups.clone(), gtms, 50_000_000)?;
    let cms: Vec<(String, String, u16)> = ["cms1", "cms2"]
        .iter()
        .map(|n| (n.to_string(), c.address_of(n), c.port(n)))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_watch = stop.clone();
    let watcher = spawn_in_host(&net, Some("h3"), move || async move {
        let mut p = Primacy::default();
        // Bounded: stopped long before.
        for _ in 0..10_000 {
            if stop_watch.load(Ordering::Relaxed) {
                break;
            }
            let (a, b) =
                futures::future::join(ask_cms(&cms[0].1, cms[0].2), ask_cms(&cms[1].1, cms[1].2))
                    .await;
            p.rounds += 1;
            if let (CmsAnswer::Primary(x), CmsAnswer::Primary(y)) = (&a, &b) {
                p.both.push((*x, *y));
            }
            for (name, answer) in [(&cms[0].0, &a), (&cms[1].0, &b)] {
                if let CmsAnswer::Primary(t) = answer {
                    if p.terms.last() != Some(&(name.clone(), *t)) {
                        p.terms.push((name.clone(), *t));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(p)
    })?;
    for w in &writers {
        w.wait_more(20, Duration::from_secs(30)).await?;
    }

    c.cut("h1", "h2")?;
    eprintln!("h1 and h2 cut apart");
    // The side with a majority keeps serving: writes go on in both groups.
    for ((g, _), w) in groups.iter().zip(&writers) {
        w.wait_more(20, Duration::from_secs(30))
            .await
            .with_context(|| format!("{g} during the cut; status {}", status_or(&c)))?;
    }
    tokio::time::sleep(CUT_FOR.saturating_sub(Duration::from_secs(1))).await;
    let during = c.status()?;
    c.heal()?;
    let healed = std::time::Instant::now();
    eprintln!("healed");
    c.wait_states(&all, "normal", Duration::from_secs(60))
        .await
        .with_context(|| format!("status during the cut: {during}"))?;
    eprintln!(
        "healed -> every instance normal: {:.1} s",
        healed.elapsed().as_secs_f64()
    );
    for ((g, _), w) in groups.iter().zip(&writers) {
        w.wait_more(20, Duration::from_secs(30))
            .await
            .with_context(|| format!("{g} after the heal; status {}", status_or(&c)))?;
    }

    stop.store(true, Ordering::Relaxed);
    let primacy = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("watcher panicked"))??;
    let samples = sampler.stop();
    let acks: Vec<Vec<Ack>> = writers.into_iter().map(Writer::stop).collect();
    eprintln!(
        "sampled {} rounds ({} GXIDs), CMServers asked {} times; primaries by term: {:?}",
        samples.rounds,
        samples.gxids.len(),
        primacy.rounds,
        primacy.terms
    );
    assert!(
        primacy.both.is_empty(),
        "both CMServers answered as primary: {:?}",
        primacy.both
    );
    assert!(
        samples.dual_dn.is_empty(),
        "two writable DN primaries: {:?}",
        samples.dual_dn
    );
    assert!(
        samples.dual_gtm.is_empty(),
        "two GTMs handed out GXIDs: {:?}",
        samples.dual_gtm
    );
    let dup = duplicates(&samples.gxids);
    assert!(dup.is_empty(), "GXIDs handed out twice: {dup:?}");
    // The cut leaves one CMServer with a majority (it reaches h3 and its own host):
    // its primacy is never lost, so nobody needs a new term.
    let holders: std::collections::BTreeSet<&String> =
        primacy.terms.iter().map(|(n, _)| n).collect();
    assert_eq!(
        holders.len(),
        1,
        "primacy moved although one CMServer kept a majority: {:?}",
        primacy.terms
    );

    let s = c.status()?;
    for (i, (g, members)) in groups.iter().enumerate() {
        let primary = members
            .iter()
            .find(|m| role_of(&s, &m.name) == "primary")
            .with_context(|| format!("{g} has no primary: {s}"))?;
        let group_acks: Vec<Ack> = acks[i]
            .iter()
            .chain(
                samples
                    .acks
                    .iter()
                    .filter(|a| members.iter().any(|m| m.name == a.member)),
            )
            .cloned()
            .collect();
        let rows = assert_all_present(&Reach::host(&net, Some("h3")), primary, &group_acks).await?;
        eprintln!(
            "{g}: {} acknowledged commits, all on {} ({rows} rows)",
            group_acks.len(),
            primary.name
        );
    }
    Ok(())
}
