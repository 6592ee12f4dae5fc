//! The build channel's command lines (`dn_replicator build-source` / `build-sink`):
//! arguments, a runtime, and one summary line each.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::{build_sink, build_source};

/// Serve one build of a standby from this host's primary: start a non-exclusive
/// backup, ship the data dir as 8 KiB units and the WAL from the backup's start; exits
/// when the build is complete (or its sink stays away past --resume-window).
#[derive(Debug, clap::Args)]
pub struct BuildSourceArgs {
    /// The primary's data dir (read directly).
    #[arg(long)]
    data_dir: PathBuf,
    /// Address to listen on for the sink (port 0: any free port, printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The primary's host (TCP) for pg_backup_start/stop.
    #[arg(long, default_value = "127.0.0.1")]
    pg_host: String,
    /// The primary's port.
    #[arg(long)]
    pg_port: u16,
    /// Database role: the cluster's replication role (REPLICATION, with the grants on
    /// pg_backup_start/stop the agent gives it).
    #[arg(long, default_value = "mpp_replication")]
    pg_user: String,
    /// File holding the role's password (first line), e.g. the config's
    /// `[dn_auth] replication_password_file`; none: no password is sent.
    #[arg(long)]
    pg_password_file: Option<PathBuf>,
    /// Seconds to keep the backup open for a sink that lost its connection.
    #[arg(long, default_value_t = 120)]
    resume_window: u64,
    /// Ship data units at most this many MB/s (0: no limit), like pg_basebackup's --max-rate.
    #[arg(long, default_value_t = 0)]
    max_rate_mb: u64,
}

/// Build (or rebuild) a data dir from a build source; resumes from its saved progress
/// after any interruption.
#[derive(Debug, clap::Args)]
pub struct BuildSinkArgs {
    /// The build source (host:port).
    #[arg(long)]
    source: String,
    /// The data dir to build. A full build replaces its contents (refused while a
    /// postmaster runs on it); --incremental keeps the blocks that match.
    #[arg(long)]
    data_dir: PathBuf,
    /// Where the progress files live (default: the data dir's parent).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Keep the data dir and ship only the blocks that differ (a former primary or a
    /// standby far behind).
    #[arg(long)]
    incremental: bool,
    /// Forget saved progress and start over.
    #[arg(long, conflicts_with = "incremental")]
    full: bool,
    /// OS user that owns the built files (PostgreSQL's).
    #[arg(long)]
    owner: Option<String>,
    /// Seconds to keep reconnecting after a lost connection.
    #[arg(long, default_value_t = 60)]
    retry_for: u64,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("tokio runtime")
}

/// `dn_replicator build-source`.
pub fn build_source(a: BuildSourceArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let listener = build_source::bind(a.listen)
            .await
            .with_context(|| format!("listen on {}", a.listen))?;
        // The sink (or the test driving us) reads the real port from here.
        println!("listening on {}", listener.local_addr()?);
        let cfg = build_source::SourceConfig {
            data_dir: a.data_dir,
            pg: build_source::PgTarget {
                host: a.pg_host,
                port: a.pg_port,
                user: a.pg_user,
                password: match &a.pg_password_file {
                    Some(p) => Some(
                        std::fs::read_to_string(p)
                            .with_context(|| format!("--pg-password-file {}", p.display()))?
                            .lines()
                            .next()
                            .unwrap_or("")
                            .trim()
                            .to_owned(),
                    ),
                    None => None,
                },
            },
            resume_window: Duration::from_secs(a.resume_window),
            first_wait: Duration::from_secs(a.resume_window),
            max_rate: (a.max_rate_mb > 0).then_some(a.max_rate_mb << 20),
        };
        let r = build_source::serve_one(&listener, &cfg).await?;
        println!(
            "build session {} complete: {} units ({} sent, {} unchanged), {} WAL bytes, {} connections",
            r.session, r.units, r.units_sent, r.same_units, r.wal_bytes_sent, r.connections
        );
        Ok(())
    })
}

/// `dn_replicator build-sink`.
pub fn build_sink(a: BuildSinkArgs) -> anyhow::Result<()> {
    let owner = match &a.owner {
        Some(name) => {
            let u = nix::unistd::User::from_name(name)
                .with_context(|| format!("look up OS user {name}"))?
                .with_context(|| format!("--owner: no OS user named {name:?}"))?;
            Some((u.uid.as_raw(), u.gid.as_raw()))
        }
        None => None,
    };
    let state_dir = a
        .state_dir
        .or_else(|| a.data_dir.parent().map(|p| p.to_path_buf()))
        .context("--state-dir is needed when the data dir has no parent")?;
    let cfg = build_sink::SinkConfig {
        source: a.source,
        data_dir: a.data_dir,
        state_dir,
        incremental: a.incremental,
        owner,
        batch_bytes: 8 << 20,
        retry_for: Duration::from_secs(a.retry_for),
    };
    if a.full {
        cfg.forget_progress()
            .context("remove saved build progress")?;
    }
    let r = runtime()?.block_on(build_sink::run(&cfg))?;
    println!(
        "build session {} complete: {} units ({} written, {} unchanged, {} refused and resent), resumed from unit {}, {} WAL bytes, {} connections",
        r.session, r.units, r.units_written, r.units_same, r.refused, r.resumed_from, r.wal_bytes, r.connections
    );
    Ok(())
}
