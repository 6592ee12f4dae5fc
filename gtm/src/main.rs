//! The `gtm` binary: parses the command line and hands over to `gtm::cli`.

use clap::Parser;

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = gtm::cli::Cli::parse();
    // Before any thread starts: the tracing setup reads it.
    ha_common::logging::set_format(cli.log_format);
    match gtm::cli::run(cli) {
        Ok(()) => Ok(std::process::ExitCode::SUCCESS),
        Err(e) => {
            // One clear line; the library's messages already carry their causes.
            eprintln!("gtm: {e}");
            Ok(std::process::ExitCode::FAILURE)
        }
    }
}
