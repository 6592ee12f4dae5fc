//! `cm_ctl local up`: starts whatever of the local cluster is not running (CMServers,
//! one agent per host), records their pids, asks for every instance to run and waits
//! until every instance the project can run is normal. With `--netns` each host's
//! daemons run in that host's network namespace (see `crate::netns`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use ha_common::ClusterConfig;

use super::{absolute, absolute_base_dir, daemons, log_path};
use crate::cli::Cli;
use crate::client::Primary;
use crate::error::CtlError;
use crate::netns::{Namespace, Network};
use crate::processes::{spawn_detached, Daemon, PidFile};
use crate::progress::{wait_for, Goal};

pub async fn run(
    cfg: &ClusterConfig,
    cli: &Cli,
    timeout_s: u64,
    netns: Option<&str>,
) -> Result<(), CtlError> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(timeout_s);
    let base = absolute_base_dir(cfg)?;
    std::fs::create_dir_all(&base).map_err(|e| CtlError::io("create", &base, e))?;
    // The PostgreSQL OS user must be able to reach its data dirs below it.
    let _ = std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755));
    let config =
        std::fs::canonicalize(&cli.config).map_err(|e| CtlError::io("resolve", &cli.config, e))?;
    let bin_dir = absolute(&cfg.bin_dir())?;

    let network = match netns {
        Some(prefix) => {
            let n = Network::plan(prefix, cfg)?;
            n.create()?;
            eprintln!(
                "network: bridge {} ({}), namespaces {}",
                n.bridge(),
                n.bridge_address()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                n.hosts
                    .iter()
                    .map(|(h, a)| format!("{} ({a})", n.namespace(h)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Some(n)
        }
        None => None,
    };

    let pids = PidFile::in_base_dir(&base);
    let mut recorded = Vec::new();
    let mut first_cms: Option<(Daemon, u32)> = None;
    for d in daemons(cfg) {
        let bin = bin_dir.join(d.program);
        if !bin.exists() {
            return Err(CtlError::MissingBinary(bin));
        }
        let running = pids
            .lookup(&d.key())
            .filter(|pid| d.is(*pid, &base))
            .or_else(|| d.find_running(&base).first().copied());
        let pid = match running {
            Some(pid) => {
                eprintln!("{} {} already running (pid {pid})", d.program, d.node);
                pid
            }
            None => {
                let log = log_path(&base, &d);
                let args = d.args(&config, &base);
                let ns = match &network {
                    Some(n) => Some(Namespace::open(&n.namespace_path(&d.host))?),
                    None => None,
                };
                let pid = spawn_detached(&bin, &args, &log, ns.as_ref())?;
                eprintln!(
                    "started {} {} (pid {pid}, log {})",
                    d.program,
                    d.node,
                    log.display()
                );
                pid
            }
        };
        if d.program == "cm_server" && first_cms.is_none() {
            first_cms = Some((d.clone(), pid));
        }
        recorded.push((d.key(), pid));
        pids.write(&recorded)?;
    }

    let mut primary = wait_for_primary(cfg, &base, first_cms, deadline).await?;
    primary.set_desired(None, true).await?;
    let left = deadline.saturating_duration_since(Instant::now());
    let status = wait_for(
        cfg,
        None,
        Goal::Running,
        left,
        "every instance to run normally",
    )
    .await
    .map_err(|e| match e {
        CtlError::Timeout { what, pending, .. } => CtlError::Timeout {
            what,
            secs: timeout_s,
            pending: format!(
                "{pending} (logs under {}; `cm_ctl local down` stops everything)",
                base.display()
            ),
        },
        other => other,
    })?;

    println!(
        "local cluster {:?} is up ({:.1} s)",
        cfg.cluster.name,
        started.elapsed().as_secs_f64()
    );
    for cn in status.cn.iter().filter(|c| c.state == "normal") {
        let address = cfg
            .find(&cn.name)
            .map(|r| cfg.address_of(r.instance).to_owned())
            .unwrap_or_else(|| "127.0.0.1".into());
        println!("{}", cn_psql_line(cfg, &cn.name, &address, cn.port));
    }
    for g in &status.dn_groups {
        for m in g.members.iter().filter(|m| m.role == "primary") {
            let address = cfg
                .find(&m.name)
                .map(|r| cfg.address_of(r.instance).to_owned())
                .unwrap_or_else(|| "127.0.0.1".into());
            println!("{}", dn_psql_line(cfg, &g.name, &m.name, &address, m.port));
        }
    }
    if let Some(n) = &network {
        println!(
            "  a client inside host h's namespace: ip netns exec {}-<h> psql ...",
            n.prefix
        );
    }
    let mut status_cmd = format!("cm_ctl status --config {}", config.display());
    if cli.base_dir.is_some() {
        status_cmd.push_str(&format!(" --base-dir {}", base.display()));
    }
    println!("  status: {status_cmd}");
    let mut stop_cmd = status_cmd.replacen(" status ", " local down ", 1);
    if let Some(n) = &network {
        stop_cmd.push_str(&format!(" --netns {}", n.prefix));
    }
    println!("  stop:   {stop_cmd}");
    Ok(())
}

/// How to connect to a DN primary: psql over TCP as the admin role, with the
/// password from its file (pg_hba asks every TCP login for a SCRAM password).
fn dn_psql_line(cfg: &ClusterConfig, group: &str, name: &str, address: &str, port: u32) -> String {
    use ha_common::dn_auth::{password_file, DnRole};
    format!(
        "  {group} primary {name}: PGPASSWORD=$(cat {}) psql \"host={address} port={port} user={} dbname=postgres\"",
        password_file(cfg, DnRole::Admin).display(),
        DnRole::Admin.name()
    )
}

/// How to connect to a CN: psql as the config's first `[[user]]`, the password from
/// its file.
fn cn_psql_line(cfg: &ClusterConfig, name: &str, address: &str, port: u32) -> String {
    let Some(u) = cfg.users.first() else {
        return format!("  coordinator {name}: psql \"host={address} port={port}\"");
    };
    let pw = if u.password.is_some() {
        String::new()
    } else {
        format!(
            "PGPASSWORD=$(cat {}) ",
            ha_common::dn_auth::user_password_file(cfg, u).display()
        )
    };
    format!(
        "  coordinator {name}: {pw}psql \"host={address} port={port} user={} dbname=postgres\"",
        u.name
    )
}

/// Waits until the primary CMServer answers; fails early, with its log, if the
/// CMServer we started exited.
async fn wait_for_primary(
    cfg: &ClusterConfig,
    base: &Path,
    first: Option<(Daemon, u32)>,
    deadline: Instant,
) -> Result<Primary, CtlError> {
    loop {
        let err = match Primary::find(cfg).await {
            Ok(p) => return Ok(p),
            Err(e) => e,
        };
        if let Some((d, pid)) = &first {
            if !d.is(*pid, base) {
                let log = log_path(base, d);
                let last = std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .to_owned();
                return Err(CtlError::Other(format!(
                    "cm_server {} exited: {last} (log {})",
                    d.node,
                    log.display()
                )));
            }
        }
        if Instant::now() >= deadline {
            return Err(err);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
