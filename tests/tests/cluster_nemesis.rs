//! The nemesis in the suite (issue 9 §4): a short randomized fault schedule (five
//! faults, two of them possibly at once) on a netns cluster under writes to both DN
//! groups and GXID takers in every host, then heal, settle, and invariants 1–3
//! (`mpp_ha_tests::nemesis`). Needs root, `ip` and `nft` like the partition tests.
//!
//! The seed is fixed so that the suite is repeatable; `NEMESIS_SEED=<n>` draws
//! another schedule (printed, one line per fault, with the replay line). Faults that
//! separate the GTM pair's or the CMServer pair's hosts are left out until the known
//! open bugs behind them are fixed (a cut-off GTM primary serving GXIDs after the
//! other side promoted; the h1–h2 cut livelock of CMServer elections): the bench
//! (`nemesis_bench --all-faults`) runs them.

use anyhow::Result;
use mpp_ha_tests::nemesis::{run_cluster, seed_from_env, Options};

const PORT_BASE: u16 = 35000;

/// A seed whose schedule has a one-way drop, SIGSTOP of a member overlapped by kill -9
/// of a GTM, and a host cut off (`nemesis_bench --dry-run --seed 2 --faults 5
/// --per-run 5` prints it).
const DEFAULT_SEED: u64 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_random_fault_schedule_keeps_invariants_1_to_3() -> Result<()> {
    let seed = seed_from_env(DEFAULT_SEED)?;
    let mut opts = Options::new(seed, 5);
    opts.hold_ms = (1_000, 6_000);
    opts.settle = std::time::Duration::from_secs(90);
    run_cluster("nemesis", PORT_BASE, &opts).await?;
    Ok(())
}
