//! REBUILD: a DN standby is copied from its primary over the data-unit build channel
//! (`Order.build_source`, served by the primary's agent): stop, then either a full copy
//! (`Order.full`, or no data dir: the old dir moved aside to `data.old`) or an
//! incremental one (the dir kept, only blocks that differ travel: a former primary or a
//! standby far behind); configure as a standby, start (unless it is held stopped).
//! Without a build source (an older CMServer) it falls back to pg_basebackup.

use dn_replicator::build_sink::{self, SinkConfig};
use ha_common::proto::cm::Order;

use crate::error::{AgentError, Result};
use crate::lifecycle::LifecycleEvent;
use crate::postgres::{PgInstance, PgSettings};
use crate::supervisor::{InstanceSupervisor, Managed};

/// How long the sink keeps reconnecting to a source after a lost connection.
const SINK_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

pub async fn apply(sup: &mut InstanceSupervisor, order: &Order) -> Result<String> {
    let name = sup.name.clone();
    let upstream = sup.upstream();
    let cfg = sup.config();
    let Managed::Postgres { pg, group } = &sup.managed else {
        return Err(AgentError::Instance(format!(
            "{name}: REBUILD applies to DN instances (a GTM standby copies its primary by itself)"
        )));
    };
    let up = upstream
        .ok_or_else(|| AgentError::Instance(format!("{name}: no primary to copy from is known")))?;
    if up.host == pg.address && up.port == pg.port {
        return Err(AgentError::Instance(format!(
            "{name} cannot be rebuilt from itself"
        )));
    }
    let pg = pg.clone();
    let group = group.clone();
    pg.stop().await?;
    let incremental = !order.full && !order.build_source.is_empty() && pg.data_dir.exists();
    let aside = if incremental {
        None
    } else {
        pg.move_data_aside()?
    };
    sup.event(LifecycleEvent::NeedsData);
    let how = if order.build_source.is_empty() {
        pg.basebackup(&up).await?;
        "pg_basebackup".to_owned()
    } else {
        receive(&pg, &order.build_source, incremental).await?
    };
    sup.event(LifecycleEvent::DataReady);
    let settings = PgSettings::for_member(&cfg, &group, &name, Some(up.clone()))?;
    pg.configure(&settings)?;
    sup.last_error.clear();
    if sup.wants_run() == Some(false) {
        sup.event(LifecycleEvent::Hold);
    } else {
        pg.start().await?;
        sup.event(LifecycleEvent::Started);
    }
    Ok(match aside {
        Some(old) => format!(
            "{name} rebuilt from {}:{} ({how}; old data in {})",
            up.host,
            up.port,
            old.display()
        ),
        None => format!("{name} built from {}:{} ({how})", up.host, up.port),
    })
}

/// Runs the build sink into the instance's data dir; says what travelled.
async fn receive(pg: &PgInstance, source: &str, incremental: bool) -> Result<String> {
    pg.prepare_dirs()?;
    let cfg = SinkConfig {
        source: source.to_owned(),
        data_dir: pg.data_dir.clone(),
        state_dir: pg.instance_dir.clone(),
        incremental,
        owner: pg.os_user.ids(),
        batch_bytes: 8 << 20,
        retry_for: SINK_RETRY,
    };
    let fail = |e: String| AgentError::Instance(format!("{}: build from {source}: {e}", pg.name));
    if !incremental {
        cfg.forget_progress().map_err(|e| fail(e.to_string()))?;
    }
    let r = build_sink::run(&cfg)
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok(format!(
        "{} build: {} of {} blocks copied, {} unchanged, {} MiB WAL",
        if incremental { "incremental" } else { "full" },
        r.units_written,
        r.units,
        r.units_same,
        r.wal_bytes >> 20
    ))
}
