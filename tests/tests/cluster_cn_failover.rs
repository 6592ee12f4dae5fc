//! A DN failover under load through a CN: a writer commits one row per transaction
//! through cn2 (agent-run, on h2) while h1 is lost (its agent and dn1's primary
//! SIGKILLed; a lone postmaster crash would be restarted by its agent instead). The writes go on
//! after the failover, errors come only around it (transactions cut by it), no
//! acknowledged row is lost, and cn2 writes to the new primary soon after the CMServer
//! names it. Beside the writer, real pgbench (TPC-B, 4 clients, `--max-tries=0`) runs
//! through the same CN: a transaction cut before its commit gets 40001 and pgbench
//! retries it; pgbench goes on after the failover, the balance sums agree, and every
//! transaction pgbench counts as processed left its history row.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mpp_ha_tests::{
    connect_cn, kill9, member_state, pgbench, pgbench_count, pgbench_processed, pgbench_run,
    wait_for, LocalCluster,
};

const PORT_BASE: u16 = 32000;

/// What the writer saw: acknowledged ids and when each error happened.
#[derive(Default)]
struct Seen {
    acked: Vec<(i64, Instant)>,
    errors: Vec<(Instant, String)>,
}

/// Inserts ids from 1 up through the CN until `until`; reconnects after an error. An id
/// is recorded only when its commit was acknowledged.
async fn write_through(port: u16, until: Instant) -> Seen {
    let mut seen = Seen::default();
    let mut client = None;
    let mut next = 1i64;
    while Instant::now() < until {
        if client.is_none() {
            match connect_cn(port, Duration::from_secs(2)).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    seen.errors
                        .push((Instant::now(), format!("connect: {e:#}")));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some(c) = client.as_ref() else { continue };
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            c.execute("insert into acked (id, v) values ($1, 'x')", &[&next]),
        )
        .await;
        match r {
            Ok(Ok(_)) => seen.acked.push((next, Instant::now())),
            Ok(Err(e)) => {
                seen.errors.push((Instant::now(), format!("{e:?}")));
                client = None;
            }
            Err(_) => {
                seen.errors
                    .push((Instant::now(), "no answer in 5 s".into()));
                client = None;
            }
        }
        // An id whose outcome is unknown is never reused.
        next += 1;
    }
    seen
}

/// pgbench across the failover: it ran transactions after the promotion; only clients
/// cut at a commit whose outcome is unknown (08006) stop; the sums agree once in-doubt
/// transactions are resolved; history rows lie between the processed count and that
/// plus the unknown outcomes (a 40001 retry never committed).
async fn pgbench_checks(
    cn: &tokio_postgres::Client,
    (_ok, run): (bool, String),
    t_start: Instant,
    t_promoted: Instant,
) -> Result<()> {
    let processed = pgbench_processed(&run).with_context(|| format!("no count:\n{run}"))?;
    // Failed: retried until the run's end, never committed.
    let failed = pgbench_count(&run, "number of failed transactions").unwrap_or(0);
    let retried = pgbench_count(&run, "number of transactions retried").unwrap_or(0);
    let aborted = run
        .lines()
        .filter(|l| l.contains(" aborted in command "))
        .count() as u64;
    let promoted_at = t_promoted.duration_since(t_start).as_secs_f64();
    // "progress: 12.0 s, 250.1 tps, ..." (seconds since pgbench's start, which is
    // after t_start: a line past promoted_at + 1 is surely after the promotion).
    let tps_after: Vec<f64> = run
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("progress: ")?;
            let (at, rest) = rest.split_once(" s, ")?;
            let tps = rest.split_once(" tps")?.0;
            let at: f64 = at.parse().ok()?;
            (at > promoted_at + 1.0).then(|| tps.parse().ok()).flatten()
        })
        .collect();
    eprintln!(
        "pgbench: {processed} processed, {retried} retried, {failed} failed, {aborted} \
         clients aborted; tps after the promotion {tps_after:?}"
    );
    assert!(
        tps_after.iter().any(|t| *t > 0.0),
        "pgbench ran no transaction after the failover:\n{run}"
    );
    assert!(aborted < 4, "every pgbench client stopped:\n{run}");
    let sums = wait_for(
        "the pgbench balance sums to agree",
        Duration::from_secs(30),
        || async {
            let mut sums = Vec::new();
            // Simple protocol, a plain aggregate (what a CN merges: a cast over the
            // aggregate is a shape it refuses with 0A000).
            for q in [
                "select sum(abalance) from pgbench_accounts",
                "select sum(bbalance) from pgbench_branches",
                "select sum(tbalance) from pgbench_tellers",
            ] {
                let got = cn.simple_query(q).await;
                match got {
                    Ok(msgs) => sums.push(msgs.iter().find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                        _ => None,
                    })),
                    Err(e) => {
                        eprintln!("{q}: {e}");
                        return Ok(None);
                    }
                }
            }
            eprintln!("sums {sums:?}");
            Ok((sums[0] == sums[1] && sums[1] == sums[2]).then_some(sums))
        },
    )
    .await;
    sums.with_context(|| format!("pgbench run:\n{run}"))?;
    let history: i64 = cn
        .query_one("select count(*) from pgbench_history", &[])
        .await?
        .get(0);
    let history = history as u64;
    assert!(
        history >= processed,
        "acknowledged pgbench transactions lost: {history} history rows, {processed} processed"
    );
    assert!(
        history <= processed + aborted,
        "a transaction reported as not committed did commit: {history} history rows, \
         {processed} processed, {aborted} unknown outcomes"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dn_failover_under_writes_through_a_cn_loses_no_acknowledged_row() -> Result<()> {
    let c = LocalCluster::new("cluster-cn-failover", PORT_BASE);
    c.up(180)?;
    let cn_port = c.port("cn2");
    let cn = connect_cn(cn_port, Duration::from_secs(10)).await?;
    cn.batch_execute("create table acked (id bigint primary key, v text)")
        .await
        .context("create acked")?;

    tokio::task::spawn_blocking(move || pgbench(cn_port, &["-i", "-s", "1"]))
        .await?
        .context("pgbench -i through the CN")?;

    let t_start = Instant::now();
    let writer = tokio::spawn(write_through(cn_port, t_start + Duration::from_secs(30)));
    let bench = tokio::task::spawn_blocking(move || {
        let args = [
            "-c",
            "4",
            "-T",
            "25",
            "-M",
            "prepared",
            "--max-tries=0",
            "--progress=1",
        ];
        pgbench_run(cn_port, &args)
    });
    tokio::time::sleep(Duration::from_secs(4)).await;

    // h1 is lost: its agent and dn1's primary die.
    let agent = c.recorded_pid("cm_agent-h1").context("no agent h1")?;
    let pid = c.postmaster_pid("dn1_h1").context("dn1_h1 not running")?;
    let t_kill = Instant::now();
    kill9(agent);
    kill9(pid);
    let t_promoted = wait_for(
        "dn1_h2 to be dn1's normal primary",
        Duration::from_secs(60),
        || async {
            let s = c.status()?;
            let promoted = mpp_ha_tests::status_member(&s, "dn1_h2")
                .is_some_and(|m| m["role"] == "primary" && m["state"] == "normal");
            Ok(promoted.then(Instant::now))
        },
    )
    .await
    .with_context(|| c.logs())?;
    let seen = writer.await?;

    let before = seen.acked.iter().filter(|(_, at)| *at < t_kill).count();
    let after = seen.acked.iter().filter(|(_, at)| *at > t_promoted).count();
    let last_error = seen.errors.last().map_or(t_kill, |(at, _)| *at);
    eprintln!(
        "acked {} ({before} before the kill, {after} after the promotion), {} errors; \
         kill -> promoted {:.1} s, kill -> last error {:.1} s",
        seen.acked.len(),
        seen.errors.len(),
        t_promoted.duration_since(t_kill).as_secs_f64(),
        last_error.duration_since(t_kill).as_secs_f64()
    );
    assert!(before > 0, "the writer wrote before the kill");
    assert!(after > 10, "the run goes on after the failover: {after}");
    // Errors only for transactions cut by the failover (rows hashed to dn1 while it
    // has no primary; rows of dn2 go on): none before the kill, none once the CN
    // follows the new primary, which it does within a heartbeat of status naming it
    // (plus a heartbeat of slack for the status poll and the CnSync round).
    let heartbeat = c.cfg.timing.heartbeat_interval();
    let follow_by = t_promoted + heartbeat * 2;
    for (at, e) in &seen.errors {
        assert!(
            *at >= t_kill && *at <= follow_by,
            "an error outside the failover ({:.1} s after the kill, promoted after {:.1} s): {e}",
            at.duration_since(t_kill).as_secs_f64(),
            t_promoted.duration_since(t_kill).as_secs_f64()
        );
    }

    // No acknowledged row is lost: every acked id is there, read through the CN.
    let cn = connect_cn(cn_port, Duration::from_secs(10)).await?;
    pgbench_checks(&cn, bench.await??, t_start, t_promoted).await?;
    let present: std::collections::HashSet<i64> = cn
        .query("select id from acked", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<i64> = seen
        .acked
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !present.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged ids lost: {lost:?}");
    assert_eq!(member_state(&c.status()?, "cn2"), "normal");
    Ok(())
}
