//! The `cn` binary: parses the command line and hands over to `cn::cli`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cn::cli::Cli::parse();
    // Before any thread starts: the tracing setup reads it.
    ha_common::logging::set_format(cli.log_format);
    match cn::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cn: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
