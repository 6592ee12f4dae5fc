//! The `dn_replicator` binary: parses the command line and hands over to the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use dn_replicator::build_cli;

#[derive(Debug, Parser)]
#[command(
    name = "dn_replicator",
    about = "DN secondary: keeps a DN group's WAL (a synchronous partner that holds no data files), and the data-unit build channel that builds standbys",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as `text` (default) or `json` (one object per line); the default
    /// comes from MPP_HA_LOG_FORMAT, which instances started by an agent inherit.
    #[arg(long, global = true, value_name = "text|json")]
    log_format: Option<ha_common::logging::LogFormat>,
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
        /// The cluster's TLS dir: connect with its `restore` certificate (ca.crt,
        /// restore@<host>.crt and .key: the OS user's). Without it, plaintext.
        #[arg(long)]
        tls_dir: Option<PathBuf>,
        /// The host this runs on: present `restore@<host>.crt` from the TLS dir
        /// (`restore.crt` when that is absent, as in a dir made before certificates
        /// named hosts).
        #[arg(long)]
        host: Option<String>,
    },
    /// Serve one build of a standby from this host's primary (8 KiB data units and the
    /// WAL from the backup's start); exits when the build is complete.
    BuildSource(build_cli::BuildSourceArgs),
    /// Build or rebuild a data dir from a build source; resumes after interruptions.
    BuildSink(build_cli::BuildSinkArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Before any thread starts: the tracing setup reads it.
    ha_common::logging::set_format(cli.log_format);
    let result = match cli.command {
        Command::Serve {
            config,
            node,
            base_dir,
        } => dn_replicator::cli::serve(&config, &node, base_dir.as_deref()),
        Command::RestoreWal {
            from,
            file,
            path,
            tls_dir,
            host,
        } => dn_replicator::cli::restore_wal(
            &from,
            &file,
            &path,
            tls_dir.as_deref(),
            host.as_deref(),
        ),
        Command::BuildSource(a) => {
            ha_common::logging::init("dn_replicator");
            build_cli::build_source(a).map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::BuildSink(a) => {
            ha_common::logging::init("dn_replicator");
            build_cli::build_sink(a).map(|()| std::process::ExitCode::SUCCESS)
        }
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
