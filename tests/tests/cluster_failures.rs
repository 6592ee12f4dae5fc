//! Failures and operator actions on a running local cluster (one cluster run for all,
//! to keep the suite's time reasonable):
//! - `kill -9` of a DN postmaster: its agent restarts it and status is normal again;
//! - `kill -9` of an agent: its instances keep running, `local up` restarts the agent,
//!   which adopts them (same postmaster, only one per data dir). The agent of h3 (only
//!   standbys): a primary whose agent is silent for the failover timeout is failed
//!   over by design (cluster_failover.rs);
//! - `cm_ctl stop --instance <standby>` keeps it stopped across heartbeats until
//!   `cm_ctl start --instance`, also across a CMServer restart; an unknown instance
//!   is one clear error;
//! - `local down` with every agent and CMServer gone still stops every instance.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mpp_ha_tests::{
    bin, kill9, member_state, pid_alive, postmasters_in, processes_under, status_member, wait_for,
    LocalCluster, Proc,
};

const PORT_BASE: u16 = 23000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failures_are_repaired_and_stopped_instances_stay_stopped() -> Result<()> {
    let c = LocalCluster::new("cluster-failures", PORT_BASE);
    let t0 = Instant::now();
    c.up(120)?;
    eprintln!("local up took {:.1} s", t0.elapsed().as_secs_f64());
    let dns = ["dn1_h1", "dn1_h2", "dn2_h2", "dn2_h3"];
    let heartbeat = c.cfg.timing.heartbeat_interval();

    // 1. kill -9 of a DN primary's postmaster: the agent restarts it.
    let old = c.postmaster_pid("dn1_h1").expect("dn1_h1 runs");
    kill9(old);
    wait_for(
        "dn1_h1's postmaster to die",
        Duration::from_secs(10),
        || async { Ok((!pid_alive(old)).then_some(())) },
    )
    .await?;
    let t1 = Instant::now();
    let new = wait_for(
        "a new dn1_h1 postmaster",
        Duration::from_secs(60),
        || async { Ok(c.postmaster_pid("dn1_h1").filter(|p| *p != old)) },
    )
    .await?;
    c.wait_states(&dns, "normal", Duration::from_secs(60))
        .await?;
    eprintln!(
        "dn1_h1 restarted (pid {old} -> {new}), normal again after {:.1} s",
        t1.elapsed().as_secs_f64()
    );

    // 2. kill -9 of the agent of h3 (dn2's standby; no primary: a primary whose agent
    //    stays silent for the failover timeout would be replaced).
    let on_h3 = ["dn2_h3"];
    let before: Vec<u32> = on_h3
        .iter()
        .map(|n| c.postmaster_pid(n).expect("running"))
        .collect();
    let agent = c.recorded_pid("cm_agent-h3").expect("agent h3 recorded");
    kill9(agent);
    wait_for("agent h3 to die", Duration::from_secs(10), || async {
        Ok((!pid_alive(agent)).then_some(()))
    })
    .await?;
    // Its instances keep running, and status stops vouching for them.
    c.wait_states(&on_h3, "unknown", Duration::from_secs(15))
        .await?;
    for (n, pid) in on_h3.iter().zip(&before) {
        assert!(pid_alive(*pid), "{n}'s postmaster died with its agent");
    }
    let t2 = Instant::now();
    c.up(90)?;
    let new_agent = c.recorded_pid("cm_agent-h3").expect("agent h3 recorded");
    assert_ne!(new_agent, agent, "local up starts a new agent");
    c.wait_states(&dns, "normal", Duration::from_secs(60))
        .await?;
    eprintln!(
        "agent h3 restarted and adopted its instances in {:.1} s",
        t2.elapsed().as_secs_f64()
    );
    for (n, pid) in on_h3.iter().zip(&before) {
        assert_eq!(
            c.postmaster_pid(n),
            Some(*pid),
            "{n} was restarted instead of adopted"
        );
        assert_eq!(
            postmasters_in(&c.data_dir(n)),
            vec![*pid],
            "one postmaster for {n}"
        );
    }

    // 3. An operator stop holds across heartbeats; start brings it back.
    let unknown = c.cm_ctl(&["stop", "--instance", "no_such_dn"]);
    assert!(!unknown.success, "{unknown:?}");
    assert!(
        unknown.stderr.trim().lines().count() == 1
            && unknown.stderr.contains("unknown instance \"no_such_dn\""),
        "{}",
        unknown.stderr
    );
    // dn1's standby: dn1_h2, or dn1_h1 when step 1's restart took longer than
    // dn_failover_timeout and dn1_h2 was promoted meanwhile (both are right).
    let s = c.status()?;
    let standby = ["dn1_h1", "dn1_h2"]
        .into_iter()
        .find(|n| status_member(&s, n).and_then(|m| m["role"].as_str()) == Some("standby"))
        .context("dn1 has a standby")?;
    let others: Vec<&str> = dns.into_iter().filter(|n| *n != standby).collect();
    let pid = c.postmaster_pid(standby).expect("running");
    let stop = c.cm_ctl(&["stop", "--instance", standby, "--timeout", "60"]);
    assert!(stop.success, "stop failed: {}\n{}", stop.stderr, c.logs());
    assert_eq!(member_state(&c.status()?, standby), "stopped");
    wait_for(
        &format!("{standby}'s postmaster to exit"),
        Duration::from_secs(10),
        || async { Ok((!pid_alive(pid)).then_some(())) },
    )
    .await?;
    // The wish is durable: a CMServer killed and restarted still holds it stopped.
    let cms1 = c.recorded_pid("cm_server-cms1").expect("cms1 recorded");
    kill9(cms1);
    wait_for("cms1 to die", Duration::from_secs(10), || async {
        Ok((!pid_alive(cms1)).then_some(()))
    })
    .await?;
    let config = c.config.display().to_string();
    let base = c.base_dir().display().to_string();
    let mut restarted_cms1 = Proc::spawn(
        "cms1-restarted",
        &bin("cm_server"),
        &["--config", &config, "--node", "cms1", "--base-dir", &base],
        c.dir.path(),
    )?;
    c.wait_states(&others, "normal", Duration::from_secs(30))
        .await?;
    // Several heartbeats later it is still stopped, and no postmaster came back.
    let hold_until = Instant::now() + heartbeat * 4;
    while Instant::now() < hold_until {
        let s = c.status()?;
        assert_eq!(member_state(&s, standby), "stopped", "{s}");
        assert!(
            postmasters_in(&c.data_dir(standby)).is_empty(),
            "the agent restarted a stopped instance"
        );
        tokio::time::sleep(heartbeat / 2).await;
    }
    let start = c.cm_ctl(&["start", "--instance", standby, "--timeout", "60"]);
    assert!(
        start.success,
        "start failed: {}\n{}",
        start.stderr,
        c.logs()
    );
    assert_eq!(member_state(&c.status()?, standby), "normal");
    c.wait_states(&dns, "normal", Duration::from_secs(30))
        .await?;

    // 4. With every agent and CMServer killed, `local down` still stops the
    //    instances they left behind, by their pid files.
    let postmasters: Vec<u32> = dns
        .iter()
        .map(|n| c.postmaster_pid(n).expect("running"))
        .collect();
    let daemons: Vec<u32> = c.recorded_pids().into_iter().map(|(_, p)| p).collect();
    for pid in &daemons {
        kill9(*pid);
    }
    restarted_cms1.kill9();
    wait_for(
        "agents and CMServers to die",
        Duration::from_secs(10),
        || async { Ok(daemons.iter().all(|p| !pid_alive(*p)).then_some(())) },
    )
    .await?;
    assert!(
        postmasters.iter().all(|p| pid_alive(*p)),
        "instances outlive their agents"
    );
    let down = c.down();
    assert!(down.success, "local down failed: {}", down.stderr);
    for pid in &postmasters {
        assert!(!pid_alive(*pid), "postmaster {pid} survived local down");
    }
    let left = processes_under(c.base_dir());
    assert!(left.is_empty(), "processes left behind: {left:?}");
    Ok(())
}
