//! `cn_bench`: what a coordinator costs and how fast it follows a DN failover.
//!
//! In one run, on one machine: a whole local cluster (`cm_ctl local up`, two DN groups,
//! two CNs) and one plain PostgreSQL 15 (initdb'd here, same binaries, no replication).
//!   * pgbench `-S` (select-only; `-M simple`, `extended` and `prepared`) and the
//!     default TPC-B-like script, the same clients
//!     and duration, through cn1 and against the plain PostgreSQL: TPS and the ratio
//!     CN / plain (goal for `-S`: ≥ 0.8; the anchor is PgDog at ≈ 0.93× PgBouncer).
//!     The plain server has no synchronous standby: TPC-B there commits one copy,
//!     through the CN every commit waits for its group's synchronous standby.
//!   * The same pgbench runs through PgBouncer (transaction pooling) in front of the
//!     plain PostgreSQL when `pgbouncer` is installed (`apt install pgbouncer`): what a
//!     minimal proxy costs on this machine, the yardstick the CN's ratio is read
//!     against (PgBouncer 1.18 cannot run `-M prepared` in transaction pooling).
//!   * DDL latency through the CN's two-phase commit (CREATE TABLE + DROP TABLE, each
//!     on every DN primary and every CN of the DDL set): p50 / p99, beside the same
//!     statements on the plain server.
//!   * A DN failover: dn1's primary host is lost (its agent and postmaster SIGKILLed);
//!     time from the kill to the first successful read and the first successful write
//!     of a dn1 row through cn2.
//!
//! Never a timed test. Run by hand:
//! `cargo build --release --workspace --bins && target/release/cn_bench --seconds 20`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use mpp_ha_tests::{kill9, pid_alive, LocalCluster, TestDir};

#[derive(Parser)]
#[command(
    about = "pgbench through a CN vs one plain PostgreSQL, DDL latency, DN failover (prints figures)"
)]
struct Args {
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    /// pgbench clients (-c); threads are min(clients, 2).
    #[arg(long, default_value_t = 8)]
    clients: u32,
    /// pgbench scale (-i -s).
    #[arg(long, default_value_t = 2)]
    scale: u32,
    /// DDL statements to time.
    #[arg(long, default_value_t = 40)]
    ddl: usize,
    /// First port of the cluster; the plain PostgreSQL uses port_base + 900.
    #[arg(long, default_value_t = 17000)]
    port_base: u16,
    /// Transactions per pgbench mode for the CN's CPU per query (0: skip that part).
    #[arg(long, default_value_t = 20000)]
    cpu_transactions: u32,
    /// PgBouncer binary for the proxy yardstick ("none" skips it).
    #[arg(long, default_value = "/usr/sbin/pgbouncer")]
    pgbouncer: String,
    /// Only the CPU-per-query part (no TPS, DDL or failover runs).
    #[arg(long)]
    cpu_only: bool,
    /// Record each CPU-per-query run with `perf record -e cpu-clock -g` on cn1 into
    /// this directory (`<mode>.perf.data`), to see where the CN spends its time.
    #[arg(long)]
    perf_dir: Option<PathBuf>,
    /// Also count cn1's system calls per query in each CPU-per-query run (`perf stat`
    /// on the syscall tracepoints): a repeatable figure, unlike CPU time on a busy host.
    #[arg(long)]
    syscalls: bool,
}

/// The syscalls `--syscalls` counts (all of them, then the ones of the hot path).
const SYSCALL_EVENTS: [&str; 6] = [
    "raw_syscalls:sys_enter",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_recvfrom",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_futex",
    "syscalls:sys_enter_write",
];

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let cluster = LocalCluster::new("cn-bench", args.port_base);
    eprintln!("starting the cluster ...");
    cluster.up(300)?;
    let plain = PlainPg::start(&cluster.dir, args.port_base + 900)?;
    let cn1 = cluster.port("cn1");
    let cn2 = cluster.port("cn2");

    let target = |port: u16| format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    pgbench(
        &target(plain.port),
        &["-i", "-q", "-s", &args.scale.to_string()],
    )?;
    pgbench(&target(cn1), &["-i", "-q", "-s", &args.scale.to_string()])?;

    if args.cpu_transactions > 0 {
        cpu_per_query(&cluster, cn1, &args)?;
    }
    if args.cpu_only {
        drop(plain);
        return Ok(());
    }

    let bouncer = match PgBouncer::start(&cluster.dir, &args.pgbouncer, &plain, args.clients) {
        Ok(b) => b,
        Err(e) => {
            println!("PgBouncer yardstick skipped: {e:#}");
            None
        }
    };
    let threads = args.clients.min(2).to_string();
    let clients = args.clients.to_string();
    let secs = args.seconds.to_string();
    let run = |port: u16, extra: &[&str]| -> Result<f64> {
        let mut a = vec!["-n", "-c", &clients, "-j", &threads, "-T", &secs];
        a.extend_from_slice(extra);
        tps(&pgbench(&target(port), &a)?)
    };
    println!(
        "pgbench, {} clients, {} s each, scale {}:",
        args.clients, args.seconds, args.scale
    );
    for (label, extra) in [
        ("-S (select only)", vec!["-S"]),
        ("-S -M extended", vec!["-S", "-M", "extended"]),
        ("-S -M prepared", vec!["-S", "-M", "prepared"]),
        ("TPC-B (default)", vec![]),
    ] {
        let p = run(plain.port, &extra)?;
        let b = match &bouncer {
            Some(b) if !extra.contains(&"prepared") => Some(run(b.port, &extra)?),
            _ => None,
        };
        let c = run(cn1, &extra)?;
        let proxy = b.map_or(String::new(), |b| {
            format!(
                "   pgbouncer {b:>9.1} tps ({:.2} of plain; cn1 / pgbouncer {:.2})",
                b / p,
                c / b
            )
        });
        println!(
            "  {label:<18} plain {p:>9.1} tps   through cn1 {c:>9.1} tps   ratio {:.2}{proxy}",
            c / p
        );
    }
    drop(bouncer);

    let (cn_p50, cn_p99) = ddl_latency(cn1, args.ddl).await?;
    let (pg_p50, pg_p99) = ddl_latency(plain.port, args.ddl).await?;
    println!(
        "DDL (CREATE TABLE / DROP TABLE), n={}: through cn1 (2PC) p50 {:.1} ms p99 {:.1} ms; plain p50 {:.1} ms p99 {:.1} ms",
        args.ddl * 2,
        ms(cn_p50),
        ms(cn_p99),
        ms(pg_p50),
        ms(pg_p99)
    );

    let (read, write) = dn_failover(&cluster, cn2).await?;
    println!(
        "DN failover (dn1's primary host lost): kill -> first read through cn2 {:.1} s, first write {:.1} s",
        read.as_secs_f64(),
        write.as_secs_f64()
    );
    drop(plain);
    Ok(())
}

/// pgbench `-S` in each protocol mode through cn1 for a fixed number of transactions:
/// the CN process's CPU time (user + system) per query. Unlike TPS this does not move
/// with the load other processes put on the machine, so before/after figures of a CN
/// change compare even on a busy host.
fn cpu_per_query(cluster: &LocalCluster, cn1: u16, args: &Args) -> Result<()> {
    let pid_file = cluster.base_dir().join("cn1.cn.pid");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("read {}", pid_file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("parse {}", pid_file.display()))?;
    let clients = args.clients.max(1);
    let per_client = (args.cpu_transactions / clients).max(1);
    let total = per_client * clients;
    let target = format!("host=127.0.0.1 port={cn1} user=postgres dbname=postgres");
    println!("CPU of the cn1 process per query, pgbench -S, {clients} clients x {per_client}:");
    for (label, mode) in [
        ("simple", "simple"),
        ("extended", "extended"),
        ("prepared", "prepared"),
    ] {
        let perf = match &args.perf_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let out = dir.join(format!("{label}.perf.data"));
                Some(
                    Command::new("perf")
                        .args(["record", "-q", "-e", "cpu-clock", "-g", "-p"])
                        .arg(pid.to_string())
                        .arg("-o")
                        .arg(&out)
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .context("start perf record")?,
                )
            }
            None => None,
        };
        let stat_file = std::env::temp_dir().join(format!("cn_bench.{pid}.{label}.stat"));
        let stat = if args.syscalls {
            let mut c = Command::new("perf");
            c.args(["stat", "-x", ",", "-p"]).arg(pid.to_string());
            for e in SYSCALL_EVENTS {
                c.args(["-e", e]);
            }
            c.arg("-o")
                .arg(&stat_file)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let child = c.spawn().context("start perf stat")?;
            // perf attaches before it counts; give it a moment.
            std::thread::sleep(Duration::from_millis(300));
            Some(child)
        } else {
            None
        };
        let before = mpp_ha_tests::cpu_seconds(pid).ok_or_else(|| anyhow!("cn1 ({pid}) gone"))?;
        let t = Instant::now();
        let t_arg = per_client.to_string();
        let c_arg = clients.to_string();
        let j_arg = clients.min(2).to_string();
        pgbench(
            &target,
            &[
                "-n", "-S", "-M", mode, "-c", &c_arg, "-j", &j_arg, "-t", &t_arg,
            ],
        )?;
        let wall = t.elapsed();
        let after = mpp_ha_tests::cpu_seconds(pid).ok_or_else(|| anyhow!("cn1 ({pid}) gone"))?;
        for mut p in stat.into_iter().chain(perf) {
            // perf writes its file on SIGINT.
            if let Ok(raw) = i32::try_from(p.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(raw),
                    nix::sys::signal::Signal::SIGINT,
                );
            }
            let _ = p.wait();
        }
        println!(
            "  -M {label:<9} {:>7.1} us CPU per query ({:.2} s CPU, {:.1} s wall, {total} queries)",
            (after - before) * 1e6 / total as f64,
            after - before,
            wall.as_secs_f64()
        );
        if args.syscalls {
            let text = std::fs::read_to_string(&stat_file).unwrap_or_default();
            let _ = std::fs::remove_file(&stat_file);
            let per_query: Vec<String> = text
                .lines()
                .filter_map(|l| {
                    let mut f = l.split(',');
                    let n: f64 = f.next()?.trim().parse().ok()?;
                    let event = f.nth(1)?;
                    let short = event.rsplit("sys_enter_").next().unwrap_or(event);
                    let short = if short.ends_with("sys_enter") {
                        "all"
                    } else {
                        short
                    };
                    Some(format!("{short} {:.2}", n / total as f64))
                })
                .collect();
            println!("      syscalls per query: {}", per_query.join(", "));
        }
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs pgbench as the OS user `postgres` with the CN users' password; returns stdout.
fn pgbench(conninfo: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--", "pgbench"])
        .args(args)
        .arg(conninfo)
        .env("PGPASSWORD", mpp_ha_tests::cn_login()?.1)
        .output()
        .context("run pgbench")?;
    if !out.status.success() {
        bail!(
            "pgbench {args:?} {conninfo} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// "tps = 1234.5 (without initial connection time)".
fn tps(out: &str) -> Result<f64> {
    out.lines()
        .find(|l| l.starts_with("tps = ") && l.contains("without initial connection time"))
        .and_then(|l| l["tps = ".len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no tps in pgbench output: {out}"))
}

async fn connect(port: u16) -> Result<tokio_postgres::Client> {
    mpp_ha_tests::connect_cn(port, Duration::from_secs(5)).await
}

/// p50 and p99 of `n` CREATE TABLE and `n` DROP TABLE statements.
async fn ddl_latency(port: u16, n: usize) -> Result<(Duration, Duration)> {
    let client = connect(port).await?;
    let mut times = Vec::with_capacity(2 * n);
    for i in 0..n {
        for sql in [
            format!("CREATE TABLE bench_ddl_{i} (id int PRIMARY KEY, v text)"),
            format!("DROP TABLE bench_ddl_{i}"),
        ] {
            let t = Instant::now();
            client
                .batch_execute(&sql)
                .await
                .with_context(|| format!("{sql} on port {port}"))?;
            times.push(t.elapsed());
        }
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
    Ok((at(0.5), at(0.99)))
}

/// Loses dn1's primary host (agent and postmaster; the CN there keeps running) and
/// times kill → first read and first write of a dn1 row through `cn_port`. The host
/// comes back at once (`local up` restarts its agent): until the old primary rejoins
/// as standby, the new primary has no synchronous partner and commits wait.
async fn dn_failover(cluster: &LocalCluster, cn_port: u16) -> Result<(Duration, Duration)> {
    let client = connect(cn_port).await?;
    // Multi-row VALUES, not INSERT ... SELECT: the CN routes each row of a VALUES list
    // to its group, and refuses INSERT ... SELECT into a hash table (0A000).
    let values: Vec<String> = (1..=64).map(|i| format!("({i}, 0)")).collect();
    client
        .batch_execute(&format!(
            "CREATE TABLE bench_fo (id int PRIMARY KEY, v int); \
             INSERT INTO bench_fo VALUES {}",
            values.join(", ")
        ))
        .await
        .context("create bench_fo")?;
    let agent = cluster
        .recorded_pid("cm_agent-h1")
        .ok_or_else(|| anyhow!("no agent h1"))?;
    let pm = cluster
        .postmaster_pid("dn1_h1")
        .ok_or_else(|| anyhow!("dn1_h1 not running"))?;
    let t0 = Instant::now();
    kill9(agent);
    kill9(pm);
    while pid_alive(pm) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deadline = t0 + Duration::from_secs(120);
    // Every id in 1..=64: some live on dn1 (hash), so the full scan needs dn1.
    let read = first_ok(cn_port, "SELECT count(*) FROM bench_fo", deadline).await? - t0;
    let up = tokio::task::spawn_blocking({
        let config = cluster.config.clone();
        move || {
            mpp_ha_tests::run_bin(
                "cm_ctl",
                &[
                    "local",
                    "up",
                    "--timeout",
                    "120",
                    "--config",
                    &config.display().to_string(),
                ],
            )
        }
    });
    let write = first_ok(cn_port, "UPDATE bench_fo SET v = v + 1", deadline).await? - t0;
    let _ = up.await;
    Ok((read, write))
}

async fn first_ok(port: u16, sql: &str, deadline: Instant) -> Result<Instant> {
    loop {
        if Instant::now() > deadline {
            bail!("{sql:?} did not succeed through port {port} before the deadline");
        }
        if let Ok(c) = connect(port).await {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(Ok(_)) = tokio::time::timeout(left, c.batch_execute(sql)).await {
                return Ok(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One plain PostgreSQL 15 (initdb as `postgres`, trust auth on loopback), stopped
/// on drop.
struct PlainPg {
    data: PathBuf,
    port: u16,
}

impl PlainPg {
    fn start(dir: &TestDir, port: u16) -> Result<PlainPg> {
        let root = dir.path().join("plain");
        std::fs::create_dir_all(&root)?;
        as_postgres(
            &["chown", "-R", "postgres", &root.display().to_string()],
            false,
        )?;
        let data = root.join("data");
        let d = data.display().to_string();
        as_postgres(
            &[
                &format!("{PG_BIN}/initdb"),
                "-D",
                &d,
                "-U",
                "postgres",
                "-A",
                "trust",
            ],
            true,
        )?;
        let log = root.join("postgresql.log").display().to_string();
        let opts = format!("-p {port} -c listen_addresses=127.0.0.1 -c max_connections=100");
        as_postgres(
            &[
                &format!("{PG_BIN}/pg_ctl"),
                "start",
                "-w",
                "-D",
                &d,
                "-l",
                &log,
                "-o",
                &opts,
            ],
            true,
        )?;
        Ok(PlainPg { data, port })
    }
}

impl Drop for PlainPg {
    fn drop(&mut self) {
        let d = self.data.display().to_string();
        let _ = as_postgres(
            &[
                &format!("{PG_BIN}/pg_ctl"),
                "stop",
                "-m",
                "fast",
                "-w",
                "-D",
                &d,
            ],
            true,
        );
    }
}

/// PgBouncer in front of the plain PostgreSQL (transaction pooling, as the CN pools).
struct PgBouncer {
    port: u16,
    pid_file: PathBuf,
}

impl PgBouncer {
    /// Started as the PostgreSQL OS user (it refuses root); None when `binary` is
    /// "none".
    fn start(dir: &TestDir, binary: &str, plain: &PlainPg, clients: u32) -> Result<Option<Self>> {
        if binary == "none" {
            return Ok(None);
        }
        if !Path::new(binary).exists() {
            bail!("{binary} not found (apt install pgbouncer, or --pgbouncer PATH)");
        }
        let root = dir.path().join("pgbouncer");
        std::fs::create_dir_all(&root)?;
        let port = plain.port + 1;
        let pid_file = root.join("pgbouncer.pid");
        let users = root.join("userlist.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n")?;
        let ini = root.join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\npostgres = host=127.0.0.1 port={plain} dbname=postgres\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = trust\nauth_file = {users}\n\
                 pool_mode = transaction\nmax_client_conn = 200\ndefault_pool_size = {pool}\n\
                 logfile = {log}\npidfile = {pid}\n",
                plain = plain.port,
                users = users.display(),
                pool = clients.max(1),
                log = root.join("pgbouncer.log").display(),
                pid = pid_file.display(),
            ),
        )?;
        as_postgres(
            &["chown", "-R", "postgres", &root.display().to_string()],
            false,
        )?;
        as_postgres(&[binary, "-d", &ini.display().to_string()], true)?;
        let b = PgBouncer { port, pid_file };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("pgbouncer did not listen on {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Some(b))
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // Stopped by the pid it wrote (the process this bench started).
        if let Some(pid) = ha_common::process::read_pid_file(&self.pid_file) {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while pid_alive(pid.as_raw() as u32) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if pid_alive(pid.as_raw() as u32) {
                kill9(pid.as_raw() as u32);
            }
        }
    }
}

fn as_postgres(cmd: &[&str], switch: bool) -> Result<()> {
    let mut c = if switch {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).args(cmd);
        c
    } else {
        let mut c = Command::new(cmd[0]);
        c.args(&cmd[1..]);
        c
    };
    let out = c
        .current_dir(Path::new("/"))
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
