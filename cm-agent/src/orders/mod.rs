//! One-shot orders from the CMServer, one file per kind: adding an order touches one
//! new file and one match arm. Term checks happen before an order gets here (see
//! [`crate::report`]); each order's outcome goes back in the next report.

mod build_source;
mod demote;
mod promote;
mod rebuild;
mod run_alone;
mod start;
mod stop;

use ha_common::proto::cm::{Order, OrderKind, OrderOutcome};

use crate::error::AgentError;
use crate::supervisor::{InstanceSupervisor, Managed};

/// Carries out `order` on the instance `sup` supervises.
pub async fn execute(sup: &mut InstanceSupervisor, order: &Order) -> OrderOutcome {
    let kind = OrderKind::try_from(order.kind).unwrap_or(OrderKind::OrderUnspecified);
    tracing::info!(instance = %sup.name, id = order.id, term = order.term, kind = kind.as_str_name(), "order");
    let mut address = String::new();
    let result = match kind {
        OrderKind::Start => start::apply(sup, order).await,
        OrderKind::Stop => stop::apply(sup, order).await,
        OrderKind::Promote => promote::apply(sup, order).await,
        OrderKind::Demote => demote::apply(sup, order).await,
        OrderKind::Rebuild => rebuild::apply(sup, order).await,
        OrderKind::RunAlone => run_alone::apply(sup, order).await,
        OrderKind::BuildSource => build_source::apply(sup, order).await.map(|addr| {
            address = addr.clone();
            format!("{} serves a build on {addr}", sup.name)
        }),
        OrderKind::OrderUnspecified => Err(AgentError::Instance(format!(
            "unknown order kind {}",
            order.kind
        ))),
    };
    let (ok, message) = match result {
        Ok(m) => (true, m),
        Err(e) => (false, e.to_string()),
    };
    // A stopped DN tells where its WAL ends (switchover checks its standby has it all).
    let lsn = match (&sup.managed, kind, ok) {
        (Managed::Postgres { pg, .. }, OrderKind::Stop, true) if pg.has_data() => {
            pg.checkpoint_lsn().await.unwrap_or(0)
        }
        _ => 0,
    };
    if ok {
        tracing::info!(instance = %sup.name, id = order.id, "order done: {message}");
    } else {
        tracing::warn!(instance = %sup.name, id = order.id, "order failed: {message}");
    }
    OrderOutcome {
        order_id: order.id,
        ok,
        message,
        lsn,
        address,
    }
}
