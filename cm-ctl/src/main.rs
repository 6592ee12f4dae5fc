//! `cm_ctl`: status, start, stop, local up|down. Errors are one line and exit 1.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = cm_ctl::Cli::parse();
    if let Err(e) = cm_ctl::commands::run(cli).await {
        eprintln!(
            "cm_ctl: error: {}",
            ha_common::message::one_line(&e.to_string())
        );
        std::process::exit(1);
    }
}
