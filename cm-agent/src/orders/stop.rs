//! STOP: stop the instance now and keep it stopped until a START order or a changed
//! assignment.

use ha_common::proto::cm::Order;

use crate::error::Result;
use crate::lifecycle::LifecycleEvent;
use crate::supervisor::InstanceSupervisor;

pub async fn apply(sup: &mut InstanceSupervisor, _order: &Order) -> Result<String> {
    sup.stopped_by_order = true;
    let was_running = sup.pid().is_some();
    sup.stop_now().await?;
    sup.event(LifecycleEvent::Hold);
    Ok(if was_running {
        format!("{} stopped", sup.name)
    } else {
        format!("{} was not running; held stopped", sup.name)
    })
}
