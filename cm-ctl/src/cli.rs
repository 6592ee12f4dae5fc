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
    /// Planned, zero-loss role swap: the named standby (DN member or GTM) becomes
    /// primary once in sync, the old primary its standby (no rewind). A GTM primary is
    /// demoted before its standby is promoted: never two GTM primaries.
    Switchover(Operation),
    /// Promotes the named standby now; refused when it could lose acknowledged
    /// commits (DN) or hand out a GXID twice (GTM: the primary ran alone) unless
    /// --force. A GTM primary that still responds is demoted first.
    Failover {
        /// The standby to promote.
        #[arg(long)]
        instance: String,
        /// Promote even if acknowledged commits could be lost or GXIDs handed out
        /// twice (the reply says what is risked).
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
        /// Run each host in its own network namespace PREFIX-<host>, its config
        /// address on eth0, joined by bridge PREFIXbr (address .254 of the hosts'
        /// /24), created when missing. Needs root and `ip`; the hosts need distinct
        /// addresses in one /24 (configs/local-netns.toml).
        #[arg(long, value_name = "PREFIX")]
        netns: Option<String>,
    },
    /// Stops every instance, agent and CMServer `local up` started.
    Down {
        /// Seconds to wait for the agents to stop the instances.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Also remove the network namespaces and bridge `local up --netns PREFIX`
        /// made.
        #[arg(long, value_name = "PREFIX")]
        netns: Option<String>,
    },
}

impl Cli {
    /// The config, with `--base-dir` applied.
    pub fn load_config(&self) -> Result<ClusterConfig, CtlError> {
        Ok(ClusterConfig::load(&self.config)?.with_base_dir(self.base_dir.clone()))
    }
}
