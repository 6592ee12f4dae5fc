//! `failover_bench`: failover and switchover times of a real local cluster.
//!
//! For each timing profile (the defaults of `configs/local.toml`, and the fastest safe
//! settings) it starts a whole cluster with `cm_ctl local up` in its own dir and ports,
//! then repeats: lose the host of dn1's primary (kill -9 its agent, its postmasters and
//! its GTM), and time
//!   * kill → the promoted standby commits (with `synchronous_commit = local`: the new
//!     primary is writable), and
//!   * kill → the first two-copy (synchronous) commit on the new primary while the lost
//!     host is still down: its synchronous partner is the group's secondary
//!     (dn_replicator). Then the host comes back (`cm_ctl local up` restarts its agent;
//!     the old primary is rewound and rejoins, the secondary goes idle) before the next run.
//!
//! It also freezes dn1's primary (SIGSTOP of the postmaster and its children: a hung
//! primary, which Patroni does not fail over at all) and times kill → the standby
//! commits; then it resumes the frozen processes and waits for the cluster to demote
//! and rejoin the old primary.
//!
//! Then it measures the client-visible write outage of `cm_ctl switchover`
//! (`--switchovers N`, alternating there and back). `--switchover-only --tls both` runs
//! the TLS-off and TLS-on clusters side by side and alternates their switchovers, so a
//! shared machine's changing load moves both figures alike. Prints medians and ranges. With `--tls both` (the default) each profile runs
//! twice, on a cluster with `[tls] enabled = false` and one with TLS on (the product
//! default), and the medians are compared (TLS on / off). Never a timed test: run it by
//! hand: `cargo build --release --workspace --bins && target/release/failover_bench --runs 10`.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use mpp_ha_tests::{connect_dn_as, kill9, pid_alive, LocalCluster};

#[derive(Parser)]
#[command(about = "Failover and switchover times of a real local cluster (prints figures)")]
struct Args {
    /// Failovers per timing profile.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Only the given profile: "default" or "tuned".
    #[arg(long)]
    profile: Option<String>,
    /// First port of the benchmark clusters (each profile and TLS mode uses 1000 ports
    /// from here).
    #[arg(long, default_value_t = 29000)]
    port_base: u16,
    /// Mutual TLS on the clusters' gRPC links: "off", "on", or "both" (each profile
    /// measured both ways, then compared).
    #[arg(long, default_value = "both", value_parser = ["off", "on", "both"])]
    tls: String,
    /// Switchovers (there and back) per profile and TLS mode, each timed as the longest
    /// gap between two acknowledged commits of a writer running through it.
    #[arg(long, default_value_t = 4)]
    switchovers: usize,
    /// Only the switchover outage: with `--tls both` the TLS-off and TLS-on clusters run
    /// side by side and their switchovers alternate, so that the machine's load moves
    /// both figures alike (the fairest on/off comparison on a shared machine).
    #[arg(long)]
    switchover_only: bool,
}

/// The figures of one profile run (each a list of durations).
#[derive(Default)]
struct Figures {
    writable: Vec<Duration>,
    durable: Vec<Duration>,
    frozen: Vec<Duration>,
    outages: Vec<Duration>,
}

impl Figures {
    fn rows(&self) -> [(&'static str, &Vec<Duration>); 4] {
        [
            ("host loss: kill -> new primary commits", &self.writable),
            ("host loss: kill -> two-copy commit", &self.durable),
            ("hung primary: SIGSTOP -> new primary commits", &self.frozen),
            ("switchover: write outage", &self.outages),
        ]
    }
}

fn median(v: &[Duration]) -> Option<Duration> {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied()
}

/// A named `[timing]` section.
struct Profile {
    name: &'static str,
    timing: Option<&'static str>,
}

const PROFILES: [Profile; 2] = [
    Profile {
        name: "default",
        timing: None,
    },
    Profile {
        name: "tuned",
        // The fastest settings the config accepts as safe: every timeout is at least
        // two heartbeats, so one lost heartbeat never fails anything over.
        timing: Some(
            "heartbeat_interval_ms = 200\nagent_timeout_ms = 500\nprobe_timeout_ms = 400\n\
             dn_failover_timeout_ms = 500\ngtm_failover_timeout_ms = 500\ncm_lease_ms = 600\n",
        ),
    },
];

fn with_timing(text: String, timing: &str) -> String {
    let mut out = String::new();
    let mut in_timing = false;
    for line in text.lines() {
        if line.starts_with('[') {
            in_timing = line.trim() == "[timing]";
            out.push_str(line);
            out.push('\n');
            if in_timing {
                out.push_str(timing);
            }
            continue;
        }
        if in_timing && !line.trim_start().starts_with('#') && line.contains('=') {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Connecting is bounded: a lost primary must not stall a probe.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// dn1's current primary and standby, from `cm_ctl status --json`.
fn dn1_layout(cluster: &LocalCluster) -> Result<(String, String)> {
    let status = cluster.status()?;
    let group = status["dn_groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == "dn1"))
        .ok_or_else(|| anyhow!("no dn1 in status"))?;
    let find = |role: &str| {
        group["members"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["role"] == role))
            .and_then(|m| m["name"].as_str())
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("dn1 has no {role}"))
    };
    Ok((find("primary")?, find("standby")?))
}

/// Kills every process of `host`: its agent, its postmasters, its GTM. Returns the
/// moment of the kill.
fn lose_host(cluster: &LocalCluster, host: &str) -> Result<Instant> {
    let agent = cluster
        .recorded_pid(&format!("cm_agent-{host}"))
        .ok_or_else(|| anyhow!("no recorded agent pid for {host}"))?;
    let mut pids = vec![agent];
    for r in cluster.cfg.instances_on_host(host) {
        let name = &r.instance.name;
        if let Some(pid) = cluster.postmaster_pid(name) {
            pids.push(pid);
        }
        if let Some(pid) = cluster.gtm_pid(name).filter(|&p| pid_alive(p)) {
            pids.push(pid);
        }
        let replicator = cluster.base_dir().join(format!("{name}.replicator.pid"));
        if let Some(pid) = ha_common::process::read_pid_file(&replicator).filter(|&p| pid_alive(p))
        {
            pids.push(pid);
        }
    }
    let t0 = Instant::now();
    for pid in pids {
        kill9(pid);
    }
    Ok(t0)
}

/// Retries `INSERT` on `port` until it commits; returns when it did.
async fn first_commit(
    login: (String, String),
    port: u16,
    local: bool,
    deadline: Instant,
) -> Result<Instant> {
    let sql = if local {
        "SET synchronous_commit = local; INSERT INTO bench_t DEFAULT VALUES"
    } else {
        "INSERT INTO bench_t DEFAULT VALUES"
    };
    loop {
        if Instant::now() > deadline {
            bail!("no commit on port {port} before the deadline");
        }
        if let Ok(client) = connect_dn_as(&login, port, CONNECT_TIMEOUT).await {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(Ok(())) = tokio::time::timeout(left, client.batch_execute(sql)).await {
                return Ok(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The postmaster of `instance` and every process whose parent it is.
fn postmaster_family(cluster: &LocalCluster, instance: &str) -> Result<Vec<u32>> {
    let pm = cluster
        .postmaster_pid(instance)
        .ok_or_else(|| anyhow!("{instance} has no running postmaster"))?;
    let mut pids = vec![pm];
    pids.extend(ha_common::process::children(pm));
    Ok(pids)
}

fn signal_all(pids: &[u32], sig: nix::sys::signal::Signal) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

/// Freezes dn1's primary; returns kill → the standby commits (local commit).
async fn one_freeze(cluster: &LocalCluster) -> Result<Duration> {
    let (primary, standby) = dn1_layout(cluster)?;
    let sport = cluster.port(&standby);
    let family = postmaster_family(cluster, &primary)?;
    let t0 = Instant::now();
    signal_all(&family, nix::sys::signal::Signal::SIGSTOP);
    let writable = first_commit(
        cluster.dn_login()?,
        sport,
        true,
        t0 + Duration::from_secs(90),
    )
    .await;
    signal_all(&family, nix::sys::signal::Signal::SIGCONT);
    let writable = writable?;
    // The cluster repairs itself: the resumed old primary is demoted and rejoins.
    wait_dn1_normal(cluster).await?;
    Ok(writable - t0)
}

/// Waits until dn1 is normal again (the standby synchronous).
async fn wait_dn1_normal(cluster: &LocalCluster) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let normal = cluster.status().ok().is_some_and(|s| {
            s["dn_groups"]
                .as_array()
                .and_then(|g| g.iter().find(|g| g["name"] == "dn1"))
                .is_some_and(|g| g["state"] == "normal")
        });
        if normal {
            break;
        }
        if Instant::now() > deadline {
            bail!("dn1 did not return to normal");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

struct Run {
    writable: Duration,
    durable: Duration,
}

async fn one_failover(cluster: &LocalCluster) -> Result<Run> {
    let (primary, standby) = dn1_layout(cluster)?;
    let pport = cluster.port(&primary);
    let sport = cluster.port(&standby);
    cluster
        .connect_dn(pport, CONNECT_TIMEOUT)
        .await?
        .batch_execute("CREATE TABLE IF NOT EXISTS bench_t (id bigserial PRIMARY KEY)")
        .await?;
    let host = cluster
        .cfg
        .find(&primary)
        .map(|r| r.instance.host.clone())
        .ok_or_else(|| anyhow!("{primary} not in config"))?;
    let t0 = lose_host(cluster, &host)?;
    let deadline = t0 + Duration::from_secs(90);
    let login = cluster.dn_login()?;
    let writable = tokio::spawn(first_commit(login.clone(), sport, true, deadline));
    // The host stays down: the two copies are the new primary and the secondary.
    let durable = first_commit(login, sport, false, deadline).await?;
    let writable = writable.await.context("writable probe")??;
    // The lost host comes back: its agent restarts, the old primary rejoins, and the
    // group is normal again (secondary idle) before the next run.
    let up = cluster.cm_ctl(&["local", "up", "--timeout", "120"]);
    if !up.success {
        bail!("local up after the failover failed: {}", up.stderr.trim());
    }
    wait_dn1_normal(cluster).await?;
    Ok(Run {
        writable: writable - t0,
        durable: durable - t0,
    })
}

/// Switches dn1 over to its standby; returns the write outage.
async fn one_switchover(cluster: &LocalCluster) -> Result<Duration> {
    let (primary, standby) = dn1_layout(cluster)?;
    cluster
        .connect_dn(cluster.port(&primary), CONNECT_TIMEOUT)
        .await?
        .batch_execute("CREATE TABLE IF NOT EXISTS bench_t (id bigserial PRIMARY KEY)")
        .await?;
    let d = switchover_outage(cluster, &standby).await?;
    // The next one starts from a normal group (the old primary rejoined, synchronous).
    wait_dn1_normal(cluster).await?;
    Ok(d)
}

/// The switchover outage alone, with TLS off and on side by side: both clusters up at
/// once, their switchovers alternating.
async fn switchover_only(p: &Profile, switchovers: usize, port_base: u16) -> Result<()> {
    let off = start(p, false, port_base)?;
    let on = start(p, true, port_base.saturating_add(1000))?;
    let mut figures = [Figures::default(), Figures::default()];
    for i in 0..switchovers {
        for (k, (cluster, tls)) in [(&off, "off"), (&on, "on")].into_iter().enumerate() {
            match one_switchover(cluster).await {
                Ok(d) => {
                    println!(
                        "  [{}] switchover {} (TLS {tls}): outage {:.0} ms",
                        p.name,
                        i + 1,
                        d.as_secs_f64() * 1000.0
                    );
                    figures[k].outages.push(d);
                }
                Err(e) => println!(
                    "  [{}] switchover {} (TLS {tls}) failed: {e:#}",
                    p.name,
                    i + 1
                ),
            }
        }
    }
    for (f, tls) in figures.iter().zip(["off", "on"]) {
        println!(
            "{}",
            summary(
                &format!("  switchover: write outage (TLS {tls})"),
                &f.outages
            )
        );
    }
    compare(p.name, &figures[0], &figures[1]);
    Ok(())
}

/// Writes in a loop (reconnecting to whichever member takes writes) while `cm_ctl
/// switchover` runs; returns the longest gap between two acknowledged commits, up to
/// the writer's first commit after the switchover returned.
async fn switchover_outage(cluster: &LocalCluster, target: &str) -> Result<Duration> {
    let ports = [cluster.port("dn1_h1"), cluster.port("dn1_h2")];
    let login = cluster.dn_login()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let commits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let stop = stop.clone();
        let commits = commits.clone();
        tokio::spawn(async move {
            let mut last = Instant::now();
            let mut worst = Duration::ZERO;
            let mut i = 0usize;
            let mut client: Option<tokio_postgres::Client> = None;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if client.is_none() {
                    client = connect_dn_as(&login, ports[i % 2], CONNECT_TIMEOUT)
                        .await
                        .ok();
                    i += 1;
                }
                if let Some(c) = &client {
                    let r = tokio::time::timeout(
                        Duration::from_secs(2),
                        c.batch_execute("INSERT INTO bench_t DEFAULT VALUES"),
                    )
                    .await;
                    match r {
                        Ok(Ok(())) => {
                            let now = Instant::now();
                            worst = worst.max(now - last);
                            last = now;
                            commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        _ => client = None,
                    }
                }
            }
            worst
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = cluster.cm_ctl(&["switchover", "--instance", target]);
    // The outage ends at the writer's first commit on the new primary: wait for a
    // commit after the switchover returned (a fixed wait could stop the writer before
    // it and hide the outage).
    let seen = commits.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while commits.load(std::sync::atomic::Ordering::Relaxed) < seen + 2 && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resumed = commits.load(std::sync::atomic::Ordering::Relaxed) >= seen + 2;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let worst = writer.await?;
    if !out.success {
        bail!("switchover to {target} failed: {}", out.stderr.trim());
    }
    if !resumed {
        bail!("no commit within 30 s after the switchover to {target}");
    }
    Ok(worst)
}

fn summary(label: &str, v: &[Duration]) -> String {
    let (Some(median), Some(min), Some(max)) = (median(v), v.iter().min(), v.iter().max()) else {
        return format!("{label:<44} (no successful run)");
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{label:<44} median {:>7.0} ms   min {:>7.0} ms   max {:>7.0} ms   (n={})",
        ms(median),
        ms(*min),
        ms(*max),
        v.len()
    )
}

/// A profile's cluster, up, with TLS on or off.
fn start(p: &Profile, tls: bool, port_base: u16) -> Result<LocalCluster> {
    let mode = if tls { "tls" } else { "plain" };
    let cluster =
        LocalCluster::with_config_edit(&format!("bench-{}-{mode}", p.name), port_base, |t| {
            // The harness writes TLS off; `with_tls` turns it on (certificates made
            // before the cluster starts, as `cm_ctl local up` does).
            let t = if tls { mpp_ha_tests::with_tls(t) } else { t };
            match p.timing {
                Some(timing) => with_timing(t, timing),
                None => t,
            }
        });
    if cluster.cfg.tls.enabled != tls {
        bail!("the cluster's [tls] enabled is not {tls}");
    }
    cluster.up(180)?;
    Ok(cluster)
}

async fn profile(
    p: &Profile,
    tls: bool,
    runs: usize,
    switchovers: usize,
    port_base: u16,
) -> Result<Figures> {
    let cluster = start(p, tls, port_base)?;
    let (mut writable, mut durable) = (Vec::new(), Vec::new());
    for i in 0..runs {
        match one_failover(&cluster).await {
            Ok(r) => {
                println!(
                    "  [{}] run {}: kill -> writable {:.0} ms, kill -> two-copy commit {:.0} ms",
                    p.name,
                    i + 1,
                    r.writable.as_secs_f64() * 1000.0,
                    r.durable.as_secs_f64() * 1000.0
                );
                writable.push(r.writable);
                durable.push(r.durable);
            }
            Err(e) => println!("  [{}] run {} failed: {e:#}", p.name, i + 1),
        }
    }
    let mut frozen = Vec::new();
    for i in 0..runs {
        match one_freeze(&cluster).await {
            Ok(d) => {
                println!(
                    "  [{}] freeze {}: SIGSTOP -> writable {:.0} ms",
                    p.name,
                    i + 1,
                    d.as_secs_f64() * 1000.0
                );
                frozen.push(d);
            }
            Err(e) => println!("  [{}] freeze {} failed: {e:#}", p.name, i + 1),
        }
    }
    let mut outages = Vec::new();
    for _ in 0..switchovers {
        match one_switchover(&cluster).await {
            Ok(d) => outages.push(d),
            Err(e) => println!("  [{}] switchover failed: {e:#}", p.name),
        }
    }
    println!(
        "profile {} (TLS {}):",
        p.name,
        if tls { "on" } else { "off" }
    );
    println!(
        "{}",
        summary("  host loss: kill -> new primary commits", &writable)
    );
    println!(
        "{}",
        summary(
            "  host loss: kill -> two-copy commit (host still down; the secondary is the partner)",
            &durable
        )
    );
    println!(
        "{}",
        summary("  hung primary: SIGSTOP -> new primary commits", &frozen)
    );
    println!("{}", summary("  switchover: write outage", &outages));
    Ok(Figures {
        writable,
        durable,
        frozen,
        outages,
    })
}

/// Medians with TLS off and on, and their ratio (on / off).
fn compare(name: &str, off: &Figures, on: &Figures) {
    println!("profile {name}: TLS on vs off (medians)");
    let ms = |d: Option<Duration>| {
        d.map_or("     -".to_owned(), |d| {
            format!("{:>6.0}", d.as_secs_f64() * 1000.0)
        })
    };
    for ((label, a), (_, b)) in off.rows().into_iter().zip(on.rows()) {
        if a.is_empty() && b.is_empty() {
            continue; // not measured in this run (e.g. --switchover-only)
        }
        let (ma, mb) = (median(a), median(b));
        let ratio = match (ma, mb) {
            (Some(a), Some(b)) if !a.is_zero() => {
                format!("{:.2}", b.as_secs_f64() / a.as_secs_f64())
            }
            _ => "-".to_owned(),
        };
        println!(
            "  {label:<46} off {} ms   on {} ms   on/off {ratio}",
            ms(ma),
            ms(mb)
        );
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut base = args.port_base;
    let modes: &[bool] = match args.tls.as_str() {
        "off" => &[false],
        "on" => &[true],
        _ => &[false, true],
    };
    for p in PROFILES.iter() {
        if args.profile.as_deref().is_some_and(|n| n != p.name) {
            continue;
        }
        if args.switchover_only {
            let both = modes.len() == 2;
            if both {
                if let Err(e) = switchover_only(p, args.switchovers, base).await {
                    println!("profile {} (switchovers) failed: {e:#}", p.name);
                }
                base = base.saturating_add(2000);
                continue;
            }
        }
        let runs = if args.switchover_only { 0 } else { args.runs };
        let mut figures = Vec::new();
        for &tls in modes {
            match profile(p, tls, runs, args.switchovers, base).await {
                Ok(f) => figures.push(f),
                Err(e) => println!("profile {} (TLS {tls}) failed: {e:#}", p.name),
            }
            base = base.saturating_add(1000);
        }
        if let [off, on] = &figures[..] {
            compare(p.name, off, on);
        }
    }

    println!(
        "for scale (issue 4): Patroni with synchronous replication 25 s default, 10 s \
         most aggressive, no failover for a SIGSTOPped primary; pg_auto_failover 50 s"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_is_a_valid_config_with_its_timings() {
        let text = mpp_ha_tests::local_config_text(29000, std::path::Path::new("/tmp/b"));
        for p in PROFILES.iter() {
            let edited = match p.timing {
                Some(t) => with_timing(text.clone(), t),
                None => text.clone(),
            };
            let cfg = ha_common::ClusterConfig::parse(&edited, std::path::Path::new("b.toml"))
                .unwrap_or_else(|e| panic!("profile {}: {e}", p.name));
            if p.timing.is_some() {
                assert_eq!(cfg.timing.heartbeat_interval_ms, 200, "profile {}", p.name);
                assert_eq!(cfg.timing.dn_failover_timeout_ms, 500, "profile {}", p.name);
            }
        }
    }
}
