//! START: run the instance now (one-shot; ends a hold placed by a STOP order).

use ha_common::proto::cm::Order;

use crate::error::Result;
use crate::lifecycle::{LifecycleEvent, LifecycleState};
use crate::supervisor::InstanceSupervisor;

pub async fn apply(sup: &mut InstanceSupervisor, _order: &Order) -> Result<String> {
    sup.stopped_by_order = false;
    if let Some(pid) = sup.pid() {
        sup.event(LifecycleEvent::ProcessUp);
        return Ok(format!("{} already running (pid {pid})", sup.name));
    }
    if *sup.lifecycle.state() == LifecycleState::HeldStopped {
        sup.event(LifecycleEvent::Release);
    }
    if let Err(e) = sup.start_now().await {
        sup.last_error = e.to_string();
        sup.event(LifecycleEvent::Fail(e.to_string()));
        return Err(e);
    }
    Ok(format!("{} started", sup.name))
}
