//! `build_bench`: the data-unit build channel against `pg_basebackup`, in the same run on
//! the same primary (a real PostgreSQL 15 filled by `pgbench -i`):
//!   * full build MB/s (`dn_replicator build-source` + `build-sink`) vs `pg_basebackup -X
//!     stream` (both fsync what they wrote; ratio, goal >= 1.0);
//!   * an interrupted build: the sink is killed at about half, restarted, and the time
//!     from the restart to its first new acknowledgement and to completion is measured
//!     (it resumes from its last acknowledged unit, so the rest costs about half a build);
//!   * incremental rebuild of a stopped standby after about 1% of the blocks changed on
//!     the primary, against a full build.
//!
//! Never a timed test. Run by hand:
//! `cargo build --release --workspace --bins && target/release/build_bench [--scale 30]`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use cm_agent::os_user::OsUser;
use cm_agent::postgres::{PgInstance, PgSettings, Upstream};
use dn_replicator::build_sink::saved_progress;
use ha_common::ClusterConfig;
use mpp_ha_tests::{bin, connect, local_config_text, write_config, Proc, TestDir};

#[derive(Parser)]
#[command(about = "Build channel vs pg_basebackup on a real primary (prints figures)")]
struct Args {
    /// pgbench scale of the primary (15 MB per unit of scale).
    #[arg(long, default_value_t = 30)]
    scale: u32,
    /// First port (the primary, standby and build source use ports from here).
    #[arg(long, default_value_t = 13000)]
    port_base: u16,
    /// The dn_replicator binary to measure (default: the one beside this binary).
    #[arg(long)]
    dn_replicator: Option<std::path::PathBuf>,
}

static DN_REPLICATOR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

fn dn_replicator() -> std::path::PathBuf {
    DN_REPLICATOR
        .get()
        .cloned()
        .unwrap_or_else(|| bin("dn_replicator"))
}

struct StopOnDrop(Vec<PgInstance>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        for pg in &self.0 {
            if pg.is_running() {
                let _ = Command::new("runuser")
                    .args(["-u", &pg.os_user.name, "--"])
                    .arg(pg.pg_bin_dir.join("pg_ctl"))
                    .args(["stop", "-m", "immediate", "-w", "-D"])
                    .arg(&pg.data_dir)
                    .status();
            }
        }
    }
}

fn du(path: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        let Ok(m) = std::fs::symlink_metadata(p) else {
            return 0;
        };
        if m.is_dir() {
            std::fs::read_dir(p)
                .map(|rd| rd.flatten().map(|e| walk(&e.path())).sum())
                .unwrap_or(0)
        } else {
            m.len()
        }
    }
    walk(path)
}

fn as_user(pg: &PgInstance, tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", &pg.os_user.name, "--"])
        .arg(pg.pg_bin_dir.join(tool));
    c
}

fn check(out: std::process::Output, what: &str) -> Result<String> {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{what} failed: {text}");
    Ok(text)
}

struct Build {
    secs: f64,
    output: String,
}

/// One build over the channel into `standby`'s data dir (a fresh source each time).
fn channel_build(
    primary: &PgInstance,
    standby: &PgInstance,
    src_port: u16,
    extra: &[&str],
    logs: &Path,
) -> Result<Build> {
    let listen = format!("127.0.0.1:{src_port}");
    let data = primary.data_dir.display().to_string();
    let port = primary.port.to_string();
    // The replication role's password (pg_hba wants one over TCP).
    let pw_file = primary
        .passwords
        .path(ha_common::dn_auth::DnRole::Replication)
        .display()
        .to_string();
    let _source = Proc::spawn(
        "source",
        &dn_replicator(),
        &[
            "build-source",
            "--data-dir",
            &data,
            "--pg-port",
            &port,
            "--pg-password-file",
            &pw_file,
            "--listen",
            &listen,
        ],
        logs,
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let out = Command::new(dn_replicator())
        .args(sink_args(standby, &listen))
        .args(extra)
        .output()?;
    let secs = t.elapsed().as_secs_f64();
    Ok(Build {
        secs,
        output: check(out, "build-sink")?,
    })
}

fn sink_args(standby: &PgInstance, source: &str) -> Vec<String> {
    [
        "build-sink",
        "--source",
        source,
        "--data-dir",
        &standby.data_dir.display().to_string(),
        "--state-dir",
        &standby.instance_dir.display().to_string(),
        "--owner",
        "postgres",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(p) = &args.dn_replicator {
        let _ = DN_REPLICATOR.set(p.clone());
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let dir = TestDir::new("build-bench");
    let path = write_config(&dir, &local_config_text(args.port_base, dir.path()));
    let cfg = ClusterConfig::load(&path)?;
    let user = OsUser::resolve(&cfg.cluster.os_user)?;
    let group = cfg
        .dn_groups
        .iter()
        .find(|g| g.name == "dn1")
        .context("dn1")?;
    let primary = PgInstance::from_config(&cfg, "dn1_h1", user.clone())?;
    let standby = PgInstance::from_config(&cfg, "dn1_h2", user.clone())?;
    let _guard = StopOnDrop(vec![primary.clone(), standby.clone()]);
    let src_port = args.port_base + 900;
    let logs = dir.path();

    primary.initdb().await?;
    let mut settings = PgSettings::for_member(&cfg, group, "dn1_h1", None)?;
    settings.sync_standbys.clear();
    primary.configure(&settings)?;
    primary.start().await?;
    primary.ensure_roles(Duration::from_secs(10)).await?;
    // DN ports want the DN roles' passwords (ha_common::dn_auth).
    let admin_pw = mpp_ha_tests::dn_login()?.1;
    let repl_pw = ha_common::dn_auth::read_password(&cfg, ha_common::dn_auth::DnRole::Replication)?;
    println!("filling the primary: pgbench -i -s {}", args.scale);
    check(
        as_user(&primary, "pgbench")
            .args(["-i", "-q", "-s", &args.scale.to_string(), "-h", "127.0.0.1"])
            .args([
                "-p",
                &primary.port.to_string(),
                "-U",
                "mpp_admin",
                "postgres",
            ])
            .env("PGPASSWORD", &admin_pw)
            .output()?,
        "pgbench -i",
    )?;
    let c = connect(primary.port, Duration::from_secs(10)).await?;
    c.batch_execute("VACUUM ANALYZE").await?;
    c.batch_execute("CHECKPOINT").await?;
    // What both tools copy: the data dir without its WAL (each also ships the WAL
    // written meanwhile, a few MiB).
    let size = (du(&primary.data_dir) - du(&primary.data_dir.join("pg_wal"))) as f64 / 1048576.0;
    println!("primary data dir without pg_wal: {size:.0} MiB");
    standby.prepare_dirs()?;

    // pg_basebackup, then the channel, twice each alternating (page cache warm for both).
    let bb_dir = dir.path().join("basebackup");
    let mut bb = Vec::new();
    let mut ch = Vec::new();
    for _ in 0..2 {
        let _ = std::fs::remove_dir_all(&bb_dir);
        user.create_owned_dir(&bb_dir, 0o700)?;
        let t = Instant::now();
        check(
            as_user(&primary, "pg_basebackup")
                .arg("-D")
                .arg(&bb_dir)
                .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
                .args(["-U", "mpp_replication", "-X", "stream", "--checkpoint=fast"])
                .env("PGPASSWORD", &repl_pw)
                .output()?,
            "pg_basebackup",
        )?;
        bb.push(t.elapsed().as_secs_f64());
        let _ = std::fs::remove_dir_all(&standby.data_dir);
        let b = channel_build(&primary, &standby, src_port, &["--full"], logs)?;
        ch.push(b.secs);
    }
    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    let (bb_s, ch_s) = (best(&bb), best(&ch));
    println!(
        "full build: channel {:.2} s = {:.0} MB/s; pg_basebackup {:.2} s = {:.0} MB/s; ratio (channel/pg_basebackup throughput) {:.2}",
        ch_s,
        size / ch_s,
        bb_s,
        size / bb_s,
        bb_s / ch_s
    );
    let _ = std::fs::remove_dir_all(&bb_dir);

    // An interrupted build: kill the sink at about half, restart it.
    let _ = std::fs::remove_dir_all(&standby.data_dir);
    let listen = format!("127.0.0.1:{src_port}");
    let data = primary.data_dir.display().to_string();
    let port = primary.port.to_string();
    let mut source = Proc::spawn(
        "source-resume",
        &dn_replicator(),
        &[
            "build-source",
            "--data-dir",
            &data,
            "--pg-port",
            &port,
            "--listen",
            &listen,
        ],
        logs,
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let sargs = sink_args(&standby, &listen);
    let sargs: Vec<&str> = sargs.iter().map(|s| s.as_str()).collect();
    let mut sink = Proc::spawn("sink-killed", &dn_replicator(), &sargs, logs)?;
    let units_total = dn_replicator::manifest::Manifest::scan(&primary.data_dir)?.units();
    let deadline = Instant::now() + Duration::from_secs(600);
    let killed_at = loop {
        if let Some((_, acked, _)) = saved_progress(&standby.instance_dir) {
            if acked >= units_total / 2 {
                sink.kill9();
                break acked;
            }
        }
        if !sink.alive() || Instant::now() > deadline {
            bail!("the sink ended before half way: {}", sink.log_tail());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let t = Instant::now();
    let mut resumed = Proc::spawn("sink-resumed", &dn_replicator(), &sargs, logs)?;
    let first_ack = loop {
        if let Some((_, acked, _)) = saved_progress(&standby.instance_dir) {
            if acked > killed_at {
                break t.elapsed().as_secs_f64();
            }
        }
        if !resumed.alive() {
            break t.elapsed().as_secs_f64();
        }
        ensure!(Instant::now() < deadline, "no progress after the restart");
        std::thread::sleep(Duration::from_millis(5));
    };
    while resumed.alive() {
        ensure!(Instant::now() < deadline, "resumed build did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rest = t.elapsed().as_secs_f64();
    let log = std::fs::read_to_string(&resumed.log)?;
    ensure!(log.contains("complete"), "resumed build failed: {log}");
    source.kill9();
    println!(
        "interrupted build: killed after {killed_at} acknowledged units; restart -> first new acknowledgement {:.3} s, restart -> complete {rest:.2} s ({:.0}% of a full build)",
        first_ack,
        100.0 * rest / ch_s
    );

    // Incremental: the standby streams, ~1% of the blocks change, it stops, rebuild.
    let up = Upstream {
        host: "127.0.0.1".into(),
        port: primary.port,
    };
    standby.configure(&PgSettings::for_member(
        &cfg,
        group,
        "dn1_h2",
        Some(up.clone()),
    )?)?;
    standby.start().await?;
    let accounts: i64 = c
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await?
        .get(0);
    c.execute(
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= $1",
        &[&((accounts / 100) as i32)],
    )
    .await?;
    c.batch_execute("CHECKPOINT").await?;
    std::thread::sleep(Duration::from_secs(1));
    standby.stop().await?;
    let inc = channel_build(&primary, &standby, src_port, &["--incremental"], logs)?;
    let line = inc
        .output
        .lines()
        .find(|l| l.contains("complete"))
        .unwrap_or("")
        .to_owned();
    println!(
        "incremental rebuild after 1% of accounts rows updated: {:.2} s vs full build {:.2} s (ratio {:.2}); {line}",
        inc.secs,
        ch_s,
        inc.secs / ch_s
    );
    standby.configure(&PgSettings::for_member(&cfg, group, "dn1_h2", Some(up))?)?;
    standby.start().await?;
    let n: i64 = connect(standby.port, Duration::from_secs(10))
        .await?
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await?
        .get(0);
    ensure!(n == accounts, "rebuilt standby has {n} of {accounts} rows");
    println!("rebuilt standby holds all {n} accounts rows");
    Ok(())
}
