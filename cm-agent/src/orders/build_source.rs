//! BUILD_SOURCE: this DN primary's agent serves one build of a standby over the
//! data-unit build channel (`dn_replicator::build_source`, run inside the agent: it
//! reads the data dir directly and holds the backup on its own PostgreSQL session).
//! Answers at once with the address; the build runs in the background and ends when
//! the standby has everything, or when its sink stays away for the resume window.

use std::net::SocketAddr;
use std::time::Duration;

use dn_replicator::build_source::{self, PgTarget, SourceConfig};
use ha_common::config::Role;
use ha_common::proto::cm::Order;

use crate::error::{AgentError, Result};
use crate::supervisor::{InstanceSupervisor, Managed};
use ha_common::dn_auth::DnRole;

/// How long a build waits for its (first or returning) sink.
const RESUME_WINDOW: Duration = Duration::from_secs(120);

/// Returns the address the build source listens on.
pub async fn apply(sup: &mut InstanceSupervisor, _order: &Order) -> Result<String> {
    let name = sup.name.clone();
    let Managed::Postgres { pg, .. } = &sup.managed else {
        return Err(AgentError::Instance(format!(
            "{name}: BUILD_SOURCE applies to DN instances"
        )));
    };
    if sup.assigned_role() != Some(Role::Primary) || !pg.is_running() {
        return Err(AgentError::Instance(format!(
            "{name} is not a running primary: it cannot serve a build"
        )));
    }
    let ip: std::net::IpAddr = pg.address.parse().map_err(|_| {
        AgentError::Instance(format!(
            "{name}: address {:?} is not an IP address to serve a build on",
            pg.address
        ))
    })?;
    let listener = build_source::bind(SocketAddr::new(ip, 0))
        .await
        .map_err(|e| AgentError::Instance(format!("{name}: build source: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| AgentError::Instance(format!("{name}: build source: {e}")))?;
    let cfg = SourceConfig {
        data_dir: pg.data_dir.clone(),
        pg: PgTarget {
            host: pg.address.clone(),
            port: pg.port,
            user: DnRole::Replication.name().to_owned(),
            password: Some(
                pg.passwords
                    .read(DnRole::Replication)
                    .map_err(|e| AgentError::Instance(format!("{name}: build source: {e}")))?,
            ),
        },
        resume_window: RESUME_WINDOW,
        first_wait: RESUME_WINDOW,
        max_rate: None,
    };
    tokio::spawn(async move {
        match build_source::serve_one(&listener, &cfg).await {
            Ok(r) => tracing::info!(
                instance = %name,
                session = r.session,
                units = r.units,
                sent = r.units_sent,
                unchanged = r.same_units,
                wal_bytes = r.wal_bytes_sent,
                "build served"
            ),
            Err(e) => tracing::warn!(instance = %name, "build source ended: {e}"),
        }
    });
    Ok(addr.to_string())
}
