//! `cm_scale --hosts 10,100,1000`: the CMServer pair (real `cm_server` child
//! processes) under N simulated agents (real gRPC, no PostgreSQL; `sim_agent.rs`) for
//! each N: the primary's CPU and RSS, report latency, the state streamed to the
//! standby, `cm_ctl status --json` latency, host loss → PROMOTE order, and CMServer
//! primary loss → new primary. Prints one table. Never a timed test.
//!
//! Run by hand (in a network namespace of your own, so that the ports are free):
//! `cargo build --release -p mpp-ha-bench -p cm-server -p cm-ctl &&
//!  target/release/cm_scale --hosts 10,100,1000`.

mod sim_agent;
mod topology;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ha_common::ClusterConfig;
use sim_agent::{SimAgent, World};

#[derive(Parser)]
#[command(
    about = "The CMServer pair under N simulated agents: CPU, RSS, report latency, state streaming, status latency, host-loss and CMServer-loss times"
)]
struct Args {
    /// Cluster sizes (hosts), comma-separated.
    #[arg(long, default_value = "10,100,1000", value_delimiter = ',')]
    hosts: Vec<usize>,
    /// The CMServers listen on port_base+1 and port_base+2 (of 127.10.0.1 and .2).
    #[arg(long, default_value_t = 50000)]
    port_base: u16,
    /// Seconds of steady state measured per size.
    #[arg(long, default_value_t = 10)]
    measure_s: u64,
}

/// A cm_server child, killed (by its pid) when dropped.
struct Server {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Server {
    fn spawn(name: &str, config: &Path, dir: &Path) -> Result<Server> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let bin = mpp_ha_tests::bin_dir().join("cm_server");
        let child = Command::new(&bin)
            .args(["--config", &config.display().to_string(), "--node", name])
            // The pair module logs every state push at debug (bytes, version).
            .env("RUST_LOG", "info,cm_server::pair=debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        Ok(Server {
            name: name.to_owned(),
            child,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// CPU ticks (utime + stime) and RSS (kB) of a process.
fn proc_usage(pid: u32) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime 15.
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((ticks, rss))
}

fn clk_tck() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// State pushes the primary logged so far: (count, bytes).
fn pushes(log: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut n = 0;
    let mut bytes = 0;
    for l in text.lines().filter(|l| l.contains("state pushed")) {
        n += 1;
        bytes += l
            .split_whitespace()
            .find_map(|w| w.strip_prefix("bytes="))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    (n, bytes)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// One row of the table.
#[derive(Default)]
struct Row {
    hosts: usize,
    instances: usize,
    cores: f64,
    rss_mb: f64,
    reports_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    sync_msgs_per_s: f64,
    sync_kb_per_s: f64,
    state_kb: f64,
    status_ms: f64,
    promote_s: Vec<f64>,
    takeover_s: f64,
}

async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn measure(n: usize, args: &Args) -> Result<Row> {
    if n < 3 {
        bail!("--hosts: {n} is too small (a DN group needs three hosts)");
    }
    let dir = mpp_ha_tests::TestDir::new(&format!("cm_scale-{n}"));
    let text = topology::config_text(n, args.port_base, dir.path());
    let config = dir.path().join("cluster.toml");
    std::fs::write(&config, &text)?;
    let cfg = ClusterConfig::parse(&text, &config)?;
    let hb = cfg.timing.heartbeat_interval();
    let mut servers = vec![
        Server::spawn("cms1", &config, dir.path())?,
        Server::spawn("cms2", &config, dir.path())?,
    ];
    let world = Arc::new(World::default());
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..n {
        let host = topology::host(i);
        let agent = SimAgent::new(&cfg, &host, world.clone())?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let offset = hb.mul_f64(i as f64 / n as f64);
        tasks.push(tokio::spawn(agent.run(offset, rx)));
        stops.push(tx);
    }
    let result = measure_running(n, args, &cfg, &config, &mut servers, &world, &stops).await;
    for s in &stops {
        let _ = s.send(true);
    }
    for t in tasks {
        t.abort();
    }
    for s in &mut servers {
        s.kill();
    }
    result
}

async fn measure_running(
    n: usize,
    args: &Args,
    cfg: &ClusterConfig,
    config: &Path,
    servers: &mut [Server],
    world: &Arc<World>,
    stops: &[tokio::sync::watch::Sender<bool>],
) -> Result<Row> {
    let hb = cfg.timing.heartbeat_interval();
    let primary = wait_until("a CMServer primary", Duration::from_secs(60), || {
        sim_agent_primary(world, Instant::now(), hb)
    })
    .await?;
    // `cm_ctl start` of every instance (a new cluster's instances are held stopped).
    let endpoint = cfg.endpoint(
        cfg.cm_servers
            .iter()
            .find(|s| s.name == primary)
            .context("primary in config")?,
    );
    let mut client = ha_common::proto::cm::cm_server_client::CmServerClient::connect(format!(
        "http://{endpoint}"
    ))
    .await?;
    client
        .set_desired_state(ha_common::proto::cm::SetDesiredStateRequest {
            instance: String::new(),
            run: true,
        })
        .await
        .context("start every instance")?;
    // Settle: every agent has heard the primary and the first orders are done.
    tokio::time::sleep(hb * 3).await;
    let p = servers
        .iter()
        .position(|s| s.name == primary)
        .context("primary is one of ours")?;
    let (pid, log) = (servers[p].pid(), servers[p].log.clone());

    // Steady state.
    world
        .latencies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    let (t0_ticks, _) = proc_usage(pid)?;
    let (push0, bytes0) = pushes(&log);
    let t0 = Instant::now();
    let mut status_ms = Vec::new();
    let cm_ctl = mpp_ha_tests::bin_dir().join("cm_ctl");
    while t0.elapsed() < Duration::from_secs(args.measure_s) {
        let s = Instant::now();
        let out = tokio::process::Command::new(&cm_ctl)
            .args([
                "--config",
                &config.display().to_string(),
                "status",
                "--json",
            ])
            .stdin(Stdio::null())
            .output()
            .await?;
        let took = s.elapsed();
        if !out.status.success() {
            eprintln!(
                "cm_ctl status failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        } else {
            status_ms.push(took.as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let (t1_ticks, rss) = proc_usage(pid)?;
    let (push1, bytes1) = pushes(&log);
    let mut lat = std::mem::take(&mut *world.latencies.lock().unwrap_or_else(|e| e.into_inner()));
    lat.sort_unstable();
    status_ms.sort_by(f64::total_cmp);
    // The state as the primary stores it (the streamed payload plus the file's header).
    let state_kb = std::fs::metadata(cfg.instance_dir(&primary).join("cluster_state"))
        .map(|m| m.len() as f64 / 1024.0)
        .unwrap_or(f64::NAN);
    let mut row = Row {
        hosts: n,
        instances: cfg.dn_groups.len() * 3 + cfg.gtm.instances.len(),
        cores: (t1_ticks - t0_ticks) as f64 / clk_tck() / secs,
        rss_mb: rss as f64 / 1024.0,
        reports_per_s: lat.len() as f64 / secs,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        sync_msgs_per_s: (push1 - push0) as f64 / secs,
        sync_kb_per_s: (bytes1 - bytes0) as f64 / 1024.0 / secs,
        state_kb,
        status_ms: status_ms
            .get(status_ms.len() / 2)
            .copied()
            .unwrap_or(f64::NAN),
        ..Row::default()
    };

    // Host loss: a host holding a DN primary, not a CMServer's or a GTM's host.
    let lost = 2usize;
    let lost_host = topology::host(lost);
    let affected: Vec<String> = cfg
        .dn_groups
        .iter()
        .filter(|g| {
            g.member_with_role(ha_common::config::Role::Primary)
                .is_some_and(|m| m.host == lost_host)
        })
        .filter_map(|g| {
            g.members
                .iter()
                .find(|m| m.role() == Some(ha_common::config::Role::Standby))
                .map(|m| m.name.clone())
        })
        .collect();
    {
        let mut dead = world.dead.lock().unwrap_or_else(|e| e.into_inner());
        for r in cfg.instances_on_host(&lost_host) {
            dead.insert(r.instance.name.clone());
        }
    }
    let _ = stops[lost].send(true);
    let loss = Instant::now();
    let limit = cfg.timing.dn_failover_timeout() + hb * 10;
    for standby in &affected {
        let at = wait_until(&format!("PROMOTE of {standby}"), limit, || {
            world
                .promotes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(standby)
                .copied()
        })
        .await;
        match at {
            Ok(at) => row
                .promote_s
                .push(at.saturating_duration_since(loss).as_secs_f64()),
            Err(e) => {
                eprintln!("{n} hosts: {e}");
                let out = tokio::process::Command::new(mpp_ha_tests::bin_dir().join("cm_ctl"))
                    .args([
                        "--config",
                        &config.display().to_string(),
                        "status",
                        "--json",
                    ])
                    .output()
                    .await?;
                let status: serde_json::Value =
                    serde_json::from_slice(&out.stdout).unwrap_or_default();
                for g in status["dn_groups"].as_array().into_iter().flatten() {
                    let has = g["members"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|m| m["name"] == standby.as_str());
                    if has {
                        eprintln!("  status of its group: {g}");
                    }
                }
            }
        }
    }

    // CMServer primary loss.
    tokio::time::sleep(hb * 2).await;
    let other = servers[1 - p].name.clone();
    servers[p].kill();
    let killed = Instant::now();
    let limit = cfg.timing.cm_lease() + hb * 20;
    let took = wait_until(&format!("{other} as primary"), limit, || {
        let seen = world.primary_seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(&other).copied().filter(|t| *t > killed)
    })
    .await;
    row.takeover_s = match took {
        Ok(at) => at.saturating_duration_since(killed).as_secs_f64(),
        Err(e) => {
            eprintln!("{n} hosts: {e}");
            f64::NAN
        }
    };
    Ok(row)
}

/// The CMServer whose replies said primary within the last heartbeat, if exactly one.
fn sim_agent_primary(world: &World, now: Instant, hb: Duration) -> Option<String> {
    let seen = world.primary_seen.lock().unwrap_or_else(|e| e.into_inner());
    let recent: Vec<&String> = seen
        .iter()
        .filter(|(_, t)| now.saturating_duration_since(**t) <= hb)
        .map(|(n, _)| n)
        .collect();
    (recent.len() == 1).then(|| recent[0].clone())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "cm_scale: default timings (heartbeat 1 s, dn_failover_timeout 3 s, cm_lease 3 s); load average at start: {}",
        load.trim()
    );
    let mut rows = Vec::new();
    for &n in &args.hosts {
        eprintln!("cm_scale: {n} hosts ...");
        match measure(n, &args).await {
            Ok(r) => rows.push(r),
            Err(e) => eprintln!("cm_scale: {n} hosts failed: {e:#}"),
        }
    }
    println!(
        "{:>6} {:>6} {:>7} {:>7} {:>9} {:>8} {:>8} {:>9} {:>9} {:>8} {:>9} {:>10} {:>9}",
        "hosts",
        "insts",
        "cores",
        "rss_MB",
        "reports/s",
        "p50_ms",
        "p99_ms",
        "sync/s",
        "sync_kB/s",
        "state_kB",
        "status_ms",
        "promote_s",
        "takeover_s"
    );
    for r in &rows {
        let promote = r.promote_s.iter().copied().fold(f64::NAN, f64::max);
        println!(
            "{:>6} {:>6} {:>7.3} {:>7.1} {:>9.0} {:>8.2} {:>8.2} {:>9.2} {:>9.1} {:>8.1} {:>9.0} {:>10.2} {:>9.2}",
            r.hosts,
            r.instances,
            r.cores,
            r.rss_mb,
            r.reports_per_s,
            r.p50_ms,
            r.p99_ms,
            r.sync_msgs_per_s,
            r.sync_kb_per_s,
            r.state_kb,
            r.status_ms,
            promote,
            r.takeover_s
        );
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        if last.hosts > first.hosts && first.cores > 0.0 {
            println!(
                "ratio {} / {} hosts: cores x{:.1}, rss x{:.1}, p99 x{:.1}, sync kB/s x{:.1} (hosts x{:.0})",
                last.hosts,
                first.hosts,
                last.cores / first.cores,
                last.rss_mb / first.rss_mb,
                last.p99_ms / first.p99_ms,
                last.sync_kb_per_s / first.sync_kb_per_s,
                last.hosts as f64 / first.hosts as f64
            );
        }
    }
    println!(
        "targets: promote_s <= dn_failover_timeout + heartbeat = 4 s (max over the lost host's groups); takeover_s <= cm_lease + heartbeat = 4 s; load average now: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    Ok(())
}
