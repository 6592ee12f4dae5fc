//! The DN secondary (dn_replicator) in a whole local cluster of real processes:
//! - the standby stopped: commits go on through the secondary (status says it
//!   streams); the standby back: it catches up, the secondary goes idle, holds nothing;
//! - the standby stopped, commits, then the primary and its host's agent killed: the
//!   standby started again fetches the missing WAL from the secondary (restore_command,
//!   with TLS on: the OS user's `restore` certificate), is promoted
//!   only then, and holds every acknowledged row; the secondary becomes the new
//!   primary's synchronous partner;
//! - host loss with the standby in sync: the first commit on the promoted standby
//!   returns with two copies (the secondary) before the old host comes back.

#[path = "failover_support.rs"]
mod failover_support;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use failover_support::*;
use mpp_ha_tests::{connect, kill9, pid_alive, status_member, wait_for, with_tls, LocalCluster};

const CONNECT: Duration = Duration::from_secs(5);

fn detail_of(s: &serde_json::Value, name: &str) -> String {
    status_member(s, name)
        .and_then(|m| m["detail"].as_str())
        .unwrap_or("")
        .to_owned()
}

fn sync_state_of(s: &serde_json::Value, name: &str) -> String {
    status_member(s, name)
        .and_then(|m| m["sync_state"].as_str())
        .unwrap_or("")
        .to_owned()
}

/// Waits until dn1 is normal (standby synchronous) and its secondary idle, holding nothing.
async fn wait_secondary_idle(c: &LocalCluster, timeout: Duration) -> Result<()> {
    wait_for("dn1 normal and dn1_h3 idle", timeout, || async {
        let s = c.status()?;
        let (state, detail) = group_of(&s, "dn1");
        let sec = detail_of(&s, "dn1_h3");
        if state == "normal" && sec == "idle" {
            Ok(Some(()))
        } else {
            bail!("dn1 {state} ({detail}); dn1_h3: {sec}")
        }
    })
    .await
}

/// `n` single-row commits (ids from `first`), each bounded.
async fn commits(port: u16, first: i64, n: i64) -> Result<()> {
    let db = connect(port, CONNECT).await?;
    for id in first..first + n {
        tokio::time::timeout(
            Duration::from_secs(10),
            db.execute("INSERT INTO t VALUES ($1)", &[&id]),
        )
        .await
        .with_context(|| format!("commit {id} timed out"))?
        .with_context(|| format!("commit {id}"))?;
    }
    Ok(())
}

async fn count(port: u16) -> Result<i64> {
    let db = connect(port, CONNECT).await?;
    Ok(db.query_one("SELECT count(*) FROM t", &[]).await?.get(0))
}

fn cm_ctl_ok(c: &LocalCluster, args: &[&str]) -> Result<()> {
    let out = c.cm_ctl(args);
    if !out.success {
        bail!("cm_ctl {args:?}: {}{}", out.stdout, out.stderr);
    }
    Ok(())
}

/// Whether a daemon or instance log of the cluster (`<base_dir>/*.log`,
/// `<base_dir>/*/*.log`) has `text`.
fn logs_contain(c: &LocalCluster, text: &str) -> bool {
    let files = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let top = files(c.base_dir());
    top.iter()
        .chain(top.iter().flat_map(|d| files(d)).collect::<Vec<_>>().iter())
        .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("log"))
        .any(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains(text)))
}

fn wal_files(c: &LocalCluster, secondary: &str) -> usize {
    std::fs::read_dir(c.base_dir().join(secondary).join("wal"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_carries_commits_while_the_standby_is_away_and_serves_its_catch_up() -> Result<()>
{
    // TLS on (the product default): the standby's restore_command reads WAL from the
    // secondary with the OS user's `restore` certificate.
    let c = LocalCluster::with_config_edit("cluster-secondary", 10000, with_tls);
    assert!(c.cfg.tls.enabled);
    c.up(180)?;
    let (p1, p2) = (c.port("dn1_h1"), c.port("dn1_h2"));
    create_table(p1).await?;
    wait_secondary_idle(&c, Duration::from_secs(60)).await?;

    // 1. The standby stopped: 1,000 commits go on through the secondary.
    cm_ctl_ok(&c, &["stop", "--instance", "dn1_h2"])?;
    let t = Instant::now();
    commits(p1, 1, 1000).await?;
    eprintln!(
        "1000 commits through the secondary: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Status shows the agents' last observations (up to a heartbeat old): the commits
    // above already prove the secondary acknowledges; wait for status to say so too.
    wait_for(
        "status: dn1_h3 streaming from dn1_h1 as sync",
        Duration::from_secs(10),
        || async {
            let s = c.status()?;
            let sec = detail_of(&s, "dn1_h3");
            Ok(
                (sec.starts_with("streaming from dn1_h1") && sync_state_of(&s, "dn1_h3") == "sync")
                    .then_some(()),
            )
        },
    )
    .await?;
    assert!(wal_files(&c, "dn1_h3") > 0);
    // The standby back: it catches up, the secondary goes idle and deletes all.
    cm_ctl_ok(&c, &["start", "--instance", "dn1_h2"])?;
    wait_secondary_idle(&c, Duration::from_secs(60)).await?;
    assert_eq!(
        wal_files(&c, "dn1_h3"),
        0,
        "an idle secondary holds nothing"
    );
    let n = wait_for(
        "1000 rows on the standby",
        Duration::from_secs(30),
        || async {
            let n = count(p2).await?;
            Ok((n == 1000).then_some(n))
        },
    )
    .await?;
    assert_eq!(n, 1000);

    // 2. Standby stopped, 1,000 commits, then the primary and h1's agent die.
    cm_ctl_ok(&c, &["stop", "--instance", "dn1_h2"])?;
    commits(p1, 1001, 1000).await?;
    let agent = c.recorded_pid("cm_agent-h1").context("agent h1 recorded")?;
    let pm = c.postmaster_pid("dn1_h1").context("dn1_h1 runs")?;
    kill9(agent);
    kill9(pm);
    wait_for(
        "h1's agent and dn1_h1 to die",
        Duration::from_secs(10),
        || async { Ok((!pid_alive(agent) && !pid_alive(pm)).then_some(())) },
    )
    .await?;
    // The standby starts again with no primary to stream from: it must fetch what it
    // lacks from the secondary before the CMServer promotes it.
    let t = Instant::now();
    cm_ctl_ok(&c, &["start", "--instance", "dn1_h2"])?;
    wait_layout(
        &c,
        &[("dn1_h2", "primary", "normal")],
        Duration::from_secs(90),
    )
    .await?;
    eprintln!(
        "`cm_ctl start` of the standby -> promoted after catching up from the secondary: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        count(p2).await?,
        2000,
        "every acknowledged row on the promoted standby"
    );
    // ...which it read from the secondary with its restore certificate (TLS on).
    assert!(
        logs_contain(&c, "serving WAL for catch-up"),
        "the secondary served WAL to the standby's restore_command"
    );
    // The new primary's synchronous partner is the secondary (the old primary is gone):
    // a commit returns with two copies.
    commits(p2, 5001, 1).await?;
    let db = connect(p2, CONNECT).await?;
    let row = db
        .query_one(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'dn1_h3'",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "sync");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_host_loss_the_first_commit_on_the_new_primary_has_two_copies() -> Result<()> {
    let c = LocalCluster::new("cluster-secondary-hostloss", 11000);
    c.up(180)?;
    let (p1, p2) = (c.port("dn1_h1"), c.port("dn1_h2"));
    create_table(p1).await?;
    wait_secondary_idle(&c, Duration::from_secs(60)).await?;
    commits(p1, 1, 10).await?;

    // h1 is lost: its agent first (nothing restarts), then its instances (dn1's
    // primary, gtm1, dn2's secondary).
    let agent = c.recorded_pid("cm_agent-h1").context("agent h1 recorded")?;
    let mut victims = vec![agent, c.postmaster_pid("dn1_h1").context("dn1_h1 runs")?];
    victims.extend(c.gtm_pid("gtm1"));
    victims.extend(ha_common::process::read_pid_file(
        &c.base_dir().join("dn2_h1.replicator.pid"),
    ));
    for pid in &victims {
        kill9(*pid);
    }
    let killed = Instant::now();
    // Commit on dn1_h2 until one returns (read-only until promoted; then it waits for
    // a synchronous partner: the secondary).
    let deadline = killed + Duration::from_secs(60);
    let at = loop {
        if Instant::now() > deadline {
            bail!(
                "no commit on dn1_h2 within 60 s of the host loss: {}",
                c.logs()
            );
        }
        let attempt = async {
            let db = connect(p2, Duration::from_secs(2)).await?;
            db.execute("INSERT INTO t VALUES (100)", &[]).await?;
            anyhow::Ok(())
        };
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(3), attempt).await {
            break killed.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "host loss -> first two-copy commit on dn1_h2: {:.2} s",
        at.as_secs_f64()
    );
    assert!(
        victims.iter().all(|p| !pid_alive(*p)),
        "the old host is still gone"
    );
    let db = connect(p2, CONNECT).await?;
    let sync: String = db.query_one("SHOW synchronous_commit", &[]).await?.get(0);
    assert_eq!(sync, "on");
    let row = db
        .query_one(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'dn1_h3'",
            &[],
        )
        .await?;
    assert_eq!(
        row.get::<_, String>(0),
        "sync",
        "the secondary is the partner"
    );
    assert_eq!(count(p2).await?, 11);
    Ok(())
}
