//! REBUILD: a DN standby is copied afresh from its primary: stop, move the data dir
//! aside (`data.old`), pg_basebackup, configure as a standby, start (unless it is
//! held stopped).

use ha_common::proto::cm::Order;

use crate::error::{AgentError, Result};
use crate::lifecycle::LifecycleEvent;
use crate::postgres::PgSettings;
use crate::supervisor::{InstanceSupervisor, Managed};

pub async fn apply(sup: &mut InstanceSupervisor, _order: &Order) -> Result<String> {
    super::refuse_unsupported(sup)?;
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
    let aside = pg.move_data_aside()?;
    sup.event(LifecycleEvent::NeedsData);
    pg.basebackup(&up).await?;
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
            "{name} rebuilt from {}:{} (old data in {})",
            up.host,
            up.port,
            old.display()
        ),
        None => format!("{name} built from {}:{}", up.host, up.port),
    })
}
