//! DEMOTE: a DN (former) primary becomes a standby of the assigned primary: stop,
//! pg_rewind onto the primary's history (a no-op when it did not diverge), write
//! standby.signal and primary_conninfo, start. A GTM gets the Demote RPC.

use ha_common::proto::cm::Order;

use crate::error::{AgentError, Result};
use crate::lifecycle::LifecycleEvent;
use crate::postgres::PgSettings;
use crate::supervisor::{InstanceSupervisor, Managed};

pub async fn apply(sup: &mut InstanceSupervisor, _order: &Order) -> Result<String> {
    let name = sup.name.clone();
    let timeout = sup.probe_timeout;
    let upstream = sup.upstream();
    let cfg = sup.config();
    match &sup.managed {
        Managed::Gtm(g) => {
            let s = g.demote(timeout).await?;
            Ok(format!(
                "{name} demoted: {}",
                crate::gtm_instance::describe(&s)
            ))
        }
        Managed::Postgres { pg, group } => {
            let up = upstream.ok_or_else(|| {
                AgentError::Instance(format!("{name}: no primary to follow is known"))
            })?;
            if up.host == pg.address && up.port == pg.port {
                return Err(AgentError::Instance(format!("{name} cannot follow itself")));
            }
            let pg = pg.clone();
            let group = group.clone();
            pg.stop().await?;
            let rewind = if pg.configured_as_standby() {
                "already a standby".to_owned()
            } else {
                let out = pg.rewind(&up).await?;
                if out.contains("no rewind required") {
                    "no rewind required".to_owned()
                } else {
                    "rewound".to_owned()
                }
            };
            let settings = PgSettings::for_member(&cfg, &group, &name, Some(up.clone()))?;
            pg.configure(&settings)?;
            pg.start().await?;
            sup.last_error.clear();
            sup.event(LifecycleEvent::ProcessUp);
            Ok(format!(
                "{name} now a standby of {}:{} ({rewind})",
                up.host, up.port
            ))
        }
        Managed::Secondary { .. } => Err(AgentError::Instance(format!(
            "{name}: a DN secondary is never demoted (it holds WAL only)"
        ))),
        Managed::Cn(_) => Err(AgentError::Instance(format!(
            "{name}: a CN has no standby role (every CN serves)"
        ))),
    }
}
