//! The command line: global `--config` and `--base-dir`, one subcommand per file
//! under `commands/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ha_common::ClusterConfig;

use crate::error::CtlError;

#[derive(Parser, Debug)]
#[command(name = "cm_ctl", about = "Operate an mpp-ha cluster", version)]
pub struct Cli {
    /// The cluster config file.
    #[arg(long, global = true, default_value = "configs/local.toml")]
    pub config: PathBuf,
    /// Overrides the config's cluster.base_dir.
    #[arg(long, global = true)]
    pub base_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Every CMServer, GTM, CN and DN member with role, state, LSN and lag.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Starts the whole cluster or one instance and waits until it is normal.
    Start(Target),
    /// Stops the whole cluster or one instance (it stays stopped until `start`).
    Stop(Target),
    /// Planned, zero-loss role swap: the named standby becomes primary once in sync,
    /// the old primary its standby (no rewind).
    Switchover(Operation),
    /// Promotes the named standby now; refused when it could lose acknowledged
    /// commits unless --force.
    Failover {
        /// The standby to promote.
        #[arg(long)]
        instance: String,
        /// Promote even if acknowledged commits could be lost.
        #[arg(long)]
        force: bool,
    },
    /// Rebuilds the named standby from its primary over the data-unit build channel:
    /// incremental (only blocks that differ travel) when it has data, else a full copy.
    Build(BuildArgs),
    /// A whole cluster as background processes on this machine.
    Local {
        #[command(subcommand)]
        action: LocalAction,
    },
}

#[derive(Args, Debug)]
pub struct Target {
    /// One instance; default: every instance of the cluster.
    #[arg(long)]
    pub instance: Option<String>,
    /// Seconds to wait for the result.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Args, Debug)]
pub struct Operation {
    /// The standby to act on.
    #[arg(long)]
    pub instance: String,
    /// Seconds to wait for the result.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    #[command(flatten)]
    pub op: Operation,
    /// Copy everything afresh (the old data dir is moved aside to data.old).
    #[arg(long)]
    pub full: bool,
}

#[derive(Subcommand, Debug)]
pub enum LocalAction {
    /// Starts the CMServers and one cm_agent per host, then every instance.
    Up {
        /// Seconds to wait until every instance is normal.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Stops every instance, agent and CMServer `local up` started.
    Down {
        /// Seconds to wait for the agents to stop the instances.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

impl Cli {
    /// The config, with `--base-dir` applied.
    pub fn load_config(&self) -> Result<ClusterConfig, CtlError> {
        Ok(ClusterConfig::load(&self.config)?.with_base_dir(self.base_dir.clone()))
    }
}
