//! `cm_agent --config FILE --node HOST [--base-dir DIR]`: the per-host supervisor.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Per-host supervisor of mpp-ha instances (run by systemd). Stopping it leaves its
/// instances running; `cm_ctl stop` stops instances.
#[derive(Debug, Parser)]
#[command(name = "cm_agent", version)]
struct Args {
    /// The cluster config (TOML).
    #[arg(long)]
    config: PathBuf,
    /// This host's name in the config ([[host]] name).
    #[arg(long)]
    node: String,
    /// Overrides cluster.base_dir.
    #[arg(long)]
    base_dir: Option<PathBuf>,
    /// Log lines as `text` (default) or `json` (one object per line); the default
    /// comes from MPP_HA_LOG_FORMAT, which instances started by an agent inherit.
    #[arg(long, value_name = "text|json")]
    log_format: Option<ha_common::logging::LogFormat>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Before any thread starts: the instances this agent starts inherit it.
    ha_common::logging::set_format(args.log_format);
    ha_common::logging::init("cm_agent");
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Our errors carry their cause in their message: no chain, one line.
            eprintln!("cm_agent: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let opts = cm_agent::AgentOptions {
        config: args.config,
        node: args.node,
        base_dir: args.base_dir,
    };
    // Check the config and user before starting the runtime: bad input fails fast.
    cm_agent::agent::load(&opts)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(cm_agent::run(opts))?;
    // Do not wait for in-flight tool runs (pg_ctl keeps going on its own).
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(())
}
