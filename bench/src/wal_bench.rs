//! `wal_bench`: the DN secondary (dn_replicator) against the real alternatives, in one
//! run on one PostgreSQL 15 primary:
//!   * WAL receive throughput: a pgbench write load leaves a WAL backlog (kept by a
//!     physical slot); dn_replicator and then `pg_receivewal` (as shipped, and with
//!     `--synchronous`, which fsyncs like dn_replicator does before acknowledging) each
//!     receive it to the same end LSN; MB/s and ratios;
//!   * commit latency with the secondary as the synchronous partner against a real
//!     standby as the partner (single-client pgbench, synchronous_commit = on), and with
//!     no partner (synchronous_commit = local) for scale.
//!
//! Never a timed test: `cargo build --workspace --bins && target/debug/wal_bench`.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use cm_agent::os_user::OsUser;
use cm_agent::postgres::{PgInstance, PgSettings, Upstream};
use ha_common::proto::replicator::replicator_client::ReplicatorClient;
use ha_common::proto::replicator::{StatusRequest, StopOrder, StreamOrder};
use ha_common::ClusterConfig;
use mpp_ha_tests::{bin, local_config_text, wait_for, write_config, Proc, TestDir};

#[derive(Parser)]
#[command(about = "dn_replicator vs pg_receivewal throughput and commit latency (prints figures)")]
struct Args {
    /// Seconds of pgbench load for the WAL backlog and for each latency run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Port base (the bench listens on base+101..=base+103).
    #[arg(long, default_value_t = 28000)]
    port_base: u16,
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

fn pg_bin(name: &str) -> String {
    format!("/usr/lib/postgresql/15/bin/{name}")
}

/// Runs pgbench against `port`; returns its stdout.
fn pgbench(port: u16, args: &[&str], sync: &str) -> Result<String> {
    let out = Command::new(pg_bin("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "mpp_admin",
        ])
        .args(args)
        .arg("postgres")
        // DN ports want the DN roles' passwords (ha_common::dn_auth).
        .env("PGPASSWORD", mpp_ha_tests::dn_login()?.1)
        .env("PGOPTIONS", format!("-c synchronous_commit={sync}"))
        .output()
        .context("run pgbench")?;
    if !out.status.success() {
        bail!("pgbench {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// "latency average = 3.123 ms" → 3.123.
fn latency_ms(out: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix("latency average = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

async fn lsn(db: &tokio_postgres::Client, sql: &str) -> Result<u64> {
    let s: String = db.query_one(sql, &[]).await?.get(0);
    ha_common::lsn::parse_lsn(&s).context("lsn")
}

async fn wait_sync(db: &tokio_postgres::Client, app: &str) -> Result<()> {
    wait_for(&format!("{app} to be the synchronous standby"), Duration::from_secs(120), || async {
        let rows = db
            .query(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND sync_state = 'sync' AND state = 'streaming'",
                &[&app],
            )
            .await?;
        Ok((!rows.is_empty()).then_some(()))
    })
    .await
}

fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = TestDir::new("wal-bench");
    let path = write_config(&dir, &local_config_text(args.port_base, dir.path()));
    let cfg = ClusterConfig::load(&path)?;
    let user = OsUser::resolve(&cfg.cluster.os_user)?;
    let group = cfg
        .dn_groups
        .iter()
        .find(|g| g.name == "dn1")
        .context("dn1")?;
    let primary = PgInstance::from_config(&cfg, "dn1_h1", user.clone())?;
    let standby = PgInstance::from_config(&cfg, "dn1_h2", user)?;
    let _guard = StopOnDrop(vec![primary.clone(), standby.clone()]);
    primary.initdb().await?;
    primary.configure(&PgSettings::for_member(&cfg, group, "dn1_h1", None)?)?;
    primary.start().await?;
    primary.ensure_roles(Duration::from_secs(10)).await?;
    let up = Upstream {
        host: primary.address.clone(),
        port: primary.port,
    };
    standby.basebackup(&up).await?;
    let mut s_settings = PgSettings::for_member(&cfg, group, "dn1_h2", Some(up))?;
    s_settings.restore_command = None;
    standby.configure(&s_settings)?;
    let sec_port = cfg.find("dn1_h3").context("dn1_h3")?.instance.port();
    let cfg_s = path.display().to_string();
    let _rep = Proc::spawn(
        "dn1_h3",
        &bin("dn_replicator"),
        &["serve", "--config", &cfg_s, "--node", "dn1_h3"],
        dir.path(),
    )?;
    let mut rep = wait_for("dn_replicator", Duration::from_secs(20), || async {
        Ok(
            match ha_common::tls::endpoint(
                &format!("127.0.0.1:{sec_port}"),
                ha_common::tls::CertRole::Replicator,
                std::time::Duration::from_secs(2),
            ) {
                Ok(ep) => ep.connect().await.ok().map(ReplicatorClient::new),
                Err(_) => None,
            },
        )
    })
    .await?;
    let db = mpp_ha_tests::connect(primary.port, Duration::from_secs(5)).await?;
    db.batch_execute("SET synchronous_commit = local").await?;
    pgbench(primary.port, &["-i", "-q", "-s", "5"], "local")?;
    let secs = args.seconds.to_string();

    // Commit latency: no partner, standby partner, secondary partner.
    let t = ["-c", "1", "-j", "1", "-N", "-T", &secs];
    let local = latency_ms(&pgbench(primary.port, &t, "local")?).context("latency")?;
    standby.start().await?;
    wait_sync(&db, "dn1_h2").await?;
    let with_standby = latency_ms(&pgbench(primary.port, &t, "on")?).context("latency")?;
    standby.stop().await?;
    let start = lsn(&db, "SELECT pg_current_wal_lsn()::text").await?;
    rep.stream(StreamOrder {
        term: 1,
        upstream_name: "dn1_h1".into(),
        upstream_host: primary.address.clone(),
        upstream_port: u32::from(primary.port),
        start_lsn: start,
    })
    .await?;
    wait_sync(&db, "dn1_h3").await?;
    let with_secondary = latency_ms(&pgbench(primary.port, &t, "on")?).context("latency")?;
    rep.stop(StopOrder {
        term: 1,
        discard: true,
    })
    .await?;

    // Receive throughput on a WAL backlog kept by slots (one per pg_receivewal run:
    // a run advances its slot).
    db.batch_execute("SELECT pg_create_physical_replication_slot('bench_sync', true)")
        .await?;
    let slot_lsn: String = db
        .query_one(
            "SELECT lsn::text FROM pg_create_physical_replication_slot('bench', true)",
            &[],
        )
        .await?
        .get(0);
    let start = ha_common::lsn::parse_lsn(&slot_lsn).context("slot lsn")?;
    let load = ["-c", "4", "-j", "2", "-N", "-T", &secs];
    pgbench(primary.port, &load, "local")?;
    db.batch_execute("CHECKPOINT").await?;
    let end = lsn(&db, "SELECT pg_current_wal_lsn()::text").await?;
    let backlog = end - start;

    let t0 = Instant::now();
    rep.stream(StreamOrder {
        term: 2,
        upstream_name: "dn1_h1".into(),
        upstream_host: primary.address.clone(),
        upstream_port: u32::from(primary.port),
        start_lsn: start,
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let st = rep.status(StatusRequest {}).await?.into_inner();
        if st.flush_lsn >= end {
            break;
        }
        if Instant::now() > deadline {
            bail!("dn_replicator did not reach the end of the backlog: {st:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ours = t0.elapsed();
    rep.stop(StopOrder {
        term: 2,
        discard: true,
    })
    .await?;

    let receivewal = |sync: bool, name: &str, slot: &str| -> Result<Duration> {
        let out_dir = dir.path().join(name);
        std::fs::create_dir_all(&out_dir)?;
        let endpos = ha_common::lsn::format_lsn(end);
        let mut cmd = Command::new(pg_bin("pg_receivewal"));
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "mpp_replication",
        ])
        .env(
            "PGPASSWORD",
            ha_common::dn_auth::read_password(&cfg, ha_common::dn_auth::DnRole::Replication)?,
        )
        .args(["--slot", slot, "--no-loop", "-E", &endpos, "-D"])
        .arg(&out_dir);
        if sync {
            cmd.arg("--synchronous");
        }
        let t0 = Instant::now();
        let out = cmd.output().context("run pg_receivewal")?;
        let d = t0.elapsed();
        if !out.status.success() {
            bail!("pg_receivewal: {}", String::from_utf8_lossy(&out.stderr));
        }
        let got: u64 = std::fs::read_dir(&out_dir)?
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        // Whole segments from the one holding the start; the last one (endpos) partial.
        if got + (16 << 20) < backlog {
            bail!("pg_receivewal kept {got} bytes of a {backlog}-byte backlog");
        }
        let _ = std::fs::remove_dir_all(&out_dir);
        Ok(d)
    };
    let theirs_sync = receivewal(true, "receivewal-sync", "bench_sync")?;
    let theirs = receivewal(false, "receivewal", "bench")?;
    db.batch_execute(
        "SELECT pg_drop_replication_slot('bench'); SELECT pg_drop_replication_slot('bench_sync')",
    )
    .await?;

    let mb = backlog as f64 / (1 << 20) as f64;
    println!("WAL receive throughput, backlog of {mb:.0} MB left by pgbench -c 4 -N -T {secs}:");
    println!(
        "  dn_replicator (fsync before ack)   {:8.1} MB/s  ({:.2} s)",
        mb_s(backlog, ours),
        ours.as_secs_f64()
    );
    println!(
        "  pg_receivewal --synchronous        {:8.1} MB/s  ({:.2} s)",
        mb_s(backlog, theirs_sync),
        theirs_sync.as_secs_f64()
    );
    println!(
        "  pg_receivewal                      {:8.1} MB/s  ({:.2} s)",
        mb_s(backlog, theirs),
        theirs.as_secs_f64()
    );
    println!(
        "  ratio dn_replicator / pg_receivewal --synchronous = {:.2}; / pg_receivewal = {:.2}",
        theirs_sync.as_secs_f64() / ours.as_secs_f64(),
        theirs.as_secs_f64() / ours.as_secs_f64()
    );
    println!("commit latency, pgbench -c 1 -N -T {secs} (average):");
    println!("  synchronous partner = standby (PostgreSQL)   {with_standby:.3} ms");
    println!("  synchronous partner = secondary (ours)       {with_secondary:.3} ms");
    println!("  no partner (synchronous_commit = local)      {local:.3} ms");
    println!(
        "  ratio secondary / standby = {:.2}",
        with_secondary / with_standby
    );
    Ok(())
}
