//! The `dn_replicator` binary: parses the command line and hands over to the library.

use clap::{Parser, Subcommand};
use dn_replicator::build_cli;

#[derive(Debug, Parser)]
#[command(
    name = "dn_replicator",
    about = "DN secondary (WAL keeper) and the data-unit build channel",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one build of a standby from this host's primary (8 KiB data units and the
    /// WAL from the backup's start); exits when the build is complete.
    BuildSource(build_cli::BuildSourceArgs),
    /// Build or rebuild a data dir from a build source; resumes after interruptions.
    BuildSink(build_cli::BuildSinkArgs),
}

fn main() -> std::process::ExitCode {
    ha_common::logging::init("dn_replicator");
    let result = match Cli::parse().command {
        Command::BuildSource(a) => build_cli::build_source(a),
        Command::BuildSink(a) => build_cli::build_sink(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One clear line; the library's messages carry their causes.
            eprintln!("dn_replicator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
