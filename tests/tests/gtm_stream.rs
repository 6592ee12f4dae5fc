//! The streaming GXID client against real GTM processes: many callers share one
//! stream; the primary hangs (SIGSTOP) with a full window of messages in flight; after
//! the standby is promoted every waiting caller is served by it, none gets an error,
//! no GXID is handed out twice, and nothing after the promotion is at or below what
//! the hung primary handed out. Resumed, the old primary serves this client nothing.
//! With TLS on, a client that starts while the primary hangs finds the promoted
//! standby: its TLS handshake with the hung primary gives up like a TCP connect.

#[path = "gtm_support.rs"]
mod gtm_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use gtm_support::Pair;
use ha_common::proto::gtm as pb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const PORT_BASE: u16 = 8300;
const CALLERS: usize = 64;

struct Alloc {
    range: std::ops::Range<u64>,
    started: Instant,
    ended: Instant,
}

fn signal(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_callers_survive_a_hung_primary_without_errors() -> Result<()> {
    let mut pair = Pair::new("gtm_stream", PORT_BASE, 500, 1000);
    let probe = pair.client().await;
    pair.start_both(&probe).await?;
    let client = gtm::GtmClient::connect_with(
        pair.cfg.gtm_endpoints(),
        gtm::ClientOptions {
            rpc_timeout: Duration::from_millis(1500),
            failover_timeout: Duration::from_secs(15),
            ..gtm::ClientOptions::default()
        },
    )
    .await?;

    let done = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let allocs = Arc::new(Mutex::new(Vec::<Alloc>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for i in 0..CALLERS {
        let (client, done, calls, allocs, errors) = (
            client.clone(),
            done.clone(),
            calls.clone(),
            allocs.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // Bounded: the test stops the callers well before this many calls.
            for _ in 0..1_000_000u32 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let started = Instant::now();
                match client.next_gxid(1 + (i % 3) as u64).await {
                    Ok(range) => {
                        calls.fetch_add(1, Ordering::Relaxed);
                        let ended = Instant::now();
                        allocs.lock().unwrap().push(Alloc {
                            range,
                            started,
                            ended,
                        });
                    }
                    Err(e) => errors.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    let wait_calls = |n: u64, what: &'static str| {
        let calls = calls.clone();
        mpp_ha_tests::wait_for(what, Duration::from_secs(30), move || {
            let c = calls.load(Ordering::Relaxed);
            async move { Ok((c >= n).then_some(())) }
        })
    };
    wait_calls(5_000, "callers to get going").await?;

    // The primary hangs with callers waiting on it.
    let gtm1 = pair.pid("gtm1").expect("gtm1 started");
    signal(gtm1, Signal::SIGSTOP);
    let hung = Instant::now();
    let s = probe.promote_with(&pair.endpoint("gtm2"), 0, true).await?;
    ensure!(s.term == 1, "promoted to term {}", s.term);
    // The promoted standby hands out nothing below its boundary, and the old primary
    // nothing at or above it (its own persisted boundary is not above the standby's).
    let new_start = s.boundary;
    let promoted = Instant::now();
    let before = calls.load(Ordering::Relaxed);
    wait_calls(before + 5_000, "callers served by the promoted standby").await?;

    // The old primary resumes: it still believes it is primary of term 0.
    signal(gtm1, Signal::SIGCONT);
    let resumed = calls.load(Ordering::Relaxed);
    wait_calls(
        resumed + 5_000,
        "callers served after the old primary resumed",
    )
    .await?;
    done.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }

    let errs = std::mem::take(&mut *errors.lock().unwrap());
    ensure!(
        errs.is_empty(),
        "{} callers got an error, first: {}",
        errs.len(),
        errs[0]
    );
    let allocs = std::mem::take(&mut *allocs.lock().unwrap());
    let mut all: Vec<u64> = allocs.iter().flat_map(|a| a.range.clone()).collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    ensure!(all.len() == n, "{} GXIDs handed out twice", n - all.len());

    let max_before = allocs
        .iter()
        .filter(|a| a.ended < hung)
        .map(|a| a.range.end - 1)
        .max()
        .unwrap_or(0);
    ensure!(
        max_before < new_start,
        "the old primary handed out {max_before}, at or above the promoted boundary {new_start}"
    );
    // Callers that asked while the primary hung (before the promote call returned)
    // were answered by the promoted standby, by re-sending their messages to it (after
    // the client's RPC timeout, or sooner when it learns of the new term first).
    // "Answered by the promoted standby" is a range at or above its boundary, which the
    // old primary never reaches. Neither "started before the SIGSTOP" (a fast primary
    // has often answered everything it was sent at that instant, and the callers' next
    // calls start after it) nor "ended after the promote call returned" (on a quiet
    // machine gtm2 can serve them first) holds every time.
    let caught: Vec<&Alloc> = allocs
        .iter()
        .filter(|a| a.started < promoted && a.range.start >= new_start)
        .collect();
    ensure!(!caught.is_empty(), "no caller waited through the hang");
    let after: Vec<&Alloc> = allocs.iter().filter(|a| a.started > promoted).collect();
    ensure!(!after.is_empty(), "no allocation after the promotion");
    for a in caught.iter().chain(&after) {
        ensure!(
            a.range.start >= new_start,
            "{:?} handed out after the promotion is below the new primary's start {new_start}: \
             it came from the deposed primary",
            a.range
        );
    }
    let s = probe.status(&pair.endpoint("gtm2")).await?;
    ensure!(
        s.role == pb::Role::Primary as i32 && s.term == 1,
        "gtm2 {s:?}"
    );
    eprintln!(
        "{} allocations, {} waited through the hang (promotion {:.0} ms after the SIGSTOP)",
        allocs.len(),
        caught.len(),
        (promoted - hung).as_secs_f64() * 1000.0
    );
    Ok(())
}

/// With TLS on, a GTM primary that hangs (SIGSTOP: its kernel still accepts TCP
/// connections, nobody answers the TLS handshake) does not hold up a client that
/// starts afterwards: the handshake is bounded by the connect timeout, so the client
/// moves on to the promoted standby and gets GXIDs well within its failover timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_a_new_client_passes_a_hung_primary() -> Result<()> {
    let mut pair = Pair::with_edit("gtm_stream_tls", 33000, 500, 1000, mpp_ha_tests::with_tls);
    ensure!(pair.cfg.tls.enabled, "the pair runs TLS");
    let probe = pair.client().await;
    pair.start_both(&probe).await?;
    let gtm1 = pair.pid("gtm1").expect("gtm1 started");
    signal(gtm1, Signal::SIGSTOP);
    let s = probe.promote_with(&pair.endpoint("gtm2"), 0, true).await?;
    ensure!(s.term == 1, "promoted to term {}", s.term);

    // gtm1 first in the list: the new client must get past it.
    let started = Instant::now();
    let client = gtm::GtmClient::connect_with(
        pair.cfg.gtm_endpoints(),
        gtm::ClientOptions {
            rpc_timeout: Duration::from_secs(30),
            failover_timeout: Duration::from_secs(30),
            ..gtm::ClientOptions::default()
        },
    )
    .await?;
    let range = tokio::time::timeout(Duration::from_secs(40), client.next_gxid(1)).await;
    let took = started.elapsed();
    signal(gtm1, Signal::SIGCONT);
    let range =
        range.map_err(|_| anyhow::anyhow!("no GXID within 40 s: stuck on the hung primary"))??;
    ensure!(
        range.start >= s.boundary,
        "{range:?} below the promoted standby's boundary {}",
        s.boundary
    );
    // Bounded by a few connect timeouts (500 ms each), far below the 30 s RPC and
    // failover timeouts an unbounded handshake would run into.
    ensure!(
        took < Duration::from_secs(10),
        "the first GXID took {took:?}: the handshake with the hung primary was not bounded"
    );
    eprintln!(
        "first GXID from the promoted standby {:.0} ms after connecting",
        took.as_secs_f64() * 1000.0
    );
    Ok(())
}
