//! A whole local cluster through `cm_ctl local up` and `local down`: every DN group
//! comes up with a normal primary and standby, both CNs serve, a row written on a primary is read on
//! its standby, `up` is idempotent, and `down` leaves no process behind.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mpp_ha_tests::{
    connect, connect_cn, member_state, pid_alive, processes_under, status_member, wait_for,
    LocalCluster,
};
use serde_json::Value;

const PORT_BASE: u16 = 22000;

fn group<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["dn_groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["name"] == name))
        .unwrap_or_else(|| panic!("no dn group {name} in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_local_up_replicates_and_local_down_leaves_nothing() -> Result<()> {
    let c = LocalCluster::new("cluster-lifecycle", PORT_BASE);
    let t0 = Instant::now();
    let out = c.up(120)?;
    eprintln!(
        "local up took {:.1} s\n{}",
        t0.elapsed().as_secs_f64(),
        out.stdout
    );
    let dn1_port = c.port("dn1_h1");
    assert!(
        out.stdout.contains(&format!(
            "PGPASSWORD=$(cat {}) psql \"host=127.0.0.1 port={dn1_port} user=mpp_admin dbname=postgres\"",
            ha_common::dn_auth::password_file(&c.cfg, ha_common::dn_auth::DnRole::Admin).display()
        )),
        "up prints how to connect: {}",
        out.stdout
    );

    let status = c.status()?;
    for (g, primary, standby) in [("dn1", "dn1_h1", "dn1_h2"), ("dn2", "dn2_h2", "dn2_h3")] {
        let members = group(&status, g)["members"].as_array().expect("members");
        for m in members {
            for key in ["name", "host", "port", "role", "state", "lsn"] {
                assert!(!m[key].is_null(), "{key} missing in {m}");
            }
        }
        let p = status_member(&status, primary).unwrap();
        assert_eq!(
            (p["role"].as_str(), p["state"].as_str()),
            (Some("primary"), Some("normal")),
            "{p}"
        );
        assert!(p["lsn"].as_str().is_some_and(|l| l.contains('/')), "{p}");
        let s = status_member(&status, standby).unwrap();
        assert_eq!(
            (s["role"].as_str(), s["state"].as_str()),
            (Some("standby"), Some("normal")),
            "{s}"
        );
    }
    for name in ["gtm1", "gtm2"] {
        assert_eq!(member_state(&status, name), "normal", "{status}");
    }
    assert_eq!(member_state(&status, "cms1"), "normal");
    assert_eq!(status_member(&status, "cms2").unwrap()["role"], "standby");
    // The agents run the CNs: each serves, is in the DDL set, and `up` says how to
    // connect to it.
    for cn in ["cn1", "cn2"] {
        let m = status_member(&status, cn).unwrap();
        assert_eq!(
            (
                m["state"].as_str(),
                m["port"].as_u64(),
                m["in_ddl_set"].as_bool()
            ),
            (Some("normal"), Some(u64::from(c.port(cn))), Some(true)),
            "{m}"
        );
        let user = c.cfg.user("postgres").context("local.toml's CN user")?;
        let line = format!(
            "coordinator {cn}: PGPASSWORD=$(cat {}) psql \"host=127.0.0.1 port={} user=postgres dbname=postgres\"",
            ha_common::dn_auth::user_password_file(&c.cfg, user).display(),
            c.port(cn)
        );
        assert!(out.stdout.contains(&line), "{line} not in {}", out.stdout);
        let client = connect_cn(c.port(cn), Duration::from_secs(10)).await?;
        let one = client.query_one("select 40 + 2", &[]).await?;
        assert_eq!(one.get::<_, i32>(0), 42, "{cn} answers");
    }
    // The DN secondaries run (dn_replicator) and report themselves.
    for name in ["dn1_h3", "dn2_h1"] {
        let m = status_member(&status, name).unwrap();
        assert_eq!(
            (m["role"].as_str(), m["state"].as_str()),
            (Some("secondary"), Some("normal")),
            "{m}"
        );
    }

    let table = c.cm_ctl(&["status"]);
    assert!(table.success, "{}", table.stderr);
    for needle in [
        "cms1",
        "gtm2",
        "dn2_h3",
        "cn2",
        "dn group dn1: normal",
        "dn group dn2: normal",
    ] {
        assert!(
            table.stdout.contains(needle),
            "{needle} not in\n{}",
            table.stdout
        );
    }

    // A row committed on dn1's primary is readable on its standby.
    let primary = connect(c.port("dn1_h1"), Duration::from_secs(5)).await?;
    primary
        .batch_execute(
            "CREATE TABLE cluster_t (id int PRIMARY KEY, v text);
             INSERT INTO cluster_t VALUES (1, 'replicated');",
        )
        .await?;
    let standby = connect(c.port("dn1_h2"), Duration::from_secs(5)).await?;
    let v: String = wait_for(
        "the row on dn1's standby",
        Duration::from_secs(20),
        || async {
            let rows = match standby
                .query("SELECT v FROM cluster_t WHERE id = 1", &[])
                .await
            {
                Ok(r) => r,
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                    return Ok(None)
                }
                Err(e) => return Err(e.into()),
            };
            Ok(rows.first().map(|r| r.get(0)))
        },
    )
    .await?;
    assert_eq!(v, "replicated");
    let in_recovery: bool = standby
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    assert!(in_recovery, "dn1_h2 must be a standby");
    drop((primary, standby));

    // Every DN (primary and standby) can take part in two-phase commit: the agent sets
    // max_prepared_transactions, at least max_connections.
    for dn in ["dn1_h1", "dn1_h2", "dn2_h2", "dn2_h3"] {
        let client = connect(c.port(dn), Duration::from_secs(5)).await?;
        let row = client
            .query_one(
                "SELECT current_setting('max_prepared_transactions')::int, \
                 current_setting('max_connections')::int",
                &[],
            )
            .await?;
        let (prepared, conns): (i32, i32) = (row.get(0), row.get(1));
        assert!(
            prepared > 0 && prepared >= conns,
            "{dn}: max_prepared_transactions {prepared}, max_connections {conns}"
        );
    }

    // `up` again changes nothing.
    let before = c.recorded_pids();
    let again = c.up(60)?;
    assert_eq!(
        c.recorded_pids(),
        before,
        "up on a running cluster restarts nothing"
    );
    assert!(again.stderr.contains("already running"), "{}", again.stderr);

    // `down` stops everything: recorded daemons, postmasters, everything else.
    let postmasters: Vec<u32> = ["dn1_h1", "dn1_h2", "dn2_h2", "dn2_h3"]
        .iter()
        .map(|n| {
            c.postmaster_pid(n)
                .with_context(|| format!("{n} has no live postmaster"))
        })
        .collect::<Result<_>>()?;
    let t1 = Instant::now();
    let down = c.down();
    if !down.success {
        bail!("local down failed: {}\n{}", down.stderr, c.logs());
    }
    eprintln!("local down took {:.1} s", t1.elapsed().as_secs_f64());
    for (key, pid) in &before {
        assert!(!pid_alive(*pid), "{key} (pid {pid}) survived local down");
    }
    for pid in &postmasters {
        assert!(!pid_alive(*pid), "postmaster {pid} survived local down");
    }
    let left = processes_under(c.base_dir());
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let again = c.down();
    assert!(again.success, "down is idempotent: {}", again.stderr);
    Ok(())
}
