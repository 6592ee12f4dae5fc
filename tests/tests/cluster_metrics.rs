//! Operations endpoints on a real local cluster (one cluster run for every check): each daemon's /metrics (CMServers, GTMs, CNs, DN secondaries, agents) has the named metrics with sane values, GXIDs handed out rise after `gtm next`, `/primary` is 200 on exactly one CMServer and 503 on the other, `/cluster` is the status JSON with metrics URLs, and a CN's `/health` is 200 while it accepts clients.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use ha_common::metrics::{http_get, metric_names, sample};
use mpp_ha_tests::{run_bin, wait_for, LocalCluster};

const PORT_BASE: u16 = 46000;
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// `host:port` of a `http://host:port` URL.
fn addr_of(url: &str) -> Result<String> {
    url.strip_prefix("http://")
        .map(str::to_owned)
        .with_context(|| format!("not an http:// URL: {url:?}"))
}

async fn get(url: &str, path: &str) -> Result<(u16, String)> {
    let addr = addr_of(url)?;
    http_get(&addr, path, HTTP_TIMEOUT)
        .await
        .with_context(|| format!("GET {url}{path}"))
}

/// /metrics of `url`, waiting until it answers 200 and has every one of `names`.
async fn metrics_with(url: &str, names: &[&str]) -> Result<String> {
    wait_for(
        &format!("{url}/metrics with {names:?}"),
        Duration::from_secs(20),
        || async {
            let (code, body) = get(url, "/metrics").await?;
            if code != 200 {
                bail!("status {code}");
            }
            let have = metric_names(&body);
            let missing: Vec<&&str> = names
                .iter()
                .filter(|n| !have.iter().any(|h| h == *n))
                .collect();
            if !missing.is_empty() {
                bail!("missing {missing:?}");
            }
            Ok(Some(body))
        },
    )
    .await
}

fn gxids(text: &str) -> f64 {
    sample(text, "mpp_ha_gxids_handed_out_total", &[]).unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_daemon_serves_metrics_and_health() -> Result<()> {
    let c = LocalCluster::new("cluster-metrics", PORT_BASE);
    c.up(120)?;
    let status = c.status()?;

    // cm_ctl status --json: a metrics_url on every daemon row, and the agents.
    let url = |group: &str, name: &str| -> Result<String> {
        let rows = status[group].as_array().context("status rows")?;
        let row = rows
            .iter()
            .find(|r| r["name"] == name)
            .with_context(|| format!("{name} not in status.{group}"))?;
        let u = row["metrics_url"].as_str().unwrap_or("").to_owned();
        if u.is_empty() {
            bail!("{name} has no metrics_url: {row}");
        }
        Ok(u)
    };
    let agents = status["agents"]
        .as_array()
        .context("no agents[] in status")?;
    assert_eq!(agents.len(), 3, "{agents:?}");
    for a in agents {
        assert_eq!(a["state"], "normal", "agent row {a}");
        assert!(
            a["metrics_url"]
                .as_str()
                .is_some_and(|u| u.starts_with("http://")),
            "{a}"
        );
    }
    let secondary = status["dn_groups"][0]["members"]
        .as_array()
        .context("dn1 members")?
        .iter()
        .find(|m| m["name"] == "dn1_h3")
        .context("dn1_h3 row")?
        .clone();
    let dn_primary_row = &status["dn_groups"][0]["members"][0];
    assert_eq!(
        dn_primary_row["metrics_url"], "",
        "PostgreSQL has no metrics server"
    );

    // CMServers: exactly one answers /primary 200; its /metrics has the cluster view.
    let (mut primaries, mut standbys) = (Vec::new(), Vec::new());
    for name in ["cms1", "cms2"] {
        let u = url("cm_servers", name)?;
        let (code, _) = get(&u, "/primary").await?;
        match code {
            200 => primaries.push((name, u)),
            503 => standbys.push((name, u)),
            other => bail!("{name} /primary answered {other}"),
        }
    }
    assert_eq!(
        (primaries.len(), standbys.len()),
        (1, 1),
        "{primaries:?} {standbys:?}"
    );
    let (pname, purl) = &primaries[0];
    let text = metrics_with(
        purl,
        &[
            "mpp_ha_instance_role",
            "mpp_ha_instance_term",
            "mpp_ha_cluster_instance_role",
            "mpp_ha_cluster_instance_state",
            "mpp_ha_replication_lag_bytes",
            "mpp_ha_agent_heartbeat_age_seconds",
            "mpp_ha_agent_heartbeats",
            // mpp_ha_failovers_total and mpp_ha_switchovers_total are families by group:
            // no series until the first one (Prometheus reads an absent series as none).
            "mpp_ha_switchover_duration_seconds",
        ],
    )
    .await?;
    assert_eq!(
        sample(
            &text,
            "mpp_ha_instance_role",
            &[("node", pname), ("role", "primary")]
        ),
        Some(1.0),
        "{text}"
    );
    let term = sample(&text, "mpp_ha_instance_term", &[("node", pname)]).unwrap_or(0.0);
    assert!(term >= 1.0, "term {term}");
    for dn in ["dn1_h1", "dn2_h2", "gtm1"] {
        assert_eq!(
            sample(
                &text,
                "mpp_ha_cluster_instance_role",
                &[("node", dn), ("role", "primary")]
            ),
            Some(1.0),
            "{dn} primary in the CMServer's view: {text}"
        );
    }
    let lag = sample(&text, "mpp_ha_replication_lag_bytes", &[("node", "dn1_h2")])
        .context("lag of dn1_h2")?;
    assert!((0.0..1e9).contains(&lag), "lag {lag}");
    for h in ["h1", "h2", "h3"] {
        let age = sample(&text, "mpp_ha_agent_heartbeat_age_seconds", &[("host", h)])
            .context("heartbeat age")?;
        assert!((0.0..10.0).contains(&age), "{h} heartbeat age {age}");
        let n = sample(&text, "mpp_ha_agent_heartbeats_total", &[("host", h)]).unwrap_or(0.0);
        assert!(n >= 1.0, "{h} heartbeats {n}");
    }
    let (sname, surl) = &standbys[0];
    let stext = metrics_with(surl, &["mpp_ha_instance_role"]).await?;
    assert_eq!(
        sample(
            &stext,
            "mpp_ha_instance_role",
            &[("node", sname), ("role", "standby")]
        ),
        Some(1.0),
        "{stext}"
    );

    // /cluster: the status JSON on the primary, 503 on the standby.
    let (code, body) = get(purl, "/cluster").await?;
    assert_eq!(code, 200, "{body}");
    let cluster: serde_json::Value = serde_json::from_str(&body).context("/cluster is not JSON")?;
    assert!(
        cluster["term"].as_u64().is_some_and(|t| t >= 1),
        "{cluster}"
    );
    assert_eq!(cluster["dn_groups"].as_array().map(Vec::len), Some(2));
    assert_eq!(get(surl, "/cluster").await?.0, 503);

    // GTM primary: role and term, GXIDs handed out rise after `gtm next`.
    let gurl = url("gtm", "gtm1")?;
    let names = [
        "mpp_ha_gxids_handed_out",
        "mpp_ha_gxid_reservations",
        "mpp_ha_instance_role",
    ];
    let before = metrics_with(&gurl, &names).await?;
    assert_eq!(
        sample(
            &before,
            "mpp_ha_instance_role",
            &[("node", "gtm1"), ("role", "primary")]
        ),
        Some(1.0),
        "{before}"
    );
    let config = c.config.display().to_string();
    let out = run_bin("gtm", &["next", "--config", &config, "--count", "5"]);
    assert!(out.success, "gtm next: {}", out.stderr);
    let after = metrics_with(&gurl, &names).await?;
    assert!(
        gxids(&after) >= gxids(&before) + 5.0,
        "before {} after {}",
        gxids(&before),
        gxids(&after)
    );
    assert!(sample(&after, "mpp_ha_gxid_reservations_total", &[]).unwrap_or(0.0) >= 1.0);
    let g2 = metrics_with(&url("gtm", "gtm2")?, &["mpp_ha_instance_role"]).await?;
    assert_eq!(
        sample(
            &g2,
            "mpp_ha_instance_role",
            &[("node", "gtm2"), ("role", "standby")]
        ),
        Some(1.0),
        "{g2}"
    );

    // CN: /health 200 while it accepts clients; DDL and 2PC counts and in-doubt.
    for cn in ["cn1", "cn2"] {
        let u = url("cn", cn)?;
        wait_for(
            &format!("{cn} /health 200"),
            Duration::from_secs(20),
            || async {
                let (code, body) = get(&u, "/health").await?;
                Ok((code == 200).then_some(body))
            },
        )
        .await?;
        let t = metrics_with(
            &u,
            &[
                "mpp_ha_ddl",
                "mpp_ha_two_phase_commits",
                "mpp_ha_in_doubt_transactions",
            ],
        )
        .await?;
        assert_eq!(
            sample(
                &t,
                "mpp_ha_instance_state",
                &[("node", cn), ("state", "accepting")]
            ),
            Some(1.0),
            "{t}"
        );
    }

    // DN secondary and agents.
    let sec = metrics_with(
        secondary["metrics_url"].as_str().context("secondary url")?,
        &["mpp_ha_secondary_flush_lsn", "mpp_ha_instance_role"],
    )
    .await?;
    assert_eq!(
        sample(
            &sec,
            "mpp_ha_instance_role",
            &[("node", "dn1_h3"), ("role", "secondary")]
        ),
        Some(1.0),
        "{sec}"
    );
    let a1 = metrics_with(
        agents[0]["metrics_url"].as_str().context("agent url")?,
        &["mpp_ha_agent_reports", "mpp_ha_agent_instance_alive"],
    )
    .await?;
    assert!(
        sample(
            &a1,
            "mpp_ha_agent_reports_total",
            &[("outcome", "accepted")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{a1}"
    );
    assert_eq!(
        sample(&a1, "mpp_ha_agent_instance_alive", &[("node", "dn1_h1")]),
        Some(1.0),
        "{a1}"
    );
    drop(c);
    Ok(())
}
