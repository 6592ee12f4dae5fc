//! PROMOTE: a DN standby becomes primary (`pg_ctl promote -w`, then its settings are
//! rewritten for the primary role), refused when it has not received WAL beyond the
//! order's `min_lsn` (switchover: the old primary's shutdown checkpoint); a GTM
//! standby gets the Promote RPC (in the GTM's own term counter, running alone).

use ha_common::proto::cm::Order;

use crate::error::{AgentError, Result};
use crate::postgres::PgSettings;
use crate::supervisor::{InstanceSupervisor, Managed};

pub async fn apply(sup: &mut InstanceSupervisor, order: &Order) -> Result<String> {
    if sup.pid().is_none() {
        return Err(AgentError::Instance(format!(
            "{} is not running: cannot promote it",
            sup.name
        )));
    }
    let timeout = sup.probe_timeout;
    let name = sup.name.clone();
    match &sup.managed {
        Managed::Postgres { pg, group } => {
            let probe = pg.probe(timeout).await?;
            if probe.in_recovery && order.min_lsn != 0 && probe.receive_lsn <= order.min_lsn {
                return Err(AgentError::Instance(format!(
                    "{name} has received WAL up to {} only, not beyond {}: not promoted",
                    ha_common::lsn::format_lsn(probe.receive_lsn),
                    ha_common::lsn::format_lsn(order.min_lsn)
                )));
            }
            if probe.in_recovery {
                pg.promote().await?;
            }
            // Now a primary: no primary_conninfo, its group's others as sync standbys.
            let cfg = sup.config();
            let settings = PgSettings::for_member(&cfg, group, &name, None)?;
            if pg.configure(&settings)? {
                pg.reload().await?;
            }
            Ok(if probe.in_recovery {
                format!("{name} promoted")
            } else {
                format!("{name} already primary")
            })
        }
        Managed::Gtm(g) => {
            let s = g.promote(timeout).await?;
            Ok(format!(
                "{name} promoted: {}",
                crate::gtm_instance::describe(&s)
            ))
        }
        Managed::Secondary { .. } => Err(AgentError::Instance(format!(
            "{name}: a DN secondary is never promoted (it holds WAL only)"
        ))),
        Managed::Cn(_) => Err(AgentError::Instance(format!(
            "{name}: a CN has no standby role (every CN serves)"
        ))),
    }
}
