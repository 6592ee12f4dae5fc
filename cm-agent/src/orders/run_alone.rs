//! RUN_ALONE: a GTM primary serves without its standby (the standby is lost), or
//! requires it again once the standby has resynced (SetRunAlone RPC).

use ha_common::proto::cm::Order;

use crate::error::{AgentError, Result};
use crate::supervisor::{InstanceSupervisor, Managed};

pub async fn apply(sup: &mut InstanceSupervisor, order: &Order) -> Result<String> {
    let Managed::Gtm(g) = &sup.managed else {
        return Err(AgentError::Instance(format!(
            "{}: RUN_ALONE applies to a GTM primary",
            sup.name
        )));
    };
    let s = g.set_run_alone(order.run_alone, sup.probe_timeout).await?;
    Ok(format!(
        "{} run-alone {}: {}",
        sup.name,
        if order.run_alone { "on" } else { "off" },
        crate::gtm_instance::describe(&s)
    ))
}
