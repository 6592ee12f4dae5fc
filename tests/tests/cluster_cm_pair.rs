//! The CMServer pair on a real local cluster (one cluster run for all steps):
//! 1. after `local up`, one CMServer is primary and the other standby, term >= 1;
//! 2. `kill -9` of the primary CMServer: the standby takes over within the lease plus a
//!    few heartbeats, in a higher term; `cm_ctl status` works and no DN changes role;
//! 3. `cm_ctl stop --instance` works through the new primary (the old one, down,
//!    misses it);
//! 4. both CMServers die and restart together: the one with the out-of-date state
//!    (the config's first, which campaigns first) takes the other's newer state before
//!    acting, so the stopped instance stays stopped; `cm_ctl start` through it;
//! 5. its standby, holding only the streamed state, takes over when it dies, and
//!    `local up` brings the old one back as standby;
//! 6. the issue's scenario "CMServer primary killed: the standby takes over and then
//!    handles a DN failover correctly": dn1's primary postmaster and the agent of its
//!    host are killed under a loop of commits; the CMServer that took over promotes
//!    dn1's standby, with every acknowledged commit on it.

#[path = "failover_support.rs"]
mod failover_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use failover_support::{assert_all_present, create_table, role_of, wait_layout, Writer};
use mpp_ha_tests::{
    bin, kill9, member_state, pid_alive, status_member, wait_for, LocalCluster, Proc,
};

const PORT_BASE: u16 = 25000;
const DNS: [&str; 4] = ["dn1_h1", "dn1_h2", "dn2_h2", "dn2_h3"];

/// (primary CMServer, standby CMServer, term) once status shows exactly one primary
/// and one standby, both normal.
fn pair_of(status: &serde_json::Value) -> Result<(String, String, u64)> {
    let rows = status["cm_servers"]
        .as_array()
        .context("no cm_servers in status")?;
    let with = |role: &str| -> Vec<(String, String)> {
        rows.iter()
            .filter(|r| r["role"] == role)
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or("").to_owned(),
                    r["state"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    let (primaries, standbys) = (with("primary"), with("standby"));
    match (primaries.as_slice(), standbys.as_slice()) {
        ([(p, ps)], [(s, ss)]) if ps == "normal" && ss == "normal" => {
            let term = status["term"].as_u64().context("no term")?;
            Ok((p.clone(), s.clone(), term))
        }
        _ => bail!("CMServers: primary {primaries:?}, standby {standbys:?}"),
    }
}

/// The role of every DN member as status shows it.
fn dn_roles(status: &serde_json::Value) -> BTreeMap<String, String> {
    DNS.iter()
        .map(|n| {
            let role = status_member(status, n)
                .and_then(|m| m["role"].as_str())
                .unwrap_or("")
                .to_owned();
            (n.to_string(), role)
        })
        .collect()
}

/// Kills CMServer `name` (kill -9 of `pid`) and waits for the other one to be primary
/// in a term above `term`; returns it, the new term and how long that took.
async fn kill_primary_and_wait_takeover(
    c: &LocalCluster,
    name: &str,
    pid: u32,
    term: u64,
    bound: Duration,
) -> Result<(String, u64, Duration)> {
    kill9(pid);
    let t0 = Instant::now();
    wait_for(
        &format!("{name} to die"),
        Duration::from_secs(10),
        || async { Ok((!pid_alive(pid)).then_some(())) },
    )
    .await?;
    let (new, new_term) = wait_for("the other CMServer to take over", bound, || async {
        let s = c.status()?;
        let row = s["cm_servers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["role"] == "primary")
            .context("no primary row")?;
        let new = row["name"].as_str().unwrap_or("").to_owned();
        let new_term = s["term"].as_u64().unwrap_or(0);
        if new == name || new_term <= term {
            bail!("primary {new} in term {new_term}");
        }
        Ok(Some((new, new_term)))
    })
    .await?;
    Ok((new, new_term, t0.elapsed()))
}

/// Starts CMServer `node` of the cluster by hand (not through `local up`, which would
/// also ask every instance to run).
fn spawn_cm_server(c: &LocalCluster, node: &str) -> Result<Proc> {
    let config = c.config.display().to_string();
    let base = c.base_dir().display().to_string();
    Proc::spawn(
        &format!("{node}-by-hand"),
        &bin("cm_server"),
        &["--config", &config, "--node", node, "--base-dir", &base],
        c.dir.path(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cm_server_pair_fails_over_and_the_old_primary_rejoins_as_standby() -> Result<()> {
    let c = LocalCluster::new("cluster-cm-pair", PORT_BASE);
    let started = Instant::now();
    c.up(120)?;
    let heartbeat = c.cfg.timing.heartbeat_interval();
    let lease = c.cfg.timing.cm_lease();
    // Lease + a few heartbeats, plus cm_ctl's own polling.
    let takeover_bound = lease + heartbeat * 4 + Duration::from_secs(2);

    // 1. One primary, one standby (the standby answers the primary's peer watch).
    let (first, second, term1) = wait_for(
        "a primary and a standby CMServer",
        Duration::from_secs(15),
        || async { pair_of(&c.status()?).map(Some) },
    )
    .await?;
    assert!(term1 >= 1);
    let standby_says = c.cm_ctl(&["status"]);
    assert!(standby_says.success, "{}", standby_says.stderr);
    let roles = dn_roles(&c.status()?);
    eprintln!("primary {first}, standby {second}, term {term1}, DN roles {roles:?}");

    // 2. kill -9 of the primary CMServer: the standby takes over.
    let pid = c
        .recorded_pid(&format!("cm_server-{first}"))
        .context("pid recorded")?;
    let (new, term2, took) = kill_primary_and_wait_takeover(&c, &first, pid, term1, takeover_bound)
        .await
        .with_context(|| c.logs())?;
    assert_eq!(new, second);
    eprintln!(
        "CMServer takeover {first} -> {new} (term {term1} -> {term2}) seen after {:.2} s",
        took.as_secs_f64()
    );
    let text = c.cm_ctl(&["status"]);
    assert!(
        text.success,
        "cm_ctl status after takeover: {}",
        text.stderr
    );
    c.wait_states(&DNS, "normal", Duration::from_secs(30))
        .await?;
    // A few heartbeats later, still no DN changed role (no spurious failover).
    let hold_until = Instant::now() + heartbeat * 4;
    while Instant::now() < hold_until {
        let s = c.status()?;
        assert_eq!(
            dn_roles(&s),
            roles,
            "a DN changed role after the CMServer takeover: {s}"
        );
        tokio::time::sleep(heartbeat / 2).await;
    }

    // 3. An operator action through the new primary, while the old one is down (so
    //    the old one's state file is now out of date).
    let stop = c.cm_ctl(&["stop", "--instance", "dn1_h2", "--timeout", "60"]);
    assert!(stop.success, "stop failed: {}\n{}", stop.stderr, c.logs());
    assert_eq!(member_state(&c.status()?, "dn1_h2"), "stopped");

    // 4. Both CMServers die and come back together. The old primary is the config's
    //    first and campaigns first, with its out-of-date state: before acting it takes
    //    the other's newer state, so dn1_h2 stays stopped.
    let pid2 = c
        .recorded_pid(&format!("cm_server-{second}"))
        .context("pid recorded")?;
    kill9(pid2);
    wait_for(
        "both CMServers to be dead",
        Duration::from_secs(10),
        || async { Ok((!pid_alive(pid2)).then_some(())) },
    )
    .await?;
    let mut cms_first = spawn_cm_server(&c, &first)?;
    let _cms_second = spawn_cm_server(&c, &second)?;
    let (p, s, term3) = wait_for(
        "a primary and a standby after both restarted",
        Duration::from_secs(30),
        || async { pair_of(&c.status()?).map(Some) },
    )
    .await
    .with_context(|| c.logs())?;
    assert_eq!((p.as_str(), s.as_str()), (first.as_str(), second.as_str()));
    assert!(term3 > term2, "term {term3} after {term2}");
    let st = c.status()?;
    assert_eq!(
        member_state(&st, "dn1_h2"),
        "stopped",
        "the newer state was lost: {st}"
    );
    assert_eq!(dn_roles(&st), roles);
    let start = c.cm_ctl(&["start", "--instance", "dn1_h2", "--timeout", "60"]);
    assert!(
        start.success,
        "start failed: {}\n{}",
        start.stderr,
        c.logs()
    );
    c.wait_states(&DNS, "normal", Duration::from_secs(30))
        .await?;

    // 5. The primary dies again: the standby, which has only the streamed state, takes
    //    over with the current layout; `local up` brings the old one back as standby.
    let (back, term4, took) =
        kill_primary_and_wait_takeover(&c, &first, cms_first.pid(), term3, takeover_bound)
            .await
            .with_context(|| c.logs())?;
    cms_first.kill9();
    assert_eq!(back, second);
    eprintln!(
        "CMServer takeover {first} -> {back} (term {term3} -> {term4}) seen after {:.2} s",
        took.as_secs_f64()
    );
    c.wait_states(&DNS, "normal", Duration::from_secs(30))
        .await?;
    assert_eq!(dn_roles(&c.status()?), roles);
    c.up(90)?;
    let (p, s, term5) = wait_for(
        "the old primary to rejoin as standby",
        Duration::from_secs(20),
        || async { pair_of(&c.status()?).map(Some) },
    )
    .await?;
    assert_eq!((p.as_str(), s.as_str()), (second.as_str(), first.as_str()));

    // 6. The CMServer that took over handles a DN failover: dn1's primary and the
    //    agent of its host die (nothing restarts it) under a loop of commits.
    let (p1, p2) = (c.port("dn1_h1"), c.port("dn1_h2"));
    wait_for(
        "dn1_h2 to be dn1's sync standby",
        Duration::from_secs(30),
        || async {
            let s = c.status()?;
            let sync = status_member(&s, "dn1_h2")
                .and_then(|m| m["sync_state"].as_str())
                .unwrap_or("")
                .to_owned();
            Ok((sync == "sync").then_some(()))
        },
    )
    .await?;
    create_table(p1).await?;
    let writer = Writer::start(vec![p1, p2], Duration::from_secs(3));
    writer.wait_more(30, Duration::from_secs(30)).await?;
    let agent = c.recorded_pid("cm_agent-h1").context("agent h1 recorded")?;
    let pm = c.postmaster_pid("dn1_h1").context("dn1_h1 runs")?;
    kill9(agent);
    kill9(pm);
    let killed = Instant::now();
    wait_for(
        "agent h1 and dn1_h1 to die",
        Duration::from_secs(10),
        || async { Ok((!pid_alive(agent) && !pid_alive(pm)).then_some(())) },
    )
    .await?;
    let s = wait_layout(
        &c,
        &[("dn1_h2", "primary", "normal")],
        Duration::from_secs(40),
    )
    .await
    .with_context(|| c.logs())?;
    eprintln!(
        "dn1_h2 promoted by {second} {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(role_of(&s, "dn1_h1"), "standby", "{s}");
    assert!(
        s["term"].as_u64().unwrap_or(0) > term5,
        "the failover is a new term: {s}"
    );
    let acks = writer.stop().await;
    let acked_at_kill: Vec<_> = acks.into_iter().filter(|a| a.at <= killed).collect();
    let n = assert_all_present(p2, &acked_at_kill).await?;
    eprintln!("test body took {:.1} s", started.elapsed().as_secs_f64());
    // With h1's agent gone, `local down` would wait for h1's instances to report
    // stopped; with every daemon gone it stops the instances by their pid files.
    let daemons: Vec<u32> = c.recorded_pids().into_iter().map(|(_, p)| p).collect();
    for pid in &daemons {
        kill9(*pid);
    }
    wait_for("the daemons to die", Duration::from_secs(10), || async {
        Ok(daemons.iter().all(|p| !pid_alive(*p)).then_some(()))
    })
    .await?;
    eprintln!(
        "{} commits acknowledged before the kill, all on dn1_h2 ({n} rows)",
        acked_at_kill.len()
    );
    Ok(())
}
