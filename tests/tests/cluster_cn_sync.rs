//! The CNs the agents run, in a real cluster, and the DDL set the CMServer keeps: DDL
//! through cn1 is seen through cn2 and on every DN primary; cn2 killed (and kept from
//! coming back: its ports are taken) leaves the DDL set after
//! `timing.cn_failover_timeout_ms`, after which DDL through cn1 succeeds again; once
//! its ports are free its agent restarts it, it copies the catalog and serves the new
//! table; `cm_ctl status` tells each CN's state, catalog version and membership
//! truthfully throughout; the set is durable on both CMServers; an unknown CN is
//! refused; after a switchover the CNs write to the new primary.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ha_common::proto::cm::cm_server_client::CmServerClient;
use ha_common::proto::cm::{CnPhase, CnSyncRequest};
use mpp_ha_tests::{connect, connect_cn, kill9, pid_alive, status_member, wait_for, LocalCluster};
use serde_json::Value;

const PORT_BASE: u16 = 18000;

/// (state, catalog version, in the DDL set) of a CN's status row.
fn cn_row(status: &Value, name: &str) -> Result<(String, u64, bool)> {
    let m = status_member(status, name).with_context(|| format!("{name} not in {status}"))?;
    Ok((
        m["state"].as_str().unwrap_or("").to_owned(),
        m["catalog_version"].as_u64().unwrap_or(0),
        m["in_ddl_set"].as_bool().unwrap_or(false),
    ))
}

fn detail(status: &Value, name: &str) -> String {
    status_member(status, name)
        .and_then(|m| m["detail"].as_str())
        .unwrap_or("")
        .to_owned()
}

/// The ports of the DN primaries the status names.
fn dn_primary_ports(status: &Value) -> Vec<(String, u16)> {
    status["dn_groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["members"].as_array())
        .flatten()
        .filter(|m| m["role"] == "primary")
        .map(|m| {
            (
                m["name"].as_str().unwrap_or("").to_owned(),
                m["port"].as_u64().unwrap_or(0) as u16,
            )
        })
        .collect()
}

/// Whether `table` exists on every DN primary (and nothing is left prepared).
async fn on_every_dn_primary(c: &LocalCluster, table: &str) -> Result<()> {
    let status = c.status()?;
    let primaries = dn_primary_ports(&status);
    assert_eq!(primaries.len(), c.cfg.dn_groups.len(), "{status}");
    for (name, port) in primaries {
        let dn = connect(port, Duration::from_secs(5)).await?;
        let row = dn
            .query_one(
                "select to_regclass($1) is not null, \
                 (select count(*) from pg_prepared_xacts)",
                &[&table],
            )
            .await
            .map_err(|e| anyhow::anyhow!("{table} on {name}: {e:?}"))?;
        let (exists, prepared): (bool, i64) = (row.get(0), row.get(1));
        assert!(exists, "{table} missing on {name}");
        assert_eq!(prepared, 0, "{name} keeps a prepared transaction");
    }
    Ok(())
}

fn cn_pid(c: &LocalCluster, name: &str) -> Option<u32> {
    std::fs::read_to_string(c.base_dir().join(format!("{name}.cn.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|p| pid_alive(*p))
}

/// Kills `name`'s `cn serve` and takes its ports, so that its agent's restarts fail
/// until the listeners are dropped. Retries if the agent restarted it in between.
async fn kill_and_keep_down(c: &LocalCluster, name: &str) -> Result<Vec<TcpListener>> {
    let inst = c
        .cfg
        .cns
        .iter()
        .find(|i| i.name == name)
        .context("no such CN")?;
    let ports = [inst.rpc_port(), inst.port()];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pid) = cn_pid(c, name) {
            kill9(pid);
            let gone = Instant::now() + Duration::from_secs(5);
            while pid_alive(pid) && Instant::now() < gone {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let taken: std::io::Result<Vec<_>> = ports
            .iter()
            .map(|p| TcpListener::bind(("127.0.0.1", *p)))
            .collect();
        if let Ok(listeners) = taken {
            return Ok(listeners);
        }
        if Instant::now() > deadline {
            bail!("could not keep {name} down: its agent restarts it at once");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_run_cns_share_ddl_leave_and_rejoin_the_ddl_set() -> Result<()> {
    let c = LocalCluster::new("cluster-cn-sync", PORT_BASE);
    c.up(180)?;
    let (cn1_port, cn2_port) = (c.port("cn1"), c.port("cn2"));

    // Both CNs serve and are in the DDL set with one catalog version.
    let status = c.status()?;
    let (s1, v1, in1) = cn_row(&status, "cn1")?;
    let (s2, v2, in2) = cn_row(&status, "cn2")?;
    assert_eq!((s1.as_str(), in1), ("normal", true), "{status}");
    assert_eq!((s2.as_str(), in2), ("normal", true), "{status}");
    assert_eq!(v1, v2, "{status}");

    // DDL through cn1: seen through cn2 and on every DN primary; both versions move.
    let cn1 = connect_cn(cn1_port, Duration::from_secs(10)).await?;
    // (Two queries: the CN does not see a table created earlier in the same
    // multi-statement query string.)
    cn1.batch_execute("create table orders (id int primary key, v text)")
        .await
        .map_err(|e| anyhow::anyhow!("create orders through cn1: {e:?}"))?;
    cn1.batch_execute("insert into orders values (1, 'one'), (2, 'two'), (3, 'three')")
        .await
        .map_err(|e| anyhow::anyhow!("create orders through cn1: {e:?}"))?;
    let cn2 = connect_cn(cn2_port, Duration::from_secs(10)).await?;
    let n: i64 = cn2
        .query_one("select count(*) from orders", &[])
        .await
        .map_err(|e| anyhow::anyhow!("count through cn2: {e:?}"))?
        .get(0);
    assert_eq!(n, 3, "cn2 reads what was written through cn1");
    on_every_dn_primary(&c, "orders").await?;
    let after_ddl = wait_for(
        "both CNs at the new catalog version in status",
        Duration::from_secs(10),
        || async {
            let s = c.status()?;
            let (a, b) = (cn_row(&s, "cn1")?, cn_row(&s, "cn2")?);
            Ok((a.1 > v1 && a.1 == b.1 && a.2 && b.2).then_some(a.1))
        },
    )
    .await?;
    drop(cn2);

    // cn2 killed and kept down: it leaves the DDL set after cn_failover_timeout (not
    // before), status says so, and DDL through cn1 succeeds again.
    let timeout = c.cfg.timing.cn_failover_timeout();
    let ports = kill_and_keep_down(&c, "cn2").await?;
    let killed = Instant::now();
    let left = wait_for(
        "cn2 to leave the DDL set",
        Duration::from_secs(30),
        || async {
            let s = c.status()?;
            let (state, _, member) = cn_row(&s, "cn2")?;
            Ok((!member).then_some((state, detail(&s, "cn2"), Instant::now())))
        },
    )
    .await?;
    let out_after = left.2.duration_since(killed);
    eprintln!(
        "cn2 killed -> out of the DDL set: {:.1} s",
        out_after.as_secs_f64()
    );
    // cn2's last CnSync came up to one heartbeat before the kill.
    let earliest = timeout.saturating_sub(c.cfg.timing.heartbeat_interval());
    assert!(
        out_after >= earliest,
        "taken out after {out_after:?}, before the timeout {timeout:?}"
    );
    assert_eq!(left.0, "down", "cn2 is down: {}", left.1);
    let ddl_ok = wait_for(
        "DDL through cn1 without cn2",
        Duration::from_secs(30),
        || async {
            Ok(cn1
                .batch_execute("create table late (id int primary key, v text)")
                .await
                .is_ok()
                .then(Instant::now))
        },
    )
    .await?;
    cn1.batch_execute("insert into late values (7, 'seven')")
        .await
        .map_err(|e| anyhow::anyhow!("insert into late: {e:?}"))?;
    eprintln!(
        "cn2 killed -> DDL through cn1 succeeds: {:.1} s",
        ddl_ok.duration_since(killed).as_secs_f64()
    );
    on_every_dn_primary(&c, "late").await?;
    // Status hears cn1's new version at its next CnSync (a heartbeat).
    let (status, v1_now) = wait_for(
        "cn1's new catalog version in status",
        Duration::from_secs(10),
        || async {
            let s = c.status()?;
            let v = cn_row(&s, "cn1")?.1;
            Ok((v > after_ddl).then_some((s, v)))
        },
    )
    .await?;
    let (s1, _, in1) = cn_row(&status, "cn1")?;
    let (s2, _, in2) = cn_row(&status, "cn2")?;
    assert_eq!((s1.as_str(), in1), ("normal", true), "{status}");
    assert_eq!((s2.as_str(), in2), ("down", false), "{status}");
    assert!(
        detail(&status, "cn2").contains("taken out"),
        "status says why: {status}"
    );

    // The set is durable: both CMServers' state files hold it without cn2.
    for s in &c.cfg.cm_servers {
        let file = c.cfg.instance_dir(&s.name).join("cluster_state");
        wait_for(
            "the DDL set on both CMServers",
            Duration::from_secs(10),
            || async {
                let bytes = std::fs::read(&file)?;
                let text = String::from_utf8_lossy(&bytes);
                Ok((text.contains("\"ddl_set\"") && text.contains("\"cn1\"")).then_some(()))
            },
        )
        .await
        .with_context(|| file.display().to_string())?;
    }

    // cn2's ports free again: its agent restarts it; it copies the catalog, is let back
    // in, and serves the table created while it was down.
    drop(ports);
    let back = wait_for(
        "cn2 back in the DDL set at cn1's version",
        Duration::from_secs(60),
        || async {
            let s = c.status()?;
            let (state, v, member) = cn_row(&s, "cn2")?;
            Ok((state == "normal" && member && v == v1_now).then_some(()))
        },
    )
    .await;
    back.with_context(|| c.logs())?;
    // The CN learns it is admitted from the reply to its next CnSync: it serves
    // within moments of status saying so.
    let v: String = wait_for(
        "cn2 to serve the table created while it was down",
        Duration::from_secs(5),
        || async {
            let cn2 = connect_cn(cn2_port, Duration::from_secs(5)).await?;
            Ok(
                match cn2.query_one("select v from late where id = 7", &[]).await {
                    Ok(row) => Some(row.get(0)),
                    Err(e) if e.code().map(|c| c.code()) == Some("57P03") => None,
                    Err(e) => bail!("late through cn2: {e:?}"),
                },
            )
        },
    )
    .await?;
    assert_eq!(v, "seven");

    // An unknown CN is refused by the primary CMServer.
    let mut refused = 0;
    for ep in c.cfg.cm_server_endpoints() {
        let mut client = CmServerClient::connect(format!("http://{ep}")).await?;
        let r = client
            .cn_sync(CnSyncRequest {
                cn: "cn9".into(),
                phase: CnPhase::CnReady as i32,
                catalog_version: 0,
                term: 0,
                catalog_prepared: false,
            })
            .await;
        if let Err(e) = r {
            assert!(e.message().contains("cn9"), "{e}");
            refused += 1;
        }
    }
    assert!(refused >= 1, "nobody refused an unknown CN");

    // A switchover of dn1: writes through both CNs reach the new primary.
    wait_for("dn1 to be normal", Duration::from_secs(30), || async {
        let s = c.status()?;
        Ok((s["dn_groups"][0]["state"] == "normal").then_some(()))
    })
    .await?;
    let out = c.cm_ctl(&["switchover", "--instance", "dn1_h2", "--timeout", "60"]);
    assert!(out.success, "switchover: {}{}", out.stdout, out.stderr);
    for (name, port) in [("cn1", cn1_port), ("cn2", cn2_port)] {
        wait_for(
            "a write on every group through the CN",
            Duration::from_secs(20),
            || async {
                let client = connect_cn(port, Duration::from_secs(5)).await?;
                Ok(client
                    .execute("update orders set v = v || '+'", &[])
                    .await
                    .ok()
                    .filter(|n| *n == 3)
                    .map(|_| ()))
            },
        )
        .await
        .with_context(|| format!("{name} after the switchover"))?;
    }
    Ok(())
}
