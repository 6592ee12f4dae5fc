//! The `cn` command line: `cn serve --config F --node NAME [--base-dir DIR]`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cn",
    about = "mpp-ha coordinator: a PostgreSQL-wire endpoint that makes the DN groups one database",
    long_about = "mpp-ha coordinator (CN). Clients (psql, pgbench, drivers) connect to it as to \
PostgreSQL and log in with a [[user]] of the config (SCRAM-SHA-256). It keeps a durable \
catalog of distributed tables under <base_dir>/<NAME>/, routes each statement to the DN \
groups' primaries (learned from the CMServer), merges their answers, commits DDL and \
multi-group transactions by two-phase commit with the GTM, and serves cn.proto's \
Coordinator service on its rpc_port."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as `text` (default) or `json` (one object per line); the default
    /// comes from MPP_HA_LOG_FORMAT, which instances started by an agent inherit.
    #[arg(long, global = true, value_name = "text|json")]
    pub log_format: Option<ha_common::logging::LogFormat>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve clients until SIGTERM/SIGINT.
    Serve {
        /// The cluster config (TOML), the same file every role reads.
        #[arg(long)]
        config: PathBuf,
        /// This CN's [[cn]] name in the config.
        #[arg(long)]
        node: String,
        /// Overrides cluster.base_dir (state goes to <base_dir>/<NAME>/).
        #[arg(long)]
        base_dir: Option<PathBuf>,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            node,
            base_dir,
        } => {
            ha_common::logging::init("cn");
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(crate::server::serve(config, &node, base_dir))?;
            Ok(())
        }
    }
}
