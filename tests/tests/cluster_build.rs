//! `cm_ctl build` over the data-unit build channel on a running cluster: an incremental
//! rebuild of dn1's standby (only differing blocks travel), then a full one (old data
//! moved aside); after each the standby is the group's synchronous standby again and
//! holds every row the primary has.

#[path = "failover_support.rs"]
mod failover_support;

use std::time::Duration;

use anyhow::{ensure, Result};
use failover_support::group_of;
use mpp_ha_tests::{connect, wait_for, LocalCluster};

const PORT_BASE: u16 = 13000;
const T: Duration = Duration::from_secs(60);

async fn rows(port: u16) -> Result<i64> {
    let c = connect(port, Duration::from_secs(5)).await?;
    Ok(c.query_one("SELECT count(*) FROM b", &[]).await?.get(0))
}

async fn dn1_normal(c: &LocalCluster) -> Result<()> {
    wait_for("dn1 normal", T, || async {
        Ok((group_of(&c.status()?, "dn1").0 == "normal").then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cm_ctl_build_incremental_then_full() -> Result<()> {
    let c = LocalCluster::new("cluster-build", PORT_BASE);
    c.up(120)?;
    let (p1, p2) = (c.port("dn1_h1"), c.port("dn1_h2"));
    let db = connect(p1, T).await?;
    db.batch_execute(
        "CREATE TABLE b (id int PRIMARY KEY, pad text); \
         INSERT INTO b SELECT g, md5(g::text) FROM generate_series(1, 50000) g;",
    )
    .await?;
    dn1_normal(&c).await?;

    let mut next = 50_000;
    for (args, kind) in [
        (vec![], "incremental build"),
        (vec!["--full"], "full build"),
    ] {
        let mut cmd = vec!["build", "--instance", "dn1_h2", "--timeout", "120"];
        cmd.extend(args);
        let out = c.cm_ctl(&cmd);
        ensure!(out.success, "{cmd:?}: {}\n{}", out.stderr, c.logs());
        eprintln!("{}", out.stdout.trim());
        ensure!(out.stdout.contains(kind), "{kind}: {}", out.stdout);
        if kind == "full build" {
            ensure!(out.stdout.contains("data.old"), "{}", out.stdout);
        }
        dn1_normal(&c).await?;
        // A synchronous commit returns only once the rebuilt standby has it.
        next += 1;
        db.execute("INSERT INTO b VALUES ($1, 'after build')", &[&next])
            .await?;
        let want = rows(p1).await?;
        wait_for("the rebuilt standby holds every row", T, || async {
            Ok(rows(p2).await.ok().filter(|n| *n == want))
        })
        .await?;
    }
    Ok(())
}
