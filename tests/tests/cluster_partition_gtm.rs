//! A real partition (issue 9 §3, invariant 3 for the GTM pair): the GTM primary's
//! host is cut off from every other host while a client on that host keeps asking its
//! local GTM for GXIDs (it still reaches it) and a client on another host asks both
//! GTMs. Every GXID is recorded with the GTM that handed it out and when it was asked
//! for and answered.
//! - once the promoted standby has answered its first GXID, the cut-off primary
//!   answers none that was asked for later (it stops when its lease runs out, before
//!   the standby can be promoted; found: it kept handing out its reserved block);
//! - no GXID is handed out twice;
//! - after healing the old primary rejoins as standby and GXIDs keep rising.

#[path = "failover_support.rs"]
mod failover_support;
#[path = "partition_support.rs"]
mod partition_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use failover_support::{role_of, wait_layout};
use mpp_ha_tests::netns::{Faults, Network};
use mpp_ha_tests::{wait_for, LocalCluster};
use partition_support::*;

const PORT_BASE: u16 = 42000;

/// One GXID as a client got it.
#[derive(Debug, Clone)]
struct Got {
    gtm: String,
    gxid: u64,
    asked: Instant,
    answered: Instant,
}

/// Asks each of `gtms` for one GXID, concurrently, every 20 ms, from inside `host`;
/// records every answer.
struct Taker {
    got: Arc<Mutex<Vec<Got>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl Taker {
    fn start(net: &Network, host: &str, gtms: Vec<Member>) -> Result<Taker> {
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (out, s) = (got.clone(), stop.clone());
        let thread = Reach::host(net, Some(host)).spawn(move || async move {
            // Bounded: the test stops it long before.
            for _ in 0..100_000 {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let calls = gtms.iter().map(|m| async move {
                    let asked = Instant::now();
                    let gxid = take_gxid(&m.address, m.port).await;
                    gxid.map(|gxid| Got {
                        gtm: m.name.clone(),
                        gxid,
                        asked,
                        answered: Instant::now(),
                    })
                });
                let answers = futures::future::join_all(calls).await;
                out.lock().unwrap().extend(answers.into_iter().flatten());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        })?;
        Ok(Taker { got, stop, thread })
    }

    fn count(&self, gtm: &str) -> usize {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.gtm == gtm)
            .count()
    }

    fn stop(self) -> Vec<Got> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let got = self.got.lock().unwrap().clone();
        got
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_gtm_primary_stops_before_its_standby_hands_out() -> Result<()> {
    let c = LocalCluster::netns("partition-gtm", PORT_BASE, |t| t);
    c.up(120)?;
    let net = c.net.clone().expect("netns cluster");
    c.wait_states(&["gtm1", "gtm2"], "normal", Duration::from_secs(60))
        .await?;
    let s = c.status()?;
    let (old, new) = if role_of(&s, "gtm2") == "primary" {
        ("gtm2", "gtm1")
    } else {
        ("gtm1", "gtm2")
    };
    let host = c.cfg.find(old).context("gtm")?.instance.host.clone();
    let watcher = if host == "h3" { "h1" } else { "h3" };
    let inside = Taker::start(&net, &host, vec![Member::of(&c, old)])?;
    let outside = Taker::start(
        &net,
        watcher,
        vec![Member::of(&c, old), Member::of(&c, new)],
    )?;
    wait_for("GXIDs on both sides", Duration::from_secs(30), || async {
        Ok((inside.count(old) >= 20 && outside.count(old) >= 20).then_some(()))
    })
    .await?;

    eprintln!("cutting off {host} ({old} primary)");
    c.isolate(&host)?;
    let cut = Instant::now();
    wait_for(
        &format!("{new} to hand out GXIDs"),
        Duration::from_secs(60),
        || async { Ok((outside.count(new) > 0).then_some(())) },
    )
    .await?;
    eprintln!(
        "{new} handed out its first GXID {:.1} s after the cut",
        cut.elapsed().as_secs_f64()
    );
    // Long enough for the cut-off primary to show it still hands out (its reserved
    // block lasts far longer at this rate).
    let before = inside.count(old);
    tokio::time::sleep(Duration::from_secs(4)).await;
    eprintln!(
        "{old} answered {} more GXIDs on {host} in the 4 s after that",
        inside.count(old) - before
    );

    c.heal()?;
    let healed = Instant::now();
    wait_layout(
        &c,
        &[(old, "standby", "normal"), (new, "primary", "normal")],
        Duration::from_secs(90),
    )
    .await?;
    eprintln!(
        "healed -> {old} standby again: {:.1} s",
        healed.elapsed().as_secs_f64()
    );
    let after_heal = Instant::now();
    let n = outside.count(new);
    wait_for("GXIDs after the heal", Duration::from_secs(30), || async {
        Ok((outside.count(new) >= n + 20).then_some(()))
    })
    .await?;

    let (inside, outside) = (inside.stop(), outside.stop());
    let all: Vec<Got> = inside.iter().chain(&outside).cloned().collect();
    let first_new = all
        .iter()
        .filter(|g| g.gtm == new)
        .min_by_key(|g| g.answered)
        .context("no GXID from the promoted GTM")?
        .clone();
    // Asked for after the promoted one had answered: certainly handed out after it.
    let late: Vec<&Got> = all
        .iter()
        .filter(|g| g.gtm == old && g.asked > first_new.answered)
        .collect();
    let last_old = all
        .iter()
        .filter(|g| g.gtm == old && g.answered > cut)
        .max_by_key(|g| g.answered);
    eprintln!(
        "{} GXIDs; {new}'s first ({}) {:.2} s after the cut; {old}'s last after the cut: {:?}",
        all.len(),
        first_new.gxid,
        (first_new.answered - cut).as_secs_f64(),
        last_old.map(|g| (g.gxid, (g.answered - cut).as_secs_f64()))
    );
    ensure!(
        late.is_empty(),
        "two GTM primaries: {old} handed out {} GXIDs asked for after {new} had answered GXID {} ({:.2} s after the cut), e.g. {:?}",
        late.len(),
        first_new.gxid,
        (first_new.answered - cut).as_secs_f64(),
        late.iter()
            .take(5)
            .map(|g| (g.gxid, (g.asked - cut).as_secs_f64()))
            .collect::<Vec<_>>()
    );
    let gxids: Vec<u64> = all.iter().map(|g| g.gxid).collect();
    let dup = duplicates(&gxids);
    ensure!(dup.is_empty(), "GXIDs handed out twice: {dup:?}");
    // After the heal GXIDs keep rising above everything handed out before.
    let max_before = all
        .iter()
        .filter(|g| g.answered < healed)
        .map(|g| g.gxid)
        .max()
        .unwrap_or(0);
    let mut later: Vec<&Got> = all.iter().filter(|g| g.asked > after_heal).collect();
    later.sort_by_key(|g| g.answered);
    ensure!(!later.is_empty(), "no GXID after the heal");
    ensure!(
        later.iter().all(|g| g.gxid > max_before && g.gtm == new),
        "after the heal: {:?} (handed out up to {max_before} before)",
        later.iter().map(|g| (&g.gtm, g.gxid)).collect::<Vec<_>>()
    );
    ensure!(
        later.windows(2).all(|w| w[0].gxid < w[1].gxid),
        "GXIDs after the heal do not rise"
    );
    Ok(())
}
