//! The agent as a whole: loads the config, starts one supervisor task per instance
//! on this host, reports to the CMServers every heartbeat, tells systemd it is ready
//! after the first report cycle, and exits on SIGTERM/SIGINT.
//!
//! Stopping the agent LEAVES ITS INSTANCES RUNNING: PostgreSQL and the GTM run in
//! their own sessions, so stopping or restarting the agent service (or `kill -9` of
//! the agent) never bounces a database. A restarted agent adopts them (postmaster.pid
//! / <name>.gtm.pid plus a /proc check) instead of starting second copies. To stop
//! instances, use `cm_ctl stop` (the CMServer then assigns run = false).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ha_common::config::{ClusterConfig, InstanceKind as ConfigKind};
use tokio::sync::{mpsc, watch};

use crate::error::{AgentError, Result};
use crate::os_user::OsUser;
use crate::report::{InstanceHandle, Reporter};
use crate::supervisor::{InstanceSupervisor, SupervisorChannels};

/// Command-line options of `cm_agent`.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub config: PathBuf,
    pub node: String,
    pub base_dir: Option<PathBuf>,
}

/// Orders queued per instance before further ones are refused.
const ORDER_QUEUE: usize = 16;

/// Loads and checks everything the agent needs before it starts any task.
pub fn load(opts: &AgentOptions) -> Result<(Arc<ClusterConfig>, PathBuf, OsUser)> {
    let config_path = std::path::absolute(&opts.config).unwrap_or_else(|_| opts.config.clone());
    let cfg = ClusterConfig::load(&config_path)?.with_base_dir(opts.base_dir.clone());
    if cfg.host(&opts.node).is_none() {
        return Err(AgentError::UnknownHost {
            config: config_path,
            node: opts.node.clone(),
            known: cfg
                .hosts
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    // The agent's node is its host: it presents that host's certificate.
    ha_common::tls::init(&cfg, ha_common::tls::CertRole::Agent, Some(&opts.node))
        .map_err(ha_common::ConfigError::from)?;
    let os_user = OsUser::resolve(&cfg.cluster.os_user)?;
    Ok((Arc::new(cfg), config_path, os_user))
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: AgentOptions) -> Result<()> {
    let (cfg, config_path, os_user) = load(&opts)?;
    run_until(
        cfg,
        &config_path,
        &opts.node,
        os_user,
        ha_common::shutdown::signal(),
    )
    .await
}

/// The host's /metrics (if `metrics_port` is set for it).
async fn serve_metrics(
    cfg: &ClusterConfig,
    node: &str,
    handles: &[InstanceHandle],
) -> (
    crate::metrics::AgentMetrics,
    Option<tokio::task::JoinHandle<()>>,
) {
    let mut reg = ha_common::metrics::registry();
    let metrics = crate::metrics::AgentMetrics::register(&mut reg);
    let endpoint = cfg
        .host(node)
        .and_then(|h| h.metrics_port().map(|p| format!("{}:{p}", h.address)));
    let (m, observed) = (metrics.clone(), crate::metrics::observed(handles));
    let hook: ha_common::metrics::ScrapeHook = Arc::new(move || {
        m.refresh(&observed);
        Box::pin(async {})
    });
    let server = ha_common::metrics::HttpServer::new(reg)
        .before_scrape(hook)
        .spawn_at(&format!("cm_agent {node}"), endpoint)
        .await;
    (metrics, server)
}

/// Runs the agent until `shutdown` completes.
pub async fn run_until(
    cfg: Arc<ClusterConfig>,
    config_path: &Path,
    node: &str,
    os_user: OsUser,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let base = &cfg.cluster.base_dir;
    if !base.exists() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(base).map_err(|e| AgentError::io("create directory", base, e))?;
        // Traversable by the PostgreSQL OS user, whose instance dirs live below it.
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| AgentError::io("chmod", base, e))?;
    }
    let interval = cfg.timing.heartbeat_interval();
    let (outcome_tx, mut outcome_rx) = mpsc::unbounded_channel();
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    for r in cfg.instances_on_host(node) {
        if r.kind == ConfigKind::CmServer {
            continue; // started by cm_ctl / systemd, not by the agent
        }
        let sup = InstanceSupervisor::new(cfg.clone(), &r, &os_user, config_path)?;
        let (desired_tx, desired_rx) = watch::channel(None);
        let (order_tx, order_rx) = mpsc::channel(ORDER_QUEUE);
        let (report_tx, report_rx) = watch::channel(sup.initial_report());
        handles.push(InstanceHandle {
            name: r.instance.name.clone(),
            desired: desired_tx,
            orders: order_tx,
            report: report_rx,
        });
        let channels = SupervisorChannels {
            desired: desired_rx,
            orders: order_rx,
            outcomes: outcome_tx.clone(),
            report: report_tx,
        };
        tasks.push(tokio::spawn(sup.run(channels, interval)));
    }
    let names: Vec<&str> = handles.iter().map(|h| h.name.as_str()).collect();
    tracing::info!(node, instances = ?names, os_user = %os_user.name, "cm_agent running");

    // Below the heartbeat, so that an unreachable CMServer does not stretch the cycle.
    let rpc_timeout = interval.mul_f64(0.8).max(Duration::from_millis(100));
    let mut reporter = Reporter::new(&cfg, node, rpc_timeout)?;
    let (metrics, metrics_server) = serve_metrics(&cfg, node, &handles).await;
    // systemd: READY=1 after the first cycle; WATCHDOG=1 only while cycles complete.
    let notifier = ha_common::notify::Notifier::from_env();
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watchdog = ha_common::notify::spawn_watchdog(notifier.clone(), progress.clone());
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut notified = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            // A finished order is reported at once: the next step of a failover or
            // switchover waits for it.
            Some(outcome) = outcome_rx.recv() => {
                reporter.state.finished(outcome);
                let taken = reporter.cycle(&handles, &mut outcome_rx).await;
                metrics.reported(taken);
                if let Some(soon) = reporter.next_report.take() {
                    ticker.reset_after(soon);
                }
            }
            _ = ticker.tick() => {
                let taken = reporter.cycle(&handles, &mut outcome_rx).await;
                metrics.reported(taken);
                progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // A lease just granted: tell its new holder at once (bounded: a new
                // grant needs the old lease expired, so this happens once in a row).
                for _ in 0..2 {
                    if !reporter.take_prompt() {
                        break;
                    }
                    reporter.prompt_cycle(&handles, &mut outcome_rx).await;
                }
                if let Some(soon) = reporter.next_report.take() {
                    ticker.reset_after(soon);
                }
                if !notified {
                    notified = true;
                    // A no-op when not run by systemd (NOTIFY_SOCKET unset).
                    notifier.ready();
                    tracing::info!(reported = taken, "first report cycle done");
                }
            }
        }
    }
    tracing::info!("cm_agent stopping; its instances keep running (use cm_ctl stop to stop them)");
    notifier.stopping();
    // The port is free again for an agent started later in this process (tests).
    for t in watchdog.into_iter().chain(metrics_server) {
        t.abort();
    }
    for t in tasks {
        t.abort();
    }
    Ok(())
}
