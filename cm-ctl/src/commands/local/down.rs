//! `cm_ctl local down`: stops everything `local up` started. First the agents stop
//! the instances (cleanly, through the CMServer); then the agents and CMServers are
//! stopped by recorded pid; finally any postmaster or server of ours still running
//! from a dir under the base dir is stopped by its pid file. Leaves no process behind;
//! with `--netns` it then removes the hosts' namespaces and bridge.

use std::time::Duration;

use ha_common::ClusterConfig;
use nix::sys::signal::Signal;

use super::{absolute_base_dir, daemons};
use crate::client::Primary;
use crate::error::CtlError;
use crate::netns::Network;
use crate::processes::{leftover_instances, stop_all, PidFile};
use crate::progress::{wait_for, Goal};

const GRACE: Duration = Duration::from_secs(15);

pub async fn run(cfg: &ClusterConfig, timeout_s: u64, netns: Option<&str>) -> Result<(), CtlError> {
    let network = netns.map(|p| Network::plan(p, cfg)).transpose()?;
    let base = absolute_base_dir(cfg)?;
    let pids = PidFile::in_base_dir(&base);
    let recorded = pids.read();

    // Our daemons still running: recorded pids that are still ours, plus any found
    // in /proc (a lost pid file must not leave them behind).
    let mut agents = Vec::new();
    let mut servers = Vec::new();
    for d in daemons(cfg) {
        let mut found: Vec<u32> = recorded
            .iter()
            .filter(|(k, pid)| *k == d.key() && d.is(*pid, &base))
            .map(|(_, pid)| *pid)
            .collect();
        found.extend(d.find_running(&base));
        found.sort_unstable();
        found.dedup();
        if d.program == "cm_agent" {
            agents.extend(found);
        } else {
            servers.extend(found);
        }
    }

    if agents.is_empty() {
        eprintln!("no agent running: stopping instances by pid");
    } else {
        match Primary::find(cfg).await {
            Ok(mut primary) => match primary.set_desired(None, false).await {
                Ok(_) => {
                    let timeout = Duration::from_secs(timeout_s);
                    match wait_for(cfg, None, Goal::Stopped, timeout, "every instance to stop")
                        .await
                    {
                        Ok(_) => eprintln!("every instance stopped"),
                        Err(e) => eprintln!("warning: {e}; stopping what is left by pid"),
                    }
                }
                Err(e) => eprintln!("warning: {e}; stopping instances by pid"),
            },
            Err(e) => eprintln!("warning: {e}; stopping instances by pid"),
        }
    }

    let mut survivors = Vec::new();
    if !agents.is_empty() {
        eprintln!("stopping agents (pids {agents:?})");
        survivors.extend(stop_all(&agents, Signal::SIGTERM, GRACE));
    }
    if !servers.is_empty() {
        eprintln!("stopping CMServers (pids {servers:?})");
        survivors.extend(stop_all(&servers, Signal::SIGTERM, GRACE));
    }

    let leftovers = leftover_instances(&base);
    let (postmasters, others): (Vec<_>, Vec<_>) = leftovers
        .into_iter()
        .partition(|(what, _)| what.starts_with("postmaster"));
    for (what, pid) in postmasters.iter().chain(&others) {
        eprintln!("stopping {what} (pid {pid})");
    }
    let pm: Vec<u32> = postmasters.iter().map(|(_, p)| *p).collect();
    // SIGINT: PostgreSQL's fast shutdown.
    survivors.extend(stop_all(&pm, Signal::SIGINT, GRACE));
    let other: Vec<u32> = others.iter().map(|(_, p)| *p).collect();
    survivors.extend(stop_all(&other, Signal::SIGTERM, GRACE));

    if !survivors.is_empty() {
        return Err(CtlError::Other(format!(
            "processes survived SIGKILL: {survivors:?}"
        )));
    }
    if let Some(n) = &network {
        let failed = n.remove();
        if !failed.is_empty() {
            return Err(CtlError::Other(format!(
                "could not remove the network: {}",
                failed.join("; ")
            )));
        }
        eprintln!("removed bridge {} and the hosts' namespaces", n.bridge());
    }
    pids.remove();
    println!("local cluster {:?} is down", cfg.cluster.name);
    Ok(())
}
