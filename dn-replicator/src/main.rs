//! The `dn_replicator` binary: parses the command line and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "dn_replicator",
    about = "DN secondary: keeps a DN group's WAL (a synchronous partner that holds no data files), and the data-unit build channel that builds standbys",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one secondary (gRPC control service on its configured port). Its WAL lives in
    /// <base_dir>/<node>; it streams only when the CMServer orders it to.
    Serve {
        /// Cluster config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// This secondary's member name (a [[dn_group.member]] with role = "secondary").
        #[arg(long)]
        node: String,
        /// Overrides cluster.base_dir.
        #[arg(long)]
        base_dir: Option<PathBuf>,
    },
    /// Copy one WAL file from a secondary's store to PATH (usable as PostgreSQL's
    /// `restore_command`, the partial last segment included). Exit 1 if it has no such file.
    RestoreWal {
        /// The secondary's control address (host:port).
        #[arg(long)]
        from: String,
        /// WAL file name as PostgreSQL asks for it (%f).
        file: String,
        /// Where to write it (%p).
        path: PathBuf,
    },
    /// Serve one build of a standby from this host's primary: start a non-exclusive
    /// backup, ship the data dir as 8 KiB units and the WAL from the backup's start;
    /// exits when the build is complete (or its sink stays away past --resume-window).
    BuildSource {
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
        /// Database superuser.
        #[arg(long, default_value = "postgres")]
        pg_user: String,
        /// Seconds to keep the backup open for a sink that lost its connection.
        #[arg(long, default_value_t = 120)]
        resume_window: u64,
        /// Ship data units at most this many MB/s (0: no limit), like pg_basebackup's --max-rate.
        #[arg(long, default_value_t = 0)]
        max_rate_mb: u64,
    },
    /// Build (or rebuild) a data dir from a build source; resumes from its saved
    /// progress after any interruption.
    BuildSink {
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
        /// Keep the data dir and ship only the blocks that differ (a former primary
        /// or a standby far behind).
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
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            config,
            node,
            base_dir,
        } => dn_replicator::cli::serve(&config, &node, base_dir.as_deref()),
        Command::RestoreWal { from, file, path } => {
            dn_replicator::cli::restore_wal(&from, &file, &path)
        }
        Command::BuildSource {
            data_dir,
            listen,
            pg_host,
            pg_port,
            pg_user,
            resume_window,
            max_rate_mb,
        } => dn_replicator::cli::build_source(dn_replicator::cli::BuildSourceArgs {
            data_dir,
            listen,
            pg_host,
            pg_port,
            pg_user,
            resume_window,
            max_rate_mb,
        }),
        Command::BuildSink {
            source,
            data_dir,
            state_dir,
            incremental,
            full,
            owner,
            retry_for,
        } => dn_replicator::cli::build_sink(dn_replicator::cli::BuildSinkArgs {
            source,
            data_dir,
            state_dir,
            incremental,
            full,
            owner,
            retry_for,
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One clear line; the library's messages carry their causes.
            eprintln!("dn_replicator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
