//! One file per subcommand; `run` dispatches.

pub mod build;
pub mod failover;
pub mod local;
pub mod start;
pub mod status;
pub mod stop;
pub mod switchover;

use ha_common::config::InstanceKind;
use ha_common::ClusterConfig;

use crate::cli::{Cli, Command, LocalAction};
use crate::error::CtlError;

pub async fn run(cli: Cli) -> Result<(), CtlError> {
    let cfg = cli.load_config()?;
    match &cli.command {
        Command::Status { json } => status::run(&cfg, *json).await,
        Command::Start(t) => start::run(&cfg, t).await,
        Command::Stop(t) => stop::run(&cfg, t).await,
        Command::Switchover(op) => switchover::run(&cfg, op).await,
        Command::Failover { instance, force } => failover::run(&cfg, instance, *force).await,
        Command::Build(op) => build::run(&cfg, op).await,
        Command::Local { action } => match action {
            LocalAction::Up { timeout, netns } => {
                local::up::run(&cfg, &cli, *timeout, netns.as_deref()).await
            }
            LocalAction::Down { timeout, netns } => {
                local::down::run(&cfg, *timeout, netns.as_deref()).await
            }
        },
    }
}

/// Checks `--instance` against the config before asking the CMServer.
pub(crate) fn check_instance(cfg: &ClusterConfig, name: &str) -> Result<(), CtlError> {
    match cfg.find(name) {
        None => Err(CtlError::UnknownInstance {
            name: name.to_owned(),
            config: cfg.source.clone(),
        }),
        Some(r) if r.kind == InstanceKind::CmServer => Err(CtlError::NotManaged {
            name: name.to_owned(),
        }),
        Some(_) => Ok(()),
    }
}

/// Prints an operation's one-line answer with how long it took.
fn print_done(reply: &ha_common::proto::cm::OperationReply, started: std::time::Instant) {
    println!(
        "{} ({:.1} s)",
        reply.message,
        started.elapsed().as_secs_f64()
    );
}
