//! The CMServer's own look at primaries (and the GTM standby) whose agent is silent:
//! a silent agent is not a dead primary (issue 9 §6). Restarting `cm-agent.service`
//! on a host must not fail over every primary on it, so before the arbiter fails
//! over for agent silence it needs the instance to be unreachable or hung as seen
//! from outside its host. This task probes such instances directly (a DN: connect
//! and `SELECT pg_is_in_recovery()`; a GTM: its Status RPC), bounded by the probe
//! timeout, and records every answer in the engine for the arbiter
//! (`arbiter::SeenFromOutside`). A failed probe records nothing: the timer keeps
//! running from the last answer.

use std::time::{Duration, Instant};

use ha_common::config::{ClusterConfig, InstanceKind};
use ha_common::proto::cm::MemberRole;
use ha_common::proto::gtm as gpb;

use crate::arbitration::Engine;
use crate::reports::Reports;
use crate::state::{AssignedRole, ClusterState};

/// Instances worth probing now: assigned DN/GTM primaries and the GTM standby
/// whose latest report is older than `stale` (their agent may be restarting).
pub fn to_probe(
    cfg: &ClusterConfig,
    state: &ClusterState,
    reports: &Reports,
    now: Instant,
    stale: Duration,
) -> Vec<String> {
    cfg.all_refs()
        .into_iter()
        .filter(|r| matches!(r.kind, InstanceKind::Gtm | InstanceKind::DnMember))
        .filter(|r| match state.role_of(&r.instance.name) {
            Some(AssignedRole::Primary) => true,
            Some(AssignedRole::Standby) => r.kind == InstanceKind::Gtm,
            _ => false,
        })
        .filter(|r| reports.fresh(&r.instance.name, now, stale).is_none())
        .map(|r| r.instance.name.clone())
        .collect()
}

/// How `name` answers the CMServer itself (None: it does not, within `timeout`).
pub async fn probe(cfg: &ClusterConfig, name: &str, timeout: Duration) -> Option<MemberRole> {
    let r = cfg.find(name)?;
    let endpoint = cfg.endpoint(r.instance);
    let work = async {
        match r.kind {
            InstanceKind::Gtm => {
                // With the CMServer's certificate when TLS is on, like every link.
                let ep =
                    ha_common::tls::endpoint(&endpoint, ha_common::tls::CertRole::Gtm, timeout)
                        .ok()?;
                let mut c = gpb::gtm_client::GtmClient::new(ep.connect().await.ok()?);
                let s = c.status(gpb::StatusRequest {}).await.ok()?.into_inner();
                match gpb::Role::try_from(s.role).ok()? {
                    gpb::Role::Primary => Some(MemberRole::Primary),
                    gpb::Role::Standby => Some(MemberRole::Standby),
                    _ => None,
                }
            }
            _ => {
                let (host, port) = endpoint.rsplit_once(':')?;
                // As the monitoring role, like the agents' probes: pg_hba wants a
                // password on every TCP login (the CMServer hosts need the file too).
                let monitor = ha_common::dn_auth::DnRole::Monitor;
                let password = match ha_common::dn_auth::read_password(cfg, monitor) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(instance = %name, "cannot probe it: {e}");
                        return None;
                    }
                };
                let mut config = tokio_postgres::Config::new();
                config
                    .host(host)
                    .port(port.parse().ok()?)
                    .user(monitor.name())
                    .password(password)
                    .dbname("postgres")
                    .application_name("cm_server")
                    .connect_timeout(timeout);
                let (client, conn) = config.connect(tokio_postgres::NoTls).await.ok()?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let row = client
                    .query_one("SELECT pg_is_in_recovery()", &[])
                    .await
                    .ok()?;
                Some(if row.get::<_, bool>(0) {
                    MemberRole::Standby
                } else {
                    MemberRole::Primary
                })
            }
        }
    };
    tokio::time::timeout(timeout, work).await.ok().flatten()
}

/// Probes every instance of [`to_probe`] concurrently and records the answers.
pub async fn round(cfg: &ClusterConfig, state: &ClusterState, reports: &Reports, engine: &Engine) {
    let heartbeat = cfg.timing.heartbeat_interval();
    let names = to_probe(cfg, state, reports, Instant::now(), heartbeat * 3 / 2);
    let timeout = cfg.timing.probe_timeout();
    let probes = names.iter().map(|n| async move {
        let started = Instant::now();
        (n, started, probe(cfg, n, timeout).await)
    });
    for (name, started, role) in futures::future::join_all(probes).await {
        if let Some(role) = role {
            // As of when the probe started: it answered no earlier than that.
            engine.saw_from_outside(name, role, started);
        } else {
            tracing::debug!(instance = %name, "does not answer the CMServer's own probe");
        }
    }
}
