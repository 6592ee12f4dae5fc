//! GTM failover with real processes: concurrent clients allocate GXIDs, the primary is
//! SIGKILLed at a random moment, the standby is promoted by `gtm promote`, and
//! allocation continues: no GXID twice, every GXID after the promotion above every GXID
//! before, and the decision recorded before the kill survives.

#[path = "gtm_support.rs"]
mod gtm_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use gtm::Decision;
use gtm_support::Pair;
use ha_common::proto::gtm as pb;
use rand::{Rng, SeedableRng};

const TOTAL: u64 = 100_000;
const TASKS: usize = 8;

/// One allocation: its GXIDs and when the call started and ended.
struct Alloc {
    range: std::ops::Range<u64>,
    started: Instant,
    ended: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gtm_failover_keeps_gxids_unique_and_decisions() -> Result<()> {
    let mut pair = Pair::new("gtm_failover", 21000, 1000, 2000);
    let client = pair.client().await;
    pair.start_both(&client).await?;

    // A decision recorded before the failover.
    let decided = client.next_gxid(1).await?.start;
    client.record_decision(decided, Decision::Commit).await?;
    ensure!(client.get_decision(decided).await? == Some(Decision::Commit));

    let allocated = Arc::new(AtomicU64::new(1));
    let done = Arc::new(AtomicBool::new(false));
    let allocs = Arc::new(Mutex::new(Vec::<Alloc>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (client, allocated, done, allocs, errors) = (
            client.clone(),
            allocated.clone(),
            done.clone(),
            allocs.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
            // Bounded: at most TOTAL calls per task (each call takes at least one GXID).
            for _ in 0..TOTAL {
                if allocated.load(Ordering::Relaxed) >= TOTAL || done.load(Ordering::Relaxed) {
                    break;
                }
                let count = rng.random_range(1..=8u64);
                let started = Instant::now();
                match client.next_gxid(count).await {
                    Ok(range) => {
                        allocated.fetch_add(range.end - range.start, Ordering::Relaxed);
                        let ended = Instant::now();
                        allocs.lock().unwrap().push(Alloc {
                            range,
                            started,
                            ended,
                        });
                    }
                    // Calls caught by the failover may fail (the client gives up after
                    // its failover timeout); they hand out nothing.
                    Err(e) => errors.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }

    // Kill the primary at a random moment during allocation.
    let kill_at = rand::rng().random_range(10_000..60_000u64);
    mpp_ha_tests::wait_for(
        "allocation to reach the kill point",
        Duration::from_secs(30),
        || {
            let n = allocated.load(Ordering::Relaxed);
            async move { Ok((n >= kill_at).then_some(())) }
        },
    )
    .await?;
    let before_kill = Instant::now();
    pair.kill9("gtm1");

    let config = pair.config.display().to_string();
    let (ok, out, err) = pair
        .gtm_cli(&[
            "promote",
            "--config",
            &config,
            "--node",
            "gtm2",
            "--run-alone",
            // The test's config names CMServers, but none runs: the pair is alone.
            "--force",
        ])
        .await?;
    ensure!(ok, "gtm promote failed: {err}");
    let term: u64 = out
        .trim()
        .parse()
        .with_context(|| format!("promote printed {out:?}"))?;
    ensure!(term == 1, "new term {term}");
    let promoted = Instant::now();

    mpp_ha_tests::wait_for(
        "allocation to reach the total",
        Duration::from_secs(40),
        || {
            let n = allocated.load(Ordering::Relaxed);
            async move { Ok((n >= TOTAL).then_some(())) }
        },
    )
    .await?;
    done.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }

    // One more after everything: it comes from the promoted standby.
    let last = client.next_gxid(1).await?;
    let s = client.status(&pair.endpoint("gtm2")).await?;
    ensure!(
        s.role == pb::Role::Primary as i32 && s.term == 1,
        "gtm2 status {s:?}"
    );

    // The tasks are done: take the results out of the shared vector.
    let allocs = std::mem::take(&mut *allocs.lock().unwrap());
    let mut all: Vec<u64> = allocs.iter().flat_map(|a| a.range.clone()).collect();
    all.push(decided);
    all.extend(last.clone());
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    ensure!(all.len() == n, "{} GXIDs handed out twice", n - all.len());
    ensure!(n as u64 >= TOTAL, "only {n} GXIDs");

    let max_before = allocs
        .iter()
        .filter(|a| a.ended < before_kill)
        .map(|a| a.range.end - 1)
        .max()
        .unwrap_or(decided)
        .max(decided);
    let after: Vec<&Alloc> = allocs.iter().filter(|a| a.started > promoted).collect();
    ensure!(!after.is_empty(), "no allocation after the promotion");
    let min_after = after
        .iter()
        .map(|a| a.range.start)
        .min()
        .unwrap_or(u64::MAX)
        .min(last.start);
    ensure!(
        min_after > max_before,
        "GXID {min_after} after the promotion is not above {max_before} from before the kill"
    );

    // The decision recorded before the kill is read back from the new primary.
    ensure!(
        client.get_decision(decided).await? == Some(Decision::Commit),
        "decision of {decided} lost"
    );
    let errs = std::mem::take(&mut *errors.lock().unwrap());
    eprintln!(
        "killed at ~{kill_at} GXIDs; {} allocations, {} errors during failover{}",
        allocs.len(),
        errs.len(),
        errs.first()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    Ok(())
}

/// A promotion while the old primary is still alive (cut off from its clients, say):
/// the old primary cannot cross its boundary any more; it steps down on the new term
/// and follows the new primary; nothing it handed out is handed out again. Restarted,
/// it stays a standby of the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gtm_old_primary_is_fenced_by_the_new_term() -> Result<()> {
    let mut pair = Pair::new("gtm_fencing", 8400, 50, 1000);
    let client = pair.client().await;
    pair.start_both(&client).await?;
    // A client that only knows the old primary: it keeps asking it.
    let old_only = gtm::GtmClient::connect_with(
        vec![pair.endpoint("gtm1")],
        gtm::ClientOptions {
            failover_timeout: Duration::from_millis(500),
            ..gtm::ClientOptions::default()
        },
    )
    .await?;
    let mut from_old = Vec::new();
    for _ in 0..30 {
        from_old.extend(old_only.next_gxid(1).await?);
    }
    let s = client.promote(&pair.endpoint("gtm2"), 0).await?;
    ensure!(s.term == 1, "promoted to term {}", s.term);

    // The old primary hands out at most what its reserved block still holds.
    let mut refused = None;
    for _ in 0..200 {
        match old_only.next_gxid(1).await {
            Ok(r) => from_old.extend(r),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.context("the old primary kept handing out GXIDs after the promotion")?;
    // Either its own "not primary" answer or, having followed it, "no primary among
    // the endpoints I know" (this client only knows the old primary).
    ensure!(
        e.to_string().contains("not primary") || matches!(e, gtm::ClientError::NoPrimary { .. }),
        "unexpected error: {e}"
    );
    pair.wait_status(&client, "gtm1", "gtm1 steps down and follows", |s| {
        s.role == pb::Role::Standby as i32 && s.term == 1 && s.ready
    })
    .await?;

    let mut from_new = Vec::new();
    for _ in 0..100 {
        from_new.extend(client.next_gxid(1).await?);
    }
    let max_old = from_old.iter().max().copied().unwrap_or(0);
    ensure!(
        from_new.iter().all(|g| *g > max_old),
        "new primary reused a GXID at or below {max_old}"
    );

    // Restarted, the old primary does not take over again.
    pair.kill9("gtm1");
    pair.start("gtm1")?;
    pair.wait_status(
        &client,
        "gtm1",
        "restarted gtm1 is a ready standby of term 1",
        |s| s.role == pb::Role::Standby as i32 && s.term == 1 && s.ready,
    )
    .await?;
    ensure!(client.next_gxid(1).await?.start > *from_new.iter().max().unwrap_or(&0));
    Ok(())
}
