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
    /// The cluster CA and one certificate per role and host (mutual TLS on every gRPC link).
    Cert {
        #[command(subcommand)]
        action: CertAction,
    },
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
pub enum CertAction {
    /// Makes DIR hold ca.crt (+ ca.key), operator.crt/.key, and <role>@<host>.crt/.key
    /// for each role on each host of the config that runs it (agent, cmserver, gtm, cn,
    /// replicator, restore), each valid for its host's address only. On a DIR that
    /// already holds a ca.crt it issues only the missing files, signed by that CA
    /// (DIR's ca.key, or --ca-cert/--ca-key), and never rewrites one: run it again
    /// after adding a host, or to upgrade a DIR of host-less <role>.crt files.
    /// Point `[tls] dir` at DIR.
    Init {
        /// Where to write; default: the config's tls.dir (<base_dir>/tls).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Sign with this existing CA certificate (PEM) instead of making a new CA.
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// The existing CA's private key (PEM); it is not copied into DIR.
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<PathBuf>,
    },
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

    /// The config, with this process's operator certificate loaded when `[tls]` is on.
    /// `local up` first makes the certificates when the cluster has none yet.
    pub fn load_config_and_tls(&self) -> Result<ClusterConfig, CtlError> {
        let cfg = self.load_config()?;
        let first_local_up = matches!(
            self.command,
            Command::Local {
                action: LocalAction::Up { .. }
            }
        );
        if first_local_up && cfg.tls.enabled {
            // The CA and every certificate on the first start; later, what a cluster
            // made before certificates named hosts (or before a role existed) lacks,
            // from its own CA. A dir whose CA key is elsewhere is left as it is: its
            // daemons fall back to the host-less certificates it holds.
            let dir = cfg.tls_dir();
            let has_ca_key = dir.join("ca.key").exists();
            if !dir.join("ca.crt").exists() || has_ca_key {
                let issued = ha_common::tls::init_dir(&dir, &cfg, None)
                    .map_err(ha_common::ConfigError::from)?;
                if !issued.made.is_empty() {
                    // restore_command runs as the OS user: its certificates are that user's.
                    ha_common::tls::give_restore_identity(&dir, &cfg.cluster.os_user)
                        .map_err(ha_common::ConfigError::from)?;
                }
            }
        }
        if first_local_up {
            // The DN roles' passwords, made once (never replaced: the data dirs'
            // roles carry them).
            ha_common::dn_auth::init_password_files(&cfg)?;
        }
        if !matches!(self.command, Command::Cert { .. }) {
            ha_common::tls::init(&cfg, ha_common::tls::CertRole::Operator, None)
                .map_err(ha_common::ConfigError::from)?;
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// `local up` on a cluster with no certificates yet (local.toml: TLS on) makes the
    /// CA, one certificate per role and host and the password files before it starts
    /// anything; the restore keys and the password files belong to the OS user alone.
    #[test]
    fn first_local_up_makes_the_certificates_and_password_files() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let mut text = include_str!("../../configs/local.toml").replace(
            "base_dir = \"/tmp/mpp-ha\"",
            &format!("base_dir = {:?}", base.display().to_string()),
        );
        // As root the files go to local.toml's `postgres`; otherwise to ourselves.
        let euid = nix::unistd::geteuid();
        if !euid.is_root() {
            let me = nix::unistd::User::from_uid(euid).unwrap().unwrap().name;
            text = text.replace("os_user = \"postgres\"", &format!("os_user = {me:?}"));
        }
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, text).unwrap();
        let cli = Cli::parse_from([
            "cm_ctl",
            "--config",
            config.to_str().unwrap(),
            "local",
            "up",
        ]);
        let cfg = cli.load_config_and_tls().unwrap();
        assert!(cfg.tls.enabled, "local.toml runs TLS");
        let tls = cfg.tls_dir();
        for name in ha_common::tls::CertName::for_config(&cfg) {
            assert!(name.crt(&tls).exists(), "{name}.crt");
        }
        assert!(tls.join("agent@h3.crt").exists() && tls.join("operator.crt").exists());
        let os_uid = nix::unistd::User::from_name(&cfg.cluster.os_user)
            .unwrap()
            .unwrap()
            .uid
            .as_raw();
        let key = std::fs::metadata(tls.join("restore@h1.key")).unwrap();
        assert_eq!((key.uid(), key.mode() & 0o777), (os_uid, 0o600));
        let user = cfg.user("postgres").unwrap();
        let pw = ha_common::dn_auth::user_password_file(&cfg, user);
        let meta = std::fs::metadata(&pw).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (os_uid, 0o600));
        // The CN user's password is in the file, not in the config.
        assert!(ha_common::dn_auth::user_password(&cfg, user).unwrap().len() >= 16);
        assert_eq!(user.password, None);
    }
}
