//! The nemesis in the suite (issue 9 §4): a short randomized fault schedule (five
//! faults, two of them possibly at once) on a netns cluster under writes to both DN
//! groups and GXID takers in every host, then heal, settle, and invariants 1–3
//! (`mpp_ha_tests::nemesis`). Needs root, `ip` and `nft` like the partition tests.
//!
//! The seed is fixed so that the suite is repeatable; `NEMESIS_SEED=<n>` draws
//! another schedule (printed, one line per fault, with the replay line). Every fault
//! kind is drawn, including those that separate the GTM pair's and the CMServer
//! pair's hosts (h1–h2): they were left out while a cut-off GTM primary went on
//! serving GXIDs after the other side promoted (fixed: the GTM renews its lease from
//! the primary CMServer itself and `gtm.require_lease` is on by default) and while an
//! h1–h2 cut livelocked CMServer elections (fixed by the pre-vote election).

use anyhow::Result;
use mpp_ha_tests::nemesis::{run_cluster, seed_from_env, Options};

const PORT_BASE: u16 = 35000;

/// A seed whose schedule cuts h1 and h2 from each other twice (the GTM and CMServer
/// pairs' hosts) around kill -9 of a DN standby, then kills the GTM primary
/// (`nemesis_bench --dry-run --all-faults --seed 15 --faults 5 --per-run 5` prints it).
const DEFAULT_SEED: u64 = 15;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_random_fault_schedule_keeps_invariants_1_to_3() -> Result<()> {
    let seed = seed_from_env(DEFAULT_SEED)?;
    let mut opts = Options::new(seed, 5);
    opts.avoid_known_bugs = false;
    opts.hold_ms = (1_000, 6_000);
    opts.settle = std::time::Duration::from_secs(90);
    run_cluster("nemesis", PORT_BASE, &opts).await?;
    Ok(())
}
