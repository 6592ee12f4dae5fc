//! The CMServer's side of the coordinator contract, against a real cluster: this test
//! calls `CmServer.CnSync` as a CN does (it is the CN's client, the CMServers are
//! real). Only the primary answers authoritatively; it names the DN primaries with
//! their ports and follows a switchover; a READY CN is admitted to the DDL set, which
//! is durable and shown by `cm_ctl status`; a CN that stops calling is taken out after
//! `timing.cn_failover_timeout_ms` (and not before); a CN with an older catalog is
//! not admitted; an unknown CN is refused.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ha_common::proto::cm::cm_server_client::CmServerClient;
use ha_common::proto::cm::{CnPhase, CnSyncReply, CnSyncRequest};
use mpp_ha_tests::{status_member, wait_for, LocalCluster};

const PORT_BASE: u16 = 18000;

/// Calls CnSync on every CMServer; returns the primary's reply and how many answered
/// as primary.
async fn cn_sync(
    c: &LocalCluster,
    cn: &str,
    phase: CnPhase,
    version: u64,
) -> Result<(CnSyncReply, usize)> {
    let mut primary = None;
    let mut primaries = 0;
    for ep in c.cfg.cm_server_endpoints() {
        // CnSync is a CN's call: present a cn certificate.
        let cn_cert = ha_common::tls::TlsMaterial::load(&c.cfg, ha_common::tls::CertRole::Cn)?;
        let channel = ha_common::tls::endpoint_with(
            cn_cert.as_ref(),
            &ep,
            ha_common::tls::CertRole::CmServer,
        )?
        .connect()
        .await
        .with_context(|| format!("connect {ep}"))?;
        let mut client = CmServerClient::new(channel);
        let reply = client
            .cn_sync(CnSyncRequest {
                cn: cn.into(),
                phase: phase as i32,
                catalog_version: version,
                term: 0,
                catalog_prepared: false,
            })
            .await
            .with_context(|| format!("CnSync at {ep}"))?
            .into_inner();
        if reply.primary {
            primaries += 1;
            primary = Some(reply);
        }
    }
    match primary {
        Some(r) => Ok((r, primaries)),
        None => bail!("no CMServer answered as primary"),
    }
}

fn cn_row(c: &LocalCluster, name: &str) -> Result<serde_json::Value> {
    let s = c.status()?;
    status_member(&s, name)
        .cloned()
        .with_context(|| format!("{name} not in status"))
}

fn primaries(reply: &CnSyncReply) -> Vec<(String, String, u32, bool)> {
    reply
        .dn_primaries
        .iter()
        .map(|p| (p.group.clone(), p.instance.clone(), p.port, p.available))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cn_sync_topology_and_the_ddl_set() -> Result<()> {
    let c = LocalCluster::new("cluster-cn-sync", PORT_BASE);
    c.up(180)?;
    let port = |n: &str| u32::from(c.port(n));

    // Topology: the primaries of both groups, writable.
    let (reply, n) = wait_for(
        "both DN primaries available",
        Duration::from_secs(20),
        || async {
            let (r, n) = cn_sync(&c, "cn2", CnPhase::CnStarting, 0).await?;
            Ok(r.dn_primaries.iter().all(|p| p.available).then_some((r, n)))
        },
    )
    .await?;
    assert_eq!(n, 1, "exactly one CMServer answers as primary");
    assert_eq!(
        primaries(&reply),
        [
            ("dn1".into(), "dn1_h1".into(), port("dn1_h1"), true),
            ("dn2".into(), "dn2_h2".into(), port("dn2_h2"), true),
        ]
    );
    assert!(!reply.admitted, "a STARTING CN is not admitted");

    // A READY CN is admitted at once; an unknown CN is refused.
    let (reply, _) = cn_sync(&c, "cn1", CnPhase::CnReady, 0).await?;
    assert!(reply.admitted);
    let set: Vec<_> = reply
        .ddl_set
        .iter()
        .map(|p| (p.name.as_str(), p.port))
        .collect();
    assert_eq!(set, [("cn1", port("cn1"))]);
    let e = cn_sync(&c, "cn9", CnPhase::CnReady, 0).await.unwrap_err();
    assert!(format!("{e:#}").contains("cn9"), "{e:#}");
    let row = cn_row(&c, "cn1")?;
    assert_eq!(row["in_ddl_set"], true, "{row}");
    assert_eq!(row["port"], port("cn1"), "{row}");
    let row = cn_row(&c, "cn2")?;
    assert_eq!(row["in_ddl_set"], false, "{row}");
    assert!(
        row["detail"].as_str().unwrap_or("").contains("starting"),
        "{row}"
    );

    // cn1 moves to catalog version 2 (a DDL); cn2 comes READY with version 1: it must
    // copy the catalog first. With version 2 it is admitted.
    let (reply, _) = cn_sync(&c, "cn1", CnPhase::CnReady, 2).await?;
    assert_eq!(reply.ddl_set[0].catalog_version, 2);
    let (reply, _) = cn_sync(&c, "cn2", CnPhase::CnReady, 1).await?;
    assert!(!reply.admitted, "an older catalog is not admitted");
    let (reply, _) = cn_sync(&c, "cn2", CnPhase::CnReady, 2).await?;
    assert!(reply.admitted);
    assert_eq!(reply.ddl_set.len(), 2);

    // cn2 stops calling (it died); cn1 keeps calling. cn2 leaves the set after the
    // timeout, not before.
    let timeout = c.cfg.timing.cn_failover_timeout();
    let last_cn2 = Instant::now();
    let left = wait_for(
        "cn2 to leave the DDL set",
        Duration::from_secs(20),
        || async {
            let (r, _) = cn_sync(&c, "cn1", CnPhase::CnReady, 2).await?;
            assert!(r.admitted, "cn1 stays");
            Ok((!r.ddl_set.iter().any(|p| p.name == "cn2")).then(Instant::now))
        },
    )
    .await?;
    let after = left.duration_since(last_cn2);
    eprintln!(
        "cn2 silent -> out of the DDL set: {:.1} s",
        after.as_secs_f64()
    );
    assert!(
        after >= timeout,
        "taken out after {after:?}, before the timeout {timeout:?}"
    );
    assert!(
        after < timeout + Duration::from_secs(3),
        "taken out only after {after:?}"
    );
    let row = cn_row(&c, "cn2")?;
    assert_eq!(row["in_ddl_set"], false, "{row}");
    assert!(
        row["detail"].as_str().unwrap_or("").contains("taken out"),
        "{row}"
    );

    // A switchover: the CN is told the new primary of dn1 in the new term.
    let term_before = reply.term;
    wait_for("dn1 to be normal", Duration::from_secs(30), || async {
        let s = c.status()?;
        let g = s["dn_groups"][0]["state"].as_str().unwrap_or("").to_owned();
        Ok((g == "normal").then_some(()))
    })
    .await?;
    let out = c.cm_ctl(&["switchover", "--instance", "dn1_h2", "--timeout", "60"]);
    assert!(out.success, "switchover: {}{}", out.stdout, out.stderr);
    let reply = wait_for(
        "dn1_h2 available as dn1's primary",
        Duration::from_secs(20),
        || async {
            let (r, _) = cn_sync(&c, "cn1", CnPhase::CnReady, 2).await?;
            let p = &r.dn_primaries[0];
            Ok((p.instance == "dn1_h2" && p.available).then_some(r))
        },
    )
    .await?;
    assert_eq!(reply.dn_primaries[0].port, port("dn1_h2"));
    assert!(
        reply.term > term_before,
        "a new term: {} then {}",
        term_before,
        reply.term
    );

    // The set is durable: both CMServers' state files hold it (the standby's by streaming).
    for s in &c.cfg.cm_servers {
        let file = c.cfg.instance_dir(&s.name).join("cluster_state");
        let bytes = std::fs::read(&file).with_context(|| format!("read {}", file.display()))?;
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.contains("\"ddl_set\""),
            "{} lacks the DDL set",
            file.display()
        );
        assert!(text.contains("\"cn1\""), "{}: {text}", file.display());
    }
    Ok(())
}
