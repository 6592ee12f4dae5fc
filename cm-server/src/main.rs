//! `cm_server --config FILE --node NAME [--base-dir DIR]`: one CMServer of the cluster.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use ha_common::ClusterConfig;

#[derive(Parser)]
#[command(name = "cm_server", about = "CMServer: cluster state and arbitration")]
struct Args {
    /// The cluster config file.
    #[arg(long)]
    config: PathBuf,
    /// Which [[cm_server]] of the config this process is.
    #[arg(long)]
    node: String,
    /// Overrides the config's cluster.base_dir.
    #[arg(long)]
    base_dir: Option<PathBuf>,
    /// Log lines as `text` (default) or `json` (one object per line); the default
    /// comes from MPP_HA_LOG_FORMAT, which instances started by an agent inherit.
    #[arg(long, value_name = "text|json")]
    log_format: Option<ha_common::logging::LogFormat>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    ha_common::logging::init_with("cm_server", args.log_format);
    if let Err(e) = run(args).await {
        eprintln!("cm_server: error: {}", one_line(&e));
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    let cfg = ClusterConfig::load(&args.config)?.with_base_dir(args.base_dir);
    cm_server::serve(cfg, &args.node).await?;
    Ok(())
}

/// The error and its causes on one line: causes already quoted by their parent are
/// not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    ha_common::message::one_line(&msg)
}
