//! The `gtm` command line: subcommands, their flags and help, and what each one does.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use ha_common::config::ClusterConfig;
use ha_common::proto::gtm as pb;

use crate::bench::{self, BenchOptions};
use crate::client::{ClientError, ClientOptions, GtmClient};
use crate::server::{self, ServeError, ServeOptions};

#[derive(Debug, Parser)]
#[command(
    name = "gtm",
    about = "GTM: global transaction ids (GXIDs) and 2PC decisions, served by a primary/standby pair",
    version
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as `text` (default) or `json` (one object per line); the default
    /// comes from MPP_HA_LOG_FORMAT, which instances started by an agent inherit.
    #[arg(long, global = true, value_name = "text|json")]
    pub log_format: Option<ha_common::logging::LogFormat>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one GTM instance (gRPC on its configured port) in the role its control file
    /// or the config gives it. Its data dir is <base_dir>/<node>; a data dir without an
    /// intact gtm.control makes it refuse to start.
    Serve {
        /// Cluster config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// This instance's name in the config's [[gtm.instance]] list.
        #[arg(long)]
        node: String,
        /// Overrides cluster.base_dir.
        #[arg(long)]
        base_dir: Option<PathBuf>,
        /// Hand out GXIDs (and record decisions) only under the primary CMServer's
        /// lease, which this GTM renews from the config's CMServers itself
        /// (RenewGtmLease): a primary cut off from the primary CMServer stops before
        /// its standby can be promoted. The agent passes it when the config sets
        /// `gtm.require_lease = true` (the default); leave it off for a bare GTM pair
        /// run without CMServers.
        #[arg(long)]
        require_lease: bool,
    },
    /// Allocate GXIDs from the primary and print them, one per line.
    Next {
        /// Cluster config (TOML) naming the GTM pair.
        #[arg(long)]
        config: PathBuf,
        /// How many GXIDs (contiguous).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        count: u64,
    },
    /// Promote a standby to primary with a new term (prints the term). LOW-LEVEL, needs
    /// --force: it bypasses the CMServers, which neither fence the old primary first nor
    /// record the new roles. Use `cm_ctl switchover --instance NODE` or `cm_ctl failover
    /// --instance NODE`.
    Promote {
        /// Cluster config (TOML) naming the GTM pair.
        #[arg(long)]
        config: PathBuf,
        /// The standby to promote.
        #[arg(long)]
        node: String,
        /// Term to promote in; 0 = the node's own term + 1.
        #[arg(long, default_value_t = 0)]
        term: u64,
        /// Also order it to run alone (serve without a standby): use when the old
        /// primary is gone.
        #[arg(long)]
        run_alone: bool,
        /// Then allocate one GXID from it and print the time from the order to that GXID.
        #[arg(long)]
        time_first_gxid: bool,
        /// Promote behind the CMServers' back: nothing fences the old primary, so two
        /// GTM primaries may hand out GXIDs, and the CMServers may undo it.
        #[arg(long)]
        force: bool,
    },
    /// Demote a primary to standby (it then copies the primary's state).
    Demote {
        /// Cluster config (TOML) naming the GTM pair.
        #[arg(long)]
        config: PathBuf,
        /// The primary to demote.
        #[arg(long)]
        node: String,
        /// Term of the order; 0 = the node's current term.
        #[arg(long, default_value_t = 0)]
        term: u64,
    },
    /// Order a primary to serve without its standby (or, with --off, to require it again).
    RunAlone {
        /// Cluster config (TOML) naming the GTM pair.
        #[arg(long)]
        config: PathBuf,
        /// The primary to order.
        #[arg(long)]
        node: String,
        /// Require the standby again.
        #[arg(long)]
        off: bool,
    },
    /// Show role, term, boundary, readiness and sync state of the GTM instances.
    Status {
        /// Cluster config (TOML) naming the GTM pair.
        #[arg(long)]
        config: PathBuf,
        /// Only this instance (exit status 1 if it does not answer).
        #[arg(long)]
        node: Option<String>,
    },
    /// Measure GXID throughput and per-call latency (p50/p99) with concurrent callers
    /// sharing one client, beside the ceiling of the transport measured in the same run:
    /// a no-op RPC streamed the same way (ceiling_per_s, ratio = GXIDs/s over it) and
    /// unary (unary_per_s). Prints one key=value line per --clients value.
    Bench {
        /// Cluster config (TOML) naming the GTM pair.
        #[arg(long)]
        config: PathBuf,
        /// Concurrent callers sharing one client; a comma-separated list runs each
        /// (e.g. 1,64,256).
        #[arg(long, default_value = "16", value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=100_000))]
        clients: Vec<u64>,
        /// Seconds of GXID calls per --clients value (the streamed and the unary no-op
        /// get as long each, so a run takes three times this).
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// GXIDs per call.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        count: u64,
        /// Messages in flight at once on the client's stream.
        #[arg(long, default_value_t = crate::client::DEFAULT_WINDOW as u64, value_parser = clap::value_parser!(u64).range(1..=1024))]
        in_flight: u64,
        /// The GXID, streamed no-op and unary no-op measurements alternate this many
        /// times within the duration (the machine's load moves).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
        rounds: u32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ha_common::ConfigError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Bad arguments, or nothing to report.
    #[error("{0}")]
    Usage(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Runs one parsed command to completion.
pub fn run(cli: Cli) -> Result<(), CliError> {
    // The bench's callers, stream driver and connection share one thread: on a small
    // machine that also runs the GTM pair, cross-thread wake-ups cost more than they
    // bring (measured: higher GXIDs/s and lower latency than a multi-thread runtime).
    let rt = if matches!(cli.command, Command::Bench { .. }) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    }
    .map_err(CliError::Runtime)?;
    rt.block_on(run_async(cli))
}

fn gtm_endpoint(cfg: &ClusterConfig, node: &str) -> Result<String, CliError> {
    match cfg.gtm.instances.iter().find(|i| i.name == node) {
        Some(i) => Ok(cfg.endpoint(i)),
        None => Err(CliError::Usage(format!(
            "config {}: no GTM instance named {node:?} (known: {})",
            cfg.source.display(),
            cfg.gtm
                .instances
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// `gtm promote` bypasses the CMServers (every config names them): no fencing of the
/// old primary, no recorded roles. Refused unless forced, and then loudly warned.
fn check_unmanaged_promote(cfg: &ClusterConfig, node: &str, force: bool) -> Result<(), CliError> {
    if !force {
        return Err(CliError::Usage(format!(
            "gtm promote bypasses the CMServers of {}: promote through them so that the old \
             primary is fenced first (`cm_ctl switchover --instance {node}` or `cm_ctl failover \
             --instance {node}`); --force promotes anyway",
            cfg.source.display()
        )));
    }
    eprintln!(
        "WARNING: promoting {node} behind the CMServers' back: the old primary is not fenced \
         (two GTM primaries may hand out GXIDs) and the CMServers may demote {node} again"
    );
    Ok(())
}

async fn client_for(cfg: &ClusterConfig) -> Result<GtmClient, CliError> {
    Ok(GtmClient::connect(cfg.gtm_endpoints()).await?)
}

fn role_name(code: i32) -> &'static str {
    match pb::Role::try_from(code) {
        Ok(pb::Role::Primary) => "primary",
        Ok(pb::Role::Standby) => "standby",
        _ => "unknown",
    }
}

fn status_line(endpoint: &str, s: &pb::GtmStatus) -> String {
    let mut line = format!(
        "{} {} role={} term={} boundary={} next_gxid={} ready={} standby_attached={} run_alone={} decisions={}",
        s.name,
        endpoint,
        role_name(s.role),
        s.term,
        s.boundary,
        s.next_gxid,
        s.ready,
        s.standby_attached,
        s.run_alone,
        s.decisions
    );
    if !s.last_error.is_empty() {
        line.push_str(&format!(" last_error={:?}", s.last_error));
    }
    line
}

async fn run_async(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve {
            config,
            node,
            base_dir,
            require_lease,
        } => {
            ha_common::logging::init("gtm");
            server::serve(ServeOptions {
                config,
                node,
                base_dir,
                require_lease,
            })
            .await?;
        }
        Command::Next { config, count } => {
            let cfg = ClusterConfig::load(&config)?;
            ha_common::tls::init(&cfg, ha_common::tls::CertRole::Operator, None)
                .map_err(ha_common::ConfigError::from)?;
            let client = client_for(&cfg).await?;
            let range = client.next_gxid_unary(count).await?;
            let mut out = String::new();
            for g in range {
                out.push_str(&g.to_string());
                out.push('\n');
            }
            print!("{out}");
        }
        Command::Promote {
            config,
            node,
            term,
            run_alone,
            time_first_gxid,
            force,
        } => {
            let cfg = ClusterConfig::load(&config)?;
            ha_common::tls::init(&cfg, ha_common::tls::CertRole::Operator, None)
                .map_err(ha_common::ConfigError::from)?;
            let endpoint = gtm_endpoint(&cfg, &node)?;
            check_unmanaged_promote(&cfg, &node, force)?;
            let client = client_for(&cfg).await?;
            let started = Instant::now();
            let s = client.promote_with(&endpoint, term, run_alone).await?;
            println!("{}", s.term);
            if time_first_gxid {
                // Straight to the promoted node: the measure is its own readiness.
                let direct =
                    GtmClient::connect_with(vec![endpoint.clone()], ClientOptions::default())
                        .await?;
                let g = direct.next_gxid(1).await?;
                println!(
                    "first GXID {} from {node} {:.1} ms after the promote order",
                    g.start,
                    started.elapsed().as_secs_f64() * 1000.0
                );
            }
        }
        Command::Demote { config, node, term } => {
            let cfg = ClusterConfig::load(&config)?;
            ha_common::tls::init(&cfg, ha_common::tls::CertRole::Operator, None)
                .map_err(ha_common::ConfigError::from)?;
            let endpoint = gtm_endpoint(&cfg, &node)?;
            let client = client_for(&cfg).await?;
            let term = if term == 0 {
                client.status(&endpoint).await?.term
            } else {
                term
            };
            let s = client.demote(&endpoint, term).await?;
            println!("{}", status_line(&endpoint, &s));
        }
        Command::RunAlone { config, node, off } => {
            let cfg = ClusterConfig::load(&config)?;
            ha_common::tls::init(&cfg, ha_common::tls::CertRole::Operator, None)
                .map_err(ha_common::ConfigError::from)?;
            let endpoint = gtm_endpoint(&cfg, &node)?;
            let client = client_for(&cfg).await?;
            let term = client.status(&endpoint).await?.term;
            let s = client.set_run_alone(&endpoint, term, !off).await?;
            println!("{}", status_line(&endpoint, &s));
        }
        Command::Status { config, node } => {
            let cfg = ClusterConfig::load(&config)?;
            ha_common::tls::init(&cfg, ha_common::tls::CertRole::Operator, None)
                .map_err(ha_common::ConfigError::from)?;
            let client = client_for(&cfg).await?;
            if let Some(node) = node {
                let endpoint = gtm_endpoint(&cfg, &node)?;
                let s = client.status(&endpoint).await?;
                println!("{}", status_line(&endpoint, &s));
            } else {
                let mut answered = 0;
                for (endpoint, r) in client.status_all().await {
                    match r {
                        Ok(s) => {
                            answered += 1;
                            println!("{}", status_line(&endpoint, &s));
                        }
                        Err(e) => println!("? {endpoint} unreachable: {e}"),
                    }
                }
                if answered == 0 {
                    return Err(CliError::Usage("no GTM instance answered".into()));
                }
            }
        }
        Command::Bench {
            config,
            clients,
            duration,
            count,
            in_flight,
            rounds,
        } => {
            if !(duration.is_finite() && duration > 0.0 && duration <= 3600.0) {
                return Err(CliError::Usage(format!(
                    "--duration must be between 0 and 3600 seconds, got {duration}"
                )));
            }
            let cfg = ClusterConfig::load(&config)?;
            ha_common::tls::init(&cfg, ha_common::tls::CertRole::Operator, None)
                .map_err(ha_common::ConfigError::from)?;
            for clients in clients {
                let report = bench::run(
                    cfg.gtm_endpoints(),
                    BenchOptions {
                        clients: clients as usize,
                        duration: Duration::from_secs_f64(duration),
                        count,
                        in_flight: in_flight as usize,
                        rounds,
                    },
                )
                .await?;
                println!("{report}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gtm_promote_needs_force_and_names_the_cmserver_way() {
        let cfg = ClusterConfig::parse(
            include_str!("../../configs/local.toml"),
            std::path::Path::new("local.toml"),
        )
        .unwrap();
        let e = check_unmanaged_promote(&cfg, "gtm2", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cm_ctl failover --instance gtm2"), "{e}");
        assert!(e.contains("--force"), "{e}");
        assert!(check_unmanaged_promote(&cfg, "gtm2", true).is_ok());
    }
}
